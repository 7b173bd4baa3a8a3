#!/usr/bin/env python
"""LoRA merge throughput: lcsc_fast.lora_weighted_sum against pure-torch low-rank merging.

The op (issue 6): out = scale * sum_i c_i * B_i @ A_i for one adapted layer out [m, n] and N
checkpoints' LoRA factors B_i [m, r], A_i [r, n], i.e. one GEMM over the concatenated rank
R = N * r. What is compared (out is float32; factors float32 or bfloat16; scale = 1):

  torch addmm loop   out.zero_(), then out.addmm_(B_i, A_i, alpha=c_i) per checkpoint (16-bit
                     factors upcast per checkpoint with .float()): float32 accumulation in out
  torch cat + mm     torch.cat of the B_i (upcast), scaled column-wise by c_i, torch.cat of the
                     A_i (upcast), then one torch.mm into out: the concatenated GEMM through
                     MKL/oneDNN sgemm on the CPU, cuBLAS on CUDA
  lcsc_fast fused    lcsc_fast.lora_weighted_sum(out, As, Bs, c): one native pass over the
                     concatenated rank, c_i applied while packing, no concatenated copies
  lcsc_fast LoraPlan the same op through lcsc_fast.LoraPlan(out, As, Bs), built once untimed,
                     then plan(c) per merge: what a search pays per layer (validation once;
                     per call the coefficients' check, the pointers' re-check, the native call)

and, as ceilings that are not a merge by themselves (the concatenation is prepared untimed):

  GEMM only (fp32)   torch.mm on the pre-concatenated, pre-scaled float32 factors: MKL sgemm on
                     the CPU, cuBLAS SGEMM on CUDA (TF32 off); the "fraction of GEMM" column
                     is its time over ours
  cuBLAS 16-bit GEMM CUDA with 16-bit factors only: torch.mm on pre-scaled, pre-concatenated
                     factors in their dtype (tensor cores, 16-bit output: scaled factors and
                     the result are rounded to 16 bits, so it is a speed ceiling; its error is
                     shown, not checked)

Columns: min and median time over --repeats runs after one warm-up (variants are interleaved
within each repeat, so a burst of load hits them alike); GFLOP/s = 2 m n R / min time; "vs
torch" = the best pure-torch variant's min time / this one's (> 1: faster); peak extra memory
(see below) measured and analytic.

Validation. Before timing, each variant's warm-up output (out pre-filled with NaN) is checked
against lcsc_fast.reference.lora_weighted_sum (float64) on a row sample (all rows up to 1024,
else the first and last 256): max|out - ref| <= 2 x (the error of plain torch doing the same
computation in float32 on the same rows: the larger of its two formulations, the addmm loop and
one mm over the concatenation, which round differently) + eps_fp32 x max|ref|. A variant that
fails is printed as FAILED and not timed.

Peak extra memory. Measured in a fresh subprocess per (config, variant) (a config's variants
run side by side, as they measure memory, not time): after one call on a tiny layer (thread
pools and libraries start outside the window), the inputs are built,
then the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs; ru_maxrss
where that is unavailable) is read after two calls and reported as the growth over the resident
size before them. On CUDA: torch.cuda.max_memory_allocated growth. Each child imports torch
(seconds on a busy 2-core machine), so by default only the largest-rank config of each layer
width is measured (--memory all: every config; --memory none: none). The analytic column
counts the temporaries each variant allocates by construction:
  addmm loop: float32 copies of one checkpoint's factors, (m + n) r 4 bytes (0 for fp32);
  cat + mm: the concatenations, (m + n) R x (4 bytes, + 2 for the 16-bit concatenation that
            .float() copies), plus R weights;
  fused: lcsc_fast._C.lora_cpu_scratch_nbytes (packed panels, plus one float32 output tile per
         thread when R spans several 32-rank panels) on the CPU; the N-entry pointer table on
         CUDA.

Sizes. The default grid (CPU, 2 cores: 6 minutes including the memory children on the
machine this was written on, under a load average of 5-10 from other work) is
512x512 with N in {16, 100, 400} x r in {4, 16, 64}; 1024x1024 with N in {16, 100, 400} at
r = 16, plus N = 100 at r = 4 and 64; 4096x4096 with N = 16 at r in {4, 16, 64}, plus N = 100
at r = 4; for fp32 and bf16 factors. --full adds 2048x2048 and the larger N x r at 1024 and
4096 (long: the addmm loop alone takes seconds per call there).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from _machine import (  # benchmarks/
    cpu_stall_us, import_lcsc_fast, json_path, machine_info, write_json)

MIB = 1024**2
EPS_FP32 = torch.finfo(torch.float32).eps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VALIDATE_ALL_ROWS_UP_TO = 1024
VALIDATE_EDGE_ROWS = 256

lcsc_fast = reference = None  # imported by main(), after argument parsing

EPILOG = """examples:
  python benchmarks/lora_throughput.py --quick
      smoke test, tiny sizes (numbers meaningless), well under a minute
  python benchmarks/lora_throughput.py
      default grid on every available device, fp32 and bf16 factors
  python benchmarks/lora_throughput.py --device cpu --dtypes bf16 --width 4096 --n 16 --rank 16
      one layer width, N and rank (each flag takes several values)
  python benchmarks/lora_throughput.py --full --memory none
      the larger grid, without the memory subprocesses
  python benchmarks/lora_throughput.py --device cpu --threads 1 --clock cpu
      one thread, timed in CPU seconds: comparable numbers on a machine others are loading
  python benchmarks/lora_throughput.py --json benchmarks/results/
      also save machine info and every row to benchmarks/results/lora-<device>-<date>.json
"""


@dataclass(frozen=True)
class Config:
    device: str
    m: int
    n: int
    num_checkpoints: int
    rank: int
    dtype_name: str

    @property
    def total_rank(self) -> int:
        return self.num_checkpoints * self.rank

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.total_rank

    def label(self) -> str:
        return (f"{self.device} | {self.m}x{self.n} | N={self.num_checkpoints} r={self.rank} "
                f"(R={self.total_rank}) | {self.dtype_name} factors -> fp32 out")


def grid(full: bool, quick: bool) -> list[tuple[int, int, int]]:
    """(width, N, r) of the configs to run."""
    if quick:
        return [(64, 3, 4), (96, 20, 16)]
    cells = [(512, n, r) for n in (16, 100, 400) for r in (4, 16, 64)]
    cells += [(1024, n, 16) for n in (16, 100, 400)] + [(1024, 100, 4), (1024, 100, 64)]
    cells += [(4096, 16, r) for r in (4, 16, 64)] + [(4096, 100, 4)]
    if full:
        cells += [(2048, n, r) for n in (16, 100) for r in (4, 16, 64)]
        cells += [(1024, n, r) for n in (16, 400) for r in (4, 64)]
        cells += [(4096, 100, r) for r in (16, 64)] + [(4096, 400, 16)]
    return sorted(set(cells))


# ---------------------------------------------------------------- one config's data

class LoraData:
    """N checkpoints' factors, coefficients, and a float32 out, for one config."""

    def __init__(self, cfg: Config, seed: int, ceilings: bool = True):
        self.cfg = cfg
        device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype_name]
        m, n, r, N = cfg.m, cfg.n, cfg.rank, cfg.num_checkpoints
        gen = torch.Generator().manual_seed(seed)
        # Factor scales as LoRA training leaves them (B small); coefficients exactly float32.
        self.As = [torch.randn(r, n, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(N)]
        self.Bs = [(0.1 * torch.randn(m, r, generator=gen)).to(device=device, dtype=dtype)
                   for _ in range(N)]
        w = torch.rand(N, generator=gen) + 0.5
        self.coeffs_t = (w / w.sum()).to(torch.float32)
        self.coeffs = self.coeffs_t.tolist()
        self.coeffs_device = self.coeffs_t.to(device)
        self.out = torch.empty(m, n, dtype=torch.float32, device=device)
        self.plan = lcsc_fast.LoraPlan(self.out, self.As, self.Bs)
        self.gemm_b = self.gemm_a = self.gemm_b16 = self.gemm_a16 = None
        if ceilings:
            weights = self.coeffs_device.repeat_interleave(r)
            self.gemm_b = torch.cat(self.Bs, 1).float() * weights  # [m, R]
            self.gemm_a = torch.cat(self.As, 0).float()  # [R, n]
            if device.type == "cuda" and dtype != torch.float32:
                self.gemm_b16 = self.gemm_b.to(dtype)
                self.gemm_a16 = self.gemm_a.to(dtype)
                self.out16 = torch.empty(m, n, dtype=dtype, device=device)


# ---------------------------------------------------------------- the variants

def torch_addmm_loop(d: LoraData) -> torch.Tensor:
    d.out.zero_()
    for c, a, b in zip(d.coeffs, d.As, d.Bs):
        d.out.addmm_(b.float(), a.float(), alpha=c)  # .float() is a no-op for fp32
    return d.out


def torch_cat_mm(d: LoraData) -> torch.Tensor:
    weights = d.coeffs_device.repeat_interleave(d.cfg.rank)
    b = torch.cat(d.Bs, 1).float()
    b.mul_(weights)  # column i*r + p scaled by c_i: the upcast copy is scaled in place
    a = torch.cat(d.As, 0).float()
    return torch.mm(b, a, out=d.out)


def fused(d: LoraData) -> torch.Tensor:
    return lcsc_fast.lora_weighted_sum(d.out, d.As, d.Bs, d.coeffs)


def planned(d: LoraData) -> torch.Tensor:
    return d.plan(d.coeffs)


def gemm_only(d: LoraData) -> torch.Tensor:
    return torch.mm(d.gemm_b, d.gemm_a, out=d.out)


def gemm_16bit(d: LoraData) -> torch.Tensor:
    return torch.mm(d.gemm_b16, d.gemm_a16, out=d.out16)


TORCH_VARIANTS = {"torch addmm loop": torch_addmm_loop, "torch cat + mm": torch_cat_mm}
FUSED = "lcsc_fast fused"
PLAN = "lcsc_fast LoraPlan"
CEILINGS = {"GEMM only (fp32)": gemm_only, "cuBLAS 16-bit GEMM": gemm_16bit}
ALL_VARIANTS = {**TORCH_VARIANTS, FUSED: fused, PLAN: planned, **CEILINGS}
UNCHECKED = {"cuBLAS 16-bit GEMM"}  # rounds scaled factors and the result to 16 bits


def applicable(name: str, cfg: Config) -> bool:
    if name == "cuBLAS 16-bit GEMM":
        return cfg.device == "cuda" and cfg.dtype_name != "fp32"
    return True


def analytic_extra_nbytes(name: str, cfg: Config) -> int | None:
    m, n, r, R = cfg.m, cfg.n, cfg.rank, cfg.total_rank
    wide = cfg.dtype_name != "fp32"
    if name == "torch addmm loop":
        return (m + n) * r * 4 if wide else 0
    if name == "torch cat + mm":
        return (m + n) * R * (6 if wide else 4) + R * 4
    if name in (FUSED, PLAN):
        if cfg.device == "cpu":
            return lcsc_fast._C.lora_cpu_scratch_nbytes(m, n, R, torch.get_num_threads())
        return cfg.num_checkpoints * 20
    return None


# ---------------------------------------------------------------- validation

@dataclass
class Check:
    ok: bool
    max_abs_err: float
    tol: float
    torch_err: float


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    e = (out.detach().to("cpu", torch.float64) - ref).abs().max().item()
    return math.inf if math.isnan(e) else e


class Oracle:
    """fp64 reference and plain-torch error on a row sample of out.

    Plain torch has two natural float32 formulations of the op, which round differently: a
    per-checkpoint addmm loop (short partial sums) and one mm over the concatenation (the
    BLAS's long dot products). The yardstick is the larger of their two errors.
    """

    def __init__(self, d: LoraData):
        m, r = d.cfg.m, d.cfg.rank
        if m <= VALIDATE_ALL_ROWS_UP_TO:
            self.rows = torch.arange(m)
        else:
            self.rows = torch.cat([torch.arange(VALIDATE_EDGE_ROWS),
                                   torch.arange(m - VALIDATE_EDGE_ROWS, m)])
        rows_dev = self.rows.to(d.out.device)
        bs = [b[rows_dev] for b in d.Bs]
        self.ref = reference.lora_weighted_sum((len(self.rows), d.cfg.n), d.As, bs, d.coeffs)
        loop = torch.zeros(len(self.rows), d.cfg.n, dtype=torch.float32, device=d.out.device)
        for c, a, b in zip(d.coeffs, d.As, bs):
            loop.addmm_(b.float(), a.float(), alpha=c)
        cat = torch.mm(torch.cat(bs, 1).float() * d.coeffs_device.repeat_interleave(r),
                       torch.cat(d.As, 0).float())
        self.torch_err = max(max_abs_err(loop, self.ref), max_abs_err(cat, self.ref))
        self.tol = 2.0 * self.torch_err + EPS_FP32 * self.ref.abs().max().item()

    def check(self, out: torch.Tensor) -> Check:
        err = max_abs_err(out[self.rows.to(out.device)].float(), self.ref)
        return Check(err <= self.tol, err, self.tol, self.torch_err)


# ---------------------------------------------------------------- timing

def synchronizer(device: str):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def run_config(cfg: Config, repeats: int, seed: int, clock=time.perf_counter) -> list[dict]:
    sync = synchronizer(cfg.device)
    d = LoraData(cfg, seed)
    oracle = Oracle(d)
    rows, live = [], {}
    for name, fn in ALL_VARIANTS.items():
        if not applicable(name, cfg):
            continue
        row = {"variant": name, "analytic_extra_bytes": analytic_extra_nbytes(name, cfg)}
        target = d.out16 if name == "cuBLAS 16-bit GEMM" else d.out
        target.fill_(float("nan"))
        try:
            fn(d)  # warm-up, and the output that is validated
            sync()
            check = oracle.check(target)
        except Exception as e:  # report and go on: one broken variant must not hide the rest
            row.update(status="FAILED", reason=f"{type(e).__name__}: {e}")
            rows.append(row)
            continue
        row.update(max_abs_err=check.max_abs_err, tol=check.tol, torch_err=check.torch_err)
        if name not in UNCHECKED and not check.ok:
            row.update(status="FAILED",
                       reason=f"max abs err {check.max_abs_err:.3g} > tol {check.tol:.3g}")
            rows.append(row)
            continue
        row.update(status="ok", checked=name not in UNCHECKED, seconds=[])
        rows.append(row)
        live[name] = (fn, row)
    for _ in range(repeats):  # interleaved, so load bursts hit every variant alike
        for fn, row in live.values():
            sync()
            start = clock()
            fn(d)
            sync()
            row["seconds"].append(clock() - start)
    for row in rows:
        if row["status"] == "ok":
            row["min_s"] = min(row["seconds"])
            row["median_s"] = statistics.median(row["seconds"])
            row["gflops"] = cfg.flops / row["min_s"] / 1e9
    torch_best = min((r["min_s"] for r in rows
                      if r["status"] == "ok" and r["variant"] in TORCH_VARIANTS), default=None)
    ours = next((r for r in rows if r["variant"] == FUSED and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            continue
        if torch_best is not None and row["variant"] not in CEILINGS:
            row["speedup_vs_best_torch"] = torch_best / row["min_s"]
        if ours is not None and row["variant"] in CEILINGS:
            row["fused_fraction_of_this"] = row["min_s"] / ours["min_s"]
    del d
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- peak memory (subprocess)

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def memory_child(cfg: Config, variant: str, seed: int) -> dict:
    """In a fresh process: peak memory growth of two calls of one variant on one config."""
    import resource

    fn = ALL_VARIANTS[variant]
    # One call on a tiny layer first: thread pools and libraries initialise outside the window.
    fn(LoraData(Config(cfg.device, 16, 16, 2, 2, cfg.dtype_name), seed, ceilings=False))
    d = LoraData(cfg, seed, ceilings=False)
    d.out.zero_()  # out's pages are resident before the window, as a model's weights are
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(d)
        fn(d)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before,
                "how": "torch.cuda.max_memory_allocated growth"}
    before = _rss_bytes()
    if _reset_hwm():
        fn(d)
        fn(d)
        return {"peak_extra_bytes": max(0, _hwm_bytes() - before), "how": "VmHWM growth"}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn(d)
    fn(d)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is the whole process's peak: growth past the setup's peak, a lower bound.
    return {"peak_extra_bytes": max(0, peak - max(before, peak_before)),
            "how": "ru_maxrss growth (a lower bound)"}


def measure_memory(cfg: Config, variants: list[str], seed: int) -> dict[str, dict]:
    """Peak extra memory of each variant, each in its own fresh process; the processes run at
    the same time (they measure memory, not time)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    children = {}
    for variant in variants:
        job = json.dumps({"cfg": asdict(cfg), "variant": variant, "seed": seed})
        children[variant] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--memory-child", job],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    results = {}
    for variant, child in children.items():
        out, err = child.communicate(timeout=900)
        if child.returncode != 0:
            results[variant] = {"memory_error": (err.strip().splitlines() or ["failed"])[-1]}
        else:
            results[variant] = json.loads(out.strip().splitlines()[-1])
    return results


def memory_configs(configs: list[Config], mode: str) -> set[Config]:
    if mode == "none":
        return set()
    if mode == "all":
        return set(configs)
    largest = {}  # (device, dtype, width) -> the config with the largest rank
    for c in configs:
        key = (c.device, c.dtype_name, c.m, c.n)
        if key not in largest or c.total_rank > largest[key].total_rank:
            largest[key] = c
    return set(largest.values())


# ---------------------------------------------------------------- output

def fmt_ms(s: float) -> str:
    ms = 1e3 * s
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def fmt_mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def print_rows(cfg: Config, rows: list[dict]) -> None:
    print(f"\n== {cfg.label()} | {cfg.flops / 1e9:.3g} GFLOP ==")
    print(f"{'variant':<20} {'min ms':>9} {'median ms':>10} {'GFLOP/s':>8} {'vs torch':>9} "
          f"{'extra MiB meas/anal':>20}  validation (max abs err vs fp64)")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:<20} FAILED  {r['reason']}")
            continue
        if "speedup_vs_best_torch" in r:
            versus = f"{r['speedup_vs_best_torch']:.2f}x"
        elif "fused_fraction_of_this" in r:
            versus = f"({100 * r['fused_fraction_of_this']:.0f}%)"
        else:
            versus = "-"
        measured = r.get("peak_extra_bytes")
        mem = f"{fmt_mib(measured)} / {fmt_mib(r['analytic_extra_bytes'])}"
        check = (f"ok {r['max_abs_err']:.2e} <= {r['tol']:.2e}" if r.get("checked")
                 else f"not checked (16-bit output), err {r['max_abs_err']:.2e}")
        print(f"{r['variant']:<20} {fmt_ms(r['min_s']):>9} {fmt_ms(r['median_s']):>10} "
              f"{r['gflops']:>8.1f} {versus:>9} {mem:>20}  {check}")


def print_summary(results: list[tuple[Config, list[dict]]]) -> None:
    print("\nsummary: lcsc_fast fused (one-shot, and through a LoraPlan) vs the best pure-torch "
          "variant (min times), and the one-shot op as a fraction of the bare GEMM ceiling")
    print(f"{'device':<6} {'dtype':<5} {'m x n':>10} {'N':>4} {'r':>3} {'R':>6} "
          f"{'fused GFLOP/s':>13} {'vs best torch':>13} {'plan vs torch':>13} {'of GEMM':>8}")
    for cfg, rows in results:
        by = {r["variant"]: r for r in rows if r["status"] == "ok"}
        ours = by.get(FUSED)
        if ours is None:
            print(f"{cfg.device:<6} {cfg.dtype_name:<5} {cfg.m}x{cfg.n:<5} FAILED")
            continue
        gemm = by.get("GEMM only (fp32)")
        frac = f"{100 * gemm['fused_fraction_of_this']:.0f}%" if gemm else "-"
        speedup = ours.get("speedup_vs_best_torch")
        plan = by.get(PLAN, {}).get("speedup_vs_best_torch")
        print(f"{cfg.device:<6} {cfg.dtype_name:<5} {f'{cfg.m}x{cfg.n}':>10} "
              f"{cfg.num_checkpoints:>4} {cfg.rank:>3} {cfg.total_rank:>6} "
              f"{ours['gflops']:>13.1f} {(f'{speedup:.2f}x' if speedup else '-'):>13} "
              f"{(f'{plan:.2f}x' if plan else '-'):>13} {frac:>8}")


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput of lcsc_fast.lora_weighted_sum (fused low-rank merge over the "
                    "concatenated rank) against pure-torch LoRA merging (an addmm loop; one mm "
                    "over concatenated scaled factors), with the bare GEMM as a ceiling.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="where factors and out live (default: all available)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   help="factor dtypes (default: fp32 bf16); out is always fp32")
    p.add_argument("--width", type=int, nargs="+", metavar="W",
                   help="square layer widths to keep from the grid, or with --n and --rank the "
                        "widths to run")
    p.add_argument("--n", type=int, nargs="+", metavar="N", help="numbers of checkpoints")
    p.add_argument("--rank", type=int, nargs="+", metavar="R", help="LoRA ranks")
    p.add_argument("--full", action="store_true", help="the larger grid (see the docstring)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test; numbers are not meaningful")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run: every variant's thread count "
                        "(default: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter seconds (default); cpu: the process's CPU seconds "
                        "(time.process_time), which a busy machine's preemption does not inflate; "
                        "meaningful with --threads 1 (with more, it sums the threads' time, "
                        "spin-waits included)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats after one warm-up; min and median reported (default 3)")
    p.add_argument("--memory", choices=["largest", "all", "none"], default=None,
                   help="configs whose peak extra memory is measured in subprocesses (default: "
                        "the largest rank of each width; --quick: none)")
    p.add_argument("--json", metavar="PATH",
                   help="also write machine info and all rows as JSON to PATH (a directory "
                        "gets lora-<device>-<date>.json)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.memory is None:
        args.memory = "none" if args.quick else "largest"
    if args.repeats < 1:
        p.error("--repeats must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; use it with --device cpu")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    return args


def build_configs(args, devices: list[str]) -> list[Config]:
    if args.n or args.rank:
        widths = args.width or [1024]
        cells = [(w, n, r) for w in widths for n in (args.n or [100]) for r in (args.rank or [16])]
    else:
        cells = [c for c in grid(args.full, args.quick)
                 if not args.width or c[0] in args.width]
    return [Config(device, w, w, n, r, dtype) for device in devices for dtype in args.dtypes
            for w, n, r in cells]


def main(argv=None) -> int:
    args = parse_args(argv)
    global lcsc_fast, reference
    lcsc_fast, reference = import_lcsc_fast()
    if args.memory_child:
        job = json.loads(args.memory_child)
        print(json.dumps(memory_child(Config(**job["cfg"]), job["variant"], job["seed"])))
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 GEMMs stay fp32 on CUDA
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append("cuda")
    configs = build_configs(args, devices)
    measure = memory_configs(configs, args.memory)

    info = machine_info(cuda="cuda" in devices)
    print(f"lcsc_fast LoRA merge throughput, {info['date']}")
    print(f"machine: {info['cpu_model']}, {info['cpu_count']} cores, {info['platform']}; "
          f"torch {info['torch_version']} ({info['torch_num_threads']} threads)"
          + (f"; CUDA: {info['cuda_device']}" if "cuda_device" in info else ""))
    print(f"lcsc_fast: {info['lcsc_fast_build_info']}")
    if args.quick:
        print("--quick: tiny sizes; a smoke test, numbers are not meaningful")
    print("validation: each variant's warm-up output vs lcsc_fast.reference (fp64) on a row "
          "sample; tol = 2 x plain-torch fp32 error (the larger of addmm loop and cat + mm) + "
          "eps_fp32 x max|ref|")
    clock_name = "process CPU seconds" if args.clock == "cpu" else "wall seconds"
    print(f"times: {clock_name}, {torch.get_num_threads()} thread(s); GFLOP/s = 2 m n R / min "
          "seconds; 'vs torch' = best pure-torch min / this min; (x%) on a ceiling = its time / "
          "the fused op's")
    print(f"peak extra memory: measured in a fresh process for {len(measure)} of "
          f"{len(configs)} configs ('-' elsewhere) / analytic")
    print(f"load average before the run (1, 5, 15 min): {info['loadavg_before']}")
    result = {"machine": info, "args": vars(args), "rows": []}
    run_start = time.perf_counter()
    stall_start_us = cpu_stall_us()

    def progress(msg: str) -> None:  # stderr, so stdout is the report alone
        print(f"[{time.perf_counter() - run_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    results = []
    for cfg in configs:
        progress(cfg.label())
        rows = run_config(cfg, args.repeats, args.seed, clock)
        if cfg in measure:
            progress("  peak memory, one fresh process per variant")
            timed = [r for r in rows if r["status"] == "ok" and r["variant"] not in CEILINGS]
            memory = measure_memory(cfg, [r["variant"] for r in timed], args.seed)
            for row in timed:
                row.update(memory[row["variant"]])
        print_rows(cfg, rows)
        results.append((cfg, rows))
        result["rows"] += [{**asdict(cfg), "total_rank": cfg.total_rank, "flops": cfg.flops,
                            **r} for r in rows]
    print_summary(results)
    progress("done")
    stall_end_us = cpu_stall_us()
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average after the run: {info['loadavg_after']}")
    if stall_start_us is not None and stall_end_us is not None:
        run_us = (time.perf_counter() - run_start) * 1e6
        pct = 100.0 * (stall_end_us - stall_start_us) / run_us
        result["cpu_pressure_pct"] = pct
        print(f"CPU pressure during the run: some task waited for a CPU {pct:.0f}% of the time"
              + (" (timings are noisy; rerun on a quiet machine)" if pct > 10 else ""))
    if args.json:
        write_json(json_path(args.json, "lora-" + "+".join(devices)), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
