"""lcsc_fast.Trajectory, lcsc_fast.pack and the staged merge path: the storage layer.

* Raw checkpoints (a list of .safetensors files, a Recorder directory, sharded checkpoints):
  merges from the mapped files are bitwise equal to lcsc_fast.merge_into with the same
  checkpoints loaded as state dicts, for every base form, target kind and output dtype, in one
  chunk or many, in place or through the staging buffers, from the files or resident copies.
* Packed stores: merges are within an a-priori, per-element bound of the float64 reference
  merge (packed_bound: the rounding of each delta to the delta dtype plus float32 accumulation);
  the store's byte layout is checked against the documented block interleaving.
* Bad input: every damaged file, directory, manifest or target raises a clear exception (a
  CheckpointError naming the file and the tensor for files) and leaves the target's bits alone;
  a file truncated under a merge raises instead of killing the process.

Checkpoints are a small "training run": theta_0 ~ N(0, 1), theta_i = theta_{i-1} + N(0, 0.01^2),
with fp32, fp16 and bf16 tensors, a scalar, an empty tensor, an integer step counter and a bool
mask, so every merge path sees every dtype and shape class.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lcsc_fast
import lcsc_fast.trajectory as trajectory_module
from conftest import (assert_bitwise_equal, assert_unchanged, device_params, generator, param,
                      randn, snapshot)
from lcsc_fast import CheckpointError, Trajectory, merge_into, pack, reference
from lcsc_fast.safetensors_io import read_header
from lcsc_fast.streaming import merge_staged

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
N = 5
COEFFS = [0.3, -0.15, 0.45, 0.6, 0.05]  # not float32-exact, sum != 1, one negative
BASES = (None, 0, 3, -1, "dict")
SPEC = {  # name -> (shape, dtype); block_elems=7 splits every tensor but the scalar and "empty"
    "blocks.0.weight": ((5, 9), F32),
    "blocks.0.bias": ((100,), F32),
    "head.weight": ((13,), F16),
    "embed": ((3, 4), BF16),
    "scale": ((), F32),
    "empty": ((0, 3), F32),
    "step": ((), torch.int64),
    "mask": ((2,), torch.bool),
}
FLOAT_NAMES = sorted(k for k, (_, d) in SPEC.items() if d.is_floating_point)


# ---------------------------------------------------------------- building checkpoints

def make_run(n: int, tag: str, spec=SPEC, drift: float = 0.01) -> list[dict]:
    """n checkpoints of a random-walk "training run" over spec (a fresh generator per tag)."""
    g = generator("trajectory", tag)
    theta = {k: randn(s, F32, g) for k, (s, d) in spec.items() if d.is_floating_point}
    run = []
    for i in range(n):
        if i:
            theta = {k: v + randn(v.shape, F32, g, scale=drift) for k, v in theta.items()}
        ck = {}
        for k, (s, d) in spec.items():
            if d.is_floating_point:
                ck[k] = theta[k].to(d)
            elif d == torch.bool:
                ck[k] = torch.tensor([i % 2 == 0, i % 3 == 0][: math.prod(s)]).reshape(s)
            else:
                ck[k] = torch.full(s, 10 * (i + 1), dtype=d)
        run.append(ck)
    return run


def base_dict(tag: str = "base", spec=SPEC) -> dict:
    """A state dict to merge around (base=dict): fp32 for every float tensor (also the 16-bit
    ones: the caller's base may have its own dtype), the spec's dtype for the others."""
    g = generator("trajectory-base", tag)
    return {k: randn(s, F32, g) if d.is_floating_point else torch.zeros(s, dtype=d)
            for k, (s, d) in spec.items()}


def write_run(folder, run: list[dict], prefix: str = "ckpt") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, ck in enumerate(run):
        path = os.path.join(folder, f"{prefix}-{i}.safetensors")
        save_file(ck, path)
        paths.append(path)
    return paths


def write_recorder_dir(folder, run: list[dict], steps: list[int], every: int = 100) -> str:
    """A directory in the Recorder's format (manifest.json + one file per snapshot)."""
    os.makedirs(folder, exist_ok=True)
    snapshots = []
    for step, ck in zip(steps, run):
        name = f"step-{step:08d}.safetensors"
        save_file(ck, os.path.join(folder, name))
        snapshots.append({"step": step, "file": name,
                          "nbytes": os.path.getsize(os.path.join(folder, name))})
    write_json(os.path.join(folder, "manifest.json"),
               {"format": "lcsc_fast.trajectory", "version": 1, "every": every,
                "snapshots": snapshots})
    return str(folder)


def write_sharded(folder, ck: dict, shards: dict[str, list[str]]) -> str:
    """One HF-style sharded checkpoint: shard file -> tensor names; returns the index path."""
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: ck[k] for k in names}, os.path.join(folder, shard))
        weight_map.update({k: shard for k in names})
    index = os.path.join(folder, "model.safetensors.index.json")
    write_json(index, {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return index


def write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def target_like(ck: dict, dtype: torch.dtype | None = None, device="cpu") -> dict:
    """A target dict shaped like ck: floats (cast to dtype) pre-filled with NaN, so an element
    the merge fails to write shows; other tensors pre-filled with a value no checkpoint has."""
    out = {}
    for k, v in ck.items():
        if v.is_floating_point():
            out[k] = torch.full(v.shape, float("nan"), dtype=dtype or v.dtype, device=device)
        else:
            out[k] = torch.full(v.shape, 1 if v.dtype == torch.bool else -7, dtype=v.dtype,
                                device=device)
    return out


def resolve_base(base, bdict):
    return bdict if base == "dict" else base


def assert_states_bitwise(got: dict, expected: dict, what: str = "") -> None:
    assert set(got) == set(expected), what
    for k in expected:
        assert_bitwise_equal(got[k].cpu(), expected[k].cpu(), f"{what}[{k!r}]")


def state_merge(run, coeffs, base, dtype=None, device="cpu") -> dict:
    """lcsc_fast.merge_into with the checkpoints as state dicts: what file merges must equal."""
    run = [{k: v.to(device) for k, v in ck.items()} for ck in run]
    if isinstance(base, dict):
        base = {k: v.to(device) for k, v in base.items()}
    target = target_like(run[-1], dtype, device)
    merge_into(target, run, coeffs, base=base)
    return target


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def run():
    return make_run(N, "main")


@pytest.fixture(scope="module")
def bdict():
    return base_dict()


@pytest.fixture(scope="module")
def paths(run, tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("raw"), run)


@pytest.fixture(scope="module")
def stores(paths, tmp_path_factory):
    """stores(delta_dtype, base, block_elems) -> a packed store of the main run (cached)."""
    cache = {}
    root = tmp_path_factory.mktemp("packed")

    def get(dtype="bf16", base=0, block_elems=7):
        key = (dtype, base, block_elems)
        if key not in cache:
            cache[key] = pack(paths, root / f"{dtype}-{base}-{block_elems}", dtype=dtype,
                              base=base, block_elems=block_elems)
        return cache[key]

    return get


def copy_files(paths, folder) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    return [shutil.copy(p, os.path.join(folder, os.path.basename(p))) for p in paths]


# ---------------------------------------------------------------- the packed error bound

DELTA_DTYPES = {"bf16": BF16, "fp16": F16, "fp32": F32}
U32 = 2.0**-24  # float32 unit roundoff


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative error of rounding to nearest in dtype (eps / 2): 2**-24 fp32, 2**-11 fp16,
    2**-8 bf16 (bf16 keeps 8 significant bits)."""
    return torch.finfo(dtype).eps / 2


def half_subnormal_step(dtype: torch.dtype) -> float:
    """The absolute rounding error below dtype's smallest normal number."""
    finfo = torch.finfo(dtype)
    return finfo.tiny * finfo.eps / 2


def packed_bound(run, p: int, coeffs, base, name: str, delta_dtype: torch.dtype,
                 ref: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-element bound on |merge from a packed store - float64 reference merge|.

    The store keeps theta_p exactly and delta_i = theta_i - theta_p (i != p) as
    round_d(fl32(theta_i - theta_p)), so |stored - delta_i| <= |delta_i| (u_d + 2**-24)(1 + u_d)
    + s_d (u_d the delta dtype's unit roundoff, s_d its half subnormal step). In terms of the
    deltas the merge is
        base None:    sum_i w_i delta_i + (sum w) theta_p
        base index b: sum_i c_i delta_i + theta_p,  c_i = w_i + [i = b] (1 - sum w)
        base dict X:  sum_i w_i delta_i + (sum w) theta_p + (1 - sum w) X
    so the deltas contribute sum_{i != p} |c_i| |stored_i - delta_i|. The engine then sums the
    M <= N + 1 columns in float32 with float32-rounded coefficients: (M + 4) 2**-24 * A, A the
    sum of |coefficient x column| (each column's magnitude taken with slack for its rounding).
    The result is rounded once to the output dtype: u_out (|ref| + error) + s_out.
    """
    n = len(run)
    theta = [ck[name].double() for ck in run]
    total = math.fsum(coeffs)
    c = list(coeffs)
    coef_p, coef_x, x = total, 0.0, None
    if isinstance(base, int):
        c[base % n] += 1.0 - total
        coef_p = 1.0
    elif base is not None:
        coef_x, x = 1.0 - total, base[name].double()
    u_d, s_d = unit_roundoff(delta_dtype), half_subnormal_step(delta_dtype)
    rounding = torch.zeros_like(ref)
    magnitude = abs(coef_p) * theta[p].abs()
    if x is not None:
        magnitude = magnitude + abs(coef_x) * x.abs()
    for i in range(n):
        if i == p:
            continue
        delta = (theta[i] - theta[p]).abs()
        rounding = rounding + abs(c[i]) * (delta * (u_d + U32) * (1 + u_d) + s_d)
        magnitude = magnitude + abs(c[i]) * (delta * (1 + 2 * u_d + 2 * U32) + s_d)
    columns = n + (1 if x is not None else 0)
    error = rounding + (columns + 4) * U32 * 1.01 * magnitude
    return error + unit_roundoff(out_dtype) * (ref.abs() + error) + half_subnormal_step(out_dtype)


def raw_bound(run, coeffs, base, name, ref, out_dtype) -> torch.Tensor:
    """The same for merges from the checkpoints themselves: float32 accumulation only."""
    theta = [ck[name].double() for ck in run]
    total = math.fsum(coeffs)
    magnitude = sum(abs(w) * t.abs() for w, t in zip(coeffs, theta))
    if base is not None:
        b = theta[base] if isinstance(base, int) else base[name].double()
        magnitude = magnitude + (1 + abs(total)) * b.abs()
    error = (len(run) + 5) * U32 * 1.01 * magnitude
    return error + unit_roundoff(out_dtype) * (ref.abs() + error) + half_subnormal_step(out_dtype)


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> float:
    """|got - ref| <= bound element by element; returns the largest error."""
    err = (got.detach().cpu().double() - ref).abs()
    if err.numel() == 0:
        return 0.0
    bad = ~(err <= bound)  # NaN counts as a failure
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements beyond the bound; first at flat "
                             f"index {i}: error {float(err.reshape(-1)[i]):.3e} > bound "
                             f"{float(bound.reshape(-1)[i]):.3e}")
    return float(err.max())


# ================================================================ opening and inspection

def test_open_list_of_files(run, paths):
    """names, shapes, dtypes, steps, len, kind, traj[i] (a copy of checkpoint i, bitwise)."""
    with Trajectory.open([os.fspath(p) for p in paths]) as traj:
        assert traj.kind == "checkpoints"
        assert len(traj) == N
        assert traj.steps == list(range(N))
        assert traj.names == sorted(SPEC)
        assert traj.shapes == {k: s for k, (s, _) in SPEC.items()}
        assert traj.dtypes == {k: d for k, (_, d) in SPEC.items()}
        for i in (0, 2, N - 1, -1, -N):
            assert_states_bitwise(traj[i], run[i], f"traj[{i}]")
        assert [ck["step"].item() for ck in traj[1:4]] == [20, 30, 40]
        for i in (N, -N - 1):
            with pytest.raises(IndexError):
                traj[i]
        copy = traj[0]
        copy["blocks.0.weight"].fill_(0.0)  # a copy: the file and later reads are unaffected
        assert_bitwise_equal(traj[0]["blocks.0.weight"], run[0]["blocks.0.weight"])
        assert "5 checkpoints" in repr(traj)


def test_open_accepts_path_objects_and_a_single_file(run, paths):
    from pathlib import Path

    with Trajectory.open([Path(p) for p in paths]) as traj:
        assert len(traj) == N
    with Trajectory.open(paths[2]) as traj:
        assert len(traj) == 1
        assert_states_bitwise(traj[0], run[2])
        assert_states_bitwise(traj.merge([1.0]), run[2], "single-file merge with weight 1")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
    assert lcsc_fast.CheckpointError is CheckpointError


def test_open_refuses_what_is_not_a_trajectory(tmp_path):
    with pytest.raises(TypeError):
        Trajectory.open([])
    with pytest.raises(TypeError):
        Trajectory.open(42)
    with pytest.raises(CheckpointError, match="no such file"):
        Trajectory.open([tmp_path / "nowhere.safetensors"])


def test_recorder_directory(run, tmp_path):
    """A directory in the Recorder's format: steps from the manifest, merges as for the files."""
    steps = [100, 200, 300, 400, 500]
    folder = write_recorder_dir(tmp_path / "rec", run, steps)
    bd = base_dict()
    with Trajectory.open(folder) as traj:
        assert traj.kind == "checkpoints"
        assert traj.steps == steps
        assert len(traj) == N
        assert_states_bitwise(traj[3], run[3])
        for base in (None, 1, bd):
            assert_states_bitwise(traj.merge(COEFFS, base=base),
                                  state_merge(run, COEFFS, base), f"base={type(base).__name__}")


def test_sharded_checkpoints(run, tmp_path):
    """Checkpoints in two shards each, given as index files or as directories holding one; one
    shard file shared between two checkpoints (a frozen part) is fine too."""
    shards = {"model-00001-of-00002.safetensors": ["blocks.0.weight", "embed", "step", "mask"],
              "model-00002-of-00002.safetensors": ["blocks.0.bias", "head.weight", "scale",
                                                   "empty"]}
    sources = []
    for i, ck in enumerate(run):
        index = write_sharded(tmp_path / f"ck{i}", ck, shards)
        sources.append(index if i % 2 else os.path.dirname(index))
    with Trajectory.open(sources) as traj:
        assert len(traj) == N and traj.names == sorted(SPEC)
        assert_states_bitwise(traj[4], run[4])
        for base in (None, 2, base_dict()):
            assert_states_bitwise(traj.merge(COEFFS, base=base), state_merge(run, COEFFS, base))

    # A directory holding a single model.safetensors is a checkpoint too.
    os.makedirs(tmp_path / "single")
    save_file(run[0], tmp_path / "single" / "model.safetensors")
    with Trajectory.open([tmp_path / "single", sources[1]]) as traj:
        assert_states_bitwise(traj[0], run[0])
        assert_states_bitwise(traj[1], run[1])

    # Two checkpoints sharing their first shard.
    shared = tmp_path / "shared"
    os.makedirs(shared)
    save_file({k: run[0][k] for k in shards["model-00001-of-00002.safetensors"]},
              shared / "frozen.safetensors")
    indexes = []
    for i in (0, 1):
        save_file({k: run[i][k] for k in shards["model-00002-of-00002.safetensors"]},
                  shared / f"part-{i}.safetensors")
        weight_map = {k: "frozen.safetensors" for k in shards["model-00001-of-00002.safetensors"]}
        weight_map.update({k: f"part-{i}.safetensors"
                           for k in shards["model-00002-of-00002.safetensors"]})
        indexes.append(shared / f"index-{i}.json")
        write_json(indexes[-1], {"weight_map": weight_map})
    expected = [dict(run[0]), {**run[0], **{k: run[1][k] for k in
                                             shards["model-00002-of-00002.safetensors"]}}]
    with Trajectory.open(indexes) as traj:
        assert_states_bitwise(traj[1], expected[1])
        assert_states_bitwise(traj.merge([0.25, 0.75]), state_merge(expected, [0.25, 0.75], None))


# ================================================================ raw merges: bitwise

@pytest.mark.parametrize("out", param("out", [None, F32, F16, BF16]))
@pytest.mark.parametrize("base", param("base", BASES))
def test_merge_bitwise_equals_state_dict_merge(run, paths, bdict, base, out):
    """traj.merge and merge_into(target, traj) equal merge_into(target, state dicts) bitwise;
    merge_into writes in place and returns the target; integer tensors are the last
    checkpoint's."""
    b = resolve_base(base, bdict)
    expected = state_merge(run, COEFFS, b, out)
    with Trajectory.open(paths) as traj:
        merged = traj.merge(COEFFS, base=b, dtype=out)
        assert_states_bitwise(merged, expected, "traj.merge")
        target = target_like(run[-1], out)
        ptrs = {k: v.data_ptr() for k, v in target.items()}
        assert merge_into(target, traj, COEFFS, base=b) is target
        assert {k: v.data_ptr() for k, v in target.items()} == ptrs
        assert_states_bitwise(target, expected, "merge_into(target, traj)")
    assert merged["step"].item() == 10 * N
    # Sanity of the expectation itself: it is the reference merge up to float32 rounding.
    ref = reference.merge(run, COEFFS, b)
    for k in FLOAT_NAMES:
        assert_within(merged[k], ref[k], raw_bound(run, COEFFS, b, k, ref[k], merged[k].dtype), k)


def test_merge_accepts_coefficient_containers(run, paths):
    expected = state_merge(run, COEFFS, None)
    with Trajectory.open(paths) as traj:
        for coeffs in (tuple(COEFFS), torch.tensor(COEFFS, dtype=torch.float64),
                       np.array(COEFFS)):
            assert_states_bitwise(traj.merge(coeffs), expected, type(coeffs).__name__)


def test_repeated_merges_reuse_the_trajectory(run, paths):
    """A search merges many coefficient vectors from one open trajectory into one target."""
    g = generator("repeated")
    target = target_like(run[-1])
    with Trajectory.open(paths) as traj:
        for k in range(4):
            coeffs = (torch.randn(N, generator=g) / N).tolist()
            base = (None, 2, base_dict("rep"), -2)[k]
            merge_into(target, traj, coeffs, base=base)
            assert_states_bitwise(target, state_merge(run, coeffs, base), f"merge {k}")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def trained_states(n: int) -> list[dict]:
    g = generator("net")
    net = Net()
    with torch.no_grad():
        for p_ in net.parameters():
            p_.copy_(torch.randn(p_.shape, generator=g) * 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    states = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return states


@pytest.mark.parametrize("base", param("base", (None, 1, "dict")))
def test_merge_into_module(tmp_path, base):
    """An nn.Module target: parameters and BatchNorm buffers written in place, bitwise as with
    state dicts; num_batches_tracked from the last checkpoint."""
    states = trained_states(3)
    files = write_run(tmp_path, states)
    b = {k: v * 0.5 if v.is_floating_point() else v for k, v in states[0].items()} \
        if base == "dict" else base
    coeffs = [0.2, 0.5, 0.4]
    expected_net = Net()
    merge_into(expected_net, states, coeffs, base=b)
    net = Net()
    ptrs = {k: v.data_ptr() for k, v in net.state_dict(keep_vars=True).items()}
    with Trajectory.open(files) as traj:
        assert merge_into(net, traj, coeffs, base=b) is net
    assert {k: v.data_ptr() for k, v in net.state_dict(keep_vars=True).items()} == ptrs
    assert all(isinstance(p_, nn.Parameter) for p_ in net.parameters())
    assert_states_bitwise(net.state_dict(), expected_net.state_dict())
    assert int(net.bn.num_batches_tracked) == 3


def test_merges_from_files_are_seen_by_autograd(tmp_path):
    """merge_into and merge_batched from files bump the written tensors' autograd versions (as
    the in-memory ops do): backward through a graph that saved one refuses."""
    states = trained_states(2)
    with Trajectory.open(write_run(tmp_path, states)) as traj:
        net = Net()
        out = {k: v.clone() for k, v in states[0].items() if v.is_floating_point()}
        for t, merge in ((net.fc.weight, lambda: merge_into(net, traj, [0.5, 0.5])),
                         (out["fc.weight"], lambda: traj.merge_batched([[0.5, 0.5]], [out]))):
            y = (t * torch.ones(t.shape, requires_grad=True)).sum()  # saves t
            version = t._version
            merge()
            assert t._version > version
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.backward()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight


def test_merge_into_module_with_tied_weights(tmp_path):
    g = generator("tied")
    states = []
    for _ in range(2):
        net = Tied()
        with torch.no_grad():
            for p_ in net.parameters():
                p_.copy_(torch.randn(p_.shape, generator=g))
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    files = write_run(tmp_path, states)  # save_file needs unshared tensors: the clones are
    expected = Tied()
    merge_into(expected, states, [0.25, 0.75])
    net = Tied()
    with Trajectory.open(files) as traj:
        merge_into(net, traj, [0.25, 0.75])
    assert_states_bitwise(net.state_dict(), expected.state_dict())


def test_mixed_dtype_checkpoints(tmp_path):
    """A tensor saved in fp32 by early checkpoints and bf16 by later ones (mixed sources, as
    merge_into with state dicts allows): dtypes are the last checkpoint's; merges bitwise."""
    run = make_run(3, "mixed")
    run[0]["blocks.0.weight"] = run[0]["blocks.0.weight"].to(BF16)
    run[1]["embed"] = run[1]["embed"].to(F32)
    run[2]["head.weight"] = run[2]["head.weight"].to(F32)
    files = write_run(tmp_path, run)
    with Trajectory.open(files) as traj:
        assert traj.dtypes["blocks.0.weight"] == F32 and traj.dtypes["head.weight"] == F32
        for base in (None, 0, base_dict()):
            assert_states_bitwise(traj.merge([0.5, 0.25, 0.5], base=base),
                                  state_merge(run, [0.5, 0.25, 0.5], base))


@pytest.mark.parametrize("chunk", param("chunk_nbytes", [1, 100, 700]))
@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_chunked_in_place_merge(run, paths, stores, bdict, monkeypatch, kind, chunk):
    """A trajectory too large for the page cache (RAM made to look tiny) merges in chunks; with
    CHUNK_NBYTES tiny, many (one per segment at 1 byte), with readahead advice between them:
    the result is bitwise the one-pass merge."""
    source = paths if kind == "raw" else stores("bf16", 2, 7)
    with Trajectory.open(source) as traj:
        expected = [traj.merge(COEFFS, base=resolve_base(b, bdict)) for b in BASES]
        monkeypatch.setattr(trajectory_module, "_physical_memory_nbytes", lambda: 0)
        monkeypatch.setattr(trajectory_module, "CHUNK_NBYTES", chunk)
        for b, exp in zip(BASES, expected):
            assert_states_bitwise(traj.merge(COEFFS, base=resolve_base(b, bdict)), exp, f"base={b}")


@pytest.mark.parametrize("segment", param("segment_elems", [1, 5, 64]))
def test_raw_tensors_split_into_short_segments_merge_the_same(run, paths, bdict, monkeypatch,
                                                               segment):
    """Raw checkpoints split each tensor into segments of at most SEGMENT_ELEMS elements (so
    chunks stay small however large a tensor is); any split merges to the same bits as the
    state-dict merge."""
    monkeypatch.setattr(trajectory_module, "SEGMENT_ELEMS", segment)
    with Trajectory.open(paths) as traj:
        assert (traj._segments.numel <= segment).all()
        for b in BASES:
            base = resolve_base(b, bdict)
            assert_states_bitwise(traj.merge(COEFFS, base=base), state_merge(run, COEFFS, base),
                                  f"base={b}")


@pytest.mark.parametrize("limit, runs", [(1, [64, 36]), (128 * N * 4, [100])])
def test_raw_segments_bounded_in_bytes_over_all_checkpoints(run, paths, bdict, monkeypatch,
                                                            limit, runs):
    """A raw segment holds at most about SEGMENT_NBYTES bytes over all checkpoints (what a CUDA
    merge from files stages at once), in runs of whole multiples of 64 elements (at least 64),
    so a segment starts as aligned as its tensor; the split merges to the same bits."""
    monkeypatch.setattr(trajectory_module, "SEGMENT_NBYTES", limit)
    with Trajectory.open(paths) as traj:
        seg = traj._segments
        bias = seg.tensor == traj._float_names.index("blocks.0.bias")
        assert seg.numel[bias].tolist() == runs
        assert ((seg.nbytes <= limit) | (seg.numel <= 64)).all()
        assert (seg.start % 64 == 0).all()
        for b in BASES:
            base = resolve_base(b, bdict)
            assert_states_bitwise(traj.merge(COEFFS, base=base), state_merge(run, COEFFS, base),
                                  f"base={b}")


@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_merge_larger_than_memory_releases_pages_and_equals(run, paths, stores, bdict,
                                                            monkeypatch, kind):
    """A trajectory larger than half of RAM has each chunk's pages released once merged, so the
    process's memory stays bounded (here: RAM made to look tiny). The result is unchanged, and
    a second merge re-reads the released pages correctly."""
    source = paths if kind == "raw" else stores("bf16", 2, 7)
    with Trajectory.open(source) as traj:
        expected = [traj.merge(COEFFS, base=resolve_base(b, bdict)) for b in BASES]
        monkeypatch.setattr(trajectory_module, "CHUNK_NBYTES", 100)
        monkeypatch.setattr(trajectory_module, "_physical_memory_nbytes", lambda: 0)
        for _ in range(2):
            for b, exp in zip(BASES, expected):
                assert_states_bitwise(traj.merge(COEFFS, base=resolve_base(b, bdict)), exp,
                                      f"base={b}")


@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_merge_batched_equals_single_merges(run, paths, stores, bdict, kind):
    """Trajectory.merge_batched writes K candidates in one pass; each output holds the bits of
    the single merge with its row, for every base form."""
    source = paths if kind == "raw" else stores("bf16", 2, 7)
    g = torch.Generator().manual_seed(11)
    with Trajectory.open(source) as traj:
        rows = torch.randn(4, len(traj), generator=g, dtype=torch.float64).tolist()
        for b in BASES:
            base = resolve_base(b, bdict)
            outs = [{n: torch.full(traj.shapes[n], float("nan")) for n in traj._float_names}
                    for _ in rows]
            traj.merge_batched(rows, outs, base=base)
            for row, out in zip(rows, outs):
                single = traj.merge(row, base=base, dtype=torch.float32)
                for n in traj._float_names:
                    assert_bitwise_equal(out[n], single[n], f"base={b} {n}")


# ================================================================ the staged path

@pytest.mark.parametrize("chunk", param("chunk_nbytes", [1, 64, 300, 2**30]))
@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_merge_staged_equals_in_place(run, paths, stores, bdict, kind, chunk):
    """streaming.merge_staged (the CUDA path, run on the CPU): gathering segments into staging
    buffers in chunks and merging there equals the in-place merge bitwise, for every base."""
    source = paths if kind == "raw" else stores("fp16", 1, 7)
    with Trajectory.open(source) as traj:
        for base in BASES:
            b = resolve_base(base, bdict)
            expected = traj.merge(COEFFS, base=b)
            target = target_like(run[-1])
            targets = [target[k] for k in traj._float_names]
            columns, base_column, extra = traj._column_coefficients(list(COEFFS), b, target)
            merge_staged(traj, targets, torch.device("cpu"), columns, base_column, extra,
                         chunk_nbytes=chunk)
            for k in traj._float_names:
                assert_bitwise_equal(target[k], expected[k], f"{kind} base={base} {k}")


def _overlapping_outputs(target, base):
    """blocks.0.weight and blocks.0.bias share a buffer: separate chunks at chunk_nbytes=1."""
    buf = torch.zeros(120)
    target.update({"blocks.0.weight": buf[:45].view(5, 9), "blocks.0.bias": buf[20:]})
    return buf, base


def _output_over_base(target, base):
    """target's blocks.0.bias overlaps base's blocks.0.weight, a different tensor's input."""
    buf = torch.zeros(120)
    target["blocks.0.bias"] = buf[:100]
    return buf, {**base, "blocks.0.weight": buf[50:95].view(5, 9)}


def _overlapping_in_a_later_chunk(target, base):
    """head.weight and scale share a buffer, both in the second chunk at chunk_nbytes=2500
    (the first holds blocks.0.*)."""
    buf = torch.zeros(13)
    target.update({"head.weight": buf, "scale": buf[12]})
    return buf, base


@pytest.mark.parametrize("change, chunk, match", [
    pytest.param(_overlapping_outputs, 1, r"target\['blocks.0.(bias|weight)'\] and "
                 r"target\['blocks.0.(bias|weight)'\] share memory", id="outputs-across-chunks"),
    pytest.param(_output_over_base, 1, r"target\['blocks.0.bias'\] overlaps "
                 r"base\['blocks.0.weight'\]", id="output-over-base-across-chunks"),
    pytest.param(_overlapping_in_a_later_chunk, 2500, r"target\['(head.weight|scale)'\] and "
                 r"target\['(head.weight|scale)'\] share memory", id="outputs-in-a-later-chunk"),
])
def test_merge_staged_checks_the_whole_target_first(run, paths, bdict, change, chunk, match):
    """merge_staged refuses targets that overlap in memory, however they fall into chunks, with
    the in-place path's error, before any chunk is written: the target's bits stay as they were."""
    target = target_like(run[-1])
    buf, base = change(target, bdict)
    before = snapshot([buf, *target.values()])
    with Trajectory.open(paths) as traj:
        with pytest.raises(ValueError, match=match):
            merge_into(target, traj, COEFFS, base=base)
        columns, base_column, extra = traj._column_coefficients(list(COEFFS), base, target)
        targets = [target[k] for k in traj._float_names]
        with pytest.raises(ValueError, match=match):
            merge_staged(traj, targets, torch.device("cpu"), columns, base_column, extra,
                         chunk_nbytes=chunk)
    assert_unchanged([buf, *target.values()], before)


def test_chunks_cover_every_segment_once():
    """_chunks splits segments into consecutive non-empty runs covering all of them."""
    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.integers(0, 50), max_size=20), st.integers(1, 80))
    def check(sizes, limit):
        chunks = trajectory_module._chunks(np.array(sizes, dtype=np.int64), limit)
        flat = [i for lo, hi in chunks for i in range(lo, hi)]
        assert flat == list(range(len(sizes)))
        assert all(hi > lo for lo, hi in chunks)
        for lo, hi in chunks:  # a chunk of several segments stays near the limit
            assert hi - lo == 1 or sum(sizes[lo:hi - 1]) <= limit

    check()


# ================================================================ residency

@pytest.mark.parametrize("kind", ["raw", "packed"])
@pytest.mark.parametrize("where", [pytest.param("cpu", id="to=cpu"),
                                   pytest.param("pinned", id="to=pinned",
                                                marks=pytest.mark.cuda)])
def test_resident_merges_equal_file_merges(run, paths, stores, bdict, tmp_path, kind, where):
    """After .to("cpu" / "pinned") merges read the resident copies, bitwise as from the files.
    Overwriting the files' data afterwards shows in a trajectory opened again (the control; the
    one opened before refuses the changed files) but not in the resident one."""
    files = copy_files(paths, tmp_path / "raw")
    source = files if kind == "raw" else pack(files, tmp_path / "packed", block_elems=7)
    with Trajectory.open(source) as mapped, Trajectory.open(source) as resident:
        expected = [mapped.merge(COEFFS, base=resolve_base(b, bdict)) for b in BASES]
        assert resident.to(where) is resident
        for b, exp in zip(BASES, expected):
            assert_states_bitwise(resident.merge(COEFFS, base=resolve_base(b, bdict)), exp,
                                  f"resident base={b}")
        for f in mapped._headers:  # zero every tensor's bytes, keeping the sizes
            data_start = min(e.begin for e in f.entries.values())
            with open(f.path, "r+b") as fh:
                fh.seek(data_start)
                fh.write(bytes(f.file_nbytes - data_start))
        if kind == "packed":
            with open(os.path.join(source, "deltas.bin"), "r+b") as fh:
                fh.write(bytes(os.path.getsize(fh.name)))
        for b, exp in zip(BASES, expected):
            assert_states_bitwise(resident.merge(COEFFS, base=resolve_base(b, bdict)), exp,
                                  f"resident base={b} after the files changed")
    with Trajectory.open(source) as reopened:
        changed = reopened.merge(COEFFS)
    assert not torch.equal(changed["blocks.0.weight"], expected[0]["blocks.0.weight"])


def check_resident_on(device, resident_device, paths, stores, bdict, kind):
    """Merges into targets on `device` from a trajectory made resident with
    .to(resident_device) equal merges from the files (on CUDA: through the staging path)
    bitwise; (CUDA) a CPU target is refused."""
    source = paths if kind == "raw" else stores("bf16", 0, 7)
    with Trajectory.open(source) as mapped, Trajectory.open(source) as resident:
        resident.to(resident_device)
        for base in BASES:
            b = resolve_base(base, bdict)
            b = {k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else b
            assert_states_bitwise(resident.merge(COEFFS, base=b, device=device),
                                  mapped.merge(COEFFS, base=b, device=device), f"base={base}")
        if torch.device(device).type == "cuda":
            with pytest.raises(ValueError, match="resident"):
                resident.merge(COEFFS, device="cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_resident_on_cuda(paths, stores, bdict, kind):
    device = torch.device("cuda", torch.cuda.current_device())
    check_resident_on(device, device, paths, stores, bdict, kind)


RESIDENT_INDEX_BUG = ("Trajectory.to(device) keeps torch.device(device) as given, without an "
                      "index, and _run compares it with the targets' device by !=; a CUDA "
                      "tensor's device always has an index (cuda:0) and a CPU tensor's never "
                      "does, so after .to('cuda') every merge into CUDA targets (and after "
                      ".to('cpu:0') every CPU merge) raises ValueError 'the trajectory is "
                      "resident on cuda but the target is on cuda:0'")


@pytest.mark.cuda
def test_resident_on_cuda_without_index(paths, stores, bdict):
    check_resident_on("cuda", "cuda", paths, stores, bdict, "raw")


def test_resident_on_cpu_with_index(paths, stores, bdict):
    check_resident_on("cpu", "cpu:0", paths, stores, bdict, "raw")


def write_unaligned(path, a: np.ndarray, b: np.ndarray, pad: int) -> None:
    """A valid safetensors file that safetensors' writer would not make: one float16 tensor
    'a' of odd length first, then float32 'b' (so at an offset that is not a multiple of 4),
    after a header padded with `pad` spaces (an odd length leaves 'a' unaligned too)."""
    header = json.dumps({
        "a": {"dtype": "F16", "shape": [a.size], "data_offsets": [0, a.nbytes]},
        "b": {"dtype": "F32", "shape": [b.size], "data_offsets": [a.nbytes, a.nbytes + b.nbytes]},
    }).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + a.tobytes() + b.tobytes())


def test_unaligned_tensors_merge_on_the_cpu_and_are_refused_for_cuda(tmp_path, paths):
    """CPU merges read any offset; a CUDA-resident copy keeps the file's layout, where an
    element must start at a multiple of its size, so .to("cuda") refuses it (before any CUDA
    call) instead of faulting on the device."""
    rng = np.random.default_rng(0)
    states, files = [], []
    for i in range(3):
        a = rng.standard_normal(3).astype(np.float16)
        b = rng.standard_normal(1000).astype(np.float32)
        states.append({"a": torch.from_numpy(a), "b": torch.from_numpy(b)})
        files.append(str(tmp_path / f"unaligned-{i}.safetensors"))
        write_unaligned(files[-1], a, b, pad=i)
    w = [0.2, 0.3, 0.5]
    with Trajectory.open(files) as traj:
        merged, ref = traj.merge(w), reference.merge(states, w)
        for name in ("a", "b"):  # the merge is rounded to each tensor's own dtype
            eps = torch.finfo(merged[name].dtype).eps
            assert torch.allclose(merged[name].double(), ref[name], rtol=eps, atol=eps), name
        with pytest.raises(ValueError, match=r"unaligned-0.safetensors: tensor 'b' "
                                             r"\(torch.float32\) starts at byte \d+ of the "
                                             r"file, not a multiple of 4"):
            traj.to("cuda")
        assert traj._resident is None
    with Trajectory.open(paths) as traj:  # written by safetensors: aligned
        traj._check_aligned_for_cuda()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("base", param("base", BASES))
def test_file_merges_on_device(run, paths, stores, bdict, device, base):
    """Raw files merged into targets on device equal merge_into with state dicts on that device
    bitwise (on CUDA: through the staging path); packed stores are within packed_bound."""
    b = resolve_base(base, bdict)
    bd = {k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else b
    with Trajectory.open(paths) as traj:
        assert_states_bitwise(traj.merge(COEFFS, base=bd, device=device),
                              state_merge(run, COEFFS, b, device=device))
    ref = reference.merge(run, COEFFS, b)
    with Trajectory.open(stores("bf16", 0, 7)) as traj:
        merged = traj.merge(COEFFS, base=bd, device=device)
        for k in FLOAT_NAMES:
            assert_within(merged[k], ref[k], packed_bound(run, 0, COEFFS, b, k, BF16, ref[k],
                                                         merged[k].dtype), k)


# ================================================================ packed stores

@pytest.mark.parametrize("block", param("block_elems", [7, 65536]))
@pytest.mark.parametrize("p", param("pack_base", [0, 2, -1]))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_packed_merge_within_delta_rounding(run, paths, stores, bdict, dtype, p, block):
    """Merges from a packed store are within packed_bound of the float64 reference, element by
    element, for every merge base (including the store's own base index); the merges from the
    raw checkpoints are within raw_bound, so the two agree within the sum of both. 16-bit
    deltas really are rounded (some error is above the float32 level)."""
    delta_dtype = DELTA_DTYPES[dtype]
    pn = p % N
    with Trajectory.open(stores(dtype, p, block)) as traj:
        assert traj.kind == "packed"
        assert traj.steps == list(range(N))
        assert traj.names == sorted(SPEC) and traj.dtypes == {k: d for k, (_, d) in SPEC.items()}
        worst = 0.0
        for base in (None, 0, pn, 3, -1, "dict"):
            b = resolve_base(base, bdict)
            ref = reference.merge(run, COEFFS, b)
            merged = traj.merge(COEFFS, base=b)
            raw = state_merge(run, COEFFS, b)
            for k in FLOAT_NAMES:
                bound = packed_bound(run, pn, COEFFS, b, k, delta_dtype, ref[k], merged[k].dtype)
                err = assert_within(merged[k], ref[k], bound, f"{dtype} p={p} base={base} {k}")
                assert_within(raw[k], ref[k], raw_bound(run, COEFFS, b, k, ref[k], raw[k].dtype),
                              f"raw base={base} {k}")
                if k == "blocks.0.bias":
                    worst = max(worst, err / float(ref[k].abs().max()))
            for k in ("step", "mask"):
                assert_bitwise_equal(merged[k], run[-1][k], k)
    if delta_dtype == F32:
        assert worst < 1e-6  # tight: float32 rounding only
    else:
        assert worst > 1e-6  # the deltas were rounded to 16 bits


def test_packed_layout_and_manifest(run, paths, stores):
    """deltas.bin is block-interleaved as documented (for each float tensor in manifest order,
    for each block, the N - 1 deltas of that block), manifest fields and SHA-256s are right, and
    base.safetensors holds checkpoint p whole, integers.safetensors every checkpoint's integer
    tensors as "<index>/<name>"."""
    p, block = 3, 7
    out = stores("bf16", p, block)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["format"] == "lcsc_fast.packed"
    assert manifest["steps"] == list(range(N)) and manifest["base_index"] == p
    assert manifest["delta_dtype"] == "BF16" and manifest["block_elems"] == block
    assert [t["name"] for t in manifest["tensors"]] == FLOAT_NAMES
    for t in manifest["tensors"]:
        assert tuple(t["shape"]) == SPEC[t["name"]][0]
    for name, rec in manifest["files"].items():
        with open(os.path.join(out, name), "rb") as f:
            data = f.read()
        assert rec["nbytes"] == len(data)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()

    expected = bytearray()
    for name in FLOAT_NAMES:
        theta_p = run[p][name].reshape(-1).float()
        for lo in range(0, theta_p.numel(), block):
            hi = min(lo + block, theta_p.numel())
            for i in range(N):
                if i != p:
                    d = (run[i][name].reshape(-1).float()[lo:hi] - theta_p[lo:hi]).to(BF16)
                    expected += d.view(torch.int16).numpy().tobytes()
    with open(os.path.join(out, "deltas.bin"), "rb") as f:
        assert f.read() == bytes(expected)

    stored = load_file(os.path.join(out, "base.safetensors"))
    assert set(stored) == set(SPEC)
    for k in FLOAT_NAMES:
        assert_bitwise_equal(stored[k], run[p][k], k)
    for k in ("step", "mask"):
        assert_bitwise_equal(stored[k], run[p][k], k)
    integers = load_file(os.path.join(out, "integers.safetensors"))
    assert set(integers) == {f"{i}/{k}" for i in range(N) for k in ("step", "mask")}
    for i in range(N):
        for k in ("step", "mask"):
            assert_bitwise_equal(integers[f"{i}/{k}"], run[i][k], f"{i}/{k}")


def test_pack_from_paths_equals_pack_from_trajectory(paths, tmp_path):
    with Trajectory.open(paths) as traj:
        a = pack(traj, tmp_path / "a", dtype=torch.float16, base=1, block_elems=11)
    b = pack(paths, tmp_path / "b", dtype="fp16", base=1, block_elems=11)
    for name in ("base.safetensors", "integers.safetensors", "deltas.bin", "manifest.json"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_packed_checkpoint_i(run, stores, dtype):
    """traj[i] of a packed store: checkpoint i's float tensors within the delta rounding
    (bitwise for the base checkpoint, which is stored whole)."""
    p = 2
    with Trajectory.open(stores(dtype, p, 7)) as traj:
        for i in range(N):
            got = traj[i]
            assert set(got) == set(SPEC)
            one_hot = [float(j == i) for j in range(N)]
            for k in FLOAT_NAMES:
                want = run[i][k]
                assert got[k].dtype == want.dtype and got[k].shape == want.shape
                if i == p:
                    assert_bitwise_equal(got[k], want, f"traj[{i}][{k!r}]")
                else:
                    ref = want.double()
                    assert_within(got[k], ref, packed_bound(run, p, one_hot, None, k,
                                                            DELTA_DTYPES[dtype], ref, want.dtype),
                                  f"traj[{i}][{k!r}]")


def test_packed_checkpoint_i_integer_tensors(run, stores):
    with Trajectory.open(stores("bf16", 0, 7)) as traj:
        for i in range(N):
            for k in ("step", "mask"):
                assert_bitwise_equal(traj[i][k], run[i][k], f"traj[{i}][{k!r}]")


def test_packed_from_recorder_directory_keeps_steps(run, tmp_path):
    steps = [50, 100, 150, 200, 250]
    folder = write_recorder_dir(tmp_path / "rec", run, steps)
    out = pack(folder, tmp_path / "packed", dtype="fp32", base=4)
    with Trajectory.open(out, verify=True) as traj:
        assert traj.steps == steps and len(traj) == N
        ref = reference.merge(run, COEFFS, None)
        merged = traj.merge(COEFFS)
        for k in FLOAT_NAMES:
            assert_within(merged[k], ref[k], packed_bound(run, 4, COEFFS, None, k, F32, ref[k],
                                                         merged[k].dtype), k)


def test_pack_single_checkpoint(run, paths, tmp_path):
    """N = 1: deltas.bin is empty, merges are w * theta_0 (bitwise: one column either way)."""
    out = pack(paths[:1], tmp_path / "one", dtype="bf16")
    assert os.path.getsize(os.path.join(out, "deltas.bin")) == 0
    assert partial_folders(tmp_path) == []
    with Trajectory.open(out, verify=True) as traj:
        assert len(traj) == 1
        assert_states_bitwise(traj.merge([0.7]), state_merge(run[:1], [0.7], None))
        assert_states_bitwise(traj[0], run[0])


def test_pack_mixed_dtype_checkpoints(tmp_path):
    run = make_run(3, "mixed-pack")
    run[0]["blocks.0.weight"] = run[0]["blocks.0.weight"].to(BF16)
    files = write_run(tmp_path / "raw", run)
    out = pack(files, tmp_path / "packed", dtype="fp32", base=0)
    with Trajectory.open(out) as traj:
        merged = traj.merge([0.5, 0.25, 0.5])
        ref = reference.merge(run, [0.5, 0.25, 0.5])
        for k in FLOAT_NAMES:
            assert_within(merged[k], ref[k], raw_bound(run, [0.5, 0.25, 0.5], None, k, ref[k],
                                                      merged[k].dtype) * 4, k)


def partial_folders(folder) -> list[str]:
    """The folders a pack writes in before renaming them into place, left in folder."""
    return sorted(name for name in os.listdir(folder) if ".partial" in name)


def test_pack_output_directory_rules(paths, tmp_path):
    """A non-empty out_dir is refused (and left alone); an empty one is used; a folder named
    <out>.partial (an interrupted pack's, or the user's) is left alone; nothing is left
    behind."""
    busy = tmp_path / "busy"
    os.makedirs(busy)
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        pack(paths, busy)
    assert os.listdir(busy) == ["keep.txt"]
    assert partial_folders(tmp_path) == []

    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert os.fspath(pack(paths, empty)) == os.fspath(empty)
    assert sorted(os.listdir(empty)) == ["base.safetensors", "deltas.bin",
                                         "integers.safetensors", "manifest.json"]
    assert partial_folders(tmp_path) == []

    other = tmp_path / "other"
    os.makedirs(f"{other}.partial")
    with open(f"{other}.partial/deltas.bin", "wb") as f:
        f.write(b"not pack's")
    pack(paths, other, dtype="fp32")
    with open(f"{other}.partial/deltas.bin", "rb") as f:
        assert f.read() == b"not pack's"
    assert partial_folders(tmp_path) == ["other.partial"]
    with Trajectory.open(other, verify=True) as traj:
        assert traj.kind == "packed"

    nested = tmp_path / "new" / "folders" / "store"  # parents made
    pack(paths, nested)
    assert partial_folders(nested.parent) == []
    with Trajectory.open(nested, verify=True) as traj:
        assert traj.kind == "packed"


def test_failed_pack_leaves_nothing(paths, tmp_path, monkeypatch):
    """A pack that fails part-way (here: the disk fills while writing integers.safetensors)
    raises, creates no out_dir and removes the folder it was writing in."""
    pack_module = importlib.import_module("lcsc_fast.pack")  # lcsc_fast.pack is the function
    real_save_file, calls = pack_module.save_file, []

    def disk_full_on_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(pack_module, "save_file", disk_full_on_second)
    with pytest.raises(OSError, match="No space left"):
        pack(paths, tmp_path / "store")
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []


def test_pack_argument_errors(paths, stores, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        pack(paths, tmp_path / "a", dtype="fp8")
    for base in (N, -N - 1, True, 1.0):
        with pytest.raises(ValueError, match="base"):
            pack(paths, tmp_path / "b", base=base)
    with pytest.raises(ValueError, match="block_elems"):
        pack(paths, tmp_path / "c", block_elems=0)
    with Trajectory.open(stores()) as packed, pytest.raises(ValueError, match="already packed"):
        pack(packed, tmp_path / "d")
    assert not any(os.path.exists(tmp_path / x) for x in ("a", "b", "c", "d"))


@pytest.mark.parametrize("file", ["deltas.bin", "base.safetensors"])
def test_verify_detects_a_flipped_byte(paths, tmp_path, file):
    """verify=True checks SHA-256s: one flipped data byte is a CheckpointError naming the file;
    without verify the store opens (the sizes and headers still match)."""
    out = pack(paths, tmp_path / "store", block_elems=7)
    with Trajectory.open(out, verify=True):
        pass
    path = os.path.join(out, file)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 3)  # in the data: the last bytes of the file
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        Trajectory.open(out, verify=True)
    assert file in str(info.value)
    with Trajectory.open(out) as traj:
        assert len(traj) == N


def test_damaged_packed_store(paths, tmp_path):
    """Missing / resized files and invalid manifests are CheckpointErrors naming what."""
    def fresh(name):
        return pack(paths, tmp_path / name, block_elems=7)

    out = fresh("missing")
    os.remove(os.path.join(out, "deltas.bin"))
    with pytest.raises(CheckpointError, match="deltas.bin is missing"):
        Trajectory.open(out)

    out = fresh("grown")
    with open(os.path.join(out, "deltas.bin"), "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(CheckpointError, match="deltas.bin has"):
        Trajectory.open(out)

    out = fresh("manifest")
    mpath = os.path.join(out, "manifest.json")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    for broken in ({k: v for k, v in manifest.items() if k != "steps"},
                   {**manifest, "delta_dtype": "F64"},
                   {**manifest, "base_index": N},
                   {**manifest, "block_elems": 0},
                   {**manifest, "tensors": [{**t, "shape": [7]} for t in manifest["tensors"]]}):
        write_json(mpath, broken)
        with pytest.raises(CheckpointError):
            Trajectory.open(out)


# ================================================================ bad input: files

SMALL = {"alpha": ((4, 3), F32), "beta": ((6,), F32), "gamma": ((5,), F16),
         "step": ((), torch.int64)}


def split_file(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header, body: bytes) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return len(header).to_bytes(8, "little") + header + body


def _edit(fn):
    """A corruption that edits the parsed header (a dict) and re-serialises it."""
    def corrupt(data):
        header, body = split_file(data)
        fn(header, body)
        return join_file(header, body)
    return corrupt


def _last_tensor(data):
    header, _ = split_file(data)
    return max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])


def _duplicate_beta(data):
    header, body = split_file(data)
    items = [(k, v) for k, v in header.items()] + [("beta", header["beta"])]
    return join_file("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}",
                     body)


def _overlap(header, body):
    a0 = header["alpha"]["data_offsets"][0]
    header["beta"]["data_offsets"] = [a0 + 4, a0 + 4 + 24]


def _invalid_utf8(data):
    n = int.from_bytes(data[:8], "little")
    i = data.index(b'"beta"', 8, 8 + n)
    return data[:i + 2] + b"\xff" + data[i + 3:]


def _invalid_json(data):
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].rstrip()
    assert text.endswith(b"}")
    return data[:8] + (text[:-1] + b" ").ljust(n) + data[8 + n:]


FILE_CORRUPTIONS = {  # id -> (corrupt(data) -> data, fragments of the message; {last} filled)
    "truncated-in-header": (lambda d: d[:8 + int.from_bytes(d[:8], "little") // 2],
                            ["header length", "past the end"]),
    "truncated-in-data": (lambda d: d[:-3], ["{last}", "truncated"]),
    "shorter-than-8-bytes": (lambda d: d[:5], ["too short"]),
    "header-length-beyond-file": (lambda d: len(d).to_bytes(8, "little") + d[8:],
                                  ["header length", "past the end"]),
    "header-length-huge": (lambda d: (2**64 - 1).to_bytes(8, "little") + d[8:],
                           ["header length"]),
    "invalid-utf8": (_invalid_utf8, ["UTF-8"]),
    "invalid-json": (_invalid_json, ["not valid JSON"]),
    "not-an-object": (lambda d: join_file("[1, 2]", split_file(d)[1]), ["not a JSON object"]),
    "duplicate-key": (_duplicate_beta, ["'beta'", "twice"]),
    "unknown-dtype": (_edit(lambda h, b: h["beta"].update(dtype="F8_E4M3")),
                      ["'beta'", "F8_E4M3"]),
    "dtype-not-a-string": (_edit(lambda h, b: h["beta"].update(dtype=4)), ["'beta'", "dtype"]),
    "shape-offsets-mismatch": (_edit(lambda h, b: h["alpha"].update(shape=[4, 2])),
                               ["'alpha'", "span"]),
    "negative-shape": (_edit(lambda h, b: h["alpha"].update(shape=[-4, -3])),
                       ["'alpha'", "shape"]),
    "offsets-reversed": (_edit(lambda h, b: h["beta"].update(
        data_offsets=h["beta"]["data_offsets"][::-1])), ["'beta'", "data_offsets"]),
    "offsets-out-of-range": (_edit(lambda h, b: h["gamma"].update(
        data_offsets=[o + len(b) for o in h["gamma"]["data_offsets"]])),
        ["'gamma'", "past the end"]),
    "offsets-overlap": (_edit(_overlap), ["'alpha'", "'beta'", "overlap"]),
    "entry-not-an-object": (_edit(lambda h, b: h.update(beta=[1, 2])), ["'beta'"]),
    "metadata-not-strings": (_edit(lambda h, b: h.update(__metadata__={"a": 1})),
                             ["__metadata__"]),
}


@pytest.mark.parametrize("case", list(FILE_CORRUPTIONS))
def test_damaged_file_is_refused(tmp_path, case):
    """A damaged file among good ones: read_header and Trajectory.open raise CheckpointError
    naming the file (and the tensor where there is one); the target of the merge attempt keeps
    its bits."""
    run = make_run(3, "small", SMALL)
    files = write_run(tmp_path, run)
    corrupt, fragments = FILE_CORRUPTIONS[case]
    with open(files[1], "rb") as f:
        data = f.read()
    fragments = [s.replace("{last}", repr(_last_tensor(data))) for s in fragments]
    with open(files[1], "wb") as f:
        f.write(corrupt(data))
    for call in (lambda: read_header(files[1]), lambda: Trajectory.open(files)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        for fragment in [files[1], *fragments]:
            assert fragment in message, (fragment, message)
    target = target_like(run[-1])
    snap = snapshot(target)

    def attempt():
        with Trajectory.open(files) as traj:
            merge_into(target, traj, [0.2, 0.3, 0.5])

    with pytest.raises(CheckpointError):
        attempt()
    assert_unchanged(target, snap)


def _drop_beta(ck):
    del ck["beta"]


MISMATCHES = {  # id -> (change to checkpoint 2, fragments)
    "missing-tensor": (_drop_beta, ["missing 'beta'"]),
    "extra-tensor": (lambda ck: ck.update(delta=torch.zeros(2)), ["unexpected 'delta'"]),
    "shape-differs": (lambda ck: ck.update(beta=torch.zeros(7)), ["'beta'", "shape"]),
    "float-vs-int": (lambda ck: ck.update(beta=torch.zeros(6, dtype=torch.int32)), ["'beta'"]),
    "float64": (lambda ck: ck.update(beta=ck["beta"].double()), ["'beta'", "float64"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_checkpoints_that_do_not_match(tmp_path, case):
    """Valid files whose tensors differ from the others' (or cannot be merged): CheckpointError
    naming the odd file and tensor."""
    run = make_run(3, "small", SMALL)
    change, fragments = MISMATCHES[case]
    change(run[2])
    files = write_run(tmp_path, run)
    with pytest.raises(CheckpointError) as info:
        Trajectory.open(files)
    for fragment in [files[2], *fragments]:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_float64_everywhere_is_refused(tmp_path):
    run = [{"w": torch.zeros(3, dtype=torch.float64)} for _ in range(2)]
    files = write_run(tmp_path, run)
    with pytest.raises(CheckpointError, match="'w' is torch.float64"):
        Trajectory.open(files)


# ================================================================ bad input: directories

@pytest.fixture
def recorder_dir(tmp_path):
    run = make_run(3, "small", SMALL)
    return write_recorder_dir(tmp_path / "rec", run, [10, 20, 30]), run


def _manifest_edit(folder, fn):
    path = os.path.join(folder, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    fn(manifest)
    write_json(path, manifest)


def test_recorder_dir_with_a_missing_file(recorder_dir):
    folder, _ = recorder_dir
    os.remove(os.path.join(folder, "step-00000020.safetensors"))
    with pytest.raises(CheckpointError, match=r"step-00000020\.safetensors is missing"):
        Trajectory.open(folder)


def test_recorder_dir_with_wrong_nbytes(recorder_dir):
    folder, _ = recorder_dir
    _manifest_edit(folder, lambda m: m["snapshots"][2].update(nbytes=m["snapshots"][2]["nbytes"]
                                                              + 1))
    with pytest.raises(CheckpointError, match=r"step-00000030\.safetensors has \d+ bytes"):
        Trajectory.open(folder)


def test_recorder_dir_with_a_truncated_file(recorder_dir):
    folder, _ = recorder_dir
    path = os.path.join(folder, "step-00000010.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.raises(CheckpointError, match="step-00000010"):
        Trajectory.open(folder)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(format="lcsc_fast.somethingelse"), "unknown format"),
    (lambda m: m.pop("format"), "unknown format"),
    (lambda m: m.update(snapshots=[]), "no snapshots"),
    (lambda m: m.pop("snapshots"), "no snapshots"),
    (lambda m: m["snapshots"][1].pop("nbytes"), "snapshot 1"),
    (lambda m: m["snapshots"][0].update(step="ten"), "snapshot 0"),
    (lambda m: m["snapshots"][0].update(step="10"), "snapshot 0 .* integer step"),
    (lambda m: m["snapshots"][0].update(step=True), "snapshot 0 .* integer step"),
    (lambda m: m["snapshots"][0].update(step=10.5), "snapshot 0 .* integer step"),
    (lambda m: m["snapshots"][2].update(nbytes=True), "snapshot 2 .* integer nbytes"),
    (lambda m: m["snapshots"][1].update(file=7), "snapshot 1 .* file name"),
    (lambda m: m["snapshots"][1].update(step=10), "snapshot 1 has step 10 after step 10"),
    (lambda m: m["snapshots"].reverse(), "snapshot 1 has step 20 after step 30"),
    (lambda m: m["snapshots"][0].update(step=-10), "snapshot 0 has step -10"),
    (lambda m: m["snapshots"][0].update(file="../outside.safetensors"),
     "snapshot 0 names '../outside.safetensors', which is outside"),
    (lambda m: m["snapshots"][0].update(file="sub/../../outside.safetensors"), "outside"),
    (lambda m: m["snapshots"][0].update(file="{outside}"), "outside"),
], ids=["unknown-format", "no-format", "empty-snapshots", "no-snapshots", "no-nbytes",
        "bad-step", "string-step", "bool-step", "float-step", "bool-nbytes", "int-file",
        "duplicate-steps", "descending-steps", "negative-step", "dotdot-file", "nested-dotdot",
        "absolute-file"])
def test_recorder_dir_with_a_bad_manifest(recorder_dir, change, match):
    """A manifest the Recorder itself would refuse is refused: CheckpointError naming it. The
    files outside the directory exist, with the listed size, so only their place is wrong."""
    folder, _ = recorder_dir
    outside = os.path.join(os.path.dirname(folder), "outside.safetensors")
    shutil.copyfile(os.path.join(folder, "step-00000010.safetensors"), outside)

    def edit(m):
        change(m)
        for s in m.get("snapshots", []):
            if s.get("file") == "{outside}":
                s["file"] = outside
    _manifest_edit(folder, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        Trajectory.open(folder)
    assert os.path.join(folder, "manifest.json") in str(info.value)


def test_recorder_dir_with_unreadable_manifest(recorder_dir):
    folder, _ = recorder_dir
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
        f.write('{"format": "lcsc_fast.trajectory", ')
    with pytest.raises(CheckpointError, match="manifest.json"):
        Trajectory.open(folder)
    with open(os.path.join(folder, "manifest.json"), "wb") as f:
        f.write(b'{"format": "\xff"}')
    with pytest.raises(CheckpointError, match="manifest.json"):
        Trajectory.open(folder)


def test_directory_without_manifest(tmp_path):
    write_run(tmp_path / "plain", make_run(2, "small", SMALL))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Trajectory.open(tmp_path / "plain")


def test_sharded_checkpoint_errors(tmp_path):
    run = make_run(2, "small", SMALL)
    shards = {"a.safetensors": ["alpha", "step"], "b.safetensors": ["beta", "gamma"]}
    good = write_sharded(tmp_path / "good", run[0], shards)

    missing = write_sharded(tmp_path / "missing", run[1], shards)
    os.remove(tmp_path / "missing" / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"shard .*b\.safetensors is missing"):
        Trajectory.open([good, missing])

    twice = write_sharded(tmp_path / "twice", run[1], shards)
    save_file({"beta": run[1]["beta"], "gamma": run[1]["gamma"], "alpha": run[1]["alpha"]},
              tmp_path / "twice" / "b.safetensors")  # alpha is in a.safetensors as well
    with pytest.raises(CheckpointError, match="'alpha' is also in") as info:
        Trajectory.open([good, twice])
    assert "a.safetensors" in str(info.value) and "b.safetensors" in str(info.value)

    no_map = tmp_path / "nomap" / "model.safetensors.index.json"
    os.makedirs(no_map.parent)
    write_json(no_map, {"metadata": {}})
    with pytest.raises(CheckpointError, match="weight_map"):
        Trajectory.open([good, no_map])

    os.makedirs(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Trajectory.open([good, tmp_path / "nothing"])

    broken = tmp_path / "broken" / "model.safetensors.index.json"
    os.makedirs(broken.parent)
    broken.write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        Trajectory.open([good, broken])


def _add_to_map(**entries):
    return lambda index, folder, ck: index["weight_map"].update(entries)


def _set_map(weight_map):
    return lambda index, folder, ck: index.update(weight_map=weight_map)


def _unlisted_tensor(index, folder, ck):
    save_file({"beta": ck["beta"], "gamma": ck["gamma"], "stray": torch.zeros(2)},
              os.path.join(folder, "b.safetensors"))


INDEX_ERRORS = {  # id -> (change(index, folder, checkpoint), fragments of the message)
    "lists-a-missing-tensor": (_add_to_map(ghost="b.safetensors"),
                               ["'ghost'", "b.safetensors", "no shard holds it"]),
    "lists-the-wrong-shard": (_add_to_map(beta="a.safetensors"),
                              ["'beta'", "a.safetensors", "b.safetensors holds it"]),
    "misses-a-tensor": (_unlisted_tensor, ["'stray'", "b.safetensors", "not in the weight_map"]),
    "shard-an-int": (_add_to_map(alpha=5), ["weight_map['alpha'] is 5"]),
    "shard-a-list": (_add_to_map(alpha=["a.safetensors"]),
                     ['weight_map[\'alpha\'] is ["a.safetensors"]']),
    "shard-null": (_add_to_map(alpha=None), ["weight_map['alpha'] is null"]),
    "shard-empty": (_add_to_map(alpha=""), ["weight_map['alpha'] is \"\""]),
    "map-an-int": (_set_map(5), ["needs a weight_map"]),
    "map-a-list": (_set_map(["a.safetensors"]), ["needs a weight_map"]),
    "map-empty": (_set_map({}), ["needs a weight_map"]),
}


@pytest.mark.parametrize("case", list(INDEX_ERRORS))
def test_sharded_checkpoint_index_must_match_its_shards(tmp_path, case):
    """A sharded checkpoint's weight_map lists exactly the tensors its shards hold, each in its
    own shard; otherwise opening raises CheckpointError naming the index and the tensor."""
    change, fragments = INDEX_ERRORS[case]
    run = make_run(2, "small", SMALL)
    shards = {"a.safetensors": ["alpha", "step"], "b.safetensors": ["beta", "gamma"]}
    good = write_sharded(tmp_path / "good", run[0], shards)
    bad = write_sharded(tmp_path / "bad", run[1], shards)
    with open(bad, encoding="utf-8") as f:
        index = json.load(f)
    change(index, tmp_path / "bad", run[1])
    write_json(bad, index)
    with pytest.raises(CheckpointError) as info:
        Trajectory.open([good, bad])
    for fragment in [bad, *fragments]:
        assert fragment in str(info.value), (fragment, str(info.value))


# ================================================================ bad input: merge arguments

MERGE_ERRORS = {  # id -> (exception, match, change(target, kwargs))
    "coeffs-too-few": (ValueError, "coefficients", lambda t, kw: kw.update(coeffs=COEFFS[:-1])),
    "coeff-nan": (ValueError, "finite", lambda t, kw: kw.update(coeffs=[math.nan] + COEFFS[1:])),
    "coeff-beyond-float32": (ValueError, "float32",
                             lambda t, kw: kw.update(coeffs=[1e39] + COEFFS[1:])),
    "base-out-of-range": (ValueError, "base", lambda t, kw: kw.update(base=N)),
    "base-bool": (TypeError, "base", lambda t, kw: kw.update(base=True)),
    "base-dict-missing": (ValueError, "base", lambda t, kw: kw.update(
        base={k: v for k, v in base_dict().items() if k != "embed"})),
    "base-dict-wrong-shape": (ValueError, "embed", lambda t, kw: kw.update(
        base={**base_dict(), "embed": torch.zeros(4, 3)})),
    "target-missing": (ValueError, "scale", lambda t, kw: t.pop("scale")),
    "target-extra": (ValueError, "unexpected", lambda t, kw: t.update(extra=torch.zeros(1))),
    "target-wrong-shape": (ValueError, "blocks.0.bias",
                           lambda t, kw: t.update({"blocks.0.bias": torch.zeros(99)})),
    "target-float64": (TypeError, "head.weight", lambda t, kw: t.update(
        {"head.weight": torch.zeros(13, dtype=torch.float64)})),
    "target-not-contiguous": (ValueError, "blocks.0.weight", lambda t, kw: t.update(
        {"blocks.0.weight": torch.zeros(9, 5).t()})),
    "target-int-wrong-dtype": (ValueError, "step",
                               lambda t, kw: t.update(step=torch.zeros((), dtype=torch.int32))),
    "target-not-a-tensor": (TypeError, "scale", lambda t, kw: t.update(scale=1.0)),
}


@pytest.mark.parametrize("case", list(MERGE_ERRORS))
@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_bad_merge_arguments_leave_the_target_alone(run, paths, stores, kind, case):
    exc, match, change = MERGE_ERRORS[case]
    target = target_like(run[-1])
    kwargs = {"coeffs": list(COEFFS), "base": None}
    change(target, kwargs)
    snap = snapshot([v for v in target.values() if isinstance(v, torch.Tensor)])
    with Trajectory.open(paths if kind == "raw" else stores()) as traj:
        with pytest.raises(exc, match=match):
            merge_into(target, traj, kwargs["coeffs"], base=kwargs["base"])
    assert_unchanged([v for v in target.values() if isinstance(v, torch.Tensor)], snap)


# ================================================================ files changing under a merge

@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_file_truncated_after_open(paths, tmp_path, kind):
    """A file that shrank since the trajectory was opened: the merge raises CheckpointError
    (naming the file) before writing anything."""
    files = copy_files(paths, tmp_path / "raw")
    source = files if kind == "raw" else pack(files, tmp_path / "packed", block_elems=7)
    victim = files[3] if kind == "raw" else os.path.join(source, "deltas.bin")
    with Trajectory.open(source) as traj:
        target = target_like(make_run(1, "main")[0])
        snap = snapshot(target)
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) - 16)
        with pytest.raises(CheckpointError, match="shrank") as info:
            merge_into(target, traj, COEFFS)
        assert victim in str(info.value)
        assert_unchanged(target, snap)
        with pytest.raises(CheckpointError, match="shrank"):
            traj.merge(COEFFS, base=1)


def _age(path) -> None:
    """Set path's modification time an hour back, so that a rewrite now surely changes it
    (timestamps are coarse: a file written and rewritten within one tick could keep its)."""
    mtime_ns = os.stat(path).st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.mark.parametrize("rewrite", ["same-bytes", "other-checkpoint"])
@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_file_rewritten_in_place_after_open(paths, tmp_path, kind, rewrite):
    """A file written to in place since the trajectory was opened (cp or shutil.copyfile onto
    it: the same inode, the same size or larger) is refused before anything is read from it:
    CheckpointError naming the file, the target unchanged. Its old header's offsets would read
    the new bytes as garbage."""
    files = copy_files(paths, tmp_path / "raw")
    source = files if kind == "raw" else pack(files, tmp_path / "packed", block_elems=7)
    victim = files[3] if kind == "raw" else os.path.join(source, "deltas.bin")
    _age(victim)
    with Trajectory.open(source) as traj:
        target = target_like(make_run(1, "main")[0])
        snap = snapshot(target)
        if rewrite == "same-bytes":
            with open(victim, "r+b") as f:
                data = f.read()
                f.seek(0)
                f.write(data)  # same size, same bytes: only the modification time differs
        else:  # another checkpoint with a longer header, copied over the victim
            other = str(tmp_path / "other.safetensors")
            save_file(make_run(1, "other")[0], other, metadata={"note": "x" * 100})
            shutil.copyfile(other, victim)
        for call in (lambda: merge_into(target, traj, COEFFS), lambda: traj[3],
                     lambda: traj.merge(COEFFS, base=1)):
            with pytest.raises(CheckpointError, match="since the trajectory was opened") as info:
                call()
            assert victim in str(info.value) and "open the trajectory again" in str(info.value)
        assert_unchanged(target, snap)
    if kind == "raw":
        with Trajectory.open(source) as traj:  # opened again, it reads the file as it is now
            assert_states_bitwise(traj[3], load_file(victim))


def test_file_rewritten_after_its_header_was_read(paths, tmp_path):
    """A file written to between reading its header and mapping it (a header read, then the
    file overwritten in place, then mapped) is refused too: the header describes the old one."""
    from lcsc_fast.safetensors_io import MappedFile

    (path,) = copy_files(paths[:1], tmp_path)
    _age(path)
    header = read_header(path)
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data)
    with pytest.raises(CheckpointError, match="written to after its header was read") as info:
        MappedFile(path, header.file_nbytes, header.file_id)
    assert path in str(info.value)
    MappedFile(path, header.file_nbytes).close()  # without a file_id: only the size is checked


def test_recorder_appends_while_a_trajectory_is_open(tmp_path):
    """A Recorder writes new snapshot files beside the ones an open trajectory maps, and
    rewrites the manifest: the trajectory merges as before, and opened again it sees them."""
    model = nn.Linear(3, 2)
    with lcsc_fast.Recorder(model, tmp_path / "run", every=1) as rec:
        for step in range(2):
            with torch.no_grad():
                model.weight.fill_(step)
            rec.step(step)
        rec.flush()
        with Trajectory.open(tmp_path / "run") as traj:
            for step in range(2, 4):
                with torch.no_grad():
                    model.weight.fill_(step)
                rec.step(step)
            rec.flush()
            assert traj.steps == [0, 1]
            assert bool((traj.merge([0.0, 1.0])["weight"] == 1).all())
    with Trajectory.open(tmp_path / "run") as traj:
        assert traj.steps == [0, 1, 2, 3]
        assert bool((traj.merge([0.0, 0.0, 0.0, 1.0])["weight"] == 3).all())

@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_files_deleted_after_open_still_merge(run, paths, bdict, tmp_path, kind):
    """The mappings keep deleted files readable: merges and traj[i] are unchanged."""
    files = copy_files(paths, tmp_path / "raw")
    source = files if kind == "raw" else pack(files, tmp_path / "packed", block_elems=7)
    with Trajectory.open(source) as traj:
        expected = [traj.merge(COEFFS, base=resolve_base(b, bdict)) for b in BASES]
        first = traj[1]
        if kind == "raw":
            for f in files:
                os.remove(f)
        else:
            shutil.rmtree(source)
        for b, exp in zip(BASES, expected):
            assert_states_bitwise(traj.merge(COEFFS, base=resolve_base(b, bdict)), exp,
                                  f"base={b}")
        assert_states_bitwise(traj[1], first)


@pytest.mark.parametrize("resident", [False, True], ids=["mapped", "resident"])
@pytest.mark.parametrize("kind", ["raw", "packed"])
def test_closed_trajectory_refuses_use(paths, stores, tmp_path, kind, resident):
    """Every use of a closed trajectory raises ValueError saying it is closed (not EBADF), and a
    closed file refuses reads naming itself; the target is left unchanged."""
    traj = Trajectory.open(paths if kind == "raw" else stores("bf16", 0, 7))
    if resident:
        traj.to("cpu")
    traj.close()
    traj.close()  # twice is fine
    target = target_like(make_run(1, "main")[0])
    snap = snapshot(target)
    calls = [lambda: traj.merge(COEFFS), lambda: merge_into(target, traj, COEFFS),
             lambda: traj.merge_batched([COEFFS], [target]), lambda: traj[0],
             lambda: traj.to("cpu")]
    if kind == "raw":  # a packed store is not packed again
        calls.append(lambda: pack(traj, tmp_path / "packed"))
    for call in calls:
        with pytest.raises(ValueError, match="the trajectory is closed"):
            call()
    assert_unchanged(target, snap)
    assert not os.path.exists(tmp_path / "packed")
    with pytest.raises(ValueError, match="closed") as info:
        traj._files[0].read(0, 8)
    assert traj._files[0].path in str(info.value)


SUBPROCESS_SETUP = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    import lcsc_fast
    from lcsc_fast import CheckpointError, Trajectory, merge_into
    folder = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    files = []
    for i in range(3):
        path = os.path.join(folder, f"{i}.safetensors")
        save_file({"w": torch.randn(200_000, generator=g), "n": torch.tensor(i)}, path)
        files.append(path)
    traj = Trajectory.open(files)
    with open(files[1], "r+b") as f:
        f.truncate(128)  # every page of the data past the first is gone
""")


def run_python(code: str, folder) -> subprocess.CompletedProcess:
    # Run from folder: `python -c` puts the working directory first on sys.path, and from the
    # repository root that is the source tree, not the installed package.
    return subprocess.run([sys.executable, "-c", code, os.fspath(folder)], capture_output=True,
                          text=True, timeout=120, cwd=os.fspath(folder))


GUARD_CALLS = {
    "in-place": "merge_into(target, traj, [0.2, 0.3, 0.5])",
    "chunked": ("import lcsc_fast.trajectory as T\n"
                "T._physical_memory_nbytes, T.CHUNK_NBYTES = lambda: 0, 4096\n"
                "merge_into(target, traj, [0.2, 0.3, 0.5])"),
    "staged": ("columns, base_column, extra = traj._column_coefficients([0.2, 0.3, 0.5], None, "
               "target)\n"
               "merge_staged(traj, [target['w']], torch.device('cpu'), columns, base_column, "
               "extra, chunk_nbytes=4096)"),
    "getitem": "traj[1]",
}


@pytest.mark.parametrize("path", [
    pytest.param("in-place", id="in-place"),
    pytest.param("chunked", id="chunked"),
    pytest.param("staged", id="staged"),
    pytest.param("getitem", id="getitem"),
])
def test_truncation_during_merge_raises_instead_of_crashing(tmp_path, path):
    """The native fault guard: with the changed-file check disabled (as if the file shrank after
    it), the merge's (or traj[i]'s) reads of vanished pages raise RuntimeError naming SIGBUS and
    (but for merge_staged called alone, not from a merge) the file that shrank, and the process
    lives on (run in a subprocess, in case it does not). Integer tensors are not copied."""
    call = textwrap.indent(GUARD_CALLS[path], "    ")
    code = SUBPROCESS_SETUP + textwrap.dedent("""
        from lcsc_fast.safetensors_io import MappedFile
        from lcsc_fast.streaming import merge_staged
        MappedFile.check_unchanged = lambda self: None
        target = {"w": torch.zeros(200_000), "n": torch.tensor(-1)}
        try:
        {call}
            print("no error")
        except RuntimeError as e:
            print("RuntimeError:", e)
        assert int(target["n"]) == -1, "integer tensors are copied only after a good merge"
        print("survived")
    """).replace("{call}", call)
    result = run_python(code, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert lines[-1] == "survived", result.stdout
    assert lines[-2].startswith("RuntimeError:") and "SIGBUS" in lines[-2], result.stdout
    if path != "staged":
        assert f"{os.path.join(tmp_path, '1.safetensors')} shrank from " in lines[-2], result.stdout


@pytest.mark.parametrize("operation", [
    pytest.param("traj[1]", id="getitem"),
    pytest.param("traj.to('cpu')", id="to-cpu"),
    pytest.param("lcsc_fast.pack(traj, os.path.join(folder, 'packed'))", id="pack"),
])
def test_truncated_file_outside_a_merge_raises(tmp_path, operation):
    """Reading a shrunken file outside a merge must raise (CheckpointError from the changed-file
    check, or RuntimeError from a fault guard), not kill the process."""
    code = SUBPROCESS_SETUP + textwrap.dedent(f"""
        try:
            {operation}
            print("no error")
        except (CheckpointError, RuntimeError) as e:
            print(type(e).__name__ + ":", e)
        print("survived")
    """)
    result = run_python(code, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert lines[-1] == "survived", result.stdout
    assert (lines[-2].startswith("CheckpointError:") and "shrank" in lines[-2]) or (
        lines[-2].startswith("RuntimeError:") and "SIGBUS" in lines[-2]), result.stdout


def test_closed_file_stays_mapped_while_views_of_it_live(tmp_path):
    """MappedFile.close() leaves the mapping to tensors still viewing it (as LoraTrajectory's
    views of aligned tensors do), which read the same bytes after it; the mapping goes with the
    last of them, or at close() when there is none. Run in a subprocess: reading an unmapped
    view would crash."""
    code = textwrap.dedent("""
        import gc, os, sys, weakref
        import torch
        from lcsc_fast.safetensors_io import MappedFile
        path = os.path.join(sys.argv[1], "data.bin")
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * 64)
        mapped = MappedFile(path, 256 * 64)
        view = mapped._bytes[4096:8192].view(torch.int32)
        expected = view.clone()
        mapping = weakref.ref(mapped._map)
        mapped.close()
        print("kept", mapping() is not None, torch.equal(view, expected))
        del view
        gc.collect()
        print("dropped", mapping() is None)
        mapped = MappedFile(path, 256 * 64)
        mapping = weakref.ref(mapped._map)
        mapped.close()
        print("closed", mapping() is None)
    """)
    result = run_python(code, tmp_path)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stdout.splitlines() == ["kept True True", "dropped True", "closed True"]
