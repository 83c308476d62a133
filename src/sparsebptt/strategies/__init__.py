"""Memory strategies: which states a scan keeps, where, and what it recomputes."""
from .base import Strategy, parse_strategy
from .checkpoint import Checkpoint
from .double import DoubleCheckpoint, TwoLevelRevolve
from .full import FullBPTT
from .revolve import Revolve
from .skipper import Skipper

__all__ = ["Strategy", "parse_strategy", "Checkpoint", "DoubleCheckpoint", "FullBPTT", "Revolve",
           "Skipper", "TwoLevelRevolve"]
