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

from dataclasses import dataclass

import torch
from torch import nn

from .base import FusedCell, init_uniform_, linear
from .surrogate import check_surrogate, spike
from ..trace import current_trace

__all__ = ["LIFParams", "lif_step", "LIF", "RESETS", "RESET_TIMINGS"]

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

    def _scan_segment(self, x_seg, state):
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
            z, v = fused_lif_layer(x_seg, v, self.weight, self.bias, beta, self.params)
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
