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

Backends (``backend=``, as every cell with kernels, see `FusedCell`; None, the default, follows
`sparsebptt.set_backend` / ``$SPARSEBPTT_BACKEND``):

- ``"cpu"``: the event-sparse path of `sparsebptt.kernels.egru.cpu`: ``W_hh y`` reads only the
  columns of units with an event, and its backward computes ``dL/dy`` only at events and within
  ``epsilon`` of the threshold, and the weight gradient only over the events (C kernels, or one
  dense GEMM once `sparsebptt.kernels.egru.cpu.DOTS_BELOW` (dL/dy) or `DW_SPARSE_BELOW` (weight
  gradient) of the entries are needed). A whole
  segment runs in its `fused_recurrent_egru` (the cell's ``scan_segment``, used by every
  strategy): one GEMM for the input projection and one transposed copy of ``W_hh``. Its
  forward and its backward's sparse products run on ``torch.get_num_threads()`` threads where
  the kernels were built with OpenMP (the same result at any thread count). Needs the C kernels
  (`require_backend("cpu")`); formerly called "sparse" (still accepted, with a
  DeprecationWarning).
- ``"torch"``: the reference, `egru_step` with dense matmuls and plain autograd, the same
  pseudo-derivative; the "cpu" path equals it up to rounding.
- ``"triton"``: segments through `sparsebptt.kernels.egru.triton`: cuBLAS GEMMs (dense) and one
  Triton kernel per step for the pointwise part, forward and backward (CUDA tensors; CPU tensors
  only under ``TRITON_INTERPRET=1``).
- ``"auto"``: "cpu" for CPU weights, "triton" for CUDA weights (`resolve_backend`: resolved once
  per device type, logged), queryable as ``cell.active_backend``.

An explicit backend that cannot run here raises `BackendUnavailable`. The reference loop over
`egru_step` is `sparsebptt.kernels.egru.naive.naive_egru`.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .base import FusedCell, init_uniform_, linear, run_steps
from .surrogate import heaviside
from ..kernels.backend import BACKENDS
from ..kernels.egru.cpu import fused_recurrent_egru
from ..kernels.sparse import ACTIVE_SETS, renamed_backend
from ..trace import current_trace

__all__ = ["EGRU", "pseudo_derivative", "event", "egru_step", "activity_regularizer", "event_statistics"]


# ---- events and their pseudo-derivative ------------------------------------------------------

def pseudo_derivative(v: torch.Tensor, gamma: float, epsilon: float) -> torch.Tensor:
    """``psi(v) = gamma * max(0, 1 - |v| / epsilon)``: replaces ``dH/dv`` in the backward."""
    return gamma * torch.clamp(1.0 - v.abs() / epsilon, min=0.0)


def event(v: torch.Tensor, gamma: float = 0.7, epsilon: float = 0.5) -> torch.Tensor:
    """``H(v) = 1[v > 0]`` in the forward, `pseudo_derivative` in the backward."""
    return heaviside(v, partial(pseudo_derivative, gamma=gamma, epsilon=epsilon))


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


def _record(layer, fired):
    t = current_trace()
    if t is not None:
        t.add_activity(layer, fired.sum(), fired.numel())


def egru_step(x_t, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7,
              epsilon=0.5, backend="cpu", active_set="auto", layer=None):
    """One EGRU step: x_t [B, I], state (c, y) or (c, y, n) -> (y', state').

    ``backend="torch"`` is the reference (dense matmuls, plain autograd); ``"cpu"`` (the default)
    runs `sparsebptt.kernels.egru.cpu.fused_recurrent_egru` over this one step: it reads only the
    columns of units with an event (the first step of a segment: see that module).
    """
    backend = renamed_backend("egru_step", backend)
    if backend == "cpu":
        _, new = fused_recurrent_egru(x_t.unsqueeze(0), tuple(state), weight_ih, weight_hh, bias_ih, bias_hh,
                                      threshold, gamma=gamma, epsilon=epsilon, active_set=active_set,
                                      layer=layer)
        return new[1], new  # the output is the state's y
    if backend != "torch":
        raise ValueError(f"egru_step: backend must be 'cpu' or 'torch', got {backend!r} (the Triton "
                         "kernels run whole segments: sparsebptt.kernels.egru.triton.fused_recurrent_egru)")
    c, y = state[0], state[1]
    gi = linear(x_t, weight_ih, bias_ih)  # [B, 3H]
    gh = linear(y, weight_hh, bias_hh)  # [B, 3H]
    y, c, e, v = _pointwise(gi, gh, c, threshold, gamma, epsilon)
    _record(layer, v > 0)
    new = (c, y) if len(state) == 2 else (c, y, state[2] + e)
    return y, new


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


class EGRU(FusedCell):
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
        backend: "cpu" (skip silent units forward and backward), "torch" (reference), "triton"
            (GPU kernels), "auto" ("cpu" for CPU weights, "triton" for CUDA weights; see
            `active_backend`) or None (the process default, `sparsebptt.set_backend`). One that
            cannot run here raises `BackendUnavailable`. "sparse" is the former name of "cpu".
        active_set: how a batch shares the active columns in `sparse_linear`: "auto", "union",
            "sample".
    """

    kernels = ("cpu", "triton")
    segment_takes_route = True  # a mostly-zero input (tokens, events, a lower EGRU's y): sparse products

    def __init__(self, input_size: int, hidden_size: int, *, threshold_init="beta", gamma: float = 0.7,
                 epsilon: float = 0.5, bias: bool = True, count_events: bool = False,
                 backend: str | None = None, active_set: str = "auto"):
        super().__init__(input_size, hidden_size)
        if not (_is_number(gamma) and 0.0 <= gamma < math.inf):
            raise ValueError(f"EGRU: gamma (pseudo-derivative dampening) must be a number >= 0, got {gamma!r}")
        if not (_is_number(epsilon) and 0.0 < epsilon < math.inf):
            raise ValueError(f"EGRU: epsilon (pseudo-derivative width) must be a number > 0, got {epsilon!r}")
        backend = renamed_backend("EGRU", backend)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"EGRU: unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
        if active_set not in ACTIVE_SETS:
            raise ValueError(f"EGRU: unknown active_set {active_set!r}; valid values are: {', '.join(ACTIVE_SETS)}")
        if not isinstance(count_events, bool):
            raise TypeError(f"EGRU: count_events must be a bool, got {count_events!r}")
        self._set_backend(backend)
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
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

    def step(self, x_t, state):
        backend = self.active_backend
        if backend == "triton":  # a segment of one step
            ys, state = self._scan_segment(x_t.unsqueeze(0), state)
            return ys[0], state
        return egru_step(x_t, tuple(state), *self._params(), gamma=self.gamma, epsilon=self.epsilon,
                         backend=backend, active_set=self.active_set, layer=self)

    def _scan_segment(self, x_seg, state, route=None):
        """A segment in the active fused backend: `sparsebptt.kernels.egru.cpu.fused_recurrent_egru`
        ("cpu", with the scan's `sparsebptt.kernels.sparse_input.cpu.SparseRoute` as ``route``) or
        its Triton version (`sparsebptt.kernels.egru.triton`)."""
        if self.active_backend == "triton":
            from ..kernels.egru.triton import fused_recurrent_egru as triton_segment
            return triton_segment(x_seg, tuple(state), *self._params(), gamma=self.gamma,
                                  epsilon=self.epsilon, layer=self)
        return fused_recurrent_egru(x_seg, tuple(state), *self._params(), gamma=self.gamma,
                                    epsilon=self.epsilon, active_set=self.active_set, layer=self, route=route)

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

    def step(x_t, state):
        out, new, i = x_t, [], 0
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
        return None, tuple(new)

    run_steps(step, x, state)
    return {names[key]: {"activity": a[0] / a[3], "backward_activity": a[1] / a[3],
                         "union_activity": a[2] / a[3]} for key, a in acc.items()}
