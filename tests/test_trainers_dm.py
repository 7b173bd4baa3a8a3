"""lcsc_fast.trainers.dm (EDM diffusion training) and the digits classifier behind its FID."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("cleanfid")

import lcsc_fast
from lcsc_fast import metrics
from lcsc_fast.trainers import classifier, common, dm
from lcsc_fast.trainers.digits import load_digits

TINY = {"mlp": {"width": 32, "depth": 1}, "unet": {"channels": 8}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the FID features

def test_classifier_features():
    extract = classifier.feature_extractor()
    images, _ = load_digits("test")
    features = extract(images[:10])
    assert features.shape == (10, classifier.FEATURES) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # inputs are clamped to [-1, 1] first
    assert torch.equal(extract(3 * images[:10]), extract((3 * images[:10]).clamp(-1, 1)))


def test_shipped_classifier_classifies_the_test_split():
    model = classifier._shipped_classifier()
    assert classifier.accuracy(model, *load_digits("test")) >= 0.97


def test_shipped_reference_statistics_match_the_shipped_weights():
    mu, sigma = classifier.reference_statistics()
    d = classifier.FEATURES
    assert mu.shape == (d,) and sigma.shape == (d, d)
    assert mu.dtype == sigma.dtype == np.float64
    again = metrics.feature_statistics(classifier.feature_extractor()(load_digits("all")[0]))
    np.testing.assert_allclose(again[0], mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again[1], sigma, rtol=1e-5, atol=1e-5)
    # the file is also a metrics.reference_statistics cache
    cache = os.path.join(classifier.ASSETS_DIR, classifier.REFERENCE_FILE)
    cached = metrics.reference_statistics(None, None, cache_path=cache)
    assert np.array_equal(cached[0], mu) and np.array_equal(cached[1], sigma)


def test_fid_tells_digits_from_noise():
    test_images, _ = load_digits("test")
    assert classifier.fid_of_images(test_images) < 20
    assert classifier.fid_of_images(torch.randn(500, 1, 8, 8)) > 100


# ---------------------------------------------------------------- the trainer

def test_edm_loss_is_a_finite_scalar_with_gradients():
    torch.manual_seed(0)
    model = dm.build_model("mlp", **TINY["mlp"])
    loss = dm.edm_loss(model, load_digits("train")[0][:16])
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _tiny_config(tmp_path, arch="mlp", **overrides) -> dm.DMConfig:
    fields = {"out": str(tmp_path / "run"), "steps": 20, "every": 5, "batch_size": 32,
              "warmup_steps": 5, "arch": arch, "progress": False, **TINY[arch], **overrides}
    return dm.DMConfig(**fields)


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_train_writes_a_run_folder(tmp_path, arch):
    config = _tiny_config(tmp_path, arch, steps=10 if arch == "unet" else 20)
    run = dm.train(config)
    assert run.directory == config.out

    with open(os.path.join(config.out, common.CONFIG_FILE)) as f:
        recorded = json.load(f)
    assert recorded["trainer"] == "dm" and recorded["model"]["arch"] == arch
    assert recorded["model"]["kind"] == "edm"
    assert recorded["config"]["steps"] == config.steps

    steps = list(range(config.every, config.steps + 1, config.every))
    with lcsc_fast.Trajectory.open(run.trajectory_dir) as traj:
        assert traj.steps == steps
        names = traj.names
    with lcsc_fast.Trajectory.open(os.path.join(run.trajectory_dir, "ema")) as ema_traj:
        assert ema_traj.steps == steps

    # the last snapshots are the final weights, and load_model reads them back
    for which, trained in (("model", run.model), ("ema", run.ema)):
        loaded = common.load_model(config.out, which)
        assert not loaded.training
        state = loaded.state_dict()
        for name, tensor in trained.state_dict().items():
            assert torch.equal(state[name], tensor), name
    with lcsc_fast.Trajectory.open(run.trajectory_dir) as traj:
        merged = traj.merge([0.0] * (len(steps) - 1) + [1.0])
    assert set(merged) == set(names)
    for name, tensor in merged.items():
        assert torch.equal(tensor, run.model.state_dict()[name]), name


def test_training_is_reproducible(tmp_path):
    a = dm.train(_tiny_config(tmp_path / "a", steps=6, every=3))
    b = dm.train(_tiny_config(tmp_path / "b", steps=6, every=3))
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_threads_apply_while_training_only(tmp_path):
    """config.threads is torch's thread count during training; the caller's count comes back."""
    seen = []
    real_train = common._train

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real_train(*args)

    common._train, before = spy, torch.get_num_threads()  # 1, from the autouse fixture
    try:
        dm.train(_tiny_config(tmp_path, steps=2, every=1, threads=2))
    finally:
        common._train = real_train
    assert seen == [2] and torch.get_num_threads() == before


def _folder_state(folder) -> dict[str, bytes]:
    """Every file under folder: relative path -> content."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in pathlib.Path(folder).rglob("*") if p.is_file()}


def test_a_run_folder_is_never_trained_into_twice(tmp_path, capsys):
    """A second run into a run folder (even with another model) is refused before anything is
    written: config, final weights and trajectory of the first stay as they were."""
    out = tmp_path / "run"
    dm.train(_tiny_config(tmp_path, steps=4, every=2))
    before = _folder_state(out)
    found = r"\(config.json, trajectory/manifest.json, model.safetensors, ema.safetensors\)"
    with pytest.raises(FileExistsError, match="holds a run already " + found):
        dm.train(_tiny_config(tmp_path, steps=4, every=2, width=48))
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["--out", str(out), "--steps", "4", "--every", "2", "--no-progress"])
    assert exit_info.value.code == 2
    assert "holds a run already" in capsys.readouterr().err
    assert _folder_state(out) == before

    (tmp_path / "empty").mkdir()  # an empty folder, or one with other files, is fine
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    run = dm.train(_tiny_config(tmp_path, out=str(tmp_path / "empty"), steps=2, every=1))
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"
    assert os.path.exists(os.path.join(run.directory, common.CONFIG_FILE))


def test_sampler_for_a_fid_objective():
    torch.manual_seed(0)
    model = dm.build_model("mlp", **TINY["mlp"]).eval()
    sample = dm.sampler(9)
    noise = torch.randn(6, 1, 8, 8)
    images = sample(model, noise)
    assert images.shape == noise.shape and torch.isfinite(images).all()
    assert torch.equal(images, sample(model, noise))  # deterministic: only the weights matter


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli-run"
    run = dm.main(["--out", str(out), "--steps", "10", "--every", "5", "--batch-size", "32",
                   "--width", "32", "--depth", "1", "--no-progress", "--fid-samples", "200"])
    printed = capsys.readouterr().out
    assert str(out) in printed
    for nfe in dm.EVAL_NFES:
        assert f"FID (NFE {nfe}, 200 samples)" in printed
    assert common.read_config(out)["config"]["width"] == 32
    with lcsc_fast.Trajectory.open(run.trajectory_dir) as traj:
        assert traj.steps == [5, 10]


def test_cli_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        dm.main(["--help"])
    printed = capsys.readouterr().out
    assert "python -m lcsc_fast.trainers.dm --out runs/dm" in printed
    assert "--p-mean" in printed and "--fid-samples" in printed
