"""The reference GRU and LSTM layers: plain loops over `gru_step` / `lstm_step`, the oracles of the
fused CPU layers (`sparsebptt.kernels.rnn.cpu`), with the same signatures and results."""
from __future__ import annotations

import torch

from ...cells.base import run_steps
from ...cells.gru import gru_step
from ...cells.lstm import lstm_step

__all__ = ["naive_gru", "naive_lstm"]


def naive_gru(x: torch.Tensor, h0: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
              bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None):
    """``(ys [L, B, H], h_T [B, H])``: one `gru_step` per step of ``x`` [L, B, in] under autograd."""
    def step(x_t, h):
        h = gru_step(x_t, h, weight_ih, weight_hh, bias_ih, bias_hh)
        return h, h

    ys, h = run_steps(step, x, h0)
    return torch.stack(ys), h


def naive_lstm(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weight_ih: torch.Tensor,
               weight_hh: torch.Tensor, bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None):
    """``(ys [L, B, H], h_T [B, H], c_T [B, H])``: one `lstm_step` per step of ``x`` [L, B, in]."""
    def step(x_t, state):
        h, c = lstm_step(x_t, *state, weight_ih, weight_hh, bias_ih, bias_hh)
        return h, (h, c)

    ys, (h, c) = run_steps(step, x, (h0, c0))
    return torch.stack(ys), h, c
