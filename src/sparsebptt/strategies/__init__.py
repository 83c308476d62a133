"""Memory strategies: which states a scan keeps, where, and what it recomputes.

Each is a pure plan (`Strategy.plan(T)` -> `Plan`); `executor` runs plans and knows no strategy.
"""
from .base import Plan, SkipReverse, Strategy, parse_strategy
from .checkpoint import Checkpoint
from .double import DoubleCheckpoint, TwoLevelRevolve
from .full import FullBPTT
from .revolve import Revolve
from .skipper import Skipper

__all__ = ["Plan", "SkipReverse", "Strategy", "parse_strategy", "Checkpoint", "DoubleCheckpoint", "FullBPTT",
           "Revolve", "Skipper", "TwoLevelRevolve"]
