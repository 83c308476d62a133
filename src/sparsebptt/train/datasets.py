"""A user's ``torch.utils.data.Dataset`` seen as the trainer sees its built-in datasets.

`TorchDatasets(train, val)` offers what the loop asks of a dataset (``batches(split, batch_size,
seed=)``, ``num_batches``, ``num_examples``): each item is ``(x, label)`` with x shaped (T, ...)
(a tensor or anything ``numpy.asarray`` takes, e.g. tonic's ``ToFrame`` output), and a batch is
time-major, x (T, B, ...) and labels (B,) int64 (`collate_time_major`). Batches of a split come from
a `torch.utils.data.DataLoader` whose shuffling is drawn from ``seed`` alone, so a run is
reproducible and a resumed epoch sees the batches it would have seen.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.base import SPLITS

__all__ = ["TorchDatasets", "collate_time_major"]


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())  # event counts, spikes as bool


def collate_time_major(items) -> "tuple[torch.Tensor, torch.Tensor]":
    """``[(x (T, ...), label), ...]`` -> x (T, B, ...) and labels (B,) int64.

    Integer and boolean x (tonic's frames are int16 counts) become the default float dtype. Every
    x must have the same shape: a ValueError names the first two that differ (give every example
    the same T, e.g. tonic's ``ToFrame(sensor_size, n_time_bins=T)``).
    """
    xs, ys = [], []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            size = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
            raise ValueError(f"sb.fit: a dataset item must be (x, label) with x shaped (T, ...), got "
                             f"{type(item).__name__}{size}")
        x, y = item
        x = _as_tensor(x)
        if x.dim() < 2:
            raise ValueError(f"sb.fit: x must be shaped (T, features...), got shape {tuple(x.shape)}")
        if xs and x.shape != xs[0].shape:
            raise ValueError(f"sb.fit: examples of one batch have different shapes, {tuple(xs[0].shape)} and "
                             f"{tuple(x.shape)} (T, ...); give every example the same T (tonic: "
                             "ToFrame(sensor_size, n_time_bins=T)) and the same features")
        xs.append(x)
        ys.append(int(y) if not isinstance(y, torch.Tensor) else int(y.reshape(-1)[0]))
    return torch.stack(xs, 1), torch.tensor(ys, dtype=torch.int64)  # [T, B, ...], [B]


class TorchDatasets:
    """``train`` and ``val`` (a Dataset or None) behind the trainer's dataset protocol."""

    def __init__(self, train, val=None, name: "str | None" = None):
        for what, ds in (("train", train), ("val", val)):
            if ds is None and what == "val":
                continue
            if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise TypeError(f"sb.fit: {what} must be a map-style torch.utils.data.Dataset (with __getitem__ and "
                                f"__len__) of (x, label) items, got {type(ds).__name__}")
        if len(train) == 0:
            raise ValueError("sb.fit: the training Dataset is empty")
        self._splits = {"train": train, "val": val}
        self.name = name or type(train).__name__
        x, _ = collate_time_major([train[0]])
        self.T, self.example_shape = int(x.shape[0]), tuple(x.shape[2:])
        self.input_size = int(np.prod(self.example_shape)) if len(self.example_shape) == 1 else None

    def num_examples(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"{self.name}: unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
        ds = self._splits[split]
        return 0 if ds is None else len(ds)

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_examples(split) // batch_size)

    def batches(self, split: str, batch_size: int, *, seed: int, shuffle: "bool | None" = None):
        """Time-major batches of ``split``, shuffled (train by default) from ``seed`` alone."""
        n = self.num_examples(split)
        if n == 0:
            return iter(())
        shuffle = split == "train" if shuffle is None else shuffle
        g = torch.Generator().manual_seed(seed)
        return iter(DataLoader(self._splits[split], batch_size=batch_size, shuffle=shuffle, generator=g,
                               collate_fn=collate_time_major, num_workers=0))

    def __repr__(self) -> str:
        return (f"TorchDatasets({self.name}, T={self.T}, train={self.num_examples('train')}, "
                f"val={self.num_examples('val')})")
