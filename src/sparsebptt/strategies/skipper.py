"""Skipper: checkpointing plus time-skipped BPTT (an approximation, never the default).

Each segment of ``every`` steps is split into a *skipped* head and a *kept* tail of ``keep``
steps. The forward runs the head without graph and stores one checkpoint at the start of the
tail (so the skipped steps are never run again: one checkpoint per segment, as in plain
checkpointing). The backward restores each tail, recomputes it with graph and back-propagates
it; the head is skipped. What is approximated:

- the gradient paths *through* the skipped steps: their outputs send no gradient to the
  parameters or to x (dx is zero there), and
- the state gradient leaving a kept tail at its start. ``carry="drop"`` (default) stops it there,
  so each tail is a truncated-BPTT window driven by its own outputs and by nothing later;
  ``carry="through"`` hands it unchanged to the end of the previous segment, as if the skipped
  steps were the identity map (a long-range path that ignores the decay inside the head).

``keep == every`` is exactly `Checkpoint(every)`. Memory: (ceil(T/every) - 1) states plus one
tail's graph (``keep`` steps); compute: the forward plus ``keep/every`` of the steps again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from checkpoint_schedules import EndForward, EndReverse, Forward, Move, Reverse, StorageType

from .base import CARRIES, SkipReverse, Strategy, positive_int, register, register_variant

__all__ = ["Skipper", "SkipReverse", "CARRIES", "skipper_schedule"]


def skipper_schedule(T: int, every: int, keep: int, carry: str = "drop"):
    """Checkpoint at the start of each kept tail; in reverse, recompute and back-propagate each
    tail and `SkipReverse` (with ``carry``) over the head before it."""
    starts = list(range(0, T, every))
    spans = [(a, min(a + every, T)) for a in starts]
    tails = [max(a, b - keep) for a, b in spans]
    for (a, b), k in zip(spans[:-1], tails[:-1]):
        if k > a:
            yield Forward(a, k, False, False, StorageType.WORK)
        yield Forward(k, b, True, False, StorageType.RAM)
    (a, b), k = spans[-1], tails[-1]
    if k > a:
        yield Forward(a, k, False, False, StorageType.WORK)
    yield Forward(k, b, False, True, StorageType.WORK)
    yield EndForward()
    yield Reverse(b, k, True)
    if k > a:
        yield SkipReverse(k, a, carry)
    for (a, b), k in zip(reversed(spans[:-1]), reversed(tails[:-1])):
        yield Move(k, StorageType.RAM, StorageType.WORK)
        yield Forward(k, b, False, True, StorageType.WORK)
        yield Reverse(b, k, True)
        if k > a:
            yield SkipReverse(k, a, carry)
    yield EndReverse()


@register
@dataclass(frozen=True)
class Skipper(Strategy):
    """Checkpoint every ``every`` steps; back-propagate only the last ``keep`` steps of each
    segment (time-skipped BPTT). Approximate unless keep == every; see the module docstring."""

    every: int = 64
    keep: int = 16
    carry: str = "drop"
    name = "skipper"
    usage = "skipper:EVERY,KEEP"
    n_args = 2
    exact: ClassVar[bool] = False

    def __post_init__(self):
        positive_int("Skipper", "every", self.every)
        positive_int("Skipper", "keep", self.keep)
        if self.keep > self.every:
            raise ValueError(f"Skipper: keep must be <= every, got keep={self.keep}, every={self.every}")
        if self.carry not in CARRIES:
            raise ValueError(f"Skipper: unknown carry {self.carry!r}; valid carries are: {', '.join(CARRIES)}")

    @property
    def approximate(self) -> bool:
        return self.keep < self.every

    def schedule(self, T):
        return skipper_schedule(T, self.every, self.keep, self.carry)

    def fast_slots(self, T):
        return max(0, -(-T // self.every) - 1)

    def to_string(self):
        name = "skipper" if self.carry == "drop" else f"skipper-{self.carry}"
        return f"{name}:{self.every},{self.keep}"


register_variant("skipper-through", "skipper-through:EVERY,KEEP",
                 lambda every, keep: Skipper(every, keep, carry="through"))
