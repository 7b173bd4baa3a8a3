"""Shared helpers and fixtures for the lcsc_fast test suite.

Test modules import the plain helpers below with ``from conftest import ...`` (pytest puts this
directory on sys.path in its default "prepend" import mode); fixtures are found by pytest itself.

* devices(), device_params(): the devices to run on; CUDA cases carry ``pytest.mark.cuda`` and
  are skipped with reason "needs a CUDA device" when torch sees no GPU.
* param(): pytest.param lists with readable ids such as ``dtype=bf16``, ``numel=4097``, ``N=64``.
* Tensor builders that use their own torch.Generator, never the global RNG.
* torch_weighted_sum(): the plain-torch baseline computation the engine is held against.
* assert_within_torch_error(): the accuracy rule (see its docstring).
* Bitwise / special-value comparisons.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import lcsc_fast
from lcsc_fast import reference

# ---------------------------------------------------------------- dtypes and ids

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {v: k for k, v in DTYPES.items()} | {torch.float64: "fp64"}
SRC_KINDS = ("fp32", "fp16", "bf16", "mixed")  # "mixed": sources cycle fp32, fp16, bf16
OUT_KINDS = ("fp32", "fp16", "bf16")
MIXED_CYCLE = (torch.float32, torch.float16, torch.bfloat16)
CUDA_REASON = "needs a CUDA device"


def src_dtype(kind: str, i: int) -> torch.dtype:
    """dtype of source i for a source kind ("fp32", "fp16", "bf16" or "mixed")."""
    return MIXED_CYCLE[i % 3] if kind == "mixed" else DTYPES[kind]


def _fmt(value) -> str:
    if isinstance(value, torch.dtype):
        return SHORT.get(value, str(value).removeprefix("torch."))
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "present" if value else "none"
    return str(value)


def param(name: str, values) -> list:
    """One pytest.param per value, with id ``name=value`` (dtypes shortened to fp32/fp16/bf16,
    None and False shown as "none", True as "present")."""
    return [pytest.param(v, id=f"{name}={_fmt(v)}") for v in values]


def devices() -> list[str]:
    """The devices this host can run: "cpu", plus "cuda" when torch sees a GPU."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params() -> list:
    """Parametrisation over devices: ``device=cpu`` always runs; ``device=cuda`` carries
    pytest.mark.cuda and is skipped (reason "needs a CUDA device") when no GPU is visible, so a
    CPU-only run shows that the CUDA cases exist but did not run."""
    return [pytest.param("cpu", id="device=cpu"),
            pytest.param("cuda", id="device=cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    """Skip every test marked cuda when torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def restore_threads():
    """Restores torch.get_num_threads() (the engine's thread count) after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_simd():
    """Restores the engine's SIMD dispatch to "auto" after the test."""
    yield
    lcsc_fast._C.set_simd_level("auto")


def use_simd_level(level: str) -> None:
    """Switch the engine to SIMD level `level`; skip the test on a CPU that lacks it."""
    try:
        lcsc_fast._C.set_simd_level(level)
    except ValueError:
        pytest.skip(f"this CPU does not support {level}")
    assert lcsc_fast._C.simd_level() == level


# ---------------------------------------------------------------- tensor builders

def seed_of(*parts) -> int:
    """A stable seed derived from a test's parameters (crc32, not the salted hash())."""
    return zlib.crc32(repr(parts).encode())


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


def randn(shape, dtype, g: torch.Generator, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Normal(0, scale) values drawn on the CPU from g, then cast and moved."""
    if isinstance(shape, int):
        shape = (shape,)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def fp32_coeffs(n: int, g: torch.Generator, scale: float | None = None) -> list[float]:
    """n coefficients ~ Normal(0, 1/sqrt(n)) that are exactly representable in float32, so the
    engine's float32 coefficients equal the reference's float64 ones."""
    scale = 1.0 / math.sqrt(max(n, 1)) if scale is None else scale
    return (torch.randn(n, generator=g) * scale).tolist()


def pooled_sources(numel: int, n: int, kind: str, g: torch.Generator, device="cpu",
                   pool_size: int = 8):
    """N sources of `numel` elements built from at most `pool_size` distinct random tensors.

    Pool entry p is allocated with p spare leading elements and used as the view buf[p:], so the
    entries start at different alignments (exercising unaligned SIMD loads). With N <= pool_size
    every source is a different tensor; beyond that sources are the pool entries again, chosen at
    random, each with its own coefficient, so numel=10**6 x N=1024 needs only 8 x 10**6 elements.
    Returns (sources, pool, index) with sources[i] is pool[index[i]].
    """
    pool = []
    for p in range(min(n, pool_size)):
        buf = randn(numel + p, src_dtype(kind, p), g, device)
        pool.append(buf[p:])
    if n <= len(pool):
        index = list(range(n))
    else:
        index = torch.randint(len(pool), (n,), generator=g).tolist()
    return [pool[j] for j in index], pool, index


def reference_pooled(pool, index, coeffs, base=None) -> torch.Tensor:
    """lcsc_fast.reference.weighted_sum for pooled sources, on the collapsed problem.

    sum_i c_i * pool[index[i]] == sum_p (sum_{i: index[i] = p} c_i) * pool[p] exactly; the
    collapsed coefficients are math.fsum()s (correctly rounded in float64), so this is the same
    float64 reference at a cost of len(pool) instead of N passes over the data.
    """
    collapsed = [math.fsum(c for c, j in zip(coeffs, index) if j == p) for p in range(len(pool))]
    return reference.weighted_sum(pool, collapsed, base)


def torch_weighted_sum(out_dtype: torch.dtype, sources, coeffs, base=None) -> torch.Tensor:
    """Plain torch doing the engine's computation in the same dtypes and order:
    acc = zeros(fp32); acc.add_(src, alpha=c) for each source in order; acc += base; cast.

    Runs with one intra-op thread: the result of these elementwise ops does not depend on the
    thread count, and N short parallel loops stall badly when the 2-core machine is shared
    (1024 x 10**6 elements: 0.5 s on one thread, 15 s on two under load)."""
    acc = torch.zeros(sources[0].shape, dtype=torch.float32, device=sources[0].device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for c, s in zip(coeffs, sources, strict=True):
            acc.add_(s, alpha=c)
        if base is not None:
            acc += base
    finally:
        torch.set_num_threads(threads)
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    out.copy_(acc)
    return out


def nan_like(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer pre-filled with NaN, so any element the engine fails to write shows."""
    return torch.full(shape if not isinstance(shape, int) else (shape,), float("nan"),
                      dtype=dtype, device=device)


# ---------------------------------------------------------------- comparisons

def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in float64 on the CPU; NaN where ref is finite counts as an infinite error;
    0 for empty tensors."""
    if x.numel() == 0:
        return 0.0
    diff = (x.detach().cpu().double() - ref.cpu().double()).abs()
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def assert_within_torch_error(out: torch.Tensor, torch_out: torch.Tensor,
                              ref: torch.Tensor) -> None:
    """The accuracy rule: the engine is at least half as accurate as plain torch.

    out is the engine's result, torch_out plain torch's (torch_weighted_sum: float32
    accumulation of the same sources, in the same dtypes and order), ref the float64 reference.
    Requires

        max|out - ref| <= 2 * max|torch_out - ref| + eps(out.dtype) * max(max|ref|, tiny)

    The factor 2 leaves room for a different but equally valid rounding sequence (fused
    multiply-add or not). The floor covers cases where plain torch is exact by luck (N=1,
    fp32 in and out), where any additional correctly rounded step may cost up to one eps of the
    largest output; tiny (the smallest normal number of out's dtype) keeps it positive when
    the reference is all zeros.
    """
    assert out.dtype == torch_out.dtype and out.shape == torch_out.shape == ref.shape
    finfo = torch.finfo(out.dtype)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = max_abs_err(out, ref)
    torch_err = max_abs_err(torch_out, ref)
    bound = 2.0 * torch_err + finfo.eps * max(scale, finfo.tiny)
    assert err <= bound, (f"engine max-abs error {err:.3e} exceeds {bound:.3e} (plain torch's "
                          f"error {torch_err:.3e}, max|ref| {scale:.3e}, out {SHORT[out.dtype]})")


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of t, as a same-size integer tensor on the CPU."""
    t = t.detach().contiguous()
    return t.view(_INT_VIEW[t.element_size()]).cpu()


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """a and b have the same dtype, shape and bit patterns (NaN payloads and zero signs
    included)."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    ba, bb = bits(a).reshape(-1), bits(b).reshape(-1)
    if not torch.equal(ba, bb):
        i = int((ba != bb).nonzero()[0])
        raise AssertionError(
            f"{what}: {int((ba != bb).sum())} of {ba.numel()} elements differ bitwise; first at "
            f"flat index {i}: {a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}")


def assert_same_values(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """a and b are equal as IEEE values: NaN exactly where the other is NaN (payload free),
    every other element == (so +0 == -0, inf == inf with matching sign)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn), f"{what}: NaN at {an.nonzero().tolist()} vs {bn.nonzero().tolist()}"
    bad = (a != b) & ~an
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ; first at {i}: "
                             f"{a[i].item()!r} vs {b[i].item()!r}")


def snapshot(tensors) -> list[torch.Tensor]:
    """Bit-pattern copies of a tensor, a list of tensors, a dict, or an nn.Module's state."""
    return [bits(t).clone() for t in _tensor_list(tensors)]


def assert_unchanged(tensors, snap: list[torch.Tensor]) -> None:
    """Every tensor still holds exactly the bits recorded by snapshot()."""
    current = _tensor_list(tensors)
    assert len(current) == len(snap)
    for i, (t, before) in enumerate(zip(current, snap)):
        assert torch.equal(bits(t), before), f"tensor {i} was modified by a failed call"


def _tensor_list(tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, torch.nn.Module):
        return list(tensors.state_dict(keep_vars=True).values())
    if isinstance(tensors, dict):
        return list(tensors.values())
    return list(tensors)
