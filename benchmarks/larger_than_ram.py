#!/usr/bin/env python
"""A merge of a trajectory larger than RAM, streamed from disk (a documented run, not CI).

Writes N bf16 checkpoints totalling --total-gib as safetensors files, evicts them from the page
cache, measures the disk's sequential read speed on those same files, evicts them again, then
merges all N into a float32 target in a fresh process and reports its throughput (source bytes
per second) against the disk's, and the process's peak RSS. Issue targets: peak RSS < 2 GB and
>= 70% of the disk's sequential read speed.

    python benchmarks/larger_than_ram.py --total-gib 32 --dir /mnt/big-disk
    python benchmarks/larger_than_ram.py --total-gib 2 --n 16       # a quick look

The files (--total-gib of them) go into a new folder made inside --dir, which is deleted
afterwards unless --keep is given; nothing else in --dir is touched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

READ_BLOCK_NBYTES = 16 * 2**20
TENSORS_PER_CHECKPOINT = 8

MERGE_SCRIPT = r"""
import json, resource, sys, time, torch, lcsc_fast
paths = json.loads(sys.argv[1])
traj = lcsc_fast.Trajectory.open(paths)
target = {name: torch.empty(traj.shapes[name], dtype=torch.float32) for name in traj.names}
w = [1.0 / len(traj)] * len(traj)
start = time.perf_counter()
lcsc_fast.merge_into(target, traj, w)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "checksum": float(sum(t.double().sum() for t in target.values()))}))
"""


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read_gbps(paths: list[str], nbytes: int) -> float:
    """Read the files front to back in large blocks, up to nbytes in all: the disk's speed."""
    buf = bytearray(READ_BLOCK_NBYTES)
    done, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while done < nbytes and (n := f.readinto(buf)):
                done += n
        if done >= nbytes:
            break
    return done / (time.perf_counter() - start) / 1e9


def write_checkpoints(folder: str, n: int, params: int) -> list[str]:
    from safetensors.torch import save_file

    pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    per_tensor = params // TENSORS_PER_CHECKPOINT
    paths = []
    for i in range(n):
        flat = pool.repeat((params + pool.numel() - 1) // pool.numel())[:params]
        flat = flat.roll(i * 7919).mul_(1.0 + i / n)  # distinct values per checkpoint
        tensors = {f"layer{t}.weight": flat[t * per_tensor:(t + 1) * per_tensor]
                   for t in range(TENSORS_PER_CHECKPOINT)}
        paths.append(os.path.join(folder, f"step-{i:08d}.safetensors"))
        save_file(tensors, paths[-1])
        print(f"  wrote {i + 1}/{n}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--total-gib", type=float, default=32.0, help="size of all checkpoints")
    p.add_argument("--n", type=int, default=128, help="number of checkpoints")
    p.add_argument("--dir", default="/var/tmp",
                   help="a folder on the disk to measure (created if missing); the checkpoints "
                        "go into a new folder inside it (default: /var/tmp, which unlike /tmp "
                        "is seldom in RAM)")
    p.add_argument("--keep", action="store_true",
                   help="keep the checkpoints afterwards (their folder is printed)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = p.parse_args(argv)

    params = int(args.total_gib * 2**30 / (2 * args.n)) // TENSORS_PER_CHECKPOINT * \
        TENSORS_PER_CHECKPOINT
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    os.makedirs(args.dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lcsc-larger-than-ram-", dir=args.dir)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "platform": platform.platform(), "ram_bytes": ram, "n": args.n,
              "params_per_checkpoint": params, "source_nbytes": 2 * params * args.n}
    try:
        start = time.perf_counter()
        paths = write_checkpoints(folder, args.n, params)
        result["write_seconds"] = time.perf_counter() - start
        evict(paths)
        result["disk_read_gbps"] = sequential_read_gbps(paths, min(8 * 2**30,
                                                                   result["source_nbytes"]))
        evict(paths)
        out = subprocess.run([sys.executable, "-c", MERGE_SCRIPT, json.dumps(paths)],
                             check=True, capture_output=True, text=True)
        merge = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(merge)
        result["merge_gbps"] = result["source_nbytes"] / merge["seconds"] / 1e9
        result["pct_of_disk"] = 100 * result["merge_gbps"] / result["disk_read_gbps"]
    finally:
        if args.keep:
            print(f"kept the checkpoints in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"trajectory: {args.n} bf16 checkpoints x {params / 1e6:.0f}M params = "
          f"{result['source_nbytes'] / 2**30:.1f} GiB on disk; RAM {ram / 2**30:.1f} GiB")
    print(f"disk sequential read: {result['disk_read_gbps']:.2f} GB/s (same files, cache evicted)")
    print(f"merge from disk: {merge['seconds']:.1f} s = {result['merge_gbps']:.2f} GB/s = "
          f"{result['pct_of_disk']:.0f}% of the disk's sequential read speed")
    print(f"peak RSS of the merging process: {merge['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(the float32 target alone is {4 * params / 2**30:.2f} GiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
