"""The reference for the Delta kernels: a plain loop (`sparsebptt.cells.base.run_steps`) over
`delta_gru_step` / `delta_lstm_step` with dense matmuls on the masked deltas (``backend="torch"``),
differentiated by autograd."""
from __future__ import annotations

from functools import partial

import torch

from ...cells.base import run_steps
from ...cells.delta import delta_gru_step, delta_lstm_step

__all__ = ["naive_recurrent_delta_gru", "naive_recurrent_delta_lstm"]


def _naive(step, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, hidden_threshold):
    step = partial(step, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                   threshold=threshold, hidden_threshold=hidden_threshold, backend="torch")
    ys, state = run_steps(step, x, tuple(state))
    return torch.stack(ys), tuple(state)


def naive_recurrent_delta_gru(x, state, weight_ih, weight_hh, bias_ih=None, bias_hh=None, threshold=0.0,
                              hidden_threshold=0.0):
    """``(ys [L, B, H], (h, x_ref, h_ref, m_x, m_h))``: the Delta GRU step by step."""
    return _naive(delta_gru_step, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold,
                  hidden_threshold)


def naive_recurrent_delta_lstm(x, state, weight_ih, weight_hh, bias_ih=None, bias_hh=None, threshold=0.0,
                               hidden_threshold=0.0):
    """``(ys [L, B, H], (h, c, x_ref, h_ref, m_x, m_h))``: the Delta LSTM step by step."""
    return _naive(delta_lstm_step, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold,
                  hidden_threshold)
