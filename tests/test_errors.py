"""Bad inputs raise ValueError or TypeError whose message names the offending tensor, and
nothing is written: every output / target tensor (and every input) keeps its exact bits.

Each case below starts from a valid call, breaks one thing, and checks the exception type, the
message (pytest.raises(match=...)) and, via a bitwise snapshot, that nothing changed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lcsc_fast
from conftest import assert_unchanged, generator, randn, snapshot, src_dtype

NUMEL = 64


def expect_error(exc, match, call, untouched):
    """call() raises exc matching `match`; the tensors in `untouched` keep their bits."""
    snap = snapshot(untouched)
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(untouched, snap)


# ---------------------------------------------------------------- weighted_sum

class WS:
    """A valid weighted_sum call (out fp32, 4 mixed-dtype sources, a bf16 base) to break."""

    def __init__(self):
        g = generator("errors-ws")
        self.g = g
        self.out = randn(NUMEL, torch.float32, g)
        self.sources = [randn(NUMEL, src_dtype("mixed", i), g) for i in range(4)]
        self.coeffs = [0.5, -1.0, 0.25, 2.0]
        self.base = randn(NUMEL, torch.bfloat16, g)
        self.keep = []  # extra tensors (e.g. buffers under views) that must stay unchanged

    def call(self):
        return lcsc_fast.weighted_sum(self.out, self.sources, self.coeffs, base=self.base)

    def tensors(self):
        ts = [self.out, self.base, *self.keep]
        if isinstance(self.sources, (list, tuple)):
            ts += [s for s in self.sources if isinstance(s, torch.Tensor)]
        # Plain arrays only: a mutation keeps the bytes under any other kind in keep.
        return [t for t in ts if isinstance(t, torch.Tensor) and t.layout == torch.strided
                and not t.is_nested and not t.is_neg()]


def _set_source(i, make):
    def mutate(c):
        c.sources[i] = make(c)
    return mutate


def _set(attr, make):
    def mutate(c):
        setattr(c, attr, make(c))
    return mutate


def _partial_overlap_out_source(c):
    buf = randn(NUMEL + 1, torch.float32, c.g)
    c.keep.append(buf)
    c.out, c.sources[0] = buf[1:], buf[:-1]


def _partial_overlap_out_base(c):
    buf = randn(NUMEL + 2, torch.float32, c.g)
    c.keep.append(buf)
    c.out, c.base = buf[:-2], buf[2:]


def _same_bytes_other_dtype(c):
    h = randn(NUMEL, torch.float16, c.g)
    c.out, c.sources[1] = h, h.view(torch.bfloat16)


def _quietly(make):
    """make(c) without torch's beta/prototype warnings (sparse CSR, nested tensors)."""
    def quiet(c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return make(c)
    return quiet


def _negated(t, c):
    c.keep.append(t)  # the bytes under the view must keep their bits
    return torch._neg_view(t)


def _non_contiguous_out(c):
    big = randn(2 * NUMEL, torch.float32, c.g)
    c.keep.append(big)
    c.out = big[::2]


WS_CASES = [
    ("float64 source", TypeError, r"sources\[2\]: dtype torch\.float64",
     _set_source(2, lambda c: c.sources[2].double())),
    ("int source", TypeError, r"sources\[1\]: dtype torch\.int32",
     _set_source(1, lambda c: torch.arange(NUMEL, dtype=torch.int32))),
    ("bool source", TypeError, r"sources\[3\]: dtype torch\.bool",
     _set_source(3, lambda c: torch.zeros(NUMEL, dtype=torch.bool))),
    ("float64 out", TypeError, r"^out: dtype torch\.float64",
     _set("out", lambda c: c.out.double())),
    ("int out", TypeError, r"^out: dtype torch\.int64",
     _set("out", lambda c: torch.arange(NUMEL))),
    ("float64 base", TypeError, r"^base: dtype torch\.float64",
     _set("base", lambda c: c.base.double())),
    ("non-contiguous source", ValueError, r"sources\[1\]: .*contiguous",
     _set_source(1, lambda c: randn(2 * NUMEL, torch.float16, c.g)[::2])),
    ("expanded (stride 0) source", ValueError, r"sources\[0\]: .*contiguous",
     _set_source(0, lambda c: torch.ones(1).expand(NUMEL))),
    ("non-contiguous out", ValueError, r"^out: .*contiguous", _non_contiguous_out),
    ("non-contiguous base", ValueError, r"^base: .*contiguous",
     _set("base", lambda c: randn(2 * NUMEL, torch.float32, c.g)[1::2])),
    ("source too long", ValueError, r"sources\[2\]: shape \(65,\)",
     _set_source(2, lambda c: randn(NUMEL + 1, torch.float32, c.g))),
    ("source reshaped", ValueError, r"sources\[0\]: shape \(8, 8\)",
     _set_source(0, lambda c: c.sources[0].reshape(8, 8))),
    ("base shape", ValueError, r"^base: shape \(63,\)",
     _set("base", lambda c: randn(NUMEL - 1, torch.float32, c.g))),
    ("too few coeffs", ValueError, r"coeffs: 3 coefficients for 4 sources",
     _set("coeffs", lambda c: c.coeffs[:3])),
    ("too many coeffs", ValueError, r"coeffs: 5 coefficients for 4 sources",
     _set("coeffs", lambda c: c.coeffs + [1.0])),
    ("nan coeff", ValueError, r"coeffs\[3\] is nan",
     _set("coeffs", lambda c: [0.5, -1.0, 0.25, math.nan])),
    ("inf coeff", ValueError, r"coeffs\[1\] is inf",
     _set("coeffs", lambda c: [0.5, math.inf, 0.25, 2.0])),
    ("-inf coeff in a tensor", ValueError, r"coeffs\[0\] is -inf",
     _set("coeffs", lambda c: torch.tensor([-math.inf, 1.0, 0.25, 2.0]))),
    ("None coeff", TypeError, r"coeffs", _set("coeffs", lambda c: [0.5, None, 0.25, 2.0])),
    # Coefficients are real numbers: float() would take True as 1 and "2" as 2.
    ("bool coeff", TypeError, r"^coeffs\[1\]: expected a real number, got bool",
     _set("coeffs", lambda c: [0.5, True, 0.25, 2.0])),
    ("numpy bool coeff", TypeError, r"^coeffs\[3\]: expected a real number, got bool",
     _set("coeffs", lambda c: [0.5, -1.0, 0.25, np.bool_(True)])),
    ("numpy bool array", TypeError, r"^coeffs\[0\]: expected a real number, got bool",
     _set("coeffs", lambda c: np.array([True, False, True, True]))),
    ("bool tensor", TypeError, r"^coeffs\[0\]: expected a real number, got bool",
     _set("coeffs", lambda c: torch.tensor([True, False, True, True]))),
    ("0-d bool tensor coeff", TypeError, r"^coeffs\[2\]: expected a real number, got Tensor",
     _set("coeffs", lambda c: [0.5, -1.0, torch.tensor(True), 2.0])),
    ("string coeff", TypeError, r"^coeffs\[2\]: expected a real number, got str",
     _set("coeffs", lambda c: [0.5, -1.0, "0.25", 2.0])),
    ("string of digits as coeffs", TypeError, r"^coeffs: expected a sequence of numbers, got str",
     _set("coeffs", lambda c: "1234")),
    ("complex coeff", TypeError, r"^coeffs\[0\]: expected a real number, got complex",
     _set("coeffs", lambda c: [0.5 + 0j, -1.0, 0.25, 2.0])),
    ("coeffs in a set", TypeError, r"^coeffs: expected a sequence of numbers, got set",
     _set("coeffs", lambda c: {0.5, -1.0, 0.25, 2.0})),
    ("no sources", ValueError, r"sources: at least one", _set("sources", lambda c: [])),
    ("sources is a tensor", TypeError, r"sources: expected a sequence",
     _set("sources", lambda c: torch.stack([s.float() for s in c.sources]))),
    ("source not a tensor", TypeError, r"sources\[1\]: expected a torch\.Tensor",
     _set_source(1, lambda c: c.sources[1].tolist())),
    ("out not a tensor", TypeError, r"^out: expected a torch\.Tensor",
     _set("out", lambda c: c.out.tolist())),
    ("out partially overlaps a source", ValueError, r"^out overlaps sources\[0\] in memory",
     _partial_overlap_out_source),
    ("out partially overlaps the base", ValueError, r"^out overlaps base in memory",
     _partial_overlap_out_base),
    ("out shares bytes with a source of another dtype", ValueError,
     r"^out overlaps sources\[1\] in memory", _same_bytes_other_dtype),
    # The engine reads raw memory: a lazily negated view holds -x there, other layouts no array.
    ("negated view as a source", ValueError, r"^sources\[2\]: .*negative bit .*resolve_neg",
     _set_source(2, lambda c: _negated(c.sources[2], c))),
    ("negated view as out", ValueError, r"^out: .*negative bit",
     _set("out", lambda c: _negated(c.out, c))),
    ("negated view as the base", ValueError, r"^base: .*negative bit",
     _set("base", lambda c: _negated(c.base, c))),
    ("sparse COO source", TypeError, r"^sources\[1\]: a tensor of layout torch\.sparse_coo",
     _set_source(1, lambda c: c.sources[1].to_sparse())),
    ("sparse CSR source of out's size", TypeError,
     r"^sources\[0\]: a tensor of layout torch\.sparse_csr",
     _set_source(0, _quietly(lambda c: c.sources[0].float().reshape(8, 8).to_sparse_csr()))),
    ("mkldnn source", TypeError, r"^sources\[3\]: a tensor of layout torch\._mkldnn",
     _set_source(3, lambda c: c.sources[3].float().to_mkldnn())),
    ("nested source", TypeError, r"^sources\[1\]: a nested tensor",
     _set_source(1, _quietly(lambda c: torch.nested.nested_tensor([c.sources[1].float()])))),
    ("sparse out", TypeError, r"^out: a tensor of layout torch\.sparse_coo",
     _set("out", lambda c: c.out.to_sparse())),
    ("int coeff beyond float64", ValueError, r"^coeffs\[0\] is beyond float32's range",
     _set("coeffs", lambda c: [10**400, -1, 0, 2])),
]


@pytest.mark.parametrize("exc,match,mutate", [pytest.param(*c[1:], id=c[0]) for c in WS_CASES])
def test_weighted_sum_rejects(exc, match, mutate):
    """weighted_sum refuses the input, names it, and leaves out (and all inputs) unchanged."""
    c = WS()
    mutate(c)
    expect_error(exc, match, c.call, c.tensors())


def test_coefficient_outside_float32_range_is_rejected():
    """A coefficient that is finite in float64 but overflows float32 (1e39) is rejected like an
    infinite one, instead of silently turning the output into inf/NaN."""
    c = WS()
    c.coeffs = [0.5, 1e39, 0.25, 2.0]
    expect_error(ValueError, r"coeffs\[1\]", c.call, c.tensors())


# ---------------------------------------------------------------- weighted_sum_batched

class Batched(WS):
    """A valid batched call: K=3 fp16 outputs, N=4 sources, coeffs 3 x 4."""

    def __init__(self):
        super().__init__()
        self.outs = [randn(NUMEL, torch.float16, self.g) for _ in range(3)]
        self.coeffs = [[0.5, -1.0, 0.25, 2.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]

    def call(self):
        return lcsc_fast.weighted_sum_batched(self.outs, self.sources, self.coeffs,
                                              base=self.base)

    def tensors(self):
        outs = self.outs if isinstance(self.outs, list) else [self.outs]
        return super().tensors() + [o for o in outs if isinstance(o, torch.Tensor)]


def _set_out(k, make):
    def mutate(c):
        c.outs[k] = make(c)
    return mutate


def _outs_partial_overlap(c):
    buf = randn(NUMEL + 3, torch.float16, c.g)
    c.keep.append(buf)
    c.outs[0], c.outs[2] = buf[:-3], buf[3:]


def _out_overlaps_source(c):
    buf = randn(NUMEL + 1, torch.float16, c.g)
    c.keep.append(buf)
    c.outs[2], c.sources[1] = buf[1:], buf[:-1]


BATCHED_CASES = [
    ("too few rows", ValueError, r"coeffs: 2 rows for 3 outputs",
     _set("coeffs", lambda c: c.coeffs[:2])),
    ("too many rows", ValueError, r"coeffs: 4 rows for 3 outputs",
     _set("coeffs", lambda c: c.coeffs + [c.coeffs[0]])),
    ("a flat vector instead of K x N", ValueError, r"coeffs: 4 rows for 3 outputs",
     _set("coeffs", lambda c: c.coeffs[0])),
    ("short row", ValueError, r"coeffs row 1: 3 coefficients for 4 sources",
     _set("coeffs", lambda c: [c.coeffs[0], c.coeffs[1][:3], c.coeffs[2]])),
    ("nan in row 2", ValueError, r"coeffs row 2\[0\] is nan",
     _set("coeffs", lambda c: [c.coeffs[0], c.coeffs[1], [math.nan, 0.2, 0.3, 0.4]])),
    ("inf in a tensor row 0", ValueError, r"coeffs row 0\[3\] is inf",
     _set("coeffs", lambda c: torch.tensor([[0.5, -1.0, 0.25, math.inf]] + c.coeffs[1:]))),
    ("bool in row 1", TypeError, r"^coeffs row 1\[0\]: expected a real number, got bool",
     _set("coeffs", lambda c: [c.coeffs[0], [True, 0.0, 0.0, 0.0], c.coeffs[2]])),
    ("string row", TypeError, r"^coeffs row 2: expected a sequence of numbers, got str",
     _set("coeffs", lambda c: c.coeffs[:2] + ["1234"])),
    ("rows of a string", TypeError, r"^coeffs: expected K x N numbers",
     _set("coeffs", lambda c: "123")),
    ("outs[1] shape", ValueError, r"outs\[1\]: shape \(65,\)",
     _set_out(1, lambda c: randn(NUMEL + 1, torch.float16, c.g))),
    ("outs[2] dtype differs", TypeError, r"outs\[2\]: dtype torch\.bfloat16",
     _set_out(2, lambda c: randn(NUMEL, torch.bfloat16, c.g))),
    ("outs[1] float64", TypeError, r"outs\[1\]: dtype torch\.float64",
     _set_out(1, lambda c: randn(NUMEL, torch.float64, c.g))),
    ("outs[1] non-contiguous", ValueError, r"outs\[1\]: .*contiguous",
     _set_out(1, lambda c: randn(2 * NUMEL, torch.float16, c.g)[::2])),
    ("outs[0] is outs[1]", ValueError, r"outs\[(1\] and outs\[0|0\] and outs\[1)\] share memory",
     _set_out(1, lambda c: c.outs[0])),
    ("outs[2] partially overlaps outs[0]", ValueError,
     r"outs\[(2\] and outs\[0|0\] and outs\[2)\] share memory", _outs_partial_overlap),
    ("outs[2] partially overlaps a source", ValueError, r"outs\[2\] overlaps sources\[1\]",
     _out_overlaps_source),
    ("no outs", TypeError, r"outs: expected a non-empty sequence", _set("outs", lambda c: [])),
    ("outs is a tensor", TypeError, r"outs: expected",
     _set("outs", lambda c: torch.stack(c.outs))),
    ("float64 source", TypeError, r"sources\[3\]: dtype torch\.float64",
     _set_source(3, lambda c: c.sources[3].double())),
    ("source shape", ValueError, r"sources\[0\]: shape \(63,\) differs from outs\[0\]",
     _set_source(0, lambda c: randn(NUMEL - 1, torch.float32, c.g))),
    ("no sources", ValueError, r"sources: at least one", _set("sources", lambda c: [])),
]


@pytest.mark.parametrize("exc,match,mutate",
                         [pytest.param(*c[1:], id=c[0]) for c in BATCHED_CASES])
def test_weighted_sum_batched_rejects(exc, match, mutate):
    """weighted_sum_batched refuses the input, names it, and leaves every output unchanged."""
    c = Batched()
    mutate(c)
    expect_error(exc, match, c.call, c.tensors())


# ---------------------------------------------------------------- merge_into

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 2)
        self.proj = nn.Linear(2, 2, bias=False)


class Merge:
    """A valid merge_into call: a random Net and 3 random checkpoints of it, base None."""

    def __init__(self):
        g = generator("errors-merge")
        self.g = g
        self.model = self.target = Net()
        with torch.no_grad():
            for t in self.target.state_dict(keep_vars=True).values():
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g))
                else:
                    t.fill_(5)
        names = self.target.state_dict()
        self.checkpoints = [
            {k: randn(v.shape, v.dtype, g) if v.is_floating_point() else torch.tensor(i + 1)
             for k, v in names.items()} for i in range(3)]
        self.coeffs = [0.2, 0.3, 0.5]
        self.base = None
        self.keep = []

    def call(self):
        return lcsc_fast.merge_into(self.target, self.checkpoints, self.coeffs, base=self.base)

    def tensors(self):
        """The model's tensors, the target's (when it is another dict or tensor) and keep."""
        ts = list(self.keep) + list(self.model.state_dict(keep_vars=True).values())
        if isinstance(self.target, torch.Tensor):
            ts.append(self.target)
        elif isinstance(self.target, dict):
            ts += [t for t in self.target.values() if isinstance(t, torch.Tensor)]
        return [t for t in ts if t.device.type != "meta"]  # a meta tensor holds no bits


def _ck(i, name, make):
    def mutate(c):
        c.checkpoints[i][name] = make(c, c.checkpoints[i][name])
    return mutate


def _add(i, name):
    def mutate(c):
        c.checkpoints[i][name] = randn(3, torch.float32, c.g)
    return mutate


def _del(i, name):
    def mutate(c):
        del c.checkpoints[i][name]
    return mutate


def _base_dict(edit):
    def mutate(c):
        c.base = {k: v.clone() for k, v in c.checkpoints[0].items()}
        edit(c, c.base)
    return mutate


def _dict_target_overlapping(c):
    buf = randn(20, torch.float32, c.g)
    c.keep.append(buf)
    c.target = {"a": buf[0:12], "b": buf[8:20]}
    c.checkpoints = [{"a": randn(12, torch.float32, c.g), "b": randn(12, torch.float32, c.g)}
                     for _ in range(3)]


def _live_tensor_under_another_name(c):
    c.checkpoints[0]["bn.bias"] = c.target.conv.bias.detach()


def _float64_model(c):
    c.target = c.target.double()


def _complex_buffer(c):
    c.model.register_buffer("phase", torch.full((2,), 1 + 1j, dtype=torch.complex64))
    for i, ck in enumerate(c.checkpoints):
        ck["phase"] = torch.full((2,), 3 + 3j * i, dtype=torch.complex64)


def _float_and_int(make_target, edit=None):
    """A dict target of a float tensor 'w' and integer ones (make_target(c, w)) and three
    checkpoints of fresh tensors, which edit(c) may change."""
    def mutate(c):
        w = randn(4, torch.float32, c.g)
        c.keep.append(w)
        c.target = make_target(c, w)
        c.checkpoints = [{name: randn(4, torch.float32, c.g) if name == "w"
                          else torch.full(t.shape, 7 + i, dtype=t.dtype)
                          for name, t in c.target.items()} for i in range(3)]
        if edit is not None:
            edit(c)
    return mutate


def _int_view_of_float_source(c):
    c.checkpoints[1]["w"] = c.target["n"].view(torch.float32)
    c.keep.append(c.checkpoints[1]["w"])


def _float_target_copied_from(c):
    c.checkpoints[2]["n"] = c.target["w"].view(torch.int32)


def _int_target_copied_into_another(c):
    c.checkpoints[2]["b"] = c.target["a"]  # read after target 'a' was written


def _shared_int_buffer(c, w):
    buf = torch.zeros(5, dtype=torch.int64)
    c.keep.append(buf)
    return {"w": w, "a": buf[:3], "b": buf[2:]}


MERGE_CASES = [
    ("missing name", ValueError,
     r"checkpoints\[1\] does not match the target's tensors: missing 'fc\.bias'",
     _del(1, "fc.bias")),
    ("missing num_batches_tracked", ValueError,
     r"checkpoints\[0\] .*missing 'bn\.num_batches_tracked'", _del(0, "bn.num_batches_tracked")),
    ("extra name", ValueError, r"checkpoints\[2\] .*unexpected 'extra\.weight'",
     _add(2, "extra.weight")),
    ("shape mismatch", ValueError, r"checkpoints\[1\]\['fc\.weight'\]: shape \(3, 12\)",
     _ck(1, "fc.weight", lambda c, _: randn((3, 12), torch.float32, c.g))),
    ("shape mismatch in the last tensor merged", ValueError,
     r"checkpoints\[2\]\['proj\.weight'\]: shape",
     _ck(2, "proj.weight", lambda c, v: v.reshape(4))),
    ("float64 tensor", TypeError, r"checkpoints\[0\]\['conv\.weight'\]: dtype torch\.float64",
     _ck(0, "conv.weight", lambda c, v: v.double())),
    ("int tensor for a float name", TypeError, r"checkpoints\[2\]\['bn\.running_var'\]: dtype",
     _ck(2, "bn.running_var", lambda c, v: torch.ones(v.shape, dtype=torch.int64))),
    ("non-contiguous tensor", ValueError, r"checkpoints\[1\]\['fc\.weight'\]: .*contiguous",
     _ck(1, "fc.weight", lambda c, v: randn((12, 2), torch.float32, c.g).t())),
    ("num_batches_tracked dtype in the last checkpoint", TypeError,
     r"checkpoints\[2\]\['bn\.num_batches_tracked'\]",
     _ck(2, "bn.num_batches_tracked", lambda c, v: v.float())),
    ("too few coeffs", ValueError, r"coeffs: 2 coefficients for 3 sources",
     _set("coeffs", lambda c: [0.5, 0.5])),
    ("bool coeff", TypeError, r"^coeffs\[2\]: expected a real number, got bool",
     _set("coeffs", lambda c: [0.2, 0.3, True])),
    ("string of digits as coeffs", TypeError, r"^coeffs: expected a sequence of numbers, got str",
     _set("coeffs", lambda c: "123")),
    ("nan coeff", ValueError, r"coeffs\[2\] is nan",
     _set("coeffs", lambda c: [0.2, 0.3, math.nan])),
    ("inf coeff", ValueError, r"coeffs\[0\] is inf",
     _set("coeffs", lambda c: [math.inf, 0.3, 0.5])),
    ("base index too large", ValueError, r"base: index 3 is out of range",
     _set("base", lambda c: 3)),
    ("base index too negative", ValueError, r"base: index -4 is out of range",
     _set("base", lambda c: -4)),
    ("base is a bool", TypeError, r"base: expected", _set("base", lambda c: True)),
    ("base is a string", TypeError, r"base: expected", _set("base", lambda c: "0")),
    ("base dict missing a name", ValueError, r"base does not match.*missing 'bn\.running_mean'",
     _base_dict(lambda c, b: b.pop("bn.running_mean"))),
    ("base dict shape mismatch", ValueError, r"base\['fc\.weight'\]: shape \(24,\)",
     _base_dict(lambda c, b: b.__setitem__("fc.weight", b["fc.weight"].reshape(24)))),
    ("base dict float64", TypeError, r"base\['fc\.bias'\]: dtype torch\.float64",
     _base_dict(lambda c, b: b.__setitem__("fc.bias", b["fc.bias"].double()))),
    ("no checkpoints", ValueError, r"checkpoints: at least one",
     _set("checkpoints", lambda c: [])),
    ("checkpoints is a dict", TypeError, r"checkpoints: expected a sequence",
     _set("checkpoints", lambda c: c.checkpoints[0])),
    ("checkpoint is a list", TypeError, r"checkpoints\[1\]: expected a dict",
     _set("checkpoints", lambda c: [c.checkpoints[0], list(c.checkpoints[1].values()),
                                    c.checkpoints[2]])),
    ("checkpoint is a tensor", TypeError, r"checkpoints\[2\]: expected a dict",
     _set("checkpoints", lambda c: c.checkpoints[:2] + [torch.zeros(3)])),
    ("target is a tensor", TypeError, r"target: expected an nn\.Module or a dict",
     _set("target", lambda c: c.target.fc.weight.detach())),
    ("target is a list", TypeError, r"target: expected an nn\.Module or a dict",
     _set("target", lambda c: list(c.target.parameters()))),
    ("target dict with a non-string key", TypeError, r"^target: key 7 is a int; tensors are named",
     _set("target", lambda c: {**c.target.state_dict(), 7: torch.zeros(2)})),
    ("checkpoint with a non-string key", ValueError,
     r"^checkpoints\[1\] does not match the target's tensors: unexpected 7, 'zz'",
     lambda c: (_add(1, 7)(c), _add(1, "zz")(c))),
    ("sparse checkpoint entry", TypeError,
     r"^checkpoints\[0\]\['fc\.weight'\]: a tensor of layout torch\.sparse_coo",
     _ck(0, "fc.weight", lambda c, v: v.to_sparse())),
    ("negated view as a checkpoint entry", ValueError,
     r"^checkpoints\[1\]\['conv\.bias'\]: .*negative bit",
     _ck(1, "conv.bias", lambda c, v: torch._neg_view(v))),
    ("sparse integer entry", TypeError,
     r"^checkpoints\[2\]\['bn\.num_batches_tracked'\]: a tensor of layout torch\.sparse_coo",
     _ck(2, "bn.num_batches_tracked", lambda c, v: v.to_sparse())),
    ("target dict with a non-tensor", TypeError, r"target\['fc\.bias'\]: expected a torch\.Tensor",
     _set("target", lambda c: dict(c.target.state_dict(), **{"fc.bias": [0.0, 0.0]}))),
    ("float64 model", TypeError, r"target\['[a-z.]+'\]: dtype torch\.float64", _float64_model),
    ("target tensors partially overlap", ValueError,
     r"target\['(b'\] and target\['a|a'\] and target\['b)'\] share memory",
     _dict_target_overlapping),
    ("target tensor aliases another name's source", ValueError,
     r"target\['conv\.bias'\] overlaps checkpoints\[0\]\['bn\.bias'\]",
     _live_tensor_under_another_name),
    ("complex buffer", TypeError, r"^target\['phase'\]: dtype torch\.complex64 is not supported",
     _complex_buffer),
    # Integer (copied) entries are validated like merged ones, before anything is written.
    ("num_batches_tracked on meta in the last checkpoint", ValueError,
     r"^checkpoints\[2\]\['bn\.num_batches_tracked'\]: on meta but target\[",
     _ck(2, "bn.num_batches_tracked", lambda c, v: v.to("meta"))),
    ("num_batches_tracked shape in an earlier checkpoint", ValueError,
     r"^checkpoints\[0\]\['bn\.num_batches_tracked'\]: shape \(1,\)",
     _ck(0, "bn.num_batches_tracked", lambda c, v: v.reshape(1))),
    ("integer target on meta", ValueError, r"^target\['n'\]: device meta is not supported",
     _float_and_int(lambda c, w: {"w": w, "n": torch.zeros(3, dtype=torch.int64, device="meta")})),
    ("expanded (stride 0) integer target", ValueError, r"^target\['n'\]: .*contiguous",
     _float_and_int(lambda c, w: {"w": w, "n": torch.zeros(1, dtype=torch.int64).expand(3)})),
    ("integer target is a view of a float target", ValueError,
     r"^target\['w'\] and target\['n'\] share memory",
     _float_and_int(lambda c, w: {"w": w, "n": w.view(torch.int32)})),
    ("integer targets partially overlap", ValueError,
     r"^target\['(a|b)'\] and target\['(a|b)'\] share memory", _float_and_int(_shared_int_buffer)),
    ("integer target under a float source", ValueError,
     r"^target\['n'\] overlaps checkpoints\[1\]\['w'\] in memory",
     _float_and_int(lambda c, w: {"w": w, "n": torch.zeros(4, dtype=torch.int32)},
                    _int_view_of_float_source)),
    ("float target under the integer entry copied", ValueError,
     r"^target\['w'\] and checkpoints\[2\]\['n'\] share memory",
     _float_and_int(lambda c, w: {"w": w, "n": torch.zeros(4, dtype=torch.int32)},
                    _float_target_copied_from)),
    ("integer target copied into another", ValueError,
     r"^target\['a'\] overlaps checkpoints\[2\]\['b'\] in memory",
     _float_and_int(lambda c, w: {"w": w, "a": torch.zeros(3, dtype=torch.int64),
                                  "b": torch.zeros(3, dtype=torch.int64)},
                    _int_target_copied_into_another)),
]


@pytest.mark.parametrize("exc,match,mutate", [pytest.param(*c[1:], id=c[0]) for c in MERGE_CASES])
def test_merge_into_rejects(exc, match, mutate):
    """merge_into refuses the input, names it, and writes nothing: every parameter and buffer,
    num_batches_tracked included, keeps its bits."""
    c = Merge()
    mutate(c)
    expect_error(exc, match, c.call, c.tensors())


# ---------------------------------------------------------------- device mismatch (CUDA hosts)

@pytest.mark.cuda
def test_weighted_sum_device_mismatch():
    """A source or base on another device than out is named in the error; nothing written."""
    for where in ("source", "base"):
        c = WS()
        if where == "source":
            c.sources[1] = c.sources[1].cuda()
            match = r"sources\[1\]: on cuda"
        else:
            c.base = c.base.cuda()
            match = r"^base: on cuda"
        expect_error(ValueError, match, c.call, [c.out])
    c = WS()
    c.out = c.out.cuda()
    expect_error(ValueError, r"sources\[0\]: on cpu", c.call, [c.out])


@pytest.mark.cuda
def test_merge_into_device_mismatch():
    """A checkpoint tensor on CUDA for a CPU model is named in the error; nothing written."""
    c = Merge()
    c.checkpoints[1]["fc.weight"] = c.checkpoints[1]["fc.weight"].cuda()
    expect_error(ValueError, r"checkpoints\[1\]\['fc\.weight'\]: on cuda", c.call, c.tensors())


# ---------------------------------------------------------------- tied weights, integer entries

class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight  # 'head.weight' is the second name of one Parameter


def test_tied_weight_error_names_the_checkpoint_entry():
    """A bad checkpoint entry under the second name of a tied weight is named
    checkpoints[i]['name'] like any other entry; nothing is written."""
    model = _Tied()
    ckpts = [{k: v.detach().clone() for k, v in model.state_dict().items()} for _ in range(2)]
    ckpts[1]["head.weight"] = ckpts[1]["head.weight"].double()
    expect_error(TypeError, r"checkpoints\[1\]\['head\.weight'\]",
                 lambda: lcsc_fast.merge_into(model, ckpts, [0.5, 0.5]), model)


def test_non_tensor_integer_entry_is_a_type_error():
    """A non-tensor under an integer name (num_batches_tracked) of the last checkpoint raises
    TypeError naming the entry; nothing is written."""
    c = Merge()
    c.checkpoints[2]["bn.num_batches_tracked"] = 5
    expect_error(TypeError, r"checkpoints\[(2|-1)\]\['bn\.num_batches_tracked'\]", c.call,
                 c.tensors())


def test_integer_entry_of_an_earlier_checkpoint_is_checked():
    """Integer entries are checked in every checkpoint, not only the one copied from."""
    c = Merge()
    c.checkpoints[0]["bn.num_batches_tracked"] = "garbage"
    expect_error(TypeError, r"checkpoints\[0\]\['bn\.num_batches_tracked'\]", c.call, c.tensors())


def test_folded_base_coefficient_outside_float32_range_is_rejected():
    """With a base, -sum(coeffs) is a coefficient too: finite coefficients whose sum overflows
    float32 are rejected before anything is written."""
    c = Merge()
    c.coeffs = [3e38, 3e38, 0.0]
    c.base = {k: v.clone() for k, v in c.checkpoints[0].items()}  # adds -sum(coeffs) = -6e38
    expect_error(ValueError, r"folded with the base", c.call, c.tensors())
