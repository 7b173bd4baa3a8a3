"""The benchmarks run end to end at tiny sizes and report what they say.

Timings at these sizes mean nothing. What is checked: every method's output passed its fp64
check (a method that fails is reported, not timed, and the script still exits 0, so only the
JSON shows it), the JSON carries the figures that issue notes quote, and the comparisons the
merge benchmark makes in alternation really alternate.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import device_params

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str, tmp_path: Path) -> dict:
    """Runs benchmarks/<script> with args from tmp_path; its JSON report."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def run_quick(script: str, device: str, tmp_path: Path) -> dict:
    return run_benchmark(script, "--quick", "--device", device, tmp_path=tmp_path)


def failed(rows: list[dict]) -> str:
    """The rows whose method failed, one line each with everything but the timings (so that
    an assertion on it says which and why); empty when none did."""
    return "\n".join(repr({k: v for k, v in r.items() if k != "seconds"})
                     for r in rows if r["status"] != "ok")


@pytest.mark.parametrize("device", device_params())
def test_merge_throughput_quick(device, tmp_path):
    result = run_quick("merge_throughput.py", device, tmp_path)
    args = result["args"]
    rows = result["rows"]
    assert rows
    bad = failed(rows)
    assert not bad, bad
    assert result["bandwidth"][device]["read_gbps"] > 0

    planned = [r for r in rows if r["method"] == "fused MergePlan"]
    assert len(planned) == len(args["n"]) * len(args["dtypes"])
    for row in planned:  # the merge alternated with the read probe, round by round
        paired = row["paired_read"]
        assert paired["rounds"] == args["repeats"]
        assert len(paired["merge_s"]) == len(paired["read_s"]) == args["repeats"]
        assert paired["pct_read_bw_median"] == statistics.median(paired["pct_read_bw_by_round"])
        assert paired["pct_read_bw_median"] > 0

    assert len(result["population"]) == len(planned)
    for pop in result["population"]:
        batched, singles = pop["batched"], pop["singles"]
        assert batched["status"] == singles["status"] == "ok"
        assert len(batched["seconds"]) == len(singles["seconds"]) == args["repeats"]
        assert pop["per_candidate_throughput_ratio"] == pytest.approx(
            singles["min_s"] / batched["min_s"])
        assert pop["paired_ratio_median"] == pytest.approx(statistics.median(
            s / b for s, b in zip(singles["seconds"], batched["seconds"])))
        bf16 = pop["bf16_outputs"]  # the batch into bf16 outputs, in the same rounds
        assert bf16["batched"]["status"] == "ok"
        assert len(bf16["batched"]["seconds"]) == args["repeats"]
        assert bf16["batched"]["tol"] > batched["tol"]  # eps of bf16, not of fp32
        assert bf16["batched_vs_fp32_outputs_median"] == pytest.approx(statistics.median(
            b / f for b, f in zip(bf16["batched"]["seconds"], batched["seconds"])))
        size = pop["source_nbytes"] // (pop["n"] * pop["elems"])
        assert pop["ratio_bytes"] == pytest.approx(  # fp32 outputs written, sources read
            pop["k"] * (pop["n"] * size + 4) / (pop["n"] * size + 4 * pop["k"]))
        if device != "cpu":
            assert "traffic" not in pop  # the traffic probe is a CPU one
            continue
        # The batch's fmas at the probed peak against the singles' time, measured and at the
        # run's read bandwidth.
        lanes = pop["k"] * pop["n"] * pop["elems"]
        assert batched["fma_lanes"] == lanes
        peak = pop["fma_peak_lanes_per_s"]
        assert pop["ratio_ceiling_fma"] == pytest.approx(singles["min_s"] * peak / lanes)
        read_s = pop["k"] * pop["source_nbytes"] / (result["bandwidth"]["cpu"]["read_gbps"] * 1e9)
        assert pop["ratio_ceiling_fma_at_read_bw"] == pytest.approx(read_s * peak / lanes)
        traffic = pop["traffic"]  # timed in the same rounds as the ops
        k_s, one_s = traffic["outputs_k"]["seconds"], traffic["outputs_1"]["seconds"]
        assert len(k_s) == len(one_s) == args["repeats"]
        assert traffic["ratio_median"] == pytest.approx(statistics.median(
            pop["k"] * o / k for o, k in zip(one_s, k_s)))
        assert traffic["batched_x_median"] == pytest.approx(statistics.median(
            b / k for b, k in zip(batched["seconds"], k_s)))


@pytest.mark.parametrize("device", device_params())
def test_lora_throughput_quick(device, tmp_path):
    result = run_quick("lora_throughput.py", device, tmp_path)
    assert result["rows"]
    bad = failed(result["rows"])
    assert not bad, bad


def test_recorder_overhead_quick(tmp_path):
    runs = tmp_path / "runs"  # made by the benchmark, and left empty
    result = run_benchmark("recorder_overhead.py", "--quick", "--dir", str(runs),
                           tmp_path=tmp_path)
    assert list(runs.iterdir()) == []
    assert result["snapshot_nbytes"] > 0
    assert "overhead_percent_block_paired_median" in result


def test_search_overhead_small(tmp_path):
    result = run_benchmark("search_overhead.py", "--n", "8", "--params", "20000", "--budget", "24",
                           tmp_path=tmp_path)
    sources = {row["source"] for row in result["rows"]}
    assert len(sources) == 2  # state dicts in memory, and the same as a Trajectory of files
    assert all(row["seconds_per_evaluation"] > 0 for row in result["rows"])


def test_larger_than_ram_small_leaves_the_folder_as_it_was(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    (folder / "keep-me.txt").write_text("a user's file")
    result = run_benchmark("larger_than_ram.py", "--total-gib", "0.05", "--n", "4", "--dir",
                           str(folder), tmp_path=tmp_path)
    assert result["n"] == 4 and result["merge_gbps"] > 0
    # Its checkpoints are gone, and what was there before is still there.
    assert [p.name for p in folder.iterdir()] == ["keep-me.txt"]
    assert (folder / "keep-me.txt").read_text() == "a user's file"


def test_larger_than_ram_keep(tmp_path):
    folder = tmp_path / "disk"  # made by the benchmark
    run_benchmark("larger_than_ram.py", "--total-gib", "0.01", "--n", "2", "--dir", str(folder),
                  "--keep", tmp_path=tmp_path)
    (kept,) = folder.iterdir()
    assert sorted(p.name for p in kept.iterdir()) == [
        "step-00000000.safetensors", "step-00000001.safetensors"]


def test_time_alternating_interleaves(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import merge_throughput

    calls = []
    seconds = merge_throughput.time_alternating(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, lambda: None)
    assert calls == ["a", "b"] * 3
    assert {label: len(s) for label, s in seconds.items()} == {"a": 3, "b": 3}
