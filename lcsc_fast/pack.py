"""The packed store: a trajectory laid out for merging.

    <dir>/manifest.json      steps, base index, delta dtype, block size, tensors, SHA-256 per file
    <dir>/base.safetensors   the base checkpoint theta_p, whole, in its own precision
    <dir>/integers.safetensors  every checkpoint's integer tensors (step counters), keyed
                             "<index>/<name>"; small
    <dir>/deltas.bin         delta_i = theta_i - theta_p for every checkpoint i != p, in the delta
                             dtype (bf16 halves an fp32 run), block-interleaved: for each float
                             tensor in manifest order, for each block of `block_elems` elements
                             (the whole tensor when it has fewer), the N - 1 deltas of that block
                             one after another

The interleaving puts everything one block of a merge needs in one contiguous run of bytes, so
a merge streams deltas.bin front to back: from disk when it is larger than memory, or as a few
large copies to a GPU. A store is written in a new folder beside <dir>
(<dir>.partial-<pid>-<random>) and renamed into place when complete, so a <dir> that exists is
whole; a failed pack removes its folder. An empty <dir> that exists is replaced by the store,
which takes its mode and (where permitted) its group.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import stat

import numpy as np
import torch
from safetensors.torch import save_file

from ._io import chmod_default, fsync_dir
from .safetensors_io import (DTYPE_NAMES, SAFETENSORS_DTYPES, CheckpointError, MappedFile,
                             read_header)
from .trajectory import PACKED_FORMAT, Trajectory, _element_size, _engine_code, _Segments

__all__ = ["pack"]

_DELTA_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 torch.bfloat16: torch.bfloat16, torch.float16: torch.float16,
                 torch.float32: torch.float32}
_STAGE_NBYTES = 64 * 2**20  # deltas computed this many bytes at a time
PACKED_VERSION = 1
_FLOAT_NAMES = ("F32", "F16", "BF16")  # the dtypes merges read: deltas and float tensors


def pack(traj, out_dir, dtype="bf16", base: int = 0, block_elems: int = 65536) -> str:
    """Write a packed store of traj (a Trajectory or anything Trajectory.open takes) to out_dir.

    dtype: the deltas' dtype ("bf16", "fp16", "fp32"); base: the checkpoint index kept whole.
    Merges from the store equal merges from the checkpoints up to the rounding of each delta to
    dtype. Returns out_dir. Raises CheckpointError, leaving nothing behind, when a checkpoint
    holds NaN or Inf or a delta overflows dtype (fp16 ends at 65504).
    """
    if getattr(traj, "kind", None) == "lora":
        raise ValueError("pack: a LoRA trajectory is not packed; its adapters are already "
                         "small low-rank factors, which its merges read in place (.to(device) "
                         "keeps them resident for a search)")
    if not isinstance(traj, Trajectory):
        traj = Trajectory.open(traj)
    if traj.kind != "checkpoints":
        raise ValueError("pack: the trajectory is already packed")
    if dtype not in _DELTA_DTYPES:
        raise ValueError(f"pack: dtype {dtype!r} is not one of bf16, fp16, fp32")
    delta_dtype = _DELTA_DTYPES[dtype]
    n = len(traj)
    if isinstance(base, bool) or not isinstance(base, int) or not -n <= base < n:
        raise ValueError(f"pack: base must be a checkpoint index in [-{n}, {n})")
    base %= n
    if isinstance(block_elems, bool) or not isinstance(block_elems, int) or block_elems < 1:
        raise ValueError(f"pack: block_elems must be a positive integer, not {block_elems!r}")
    out_dir = os.fspath(out_dir)
    existing = _check_out_dir(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise type(e)(f"pack: cannot make the folder {parent} for {out_dir} ({e.strerror or e})"
                      ) from None
    # A new folder beside out_dir, renamed into place when complete: an out_dir that exists is
    # whole, and nothing already on disk is removed (a leftover of an interrupted pack could as
    # well be a folder of the user's with the same name).
    name = os.path.basename(os.path.abspath(out_dir))
    partial = os.path.join(parent, f"{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(partial)
    try:
        if existing is not None:
            _adopt_group(partial, existing)
        _write_store(traj, partial, base, delta_dtype, block_elems)
        if existing is not None:
            os.chmod(partial, stat.S_IMODE(existing.st_mode))
        if os.path.exists(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_dir(parent)
    return out_dir


def _check_out_dir(out_dir: str) -> os.stat_result | None:
    """Refuse an out_dir the store cannot be renamed onto, before anything is written; returns
    the stat of an existing empty directory (the store takes its mode and group), else None."""
    if os.path.islink(out_dir):
        target = os.path.realpath(out_dir)
        hint = (f"pack into {target} itself" if os.path.isdir(target)
                and not os.listdir(target) else "choose a new directory")
        raise FileExistsError(f"pack: {out_dir} is a symbolic link (to {os.readlink(out_dir)}), "
                              f"which the store would replace; {hint}")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"pack: {out_dir} exists and is not a directory; choose a new "
                              "directory")
    if not os.path.isdir(out_dir):
        return None
    if os.listdir(out_dir):
        raise FileExistsError(f"pack: {out_dir} exists and is not empty; choose a new directory")
    return os.stat(out_dir)


def _adopt_group(folder: str, existing: os.stat_result) -> None:
    """Give folder the group and set-group-ID bit of the empty directory it will replace, so
    that the files written in it get the group they would have got there. Best effort: only
    the group's members (and root) may give a file that group."""
    if not hasattr(os, "chown"):  # Windows
        return
    try:
        os.chown(folder, -1, existing.st_gid)
    except OSError:
        return
    os.chmod(folder, stat.S_IMODE(os.stat(folder).st_mode) | existing.st_mode & stat.S_ISGID)


def _write_store(traj: Trajectory, partial: str, base: int, delta_dtype: torch.dtype,
                 block_elems: int) -> None:
    """The store's files and manifest, written and fsynced in the folder `partial`."""
    n = len(traj)
    base_ckpt = traj[base]
    float_names = traj._float_names
    _save(base_ckpt, os.path.join(partial, "base.safetensors"))
    integers = {f"{i}/{name}": traj._files[f].tensor(entry)
                for i in range(n) for name, (f, entry) in traj._checkpoints[i].items()
                if name in traj._int_entries}
    _save(integers, os.path.join(partial, "integers.safetensors"))

    others = [i for i in range(n) if i != base]
    esize = _element_size(delta_dtype)
    digest = hashlib.sha256()
    with open(os.path.join(partial, "deltas.bin"), "wb") as f:
        for name in float_names:
            theta_p = base_ckpt[name].reshape(-1).float()
            if not bool(torch.isfinite(theta_p).all()):
                raise _not_finite(traj, base, name)
            numel = theta_p.numel()
            block = min(block_elems, max(1, numel))  # a longer block is the whole tensor
            # Whole blocks per stage, so that stages concatenate into the block layout.
            per_stage = max(1, _STAGE_NBYTES // max(1, len(others) * esize * block))
            for lo in range(0, numel if others else 0, per_stage * block):
                hi = min(numel, lo + per_stage * block)
                deltas = torch.empty((len(others), hi - lo), dtype=delta_dtype)  # [N-1, hi-lo]
                for j, i in enumerate(others):
                    deltas[j] = _elements(traj, i, name, lo, hi).sub_(theta_p[lo:hi])
                    # A delta stored as inf or NaN would merge to inf or NaN, silently.
                    if not bool(torch.isfinite(deltas[j]).all()):
                        raise _bad_delta(traj, i, base, name, lo, hi, theta_p[lo:hi],
                                         delta_dtype)
                # Stages start on block boundaries, so only a tensor's last block is short.
                full = (hi - lo) // block * block
                interleaved = [deltas[:, :full].reshape(len(others), -1, block)
                               .transpose(0, 1).contiguous(), deltas[:, full:].contiguous()]
                for part in interleaved:
                    if part.numel():
                        data = part.view(torch.uint8).numpy()
                        f.write(data)
                        digest.update(data)
        f.flush()
        os.fsync(f.fileno())

    files = {"base.safetensors": _file_record(os.path.join(partial, "base.safetensors")),
             "integers.safetensors": _file_record(os.path.join(partial, "integers.safetensors")),
             "deltas.bin": {"nbytes": os.path.getsize(os.path.join(partial, "deltas.bin")),
                            "sha256": digest.hexdigest()}}
    manifest = {
        "format": PACKED_FORMAT, "version": PACKED_VERSION, "steps": list(traj.steps),
        "base_index": base, "delta_dtype": DTYPE_NAMES[delta_dtype], "block_elems": block_elems,
        "tensors": [{"name": k, "shape": list(traj.shapes[k]), "dtype": DTYPE_NAMES[
            base_ckpt[k].dtype]} for k in float_names],
        "files": files,
    }
    with open(os.path.join(partial, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(partial)


def _save(tensors: dict, path: str) -> None:
    """tensors as the safetensors file path, mode 0666 less the umask like the store's other
    files, fsynced (save_file does neither)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"format": PACKED_FORMAT})  # one key: safetensors orders keys by hash
    chmod_default(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _elements(traj: Trajectory, i: int, name: str, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of tensor name in checkpoint i, as float32 (a guarded copy)."""
    f, entry = traj._checkpoints[i][name]
    size = _element_size(entry.dtype)
    return traj._files[f].read(entry.begin + lo * size, (hi - lo) * size).view(
        entry.dtype).float()


def _checkpoint_label(traj: Trajectory, i: int, name: str) -> str:
    f, _ = traj._checkpoints[i][name]
    return f"checkpoint {i} (step {traj.steps[i]}, {traj._files[f].path})"


def _not_finite(traj: Trajectory, i: int, name: str) -> CheckpointError:
    return CheckpointError(
        f"pack: {_checkpoint_label(traj, i, name)} holds NaN or Inf in tensor {name!r}; a "
        "packed store keeps differences from the base, which such values make NaN. Repair or "
        "leave out that checkpoint")


def _bad_delta(traj: Trajectory, i: int, base: int, name: str, lo: int, hi: int,
               theta_p: torch.Tensor, delta_dtype: torch.dtype) -> CheckpointError:
    """The error for elements [lo, hi) of tensor name whose delta against the base is not
    finite in delta_dtype: checkpoint i holds NaN or Inf there, or the delta overflows."""
    theta_i = _elements(traj, i, name, lo, hi)
    if not bool(torch.isfinite(theta_i).all()):
        return _not_finite(traj, i, name)
    what = (f"pack: the delta of tensor {name!r} in {_checkpoint_label(traj, i, name)} from "
            f"the base (checkpoint {base}) overflows")
    if not bool(torch.isfinite(theta_i - theta_p).all()):
        return CheckpointError(f"{what} float32; its values are too far from the base's to be "
                               "packed: merge from the checkpoint files instead")
    dtype = str(delta_dtype).removeprefix("torch.")
    other = '"bf16" or "fp32"' if delta_dtype == torch.float16 else '"fp32"'
    return CheckpointError(f"{what} {dtype} (largest {torch.finfo(delta_dtype).max:.6g}); "
                           f"pack with dtype {other}")


def _file_record(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return {"nbytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _manifest_fields(manifest, where: str) -> tuple:
    """(steps, base index, delta dtype, block_elems, [(name, shape, dtype)], {file: (nbytes,
    sha256)}) of a packed store's manifest, each checked for type and range; CheckpointError
    naming the field that is missing or malformed."""
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}; the manifest is damaged or was edited, so "
                               "pack the trajectory again")

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def brief(x) -> str:
        text = repr(x)
        return text if len(text) <= 60 else text[:57] + "..."

    if not isinstance(manifest, dict):
        raise fail(f"it holds {type(manifest).__name__}, not an object")
    version = manifest.get("version")
    if not is_int(version) or version != PACKED_VERSION:
        raise CheckpointError(f"{where}: version {brief(version)} is not one this lcsc_fast "
                              f"reads (version {PACKED_VERSION}); upgrade lcsc_fast, or pack "
                              "the trajectory again")
    steps = manifest.get("steps")
    if not isinstance(steps, list) or not steps or not all(map(is_int, steps)):
        raise fail(f"steps is {brief(steps)}, not a non-empty list of integers")
    p = manifest.get("base_index")
    if not is_int(p) or not 0 <= p < len(steps):
        raise fail(f"base_index is {brief(p)}, not a checkpoint index in [0, {len(steps)})")
    delta_dtype = manifest.get("delta_dtype")
    if not isinstance(delta_dtype, str) or delta_dtype not in _FLOAT_NAMES:
        raise fail(f"delta_dtype is {brief(delta_dtype)}, not one of {', '.join(_FLOAT_NAMES)}")
    block = manifest.get("block_elems")
    if not is_int(block) or block < 1:
        raise fail(f"block_elems is {brief(block)}, not a positive integer")
    if not isinstance(manifest.get("tensors"), list):
        raise fail(f"tensors is {brief(manifest.get('tensors'))}, not a list")
    tensors, names = [], set()
    for k, t in enumerate(manifest["tensors"]):
        if not (isinstance(t, dict) and isinstance(t.get("name"), str)
                and isinstance(t.get("shape"), list)
                and all(is_int(d) and d >= 0 for d in t["shape"])
                and isinstance(t.get("dtype"), str) and t["dtype"] in _FLOAT_NAMES):
            raise fail(f"tensors[{k}] is {brief(t)}, not {{\"name\": str, \"shape\": [int >= 0, "
                       f"...], \"dtype\": one of {', '.join(_FLOAT_NAMES)}}}")
        if t["name"] in names:
            raise fail(f"tensor {t['name']!r} is listed twice")
        names.add(t["name"])
        tensors.append((t["name"], tuple(t["shape"]), SAFETENSORS_DTYPES[t["dtype"]]))
    if not isinstance(manifest.get("files"), dict):
        raise fail(f"files is {brief(manifest.get('files'))}, not an object")
    files = {}
    for name in ("base.safetensors", "integers.safetensors", "deltas.bin"):
        rec = manifest["files"].get(name)
        if not (isinstance(rec, dict) and is_int(rec.get("nbytes")) and rec["nbytes"] >= 0
                and isinstance(rec.get("sha256"), str)):
            raise fail(f"files[{name!r}] is {brief(rec)}, not {{\"nbytes\": int, \"sha256\": "
                       "str}")
        files[name] = (rec["nbytes"], rec["sha256"])
    return steps, p, SAFETENSORS_DTYPES[delta_dtype], block, tensors, files


def open_packed(cls, path: str, manifest: dict, verify: bool = False) -> Trajectory:
    """Trajectory.open for a packed store (called by it)."""
    where = os.path.join(path, "manifest.json")
    steps, p, delta_dtype, block, tensors, files = _manifest_fields(manifest, where)
    n = len(steps)
    for name in files:
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.exists(file) else None
        if size != files[name][0]:
            what = "is missing" if size is None else f"has {size} bytes"
            raise CheckpointError(f"{file} {what}, but the manifest lists {files[name][0]} bytes")
        if verify and _file_record(file)["sha256"] != files[name][1]:
            raise CheckpointError(f"{file}: SHA-256 differs from the manifest's; the file is "
                                  "corrupted")

    header = read_header(os.path.join(path, "base.safetensors"))
    float_names = [name for name, _, _ in tensors]
    shapes, dtypes = {}, {}
    for name, shape, dtype in tensors:
        entry = header.entries.get(name)
        if entry is None or entry.shape != shape or entry.dtype != dtype:
            raise CheckpointError(f"{header.path}: tensor {name!r} is missing or differs from "
                                  "the manifest")
        shapes[name], dtypes[name] = shape, dtype
    integers = read_header(os.path.join(path, "integers.safetensors"))
    int_entries, int_by_checkpoint = {}, [dict() for _ in range(n)]
    for key, entry in integers.entries.items():
        index, _, name = key.partition("/")
        if not index.isdigit() or not 0 <= int(index) < n or name in shapes:
            raise CheckpointError(f"{integers.path}: unexpected tensor {key!r}")
        int_by_checkpoint[int(index)][name] = (2, entry)
    for name, entry in header.entries.items():
        if name not in shapes:
            if name not in int_by_checkpoint[n - 1]:
                raise CheckpointError(f"{integers.path}: tensor {name!r} of the last checkpoint "
                                      "is missing")
            int_entries[name] = int_by_checkpoint[n - 1][name]
            shapes[name], dtypes[name] = entry.shape, entry.dtype

    esize = _element_size(delta_dtype)
    delta_nbytes = sum(math.prod(s) for _, s, _ in tensors) * (n - 1) * esize
    if delta_nbytes != files["deltas.bin"][0]:
        raise CheckpointError(f"{os.path.join(path, 'deltas.bin')}: {files['deltas.bin'][0]} "
                              f"bytes, but the manifest's tensors need {delta_nbytes}")

    # Segments: one per block; columns: the N - 1 deltas (file 1), then theta_p (file 0).
    parts, region = [], 0
    for j, (name, shape, dtype) in enumerate(tensors):
        numel = math.prod(shape)
        tensor_block = min(block, max(1, numel))  # a longer block is the whole tensor
        starts = np.arange(0, numel, tensor_block, dtype=np.int64)
        lens = np.minimum(tensor_block, numel - starts)
        block_offset = region + (n - 1) * starts * esize
        delta_offsets = block_offset[:, None] + np.arange(n - 1)[None, :] * (lens * esize)[:, None]
        base_entry = header.entries[name]
        base_offsets = base_entry.begin + starts * _element_size(dtype)
        parts.append((np.full(len(starts), j), starts, lens, delta_offsets, base_offsets,
                      _engine_code(dtype)))
        region += (n - 1) * numel * esize
    S = sum(len(part[1]) for part in parts)
    file = np.zeros((S, n), dtype=np.int64)
    file[:, : n - 1] = 1
    offset = np.zeros((S, n), dtype=np.int64)
    dtype_codes = np.full((S, n), _engine_code(delta_dtype), dtype=np.int32)
    row = 0
    for _, starts, _, delta_offsets, base_offsets, code in parts:
        rows = slice(row, row + len(starts))
        offset[rows, : n - 1] = delta_offsets
        offset[rows, n - 1] = base_offsets
        dtype_codes[rows, n - 1] = code
        row += len(starts)
    tensor = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0, np.int64)
    start = np.concatenate([part[1] for part in parts]) if parts else np.zeros(0, np.int64)
    numel = np.concatenate([part[2] for part in parts]) if parts else np.zeros(0, np.int64)
    base_size = np.array([_element_size(d) for _, _, d in tensors], dtype=np.int64)
    nbytes = numel * ((n - 1) * esize + base_size[tensor]) if parts else numel
    segments = _Segments(tensor.astype(np.int64), start, numel, file, offset, dtype_codes,
                         nbytes)
    mapped = [MappedFile(header.path, header.file_nbytes, header.file_id),
              MappedFile(os.path.join(path, "deltas.bin"), files["deltas.bin"][0]),
              MappedFile(integers.path, integers.file_nbytes, integers.file_id)]
    return cls(kind="packed", files=mapped, headers=[header, integers],
               checkpoints=int_by_checkpoint, steps=steps,
               float_names=float_names, shapes=shapes, dtypes=dtypes, int_entries=int_entries,
               segments=segments, packed_base=p)


def packed_checkpoint(traj: Trajectory, i: int) -> dict:
    """Checkpoint i of a packed store: theta_p + delta_i (a one-hot merge) and its own integer
    tensors."""
    one_hot = [0.0] * len(traj)
    one_hot[i] = 1.0
    merged = traj.merge(one_hot)
    for name, (f, entry) in traj._checkpoints[i].items():
        merged[name] = traj._files[f].tensor(entry)
    return merged
