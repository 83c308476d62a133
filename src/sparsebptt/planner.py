"""Memory and time model of (cell, shape, strategy), and `sb.plan` for a memory budget.

The model counts what `sb.trace` counts. From two tiny traced runs of the real cell at the real
batch size it measures the bytes autograd saves per step (``G``), the bytes of one state
(``S``, and ``S_enc`` as stored: spikes bit-packed) and of one output (``Y``). A strategy's
schedule then gives the rest exactly:

    fast bytes = fast_slots * S_enc + (longest graph segment) * (G + Y) + S + C
    (Y counted once, not per step, for reduce="last", unless the cell runs a fused
    ``scan_segment``: its autograd node returns, and so holds, the whole [L, B, H] output block)
    (C: what a recomputed graph segment holds besides its steps, e.g. the input state a fused
    segment's node saves; measured with one traced Checkpoint(1) run)
    (+ X for an input read a segment at a time, `sparsebptt.sources`: the converted steps it holds,
    (longest graph segment + one no-grad chunk) * X_step, or T * X_step under FullBPTT)
    slow bytes = slow_slots * S_enc
    time       = cell-step evaluations = T + recomputed steps (the backward is the same for all)

`plan` returns the fastest candidate whose fast bytes fit the budget.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from math import comb

import torch
from checkpoint_schedules import EndForward, EndReverse, Forward

from .storage import binary_states_of
from .strategies import Checkpoint, DoubleCheckpoint, FullBPTT, Plan, Revolve, Strategy, TwoLevelRevolve
from .strategies.executor import NO_GRAD_CHUNK
from .strategies.revolve import binomial_repetitions
from .trace import trace

__all__ = ["BudgetError", "StepCosts", "Estimate", "measure", "estimate", "plan", "candidates", "parse_bytes",
           "format_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3,
          "gb": 1000 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2,
          "gib": 1024 ** 3, "tib": 1024 ** 4}


class BudgetError(ValueError):
    """No strategy fits the memory budget (the message names the smallest feasible one)."""


def parse_bytes(budget) -> int:
    """``4096``, ``"512MiB"``, ``"1.5GiB"``, ``"200MB"``, ``"2G"`` -> bytes (KiB/MiB/GiB are 1024^n).

    A budget below 1 byte (``0.5``, ``"0.4B"``), NaN or infinity raises ValueError; a bool or
    another type raises TypeError."""
    if isinstance(budget, bool):
        raise TypeError("budget: expected a byte count or a string such as '512MiB', got a bool")
    if isinstance(budget, (int, float)):
        if not math.isfinite(budget) or budget < 1:
            raise ValueError(f"budget must be a finite number of bytes, at least 1, got {budget!r}")
        return int(budget)  # a fraction of a byte is dropped: 1.5 -> 1
    if not isinstance(budget, str):
        raise TypeError(f"budget: expected a byte count or a string such as '512MiB', got {type(budget).__name__}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot parse memory budget {budget!r}; accepted forms: a number of bytes "
                         "(4096) or a number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, "
                         "GiB, TiB (powers of 1024), e.g. '512MiB', '1.5GiB'")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"memory budget must be at least 1 byte, got {budget!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass(frozen=True)
class StepCosts:
    """Bytes of one state as held (S) and as stored (S_enc), per-step saved bytes G, output Y,
    and the bytes C a recomputed graph segment holds besides its steps."""

    state_bytes: int
    stored_state_bytes: int
    saved_per_step: float
    output_bytes: int
    segment_bytes: int = 0
    input_step_bytes: int = 0  # one step of x in the cell's dtype (what a streamed input holds per step read)


@dataclass(frozen=True)
class Estimate:
    strategy: Strategy
    fast_bytes: int
    slow_bytes: int
    steps: int  # cell-step evaluations, forward and recomputation
    T: int
    input_bytes: int = 0  # of fast_bytes: the streamed input's segments held at once (0: x is the caller's tensor)

    @property
    def recompute_factor(self) -> float:
        return self.steps / self.T


def measure(cell, shape, reduce="sum", dtype=None, device=None) -> StepCosts:
    """Measure the per-step costs of ``cell`` at batch size ``shape[1]`` with two tiny traced runs.

    The runs leave no trace on the cell or the process: its module buffers (batch norm's running
    statistics) are restored and the random number generators forked."""
    buffers = [(b, b.detach().clone()) for b in cell.buffers()] if hasattr(cell, "buffers") else []
    dev = device or next((t.device for t in cell.parameters()), torch.device("cpu")) \
        if hasattr(cell, "parameters") else torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            return _measure(cell, shape, reduce, dtype, device)
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


def _measure(cell, shape, reduce, dtype, device) -> StepCosts:
    from .scan import scan

    T, B, *features = shape
    p = next(cell.parameters(), None) if hasattr(cell, "parameters") else None
    dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
    device = device or (p.device if p is not None else torch.device("cpu"))
    state = cell.initial_state(B, device=device, dtype=dtype)
    binary = binary_states_of(cell, len(state))
    S = sum(s.numel() * s.element_size() for s in state)
    S_enc = sum(-(-s.numel() // 8) if b else s.numel() * s.element_size() for s, b in zip(state, binary))
    peaks, out_bytes = [], 0
    g = torch.Generator(device="cpu").manual_seed(0)
    for L in (2, 6):
        x = torch.rand(L, B, *features, generator=g).to(device=device, dtype=dtype)
        with trace() as t:
            y, st = scan(cell, x, strategy=FullBPTT(), reduce=reduce)
        peaks.append(t.peak_stored_bytes)
        out_bytes = y.numel() * y.element_size() if reduce is not None else y[0].numel() * y.element_size()
        del y, st
    G = max(peaks[1] - peaks[0], 0) / 4
    x_step = math.prod(features) * B * torch.empty((), dtype=dtype).element_size()
    costs = StepCosts(S, S_enc, G, out_bytes, 0, x_step)
    # one checkpointed forward+backward (gradient w.r.t. x only: the parameters' .grad is untouched)
    L = 3
    x = torch.rand(L, B, *features, generator=g).to(device=device, dtype=dtype).requires_grad_()
    with trace() as t:
        y, st = scan(cell, x, strategy=Checkpoint(1), reduce=reduce)
        torch.autograd.grad(y.sum(), [x])
    modelled = estimate(cell, (L, B, *features), Checkpoint(1), reduce, costs).fast_bytes
    return StepCosts(S, S_enc, G, out_bytes, max(t.peak_stored_bytes - modelled, 0), x_step)


def _check_shape(shape) -> None:
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 3):
        raise ValueError(f"sb.plan: shape must be (T, B, *features) (x.shape), got {shape!r}")


def _walk(strategy: Strategy, T: int):
    """(recomputed steps, longest graph segment) by walking the schedule of the strategy's plan."""
    recomputed, longest, forward_done = 0, 0, False
    for a in strategy.plan(T).actions:
        if isinstance(a, Forward):
            if forward_done:
                recomputed += a.n1 - a.n0
            if a.write_adj_deps:
                longest = max(longest, a.n1 - a.n0)
        elif isinstance(a, EndForward):
            forward_done = True
        elif isinstance(a, EndReverse):
            break
    return recomputed, longest


def _counts(strategy: Strategy, T: int, plan: Plan | None = None):
    """(recomputed steps, longest graph segment): closed forms where known, else a schedule walk."""
    if (plan or strategy.plan(T)).keep_graph:
        return 0, T
    if type(strategy) is Checkpoint:
        k = strategy.every
        return (T - 1) // k * k, min(k, T)
    if type(strategy) is DoubleCheckpoint:
        O, inner = strategy.outer, strategy.inner
        last = (T - 1) // O * O
        n_full, len_last = last // O, T - last

        def tail(n):  # length of the last fine segment of a coarse segment of n steps
            return n - (n - 1) // inner * inner

        recomputed = n_full * (2 * O - tail(O)) + len_last - tail(len_last)
        return recomputed, inner if n_full else min(inner, len_last)
    if isinstance(strategy, (Revolve, TwoLevelRevolve)):
        s = strategy.slots if isinstance(strategy, Revolve) else strategy.fast + strategy.slow
        s = min(s, max(T - 1, 1))
        r = binomial_repetitions(T, s)
        return r * T - comb(s + r, s + 1), 1
    return _walk(strategy, T)


def estimate(cell, shape, strategy: Strategy, reduce="sum", costs: StepCosts | None = None, *,
             streamed: bool = False) -> Estimate:
    """Modelled peak fast bytes, slow bytes and cell-step evaluations of one forward+backward.

    ``streamed``: x is read a segment at a time (a spike tensor of another dtype, a `SegmentSource`,
    see `sparsebptt.sources`), so the converted segments it holds count too: a graph segment's
    steps (which autograd keeps for the backward; all T under FullBPTT) plus one no-grad chunk
    (`NO_GRAD_CHUNK` steps) of a recomputation. A tensor x in the cell's dtype is the caller's and
    is not counted."""
    T = shape[0]
    c = costs or measure(cell, shape, reduce)
    p = strategy.plan(T)  # what the executor would run
    recomputed, longest = _counts(strategy, T, p)
    if p.keep_graph:
        fast = T * c.saved_per_step
        slow = 0
    else:
        # outputs kept for the reverse sweep: a fused segment's node holds its whole output block
        fused = getattr(cell, "scan_segment", None) is not None
        held_outputs = 1 if reduce == "last" and not fused else longest
        fast = (p.fast_slots * c.stored_state_bytes + longest * c.saved_per_step
                + held_outputs * c.output_bytes + c.state_bytes + c.segment_bytes)
        slow = p.slow_slots * c.stored_state_bytes
    input_bytes = 0
    if streamed:
        steps_held = T if p.keep_graph else min(T, longest + min(NO_GRAD_CHUNK, T))
        input_bytes = steps_held * c.input_step_bytes
    return Estimate(strategy, int(fast + input_bytes), int(slow), T + recomputed, T, int(input_bytes))


def candidates(T: int, slow_storage: str = "host", disk_dir=None) -> list[Strategy]:
    """The strategies `plan` chooses among for sequence length T."""
    out: list[Strategy] = [FullBPTT()]
    pows = [2 ** i for i in range(0, 21) if 2 ** i < T]
    sq = max(1, round(T ** 0.5))
    for k in sorted(set(pows + [sq])):
        out.append(Checkpoint(k))
    for inner in pows:
        for outer in pows:
            if inner < outer < T and outer // inner >= 4:
                out.append(DoubleCheckpoint(outer, inner, slow_storage, disk_dir))
    for s in sorted(set([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256])):
        if s < T:
            out.append(Revolve(s))
    return out


def plan(cell, shape, budget, *, reduce="sum", slow_storage="host", disk_dir=None,
         return_table=False, streamed: bool = False):
    """The fastest strategy whose peak fast-memory bytes fit ``budget`` (bytes or "512MiB").

    ``shape`` is x's (T, B, *features); ``streamed``: x is read a segment at a time (see
    `estimate`), and the segments it holds count against the budget.

    Raises ValueError naming the smallest feasible budget and its plan when nothing fits.
    With ``return_table`` returns (strategy, [Estimate, ...] sorted by time).
    """
    _check_shape(shape)
    T = int(shape[0])
    if T < 1:
        raise ValueError(f"sb.plan: T must be >= 1, got {T}")
    limit = parse_bytes(budget)
    costs = measure(cell, shape, reduce)
    table = [estimate(cell, shape, s, reduce, costs, streamed=streamed) for s in candidates(T, slow_storage, disk_dir)]
    table.sort(key=lambda e: (e.steps, e.slow_bytes, e.fast_bytes))
    fits = [e for e in table if e.fast_bytes <= limit]
    if not fits:
        smallest = min(table, key=lambda e: (e.fast_bytes, e.steps))
        raise BudgetError(f"sb.plan: no strategy fits a budget of {format_bytes(limit)} for T={T}, "
                         f"B={shape[1]}; the smallest feasible budget is {format_bytes(smallest.fast_bytes)} "
                         f"({smallest.fast_bytes} bytes) with {smallest.strategy.to_string()} "
                         f"({smallest.recompute_factor:.1f}x the forward steps)")
    best = fits[0]
    return (best.strategy, table) if return_table else best.strategy
