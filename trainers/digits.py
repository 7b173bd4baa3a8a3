"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn) as a
diffusion dataset: [n, 1, 8, 8] float32 tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch

IMAGE_SHAPE = (1, 8, 8)
_MAX_INTENSITY = 16.0  # the dataset's pixel values are integers 0..16


def load_digits(split: str = "all", test_fraction: float = 0.2, seed: int = 0):
    """(images [n, 1, 8, 8] in [-1, 1], labels [n]) for split "all", "train" or "test"; the
    train/test split is a fixed random permutation (seed), stratified by nothing."""
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"split: {split!r} is not 'all', 'train' or 'test'")
    data = sklearn_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / (_MAX_INTENSITY / 2) - 1.0)
    images = images.reshape(-1, *IMAGE_SHAPE)
    labels = torch.from_numpy(data.target.astype(np.int64))
    if split == "all":
        return images, labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(images))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return images[chosen], labels[chosen]


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: what image grids and the classifier see."""
    return ((images + 1) / 2).clamp(0, 1)


class Batches:
    """An endless stream of random minibatches (with horizontal jitter off: digits are not
    symmetric) drawn without replacement within each epoch, reproducible from seed."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int):
        self.images, self.batch_size = images, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._at = torch.empty(0, dtype=torch.long), 0

    def __next__(self) -> torch.Tensor:
        if self._at + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.images), generator=self.generator)
            self._at = 0
        chosen = self._order[self._at:self._at + self.batch_size]
        self._at += self.batch_size
        return self.images[chosen]

    def __iter__(self):
        return self
