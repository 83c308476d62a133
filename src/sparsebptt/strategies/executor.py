"""Runs a strategy's `Plan` over a cell: the whole graph kept, or a checkpointing schedule.

`execute` is the one entry: a plan that keeps the graph (`FullBPTT`) runs through `run_graph`,
plain autograd over the whole sequence; any other plan through `run_schedule`.

A schedule is a sequence of `checkpoint_schedules` actions, run as one autograd node. In the
forward pass (up to ``EndForward``) the executor advances the cell without a graph, copying the
states the schedule asks for into preallocated slot buffers (one allocation per state component:
no per-step heap churn, so the memory saved shows in the resident set too), and builds a graph
only for the steps the schedule marks ``write_adj_deps``. In the backward pass it continues the
schedule: ``Copy``/``Move`` restore a stored state (and the RNG state it was taken with, so
stochastic steps replay identically), ``Forward`` recomputes, ``Reverse`` back-propagates a
recomputed segment with ``torch.autograd.grad``, carrying dL/dstate to the segment before it, and
`SkipReverse` moves the sweep back without back-propagating (its ``carry`` says whether dL/dstate
passes). The executor knows no strategy by name: what it needs travels in the plan and its actions.

Recomputation checks itself, in the spirit of `torch.utils.checkpoint`: each graph segment's
autograd graph is walked down to its leaves (`_check_graph`). A leaf that is not x, the state or a
registered parameter (a closure, a module in a plain list, another module's Parameter) gets its
gradient: it joins the inputs of each segment's ``torch.autograd.grad`` and the sum is accumulated
into its ``.grad`` by a backward into it at the end (as reentrant `torch.utils.checkpoint` does:
``torch.autograd.grad(loss, [that tensor])`` does not see it; register it to get that too). A leaf
of another segment is state carried outside the state tuple: `RecomputationError`. And the state a
recomputation reaches at a step where a checkpoint was stored must match it (`_check_recomputed`:
shape, dtype, device; on the step path and with ``preserve_rng`` also its values, through a
float64 sum and sum of |values| kept per checkpoint: a fused segment kernel may sum in another
order, so there only the metadata), or `RecomputationError` names the cell, the state component
and the step.

A cell whose ``scan_segment`` carries a ``vjp`` (fused feed-forward LIF layers, alone or stacked:
`sparsebptt.cells.lif.LIFSegmentVJP`) runs its graph segments through it instead of autograd:
``vjp.forward`` keeps what ``vjp.backward`` reads, and `_reverse` calls the backward with dL/dys
and dL/dstate (one Python call per segment, no graph, no ``torch.autograd.grad``). Such a cell's
kernels read only its registered parameters, so there is no graph to walk; the recomputed state is
still checked against the stored checkpoint. When that VJP also has ``forward_stops``, the forward
sweep's consecutive no-graph advances (up to `FUSED_FORWARD_ELEMENTS` state elements) run in one pass per layer
(`_forward_fused`), storing the same restart states.

Every loop over time steps here is `sparsebptt.cells.base.run_steps`, and every output over time
is collected by one `Reducer`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from checkpoint_schedules import (Copy, EndForward, EndReverse, Forward, Move, Reverse,
                                  StorageType)

from ..cells.base import run_steps
from ..sources import Input, as_input
from ..storage import binary_states_of, make_store
from ..trace import current_trace, recomputing, saving
from .base import Plan, SkipReverse

__all__ = ["execute", "run_graph", "run_forward", "run_schedule", "Reducer", "NO_GRAD_CHUNK", "FUSED_FORWARD_ELEMENTS",
           "RecomputationError", "RECOMPUTE_RTOL"]


class RecomputationError(RuntimeError):
    """A recomputed segment did not reproduce the forward (module-held state, a step that depends on
    something besides (x_t, state)). The message names the cell, the state component and the step."""


class Reducer:
    """Collects step outputs: the whole sequence (reduce=None) or a running sum / mean / last.

    With ``keep_graph`` (plain autograd, `run_graph`) the outputs keep their graph: reduce=None
    gathers them and stacks them once in `result` (a differentiable copy per step into one buffer
    would cost a full-size gradient per step in backward); otherwise reduce=None copies each output
    into one preallocated [T, B, H] buffer (outputs here carry no graph).
    """

    def __init__(self, reduce, T, keep_graph: bool = False):
        self.reduce, self.T, self.keep_graph = reduce, T, keep_graph
        self.buf = None  # [T, B, H] for reduce=None, else the accumulator
        self.parts = []  # keep_graph and reduce=None: (is_block, output) in time order
        self._mean_grad = None

    def add(self, t: int, y: torch.Tensor) -> None:
        if self.reduce is None:
            if self.keep_graph:
                self.parts.append((False, y))
                return
            if self.buf is None:
                self.buf = torch.empty((self.T,) + tuple(y.shape), dtype=y.dtype, device=y.device)
            self.buf[t].copy_(y)
        elif self.reduce == "last":
            if t == self.T - 1:
                self.buf = y
        else:
            self.buf = y if self.buf is None else self.buf + y

    def add_block(self, t0: int, ys: torch.Tensor) -> None:
        """Outputs of steps t0..t0+len(ys) at once (from a cell's ``scan_segment``)."""
        if self.reduce is None:
            if self.keep_graph:
                self.parts.append((True, ys))
                return
            if self.buf is None:
                self.buf = torch.empty((self.T,) + tuple(ys.shape[1:]), dtype=ys.dtype, device=ys.device)
            self.buf[t0:t0 + ys.shape[0]].copy_(ys)
        elif self.reduce == "last":
            if t0 + ys.shape[0] == self.T:
                self.buf = ys[-1]
        else:
            s = ys.sum(0)
            self.buf = s if self.buf is None else self.buf + s

    def grad_block(self, dout: torch.Tensor | None, t0: int, t1: int, like: torch.Tensor):
        """dL/dys for steps t0..t1 (shaped like ``like``), or None where none reaches them."""
        if dout is None:
            return None
        if self.reduce is None:
            return dout[t0:t1]
        if self.reduce == "last":
            if t1 != self.T:
                return None
            g = torch.zeros_like(like)
            g[-1] = dout
            return g
        return self.grad_at(dout, t0).expand_as(like)

    def result(self) -> torch.Tensor:
        if self.reduce is None and self.keep_graph:
            if len(self.parts) == 1 and self.parts[0][0]:
                return self.parts[0][1]  # one block: the whole sequence as the cell gave it
            if not any(block for block, _ in self.parts):
                return torch.stack([y for _, y in self.parts])
            return torch.cat([y if block else y.unsqueeze(0) for block, y in self.parts])
        if self.reduce == "mean":
            return self.buf / self.T
        return self.buf

    def reaches(self, t: int) -> bool:
        """Whether step t's output enters the scan's output."""
        return self.reduce != "last" or t == self.T - 1

    def reaches_before(self, t: int, dout) -> bool:
        """Whether the output gradient ``dout`` reaches any step before t."""
        return dout is not None and t > 0 and (self.reduce != "last" or self.T - 1 < t)

    def grad_at(self, dout: torch.Tensor | None, t: int):
        """dL/dy_t from the gradient of the scan's output (None where it does not reach y_t)."""
        if dout is None:
            return None
        if self.reduce is None:
            return dout[t]
        if self.reduce == "last":
            return dout if t == self.T - 1 else None
        if self.reduce == "mean":
            if self._mean_grad is None or self._mean_grad[0] is not dout:
                self._mean_grad = (dout, dout / self.T)  # the backward of result()'s division
            return self._mean_grad[1]
        return dout


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@dataclass
class _Segment:
    """Steps n0..n1 run with graph, waiting for their Reverse."""

    n0: int
    n1: int
    state_in: tuple
    x_in: torch.Tensor | None
    ys: "list | torch.Tensor"  # per-step outputs, or one [L, B, H] block from scan_segment
    state_out: tuple
    held_bytes: int = 0
    saved: object = None  # the cell's segment VJP record (no autograd graph), else None


@dataclass
class _Run:
    cell: object
    x: torch.Tensor
    params: list
    reduce: str | None
    plan: Plan
    actions: object  # iter(plan.actions): the forward stops at EndForward, the backward goes on
    preserve_rng: bool
    trace: object = None
    stores: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    segments: dict = field(default_factory=dict)
    reducer: Reducer | None = None
    autocast: tuple = (False, None)
    state0_grad: tuple = ()
    extra: dict = field(default_factory=dict)  # id -> leaf the cell uses without registering it
    digests: dict = field(default_factory=dict)  # step -> `_digest` of the state stored there
    compare_values: bool = True  # whether a recomputed state must equal the stored one in value
    segment_fn: object = None  # the cell's ``scan_segment``, asked once per scan (None: the step path)
    segment_vjp: object = None  # its ``vjp`` (segments with a backward run through it), else None
    param_index: dict | None = None  # id(parameter) -> its index in params (made on first use)


def _needs_grad(s: torch.Tensor) -> bool:
    return s.is_floating_point() or s.is_complex()


#: longest run of steps a cell's ``scan_segment`` gets in a no-grad advance, so that its
#: per-segment buffers stay small however far a schedule advances
NO_GRAD_CHUNK = 256


#: how many state elements (summed over the steps) a run of the forward sweep's no-graph segments
#: fused into one pass (`_forward_fused`) may span: its per-thread [steps, B, H] output buffers
#: (two) stay about this size, so the memory a checkpointed scan saves stays saved (two LIF
#: layers of 256, B = 16: 32 steps, 1 MiB)
FUSED_FORWARD_ELEMENTS = 2 ** 18


def _discard(t: int, y: torch.Tensor) -> None:
    """`run_steps` hook of a no-grad advance whose outputs go nowhere (none is held)."""
    return None


def run_graph(cell, x, state0, reduce):
    """Plain autograd over the whole sequence: every step's graph is kept (`FullBPTT`, the
    reference). A cell with ``scan_segment`` runs it over all T steps at once; any other cell step
    by step. Returns (out, state_T); nothing is stored or recomputed, so ``retain_graph`` and double
    backward work as on a hand-written loop. A streamed or converted input (`Input.streamed`) is
    read `NO_GRAD_CHUNK` steps at a time."""
    x = _as_input(x)
    T = x.shape[0]
    trace = current_trace()
    if trace is not None:
        trace.forward_steps += T
    out = Reducer(reduce, T, keep_graph=True)
    segment_fn = getattr(cell, "scan_segment", None)
    with saving(trace):
        if not x.streamed:
            x = x.tensor
            if segment_fn is not None:
                ys, state = segment_fn(x, state0)
                out.add_block(0, ys)
            else:
                _, state = run_steps(cell.step, x, state0, on_output=out.add)
            return out.result(), tuple(state)
        state = state0
        for c0 in range(0, T, NO_GRAD_CHUNK):
            c1 = min(c0 + NO_GRAD_CHUNK, T)
            x_c = x.read(c0, c1)
            if segment_fn is not None:
                ys, state = segment_fn(x_c, state)
                out.add_block(c0, ys)
            else:
                _, state = run_steps(cell.step, x_c, state, on_output=out.add, t0=c0)
        return out.result(), tuple(state)


def _advance_without_graph(cell, x, n0: int, n1: int, state, reducer: "Reducer | None", segment_fn):
    """Steps n0..n1 from ``state`` without a graph; their outputs go to ``reducer`` (None: nowhere).
    ``segment_fn``: the cell's ``scan_segment`` as the scan resolved it (None: step by step); it
    gets at most `NO_GRAD_CHUNK` steps at a time. Returns the new state."""
    vjp = getattr(segment_fn, "vjp", None)  # its forward alone: the same kernels, fewer layers of calls
    with torch.no_grad():
        if segment_fn is not None:
            for c0 in range(n0, n1, NO_GRAD_CHUNK):
                c1 = min(c0 + NO_GRAD_CHUNK, n1)
                if vjp is not None:
                    ys, state, _ = vjp.forward(x.read(c0, c1), state, keep=False)
                else:
                    ys, state = segment_fn(x.read(c0, c1), state)
                if reducer is not None:
                    reducer.add_block(c0, ys)
            return state
        if not x.streamed:
            _, state = run_steps(cell.step, x.tensor[n0:n1], state, t0=n0,
                                 on_output=reducer.add if reducer is not None else _discard)
            return state
        for c0 in range(n0, n1, NO_GRAD_CHUNK):  # a streamed input: one chunk read at a time
            c1 = min(c0 + NO_GRAD_CHUNK, n1)
            _, state = run_steps(cell.step, x.read(c0, c1), state, t0=c0,
                                 on_output=reducer.add if reducer is not None else _discard)
    return state


def run_forward(cell, x, state0, reduce):
    """The scan's forward alone, for grad mode off (``torch.no_grad()``, ``torch.inference_mode()``):
    no graph, no checkpoint stored, whatever the strategy (its schedule only matters to a backward).
    Returns (out, state_T)."""
    x = _as_input(x)
    T = x.shape[0]
    trace = current_trace()
    if trace is not None:
        trace.forward_steps += T
    out = Reducer(reduce, T)
    state = _advance_without_graph(cell, x, 0, T, state0, out, getattr(cell, "scan_segment", None))
    return out.result(), tuple(state)


def _advance(run: _Run, n0: int, n1: int, state, graph: bool, emit: bool):
    """Run steps n0..n1 from ``state``. With ``graph`` returns a `_Segment`, else the new state.

    A cell with ``scan_segment(x_seg, state) -> (ys, state)`` (a fused path over many steps) runs
    through it; any other cell step by step."""
    x, cell, segment_fn = run.x, run.cell, run.segment_fn
    if not graph:
        return _advance_without_graph(cell, x, n0, n1, state, run.reducer if emit else None, segment_fn)
    if run.segment_vjp is not None:
        return _advance_vjp(run, n0, n1, state, emit)
    state_in = tuple(s.detach().requires_grad_(_needs_grad(s) and (n0 > 0 or g))
                     for s, g in zip(state, run.state0_grad))
    x_in = x.read(n0, n1).detach().requires_grad_(x.requires_grad)
    for i, s in enumerate(state_in):  # what `_check_graph` recognises in a later segment's graph
        s._sparsebptt_leaf = f"state component {i} at step {n0}"
    x_in._sparsebptt_leaf = f"x at steps {n0}..{n1}"
    state = state_in
    with torch.enable_grad(), saving(run.trace):
        if segment_fn is not None:
            ys, state = segment_fn(x_in, state)
            if emit:
                run.reducer.add_block(n0, ys.detach())
        else:
            def keep(t, y):  # the output's graph is kept where it enters the scan's output
                if emit:
                    run.reducer.add(t, y.detach())
                return y if run.reducer.reaches(t) else None

            ys, state = run_steps(cell.step, x_in, state, on_output=keep, t0=n0)
    seg = _Segment(n0, n1, state_in, x_in, ys, tuple(state))
    _check_graph(run, seg)
    if run.trace is not None:
        held = [ys] if isinstance(ys, torch.Tensor) else list(ys)
        seg.held_bytes = sum(t.numel() * t.element_size() for t in held + list(state) if t is not None)
        run.trace.add_stored(seg.held_bytes)
    return seg


_ACCUMULATE_GRAD = []  # the type of autograd's leaf nodes, found on first use


def _accumulate_grad_type():
    if not _ACCUMULATE_GRAD:
        with torch.enable_grad():
            leaf = torch.zeros(1, requires_grad=True)
            _ACCUMULATE_GRAD.append(type((leaf * 1).grad_fn.next_functions[0][0]))
    return _ACCUMULATE_GRAD[0]


def _records(saved):
    """The records with ``tensors()`` in a segment VJP's ``saved`` (a Stack's: a list per layer,
    nested for a Stack inside a Stack; None for a layer that kept nothing)."""
    if isinstance(saved, list):
        for rec in saved:
            yield from _records(rec)
    elif saved is not None:
        yield saved


def _advance_vjp(run: _Run, n0: int, n1: int, state, emit: bool) -> _Segment:
    """Steps n0..n1 through the cell's segment VJP: its forward keeps what its backward reads, no
    autograd graph (see `_reverse`)."""
    with torch.no_grad():
        ys, state_out, saved = run.segment_vjp.forward(run.x.read(n0, n1), tuple(state))
    if emit:
        run.reducer.add_block(n0, ys)
    seg = _Segment(n0, n1, tuple(state), None, ys, tuple(state_out), saved=saved)
    if run.trace is not None:  # as the saved-tensor hooks count an autograd graph's: each storage once,
        held = [ys, *state_out]  # not the caller's x nor the parameters
        for rec in _records(saved):
            held += rec.tensors()
        seen = {t.untyped_storage().data_ptr() for t in [run.x.tensor, *run.params] if t is not None}
        for t in held:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                seg.held_bytes += st.nbytes()
        run.trace.add_stored(seg.held_bytes)
    return seg


def _graph_leaves(roots):
    """The leaves (tensors with an ``AccumulateGrad`` node) the autograd graph of ``roots`` reaches.
    (Told apart by the node's type, not by looking up ``variable`` on every node: half the time
    on a step path's graph, where most nodes are not leaves.)"""
    leaf_type = _accumulate_grad_type()
    seen, leaves = set(), {}
    stack = [r.grad_fn for r in roots if r is not None and r.grad_fn is not None]
    push = stack.append
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if type(fn) is leaf_type:
            var = fn.variable
            leaves[id(var)] = var
            continue
        for f, _ in fn.next_functions:
            if f is not None and f not in seen:
                push(f)
    return leaves.values()


def _check_graph(run: _Run, seg: _Segment) -> None:
    """Walk a segment's graph down to its leaves (as `torch.utils.checkpoint` does): a leaf that is
    neither this segment's x and state nor a registered parameter is a tensor the cell uses without
    registering it (a closure, a plain list, another module's Parameter): it joins ``run.extra`` and
    gets its gradient. A leaf of another segment means the cell carries a tensor from step to step
    outside its state tuple (module-held state), which no recomputation can restore: an error."""
    own = {id(t) for t in seg.state_in} | {id(seg.x_in)} | {id(p) for p in run.params}
    roots = [seg.ys] if isinstance(seg.ys, torch.Tensor) else list(seg.ys)
    for leaf in _graph_leaves(roots + list(seg.state_out)):
        if id(leaf) in own:
            continue
        where = getattr(leaf, "_sparsebptt_leaf", None)
        if where is not None:
            raise RecomputationError(
                f"sb.scan of {type(run.cell).__name__}: steps {seg.n0}..{seg.n1} reach {where} through a tensor "
                "that is not in the state tuple: the cell keeps state in the module (e.g. self.v = ...) or "
                "caches a tensor from step to step. A memory strategy restores only the state tuple and "
                "recomputes from it; keep every tensor a step carries to the next in the tuple that "
                "step(x_t, state) takes and returns (or use sb.FullBPTT())")
        run.extra.setdefault(id(leaf), leaf)


def _digest(state, values: bool):
    """Shape, dtype, device of each state component and (``values``) its sum and sum of |values|
    in float64, as two Python floats: what a recomputation reaching the same step must reproduce."""
    if not values:  # the metadata alone (no tensor op, no grad-mode switch)
        return [(tuple(s.shape), s.dtype, s.device, None) for s in state]
    out = []
    with torch.no_grad():
        for s in state:
            d = None
            if values and not s.is_complex():
                f = s.to(torch.float64)
                d = (f.sum().item(), f.abs().sum().item())
            out.append((tuple(s.shape), s.dtype, s.device, d))
    return out


#: relative difference (to the sum of |values|) from which a recomputed state differs from the stored
#: one: the step path repeats the same operations bit for bit on a CPU; this leaves room for
#: nondeterministic GPU kernels (atomics) and catches a module-held state, which differs at O(1)
RECOMPUTE_RTOL = 1e-3


def _check_recomputed(run: _Run, n: int, state) -> None:
    """The state a recomputation reached at step n against the `_digest` stored there."""
    stored = run.digests.get(n)
    if stored is None:
        return
    name = type(run.cell).__name__
    fix = ("keep every tensor a step carries to the next in the state tuple that step(x_t, state) takes and "
           "returns (module attributes are not restored), draw random numbers from torch's generators "
           "(replayed with preserve_rng=True), and make step depend on nothing else that changes")
    if len(state) != len(stored):
        raise RecomputationError(f"sb.scan of {name}: recomputing up to step {n} gave a state of {len(state)} "
                                 f"components, the forward {len(stored)}; {fix}")
    now = _digest(state, values=any(d is not None for *_, d in stored))
    for i, ((shape, dtype, dev, d), (shape2, dtype2, dev2, d2)) in enumerate(zip(stored, now)):
        if (shape, dtype, dev) != (shape2, dtype2, dev2):
            raise RecomputationError(
                f"sb.scan of {name}: state component {i} at step {n} was {dtype} {shape} on {dev} in the forward "
                f"but recomputing gave {dtype2} {shape2} on {dev2}; {fix}")
        if d is None or d2 is None:
            continue
        if all(math.isfinite(v) for v in d + d2):
            same = max(abs(d2[0] - d[0]), abs(d2[1] - d[1])) <= RECOMPUTE_RTOL * d[1]
        else:  # infinities and NaNs in the state: the same ones
            same = all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(d, d2))
        if not same:
            raise RecomputationError(
                f"sb.scan of {name}: state component {i} at step {n} differs between the forward and its "
                f"recomputation (sum {d[0]:.6g} vs {d2[0]:.6g}, sum of |values| {d[1]:.6g} vs "
                f"{d2[1]:.6g}): the step is not a function of (x_t, state) alone; {fix}")


class _Buffers:
    """The cell's module buffers (batch norm's running statistics and ``num_batches_tracked``) as
    the forward left them, put back after each recomputation: a recomputed step must not update
    them a second time, so that they end as under `FullBPTT`. (Batch norm in training mode
    normalises with the batch's statistics, so its recomputed outputs do not depend on them.)"""

    def __init__(self, cell):
        bufs = list(cell.buffers()) if hasattr(cell, "buffers") else []
        self.saved = [(b, b.detach().clone()) for b in bufs]

    def restore(self) -> None:
        # through ``.data``: batch norm's autograd node holds the running statistics it was given,
        # and a restore must not count as an in-place change of what a graph saved
        with torch.no_grad():
            for b, v in self.saved:
                if not torch.equal(b, v):
                    b.data.copy_(v)


def _store_ics(run: _Run, a: Forward, state, recompute: bool) -> None:
    """A Forward action's bookkeeping before it advances: the restart state it stores (with its
    digest and RNG state) and the trace's step counts."""
    if a.write_ics:
        if a.storage == StorageType.WORK:
            raise NotImplementedError("schedules that store a restart state in WORK are not supported")
        run.stores[a.storage].save(a.n0, state)
        if a.n0 > 0 and a.n0 not in run.digests:
            run.digests[a.n0] = _digest(state, run.compare_values)
        if run.preserve_rng:
            run.rng[a.n0] = _rng_state(run.x.device)
    trace = run.trace
    if trace is not None:
        if recompute:
            trace.recomputed_steps += a.n1 - a.n0
        else:
            trace.forward_steps += a.n1 - a.n0


def _fusable(run: _Run, a) -> bool:
    """Whether the forward sweep's action ``a`` may join a `_forward_fused` run: an advance without
    graph, of a cell whose segment VJP runs several segments in one pass (``forward_stops``)."""
    return (isinstance(a, Forward) and not a.write_adj_deps and run.segment_vjp is not None
            and hasattr(run.segment_vjp, "forward_stops"))


def _forward_fused(run: _Run, actions: list, work):
    """Consecutive no-graph Forward actions of the forward sweep (each maybe storing the state it
    starts from) in one pass of the cell's ``segment_vjp.forward_stops``: every layer runs all of
    them at once (one input product, one call per segment for the recurrence), and the states at
    the segments' ends are what segment-by-segment advances reach (the same kernels), so each
    restart state is stored as `_forward_action` would store it. Such a cell draws no random
    numbers, so the RNG state stored with each is the same."""
    if len(actions) == 1:
        return _forward_action(run, actions[0], work, recompute=False)
    n, state = work
    a0, a1 = actions[0], actions[-1]
    if n != a0.n0:
        raise RuntimeError(f"schedule advances from step {a0.n0} but the working state is at step {n}")
    with torch.no_grad():
        # the outputs are consumed at once (summed or copied) unless reduce="last" keeps a view
        ys, states = run.segment_vjp.forward_stops(run.x.read(a0.n0, a1.n1), tuple(state),
                                                   [a.n1 - a0.n0 for a in actions],
                                                   transient=run.reducer.reduce != "last")
    run.reducer.add_block(a0.n0, ys)
    for a, s in zip(actions, [tuple(state)] + states[:-1]):
        _store_ics(run, a, s, recompute=False)
    return (a1.n1, tuple(states[-1]))


def _forward_action(run: _Run, a: Forward, work, recompute: bool):
    n, state = work
    if n != a.n0:
        raise RuntimeError(f"schedule advances from step {a.n0} but the working state is at step {n}")
    _store_ics(run, a, state, recompute)
    if a.write_adj_deps:
        seg = _advance(run, a.n0, a.n1, state, graph=True, emit=not recompute)
        run.segments[a.n0] = seg
        work = (a.n1, tuple(s.detach() for s in seg.state_out))
    else:
        work = (a.n1, _advance(run, a.n0, a.n1, state, graph=False, emit=not recompute))
    if recompute:
        _check_recomputed(run, a.n1, work[1])
    return work


def _reverse_vjp(run: _Run, seg: _Segment, dout, dstate, grads):
    """`_reverse` of a segment run through the cell's segment VJP: its backward with dL/dys and
    dL/dstate_n1, the parameters' gradients added as `_reverse` adds autograd's."""
    g = run.reducer.grad_block(dout, seg.n0, seg.n1, seg.ys)
    need_state = tuple(_needs_grad(s) and (seg.n0 > 0 or g0) for s, g0 in zip(seg.state_in, run.state0_grad))
    need_x = grads["x"] is not None
    new_dstate = [None] * len(seg.state_in)
    if g is not None or any(d is not None for d in dstate):
        owned = grads.setdefault("owned", set())  # sums made here (or fresh from the VJP): added into in place
        acc = {id(p): grads["params"][i] for i, p in enumerate(run.params) if i in owned}
        with torch.no_grad():  # (a backward with create_graph=True runs in grad mode: no graph here either)
            dx, new_dstate, pgrads = run.segment_vjp.backward(seg.saved, g, list(dstate), need_x, need_state, acc)
        new_dstate = [d if need else None for d, need in zip(new_dstate, need_state)]
        if need_x and dx is not None:
            grads["x"][seg.n0:seg.n1] = dx
        index = run.param_index
        if index is None:
            index = run.param_index = {id(p): i for i, p in enumerate(run.params)}
        lost = [k for k in pgrads if k not in index]
        if lost:  # pragma: no cover - a VJP only returns the cell's registered parameters
            raise RuntimeError(f"sb.scan of {type(run.cell).__name__}: the segment VJP gave gradients of "
                               f"{len(lost)} tensor(s) that are not among the scan's parameters")
        _add_param_grads(grads, [(index[k], g) for k, g in pgrads.items()], fresh=True)
    seg.saved = None
    if run.trace is not None:
        run.trace.add_stored(-seg.held_bytes)
    return new_dstate


def _add_param_grads(grads, pairs, fresh: bool = False) -> None:
    """Add (index, gradient) pairs into ``grads["params"]``: the first kept as given (not written
    to, unless ``fresh``: a segment VJP's own new tensor), then a sum made here, added to in place."""
    owned = grads.setdefault("owned", set())
    for i, g in pairs:
        if g is None:
            continue
        acc = grads["params"][i]
        if acc is None:
            grads["params"][i] = g
            if fresh:
                owned.add(i)
        elif i in owned:
            acc.add_(g)
        else:
            grads["params"][i] = acc + g
            owned.add(i)


def _reverse(run: _Run, seg: _Segment, dout, dstate, grads):
    if seg.saved is not None:
        return _reverse_vjp(run, seg, dout, dstate, grads)
    outs, gouts = [], []
    if isinstance(seg.ys, torch.Tensor):  # a block of outputs from scan_segment
        g = run.reducer.grad_block(dout, seg.n0, seg.n1, seg.ys)
        if g is not None and seg.ys.requires_grad:
            outs.append(seg.ys)
            gouts.append(g)
    else:
        for t, y in zip(range(seg.n0, seg.n1), seg.ys):
            g = run.reducer.grad_at(dout, t)
            if y is not None and g is not None and y.requires_grad:
                outs.append(y)
                gouts.append(g)
    for s, g in zip(seg.state_out, dstate):
        if g is not None and s.requires_grad:
            outs.append(s)
            gouts.append(g)
    inputs = [s for s in seg.state_in if s.requires_grad]
    if seg.x_in.requires_grad:
        inputs.append(seg.x_in)
    n_state_in = sum(1 for s in seg.state_in if s.requires_grad)
    param_idx = [i for i, p in enumerate(run.params) if p.requires_grad]
    inputs += [run.params[i] for i in param_idx]
    extra = list(run.extra.items())
    inputs += [t for _, t in extra]
    new_dstate = [None] * len(seg.state_in)
    if outs and inputs:
        got = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
        k = 0
        for i, s in enumerate(seg.state_in):
            if s.requires_grad:
                new_dstate[i] = got[k]
                k += 1
        assert k == n_state_in
        if seg.x_in.requires_grad:
            if got[k] is not None:
                grads["x"][seg.n0:seg.n1] = got[k]
            k += 1
        _add_param_grads(grads, list(zip(param_idx, got[k:k + len(param_idx)])))
        for (key, _), g in zip(extra, got[k + len(param_idx):]):
            if g is not None:
                grads["extra"][key] = g if key not in grads["extra"] else grads["extra"][key] + g
    if run.trace is not None:
        run.trace.add_stored(-seg.held_bytes)
    return new_dstate


def _close(run: _Run) -> None:
    for store in run.stores.values():
        store.close()
    run.stores.clear()
    if run.trace is not None:
        for seg in run.segments.values():
            run.trace.add_stored(-seg.held_bytes)
    run.segments.clear()


def _autocast(run: _Run):
    enabled, dtype = run.autocast
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(run.x.device.type, dtype=dtype)


class _ScheduledScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, x_node, *flat):
        n_state = len(flat) - len(run.params)
        state0 = tuple(flat[:n_state])
        x = run.x
        dev = x.device.type
        run.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        T = x.shape[0]
        plan = run.plan
        binary = binary_states_of(run.cell, n_state)
        try:
            run.stores[StorageType.RAM] = make_store("device", state0, plan.fast_slots, binary, run.trace)
            if plan.slow_slots:
                run.stores[StorageType.DISK] = make_store(plan.slow_storage, state0, plan.slow_slots, binary,
                                                          run.trace, plan.disk_dir)
            for store in run.stores.values():
                store.owner = f"sb.scan of {type(run.cell).__name__}"
            work = (0, state0)
            pending = []  # consecutive no-graph advances, run together by `_forward_fused`
            per_step = max(1, sum(s.numel() for s in state0))
            fuse_steps = min(NO_GRAD_CHUNK, max(1, FUSED_FORWARD_ELEMENTS // per_step))
            for a in run.actions:
                if _fusable(run, a):
                    if pending and (pending[-1].n1 != a.n0 or a.n1 - pending[0].n0 > fuse_steps):
                        work = _forward_fused(run, pending, work)
                        pending = []
                    pending.append(a)
                    continue
                if pending:
                    work = _forward_fused(run, pending, work)
                    pending = []
                if isinstance(a, Forward):
                    work = _forward_action(run, a, work, recompute=False)
                elif isinstance(a, EndForward):
                    break
                else:
                    raise RuntimeError(f"unexpected action {a!r} in the forward part of the schedule")
            if pending:  # (a schedule ends its forward with EndForward; this is for one that does not)
                work = _forward_fused(run, pending, work)
        except BaseException:
            _close(run)
            raise
        if work[0] != T:
            raise RuntimeError(f"schedule ended its forward at step {work[0]}, expected {T}")
        ctx.run = run
        ctx.n_state = n_state
        out = run.reducer.result()
        inputs = set(id(t) for t in flat)
        state_T = tuple(s.clone() if id(s) in inputs else s for s in work[1])
        return (out,) + state_T

    @staticmethod
    def backward(ctx, dout, *dstate):
        run: _Run = getattr(ctx, "run", None)
        if run is None:
            raise RuntimeError("sb.scan: backward through a checkpointed scan ran twice; the "
                               "recomputed graph is freed after the first backward (retain_graph "
                               "is not supported with memory strategies)")
        ctx.run = None
        x = run.x
        grads = {"x": torch.zeros_like(x.tensor) if ctx.needs_input_grad[1] else None,
                 "params": [None] * len(run.params), "extra": {}}
        dstate = list(dstate)
        pos = x.shape[0]
        work = None
        devices = [x.device] if x.device.type == "cuda" else []
        rng_ctx = torch.random.fork_rng(devices=devices, enabled=run.preserve_rng)
        buffers = _Buffers(run.cell)  # recomputation leaves the modules' buffers as the forward left them
        try:
            with rng_ctx, recomputing(run.trace), _autocast(run):
                for a in run.actions:
                    if isinstance(a, Reverse):
                        seg = run.segments.pop(a.n0, None)
                        if seg is None or seg.n1 != a.n1 or a.n1 != pos:
                            raise RuntimeError(f"schedule reverses steps {a.n0}..{a.n1} at step {pos} "
                                               "without their recomputed graph (a bug in the strategy)")
                        dstate = _reverse(run, seg, dout, dstate, grads)
                        del seg  # free this graph before the next one is built
                        pos = a.n0
                        if not run.reducer.reaches_before(pos, dout) and all(g is None for g in dstate):
                            pos = 0  # no gradient reaches steps before pos: the rest is zero
                            break
                    elif isinstance(a, (Copy, Move)):
                        if a.to_storage != StorageType.WORK:
                            raise NotImplementedError(f"action {a!r}: only restores to WORK are supported")
                        store = run.stores.get(a.from_storage)
                        if store is None:
                            raise RuntimeError(f"action {a!r} restores from a storage the strategy did not declare")
                        work = (a.n, store.load(a.n, release=isinstance(a, Move)))
                        if run.preserve_rng:
                            rng = run.rng.pop(a.n) if isinstance(a, Move) else run.rng[a.n]
                            _set_rng_state(rng, x.device)
                    elif isinstance(a, Forward):
                        work = _forward_action(run, a, work, recompute=True)
                        buffers.restore()
                    elif isinstance(a, SkipReverse):  # steps n0..n1 get no backward
                        if a.n1 != pos:
                            raise RuntimeError(f"schedule skips steps {a.n0}..{a.n1} at step {pos}")
                        if a.carry == "drop":
                            dstate = [None] * len(dstate)
                        pos = a.n0
                        if not run.reducer.reaches_before(pos, dout) and all(g is None for g in dstate):
                            pos = 0  # no gradient reaches steps before pos: the rest is zero
                            break
                    elif isinstance(a, EndReverse):
                        break
                    else:
                        raise RuntimeError(f"unexpected action {a!r} in the reverse part of the schedule")
        finally:
            buffers.restore()
            _close(run)
        if pos != 0:
            raise RuntimeError(f"schedule ended its reverse sweep at step {pos}, expected 0")
        if grads["extra"]:  # unregistered leaves: accumulated as a backward into them would
            keys = list(grads["extra"])
            torch.autograd.backward([run.extra[k] for k in keys], [grads["extra"][k] for k in keys])
        dstate0 = [g if need else None for g, need in zip(dstate, ctx.needs_input_grad[2:2 + ctx.n_state])]
        dparams = [g if need else None
                   for g, need in zip(grads["params"], ctx.needs_input_grad[2 + ctx.n_state:])]
        return (None, grads["x"], *dstate0, *dparams)


def run_schedule(cell, x, state0, plan: Plan, reduce, params, preserve_rng=True):
    """Run ``cell`` over ``x`` under the schedule of ``plan`` as one autograd node; returns
    (out, state_T)."""
    x = _as_input(x)
    T = x.shape[0]
    if plan.T != T:
        raise RuntimeError(f"a plan for T={plan.T} steps cannot run a scan of T={T} steps")
    # the segment path is resolved once: every segment, recomputations included, runs what the
    # forward ran (a backend changed between the forward and the backward does not apply to it)
    segment_fn = getattr(cell, "scan_segment", None)
    run = _Run(cell=cell, x=x, params=list(params), reduce=reduce, plan=plan, actions=iter(plan.actions),
               preserve_rng=preserve_rng, trace=current_trace(), reducer=Reducer(reduce, T),
               state0_grad=tuple(s.requires_grad for s in state0),
               compare_values=preserve_rng and segment_fn is None, segment_fn=segment_fn,
               segment_vjp=getattr(segment_fn, "vjp", None))
    # the autograd input for dL/dx: the caller's tensor, or a placeholder for a streamed input
    x_node = x.tensor if x.tensor is not None else torch.empty(0, device=x.device)
    outs = _ScheduledScan.apply(run, x_node, *state0, *run.params)
    return outs[0], tuple(outs[1:])


def _as_input(x) -> Input:
    return as_input(x, x.dtype) if isinstance(x, torch.Tensor) else x


def execute(cell, x, state0, plan: Plan, reduce, params, preserve_rng=True):
    """Run ``cell`` over ``x`` from ``state0`` as ``plan`` says (`Strategy.plan`); returns
    (out, state_T). ``x`` is a tensor or an `Input` (`sparsebptt.sources`: segments read, and
    converted, on demand). ``params``: the tensors the scan's gradient reaches besides x and state0.
    With grad mode off (``torch.no_grad()``, ``torch.inference_mode()``) every plan runs
    `run_forward`: there is no backward to plan for."""
    if not torch.is_grad_enabled():
        return run_forward(cell, x, state0, reduce)
    if plan.keep_graph:
        return run_graph(cell, x, state0, reduce)
    return run_schedule(cell, x, state0, plan, reduce, params, preserve_rng)
