"""Plain backpropagation through time: every step's graph is kept. The reference."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Plan, Strategy, register

__all__ = ["FullBPTT"]


@register
@dataclass(frozen=True)
class FullBPTT(Strategy):
    """Keep the whole graph (plain autograd). Memory grows with T; no recomputation.

    Its plan has no schedule: the executor's `run_graph` runs the cell under autograd, so
    everything autograd allows (``retain_graph``, double backward) works as on a hand-written loop.
    """

    name = "full"
    usage = "full"
    n_args = 0

    def plan(self, T: int) -> Plan:
        return Plan(T, keep_graph=True)

    def fast_slots(self, T: int) -> int:
        return 0

    def to_string(self) -> str:
        return "full"
