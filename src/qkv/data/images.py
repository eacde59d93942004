"""Images for a Vision Transformer: scikit-learn's bundled 8x8 handwritten digits.

1,797 grey-scale images of the digits 0-9, 8x8 pixels with values 0..16, shipped inside
scikit-learn (no download): small enough that a tiny ViT learns them in a minute on a CPU,
cutting each image into 2x2 or 4x4 patches (Dosovitskiy et al., "An Image is Worth 16x16 Words",
2020, arXiv:2010.11929). The optional extra ``qkv[data]`` installs scikit-learn.

The split is stratified: within each digit, a permutation seeded by ``seed`` puts the last
``val_fraction`` of its images into the test split. Pixels are standardised with one mean and
one standard deviation measured on the training split: ``x' = (x - mean) / std``. With
``augment``, each training image is shifted by -1, 0 or +1 pixels along each axis (the uncovered
border is background).

Shape legend: B batch · C channels (1) · H, W image height and width (8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from qkv.data.config import step_generator, val_slices

__all__ = ["DigitsImages", "load_digits_arrays"]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``(images (N, 8, 8) float64 in 0..16, labels (N,) int64)``.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits images come with scikit-learn, which is not installed: "
            "pip install 'qkv[data]'"
        ) from None
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


class DigitsImages:
    """Batches of standardised digit images (see module docstring).

    Attributes:
        kind: ``"images"``.
        num_labels: 10 classes. image_size: 8. num_channels: 1.
        mean, std: the training split's pixel statistics used to standardise.
    """

    kind = "images"
    num_labels = 10
    image_size = 8
    num_channels = 1

    def __init__(self, *, val_fraction: float = 0.1, seed: int = 0, augment: bool = False):
        images, labels = load_digits_arrays()
        train_idx, test_idx = [], []
        g = step_generator(seed, 0, stream="digits-split")
        for digit in range(self.num_labels):
            idx = np.flatnonzero(labels == digit)
            order = idx[torch.randperm(len(idx), generator=g).numpy()]
            n_test = round(val_fraction * len(idx))
            train_idx.append(order[: len(idx) - n_test])
            test_idx.append(order[len(idx) - n_test :])
        train = np.sort(np.concatenate(train_idx))
        test = np.sort(np.concatenate(test_idx))
        if len(test) == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves no digits for the test split")
        self.mean = float(images[train].mean())
        self.std = float(images[train].std())
        pixels = torch.from_numpy((images - self.mean) / self.std).float()  # (N, 8, 8)
        self.background = (0.0 - self.mean) / self.std  # a blank pixel after standardising
        self.train_images = pixels[train].unsqueeze(1)  # (N_train, 1, 8, 8)
        self.train_labels = torch.from_numpy(labels[train])  # (N_train,)
        self.test_images = pixels[test].unsqueeze(1)  # (N_test, 1, 8, 8)
        self.test_labels = torch.from_numpy(labels[test])  # (N_test,)
        self.augment = augment
        self.fingerprint = {  # what data this is: the bundled arrays' hash
            "corpus": "digits",
            "sha256": hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest(),
            "images": len(labels),
        }

    def _shift(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Shift each image by -1, 0 or +1 pixels per axis, filling with background."""
        b, _, h, w = images.shape
        padded = F.pad(images, (1, 1, 1, 1), value=self.background)  # (B, 1, H + 2, W + 2)
        offsets = torch.randint(0, 3, (b, 2), generator=g)  # (B, 2): row and column offsets
        return torch.stack(
            [padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets.tolist())]
        )  # (B, 1, H, W)

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Random training images drawn from ``(seed, step)`` alone.

        Returns:
            ``{"pixel_values": (B, 1, 8, 8) float32, "labels": (B,) int64}``.
        """
        g = step_generator(seed, step)
        idx = torch.randint(0, len(self.train_labels), (batch_size,), generator=g)  # (B,)
        images = self.train_images[idx]  # (B, 1, 8, 8)
        if self.augment:
            images = self._shift(images, g)
        return {"pixel_values": images, "labels": self.train_labels[idx]}

    def val_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The test split in order, ``batch_size`` at a time (the last batch may be smaller)."""
        for rows in val_slices(len(self.test_labels), batch_size, max_batches):
            yield {"pixel_values": self.test_images[rows], "labels": self.test_labels[rows]}
