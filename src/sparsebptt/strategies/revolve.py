"""Binomial checkpointing (Griewank & Walther's Revolve) with ``slots`` checkpoints.

The schedule is `checkpoint_schedules.MultistageCheckpointSchedule` with every snapshot in RAM,
which is the offline binomial (Revolve) schedule: for s slots and T steps it runs each step once
with graph plus r*T - C(s + r, s + 1) steps without (Griewank's optimum, so at most r*T), r the
least integer with C(s + r, s) >= T, and holds at most s states.
(`checkpoint_schedules.Revolve`, its H-Revolve port, gives the same counts but its dynamic
programme takes minutes at T = 10^4; the multistage generator is closed-form.)
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

from checkpoint_schedules import MultistageCheckpointSchedule

from .base import Strategy, positive_int, register

__all__ = ["Revolve", "binomial_repetitions"]


def binomial_repetitions(T: int, slots: int) -> int:
    """The least r with C(slots + r, slots) >= T: the bound on forward sweeps of Revolve."""
    r = 0
    while comb(slots + r, slots) < T:
        r += 1
    return r


@register
@dataclass(frozen=True)
class Revolve(Strategy):
    """Optimal binomial checkpointing with ``slots`` stored states (memory O(slots))."""

    slots: int = 8
    name = "revolve"
    usage = "revolve:SLOTS"

    def __post_init__(self):
        positive_int("Revolve", "slots", self.slots)

    def schedule(self, T):
        return iter(MultistageCheckpointSchedule(T, self.slots, 0))

    def fast_slots(self, T):
        return min(self.slots, max(T - 1, 0))

    def to_string(self):
        return f"revolve:{self.slots}"
