"""The package surface: exports, build_info(), SIMD level switching, and CUDA availability."""

from __future__ import annotations

import re

import pytest
import torch

import lcsc_fast
from conftest import devices
from lcsc_fast import reference

LEVELS = ("scalar", "avx2", "avx512")


def test_public_api():
    """lcsc_fast exports exactly the documented names, and they are the engine's functions."""
    assert set(lcsc_fast.__all__) == {"__version__", "CheckpointError", "LoraPlan", "MergePlan",
                                      "Recorder", "SearchResult", "Trajectory", "build_info",
                                      "coefficients", "lora_weighted_sum", "merge_into",
                                      "metrics", "pack",
                                      "search",
                                      "weighted_sum", "weighted_sum_batched"}
    for name in lcsc_fast.__all__:
        assert hasattr(lcsc_fast, name), name
    for name in ("build_info", "merge_into", "weighted_sum", "weighted_sum_batched"):
        assert callable(getattr(lcsc_fast, name))
        assert getattr(lcsc_fast, name) is getattr(lcsc_fast.engine, name)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-].*)?", lcsc_fast.__version__)
    assert set(reference.__all__) == {"weighted_sum", "weighted_sum_batched", "merge",
                                      "lora_weighted_sum"}


def test_build_info_keys_and_types():
    """build_info() reports version, CUDA (compiled / usable), OpenMP and the SIMD level."""
    info = lcsc_fast.build_info()
    assert isinstance(info, dict)
    assert {"version", "cuda_compiled", "cuda_available", "openmp", "simd"} <= info.keys()
    assert info["version"] == lcsc_fast.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_available"], bool)
    assert isinstance(info["openmp"], bool)
    assert info["simd"] in LEVELS
    assert not info["cuda_available"] or info["cuda_compiled"]
    assert lcsc_fast.build_info() == info  # a fresh dict with the same content each call
    assert lcsc_fast.build_info() is not info


def test_cuda_availability_and_cpu_only_builds():
    """Without a GPU, build_info() says CUDA is not available. On a GPU host with a CPU-only
    build, CUDA tensors raise a RuntimeError that says how to build with CUDA; with a CUDA build
    they work."""
    info = lcsc_fast.build_info()
    if "cuda" not in devices():
        assert info["cuda_available"] is False
        return
    out = torch.zeros(10, device="cuda")
    src = torch.ones(10, device="cuda")
    if not info["cuda_compiled"]:
        assert info["cuda_available"] is False
        with pytest.raises(RuntimeError, match=r"without CUDA.*nvcc|nvcc.*without CUDA"):
            lcsc_fast.weighted_sum(out, [src], [1.0])
        assert bool((out == 0).all())
    else:
        assert info["cuda_available"] is True
        lcsc_fast.weighted_sum(out, [src, src], [2.0, 0.5])
        assert bool((out == 2.5).all())


def test_simd_level_switching(restore_simd):
    """set_simd_level accepts scalar/avx2/avx512/auto (a level this CPU lacks raises
    ValueError and changes nothing), simd_level() reports the level in use, and an unknown name
    raises ValueError."""
    C = lcsc_fast._C
    C.set_simd_level("scalar")
    assert C.simd_level() == "scalar"
    for level in ("avx2", "avx512"):
        try:
            C.set_simd_level(level)
        except ValueError as e:
            assert level in str(e)
            assert C.simd_level() == "scalar"
        else:
            assert C.simd_level() == level
        C.set_simd_level("scalar")
    with pytest.raises(ValueError, match="sse9"):
        C.set_simd_level("sse9")
    assert C.simd_level() == "scalar"
    C.set_simd_level("auto")
    assert C.simd_level() in LEVELS
    assert lcsc_fast.build_info()["simd"] == C.simd_level()
