"""Fused low-rank merge: out = base + scale * sum_i c_i * B_i @ A_i, in place (issue 6).

A LoRA trajectory stores, per adapted layer and checkpoint, the factors B_i [m, r] and
A_i [r, n]. Their LCSC merge is one GEMM over the concatenated rank R = N * r,

    out = base + [c_0 B_0, ..., c_{N-1} B_{N-1}] @ [A_0; ...; A_{N-1}] * scale,

which this op computes in one native pass with c_i applied on the fly: no scaled copies of the
factors, no torch.cat, no dense per-checkpoint product (100 checkpoints of rank 16 would
otherwise build 100 dense [m, n] matrices). Accumulation is float32; validation happens before
any byte of out is written.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from operator import attrgetter

import torch

from . import _C
from .engine import (_DTYPE_CODES, _bump_versions, _check_float32_finite, _check_tensor,
                     _real_number, _real_numbers, cuda_launch)

__all__ = ["LoraPlan", "lora_weighted_sum"]


def _check_factors(factors, what: str) -> list:
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError(f"{what}: expected a sequence of tensors (a list or tuple), got "
                        f"{type(factors).__name__}")
    return list(factors)


def _coefficients(coeffs, num_checkpoints: int, scale) -> array:
    """The float32 weights w_i = fl32(scale * c_i) the kernels apply; raises naming a bad one.
    Coefficients and scale are real numbers as everywhere in lcsc_fast (engine._real_number)."""
    row = _real_numbers(coeffs, "coeffs")
    if len(row) != num_checkpoints:
        raise ValueError(f"coeffs: {len(row)} coefficients for {num_checkpoints} "
                         "checkpoints' factors; pass one per checkpoint")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.reshape(())
    scale = _real_number(scale, "scale")
    weights = array("f", [scale * c for c in row])
    if not all(map(math.isfinite, weights)):  # the slow path names the culprit
        _check_float32_finite(row, "coeffs")
        _check_float32_finite([scale], "scale")
        _check_float32_finite([scale * c for c in row], "scale * coeffs")
    return weights


def _first_overlap(ptrs: array, nbytes: int, lo: int, hi: int) -> int | None:
    """The index of the first region [ptrs[i], ptrs[i] + nbytes) that meets [lo, hi), if any."""
    if not any(lo - nbytes < p < hi for p in ptrs):
        return None
    return next(i for i, p in enumerate(ptrs) if lo - nbytes < p < hi)


def _name_bad_factor(what: str, factors: list, ref: torch.Tensor, dtype, device, r: int):
    """Raise for the first factor that differs from ref (or is no supported tensor)."""
    shape = ref.shape
    for i, t in enumerate(factors):
        name = f"{what}[{i}]"
        _check_tensor(t, name)
        if t.dtype != dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from As[0]'s {dtype}; all "
                            "factors of one merge share a dtype")
        if t.device != device:
            raise ValueError(f"{name}: on {t.device} but out is on {device}; all tensors of one "
                             "merge must be on one device")
        if t.shape != shape:
            got = tuple(t.shape)
            rank = got[0] if what == "As" and got else got[1] if len(got) > 1 else r
            detail = f" (rank {rank}, not As[0]'s {r})" if rank != r else ""
            raise ValueError(f"{name}: shape {got} differs from {what}[0]'s {tuple(shape)}"
                             f"{detail}; every checkpoint's factors must share one shape and one "
                             "rank")
    raise ValueError(f"{what}: a factor differs from {what}[0] in shape, dtype or device")


# The layer's geometry (m, n, r) and the factors' pointer tables; raises naming the first bad
# argument, before anything is written. Shapes, with n = prod(out.shape[1:]):
#   out [m, *rest], A_i [r, *rest] or [r, n], B_i [m, r] or [m, r, 1, 1], base like out.
def _validate(out, As, Bs, base) -> tuple[int, int, int, array, array]:
    _check_tensor(out, "out")
    if out.dim() < 2:
        raise ValueError(f"out: shape {tuple(out.shape)} has {out.dim()} dimension(s); a LoRA "
                         "target is a weight [m, n] or a conv weight [m, c, kh, kw]")
    As = _check_factors(As, "As")
    Bs = _check_factors(Bs, "Bs")
    if len(As) != len(Bs):
        raise ValueError(f"As has {len(As)} factors but Bs has {len(Bs)}; every checkpoint "
                         "needs both its A and its B")
    if not As:
        raise ValueError("As, Bs: at least one checkpoint's factors are needed")

    m, rest = out.shape[0], tuple(out.shape[1:])
    n = math.prod(rest)
    a0, b0 = _check_tensor(As[0], "As[0]"), _check_tensor(Bs[0], "Bs[0]")
    r = a0.shape[0] if a0.dim() else 0
    if r == 0 or (tuple(a0.shape[1:]) != rest and tuple(a0.shape) != (r, n)):
        raise ValueError(f"As[0]: shape {tuple(a0.shape)} is not [r, *out.shape[1:]] = "
                         f"[r, {', '.join(map(str, rest))}] or [r, n] = [r, {n}] with r >= 1 "
                         f"(out has shape {tuple(out.shape)})")
    if tuple(b0.shape) not in ((m, r), (m, r, 1, 1)):
        if b0.dim() in (2, 4) and b0.shape[0] == m and tuple(b0.shape[2:]) in ((), (1, 1)):
            raise ValueError(f"Bs[0]: rank {b0.shape[1]} (shape {tuple(b0.shape)}) differs from "
                             f"As[0]'s rank {r} (shape {tuple(a0.shape)}); B_i @ A_i needs "
                             "B_i.shape[1] == A_i.shape[0]")
        raise ValueError(f"Bs[0]: shape {tuple(b0.shape)} is not [m, r] = [{m}, {r}] or "
                         f"[m, r, 1, 1] = [{m}, {r}, 1, 1] (out has shape {tuple(out.shape)}, "
                         f"As[0] has shape {tuple(a0.shape)})")

    dtype, device = a0.dtype, out.device
    on_cpu = device.type == "cpu"
    # The common case in a few C-level passes; anything amiss takes the slow path, which names
    # the first bad factor.
    props = attrgetter("layout", "is_nested", "dtype", "shape", "is_cpu" if on_cpu else "device")
    tables = []
    for what, factors, ref in (("As", As, a0), ("Bs", Bs, b0)):
        expected = {(torch.strided, False, dtype, ref.shape, True if on_cpu else device)}
        try:
            ok = (set(map(props, factors)) == expected
                  and all(map(torch.Tensor.is_contiguous, factors))
                  and not any(map(torch.Tensor.is_neg, factors)))
        except (AttributeError, TypeError, RuntimeError):  # not tensors, nested tensors
            ok = False
        if not ok:
            _name_bad_factor(what, factors, ref, dtype, device, r)
        tables.append(array("Q", map(torch.Tensor.data_ptr, factors)))
    a_ptrs, b_ptrs = tables

    out_lo = out.data_ptr()
    out_hi = out_lo + out.numel() * out.element_size()
    if out.numel():
        itemsize = a0.element_size()
        for what, ptrs, nbytes in (("As", a_ptrs, r * n * itemsize),
                                   ("Bs", b_ptrs, m * r * itemsize)):
            i = _first_overlap(ptrs, nbytes, out_lo, out_hi) if nbytes else None
            if i is not None:
                raise ValueError(f"out overlaps {what}[{i}] in memory; out is written while the "
                                 "factors are read, so it needs its own storage")
    if base is not None:
        _check_tensor(base, "base")
        if base.shape != out.shape:
            raise ValueError(f"base: shape {tuple(base.shape)} differs from out's "
                             f"{tuple(out.shape)}")
        if base.device != device:
            raise ValueError(f"base: on {base.device} but out is on {device}; all tensors of "
                             "one merge must be on one device")
        same = base.data_ptr() == out_lo and base.dtype == out.dtype
        base_lo = base.data_ptr()
        base_hi = base_lo + base.numel() * base.element_size()
        if not same and out.numel() and base_lo < out_hi and out_lo < base_hi:
            raise ValueError("base overlaps out in memory without being the same buffer; base "
                             "may alias out only exactly (same storage, shape and dtype)")
    return m, n, r, a_ptrs, b_ptrs


class LoraPlan:
    """lora_weighted_sum(out, As, Bs, ., base, scale) prepared once: plan(coeffs) merges.

    The arguments are validated and the factors' pointer tables built here, once, so a call
    costs the coefficients' check, a comparison of every tensor's data pointer with the one
    validated (a factor, out or base whose storage was replaced or freed raises ValueError
    before anything is written) and the native merge. The plan keeps references to its
    tensors; their values may change between calls (they are read at each call), their shapes
    must not.

    guard_faults: the factors are memory-mapped files (a trajectory's): on the CPU a SIGBUS from
    reading one that was truncated under the mapping raises RuntimeError (out is then partly
    written) instead of killing the process.
    """

    def __init__(self, out: torch.Tensor, As: Sequence[torch.Tensor],
                 Bs: Sequence[torch.Tensor], base: torch.Tensor | None = None,
                 scale: float = 1.0, *, guard_faults: bool = False):
        m, n, r, a_ptrs, b_ptrs = _validate(out, As, Bs, base)
        self.scale = scale
        self.guard_faults = bool(guard_faults)
        _coefficients([0.0] * len(a_ptrs), len(a_ptrs), scale)  # a bad scale raises now
        self.out, self.base = out, base
        self._As, self._Bs = list(As), list(Bs)
        self._a_ptrs, self._b_ptrs = a_ptrs, b_ptrs
        self.out_ptr = out.data_ptr()  # the storage validated, re-checked at each call
        self.base_ptr = 0 if base is None else base.data_ptr()
        self._args = (m, n, r, self.out_ptr, _DTYPE_CODES[out.dtype], self.base_ptr,
                      0 if base is None else _DTYPE_CODES[base.dtype], a_ptrs, b_ptrs,
                      _DTYPE_CODES[self._As[0].dtype])

    def __len__(self) -> int:
        """The number of checkpoints (one coefficient each)."""
        return len(self._a_ptrs)

    def _check_storage(self) -> None:
        moved = [what for what, now, then in (
            ("out", self.out.data_ptr(), self.out_ptr),
            ("base", 0 if self.base is None else self.base.data_ptr(), self.base_ptr))
            if now != then]
        for what, factors, ptrs in (("As", self._As, self._a_ptrs), ("Bs", self._Bs, self._b_ptrs)):
            if array("Q", map(torch.Tensor.data_ptr, factors)) != ptrs:
                i = next(i for i, t in enumerate(factors) if t.data_ptr() != ptrs[i])
                moved.append(f"{what}[{i}]")
        if moved:
            raise ValueError(f"{moved[0]}: its storage changed (replaced, resized or freed) "
                             "since this LoraPlan was built; build a new plan")

    def __call__(self, coeffs) -> torch.Tensor:
        """out = base + scale * sum_i coeffs[i] * Bs[i] @ As[i]; returns out."""
        weights = _coefficients(coeffs, len(self._a_ptrs), self.scale)
        self._check_storage()
        out = self.out
        if out.numel() == 0:
            return out
        if out.device.type == "cpu":
            _C.lora_cpu(*self._args, weights, torch.get_num_threads(), self.guard_faults)
        else:
            _C.lora_cuda(*self._args, weights, *cuda_launch(out.device))
        _bump_versions([out])
        return out


def lora_weighted_sum(out: torch.Tensor, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                      coeffs, base: torch.Tensor | None = None, scale: float = 1.0
                      ) -> torch.Tensor:
    """out = base + scale * sum_i coeffs[i] * Bs[i] @ As[i], fused, in place; returns out.

    out: [m, *rest] (a conv weight [m, c, kh, kw] is [m, n] with n = c*kh*kw), float32, float16
    or bfloat16. As[i]: [r, *rest] or [r, n]; Bs[i]: [m, r] or [m, r, 1, 1] (PEFT's conv
    lora_B); one shape and one dtype (float32/float16/bfloat16) for every checkpoint's factors.
    coeffs: N finite float32 values; scale: the LoRA scaling (alpha / r), folded into each
    coefficient in float32 (w_i = fl32(scale * c_i)). base: None (no base: out = the sum) or a
    tensor shaped like out, of any supported dtype; it may be out itself (accumulate in place).
    All tensors on one device; CUDA runs on torch's current stream.

    One pass over the concatenated rank N * r, accumulating in float32 in checkpoint order, so
    on the CPU results are bitwise identical for any thread count and SIMD level. Merging the
    same factors many times (a search): build a LoraPlan once and call it.
    """
    return LoraPlan(out, As, Bs, base, scale)(coeffs)
