"""EGRU, the event-based GRU (Subramoney et al., ICLR 2023; EvNN), with a sparse backward.

A GRU whose units talk to each other only through events. Per step, with the previous *event
output* ``y`` (zero for units without an event) feeding the gates::

    r  = sigma(W_ir x + b_ir + W_hr y + b_hr)
    u  = sigma(W_iz x + b_iz + W_hz y + b_hz)          # update gate (the GRU's z)
    n  = tanh(W_in x + b_in + r * (W_hn y + b_hn))
    c~ = n + u * (c - n)                               # internal state, as the GRU's h
    e  = H(c~ - threshold)                             # event; trainable per-unit threshold
    y' = c~ * e                                        # event output
    c' = c~ - threshold * e                            # reset by subtraction

In the backward ``dH/dv`` is the pseudo-derivative ``psi(v) = gamma * max(0, 1 - |v| / epsilon)``
(EvNN's defaults: dampening ``gamma = 0.7``, width ``epsilon = 0.5``). State: ``(c, y)``, or
``(c, y, n)`` with ``count_events=True``, where ``n`` counts each unit's events (with the
pseudo-derivative as gradient) for `activity_regularizer`. Parameters: ``weight_ih`` [3H, I],
``weight_hh`` [3H, H], ``bias_ih``, ``bias_hh`` exactly as `GRU` (gates r, z, n), plus
``threshold`` [H].

Sparse backward (``backend="sparse"``, the default). ``y`` is zero for units without an event,
so ``W_hh y`` runs through `sparse_linear` with the events as mask: it reads only the columns of
units that had an event. Its backward (`_RecurrentGrad`) is sparse in the same way:

- the weight gradient ``dW_hh[:, j] += sum_b g[b] y[b, j]`` is accumulated over the events
  only, in place along the segment (no dense [3H, H] gradient per step);
- the input gradient ``dL/dy = W_hh^T g`` is needed only where ``dy/dc~ = e + c~ psi(c~ -
  threshold)`` is non-zero: at events and within ``epsilon`` of the threshold. Every unit
  farther away is skipped (the pseudo-derivative is zero there).

Both run in the C kernels of `sparsebptt.kernels.egru.cpu` (``nnz * 3H`` MACs; torch gathers
when no C compiler works, see `sparse_kernels`), or as one dense GEMM once `DENSE_ABOVE` of the
entries are needed (faster then on a CPU). The MACs done go to `sb.trace`. The pointwise part of
a step is one autograd node with a hand-written backward (`_FusedPointwise`).

Where ``y`` enters a scan or a recomputed segment from outside (``state0`` or a checkpoint),
nothing tells which of its units were near the threshold, so the first step of a segment takes
``dL/dy`` at every unit (when ``y`` needs a gradient). The result is the exact gradient of the
reference (``backend="torch"``: dense matmuls, plain autograd, the same pseudo-derivative), up to
rounding (and denormals below 1.2e-38, flushed to zero in the kernels). (`sparse_linear`'s own
backward is not used: it gives the input gradient only on its forward mask, and without a
delta-memory chain a dense weight gradient per step.)

A whole segment runs in `fused_recurrent_egru` (the cell's ``scan_segment``, used by every
strategy): one GEMM for the input projection of all its steps and one transposed copy of
``W_hh`` for all its sparse products.

On the GPU, ``backend="triton"`` runs segments through `sparsebptt.kernels.egru.triton`: cuBLAS
GEMMs (dense) and one Triton kernel per step for the pointwise part, forward and backward.
``backend="auto"`` is "triton" for CUDA weights when Triton is available, else "sparse";
resolved once per device type, logged, and queryable as ``cell.active_backend``.
"""
from __future__ import annotations

import logging
import math
from functools import partial

import torch
from torch import nn

from .base import Cell, init_uniform_, linear
from .sparse import ACTIVE_SETS, UNION_OVERLAP, sparse_linear, transposed_weight
from .surrogate import heaviside
from ..kernels.backend import require_backend, resolve_sparse_auto
from ..trace import current_trace

log = logging.getLogger("sparsebptt.kernels")

__all__ = ["EGRU", "BACKENDS", "resolve_egru_backend", "sparse_kernels", "pseudo_derivative", "event", "egru_step",
           "fused_recurrent_egru", "naive_egru", "activity_regularizer", "event_statistics"]

BACKENDS = ("sparse", "torch", "triton", "auto")


def resolve_egru_backend(name: str, device_type: str) -> str:
    """The concrete EGRU backend ("sparse", "torch" or "triton") that ``name`` runs as on
    ``device_type``. "auto" is "triton" on CUDA when Triton is available, else "sparse"; it is
    resolved once per device type and logged. "triton" raises `BackendUnavailable` when it
    cannot run."""
    if name == "triton":
        require_backend("triton")
    if name != "auto":
        return name
    return resolve_sparse_auto("EGRU", device_type)


# ---- events and their pseudo-derivative ------------------------------------------------------

def pseudo_derivative(v: torch.Tensor, gamma: float, epsilon: float) -> torch.Tensor:
    """``psi(v) = gamma * max(0, 1 - |v| / epsilon)``: replaces ``dH/dv`` in the backward."""
    return gamma * torch.clamp(1.0 - v.abs() / epsilon, min=0.0)


def event(v: torch.Tensor, gamma: float = 0.7, epsilon: float = 0.5) -> torch.Tensor:
    """``H(v) = 1[v > 0]`` in the forward, `pseudo_derivative` in the backward."""
    return heaviside(v, partial(pseudo_derivative, gamma=gamma, epsilon=epsilon))


# ---- the sparse products of the backward --------------------------------------------------------

#: below this share of active entries (of B x H) the backward's products run sparse, above it as
#: one dense GEMM (masked afterwards): measured at H = 512, B = 8, one thread, random masks, the
#: C kernels cost 0.86x the dense GEMM at 30 % (input gradient) and 1.2x at 50 %; the weight
#: gradient 0.9x at 30 %, 1.5x at 50 %.
DENSE_ABOVE = 0.4

_kernel_state: dict = {}


def sparse_kernels() -> str:
    """Which implementation EGRU's sparse backward uses, resolved once and logged: "c" (the C
    kernels of `sparsebptt.kernels.egru.cpu`, AVX2 + FMA where available) or "torch" (gathered
    GEMMs and ``embedding_bag``'s gather-dot, when no C compiler works)."""
    if "name" not in _kernel_state:
        from ..kernels.cbuild import CBuildError
        from ..kernels.egru.cpu import load_library

        try:
            simd = load_library().egru_simd()
            _kernel_state["name"] = "c"
            log.info("EGRU sparse backward: C kernels (%s)", "AVX2+FMA" if simd else "plain C")
        except CBuildError as e:
            _kernel_state["name"] = "torch"
            log.warning("EGRU sparse backward: torch gather paths, the C kernels are unavailable: %s", e)
    return _kernel_state["name"]


def _use_kernels(*tensors) -> bool:
    return (all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
            and sparse_kernels() == "c")


def _masked_input_grad(g: torch.Tensor, weight: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor):
    """``dy[b, j] = g[b] . W[:, j]`` where ``mask[b, j]``, else 0; returns (dy, MACs done).

    A dense GEMM ``g @ W`` (masked) when at least `DENSE_ABOVE` of the entries are wanted; else
    the C kernel over the wanted entries (``nnz * 3H`` MACs, no gathered copy); without it the
    torch paths of `sparse_linear` (the batch's union of columns when the samples share them,
    else per sample).
    """
    B, n = mask.shape
    out = wt.shape[1]
    nnz = int(mask.sum())
    if nnz >= DENSE_ABOVE * B * n:  # g @ W (row-major W): 3x faster here than g @ wt.T
        return (g @ weight).masked_fill_(~mask, 0.0), B * n * out
    if nnz == 0:
        return g.new_zeros(B, n), 0
    if _use_kernels(g, wt):
        from ..kernels.egru.cpu import masked_rows_dot

        return masked_rows_dot(g.contiguous(), wt, mask), nnz * out
    union = mask.any(0)
    k = int(union.sum())
    dy = g.new_zeros(B, n)
    if B > 1 and B * k <= UNION_OVERLAP * nnz:
        idx = union.nonzero().squeeze(1)  # [k]
        part = (g @ wt.index_select(0, idx).t()).masked_fill_(~mask.index_select(1, idx), 0.0)  # [B, k]
        dy.index_copy_(1, idx, part)
        return dy, B * k * out
    nz = mask.nonzero()  # [nnz, 2], sorted by sample
    r, c = nz[:, 0], nz[:, 1]
    offsets = torch.searchsorted(r, torch.arange(B, device=g.device))
    dy[r, c] = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, wt, c, offsets, r, 0, -1)
    return dy, nnz * out


def _add_rows(buf, idx, rows):
    """``buf[idx] += rows`` for distinct ``idx``. ``index_add_`` with one intra-op thread; with
    more, ``index_copy_`` of the sum: on a shared 2-core machine with 2 threads ``index_add_``
    took 65 ms for a [3, 21] add (its scatter_add_ wakes every thread), ``index_copy_`` 5 us."""
    if not idx.numel():
        return buf
    if torch.get_num_threads() == 1:
        return buf.index_add_(0, idx, rows)
    return buf.index_copy_(0, idx, buf.index_select(0, idx) + rows)


class _Chain:
    """The weight gradient of the recurrent products of one segment, kept as dW.T [H, 3H], to
    which each step adds only the rows of units with an event, and handed to the weight once, by
    the segment's first step (its backward runs last: every later step depends on it). Tied to
    the autograd graph task, so a partial backward never leaks into another."""

    __slots__ = ("buf", "task")

    def __init__(self):
        self.buf = None
        self.task = None

    def accumulate(self, y, g, fired) -> int:
        """``buf += y.T @ g`` over the entries with an event; returns the MACs done.

        One dense in-place GEMM over every unit (silent ones add exact zeros) once `DENSE_ABOVE`
        of the entries have an event; else the C kernel over the events (``nnz * 3H`` MACs), or
        without it a GEMM over the batch's union of units and an ``index_add_`` of its rows.
        """
        task = torch._C._current_graph_task_id()
        if self.buf is None or self.task != task:
            self.buf = g.new_zeros(y.shape[1], g.shape[1])
            self.task = task
        B, H = y.shape
        nnz = int(fired.sum())
        if nnz == 0:
            return 0
        if nnz >= DENSE_ABOVE * B * H:
            self.buf.addmm_(y.t(), g)  # [H, 3H]
            return B * H * g.shape[1]
        if _use_kernels(y, g):
            from ..kernels.egru.cpu import masked_rows_axpy_

            masked_rows_axpy_(self.buf, y.contiguous(), g.contiguous(), fired)
            return nnz * g.shape[1]
        idx = fired.any(0).nonzero().squeeze(1)  # [k]
        _add_rows(self.buf, idx, y.index_select(1, idx).t() @ g)  # [k, 3H]
        return B * idx.numel() * g.shape[1]

    def take(self):
        buf, self.buf, self.task = self.buf, None, None
        return buf


class _RecurrentGrad(torch.autograd.Function):
    """``gh + bias`` in the forward (``gh = W_hh y``, computed over the events by `sparse_linear`
    without a graph); the backward of the product, sparse:

    - ``dL/dy[b, j] = g[b] . W_hh[:, j]`` only where ``grad_mask`` (events, and silent units
      within epsilon of the threshold; every entry for a ``y`` from outside the segment);
    - ``dW_hh[:, j] += sum_b g[b] * y[b, j]`` only over the events, accumulated along the
      segment's ``chain`` (no dense [3H, H] gradient per step).
    """

    @staticmethod
    def forward(ctx, gh, y, weight, bias, fired, grad_mask, wt, chain, root):
        ctx.save_for_backward(y, fired, grad_mask, weight)
        ctx.wt, ctx.chain, ctx.root = wt, chain, root
        ctx.has_bias = bias is not None
        return gh + bias if bias is not None else gh.clone()

    @staticmethod
    def backward(ctx, g):
        y, fired, grad_mask, weight = ctx.saved_tensors
        wt = ctx.wt
        need_y, need_w, need_b = ctx.needs_input_grad[1:4]
        t = current_trace()
        dy = dw = None
        if need_y:
            dy, macs = _masked_input_grad(g, weight, wt, grad_mask)
            if t is not None:
                t.add_backward_macs(macs)
        if need_w:
            chain = _Chain() if ctx.chain is None else ctx.chain
            macs = chain.accumulate(y, g, fired)
            if t is not None:
                t.add_backward_macs(macs)
            dw = chain.take().t() if ctx.root or ctx.chain is None else None
        dbias = g.sum(0) if ctx.has_bias and need_b else None
        return g, dy, dw, dbias, None, None, None, None, None


def _recurrent(y, weight_hh, bias_hh, fired, grad_mask, wt, active_set, chain=None, root=True):
    """``W_hh y + b_hh``: the forward reads the columns in ``fired`` (`sparse_linear`); with
    autograd, `_RecurrentGrad` gives ``dL/dy`` on ``grad_mask`` and dW_hh over ``fired``."""
    with torch.no_grad():
        gh = sparse_linear(y.detach(), weight_hh.detach(), fired, active_set=active_set, weight_t=wt)
    if torch.is_grad_enabled() and (y.requires_grad or weight_hh.requires_grad
                                    or (bias_hh is not None and bias_hh.requires_grad)):
        if grad_mask is None:
            grad_mask = fired
        return _RecurrentGrad.apply(gh, y, weight_hh, bias_hh, fired, grad_mask, wt, chain, root)
    return gh if bias_hh is None else gh + bias_hh


def _entry_masks(y):
    """Masks for a ``y`` from outside a segment: the forward reads its non-zero entries; its
    gradient is wanted at every entry (nothing tells which were near the threshold)."""
    fired = y != 0
    grad_mask = torch.ones_like(fired) if (torch.is_grad_enabled() and y.requires_grad) else None
    return fired, grad_mask


# ---- one step ------------------------------------------------------------------------------

def _pointwise(gi, gh, c, threshold, gamma, epsilon):
    """Gates, internal state, event, output and reset from the two projections [B, 3H]."""
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    u = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    c = n + u * (c - n)  # c~ [B, H]
    v = c - threshold
    e = event(v, gamma, epsilon)
    y = c * e
    c = c - threshold * e
    return y, c, e, v.detach()


class _FusedPointwise(torch.autograd.Function):
    """`_pointwise` as one autograd node with a hand-written backward (the sparse path's: a step
    has ~15 elementwise nodes otherwise, whose overhead rivals the sparse products). Outputs
    ``(y', c', e, v)``; ``v = c~ - threshold`` carries no gradient. Checked against autograd
    through `_pointwise` by the reference backend's tests.

    Backward, from ``dy'``, ``dc'`` and ``de`` (the event counts)::

        dv  = (dy' c~ - dc' threshold + de) psi(v)
        dc~ = dy' e + dc' + dv;   dthreshold = -sum_b (dc' e + dv)
        dc  = dc~ u;   du = dc~ (c - n);   dn = dc~ (1 - u)
        da_n = dn (1 - n^2);   da_u = du u (1 - u);   da_r = da_n (W_hn y + b_hn) r (1 - r)
        dgi = [da_r, da_u, da_n];   dgh = [da_r, da_u, da_n r]
    """

    @staticmethod
    def forward(ctx, gi, gh, c, threshold, gamma, epsilon):
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        u = torch.sigmoid(i_z + h_z)
        n = torch.tanh(torch.addcmul(i_n, r, h_n))
        ct = torch.addcmul(n, u, c - n)  # c~ [B, H]
        v = ct - threshold
        e = (v > 0).to(ct.dtype)
        y = ct * e
        c_new = torch.addcmul(ct, e, threshold, value=-1.0)
        ctx.save_for_backward(r, u, n, c, h_n, v, e, threshold)
        ctx.gamma, ctx.epsilon = gamma, epsilon
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(v)
        return y, c_new, e, v

    @staticmethod
    def backward(ctx, dy, dc_new, de, _dv):
        r, u, n, c, h_n, v, e, threshold = ctx.saved_tensors
        ct = v + threshold
        de_total = dy * ct if dy is not None else torch.zeros_like(v)
        if dc_new is not None:
            de_total = torch.addcmul(de_total, dc_new, threshold, value=-1.0)
        if de is not None:
            de_total = de_total + de
        dv = de_total * pseudo_derivative(v, ctx.gamma, ctx.epsilon)
        dct = dv if dy is None else torch.addcmul(dv, dy, e)
        if dc_new is not None:
            dct = dct + dc_new
        dthr = dv if dc_new is None else torch.addcmul(dv, dc_new, e)
        dthr = -dthr.sum(0)
        dc = dct * u
        dn = dct - dc  # dc~ (1 - u)
        du = dct * (c - n)
        da_n = dn * (1.0 - n * n)
        da_u = du * u * (1.0 - u)
        da_r = da_n * h_n * r * (1.0 - r)
        dgi = torch.cat([da_r, da_u, da_n], 1)
        dgh = torch.cat([da_r, da_u, da_n * r], 1)
        return dgi, dgh, dc, dthr, None, None


def _record(layer, fired):
    t = current_trace()
    if t is not None:
        t.add_activity(layer, fired.sum(), fired.numel())


def egru_step(x_t, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7,
              epsilon=0.5, backend="sparse", active_set="auto", layer=None):
    """One EGRU step: x_t [B, I], state (c, y) or (c, y, n) -> (y', state').

    ``backend="torch"`` is the reference (dense matmuls, plain autograd); ``"sparse"`` reads only
    the columns of units with an event (the first step of a segment: see the module docstring).
    """
    if backend not in ("sparse", "torch"):
        raise ValueError(f"egru_step: backend must be 'sparse' or 'torch', got {backend!r} (the Triton "
                         "kernels run whole segments: sparsebptt.kernels.egru.triton.fused_recurrent_egru)")
    c, y = state[0], state[1]
    gi = linear(x_t, weight_ih, bias_ih)  # [B, 3H]
    if backend == "sparse":
        fired, grad_mask = _entry_masks(y)
        gh = _recurrent(y, weight_hh, bias_hh, fired, grad_mask, transposed_weight(weight_hh), active_set)
        y, c, e, v = _FusedPointwise.apply(gi, gh, c, threshold, gamma, epsilon)
    else:
        gh = linear(y, weight_hh, bias_hh)  # [B, 3H]
        y, c, e, v = _pointwise(gi, gh, c, threshold, gamma, epsilon)
    _record(layer, v > 0)
    new = (c, y) if len(state) == 2 else (c, y, state[2] + e)
    return y, new


def fused_recurrent_egru(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7,
                         epsilon=0.5, active_set="auto", layer=None):
    """A segment of EGRU steps with the sparse backward: x [L, B, I] -> (ys [L, B, H], state').

    Equal to stepping `egru_step` (either backend) up to rounding. Inside the segment each step
    reads the previous step's events (forward, weight gradient) and takes ``dL/dy`` at the
    events and at silent units within ``epsilon`` of the threshold only.
    """
    c, y = state[0], state[1]
    count = state[2] if len(state) > 2 else None
    gis = linear(x, weight_ih, bias_ih).unbind(0)  # L x [B, 3H], one GEMM (one backward node)
    wt = transposed_weight(weight_hh)  # [H, 3H], once per segment
    chain = _Chain()
    fired, grad_mask = _entry_masks(y)
    ys = []
    for t, gi in enumerate(gis):
        gh = _recurrent(y, weight_hh, bias_hh, fired, grad_mask, wt, active_set, chain, root=t == 0)
        y, c, e, v = _FusedPointwise.apply(gi, gh, c, threshold, gamma, epsilon)
        fired = v > 0
        _record(layer, fired)
        grad_mask = fired | (v.abs() < epsilon)  # dy/dc~ = e + c~ psi(v) is zero elsewhere
        if count is not None:
            count = count + e
        ys.append(y)
    new = (c, y) if count is None else (c, y, count)
    return torch.stack(ys), new


def naive_egru(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7, epsilon=0.5):
    """The reference: a plain loop of `egru_step` with ``backend="torch"``; x [T, B, I]."""
    ys = []
    for t in range(x.shape[0]):
        y, state = egru_step(x[t], state, weight_ih, weight_hh, bias_ih, bias_hh, threshold,
                             gamma=gamma, epsilon=epsilon, backend="torch")
        ys.append(y)
    return torch.stack(ys), state


# ---- the module ----------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _initial_threshold(spec, hidden_size: int) -> torch.Tensor:
    """[H] thresholds from ``threshold_init``: a number, a tensor of H values, or "beta[:MEAN]"."""
    if isinstance(spec, torch.Tensor):
        if spec.shape != (hidden_size,) or not spec.is_floating_point() or not bool(torch.isfinite(spec).all()):
            raise ValueError(f"EGRU: threshold_init as a tensor must hold {hidden_size} finite floats "
                             f"(one per unit), got {spec.dtype} {tuple(spec.shape)}")
        return spec.detach().clone().float()
    if _is_number(spec):
        if not math.isfinite(spec):
            raise ValueError(f"EGRU: threshold_init must be finite, got {spec!r}")
        return torch.full((hidden_size,), float(spec))
    if isinstance(spec, str) and (spec == "beta" or spec.startswith("beta:")):
        try:
            mean = float(spec[5:]) if spec != "beta" else 0.3
        except ValueError:
            mean = float("nan")
        if not 0.0 < mean < 1.0:
            raise ValueError(f"EGRU: threshold_init 'beta:MEAN' needs 0 < MEAN < 1, got {spec!r}")
        b = 3.0  # EvNN: thresholds ~ Beta(a, 3) with mean a / (a + 3)
        dist = torch.distributions.Beta(torch.tensor(b * mean / (1.0 - mean)), torch.tensor(b))
        return dist.sample((hidden_size,))
    raise ValueError(f"EGRU: threshold_init must be a number (every unit), a tensor of hidden_size "
                     f"values, 'beta' or 'beta:MEAN' (EvNN's Beta(a, 3) draw, mean 0.3 by default), "
                     f"got {spec!r}")


class EGRU(Cell):
    """Event-based GRU layer (see the module docstring). Output: the event output ``y``.

    Args:
        input_size, hidden_size: features in and units.
        threshold_init: initial thresholds: a number (every unit), a tensor [hidden_size], or
            "beta" / "beta:MEAN" (EvNN: drawn from Beta(a, 3) with mean MEAN, default 0.3, using
            the global torch RNG). The threshold is a trainable parameter ``threshold`` [H].
        gamma: dampening of the pseudo-derivative (>= 0; EvNN 0.7).
        epsilon: half-width of the pseudo-derivative's support (> 0; EvNN's jax code 0.5).
        bias: add ``bias_ih`` and ``bias_hh`` (as `GRU`).
        count_events: add a third state tensor ``n`` [B, H] counting each unit's events, with
            the pseudo-derivative as gradient, for `activity_regularizer`.
        backend: "sparse" (skip silent units forward and backward, the default), "torch"
            (reference), "triton" (GPU kernels; raises `BackendUnavailable` where Triton cannot
            run) or "auto" ("triton" for CUDA weights when available, else "sparse"; see
            `active_backend`).
        active_set: how a batch shares the active columns in `sparse_linear`: "auto", "union",
            "sample".
    """

    def __init__(self, input_size: int, hidden_size: int, *, threshold_init="beta", gamma: float = 0.7,
                 epsilon: float = 0.5, bias: bool = True, count_events: bool = False,
                 backend: str = "sparse", active_set: str = "auto"):
        super().__init__(input_size, hidden_size)
        if not (_is_number(gamma) and 0.0 <= gamma < math.inf):
            raise ValueError(f"EGRU: gamma (pseudo-derivative dampening) must be a number >= 0, got {gamma!r}")
        if not (_is_number(epsilon) and 0.0 < epsilon < math.inf):
            raise ValueError(f"EGRU: epsilon (pseudo-derivative width) must be a number > 0, got {epsilon!r}")
        if backend not in BACKENDS:
            raise ValueError(f"EGRU: unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
        if backend == "triton":
            require_backend("triton")
        if active_set not in ACTIVE_SETS:
            raise ValueError(f"EGRU: unknown active_set {active_set!r}; valid values are: {', '.join(ACTIVE_SETS)}")
        if not isinstance(count_events, bool):
            raise TypeError(f"EGRU: count_events must be a bool, got {count_events!r}")
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
        self.backend = backend
        self.active_set = active_set
        self.count_events = count_events
        self.num_states = 3 if count_events else 2
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(3 * H)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * H)) if bias else None
        init_uniform_(self, H)
        self.threshold = nn.Parameter(_initial_threshold(threshold_init, H))

    def _params(self):
        return (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.threshold)

    @property
    def active_backend(self) -> str:
        """The backend the next step or scan runs ("sparse", "torch" or "triton"), for the
        weights' device ("auto" resolved, see `resolve_egru_backend`)."""
        return resolve_egru_backend(self.backend, self.weight_hh.device.type)

    def step(self, x_t, state):
        backend = self.active_backend
        if backend == "triton":  # a segment of one step
            ys, state = self._scan_segment(x_t.unsqueeze(0), state)
            return ys[0], state
        return egru_step(x_t, tuple(state), *self._params(), gamma=self.gamma, epsilon=self.epsilon,
                         backend=backend, active_set=self.active_set, layer=self)

    @property
    def scan_segment(self):
        """The fused segment scan: `fused_recurrent_egru` for the sparse backend, its Triton
        version (`sparsebptt.kernels.egru.triton`) for "triton"; None for the reference."""
        return None if self.active_backend == "torch" else self._scan_segment

    def _scan_segment(self, x_seg, state):
        if self.active_backend == "triton":
            from ..kernels.egru.triton import fused_recurrent_egru as triton_segment
            return triton_segment(x_seg, tuple(state), *self._params(), gamma=self.gamma,
                                  epsilon=self.epsilon, layer=self)
        return fused_recurrent_egru(x_seg, tuple(state), *self._params(), gamma=self.gamma,
                                    epsilon=self.epsilon, active_set=self.active_set, layer=self)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, gamma={self.gamma}, epsilon={self.epsilon}, "
                f"count_events={self.count_events}, backend={self.backend!r}, active_set={self.active_set!r}")


# ---- activity: regulariser and statistics ----------------------------------------------------

def _egru_layers(cell):
    """(index in the state tuple of each EGRU layer's first tensor, layer) for a cell or Stack."""
    layers = list(getattr(cell, "layers", [cell]))
    out, i = [], 0
    for layer in layers:
        if isinstance(layer, EGRU):
            out.append((i, layer))
        i += len(layer.initial_state(1))
    return out


def activity_regularizer(cell, state, steps: int, target: float = 0.05) -> torch.Tensor:
    """Mean over units (and batch) of ``max(0, rate - target)``, summed over EGRU layers.

    ``rate = n / steps`` is each unit's event rate over the scan, from the event counts ``n`` in
    the final ``state`` of ``sb.scan(cell, ...)`` (EGRU layers built with ``count_events=True``;
    start the scan from counts of zero). Its gradient reaches the thresholds and the internal
    states through the pseudo-derivative, so adding ``strength * activity_regularizer(...)`` to
    the loss lowers the event rate of units above ``target``.
    """
    if not (_is_number(target) and 0.0 <= target <= 1.0):
        raise ValueError(f"activity_regularizer: target is an event rate per step in [0, 1], got {target!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"activity_regularizer: steps must be a positive int (the scan's T), got {steps!r}")
    found = [(i, layer) for i, layer in _egru_layers(cell) if layer.count_events]
    if not found:
        raise ValueError("activity_regularizer: no EGRU layer with count_events=True in "
                         f"{type(cell).__name__}; build the EGRU layers with count_events=True")
    return sum(torch.relu(state[i + 2] / steps - target).mean() for i, _ in found)


@torch.no_grad()
def event_statistics(cell, x: torch.Tensor, state0=None) -> dict:
    """Per EGRU layer of ``cell`` (one cell or a Stack), over a no-grad run on ``x`` [T, B, I]:

    - ``activity``: fraction of (step, sample, unit) with an event (what the forward reads);
    - ``backward_activity``: fraction with an event or within ``epsilon`` of the threshold
      (where ``dL/dy`` is computed in the backward: ``dy/dc`` is zero elsewhere);
    - ``union_activity``: per step, the fraction of units with an event in any sample of the
      batch (the columns a batched weight gradient reads), averaged over steps.
    """
    layers = list(getattr(cell, "layers", [cell]))
    state = tuple(cell.initial_state(x.shape[1], device=x.device, dtype=x.dtype)) if state0 is None else tuple(state0)
    acc = {id(layer): [0.0, 0.0, 0.0, 0] for layer in layers if isinstance(layer, EGRU)}
    names = {id(layer): f"{i}:EGRU" if len(layers) > 1 else "EGRU" for i, layer in enumerate(layers)}
    arity = [len(layer.initial_state(1)) for layer in layers]
    for t in range(x.shape[0]):
        out, new, i = x[t], [], 0
        for layer, k in zip(layers, arity):
            s = state[i:i + k]
            if isinstance(layer, EGRU):
                c, y = s[0], s[1]
                gi = torch.nn.functional.linear(out, layer.weight_ih, layer.bias_ih)
                gh = torch.nn.functional.linear(y, layer.weight_hh, layer.bias_hh)
                y, c, e, v = _pointwise(gi, gh, c, layer.threshold, layer.gamma, layer.epsilon)
                fired = v > 0
                a = acc[id(layer)]
                a[0] += float(fired.float().mean())
                a[1] += float((fired | (v.abs() < layer.epsilon)).float().mean())
                a[2] += float(fired.any(0).float().mean())
                a[3] += 1
                s = (c, y) if k == 2 else (c, y, s[2] + e)
                out = y
            else:
                out, s = layer.step(out, s)
            new.extend(s)
            i += k
        state = tuple(new)
    return {names[key]: {"activity": a[0] / a[3], "backward_activity": a[1] / a[3],
                         "union_activity": a[2] / a[3]} for key, a in acc.items()}
