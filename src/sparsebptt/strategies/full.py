"""Plain backpropagation through time: every step's graph is kept. The reference."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, register

__all__ = ["FullBPTT"]


@register
@dataclass(frozen=True)
class FullBPTT(Strategy):
    """Keep the whole graph (plain autograd). Memory grows with T; no recomputation."""

    name = "full"
    usage = "full"
    n_args = 0

    def fast_slots(self, T: int) -> int:
        return 0

    def to_string(self) -> str:
        return "full"
