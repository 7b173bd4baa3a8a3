"""The shared parts of lcsc_fast.trainers: the digits, the networks and their preconditioning,
the samplers, the EMA update and the command-line plumbing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("sklearn")

from lcsc_fast.trainers import common, sampling
from lcsc_fast.trainers.digits import IMAGE_SHAPE, Batches, load_digits
from lcsc_fast.trainers.networks import SIGMA_MAX, SIGMA_MIN, build_model, num_parameters

TINY = {"mlp": {"width": 32, "depth": 1}, "unet": {"channels": 8}}


def _rows_sorted(images: torch.Tensor) -> torch.Tensor:
    """The images as a multiset: rows of pixels in lexicographic order."""
    rows = images.flatten(1)
    for column in reversed(range(rows.shape[1])):
        rows = rows[rows[:, column].argsort(stable=True)]
    return rows


# ---------------------------------------------------------------- digits

def test_digits_shape_and_range():
    images, labels = load_digits()
    assert images.shape == (1797, *IMAGE_SHAPE) and images.dtype == torch.float32
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() == -1 and images.max() == 1


def test_digits_split_is_a_reproducible_partition():
    train, _ = load_digits("train")
    test, _ = load_digits("test")
    assert (len(train), len(test)) == (1438, 359)
    again, _ = load_digits("train")
    assert torch.equal(train, again)
    # train and test together are exactly all the digits, each once
    everything, _ = load_digits("all")
    assert torch.equal(_rows_sorted(torch.cat([train, test])), _rows_sorted(everything))
    other, _ = load_digits("test", seed=1)
    assert not torch.equal(other, test)
    with pytest.raises(ValueError, match="split"):
        load_digits("valid")


def test_batches_cover_an_epoch_without_repeats_and_reproduce():
    index = torch.arange(10)
    batches = Batches(index, batch_size=5, seed=3)
    epoch = torch.cat([next(batches), next(batches)])
    assert sorted(epoch.tolist()) == list(range(10))
    again = Batches(index, batch_size=5, seed=3)
    assert torch.equal(torch.cat([next(again), next(again)]), epoch)


# ---------------------------------------------------------------- networks

@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_consistency_denoiser_is_identity_at_sigma_min(arch):
    torch.manual_seed(0)
    model = build_model(arch, kind="consistency", **TINY[arch]).eval()
    x = torch.randn(4, *IMAGE_SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x, SIGMA_MIN), x)  # f(x, sigma_min) = x exactly
        assert not torch.allclose(model(x, 1.0), x)
        edm = build_model(arch, kind="edm", **TINY[arch]).eval()
        assert not torch.equal(edm(x, SIGMA_MIN), x)


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_denoiser_takes_one_sigma_or_one_per_image(arch):
    torch.manual_seed(0)
    model = build_model(arch, **TINY[arch]).eval()
    x = torch.randn(3, *IMAGE_SHAPE)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        each = model(x, sigma)
        assert each.shape == x.shape
        assert torch.allclose(each[1:2], model(x[1:2], 1.0), atol=1e-6)


def test_default_models_are_under_a_million_parameters():
    for arch in ("mlp", "unet"):
        assert num_parameters(build_model(arch)) < 1_000_000
    with pytest.raises(ValueError, match="arch"):
        build_model("transformer")


# ---------------------------------------------------------------- samplers

def test_karras_sigmas_endpoints():
    sigmas = sampling.karras_sigmas(8)
    assert sigmas.shape == (9,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(SIGMA_MAX, rel=1e-12)
    assert sigmas[-2].item() == pytest.approx(SIGMA_MIN, rel=1e-9)
    assert sigmas[-1].item() == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert sampling.karras_sigmas(1).tolist() == pytest.approx([SIGMA_MAX, 0.0])


def test_heun_steps_for_nfe():
    assert [sampling.heun_steps_for_nfe(n) for n in (1, 3, 9, 15, 35)] == [1, 2, 5, 8, 18]
    for bad in (0, 2, 14, -1):
        with pytest.raises(ValueError, match="nfe"):
            sampling.heun_steps_for_nfe(bad)


class CountingDenoiser(torch.nn.Module):
    """D(x, sigma) = x / (1 + sigma^2), counting its calls and recording the sigmas."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma):
        self.sigmas.append(float(sigma))
        return x / (1 + float(sigma) ** 2)


@pytest.mark.parametrize("nfe", [1, 3, 9, 15])
def test_edm_sample_evaluates_the_model_nfe_times(nfe):
    model = CountingDenoiser()
    noise = torch.randn(5, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    images = sampling.edm_sample(model, noise, nfe)
    assert len(model.sigmas) == nfe
    assert model.sigmas[0] == pytest.approx(SIGMA_MAX)
    assert images.shape == noise.shape and torch.isfinite(images).all()


def test_edm_sample_of_the_ideal_denoiser_of_a_point_mass_lands_on_it():
    # D(x, sigma) = 0 is the ideal denoiser of data concentrated at 0: the ODE goes there.
    noise = torch.randn(4, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    images = sampling.edm_sample(lambda x, sigma: torch.zeros_like(x), noise, 9)
    assert images.abs().max() < 1e-6


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_sample_steps(steps):
    model = CountingDenoiser()
    noise = torch.randn(3, *sampling.noise_shape(steps))
    images = sampling.consistency_sample(model, noise, steps)
    assert images.shape == (3, *IMAGE_SHAPE) and len(model.sigmas) == steps
    wrong = noise[:, :1] if steps == 2 else noise.repeat(1, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="noise"):
        sampling.consistency_sample(model, wrong, steps)


# ---------------------------------------------------------------- training plumbing

def test_update_ema():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    common.update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)


def test_parser_round_trips_a_config():
    parser = common.parser_for(common.TrainConfig, "test", "examples")
    args = parser.parse_args(["--steps", "7", "--lr", "0.5", "--threads", "1", "--no-progress",
                              "--arch", "unet"])
    config = common.config_from_args(common.TrainConfig, args)
    assert (config.steps, config.lr, config.threads, config.progress, config.arch) == (
        7, 0.5, 1, False, "unet")
    defaults = common.config_from_args(common.TrainConfig, parser.parse_args([]))
    assert defaults == dataclasses.replace(common.TrainConfig())
