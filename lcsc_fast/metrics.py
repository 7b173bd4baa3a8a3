"""FID objectives for the search: Fréchet distances between feature statistics, via clean-fid.

The LCSC search scores a candidate by the FID of samples drawn from the merged model (paper
Sec. 5, App. E.1.2). A FIDObjective holds what stays fixed during a search: the sampler, the
feature extractor, the reference statistics (computed once and cached on disk) and the noise
the samples are drawn from, fixed so that two candidates differ only by their weights. The final
evaluation draws other noise and more samples, as the paper does.

The Fréchet distance itself is clean-fid's (cleanfid.fid.frechet_distance). The feature
extractor is any callable images -> [n, d] features; clean-fid's Inception is used only when its
weights are already on disk (nothing is downloaded at run time).
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ._io import write_atomically

__all__ = ["frechet_distance", "feature_statistics", "reference_statistics", "FIDObjective",
           "inception_feature_extractor"]

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript Inception weights


def _cleanfid():
    try:
        from cleanfid import fid
    except ImportError as e:
        raise ImportError(f"lcsc_fast.metrics needs clean-fid ({e}); pip install clean-fid") from e
    return fid


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (clean-fid's):
    means mu [d], covariances sigma [d, d], the same d for both."""
    fid = _cleanfid()
    mu1, sigma1 = _check_statistics(mu1, sigma1, "mu1", "sigma1")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "mu2", "sigma2")
    # Checked here, not by clean-fid's asserts, which vanish under python -O.
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1, sigma1 and mu2, sigma2: statistics of {mu1.shape[0]} and "
                         f"{mu2.shape[0]} features; both must come from the same feature "
                         "extractor")
    if mu1.shape[0] == 1:
        # One feature: the closed form (mu1 - mu2)^2 + (s1^(1/2) - s2^(1/2))^2. clean-fid cannot
        # take this case: scipy's sqrtm returns a 1x1 matrix without the error estimate that
        # clean-fid unpacks.
        for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
            if s[0, 0] < 0:
                raise ValueError(f"{name}: variance {s[0, 0]!r} is negative; not a covariance")
        return float((mu1[0] - mu2[0]) ** 2 + sigma1[0, 0] + sigma2[0, 0]
                     - 2.0 * np.sqrt(sigma1[0, 0] * sigma2[0, 0]))
    with warnings.catch_warnings():
        # clean-fid passes scipy.linalg.sqrtm an argument newer scipy deprecates.
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def _check_statistics(mu, sigma, mu_name: str, sigma_name: str):
    """mu [d] and sigma [d, d] as float64 arrays, or a ValueError naming the one that is not."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{mu_name}: expected a mean vector [d], got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"{sigma_name}: expected a covariance [{d}, {d}] to match {mu_name} "
                         f"[{d}], got shape {sigma.shape}")
    return mu, sigma


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and covariance [d, d] of features [n, d], in float64."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else (
        np.asarray(features, dtype=np.float64))
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"features: expected an [n, d] array with n >= 2 and d >= 1, got shape "
                         f"{f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features: not all finite; the feature extractor produced NaN or inf")
    d = f.shape[1]
    # np.cov returns a 0-d array for one feature: kept [d, d] for every d.
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(d, d)


def _check_int(x, what: str) -> int:
    """x as a Python int (numpy integers too), or a TypeError naming what: a bool, float or str
    would otherwise fail deep inside torch."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{what}: expected an int, got {x!r} ({type(x).__name__})")
    return int(x)


def _check_num_samples(num_samples) -> int:
    num_samples = _check_int(num_samples, "num_samples")
    if num_samples < 2:
        raise ValueError(f"num_samples: {num_samples}; a covariance needs at least 2")
    return num_samples


def _features(extractor: Callable, batches) -> np.ndarray:
    out = []
    with torch.no_grad():
        for images in batches:
            f = extractor(images)
            f = f.detach().cpu().double() if isinstance(f, torch.Tensor) else torch.as_tensor(
                np.asarray(f, np.float64))
            if f.ndim != 2 or f.shape[0] != len(images):
                raise ValueError(f"the feature extractor returned shape {tuple(f.shape)} for "
                                 f"{len(images)} images; expected [{len(images)}, d]")
            out.append(f)
    return torch.cat(out).numpy()


def reference_statistics(images, extractor: Callable, cache_path=None,
                         batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of the reference images ([n, ...] tensor), computed once: with
    cache_path, read from that .npz when it exists, else computed and written there (atomically).
    A cache belongs to one extractor and one image set: name it accordingly."""
    if cache_path is not None and os.path.exists(cache_path):
        with np.load(cache_path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{cache_path}: not a statistics cache (needs mu and sigma)")
            return data["mu"], data["sigma"]
    try:
        n = len(images)
    except TypeError:
        raise TypeError(f"images: expected an [n, ...] tensor or array (it is sliced into "
                        f"batches), got {type(images).__name__}") from None
    if n < 2:
        raise ValueError(f"images: got {n} image(s); reference statistics need at least 2 "
                         "(a covariance)")
    batches = [images[i:i + batch_size] for i in range(0, n, batch_size)]
    mu, sigma = feature_statistics(_features(extractor, batches))
    if cache_path is not None:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, mu=mu, sigma=sigma)

        write_atomically(os.fspath(cache_path), write)
    return mu, sigma


class FIDObjective:
    """objective(model) -> FID of num_samples images drawn by sampler(model, noise) from fixed
    noise, against reference statistics (mu, sigma). Lower is better: lcsc_fast.search's
    objective.

    sampler(model, noise) -> images draws images from a batch of noise; noise_shape is one
    sample's noise shape; seed fixes the noise of the search. evaluate() scores with other
    noise and as many samples as asked, for the final comparison.
    """

    def __init__(self, sampler: Callable, extractor: Callable, reference, num_samples: int,
                 noise_shape, seed: int = 0, batch_size: int = 256, device="cpu"):
        num_samples, seed = _check_num_samples(num_samples), _check_int(seed, "seed")
        self.sampler, self.extractor = sampler, extractor
        mu, sigma = reference
        self.mu, self.sigma = _check_statistics(mu, sigma, "reference mu", "reference sigma")
        self.noise_shape, self.batch_size, self.device = tuple(noise_shape), batch_size, device
        self.noise = self._noise(num_samples, seed)

    def _noise(self, num_samples: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((num_samples, *self.noise_shape), generator=g).to(self.device)

    def _fid(self, model, noise: torch.Tensor) -> float:
        batches = (self.sampler(model, noise[i:i + self.batch_size])
                   for i in range(0, len(noise), self.batch_size))
        mu, sigma = feature_statistics(_features(self.extractor, batches))
        if mu.shape != self.mu.shape:
            raise ValueError(f"the feature extractor gives {mu.shape[0]} features per image but "
                             f"the reference statistics (mu {self.mu.shape}, sigma "
                             f"{self.sigma.shape}) have {self.mu.shape[0]}; compute the "
                             "reference with the same extractor")
        return frechet_distance(mu, sigma, self.mu, self.sigma)

    def __call__(self, model) -> float:
        return self._fid(model, self.noise)

    def evaluate(self, model, num_samples: int, seed: int) -> float:
        """FID with fresh noise (seed) and num_samples samples: the final evaluation."""
        num_samples, seed = _check_num_samples(num_samples), _check_int(seed, "seed")
        return self._fid(model, self._noise(num_samples, seed))


def inception_feature_extractor(weights_dir=None, device="cpu") -> Callable:
    """clean-fid's Inception (2048-d pool features of images in [0, 255], [n, 3, H, W]), from a
    TorchScript weights file already on disk: weights_dir/inception-2015-12-05.pt, by default
    clean-fid's own download location. Nothing is downloaded: a missing file raises."""
    from cleanfid.inception_torchscript import InceptionV3W

    weights_dir = os.fspath(weights_dir) if weights_dir is not None else "/tmp"
    path = os.path.join(weights_dir, INCEPTION_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: clean-fid's Inception weights are not on disk; put "
                                f"{INCEPTION_FILE} there (or pass weights_dir), or use a "
                                "feature extractor of your own")
    model = InceptionV3W(weights_dir, download=False, resize_inside=True).to(device)
    model.eval()
    return lambda images: model(images.to(device).float())
