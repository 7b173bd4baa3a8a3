#!/usr/bin/env python
"""The search's cost per evaluation besides the objective: merge plus bookkeeping.

A trajectory of --n checkpoints of a --params-parameter model (fp32 state dicts in memory, and
the same written as safetensors files and opened as a Trajectory), a free objective (it reads one
element), and lcsc_fast.search with --budget evaluations (baselines included in the count);
reports seconds per evaluation against one single in-memory merge, for each algorithm. The
search merges each generation in one pass (weighted_sum_batched's kernel), so an evaluation can
cost less than a merge.

    python benchmarks/search_overhead.py                  # 400 checkpoints x 1M parameters
    python benchmarks/search_overhead.py --n 64 --budget 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

import lcsc_fast

TENSORS = 8  # the model's parameters split over this many tensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=400, help="checkpoints")
    p.add_argument("--params", type=int, default=1_000_000, help="parameters per checkpoint")
    p.add_argument("--budget", type=int, default=200, help="evaluations per search")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    per = args.params // TENSORS
    pool = torch.randn(per * 2, generator=g)
    checkpoints = [{f"t{k}": pool[(i * 7 + k) % per:][:per].clone() for k in range(TENSORS)}
                   for i in range(args.n)]
    target = {name: torch.empty(per) for name in checkpoints[0]}

    def objective(state):  # free: the search's own cost is what is measured
        return float(state["t0"][0])

    plan = lcsc_fast.MergePlan(target, checkpoints, base=0)
    w = [1.0 / args.n] * args.n

    def merge_seconds() -> float:  # the best of 10: what the engine alone costs per merge
        plan(w)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            plan(w)
            times.append(time.perf_counter() - start)
        return min(times)

    merge_s = merge_seconds()

    folder = tempfile.mkdtemp(prefix="lcsc-search-")
    rows = []
    try:
        paths = []
        from safetensors.torch import save_file

        for i, ck in enumerate(checkpoints):
            paths.append(os.path.join(folder, f"step-{i:08d}.safetensors"))
            save_file(ck, paths[-1])
        trajectory = lcsc_fast.Trajectory.open(paths)
        for source_name, source in (("state dicts in memory", checkpoints),
                                    ("Trajectory (mmap)", trajectory)):
            for algorithm in ("lcsc", "cmaes"):
                start = time.perf_counter()
                lcsc_fast.search(source, objective, target, budget=args.budget,
                                 algorithm=algorithm, progress=False)
                seconds = time.perf_counter() - start
                evaluations = args.budget + len(lcsc_fast.coefficients.baselines(range(args.n)))
                rows.append({"source": source_name, "algorithm": algorithm,
                             "seconds_per_evaluation": seconds / evaluations})
        trajectory.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    merge_s = min(merge_s, merge_seconds())  # again, after the searches warmed everything
    source_nbytes = 4 * per * TENSORS * args.n
    print(f"{args.n} checkpoints x {per * TENSORS / 1e6:.2f}M fp32 parameters "
          f"({source_nbytes / 2**30:.2f} GiB); budget {args.budget} evaluations + baselines")
    print(f"in-memory merge alone (MergePlan): {1e3 * merge_s:.1f} ms "
          f"({source_nbytes / merge_s / 1e9:.1f} GB/s)")
    for r in rows:
        ratio = r["seconds_per_evaluation"] / merge_s
        print(f"  {r['source']:<22} {r['algorithm']:<6} "
              f"{1e3 * r['seconds_per_evaluation']:.1f} ms per evaluation, objective excluded "
              f"= {ratio:.2f} x one single merge (a generation is merged in one pass)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "params": per * TENSORS, "budget": args.budget,
                       "merge_seconds": merge_s, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
