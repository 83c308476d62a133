"""`sb.Recurrent`: a cell scanned over time as an ``nn.Module`` (the layer stage).

    layer = sb.Recurrent(cell, strategy="checkpoint:32")            # layer(x, state0=None) -> (y, state)
    head = nn.Sequential(sb.Recurrent(cell, reduce="mean", return_state=False), nn.Linear(256, 10))
    layer = sb.Recurrent(cell, memory_budget="512MiB")              # the planner picks the strategy

The layer adds nothing to the computation: ``layer(x, state0)`` is ``sb.scan(cell, x, state0,
strategy=..., reduce=...)``, so its outputs and gradients are the scan's. The cell is a registered
submodule (its parameters, ``.to()`` and ``state_dict`` are the layer's); the state travels in and
out of ``forward``, never in the module.
"""
from __future__ import annotations

import torch
from torch import nn

from .planner import format_bytes, parse_bytes, plan
from .scan import REDUCES, scan
from .sources import SegmentSource
from .strategies import FullBPTT, Strategy, parse_strategy

__all__ = ["Recurrent"]


def _as_strategy(strategy) -> Strategy:
    """A `Strategy` from a Strategy, a string for `parse_strategy`, or None (`FullBPTT`)."""
    if strategy is None:
        return FullBPTT()
    if isinstance(strategy, str):
        return parse_strategy(strategy)
    if not isinstance(strategy, Strategy):
        raise TypeError(f"sb.Recurrent: strategy must be a Strategy (e.g. sb.Checkpoint(every=32)) or a string "
                        f"such as 'checkpoint:32', got {type(strategy).__name__}")
    return strategy


def _plannable(x) -> bool:
    """Whether ``x`` has a shape the planner can plan for; any other ``x`` goes to `sb.scan`, which
    raises its own error for it."""
    return isinstance(x, (torch.Tensor, SegmentSource)) and x.dim() >= 3 and x.shape[0] > 0 and x.shape[1] > 0


class Recurrent(nn.Module):
    """``cell`` scanned over time under a memory strategy: ``forward(x, state0=None)`` returns
    ``(y, state)`` exactly as ``sb.scan(cell, x, state0, strategy=strategy, reduce=reduce)``, or
    ``y`` alone with ``return_state=False`` (so that the layer composes in ``nn.Sequential``).

    Args:
        cell: an ``nn.Module`` with ``initial_state(batch_size, device=None, dtype=None)`` and
            ``step(x_t, state)`` (any `sb.cells` cell or `sb.cells.Stack`).
        strategy: a `Strategy` or a string for `sb.parse_strategy`; None is `FullBPTT`.
        reduce: None (y is (T, B, H)), "sum", "mean" or "last" (y is (B, H)), as in `sb.scan`.
        memory_budget: bytes or a string such as "512MiB": `sb.plan` picks the fastest strategy
            that fits, once per input shape (and dtype and device); the picks are in `plans`.
            Give either ``strategy`` or ``memory_budget``.
        return_state: return ``(y, state)`` (default) or ``y`` only.
    """

    def __init__(self, cell: nn.Module, strategy: "Strategy | str | None" = None, reduce: "str | None" = None,
                 memory_budget: "int | str | None" = None, return_state: bool = True):
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise TypeError(f"sb.Recurrent: cell must be an nn.Module (its parameters become the layer's), "
                            f"got {type(cell).__name__}")
        missing = [m for m in ("initial_state", "step") if not callable(getattr(cell, m, None))]
        if missing:
            raise TypeError(f"sb.Recurrent: cell {type(cell).__name__} lacks {', '.join(missing)}; a cell needs "
                            "`initial_state(batch_size, device=None, dtype=None)` and `step(x_t, state)`")
        if strategy is not None and memory_budget is not None:
            raise ValueError(f"sb.Recurrent: give strategy or memory_budget, not both (got strategy={strategy!r} "
                             f"and memory_budget={memory_budget!r}); with a budget the planner picks the strategy")
        if reduce not in REDUCES:
            raise ValueError(f"sb.Recurrent: reduce must be one of None, 'sum', 'mean', 'last', got {reduce!r}")
        if not isinstance(return_state, bool):
            raise TypeError(f"sb.Recurrent: return_state must be True or False, got {return_state!r}")
        self.cell = cell
        self.reduce = reduce
        self.return_state = return_state
        self._budget = None if memory_budget is None else parse_bytes(memory_budget)
        self._strategy = None if memory_budget is not None else _as_strategy(strategy)
        self._plans: "dict[tuple, Strategy]" = {}

    @property
    def memory_budget(self) -> "int | None":
        """The budget in bytes the planner fits, or None when the strategy is fixed."""
        return self._budget

    @memory_budget.setter
    def memory_budget(self, budget: "int | str | None") -> None:
        """A budget for the planner (its earlier picks forgotten), or None to fix the strategy again
        (`FullBPTT` until one is set)."""
        if budget is None:
            if self._budget is not None:
                self._budget, self._strategy = None, FullBPTT()
        else:
            self._budget, self._strategy = parse_bytes(budget), None
        self._plans = {}

    @property
    def strategy(self) -> "Strategy | None":
        """The fixed strategy, or None with a ``memory_budget`` (see `plans` and `strategy_for`)."""
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: "Strategy | str | None") -> None:
        if self._budget is not None:
            raise ValueError(f"sb.Recurrent: this layer has memory_budget={self._budget} and the planner picks "
                             "its strategy; build a layer without memory_budget to fix the strategy")
        self._strategy = _as_strategy(strategy)

    @property
    def plans(self) -> "dict[tuple, Strategy]":
        """The planner's picks so far: ``(shape, dtype, device) -> Strategy`` (empty without a budget)."""
        return dict(self._plans)

    def strategy_for(self, x: torch.Tensor) -> Strategy:
        """The strategy ``forward(x)`` runs: the fixed one, or the planner's pick for x's shape, dtype
        and device (planned on first use, then cached)."""
        if self._budget is None:
            return self._strategy
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._plans:
            with torch.enable_grad():  # the planner measures a small backward, also under no_grad
                streamed = not (isinstance(x, torch.Tensor) and x.is_floating_point())  # read per segment
                self._plans[key] = plan(self.cell, key[0], self._budget, reduce=self.reduce, streamed=streamed)
        return self._plans[key]

    def forward(self, x: torch.Tensor, state0: "tuple[torch.Tensor, ...] | None" = None):
        """``(y, state)`` of ``sb.scan`` on ``x`` (T, B, input_size), or ``y`` with return_state=False."""
        strategy = self.strategy_for(x) if self._budget is None or _plannable(x) else None
        y, state = scan(self.cell, x, state0, strategy=strategy, reduce=self.reduce)
        return (y, state) if self.return_state else y

    def extra_repr(self) -> str:
        how = (f"memory_budget={format_bytes(self._budget)}" if self._budget is not None
               else f"strategy={self._strategy.to_string()}")
        return f"{how}, reduce={self.reduce!r}, return_state={self.return_state}"
