"""weighted_sum and weighted_sum_batched against the float64 reference (lcsc_fast.reference).

Accuracy matrix: source dtype {fp32, fp16, bf16, mixed} x out dtype {fp32, fp16, bf16} x base
{none, present} x numel {0, 1, 7, 4097, 10**6} x N {1, 3, 64, 1024}. test_matrix runs every one
of the 480 cells, so every numel and every N meets every dtype combination. ("mixed" sources
cycle fp32, fp16, bf16; a present base has out's dtype here, other base dtypes are covered by
test_base_dtype_may_differ_from_out.)

That stays cheap (about 12 s on 2 cores) because large numel x N cells take their N sources
from a pool of 8 distinct random tensors (conftest.pooled_sources), each reused with its own
random coefficient, so memory stays at 8 x numel elements, and the float64 reference is
evaluated on the algebraically identical collapsed sum (conftest.reference_pooled). Plain torch,
the yardstick of the accuracy rule (conftest.assert_within_torch_error: engine error <= 2 x plain
torch's error + eps(out) x max|ref|), does the full N-step float32 loop.

Beyond accuracy: base dtypes, shapes, coefficient containers, the batched op (bitwise equal to
single calls per row), exact aliasing (out is base, out is a source, batched rows that are the
base or a source), determinism (repeat runs and 1 vs 2 threads bitwise equal), every SIMD level
bitwise equal to the scalar fallback (all dtype combinations, ragged tails, guard bands around
out), large batches of sources at one page offset (read from a packed copy) and with 16-bit
outputs (written from scratch) bitwise equal to single merges, large single merges (which
prefetch their sources) bitwise equal to merges of their halves and unharmed by a source that
ends at an inaccessible page, N = 4096, and special values
(inf/NaN propagation like torch, fp16 overflow, subnormals, round-to-nearest-even conversion of
the float32 accumulator, exhaustively for 16-bit sources).
"""

from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lcsc_fast
from conftest import (DTYPES, MIXED_CYCLE, OUT_KINDS, SRC_KINDS, assert_bitwise_equal,
                      assert_same_values, assert_within_torch_error, device_params, fp32_coeffs,
                      generator, nan_like, param, pooled_sources, randn, reference_pooled,
                      src_dtype, torch_weighted_sum, use_simd_level)
from lcsc_fast import reference

NUMELS = (0, 1, 7, 4097, 10**6)
NS = (1, 3, 64, 1024)
SIMD_LEVELS = ("avx2", "avx512")


def _check_against_reference(device, src_kind, out_kind, with_base, numel, n):
    g = generator("matrix", src_kind, out_kind, with_base, numel, n)
    sources, pool, index = pooled_sources(numel, n, src_kind, g, device)
    coeffs = fp32_coeffs(n, g)
    out_dtype = DTYPES[out_kind]
    base = randn(numel, out_dtype, g, device) if with_base else None
    out = nan_like(numel, out_dtype, device)
    assert lcsc_fast.weighted_sum(out, sources, coeffs, base=base) is out
    ref = reference_pooled(pool, index, coeffs, base)
    assert_within_torch_error(out, torch_weighted_sum(out_dtype, sources, coeffs, base), ref)


# ---------------------------------------------------------------- accuracy matrix

@pytest.mark.parametrize("n", param("N", NS))
@pytest.mark.parametrize("numel", param("numel", NUMELS))
@pytest.mark.parametrize("with_base", param("base", (False, True)))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("src_kind", param("src", SRC_KINDS))
@pytest.mark.parametrize("device", device_params())
def test_matrix(device, src_kind, out_kind, with_base, numel, n):
    """Every dtype combination, at every numel and every N (up to 10**6 elements x 1024
    sources), is at least half as accurate as plain torch against the float64 reference."""
    _check_against_reference(device, src_kind, out_kind, with_base, numel, n)


@pytest.mark.parametrize("base_dtype", param("base", MIXED_CYCLE))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("device", device_params())
def test_base_dtype_may_differ_from_out(device, out_kind, base_dtype):
    """A base of any supported dtype is added in float32 after the sources."""
    g = generator("base-dtype", out_kind, base_dtype)
    numel, n = 4099, 5
    sources, _, _ = pooled_sources(numel, n, "mixed", g, device)
    coeffs = fp32_coeffs(n, g)
    base = randn(numel, base_dtype, g, device, scale=4.0)
    out = nan_like(numel, DTYPES[out_kind], device)
    lcsc_fast.weighted_sum(out, sources, coeffs, base=base)
    assert_within_torch_error(out, torch_weighted_sum(out.dtype, sources, coeffs, base),
                              reference.weighted_sum(sources, coeffs, base))


@pytest.mark.parametrize("shape", param("shape", [(), (0,), (0, 5), (3, 0, 2), (2, 3, 5, 7),
                                                  (17, 1, 33)]))
@pytest.mark.parametrize("device", device_params())
def test_any_shape(device, shape):
    """Multi-dimensional, 0-d and empty shapes work elementwise and keep out's shape."""
    g = generator("shape", shape)
    sources = [randn(shape, src_dtype("mixed", i), g, device) for i in range(4)]
    coeffs = fp32_coeffs(4, g)
    base = randn(shape, torch.float32, g, device)
    for out_dtype in MIXED_CYCLE:
        out = nan_like(shape, out_dtype, device)
        lcsc_fast.weighted_sum(out, sources, coeffs, base=base)
        assert out.shape == shape
        assert_within_torch_error(out, torch_weighted_sum(out_dtype, sources, coeffs, base),
                                  reference.weighted_sum(sources, coeffs, base))


def test_coefficient_containers_agree():
    """coeffs may be a list, tuple, float32/float64 tensor or numpy array of real numbers:
    ints, floats, numpy real scalars, 0-d real tensors; same bits either way."""
    g = generator("containers")
    sources = [randn(1000, src_dtype("mixed", i), g) for i in range(3)]
    forms = [[1.0, -2.0, 0.5], (1.0, -2.0, 0.5), [1, -2, 0.5],
             torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
             np.array([1.0, -2.0, 0.5], dtype=np.float32), np.array([1, -2, 0.5]),
             [np.float32(1.0), np.int64(-2), np.float64(0.5)], [np.array(1.0), -2, 0.5],
             [torch.tensor(1), torch.tensor(-2.0), torch.tensor(0.5, dtype=torch.bfloat16)]]
    results = [lcsc_fast.weighted_sum(nan_like(1000, torch.float32), sources, c) for c in forms]
    for r in results[1:]:
        assert_bitwise_equal(r, results[0])
    rows = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.0, 3.0]])
    for form in (rows, rows.numpy(), list(rows), [[np.float32(1), -2, 0.5], (0.25, 0, 3)]):
        outs = [nan_like(1000, torch.float32) for _ in range(2)]
        lcsc_fast.weighted_sum_batched(outs, sources, form)
        assert_bitwise_equal(outs[0], results[0])


def test_n_4096_sources():
    """4096 distinct sources (mixed dtypes) over a small tensor: accurate, batched agrees."""
    g = generator("n4096")
    numel, n = 33, 4096
    sources = [randn(numel, src_dtype("mixed", i), g) for i in range(n)]
    coeffs = fp32_coeffs(n, g)
    base = randn(numel, torch.float32, g)
    for out_dtype in MIXED_CYCLE:
        out = nan_like(numel, out_dtype)
        lcsc_fast.weighted_sum(out, sources, coeffs, base=base)
        assert_within_torch_error(out, torch_weighted_sum(out_dtype, sources, coeffs, base),
                                  reference.weighted_sum(sources, coeffs, base))
        outs = [nan_like(numel, out_dtype) for _ in range(2)]
        lcsc_fast.weighted_sum_batched(outs, sources, [coeffs, coeffs[::-1]], base=base)
        assert_bitwise_equal(outs[0], out)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(numel=st.integers(0, 300),
       dtypes=st.lists(st.sampled_from(MIXED_CYCLE), min_size=1, max_size=12),
       out_dtype=st.sampled_from(MIXED_CYCLE),
       base_dtype=st.sampled_from((None,) + MIXED_CYCLE),
       seed=st.integers(0, 2**31 - 1))
def test_random_small_cases(numel, dtypes, out_dtype, base_dtype, seed):
    """Random sizes, per-source dtypes and bases: accurate, and the scalar path agrees bitwise."""
    g = torch.Generator().manual_seed(seed)
    sources = [randn(numel, dt, g) for dt in dtypes]
    coeffs = (torch.randn(len(dtypes), generator=g) * 3).tolist()
    base = None if base_dtype is None else randn(numel, base_dtype, g)
    out = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs, base=base)
    assert_within_torch_error(out, torch_weighted_sum(out_dtype, sources, coeffs, base),
                              reference.weighted_sum(sources, coeffs, base))
    try:
        lcsc_fast._C.set_simd_level("scalar")
        scalar = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs, base=base)
    finally:
        lcsc_fast._C.set_simd_level("auto")
    assert_bitwise_equal(out, scalar, "auto vs scalar")


# ---------------------------------------------------------------- batched

@pytest.mark.parametrize("with_base", param("base", (False, True)))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("src_kind", param("src", SRC_KINDS))
@pytest.mark.parametrize("k", param("K", (1, 2, 8)))
@pytest.mark.parametrize("device", device_params())
def test_batched_rows_equal_single(device, k, src_kind, out_kind, with_base):
    """Each batched output is bitwise the single weighted_sum of its coefficient row, and as
    accurate as plain torch against reference.weighted_sum_batched."""
    g = generator("batched", k, src_kind, out_kind, with_base)
    numel, n = 4097, 5
    out_dtype = DTYPES[out_kind]
    sources, _, _ = pooled_sources(numel, n, src_kind, g, device)
    coeffs = [fp32_coeffs(n, g) for _ in range(k)]
    base = randn(numel, out_dtype, g, device) if with_base else None
    outs = [nan_like(numel, out_dtype, device) for _ in range(k)]
    result = lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    assert len(result) == k and all(r is o for r, o in zip(result, outs))
    refs = reference.weighted_sum_batched(sources, coeffs, base)
    for row in range(k):
        single = lcsc_fast.weighted_sum(nan_like(numel, out_dtype, device), sources,
                                        coeffs[row], base=base)
        assert_bitwise_equal(outs[row], single, f"outs[{row}]")
        assert_within_torch_error(
            outs[row], torch_weighted_sum(out_dtype, sources, coeffs[row], base), refs[row])


def test_batched_large_equals_single(restore_threads):
    """K=8 rows over N=64 sources and 10**5+3 elements (several tiles and threads) equal the
    single-output calls bitwise."""
    torch.set_num_threads(2)
    g = generator("batched-large")
    numel, n, k = 10**5 + 3, 64, 8
    sources, _, _ = pooled_sources(numel, n, "mixed", g)
    coeffs = [fp32_coeffs(n, g) for _ in range(k)]
    base = randn(numel, torch.float32, g)
    outs = [nan_like(numel, torch.bfloat16) for _ in range(k)]
    lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    for row in range(k):
        single = lcsc_fast.weighted_sum(nan_like(numel, torch.bfloat16), sources, coeffs[row],
                                        base=base)
        assert_bitwise_equal(outs[row], single, f"outs[{row}]")


@pytest.mark.parametrize("k", param("K", (3, 7, 9, 13)))
@pytest.mark.parametrize("src_kind", param("src", ("fp32", "bf16", "mixed")))
@pytest.mark.parametrize("level", param("simd", ("scalar", *SIMD_LEVELS)))
def test_batched_source_groups_and_output_groups(restore_simd, level, src_kind, k):
    """A batch streams its sources in groups (about 170 fp32 or 136 bf16 sources a group) and
    keeps its outputs in groups of 8, then 4, 2 and 1: with N = 300 and K = 3, 7, 9, 13 every
    kind of group boundary, plus partial vectors and a scalar tail, is crossed. Each row is
    bitwise the single merge of its coefficients, at every SIMD level."""
    use_simd_level(level)
    g = generator("batched-groups", level, src_kind, k)
    numel, n = 2 * 960 + 3 * 16 + 7, 300
    sources, _, _ = pooled_sources(numel, n, src_kind, g)
    coeffs = [fp32_coeffs(n, g) for _ in range(k)]
    base = randn(numel, torch.bfloat16, g)
    outs = [nan_like(numel, torch.float32) for _ in range(k)]
    lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    refs = reference.weighted_sum_batched(sources, coeffs, base)
    for row in range(k):
        single = lcsc_fast.weighted_sum(nan_like(numel, torch.float32), sources, coeffs[row],
                                        base=base)
        assert_bitwise_equal(outs[row], single, f"outs[{row}]")
    assert_within_torch_error(
        outs[-1], torch_weighted_sum(torch.float32, sources, coeffs[-1], base), refs[-1])


# ---------------------------------------------------------------- the traffic probe

@pytest.mark.parametrize("level", param("simd", ("scalar", *SIMD_LEVELS)))
@pytest.mark.parametrize("src_kind", param("src", ("fp32", "bf16")))
def test_traffic_probe_reads_and_writes_the_bytes_of_a_merge(restore_simd, level, src_kind):
    """_C.traffic_probe (the benchmarks' traffic-only yardstick) writes every element of every
    output and nothing past them, at every SIMD level; with float32 sources each element is the
    plain float32 sum of the sources' elements, so every source element was read."""
    use_simd_level(level)
    g = generator("traffic-probe", level, src_kind)
    dtype = DTYPES[src_kind]
    numel, n, k = 3 * 1024 + 37, 5, 3
    sources = [randn(numel, dtype, g) for _ in range(n)]
    canvas = nan_like(k * (numel + 64), torch.float32)
    outs = [canvas[r * (numel + 64):r * (numel + 64) + numel] for r in range(k)]
    ptrs = lambda ts: np.array([t.data_ptr() for t in ts], dtype=np.uint64)  # noqa: E731
    lcsc_fast._C.traffic_probe(ptrs(sources), dtype.itemsize, ptrs(outs), numel, 2)
    expected = torch.zeros(numel)
    for s in sources:
        expected = expected + s.float()
    for r, out in enumerate(outs):
        if src_kind == "fp32":
            assert_bitwise_equal(out, expected, f"outs[{r}]")
        else:  # 16-bit pairs read as float32 words: finite values, not the sums
            assert torch.isfinite(out).all()
        assert torch.isnan(canvas[r * (numel + 64) + numel:(r + 1) * (numel + 64)]).all()
    with pytest.raises(ValueError, match="elem_nbytes must be 2 or 4"):
        lcsc_fast._C.traffic_probe(ptrs(sources), 3, ptrs(outs), numel, 1)


# ---------------------------------------------------------------- exact aliasing

def _mixed_sources(numel, n, g, device):
    return [randn(numel, src_dtype("mixed", i), g, device) for i in range(n)]


@pytest.mark.parametrize("numel", param("numel", (7, 100_003)))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("device", device_params())
def test_out_is_base(device, out_kind, numel):
    """out may be the base tensor itself: the result equals using a copy of the base."""
    g = generator("out-is-base", out_kind, numel)
    sources = _mixed_sources(numel, 5, g, device)
    coeffs = fp32_coeffs(5, g)
    base = randn(numel, DTYPES[out_kind], g, device)
    expected = lcsc_fast.weighted_sum(nan_like(numel, base.dtype, device), sources, coeffs,
                                      base=base.clone())
    assert lcsc_fast.weighted_sum(base, sources, coeffs, base=base) is base
    assert_bitwise_equal(base, expected)


@pytest.mark.parametrize("position", param("source", (0, 2, 4)))
@pytest.mark.parametrize("numel", param("numel", (7, 100_003)))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("device", device_params())
def test_out_is_a_source(device, out_kind, numel, position):
    """out may be one of the sources (first, middle or last): every element is read before it
    is overwritten, so the result equals computing from copies."""
    g = generator("out-is-source", out_kind, numel, position)
    sources = _mixed_sources(numel, 5, g, device)
    sources[position] = randn(numel, DTYPES[out_kind], g, device)
    coeffs = fp32_coeffs(5, g)
    base = randn(numel, torch.float32, g, device)
    expected = lcsc_fast.weighted_sum(nan_like(numel, DTYPES[out_kind], device),
                                      [s.clone() for s in sources], coeffs, base=base)
    out = sources[position]
    lcsc_fast.weighted_sum(out, sources, coeffs, base=base)
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("numel", param("numel", (7, 100_003)))
@pytest.mark.parametrize("device", device_params())
def test_out_is_base_and_repeated_source(device, numel):
    """out may be the base and appear several times among the sources at once."""
    g = generator("out-everywhere", numel)
    x = randn(numel, torch.float32, g, device)
    y = randn(numel, torch.float16, g, device)
    coeffs = [0.5, -1.25, 2.0, 0.75]
    expected = lcsc_fast.weighted_sum(nan_like(numel, torch.float32, device),
                                      [x.clone(), y, x.clone(), y], coeffs, base=x.clone())
    lcsc_fast.weighted_sum(x, [x, y, x, y], coeffs, base=x)
    assert_bitwise_equal(x, expected)


# (K, the row that is the base, the row that is sources[0]). With K = 11 the outputs go in
# groups of 8, 2 and 1; the last group's rows are written from registers, the others from
# scratch, and the base row is in one kind and the source row in the other, either way round.
BATCH_ALIASES = ((3, 0, 1), (11, 10, 0), (11, 0, 10))


@pytest.mark.parametrize("layout", BATCH_ALIASES, ids=lambda x: "k{}-base{}-source{}".format(*x))
@pytest.mark.parametrize("numel", param("numel", (7, 100_003)))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("device", device_params())
def test_batched_out_is_base_or_source(device, out_kind, numel, layout):
    """Batched: one row may be the base and another a source; the other rows still see the
    original base and source values."""
    k, base_row, source_row = layout
    g = generator("batched-alias", out_kind, numel, *layout)
    out_dtype = DTYPES[out_kind]
    sources = _mixed_sources(numel, 4, g, device)
    sources[0] = randn(numel, out_dtype, g, device)
    base = randn(numel, out_dtype, g, device)
    coeffs = [fp32_coeffs(4, g) for _ in range(k)]
    clones = [s.clone() for s in sources]
    expected = [lcsc_fast.weighted_sum(nan_like(numel, out_dtype, device), clones, row,
                                       base=base.clone()) for row in coeffs]
    outs = [nan_like(numel, out_dtype, device) for _ in range(k)]
    outs[base_row], outs[source_row] = base, sources[0]
    lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    for row in range(k):
        assert_bitwise_equal(outs[row], expected[row], f"outs[{row}]")


# ---------------------------------------------------------------- determinism

def _big_case(tag, out_dtype):
    g = generator(tag, out_dtype)
    numel, n = 10**6 + 3, 16
    sources, _, _ = pooled_sources(numel, n, "mixed", g)
    return numel, sources, fp32_coeffs(n, g), randn(numel, torch.bfloat16, g)


@pytest.mark.parametrize("out_dtype", param("out", MIXED_CYCLE))
def test_repeat_runs_bitwise_equal(out_dtype):
    """Two runs on the same inputs give the same bits."""
    numel, sources, coeffs, base = _big_case("repeat", out_dtype)
    a = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs, base=base)
    b = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs, base=base)
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("out_dtype", param("out", MIXED_CYCLE))
def test_thread_count_does_not_change_bits(restore_threads, out_dtype):
    """1 and 2 engine threads (torch.get_num_threads()) give bitwise equal results, single and
    batched."""
    numel, sources, coeffs, base = _big_case("threads", out_dtype)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        single = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs, base=base)
        outs = [nan_like(numel, out_dtype) for _ in range(3)]
        lcsc_fast.weighted_sum_batched(outs, sources, [coeffs, coeffs[::-1], coeffs], base=base)
        results.append([single, *outs])
    for a, b in zip(*results):
        assert_bitwise_equal(a, b, "1 vs 2 threads")
    assert_bitwise_equal(results[0][0], results[0][1], "single vs batched row 0")


@pytest.fixture
def flush_denormal():
    """torch.set_flush_denormal(True) for one test (it sets the calling thread's FTZ/DAZ)."""
    if not torch.set_flush_denormal(True):
        pytest.fail("this CPU cannot flush denormals, so the test cannot run here")
    yield
    torch.set_flush_denormal(False)


def test_thread_count_does_not_change_bits_when_flushing_denormals(restore_threads,
                                                                    flush_denormal):
    """The engine's worker threads take the caller's flush-to-zero mode: with denormals flushed,
    every subnormal result is zero on 1 and on 2 threads alike (OpenMP workers would otherwise
    keep their own mode and give a thread-count-dependent mix)."""
    numel = 10**6
    sources = [torch.full((numel,), 1e-39), torch.full((numel,), 1e-39)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = lcsc_fast.weighted_sum(torch.empty(numel), sources, [1.0, 0.5])
        assert torch.count_nonzero(out) == 0, f"{threads} thread(s)"


# ---------------------------------------------------------------- SIMD vs scalar

def _run_at_levels(levels, fn):
    results = {}
    for level in levels:
        use_simd_level(level)
        results[level] = fn()
    return results


@pytest.mark.parametrize("base_dtype", param("base", (None,) + MIXED_CYCLE))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("src_kind", param("src", SRC_KINDS))
@pytest.mark.parametrize("level", param("simd", SIMD_LEVELS))
def test_simd_matches_scalar(restore_simd, level, src_kind, out_kind, base_dtype):
    """Each SIMD level gives the scalar fallback's bits, single and batched, for every dtype
    combination (sources at unaligned addresses, numel not a multiple of any vector width)."""
    g = generator("simd", src_kind, out_kind, base_dtype)
    numel, n = 10**4 + 13, 5
    out_dtype = DTYPES[out_kind]
    sources, _, _ = pooled_sources(numel, n, src_kind, g)
    coeffs = [fp32_coeffs(n, g) for _ in range(3)]
    base = None if base_dtype is None else randn(numel, base_dtype, g)

    def run():
        single = lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs[0],
                                        base=base)
        outs = [nan_like(numel, out_dtype) for _ in range(3)]
        lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
        return [single, *outs]

    results = _run_at_levels(("scalar", level), run)
    for i, (a, b) in enumerate(zip(results["scalar"], results[level])):
        assert_bitwise_equal(b, a, f"{level} vs scalar, result {i}")


@pytest.mark.parametrize("with_base", param("base", (False, True)))
@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("level", param("simd", SIMD_LEVELS))
def test_all_bf16_single_merge_matches_scalar_over_groups_and_tiles(restore_simd, level,
                                                                    out_kind, with_base):
    """A single merge of bf16 sources only (which AVX-512 sums as even and odd lanes until the
    last group of sources) gives the scalar fallback's bits: 19 sources (groups of 8, 8, 1, 1
    and 1), three tiles, the last one ending in pairs of vectors, one vector and a scalar tail,
    sources at unaligned addresses."""
    g = generator("bf16-even-odd", out_kind, with_base)
    numel, n = 2 * 16384 + 3 * 32 + 16 + 5, 19
    out_dtype = DTYPES[out_kind]
    sources, _, _ = pooled_sources(numel, n, "bf16", g)
    coeffs = fp32_coeffs(n, g)
    base = randn(numel, torch.bfloat16, g) if with_base else None

    def run():
        return lcsc_fast.weighted_sum(nan_like(numel, out_dtype), sources, coeffs, base=base)

    results = _run_at_levels(("scalar", level), run)
    assert_bitwise_equal(results[level], results["scalar"], f"{level} vs scalar")


@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
def test_ragged_tails_and_guard_bands(restore_simd, level, out_kind):
    """For numel 0..69 and around multiples of 64/128/256/1024, every level writes exactly
    out's elements (the guard bands of the buffer around out keep their bits) and matches the
    scalar fallback bitwise."""
    out_dtype = DTYPES[out_kind]
    g = generator("tails", out_kind)
    for numel in [*range(70), 127, 128, 129, 255, 256, 257, 1023, 1025]:
        sources, _, _ = pooled_sources(numel, 3, "mixed", g)
        coeffs = fp32_coeffs(3, g)
        base = randn(numel, torch.float16, g) if numel % 2 else None
        front = 1 + numel % 5
        results = {}
        for lvl in ("scalar", level):
            use_simd_level(lvl)
            buf = torch.full((numel + front + 19,), 1234.5, dtype=out_dtype)
            out = buf[front:front + numel]
            lcsc_fast.weighted_sum(out, sources, coeffs, base=base)
            assert bool((buf[:front] == 1234.5).all() and (buf[front + numel:] == 1234.5).all()), \
                f"{lvl} wrote outside out for numel={numel}"
            results[lvl] = out
        assert_bitwise_equal(results[level], results["scalar"], f"numel={numel}")


@pytest.mark.parametrize("level", param("simd", SIMD_LEVELS))
def test_simd_matches_scalar_4096_sources(restore_simd, level):
    """With N=4096 sources each SIMD level still matches the scalar fallback bitwise."""
    g = generator("simd-4096")
    numel, n = 70, 4096
    sources = [randn(numel, src_dtype("mixed", i), g) for i in range(n)]
    coeffs = fp32_coeffs(n, g)

    def run():
        return lcsc_fast.weighted_sum(nan_like(numel, torch.float16), sources, coeffs)

    results = _run_at_levels(("scalar", level), run)
    assert_bitwise_equal(results[level], results["scalar"])


# ---------------------------------------------------------------- special values

def _all_16bit(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("coeff", param("c", (1.0, 0.5, -2.0)))
@pytest.mark.parametrize("src_dtype_", param("src", (torch.float16, torch.bfloat16)))
@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
def test_every_16bit_source_value(restore_simd, level, src_dtype_, coeff):
    """All 65536 fp16/bf16 bit patterns (subnormals, infinities, NaNs included) scaled by an
    exact coefficient give the value plain torch gives, for every out dtype and SIMD level; the
    16-bit outputs are the float32 output rounded by torch's own conversion."""
    use_simd_level(level)
    src = _all_16bit(src_dtype_)
    fp32 = lcsc_fast.weighted_sum(nan_like(src.shape, torch.float32), [src], [coeff])
    assert_same_values(fp32, torch_weighted_sum(torch.float32, [src], [coeff]), "fp32 out")
    for out_dtype in (torch.float16, torch.bfloat16):
        out = lcsc_fast.weighted_sum(nan_like(src.shape, out_dtype), [src], [coeff])
        assert_same_values(out, torch_weighted_sum(out_dtype, [src], [coeff]), "vs torch")
        _assert_rounded_from(out, fp32)


def _assert_rounded_from(out, fp32):
    """out is fp32.to(out.dtype), bitwise on every non-NaN element, NaN where fp32 is NaN."""
    expected = fp32.to(out.dtype)
    nan = torch.isnan(fp32)
    assert torch.equal(torch.isnan(out), nan)
    assert_bitwise_equal(out[~nan], expected[~nan], f"round to {out.dtype}")


_ROUNDING_CASES = [
    1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-11),  # ties at 1
    2**-24, 2**-25, 3 * 2**-25, 2**-25 + 2**-40, 2**-14 - 2**-25, 2**-14 - 2**-24,  # fp16 subnormal
    6.1e-5, 1e-7, -3e-8, 65504.0, 65519.996, 65520.0, 65536.0, 1e5, -1e5,  # fp16 overflow
    3.3895313892515355e38, 3.39e38, 3.4e38, -3.4e38, 1e-38, 1e-40, 1e-45, 0.0, -0.0,
]


@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
def test_rounding_is_float32_result_rounded_once(restore_simd, level):
    """engine(out fp16/bf16) == engine(out fp32).to(fp16/bf16) bitwise: the float32 accumulator
    is rounded once, to nearest even, including ties, subnormal results and overflow to inf.
    Checked on crafted edge values and on 2**16 random float32 bit patterns, alone and combined
    with a second source and a base."""
    use_simd_level(level)
    g = generator("rounding")
    crafted = torch.tensor(_ROUNDING_CASES, dtype=torch.float32)
    random_bits = torch.randint(-(2**31), 2**31, (2**16,), generator=g, dtype=torch.int64)
    x = torch.cat([crafted, random_bits.to(torch.int32).view(torch.float32)])
    y = randn(x.shape, torch.float32, g, scale=1e-3)
    base = randn(x.shape, torch.bfloat16, g)
    for sources, coeffs, b in (([x], [1.0], None), ([x, y], [0.75, -3.0], None),
                               ([x, y], [1.0, 2.5], base)):
        fp32 = lcsc_fast.weighted_sum(nan_like(x.shape, torch.float32), sources, coeffs, base=b)
        for out_dtype in (torch.float16, torch.bfloat16):
            out = lcsc_fast.weighted_sum(nan_like(x.shape, out_dtype), sources, coeffs, base=b)
            _assert_rounded_from(out, fp32)


def test_fp16_rounding_edge_values_explicitly():
    """Known fp16 roundings: ties go to even, 2**-25 underflows to 0, 3*2**-25 rounds up to the
    subnormal 2**-23, 65519.99 stays at the max 65504 and 65520 overflows to inf."""
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 65519.99, 65520.0, -1e5])
    out = lcsc_fast.weighted_sum(nan_like(x.shape, torch.float16), [x], [1.0])
    expected = torch.tensor([1.0, 1 + 2**-9, 0.0, 2**-23, 65504.0, math.inf, -math.inf],
                            dtype=torch.float16)
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
@pytest.mark.parametrize("src_kind", param("src", ("fp32", "fp16", "bf16")))
@pytest.mark.parametrize("device", device_params())
def test_inf_and_nan_propagate_like_torch(device, src_kind, out_kind):
    """inf and NaN in sources or base come out as plain torch's float32 arithmetic makes them
    (sign of inf follows the coefficient, inf - inf is NaN), in the vector body and the tail."""
    g = generator("specials", src_kind, out_kind)
    numel = 1000 + 37
    dt, out_dtype = DTYPES[src_kind], DTYPES[out_kind]
    s0, s1 = randn(numel, torch.float32, g), randn(numel, torch.float32, g)
    base = randn(numel, torch.float32, g)
    inf, nan = math.inf, math.nan
    for at in (0, 500, numel - 9):  # start, middle, tail
        s0[at + 0] = inf                          # +inf * 0.5      -> +inf
        s1[at + 1] = inf                          # +inf * -1.5     -> -inf
        s0[at + 2], s1[at + 2] = inf, -inf        # inf*0.5 + -inf*-1.5 = inf + inf -> +inf
        s0[at + 3], s1[at + 3] = inf, inf         # inf*0.5 + inf*-1.5 -> NaN
        s1[at + 4] = nan                          # -> NaN
        base[at + 5] = -inf                       # -> -inf
        s0[at + 6], base[at + 6] = -inf, inf      # -> NaN
        s0[at + 7], base[at + 7] = nan, inf       # -> NaN
    sources = [s0.to(dt).to(device), s1.to(dt).to(device)]
    base = base.to(device)
    coeffs = [0.5, -1.5]
    out = lcsc_fast.weighted_sum(nan_like(numel, out_dtype, device), sources, coeffs, base=base)
    assert_same_values(out, torch_weighted_sum(out_dtype, sources, coeffs, base))
    for at in (0, 500, numel - 9):
        got = out[at:at + 8].float().cpu().tolist()
        assert got[0] == inf and got[1] == -inf and got[2] == inf and got[5] == -inf
        assert all(math.isnan(got[i]) for i in (3, 4, 6, 7))


@pytest.mark.parametrize("out_kind", param("out", OUT_KINDS))
def test_zero_coefficient_times_inf_is_nan(out_kind):
    """A zero coefficient does not skip its source: 0 * inf and 0 * NaN are NaN, as in torch."""
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0] * 5)
    y = torch.ones(20)
    out = lcsc_fast.weighted_sum(nan_like(20, DTYPES[out_kind]), [y, x], [1.0, 0.0])
    assert_same_values(out, torch_weighted_sum(DTYPES[out_kind], [y, x], [1.0, 0.0]))
    assert torch.isnan(out.view(5, 4)[:, :3]).all() and (out.view(5, 4)[:, 3] == 1).all()


def test_overflow_of_the_float32_accumulator_gives_inf():
    """Finite float32/bf16 sources whose weighted sum exceeds float32's range give +-inf."""
    for dt in (torch.float32, torch.bfloat16):
        x = torch.tensor([3e38, -3e38, 3e38], dtype=dt)
        out = lcsc_fast.weighted_sum(nan_like(3, torch.float32), [x, x], [1.0, 0.5])
        assert out.tolist() == [math.inf, -math.inf, math.inf]


def test_fp16_output_overflow_gives_inf():
    """fp16 sources accumulated in float32 past 65504 give inf in an fp16 output, and finite
    float32 values in a float32 output."""
    x = torch.tensor([60000.0, -60000.0, 30000.0], dtype=torch.float16)
    out16 = lcsc_fast.weighted_sum(nan_like(3, torch.float16), [x, x], [1.0, 1.0])
    assert out16.tolist() == [math.inf, -math.inf, 60000.0]
    out32 = lcsc_fast.weighted_sum(nan_like(3, torch.float32), [x, x], [1.0, 1.0])
    assert out32.tolist() == [120000.0, -120000.0, 60000.0]


def test_accumulation_is_float32_not_the_source_dtype():
    """Intermediate sums are float32: fp16 60000+60000-60000 stays finite, and sixteen bf16
    increments of 2**-9 onto 1.0 are not lost to bf16 rounding."""
    h = torch.tensor([60000.0], dtype=torch.float16)
    out = lcsc_fast.weighted_sum(nan_like(1, torch.float16), [h, h, h], [1.0, 1.0, -1.0])
    assert out.tolist() == [60000.0]
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    tiny = torch.tensor([2.0**-9], dtype=torch.bfloat16)
    out = lcsc_fast.weighted_sum(nan_like(1, torch.bfloat16), [one] + [tiny] * 16, [1.0] * 17)
    assert out.tolist() == [1.03125]


@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
def test_float32_subnormals_are_not_flushed(restore_simd, level):
    """Subnormal float32 inputs and products survive (no flush-to-zero / denormals-are-zero)."""
    use_simd_level(level)
    x = torch.tensor([1e-40, -3e-42, 2.0**-149, 1e-20, 2.0**-126] * 7, dtype=torch.float32)
    out = lcsc_fast.weighted_sum(nan_like(x.shape, torch.float32), [x], [1.0])
    assert_bitwise_equal(out, x)
    out = lcsc_fast.weighted_sum(nan_like(x.shape, torch.float32), [x], [1e-20])
    assert_same_values(out, torch_weighted_sum(torch.float32, [x], [1e-20]))
    assert out[3].item() != 0.0  # 1e-20 * 1e-20 is a float32 subnormal, not zero


# ---------------------------------------------------------------- streaming stores

@pytest.mark.parametrize("out_dtype", param("out", MIXED_CYCLE))
def test_large_outputs_written_with_streaming_stores_match_scalar(restore_simd, out_dtype):
    """Merges with 64 MiB of outputs or more write them with non-temporal stores where aligned;
    the bits equal the scalar path's (which never streams), for a single merge, for a batch, and
    for misaligned output views."""
    g = generator("streaming", out_dtype)
    numel = (1 << 26) // out_dtype.itemsize + 13  # 64 MiB per output, ragged tail
    sources = [randn(numel, torch.bfloat16, g), randn(numel, torch.float16, g)]
    coeffs = [0.75, -0.5]
    base = randn(numel, torch.float32, g)
    storages = [torch.empty(numel + 1, dtype=out_dtype) for _ in range(2)]
    outs = {"aligned": [torch.empty(numel, dtype=out_dtype) for _ in range(2)],
            "misaligned": [s[1:] for s in storages]}
    for level in ("auto", "scalar"):
        lcsc_fast._C.set_simd_level(level)
        results = {}
        for kind, o in outs.items():
            lcsc_fast.weighted_sum(o[0], sources, coeffs, base=base)
            results[f"{kind} single"] = [o[0].clone()]
            lcsc_fast.weighted_sum_batched(o, sources, [coeffs, coeffs[::-1]], base=base)
            results[f"{kind} batch"] = [t.clone() for t in o]
        if level == "auto":
            fast = results
    for kind, tensors in results.items():
        for a, b in zip(fast[kind], tensors):
            assert_bitwise_equal(a, b, f"{kind}: streaming vs scalar")


def at_page_start(numel: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """randn values in a tensor whose data starts at a 4 KiB boundary."""
    per_page = 4096 // dtype.itemsize
    storage = torch.empty(numel + per_page, dtype=dtype)
    skip = (-storage.data_ptr() % 4096) // dtype.itemsize
    return storage[skip:skip + numel].copy_(randn(numel, dtype, g))


@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
@pytest.mark.parametrize("src_kind", param("src", ("fp32", "bf16", "mixed")))
@pytest.mark.parametrize("n", param("n", (5, 32, 33)))
def test_large_batch_of_sources_at_one_page_offset_matches_single_merges(restore_simd, level,
                                                                         src_kind, n):
    """Sources that all start at one offset within a 4 KiB page (separate allocations, a tensor
    at one offset in each checkpoint file) fall in the same sets of a virtually indexed L1. In a
    merge too large for the caches, a batch copies each tile's stretch of up to 32 of them into
    a panel and reads them there (33 are read in place). Either way every output equals the
    single merge of its row bit for bit, over a ragged tail and with a base; an output that is
    itself one of the sources (fp32) gets the sum of the sources' values from before the
    merge."""
    use_simd_level(level)
    g = generator("page offset", level, src_kind, n)
    numel = (1 << 21) + 37  # 8 outputs of 8 MiB: large enough for streaming stores
    sources = [at_page_start(numel, src_dtype(src_kind, i), g) for i in range(n)]
    assert len({s.data_ptr() % 4096 for s in sources}) == 1
    base = randn(numel, torch.float32, g)
    coeffs = [fp32_coeffs(n, g) for _ in range(8)]
    singles = [lcsc_fast.weighted_sum(torch.empty(numel), sources, row, base=base)
               for row in coeffs]
    outs = [torch.empty(numel) for _ in range(8)]
    if src_kind == "fp32":
        outs[3] = sources[n - 2]  # written by the batch that reads it
    lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    for k, (out, single) in enumerate(zip(outs, singles)):
        assert_bitwise_equal(out, single, f"output {k}")


@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
@pytest.mark.parametrize("src_kind", param("src", ("bf16", "mixed")))
def test_large_batch_of_tensors_packed_and_read_in_place_matches_single_merges(restore_simd,
                                                                               level, src_kind):
    """A batch too large for the caches packs a tile's sources when they all start at one page
    offset and reads them in place otherwise, tile by tile. Tensors whose sources do (several
    tiles, a ragged last tile, a tensor of one short tile) alternate with tensors whose sources
    do not; with mixed dtypes, whether a tile's sources share an offset changes from tile to
    tile. Every output equals the single merge of its row bit for bit."""
    use_simd_level(level)
    g = generator("packed and in place", level, src_kind)
    n = 6
    sizes = {"a": (1 << 20) + 37, "b": 300_001, "c": 5000, "d": (1 << 20) + 3, "e": 999}
    staggered = {"b", "e"}  # each source at its own page offset
    ckpts = [{} for _ in range(n)]
    for name, numel in sizes.items():
        for i, ck in enumerate(ckpts):
            dtype = src_dtype(src_kind, i)
            t = at_page_start(numel + 64 * i, dtype, g)
            ck[name] = t[64 * i:] if name in staggered else t[:numel]
    for name, numel in sizes.items():
        offsets = {ck[name].data_ptr() % 4096 for ck in ckpts}
        assert len(offsets) == (n if name in staggered else 1), name
    target = {name: torch.zeros(numel) for name, numel in sizes.items()}
    plan = lcsc_fast.MergePlan(target, ckpts, base=0)
    rows = [fp32_coeffs(n, g) for _ in range(8)]
    outs = [{name: torch.full((numel,), float("nan")) for name, numel in sizes.items()}
            for _ in rows]
    assert 8 * sum(sizes.values()) * 4 >= 64 << 20  # streaming stores, so packing applies
    plan.merge_batched(rows, outs)
    for k, (row, out) in enumerate(zip(rows, outs)):
        plan(row)
        for name in sizes:
            assert_bitwise_equal(out[name], target[name], f"output {k}, tensor {name!r}")


@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
@pytest.mark.parametrize("src_kind", param("src", ("fp32", "bf16", "mixed")))
def test_single_merge_larger_than_the_caches_matches_merges_of_its_slices(restore_simd, level,
                                                                          src_kind):
    """From 64 MiB of sources on, a single merge also prefetches every source a few KiB ahead
    of where it reads. The bits stay those of the same merge done in two halves (32 MiB each,
    no prefetches): 9 sources (a group of 8 and one more), a ragged tail, a base."""
    use_simd_level(level)
    g = generator("large single", level, src_kind)
    n = 9
    dtypes = [src_dtype(src_kind, i) for i in range(n)]
    numel = (64 << 20) // sum(d.itemsize for d in dtypes) + 29
    sources = [randn(numel, d, g) for d in dtypes]
    assert sum(s.nbytes for s in sources) >= 64 << 20
    base = randn(numel, torch.float32, g)
    coeffs = fp32_coeffs(n, g)
    whole = lcsc_fast.weighted_sum(torch.empty(numel), sources, coeffs, base=base)
    halves = torch.empty(numel)
    for part in (slice(0, numel // 2), slice(numel // 2, numel)):
        lcsc_fast.weighted_sum(halves[part], [s[part] for s in sources], coeffs, base=base[part])
    assert_bitwise_equal(whole, halves, "whole vs halves")


def test_prefetching_past_the_end_of_a_source_is_harmless(restore_simd):
    """The prefetches run up to 6 KiB past the end of each source. One source ends where an
    inaccessible page (PROT_NONE) begins: the merge neither faults nor reads it, and its result
    is the reference's (a prefetch is a hint that never faults)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    g = generator("guard page")
    n, numel = 8, (8 << 20) // 4 + 3  # 8 float32 sources of 8 MiB: 64 MiB
    page = mmap.PAGESIZE
    data_nbytes = -(-numel * 4 // page) * page
    region = mmap.mmap(-1, data_nbytes + page)
    view = (ctypes.c_char * (data_nbytes + page)).from_buffer(region)
    last = sources = None  # views of region: dropped before it closes, also when a check fails
    try:
        guard = ctypes.addressof(view) + data_nbytes
        if libc.mprotect(guard, page, 0) != 0:  # PROT_NONE
            pytest.fail(f"mprotect failed: errno {ctypes.get_errno()}")
        last = torch.frombuffer(region, dtype=torch.float32, count=numel,
                                offset=data_nbytes - numel * 4)
        last.copy_(randn(numel, torch.float32, g))
        sources = [randn(numel, torch.float32, g) for _ in range(n - 1)] + [last]
        coeffs = fp32_coeffs(n, g)
        for level in ("scalar",) + SIMD_LEVELS:
            use_simd_level(level)
            out = lcsc_fast.weighted_sum(torch.empty(numel), sources, coeffs)
            ref = reference.weighted_sum(sources, coeffs)
            assert_within_torch_error(out, torch_weighted_sum(torch.float32, sources, coeffs),
                                      ref)
    finally:
        libc.mprotect(ctypes.addressof(view) + data_nbytes, page, 3)  # PROT_READ | PROT_WRITE
        del last, sources, view
        region.close()


@pytest.mark.parametrize("level", param("simd", ("scalar",) + SIMD_LEVELS))
@pytest.mark.parametrize("out_dtype", param("out", (torch.float16, torch.bfloat16)))
def test_large_batch_with_16bit_outputs_matches_single_merges(restore_simd, level, out_dtype):
    """A batch with 16-bit outputs keeps a tile's sums in scratch until its last source group
    and then writes a 64-byte line of each output at a time, with streaming stores once the
    outputs reach 64 MiB. K = 8 (one full group of outputs) over a ragged tail: every output
    equals the single merge of its row bit for bit, also the one that is the base itself."""
    use_simd_level(level)
    g = generator("16-bit batch", level, out_dtype)
    numel = (1 << 22) + 45  # 8 outputs of 8 MiB
    sources = [randn(numel, src_dtype("mixed", i), g) for i in range(3)]
    base = randn(numel, out_dtype, g)
    coeffs = [fp32_coeffs(3, g) for _ in range(8)]
    singles = [lcsc_fast.weighted_sum(torch.empty(numel, dtype=out_dtype), sources, row,
                                      base=base) for row in coeffs]
    outs = [torch.empty(numel, dtype=out_dtype) for _ in range(8)]
    outs[5] = base
    lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    for k, (out, single) in enumerate(zip(outs, singles)):
        assert_bitwise_equal(out, single, f"output {k}")


# ---------------------------------------------------------------- CUDA against the CPU engine

def _views_at_offsets(numel: int, dtypes, offsets, g, device, fill=None) -> tuple[list, list]:
    """For each (dtype, offset): a buffer of numel + 16 elements and the view of numel elements
    that starts `offset` elements into it (the tensors of a checkpoint file, views into one
    buffer, sit at such offsets). Random values, or `fill` everywhere."""
    buffers, views = [], []
    for dtype, offset in zip(dtypes, offsets):
        if fill is None:
            buf = randn(numel + 16, dtype, g, device)
        else:
            buf = torch.full((numel + 16,), fill, dtype=dtype, device=device)
        buffers.append(buf)
        views.append(buf[offset:offset + numel])
    return buffers, views


@pytest.mark.cuda
@pytest.mark.parametrize("k", param("K", (1, 2, 3, 8, 11)))
@pytest.mark.parametrize("out_kind", param("out", ("fp32", "bf16")))
@pytest.mark.parametrize("src_kind", param("src", SRC_KINDS))
def test_cuda_equals_cpu_at_every_alignment(src_kind, out_kind, k):
    """The CUDA kernels read sources at any element offset within 16 bytes with aligned vector
    loads shifted into place, in groups of sources; a tensor's last tile is partial. Sources,
    base and outputs at every offset, N = 13 (groups and a remainder), 3 full tiles and a
    partial one: every output equals the CPU engine's bit for bit, and no element around an
    output view is written."""
    g = generator("cuda alignment", src_kind, out_kind, k)
    numel, n = 3 * 2048 + 37, 13
    out_dtype = DTYPES[out_kind]
    src_dtypes = [src_dtype(src_kind, i) for i in range(n)]
    offsets = [i % (16 // d.itemsize) for i, d in enumerate(src_dtypes)]
    _, sources = _views_at_offsets(numel, src_dtypes, offsets, g, "cuda")
    _, (base,) = _views_at_offsets(numel, [out_dtype], [3], g, "cuda")
    coeffs = [fp32_coeffs(n, g) for _ in range(k)]
    out_offsets = [(j + 1) % 8 for j in range(k)]
    out_buffers, outs = _views_at_offsets(numel, [out_dtype] * k, out_offsets, g, "cuda",
                                          fill=math.nan)

    expected = lcsc_fast.weighted_sum_batched(
        [torch.empty(numel, dtype=out_dtype) for _ in range(k)], [s.cpu() for s in sources],
        coeffs, base=base.cpu())
    lcsc_fast.weighted_sum_batched(outs, sources, coeffs, base=base)
    torch.cuda.synchronize()
    for j, (buf, out) in enumerate(zip(out_buffers, outs)):
        assert_bitwise_equal(out, expected[j], f"outs[{j}]")
        untouched = torch.cat([buf[:out_offsets[j]], buf[out_offsets[j] + numel:]])
        assert torch.isnan(untouched).all(), f"outs[{j}]: an element outside the view was written"
