"""Facts about the machine a benchmark ran on, and the JSON report, shared by the benchmark
scripts."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys


def import_lcsc_fast():
    """(lcsc_fast, lcsc_fast.reference), or exit saying how to build the engine. The
    benchmarks call it after parsing their arguments, so --help works before a build."""
    try:
        import lcsc_fast
        from lcsc_fast import reference
    except ImportError as e:
        sys.exit(f"cannot import lcsc_fast ({e}); build it first: "
                 "cd <repo root> && pip install -e . --no-build-isolation")
    return lcsc_fast, reference


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(cuda: bool = False) -> dict:
    """Date, platform, CPU, torch and lcsc_fast build, and the load average now (other work on
    the machine shows up here and in the spread of the timings); the GPU with cuda."""
    import torch

    import lcsc_fast

    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "lcsc_fast_build_info": lcsc_fast.build_info(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    if cuda:
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    return info


def cpu_stall_us() -> int | None:
    """Total microseconds some task waited for a CPU (Linux PSI), or None where unavailable."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.split("total=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def json_path(path: str, stem: str) -> str:
    """path itself, or <path>/<stem>-<date>.json when path is a directory (or ends in /)."""
    if path.endswith(os.sep) or os.path.isdir(path):
        return os.path.join(path, f"{stem}-{dt.date.today().isoformat()}.json")
    return path


def write_json(path: str, result: dict) -> None:
    """The report as indented JSON at path (folders created); says where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
