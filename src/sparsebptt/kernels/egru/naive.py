"""The reference EGRU recurrence: a plain loop (`sparsebptt.cells.base.run_steps`) over
`sparsebptt.cells.egru.egru_step` with ``backend="torch"`` (dense matmuls, plain autograd), the
oracle of the fused kernels (`cpu.fused_recurrent_egru`, `triton.fused_recurrent_egru`)."""
from __future__ import annotations

from functools import partial

import torch

from ...cells.base import run_steps
from ...cells.egru import egru_step

__all__ = ["naive_egru"]


def naive_egru(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7, epsilon=0.5):
    """``(ys [T, B, H], state')``: `egru_step` with ``backend="torch"`` over x [T, B, I]."""
    step = partial(egru_step, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                   threshold=threshold, gamma=gamma, epsilon=epsilon, backend="torch")
    ys, state = run_steps(step, x, tuple(state))
    return torch.stack(ys), state
