"""``digits-seq``: scikit-learn's 8x8 digits fed row by row, each row held for several steps.

A slowly changing input, as audio features are at high frame rates: the 8 pixels of row ``k``
(values 0..16 scaled to [0, 1]) are the input at every step ``t`` with ``floor(t * 8 / T) == k``,
plus independent Gaussian noise of standard deviation ``noise`` per step and pixel. Between row
changes the input only jitters, so a Delta RNN whose threshold is above the noise transmits
almost nothing there. Same images and the same stratified train/validation split as
``digits-spikes``.
"""
from __future__ import annotations

import math

import torch

from .digits import DigitsSpikes

__all__ = ["DigitsSeq"]


class DigitsSeq(DigitsSpikes):
    """Digits row by row: x (T, B, 8) float32, y (B,) int64 in 0..9.

    Args:
        T: time steps per example, >= 8; row k is held for the steps with floor(t * 8 / T) == k.
        noise: standard deviation of the Gaussian noise added at every step (>= 0).
        val_fraction, split_seed: as `DigitsSpikes`.
    """

    name = "digits-seq"
    input_size = 8
    num_classes = 10

    def __init__(self, T: int = 64, *, noise: float = 0.02, val_fraction: float = 0.2, split_seed: int = 0):
        super().__init__(T, val_fraction=val_fraction, split_seed=split_seed)
        if T < 8:
            raise ValueError(f"{self.name}: T must be >= 8 (one step per image row at least), got {T!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < math.inf:
            raise ValueError(f"{self.name}: noise must be a standard deviation >= 0, got {noise!r}")
        self.noise = float(noise)
        self.row_of_step = torch.arange(T) * 8 // T  # [T], which image row each step shows

    def encode(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Rows of ``features`` (B, 64) in [0, 1] as a sequence (T, B, 8) float32 with noise."""
        rows = features.view(-1, 8, 8).transpose(0, 1)  # [8 rows, B, 8 pixels]
        x = rows[self.row_of_step]  # [T, B, 8]
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=generator)
        return x.contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(T={self.T}, noise={self.noise}, "
                f"train={self.num_examples('train')}, val={self.num_examples('val')})")
