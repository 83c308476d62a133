"""Single checkpointing: keep the state every ``every`` steps, recompute each segment in backward."""
from __future__ import annotations

from dataclasses import dataclass

from checkpoint_schedules import (EndForward, EndReverse, Forward, Move, Reverse,
                                  StorageType)

from .base import Strategy, positive_int, register

__all__ = ["Checkpoint", "periodic_schedule"]


def periodic_schedule(T: int, every: int, storage=StorageType.RAM):
    """Checkpoint at 0, k, 2k, ...; the last segment keeps its graph from the forward; in reverse,
    each earlier segment is restored, recomputed with graph and back-propagated.

    Memory: (ceil(T/k) - 1) states + one segment's graph; recomputes T - (last segment) steps.
    """
    starts = list(range(0, T, every))
    for a in starts[:-1]:
        yield Forward(a, a + every, True, False, storage)
    yield Forward(starts[-1], T, False, True, StorageType.WORK)
    yield EndForward()
    yield Reverse(T, starts[-1], True)
    for a in reversed(starts[:-1]):
        yield Move(a, storage, StorageType.WORK)
        yield Forward(a, a + every, False, True, StorageType.WORK)
        yield Reverse(a + every, a, True)
    yield EndReverse()


@register
@dataclass(frozen=True)
class Checkpoint(Strategy):
    """Store the state every ``every`` steps; recompute each segment once in backward.

    Fast memory ~ (T/every + every) states; every = sqrt(T) minimises it.
    """

    every: int = 32
    name = "checkpoint"
    usage = "checkpoint:EVERY"

    def __post_init__(self):
        positive_int("Checkpoint", "every", self.every)

    def schedule(self, T):
        return periodic_schedule(T, self.every)

    def fast_slots(self, T):
        return max(0, -(-T // self.every) - 1)

    def to_string(self):
        return f"checkpoint:{self.every}"


