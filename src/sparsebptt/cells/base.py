"""The cell protocol and the pieces every reference cell shares.

A cell is any ``nn.Module`` with::

    initial_state(batch_size, device=None, dtype=None) -> tuple[Tensor, ...]
    step(x_t, state) -> (y_t, state)            # x_t: [B, input_size], y_t: [B, output]

Every exact strategy works with any such module. The reference cells here add ``input_size`` and
``hidden_size`` attributes, which `sb.scan` uses to check inputs early.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..trace import current_trace

__all__ = ["Cell", "linear", "init_uniform_"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose multiply-accumulates are counted by an active `sb.trace`.

    Forward MACs are ``B * in * out``; the backward adds the same for the input gradient (when
    x needs it) and for the weight gradient (when the weight needs it), counted when autograd
    actually runs that backward.
    """
    y = F.linear(x, weight, bias)
    t = current_trace()
    if t is not None:
        macs = x.numel() // x.shape[-1] * weight.shape[0] * weight.shape[1]
        t.add_forward_macs(macs)
        if y.requires_grad:
            n_bwd = macs * (int(x.requires_grad) + int(weight.requires_grad))
            y.register_hook(lambda g, _t=t, _n=n_bwd: _t.add_backward_macs(_n))
    return y


def init_uniform_(module: nn.Module, hidden_size: int) -> None:
    """PyTorch's RNN initialisation: every parameter uniform in +-1/sqrt(hidden_size)."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-bound, bound)


class Cell(nn.Module):
    """Base class of the reference cells: holds sizes and the ``initial_state`` helper."""

    #: number of tensors in the state tuple (set by subclasses)
    num_states: int = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def _param_like(self, device, dtype):
        p = next(self.parameters(), None)
        if device is None:
            device = p.device if p is not None else torch.device("cpu")
        if dtype is None:
            dtype = p.dtype if p is not None else torch.get_default_dtype()
        return device, dtype

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        device, dtype = self._param_like(device, dtype)
        return tuple(
            torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
            for _ in range(self.num_states)
        )

    def step(self, x_t: torch.Tensor, state: tuple[torch.Tensor, ...]):  # pragma: no cover
        raise NotImplementedError

    def forward(self, x_t, state):
        """Alias of `step`, so a cell can be called like ``nn.GRUCell``."""
        return self.step(x_t, state)
