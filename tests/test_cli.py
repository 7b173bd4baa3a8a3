"""The lcsc-fast command line (lcsc_fast.cli) and its plots (lcsc_fast.plots).

* A small trajectory, written in tmp_path: a Recorder-format directory (steps 100..800, uneven
  gaps) and plain .safetensors files, each checkpoint with an fp32, an fp16 and an int64 tensor;
  the objective is the squared distance of the merged floating-point tensors to 1.0, in a module
  file that the CLI imports from the current directory.
* inspect (text and --json, of checkpoints and of a packed store); search end to end
  (coefficients.json summing to 1, history.jsonl, two valid PNGs, the score table); merge round
  trip (bitwise equal to Trajectory.merge, with --dtype and --base too); pack; --resume after an
  interruption and to extend a finished search, both ending exactly where an uninterrupted search
  does.
* Bad inputs exit with status 2 and one line naming the problem, without a traceback, and leave
  the output as it was: coefficient files of the wrong length or for other steps, bad
  module:function, missing paths, tensor names that do not match, an existing output without
  --force, an existing search state without --resume. The user's own code raising exits with 1
  and shows its traceback.
* Every --help shows examples; every example in them runs as written.
* The installed console script runs (once, in a subprocess, from tmp_path), and importing
  lcsc_fast never imports matplotlib.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lcsc_fast
from conftest import assert_bitwise_equal, generator, randn
from lcsc_fast import Trajectory, cli, plots

STEPS = [100, 200, 300, 500, 800]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

OBJECTIVE_SOURCE = '''\
"""Objectives and targets for the lcsc-fast CLI tests."""
import os

import torch

CALLS = {"n": 0}


def _tensors(model):
    return model.state_dict() if isinstance(model, torch.nn.Module) else model


def distance(model):
    """Squared distance of the floating-point tensors to 1.0; raises KeyboardInterrupt at call
    number LCSC_CLI_TEST_STOP_AT (a kill mid-search)."""
    CALLS["n"] += 1
    if CALLS["n"] == int(os.environ.get("LCSC_CLI_TEST_STOP_AT", "0")):
        raise KeyboardInterrupt
    return float(sum(((t.double() - 1.0) ** 2).sum() for t in _tensors(model).values()
                     if t.is_floating_point()))


def broken(model):
    raise RuntimeError("the objective is broken")


def not_a_number(model):
    return "low"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(16, 4))
        self.b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
        self.register_buffer("count", torch.zeros(1, dtype=torch.int64))


def build_net():
    return Net()


def build_renamed():
    return {"weight": torch.zeros(16, 4), "b": torch.zeros(4), "count": torch.zeros(1)}


def build_list():
    return [torch.zeros(16, 4)]


NOT_CALLABLE = 3
'''


# ---------------------------------------------------------------- fixtures and helpers

def checkpoint(k: int, n: int, step: int) -> dict:
    """Checkpoint k of n: theta_k = 1 + u_k d + noise, u_k = 1 - k/(n + 2) > 0, approaching the
    objective's minimum (all ones) without reaching it."""
    g = generator("cli", k)
    u = 1.0 - k / (n + 2)
    d = randn((16, 4), torch.float32, generator("cli", "d"))
    return {"w": 1.0 + u * d + 0.05 * u * randn((16, 4), torch.float32, g),
            "b": (1.0 + u * torch.linspace(-1, 1, 4)).to(torch.float16),
            "count": torch.tensor([step], dtype=torch.int64)}


def write_recorded(directory, steps=STEPS) -> str:
    """A Recorder-format directory: one file per step and the manifest listing them."""
    os.makedirs(directory)
    snapshots = []
    for k, step in enumerate(steps):
        name = f"step-{step:08d}.safetensors"
        save_file(checkpoint(k, len(steps), step), os.path.join(directory, name))
        snapshots.append({"step": step, "file": name,
                          "nbytes": os.path.getsize(os.path.join(directory, name))})
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"format": "lcsc_fast.trajectory", "version": 1, "every": 100,
                   "snapshots": snapshots}, f)
    return str(directory)


def write_files(directory, n: int = 4) -> list[str]:
    os.makedirs(directory)
    paths = []
    for k in range(n):
        paths.append(os.path.join(directory, f"ckpt-{k}.safetensors"))
        save_file(checkpoint(k, n, k), paths[-1])
    return paths


def write_lora(directory) -> tuple[list[str], str]:
    """Three PEFT adapter folders directory/lora/ckpt-{100,200,300}/ (rank 2, alpha 4, on a
    Linear named lin) and their base weights directory/base.safetensors."""
    base = os.path.join(directory, "base.safetensors")
    g = generator("cli-lora", "base")
    save_file({"lin.weight": randn((16, 4), torch.float32, g),
               "lin.bias": randn((16,), torch.float32, g)}, base)
    folders = []
    for k, step in enumerate((100, 200, 300)):
        folders.append(os.path.join(directory, "lora", f"ckpt-{step}"))
        os.makedirs(folders[-1])
        g = generator("cli-lora", k)
        save_file({"base_model.model.lin.lora_A.weight": randn((2, 4), torch.float32, g),
                   "base_model.model.lin.lora_B.weight": randn((16, 2), torch.float32, g)},
                  os.path.join(folders[-1], "adapter_model.safetensors"))
        with open(os.path.join(folders[-1], "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                       "target_modules": ["lin"]}, f)
    return folders, base


def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    """Status 2 and one error line (no traceback) that contains every fragment."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def assert_png(path, min_bytes: int = 5000) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG file"
    assert len(data) >= min_bytes, f"{path}: {len(data)} bytes; expected a real plot"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 300, (width, height)


def listing(directory) -> dict[str, bytes]:
    """Every file under directory, with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the current directory, holding run/ (recorded), files/ (plain checkpoints)
    and an objective module; yields (tmp_path, module name, module). Modules imported from
    tmp_path are forgotten afterwards, so other tests import their own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LCSC_CLI_TEST_STOP_AT", raising=False)
    # A per-test module name: the CLI imports it by name, and sys.modules would otherwise hand
    # this test another test's module file.
    name = "cliobj_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{name}.py").write_text(OBJECTIVE_SOURCE)
    write_recorded(tmp_path / "run")
    write_files(tmp_path / "files")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    module = __import__(name)
    yield tmp_path, name, module
    for key in set(sys.modules) - before:
        file = getattr(sys.modules[key], "__file__", None) or ""
        if file.startswith(str(tmp_path)):
            del sys.modules[key]


def search(capsys, name, out, *extra, path="run", budget=64):
    return run(capsys, "search", path, "--objective", f"{name}:distance", "--out", out,
               "--budget", budget, "--no-progress", *extra)


def read_result(out) -> tuple[dict, str]:
    """(coefficients.json, history.jsonl text) of a search output directory."""
    with open(os.path.join(out, "coefficients.json")) as f:
        record = json.load(f)
    with open(os.path.join(out, "history.jsonl")) as f:
        return record, f.read()


# ---------------------------------------------------------------- inspect

def test_inspect_text_shows_kind_steps_tensors_and_size(work, capsys):
    code, out, err = run(capsys, "inspect", "run")
    assert code == 0, err
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    assert fields["kind"] == "checkpoints (a Recorder directory)"
    assert fields["checkpoints"] == "5"
    assert fields["steps"] == "100..800, gaps 100 (x2), 200 (x1), 300 (x1)"
    assert fields["tensors"].startswith("3 (2 floating-point")
    assert fields["parameters"].startswith("68 ")  # 16 x 4 + 4
    assert fields["dtypes"] == ("float16: 1 tensor, 4 elements; float32: 1 tensor, 64 "
                                "elements; int64: 1 tensor, 1 element")
    total = sum(os.path.getsize(p) for p in glob.glob("run/*.safetensors"))
    assert f"({total:,} bytes in 5 files)" in fields["on disk"]


def test_inspect_json_of_files_in_the_order_given(work, capsys):
    files = sorted(glob.glob("files/*.safetensors"))
    code, out, err = run(capsys, "inspect", *files, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "checkpoints" and info["source"] == "files"
    assert info["checkpoints"] == 4 and info["steps"] == [0, 1, 2, 3]
    assert info["step_gaps"] == {"1": 3}
    assert info["tensors"] == 3 and info["floating_tensors"] == 2 and info["parameters"] == 68
    assert info["dtypes"]["int64"] == {"tensors": 1, "elements": 1}
    assert info["bytes_on_disk"] == sum(os.path.getsize(p) for p in files)
    code, out, _ = run(capsys, "inspect", *files)
    assert code == 0 and "every 1 (checkpoint files carry no training step" in out


# ---------------------------------------------------------------- search, merge, pack

def test_search_end_to_end_writes_coefficients_history_plots_and_table(work, capsys):
    _, name, _ = work
    code, out, err = search(capsys, name, "out")
    assert code == 0, err
    record, history = read_result("out")
    assert len(record["coefficients"]) == 5 and record["steps"] == STEPS
    assert abs(sum(record["coefficients"]) - 1.0) < 1e-9
    assert record["algorithm"] == "lcsc" and record["evaluations"] == 64
    assert set(record["baselines"]) >= {"last", "uniform", "ema 0.999", "ema*"}
    # The checkpoints stop short of the minimum: the search beats every baseline.
    assert record["score"] < min(record["baselines"].values())
    entries = [json.loads(line) for line in history.splitlines()]
    assert [e["evaluation"] for e in entries] == list(range(1, 65))
    assert entries[-1]["best_score"] == record["score"]
    assert_png("out/coefficients.png")
    assert_png("out/search.png")
    assert os.path.exists("out/search.state")

    # The table: the search first, then every baseline with its score, best first.
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert rows[0][:3] == ["lcsc", "search", f"{record['score']:.6g}"]
    table = {" ".join(r[:-1]) if r[0] != "ema*" else "ema*": r
             for r in rows[1:1 + len(record["baselines"])]}
    for baseline, score in record["baselines"].items():
        assert f"{score:.6g}" in table[baseline], (baseline, table)
    assert "wrote out/coefficients.json" in out
    assert f"merge with: lcsc-fast merge run --coeffs {os.path.join('out', 'coefficients.json')}" \
        in out


def test_merge_round_trip_of_a_search_is_bitwise_trajectory_merge(work, capsys):
    _, name, _ = work
    assert search(capsys, name, "out", budget=32)[0] == 0
    code, out, err = run(capsys, "merge", "run", "--coeffs", "out/coefficients.json",
                         "--out", "merged.safetensors")
    assert code == 0, err
    assert "merged 5 checkpoints" in out
    with open("out/coefficients.json") as f:
        coeffs = json.load(f)["coefficients"]
    merged = load_file("merged.safetensors")
    with Trajectory.open("run") as traj:
        expected = traj.merge(coeffs)
    assert merged.keys() == expected.keys()
    for key in expected:
        assert_bitwise_equal(merged[key], expected[key], key)
    assert torch.equal(merged["count"], torch.tensor([800]))
    assert [p for p in os.listdir(".") if p.endswith(".tmp")] == []


@pytest.mark.parametrize("options, kwargs", [
    pytest.param([], {}, id="plain"),
    pytest.param(["--dtype", "bf16"], {"dtype": torch.bfloat16}, id="dtype=bf16"),
    pytest.param(["--base", "0"], {"base": 0}, id="base=0"),
])
def test_merge_bare_list_with_options(work, capsys, options, kwargs):
    files = sorted(glob.glob("files/*.safetensors"))
    coeffs = [-0.25, 0.5, 0.25, 0.5]
    with open("w.json", "w") as f:
        json.dump(coeffs, f)
    code, _, err = run(capsys, "merge", *files, "--coeffs", "w.json", "--out", "m.safetensors",
                       *options)
    assert code == 0, err
    merged = load_file("m.safetensors")
    with Trajectory.open(files) as traj:
        expected = traj.merge(coeffs, **kwargs)
    for key in expected:
        assert_bitwise_equal(merged[key], expected[key], key)


def test_lora_adapters_with_their_base(tmp_path, monkeypatch, capsys):
    """--lora-base opens the PATHs as LoRA adapters over those base weights: inspect says so,
    merge writes what Trajectory.open(..., base=...).merge writes, search runs over them and
    its hint repeats --lora-base. Adapter folders without --lora-base, or --lora-scale alone,
    are usage errors naming the option."""
    monkeypatch.chdir(tmp_path)
    folders, base = write_lora(".")
    code, out, err = run(capsys, "inspect", *folders, "--lora-base", base)
    assert code == 0, err
    assert "LoRA adapters over base weights W0: 1 weight adapted, rank 2" in out
    code, out, err = run(capsys, "inspect", *folders, "--lora-base", base, "--json")
    assert code == 0 and json.loads(out)["lora_ranks"] == {"lin.weight": 2}, err
    with open("w.json", "w") as f:
        json.dump([0.2, -0.3, 1.1], f)
    code, out, err = run(capsys, "merge", *folders, "--lora-base", base, "--coeffs", "w.json",
                         "--out", "merged.safetensors")
    assert code == 0, err
    merged = load_file("merged.safetensors")
    with Trajectory.open(folders, base=base) as traj:
        expected = traj.merge([0.2, -0.3, 1.1])
    assert merged.keys() == expected.keys() == {"lin.weight", "lin.bias"}
    for key in expected:
        assert_bitwise_equal(merged[key], expected[key], key)
    (tmp_path / "lora_eval.py").write_text(OBJECTIVE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code, out, err = run(capsys, "search", *folders, "--lora-base", base, "--objective",
                             "lora_eval:distance", "--out", "s", "--budget", "16",
                             "--no-progress")
    finally:
        sys.modules.pop("lora_eval", None)
    assert code == 0, err
    assert f"--lora-base {base} --coeffs" in out
    code, _, err = run(capsys, "inspect", folders[0])
    assert_usage_error(code, err, folders[0], "holds a LoRA adapter", "--lora-base")
    code, _, err = run(capsys, "merge", *folders, "--lora-scale", "2", "--coeffs", "w.json",
                       "--out", "m2.safetensors")
    assert_usage_error(code, err, "--lora-scale", "--lora-base")


def test_pack_then_inspect_and_merge_the_packed_store(work, capsys):
    _, name, _ = work
    code, out, err = run(capsys, "pack", "run", "packed", "--dtype", "fp32", "--base", "-1")
    assert code == 0, err
    assert "packed 5 checkpoints (steps 100..800) into packed" in out
    code, out, err = run(capsys, "inspect", "packed", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "packed" and info["steps"] == STEPS
    assert info["packed_base"] == 4 and info["delta_dtype"] == "float32"
    assert info["files"] == 3 and info["parameters"] == 68
    code, out, _ = run(capsys, "inspect", "packed")
    assert code == 0 and "packed store (checkpoint 4 whole, float32 deltas)" in out

    # The search's coefficients (with the run's steps) merge from the store as well.
    assert search(capsys, name, "out", budget=16)[0] == 0
    code, _, err = run(capsys, "merge", "packed", "--coeffs", "out/coefficients.json",
                       "--out", "merged.safetensors")
    assert code == 0, err
    with open("out/coefficients.json") as f:
        coeffs = json.load(f)["coefficients"]
    with Trajectory.open("run") as traj:
        expected = traj.merge(coeffs)
    merged = load_file("merged.safetensors")
    torch.testing.assert_close(merged["w"], expected["w"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["b"], expected["b"])
    assert torch.equal(merged["count"], expected["count"])

    code, _, err = run(capsys, "pack", "run", "packed")
    assert_usage_error(code, err, "packed exists and is not empty")


def test_search_with_a_target_module_and_cmaes(work, capsys):
    _, name, _ = work
    code, out, err = search(capsys, name, "out", "--target", f"{name}:build_net",
                            "--algorithm", "cmaes", "--seed", "3", budget=24)
    assert code == 0, err
    record, _ = read_result("out")
    assert record["algorithm"] == "cmaes" and record["seed"] == 3
    assert record["score"] <= min(record["baselines"].values())
    assert out.splitlines()[1].split()[:2] == ["cmaes", "search"]


# ---------------------------------------------------------------- resume

def test_resume_after_an_interruption_ends_like_an_uninterrupted_search(work, capsys,
                                                                         monkeypatch):
    _, name, module = work
    assert search(capsys, name, "whole")[0] == 0

    # 9 baselines, then generations of 16: call 46 falls in the third generation.
    module.CALLS["n"] = 0
    monkeypatch.setenv("LCSC_CLI_TEST_STOP_AT", "46")
    code, _, err = search(capsys, name, "cut")
    assert code == 130
    assert "interrupted" in err and "--resume" in err and "cut/search.state" in err
    assert not os.path.exists("cut/coefficients.json")
    monkeypatch.delenv("LCSC_CLI_TEST_STOP_AT")

    code, _, err = search(capsys, name, "cut")
    assert_usage_error(code, err, "cut/search.state exists", "--resume")
    code, _, err = search(capsys, name, "cut", "--resume")
    assert code == 0, err
    assert read_result("cut") == read_result("whole")


def test_resume_with_a_larger_budget_extends_a_finished_search(work, capsys):
    _, name, _ = work
    assert search(capsys, name, "whole")[0] == 0
    assert search(capsys, name, "ext", budget=32)[0] == 0
    before = listing("ext")
    code, _, err = search(capsys, name, "ext")  # again, without --resume
    assert_usage_error(code, err, "search.state exists", "pass --resume")
    assert listing("ext") == before
    code, _, err = search(capsys, name, "ext", "--resume")
    assert code == 0, err
    assert read_result("ext") == read_result("whole")


def test_resume_without_a_state_starts_afresh(work, capsys):
    _, name, _ = work
    code, _, err = search(capsys, name, "out", "--resume", budget=16)
    assert code == 0
    assert "no out/search.state yet; starting from the beginning" in err


def test_resume_with_other_arguments_is_refused(work, capsys):
    _, name, _ = work
    assert search(capsys, name, "out", budget=16)[0] == 0
    before = listing("out")
    code, _, err = search(capsys, name, "out", "--resume", "--seed", "1", budget=16)
    assert_usage_error(code, err, "search.state holds the state of a search with other "
                                  "arguments")
    assert listing("out") == before


# ---------------------------------------------------------------- bad inputs

@pytest.fixture
def merge_case(work, capsys):
    """An existing output (to be replaced only with --force) and a run with 5 checkpoints;
    returns a function that writes coeffs.json and runs merge with --force."""
    with open("merged.safetensors", "wb") as f:
        f.write(b"the previous output")

    def merge(content, *extra):
        with open("coeffs.json", "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        before = sorted(os.listdir("."))
        code, _, err = run(capsys, "merge", "run", "--coeffs", "coeffs.json",
                           "--out", "merged.safetensors", "--force", *extra)
        with open("merged.safetensors", "rb") as f:
            assert f.read() == b"the previous output", "a failed merge changed the output"
        assert sorted(os.listdir(".")) == before, "a failed merge left files behind"
        return code, err

    return merge


@pytest.mark.parametrize("content, fragments", [
    pytest.param([0.5, 0.5, 0.0], ["3 coefficients", "5 checkpoints"], id="short-list"),
    pytest.param({"coefficients": [0.2] * 6}, ["6 coefficients", "5 checkpoints"],
                 id="long-object"),
    pytest.param({"coefficients": [0.2] * 5, "steps": [0, 1, 2, 3, 4]},
                 ["its steps [0, 1, 2, 3, 4] differ", "[100, 200, 300, 500, 800]"],
                 id="other-steps"),
    pytest.param({"coeffs": [0.2] * 5}, ['needs a "coefficients" list', "found keys: coeffs"],
                 id="no-coefficients-key"),
    pytest.param([0.2, 0.2, "x", 0.2, 0.2], ["a JSON list of numbers"], id="not-numbers"),
    pytest.param("[0.2, 0.2,", ["cannot read it as JSON"], id="not-json"),
    pytest.param("[0.2, 0.2, NaN, 0.2, 0.2]", ["coefficient 2 is nan", "finite"], id="nan"),
    pytest.param("[0.2, 0.2, 0.2, 1" + "0" * 400 + ", 0.2]",
                 ["coefficient 3 is too large for a float"], id="huge-integer"),
])
def test_merge_bad_coefficient_file(merge_case, content, fragments):
    code, err = merge_case(content)
    assert_usage_error(code, err, "--coeffs coeffs.json", *fragments)


def test_merge_bad_base_index(merge_case):
    code, err = merge_case([0.2] * 5, "--base", "7")
    assert_usage_error(code, err, "index 7 is out of range for 5 checkpoints")


def test_merge_refuses_to_overwrite_without_force(work, capsys):
    with open("merged.safetensors", "wb") as f:
        f.write(b"keep me")
    with open("w.json", "w") as f:
        json.dump([0.2] * 5, f)
    code, _, err = run(capsys, "merge", "run", "--coeffs", "w.json", "--out",
                       "merged.safetensors")
    assert_usage_error(code, err, "--out merged.safetensors exists", "--force")
    with open("merged.safetensors", "rb") as f:
        assert f.read() == b"keep me"
    # Nor into the trajectory's folder, even with --force: not over a snapshot, not over the
    # manifest (which would lose the run), not as a new file there.
    before = listing("run")
    for target in ("run/step-00000100.safetensors", "run/manifest.json",
                   "run/merged.safetensors"):
        code, _, err = run(capsys, "merge", "run", "--coeffs", "w.json", "--out", target,
                           "--force")
        assert_usage_error(code, err, f"--out {target} is in run, which the merge reads")
        assert listing("run") == before
    # Nor over a checkpoint file given as a PATH.
    files = sorted(glob.glob("files/*.safetensors"))
    with open("w4.json", "w") as f:
        json.dump([0.25] * 4, f)
    before = listing("files")
    code, _, err = run(capsys, "merge", *files, "--coeffs", "w4.json", "--out", files[2],
                       "--force")
    assert_usage_error(code, err, f"--out {files[2]} is {files[2]}, which the merge reads")
    assert listing("files") == before
    code, _, err = run(capsys, "merge", "run", "--coeffs", "w.json", "--out",
                       "nowhere/merged.safetensors")
    assert_usage_error(code, err, "does not exist; create it first")


@pytest.mark.parametrize("argv, fragments", [
    pytest.param(["inspect", "missing.safetensors"], ["missing.safetensors: no such file"],
                 id="inspect-missing-file"),
    pytest.param(["inspect", "run", "missing.safetensors"], ["run", "no model.safetensors"],
                 id="inspect-directory-among-files"),
    pytest.param(["inspect", "files"], ["files: no manifest.json here"],
                 id="inspect-plain-directory"),
    pytest.param(["merge", "missing/", "--coeffs", "w.json", "--out", "m.safetensors"],
                 ["missing/: no such file"], id="merge-missing-path"),
    pytest.param(["merge", "run", "--coeffs", "nope.json", "--out", "m.safetensors"],
                 ["--coeffs nope.json: no such file"], id="merge-missing-coeffs"),
    pytest.param(["pack", "missing", "packed"], ["missing: no such file"],
                 id="pack-missing-path"),
])
def test_missing_paths(work, capsys, argv, fragments):
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, *fragments)
    assert not os.path.exists("m.safetensors") and not os.path.exists("packed")


@pytest.mark.parametrize("command", ["merge", "pack"])
def test_a_full_disk_is_one_error_line_and_changes_nothing(work, capsys, monkeypatch, command):
    """safetensors reports a full disk as SafetensorError, neither OSError nor ValueError: one
    error line naming the output and the cause, status 2, and the output as it was."""
    import importlib

    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    monkeypatch.setattr(importlib.import_module("lcsc_fast.pack"), "save_file", disk_full)
    with open("w.json", "w") as f:
        json.dump([0.2] * 5, f)
    with open("m.safetensors", "wb") as f:
        f.write(b"keep me")
    before, names = listing("."), sorted(os.listdir("."))
    out = {"merge": "m.safetensors", "pack": "packed"}[command]
    argv = {"merge": ["merge", "run", "--coeffs", "w.json", "--out", out, "--force"],
            "pack": ["pack", "run", out]}[command]
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, f"lcsc-fast {command}: error: writing {out} failed",
                       "No space left on device", "nothing was changed")
    assert listing(".") == before and sorted(os.listdir(".")) == names


def test_checkpoints_whose_tensor_names_differ(work, capsys):
    odd = checkpoint(0, 2, 0)
    odd["weight"] = odd.pop("w")
    save_file(odd, "odd.safetensors")
    code, _, err = run(capsys, "inspect", "files/ckpt-0.safetensors", "odd.safetensors")
    assert_usage_error(code, err, "odd.safetensors: its tensors differ",
                       "missing 'w'", "unexpected 'weight'")
    code, _, err = run(capsys, "merge", "files/ckpt-0.safetensors", "odd.safetensors",
                       "--coeffs", "w.json", "--out", "m.safetensors")
    assert_usage_error(code, err, "missing 'w'")
    assert not os.path.exists("m.safetensors")


@pytest.mark.parametrize("spec, fragments", [
    pytest.param("no_colon", ["expected MODULE:FUNCTION"], id="no-colon"),
    pytest.param("no_such_module_xyz:f", ["no module named 'no_such_module_xyz'"],
                 id="no-module"),
    pytest.param("{name}:missing", ["module '{name}' has no 'missing'", "distance"],
                 id="no-function"),
    pytest.param("{name}:NOT_CALLABLE", ["'NOT_CALLABLE' is a int, not a function"],
                 id="not-callable"),
    pytest.param("missing.py:f", ["no such file missing.py"], id="no-file"),
    pytest.param("{name}:not_a_number", ["returned str 'low', not a number"],
                 id="returns-a-string"),
])
def test_search_bad_objective(work, capsys, spec, fragments):
    _, name, _ = work
    spec = spec.format(name=name)
    code, _, err = run(capsys, "search", "run", "--objective", spec, "--out", "out",
                       "--no-progress")
    assert_usage_error(code, err, "--objective", *(f.format(name=name) for f in fragments))
    if "not_a_number" not in spec:  # refused before the search starts: nothing written
        assert not os.path.exists("out")


@pytest.mark.parametrize("builder, fragments", [
    pytest.param("build_renamed", ["missing 'w'", "unexpected 'weight'"], id="names-differ"),
    pytest.param("build_list", ["returned list", "torch.nn.Module or a dict of tensors"],
                 id="not-a-model"),
])
def test_search_target_that_does_not_fit(work, capsys, builder, fragments):
    _, name, _ = work
    code, _, err = search(capsys, name, "out", "--target", f"{name}:{builder}")
    assert_usage_error(code, err, *fragments)
    assert not os.path.exists("out/coefficients.json")


def test_search_too_few_checkpoints_and_bad_budget(work, capsys):
    _, name, _ = work
    code, _, err = search(capsys, name, "out", path="files/ckpt-0.safetensors")
    assert_usage_error(code, err, "1 checkpoint(s); a search needs at least 2")
    code, _, err = search(capsys, name, "out", budget=0)
    assert code == 2 and "--budget: 0 is not positive" in err


def test_merge_of_a_checkpoint_holding_nan_is_refused(work, capsys):
    """0 * NaN is NaN: a zero coefficient does not remove a NaN, so the merge is refused,
    naming the tensor and the checkpoint, and nothing is written."""
    files = sorted(glob.glob("files/*.safetensors"))
    broken = checkpoint(0, 4, 0)
    broken["w"][3, 1] = float("nan")
    save_file(broken, files[0])
    with open("w.json", "w") as f:
        json.dump([0.0, 0.5, 0.25, 0.25], f)
    code, _, err = run(capsys, "merge", *files, "--coeffs", "w.json", "--out", "m.safetensors")
    assert_usage_error(code, err, "the merged 'w' is not finite", "checkpoint(s) [0] hold NaN",
                       "nothing was written")
    assert not os.path.exists("m.safetensors")


@pytest.mark.parametrize("options, value, coeff, fragments", [
    pytest.param(["--dtype", "fp16"], 1e5, 0.25,
                 ["its values reach 100000, beyond the range of float16 (largest 65504); merge "
                  "with --dtype fp32 or bf16"], id="fp16"),
    pytest.param(["--dtype", "fp16", "--base", "-1"], 1e5, 0.25,
                 ["its values reach 100000, beyond the range of float16"], id="fp16-base"),
    pytest.param(["--dtype", "bf16"], 3.4e38, 0.25,
                 ["beyond the range of bfloat16 (largest 3.38953e+38); merge with --dtype fp32;"],
                 id="bf16"),
    pytest.param(["--dtype", "fp32"], 1e5, 1e34, ["the coefficients overflow float32 there"],
                 id="fp32"),
])
def test_merge_beyond_the_output_dtypes_range_says_so(work, capsys, options, value, coeff,
                                                      fragments):
    """Finite checkpoints whose merge overflows: the error names the range that was exceeded,
    the output dtype's (fp16 ends at 65504; say which --dtype holds it) or float32's."""
    files = sorted(glob.glob("files/*.safetensors"))
    for path in files:
        tensors = load_file(path)
        tensors["w"] = torch.full_like(tensors["w"], value)
        save_file(tensors, path)
    with open("w.json", "w") as f:
        json.dump([coeff] * 4, f)
    code, _, err = run(capsys, "merge", *files, "--coeffs", "w.json", "--out", "m.safetensors",
                       *options)
    assert_usage_error(code, err, "the merged 'w' is not finite: ", *fragments,
                       "nothing was written")
    assert ("overflow float32" in err) == (options[1] == "fp32")
    assert not os.path.exists("m.safetensors")


def test_search_every_on_a_trajectory_that_records_its_steps(work, capsys):
    """--every would replace the recorded steps, and merge would then refuse the result."""
    _, name, _ = work
    code, _, err = search(capsys, name, "out", "--every", "5")
    assert_usage_error(code, err, "--every: run records its checkpoints' steps",
                       "[100, 200, 300, 500, 800]")
    assert not os.path.exists("out")


def test_search_negative_seed(work, capsys):
    _, name, _ = work
    code, _, err = search(capsys, name, "out", "--seed", "-1")
    assert code == 2 and "argument --seed: -1 is negative" in err
    assert not os.path.exists("out")


@pytest.mark.parametrize("as_path", [False, True], ids=["module", "file-path"])
def test_an_objective_module_that_raises_on_import_shows_its_traceback(work, capsys, as_path):
    tmp, name, _ = work
    module = f"{name}_raises"
    (tmp / f"{module}.py").write_text("raise ValueError('broken at import')\n")
    spec = f"{module}.py:distance" if as_path else f"{module}:distance"
    code, _, err = run(capsys, "search", "run", "--objective", spec, "--out", "out",
                       "--no-progress")
    assert code == 1
    assert "Traceback" in err and "ValueError: broken at import" in err
    assert err.strip().splitlines()[-1] == (
        f"lcsc-fast search: error: --objective {spec}: importing "
        f"{module}{'.py' if as_path else ''} raised ValueError (traceback above)")
    assert not os.path.exists("out")


def test_an_objective_that_raises_shows_its_traceback(work, capsys):
    _, name, _ = work
    code, _, err = run(capsys, "search", "run", "--objective", f"{name}:broken", "--out", "out",
                       "--no-progress")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: the objective is broken" in err
    assert err.strip().splitlines()[-1] == (f"lcsc-fast search: error: --objective {name}:broken "
                                            "raised RuntimeError (traceback above)")


def test_objective_from_a_file_path(work, capsys):
    _, name, _ = work
    code, _, err = run(capsys, "search", "run", "--objective", f"./{name}.py:distance",
                       "--out", "out", "--budget", "16", "--no-progress")
    assert code == 0, err


# ---------------------------------------------------------------- help and its examples

def test_help_of_every_command_shows_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "examples" in out
    for command in ("inspect", "search", "merge", "pack"):
        assert f"lcsc-fast {command} " in out
        code, out_cmd, _ = run(capsys, command, "--help")
        assert code == 0 and "examples:" in out_cmd
        assert re.search(rf"^  lcsc-fast {command} \S", out_cmd, re.MULTILINE), out_cmd
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"lcsc-fast {lcsc_fast.__version__}"
    code, _, err = run(capsys)
    assert code == 2 and "usage: lcsc-fast" in err


def example_workspace(directory, packed: bool) -> None:
    """The files the --help examples name: run/, ckpt/, run-packed/ (when packed),
    search/coefficients.json, a.safetensors, b.safetensors, w.json, deltas.json, LoRA adapters
    lora/ckpt-*/ with base.safetensors and lora-w.json, and my_eval.py with the objective shown
    in 'search --help' plus fid and build_model."""
    write_recorded(os.path.join(directory, "run"))
    os.makedirs(os.path.join(directory, "ckpt"))
    for k, step in enumerate((1000, 2000, 3000)):
        save_file(checkpoint(k, 3, step), os.path.join(directory, f"ckpt/step-{step}.safetensors"))
    for k, name in enumerate("ab"):
        save_file(checkpoint(k, 2, k), os.path.join(directory, f"{name}.safetensors"))
    if packed:
        lcsc_fast.pack(os.path.join(directory, "run"), os.path.join(directory, "run-packed"))
    write_lora(directory)
    os.makedirs(os.path.join(directory, "search"))
    for file, coeffs in (("search/coefficients.json", {"coefficients": [0.2] * 5,
                                                       "steps": STEPS}),
                         ("w.json", [-0.5, 1.5]), ("deltas.json", [0.1] * 5),
                         ("lora-w.json", [0.2, 0.3, 0.5])):
        with open(os.path.join(directory, file), "w") as f:
            json.dump(coeffs, f)
    shown = cli._SEARCH_EPILOG.split("current directory")[1].split("examples:")[0]
    code = textwrap.dedent(shown.split("\n", 2)[2]).strip()
    assert code.startswith("import torch") and "def score(model):" in code
    with open(os.path.join(directory, "my_eval.py"), "w") as f:
        f.write(code + textwrap.dedent('''

            def fid(model):
                return score(model.state_dict())


            def build_model():
                model = torch.nn.Module()
                model.w = torch.nn.Parameter(torch.zeros(16, 4))
                model.b = torch.nn.Parameter(torch.zeros(4))
                model.register_buffer("count", torch.zeros(1, dtype=torch.int64))
                return model
            '''))


def test_every_help_example_runs(tmp_path, monkeypatch, capsys):
    epilogs = {"main": cli._MAIN_EPILOG, "inspect": cli._INSPECT_EPILOG,
               "search": cli._SEARCH_EPILOG, "merge": cli._MERGE_EPILOG,
               "pack": cli._PACK_EPILOG}
    ran = 0
    try:
        for label, epilog in epilogs.items():
            # Each help page's examples run in order in a fresh copy of the files they name;
            # the main page and pack's write run-packed/ themselves.
            workdir = tmp_path / label
            os.makedirs(workdir)
            example_workspace(str(workdir), packed=label not in ("main", "pack"))
            monkeypatch.chdir(workdir)
            for line in epilog.format(PROG="lcsc-fast").splitlines():
                if not line.startswith("  lcsc-fast "):
                    continue
                argv = shlex.split(line.split("#")[0])[1:]
                argv = [a for arg in argv for a in (sorted(glob.glob(arg)) if "*" in arg
                                                    else [arg])]
                if argv[0] == "demo":
                    continue  # minutes of training: tests/test_demo.py runs it, --quick
                if argv[0] == "search":
                    argv.append("--no-progress")
                code, _, err = run(capsys, *argv)
                assert code == 0, f"{label}: {line.strip()} -> {err}"
                ran += 1
            sys.modules.pop("my_eval", None)  # the next page's my_eval.py is another file
    finally:
        sys.modules.pop("my_eval", None)
    assert ran >= 21


# ---------------------------------------------------------------- plots

def test_plots_of_non_finite_and_empty_histories(tmp_path):
    history = [{"evaluation": 1, "best_score": float("inf")},
               {"evaluation": 2, "best_score": 3.0}, {"evaluation": 3, "best_score": 0.5}]
    baselines = {"last": 4.0, "uniform": float("nan"), "ema*": 100.0}
    assert plots.plot_search(history, baselines, tmp_path / "a.png") == str(tmp_path / "a.png")
    assert_png(tmp_path / "a.png")
    plots.plot_search([], {}, tmp_path / "empty.png")
    assert_png(tmp_path / "empty.png", min_bytes=2000)
    plots.plot_coefficients(range(300), [1 / 300] * 300, tmp_path / "c.png")
    assert_png(tmp_path / "c.png")
    with pytest.raises(ValueError, match="3 coefficients for 2 steps"):
        plots.plot_coefficients([1, 2], [0.5, 0.5, 0.0], tmp_path / "d.png")
    with pytest.raises(ValueError, match="baseline 'ema\\*' has 1 coefficients for 2 steps"):
        plots.plot_coefficients([1, 2], [0.5, 0.5], tmp_path / "d.png", {"ema*": [1.0]})
    assert not (tmp_path / "d.png").exists()


# ---------------------------------------------------------------- the installed entry point

def console_script() -> str:
    """The installed lcsc-fast script: beside this interpreter, else on PATH."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(folder, "lcsc-fast")
        if os.path.exists(path):
            return path
    path = shutil.which("lcsc-fast")
    assert path is not None, ("the lcsc-fast console script is not installed; run "
                              "`pip install -e . --no-build-isolation`")
    return path


def test_console_script_runs_a_search_from_the_current_directory(work):
    tmp, name, _ = work
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="lcsc-fast")
    assert entry.value == "lcsc_fast.cli:main"
    # No PYTHONPATH: the objective module is found only because the CLI puts the current
    # directory on sys.path (a console script's sys.path starts with its bin directory).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([console_script(), "search", "run", "--objective", f"{name}:distance",
                           "--out", "out", "--budget", "16"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "lcsc search" in proc.stdout and "LCSC search" in proc.stderr  # table; progress bar
    assert_png(tmp / "out" / "search.png")
    proc = subprocess.run([console_script(), "merge", "run", "--coeffs", "nope.json", "--out",
                           "m.safetensors"], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "lcsc-fast merge: error: --coeffs nope.json: no such file\n"


def test_importing_lcsc_fast_does_not_import_matplotlib(tmp_path):
    code = ("import sys, lcsc_fast, lcsc_fast.cli, lcsc_fast.plots; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    # From tmp_path: python -c puts the working directory first on sys.path, and from the
    # repository root that is the source tree, not the installed package.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_search_every_sets_the_steps_and_merge_accepts_them(work, capsys):
    """Checkpoint files record no steps: search --every K gives the EMA baselines steps K apart
    (recorded in coefficients.json), and merge accepts that file for the same files; outputs
    get the usual permissions, not a temporary file's private ones."""
    tmp, name, _ = work
    files = sorted(str(p) for p in (tmp / "files").glob("*.safetensors"))
    code, _, err = run(capsys, "search", *files, "--objective", f"{name}:distance", "--out", "s",
                       "--budget", "20", "--every", "100", "--no-progress")
    assert code == 0, err
    record = json.loads((tmp / "s" / "coefficients.json").read_text())
    assert record["steps"] == [100 * i for i in range(len(files))]
    code, _, err = run(capsys, "merge", *files, "--coeffs", "s/coefficients.json", "--out",
                       "m.safetensors")
    assert code == 0, err
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
