"""Trajectories: the saved checkpoints of one training run, merged straight from mapped files.

A Trajectory is opened from a Recorder directory, a packed store (lcsc_fast.pack), a list of
.safetensors files, or a list of sharded checkpoints (model.safetensors.index.json). Opening reads
and checks headers only. Merging reads tensor data where it lies, in the page cache through
read-only memory maps, with the fused engine; nothing is loaded whole.

Internally every trajectory compiles, once, into a segment table: a segment is a run of elements
of one tensor, and for each source column (a checkpoint, a packed delta, the packed base) the
table holds the file, byte offset and dtype where that run lies. A merge turns the table into
the engine's pointer tables with a few vectorised operations, so its cost in Python does not
grow with the number of checkpoints times tensors.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import engine
from .safetensors_io import CheckpointError, MappedFile, naming_changed_files, read_header

__all__ = ["Trajectory"]

_MERGEABLE = (torch.float32, torch.float16, torch.bfloat16)
RECORDER_FORMAT = "lcsc_fast.trajectory"
PACKED_FORMAT = "lcsc_fast.packed"
# Work is handed to the engine in chunks of about this many source bytes, so that the next
# chunk's pages can be asked for (readahead) while this one is merged.
CHUNK_NBYTES = 256 * 2**20
# Raw checkpoints: a segment covers at most SEGMENT_ELEMS elements of one tensor, and at most
# about SEGMENT_NBYTES source bytes over all checkpoints (shorter runs for many checkpoints).
SEGMENT_ELEMS = 1 << 20
SEGMENT_NBYTES = 64 * 2**20


@dataclass
class _Segments:
    """Runs of elements and where each source column holds them. [S] or [S, M] arrays."""

    tensor: np.ndarray  # [S] index into Trajectory._float_names
    start: np.ndarray  # [S] first element within the tensor
    numel: np.ndarray  # [S]
    file: np.ndarray  # [S, M] index into Trajectory._files
    offset: np.ndarray  # [S, M] byte offset within that file
    dtype: np.ndarray  # [S, M] engine dtype code
    nbytes: np.ndarray  # [S] source bytes of the segment over all columns


def _engine_code(dtype: torch.dtype) -> int:
    return engine._DTYPE_CODES[dtype]


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _code_nbytes(codes: np.ndarray) -> np.ndarray:
    """Bytes per element for engine dtype codes (float32: 4, float16/bfloat16: 2)."""
    return np.where(codes == 0, 4, 2).astype(np.int64)


class Trajectory(Sequence):
    """The checkpoints of one run. len(traj) checkpoints; traj[i] is checkpoint i as a dict of
    tensors (copied out of the file: for inspection, not for merging)."""

    def __init__(self, *, kind, files, headers, checkpoints, steps, float_names, shapes,
                 dtypes, int_entries, segments, packed_base=None):
        self.kind = kind  # "checkpoints" or "packed"
        self._headers = headers  # [F] Header
        self._files = files  # [F] MappedFile, or resident tensors after .to()
        self._checkpoints = checkpoints  # [N] name -> (file index, TensorEntry); packed: integers only
        self.steps = steps
        self._float_names = float_names
        self.shapes = shapes  # name -> shape, every tensor
        self.dtypes = dtypes  # name -> dtype of the checkpoints' tensors
        self._int_entries = int_entries  # name -> (file index, TensorEntry) of the last checkpoint
        self._segments = segments
        self._packed_base = packed_base  # packed: index of the base checkpoint
        self._resident = None  # after .to(): (device, [F] address) of resident copies
        self._resident_buffers = None
        self._closed = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, source, *, verify: bool = False, base=None, scale=None) -> "Trajectory":
        """Open a Recorder directory, a packed store, a list of .safetensors files, or a list of
        sharded checkpoints (each a model.safetensors.index.json, or a directory holding one).

        Headers are read and checked; tensor data is not read, except with verify=True on a
        packed store, which checks every file's SHA-256 against the manifest.

        With base= (the frozen weights W0: a state dict, an nn.Module, or safetensors files),
        source holds LoRA adapters instead (a Recorder directory, PEFT adapter folders, or
        adapter_model.safetensors files), and a LoraTrajectory is returned: checkpoint i is
        W0 + s B_i A_i. scale= gives s where no adapter_config.json does. See
        lcsc_fast.lora_trajectory.
        """
        if base is not None or scale is not None:
            if verify:
                raise TypeError("verify= checks a packed store's files; LoRA adapters have none")
            from .lora_trajectory import LoraTrajectory

            return LoraTrajectory.open(source, base=base, scale=scale)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            manifest_path = os.path.join(path, "manifest.json")
            if os.path.isdir(path) and os.path.exists(manifest_path):
                manifest = _read_json(manifest_path)
                fmt = manifest.get("format") if isinstance(manifest, dict) else None
                if fmt == RECORDER_FORMAT:
                    return cls._open_recorded(path, manifest)
                if fmt == PACKED_FORMAT:
                    from .pack import open_packed

                    return open_packed(cls, path, manifest, verify=verify)
                raise CheckpointError(f"{manifest_path}: unknown format {fmt!r}; expected "
                                      f"{RECORDER_FORMAT!r} or {PACKED_FORMAT!r}")
            if os.path.isdir(path):
                if os.path.exists(os.path.join(path, "adapter_config.json")):
                    raise CheckpointError(f"{path} holds a LoRA adapter; open it with the frozen "
                                          "base weights: Trajectory.open(adapters, base=...)")
                raise CheckpointError(f"{path}: no manifest.json here; pass a Recorder directory, "
                                      "a packed store, or a list of checkpoint files")
            source = [path]
        if not isinstance(source, Sequence) or isinstance(source, (str, bytes)) or not source:
            raise TypeError("Trajectory.open: expected a directory or a non-empty list of "
                            "checkpoint paths")
        checkpoints, indexes = zip(*(_checkpoint_source(os.fspath(p)) for p in source))
        return cls._from_checkpoints(list(checkpoints), steps=list(range(len(checkpoints))),
                                     indexes=indexes)

    @classmethod
    def _open_recorded(cls, path: str, manifest: dict) -> "Trajectory":
        files, steps = _recorded_snapshots(path, manifest)
        return cls._from_checkpoints([[f] for f in files], steps=steps)

    @classmethod
    def _from_checkpoints(cls, checkpoints: list[list[str]], steps: list[int],
                          indexes=None) -> "Trajectory":
        """checkpoints: per checkpoint, the files (shards) that together hold it; indexes: per
        checkpoint, None or the (path, weight_map) of the index naming those shards."""
        headers, file_index = [], {}
        per_checkpoint = []
        for k, files in enumerate(checkpoints):
            entries = {}
            for path in files:
                if path not in file_index:
                    file_index[path] = len(headers)
                    headers.append(read_header(path))
                header = headers[file_index[path]]
                for name, entry in header.entries.items():
                    if name in entries:
                        raise CheckpointError(f"{path}: tensor {name!r} is also in "
                                              f"{headers[entries[name][0]].path}")
                    entries[name] = (file_index[path], entry)
            if indexes is not None and indexes[k] is not None:
                _check_index(*indexes[k], entries, headers)
            per_checkpoint.append(entries)

        first, first_path = per_checkpoint[0], checkpoints[0][0]
        for k, entries in enumerate(per_checkpoint[1:], start=1):
            _check_same_tensors(first, entries, first_path, checkpoints[k][0])
        float_names, shapes, dtypes = [], {}, {}
        for name in sorted(first):
            entry = per_checkpoint[-1][name][1]
            shapes[name], dtypes[name] = entry.shape, entry.dtype
            if entry.dtype.is_floating_point:
                for entries in per_checkpoint:
                    if entries[name][1].dtype not in _MERGEABLE:
                        raise CheckpointError(f"{headers[entries[name][0]].path}: tensor "
                                              f"{name!r} is {entries[name][1].dtype}; merges "
                                              "need float32, float16 or bfloat16")
                float_names.append(name)
        int_entries = {n: per_checkpoint[-1][n] for n in first if n not in float_names}

        # Segments of at most SEGMENT_ELEMS elements of one tensor and about SEGMENT_NBYTES
        # bytes over all checkpoints; source column k is checkpoint k. Runs this short keep
        # chunks (readahead, page release, the staging buffers of CUDA merges) small however
        # large a tensor is and however many checkpoints there are.
        M = len(per_checkpoint)
        parts = []
        for t, name in enumerate(float_names):
            file = np.array([entries[name][0] for entries in per_checkpoint], dtype=np.int64)
            begin = np.array([entries[name][1].begin for entries in per_checkpoint],
                             dtype=np.int64)
            codes = np.array([_engine_code(entries[name][1].dtype) for entries in per_checkpoint],
                             dtype=np.int32)
            size = _code_nbytes(codes)
            numel = math.prod(shapes[name])
            # whole multiples of 64 elements, so each segment is as aligned as its tensor
            run = min(SEGMENT_ELEMS, max(64, SEGMENT_NBYTES // int(size.sum()) // 64 * 64))
            starts = np.arange(0, numel, run, dtype=np.int64)
            lens = np.minimum(run, numel - starts)
            parts.append((np.full(len(starts), t, dtype=np.int64), starts, lens,
                          np.broadcast_to(file, (len(starts), M)),
                          begin[None, :] + starts[:, None] * size[None, :],
                          np.broadcast_to(codes, (len(starts), M)), lens * size.sum()))
        segments = _Segments(*(np.concatenate([p[i] for p in parts]) if parts else
                               np.zeros((0,) if i < 3 or i == 6 else (0, M),
                                        dtype=np.int32 if i == 5 else np.int64)
                               for i in range(7)))
        files = [MappedFile(h.path, h.file_nbytes, h.file_id) for h in headers]
        return cls(kind="checkpoints", files=files, headers=headers, checkpoints=per_checkpoint,
                   steps=steps, float_names=float_names, shapes=shapes, dtypes=dtypes,
                   int_entries=int_entries, segments=segments)

    # ------------------------------------------------------------------ inspection

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        """Checkpoint i as a dict of tensors copied out of the files."""
        self._check_open()
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"checkpoint index {i} is out of range for {n} checkpoints")
        i %= n
        if self.kind == "packed":
            from .pack import packed_checkpoint

            return packed_checkpoint(self, i)
        return {name: self._files[f].tensor(entry)
                for name, (f, entry) in self._checkpoints[i].items()}

    def __repr__(self) -> str:
        return (f"Trajectory({self.kind}, {len(self)} checkpoints, steps {self.steps[0]}.."
                f"{self.steps[-1]}, {len(self.shapes)} tensors)")

    def close(self) -> None:
        """Close the files and drop resident copies; using the trajectory then raises."""
        self._closed = True
        self._resident = self._resident_buffers = None
        for f in self._files:
            f.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the trajectory is closed; open it again with Trajectory.open")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ merging

    def merge(self, coeffs, base=None, device="cpu", dtype: torch.dtype | None = None) -> dict:
        """The merged checkpoint as a new dict name -> tensor on device.

        Floating-point tensors get dtype (default: the checkpoints' own dtype), the others are the
        last checkpoint's. Same coefficients and base as lcsc_fast.merge_into.
        """
        self._check_open()
        device = torch.device(device)
        out = {}
        for name in self.names:
            d = self.dtypes[name]
            if d.is_floating_point and dtype is not None:
                d = dtype
            out[name] = torch.empty(self.shapes[name], dtype=d, device=device)
        self._lcsc_merge_into(out, coeffs, base)
        return out

    def _lcsc_merge_into(self, target, coeffs, base=None):
        """lcsc_fast.merge_into(target, traj, coeffs, base) lands here."""
        self._check_open()
        tensors = engine._target_tensors(target)
        targets, device, rows = self._float_targets(tensors)
        (weights,) = engine._coeff_rows(coeffs, None, len(self))
        columns, base_column, extra = self._column_coefficients(weights, base, tensors)
        engine._check_float32_finite(columns, "coefficients of the trajectory's columns")
        if targets:
            self._run([targets], device, rows, [columns], base_column, extra)
            engine._bump_versions(targets)
        for name, (f, entry) in self._int_entries.items():
            with torch.no_grad():
                tensors[name].copy_(self._files[f].tensor(entry) if self._resident is None
                                    else self._resident_int(name))
        return target

    def merge_batched(self, coeffs, outs, base=None) -> None:
        """K merges in one pass over the trajectory: outs[k] (a dict or module holding every
        floating-point tensor of the trajectory) gets the merge with coeffs[k]. Integer tensors
        are not touched. How a search scores a generation: each byte is read once for all K."""
        self._check_open()
        rows_k = engine._coeff_rows(coeffs, len(outs), len(self))
        targets_k, columns_k, device, rows, base_column, extra = [], [], None, None, None, None
        for k, out in enumerate(outs):
            tensors = engine._target_tensors(out)
            targets, out_device, out_rows = self._float_targets(tensors, ints_required=False)
            if device is not None and out_device != device:
                raise ValueError(f"outs[{k}] is on {out_device} but outs[0] is on {device}")
            device, rows = out_device, out_rows if rows is None else rows
            columns, base_column, extra = self._column_coefficients(rows_k[k], base, tensors)
            engine._check_float32_finite(columns, f"coefficients of row {k}")
            targets_k.append(targets)
            columns_k.append(columns)
        if targets_k and targets_k[0]:
            self._run(targets_k, device, rows, columns_k, base_column, extra)
            engine._bump_versions([t for targets in targets_k for t in targets])

    def _float_targets(self, tensors, ints_required=True):
        """The target's tensor for each float name, their device, and the segments to merge
        (a tied weight's second name is skipped: its storage is merged under the first)."""
        # Integer tensors the trajectory does not hold (a Recorder snapshots floating-point
        # tensors only, so BatchNorm's num_batches_tracked is not there) are left as they are.
        held = {k: v for k, v in tensors.items() if k in self.shapes or v.is_floating_point()}
        if ints_required:
            engine._check_names(set(self.shapes), held, "the target")
        else:
            engine._check_names(set(self._float_names), {k: v for k, v in held.items()
                                                         if v.is_floating_point()}, "the output")
        targets, device, planned, skip = [], None, set(), []
        for k, name in enumerate(self._float_names):
            t = tensors[name]
            engine._check_tensor(t, f"target[{name!r}]")
            if tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"target[{name!r}]: shape {tuple(t.shape)} differs from the "
                                 f"trajectory's {self.shapes[name]}")
            device = engine._one_device(device, t, f"target[{name!r}]")
            key = (t.data_ptr(), t.numel(), t.dtype)
            if t.numel() and key in planned:
                skip.append(k)
            planned.add(key)
            targets.append(t)
        if ints_required:
            for name in self._int_entries:
                t = tensors[name]
                if t.dtype != self.dtypes[name] or tuple(t.shape) != self.shapes[name]:
                    raise ValueError(f"target[{name!r}]: {t.dtype} {tuple(t.shape)} does not "
                                     f"match the trajectory's {self.dtypes[name]} "
                                     f"{self.shapes[name]}")
        rows = np.flatnonzero(~np.isin(self._segments.tensor, skip))
        return targets, device, rows

    def _column_coefficients(self, w, base, tensors):
        """Coefficients per source column, the column used as the engine's base (or None), and
        an extra column of caller tensors (a state-dict base), for the merge that lcsc_fast.
        merge_into defines: sum_i w_i theta_i, or theta_b + sum_i w_i (theta_i - theta_b)."""
        n = len(self)
        extra = None
        if base is not None and (isinstance(base, bool) or not isinstance(base, (int, Mapping))):
            raise TypeError("base: expected a checkpoint index or a state dict")
        if isinstance(base, int):
            if not -n <= base < n:
                raise ValueError(f"base: index {base} is out of range for {n} checkpoints")
            base %= n
        if isinstance(base, Mapping):
            engine._check_names(set(self.shapes), base, "base")
            extra = base
        total = math.fsum(w)
        if self.kind == "checkpoints":
            columns = list(w)
            if isinstance(base, int):
                columns[base] -= total  # theta_b + sum_i w_i theta_i - (sum_i w_i) theta_b
                return columns, base, None
            if extra is not None:
                return columns + [-total], "extra", extra
            return columns, None, None
        # Packed: theta_i = theta_p + delta_i with delta_p = 0, columns [delta_i (i != p)..., theta_p]
        p = self._packed_base
        deltas = [w[i] for i in range(n) if i != p]
        delta_index = {i: j for j, i in enumerate(i for i in range(n) if i != p)}
        if base is None:
            return deltas + [total], None, None
        if isinstance(base, int):
            # theta_b + sum_i w_i (theta_i - theta_b) = theta_p + sum_i w_i delta_i + (1 - sum w) delta_b
            if base != p:
                deltas[delta_index[base]] += 1.0 - total
            return deltas + [1.0], None, None
        # (1 - sum w) theta_B + (sum w) theta_p + sum_i w_i delta_i, theta_B a caller state dict
        return deltas + [total, 1.0 - total], "extra-source", extra

    def _addresses(self) -> np.ndarray:
        if self._resident is not None:
            return self._resident[1]
        return np.array([f.address for f in self._files], dtype=np.uint64)

    def _run(self, targets, device, rows, columns, base_column, extra):
        """Merge segments `rows` (indices) into K outputs: targets[k] holds one tensor per float
        name, columns[k] the coefficients of output k's source columns."""
        seg = self._segments
        if self._resident is None:
            for f in self._files:
                f.check_unchanged()
            if device.type == "cuda":
                from .streaming import merge_staged

                with naming_changed_files(self._files):
                    return merge_staged(self, targets, device, columns, base_column, extra,
                                        rows=rows)
            if device.type != "cpu":
                raise ValueError(f"target on {device}: merges from files go to cpu or cuda")
        elif _normalized(device) != self._resident[0]:
            raise ValueError(f"the trajectory is resident on {self._resident[0]} but the target "
                             f"is on {device}; merge on that device or call .to({str(device)!r})")
        src = self._addresses()[seg.file[rows]] + seg.offset[rows].astype(np.uint64)  # [R, M]
        plan = self._plan(rows, src, targets, device, base_column, extra)
        if self._resident is not None:
            return plan.run(columns)
        # A trajectory that fits in the page cache is merged in one pass: asking for readahead
        # would cost a page-cache walk per merge (a third of a warm merge's time). A larger one
        # cannot stay cached, and pages a merge touched stay mapped, counted as the process's
        # memory, until released: it goes in chunks, the next chunk's pages asked for ahead and
        # each chunk's released once merged, so memory stays bounded however large it is.
        if sum(f.nbytes for f in self._files) <= _physical_memory_nbytes() // 2:
            with naming_changed_files(self._files):
                return plan.run(columns, guard_faults=True)
        chunks = _chunks(seg.nbytes[rows], CHUNK_NBYTES)
        with naming_changed_files(self._files):
            for k, (lo, hi) in enumerate(chunks):
                if k + 1 < len(chunks):
                    self._advise(rows[chunks[k + 1][0]:chunks[k + 1][1]], mmap.MADV_WILLNEED)
                plan.run(columns, lo, hi, guard_faults=True)
                self._advise(rows[lo:hi], mmap.MADV_DONTNEED)

    def _plan(self, rows: np.ndarray, src: np.ndarray, targets, device, base_column, extra):
        """The engine plan for segments `rows` (indices), whose source columns are at src
        ([R, M])."""
        seg = self._segments
        tensor, start = seg.tensor[rows], seg.start[rows].astype(np.uint64)
        src_dtype = seg.dtype[rows]
        base_ptr = np.zeros(len(tensor), dtype=np.uint64)
        base_dtype = np.zeros(len(tensor), dtype=np.int32)
        if base_column in ("extra", "extra-source"):
            ptr, codes = self._caller_column(extra, device, tensor, start)
            src = np.concatenate([src, ptr[:, None]], axis=1)
            src_dtype = np.concatenate([src_dtype, codes[:, None]], axis=1)
            if base_column == "extra":
                base_ptr, base_dtype = ptr, codes
        elif base_column is not None:
            base_ptr, base_dtype = src[:, base_column].copy(), src_dtype[:, base_column].copy()
        outs = []
        for out in targets:  # [K] lists of tensors, one per float name
            ptr = np.array([t.data_ptr() for t in out], dtype=np.uint64)
            size = np.array([t.element_size() for t in out], dtype=np.uint64)
            outs.append(ptr[tensor] + start * size[tensor])
        out_code = np.array([_engine_code(t.dtype) for t in targets[0]], dtype=np.int32)
        for k, out in enumerate(targets[1:], start=1):
            if [t.dtype for t in out] != [t.dtype for t in targets[0]]:
                raise TypeError(f"outs[{k}] has other dtypes than outs[0]; a batch shares dtypes")
        return engine._Plan.from_arrays(
            device, [self._float_names[t] for t in tensor], seg.numel[rows], np.stack(outs),
            out_code[tensor], base_ptr, base_dtype, src, src_dtype, num_checkpoints=len(self))

    @staticmethod
    def _restage(plan, lo: int, hi: int, src: np.ndarray, base_column) -> None:
        """Point rows [lo, hi) of a plan made by _plan at other addresses of their source
        columns, src ([hi - lo, M]): staged copies of the same bytes, so its checks stand."""
        srcs = plan.srcs.reshape(len(plan.numels), -1)  # a view: [R, N], N >= M
        srcs[lo:hi, :src.shape[1]] = src
        if isinstance(base_column, int):  # the base is one of the columns (see _plan)
            plan.bases[lo:hi] = src[:, base_column]
        plan.forget_device_tables()

    def _caller_column(self, extra, device, tensor, start):
        """Pointers and dtype codes of a caller's state dict (a base) for segments of tensors
        `tensor` starting at elements `start`."""
        ptr = np.zeros(len(self._float_names), dtype=np.uint64)
        size = np.zeros(len(self._float_names), dtype=np.uint64)
        codes = np.zeros(len(self._float_names), dtype=np.int32)
        for k, name in enumerate(self._float_names):
            t = extra[name]
            engine._check_tensor(t, f"base[{name!r}]")
            if tuple(t.shape) != self.shapes[name] or t.device != device:
                raise ValueError(f"base[{name!r}]: {tuple(t.shape)} on {t.device} does not match "
                                 f"the target's {self.shapes[name]} on {device}")
            ptr[k], size[k], codes[k] = t.data_ptr(), t.element_size(), _engine_code(t.dtype)
        return ptr[tensor] + start * size[tensor], codes[tensor]

    def _advise(self, segments: np.ndarray, advice: int) -> None:
        seg = self._segments
        lengths = seg.numel[segments, None] * _code_nbytes(seg.dtype[segments])
        for f in np.unique(seg.file[segments]):
            mask = seg.file[segments] == f
            begin = int(seg.offset[segments][mask].min())
            end = int((seg.offset[segments] + lengths)[mask].max())
            self._files[f].advise(begin, end - begin, advice)

    # ------------------------------------------------------------------ residency

    def to(self, device) -> "Trajectory":
        """Keep the trajectory's bytes resident on device ("cuda", "cuda:1") or in pinned host
        memory ("pinned"), so that repeated merges (a search) never touch the files again.
        Returns self."""
        self._check_open()
        pinned = str(device) == "pinned"
        if not pinned and torch.device(device).type == "cuda":
            self._check_aligned_for_cuda()
        target = _normalized(torch.device("cpu" if pinned else device))
        buffers, addresses = [], []
        for f in self._files:
            if target.type == "cpu":
                buf = f.read(0, f.nbytes, torch.empty(f.nbytes, dtype=torch.uint8,
                                                      pin_memory=pinned))
            else:
                buf = f.read(0, f.nbytes).to(target)
            buffers.append(buf)
            addresses.append(buf.data_ptr())
        self._resident_buffers = buffers
        self._resident = (target, np.array(addresses, dtype=np.uint64))
        return self

    def _check_aligned_for_cuda(self) -> None:
        """A resident copy keeps each file's layout, and the CUDA kernels read an element with
        a load of its own width: every floating-point tensor must start at a multiple of its
        element size in its file. safetensors' own writer keeps them so; a file written
        otherwise (an odd-length header, float32 data after an odd count of float16) may not,
        and would fault on the device. ValueError naming the first such tensor."""
        for header in self._headers:
            for entry in header.entries.values():
                size = entry.dtype.itemsize
                if entry.dtype.is_floating_point and entry.begin % size:
                    raise ValueError(
                        f"{header.path}: tensor {entry.name!r} ({entry.dtype}) starts at byte "
                        f"{entry.begin} of the file, not a multiple of {size}; a CUDA-resident "
                        "trajectory needs aligned tensors. Re-save the checkpoint with "
                        "safetensors, or merge without .to()")

    def _resident_int(self, name):
        f, entry = self._int_entries[name]
        raw = self._resident_buffers[f][entry.begin:entry.begin + entry.nbytes].cpu()
        return raw.view(entry.dtype).reshape(entry.shape) if entry.nbytes else torch.empty(
            entry.shape, dtype=entry.dtype)


def _physical_memory_nbytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never release


def _normalized(device: torch.device) -> torch.device:
    """cpu for every cpu device, cuda:<index> for cuda (the current one when none is given)."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _chunks(nbytes: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) runs of segments of about `limit` source bytes each."""
    bounds = np.searchsorted(np.cumsum(nbytes), np.arange(limit, int(nbytes.sum()), limit),
                             side="left")
    edges = [0, *sorted(set(int(b) + 1 for b in bounds if b + 1 < len(nbytes))), len(nbytes)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _recorded_snapshots(path: str, manifest: dict) -> tuple[list[str], list[int]]:
    """The snapshot files a Recorder manifest lists, checked against their sizes, and steps;
    as strict as the Recorder reading its own manifest (integer steps, non-negative and
    ascending; files in the directory)."""
    where = os.path.join(path, "manifest.json")
    snapshots = manifest.get("snapshots")
    if not isinstance(snapshots, list) or not snapshots:
        raise CheckpointError(f"{where} lists no snapshots")
    files, steps = [], []
    for k, snap in enumerate(snapshots):
        if not (isinstance(snap, dict) and isinstance(snap.get("file"), str)
                and all(_is_int(snap.get(key)) for key in ("step", "nbytes"))):
            raise CheckpointError(f"{where}: snapshot {k} is {json.dumps(snap)[:80]}; it needs "
                                  "an integer step, a file name and an integer nbytes")
        step, name, nbytes = snap["step"], snap["file"], snap["nbytes"]
        if os.path.isabs(name) or ".." in re.split(r"[/\\]", name):
            raise CheckpointError(f"{where}: snapshot {k} names {name!r}, which is outside "
                                  f"{path}; a Recorder's snapshots lie in its directory")
        if step < 0:
            raise CheckpointError(f"{where}: snapshot {k} has step {step}; steps are "
                                  "non-negative")
        if steps and step <= steps[-1]:
            raise CheckpointError(f"{where}: snapshot {k} has step {step} after step "
                                  f"{steps[-1]}; steps must ascend")
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.exists(file) else None
        if size != nbytes:
            what = "is missing" if size is None else f"has {size} bytes"
            raise CheckpointError(f"{file} {what}, but the manifest lists {nbytes} bytes "
                                  "(a deleted or damaged snapshot)")
        files.append(file)
        steps.append(step)
    return files, steps


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None


def _checkpoint_files(path: str) -> list[str]:
    """The files of one checkpoint: a .safetensors file, or the shards of an index."""
    return _checkpoint_source(path)[0]


def _checkpoint_source(path: str) -> tuple[list[str], tuple[str, dict[str, str]] | None]:
    """The files of one checkpoint (a .safetensors file, or the shards of an index), and for a
    sharded one its index: (index path, tensor name -> shard path)."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            path = index
        elif os.path.exists(single):
            return [single], None
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    if path.endswith(".json"):
        weight_map = _index_weight_map(path)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} is missing")
        return files, (path, weight_map)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    return [path], None


def _index_weight_map(path: str) -> dict[str, str]:
    """A sharded-checkpoint index's weight_map: tensor name -> the path of the shard holding it."""
    index = _read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: a sharded-checkpoint index needs a weight_map, an object "
                              "mapping each tensor name to the shard file holding it")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{path}: weight_map[{name!r}] is {json.dumps(shard)[:80]}, "
                                  "not the file name of a shard")
    folder = os.path.dirname(path)
    return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}


def _check_index(path: str, weight_map: dict[str, str], entries: dict, headers: list) -> None:
    """The tensors of a sharded checkpoint (entries: name -> (file index, TensorEntry)) are
    exactly those its index at path lists, each in the shard the index names."""
    for name, shard in weight_map.items():
        if name not in entries:
            raise CheckpointError(f"{path}: weight_map lists tensor {name!r} in {shard}, but no "
                                  "shard holds it; the index does not match its shards")
        held_by = headers[entries[name][0]].path
        if held_by != shard:
            raise CheckpointError(f"{path}: weight_map lists tensor {name!r} in {shard}, but "
                                  f"{held_by} holds it; the index does not match its shards")
    unlisted = sorted(entries.keys() - weight_map.keys())
    if unlisted:
        name = unlisted[0]
        raise CheckpointError(f"{path}: tensor {name!r} of {headers[entries[name][0]].path} is "
                              "not in the weight_map; the index does not match its shards")


def _check_same_tensors(first: dict, other: dict, first_path: str, other_path: str) -> None:
    missing, extra = sorted(first.keys() - other.keys()), sorted(other.keys() - first.keys())
    if missing or extra:
        parts = ([f"missing {engine._few(missing)}"] if missing else []) + (
            [f"unexpected {engine._few(extra)}"] if extra else [])
        raise CheckpointError(f"{other_path}: its tensors differ from {first_path}'s: "
                              f"{'; '.join(parts)}")
    for name, (_, entry) in first.items():
        other_entry = other[name][1]
        if other_entry.shape != entry.shape:
            raise CheckpointError(f"{other_path}: tensor {name!r} has shape {other_entry.shape} "
                                  f"but {entry.shape} in {first_path}")
        if other_entry.dtype.is_floating_point != entry.dtype.is_floating_point:
            raise CheckpointError(f"{other_path}: tensor {name!r} is {other_entry.dtype} but "
                                  f"{entry.dtype} in {first_path}")
