"""`sb.scan`: the one entry point that runs a cell over time under a memory strategy.

It checks its inputs, asks the strategy for its `Plan` and hands it to the executor
(`strategies.executor.execute`), which runs every strategy, `FullBPTT` included.
"""
from __future__ import annotations

import torch

from .strategies import FullBPTT, Strategy, parse_strategy
from .strategies.executor import RecomputationError, execute
from .trace import current_trace

__all__ = ["scan", "REDUCES", "RecomputationError"]

REDUCES = (None, "sum", "mean", "last")


def _check_cell(cell) -> None:
    missing = [m for m in ("initial_state", "step") if not callable(getattr(cell, m, None))]
    if missing:
        raise TypeError(f"sb.scan: cell {type(cell).__name__} lacks {', '.join(missing)}; a cell needs "
                        "`initial_state(batch_size, device=None, dtype=None)` and `step(x_t, state)`")


def _check_x(cell, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sb.scan: x must be a torch.Tensor of shape (T, B, input_size), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"sb.scan: x must be 3-D (T, B, input_size), time-major, got shape {tuple(x.shape)}; "
                         "for batch-first data pass x.transpose(0, 1)")
    if x.shape[0] == 0:
        raise ValueError("sb.scan: x has T=0 time steps; a scan needs at least one step")
    if x.shape[1] == 0:
        raise ValueError("sb.scan: x has batch size 0")
    if not x.is_floating_point():
        raise TypeError(f"sb.scan: x must be a floating-point tensor, got dtype {x.dtype}; "
                        "convert spikes with x.float()")
    n_in = getattr(cell, "input_size", None)
    if isinstance(n_in, int) and x.shape[2] != n_in:
        raise ValueError(f"sb.scan: x has {x.shape[2]} features (shape {tuple(x.shape)}) but the cell "
                         f"{type(cell).__name__} has input_size={n_in}")
    p = next((p for p in cell.parameters() if p.is_floating_point()), None) \
        if hasattr(cell, "parameters") else None
    if p is not None:
        if p.dtype != x.dtype:
            raise TypeError(f"sb.scan: x has dtype {x.dtype} but the cell's parameters are {p.dtype}; "
                            f"use x.to({p.dtype}) or cell.to({x.dtype})")
        if p.device != x.device:
            raise ValueError(f"sb.scan: x is on {x.device} but the cell's parameters are on {p.device}; "
                             f"move one of them (x.to('{p.device}') or cell.to('{x.device}'))")


def _check_state(cell, x, state0) -> tuple:
    B = x.shape[1]
    expected = tuple(cell.initial_state(B, device=x.device, dtype=x.dtype))
    if state0 is None:
        return expected
    if isinstance(state0, torch.Tensor):
        state0 = (state0,)
    if not isinstance(state0, (tuple, list)) or not all(isinstance(s, torch.Tensor) for s in state0):
        raise TypeError(f"sb.scan: state0 must be a tuple of tensors (as cell.initial_state returns), "
                        f"got {type(state0).__name__}")
    state0 = tuple(state0)
    if len(state0) != len(expected):
        raise ValueError(f"sb.scan: state0 has {len(state0)} tensors but {type(cell).__name__} has a state "
                         f"of {len(expected)}: shapes {[tuple(e.shape) for e in expected]}")
    for i, (s, e) in enumerate(zip(state0, expected)):
        if s.shape != e.shape:
            raise ValueError(f"sb.scan: state0[{i}] has shape {tuple(s.shape)}, expected {tuple(e.shape)} "
                             f"(batch {B}); build it with cell.initial_state({B})")
        if s.dtype != e.dtype and not (e.is_floating_point() and s.dtype == x.dtype):
            # (x's dtype is fine too: some cells' initial_state ignores its dtype argument)
            raise TypeError(f"sb.scan: state0[{i}] has dtype {s.dtype}, expected {e.dtype} (what "
                            f"{type(cell).__name__}.initial_state gives for dtype={x.dtype}) or {x.dtype} like x")
        if s.device != e.device:
            raise ValueError(f"sb.scan: state0[{i}] is on {s.device} but x is on {e.device}")
    return state0


def _check_finite(x, state0) -> None:
    for name, t in [("x", x)] + [(f"state0[{i}]", s) for i, s in enumerate(state0)]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"sb.scan: {name} contains {n_bad} NaN/Inf values (check_finite=True)")


def scan(cell, x, state0=None, *, strategy: "Strategy | str | None" = None, reduce: str | None = None,
         check_finite: bool = False, preserve_rng: bool = True):
    """Run ``cell`` over the time-major input ``x`` (T, B, input_size) under a memory ``strategy``.

    Args:
        cell: any module with ``initial_state(batch_size, device, dtype)`` and ``step(x_t, state)``.
        x: input sequence, (T, B, input_size), T >= 1 (T = 0 raises ValueError).
        state0: initial state tuple; default ``cell.initial_state(B)`` (zeros).
        strategy: `FullBPTT()` (default), `Checkpoint(every)`, `Revolve(slots)`, ... or a string
            for `parse_strategy`. Exact strategies give the same outputs and gradients.
        reduce: None returns every step's output (T, B, H); "sum", "mean", "last" reduce over time
            inside the scan, so no (T, B, H) tensor is held.
        check_finite: raise if x or state0 hold NaN/Inf (costs one pass over x).
        preserve_rng: replay the RNG state on recomputation, so stochastic steps repeat exactly.

    Returns:
        (y, state_T): y is (T, B, H), or (B, H) when reduced; state_T the final state tuple.

    Under ``torch.no_grad()`` or ``torch.inference_mode()`` every strategy runs the forward alone:
    no graph, no checkpoint stored (there is no backward to plan for).

    Under ``torch.compile`` the scan is a graph break: it runs eagerly (recomputation included)
    and the layers around it compile.
    """
    if torch.compiler.is_compiling():  # traced by Dynamo: leave the graph, run the scan eagerly
        return _scan_eagerly(cell, x, state0, strategy=strategy, reduce=reduce, check_finite=check_finite,
                             preserve_rng=preserve_rng)
    _check_cell(cell)
    _check_x(cell, x)
    if reduce not in REDUCES:
        raise ValueError(f"sb.scan: reduce must be one of None, 'sum', 'mean', 'last', got {reduce!r}")
    if strategy is None:
        strategy = FullBPTT()
    elif isinstance(strategy, str):
        strategy = parse_strategy(strategy)
    elif not isinstance(strategy, Strategy):
        raise TypeError(f"sb.scan: strategy must be a Strategy (e.g. sb.Checkpoint(every=32)) or a string "
                        f"such as 'checkpoint:32', got {type(strategy).__name__}")
    state0 = _check_state(cell, x, state0)
    if check_finite:
        _check_finite(x, state0)
    params = list(cell.parameters()) if hasattr(cell, "parameters") else []
    t = current_trace()
    if t is not None:
        t.add_external(x, *state0, *params)
        t.name_layers(cell)
    return execute(cell, x, state0, strategy.plan(x.shape[0]), reduce, params, preserve_rng)


#: `scan` outside any torch.compile graph; torch._dynamo is imported at its first call, not with
#: the package (it doubles the import time)
_scan_eagerly = getattr(torch, "_disable_dynamo", torch.compiler.disable)(lambda *args, **kwargs: scan(*args, **kwargs))
