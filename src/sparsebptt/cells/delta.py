"""Delta GRU and Delta LSTM: only changes above a threshold are propagated (Neil et al. 2017;
Gao et al. 2018), with the symmetric temporally sparse backward of Chen et al. (2023).

Each unit keeps the last value it transmitted (``x_ref``, ``h_ref``). Per step::

    dx = x_t - x_ref;   sx = |dx| > theta_x   (every entry when theta_x == 0)
    dh = h - h_ref;     sh = |dh| > theta_h   (every entry when theta_h == 0)
    x_ref' = where(sx, x_t, x_ref);   h_ref' = where(sh, h, h_ref)
    m_x' = m_x + W_ih (dx * sx)       # delta memories: m_x = W_ih x_ref, m_h = W_hh h_ref
    m_h' = m_h + W_hh (dh * sh)

then the dense cell's gates read the memories instead of the matmuls::

    GRU:   r = s(mx_r + b_ir + mh_r + b_hr);  z = s(mx_z + b_iz + mh_z + b_hz)
           n = tanh(mx_n + b_in + r * (mh_n + b_hn));  h' = (1 - z) * n + z * h
    LSTM:  i, f, g, o = s, s, tanh, s of (m_x' + b_ih + m_h' + b_hh);  c' = f c + i g;  h' = o tanh(c')

State: GRU ``(h, x_ref, h_ref, m_x, m_h)``, LSTM ``(h, c, x_ref, h_ref, m_x, m_h)``; zeros
are a consistent initial state (any ``h``, ``c`` may be given with zero references and memories).
With both thresholds 0 every delta is transmitted and the outputs equal the dense `GRU` /
`LSTM` with the same weights (same parameter names: ``load_state_dict`` works across).

Backends (``backend=``, as every cell with kernels, see `FusedCell`; None, the default, follows
`sparsebptt.set_backend` / ``$SPARSEBPTT_BACKEND``):

- ``"cpu"``: forward and backward touch only the active columns, the exact gradient of the
  thresholded forward. Scans run whole segments in C (`sparsebptt.kernels.delta.cpu.
  fused_recurrent_delta`, the cell's ``scan_segment``: one autograd node per segment, an axpy /
  dot per active entry over rows of ``W^T``, the weight gradient accumulated along the
  segment); ``step`` (and tensors the C kernels do not take: other dtypes or devices, logged
  once) runs the memory updates through `sparse_linear`, which honours ``active_set``.
  Formerly called "sparse" (still accepted, with a DeprecationWarning).
- ``"torch"``: the reference: plain autograd through dense matmuls on the masked deltas.
- ``"triton"``: whole segments in `sparsebptt.kernels.delta.triton` (the cell's ``scan_segment``,
  used by every strategy; ``step`` runs it for one step): Triton kernels for the delta encoding
  and the gates, forward and backward, equal to the reference up to rounding. Needs CUDA tensors
  (CPU tensors only under ``TRITON_INTERPRET=1``).
- ``"auto"``: "cpu" for CPU weights, "triton" for CUDA weights (`resolve_backend`: resolved once
  per device type, logged on the ``sparsebptt.kernels`` logger), queryable as ``active_backend``.

An explicit backend that cannot run here raises `BackendUnavailable`.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FusedCell, init_uniform_, linear, log_once, run_steps
from ..kernels.backend import BACKENDS
from ..kernels.delta.cpu import delta_update, fused_recurrent_delta, fused_takes
from ..kernels.sparse import ACTIVE_SETS, renamed_backend
from ..trace import current_trace

__all__ = ["DeltaGRU", "DeltaLSTM", "delta_encode", "delta_gru_step", "delta_lstm_step"]


def delta_encode(v: torch.Tensor, ref: torch.Tensor, threshold: float):
    """``(delta, mask, ref')``: the change of ``v`` since ``ref``, where it passes ``threshold``."""
    d = v - ref
    mask = d.abs() > threshold if threshold > 0 else torch.ones_like(d, dtype=torch.bool)
    return d, mask, torch.where(mask, v, ref)


def _update(m, d, mask, weight, backend, active_set):
    """``m + W (d * mask)``: the delta memory update."""
    if backend == "cpu":
        return delta_update(m, d, mask, weight, active_set)
    return m + linear(d * mask, weight)


def _step_backend(owner, backend):
    backend = renamed_backend(owner, backend)
    if backend not in ("cpu", "torch"):
        raise ValueError(f"{owner}: backend must be 'cpu' or 'torch', got {backend!r} (the Triton kernels "
                         "run whole segments: sparsebptt.kernels.delta.triton)")
    return backend


def _deltas(layer, x_t, h, x_ref, h_ref, m_x, m_h, weight_ih, weight_hh, theta_x, theta_h,
            backend, active_set):
    dx, sx, x_ref = delta_encode(x_t, x_ref, theta_x)
    dh, sh, h_ref = delta_encode(h, h_ref, theta_h)
    t = current_trace()
    if t is not None:
        t.add_activity(layer, sx.sum() + sh.sum(), sx.numel() + sh.numel())
    m_x = _update(m_x, dx, sx, weight_ih, backend, active_set)  # [B, G*H]
    m_h = _update(m_h, dh, sh, weight_hh, backend, active_set)  # [B, G*H]
    return x_ref, h_ref, m_x, m_h


def _bias(m, b):
    return m if b is None else m + b


def delta_gru_step(x_t, state, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, threshold=0.0,
                   hidden_threshold=0.0, backend="cpu", active_set="auto", layer=None):
    """One Delta GRU step: x_t [B, I], state (h, x_ref, h_ref, m_x, m_h) -> (h', state').

    ``backend``: "cpu" (sparse products, the default) or "torch" (the reference)."""
    backend = _step_backend("delta_gru_step", backend)
    h, x_ref, h_ref, m_x, m_h = state
    x_ref, h_ref, m_x, m_h = _deltas(layer, x_t, h, x_ref, h_ref, m_x, m_h, weight_ih, weight_hh,
                                     threshold, hidden_threshold, backend, active_set)
    i_r, i_z, i_n = _bias(m_x, bias_ih).chunk(3, 1)
    h_r, h_z, h_n = _bias(m_h, bias_hh).chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    h = n + z * (h - n)
    return h, (h, x_ref, h_ref, m_x, m_h)


def delta_lstm_step(x_t, state, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, threshold=0.0,
                    hidden_threshold=0.0, backend="cpu", active_set="auto", layer=None):
    """One Delta LSTM step: x_t [B, I], state (h, c, x_ref, h_ref, m_x, m_h) -> (h', state').

    ``backend``: "cpu" (sparse products, the default) or "torch" (the reference)."""
    backend = _step_backend("delta_lstm_step", backend)
    h, c, x_ref, h_ref, m_x, m_h = state
    x_ref, h_ref, m_x, m_h = _deltas(layer, x_t, h, x_ref, h_ref, m_x, m_h, weight_ih, weight_hh,
                                     threshold, hidden_threshold, backend, active_set)
    gates = _bias(m_x, bias_ih) + _bias(m_h, bias_hh)  # [B, 4H]
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, (h, c, x_ref, h_ref, m_x, m_h)


class _DeltaCell(FusedCell):
    gates = 1
    kernels = ("cpu", "triton")
    _step = None

    def __init__(self, input_size: int, hidden_size: int, threshold: float = 0.0,
                 hidden_threshold: float | None = None, *, bias: bool = True, backend: str | None = None,
                 active_set: str = "auto"):
        super().__init__(input_size, hidden_size)
        name = type(self).__name__
        hidden_threshold = threshold if hidden_threshold is None else hidden_threshold
        for arg, v in (("threshold", threshold), ("hidden_threshold", hidden_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < float("inf"):
                raise ValueError(f"{name}: {arg} must be a number >= 0 (0 transmits every change), got {v!r}")
        backend = renamed_backend(name, backend)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{name}: unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
        if active_set not in ACTIVE_SETS:
            raise ValueError(f"{name}: unknown active_set {active_set!r}; valid values are: "
                             f"{', '.join(ACTIVE_SETS)}")
        self._set_backend(backend)
        self.threshold = float(threshold)
        self.hidden_threshold = float(hidden_threshold)
        self.active_set = active_set
        G = self.gates
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(G * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(G * hidden_size)) if bias else None
        init_uniform_(self, hidden_size)

    def initial_state(self, batch_size: int, device=None, dtype=None):
        device, dtype = self._param_like(device, dtype)
        H, G = self.hidden_size, self.gates

        def z(n):
            return torch.zeros(batch_size, n, device=device, dtype=dtype)

        return tuple(z(H) for _ in range(self.num_states - 4)) + (
            z(self.input_size), z(H), z(G * H), z(G * H))

    #: the fused segment scans: "cpu" (C kernels, `sparsebptt.kernels.delta.cpu`) and "triton"
    segment_kernels = ("cpu", "triton")

    def _scan_segment(self, x_seg, state):
        params = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if self.active_backend == "triton":
            from ..kernels.delta.triton import fused_recurrent_delta_gru, fused_recurrent_delta_lstm
            fn = fused_recurrent_delta_gru if self.gates == 3 else fused_recurrent_delta_lstm
            return fn(x_seg, tuple(state), *params, threshold=self.threshold,
                      hidden_threshold=self.hidden_threshold, layer=self)
        if not fused_takes(x_seg, *state, *params):  # other dtypes or devices: the step-wise products
            log_once(f"sparsebptt: {type(self).__name__} backend 'cpu' runs step by step for "
                     f"{x_seg.dtype} on {x_seg.device} (the C segment kernels take CPU float32/float64)")
            ys, state = run_steps(self.step, x_seg, tuple(state))
            return torch.stack(ys), tuple(state)
        return fused_recurrent_delta(x_seg, tuple(state), *params, self.threshold, self.hidden_threshold,
                                     lstm=self.gates == 4, layer=self)

    def step(self, x_t, state):
        backend = self.active_backend
        if backend == "triton":  # the segment kernels over one step
            ys, state = self._scan_segment(x_t.unsqueeze(0), state)
            return ys[0], state
        h, state = type(self)._step(
            x_t, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            threshold=self.threshold, hidden_threshold=self.hidden_threshold, backend=backend,
            active_set=self.active_set, layer=self)
        return h, state

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, threshold={self.threshold}, "
                f"hidden_threshold={self.hidden_threshold}, backend={self.backend!r}, "
                f"active_set={self.active_set!r}")


class DeltaGRU(_DeltaCell):
    """Delta GRU (see the module docstring). State ``(h, x_ref, h_ref, m_x, m_h)``; output ``h``.

    Args:
        input_size, hidden_size: features in and units.
        threshold: input delta threshold theta_x (>= 0; 0 transmits every change).
        hidden_threshold: hidden delta threshold theta_h; default: ``threshold``.
        bias: add ``bias_ih`` and ``bias_hh`` (as `GRU`).
        backend: "cpu" (skip inactive columns forward and backward), "torch" (reference),
            "triton" (GPU segment kernels), "auto", or None (the process default; see the module
            docstring). "sparse" is the former name of "cpu".
        active_set: how a batch shares the active columns on the step path: "auto", "union",
            "sample" (see `sparsebptt.kernels.sparse`); the C segment scan always works per
            active entry, each row of ``W^T`` read once per step for all samples using it.
    """

    gates = 3
    num_states = 5
    _step = staticmethod(delta_gru_step)


class DeltaLSTM(_DeltaCell):
    """Delta LSTM (see the module docstring). State ``(h, c, x_ref, h_ref, m_x, m_h)``; output ``h``.

    Arguments as `DeltaGRU`; parameters as `LSTM`.
    """

    gates = 4
    num_states = 6
    _step = staticmethod(delta_lstm_step)
