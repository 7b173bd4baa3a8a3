"""Fused weighted sums of tensors: validation in Python, one native pass per call.

Every op here becomes a *plan*: flat tables of pointers, element counts and dtype codes for
T tensors x N sources x K outputs, handed to lcsc_fast._C, which reads every source element once,
accumulates in float32 in a fixed order (source 0, 1, ..., N-1, then the base) and writes every
output element once. All validation happens before the native call, so a bad input raises and
leaves every output untouched.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
import weakref
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _C

__all__ = ["weighted_sum", "weighted_sum_batched", "merge_into", "MergePlan", "build_info"]

# Must match lcsc::DType in csrc/lcsc/elementwise.h.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ITEMSIZES = np.array([4, 2, 2], dtype=np.uint64)  # bytes per element, by dtype code


@dataclass
class _Plan:
    """Native-call tables for T tensors, N sources, K outputs (row-major, as named)."""

    device: torch.device
    num_sources: int
    num_outputs: int
    num_checkpoints: int = 0  # merge_into: sources past these are the base
    names: list = field(default_factory=list)  # [T] state-dict names, for error messages
    # Python arrays while built tensor by tensor (add); numpy arrays from from_arrays.
    numels: array = field(default_factory=lambda: array("q"))  # [T]
    outs: array = field(default_factory=lambda: array("Q"))  # [K, T] after finish()
    out_dtypes: array = field(default_factory=lambda: array("i"))  # [T]
    bases: array = field(default_factory=lambda: array("Q"))  # [T], 0 = no base
    base_dtypes: array = field(default_factory=lambda: array("i"))  # [T]
    srcs: array = field(default_factory=lambda: array("Q"))  # [T, N]
    src_dtypes: array = field(default_factory=lambda: array("i"))  # [T, N]
    _outs_by_tensor: list = field(default_factory=list)  # [T][K] pointers, before finish()
    # CUDA plans run more than once keep their tables on the device: (CudaMergeTables, the
    # uint8 tensor holding its bytes, the stream it was allocated on), None before the second
    # run, False where not reusable.
    _cuda_tables: object = None
    _runs: int = 0

    def add(self, name: str, outs, sources, base) -> None:
        """Append one tensor's job: K outputs, N sources, an optional base (all validated)."""
        self.names.append(name)
        self.numels.append(outs[0].numel())
        self.out_dtypes.append(_DTYPE_CODES[outs[0].dtype])
        self._outs_by_tensor.append([o.data_ptr() for o in outs])
        self.bases.append(0 if base is None else base.data_ptr())
        self.base_dtypes.append(0 if base is None else _DTYPE_CODES[base.dtype])
        self.srcs.extend(s.data_ptr() for s in sources)
        self.src_dtypes.extend(_DTYPE_CODES[s.dtype] for s in sources)

    def _slice(self, tables: tuple, lo: int, hi: int | None) -> tuple:
        """The tables of tensors [lo, hi) only (numpy-backed plans)."""
        numels, outs, out_dtypes, bases, base_dtypes, srcs, src_dtypes, coeffs, n, k = tables
        outs = np.asarray(outs).reshape(k, -1)[:, lo:hi]

        def rows(x, width):
            return np.asarray(x).reshape(-1, width)[lo:hi].reshape(-1)

        return (rows(numels, 1), np.ascontiguousarray(outs).reshape(-1), rows(out_dtypes, 1),
                rows(bases, 1), rows(base_dtypes, 1), rows(srcs, n), rows(src_dtypes, n), coeffs,
                n, k)

    @classmethod
    def from_arrays(cls, device, names, numels, outs, out_dtypes, bases, base_dtypes, srcs,
                    src_dtypes, num_checkpoints=0) -> "_Plan":
        """A plan from ready-made tables ([T], [K, T], [T], [T], [T], [T, N], [T, N] arrays),
        such as a trajectory's; memory overlap is checked as for any plan."""
        num_outputs, num_sources = outs.shape[0], srcs.shape[1]
        plan = cls(device, num_sources, num_outputs, num_checkpoints=num_checkpoints,
                   names=list(names))
        plan.numels = np.ascontiguousarray(numels, dtype=np.int64)
        plan.outs = np.ascontiguousarray(outs, dtype=np.uint64).reshape(-1)
        plan.out_dtypes = np.ascontiguousarray(out_dtypes, dtype=np.int32)
        plan.bases = np.ascontiguousarray(bases, dtype=np.uint64)
        plan.base_dtypes = np.ascontiguousarray(base_dtypes, dtype=np.int32)
        plan.srcs = np.ascontiguousarray(srcs, dtype=np.uint64).reshape(-1)
        plan.src_dtypes = np.ascontiguousarray(src_dtypes, dtype=np.int32).reshape(-1)
        plan._check_overlap()
        return plan

    def _tables(self, coeffs: array) -> tuple:
        return (self.numels, self.outs, self.out_dtypes, self.bases, self.base_dtypes,
                self.srcs, self.src_dtypes, coeffs, self.num_sources, self.num_outputs)

    def finish(self) -> None:
        """Lay out outs as [K, T], then check that outputs overlap nothing but themselves."""
        for k in range(self.num_outputs):
            self.outs.extend(ptrs[k] for ptrs in self._outs_by_tensor)
        self._check_overlap()

    def _check_overlap(self) -> None:
        zeros = array("f", bytes(4 * self.num_outputs * self.num_sources))
        overlap = _C.find_overlap(*self._tables(zeros))
        if overlap is not None:
            raise ValueError(self._describe_overlap(*overlap))

    def _describe_overlap(self, out_k, out_t, other_k, in_t, in_i) -> str:
        out = self._output_name(out_k, out_t)
        if other_k >= 0:
            return (f"{out} and {self._output_name(other_k, in_t)} share memory; every output "
                    "needs its own storage")
        return (f"{out} overlaps {self._input_name(in_t, in_i)} in memory without being the same "
                "buffer; an output may alias one of its own inputs only exactly (same storage, "
                "size and dtype)")

    # Plans of weighted_sum* have one unnamed tensor; merge_into's are named state-dict entries.
    def _output_name(self, k: int, t: int) -> str:
        if self.names[t]:
            return f"target[{self.names[t]!r}]"
        return f"outs[{k}]" if self.num_outputs > 1 else "out"

    def _input_name(self, t: int, i: int) -> str:
        name = self.names[t]
        if not name:
            return "base" if i < 0 else f"sources[{i}]"
        if i < 0 or i >= self.num_checkpoints:
            return f"base[{name!r}]"
        return f"checkpoints[{i}][{name!r}]"

    def run(self, coeffs: list[list[float]], lo: int = 0, hi: int | None = None,
            guard_faults: bool = False) -> None:
        """Execute with coeffs [K][N] (validated) on the plan's device, for tensors [lo, hi).

        guard_faults: sources are memory-mapped files; a fault reading one raises RuntimeError.
        """
        flat = array("f", itertools.chain.from_iterable(coeffs))
        tables = self._tables(flat)
        whole = lo == 0 and (hi is None or hi == len(self.numels))
        if not whole:
            tables = self._slice(tables, lo, hi)
        if self.device.type == "cpu":
            _C.merge_cpu(*tables, torch.get_num_threads(), guard_faults)
            return
        device, stream = cuda_launch(self.device)
        self._runs += 1
        if whole and self._runs > 1 and self._cuda_tables is not False:
            self._run_cached(flat, device, stream)
            return
        _C.merge_cuda(*tables, device, stream)

    def forget_device_tables(self) -> None:
        """After the tables were changed in place: the next runs go to the device anew."""
        self._cuda_tables, self._runs = None, 0

    def _run_cached(self, coeffs: array, device: int, stream: int) -> None:
        """A repeated CUDA run: the plan's tables (pointers, sizes, dtypes: about 12 bytes per
        tensor and source) go to the device once, and each run moves only the coefficients."""
        if self._cuda_tables is None:
            tables = _C.CudaMergeTables(*self._tables(coeffs))
            if not tables.reusable():
                self._cuda_tables = False
                _C.merge_cuda(*self._tables(coeffs), device, stream)
                return
            on_host = torch.frombuffer(bytearray(tables.bytes()), dtype=torch.uint8)
            self._cuda_tables = (tables, on_host.to(torch.device("cuda", device)), stream)
        tables, on_device, allocated_on = self._cuda_tables
        if stream != allocated_on:  # keep the bytes alive until this stream is done with them
            on_device.record_stream(torch.cuda.current_stream(device))
        tables.run(on_device.data_ptr(), coeffs, len(coeffs), device, stream)


def cuda_launch(device: torch.device) -> tuple[int, int]:
    """(device index, torch's current stream there) for a CUDA kernel launch; RuntimeError
    saying how to build with CUDA if this build has no CUDA kernels."""
    if not _C.cuda_compiled():
        raise RuntimeError(
            "lcsc_fast was built without CUDA, so it cannot merge CUDA tensors. Reinstall "
            "on a machine with nvcc on PATH (pip install --force-reinstall --no-cache-dir .); "
            "the build log says 'lcsc_fast: CUDA kernels enabled' when it finds it.")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


# ---------------------------------------------------------------- validation helpers

def _check_dense(t, what: str) -> None:
    """t is a torch.Tensor with plain strided storage: the engine reads and writes raw memory."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        kind = "a nested tensor" if t.is_nested else f"a tensor of layout {t.layout}"
        raise TypeError(f"{what}: {kind} is not supported; pass a dense (strided) tensor")


def _check_tensor(t, what: str) -> torch.Tensor:
    _check_dense(t, what)
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported; use float32, float16 or "
                        "bfloat16")
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor is not contiguous; pass t.contiguous()")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: device {t.device} is not supported; use cpu or cuda")
    if t.is_neg():  # its memory holds -t: torch resolves the bit lazily, raw memory does not
        raise ValueError(f"{what}: tensor is a lazily negated view (torch's negative bit is set); "
                         "pass t.resolve_neg()")
    return t


_LIKE_PROPS = operator.attrgetter("layout", "dtype", "shape", "device")


def _all_like(ts: list, ref: torch.Tensor) -> bool:
    """The common case in a few C-level passes: every one of ts a supported contiguous tensor
    shaped like ref, on its device. False sends the caller to the checks that name a bad one."""
    like = {(torch.strided, dtype, ref.shape, ref.device) for dtype in _DTYPE_CODES}
    try:
        return (set(map(_LIKE_PROPS, ts)) <= like and all(map(torch.Tensor.is_contiguous, ts))
                and not any(map(torch.Tensor.is_neg, ts)))
    except (AttributeError, TypeError, RuntimeError):  # not tensors; a nested one has no shape
        return False


# _bump_versions(tensors) tells autograd that the engine wrote them in place, as torch's in-place
# ops do: a graph that saved one of them then refuses to backward instead of using new values.
try:  # torch >= 2.5 takes a list; before, one tensor per call
    torch.autograd.graph.increment_version([])
    _bump_versions = torch.autograd.graph.increment_version
except (TypeError, RuntimeError):
    def _bump_versions(tensors: list) -> None:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _check_copy_target(t: torch.Tensor, what: str) -> None:
    """A target tensor that is not floating point is copied, not merged: integer (BatchNorm's
    num_batches_tracked) or bool, contiguous, on a supported device. Complex is neither."""
    _check_dense(t, what)
    if t.is_complex():
        raise TypeError(f"{what}: dtype {t.dtype} is not supported; floating-point tensors "
                        "are merged (float32, float16, bfloat16) and integer ones copied")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: device {t.device} is not supported; use cpu or cuda")
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor is not contiguous; pass t.contiguous()")


def _check_copy_source(s, t: torch.Tensor, what: str, target_what: str) -> None:
    """An integer entry (num_batches_tracked) is copied as it is: same dtype, shape, device."""
    _check_dense(s, what)
    if s.dtype != t.dtype:
        raise TypeError(f"{what}: dtype {s.dtype} differs from {target_what}'s {t.dtype}")
    _check_like(s, t, what, target_what)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte address that t may touch (empty for an empty tensor); strided
    tensors included."""
    lo = t.data_ptr()
    if t.numel() == 0:
        return lo, lo
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return lo, lo + extent * t.element_size()


def _first_meeting(lo: np.ndarray, hi: np.ndarray, qlo: np.ndarray, qhi: np.ndarray):
    """(query j, interval w) for a query [qlo[j], qhi[j]) that meets one of the disjoint
    intervals [lo, hi) (sorted by lo), or None if none does; empty queries meet nothing."""
    if len(lo) == 0 or len(qlo) == 0:
        return None
    after = np.searchsorted(lo, qlo, side="right")
    # Disjoint intervals: a query meets one only if it meets the last starting at or before
    # its start, or the first starting after it.
    for cand in (after - 1, after):
        ok = (cand >= 0) & (cand < len(lo))
        c = np.clip(cand, 0, len(lo) - 1)
        hit = np.flatnonzero(ok & (qlo < qhi) & (lo[c] < qhi) & (qlo < hi[c]))
        if len(hit):
            return int(hit[0]), int(c[hit[0]])
    return None


def _check_copies_overlap(plan: "_Plan | None", copies: list, last: int) -> None:
    """Integer entries are copied with torch after the merge. Each target entry must share
    memory with no other output and no input of the merge, and each entry copied from (the
    last checkpoint's, read after the merge wrote its outputs) with no output, except that an
    entry may be copied from itself (a checkpoint holding the target's own tensors).

    copies: (name, target tensor, source tensor), one per distinct target storage."""
    names = [name for name, _, _ in copies]
    writes = [_span(t) for _, t, _ in copies]
    order = sorted((i for i, (lo, hi) in enumerate(writes) if lo < hi), key=lambda i: writes[i])
    # Sorted by start, an entry meets an earlier one iff it starts before the furthest-reaching
    # earlier one ends.
    far = None
    for i in order:
        if far is not None and writes[i][0] < writes[far][1]:
            raise ValueError(f"target[{names[i]!r}] and target[{names[far]!r}] share memory; "
                             "every output needs its own storage")
        if far is None or writes[i][1] > writes[far][1]:
            far = i
    w_lo = np.array([writes[i][0] for i in order], dtype=np.uint64)
    w_hi = np.array([writes[i][1] for i in order], dtype=np.uint64)

    # Reads: the entries copied from, but not an entry that is exactly its own target.
    reads = [(j, _span(s)) for j, (_, t, s) in enumerate(copies)
             if not (_span(s) == writes[j] and s.dtype == t.dtype)]
    r_lo = np.array([lo for _, (lo, _) in reads], dtype=np.uint64)
    r_hi = np.array([hi for _, (_, hi) in reads], dtype=np.uint64)

    def read_name(k):
        return f"checkpoints[{last}][{names[reads[k][0]]!r}]"

    hit = _first_meeting(w_lo, w_hi, r_lo, r_hi)
    if hit is not None:
        raise ValueError(f"target[{names[order[hit[1]]]!r}] overlaps {read_name(hit[0])} in "
                         "memory without being the same buffer; an output may alias one of its "
                         "own inputs only exactly (same storage, size and dtype)")
    if plan is None:
        return

    # The merged (floating-point) tensors: outputs [T] (one per tensor: merge_into plans have
    # a single output), sources [T, N], bases [T] (0 = none).
    n = plan.num_sources
    numels = np.asarray(plan.numels).astype(np.uint64)
    f_lo = np.asarray(plan.outs, dtype=np.uint64)
    f_hi = f_lo + numels * _ITEMSIZES[np.asarray(plan.out_dtypes)]
    f_order = np.argsort(f_lo, kind="stable")
    f_order = f_order[f_lo[f_order] < f_hi[f_order]]
    for lo, hi, what, problem in (
            (w_lo, w_hi, lambda k: f"target[{names[order[k]]!r}]", "share memory; every output "
             "needs its own storage"),
            (r_lo, r_hi, read_name, "share memory; an integer entry is read after the merge "
             "writes, so the output needs its own storage")):
        hit = _first_meeting(f_lo[f_order], f_hi[f_order], lo, hi)
        if hit is not None:
            raise ValueError(f"{plan._output_name(0, int(f_order[hit[1]]))} and {what(hit[0])} "
                             f"{problem}")
    s_lo = np.asarray(plan.srcs, dtype=np.uint64)
    s_hi = s_lo + (numels[:, None] * _ITEMSIZES[np.asarray(plan.src_dtypes).reshape(-1, n)]
                   ).reshape(-1)
    b_lo = np.asarray(plan.bases, dtype=np.uint64)
    b_hi = np.where(b_lo != 0, b_lo + numels * _ITEMSIZES[np.asarray(plan.base_dtypes)], b_lo)
    for lo, hi, what in ((s_lo, s_hi, lambda j: plan._input_name(j // n, j % n)),
                         (b_lo, b_hi, lambda j: plan._input_name(j, -1))):
        hit = _first_meeting(w_lo, w_hi, lo, hi)
        if hit is not None:
            raise ValueError(f"target[{names[order[hit[1]]]!r}] overlaps {what(hit[0])} in "
                             "memory; an integer entry is copied into storage of its own, which "
                             "no input of the merge may share")


def _check_like(t: torch.Tensor, ref: torch.Tensor, what: str, ref_what: str) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{what}: shape {tuple(t.shape)} differs from {ref_what}'s "
                         f"{tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{what}: on {t.device} but {ref_what} is on {ref.device}; all tensors "
                         "of one merge must be on one device")


def _one_device(device: torch.device | None, t: torch.Tensor, what: str) -> torch.device:
    """t's device, which must be `device`, the other target tensors' (None for the first):
    ValueError naming what otherwise."""
    if device is not None and t.device != device:
        raise ValueError(f"{what} is on {t.device} but other target tensors are on {device}; "
                         "a merge needs one device")
    return t.device


def _real_number(c, where: str) -> float:
    """c as a Python float if it is a real number: an int or float (bool is not one), a numpy
    real scalar, or a 0-d real array or tensor; TypeError naming `where` otherwise."""
    value = c.item() if getattr(c, "ndim", None) == 0 and hasattr(c, "item") else c
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        got = type(c).__name__
        if isinstance(c, (torch.Tensor, np.ndarray)):
            got += f" of dtype {c.dtype}"
        raise TypeError(f"{where}: expected a real number, got {got}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{where} is beyond float32's range; coefficients must be finite "
                         "float32 values") from None


def _real_numbers(values, where: str) -> list[float]:
    """values (a list, tuple, numpy array or tensor) as Python floats; TypeError naming the
    first entry that is not a real number (see _real_number), or the container."""
    got = type(values).__name__
    if hasattr(values, "tolist"):  # numpy arrays, tensors; a 0-d one becomes a number
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{where}: expected a sequence of numbers, got {got}")
    if set(map(type, values)) <= {float, int}:  # the common case, at C speed
        try:
            return list(map(float, values))
        except OverflowError:  # an int beyond float64: the slow path names it
            pass
    return [_real_number(c, f"{where}[{i}]") for i, c in enumerate(values)]


def _coeff_rows(coeffs, num_rows: int | None, num_sources: int) -> list[list[float]]:
    """coeffs as [K][N] Python floats: a vector (num_rows None) or a K x N matrix; all finite
    real numbers (a bool, a string or a complex number raises TypeError naming it)."""
    if num_rows is None:
        rows = [coeffs]
    else:
        got = type(coeffs).__name__
        if hasattr(coeffs, "tolist"):  # numpy arrays, tensors
            coeffs = coeffs.tolist()
        if isinstance(coeffs, (str, bytes)) or not isinstance(coeffs, Sequence):
            raise TypeError(f"coeffs: expected K x N numbers (a sequence of rows), got {got}")
        rows = list(coeffs)
        if len(rows) != num_rows:
            raise ValueError(f"coeffs: {len(rows)} rows for {num_rows} outputs; coeffs must be "
                             "K x N with one row per output")
    out = []
    for k, row in enumerate(rows):
        where = "coeffs" if num_rows is None else f"coeffs row {k}"
        row = _real_numbers(row, where)
        if len(row) != num_sources:
            raise ValueError(f"{where}: {len(row)} coefficients for {num_sources} sources")
        _check_float32_finite(row, where)
        out.append(row)
    return out


def _check_float32_finite(row: list[float], where: str) -> None:
    """The engine multiplies in float32: a coefficient must be finite there, not just here."""
    row32 = array("f", row)
    if math.isfinite(sum(row32)):  # at C speed: no float32 sum reaches float64's range
        return
    for i, (c, c32) in enumerate(zip(row, row32)):
        if not math.isfinite(c32):
            problem = "not finite" if not math.isfinite(c) else "beyond float32's range"
            raise ValueError(f"{where}[{i}] is {c}, {problem}; coefficients must be finite "
                             "float32 values")


def _check_sources(sources, ref: torch.Tensor, ref_what: str) -> list[torch.Tensor]:
    if isinstance(sources, torch.Tensor) or not isinstance(sources, Sequence):
        raise TypeError("sources: expected a sequence of tensors (a list or tuple)")
    if len(sources) == 0:
        raise ValueError("sources: at least one source tensor is needed")
    sources = list(sources)
    if not _all_like(sources, ref):  # name the first that is wrong
        for i, s in enumerate(sources):
            _check_tensor(s, f"sources[{i}]")
            _check_like(s, ref, f"sources[{i}]", ref_what)
    return sources


# ---------------------------------------------------------------- public ops

def weighted_sum(out: torch.Tensor, sources: Sequence[torch.Tensor], coeffs,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + sum_i coeffs[i] * sources[i], fused, in place; returns out.

    sources: N tensors shaped like out, float32/float16/bfloat16 (mixed allowed), on out's
    device. base is optional (zero when absent) and may be out itself. Accumulates in float32 in
    source order, so results are bitwise reproducible for any thread count.
    """
    _check_tensor(out, "out")
    sources = _check_sources(sources, out, "out")
    rows = _coeff_rows(coeffs, None, len(sources))
    if base is not None:
        _check_tensor(base, "base")
        _check_like(base, out, "base", "out")
    plan = _Plan(out.device, len(sources), 1)
    plan.add("", [out], sources, base)
    plan.finish()
    plan.run(rows)
    _bump_versions([out])
    return out


def weighted_sum_batched(outs: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], coeffs,
                         base: torch.Tensor | None = None) -> list[torch.Tensor]:
    """outs[k] = base + sum_i coeffs[k][i] * sources[i] for K outputs in one pass over sources.

    coeffs is K x N. Each source element is read once for all K outputs (not K times), which
    is what makes evaluating a population of candidate coefficient vectors cheap.
    """
    if isinstance(outs, torch.Tensor) or not isinstance(outs, Sequence) or len(outs) == 0:
        raise TypeError("outs: expected a non-empty sequence of tensors (a list or tuple)")
    for k, o in enumerate(outs):
        _check_tensor(o, f"outs[{k}]")
        _check_like(o, outs[0], f"outs[{k}]", "outs[0]")
        if o.dtype != outs[0].dtype:
            raise TypeError(f"outs[{k}]: dtype {o.dtype} differs from outs[0]'s {outs[0].dtype}; "
                            "all outputs of one batch share a dtype")
    sources = _check_sources(sources, outs[0], "outs[0]")
    rows = _coeff_rows(coeffs, len(outs), len(sources))
    if base is not None:
        _check_tensor(base, "base")
        _check_like(base, outs[0], "base", "outs[0]")
    plan = _Plan(outs[0].device, len(sources), len(outs))
    plan.add("", list(outs), sources, base)
    plan.finish()
    plan.run(rows)
    _bump_versions(list(outs))
    return list(outs)


def _target_tensors(target) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        # keep_vars: the module's own Parameter and buffer objects, not detached copies.
        return dict(target.state_dict(keep_vars=True))
    if isinstance(target, Mapping):
        for name, t in target.items():
            if not isinstance(name, str):
                raise TypeError(f"target: key {name!r} is a {type(name).__name__}; tensors are "
                                "named by strings, as in a state dict")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"target[{name!r}]: expected a torch.Tensor, got "
                                f"{type(t).__name__}")
        return dict(target)
    raise TypeError(f"target: expected an nn.Module or a dict of tensors, got "
                    f"{type(target).__name__}")


def _check_names(names: set[str], state: Mapping, what: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    missing = sorted(names - state.keys())
    extra = sorted(state.keys() - names, key=str)  # any key a dict may hold
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        raise ValueError(f"{what} does not match the target's tensors: {'; '.join(parts)}")


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def merge_into(target, checkpoints: Sequence[Mapping[str, torch.Tensor]], coeffs,
               base: int | Mapping[str, torch.Tensor] | None = None):
    """Write the merged checkpoint into target's existing storage; returns target.

    target: an nn.Module (parameters and buffers, by state_dict name) or a dict name -> tensor.
    checkpoints: N state dicts with exactly target's names, or a lcsc_fast.Trajectory, merged
    straight from its files. Every floating-point tensor becomes sum_i coeffs[i] * theta_i, or
    theta_base + sum_i coeffs[i] * (theta_i - theta_base) when base (an index into checkpoints,
    or a state dict) is given; integer tensors (BatchNorm's num_batches_tracked) are copied from
    the last checkpoint, whose entries must match them in dtype, shape and device. coeffs: N
    real numbers (not bools or strings). Storage is written in place: data_ptr() is unchanged.
    Nothing is written unless every input is valid.

    Each call validates every tensor again; to merge the same checkpoints many times (a
    search), build a MergePlan once and call it.
    """
    if hasattr(checkpoints, "_lcsc_merge_into"):  # a Trajectory: merged from its files
        return checkpoints._lcsc_merge_into(target, coeffs, base)
    return MergePlan(target, checkpoints, base, _once=True)(coeffs)


class _StorageWatch:
    """Notes which storages behind `tensors` were freed: `freed` gets the index of the first
    tensor on each. A plan keeps its tensors alive, but not the storage behind them:
    `t.data = other` frees it unless something else holds it. Watching costs a few us per
    storage, once; checking every data pointer at each call instead would cost 0.1-0.4 us per
    tensor and checkpoint (8-30 ms for 300 tensors of 256 checkpoints, as long as merging 2M
    parameters from them). A resize that moves a storage's bytes is not seen."""

    def __init__(self, tensors: list):
        self.freed: list[int] = []
        freed, self._refs = self.freed, {}
        for i, storage in enumerate(map(torch.Tensor.untyped_storage, tensors)):
            if id(storage) not in self._refs:  # torch keeps one Python object per live storage
                self._refs[id(storage)] = weakref.ref(storage, lambda _, i=i: freed.append(i))


class _Outputs:
    """A batched plan and the output tensors it writes through raw pointers. It holds them, so
    none can be freed and its address reused while the plan exists; a call may reuse the plan
    only for these very tensors with their storage, shape, dtype and device unchanged."""

    # Each a C-level pass over the tensors: about 1 ms for 2400 outputs (K = 8 x 300 tensors).
    _checks = (torch.Tensor.data_ptr, torch.Tensor.size, operator.attrgetter("dtype"),
               torch.Tensor.get_device, torch.Tensor.is_contiguous)

    def __init__(self, tensors: list, plan: _Plan | None):
        self.tensors, self.plan = tensors, plan
        self.state = [list(map(check, tensors)) for check in self._checks]

    def matches(self, tensors: list) -> bool:
        # Identity first: the checks may then assume tensors.
        return (len(tensors) == len(self.tensors)
                and all(map(operator.is_, tensors, self.tensors))
                and all(list(map(check, tensors)) == then
                        for check, then in zip(self._checks, self.state)))


class MergePlan:
    """merge_into(target, checkpoints, ., base) prepared once: plan(coeffs) merges into target.

    Validation and the engine's pointer tables are built here, once, so a call costs the native
    merge and a check that target and checkpoints still hold the same storage. The plan keeps
    references to the checkpoints' tensors and reads them at each call, so their values may
    change. One whose storage was swapped out and freed (`t.data = ...`) raises ValueError;
    a dict entry replaced by another tensor, or a tensor resized, is not seen: build a new
    plan after either.
    """

    def __init__(self, target, checkpoints: Sequence[Mapping[str, torch.Tensor]],
                 base: int | Mapping[str, torch.Tensor] | None = None, *, _once: bool = False):
        # _once: merge_into's plan, run right away and dropped: nothing can free a storage in
        # between, and watching them would cost it about as much as building the plan.
        tensors = _target_tensors(target)
        if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Sequence):
            raise TypeError("checkpoints: expected a sequence of state dicts (a list or tuple)")
        if len(checkpoints) == 0:
            raise ValueError("checkpoints: at least one checkpoint is needed")
        names = set(tensors)
        for i, ck in enumerate(checkpoints):
            _check_names(names, ck, f"checkpoints[{i}]")
        base_state = None
        if base is not None:
            if isinstance(base, bool) or not isinstance(base, (int, Mapping)):
                raise TypeError("base: expected a checkpoint index or a state dict")
            if isinstance(base, int):
                if not -len(checkpoints) <= base < len(checkpoints):
                    raise ValueError(f"base: index {base} is out of range for "
                                     f"{len(checkpoints)} checkpoints")
                base %= len(checkpoints)
                base_state = checkpoints[base]
            else:
                _check_names(names, base, "base")
                base_state = base

        device = None  # every target tensor's: merge_into needs one device
        copies = []  # (name, target tensor, last checkpoint's tensor) for integer tensors
        merged = set()  # (data_ptr, numel, dtype) already in the plan: tied weights merge once
        jobs = []  # (name, target tensor, sources, base) per merged tensor, for batched plans
        for name in sorted(tensors):
            t = tensors[name]
            entries = [ck[name] for ck in checkpoints]
            floating = t.is_floating_point()
            if floating:
                _check_tensor(t, f"target[{name!r}]")
            else:
                _check_copy_target(t, f"target[{name!r}]")
            device = _one_device(device, t, f"target[{name!r}]")
            key = (t.data_ptr(), t.numel(), t.dtype)
            if not floating:
                for i, s in enumerate(entries):
                    _check_copy_source(s, t, f"checkpoints[{i}][{name!r}]", f"target[{name!r}]")
                if not (t.numel() and key in merged):
                    merged.add(key)
                    copies.append((name, t, entries[-1]))
                continue
            if not _all_like(entries, t):  # name the first that is wrong
                for i, s in enumerate(entries):
                    _check_tensor(s, f"checkpoints[{i}][{name!r}]")
                    _check_like(s, t, f"checkpoints[{i}][{name!r}]", f"target[{name!r}]")
            b = None
            if base_state is not None:
                b = base_state[name]
                _check_tensor(b, f"base[{name!r}]")
                _check_like(b, t, f"base[{name!r}]", f"target[{name!r}]")
                if not isinstance(base, int):
                    entries.append(b)  # the -sum(w) * theta_base term
            if t.numel() and key in merged:
                continue
            merged.add(key)
            jobs.append((name, t, entries, b))
        # The engine runs tensors in plan order. In the first checkpoint's memory order, every
        # checkpoint laid out alike (one flat buffer, a file) is read in one forward sweep; in
        # name order its small tensors are visited out of place, each a fresh short run.
        jobs.sort(key=lambda job: job[2][0].data_ptr())
        keep = [s for _, _, entries, _ in jobs for s in entries]
        plan = None
        if jobs:
            plan = _Plan(device, len(jobs[0][2]), 1, num_checkpoints=len(checkpoints))
            for name, t, entries, b in jobs:
                plan.add(name, [t], entries, b)
            plan.finish()
        if copies:
            _check_copies_overlap(plan, copies, len(checkpoints) - 1)
        self.target = target
        self._targets = tensors  # name -> tensor object, as planned
        self._target_ptrs = {k: v.data_ptr() for k, v in tensors.items()}
        self._plan, self._copies, self._jobs = plan, copies, jobs
        self._keep = keep  # every tensor the plan reads: checkpoint entries and the base
        self._storages = _StorageWatch([] if _once else keep)
        self._written = [t for _, t, _, _ in jobs]
        self._job_names = [name for name, _, _, _ in jobs]
        self._batched = None  # _Outputs: merge_batched's plan and the tensors it writes
        self._num_checkpoints = len(checkpoints)
        self._base_kind = None if base is None else ("index", base) if isinstance(
            base, int) else ("state", None)

    def __call__(self, coeffs):
        """Merge with coeffs (N values) into the target; returns the target."""
        (row,) = _coeff_rows(coeffs, None, self._num_checkpoints)
        self._check_target()
        self._check_inputs()
        row = self._fold(row)
        if self._plan is not None:
            self._plan.run([row])
            _bump_versions(self._written)
        for _, t, src in self._copies:
            with torch.no_grad():
                t.copy_(src)
        return self.target

    def _fold(self, row: list[float]) -> list[float]:
        """The engine's coefficients for one merge.

        theta_b + sum_i w_i (theta_i - theta_b) = theta_b + sum_i w_i theta_i - (sum w) theta_b:
        the base enters once as the engine's base and once as a source weighted -sum(w).
        """
        if self._base_kind is not None:
            total = math.fsum(row)
            if self._base_kind[0] == "index":
                row[self._base_kind[1]] -= total
            else:
                row.append(-total)
            _check_float32_finite(row, "coefficients folded with the base (coeffs, -sum(coeffs))")
        return row

    def merge_batched(self, coeffs, outs: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """K merges in one pass over the checkpoints: outs[k] gets the merge with coeffs[k].

        outs: K dicts holding, for every floating-point tensor of the target, a tensor of its
        shape on its device (they are written; integer tensors are not touched). Each source
        element is read once for all K candidates: how a search scores a generation. The
        native tables are kept for the next call with the same output tensors (the same
        objects, with the same storage, shape and dtype); any other outputs are validated
        afresh.
        """
        if isinstance(outs, (Mapping, torch.Tensor)) or not isinstance(outs, Sequence):
            raise TypeError("outs: expected a sequence of dicts of tensors (a list or tuple), "
                            f"one per candidate, got {type(outs).__name__}")
        if len(outs) == 0:
            raise ValueError("outs: at least one candidate (a dict of output tensors) is needed")
        rows = _coeff_rows(coeffs, len(outs), self._num_checkpoints)
        self._check_inputs()
        tensors = self._batched_outputs(outs)
        if tensors is None or self._batched is None or not self._batched.matches(tensors):
            plan = self._batched_plan(outs)  # validates every output; raises naming a bad one
            self._batched = _Outputs(self._batched_outputs(outs), plan)
        if self._batched.plan is not None:
            self._batched.plan.run([self._fold(row) for row in rows])
            _bump_versions(self._batched.tensors)

    def _batched_outputs(self, outs) -> list | None:
        """outs[k][name] for k, then each merged name (the plan's [K, T] order); None when an
        output is not a dict holding every name (validation then says which)."""
        names = self._job_names
        try:
            return [out[name] for out in outs for name in names]
        except (KeyError, TypeError, IndexError):
            return None

    def _batched_plan(self, outs) -> _Plan | None:
        """Validates every output, then builds the plan; raises naming every bad output (the
        error type of the first), so that one call shows all that needs fixing."""
        problems: list[tuple[type, str]] = []
        for k, out in enumerate(outs):
            if not isinstance(out, Mapping):
                problems.append((TypeError, f"outs[{k}]: expected a dict of tensors, got "
                                            f"{type(out).__name__}"))
                continue
            missing = [name for name in self._job_names if name not in out]
            if missing:
                problems.append((ValueError, f"outs[{k}] has no tensor {_few(missing)}"))
        rows = []
        for name, t, entries, b in self._jobs:
            row, first_k = [], None
            for k, out in enumerate(outs):
                if not isinstance(out, Mapping) or name not in out:
                    continue  # reported above
                o, what = out[name], f"outs[{k}][{name!r}]"
                try:
                    _check_tensor(o, what)
                    _check_like(o, t, what, f"target[{name!r}]")
                    if row and o.dtype != row[0].dtype:
                        raise TypeError(f"{what}: dtype {o.dtype} differs from "
                                        f"outs[{first_k}]'s {row[0].dtype}")
                except (TypeError, ValueError) as err:
                    problems.append((type(err), str(err)))
                    continue
                first_k = k if first_k is None else first_k
                row.append(o)
            rows.append((name, row, entries, b))
        if problems:
            error, message = problems[0]
            if len(problems) > 1:
                more = "; ".join(m for _, m in problems[1:4])
                rest = len(problems) - 4
                message += (f" (and {len(problems) - 1} more: {more}"
                            + (f"; and {rest} others" if rest > 0 else "") + ")")
            raise error(message)
        if not self._jobs:
            return None
        plan = _Plan(self._jobs[0][1].device, len(self._jobs[0][2]), len(outs),
                     num_checkpoints=self._num_checkpoints)
        for name, row, entries, b in rows:
            plan.add(name, row, entries, b)
        plan.finish()
        return plan

    def _check_inputs(self) -> None:
        """Refuse to run once storage the plan reads was freed (it would read freed memory),
        naming the first tensor it belonged to; and an integer entry that no longer matches
        its target, before anything is written."""
        if self._storages.freed:
            i = self._storages.freed[0]
            per_job = len(self._jobs[0][2])
            what = self._plan._input_name(i // per_job, i % per_job)
            raise ValueError(f"{what}: the storage this MergePlan reads was freed (the tensor's "
                             ".data replaced or its storage released); build a new plan")
        last = self._num_checkpoints - 1
        for name, t, src in self._copies:
            _check_copy_source(src, t, f"checkpoints[{last}][{name!r}]", f"target[{name!r}]")

    def _check_target(self) -> None:
        """A plan writes through pointers: refuse a target whose tensors were replaced or moved
        (model.to(...), a reassigned parameter) since the plan was built."""
        if not isinstance(self.target, (torch.nn.Module, Mapping)):
            return
        now = _target_tensors(self.target)
        if now.keys() != self._targets.keys():
            raise ValueError("the target's tensors changed since this MergePlan was built; "
                             "build a new one")
        for name, t in now.items():
            if t is not self._targets[name] or t.data_ptr() != self._target_ptrs[name]:
                raise ValueError(f"target[{name!r}] was replaced or moved since this MergePlan "
                                 "was built; build a new one")


def build_info() -> dict:
    """What this build of the engine can do: version, CUDA, OpenMP, SIMD level in use."""
    from . import __version__

    info = dict(_C.build_info())
    info["version"] = __version__
    info["cuda_available"] = bool(_C.cuda_compiled() and _C.cuda_device_count() > 0)
    return info
