"""Leaky integrate-and-fire neurons.

Per step, with input current ``i_t = W x_t + b (+ V z_{t-1})``::

    u_t = beta * v_{t-1} + i_t                  # leaky integration (beta = exp(-dt/tau_mem))
    z_t = H(u_t - threshold)                    # spike; surrogate gradient in the backward
    v_t = u_t - z_t * threshold                 # reset="subtract"
    v_t = u_t * (1 - z_t)                       # reset="zero"

That is ``reset_timing="before_decay"`` (the default): the reset acts at once, and the next step
decays the reset membrane. ``reset_timing="after_decay"`` applies the reset of the previous
step's spike ``r_t = H(v_{t-1} - threshold)`` after the decay, and the state holds the membrane
before its reset (snnTorch's ``Leaky``/``Synaptic``/``RLeaky`` order, whose ``mem`` is that state)::

    u_t = beta * v_{t-1} + i_t - r_t * threshold       # reset="subtract": U_t = beta U_{t-1} + I_t - S_{t-1} theta
    u_t = beta * (v_{t-1} * (1 - r_t)) + i_t           # reset="zero"
    z_t = H(u_t - threshold);  v_t = u_t

``detach_reset=True`` stops the gradient through ``r_t`` (snnTorch always detaches it).

State: ``(v,)``, or ``(v, z)`` with recurrent weights (the previous spikes feed back).

Backends (``LIF(..., backend=...)``, see `sparsebptt.kernels.backend`): "torch" steps this
reference; "cpu" and "triton" run whole segments through fused kernels (`sparsebptt.kernels.lif`)
with the input projection as one matmul; "auto" picks the fastest available. The default
(``backend=None``) follows `sparsebptt.set_backend` / ``$SPARSEBPTT_BACKEND``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import FusedCell, init_uniform_, linear
from .surrogate import check_surrogate, spike
from ..trace import current_trace

__all__ = ["LIFParams", "lif_step", "LIF", "LIFNeuron", "LIFSegmentVJP", "RESETS", "RESET_TIMINGS", "LEARN_BETA"]

RESETS = ("subtract", "zero")
#: when a spike's reset acts: at once ("before_decay", the default) or at the next step, after the
#: decay ("after_decay", snnTorch's order)
RESET_TIMINGS = ("before_decay", "after_decay")


@dataclass(frozen=True)
class LIFParams:
    """Fixed LIF constants.

    beta: membrane decay per time step (dimensionless, exp(-dt/tau_mem)), in [0, 1].
    threshold: firing threshold (membrane units, > 0).
    reset: "subtract" (soft reset) or "zero" (hard reset).
    surrogate: name of the surrogate gradient (see `sparsebptt.cells.surrogate`).
    surrogate_scale: its sharpness; None takes the surrogate's default.
    detach_reset: if True no gradient flows through the reset term.
    reset_timing: "before_decay" (the reset acts in the spike's step) or "after_decay" (at the
        next step, after the decay: U_t = beta U_{t-1} + I_t - S_{t-1} threshold, snnTorch's
        order; the state is then the membrane before its reset). See the module docstring.
    """

    beta: float = 0.9
    threshold: float = 1.0
    reset: str = "subtract"
    surrogate: str = "fast_sigmoid"
    surrogate_scale: float | None = None
    detach_reset: bool = False
    reset_timing: str = "before_decay"

    def __post_init__(self):
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"LIF: beta must be in [0, 1], got {self.beta!r}")
        if not float(self.threshold) > 0:
            raise ValueError(f"LIF: threshold must be > 0, got {self.threshold!r}")
        if self.reset not in RESETS:
            raise ValueError(f"LIF: unknown reset {self.reset!r}; valid resets are: {', '.join(RESETS)}")
        check_surrogate(self.surrogate)
        if self.reset_timing not in RESET_TIMINGS:
            raise ValueError(f"LIF: unknown reset_timing {self.reset_timing!r}; valid reset timings are: "
                             f"{', '.join(RESET_TIMINGS)} (snnTorch's order is 'after_decay')")


def lif_step(i_t: torch.Tensor, v: torch.Tensor, p: LIFParams, beta=None):
    """One LIF step from input current ``i_t`` [B, H] and membrane ``v`` [B, H] -> (z_t, v_t).

    ``beta`` overrides ``p.beta`` (a learnable per-unit tensor).
    """
    b = p.beta if beta is None else beta
    if p.reset_timing == "after_decay":  # the previous step's spike resets after the decay
        r = spike(v - p.threshold, p.surrogate, p.surrogate_scale)  # [B, H]: z_{t-1}, recomputed from v
        r = r.detach() if p.detach_reset else r
        if p.reset == "subtract":
            u = b * v + i_t - r * p.threshold
        else:
            u = b * (v * (1.0 - r)) + i_t
        return spike(u - p.threshold, p.surrogate, p.surrogate_scale), u
    u = b * v + i_t  # [B, H]
    z = spike(u - p.threshold, p.surrogate, p.surrogate_scale)  # [B, H]
    r = z.detach() if p.detach_reset else z
    if p.reset == "subtract":
        v = u - r * p.threshold
    else:
        v = u * (1.0 - r)
    return z, v


class LIF(FusedCell):
    """A layer of LIF neurons with a dense input projection (and optional recurrent weights).

    Args:
        input_size, hidden_size: features in and neurons.
        beta, threshold, reset, surrogate, surrogate_scale, detach_reset, reset_timing: see `LIFParams`.
        recurrent: add recurrent weights from the previous step's spikes.
        learn_beta: make beta a trainable per-neuron parameter (clamped to [0, 1]).
        bias: add a bias to the input projection.
        backend: "auto", "torch", "cpu" or "triton" (see the module docstring); None follows the
            process-wide default (`sparsebptt.set_backend`). An explicit backend that is
            unavailable here raises `BackendUnavailable`.
    """

    kernels = ("cpu", "triton")
    segment_takes_backend = True

    def __init__(self, input_size: int, hidden_size: int, *, beta: float = 0.9, threshold: float = 1.0,
                 reset: str = "subtract", surrogate: str = "fast_sigmoid",
                 surrogate_scale: float | None = None, detach_reset: bool = False,
                 recurrent: bool = False, learn_beta: bool = False, bias: bool = True,
                 backend: str | None = None, reset_timing: str = "before_decay"):
        super().__init__(input_size, hidden_size)
        self._set_backend(backend)
        self.params = LIFParams(beta, threshold, reset, surrogate, surrogate_scale, detach_reset, reset_timing)
        self.recurrent = recurrent
        self.num_states = 2 if recurrent else 1
        self.binary_states = (False, True) if recurrent else (False,)  # spikes are stored bit-packed
        self.weight = nn.Parameter(torch.empty(hidden_size, input_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.recurrent_weight = nn.Parameter(torch.empty(hidden_size, hidden_size)) if recurrent else None
        init_uniform_(self, input_size)
        self.beta = nn.Parameter(torch.full((hidden_size,), float(beta))) if learn_beta else None

    def step(self, x_t, state):
        i_t = linear(x_t, self.weight, self.bias)  # [B, H]
        if self.recurrent:
            v, z_prev = state
            i_t = i_t + linear(z_prev, self.recurrent_weight)
        else:
            (v,) = state
        beta = None if self.beta is None else self.beta.clamp(0.0, 1.0)
        z, v = lif_step(i_t, v, self.params, beta)
        t = current_trace()
        if t is not None:
            t.add_activity(self, z.sum(), z.numel())
        return z, ((v, z) if self.recurrent else (v,))

    @property
    def segment_takes_route(self) -> bool:
        """A feed-forward layer takes the scan's `SparseRoute` (a recurrent one runs the matmul)."""
        return not self.recurrent

    @property
    def scan_segment(self):
        """As `FusedCell.scan_segment`; a feed-forward layer's also carries the scan's
        `SparseRoute`: its first segment decides whether the input products run sparse (a mostly
        zero input: spikes, events) for the whole scan, recomputations included."""
        fn = FusedCell.scan_segment.fget(self)
        if fn is None or "route" not in fn.keywords:  # (a recurrent layer takes no route)
            return fn
        if self._vjp_applies():  # the executor's recomputed segments: see LIFSegmentVJP
            fn.vjp = LIFSegmentVJP(self, fn.keywords["route"])
        return fn

    def _vjp_applies(self) -> bool:
        """Whether `LIFSegmentVJP` computes what ``_scan_segment`` does: not overridden (on the class
        or the instance), and weight, bias and beta the layer's own registered parameters (not a
        parametrization or a property computing them, whose gradient must flow through autograd)."""
        if type(self)._scan_segment is not LIF._scan_segment or "_scan_segment" in vars(self):
            return False
        own = self._parameters
        return all(getattr(self, n) is None or own.get(n) is getattr(self, n) for n in ("weight", "bias", "beta"))

    def _scan_segment(self, x_seg, state, *, backend=None, route=None):
        """A segment through the fused kernels. ``backend``: "cpu" or "triton", as
        `FusedCell.scan_segment` resolved it (None: resolve now). ``route``: the scan's
        `sparsebptt.kernels.sparse_input.cpu.SparseRoute` (backend "cpu", feed-forward; None: the matmul)."""
        if backend is None:
            backend = self.active_backend  # "cpu" or "triton": `FusedCell.scan_segment` hands this out
        beta = self.params.beta if self.beta is None else self.beta.clamp(0.0, 1.0)
        if self.recurrent:  # per step: a matmul for V z_{t-1}, one backend call for the membrane
            if backend == "cpu":
                from ..kernels.lif.cpu import fused_recurrent_lif_layer
            else:
                from ..kernels.lif.triton import fused_recurrent_lif_layer
            v, z_prev = state
            z, v = fused_recurrent_lif_layer(x_seg, v, z_prev, self.weight, self.bias, self.recurrent_weight,
                                             beta, self.params)
            self._count_activity(z)
            # a copy: a view z[-1] would keep the whole [L, B, H] block alive as the carried state
            return z, (v, z[-1].clone())
        (v,) = state
        if backend == "cpu":  # projection, recurrence and their backward in one node
            from ..kernels.lif.cpu import fused_lif_layer
            z, v = fused_lif_layer(x_seg, v, self.weight, self.bias, beta, self.params, route=route)
        else:
            from ..kernels.lif.triton import fused_recurrent_lif
            i = linear(x_seg, self.weight, self.bias)  # [L, B, H]: one matmul, MACs counted as per step
            z, v = fused_recurrent_lif(i, v, beta, self.params)  # [L, B, H], [B, H]
        self._count_activity(z)
        return z, (v,)

    def _count_activity(self, z):
        t = current_trace()
        if t is not None:
            t.add_activity(self, torch.count_nonzero(z), z.numel())

    def extra_repr(self) -> str:
        p = self.params
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        timing = "" if p.reset_timing == "before_decay" else f", reset_timing={p.reset_timing!r}"
        return (f"{self.input_size}, {self.hidden_size}, beta={p.beta}, threshold={p.threshold}, "
                f"reset={p.reset!r}, surrogate={p.surrogate!r}, recurrent={self.recurrent}{timing}{backend}")


class LIFSegmentVJP:
    """A feed-forward `LIF` layer (backend "cpu") over a segment without autograd: ``forward(x_seg,
    state) -> (z, state_T, saved)`` and ``backward(saved, dz, dstate_T, need_x, need_state, acc) ->
    (dx, dstate_0, {id(parameter): gradient})``. The executor runs its recomputed segments through
    it (one Python call per segment instead of an autograd graph and ``torch.autograd.grad``); the
    same kernels as the layer's autograd node (`sparsebptt.kernels.lif.cpu.layer_forward` /
    `layer_backward`) and the scan's `SparseRoute`, so the recomputation repeats the forward and
    the gradients are the autograd path's. A learnable beta gets clamp's backward (zero outside
    [0, 1]). Only the layer's registered parameters enter: nothing can escape the recomputation."""

    def __init__(self, cell: "LIF", route):
        from ..kernels.lif.cpu import layer_backward, layer_forward
        self.cell, self.route = cell, route
        self._forward, self._backward = layer_forward, layer_backward
        # the parameters as the scan found them (one VJP per scan; read once, not per segment)
        self.weight, self.bias, self.beta, self.params = cell.weight, cell.bias, cell.beta, cell.params

    def forward(self, x_seg, state, keep: bool = True):
        """``keep``: keep what the backward reads (else ``saved`` is None: a forward alone)."""
        (v,) = state
        learn = self.beta is not None
        beta = self.beta.clamp(0.0, 1.0).contiguous() if learn else self.params.beta
        z, vT, saved = self._forward(x_seg.contiguous(), v.contiguous(), self.weight, self.bias, beta, self.params,
                                     self.route, keep=keep, need_dbeta=learn and self.beta.requires_grad)
        self.cell._count_activity(z)
        return z, (vT,), saved

    def forward_stops(self, x_seg, state, stops, transient: bool = False, out: str | None = None):
        """The forward alone over consecutive segments ending at ``stops`` (offsets into ``x_seg``,
        the last its length), in one pass: ``(z, [state at each stop])``, what `forward` with
        ``keep=False`` gives segment by segment (`sparsebptt.kernels.lif.cpu.layer_forward_stops`).
        ``out``: the name of the per-thread buffer z goes to (valid until its next use); else with
        ``transient`` one of those, else a fresh tensor."""
        from ..kernels.lif.cpu import layer_forward_stops
        (v,) = state
        beta = self.beta.detach().clamp(0.0, 1.0).contiguous() if self.beta is not None else self.params.beta
        z, vs = layer_forward_stops(x_seg.contiguous(), v.contiguous(), self.weight, self.bias, beta, self.params,
                                    self.route, stops, out or ("stops_z0" if transient else None))
        self.cell._count_activity(z)
        return z, [(v,) for v in vs]

    def backward(self, saved, dz, dstate, need_x: bool, need_state, acc=None):
        """``acc``: {id(parameter): gradient of earlier segments the caller owns}; what is added
        into those in place is left out of the returned gradients (every returned one is fresh)."""
        weight, bias = self.weight, self.bias
        acc = acc or {}
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        dx, dv0, dw, db, dbeta = self._backward(saved, dz, dstate[0], need_x, need_w, need_b,
                                                acc.get(id(weight)), acc.get(id(bias)) if need_b else None)
        grads = {}
        if dw is not None:
            grads[id(weight)] = dw
        if db is not None:
            grads[id(bias)] = db
        if saved.need_dbeta and dbeta is not None:  # clamp(0, 1)'s backward, as autograd's
            b = self.beta.detach()
            grads[id(self.beta)] = torch.where((b >= 0.0) & (b <= 1.0), dbeta, torch.zeros_like(dbeta))
        return dx, (dv0 if need_state[0] else None,), grads


#: how a learnable beta of `LIFNeuron` is shared: one per neuron, or one per channel (shape[0])
LEARN_BETA = (False, True, "neuron", "channel")


def _neuron_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not (isinstance(shape, tuple) and shape
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"LIFNeuron: shape must be a positive int or a tuple of positive ints (the neurons of "
                         f"one sample, e.g. (16, 32, 32) for channels x height x width), got {shape!r}")
    return shape


class LIFNeuron(FusedCell):
    """LIF neurons with no projection of their own: the input of each step is the current.

    ``LIFNeuron(shape)`` holds ``prod(shape)`` neurons laid out as ``shape`` (an int, or e.g.
    (C, H, W) after a convolution); ``step(x_t, (v,))`` takes ``x_t`` of shape (B, *shape) as the
    input current ``i_t`` and runs `lif_step` (the equations in the module docstring), giving
    spikes of shape (B, *shape). State: ``(v,)`` of shape (B, *shape).

    Args:
        shape: the neurons of one sample.
        beta, threshold, reset, surrogate, surrogate_scale, detach_reset, reset_timing: see `LIFParams`.
        learn_beta: False (beta fixed), True or "neuron" (one trainable beta per neuron, shape
            ``shape``), or "channel" (one per channel, ``shape[0]``, shared over the other
            dimensions); clamped to [0, 1].
        backend: "auto", "torch", "cpu" or "triton". The recurrence is elementwise, so the fused
            kernels of `LIF` serve any shape: a segment (L, B, *shape) runs as (L, B, prod(shape)).
    """

    kernels = ("cpu", "triton")
    segment_takes_backend = True

    def __init__(self, shape, *, beta: float = 0.9, threshold: float = 1.0, reset: str = "subtract",
                 surrogate: str = "fast_sigmoid", surrogate_scale: float | None = None,
                 detach_reset: bool = False, learn_beta=False, backend: str | None = None,
                 reset_timing: str = "before_decay"):
        shape = _neuron_shape(shape)
        n = math.prod(shape)
        super().__init__(n, n)
        self._set_backend(backend)
        self.shape = shape
        self.params = LIFParams(beta, threshold, reset, surrogate, surrogate_scale, detach_reset, reset_timing)
        self.binary_states = (False,)
        if learn_beta not in LEARN_BETA:
            raise ValueError(f"LIFNeuron: learn_beta must be one of False, True, 'neuron', 'channel', got "
                             f"{learn_beta!r}")
        self.learn_beta = "neuron" if learn_beta is True else learn_beta
        if self.learn_beta == "neuron":
            self.beta = nn.Parameter(torch.full(shape, float(beta)))
        elif self.learn_beta == "channel":
            self.beta = nn.Parameter(torch.full((shape[0],) + (1,) * (len(shape) - 1), float(beta)))
        else:
            self.beta = None
        # follows .to(device, dtype): the backend's device and the state's default dtype without parameters
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shape

    def _param_like(self, device, dtype):
        return (self.anchor.device if device is None else device, self.anchor.dtype if dtype is None else dtype)

    def _backend_device(self) -> torch.device:
        return self.anchor.device

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        device, dtype = self._param_like(device, dtype)
        return (torch.zeros((batch_size,) + self.shape, device=device, dtype=dtype),)

    def _check_input(self, x, lead: int) -> None:
        if tuple(x.shape[lead:]) != self.shape:
            want = ("L, " if lead == 2 else "") + "B, " + ", ".join(map(str, self.shape))
            raise ValueError(f"LIFNeuron{self.shape}: input of shape {tuple(x.shape)} does not match its neurons: "
                             f"expected ({want}) (its state v is (B, {', '.join(map(str, self.shape))}))")

    def _beta(self):
        return None if self.beta is None else self.beta.clamp(0.0, 1.0)

    def step(self, x_t, state):
        self._check_input(x_t, 1)
        (v,) = state
        z, v = lif_step(x_t, v, self.params, self._beta())
        t = current_trace()
        if t is not None:
            t.add_activity(self, z.sum(), z.numel())
        return z, (v,)

    def _scan_segment(self, x_seg, state, *, backend=None):
        self._check_input(x_seg, 2)
        if backend is None:
            backend = self.active_backend  # `FusedCell.scan_segment` hands this out for "cpu" or "triton"
        if backend == "cpu":
            from ..kernels.lif.cpu import fused_recurrent_lif
        else:
            from ..kernels.lif.triton import fused_recurrent_lif
        (v,) = state
        L, B = x_seg.shape[:2]
        n = self.hidden_size
        beta = self._beta()
        beta = self.params.beta if beta is None else beta.expand(self.shape).reshape(n)  # [N] per neuron
        z, vT = fused_recurrent_lif(x_seg.reshape(L, B, n), v.reshape(B, n), beta, self.params)  # [L, B, N], [B, N]
        t = current_trace()
        if t is not None:
            t.add_activity(self, torch.count_nonzero(z), z.numel())
        return z.view((L, B) + self.shape), (vT.view((B,) + self.shape),)

    def extra_repr(self) -> str:
        p = self.params
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        timing = "" if p.reset_timing == "before_decay" else f", reset_timing={p.reset_timing!r}"
        learn = "" if not self.learn_beta else f", learn_beta={self.learn_beta!r}"
        return (f"{self.shape}, beta={p.beta}, threshold={p.threshold}, reset={p.reset!r}, "
                f"surrogate={p.surrogate!r}{learn}{timing}{backend}")
