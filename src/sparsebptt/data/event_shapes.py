"""``event-shapes``: a synthetic event-camera dataset (no download), for convolutional SNNs.

Each example is a shape rotating (and drifting) in front of an event camera: ON/OFF event frames
x (T, 2, size, size) in {0, 1}, channel 0 the ON events (a pixel got brighter by at least a
quarter of full scale since the step before), channel 1 the OFF events (darker), plus sensor noise
(independent events at ``noise`` per pixel, channel and step). There are 10 classes: 5 shapes
(square, triangle, cross, bar, L) times 2 rotation directions (counter-clockwise, clockwise), so a
classifier needs the polarity of the events along each edge as well as the edges themselves.
Position, size, start angle, rotation speed and drift are drawn per example.

Everything is drawn from ``seed`` when the dataset is built (frames rendered with 2 x 2
super-sampling, vectorised over examples, a few seconds for the default 2,500 examples at T = 25);
``batches(split, batch_size, seed=)`` then only chooses the order. The frames are kept as bool
(T * 2 * size * size bytes per example); a batch becomes float32 when it is drawn.

``EventShapes(T)`` offers the trainer's protocol (``batches``, ``labels``, ``num_examples``) and
``EventShapes(T).split("train")`` a ``torch.utils.data.Dataset`` of ``(x (T, 2, size, size),
label)`` for `sparsebptt.fit` or a DataLoader.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .base import SPLITS, LabelledSplits, check_batches_args, check_positive_int

__all__ = ["EventShapes", "EventShapesSplit", "SHAPES", "render_shapes"]

#: the shapes, in class order: class = 2 * shape index + (1 if clockwise else 0)
SHAPES = ("square", "triangle", "cross", "bar", "L")
_SUPER = 2  # super-sampling per pixel and axis
_STEP = 1.0 / (_SUPER * _SUPER)  # one sub-pixel's share of a pixel's intensity


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u, v) of the shape's own frame (unit size) lie inside shape ``shape``."""
    au, av = np.abs(u), np.abs(v)
    if shape == 0:  # square
        return np.maximum(au, av) <= 0.65
    if shape == 1:  # triangle, apex up
        return (v >= -0.55) & (v <= 0.85 - 1.6 * au)
    if shape == 2:  # cross
        return ((au <= 0.22) & (av <= 0.9)) | ((av <= 0.22) & (au <= 0.9))
    if shape == 3:  # bar
        return (au <= 0.95) & (av <= 0.22)
    # L
    return (((u >= -0.75) & (u <= -0.3)) & (av <= 0.85)) | ((u >= -0.75) & (u <= 0.75) & (v >= -0.85) & (v <= -0.4))


def _reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``p`` folded into [lo, hi] (a point bouncing between two walls)."""
    span = hi - lo
    q = np.mod(p - lo, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def render_shapes(shape: np.ndarray, params: dict, T: int, size: int) -> np.ndarray:
    """Intensity frames (N, T + 1, size, size) float32 in [0, 1] of N shapes (one of `SHAPES` each).

    ``params`` holds (N,) arrays: ``cx, cy`` (start centre, pixels), ``vx, vy`` (drift, pixels per
    step), ``scale`` (half-size, pixels), ``angle`` (start, radians), ``omega`` (radians per step,
    positive counter-clockwise).
    """
    n = len(shape)
    sub = (np.arange(size * _SUPER, dtype=np.float32) + 0.5) / _SUPER  # sub-pixel centres
    t = np.arange(T + 1, dtype=np.float32)
    margin = 0.3 * size
    cx = _reflect(params["cx"][:, None] + params["vx"][:, None] * t, margin, size - margin)  # [N, T+1]
    cy = _reflect(params["cy"][:, None] + params["vy"][:, None] * t, margin, size - margin)
    ang = params["angle"][:, None] + params["omega"][:, None] * t
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    dx = sub[None, None, None, :] - cx[:, :, None, None]  # [N, T+1, 1, X]
    dy = sub[None, None, :, None] - cy[:, :, None, None]  # [N, T+1, Y, 1]
    k = (1.0 / params["scale"]).astype(np.float32)[:, None, None, None]
    u = (c[:, :, None, None] * dx + s[:, :, None, None] * dy) * k  # rotate by -angle, unit size
    v = (-s[:, :, None, None] * dx + c[:, :, None, None] * dy) * k
    out = np.zeros((n, T + 1, size * _SUPER, size * _SUPER), dtype=bool)
    for k_shape in range(len(SHAPES)):
        m = shape == k_shape
        if m.any():
            out[m] = _inside(k_shape, u[m], v[m])
    img = out.reshape(n, T + 1, size, _SUPER, size, _SUPER).mean(axis=(3, 5), dtype=np.float32)
    return img


class EventShapes(LabelledSplits):
    """Rotating shapes seen by an event camera: x (T, 2, size, size) ON/OFF events, 10 classes.

    ``T``: steps per example; ``size``: pixels per side (>= 8); ``n_train``, ``n_val``: examples
    per split (balanced over the classes, in a seeded random order); ``noise``: probability of a
    spurious event per pixel, polarity and step; ``seed``: every example (the same seed gives the
    same data). Batches: x (T, B, 2, size, size) float32 in {0, 1}, y (B,) int64.
    """

    name = "event-shapes"
    num_classes = 2 * len(SHAPES)

    def __init__(self, T: int, *, size: int = 32, n_train: int = 2000, n_val: int = 500, noise: float = 0.002,
                 seed: int = 0):
        check_positive_int(self.name, "T", T)
        for what, v in (("size", size), ("n_train", n_train), ("n_val", n_val)):
            check_positive_int(self.name, what, v)
        if size < 8:
            raise ValueError(f"{self.name}: size must be at least 8 pixels, got {size}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < 1.0:
            raise ValueError(f"{self.name}: noise is an event probability per pixel and step and must be in "
                             f"[0, 1), got {noise!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{self.name}: seed must be an int, got {type(seed).__name__}")
        self.T, self.size, self.noise, self.seed = T, size, float(noise), seed
        self.input_shape = (2, size, size)
        self.input_size = 2 * size * size
        self._x: dict[str, torch.Tensor] = {}
        self._labels: dict[str, torch.Tensor] = {}
        for i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            self._x[split], self._labels[split] = self._make(n, np.random.default_rng([seed, i]))

    def _make(self, n: int, rng: np.random.Generator) -> "tuple[torch.Tensor, torch.Tensor]":
        T, size = self.T, self.size
        labels = rng.permutation(np.arange(n) % self.num_classes)
        shape = labels // 2
        direction = np.where(labels % 2 == 1, -1.0, 1.0)  # odd classes turn clockwise
        params = {
            "cx": rng.uniform(0.4 * size, 0.6 * size, n), "cy": rng.uniform(0.4 * size, 0.6 * size, n),
            "vx": rng.uniform(-0.3, 0.3, n), "vy": rng.uniform(-0.3, 0.3, n),
            "scale": rng.uniform(0.22 * size, 0.3 * size, n),
            "angle": rng.uniform(0.0, 2 * math.pi, n),
            "omega": direction * rng.uniform(0.12, 0.25, n),
        }
        x = np.empty((n, T, 2, size, size), dtype=bool)
        chunk = max(1, (1 << 22) // ((T + 1) * size * size * _SUPER * _SUPER))  # ~16 MiB of sub-pixels
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            img = render_shapes(shape[a:b], {k: v[a:b] for k, v in params.items()}, T, size)
            d = np.diff(img, axis=1)  # [n, T, size, size]
            x[a:b, :, 0] = d >= _STEP - 1e-6
            x[a:b, :, 1] = d <= -_STEP + 1e-6
        if self.noise > 0:
            x |= rng.random(x.shape, dtype=np.float32) < self.noise
        return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))

    def frames(self, split: str) -> torch.Tensor:
        """Every example of ``split``: (N, T, 2, size, size) bool, in split order."""
        self._check_split(split)
        return self._x[split]

    def split(self, split: str) -> "EventShapesSplit":
        """``split`` as a ``torch.utils.data.Dataset`` of ``(x (T, 2, size, size) float32, label)``."""
        self._check_split(split)
        return EventShapesSplit(self._x[split], self._labels[split])

    def batches(self, split: str, batch_size: int, *, seed: int,
                shuffle: "bool | None" = None) -> Iterator["tuple[torch.Tensor, torch.Tensor]"]:
        """Yield ``(x, y)``: x (T, B, 2, size, size) float32 in {0, 1}, y (B,) int64.

        ``shuffle`` defaults to True for "train" and False for "val"; ``seed`` fixes the order (the
        events themselves were fixed when the dataset was built). The last batch may be smaller.
        """
        shuffle = check_batches_args(self.name, split, batch_size, seed, shuffle)
        x, labels = self._x[split], self._labels[split]
        n = len(labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield x[idx].transpose(0, 1).to(torch.float32), labels[idx]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_examples(s)}" for s in SPLITS)
        return f"EventShapes(T={self.T}, size={self.size}, noise={self.noise}, seed={self.seed}, {sizes})"


class EventShapesSplit(torch.utils.data.Dataset):
    """One split of `EventShapes` as a map-style Dataset: item i is ``(x (T, 2, size, size) float32,
    label int)``."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self._x, self._labels = x, labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> "tuple[torch.Tensor, int]":
        return self._x[i].to(torch.float32), int(self._labels[i])
