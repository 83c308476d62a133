"""Dense LSTM cell, numerically equal to ``torch.nn.LSTMCell`` (same parameter names and layout).

    i, f, g, o = sigma, sigma, tanh, sigma of (W_ih x + b_ih + W_hh h + b_hh), in that order
    c' = f * c + i * g
    h' = o * tanh(c')

Backends (``LSTM(..., backend=...)``): as `sparsebptt.cells.gru`; "cpu" runs
`sparsebptt.kernels.rnn.cpu.fused_lstm_layer`.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FusedCell, init_uniform_, linear

__all__ = ["lstm_step", "LSTM"]


def lstm_step(x_t, h, c, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """One LSTM step: x_t [B, I], h, c [B, H] -> (h', c')."""
    gates = linear(x_t, weight_ih, bias_ih) + linear(h, weight_hh, bias_hh)  # [B, 4H]
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class LSTM(FusedCell):
    """LSTM cell with the `sb.scan` protocol. State: ``(h, c)``; output: ``h``.

    ``backend``: as `GRU` ("auto", "torch" or "cpu"; None follows the process default).
    """

    kernels = ("cpu",)
    segment_takes_route = True  # a mostly-zero input (one-hot tokens, events) runs sparse
    num_states = 2

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, backend: str | None = None):
        super().__init__(input_size, hidden_size)
        self._set_backend(backend)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size)) if bias else None
        init_uniform_(self, hidden_size)

    def step(self, x_t, state):
        h, c = state
        h, c = lstm_step(x_t, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h, (h, c)

    def _scan_segment(self, x_seg, state, route=None):
        """A segment through `sparsebptt.kernels.rnn.cpu.fused_lstm_layer`; ``route``: the scan's
        `sparsebptt.kernels.sparse_input.cpu.SparseRoute` (None: the input projection as matmuls)."""
        from ..kernels.rnn.cpu import fused_lstm_layer
        h, c = state
        ys, h, c = fused_lstm_layer(x_seg, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                     route=route)
        return ys, (h, c)
