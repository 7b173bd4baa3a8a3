"""merge_into on real modules and state dicts, against lcsc_fast.reference.merge.

The checkpoints are snapshots of a small Conv2d + BatchNorm2d + bias-free 1x1 Conv2d + Linear
network trained with SGD on random data between snapshots, so parameters, BatchNorm running
statistics and num_batches_tracked all differ from checkpoint to checkpoint.

Accuracy is checked element by element against an a-priori bound (assert_merged_close), and the
merged module's eval-mode outputs against a fresh module loaded with the reference merge.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcsc_fast
from conftest import (assert_bitwise_equal, device_params, generator, param, randn)
from lcsc_fast import reference

COEFFS = [0.3, -0.15, 0.45, 0.6]  # not float32-exact, do not sum to 1, one negative
BASES = (None, 1, -1, "dict")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 4, 1, bias=False)  # the bias-free layer
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):  # x: (B, 3, 8, 8)
        x = torch.relu(self.bn(self.conv(x)))
        x = F.avg_pool2d(self.mix(x), 2)
        return self.fc(x.flatten(1))


class TiedNet(nn.Module):
    """head.weight is embed.weight: one Parameter registered under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 6, bias=False)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.body(self.embed(x))))


def randomised(net: nn.Module, g: torch.Generator) -> nn.Module:
    """net with every parameter redrawn from g (the global RNG is never used)."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def clone_state(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def trained():
    """(pretrained state, [4 checkpoints]) from SGD training of SmallNet on random data."""
    g = generator("trained")
    net = randomised(SmallNet(), g)
    pretrained = clone_state(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    checkpoints = []
    for i in range(4):
        for _ in range(i + 1):  # num_batches_tracked: 1, 3, 6, 10
            x = torch.randn(8, 3, 8, 8, generator=g) * 2 + 0.5
            y = torch.randint(10, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        checkpoints.append(clone_state(net.state_dict()))
    return pretrained, checkpoints


@pytest.fixture
def checkpoints(trained):
    """Fresh copies of the four trained checkpoints (tests may not mutate the shared ones)."""
    return [clone_state(ck) for ck in trained[1]]


@pytest.fixture
def pretrained(trained):
    return clone_state(trained[0])


def fresh_net(tag="fresh", cls=SmallNet) -> nn.Module:
    return randomised(cls(), generator(tag))


def resolve_base(base, checkpoints, pretrained):
    return pretrained if base == "dict" else base


def merged_bound(name, checkpoints, coeffs, base_state, ref, out_dtype) -> torch.Tensor:
    """Elementwise error bound for one merged tensor (float64, CPU).

    The engine evaluates base + sum_j w'_j x_j in float32 (w' the coefficients after folding
    in -sum(w) * theta_base, rounded to float32; at most n + 2 terms). With S = sum_j |w'_j x_j|
    + |base| <= sum_i |w_i theta_i| + (1 + sum_i |w_i|) |theta_base|, the classic summation
    bound gives |error| <= ((n+2) u + u) S with u = 2**-24 for fused multiply-adds, twice that
    without fusion; we allow 2 (n + 3) u S. A 16-bit target adds one rounding of the result:
    eps/2 * |ref| plus half a subnormal step.
    """
    thetas = [ck[name].detach().cpu().double() for ck in checkpoints]
    s = sum(abs(w) * th.abs() for w, th in zip(coeffs, thetas))
    if base_state is not None:
        s = s + (1 + sum(abs(w) for w in coeffs)) * base_state[name].detach().cpu().double().abs()
    finfo = torch.finfo(out_dtype)
    return (2 * (len(checkpoints) + 3) * 2.0**-24 * s + finfo.eps / 2 * ref.abs()
            + finfo.tiny * finfo.eps)


def assert_merged_close(state: dict, checkpoints, coeffs, base=None) -> None:
    """Every floating tensor of state is within merged_bound of reference.merge; every other
    tensor equals the last checkpoint's."""
    ref = reference.merge(checkpoints, coeffs, base)
    base_state = checkpoints[base] if isinstance(base, int) else base
    assert set(state) == set(ref)
    for name, t in state.items():
        if not t.is_floating_point():
            assert torch.equal(t.cpu(), ref[name]), name
            continue
        err = (t.detach().cpu().double() - ref[name]).abs()
        bound = merged_bound(name, checkpoints, coeffs, base_state, ref[name], t.dtype)
        assert bool((err <= bound).all()), (
            f"{name}: error {float(err.max()):.3e} above bound at "
            f"{int((err - bound).argmax())}")


def storage_of(module: nn.Module) -> dict:
    """name -> (the tensor object, its data_ptr) for every parameter and buffer."""
    return {k: (v, v.data_ptr()) for k, v in module.state_dict(keep_vars=True).items()}


def assert_same_storage(module: nn.Module, before: dict) -> None:
    after = storage_of(module)
    assert after.keys() == before.keys()
    for k, (t, ptr) in before.items():
        assert after[k][0] is t, f"{k} was replaced by a new tensor object"
        assert after[k][1] == ptr, f"{k} moved: data_ptr changed"


# ---------------------------------------------------------------- modules

@pytest.mark.parametrize("base", param("base", BASES))
@pytest.mark.parametrize("device", device_params())
def test_merge_into_module(device, base, checkpoints, pretrained):
    """Every parameter and buffer (BatchNorm running stats included) is overwritten in place
    with the merge; num_batches_tracked is the last checkpoint's; the merged module computes
    what a module loaded with the reference merge computes."""
    checkpoints = [{k: v.to(device) for k, v in ck.items()} for ck in checkpoints]
    pretrained = {k: v.to(device) for k, v in pretrained.items()}
    b = resolve_base(base, checkpoints, pretrained)
    model = fresh_net().to(device)
    before = storage_of(model)
    assert lcsc_fast.merge_into(model, checkpoints, COEFFS, base=b) is model
    assert_same_storage(model, before)
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in model.parameters())
    assert_merged_close(model.state_dict(), checkpoints, COEFFS, b)
    nbt = [int(ck["bn.num_batches_tracked"]) for ck in checkpoints]
    assert len(set(nbt)) == len(nbt)  # the checkpoints really differ
    assert int(model.bn.num_batches_tracked) == nbt[-1]

    # Parameters agree with the float64 merge to within a few float32 ulps (merged_bound); the
    # net is 4 layers deep with fan-in <= 72, so outputs of size ~1 agree to ~1e-6; 2e-5
    # absolute / 1e-5 relative leaves a 10x margin while catching any wrong tensor.
    expected = SmallNet().to(device)
    expected.load_state_dict({k: v.to(device=device, dtype=torch.float32)
                              if v.is_floating_point() else v.to(device)
                              for k, v in reference.merge(checkpoints, COEFFS, b).items()})
    x = randn((16, 3, 8, 8), torch.float32, generator("input"), device)
    model.eval()
    expected.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=1e-5, atol=2e-5)


def test_single_checkpoint_with_weight_one_is_an_exact_copy(checkpoints):
    """merge_into(model, [ck], [1.0]) writes ck into every tensor bitwise."""
    model = fresh_net()
    lcsc_fast.merge_into(model, [checkpoints[2]], [1.0])
    for k, v in model.state_dict().items():
        assert_bitwise_equal(v, checkpoints[2][k], k)


@pytest.mark.parametrize("base", param("base", BASES))
def test_dict_target_matches_module_target(base, checkpoints, pretrained):
    """A dict name -> tensor target is written in place exactly like the module's tensors."""
    b = resolve_base(base, checkpoints, pretrained)
    model = fresh_net()
    lcsc_fast.merge_into(model, checkpoints, COEFFS, base=b)
    target = {k: torch.full_like(v, 7) for k, v in checkpoints[0].items()}
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    assert lcsc_fast.merge_into(target, checkpoints, COEFFS, base=b) is target
    assert {k: v.data_ptr() for k, v in target.items()} == ptrs
    for k, v in model.state_dict().items():
        assert_bitwise_equal(target[k], v, k)


def test_num_batches_tracked_comes_from_the_last_checkpoint_even_with_a_base(checkpoints):
    """Integer tensors are copied from the last checkpoint, not from the base checkpoint."""
    model = fresh_net()
    lcsc_fast.merge_into(model, checkpoints, COEFFS, base=0)
    assert torch.equal(model.bn.num_batches_tracked, checkpoints[-1]["bn.num_batches_tracked"])
    assert int(checkpoints[0]["bn.num_batches_tracked"]) != int(model.bn.num_batches_tracked)


@pytest.mark.parametrize("ck_dtypes", [
    pytest.param((torch.bfloat16,) * 4, id="ckpt=bf16"),
    pytest.param((torch.float32, torch.bfloat16, torch.float16, torch.bfloat16), id="ckpt=mixed"),
])
@pytest.mark.parametrize("base", param("base", BASES))
def test_low_precision_checkpoints_into_fp32_model(base, ck_dtypes, checkpoints, pretrained):
    """bf16 (or mixed fp32/bf16/fp16) checkpoints merge into an fp32 model accurately."""
    cast = [{k: v.to(dt) if v.is_floating_point() else v for k, v in ck.items()}
            for ck, dt in zip(checkpoints, ck_dtypes)]
    b = resolve_base(base, cast, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                  for k, v in pretrained.items()})
    model = fresh_net()
    before = storage_of(model)
    lcsc_fast.merge_into(model, cast, COEFFS, base=b)
    assert_same_storage(model, before)
    assert all(v.dtype == torch.float32 for v in model.parameters())
    assert_merged_close(model.state_dict(), cast, COEFFS, b)


@pytest.mark.parametrize("target_dtype", param("target", (torch.float16, torch.bfloat16)))
def test_fp32_checkpoints_into_16bit_model(target_dtype, checkpoints):
    """A half/bfloat16 model receives the float32 merge rounded once to its dtype."""
    model = fresh_net().to(target_dtype)
    before = storage_of(model)
    lcsc_fast.merge_into(model, checkpoints, COEFFS, base=-1)
    assert_same_storage(model, before)
    assert_merged_close(model.state_dict(), checkpoints, COEFFS, -1)


# ---------------------------------------------------------------- tied weights and aliasing

def test_tied_weights():
    """A Parameter registered under two names is merged once, stays shared and in place."""
    g = generator("tied")
    ckpts = [clone_state(randomised(TiedNet(), g).state_dict()) for _ in range(3)]
    assert "head.weight" in ckpts[0] and "embed.weight" in ckpts[0]
    model = fresh_net("tied-fresh", TiedNet)
    before = storage_of(model)
    coeffs = [0.5, 0.25, 0.25]
    lcsc_fast.merge_into(model, ckpts, coeffs)
    assert model.head.weight is model.embed.weight
    assert_same_storage(model, before)
    assert_merged_close(model.state_dict(), ckpts, coeffs)


@pytest.mark.parametrize("base", param("base", ("none", "live-index", "live-dict")))
@pytest.mark.parametrize("position", param("live", (0, 2, 3)))
def test_checkpoint_holding_the_models_own_tensors(position, base, checkpoints):
    """A checkpoint (or base) that is model.state_dict() itself, i.e. exactly aliases the tensors
    being written, gives the same bits as merging from a copy of it."""
    model = fresh_net()
    model.load_state_dict(checkpoints[position])
    live = model.state_dict()  # detached views of the model's own storage
    assert all(live[k].data_ptr() == v.data_ptr()
               for k, v in model.state_dict(keep_vars=True).items())
    listed = list(checkpoints)
    listed[position] = live
    live_base = {"none": None, "live-index": position, "live-dict": live}[base]
    copy_base = {"none": None, "live-index": position, "live-dict": checkpoints[position]}[base]

    expected = fresh_net("other")
    lcsc_fast.merge_into(expected, checkpoints, COEFFS, base=copy_base)
    before = storage_of(model)
    lcsc_fast.merge_into(model, listed, COEFFS, base=live_base)
    assert_same_storage(model, before)
    for k, v in expected.state_dict().items():
        assert_bitwise_equal(model.state_dict()[k], v, k)


# ---------------------------------------------------------------- many tensors, determinism

def _flat_target(g):
    """A dict target of 41 tensors of assorted sizes (0 to 10**5 elements) that are disjoint
    views of one flat float32 buffer, plus a num_batches_tracked-like counter."""
    sizes = [0, 1, 7, 4097, 10**5, 63, 64, 65, 1000, 3] * 4 + [12345]
    flat = torch.zeros(sum(sizes), dtype=torch.float32)
    target, offset = {}, 0
    for i, n in enumerate(sizes):
        target[f"t{i:02d}"] = flat[offset:offset + n]
        offset += n
    target["counter"] = torch.zeros((), dtype=torch.int64)
    ckpts = []
    for j in range(6):
        ck = {k: randn(v.shape, (torch.float32, torch.bfloat16, torch.float16)[j % 3], g)
              for k, v in target.items() if k != "counter"}
        ck["counter"] = torch.tensor(j * 10)
        ckpts.append(ck)
    return target, ckpts


def test_many_tensors_dict_target(restore_threads):
    """41 tensors of assorted sizes, packed into one flat buffer, are merged accurately, and
    1 vs 2 threads and repeated runs give the same bits."""
    g = generator("many")
    target, ckpts = _flat_target(g)
    coeffs = [0.1, 0.2, -0.3, 0.4, 0.5, 0.1]
    results = []
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        for v in target.values():
            v.fill_(0)
        lcsc_fast.merge_into(target, ckpts, coeffs, base=2)
        results.append({k: v.clone() for k, v in target.items()})
    assert_merged_close(target, ckpts, coeffs, 2)
    assert int(target["counter"]) == 50
    for other in results[1:]:
        for k, v in results[0].items():
            assert_bitwise_equal(other[k], v, k)


def test_module_merge_thread_invariant(restore_threads, checkpoints, pretrained):
    """Merging the module with 1 and with 2 threads gives bitwise equal state."""
    states = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = fresh_net()
        lcsc_fast.merge_into(model, checkpoints, COEFFS, base=pretrained)
        states.append(model.state_dict())
    for k, v in states[0].items():
        assert_bitwise_equal(states[1][k], v, k)


def test_base_index_and_equivalent_base_dict_agree(checkpoints):
    """base=i and base=<a copy of checkpoints[i]> both give theta_i + sum w (theta - theta_i)
    (computed differently: a folded coefficient vs an extra -sum(w) source)."""
    for i in (0, 3):
        a, b = fresh_net("a"), fresh_net("b")
        lcsc_fast.merge_into(a, checkpoints, COEFFS, base=i)
        lcsc_fast.merge_into(b, checkpoints, COEFFS, base=clone_state(checkpoints[i]))
        assert_merged_close(a.state_dict(), checkpoints, COEFFS, i)
        assert_merged_close(b.state_dict(), checkpoints, COEFFS, i)


# ---------------------------------------------------------------- MergePlan

@pytest.mark.parametrize("base", [None, 0, "dict"], ids=["base=none", "base=0", "base=dict"])
def test_plan_calls_equal_merge_into_bitwise(base, checkpoints, pretrained):
    """A MergePlan built once gives, call after call with new coefficients, the same bits as
    a fresh merge_into with those coefficients."""
    base = pretrained if base == "dict" else base
    planned, fresh = fresh_net("plan"), fresh_net("fresh")
    plan = lcsc_fast.MergePlan(planned, checkpoints, base=base)
    g = generator("plan-coeffs")
    for _ in range(3):
        coeffs = torch.randn(len(checkpoints), generator=g, dtype=torch.float64).tolist()
        assert plan(coeffs) is planned
        lcsc_fast.merge_into(fresh, checkpoints, coeffs, base=base)
        for name, t in fresh.state_dict().items():
            assert torch.equal(planned.state_dict()[name], t), name


def test_plan_reads_checkpoint_values_at_each_call(checkpoints):
    """The plan points at the checkpoints' tensors: values changed in place are merged."""
    net = fresh_net("plan-values")
    ckpts = [clone_state(c) for c in checkpoints]
    plan = lcsc_fast.MergePlan(net, ckpts)
    one_hot = [0.0] * len(ckpts)
    one_hot[0] = 1.0
    name = next(k for k, v in ckpts[0].items() if v.is_floating_point())
    ckpts[0][name].mul_(2)
    plan(one_hot)
    assert torch.equal(net.state_dict()[name], ckpts[0][name].to(net.state_dict()[name].dtype))


def test_plan_refuses_a_target_whose_tensors_were_replaced(checkpoints):
    """A parameter reassigned after planning (or a model moved) is refused, not silently
    missed: the plan would write into the old storage."""
    net = fresh_net("plan-stale")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    name, param = next(iter(net.named_parameters()))
    module = net.get_submodule(name.rpartition(".")[0])
    setattr(module, name.rpartition(".")[2], nn.Parameter(param.detach().clone()))
    with pytest.raises(ValueError, match=rf"target\['{re.escape(name)}'\] was replaced"):
        plan([1.0 / len(checkpoints)] * len(checkpoints))


def test_plan_refuses_checkpoint_storage_freed_since_planning(checkpoints):
    """A checkpoint (or base) tensor whose storage was swapped out and freed (`.data = ...`)
    is refused by name, not read: the plan points into the old storage. Nothing is written."""
    def stale(base, edit):
        net = fresh_net("plan-freed")
        ckpts = [clone_state(c) for c in checkpoints]
        base_arg = {k: v.clone() for k, v in ckpts[0].items()} if base == "dict" else base
        plan = lcsc_fast.MergePlan(net, ckpts, base=base_arg)
        name = edit(ckpts, base_arg)
        before = clone_state(net.state_dict())
        return plan, name, net, before

    w = [1.0 / len(checkpoints)] * len(checkpoints)
    for base, who in ((None, "checkpoints[2]"), (0, "checkpoints[0]"), ("dict", "base")):
        def edit(ckpts, base_arg, who=who):
            state = base_arg if who == "base" else ckpts[int(who[-2])]
            name = next(k for k, v in state.items() if v.is_floating_point())
            state[name].data = state[name].detach().clone()  # the old storage is freed
            return name
        plan, name, net, before = stale(base, edit)
        with pytest.raises(ValueError, match=rf"^{re.escape(who)}\['{re.escape(name)}'\]: the "
                                             "storage this MergePlan reads was freed"):
            plan(w)
        with pytest.raises(ValueError, match=r"storage this MergePlan reads was freed"):
            plan.merge_batched([w], [clone_state(net.state_dict())])
        for k, t in net.state_dict().items():
            assert torch.equal(before[k], t), k


def test_plan_checks_integer_entries_before_writing(checkpoints):
    """The last checkpoint's num_batches_tracked, resized after planning, is refused before
    any float tensor is merged (its copy comes last)."""
    net = fresh_net("plan-int-resized")
    ckpts = [clone_state(c) for c in checkpoints]
    plan = lcsc_fast.MergePlan(net, ckpts)
    ckpts[-1]["bn.num_batches_tracked"].resize_(3)
    before = clone_state(net.state_dict())
    with pytest.raises(ValueError, match=r"checkpoints\[3\]\['bn\.num_batches_tracked'\]: "
                                         r"shape \(3,\)"):
        plan([0.25] * 4)
    for k, t in net.state_dict().items():
        assert torch.equal(before[k], t), k


def test_writes_are_seen_by_autograd(checkpoints):
    """Every op tells autograd it wrote in place, as torch's own in-place ops do: a graph that
    saved a tensor before the write refuses to backward instead of using the new values."""
    def assert_backward_refused(t, write):
        x = torch.randn(t.shape, requires_grad=True)
        y = (x * t).sum()  # saves t for x's gradient
        version = t._version
        write()
        assert t._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()

    out = torch.zeros(6)
    assert_backward_refused(out, lambda: lcsc_fast.weighted_sum(out, [torch.ones(6)], [2.0]))
    outs = [torch.zeros(6), torch.zeros(6)]
    assert_backward_refused(outs[1], lambda: lcsc_fast.weighted_sum_batched(
        outs, [torch.ones(6)], [[1.0], [2.0]]))
    net = fresh_net("autograd")
    w = [1.0 / len(checkpoints)] * len(checkpoints)
    assert_backward_refused(net.fc.weight, lambda: lcsc_fast.merge_into(net, checkpoints, w))
    plan = lcsc_fast.MergePlan(net, checkpoints)
    assert_backward_refused(net.fc.weight, lambda: plan(w))
    cand = clone_state(net.state_dict())
    assert_backward_refused(cand["fc.weight"], lambda: plan.merge_batched([w], [cand]))
    out = torch.zeros(4, 5)
    assert_backward_refused(out, lambda: lcsc_fast.lora_weighted_sum(
        out, [torch.ones(2, 5)], [torch.ones(4, 2)], [1.0]))
    with torch.inference_mode():  # no version counter to bump: still merged
        frozen = torch.zeros(6)
    lcsc_fast.weighted_sum(frozen, [torch.ones(6)], [2.0])
    assert torch.equal(frozen, torch.full((6,), 2.0))


def test_plan_checks_coefficients_at_each_call(checkpoints):
    """Coefficients are validated per call like merge_into's; the target stays untouched."""
    net = fresh_net("plan-coeffs-bad")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    before = clone_state(net.state_dict())
    with pytest.raises(ValueError, match=r"coeffs: 2 coefficients for"):
        plan([0.5, 0.5])
    with pytest.raises(ValueError, match=r"coeffs\[1\] is nan"):
        plan([0.5, float("nan")] + [0.0] * (len(checkpoints) - 2))
    for name, t in net.state_dict().items():
        assert torch.equal(before[name], t), name


@pytest.mark.parametrize("base", [None, 0, "dict"], ids=["base=none", "base=0", "base=dict"])
def test_plan_merge_batched_equals_single_merges(base, checkpoints, pretrained):
    """MergePlan.merge_batched writes K candidates in one pass over the checkpoints; each output
    holds the same bits as the plan called with that row (integer tensors are not outputs)."""
    base = pretrained if base == "dict" else base
    net = fresh_net("plan-batched")
    plan = lcsc_fast.MergePlan(net, checkpoints, base=base)
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    g = generator("plan-batched-coeffs")
    rows = torch.randn(5, len(checkpoints), generator=g, dtype=torch.float64).tolist()
    outs = [{k: torch.full_like(v, float("nan")) for k, v in floats.items()} for _ in rows]
    plan.merge_batched(rows, outs)
    for row, out in zip(rows, outs):
        plan(row)
        for name, t in out.items():
            assert torch.equal(t, net.state_dict()[name]), name


def test_plan_visits_tensors_in_the_first_checkpoints_memory_order():
    """A plan's tensors follow the first checkpoint's memory, not their names (here each
    checkpoint is one flat buffer laid out against name order), so every checkpoint is read
    in one forward sweep; single and batched merges stay exact."""
    g = generator("memory-order")
    sizes = {"a": 5000, "b": 7, "c": 4097, "d": 0, "e": 300}
    layout = ["e", "c", "a", "d", "b"]  # names in their order in memory ("d": empty)
    ckpts = []
    for _ in range(3):
        flat, ck, offset = randn((sum(sizes.values()),), torch.float32, g), {}, 0
        for name in layout:
            ck[name] = flat[offset:offset + sizes[name]]
            offset += sizes[name]
        ckpts.append(ck)
    target = {name: torch.zeros(n) for name, n in sizes.items()}
    plan = lcsc_fast.MergePlan(target, ckpts)
    assert [name for name in plan._plan.names if sizes[name]] == ["e", "c", "a", "b"]
    coeffs = [0.5, -0.25, 0.75]
    plan(coeffs)
    assert_merged_close(target, ckpts, coeffs)
    outs = [{name: torch.full((n,), float("nan")) for name, n in sizes.items()}
            for _ in range(2)]
    plan.merge_batched([coeffs, coeffs], outs)
    for out in outs:
        for name, t in out.items():
            assert torch.equal(t, target[name]), name


def test_plan_merge_batched_refuses_bad_outputs(checkpoints):
    """An output missing a tensor, or shaped otherwise, is named; nothing is written."""
    net = fresh_net("plan-batched-bad")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    name = next(iter(floats))
    outs = [{k: torch.zeros_like(v) for k, v in floats.items()} for _ in range(2)]
    del outs[1][name]
    rows = [[1.0 / len(checkpoints)] * len(checkpoints)] * 2
    with pytest.raises(ValueError, match=rf"outs\[1\] has no tensor '{re.escape(name)}'"):
        plan.merge_batched(rows, outs)
    outs[1][name] = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"outs\[1\]\['{re.escape(name)}'\]: shape"):
        plan.merge_batched(rows, outs)
    assert all(torch.count_nonzero(t) == 0 for t in outs[0].values())


def test_plan_merge_batched_names_every_bad_output(checkpoints):
    """One call names every bad output, of whatever kind: first the dicts that are not dicts or
    lack tensors, then the bad tensors (the first problem's error type); an entry set to None is
    a bad tensor, not a missing one; nothing is written."""
    net = fresh_net("plan-batched-several-bad")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    a, b = list(floats)[:2]
    outs = [{k: torch.zeros_like(v) for k, v in floats.items()} for _ in range(5)]
    del outs[0][a], outs[0][b]
    outs[2][b] = torch.zeros(3)
    outs[3][a] = None
    outs[4] = [outs[4][a]]
    rows = [[1.0 / len(checkpoints)] * len(checkpoints)] * 5
    with pytest.raises(ValueError) as caught:
        plan.merge_batched(rows, outs)
    message = str(caught.value)
    expected = [rf"outs\[0\] has no tensor '({re.escape(a)}|{re.escape(b)})', "
                rf"'({re.escape(a)}|{re.escape(b)})'",
                r"outs\[4\]: expected a dict of tensors, got list",
                rf"outs\[3\]\['{re.escape(a)}'\]: expected a torch.Tensor, got NoneType",
                rf"outs\[2\]\['{re.escape(b)}'\]: shape \(3,\)"]
    at = [re.search(pattern, message) for pattern in expected]
    assert all(at), message
    assert message.startswith("outs[0] has no tensor")
    assert "and 3 more" in message
    assert at[0].start() == 0 and at[1].start() < min(at[2].start(), at[3].start())
    assert all(torch.count_nonzero(t) == 0 for out in outs[1:4] for t in out.values()
               if t is not None)
    assert plan._batched is None


def test_plan_merge_batched_writes_the_outputs_it_is_given_now(checkpoints):
    """merge_batched keeps its native tables only for the very output tensors they were built
    for. A tensor replaced in an output dict, or one whose storage, shape or dtype changed in
    place, is validated afresh: a valid one receives the merge (the old storage keeps its
    bits), a bad one is named and nothing is written."""
    net = fresh_net("plan-batched-replaced")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    name = next(iter(floats))
    g = generator("plan-batched-replaced-coeffs")

    def merge(outs):
        """merge_batched with fresh rows into outs; each output checked against plan(row)."""
        rows = torch.randn(len(outs), len(checkpoints), generator=g, dtype=torch.float64)
        plan.merge_batched(rows.tolist(), outs)
        for row, out in zip(rows.tolist(), outs):
            plan(row)
            for k, t in out.items():
                assert_bitwise_equal(t, net.state_dict()[k], k)

    outs = [{k: torch.zeros_like(v) for k, v in floats.items()} for _ in range(2)]
    merge(outs)
    old = outs[1][name]
    old_bits = old.clone()
    outs[1][name] = torch.full_like(old, float("nan"))  # replaced in the same dict
    merge(outs)
    assert_bitwise_equal(old, old_bits, "the replaced tensor")

    t = outs[0][name]
    alias = t.view_as(t)  # keeps the old storage alive, and shows whether it is written
    alias_bits = alias.clone()
    with torch.no_grad():
        t.set_(torch.full_like(t, float("nan")))  # same tensor object, new storage
    merge(outs)
    assert_bitwise_equal(alias, alias_bits, "the storage the tensor held before")

    def refused(error, match):
        before = [{k: v.clone() for k, v in out.items()} for out in outs]
        with pytest.raises(error, match=match):
            plan.merge_batched([[1.0 / len(checkpoints)] * len(checkpoints)] * 2, outs)
        for out, kept in zip(outs, before):
            for k, v in out.items():
                assert_bitwise_equal(v, kept[k], k)

    shape = tuple(outs[1][name].shape)
    outs[1][name] = torch.zeros(3)  # replaced by a tensor of the wrong shape
    refused(ValueError, rf"outs\[1\]\['{re.escape(name)}'\]: shape \(3,\)")
    outs[1][name] = torch.zeros(shape)
    merge(outs)
    t = outs[1][name]
    t.data = t.view(torch.int32)  # same storage and object, another dtype
    refused(TypeError, rf"outs\[1\]\['{re.escape(name)}'\]: dtype torch\.int32")
    t.data = t.view(torch.float32)
    merge(outs)
    with torch.no_grad():
        t.set_(t.untyped_storage(), 0, (1,))  # same storage and object, another shape
    refused(ValueError, rf"outs\[1\]\['{re.escape(name)}'\]: shape \(1,\)")


def test_plan_merge_batched_needs_a_candidate(checkpoints):
    """No outputs at all is a ValueError (not an IndexError); a single dict instead of a
    list of them is a TypeError."""
    net = fresh_net("plan-batched-empty")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    with pytest.raises(ValueError, match=r"outs: at least one candidate"):
        plan.merge_batched([], [])
    out = {k: torch.zeros_like(v) for k, v in net.state_dict().items() if v.is_floating_point()}
    with pytest.raises(TypeError, match=r"outs: expected a sequence of dicts"):
        plan.merge_batched([[0.25] * len(checkpoints)], out)
    assert all(torch.count_nonzero(t) == 0 for t in out.values())


def test_coefficients_are_real_numbers(checkpoints):
    """ints, numpy real scalars (float32, int64), 0-d float tensors and numpy arrays give the
    bits of the same Python floats; a bool, a numpy bool or a string (float() would take
    them as 1 or 2) is a TypeError naming the coefficient, for merge_into, a plan call and
    merge_batched alike, and nothing is written."""
    want = fresh_net("real-coeffs")
    lcsc_fast.merge_into(want, checkpoints, [1.0, -2.0, 0.5, 0.25])
    for coeffs in ([1, -2, 0.5, 0.25], [np.float32(1), np.int64(-2), np.float64(0.5), 0.25],
                   [torch.tensor(1.0), torch.tensor(-2.0, dtype=torch.float64), 0.5, 0.25],
                   np.array([1.0, -2.0, 0.5, 0.25], dtype=np.float32)):
        net = fresh_net("real-coeffs-other")
        lcsc_fast.merge_into(net, checkpoints, coeffs)
        for k, v in want.state_dict().items():
            assert_bitwise_equal(net.state_dict()[k], v, k)

    net = fresh_net("real-coeffs-refused")
    plan = lcsc_fast.MergePlan(net, checkpoints)
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    outs = [{k: torch.zeros_like(v) for k, v in floats.items()}]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for bad, match in (([0.5, True, 0.0, 0.5], r"coeffs\[1\]: expected a real number, got bool"),
                       ([0.5, 0.0, np.bool_(True), 0.5], r"coeffs\[2\]: .* got bool"),
                       ([0.5, 0.0, 0.0, "0.5"], r"coeffs\[3\]: expected a real number, got str"),
                       ("1234", r"coeffs: expected a sequence of numbers, got str")):
        with pytest.raises(TypeError, match=match):
            lcsc_fast.merge_into(net, checkpoints, bad)
        with pytest.raises(TypeError, match=match):
            plan(bad)
        with pytest.raises(TypeError, match=match.replace("coeffs", "coeffs row 0", 1)):
            plan.merge_batched([bad], outs)
    for k, v in net.state_dict().items():
        assert_bitwise_equal(v, before[k], k)
    assert all(torch.count_nonzero(t) == 0 for t in outs[0].values())


@pytest.mark.cuda
def test_cuda_plan_runs_again_from_tables_kept_on_the_device():
    """From its second run a CUDA MergePlan keeps its tables (pointers, sizes, dtypes) on the
    device and moves only the coefficients. Every run, with new coefficients each time and
    one on another stream, equals the CPU engine's merge bit for bit."""
    g = generator("cuda plan reuse")
    shapes = {"a": (3, 2048 + 5), "b": (7,), "c": (4096,), "d": (2, 2, 1000)}
    on_cpu = [{k: randn(s, torch.bfloat16, g) for k, s in shapes.items()} for _ in range(6)]
    on_cuda = [{k: v.cuda() for k, v in c.items()} for c in on_cpu]
    target = {k: torch.empty(s, device="cuda") for k, s in shapes.items()}
    expected = {k: torch.empty(s) for k, s in shapes.items()}
    plan = lcsc_fast.MergePlan(target, on_cuda, base=0)
    cpu_plan = lcsc_fast.MergePlan(expected, on_cpu, base=0)
    side = torch.cuda.Stream()
    for run in range(4):
        w = (torch.randn(6, generator=g) / 3).tolist()
        if run == 2:
            with torch.cuda.stream(side):
                plan(w)
            side.synchronize()
        else:
            plan(w)
        cpu_plan(w)
        for name in shapes:
            assert_bitwise_equal(target[name], expected[name], f"run {run}, {name}")
