"""What every dataset offers the trainer, and the shared batching of a rate-coded dataset.

A dataset yields time-major batches ``x`` (T, B, input_size) float32 and labels ``y`` (B,) int64.
Batches are drawn from a ``seed``: the same seed gives the same order and the same spikes, so a
run is reproducible without touching the global RNG.
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["SPLITS", "RateCodedDataset", "check_positive_int"]

SPLITS = ("train", "val")


def check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_split(owner: str, split: str) -> None:
    """ValueError naming the valid splits unless ``split`` is one of `SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"{owner}: unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")


def check_batches_args(owner: str, split: str, batch_size, seed, shuffle: "bool | None") -> bool:
    """Check the arguments every dataset's ``batches`` takes; returns ``shuffle`` with its default
    (True for "train", False for "val") filled in."""
    check_split(owner, split)
    check_positive_int(owner, "batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}: seed must be an int, got {type(seed).__name__}")
    return split == "train" if shuffle is None else shuffle


class LabelledSplits:
    """Split checks and label access shared by the datasets (``self.name``, ``self._labels``)."""

    name: str
    _labels: dict

    def _check_split(self, split: str) -> None:
        check_split(self.name, split)

    def labels(self, split: str) -> torch.Tensor:
        """The labels of ``split`` (N,), int64, in split order (the order of unshuffled batches)."""
        self._check_split(split)
        return self._labels[split]

    def num_examples(self, split: str) -> int:
        self._check_split(split)
        return len(self._labels[split])

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_examples(split) // batch_size)


class RateCodedDataset(LabelledSplits):
    """Static features in [0, 1] turned into Bernoulli spike trains per batch (rate coding).

    At every step each input fires with probability ``feature * max_rate``, independently.

    Subclasses fill ``self._features[split]`` (N, input_size) float32 in [0, 1] and
    ``self._labels[split]`` (N,) int64, and set ``name``, ``input_size``, ``num_classes``.
    """

    name: str = ""
    input_size: int = 0
    num_classes: int = 0

    def __init__(self, T: int, *, max_rate: float = 1.0):
        check_positive_int(self.name, "T", T)
        if not 0.0 < float(max_rate) <= 1.0:
            raise ValueError(f"{self.name}: max_rate is a spike probability per step and must be in "
                             f"(0, 1], got {max_rate!r}")
        self.T = T
        self.max_rate = float(max_rate)
        self._features: dict[str, torch.Tensor] = {}
        self._labels: dict[str, torch.Tensor] = {}

    def features(self, split: str) -> torch.Tensor:
        """The static features of ``split`` (N, input_size), float32 in [0, 1], in split order."""
        self._check_split(split)
        return self._features[split]

    def encode(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Rate-code ``features`` (B, F) in [0, 1] into spikes (T, B, F) float32 in {0, 1}."""
        p = (features * self.max_rate).clamp_(0.0, 1.0)  # [B, F]
        p = p.unsqueeze(0).expand(self.T, *p.shape)  # [T, B, F]
        return torch.bernoulli(p, generator=generator)

    def batches(self, split: str, batch_size: int, *, seed: int,
                shuffle: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: x (T, B, input_size) float32 spikes, y (B,) int64 labels.

        ``shuffle`` defaults to True for "train" and False for "val". The last batch may be
        smaller. ``seed`` fixes the order and the spikes.
        """
        shuffle = check_batches_args(self.name, split, batch_size, seed, shuffle)
        features, labels = self._features[split], self._labels[split]
        g = torch.Generator().manual_seed(seed)
        n = len(labels)
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield self.encode(features[idx], g), labels[idx]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_examples(s)}" for s in SPLITS)
        return f"{type(self).__name__}(T={self.T}, max_rate={self.max_rate}, {sizes})"
