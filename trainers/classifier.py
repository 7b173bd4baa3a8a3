"""The FID feature extractor for 8x8 digits: a small CNN classifier whose penultimate layer (64
features) stands in for Inception's pool features, and the reference statistics of those
features over all 1,797 digits.

Inception sees 299x299 RGB photographs; on 8x8 digits its features say little. The FID of
digit samples is therefore measured, as in the small-scale experiments of many diffusion papers,
with a classifier trained on the dataset itself: distances between Gaussians fitted to its
penultimate activations (Heusel et al. 2017, Eq. 6, with these features in place of Inception's).

The weights and the statistics ship in assets/ beside this module; they are made, reproducibly,
by `python -m lcsc_fast.trainers.classifier`:

    assets/digits_classifier.safetensors   the classifier's weights (float32)
    assets/digits_reference.npz            mu [64], sigma [64, 64] (float64) of the features of
                                           all 1,797 digits; the format of lcsc_fast.metrics'
                                           statistics cache
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .digits import Batches, load_digits

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
WEIGHTS_FILE = "digits_classifier.safetensors"
REFERENCE_FILE = "digits_reference.npz"
FEATURES = 64

# Training settings of the shipped weights (changing them changes the assets).
SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 1e-4


class DigitClassifier(nn.Module):
    """[n, 1, 8, 8] in [-1, 1] -> logits [n, 10]; features() gives the penultimate [n, 64]."""

    def __init__(self, features: int = FEATURES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # [n, 32, 4, 4]
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # [n, 64, 2, 2]
            nn.Flatten(),
            nn.Linear(256, features), nn.SiLU(),
        )
        self.head = nn.Linear(features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def _shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel along each axis (zero padding is the background
    value -1): the augmentation that keeps a 40K-parameter classifier from memorising 1,438
    images."""
    n = len(images)
    padded = nn.functional.pad(images, (1, 1, 1, 1), value=-1.0)  # [n, 1, 10, 10]
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # [n, 8, 1]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # [n, 1, 8]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).double().mean().item()


def train_classifier(epochs: int = EPOCHS, seed: int = SEED, progress: bool = True):
    """The classifier trained on the digits' train split (AdamW, cosine learning rate, shift
    augmentation), deterministic on the CPU for a given seed: on one thread, since the order of
    a multithreaded reduction changes the low bits, and they compound over training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int, progress: bool) -> DigitClassifier:
    torch.manual_seed(seed)
    images, labels = load_digits("train")
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(images) // BATCH_SIZE
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    index = torch.arange(len(images))
    batches = Batches(index, BATCH_SIZE, seed)
    augment = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        model.train()
        for _ in range(steps_per_epoch):
            chosen = next(batches)
            loss = nn.functional.cross_entropy(model(_shifted(images[chosen], augment)),
                                               labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def extractor_of(model: DigitClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [n, 1, 8, 8] in about [-1, 1] -> features [n, 64] (inputs clamped to [-1, 1])."""
    model = model.eval().requires_grad_(False)

    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
            return model.features(x)

    return extract


@functools.lru_cache(maxsize=1)
def _shipped_classifier() -> DigitClassifier:
    from safetensors.torch import load_file

    path = os.path.join(ASSETS_DIR, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the digits classifier's weights are missing; "
                                "make them with `python -m lcsc_fast.trainers.classifier`")
    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


def feature_extractor() -> Callable[[torch.Tensor], torch.Tensor]:
    """The FID features of the shipped classifier: images [n, 1, 8, 8] in about [-1, 1] (any
    device; clamped to [-1, 1]) -> [n, 64] float32 on the CPU."""
    return extractor_of(_shipped_classifier())


def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """(mu [64], sigma [64, 64]), float64: the shipped classifier's features over all digits."""
    path = os.path.join(ASSETS_DIR, REFERENCE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the digits' reference statistics are missing; "
                                "make them with `python -m lcsc_fast.trainers.classifier`")
    with np.load(path) as data:
        return data["mu"], data["sigma"]


def fid_of_images(images: torch.Tensor, extractor=None, reference=None) -> float:
    """FID of images [n, 1, 8, 8] against the digits (the shipped extractor and statistics
    unless given)."""
    from lcsc_fast import metrics

    extractor = extractor or feature_extractor()
    mu_ref, sigma_ref = reference if reference is not None else reference_statistics()
    mu, sigma = metrics.feature_statistics(extractor(images))
    return metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def sanity_figures(extractor=None, reference=None) -> dict[str, float]:
    """FIDs of image sets whose quality is known, against which sample FIDs can be read."""
    all_images, labels = load_digits("all")
    train = load_digits("train")[0]
    g = torch.Generator().manual_seed(0)
    box = nn.functional.avg_pool2d(nn.functional.pad(all_images, (1, 1, 1, 1), value=-1.0), 3,
                                   stride=1)

    def quantised(levels: int) -> torch.Tensor:
        return torch.round((all_images + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1

    def noisy(std: float) -> torch.Tensor:
        return all_images + std * torch.randn(all_images.shape, generator=g)

    figures = {
        "train split (1,438)": train,
        "test split (359)": load_digits("test")[0],
        # 2,000 drawn with replacement: the finite-sample floor of a 2,000-sample FID
        "2,000 resampled from train": train[torch.randint(0, len(train), (2000,), generator=g)],
        "all + N(0, 0.1^2) noise": noisy(0.1),
        "all + N(0, 0.3^2) noise": noisy(0.3),
        "all, 3 intensity levels": quantised(3),
        "all, 2 intensity levels": quantised(2),
        "only the digits 0-4": all_images[labels < 5],
        "all, half 3x3 box blur": 0.5 * all_images + 0.5 * box,
        "all, 3x3 box blur": box,
        "pure noise N(0, 1)": torch.randn(all_images.shape, generator=g),
    }
    return {name: fid_of_images(images, extractor, reference) for name, images in figures.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Train the digits classifier whose penultimate features are the FID features "
                    "of lcsc_fast.trainers, and write its weights and the digits' reference "
                    f"statistics to {ASSETS_DIR}.",
        epilog="examples:\n"
               "  python -m lcsc_fast.trainers.classifier                 # remake the assets\n"
               "  python -m lcsc_fast.trainers.classifier --out /tmp/clf  # elsewhere\n"
               "  python -m lcsc_fast.trainers.classifier --check         # figures of the "
               "shipped ones",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=ASSETS_DIR, help="folder for the two files")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--check", action="store_true",
                   help="train nothing; print the shipped classifier's accuracy and FID figures")
    args = p.parse_args(argv)

    if args.check:
        model, extractor, reference = _shipped_classifier(), feature_extractor(), (
            reference_statistics())
    else:
        from safetensors.torch import save_file

        from lcsc_fast import metrics

        start = time.perf_counter()
        model = train_classifier(args.epochs, args.seed)
        print(f"trained in {time.perf_counter() - start:.1f} s")
        extractor = extractor_of(model)
        mu, sigma = metrics.feature_statistics(extractor(load_digits("all")[0]))
        reference = (mu, sigma)
        os.makedirs(args.out, exist_ok=True)
        weights = os.path.join(args.out, WEIGHTS_FILE)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        os.chmod(weights, 0o644)  # safetensors writes 0600; the file ships in the package
        np.savez(os.path.join(args.out, REFERENCE_FILE), mu=mu, sigma=sigma)
        print(f"wrote {os.path.join(args.out, WEIGHTS_FILE)} and {REFERENCE_FILE}")
    for split in ("train", "test"):
        print(f"{split} accuracy: {accuracy(model, *load_digits(split)):.4f}")
    print("FID against all digits:")
    for name, value in sanity_figures(extractor, reference).items():
        print(f"  {name:28s} {value:10.3f}")


if __name__ == "__main__":
    main()
