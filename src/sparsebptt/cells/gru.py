"""Dense GRU cell, numerically equal to ``torch.nn.GRUCell`` (same parameter names and layout).

    r = sigma(W_ir x + b_ir + W_hr h + b_hr)
    z = sigma(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Backends (``GRU(..., backend=...)``, see `sparsebptt.kernels.backend`): "torch" steps this
reference; "cpu" runs whole segments through `sparsebptt.kernels.rnn.cpu.fused_gru_layer` (input
projection as matmuls, or from the nonzeros of a mostly-zero input such as one-hot tokens, decided
once per scan; gate math in C, hand-written backward); "auto" picks "cpu" on CPU and
"torch" on CUDA (there is no Triton GRU kernel). ``backend=None`` follows `sparsebptt.set_backend`.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FusedCell, init_uniform_, linear

__all__ = ["gru_step", "GRU"]


def gru_step(x_t, h, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """One GRU step: x_t [B, I], h [B, H] -> h' [B, H]."""
    gi = linear(x_t, weight_ih, bias_ih)  # [B, 3H]
    gh = linear(h, weight_hh, bias_hh)  # [B, 3H]
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


class GRU(FusedCell):
    """GRU cell with the `sb.scan` protocol. State: ``(h,)``; output: ``h``.

    ``backend``: "auto", "torch" or "cpu" (see the module docstring); None follows the process
    default. "triton" raises (no GRU kernel); an unavailable "cpu" raises `BackendUnavailable`.
    """

    kernels = ("cpu",)
    segment_takes_route = True  # a mostly-zero input (one-hot tokens, events) runs sparse
    num_states = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, backend: str | None = None):
        super().__init__(input_size, hidden_size)
        self._set_backend(backend)
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        init_uniform_(self, hidden_size)

    def step(self, x_t, state):
        (h,) = state
        h = gru_step(x_t, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h, (h,)

    def _scan_segment(self, x_seg, state, route=None):
        """A segment through `sparsebptt.kernels.rnn.cpu.fused_gru_layer`; ``route``: the scan's
        `sparsebptt.kernels.sparse_input.cpu.SparseRoute` (None: the input projection as matmuls)."""
        from ..kernels.rnn.cpu import fused_gru_layer
        (h,) = state
        ys, h = fused_gru_layer(x_seg, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, route=route)
        return ys, (h,)
