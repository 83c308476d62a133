"""Synthetic long-range tasks: the label depends on inputs far back in time, so truncation shows.

``delayed-recall``
    K classes, each owning a group of ``channels_per_class`` input channels (input size
    ``K * channels_per_class``). The first ``cue_steps`` steps are the *cue*: every channel of the
    class's group fires with probability ``cue_rate`` per step (``cue_start`` moves the cue later,
    to probe where in time a method lets gradient through). Then, up to step T, only sparse
    background noise: every channel (the cue window included) fires with probability
    ``noise_rate`` per step, independently of the class. The label is the cue's class, so the
    answer must be carried across the ``T - cue_steps`` steps of noise that follow. Inputs are
    spikes in {0, 1}.

``adding``
    Hochreiter & Schmidhuber's adding problem, as classification. Two channels: channel 0 holds
    a value drawn uniformly from [0, 1) at every step, channel 1 is a marker that is 1 at exactly
    two steps: one drawn uniformly from the first half ``[0, T // 2)``, one from the second half
    ``[T // 2, T)``. The target is the sum ``s`` of the two marked values; the label is the bin of
    ``s`` among ``num_classes`` bins of equal probability (the sum of two uniforms is triangular
    on [0, 2], so the bin edges are its quantiles: the classes are balanced and chance accuracy is
    exactly ``1 / num_classes``). With the default 2 classes the question is "is s > 1?".

Both are generated on the fly, example by example, from a seed: example ``i`` of a batch is
drawn from its own generator, so a sequence depends only on its seed (never on the batch size)
and only one batch ``(T, B, input_size)`` is ever held, whatever T (10^5 is fine).

- ``"train"`` is an endless stream: ``batches("train", B, seed=s)`` yields ``train_size`` fresh
  examples determined by ``s`` (the trainer passes a new seed each epoch, so no example repeats).
- ``"val"`` is a fixed set of ``val_size`` examples determined by ``val_seed`` alone (the
  ``seed`` argument does not change it), so every run and every strategy validates on the same
  sequences, as the digits datasets hold out the same images.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .base import check_batches_args, check_positive_int, check_split

__all__ = ["SyntheticDataset", "DelayedRecall", "Adding"]

_SEED_SPACE = 2 ** 62


def _check_prob(owner: str, name: str, value, *, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (0.0 <= value <= 1.0 if allow_zero else 0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{owner}: {name} is a probability per step and must be in {interval}, got {value!r}")
    return float(value)


class SyntheticDataset:
    """Shared batching of the synthetic tasks: per-example seeds, an endless train stream, a
    fixed validation set. Subclasses set ``name``, ``input_size``, ``num_classes`` and implement
    ``_example(generator) -> (x (T, input_size) float32, label int)``."""

    name: str = ""
    input_size: int = 0
    num_classes: int = 0

    def __init__(self, T: int, *, train_size: int = 1024, val_size: int = 256, val_seed: int = 0):
        check_positive_int(self.name, "T", T)
        check_positive_int(self.name, "train_size", train_size)
        check_positive_int(self.name, "val_size", val_size)
        if isinstance(val_seed, bool) or not isinstance(val_seed, int):
            raise ValueError(f"{self.name}: val_seed must be an int, got {val_seed!r}")
        self.T = T
        self.train_size = train_size
        self.val_size = val_size
        self.val_seed = val_seed

    def _check_split(self, split: str) -> None:
        check_split(self.name, split)

    def num_examples(self, split: str) -> int:
        self._check_split(split)
        return self.train_size if split == "train" else self.val_size

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_examples(split) // batch_size)

    def example_seeds(self, split: str, seed: int) -> torch.Tensor:
        """The seeds of the examples of ``split`` (N,) int64 in draw order."""
        self._check_split(split)
        g = torch.Generator().manual_seed(self.val_seed if split == "val" else seed)
        if split == "val":  # keep the validation stream apart from a train stream with the same seed
            g.manual_seed(int(torch.randint(_SEED_SPACE, (1,), generator=g)) ^ 0x5EED)
        return torch.randint(_SEED_SPACE, (self.num_examples(split),), generator=g)

    def example(self, example_seed: int) -> tuple[torch.Tensor, int]:
        """One example from its seed: x (T, input_size) float32 and its label."""
        return self._example(torch.Generator().manual_seed(int(example_seed)))

    def _example(self, g: torch.Generator) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def labels(self, split: str, seed: int = 0) -> torch.Tensor:
        """The labels of ``split`` (N,) int64 in batch order, without building the sequences."""
        return torch.tensor([self._label(torch.Generator().manual_seed(int(s)))
                             for s in self.example_seeds(split, seed)], dtype=torch.int64)

    def _label(self, g: torch.Generator) -> int:
        raise NotImplementedError

    def batches(self, split: str, batch_size: int, *, seed: int,
                shuffle: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: x (T, B, input_size) float32, y (B,) int64; the last batch may be
        smaller. ``seed`` fixes the training examples; "val" is fixed by ``val_seed``. ``shuffle``
        is accepted for the common interface and has no effect (every example is drawn afresh)."""
        check_batches_args(self.name, split, batch_size, seed, shuffle)
        seeds = self.example_seeds(split, seed)
        for i in range(0, len(seeds), batch_size):
            chunk = seeds[i:i + batch_size]
            x = torch.empty(self.T, len(chunk), self.input_size)  # [T, B, N]
            y = torch.empty(len(chunk), dtype=torch.int64)
            for b, s in enumerate(chunk.tolist()):
                x[:, b], y[b] = self.example(s)
            yield x, y


class DelayedRecall(SyntheticDataset):
    """Delayed recall: a class cue in the first steps, then sparse noise; x (T, B, K * C) spikes.

    Args:
        T: time steps per example (cue included), > cue_steps.
        num_classes: K, the number of cue classes (>= 2).
        channels_per_class: C, input channels owned by each class.
        cue_steps: length of the cue.
        cue_start: step at which the cue starts (default 0: the start of the sequence).
        cue_rate: spike probability per step of a cue channel during the cue.
        noise_rate: spike probability per step of every channel (background, whole sequence).
        train_size, val_size, val_seed: see `SyntheticDataset`.
    """

    name = "delayed-recall"

    def __init__(self, T: int = 2000, *, num_classes: int = 4, channels_per_class: int = 4,
                 cue_steps: int = 10, cue_rate: float = 1.0, noise_rate: float = 0.01, cue_start: int = 0,
                 train_size: int = 1024, val_size: int = 256, val_seed: int = 0):
        super().__init__(T, train_size=train_size, val_size=val_size, val_seed=val_seed)
        check_positive_int(self.name, "num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be >= 2, got {num_classes!r}")
        check_positive_int(self.name, "channels_per_class", channels_per_class)
        check_positive_int(self.name, "cue_steps", cue_steps)
        if isinstance(cue_start, bool) or not isinstance(cue_start, int) or cue_start < 0:
            raise ValueError(f"{self.name}: cue_start must be an int >= 0, got {cue_start!r}")
        if T <= cue_start + cue_steps:
            raise ValueError(f"{self.name}: T must be larger than cue_start + cue_steps = {cue_start + cue_steps} "
                             f"(the cue is followed by noise up to T), got T={T}")
        self.cue_rate = _check_prob(self.name, "cue_rate", cue_rate, allow_zero=False)
        self.noise_rate = _check_prob(self.name, "noise_rate", noise_rate, allow_zero=True)
        self.num_classes = num_classes
        self.channels_per_class = channels_per_class
        self.cue_steps = cue_steps
        self.cue_start = cue_start
        self.input_size = num_classes * channels_per_class

    def _label(self, g):
        return int(torch.randint(self.num_classes, (1,), generator=g))

    def _example(self, g):
        label = self._label(g)
        x = (torch.rand(self.T, self.input_size, generator=g) < self.noise_rate).float()  # [T, N]
        c = self.channels_per_class
        cue = torch.rand(self.cue_steps, c, generator=g) < self.cue_rate  # [cue_steps, C]
        x[self.cue_start:self.cue_start + self.cue_steps, label * c:(label + 1) * c][cue] = 1.0
        return x, label

    def __repr__(self) -> str:
        return (f"DelayedRecall(T={self.T}, num_classes={self.num_classes}, "
                f"channels_per_class={self.channels_per_class}, cue_steps={self.cue_steps}, cue_start={self.cue_start}, "
                f"cue_rate={self.cue_rate}, noise_rate={self.noise_rate}, train_size={self.train_size}, "
                f"val_size={self.val_size})")


def _triangular_quantile(q: float) -> float:
    """Inverse CDF of the sum of two independent U(0, 1) (triangular on [0, 2])."""
    return math.sqrt(2 * q) if q <= 0.5 else 2 - math.sqrt(2 * (1 - q))


class Adding(SyntheticDataset):
    """The adding problem as classification: x (T, B, 2) (values, markers), y = bin of the sum.

    Args:
        T: time steps per example, >= 2 (one marker in each half).
        num_classes: bins of equal probability of the sum of the two marked values (>= 2).
        train_size, val_size, val_seed: see `SyntheticDataset`.

    ``edges`` holds the ``num_classes - 1`` inner bin edges on [0, 2].
    """

    name = "adding"
    input_size = 2

    def __init__(self, T: int = 2000, *, num_classes: int = 2, train_size: int = 1024,
                 val_size: int = 256, val_seed: int = 0):
        super().__init__(T, train_size=train_size, val_size=val_size, val_seed=val_seed)
        if T < 2:
            raise ValueError(f"{self.name}: T must be >= 2 (one marker in each half), got {T!r}")
        check_positive_int(self.name, "num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.edges = torch.tensor([_triangular_quantile(k / num_classes) for k in range(1, num_classes)])

    def _draw(self, g):
        values = torch.rand(self.T, generator=g)  # [T]
        half = self.T // 2
        first = int(torch.randint(half, (1,), generator=g))
        second = half + int(torch.randint(self.T - half, (1,), generator=g))
        return values, first, second

    def _label(self, g):
        values, first, second = self._draw(g)
        return int(torch.bucketize(values[first] + values[second], self.edges))

    def _example(self, g):
        values, first, second = self._draw(g)
        x = torch.zeros(self.T, 2)
        x[:, 0] = values
        x[first, 1] = x[second, 1] = 1.0
        return x, int(torch.bucketize(values[first] + values[second], self.edges))

    def __repr__(self) -> str:
        return (f"Adding(T={self.T}, num_classes={self.num_classes}, train_size={self.train_size}, "
                f"val_size={self.val_size})")


class SlowSines(SyntheticDataset):
    """Slowly varying input: which of K frequencies the sinusoids of the channels share.

    Every channel is ``sin(2 pi f t / T + phase) + noise``, with a random phase per channel and
    the class's frequency ``f = 1 + class`` cycles per sequence, plus Gaussian noise of standard
    deviation ``noise`` per step: between steps the input changes by ~2 pi f / T (tiny for long T),
    so a Delta RNN's deltas are mostly below threshold, as for audio features at high frame rates.

    Args:
        T: time steps per example (>= 8).
        num_classes: K frequencies, 1..K cycles per sequence (>= 2).
        channels: input channels.
        noise: Gaussian noise standard deviation (>= 0).
        train_size, val_size, val_seed: see `SyntheticDataset`.
    """

    name = "slow-sines"

    def __init__(self, T: int = 200, *, num_classes: int = 4, channels: int = 8, noise: float = 0.01,
                 train_size: int = 1024, val_size: int = 256, val_seed: int = 0):
        super().__init__(T, train_size=train_size, val_size=val_size, val_seed=val_seed)
        if T < 8:
            raise ValueError(f"{self.name}: T must be >= 8, got {T!r}")
        check_positive_int(self.name, "num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be >= 2, got {num_classes!r}")
        check_positive_int(self.name, "channels", channels)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < math.inf:
            raise ValueError(f"{self.name}: noise must be a standard deviation >= 0, got {noise!r}")
        self.num_classes, self.input_size, self.noise = num_classes, channels, float(noise)

    def _label(self, g):
        return int(torch.randint(self.num_classes, (1,), generator=g))

    def _example(self, g):
        label = self._label(g)
        phase = 2 * math.pi * torch.rand(self.input_size, generator=g)  # [N]
        t = torch.arange(self.T, dtype=torch.float32).unsqueeze(1)  # [T, 1]
        x = torch.sin(2 * math.pi * (1 + label) * t / self.T + phase)  # [T, N]
        if self.noise:
            x = x + self.noise * torch.randn(self.T, self.input_size, generator=g)
        return x.float(), label
