"""lcsc_fast.Recorder: what it records, the on-disk format, the writer thread, restarts, and
crash safety (simulated kills at every file operation, and real SIGKILLs of a recording
process)."""

from __future__ import annotations

import copy
import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import assert_bitwise_equal, device_params, generator, param
from safetensors import safe_open
from safetensors.torch import load_file, save

import lcsc_fast
from lcsc_fast import recorder as R
from lcsc_fast.recorder import Recorder

# ---------------------------------------------------------------- helpers


class Net(torch.nn.Module):
    """Parameters, BatchNorm buffers (one of them the integer num_batches_tracked), a channels_last
    conv weight (a non-contiguous state tensor), a float64 and a bfloat16 buffer, and an int32
    buffer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)
        self.register_buffer("scale64", torch.ones(5, dtype=torch.float64))
        self.register_buffer("half_buf", torch.zeros(2, 3, dtype=torch.bfloat16))
        self.register_buffer("counter", torch.zeros((), dtype=torch.int32))
        self.conv.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu().mean(dim=(2, 3))
        return self.fc(x) * self.scale64.float()


INT_NAMES = {"bn.num_batches_tracked", "counter"}


def train_step(model, opt, g: torch.Generator) -> None:
    """One SGD step on random data, plus buffer updates, so every state entry changes."""
    device = next(model.parameters()).device
    x = torch.randn(4, 3, 6, 6, generator=g).to(device)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        model.scale64.mul_(1.0 + 1e-3)
        model.half_buf.add_(0.125)
        model.counter.add_(1)


def float_state(module, dtype=None) -> dict[str, torch.Tensor]:
    """The snapshot the Recorder should write: floating-point entries, converted, on the CPU."""
    return {n: t.detach().to("cpu", dtype or t.dtype, copy=True).contiguous()
            for n, t in module.state_dict().items() if t.is_floating_point()}


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))


def fill(module, value: float) -> None:
    """Set every floating-point entry to `value`, so a snapshot says which step it is."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.fill_(value)


def read_manifest(directory) -> dict:
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


def steps_of(directory) -> list[int]:
    return [s["step"] for s in read_manifest(directory)["snapshots"]]


def check_trajectory(directory, every: int) -> list[int]:
    """The invariant a crash must never break: a valid manifest whose every entry is a complete
    safetensors snapshot with the listed size and step. Returns the steps."""
    doc = read_manifest(directory)
    assert list(doc) == ["format", "version", "every", "snapshots"]
    assert (doc["format"], doc["version"], doc["every"]) == ("lcsc_fast.trajectory", 1, every)
    steps = []
    for s in doc["snapshots"]:
        assert list(s) == ["step", "file", "nbytes"]
        path = os.path.join(directory, s["file"])
        assert os.path.getsize(path) == s["nbytes"], s
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"step": str(s["step"]), "format": "lcsc_fast.snapshot"}
        steps.append(s["step"])
    assert steps == sorted(set(steps))
    return steps


def listdir(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lcsc_fast.Recorder writer")]


# ---------------------------------------------------------------- contents


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", param("dtype", [None, torch.float32, torch.float16,
                                                  torch.bfloat16]))
def test_snapshots_are_the_state_at_their_steps(tmp_path, device, dtype):
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = generator("recorder contents", str(dtype))
    expected = {}
    with Recorder(model, tmp_path, every=3, dtype=dtype) as rec:
        for step in range(11):
            train_step(model, opt, g)
            rec.step(step)
            if step % 3 == 0:
                expected[step] = float_state(model, dtype)
    assert steps_of(tmp_path) == [0, 3, 6, 9]
    for step, want in expected.items():
        path = tmp_path / f"step-{step:08d}.safetensors"
        got = load_file(path)
        assert set(got) == set(want) and not set(got) & INT_NAMES
        for name in want:
            assert_bitwise_equal(got[name], want[name], f"step {step} {name}")
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"step": str(step), "format": "lcsc_fast.snapshot"}
    # dtype=None keeps each tensor's own dtype, a dtype converts them all.
    got = load_file(tmp_path / "step-00000000.safetensors")
    assert got["scale64"].dtype == (dtype or torch.float64)
    assert got["half_buf"].dtype == (dtype or torch.bfloat16)
    assert not (tmp_path / "ema").exists()


def test_ema_snapshots_go_to_their_own_manifest(tmp_path):
    model, g = Net(), generator("recorder ema")
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    with Recorder(model, tmp_path, every=2, ema=ema, dtype=torch.bfloat16) as rec:
        for step in range(1, 8):
            train_step(model, opt, g)
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                    if e.is_floating_point():
                        e.lerp_(p, 0.5)
            rec.step(step)
            if step % 2 == 0:
                expected[step] = (float_state(model, torch.bfloat16),
                                  float_state(ema, torch.bfloat16))
    assert steps_of(tmp_path) == steps_of(tmp_path / "ema") == [2, 4, 6]
    check_trajectory(tmp_path / "ema", every=2)
    for step, (want_model, want_ema) in expected.items():
        name = f"step-{step:08d}.safetensors"
        for directory, want in ((tmp_path, want_model), (tmp_path / "ema", want_ema)):
            got = load_file(directory / name)
            assert set(got) == set(want)
            for n in want:
                assert_bitwise_equal(got[n], want[n], f"{directory} step {step} {n}")
    # The EMA really differs from the model, so the two files are not the same snapshot.
    assert not torch.equal(load_file(tmp_path / "step-00000006.safetensors")["fc.weight"],
                           load_file(tmp_path / "ema/step-00000006.safetensors")["fc.weight"])


def test_manifest_format(tmp_path):
    model = small_model()
    with Recorder(model, tmp_path, every=5) as rec:
        for step in range(0, 12):
            rec.step(step)
    with open(tmp_path / "manifest.json") as f:
        doc = json.load(f)
    assert doc == {"format": "lcsc_fast.trajectory", "version": 1, "every": 5, "snapshots": [
        {"step": s, "file": f"step-{s:08d}.safetensors",
         "nbytes": os.path.getsize(tmp_path / f"step-{s:08d}.safetensors")} for s in (0, 5, 10)]}
    assert list(doc) == ["format", "version", "every", "snapshots"]
    assert all(list(s) == ["step", "file", "nbytes"] for s in doc["snapshots"])
    assert listdir(tmp_path) == [".recorder-tmp", ".recorder.lock", "manifest.json",
                                 "step-00000000.safetensors", "step-00000005.safetensors",
                                 "step-00000010.safetensors"]
    assert listdir(tmp_path / ".recorder-tmp") == []
    # A fresh directory gets an empty manifest right away (it records `every`).
    with Recorder(model, tmp_path / "fresh", every=7):
        pass
    assert read_manifest(tmp_path / "fresh") == {"format": "lcsc_fast.trajectory", "version": 1,
                                                 "every": 7, "snapshots": []}


@pytest.mark.skipif(os.name == "nt", reason="Windows has no file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask=022", "umask=027"])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Snapshots are created like the manifest, 0666 less the umask, not 0600 (the mode of
    safetensors' own temporary file): the run's group reads them as the umask says."""
    old = os.umask(umask)
    try:
        record(tmp_path, range(0, 3), ema=True)
    finally:
        os.umask(old)
    for name in ("manifest.json", "step-00000000.safetensors", "step-00000002.safetensors",
                 "ema/manifest.json", "ema/step-00000002.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_step_beyond_eight_digits_gets_more_digits(tmp_path):
    with Recorder(small_model(), tmp_path, every=1) as rec:
        rec.step(99_999_999)
        rec.step(123_456_789)
    assert [s["file"] for s in read_manifest(tmp_path)["snapshots"]] == [
        "step-99999999.safetensors", "step-123456789.safetensors"]
    # ... and a restart reads such names back.
    with Recorder(small_model(), tmp_path, every=1) as rec:
        assert rec.last_step == 123_456_789


def test_integer_tensors_are_skipped(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with Recorder(model, tmp_path, every=1) as rec:
        rec.step(0)
    got = load_file(tmp_path / "step-00000000.safetensors")
    assert set(got) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                        "1.running_var"}


# ---------------------------------------------------------------- writer thread


def test_context_manager_closes(tmp_path):
    before = len(writer_threads())
    with Recorder(small_model(), tmp_path, every=1) as rec:
        assert len(writer_threads()) == before + 1
        rec.step(0)
    assert len(writer_threads()) == before
    assert steps_of(tmp_path) == [0]
    with pytest.raises(RuntimeError, match="is closed"):
        rec.step(1)
    rec.close()  # idempotent


def test_close_flushes_the_pending_snapshot(tmp_path, monkeypatch):
    release = threading.Event()
    real = R._save_file

    def held_save(tensors, path, metadata):
        assert release.wait(10), "test bug: never released"
        real(tensors, path, metadata)

    monkeypatch.setattr(R, "_save_file", held_save)
    rec = Recorder(small_model(), tmp_path, every=1)
    rec.step(0)  # returns while the writer is held
    assert not (tmp_path / "step-00000000.safetensors").exists()
    release.set()
    rec.close()
    assert steps_of(tmp_path) == [0]
    check_trajectory(tmp_path, every=1)


@pytest.mark.parametrize("raised_by", ["step", "close", "flush"])
def test_writer_exception_propagates(tmp_path, monkeypatch, raised_by):
    def failing_save(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    rec = Recorder(small_model(), tmp_path, every=2)
    rec.step(0)
    rec.flush()
    monkeypatch.setattr(R, "_save_file", failing_save)
    rec.step(2)
    with pytest.raises(RuntimeError, match="snapshot of step 2") as info:
        if raised_by == "step":
            rec.step(3)
            rec.step(4)  # waits for the writer, so the error is there by now
        else:
            getattr(rec, raised_by)()
    assert isinstance(info.value.__cause__, OSError)
    assert "No space left" in str(info.value)
    with pytest.raises(RuntimeError, match="snapshot of step 2"):
        rec.step(5)  # the Recorder stays stopped
    rec.close()  # already reported: closes quietly
    # The failed write left no temporary file and changed nothing listed.
    assert listdir(tmp_path) == [".recorder-tmp", ".recorder.lock", "manifest.json",
                                 "step-00000000.safetensors"]
    assert listdir(tmp_path / ".recorder-tmp") == []
    assert steps_of(tmp_path) == [0]


def test_unreported_writer_error_is_raised_by_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "_save_file", lambda *a: 1 / 0)
    with pytest.raises(RuntimeError, match="ZeroDivisionError") as info:
        with Recorder(small_model(), tmp_path, every=1) as rec:
            rec.step(0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_at_most_one_snapshot_pending(tmp_path, monkeypatch):
    real = R._save_file
    lock = threading.Lock()
    counts = {"active": 0, "max_active": 0, "written": 0}

    def slow_save(tensors, path, metadata):
        with lock:
            counts["active"] += 1
            counts["max_active"] = max(counts["max_active"], counts["active"])
        time.sleep(0.05)
        real(tensors, path, metadata)
        with lock:
            counts["active"] -= 1
            counts["written"] += 1

    monkeypatch.setattr(R, "_save_file", slow_save)
    model = small_model()
    taken = 0
    with Recorder(model, tmp_path, every=1) as rec:
        for step in range(6):
            fill(model, step)
            rec.step(step)
            taken += 1
            with lock:
                # step() returned: its snapshot may be pending, but every earlier one is done.
                assert taken - counts["written"] <= 1, (taken, counts)
    assert counts["max_active"] == 1 and counts["written"] == 6
    for step in range(6):  # the waits did not mix up buffers
        got = load_file(tmp_path / f"step-{step:08d}.safetensors")
        assert all(bool((t == step).all()) for t in got.values())


def test_abandoned_recorder_is_flushed_and_unlocks(tmp_path):
    rec = Recorder(small_model(), tmp_path, every=1)
    rec.step(0)
    del rec
    gc.collect()
    assert steps_of(tmp_path) == [0]
    with Recorder(small_model(), tmp_path, every=1) as rec:  # the lock was released
        assert rec.last_step == 0


def test_one_recorder_per_directory(tmp_path):
    with Recorder(small_model(), tmp_path, every=1):
        with pytest.raises(RuntimeError, match="in use by another lcsc_fast.Recorder"):
            Recorder(small_model(), tmp_path, every=1)


# ---------------------------------------------------------------- arguments


def test_bad_arguments(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="every: 0 is not a positive"):
        Recorder(model, tmp_path, every=0)
    with pytest.raises(TypeError, match="every: expected an int, got float"):
        Recorder(model, tmp_path, every=1.0)
    with pytest.raises(TypeError, match="dtype: torch.float64 is not supported"):
        Recorder(model, tmp_path, every=1, dtype=torch.float64)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got OrderedDict"):
        Recorder(model.state_dict(), tmp_path, every=1)
    with pytest.raises(TypeError, match="ema: expected a torch.nn.Module"):
        Recorder(model, tmp_path, every=1, ema=model.state_dict())
    with pytest.raises(ValueError, match="no floating-point tensors"):
        Recorder(torch.nn.ReLU(), tmp_path, every=1)
    with Recorder(model, tmp_path, every=1) as rec:
        with pytest.raises(TypeError, match="step: expected an int, got float"):
            rec.step(1.0)
        with pytest.raises(ValueError, match="counted from 0"):
            rec.step(-1)


def test_changed_model_state_is_refused(tmp_path):
    model = small_model()
    with Recorder(model, tmp_path, every=1) as rec:
        rec.step(0)
        model.register_buffer("extra", torch.zeros(2))
        with pytest.raises(ValueError, match="changed since the Recorder was created.*'extra'"):
            rec.step(1)


# ---------------------------------------------------------------- restarts


def record(directory, steps, every=2, ema=False, **kw) -> None:
    """Record `steps` with small models whose entries equal the step (EMA: minus the step)."""
    model = small_model()
    ema_model = small_model() if ema else None
    with Recorder(model, directory, every=every, ema=ema_model, **kw) as rec:
        for step in steps:
            fill(model, step)
            if ema_model is not None:
                fill(ema_model, -step)
            rec.step(step)


def assert_snapshot_is_step(path, step) -> None:
    got = load_file(path)
    assert got and all(bool((t == step).all()) for t in got.values()), path


def test_restart_appends(tmp_path):
    record(tmp_path, range(0, 7), ema=True)
    before = read_manifest(tmp_path)["snapshots"]
    with Recorder(small_model(), tmp_path, every=2, ema=small_model()) as rec:
        assert rec.last_step == 6
    record(tmp_path, range(7, 11), ema=True)
    assert steps_of(tmp_path) == steps_of(tmp_path / "ema") == [0, 2, 4, 6, 8, 10]
    assert read_manifest(tmp_path)["snapshots"][:4] == before
    for step in (0, 2, 4, 6, 8, 10):
        assert_snapshot_is_step(tmp_path / f"step-{step:08d}.safetensors", step)
        assert_snapshot_is_step(tmp_path / f"ema/step-{step:08d}.safetensors", -step)


def test_step_at_or_before_the_last_recorded_raises(tmp_path):
    record(tmp_path, range(0, 5))
    with Recorder(small_model(), tmp_path, every=2) as rec:
        for step in (4, 3, 0):
            with pytest.raises(ValueError, match=f"step\\({step}\\): .* already holds snapshots "
                                                 "up to step 4.*truncate_after_resume=True"):
                rec.step(step)
        rec.step(5)
        rec.step(6)
        with pytest.raises(ValueError, match="up to step 6"):
            rec.step(6)  # within one run too
    assert steps_of(tmp_path) == [0, 2, 4, 6]
    with Recorder(small_model(), tmp_path, every=2, truncate_after_resume=True) as rec:
        with pytest.raises(ValueError, match="counted from 0"):
            rec.step(-2)  # refused before it could truncate anything
    assert steps_of(tmp_path) == [0, 2, 4, 6]


def test_truncate_after_resume_moves_files_to_discarded(tmp_path):
    record(tmp_path, range(0, 11), ema=True)
    originals = {d: {s: (tmp_path / d / f"step-{s:08d}.safetensors").read_bytes()
                     for s in (6, 8, 10)} for d in ("", "ema")}
    record(tmp_path, range(5, 8), ema=True, truncate_after_resume=True)
    assert steps_of(tmp_path) == steps_of(tmp_path / "ema") == [0, 2, 4, 6]
    for d in ("", "ema"):
        discarded = tmp_path / d / "discarded"
        assert listdir(discarded) == [f"step-{s:08d}.safetensors" for s in (6, 8, 10)]
        for s, data in originals[d].items():  # moved, byte for byte
            assert (discarded / f"step-{s:08d}.safetensors").read_bytes() == data
        check_trajectory(tmp_path / d, every=2)
    assert_snapshot_is_step(tmp_path / "step-00000006.safetensors", 6)
    # Truncating again never overwrites what discarded/ already holds.
    record(tmp_path, range(3, 5), truncate_after_resume=True, ema=True)
    assert steps_of(tmp_path) == [0, 2, 4]
    assert listdir(tmp_path / "discarded") == [
        "step-00000004.safetensors", "step-00000006.safetensors", "step-00000006~1.safetensors",
        "step-00000008.safetensors", "step-00000010.safetensors"]


def test_restart_refuses_a_different_every(tmp_path):
    record(tmp_path, range(0, 3), every=2)
    with pytest.raises(ValueError, match="recorded with every=2, but this Recorder has "
                                         "every=3; pass every=2"):
        Recorder(small_model(), tmp_path, every=3)


def test_restart_refuses_different_tensors(tmp_path):
    record(tmp_path, range(0, 3))
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 4),
                                torch.nn.Linear(4, 2))
    with pytest.raises(ValueError) as info:
        Recorder(other, tmp_path, every=2)
    msg = str(info.value)
    assert "holds snapshots of a different model" in msg
    assert "only in the model: '2.weight', '2.bias'" in msg
    assert "'1.weight' is [4, 8] in the model but [3, 8] in step-00000002.safetensors" in msg


def test_restart_refuses_a_changed_ema_setting(tmp_path):
    record(tmp_path / "with", range(0, 3), ema=True)
    with pytest.raises(ValueError, match="holds an EMA trajectory as well"):
        Recorder(small_model(), tmp_path / "with", every=2)
    record(tmp_path / "without", range(0, 3))
    with pytest.raises(ValueError, match="without EMA snapshots"):
        Recorder(small_model(), tmp_path / "without", every=2, ema=small_model())


def snapshot_bytes(step: int, value: float) -> bytes:
    """A complete snapshot file of small_model() as the Recorder writes it."""
    model = small_model()
    fill(model, value)
    return save(float_state(model), metadata={"step": str(step), "format": "lcsc_fast.snapshot"})


def other_model_snapshot_bytes(step: int) -> bytes:
    """A complete snapshot file, but of a model with other tensors."""
    return save({"w": torch.zeros(3)}, metadata={"step": str(step),
                                                 "format": "lcsc_fast.snapshot"})


def test_restart_removes_tmp_and_lists_complete_unlisted_snapshots(tmp_path):
    record(tmp_path, range(0, 5))
    # What a kill can leave: a complete snapshot renamed but not listed yet, and temporary
    # files in .recorder-tmp/, safetensors' own among them.
    (tmp_path / "step-00000006.safetensors").write_bytes(snapshot_bytes(6, 6))
    (tmp_path / ".recorder-tmp/step-00000008.safetensors").write_bytes(snapshot_bytes(8, 8))
    (tmp_path / ".recorder-tmp/.tmpAb3xYz").write_bytes(snapshot_bytes(8, 8)[:50])
    (tmp_path / ".recorder-tmp/manifest.json").write_text('{"format": "lcsc_fast.traj')
    # What an older lcsc_fast's kill could leave beside the snapshots.
    (tmp_path / "step-00000008.safetensors.tmp").write_bytes(snapshot_bytes(8, 8)[:100])
    (tmp_path / "manifest.json.tmp").write_text('{"format": "lcsc_fast.traj')
    # The user's files, kept: .tmpbackup is also what safetensors' temporary files look like.
    (tmp_path / ".tmpbackup").write_text("the user's own file")
    (tmp_path / "notes.tmp").write_text("the user's own file")
    model = small_model()
    with Recorder(model, tmp_path, every=2) as rec:
        assert rec.last_step == 6
        assert steps_of(tmp_path) == [0, 2, 4, 6]
        check_trajectory(tmp_path, every=2)
        assert [n for n in listdir(tmp_path) if "tmp" in n] == [".recorder-tmp", ".tmpbackup",
                                                               "notes.tmp"]
        assert listdir(tmp_path / ".recorder-tmp") == []
        fill(model, 8)
        rec.step(7)
        rec.step(8)
    assert steps_of(tmp_path) == [0, 2, 4, 6, 8]
    assert_snapshot_is_step(tmp_path / "step-00000006.safetensors", 6)
    assert_snapshot_is_step(tmp_path / "step-00000008.safetensors", 8)
    assert (tmp_path / ".tmpbackup").read_text() == "the user's own file"
    assert (tmp_path / "notes.tmp").read_text() == "the user's own file"
    assert not (tmp_path / "discarded").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "wrong step", "other model"])
def test_restart_discards_a_bad_unlisted_snapshot(tmp_path, damage):
    record(tmp_path, range(0, 5))
    good = snapshot_bytes(6, 6)
    data = {"truncated": good[:len(good) // 2], "empty": b"", "garbage": b"\x01" * 64,
            "wrong step": snapshot_bytes(7, 6),
            "other model": other_model_snapshot_bytes(6)}[damage]
    (tmp_path / "step-00000006.safetensors").write_bytes(data)
    with Recorder(small_model(), tmp_path, every=2) as rec:
        assert rec.last_step == 4
        rec.step(6)
    assert steps_of(tmp_path) == [0, 2, 4, 6]
    assert listdir(tmp_path / "discarded") == ["step-00000006.safetensors"]
    assert (tmp_path / "discarded/step-00000006.safetensors").read_bytes() == data
    check_trajectory(tmp_path, every=2)


def test_restart_refuses_a_manifest_whose_file_changed(tmp_path):
    record(tmp_path, range(0, 3))
    with open(tmp_path / "step-00000002.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="lists step-00000002.safetensors with \\d+ bytes, but "
                                         "the file has \\d+ bytes"):
        Recorder(small_model(), tmp_path, every=2)
    os.remove(tmp_path / "step-00000002.safetensors")
    with pytest.raises(ValueError, match="but the file is missing"):
        Recorder(small_model(), tmp_path, every=2)


def tree(directory) -> dict[str, bytes | None]:
    """Every path under directory (relative) with its bytes; None for a directory."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), directory)] = None
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.mark.parametrize("ema", [False, True], ids=["ema=None", "ema=module"])
@pytest.mark.parametrize("refusal", ["foreign manifest", "packed store", "another every",
                                     "another ema setting", "foreign ema manifest"])
def test_a_refused_directory_is_left_as_it_was(tmp_path, refusal, ema):
    """A Recorder removes temporary files only in a directory it has accepted: one it refuses
    may hold another program's .tmpXXXXXX or manifest.json.tmp. It gets no lock file and no
    ema/ either."""
    d = tmp_path / "traj"
    if refusal == "foreign manifest":
        d.mkdir()
        (d / "manifest.json").write_text('{"format": "something-else"}')
    elif refusal == "packed store":
        d.mkdir()
        (d / "manifest.json").write_text('{"format": "lcsc_fast.packed", "version": 1}')
    elif refusal == "another every":
        record(d, range(0, 3), every=3, ema=ema)
    elif refusal == "another ema setting":
        record(d, range(0, 3), ema=not ema)
    else:
        record(d, range(0, 3), ema=True)
        (d / "ema/manifest.json").write_text('{"format": "something-else"}')
        (d / "ema/.tmpXyZ789").write_text("another program's temporary file")
        (d / "ema/.recorder-tmp").mkdir(exist_ok=True)
        (d / "ema/.recorder-tmp/manifest.json").write_text("half written")
    (d / ".tmpAbC123").write_text("another program's temporary file")
    (d / ".recorder-tmp").mkdir(exist_ok=True)
    (d / ".recorder-tmp/step-00000004.safetensors").write_bytes(snapshot_bytes(4, 4)[:100])
    (d / "manifest.json.tmp").write_text("another program's manifest, half written")
    (d / "step-00000004.safetensors.tmp").write_bytes(snapshot_bytes(4, 4)[:100])
    before = tree(d)
    with pytest.raises(ValueError, match=re.escape(str(d))):
        Recorder(small_model(), d, every=2, ema=small_model() if ema else None)
    assert tree(d) == before


def test_a_new_directory_keeps_temporary_files_that_cannot_be_a_recorders(tmp_path):
    """Without a manifest, only manifest.json.tmp can be a Recorder's leftover (it writes its
    manifest before any snapshot): other .tmp names there belong to someone else."""
    d = tmp_path / "traj"
    d.mkdir()
    (d / ".tmpAbC123").write_text("another program's temporary file")
    (d / "step-00000004.safetensors.tmp").write_bytes(b"someone else's")
    (d / "manifest.json.tmp").write_text("an older Recorder's manifest, half written")
    (d / ".recorder-tmp").mkdir()
    (d / ".recorder-tmp/manifest.json").write_text("a Recorder's manifest, half written")
    with Recorder(small_model(), d, every=2):
        pass
    names = sorted(p.name for p in d.iterdir())
    assert ".tmpAbC123" in names and "step-00000004.safetensors.tmp" in names
    assert "manifest.json.tmp" not in names and "manifest.json" in names
    assert listdir(d / ".recorder-tmp") == []


# ---------------------------------------------------------------- recording some entries only


def adapter_like(seed: int = 0) -> Net:
    """A Net whose weights are frozen: what trains (the biases) stands in for LoRA adapters."""
    model = Net(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("weight"))
    return model


TRAINABLE = ["conv.bias", "bn.bias", "fc.bias"]


def test_include_trainable_records_the_trainable_parameters_only(tmp_path):
    """include="trainable": each snapshot holds the parameters that require grad, under their
    state_dict names, from the model and (the same names, though nothing of it trains) the EMA;
    a restart appends; a Recorder recording everything is refused on that directory."""
    model, g = adapter_like(), generator("recorder include")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    expected = {}
    with Recorder(model, tmp_path, every=2, ema=ema, include="trainable") as rec:
        for step in range(5):
            train_step(model, opt, g)
            with torch.no_grad():
                ema.fc.bias.lerp_(model.fc.bias, 0.5)
            rec.step(step)
            if step % 2 == 0:
                state, ema_state = float_state(model), float_state(ema)
                expected[step] = ({n: state[n] for n in TRAINABLE},
                                  {n: ema_state[n] for n in TRAINABLE})
    assert check_trajectory(tmp_path, every=2) == check_trajectory(tmp_path / "ema", every=2)
    for step, (want, want_ema) in expected.items():
        for directory, w in ((tmp_path, want), (tmp_path / "ema", want_ema)):
            got = load_file(directory / f"step-{step:08d}.safetensors")
            assert list(got) == sorted(TRAINABLE)
            for name in TRAINABLE:
                assert_bitwise_equal(got[name], w[name], f"{directory} step {step} {name}")
    with Recorder(model, tmp_path, every=2, ema=ema, include="trainable") as rec:
        assert rec.last_step == 4
        rec.step(6)
    assert steps_of(tmp_path) == steps_of(tmp_path / "ema") == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="holds snapshots of a different model \\(only in the "
                                         "model: 'scale64', 'half_buf', 'conv.weight'"):
        Recorder(model, tmp_path, every=2, ema=ema)
    record(tmp_path / "whole", range(0, 3))
    with pytest.raises(ValueError, match=r"a different model \(or ones recorded with another "
                                         r"include=\)"):
        Recorder(small_model(), tmp_path / "whole", every=2, include=lambda n: "bias" in n)


def test_include_callable_fixes_the_names_when_created(tmp_path):
    model = small_model()
    with Recorder(model, tmp_path, every=1, include=lambda n: n.endswith("bias")) as rec:
        rec.step(0)
        model.register_buffer("extra_bias", torch.zeros(2))  # not chosen at creation: ignored
        fill(model, 1)
        rec.step(1)
        model[1].bias = torch.nn.Parameter(torch.zeros(4))
        with pytest.raises(ValueError, match="changed since the Recorder was created.*'1.bias' "
                                             "is \\[4\\] in it now but \\[3\\] in it then"):
            rec.step(2)
    assert steps_of(tmp_path) == [0, 1]
    assert list(load_file(tmp_path / "step-00000001.safetensors")) == ["0.bias", "1.bias"]
    assert_snapshot_is_step(tmp_path / "step-00000001.safetensors", 1)


def test_include_errors(tmp_path):
    with pytest.raises(TypeError, match="include: expected None, 'trainable' or a callable"):
        Recorder(small_model(), tmp_path, every=1, include="all")
    frozen = small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="include='trainable' selects none of the model's"):
        Recorder(frozen, tmp_path, every=1, include="trainable")
    with pytest.raises(ValueError, match="ema: include= selected 'conv.bias', 'bn.bias', "
                                         "'fc.bias' on the model, but the ema's state_dict"):
        Recorder(adapter_like(), tmp_path, every=1, ema=small_model(), include="trainable")
    assert not os.path.exists(tmp_path / "manifest.json")


def test_include_restart_lists_a_complete_unlisted_snapshot(tmp_path, monkeypatch):
    """Killed after a snapshot of the selected entries was renamed into place but before the
    manifest listed it: a restart with the same include lists it (it is a complete snapshot of
    exactly those entries)."""
    model = adapter_like()
    rec = Recorder(model, tmp_path, every=1, include="trainable")
    fill(model, 0)
    rec.step(0)
    rec.flush()

    def replace(src, dst):
        if os.path.basename(dst) == "manifest.json":
            raise Killed
        os.replace(src, dst)

    monkeypatch.setattr(R, "_replace", replace)
    fill(model, 1)
    rec.step(1)
    with pytest.raises(RuntimeError):
        rec.close()
    monkeypatch.undo()
    assert steps_of(tmp_path) == [0]
    with Recorder(adapter_like(), tmp_path, every=1, include="trainable") as rec:
        assert rec.last_step == 1
    assert check_trajectory(tmp_path, every=1) == [0, 1]
    assert list(load_file(tmp_path / "step-00000001.safetensors")) == sorted(TRAINABLE)
    assert_snapshot_is_step(tmp_path / "step-00000001.safetensors", 1)
    assert not (tmp_path / "discarded").exists()


# ---------------------------------------------------------------- crash safety


class Killed(BaseException):
    """A simulated SIGKILL: a BaseException, so the Recorder's cleanup of ordinary errors (which
    a real kill would never run) does not run either; files stay exactly as they are."""


# The file operations of one snapshot with EMA, in order (see _Job.write).
OPS = ["save model", "replace model", "fsync dir", "save ema", "replace ema", "fsync ema dir",
       "write manifest", "replace manifest", "fsync dir", "write ema manifest",
       "replace ema manifest", "fsync ema dir"]
KILL_POINTS = ([pytest.param(k, False, id=f"before {k}:{op}") for k, op in enumerate(OPS)]
               + [pytest.param(k, True, id=f"halfway {k}:{op}") for k, op in enumerate(OPS)
                  if op.startswith(("save", "write"))])


@pytest.mark.parametrize("kill_at, halfway", KILL_POINTS)
def test_kill_at_any_file_operation_leaves_a_valid_trajectory(tmp_path, monkeypatch, kill_at,
                                                              halfway):
    record(tmp_path, range(0, 4), every=1, ema=True)
    ops = []

    def hooked(name, real):
        def op(*args):
            if len(ops) == kill_at:
                if halfway:  # the bytes written so far, as a kill mid-write leaves them
                    real(*args)
                    path = args[1]  # _save_file(tensors, path, metadata), _write_bytes(data, path)
                    with open(path, "rb") as f:
                        data = f.read()
                    with open(path, "wb") as f:
                        f.write(data[:len(data) // 2])
                raise Killed
            ops.append(name)
            real(*args)
        return op

    model, ema = small_model(), small_model()
    rec = Recorder(model, tmp_path, every=1, ema=ema)
    monkeypatch.setattr(R, "_save_file", hooked("save", R._save_file))
    monkeypatch.setattr(R, "_write_bytes", hooked("write", R._write_bytes))
    monkeypatch.setattr(R, "_replace", hooked("replace", R._replace))
    monkeypatch.setattr(R, "_fsync_dir", hooked("fsync", R._fsync_dir))
    fill(model, 4)
    fill(ema, -4)
    rec.step(4)
    with pytest.raises(RuntimeError) as info:
        rec.close()
    assert isinstance(info.value.__cause__, Killed)
    assert ops == [op.split()[0] for op in OPS][:kill_at]
    monkeypatch.undo()

    # What the kill left is readable as it is (manifests list complete files only) ...
    assert check_trajectory(tmp_path, every=1)[:4] == [0, 1, 2, 3]
    assert check_trajectory(tmp_path / "ema", every=1)[:4] == [0, 1, 2, 3]
    # ... and a restart makes it consistent: step 4 is kept iff both its files were complete.
    kept = kill_at > OPS.index("replace ema")
    model, ema = small_model(), small_model()
    with Recorder(model, tmp_path, every=1, ema=ema) as rec:
        assert rec.last_step == (4 if kept else 3)
        for d in (tmp_path, tmp_path / "ema"):
            assert check_trajectory(d, every=1) == [0, 1, 2, 3] + [4] * kept
            assert not [n for n in listdir(d) if ".tmp" in n]
            assert listdir(d / ".recorder-tmp") == []
        # A renamed model file whose EMA file never got there is moved aside, not deleted.
        orphan = not kept and kill_at > OPS.index("replace model")
        assert listdir(tmp_path / "discarded") == ["step-00000004.safetensors"] * orphan
        assert not (tmp_path / "ema/discarded").exists()
        for step in (4, 5) if not kept else (5,):
            fill(model, step)
            fill(ema, -step)
            rec.step(step)
    for d, sign in ((tmp_path, 1), (tmp_path / "ema", -1)):
        assert check_trajectory(d, every=1) == [0, 1, 2, 3, 4, 5]
        for step in range(6):
            assert_snapshot_is_step(d / f"step-{step:08d}.safetensors", sign * step)


CHILD = textwrap.dedent("""
    import sys
    import torch
    from lcsc_fast.recorder import Recorder

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    ema = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    rec = Recorder(model, sys.argv[1], every=1, ema=ema)
    step = 0 if rec.last_step is None else rec.last_step + 1
    print("ready", step, flush=True)
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
            for p in ema.parameters():
                p.fill_(-step)
        rec.step(step)
        step += 1
""")


def test_sigkill_at_random_moments(tmp_path):
    """Real kills: a process records as fast as it can and is SIGKILLed at random moments; after
    each kill the trajectory is valid and holds steps 0, 1, 2, ... with the right contents, and
    the next process continues it."""
    directory = tmp_path / "traj"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    starts, checked = [], 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, str(script), str(directory)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.startswith("ready"), line
            starts.append(int(line.split()[1]))
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        model_steps = check_trajectory(directory, every=1)
        ema_steps = check_trajectory(directory / "ema", every=1)
        # Killed between the two manifest writes, the EMA manifest may be one step behind.
        assert model_steps == list(range(len(model_steps)))
        assert ema_steps == model_steps[:len(ema_steps)]
        assert len(model_steps) - len(ema_steps) <= 1
        for s in ema_steps[checked:]:
            assert_snapshot_is_step(directory / f"step-{s:08d}.safetensors", s)
            assert_snapshot_is_step(directory / f"ema/step-{s:08d}.safetensors", -s)
        checked = len(ema_steps)
    # Each process resumed right after what the previous one had completed.
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] > 0
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    with Recorder(model, directory, every=1, ema=copy.deepcopy(model)) as rec:
        last = rec.last_step
        assert check_trajectory(directory, every=1) == list(range(last + 1))
        assert check_trajectory(directory / "ema", every=1) == list(range(last + 1))
        for d in (directory, directory / "ema"):
            assert not [n for n in listdir(d) if ".tmp" in n]
            assert listdir(d / ".recorder-tmp") == []
            assert all(re.fullmatch(r"step-\d{8}(~\d+)?\.safetensors", n)
                       for n in listdir(d / "discarded"))


# ---------------------------------------------------------------- the reader's side


def test_trajectory_open_reads_what_the_recorder_writes(tmp_path):
    """The format contract with Trajectory.open: it opens both manifests, sees the recorded
    steps, and a one-hot merge reproduces a recorded snapshot exactly."""
    trajectory = pytest.importorskip("lcsc_fast.trajectory")
    model, ema = small_model(), small_model()
    with Recorder(model, tmp_path, every=3, ema=ema) as rec:
        for step in range(10):
            fill(model, step)
            fill(ema, -step)
            rec.step(step)
    for directory, sign in ((tmp_path, 1), (tmp_path / "ema", -1)):
        traj = trajectory.Trajectory.open(directory)
        assert traj.steps == [0, 3, 6, 9]
        target = small_model(seed=1)
        lcsc_fast.merge_into(target, traj, [0.0, 0.0, 1.0, 0.0])
        for name, t in target.state_dict().items():
            assert bool((t == sign * 6).all()), name


def test_recorded_trajectory_merges_into_a_model_with_batchnorm(tmp_path):
    """End to end, as training code uses it: record a Conv+BatchNorm model (and its EMA), open
    both trajectories, merge into the model. Floating-point tensors get the reference merge of
    the snapshots; num_batches_tracked, which snapshots do not hold, is left as it is."""
    from lcsc_fast import Trajectory, merge_into, reference

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    with lcsc_fast.Recorder(model, tmp_path / "run", every=2, ema=ema) as recorder:
        for step in range(1, 7):
            loss = model(torch.randn(8, 3, 6, 6)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                    e.copy_(0.9 * e + 0.1 * p) if e.is_floating_point() else e.copy_(p)
            recorder.step(step)
            if step % 2 == 0:
                snapshots.append({k: v.clone() for k, v in model.state_dict().items()
                                  if v.is_floating_point()})
    traj = Trajectory.open(tmp_path / "run")
    assert traj.steps == [2, 4, 6] and len(Trajectory.open(tmp_path / "run" / "ema")) == 3
    w = [0.5, -0.25, 0.75]
    counter = model.state_dict()["1.num_batches_tracked"].clone()
    merge_into(model, traj, w)
    want = reference.merge(snapshots, w)
    for name, t in model.state_dict().items():
        if name == "1.num_batches_tracked":
            assert torch.equal(t, counter)
        else:
            torch.testing.assert_close(t.double(), want[name], rtol=0, atol=1e-6)
