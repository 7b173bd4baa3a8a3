"""LoRA trajectories: Trajectory.open(adapters, base=...) (lcsc_fast.lora_trajectory).

* Merges equal the float64 reference, (sum c) W0 + s sum_i c_i B_i A_i, within the project's
  accuracy rule (twice plain torch's float32 error), for every form of base, factor and base
  dtypes, coefficients summing to 1 or not, Linear and Conv2d (3x3 and 1x1) layers; checkpoint
  i is W0 + s B_i A_i; every merge starts from W0; merge_into's base= forms equal the reference
  merge of the materialised checkpoints.
* PEFT's conventions (alpha / r, rslora, rank_pattern / alpha_pattern, saved and live names)
  and PEFT itself: the merge equals add_weighted_adapter(..., combination_type="cat") followed
  by merging that adapter (exact up to float32 rounding), and checkpoint i equals PEFT merging
  adapter i alone.
* A Recorder run (include="trainable") of a PEFT model and of a loralib-style module, search()
  over a LoRA trajectory, and bad inputs: each raises a clear error, at open time for files
  (CheckpointError naming file and tensor), before anything is written for merges.

The model is small: Linear, Conv2d 3x3, Conv2d 1x1 and a nested Linear adapted, a head and a
BatchNorm (with its integer counter) not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from conftest import (assert_bitwise_equal, assert_unchanged, assert_within_torch_error,
                      device_params, generator, param, randn, snapshot)
from safetensors.torch import save_file
from torch import nn

import lcsc_fast
from lcsc_fast import CheckpointError, Trajectory, merge_into, reference
from lcsc_fast.lora_trajectory import LoraTrajectory
from lcsc_fast.safetensors_io import DTYPE_NAMES, read_header

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
PRE = "base_model.model."
RANKS = {"a": 2, "conv": 3, "pw": 2, "blocks.0": 4}
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 5, "rank_pattern": {"conv": 3, "blocks.0": 4},
          "alpha_pattern": {"pw": 3}, "use_rslora": False, "bias": "none", "use_dora": False,
          "fan_in_fan_out": False, "target_modules": sorted(RANKS)}
SCALES = {"a": 5 / 2, "conv": 5 / 3, "pw": 3 / 2, "blocks.0": 5 / 4}  # CONFIG's, by hand
COEFFS = {"sum 1": [0.375, -0.25, 0.5, 0.375], "sum != 1": [0.3, -0.15, 0.45, 0.6]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pw = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Linear(4, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, 3, 6, 6] -> [B, 3]
        h = self.bn(self.pw(self.conv(x))).relu().mean(dim=(2, 3))
        return self.head(self.blocks(self.a(h)))


def make_net(tag: str = "net", dtype=F32) -> Net:
    """A Net with random parameters (BatchNorm's buffers as initialised)."""
    g = generator("lora net", tag)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(randn(p.shape, F32, g, scale=0.3))
    return net.to(dtype)


def make_adapters(n: int, tag: str, ranks=RANKS, dtype=F32, names="saved") -> list[dict]:
    """n adapters of Net with PEFT's saved names ("saved"), a live PEFT model's ("live") or
    loralib's parameter names ("param"): lora_A [r, *W.shape[1:]], lora_B [m, r, 1, ...]."""
    shapes = {k: v.shape for k, v in Net().state_dict().items()}
    g = generator("lora adapters", tag)
    out = []
    for _ in range(n):
        ad = {}
        for path, r in ranks.items():
            w = shapes[f"{path}.weight"]
            a = randn((r, *w[1:]), dtype, g, scale=0.5)
            b = randn((w[0], r, *[1] * (len(w) - 2)), dtype, g, scale=0.5)
            ad[factor_name(path, "A", names)], ad[factor_name(path, "B", names)] = a, b
        out.append(ad)
    return out


def factor_name(path: str, factor: str, names: str = "saved") -> str:
    return {"saved": f"{PRE}{path}.lora_{factor}.weight",
            "live": f"{PRE}{path}.lora_{factor}.default.weight",
            "param": f"{path}.lora_{factor}"}[names]


def write_adapters(root, adapters: list[dict], config: dict | None = CONFIG) -> list[str]:
    """PEFT adapter folders root/ck{i} (adapter_model.safetensors + adapter_config.json)."""
    folders = []
    for i, ad in enumerate(adapters):
        folder = os.path.join(root, f"ck{i}")
        os.makedirs(folder, exist_ok=True)
        save_file(ad, os.path.join(folder, "adapter_model.safetensors"))
        if config is not None:
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                json.dump(config, f)
        folders.append(folder)
    return folders


def factors(adapters, path, names="saved"):
    return ([ad[factor_name(path, "A", names)] for ad in adapters],
            [ad[factor_name(path, "B", names)] for ad in adapters])


def reference_merge(base: dict, adapters, coeffs, scales=SCALES, names="saved") -> dict:
    """(sum c) W0 + s sum_i c_i B_i A_i in float64 (W0 for unadapted tensors, scaled by sum c);
    integer tensors as they are. scales: module path -> s, or -> [s_i] per checkpoint."""
    total = math.fsum(coeffs)
    out = {}
    for name, w0 in base.items():
        if not w0.is_floating_point():
            out[name] = w0.clone()
            continue
        acc = total * w0.double()
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and path in scales:
            s = scales[path]
            cs = [c * si for c, si in zip(coeffs, s)] if isinstance(s, list) else coeffs
            As, Bs = factors(adapters, path, names)
            acc = acc + reference.lora_weighted_sum(w0.shape, As, Bs, cs,
                                                    scale=1.0 if isinstance(s, list) else s)
        out[name] = acc
    return out


def torch_merge(base: dict, adapters, coeffs, dtypes: dict, scales=SCALES) -> dict:
    """The same merge by plain torch in float32, cast to dtypes: the accuracy rule's yardstick."""
    total = torch.tensor(math.fsum(coeffs), dtype=F32)
    out = {}
    for name, w0 in base.items():
        if not w0.is_floating_point():
            continue
        acc = w0.float() * total
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and path in scales:
            m = w0.shape[0]
            As, Bs = factors(adapters, path)
            for c, a, b in zip(coeffs, As, Bs):
                r = a.shape[0]
                acc = acc + (c * scales[path]) * (b.float().reshape(m, r)
                                                  @ a.float().reshape(r, -1)).reshape(w0.shape)
        out[name] = acc.to(dtypes[name])
    return out


def assert_matches_reference(got: dict, want: dict, yardstick: dict) -> None:
    assert set(got) == set(want)
    for name, t in got.items():
        if t.is_floating_point():
            assert_within_torch_error(t.cpu(), yardstick[name], want[name])
        else:
            assert torch.equal(t.cpu(), want[name]), name


def sha256s(paths) -> dict:
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def run(tmp_path):
    """(adapter folders, base Net, adapters) of a 4-checkpoint LoRA run with CONFIG."""
    adapters = make_adapters(4, "run")
    return write_adapters(tmp_path / "adapters", adapters), make_net(), adapters


# ---------------------------------------------------------------- merges


def test_open_reports_the_run(run):
    folders, base, _ = run
    traj = Trajectory.open(folders, base=base)
    assert isinstance(traj, LoraTrajectory) and traj.kind == "lora"
    assert len(traj) == 4 and traj.steps == [0, 1, 2, 3]
    assert traj.names == sorted(base.state_dict())
    assert traj.adapted == {f"{p}.weight": r for p, r in sorted(RANKS.items())}
    assert traj.scales == {f"{p}.weight": [SCALES[p]] * 4 for p in sorted(RANKS)}
    assert repr(traj) == "LoraTrajectory(4 checkpoints, steps 0..3, 4 adapted of 15 tensors)"


def base_forms(kind: str, net: Net, tmp_path):
    """The base W0 as Trajectory.open takes it: a module, a state dict, a state dict under a
    live PEFT model's names (adapters included, which are skipped), or a safetensors file."""
    state = net.state_dict()
    if kind == "module":
        return net
    if kind == "dict":
        return dict(state)
    if kind == "peft names":
        out = {}
        for name, t in state.items():
            path, _, leaf = name.rpartition(".")
            wrapped = path in RANKS and leaf in ("weight", "bias")
            out[PRE + (f"{path}.base_layer.{leaf}" if wrapped else name)] = t
        out[f"{PRE}a.lora_A.default.weight"] = torch.zeros(2, 4)  # the live model's own
        return out
    path = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("coeffs", param("coeffs", COEFFS))
@pytest.mark.parametrize("factor_dtype, base_dtype",
                         [pytest.param(F32, F32, id="factors=fp32-base=fp32"),
                          pytest.param(BF16, F32, id="factors=bf16-base=fp32"),
                          pytest.param(F16, BF16, id="factors=fp16-base=bf16")])
@pytest.mark.parametrize("base_kind", param("base", ["file", "module", "dict", "peft names"]))
def test_merge_matches_the_fp64_reference(tmp_path, base_kind, factor_dtype, base_dtype, coeffs):
    adapters = make_adapters(4, "reference", dtype=factor_dtype)
    folders = write_adapters(tmp_path / "adapters", adapters)
    net = make_net("reference", base_dtype)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    traj = Trajectory.open(folders, base=base_forms(base_kind, net, tmp_path))
    target = make_net("other", base_dtype)
    with torch.no_grad():
        target.bn.num_batches_tracked.fill_(-7)
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    w = COEFFS[coeffs]
    merge_into(target, traj, w)
    got = target.state_dict()
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs  # in place
    assert_matches_reference(got, reference_merge(w0, adapters, w),
                             torch_merge(w0, adapters, w, {k: v.dtype for k, v in w0.items()}))
    # merge() gives the same bits in new tensors, in any float dtype asked for.
    merged = traj.merge(w)
    for name, t in got.items():
        assert_bitwise_equal(merged[name], t, name)
    merged32 = traj.merge(w, dtype=F32)
    assert all(t.dtype == F32 for n, t in merged32.items() if n != "bn.num_batches_tracked")


def test_checkpoint_i_is_w0_plus_its_scaled_product(run):
    folders, base, adapters = run
    traj = Trajectory.open(folders, base=base)
    w0 = base.state_dict()
    for i in (0, 3, -1):
        one_hot = [1.0 if j == i % 4 else 0.0 for j in range(4)]
        want = reference_merge(w0, adapters, one_hot)
        assert_matches_reference(traj[i], want, torch_merge(w0, adapters, one_hot,
                                                            {k: F32 for k in w0}))
    assert len(traj[1:3]) == 2
    with pytest.raises(IndexError, match="out of range for 4 checkpoints"):
        traj[4]


def test_every_merge_starts_from_w0(run, tmp_path):
    """The model given as base is the target too: the base was copied when opened, so the
    second merge is exactly a fresh one, not a merge on top of the first."""
    folders, base, _ = run
    model = copy.deepcopy(base)
    traj = Trajectory.open(folders, base=model)
    fresh = traj.merge(COEFFS["sum 1"])
    merge_into(model, traj, COEFFS["sum != 1"])
    merge_into(model, traj, COEFFS["sum 1"])
    for name, t in model.state_dict().items():
        assert_bitwise_equal(t, fresh[name], name)
    # The same from the base's file.
    from_file = Trajectory.open(folders, base=base_forms("file", base, tmp_path))
    merge_into(model, from_file, COEFFS["sum != 1"])
    merge_into(model, from_file, COEFFS["sum 1"])
    for name, t in model.state_dict().items():
        assert_bitwise_equal(t, fresh[name], name)


def test_merges_reuse_plans_only_for_the_same_tensors(run):
    """A search merges into one target again and again: the per-layer LoraPlans of one merge
    serve the next. They are rebuilt when a target parameter's storage was replaced, when the
    base of the low-rank pass changes (W0 for coefficients summing to 1, the target itself
    otherwise), for other outputs, and after .to(); each merge still equals a fresh one.
    merge(), which returns new tensors, keeps none."""
    folders, base, _ = run
    traj = Trajectory.open(folders, base=base)
    fresh = {key: traj.merge(c) for key, c in COEFFS.items()}
    assert not traj._lora_plans, "merge() makes new tensors: its plans must not keep them"
    model = copy.deepcopy(base)

    def check(key):
        for name, t in model.state_dict().items():
            assert_bitwise_equal(t, fresh[key][name], name)

    for key in ("sum 1", "sum 1", "sum != 1", "sum 1"):
        merge_into(model, traj, COEFFS[key])
        check(key)
    plans = dict(traj._lora_plans)
    merge_into(model, traj, COEFFS["sum 1"])
    assert all(traj._lora_plans[k][0] is plans[k][0] for k in plans), "plans were rebuilt"
    with torch.no_grad():
        model.a.weight.set_(torch.full_like(model.a.weight, float("nan")))
    merge_into(model, traj, COEFFS["sum 1"])
    check("sum 1")
    traj.to("cpu")
    assert not traj._lora_plans
    merge_into(model, traj, COEFFS["sum != 1"])
    check("sum != 1")
    outs = [traj.merge(COEFFS["sum 1"]), traj.merge(COEFFS["sum 1"])]
    traj.merge_batched([COEFFS["sum != 1"], COEFFS["sum 1"]], outs)
    for k, key in enumerate(("sum != 1", "sum 1")):
        for name in fresh[key]:
            assert_bitwise_equal(outs[k][name], fresh[key][name], name)


@pytest.mark.parametrize("base", param("base", [0, 2, -1, "dict"]))
def test_merge_into_base_forms_equal_the_merge_of_the_checkpoints(run, base):
    """theta_b + sum_i c_i (theta_i - theta_b) with theta_i = W0 + s B_i A_i materialised:
    lcsc_fast.reference.merge of the checkpoints themselves, in float64."""
    folders, net, adapters = run
    traj = Trajectory.open(folders, base=net)
    w0 = net.state_dict()
    checkpoints = [reference_merge(w0, adapters, [float(j == i) for j in range(4)])
                   for i in range(4)]
    other = {k: randn(v.shape, F32, generator("base dict", k)) if v.is_floating_point() else v
             for k, v in w0.items()}
    b = other if base == "dict" else base
    w = COEFFS["sum != 1"]
    target = make_net("target")
    merge_into(target, traj, w, base=b)
    want = reference.merge(checkpoints, w, base=b)
    for name, t in target.state_dict().items():
        torch.testing.assert_close(t.double(), want[name].double(), rtol=0, atol=2e-5)


def test_merges_are_seen_by_autograd(run):
    """A merge bumps the autograd version of every float tensor it writes, adapted (a LoraPlan)
    or not (W0 through the engine): backward through a graph that saved one refuses."""
    folders, net, _ = run
    traj = Trajectory.open(folders, base=net)
    target = make_net("autograd")
    for name, t in target.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        y = (t * torch.ones(t.shape, requires_grad=True)).sum()  # saves t
        version = t._version
        merge_into(target, traj, COEFFS["sum 1"])
        assert t._version > version, name
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_merge_batched_equals_one_merge_at_a_time(run):
    folders, net, _ = run
    traj = Trajectory.open(folders, base=net)
    rows = [COEFFS["sum 1"], COEFFS["sum != 1"], [0.0, 0.0, 0.0, 1.0]]
    outs = [{k: torch.full_like(v, float("nan")) for k, v in net.state_dict().items()
             if v.is_floating_point()} for _ in rows]
    traj.merge_batched(rows, outs)
    for row, out in zip(rows, outs):
        one = traj.merge(row)
        for name, t in out.items():
            assert_bitwise_equal(t, one[name], name)


@pytest.mark.parametrize("device", device_params())
def test_resident_copies_merge_the_same(run, device):
    folders, net, _ = run
    traj = Trajectory.open(folders, base=net.state_dict())
    want = traj.merge(COEFFS["sum != 1"])
    for resident in (False, True):
        if resident:
            assert traj.to(device) is traj
        got = traj.merge(COEFFS["sum != 1"], device=device)
        for name, t in got.items():
            torch.testing.assert_close(t.cpu(), want[name], rtol=1e-6, atol=1e-6)


def write_misaligned(path, state: dict) -> str:
    """A safetensors file whose tensors start at odd byte offsets: the format allows gaps, and
    writers other than the safetensors library may leave them. Tensors there are not aligned
    for their dtype, so they cannot be viewed in place."""
    header, data = {}, b""
    for name, t in state.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        data += b"\0" * ((1 - len(data)) % 8)  # every tensor at 1 mod 8
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
    assert all(e.begin % 8 == 1 for e in read_header(path).entries.values())
    return str(path)


def test_misaligned_files_merge_the_same(run, tmp_path):
    folders, net, adapters = run
    want = Trajectory.open(folders, base=net).merge(COEFFS["sum 1"])
    moved = []
    for i, ad in enumerate(adapters):
        os.makedirs(tmp_path / f"m{i}")
        write_misaligned(tmp_path / f"m{i}" / "adapter_model.safetensors", ad)
        with open(tmp_path / f"m{i}" / "adapter_config.json", "w") as f:
            json.dump(CONFIG, f)
        moved.append(tmp_path / f"m{i}")
    base = write_misaligned(tmp_path / "base.safetensors", net.state_dict())
    got = Trajectory.open(moved, base=base).merge(COEFFS["sum 1"])
    for name, t in want.items():
        assert_bitwise_equal(got[name], t, name)


# ---------------------------------------------------------------- PEFT conventions


@pytest.mark.parametrize("case", ["alpha / r", "rslora", "patterns", "scale=number",
                                  "scale=dict", "live names"])
def test_scaling_conventions(tmp_path, case):
    ranks = {"a": 2, "conv": 2, "pw": 2, "blocks.0": 2}
    names = "live" if case == "live names" else "saved"
    adapters = make_adapters(3, case, ranks, names=names)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 3}
    scale, scales = None, {p: 3 / 2 for p in ranks}
    if case == "rslora":
        config["use_rslora"] = True
        scales = {p: 3 / math.sqrt(2) for p in ranks}
    elif case == "patterns":  # PEFT matches the end of the module path, at a dot
        ranks = {"a": 2, "conv": 4, "pw": 1, "blocks.0": 3}
        adapters = make_adapters(3, case, ranks)
        config.update(rank_pattern={"conv": 4, r"blocks\.\d": 3, "pw": 1},
                      alpha_pattern={"0": 6, "onv": 100})  # "onv" is no match: not at a dot
        scales = {"a": 3 / 2, "conv": 3 / 4, "pw": 3 / 1, "blocks.0": 6 / 3}
    elif case.startswith("scale="):
        config = None
        scale = 0.75 if case == "scale=number" else {"a": 1.0, "conv": 2.0, "pw": -1.0,
                                                     "blocks.0": 0.5}
        scales = {p: 0.75 for p in ranks} if case == "scale=number" else scale
    folders = write_adapters(tmp_path, adapters, config)
    net = make_net(case)
    traj = Trajectory.open(folders, base=net, scale=scale)
    assert traj.scales == {f"{p}.weight": [pytest.approx(s)] * 3 for p, s in scales.items()}
    w = [0.25, 0.5, 0.25]
    want = reference_merge(net.state_dict(), adapters, w, scales, names)
    for name, t in traj.merge(w).items():
        torch.testing.assert_close(t.double(), want[name].double(), rtol=0, atol=1e-5)


PEFT_TARGETS = ["a", "conv", "pw", "blocks.0"]


def peft_adapters(tmp_path, plain: Net, n: int, **config) -> list[str]:
    """n PEFT adapters of plain saved with save_pretrained (random A and B)."""
    folders = []
    for i in range(n):
        torch.manual_seed(1000 + i)  # PEFT initialises from the global generator
        model = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(
            target_modules=PEFT_TARGETS, init_lora_weights=False, **config))
        folder = str(tmp_path / f"peft{i}")
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def peft_model_with(plain: Net, folders: list[str]):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), folders[0], adapter_name="ck0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"ck{i}")
    return model


def test_equals_peft_cat_combination(tmp_path):
    """PEFT's add_weighted_adapter(combination_type="cat") concatenates the adapters, each
    lora_A multiplied by weight * scaling (peft 0.21; versions that took the square root of
    each weight for A and B need positive weights, hence the positive weights here), into a
    rank-sum adapter of scaling 1; merging it gives W0 + sum_i w_i s_i B_i A_i exactly, which is
    LCSC's merge for weights summing to 1."""
    plain = make_net("peft")
    folders = peft_adapters(tmp_path, plain, 3, r=2, lora_alpha=5, rank_pattern={"conv": 3},
                            alpha_pattern={"pw": 3})
    w = [0.2, 0.5, 0.3]
    model = peft_model_with(plain, folders)
    model.add_weighted_adapter([f"ck{i}" for i in range(3)], w, "merged", combination_type="cat")
    want = model.merge_and_unload(adapter_names=["merged"]).state_dict()

    traj = Trajectory.open(folders, base=plain)
    assert traj.scales["conv.weight"] == [5 / 3] * 3 and traj.scales["pw.weight"] == [1.5] * 3
    target = make_net("peft target")
    merge_into(target, traj, w)
    for name, t in target.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [
    pytest.param({"r": 3, "lora_alpha": 6, "use_rslora": True}, id="rslora"),
    pytest.param({"r": 2, "lora_alpha": 4, "rank_pattern": {"conv": 4}}, id="rank_pattern")])
def test_checkpoints_equal_peft_merging_each_adapter(tmp_path, config):
    """Checkpoint i equals PEFT merging adapter i alone. (rslora is checked this way: PEFT's cat
    combination keeps use_rslora with lora_alpha = r = the summed rank, so its combined adapter
    is scaled by sqrt(rank), not 1.)"""
    plain = make_net("peft each")
    folders = peft_adapters(tmp_path, plain, 2, **config)
    traj = Trajectory.open(folders, base=plain.state_dict())
    for i, folder in enumerate(folders):
        model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), folder)
        want = model.merge_and_unload().state_dict()
        got = traj[i]
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-6)


def test_recorded_peft_run(tmp_path):
    """Training code records only the adapters of a PEFT model and of its EMA
    (Recorder(include="trainable")) and saves its LoraConfig beside them; each checkpoint of
    either trajectory is PEFT's merge of those adapters at that step."""
    plain = make_net("recorded")
    model = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=PEFT_TARGETS))
    ema = copy.deepcopy(model)
    run_dir = tmp_path / "run"
    model.peft_config["default"].save_pretrained(run_dir)
    model.eval()  # BatchNorm's statistics stay W0's: only the adapters train
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    g = generator("recorded run")
    merged = {"model": [], "ema": []}
    with lcsc_fast.Recorder(model, run_dir, every=2, ema=ema, include="trainable") as rec:
        for step in range(6):
            loss = model(randn((8, 3, 6, 6), F32, g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 0.5)
            rec.step(step)
            if step % 2 == 0:
                for key, m in (("model", model), ("ema", ema)):
                    merged[key].append(copy.deepcopy(m).merge_and_unload().state_dict())
    for key, directory in (("model", run_dir), ("ema", run_dir / "ema")):
        traj = Trajectory.open(directory, base=plain)  # the EMA's config: the one in run/
        assert traj.steps == [0, 2, 4] and traj.scales["a.weight"] == [4.0] * 3
        for i, want in enumerate(merged[key]):
            got = traj[i]
            for name, t in want.items():
                torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-6)


class LoraLinear(nn.Module):
    """loralib's layout: the frozen weight and the factors as parameters of one layer."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, generator=generator("A")))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = scale

    def forward(self, x):
        return nn.functional.linear(x, self.weight + self.scale * self.lora_B @ self.lora_A,
                                    self.bias)


def test_recorded_loralib_style_run_with_scale(tmp_path):
    """A custom LoRA layer recorded with include="trainable", opened with scale= and the
    training model itself as the base (its lora_A / lora_B are not part of W0)."""
    plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    model = nn.Sequential(LoraLinear(plain[0], 2, 0.5), nn.Tanh(), LoraLinear(plain[2], 1, 0.5))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    g = generator("loralib run")
    expected = []
    with lcsc_fast.Recorder(model, tmp_path, every=1, include="trainable") as rec:
        for step in range(3):
            loss = model(randn((4, 5), F32, g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(step)
            expected.append({f"{k}.weight": (m.weight + 0.5 * m.lora_B @ m.lora_A).detach().clone()
                             for k, m in (("0", model[0]), ("2", model[2]))})
    traj = Trajectory.open(tmp_path, base=model, scale=0.5)
    assert traj.adapted == {"0.weight": 2, "2.weight": 1}
    target = copy.deepcopy(plain)
    for i, want in enumerate(expected):
        merge_into(target, traj, [float(j == i) for j in range(3)])
        for name, t in want.items():
            torch.testing.assert_close(target.state_dict()[name], t, rtol=1e-6, atol=1e-6)


def test_search_over_a_lora_trajectory(run):
    """search() runs unchanged over a LoRA trajectory, batched or not, with the same result;
    the model ends holding the best merge."""
    folders, net, _ = run
    traj = Trajectory.open(folders, base=net)
    g = generator("lora search")
    x, y = randn((16, 3, 6, 6), F32, g), randn((16, 3), F32, g)

    def objective(model):
        with torch.no_grad():
            return float((model.eval()(x) - y).square().mean())

    results = []
    for batch_nbytes in (None, 0):  # a generation in one merge_batched, or one at a time
        model = make_net("search target")
        result = lcsc_fast.search(traj, objective, model, budget=8, population=4, parents=2,
                                  progress=False, batch_nbytes=batch_nbytes)
        assert result.evaluations == 8 and math.isfinite(result.score)
        assert set(result.baselines) >= {"last", "uniform", "ema*"}
        assert objective(model) == result.score
        results.append(([h["score"] for h in result.history], model.state_dict()))
    assert results[0][0] == results[1][0]
    for name, t in results[0][1].items():
        assert_bitwise_equal(t, results[1][1][name], name)


# ---------------------------------------------------------------- bad input


def damaged(tmp_path, case: str):
    """(source, base, scale) for one kind of bad input; see test_bad_adapters_are_refused."""
    adapters = make_adapters(2, "bad")
    net = make_net("bad")
    base, scale, config = net.state_dict(), None, dict(CONFIG)
    a0, b0 = factor_name("conv", "A"), factor_name("conv", "B")
    if case == "missing lora_B":
        del adapters[1][b0]
    elif case == "ranks of A and B":
        adapters[0][b0] = adapters[0][b0][:, :2].contiguous()
    elif case == "rank across checkpoints":
        adapters[1][a0] = torch.cat([adapters[1][a0], adapters[1][a0][:1]])
        adapters[1][b0] = torch.cat([adapters[1][b0], adapters[1][b0][:, :1]], dim=1)
    elif case == "shape across checkpoints":
        adapters[1][a0] = adapters[1][a0][..., :2].contiguous()
    elif case == "no base weight":
        base = {k: v for k, v in base.items() if k != "pw.weight"}
    elif case == "base weight shape":
        base = dict(base, **{"a.weight": torch.zeros(8, 5)})
    elif case == "not a factor":
        adapters[0][f"{PRE}head.weight"] = torch.zeros(3, 8)
    elif case == "DoRA tensor":
        adapters[0][f"{PRE}a.lora_magnitude_vector"] = torch.ones(8)
    elif case == "DoRA config":
        config["use_dora"] = True
    elif case == "lora_bias":
        config["lora_bias"] = True
    elif case == "PiSSA":
        config["init_lora_weights"] = "pissa_niter_4"
    elif case == "config rank":
        config["rank_pattern"] = {"blocks.0": 4}  # conv has rank 3, config says r=2
    elif case == "no config":
        config = None
    elif case == "scale and config":
        scale = 1.0
    elif case == "two adapters":
        adapters[0][f"{PRE}a.lora_A.other.weight"] = adapters[0].pop(factor_name("a", "A"))
        adapters[0][f"{PRE}a.lora_B.default.weight"] = adapters[0].pop(factor_name("a", "B"))
    elif case == "modules differ":
        del adapters[1][factor_name("pw", "A")], adapters[1][factor_name("pw", "B")]
    elif case == "float64 factor":
        adapters[0][a0] = adapters[0][a0].double()
        adapters[0][b0] = adapters[0][b0].double()
    elif case == "dtype across checkpoints":
        adapters[1][a0], adapters[1][b0] = adapters[1][a0].bfloat16(), adapters[1][b0].bfloat16()
    elif case == "float64 base":
        base = dict(base, **{"head.bias": base["head.bias"].double()})
    folders = write_adapters(tmp_path, adapters, config)
    if case == "truncated":
        path = os.path.join(folders[1], "adapter_model.safetensors")
        os.truncate(path, os.path.getsize(path) - 5)
    return folders, base, scale


ERRORS = {
    "missing lora_B": (CheckpointError, r"ck1/adapter_model.safetensors: module 'conv' has "
                       r"lora_A \('base_model.model.conv.lora_A.weight'\) but no lora_B"),
    "ranks of A and B": (CheckpointError, r"ck0/adapter_model.safetensors: module 'conv': lora_B "
                         r"'base_model.model.conv.lora_B.weight' has rank 2 .* but lora_A "
                         r"'base_model.model.conv.lora_A.weight' has rank 3"),
    "rank across checkpoints": (CheckpointError, r"ck1/adapter_model.safetensors: module 'conv' "
                                r"has rank 4 .* but rank 3 in .*ck0/adapter_model.safetensors"),
    "shape across checkpoints": (CheckpointError, r"ck1/adapter_model.safetensors: tensor "
                                 r"'base_model.model.conv.lora_A.weight' has shape \[3, 3, 3, 2\] "
                                 r"but \[3, 3, 3, 3\] in"),
    "no base weight": (CheckpointError, r"module 'pw' adapts 'pw.weight', which the base \(the "
                       r"base state dict\) does not have"),
    "base weight shape": (CheckpointError, r"module 'a': lora_B \[8, 2\] @ lora_A \[2, 4\] does "
                          r"not fit the base weight 'a.weight', torch.float32 \[8, 5\]"),
    "not a factor": (CheckpointError, r"ck0/adapter_model.safetensors: tensor "
                     r"'base_model.model.head.weight' is not a LoRA factor"),
    "DoRA tensor": (CheckpointError, r"tensor 'base_model.model.a.lora_magnitude_vector' is a "
                    r"LoRA tensor lcsc_fast does not merge"),
    "DoRA config": (CheckpointError, r"adapter_config.json: use_dora=True is not supported \(DoRA"),
    "lora_bias": (CheckpointError, r"adapter_config.json: lora_bias=True is not supported"),
    "PiSSA": (CheckpointError, r"init_lora_weights='pissa_niter_4' trains the adapter against a "
              r"changed base"),
    "config rank": (CheckpointError, r"module 'conv' has rank 3, but .*ck0/adapter_config.json "
                    r"gives it r=2"),
    "no config": (CheckpointError, r"ck0/adapter_model.safetensors: no adapter_config.json beside "
                  r"it gives the LoRA scaling .* or pass scale="),
    "scale and config": (ValueError, r"scale= was given, but .*adapter_config.json gives the "
                         r"scaling too"),
    "two adapters": (CheckpointError, r"ck0/adapter_model.safetensors: tensors "
                     r"'base_model.model.a.lora_A.other.weight' and "
                     r"'base_model.model.a.lora_B.default.weight' are factors of two adapters"),
    "modules differ": (CheckpointError, r"ck1/adapter_model.safetensors: its LoRA modules differ "
                       r"from .*ck0/adapter_model.safetensors's: missing 'pw'"),
    "float64 factor": (CheckpointError, r"tensor 'base_model.model.conv.lora_A.weight' is "
                       r"torch.float64; LoRA factors must be float32, float16 or bfloat16"),
    "dtype across checkpoints": (CheckpointError, r"ck1/adapter_model.safetensors: tensor "
                                 r"'base_model.model.conv.lora_A.weight' is torch.bfloat16 but "
                                 r"torch.float32 in"),
    "float64 base": (TypeError, r"base\['head.bias'\]: dtype torch.float64 is not supported"),
    "truncated": (CheckpointError, r"ck1/adapter_model.safetensors: .*truncated"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_adapters_are_refused_when_opened(tmp_path, case):
    source, base, scale = damaged(tmp_path, case)
    error, pattern = ERRORS[case]
    files = [os.path.join(f, n) for f in source for n in sorted(os.listdir(f))]
    before = sha256s(files)
    with pytest.raises(error, match=pattern):
        Trajectory.open(source, base=base, scale=scale)
    assert sha256s(files) == before


def test_other_bad_sources(tmp_path, run):
    folders, net, _ = run
    with pytest.raises(TypeError, match="needs the frozen base weights"):
        LoraTrajectory.open(folders, base=None)
    with pytest.raises(CheckpointError, match="holds a LoRA adapter; open it with the frozen "
                                              r"base weights: Trajectory.open\(adapters, base"):
        Trajectory.open(folders[0])
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        Trajectory.open([tmp_path], base=net)
    with pytest.raises(TypeError, match="scale: expected a finite number"):
        Trajectory.open(folders, base=net, scale=float("nan"))
    with pytest.raises(TypeError, match="base: expected a state dict, an nn.Module"):
        Trajectory.open(folders, base=3)
    bad_config = write_adapters(tmp_path / "no-config", make_adapters(1, "x"), None)
    with pytest.raises(ValueError, match=r"scale: its module paths do not match the adapters' "
                                         r"\(missing 'blocks.0'; unknown 'b'\)"):
        Trajectory.open(bad_config, base=net, scale={"a": 1, "b": 1, "conv": 1, "pw": 1})


@pytest.mark.parametrize("case", [
    "coefficient count", "non-finite coefficient", "scale * coefficient overflows",
    "target lacks a tensor", "PEFT-wrapped target", "target shape", "target counter dtype",
    "float target counter", "base index", "base dict"])
def test_bad_merges_leave_the_target_untouched(run, case):
    folders, net, _ = run
    traj = Trajectory.open(folders, base=net)
    target = make_net("untouched")
    w, base = list(COEFFS["sum 1"]), None
    patterns = {
        "coefficient count": (ValueError, "coeffs: 3 coefficients for 4 sources"),
        "non-finite coefficient": (ValueError, r"coeffs\[1\] is nan, not finite"),
        "scale * coefficient overflows": (ValueError, r"scale \* coeffs of 'a.weight'\[0\] is "
                                                      ".*beyond float32's range"),
        "target lacks a tensor": (ValueError, "the target's tensors do not match the LoRA "
                                              "trajectory's base: missing 'head.bias'"),
        "PEFT-wrapped target": (ValueError, "unexpected .*; merge into the plain model"),
        "target shape": (ValueError, r"the target\['a.weight'\]: shape \(8, 5\) differs"),
        "target counter dtype": (ValueError, r"the target\['bn.num_batches_tracked'\]: "
                                             "torch.int32"),
        "float target counter": (ValueError, r"the target\['bn.num_batches_tracked'\]: "
                                             r"torch.float32 \(\) does not match the base's "
                                             "torch.int64"),
        "base index": (ValueError, "base: index 4 is out of range for 4 checkpoints"),
        "base dict": (ValueError, "base's tensors do not match .*: missing 'a.bias'"),
    }
    if case == "coefficient count":
        w = w[:3]
    elif case == "non-finite coefficient":
        w[1] = float("nan")
    elif case == "scale * coefficient overflows":
        w = [3e38, -3e38, 0.5, 0.5]
    elif case == "target lacks a tensor":
        target.head.bias = None
    elif case == "PEFT-wrapped target":
        target = {**target.state_dict(), f"{PRE}a.lora_A.default.weight": torch.zeros(2, 4)}
    elif case == "target shape":
        target.a.weight = nn.Parameter(torch.zeros(8, 5))
    elif case == "target counter dtype":
        target.bn.num_batches_tracked = torch.zeros((), dtype=torch.int32)
    elif case == "float target counter":  # once skipped, left as it was
        target.bn.num_batches_tracked = torch.full((), -1.0)
    elif case == "base index":
        base = 4
    elif case == "base dict":
        base = {k: v for k, v in net.state_dict().items() if k != "a.bias"}
    before = snapshot(target)
    error, pattern = patterns[case]
    with pytest.raises(error, match=pattern):
        merge_into(target, traj, w, base=base)
    assert_unchanged(target, before)


def float_state(tag: str) -> dict:
    return {k: v for k, v in make_net(tag).state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("coeffs", list(COEFFS))
@pytest.mark.parametrize("case", ["adapted and plain target tensors overlap",
                                  "one dict twice", "overlap within outs[1]",
                                  "outs[0] is the base"])
def test_overlapping_outputs_are_refused_before_anything_is_written(run, case, coeffs):
    """Every output of every candidate, adapted weights included, is checked against the others
    and the caller's base before the first is written (outputs are written one at a time)."""
    folders, net, _ = run
    traj = Trajectory.open(folders, base=net)
    w = COEFFS[coeffs]  # sum 1: adapted weights are written by their LoraPlans alone
    buf = torch.randn(40)
    if case == "adapted and plain target tensors overlap":
        target = make_net("overlap").state_dict()
        target["a.weight"], target["a.bias"] = buf[:32].view(8, 4), buf[28:36]
        outs, pattern = [target], r"target\['a.bias'\] and target\['a.weight'\] share memory"
    elif case == "one dict twice":
        o = float_state("twice")
        outs, pattern = [o, o], r"outs\[(0|1)\]\['(.*)'\] and outs\[(?!\1)[01]\]\['\2'\] share"
    elif case == "overlap within outs[1]":
        outs = [float_state("first"), float_state("second")]
        outs[1]["a.weight"], outs[1]["a.bias"] = buf[:32].view(8, 4), buf[28:36]
        pattern = r"outs\[1\]\['a.bias'\] and outs\[1\]\['a.weight'\] share memory"
    else:  # outs[1] would be merged from outs[0] as written, not from the base
        outs = [float_state("base"), float_state("second")]
        base = {**net.state_dict(), **outs[0]}
        pattern = (r"outs\[0\]\['.*'\] overlaps base\['.*'\] in memory, which outs\[1\] is "
                   "merged from")
    before = [snapshot(o) for o in outs]
    with pytest.raises(ValueError, match=pattern):
        if case == "adapted and plain target tensors overlap":
            merge_into(outs[0], traj, w)
        else:
            traj.merge_batched([w, COEFFS["sum 1"]], outs,
                               base=base if case == "outs[0] is the base" else None)
    for o, snap in zip(outs, before):
        assert_unchanged(o, snap)


def test_nothing_saved_is_modified(run, tmp_path):
    folders, net, _ = run
    base_path = base_forms("file", net, tmp_path)
    files = [base_path] + [os.path.join(f, n) for f in folders for n in os.listdir(f)]
    before = sha256s(files)
    with Trajectory.open(folders, base=base_path) as traj:
        target = make_net("t")
        merge_into(target, traj, COEFFS["sum != 1"])
        traj.merge_batched([COEFFS["sum 1"]], [traj.merge(COEFFS["sum 1"])])
        traj[0]
        traj.to("cpu")
        merge_into(target, traj, COEFFS["sum 1"])
    assert sha256s(files) == before


@pytest.mark.parametrize("victim", ["adapter", "base"])
def test_file_rewritten_in_place_after_open_is_refused(run, tmp_path, victim):
    """An adapter or base file written to in place since the trajectory was opened (same bytes,
    a new modification time) is refused before anything is written: CheckpointError naming it."""
    folders, net, _ = run
    base_path = str(tmp_path / "base.safetensors")
    save_file(net.state_dict(), base_path)
    path = base_path if victim == "base" else os.path.join(folders[2], "adapter_model.safetensors")
    mtime_ns = os.stat(path).st_mtime_ns - 3600 * 10**9  # surely not the rewrite's own
    os.utime(path, ns=(mtime_ns, mtime_ns))
    with Trajectory.open(folders, base=base_path) as traj:
        target = make_net("t")
        snap = snapshot(target)
        with open(path, "r+b") as f:
            data = f.read()
            f.seek(0)
            f.write(data)
        with pytest.raises(CheckpointError, match="since the trajectory was opened") as info:
            merge_into(target, traj, COEFFS["sum 1"])
        assert path in str(info.value)
        assert_unchanged(target, snap)

@pytest.mark.parametrize("resident", [False, True], ids=["mapped", "resident"])
def test_closed_trajectory_refuses_use(run, tmp_path, resident):
    """Every use of a closed LoRA trajectory raises ValueError saying it is closed (not EBADF);
    the target is left unchanged."""
    folders, net, _ = run
    base_path = str(tmp_path / "base.safetensors")
    save_file(net.state_dict(), base_path)
    traj = Trajectory.open(folders, base=base_path)
    if resident:
        traj.to("cpu")
    traj.close()
    target = make_net("t")
    snap = snapshot(target)
    c = COEFFS["sum 1"]
    for call in (lambda: traj.merge(c), lambda: merge_into(target, traj, c), lambda: traj[0],
                 lambda: traj.merge_batched([c], [target]), lambda: traj.to("cpu")):
        with pytest.raises(ValueError, match="the trajectory is closed"):
            call()
    assert_unchanged(target, snap)


def test_truncation_during_a_merge_raises_instead_of_crashing(tmp_path):
    """The native fault guard on the low-rank path: with the changed-file check disabled (as if
    an adapter file shrank after it), the merge's reads of vanished pages raise RuntimeError
    naming SIGBUS and the file, and the process lives on (run in a subprocess, in case it does
    not)."""
    code = textwrap.dedent("""
        import os, sys, torch
        from safetensors.torch import save_file
        import lcsc_fast
        from lcsc_fast.safetensors_io import MappedFile
        folder = sys.argv[1]
        g = torch.Generator().manual_seed(0)
        m, n, r = 512, 512, 64  # 128 KiB factors: many pages past the header
        files = []
        for i in range(3):
            files.append(os.path.join(folder, f"{i}.safetensors"))
            save_file({"lin.lora_A": torch.randn(r, n, generator=g),
                       "lin.lora_B": torch.randn(m, r, generator=g)}, files[-1])
        traj = lcsc_fast.Trajectory.open(files, base={"lin.weight": torch.randn(m, n)},
                                         scale=1.0)
        with open(files[1], "r+b") as f:
            f.truncate(128)
        MappedFile.check_unchanged = lambda self: None
        try:
            lcsc_fast.merge_into({"lin.weight": torch.zeros(m, n)}, traj, [0.2, 0.3, 0.5])
            print("no error")
        except RuntimeError as e:
            print("RuntimeError:", e)
        print("survived")
    """)
    # From tmp_path: `python -c` puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", code, os.fspath(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=os.fspath(tmp_path))
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert lines[-1] == "survived", result.stdout
    assert lines[-2].startswith("RuntimeError:") and "SIGBUS" in lines[-2], result.stdout
    assert f"{os.path.join(tmp_path, '1.safetensors')} shrank from " in lines[-2], result.stdout



@pytest.mark.parametrize("victim", ["base-integers", "base-weights", "adapter"])
@pytest.mark.parametrize("device", device_params())
def test_truncated_base_or_adapter_raises_before_writing(tmp_path, device, victim):
    """Every read of a mapped file is fault-guarded, the base's integer tensors (copied, not
    merged) and copies to a CUDA target included: with the changed-file check disabled (as if
    the file shrank after it), a merge raises RuntimeError naming SIGBUS and the file, and the
    process lives on (run in a subprocess, in case it does not). The sources read by plain
    copies are read before anything is written: a truncated integer shard, or any file for a
    CUDA target, leaves the target unchanged."""
    code = textwrap.dedent("""
        import os, sys, torch
        from safetensors.torch import save_file
        import lcsc_fast
        from lcsc_fast.safetensors_io import MappedFile
        folder, device, victim = sys.argv[1:]
        g = torch.Generator().manual_seed(0)
        m, n, r = 256, 256, 8
        base = [os.path.join(folder, "base-weights.safetensors"),
                os.path.join(folder, "base-integers.safetensors")]
        save_file({"lin.weight": torch.randn(m, n, generator=g)}, base[0])
        save_file({"count": torch.arange(20_000)}, base[1])  # many pages past the header
        files = []
        for i in range(2):
            files.append(os.path.join(folder, f"adapter-{i}.safetensors"))
            save_file({"lin.lora_A": torch.randn(r, n, generator=g),
                       "lin.lora_B": torch.randn(m, r, generator=g)}, files[-1])
        traj = lcsc_fast.Trajectory.open(files, base=base, scale=1.0)
        path = {"base-weights": base[0], "base-integers": base[1], "adapter": files[1]}[victim]
        with open(path, "r+b") as f:
            f.truncate(128)
        MappedFile.check_unchanged = lambda self: None
        target = {"lin.weight": torch.zeros(m, n, device=device),
                  "count": torch.full((20_000,), -1, device=device)}
        try:
            lcsc_fast.merge_into(target, traj, [0.4, 0.6])
            print("no error")
        except RuntimeError as e:
            print("RuntimeError:", e)
        unchanged = bool((target["lin.weight"] == 0).all() and (target["count"] == -1).all())
        print("unchanged" if unchanged else "written")
        print("survived")
    """)
    # From tmp_path: `python -c` puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", code, os.fspath(tmp_path), device, victim],
                            capture_output=True, text=True, timeout=120, cwd=os.fspath(tmp_path))
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert lines[-1] == "survived", result.stdout
    assert lines[-3].startswith("RuntimeError:") and "SIGBUS" in lines[-3], result.stdout
    name = "adapter-1" if victim == "adapter" else victim
    assert f"{os.path.join(tmp_path, name)}.safetensors shrank from " in lines[-3], result.stdout
    if victim == "base-integers" or device == "cuda":
        assert lines[-2] == "unchanged", result.stdout

def test_pack_refuses_a_lora_trajectory(run, tmp_path):
    """pack() is for dense checkpoints: a LoRA trajectory gets a ValueError saying why, and
    nothing is written."""
    folders, base, _ = run
    traj = Trajectory.open(folders, base=base)
    with pytest.raises(ValueError, match="pack: a LoRA trajectory is not packed"):
        lcsc_fast.pack(traj, tmp_path / "packed")
    assert not os.path.exists(tmp_path / "packed")
