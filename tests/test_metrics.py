"""lcsc_fast.metrics: Fréchet distances through clean-fid, cached reference statistics, and an
FID objective with fixed noise that the search can use."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import lcsc_fast
from lcsc_fast import metrics


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """For diagonal covariances the distance is ||mu1 - mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2))."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-9)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0,
                                                                                      abs=1e-9)


def test_feature_statistics_and_bad_features():
    f = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    mu, sigma = metrics.feature_statistics(f)
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match=r"features: expected an \[n, d\] array"):
        metrics.feature_statistics(np.zeros((1, 3)))
    bad = f.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="not all finite"):
        metrics.feature_statistics(bad)


def test_one_feature_gives_a_1x1_covariance_and_a_distance():
    """d = 1: the covariance stays [1, 1], and the distance is the closed form."""
    g = torch.Generator().manual_seed(4)
    f1, f2 = torch.randn(30, 1, generator=g), 2.0 * torch.randn(40, 1, generator=g) + 1.0
    mu1, s1 = metrics.feature_statistics(f1)
    mu2, s2 = metrics.feature_statistics(f2)
    assert mu1.shape == (1,) and s1.shape == (1, 1)
    np.testing.assert_allclose(s1[0, 0], f1.double().var().item(), rtol=1e-12)
    want = (mu1[0] - mu2[0]) ** 2 + (np.sqrt(s1[0, 0]) - np.sqrt(s2[0, 0])) ** 2
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("args,match", [
    pytest.param((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), r"mu1, sigma1 and mu2, "
                 r"sigma2: statistics of 3 and 4 features", id="d=3 vs d=4"),
    pytest.param((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), r"sigma1: .*\[3, 3\].*mu1",
                 id="sigma1 vs mu1"),
    pytest.param((np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)[:2]), r"sigma2: .*\[3, 3\]",
                 id="sigma2 not square"),
    pytest.param((np.zeros((1, 3)), np.eye(3), np.zeros(3), np.eye(3)), r"mu1: .*\[d\]",
                 id="mu1 not a vector"),
])
def test_mismatched_statistics_are_named(args, match):
    """Shape errors name the arguments in a ValueError (clean-fid's own asserts vanish under -O
    and name neither)."""
    with pytest.raises(ValueError, match=match):
        metrics.frechet_distance(*args)


def flatten(images):
    return images.reshape(len(images), -1)


def test_reference_statistics_are_computed_once_and_cached(tmp_path):
    """With cache_path the reference statistics are written once; later calls read them and
    never run the extractor; a file that is not a statistics cache is refused."""
    images = torch.randn(40, 2, 2, generator=torch.Generator().manual_seed(2))
    calls = []

    def extractor(x):
        calls.append(len(x))
        return flatten(x)

    path = tmp_path / "ref.npz"
    mu, sigma = metrics.reference_statistics(images, extractor, cache_path=path, batch_size=16)
    assert calls == [16, 16, 8] and path.exists()
    mu2, sigma2 = metrics.reference_statistics(images, extractor, cache_path=path)
    assert calls == [16, 16, 8]
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a statistics cache"):
        metrics.reference_statistics(images, extractor, cache_path=tmp_path / "other.npz")


@pytest.mark.parametrize("images", [torch.zeros(0, 4), torch.zeros(1, 4), []],
                         ids=["0 images", "1 image", "empty list"])
def test_reference_statistics_need_two_images(images, tmp_path):
    """Fewer than 2 images give no covariance: a ValueError saying how many came, before the
    extractor runs, and no cache."""
    path = tmp_path / "ref.npz"
    with pytest.raises(ValueError, match=rf"^images: got {len(images)} image\(s\); .*at least 2"):
        metrics.reference_statistics(images, flatten, cache_path=path)
    assert not path.exists()


def test_reference_statistics_refuse_bad_images_and_features(tmp_path):
    """A generator cannot be cut into batches; an extractor that drops rows or returns NaN is
    named; nothing is cached from any of them."""
    path = tmp_path / "ref.npz"
    images = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    with pytest.raises(TypeError, match=r"^images: expected an \[n, \.\.\.\] tensor .*got "
                                        r"generator"):
        metrics.reference_statistics((x for x in images), flatten, cache_path=path)
    with pytest.raises(ValueError, match=r"returned shape \(1, 4\) for 5 images"):
        metrics.reference_statistics(images, lambda x: x[:1], cache_path=path)
    with pytest.raises(ValueError, match=r"^features: not all finite"):
        metrics.reference_statistics(images, lambda x: x * float("nan"), cache_path=path)
    assert not path.exists()


def sampler(model, noise):
    """A toy generator: images = noise * scale + shift (model holds 'scale' and 'shift')."""
    return noise * model["scale"] + model["shift"]


def reference_for(scale, shift, n=4000, seed=123):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 4, generator=g) * scale + shift
    return metrics.reference_statistics(images, flatten)


def test_fid_objective_uses_fixed_noise_and_evaluate_uses_other_noise():
    """The search objective scores with the same noise every call (deterministic); evaluate()
    draws other noise and more samples; both are small at the true parameters and grow away."""
    scale, shift = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([0.0, 1.0, -1.0, 2.0])
    objective = metrics.FIDObjective(sampler, flatten, reference_for(scale, shift),
                                     num_samples=500, noise_shape=(4,), seed=0, batch_size=128)
    true = {"scale": scale.clone(), "shift": shift.clone()}
    off = {"scale": scale * 1.5, "shift": shift + 0.5}
    assert objective(true) == objective(true)
    assert objective(true) < 0.1 < objective(off)
    final = objective.evaluate(true, num_samples=2000, seed=7)
    assert final != objective(true) and final < 0.05
    with pytest.raises(ValueError, match="num_samples"):
        metrics.FIDObjective(sampler, flatten, reference_for(scale, shift), 1, (4,))


@pytest.mark.parametrize("value", [True, 2.5, "10", None], ids=repr)
def test_fid_objective_refuses_counts_and_seeds_that_are_not_ints(value):
    """num_samples and seed, in the constructor and in evaluate(): a bool, float or str is a
    TypeError naming the argument and the value (torch's own errors name neither); numpy
    integers are ints."""
    reference, model = (np.zeros(4), np.eye(4)), {"scale": torch.ones(4), "shift": torch.zeros(4)}
    got = re.escape(repr(value))
    with pytest.raises(TypeError, match=rf"^num_samples: expected an int, got {got}"):
        metrics.FIDObjective(sampler, flatten, reference, value, (4,))
    with pytest.raises(TypeError, match=rf"^seed: expected an int, got {got}"):
        metrics.FIDObjective(sampler, flatten, reference, 10, (4,), seed=value)
    objective = metrics.FIDObjective(sampler, flatten, reference, np.int64(10), (4,),
                                     seed=np.int32(3))
    assert objective.noise.shape == (10, 4)
    with pytest.raises(TypeError, match=rf"^num_samples: expected an int, got {got}"):
        objective.evaluate(model, value, seed=1)
    with pytest.raises(TypeError, match=rf"^seed: expected an int, got {got}"):
        objective.evaluate(model, 10, seed=value)
    assert objective.evaluate(model, np.int64(20), seed=np.uint8(1)) >= 0.0
    with pytest.raises(ValueError, match=r"^num_samples: 1; a covariance needs at least 2"):
        objective.evaluate(model, 1, seed=1)


def test_fid_objective_refuses_features_the_reference_does_not_have():
    """An extractor of 3 features against 4-d reference statistics: a ValueError naming both
    sizes; a reference whose sigma does not match its mu is refused when the objective is made."""
    scale, shift = torch.ones(4), torch.zeros(4)
    reference = reference_for(scale, shift, n=200)
    objective = metrics.FIDObjective(sampler, lambda x: x[:, :3], reference, num_samples=20,
                                     noise_shape=(4,))
    with pytest.raises(ValueError, match=r"gives 3 features .* reference statistics .* have 4"):
        objective({"scale": scale, "shift": shift})
    with pytest.raises(ValueError, match=r"reference sigma: .*\[4, 4\]"):
        metrics.FIDObjective(sampler, flatten, (reference[0], np.eye(3)), num_samples=20,
                             noise_shape=(4,))


def test_search_with_an_fid_objective_beats_the_baselines():
    """End to end: checkpoints of a toy generator drifting towards (and short of) the data's
    parameters; searching with the FID objective finds coefficients beyond the last checkpoint
    that score better than every baseline, and evaluate() confirms it on fresh noise."""
    scale, shift = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([0.0, 1.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(3)
    checkpoints = [{"scale": scale * (0.4 + 0.04 * i) + 0.01 * torch.randn(4, generator=g),
                    "shift": shift * (0.4 + 0.04 * i) + 0.01 * torch.randn(4, generator=g)}
                   for i in range(8)]
    objective = metrics.FIDObjective(sampler, flatten, reference_for(scale, shift),
                                     num_samples=400, noise_shape=(4,), seed=0)
    target = {"scale": torch.zeros(4), "shift": torch.zeros(4)}
    result = lcsc_fast.search(checkpoints, objective, target, budget=300, algorithm="cmaes",
                              seed=0, progress=False)
    assert result.score < min(result.baselines.values())
    lcsc_fast.merge_into(target, checkpoints, result.coefficients)
    best_final = objective.evaluate(target, num_samples=2000, seed=9)
    lcsc_fast.merge_into(target, checkpoints, result.baseline_coefficients["last"])
    assert best_final < objective.evaluate(target, num_samples=2000, seed=9)


def test_inception_weights_are_never_downloaded(tmp_path):
    """clean-fid's Inception is used only from a weights file on disk; without one the error
    names the file to provide."""
    with pytest.raises(FileNotFoundError, match=r"inception-2015-12-05\.pt"):
        metrics.inception_feature_extractor(weights_dir=tmp_path)
