"""The CPU ops' bits equal their documented per-element arithmetic, emulated exactly.

merge.h and lora.h fix each output element's float32 operation sequence (which is what makes
results reproducible across tilings, threads, SIMD levels and CUDA). These tests carry that
sequence out in float64, one operation at a time with the result rounded to float32, and
require the engine's bits at every SIMD level:

- weighted sum (single and batched): acc = 0, then acc = fma(c_i, x_i, acc) for i = 0..N-1,
  then acc + base when there is a base, rounded to the output dtype;
- LoRA: w_i = fl32(scale * c_i), multipliers fl32(w_i * B_i[j][p]); per panel of
  32 consecutive ranks k = i * r + p (lora.h's kLoraPanelRanks), a partial from zero with one
  fma per rank in increasing k; partials added in panel order; then the base.

The emulation is exact. A product of two float32 values fits a float64, so c * x + acc is one
float64 addition: rounded to float64 (its error found exactly by TwoSum), then to float32. That
equals one rounding to float32 except where the float64 sum lies exactly halfway between two
float32 values and was itself rounded; there the error's sign says which way the exact sum
rounds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (MIXED_CYCLE, assert_bitwise_equal, fp32_coeffs, generator, nan_like, param,
                      randn, use_simd_level)

import lcsc_fast

LEVELS = ("scalar", "avx2", "avx512")
PANEL_RANKS = 32  # lora.h's kLoraPanelRanks: part of the op's numerics


def add_fp32(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """fl32(p + q), rounded once, for float64 p and q (each exact: a float32 value or a product
    of two); returned in float64."""
    s = p + q
    b = s - p
    err = (p - (s - b)) + (q - b)  # TwoSum: p + q == s + err exactly
    r = s.to(torch.float32).double()
    toward = torch.where(s > r, torch.inf, -torch.inf)
    other = torch.nextafter(r.float(), toward.float()).double()
    halfway = (s != r) & (s == (r + other) / 2)
    # At a float64 tie that hides a nonzero error, the exact sum lies on err's side of it.
    lo, hi = torch.minimum(r, other), torch.maximum(r, other)
    fixed = torch.where(err > 0, hi, lo)
    return torch.where(halfway & (err != 0), fixed, r)


def fma(c: torch.Tensor, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """fl32(c * x + acc) for float32 values held in float64: c * x is exact in float64."""
    return add_fp32(c * x, acc)


def emulate_weighted_sum(sources, coeffs, base, out_dtype) -> torch.Tensor:
    acc = torch.zeros(sources[0].numel(), dtype=torch.float64)
    for c, x in zip(coeffs, sources):
        acc = fma(torch.tensor(c, dtype=torch.float64), x.double().reshape(-1), acc)
    if base is not None:
        acc = add_fp32(acc, base.double().reshape(-1))
    return acc.float().to(out_dtype)


def emulate_lora(As, Bs, coeffs, base, scale, out_dtype) -> torch.Tensor:
    r = As[0].shape[0]
    w = torch.tensor([scale * c for c in coeffs], dtype=torch.float32).double()
    # The multipliers fl32(w_i * B_i[j][p]) and A's rows, both along the concatenated rank.
    bw = torch.cat([add_fp32(w[i] * b.double(), torch.zeros(1, dtype=torch.float64))
                    for i, b in enumerate(Bs)], dim=1)  # [m, R]
    a = torch.cat([x.double() for x in As], dim=0)  # [R, n]
    total = None
    for k0 in range(0, len(As) * r, PANEL_RANKS):
        partial = torch.zeros(bw.shape[0], a.shape[1], dtype=torch.float64)
        for k in range(k0, min(k0 + PANEL_RANKS, bw.shape[1])):
            partial = fma(bw[:, k:k + 1], a[k:k + 1, :], partial)
        total = partial if total is None else add_fp32(total, partial)
    if base is not None:
        total = add_fp32(total, base.double())
    return total.float().to(out_dtype)


def test_emulated_rounding_is_single():
    """add_fp32 at float32 ties: exact ones go to the even neighbour; ones that float64 rounding
    made (a tiny second term lost) go the way of that term, as one rounding of the exact sum
    does."""
    t = 1 + 2.0**-24  # halfway between 1 and 1 + 2^-23
    cases = [(t, 2.0**-80, 1 + 2.0**-23), (t, -(2.0**-80), 1.0), (t, 0.0, 1.0),
             (1 + 3 * 2.0**-24, 0.0, 1 + 2.0**-22), (-t, -(2.0**-80), -(1 + 2.0**-23)),
             (-t, 2.0**-80, -1.0)]
    for p, q, want in cases:
        got = add_fp32(torch.tensor([p], dtype=torch.float64),
                       torch.tensor([q], dtype=torch.float64)).item()
        assert got == want, (p, q, got, want)


@pytest.mark.parametrize("out_dtype", param("out", (torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("level", param("simd", LEVELS))
def test_weighted_sum_is_an_fma_chain(restore_simd, level, out_dtype):
    """Mixed source dtypes, 37 sources (four groups of 8, then 4, then 1), 4099 elements (every
    vector width and a tail), a bf16 base; single merges and a batch of three rows."""
    use_simd_level(level)
    g = generator("numerics-merge", level, out_dtype)
    n, numel = 37, 4099
    sources = [randn(numel, MIXED_CYCLE[i % 3], g) for i in range(n)]
    base = randn(numel, torch.bfloat16, g)
    rows = [fp32_coeffs(n, g) for _ in range(3)]
    wants = [emulate_weighted_sum(sources, row, base, out_dtype) for row in rows]
    for row, want in zip(rows, wants):
        got = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, row, base=base)
        assert_bitwise_equal(got, want, "weighted_sum")
    without_base = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, rows[0])
    assert_bitwise_equal(without_base, emulate_weighted_sum(sources, rows[0], None, out_dtype),
                         "weighted_sum without a base")
    outs = lcsc_fast.weighted_sum_batched([nan_like(numel, out_dtype) for _ in rows], sources,
                                          rows, base=base)
    for k, (got, want) in enumerate(zip(outs, wants)):
        assert_bitwise_equal(got, want, f"weighted_sum_batched row {k}")


@pytest.mark.parametrize("factor_dtype", param("factors", (torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("level", param("simd", LEVELS))
def test_lora_is_panels_of_fma_chains(restore_simd, level, factor_dtype):
    """21 checkpoints of rank 5 (105 ranks: three whole panels and one of 9, panels that start
    and end inside a checkpoint), a 29 x 45 layer (ragged against every micro-tile), scale 0.75,
    an fp32 base."""
    use_simd_level(level)
    g = generator("numerics-lora", level, factor_dtype)
    m, n, r, n_ckpt = 29, 45, 5, 21
    As = [randn((r, n), factor_dtype, g) for _ in range(n_ckpt)]
    Bs = [randn((m, r), factor_dtype, g) for _ in range(n_ckpt)]
    coeffs = fp32_coeffs(n_ckpt, g)
    base = randn((m, n), torch.float32, g)
    got = lcsc_fast.lora_weighted_sum(nan_like((m, n), torch.float32), As, Bs, coeffs, base=base,
                                      scale=0.75)
    assert_bitwise_equal(got, emulate_lora(As, Bs, coeffs, base, 0.75, torch.float32), "lora")
