"""Pure-torch float64 reference for every engine op.

This is the oracle: tests compare the engine against it and benchmarks validate every
method's output with it. It favours obviousness over speed; everything is computed on the
CPU in float64, whatever the inputs' device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["weighted_sum", "weighted_sum_batched", "merge", "lora_weighted_sum"]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def weighted_sum(
    sources: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + sum_i coeffs[i] * sources[i], in float64 on the CPU."""
    acc = torch.zeros(sources[0].shape, dtype=torch.float64)
    for c, src in zip(coeffs, sources, strict=True):
        acc += float(c) * _f64(src)
    if base is not None:
        acc += _f64(base)
    return acc


def weighted_sum_batched(
    sources: Sequence[torch.Tensor],
    coeffs: Sequence[Sequence[float]],
    base: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One weighted_sum per row of coeffs (K x N)."""
    return [weighted_sum(sources, row, base) for row in coeffs]


def merge(
    checkpoints: Sequence[Mapping[str, torch.Tensor]],
    coeffs: Sequence[float],
    base: int | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged state dict, as lcsc_fast.merge_into defines it.

    Floating-point tensors: sum_i w_i theta_i, or, with a base (an index into checkpoints or a
    state dict), theta_base + sum_i w_i (theta_i - theta_base); float64 results. Other tensors
    (integer counters) are the last checkpoint's.
    """
    if isinstance(base, int):
        base = checkpoints[base]
    merged = {}
    for name, last in checkpoints[-1].items():
        if not last.is_floating_point():
            merged[name] = last.detach().cpu().clone()
            continue
        if base is None:
            merged[name] = weighted_sum([ck[name] for ck in checkpoints], coeffs)
        else:
            theta_b = _f64(base[name])
            deltas = [_f64(ck[name]) - theta_b for ck in checkpoints]
            merged[name] = weighted_sum(deltas, coeffs, theta_b)
    return merged


def lora_weighted_sum(
    out_shape: Sequence[int],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    base: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """base + scale * sum_i coeffs[i] * Bs[i] @ As[i] shaped out_shape, in float64 on the CPU.

    The dense products one by one, as lcsc_fast.lora_weighted_sum defines the merge: A_i
    [r, *rest] or [r, n], B_i [m, r] or [m, r, 1, 1], n = prod(out_shape[1:]).
    """
    m = out_shape[0]
    acc = torch.zeros((m, math.prod(out_shape[1:])), dtype=torch.float64)
    for c, a, b in zip(coeffs, As, Bs, strict=True):
        product = _f64(b).reshape(m, -1) @ _f64(a).reshape(b.shape[1], -1)  # [m, n]
        acc += float(scale) * float(c) * product
    if base is not None:
        acc += _f64(base).reshape(acc.shape)
    return acc.reshape(tuple(out_shape))
