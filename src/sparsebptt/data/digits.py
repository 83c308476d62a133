"""``digits-spikes``: scikit-learn's 8x8 handwritten digits, rate-coded into spike trains.

1797 images of 64 pixels with values 0..16 ship with scikit-learn (no download). Pixel ``k``
fires at each of the T steps with probability ``pixel_k / 16 * max_rate``. A stratified
validation split is held out with a fixed seed, independent of the training seed, so every run
validates on the same images.
"""
from __future__ import annotations

import torch

from .base import RateCodedDataset

__all__ = ["DigitsSpikes"]


class DigitsSpikes(RateCodedDataset):
    """Rate-coded digits: x (T, B, 64) float32 spikes, y (B,) int64 in 0..9.

    Args:
        T: time steps per example.
        max_rate: spike probability per step of a full-intensity pixel (16), in (0, 1].
        val_fraction: share of the examples held out for validation, in (0, 1).
        split_seed: seed of the stratified train/validation split.

    ``indices[split]`` holds the rows of ``sklearn.datasets.load_digits`` in each split.
    """

    name = "digits-spikes"
    input_size = 64
    num_classes = 10

    def __init__(self, T: int = 16, *, max_rate: float = 1.0, val_fraction: float = 0.2,
                 split_seed: int = 0):
        super().__init__(T, max_rate=max_rate)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"{self.name}: val_fraction must be in (0, 1), got {val_fraction!r}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
        tr, va = train_test_split(range(len(labels)), test_size=val_fraction, stratify=labels,
                                  random_state=split_seed)
        features = torch.as_tensor(images, dtype=torch.float32) / 16.0  # [N, 64] in [0, 1]
        targets = torch.as_tensor(labels, dtype=torch.int64)
        self.indices: dict[str, torch.Tensor] = {}
        for split, idx in (("train", tr), ("val", va)):
            idx = torch.as_tensor(sorted(idx))
            self.indices[split] = idx
            self._features[split] = features[idx]
            self._labels[split] = targets[idx]
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
