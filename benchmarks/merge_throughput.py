#!/usr/bin/env python
"""Merge throughput: lcsc_fast's fused engine against pure-torch checkpoint merging.

What is compared, for out = sum_i c_i * theta_i over N checkpoints of a model-shaped state dict
(outputs are float32 tensors, the model's own buffers; sources are float32 or bfloat16):

  naive add_ loop    zero the outputs, then out.add_(src, alpha=c) per checkpoint per tensor
                     (what reference LCSC and EDM2 post-hoc EMA code do)
  torch foreach      torch._foreach_zero_, then torch._foreach_add_(outs, srcs, alpha=c) per
                     checkpoint
  stack + gemv       per tensor, torch.stack of its N sources (upcast to float32 during the
                     copy, into a reused scratch buffer), then a weighted sum over dim 0 as one
                     BLAS gemv written straight into the output: mergekit's linear merge, in
                     its fastest reasonable torch form
  fused merge_into   lcsc_fast.merge_into(target_dict, checkpoints, coeffs): one fused native
                     pass over all tensors and checkpoints

and, for evaluating a population of K=8 candidate coefficient vectors on flat buffers,
lcsc_fast.weighted_sum_batched (one pass over the sources for all K outputs) against 8 calls of
lcsc_fast.weighted_sum; the ratio of their per-candidate throughputs is reported (target >= 5x,
float32 outputs). The batched op is also timed into bfloat16 outputs (a bf16 model's buffers).

The state dict is a synthetic DDPM-style U-Net (304 tensors: convolutions, biases, GroupNorm
weights, attention qkv/proj and time-embedding matrices; channel multipliers 1,2,2,2, two
residual blocks per level, attention at the second level) whose base width is chosen so its
parameter count is closest to a target.

Sizes. The machine this was written on has a 480 MiB L3, so a merge only measures DRAM when
its sources are well beyond that. The default parameter count therefore depends on N: params =
2 GiB / (4 bytes * N), so every config streams 2 GiB of float32 sources or 1 GiB of bfloat16
sources per merge (N=16: 33.5M params, N=64: 8.4M, N=256: 2.1M; the exact counts, which follow
from the integer U-Net width, are printed and saved). That keeps the default run (6 CPU configs)
under 2 minutes on 2 cores including setup, with a peak of a few GiB of RAM: one config's data
exists at a time and is freed before the next. --params fixes the count for every N instead.

Checkpoints. Each checkpoint is one flat buffer (as in an mmap'd file) with every named tensor
a view into it, so the N checkpoints occupy N distinct regions and nothing is cached across
them. torch.randn runs at ~0.26 GB/s on 2 cores, which would spend most of the time budget on
data, so a 16 MiB random pool is made once and each checkpoint is filled with a differently
offset and scaled copy of it (distinct values, copy-speed generation).

Bandwidth. The same run measures the machine's streaming read bandwidth: the best of several
repeats of (a) torch x.sum() over a 1 GiB float32 tensor and (b) lcsc_fast._C.read_probe, a
native loop that reads every byte; the larger is the "read GB/s" that percentages refer to. On
CUDA it measures x.sum() and a device-to-device copy_ of 1 GiB, counted as read GB/s =
nbytes / seconds (the copy also writes nbytes, which is not counted). Each device's bandwidth is
measured before and after its merges and the larger figure is used, since on a shared machine a
dip during one measurement would inflate every percentage; a warning is printed if they differ
by more than 15%.

Validation. Before a method is timed, its warm-up output is checked against lcsc_fast.reference
(float64, CPU) on the first 20 tensors of the state dict (an fp64 reference of everything would
cost more than the benchmark). The rule: max|out - ref| <= 2 * (the same error of plain torch,
an fp32 add_ loop over the same sources on the same device) + eps_fp32 * max|ref|. All methods
accumulate in float32, so a correct one lands near plain torch's error whatever its summation
order, while a wrong coefficient, a skipped or doubled source, or a bad tail is orders of
magnitude off. Outputs are filled with NaN before each method, so one that writes nothing fails.
A method that fails is printed as FAILED and never timed. The population outputs are checked the
same way on the first and last 32768 elements of the flat buffers; bfloat16 ones against plain
torch's float32 sums rounded to bfloat16, with eps_bf16 in place of eps_fp32.

Timing: one warm-up (the validated run), then R repeats (default 3) timed with perf_counter
(after torch.cuda.synchronize on CUDA); min and median are reported, GB/s counts the N source
tensors' bytes per merge and uses the min time. torch's default thread count is used.

Same-moment figures. A shared machine's memory bandwidth can move by a third within minutes,
so two figures taken a minute apart may compare different machines. Two comparisons are
therefore also made round by round, in alternation: the batched op and the 8 single merges
(the ratio is reported from the minima and as the median over rounds; the batched op into
bfloat16 outputs runs in the same rounds), and the MergePlan merge against the read probe over
the bandwidth buffer (the merge's share of the read bandwidth of the same round, median over R
rounds).

Traffic yardstick (CPU). In the same rounds as the population ops, lcsc_fast._C.traffic_probe
reads the population's sources and writes K outputs, then one: the same bytes as the batched op
and as one single merge, with no merge arithmetic, each thread reading one 64-byte line of every
source in turn. It shows how fast those bytes can move in that one simple pattern at that
moment: an op that takes several times its probe's time is not limited by its bytes. It is no
upper bound: with many sources the engine's tiled reads (a few KiB of one source at a time)
beat its line-by-line pattern.

Bytes and fma ceiling. The run reports the bytes K single merges move over the bytes the batch
moves (sources read once, K float32 outputs written): K (N s + 4) / (N s + 4 K) per element for
sources of s bytes, 4.5x for bf16 at N = 16. Beyond that the batch has to move its bytes faster
than the single merges move theirs. And (CPU) a candidate costs N fmas per element whether it
is merged alone or in a batch: only the bytes are shared. So the batch takes at least K x N x
elements fma lanes at the rate lcsc_fast._C.fma_probe measures (best of 5 calls), and the ratio
can be at most the singles' time over that, even if the batch's memory traffic cost nothing.
The run reports this ceiling against its own singles, and against singles that would read their
sources at the run's read bandwidth (writes free): s x fma rate / read bandwidth. For bf16
sources that is below the 5x target on any machine whose fma rate in G lanes/s is under 2.5
times its read GB/s.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from _machine import (  # benchmarks/
    cpu_stall_us, import_lcsc_fast, json_path, machine_info, write_json)

GIB = 1024**3
MIB = 1024**2
EPS_FP32 = torch.finfo(torch.float32).eps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

DEFAULT_N = [16, 64, 256]
DEFAULT_FP32_SOURCE_NBYTES = 2 * GIB  # per merge at float32 sources; bf16 configs stream half
QUICK_N = [4, 16]
QUICK_FP32_SOURCE_NBYTES = 8 * MIB
BANDWIDTH_BUFFER_NBYTES = GIB
QUICK_BANDWIDTH_BUFFER_NBYTES = 64 * MIB
VALIDATE_NAMES = 20  # first tensors of the state dict checked against the fp64 reference
POPULATION_K = 8
POPULATION_CHECK_ELEMS = 32768  # checked at each end of the flat buffers
POOL_ELEMS = 4 * MIB + 15  # random pool for checkpoint data: 16 MiB of fp32, odd length
BANDWIDTH_REPEATS = 5
# The fma probe's best of this many calls (66 ms each on a 2-core Zen 4): one call that a
# neighbour's work slows would lower the ceiling below what the batch itself reaches.
FMA_PROBE_REPEATS = 5

lcsc_fast = reference = None  # imported by main(), after argument parsing

EPILOG = """examples:
  python benchmarks/merge_throughput.py --quick
      smoke test, tiny sizes (numbers meaningless), well under 15 s
  python benchmarks/merge_throughput.py
      default: every available device, N in 16 64 256, fp32 and bf16 sources
  python benchmarks/merge_throughput.py --device cpu --n 64 --dtypes bf16 --repeats 5
  python benchmarks/merge_throughput.py --params 20e6 --n 16 64
      a fixed 20M-parameter model for every N (memory: N x params x bytes per element)
  python benchmarks/merge_throughput.py --json benchmarks/results/
      also save machine info, bandwidth and every row to
      benchmarks/results/<device>-<date>.json (or pass a file path)
"""


# ---------------------------------------------------------------- synthetic model

def unet_shapes(ch: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a DDPM-style U-Net with base width ch."""
    mults, num_res_blocks, attn_levels = (1, 2, 2, 2), 2, {1}
    emb = 4 * ch
    shapes: list[tuple[str, tuple[int, ...]]] = []

    def add(name, *shape):
        shapes.append((name, shape))

    def norm(prefix, c):
        add(f"{prefix}.weight", c)
        add(f"{prefix}.bias", c)

    def conv(prefix, c_out, c_in, k):
        add(f"{prefix}.weight", c_out, c_in, k, k)
        add(f"{prefix}.bias", c_out)

    def linear(prefix, c_out, c_in):
        add(f"{prefix}.weight", c_out, c_in)
        add(f"{prefix}.bias", c_out)

    def res_block(prefix, c_in, c_out):
        norm(f"{prefix}.norm1", c_in)
        conv(f"{prefix}.conv1", c_out, c_in, 3)
        linear(f"{prefix}.emb_proj", c_out, emb)
        norm(f"{prefix}.norm2", c_out)
        conv(f"{prefix}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{prefix}.skip", c_out, c_in, 1)

    def attn_block(prefix, c):
        norm(f"{prefix}.norm", c)
        linear(f"{prefix}.qkv", 3 * c, c)
        linear(f"{prefix}.proj", c, c)

    linear("time_embed.0", emb, ch)
    linear("time_embed.2", emb, emb)
    conv("conv_in", ch, 3, 3)
    skip_channels, c = [ch], ch
    for level, mult in enumerate(mults):
        for b in range(num_res_blocks):
            res_block(f"down.{level}.res.{b}", c, ch * mult)
            c = ch * mult
            if level in attn_levels:
                attn_block(f"down.{level}.attn.{b}", c)
            skip_channels.append(c)
        if level != len(mults) - 1:
            conv(f"down.{level}.downsample", c, c, 3)
            skip_channels.append(c)
    res_block("mid.res.0", c, c)
    attn_block("mid.attn", c)
    res_block("mid.res.1", c, c)
    for level, mult in reversed(list(enumerate(mults))):
        for b in range(num_res_blocks + 1):
            res_block(f"up.{level}.res.{b}", c + skip_channels.pop(), ch * mult)
            c = ch * mult
            if level in attn_levels:
                attn_block(f"up.{level}.attn.{b}", c)
        if level != 0:
            conv(f"up.{level}.upsample", c, c, 3)
    norm("norm_out", c)
    conv("conv_out", 3, c, 3)
    return shapes


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def unet_for_params(target_params: int) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """The base width whose U-Net parameter count is closest to target_params, and its shapes."""
    def params(ch):
        return sum(numel_of(s) for _, s in unet_shapes(ch))

    lo, hi = 1, 2
    while params(hi) < target_params:
        hi *= 2
    while hi - lo > 1:  # params(ch) grows monotonically with ch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < target_params else (lo, mid)
    ch = min((lo, hi), key=lambda c: abs(params(c) - target_params))
    return ch, unet_shapes(ch)


# ---------------------------------------------------------------- one config's data

@dataclass
class Config:
    device: torch.device
    num_sources: int
    dtype_name: str
    target_params: int


class MergeData:
    """N checkpoints (flat buffer + named views each), coefficients, fp32 outputs."""

    def __init__(self, cfg: Config, seed: int):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype_name]
        self.width, shapes = unet_for_params(cfg.target_params)
        self.names = [name for name, _ in shapes]
        self.shapes = dict(shapes)
        self.params = sum(numel_of(s) for _, s in shapes)
        element_nbytes = torch.empty((), dtype=self.dtype).element_size()
        self.source_nbytes = cfg.num_sources * self.params * element_nbytes
        gen = torch.Generator().manual_seed(seed)
        n = cfg.num_sources

        # Coefficients made exactly float32-representable, so every method (engine: float32,
        # torch alpha: float32 kernels, reference: float64) uses the very same numbers.
        w = torch.rand(n, generator=gen) + 0.5
        self.coeffs_t = (w / w.sum()).to(torch.float32)
        self.coeffs = self.coeffs_t.tolist()
        self.coeffs_device = self.coeffs_t.to(cfg.device)  # the stack method's gemv vector
        pop = torch.rand(POPULATION_K, n, generator=gen) + 0.5
        self.pop_coeffs_t = (pop / pop.sum(dim=1, keepdim=True)).to(torch.float32)
        self.pop_coeffs = self.pop_coeffs_t.tolist()

        pool = torch.randn(POOL_ELEMS, generator=gen).to(device=cfg.device, dtype=self.dtype)
        pool2 = torch.cat([pool, pool])  # so any offset has POOL_ELEMS elements after it
        scales = (torch.rand(n, generator=gen) + 0.5).tolist()
        self.flats: list[torch.Tensor] = []
        self.checkpoints: list[dict[str, torch.Tensor]] = []
        for i in range(n):
            flat = torch.empty(self.params, dtype=self.dtype, device=cfg.device)
            offset = (i * 1_000_003) % POOL_ELEMS
            for start in range(0, self.params, POOL_ELEMS):
                length = min(POOL_ELEMS, self.params - start)
                torch.mul(pool2[offset:offset + length], scales[i],
                          out=flat[start:start + length])
            self.flats.append(flat)
            self.checkpoints.append(self._views(flat))
        del pool, pool2
        # Per checkpoint, its tensors in name order: what the torch loops iterate over.
        self.sources_by_checkpoint = [[ck[name] for name in self.names]
                                      for ck in self.checkpoints]
        # The model's buffers: separately allocated fp32 tensors, as in an nn.Module.
        self.outputs = {name: torch.empty(self.shapes[name], dtype=torch.float32,
                                          device=cfg.device) for name in self.names}
        self.output_list = [self.outputs[name] for name in self.names]
        max_numel = max(numel_of(s) for s in self.shapes.values())
        self.stack_scratch = torch.empty(n * max_numel, dtype=torch.float32, device=cfg.device)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name in self.names:
            numel = numel_of(self.shapes[name])
            views[name] = flat[offset:offset + numel].view(self.shapes[name])
            offset += numel
        return views

    def poison_outputs(self) -> None:
        for out in self.output_list:
            out.fill_(float("nan"))


# ---------------------------------------------------------------- the merge methods

def merge_naive(d: MergeData) -> None:
    for out in d.output_list:
        out.zero_()
    for c, sources in zip(d.coeffs, d.sources_by_checkpoint):
        for out, src in zip(d.output_list, sources):
            out.add_(src, alpha=c)


def merge_foreach(d: MergeData) -> None:
    torch._foreach_zero_(d.output_list)
    for c, sources in zip(d.coeffs, d.sources_by_checkpoint):
        torch._foreach_add_(d.output_list, sources, alpha=c)


def merge_stack(d: MergeData) -> None:
    n, w = d.cfg.num_sources, d.coeffs_device
    for i, out in enumerate(d.output_list):
        numel = out.numel()
        # Stacking into a reused fp32 scratch upcasts bf16 in the same copy; a fresh stack then
        # .float() per tensor measured ~3.5x slower for bf16 on CPU, so this is the fair form.
        stacked = d.stack_scratch[:n * numel].view(n, numel)
        torch.stack([sources[i].view(-1) for sources in d.sources_by_checkpoint], out=stacked)
        # Weighted sum over dim 0: one BLAS gemv, torch.mv(stacked.T, w), straight into out.
        torch.mv(stacked.t(), w, out=out.view(-1))


def merge_fused(d: MergeData) -> None:
    lcsc_fast.merge_into(d.outputs, d.checkpoints, d.coeffs)


def merge_planned(d: MergeData) -> None:
    # Validation and pointer tables once (first call, the validated warm-up); timed calls are
    # what a search's hot loop pays per candidate.
    if getattr(d, "plan", None) is None:
        d.plan = lcsc_fast.MergePlan(d.outputs, d.checkpoints)
    d.plan(d.coeffs)


TORCH_METHODS = {"naive add_ loop": merge_naive, "torch foreach": merge_foreach,
                 "stack + gemv": merge_stack}
FUSED_METHODS = {"fused merge_into": merge_fused, "fused MergePlan": merge_planned}
ALL_METHODS = {**TORCH_METHODS, **FUSED_METHODS}


# ---------------------------------------------------------------- validation

@dataclass
class Check:
    ok: bool
    max_abs_err: float
    tol: float
    torch_err: float


def tolerance(torch_err: float, ref_max_abs: float, eps: float = EPS_FP32) -> float:
    return 2.0 * torch_err + eps * ref_max_abs


def max_abs_err(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    err = 0.0
    for out, ref in zip(outs, refs):
        e = (out.detach().to("cpu", torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
        if math.isnan(e):
            return math.nan
        err = max(err, e)
    return err


class MergeOracle:
    """fp64 reference and plain-torch error on the first VALIDATE_NAMES tensors."""

    def __init__(self, d: MergeData):
        self.names = d.names[:VALIDATE_NAMES]
        subset = [{name: ck[name] for name in self.names} for ck in d.checkpoints]
        merged = reference.merge(subset, d.coeffs)
        self.refs = [merged[name] for name in self.names]
        self.ref_max_abs = max(r.abs().max().item() for r in self.refs)
        plain = [torch.zeros_like(d.outputs[name]) for name in self.names]
        for c, ck in zip(d.coeffs, subset):
            for acc, name in zip(plain, self.names):
                acc.add_(ck[name], alpha=c)
        self.torch_err = max_abs_err(plain, self.refs)
        self.tol = tolerance(self.torch_err, self.ref_max_abs)
        self.numel = sum(r.numel() for r in self.refs)

    def check(self, d: MergeData) -> Check:
        err = max_abs_err([d.outputs[name] for name in self.names], self.refs)
        return Check(err <= self.tol, err, self.tol, self.torch_err)


def end_slices(t: torch.Tensor) -> torch.Tensor:
    """The first and last POPULATION_CHECK_ELEMS elements of a flat tensor (all if short)."""
    if t.numel() <= 2 * POPULATION_CHECK_ELEMS:
        return t
    return torch.cat([t[:POPULATION_CHECK_ELEMS], t[-POPULATION_CHECK_ELEMS:]])


class PopulationOracle:
    """fp64 reference and plain-torch error for the K candidates, on the flat buffers' ends;
    plain torch sums in float32 and rounds once to the outputs' dtype."""

    def __init__(self, d: MergeData):
        sample = [end_slices(f) for f in d.flats]
        self.refs = reference.weighted_sum_batched(sample, d.pop_coeffs)
        self.ref_max_abs = max(r.abs().max().item() for r in self.refs)
        self.plain = []
        for row in d.pop_coeffs:
            acc = torch.zeros(sample[0].shape, dtype=torch.float32, device=sample[0].device)
            for c, s in zip(row, sample):
                acc.add_(s, alpha=c)
            self.plain.append(acc)

    def check(self, outs: list[torch.Tensor]) -> Check:
        dtype = outs[0].dtype
        torch_err = max_abs_err([p.to(dtype) for p in self.plain], self.refs)
        tol = tolerance(torch_err, self.ref_max_abs, torch.finfo(dtype).eps)
        err = max_abs_err([end_slices(o) for o in outs], self.refs)
        return Check(err <= tol, err, tol, torch_err)


# ---------------------------------------------------------------- timing

def synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_repeats(fn, repeats: int, sync) -> list[float]:
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_alternating(fns: dict, repeats: int, sync) -> dict[str, list[float]]:
    """Times every fn once per round, in turn, for `repeats` rounds. On a machine whose memory
    bandwidth drifts, the figures of one round come from the same moment, so their ratio holds
    even when the blocks of time_repeats would have landed in different phases."""
    seconds: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            seconds[label] += time_repeats(fn, 1, sync)
    return seconds


@contextmanager
def native_call_timer(sync):
    """Temporarily wraps the engine's native merge calls to time them alone: the rest of a
    merge_into call is Python planning and validation. Yields a list that collects seconds."""
    engine = sys.modules.get("lcsc_fast.engine")
    native = getattr(engine, "_C", None)
    seconds: list[float] = []
    if native is None:
        yield None
        return

    class Timed:
        def __getattr__(self, name):
            attr = getattr(native, name)
            if name not in ("merge_cpu", "merge_cuda"):
                return attr

            def timed(*args):
                sync()
                start = time.perf_counter()
                result = attr(*args)
                sync()
                seconds.append(time.perf_counter() - start)
                return result
            return timed

    engine._C = Timed()
    try:
        yield seconds
    finally:
        engine._C = native


# ---------------------------------------------------------------- bandwidth

def best_seconds(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    return min(time_repeats(fn, repeats, sync))


def measure_read_bandwidth(device: torch.device, nbytes: int) -> dict:
    sync = synchronizer(device)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    x.fill_(1.0)  # touch every page before timing
    nbytes = x.numel() * 4
    result = {"buffer_nbytes": nbytes}
    result["torch_sum_gbps"] = nbytes / best_seconds(x.sum, BANDWIDTH_REPEATS, sync) / 1e9
    if device.type == "cpu":
        probe = native_read_probe(x)
        if probe is None:
            result["read_probe_gbps"] = None
            result["read_probe_note"] = "lcsc_fast._C.read_probe is not in this build"
        else:
            result["read_probe_gbps"] = nbytes / best_seconds(probe, BANDWIDTH_REPEATS, sync) / 1e9
            result["read_probe_threads"] = torch.get_num_threads()
        candidates = [result["torch_sum_gbps"], result["read_probe_gbps"]]
    else:
        y = torch.empty_like(x)
        seconds = best_seconds(functools.partial(y.copy_, x), BANDWIDTH_REPEATS, sync)
        # Counted as read bandwidth: nbytes read per copy (the nbytes written are not counted).
        result["d2d_copy_read_gbps"] = nbytes / seconds / 1e9
        del y
        candidates = [result["torch_sum_gbps"], result["d2d_copy_read_gbps"]]
    result["read_gbps"] = max(c for c in candidates if c is not None)
    del x
    free_memory(device)
    return result


def native_read_probe(x: torch.Tensor):
    """A call reading every byte of CPU tensor x with lcsc_fast's native loop on torch's
    threads, or None if this build has no read_probe."""
    probe = getattr(lcsc_fast._C, "read_probe", None)
    if probe is None:
        return None
    nbytes, threads = x.numel() * x.element_size(), torch.get_num_threads()
    return lambda: probe(x.data_ptr(), nbytes, threads)


def run_paired_read(d: MergeData, repeats: int, probe_nbytes: int) -> dict | None:
    """The MergePlan merge alternated with a read of probe_nbytes, `repeats` rounds: the merge's
    GB/s as a share of the read bandwidth measured right beside it, round by round. Where the
    bandwidth drifts during a run, this share holds better than one against the best
    bandwidth of the run."""
    if getattr(d, "plan", None) is None:  # MergePlan failed its check and was never built
        return None
    device, sync = d.cfg.device, synchronizer(d.cfg.device)
    x = torch.empty(probe_nbytes // 4, dtype=torch.float32, device=device)
    x.fill_(1.0)
    if device.type == "cuda":
        y = torch.empty_like(x)
        name, probe = "device-to-device copy_", lambda: y.copy_(x)
    else:
        native = native_read_probe(x)
        name, probe = ("lcsc_fast read_probe", native) if native else ("torch x.sum()", x.sum)
    probe()  # warm-up
    seconds = time_alternating({"merge": lambda: d.plan(d.coeffs), "read": probe}, repeats, sync)
    read_nbytes = x.numel() * 4
    pct = [100.0 * (d.source_nbytes / m) / (read_nbytes / r)
           for m, r in zip(seconds["merge"], seconds["read"])]
    return {"probe": name, "rounds": repeats, "merge_s": seconds["merge"],
            "read_s": seconds["read"], "pct_read_bw_by_round": pct,
            "pct_read_bw_median": statistics.median(pct)}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- running configs

def run_merge_methods(d: MergeData, repeats: int) -> list[dict]:
    sync = synchronizer(d.cfg.device)
    oracle = MergeOracle(d)
    rows = []
    for method, fn in ALL_METHODS.items():
        row = {"method": method, "validated_tensors": len(oracle.names),
               "validated_elems": oracle.numel}
        d.poison_outputs()
        try:
            fn(d)  # warm-up, and the output that is validated
            sync()
            check = oracle.check(d)
        except Exception as e:  # report and go on: one broken method must not hide the rest
            row.update(status="FAILED", reason=f"{type(e).__name__}: {e}")
            rows.append(row)
            continue
        row.update(max_abs_err=check.max_abs_err, tol=check.tol, torch_err=check.torch_err)
        if not check.ok:
            row.update(status="FAILED",
                       reason=f"max abs err {check.max_abs_err:.3g} > tol {check.tol:.3g}")
            rows.append(row)
            continue
        seconds = time_repeats(lambda: fn(d), repeats, sync)
        row.update(status="ok", seconds=seconds, min_s=min(seconds),
                   median_s=statistics.median(seconds))
        if method in FUSED_METHODS:
            with native_call_timer(sync) as native_seconds:
                fn(d)
            if native_seconds:
                row["native_s"] = sum(native_seconds)
        rows.append(row)
    return rows


def run_file_methods(d: MergeData, repeats: int, workdir: str | None) -> list[dict]:
    """The same merge read from files: the N checkpoints as safetensors files (Trajectory,
    memory-mapped, page cache warm after the validated warm-up) and as a packed store (deltas
    in the sources' dtype, so both read about the bytes the in-memory merge reads)."""
    from safetensors.torch import save_file

    oracle = MergeOracle(d)
    rows = []
    folder = tempfile.mkdtemp(prefix="lcsc-bench-", dir=workdir)
    try:
        paths = []
        for i, ck in enumerate(d.checkpoints):
            paths.append(os.path.join(folder, f"ck{i:04d}.safetensors"))
            save_file(ck, paths[-1])
        files = lcsc_fast.Trajectory.open(paths)
        packed_dir = lcsc_fast.pack(files, os.path.join(folder, "packed"), dtype=d.cfg.dtype_name)
        packed = lcsc_fast.Trajectory.open(packed_dir)
        # A packed merge sums other terms: w_i * delta_i, each delta rounded to the delta dtype
        # (at most eps_delta * |delta_i| <= eps_delta * 2 max|theta|), and (sum w) * theta_p.
        # Bound: that rounding plus recursive fp32 summation of N such terms (N * eps_fp32 *
        # sum|w_i| * 2 max|theta|), on top of the in-memory tolerance.
        delta_eps = {"fp32": EPS_FP32, "bf16": 2.0 ** -8}[d.cfg.dtype_name]
        theta_max = max(ck[name].abs().max().item() for ck in d.checkpoints
                        for name in oracle.names)
        packed_tol = oracle.tol + (delta_eps + len(d.coeffs) * EPS_FP32) * sum(
            map(abs, d.coeffs)) * 2 * theta_max
        for method, traj, tol in (("from files (mmap)", files, oracle.tol),
                                  ("from packed store", packed, packed_tol)):
            row = {"method": method, "validated_tensors": len(oracle.names),
                   "validated_elems": oracle.numel}
            d.poison_outputs()
            lcsc_fast.merge_into(d.outputs, traj, d.coeffs)
            err = max_abs_err([d.outputs[name] for name in oracle.names], oracle.refs)
            row.update(max_abs_err=err, tol=tol, torch_err=oracle.torch_err)
            if not err <= tol:
                row.update(status="FAILED", reason=f"max abs err {err:.3g} > tol {tol:.3g}")
            else:
                seconds = time_repeats(lambda: lcsc_fast.merge_into(d.outputs, traj, d.coeffs),
                                       repeats, lambda: None)
                row.update(status="ok", seconds=seconds, min_s=min(seconds),
                           median_s=statistics.median(seconds))
            rows.append(row)
        files.close()
        packed.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def finish_rows(rows: list[dict], source_nbytes: int, read_gbps: float) -> None:
    torch_times = [r["min_s"] for r in rows if r["status"] == "ok" and r["method"] in TORCH_METHODS]
    best_torch = min(torch_times) if torch_times else None
    in_memory = next((r["min_s"] for r in rows
                      if r["method"] == "fused MergePlan" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["gbps"] = source_nbytes / r["min_s"] / 1e9
        r["pct_read_bw"] = 100.0 * r["gbps"] / read_gbps
        r["speedup_vs_best_torch"] = best_torch / r["min_s"] if best_torch else None
        if r["method"].startswith("from ") and in_memory:
            r["vs_in_memory"] = in_memory / r["min_s"]


def finish_population(p: dict, read_gbps: float) -> None:
    """The fma ceiling on the ratio (run_population) against singles that would read their
    sources at read_gbps, writing for free: elem_size x fma peak / read bandwidth."""
    if "ratio_ceiling_fma" not in p:
        return
    p["read_gbps"] = read_gbps
    singles_at_read_bw_s = p["k"] * p["source_nbytes"] / (read_gbps * 1e9)
    p["ratio_ceiling_fma_at_read_bw"] = (singles_at_read_bw_s * p["fma_peak_lanes_per_s"]
                                         / p["batched"]["fma_lanes"])


def run_population(d: MergeData, repeats: int) -> dict:
    """K candidates at once (weighted_sum_batched) against K single fused weighted_sums, into
    float32 outputs; and the batched op into bfloat16 ones (result["bf16_outputs"])."""
    device, sync = d.cfg.device, synchronizer(d.cfg.device)
    oracle = PopulationOracle(d)
    outs = [torch.empty(d.params, dtype=torch.float32, device=device)
            for _ in range(POPULATION_K)]
    bf16_outs = [torch.empty(d.params, dtype=torch.bfloat16, device=device)
                 for _ in range(POPULATION_K)]

    def batched(into):
        return lambda: lcsc_fast.weighted_sum_batched(into, d.flats, d.pop_coeffs)

    def singles():
        for out, row in zip(outs, d.pop_coeffs):
            lcsc_fast.weighted_sum(out, d.flats, row)

    result = {"k": POPULATION_K, "elems": d.params, "source_nbytes": d.source_nbytes,
              "validated_elems": oracle.refs[0].numel(), "bf16_outputs": {}}
    bf16 = result["bf16_outputs"]
    ops = {"batched": (result, "batched", batched(outs), outs),
           "singles": (result, "singles", singles, outs),
           "batched bf16": (bf16, "batched", batched(bf16_outs), bf16_outs)}
    timed = {}
    for name, (part, label, fn, written) in ops.items():
        for out in written:
            out.fill_(float("nan"))
        try:
            fn()
            sync()
            check = oracle.check(written)
        except Exception as e:
            part[label] = {"status": "FAILED", "reason": f"{type(e).__name__}: {e}"}
            continue
        if not check.ok:
            part[label] = {"status": "FAILED", "max_abs_err": check.max_abs_err, "tol": check.tol,
                           "reason": f"max abs err {check.max_abs_err:.3g} > tol {check.tol:.3g}"}
            continue
        part[label] = {"status": "ok", "max_abs_err": check.max_abs_err, "tol": check.tol}
        timed[name] = fn
    fp32_ok = "batched" in timed and "singles" in timed
    probes = traffic_probes(d, outs) if fp32_ok else {}
    # Timed in alternation (the ops, then the traffic probes, each round), so that all see the
    # same memory bandwidth: the ratios are what the target is about.
    for name, seconds in time_alternating({**timed, **probes}, repeats, sync).items():
        if name in probes:
            result.setdefault("traffic", {})[name] = {
                "seconds": seconds, "min_s": min(seconds), "median_s": statistics.median(seconds)}
            continue
        part, label = ops[name][:2]
        part[label].update(seconds=seconds, min_s=min(seconds),
                           median_s=statistics.median(seconds),
                           candidates_per_s=POPULATION_K / min(seconds))
    if "batched" in timed and "batched bf16" in timed:
        bf16["batched_vs_fp32_outputs_median"] = statistics.median(
            b / f for b, f in zip(bf16["batched"]["seconds"], result["batched"]["seconds"]))
    if fp32_ok:
        result["per_candidate_throughput_ratio"] = (result["singles"]["min_s"]
                                                    / result["batched"]["min_s"])
        result["paired_ratio_median"] = statistics.median(
            s / b for s, b in zip(result["singles"]["seconds"], result["batched"]["seconds"]))
        # The batched op's two limits: K fmas per source element (against the fma throughput
        # the engine's SIMD level sustains on this machine, probed now), and memory traffic,
        # which includes writing K float32 outputs, not only reading the sources.
        batched_s = result["batched"]["min_s"]
        lanes = POPULATION_K * len(d.flats) * d.params
        result["batched"]["fma_lanes_per_s"] = lanes / batched_s
        result["batched"]["fma_lanes"] = lanes
        if device.type == "cpu":
            peak = max(lcsc_fast._C.fma_probe(torch.get_num_threads())
                       for _ in range(FMA_PROBE_REPEATS))
            result["fma_peak_lanes_per_s"] = peak
            # A candidate costs N fmas per element whether it is merged alone or in a batch,
            # so the batch takes at least its fmas' time at the probed peak, whatever memory
            # does: the ratio cannot exceed the singles' time over that.
            result["ratio_ceiling_fma"] = result["singles"]["min_s"] * peak / lanes
        out_nbytes = POPULATION_K * d.params * 4
        result["batched"]["traffic_gbps"] = (d.source_nbytes + out_nbytes) / batched_s / 1e9
        # The bytes K singles move over the bytes the batch moves (sources read, float32
        # outputs written): the ratio when both move bytes equally fast.
        result["ratio_bytes"] = (POPULATION_K * (d.source_nbytes + d.params * 4)
                                 / (d.source_nbytes + out_nbytes))
    if "traffic" in result:
        # Per round: the ratio the probe's byte-only passes give, and how many times its time
        # each op takes (the singles per merge against one output's).
        t = result["traffic"]
        k_s, one_s = t["outputs_k"]["seconds"], t["outputs_1"]["seconds"]
        t["ratio_median"] = statistics.median(
            POPULATION_K * o / k for o, k in zip(one_s, k_s))
        t["batched_x_median"] = statistics.median(
            b / k for b, k in zip(result["batched"]["seconds"], k_s))
        t["single_x_median"] = statistics.median(
            s / POPULATION_K / o for s, o in zip(result["singles"]["seconds"], one_s))
    outs.clear()  # frees the outputs before the next config (the closures see the lists)
    bf16_outs.clear()
    return result


def traffic_probes(d: MergeData, outs: list[torch.Tensor]) -> dict:
    """lcsc_fast._C.traffic_probe over the population's sources into all K outputs and into
    one: the same bytes read and written as the batched op and as one single merge, with no
    merge arithmetic (a yardstick, not a bound; CPU builds that have it; writes junk into
    outs)."""
    probe = getattr(lcsc_fast._C, "traffic_probe", None)
    if probe is None or d.cfg.device.type != "cpu":
        return {}
    srcs = array("Q", (f.data_ptr() for f in d.flats))
    out_ptrs = array("Q", (o.data_ptr() for o in outs))
    size, threads = d.flats[0].element_size(), torch.get_num_threads()
    return {"outputs_k": lambda: probe(srcs, size, out_ptrs, d.params, threads),
            "outputs_1": lambda: probe(srcs, size, out_ptrs[:1], d.params, threads)}


# ---------------------------------------------------------------- output

def fmt_seconds(s: float) -> str:
    return f"{s:.4f}" if s < 10 else f"{s:.1f}"


def print_config_header(c: dict) -> None:
    print(f"\n== {c['device']} | N={c['n']} | {c['source_dtype']} sources -> fp32 outputs "
          f"| {c['params'] / 1e6:.2f}M params (U-Net width {c['unet_width']}, {c['tensors']} "
          f"tensors) | sources {c['source_nbytes'] / GIB:.3f} GiB per merge ==")


def print_bandwidth(device_type: str, bw: dict) -> None:
    def one(m: dict) -> str:
        if device_type == "cpu":
            probe = (f"{m['read_probe_gbps']:.1f}" if m["read_probe_gbps"] is not None
                     else f"n/a ({m['read_probe_note']})")
            return f"torch x.sum() {m['torch_sum_gbps']:.1f}, lcsc_fast read_probe {probe}"
        return (f"torch x.sum() {m['torch_sum_gbps']:.1f}, device-to-device copy_ "
                f"{m['d2d_copy_read_gbps']:.1f} (read: nbytes / seconds, writes not counted)")

    print(f"\n{device_type} streaming read bandwidth, GB/s, {bw['before']['buffer_nbytes'] / GIB:.2f} "
          f"GiB buffer, best of {BANDWIDTH_REPEATS}:")
    print(f"  before the merges: {one(bw['before'])}")
    print(f"  after the merges:  {one(bw['after'])}")
    print(f"  -> {bw['read_gbps']:.1f} GB/s, the largest, is what '%read BW' refers to")
    low, high = sorted((bw["before"]["read_gbps"], bw["after"]["read_gbps"]))
    if low < 0.85 * high:
        print(f"  WARNING: bandwidth moved {100 * (1 - low / high):.0f}% during the run; something "
              "else is using the memory bus, so timings are noisy")


def print_rows(rows: list[dict]) -> None:
    print(f"{'method':<18} {'min s':>8} {'median s':>9} {'GB/s':>7} {'%read BW':>9} "
          f"{'vs torch':>9}  validation (max abs err vs fp64)")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['method']:<18} FAILED  {r['reason']}")
            continue
        speedup = r["speedup_vs_best_torch"]
        extra = ""
        if "native_s" in r:
            extra = f"; native call {fmt_seconds(r['native_s'])} s of it"
        if "vs_in_memory" in r:
            extra = f"; {100 * r['vs_in_memory']:.0f}% of the in-memory MergePlan's throughput"
        print(f"{r['method']:<18} {fmt_seconds(r['min_s']):>8} {fmt_seconds(r['median_s']):>9} "
              f"{r['gbps']:>7.2f} {r['pct_read_bw']:>8.1f}% "
              f"{(f'{speedup:.2f}x' if speedup else '-'):>9}  "
              f"ok {r['max_abs_err']:.2e} <= {r['tol']:.2e}{extra}")
    for r in rows:
        if "paired_read" in r:
            p = r["paired_read"]
            print(f"{r['method']} alternated with {p['probe']}, {p['rounds']} rounds: median "
                  f"{p['pct_read_bw_median']:.1f}% of the same round's read bandwidth (rounds "
                  f"{min(p['pct_read_bw_by_round']):.1f}-{max(p['pct_read_bw_by_round']):.1f}%)")


def population_op(r: dict, what: str) -> str:
    if r["status"] != "ok":
        return f"{what}: FAILED {r['reason']}"
    return (f"{what}: {fmt_seconds(r['min_s'])} s min, {fmt_seconds(r['median_s'])} s median "
            f"({r['candidates_per_s']:.1f} candidates/s)")


def print_population(p: dict) -> None:
    print(f"population on flat buffers ({p['elems'] / 1e6:.2f}M elements per checkpoint):")
    print("  " + population_op(p["batched"], f"weighted_sum_batched K={p['k']}"))
    print("  " + population_op(p["singles"], f"{p['k']} x weighted_sum"))
    if "per_candidate_throughput_ratio" in p:
        ratio = p["per_candidate_throughput_ratio"]
        verdict = "meets" if ratio >= 5 else "BELOW"
        print(f"  per-candidate throughput ratio: {ratio:.2f}x from the minima ({verdict} the >= 5x "
              f"target); {p['paired_ratio_median']:.2f}x median over the "
              f"{len(p['batched']['seconds'])} alternating rounds")
        b = p["batched"]
        limits = f"  batched limits: {b['fma_lanes_per_s'] / 1e9:.1f} G fma lanes/s"
        if "fma_peak_lanes_per_s" in p:
            peak = p["fma_peak_lanes_per_s"]
            limits += f" of {peak / 1e9:.1f} G probed ({100 * b['fma_lanes_per_s'] / peak:.0f}%)"
        limits += f"; {b['traffic_gbps']:.1f} GB/s read + written"
        print(limits)
        print(f"  bytes moved by {p['k']} singles / by the batch: {p['ratio_bytes']:.2f}x (the "
              "ratio if both move bytes equally fast)")
        if "ratio_ceiling_fma" in p:
            print(f"  fma ceiling on that ratio (the batch's K x N fmas per element at the probed "
                  f"peak, memory for free): {p['ratio_ceiling_fma']:.2f}x against these singles, "
                  f"{p['ratio_ceiling_fma_at_read_bw']:.2f}x against singles reading at the "
                  f"run's {p['read_gbps']:.1f} GB/s")
    if "traffic" in p:
        t = p["traffic"]
        print(f"  traffic-only probe of the same bytes (no arithmetic), same rounds: "
              f"{fmt_seconds(t['outputs_k']['min_s'])} s for K outputs, "
              f"{fmt_seconds(t['outputs_1']['min_s'])} s for one (ratio "
              f"{t['ratio_median']:.2f}x); batched takes "
              f"{t['batched_x_median']:.2f}x its probe's time, a single merge "
              f"{t['single_x_median']:.2f}x (medians)")
    bf16 = p["bf16_outputs"]
    line = "  " + population_op(bf16["batched"], "the same batch into bf16 outputs")
    if "batched_vs_fp32_outputs_median" in bf16:
        line += (f"; {bf16['batched_vs_fp32_outputs_median']:.2f}x the time of the float32-output "
                 "batch (median over rounds)")
    print(line)


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput of lcsc_fast's fused checkpoint merge against pure-torch "
                    "merging (naive add_ loop, torch._foreach_add_, stack + weighted sum), and "
                    "of the batched population op against single merges.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="where sources and outputs live (default: all available)")
    p.add_argument("--n", type=int, nargs="+", metavar="N",
                   help=f"numbers of checkpoints (default: {' '.join(map(str, DEFAULT_N))})")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   help="source dtypes (default: fp32 bf16); outputs are always fp32")
    p.add_argument("--params", type=lambda s: int(float(s)), metavar="COUNT",
                   help="model parameter count for every N (default: 2 GiB / (4 B * N), so "
                        "every config streams 2 GiB of fp32 or 1 GiB of bf16 sources)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats after one warm-up; min and median reported (default 3)")
    p.add_argument("--json", metavar="PATH",
                   help="also write machine info, bandwidth and all rows as JSON to PATH "
                        "(a directory gets <device>-<date>.json)")
    p.add_argument("--files-n", type=int, nargs="*", default=[64], metavar="N",
                   help="the N at which merges from safetensors files and from a packed store "
                        "are timed too (default: 64; writing and packing the files is what "
                        "takes time; none: --files-n)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="where the files for those merges are written (default: the temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (< 15 s); numbers are not meaningful")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n is None:
        args.n = QUICK_N if args.quick else DEFAULT_N
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if min(args.n) < 1 or args.repeats < 1:
        p.error("--n and --repeats must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    global lcsc_fast, reference
    lcsc_fast, reference = import_lcsc_fast()
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    fp32_source_nbytes = QUICK_FP32_SOURCE_NBYTES if args.quick else DEFAULT_FP32_SOURCE_NBYTES
    bandwidth_nbytes = QUICK_BANDWIDTH_BUFFER_NBYTES if args.quick else BANDWIDTH_BUFFER_NBYTES

    info = machine_info(cuda=any(d.type == "cuda" for d in devices))
    print(f"lcsc_fast merge throughput, {info['date']}")
    print(f"machine: {info['cpu_model']}, {info['cpu_count']} cores, {info['platform']}; "
          f"torch {info['torch_version']} ({info['torch_num_threads']} threads)"
          + (f"; CUDA: {info['cuda_device']}" if "cuda_device" in info else ""))
    print(f"lcsc_fast: {info['lcsc_fast_build_info']}")
    if args.quick:
        print("--quick: tiny sizes that fit in cache; a smoke test, numbers are not meaningful")
    print(f"validation: every method's warm-up output vs lcsc_fast.reference (fp64) on the first "
          f"{VALIDATE_NAMES} tensors of the state dict (the population op: first and last "
          f"{POPULATION_CHECK_ELEMS} elements); tol = 2 x plain-torch fp32 error + eps_fp32 x "
          f"max|ref|")
    print("GB/s = bytes of the N source tensors per merge / min seconds (1 GB = 1e9 bytes)")

    print(f"load average before the run (1, 5, 15 min): {info['loadavg_before']}")
    result = {"machine": info, "args": vars(args), "bandwidth": {}, "rows": [],
              "population": []}
    run_start = time.perf_counter()
    stall_start_us = cpu_stall_us()

    def progress(msg: str) -> None:  # stderr, so stdout is the report alone
        print(f"[{time.perf_counter() - run_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    for device in devices:
        progress(f"{device.type}: measuring read bandwidth")
        bw_before = measure_read_bandwidth(device, bandwidth_nbytes)
        configs = []  # (common fields, rows, population) per config
        for n in args.n:
            target_params = args.params or fp32_source_nbytes // (4 * n)
            for dtype_name in args.dtypes:
                cfg = Config(device, n, dtype_name, target_params)
                progress(f"{device.type} N={n} {dtype_name}: making checkpoints")
                setup_start = time.perf_counter()
                d = MergeData(cfg, args.seed)
                common = {"device": device.type, "n": n, "source_dtype": dtype_name,
                          "params": d.params, "unet_width": d.width, "tensors": len(d.names),
                          "source_nbytes": d.source_nbytes,
                          "setup_s": time.perf_counter() - setup_start}
                progress(f"{device.type} N={n} {dtype_name}: merge methods")
                rows = run_merge_methods(d, args.repeats)
                paired = run_paired_read(d, args.repeats, bandwidth_nbytes)
                if paired is not None:
                    next(r for r in rows if r["method"] == "fused MergePlan")["paired_read"] = paired
                if device.type == "cpu" and n in args.files_n:
                    progress(f"{device.type} N={n} {dtype_name}: from files and packed store")
                    rows += run_file_methods(d, args.repeats, args.workdir)
                progress(f"{device.type} N={n} {dtype_name}: population op")
                population = run_population(d, args.repeats)
                configs.append((common, rows, population))
                del d
                free_memory(device)
        # Measured again after the merges, and the larger used: a shared machine's bandwidth
        # moves, and a dip during one measurement would inflate every percentage.
        progress(f"{device.type}: measuring read bandwidth again")
        bw_after = measure_read_bandwidth(device, bandwidth_nbytes)
        bw = {"before": bw_before, "after": bw_after,
              "read_gbps": max(bw_before["read_gbps"], bw_after["read_gbps"])}
        result["bandwidth"][device.type] = bw

        print_bandwidth(device.type, bw)
        for common, rows, population in configs:
            finish_rows(rows, common["source_nbytes"], bw["read_gbps"])
            finish_population(population, bw["read_gbps"])
            print_config_header(common)
            print_rows(rows)
            print_population(population)
            result["rows"] += [{**common, **r} for r in rows]
            result["population"].append({**common, **population})
    progress("done")
    # With 2 threads on 2 cores, any other runnable process stalls torch's per-op parallel
    # regions (one per add_) far more than one fused call, so contention skews the comparison.
    stall_end_us = cpu_stall_us()
    if stall_start_us is not None and stall_end_us is not None:
        run_us = (time.perf_counter() - run_start) * 1e6
        pct = 100.0 * (stall_end_us - stall_start_us) / run_us
        result["cpu_pressure_pct"] = pct
        print(f"\nCPU pressure during the run: some task waited for a CPU {pct:.0f}% of the time "
              "(Linux PSI; near 0% on an otherwise idle machine)")
        if pct > 5:
            print("WARNING: other processes competed for the CPUs; the pure-torch loops suffer "
                  "most (every op is a parallel region), so rerun on a quiet machine")

    if args.json:
        print()
        write_json(json_path(args.json, "+".join(d.type for d in devices)), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
