"""`sb.scan`: the one entry point that runs a cell over time under a memory strategy.

It checks its inputs, asks the strategy for its `Plan` and hands it to the executor
(`strategies.executor.execute`), which runs every strategy, `FullBPTT` included.
"""
from __future__ import annotations

import warnings

import torch

from .strategies import FullBPTT, Strategy, parse_strategy
from .sources import SPIKE_DTYPES, SegmentSource, as_input
from .strategies.executor import RecomputationError, execute
from .trace import current_trace

__all__ = ["scan", "REDUCES", "RecomputationError", "SegmentSource"]

REDUCES = (None, "sum", "mean", "last")


def _check_cell(cell) -> None:
    missing = [m for m in ("initial_state", "step") if not callable(getattr(cell, m, None))]
    if missing:
        raise TypeError(f"sb.scan: cell {type(cell).__name__} lacks {', '.join(missing)}; a cell needs "
                        "`initial_state(batch_size, device=None, dtype=None)` and `step(x_t, state)`")


def _as_tensor_like(x):
    """A numpy array (a ``numpy.memmap`` too) as a tensor sharing its memory; anything else as it is."""
    if type(x).__module__.startswith("numpy") and hasattr(x, "__array_interface__"):
        with warnings.catch_warnings():  # a read-only memmap: the scan never writes to its input
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(x)
    return x


def _cell_dtype(cell, x) -> torch.dtype:
    """The dtype the cell computes in: its parameters', else x's (a float tensor), else its floating
    buffers' (LIFNeuron's dtype anchor), else the default dtype."""
    p = next((p for p in cell.parameters() if p.is_floating_point()), None) \
        if hasattr(cell, "parameters") else None
    if p is not None:
        return p.dtype
    dt = getattr(x, "dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    b = next((b for b in cell.buffers() if b.is_floating_point()), None) if hasattr(cell, "buffers") else None
    return b.dtype if b is not None else torch.get_default_dtype()


def _check_x(cell, x) -> None:
    if not isinstance(x, (torch.Tensor, SegmentSource)):
        raise TypeError(f"sb.scan: x must be a torch.Tensor of shape (T, B, *features) (or a numpy array, or an "
                        f"sb.SegmentSource), got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) < 3:
        hint = "; add the batch dimension with x.unsqueeze(1)" if len(shape) == 2 else ""
        raise ValueError(f"sb.scan: x must be 3-D (T, B, input_size) or more (T, B, *features), time-major, "
                         f"got shape {shape}{hint}")
    if shape[0] == 0:
        raise ValueError("sb.scan: x has T=0 time steps; a scan needs at least one step")
    if shape[1] == 0:
        raise ValueError("sb.scan: x has batch size 0")
    dtype = x.dtype
    if isinstance(x, torch.Tensor) and not x.is_floating_point() and dtype not in SPIKE_DTYPES:
        raise TypeError(f"sb.scan: x must be a floating-point tensor or spikes (bool/uint8/int8), got dtype "
                        f"{dtype}; convert it with x.float()")
    if x.requires_grad and not x.is_floating_point():  # pragma: no cover - torch refuses it already
        raise ValueError("sb.scan: an integer x cannot require grad")
    in_shape = getattr(cell, "input_shape", None)
    n_in = getattr(cell, "input_size", None)
    flat_ok = len(shape) == 3 and isinstance(n_in, int) and shape[2] == n_in  # a cell taking both forms (adapters)
    if isinstance(in_shape, tuple) and in_shape:
        if shape[2:] != in_shape and not flat_ok:
            raise ValueError(f"sb.scan: x has shape {shape} but {type(cell).__name__} takes (T, B, "
                             f"{', '.join(map(str, in_shape))}): features {in_shape} expected, {shape[2:]} received")
    elif isinstance(n_in, int) and not isinstance(n_in, bool):
        if len(shape) != 3:
            raise ValueError(f"sb.scan: x has shape {shape} but {type(cell).__name__} takes (T, B, {n_in}) "
                             f"(input_size={n_in}); flatten the features with x.flatten(2)")
        if shape[2] != n_in:
            raise ValueError(f"sb.scan: x has {shape[2]} features (shape {shape}) but the cell "
                             f"{type(cell).__name__} has input_size={n_in}")
    p = next((p for p in cell.parameters() if p.is_floating_point()), None) \
        if hasattr(cell, "parameters") else None
    if p is not None:
        if isinstance(x, torch.Tensor) and dtype.is_floating_point and p.dtype != dtype:
            raise TypeError(f"sb.scan: x has dtype {dtype} but the cell's parameters are {p.dtype}; "
                            f"use x.to({p.dtype}) or cell.to({dtype})")
        if p.device != x.device:
            raise ValueError(f"sb.scan: x is on {x.device} but the cell's parameters are on {p.device}; "
                             f"move one of them (x.to('{p.device}') or cell.to('{x.device}'))")


def _check_state(cell, x, state0, dtype) -> tuple:
    B = x.shape[1]
    expected = tuple(cell.initial_state(B, device=x.device, dtype=dtype))
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
            hint = f"build it with cell.initial_state({B})"
            if s.dim() >= 1 and s.shape[0] != B and x.shape[0] == s.shape[0] and x.dim() == 3:
                hint = f"x looks batch-first (B={s.shape[0]} is x's first dimension): pass x.transpose(0, 1)"
            raise ValueError(f"sb.scan: state0[{i}] has shape {tuple(s.shape)}, expected {tuple(e.shape)} "
                             f"(batch {B} of x {tuple(x.shape)}); {hint}")
        if s.dtype != e.dtype and not (e.is_floating_point() and s.dtype == dtype):
            # (x's dtype is fine too: some cells' initial_state ignores its dtype argument)
            raise TypeError(f"sb.scan: state0[{i}] has dtype {s.dtype}, expected {e.dtype} (what "
                            f"{type(cell).__name__}.initial_state gives for dtype={dtype}) or {dtype} like x")
        if s.device != e.device:
            raise ValueError(f"sb.scan: state0[{i}] is on {s.device} but x is on {e.device}")
    return state0


def _check_finite(x, state0) -> None:
    xs = [("x", x)] if isinstance(x, torch.Tensor) else []  # a SegmentSource is not read here
    for name, t in xs + [(f"state0[{i}]", s) for i, s in enumerate(state0)]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"sb.scan: {name} contains {n_bad} NaN/Inf values (check_finite=True)")


def scan(cell, x, state0=None, *, strategy: "Strategy | str | None" = None, reduce: str | None = None,
         check_finite: bool = False, preserve_rng: bool = True):
    """Run ``cell`` over the time-major input ``x`` (T, B, *features) under a memory ``strategy``.

    Args:
        cell: any module with ``initial_state(batch_size, device, dtype)`` and ``step(x_t, state)``.
        x: input sequence, (T, B, *features), T >= 1 (T = 0 raises ValueError): a floating-point
            tensor of the cell's dtype; spikes as a bool/uint8/int8 tensor (converted to the cell's
            dtype one segment at a time); a memory-mapped tensor or numpy memmap; or an
            `sb.SegmentSource` (segments made on demand). See `sparsebptt.sources`; only a
            floating-point tensor gets a gradient.
        state0: initial state tuple; default ``cell.initial_state(B)`` (zeros).
        strategy: `FullBPTT()` (default), `Checkpoint(every)`, `Revolve(slots)`, ... or a string
            for `parse_strategy`. Exact strategies give the same outputs and gradients.
        reduce: None returns every step's output (T, B, H); "sum", "mean", "last" reduce over time
            inside the scan, so no (T, B, H) tensor is held.
        check_finite: raise if x or state0 hold NaN/Inf (costs one pass over x).
        preserve_rng: replay the RNG state on recomputation, so stochastic steps repeat exactly.

    Returns:
        (y, state_T): y is (T, B, *out), or (B, *out) when reduced; state_T the final state tuple.

    Under ``torch.no_grad()`` or ``torch.inference_mode()`` every strategy runs the forward alone:
    no graph, no checkpoint stored (there is no backward to plan for).

    Under ``torch.compile`` the scan is a graph break: it runs eagerly (recomputation included)
    and the layers around it compile.
    """
    if torch.compiler.is_compiling():  # traced by Dynamo: leave the graph, run the scan eagerly
        return _scan_eagerly(cell, x, state0, strategy=strategy, reduce=reduce, check_finite=check_finite,
                             preserve_rng=preserve_rng)
    _check_cell(cell)
    x = _as_tensor_like(x)
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
    dtype = _cell_dtype(cell, x)
    state0 = _check_state(cell, x, state0, dtype)
    if check_finite:
        _check_finite(x, state0)
    params = list(cell.parameters()) if hasattr(cell, "parameters") else []
    t = current_trace()
    if t is not None:
        t.add_external(*([x] if isinstance(x, torch.Tensor) else []), *state0, *params)
        t.name_layers(cell)
    return execute(cell, as_input(x, dtype), state0, strategy.plan(x.shape[0]), reduce, params, preserve_rng)


#: `scan` outside any torch.compile graph; torch._dynamo is imported at its first call, not with
#: the package (it doubles the import time)
_scan_eagerly = getattr(torch, "_disable_dynamo", torch.compiler.disable)(lambda *args, **kwargs: scan(*args, **kwargs))
