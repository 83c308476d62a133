"""Shared test fixtures: cell factories, a user-defined cell, and one forward+backward runner."""
from __future__ import annotations

import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.testing import seeded


class LeakyTanh(nn.Module):
    """A user-defined cell with a two-tensor state and no sparsebptt base class."""

    def __init__(self, n_in, n):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = nn.Parameter(torch.randn(n_in, n, generator=g) / n_in ** 0.5)
        self.u = nn.Parameter(torch.randn(n, n, generator=g) / n ** 0.5)
        self.alpha = nn.Parameter(torch.tensor(0.7))
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.n, device=device, dtype=dtype),
                torch.zeros(batch_size, self.n, device=device, dtype=dtype))

    def step(self, x_t, state):
        h, a = state
        h = torch.tanh(x_t @ self.w + h @ self.u)
        a = self.alpha * a + h
        return 2 * h, (h, a)


class NoisyCell(LeakyTanh):
    """A stochastic user cell (dropout and Gaussian noise): recomputation must replay the RNG."""

    def step(self, x_t, state):
        h, a = state
        h = torch.tanh(nn.functional.dropout(x_t, 0.3, training=True) @ self.w + h @ self.u
                       + 0.1 * torch.randn_like(h))
        a = self.alpha * a + h
        return h, (h, a)


N_IN = 5


def make_cell(kind: str, dtype=torch.float64):
    torch.manual_seed(3)
    if kind == "lif":
        cell = sb.cells.LIF(N_IN, 7, beta=0.8, threshold=0.5, recurrent=True)
    elif kind == "lif-zero":
        cell = sb.cells.LIF(N_IN, 6, threshold=0.4, reset="zero", surrogate="atan", learn_beta=True)
    elif kind == "gru":
        cell = sb.cells.GRU(N_IN, 6)
    elif kind == "lstm":
        cell = sb.cells.LSTM(N_IN, 4)
    elif kind == "stack":
        cell = sb.cells.Stack([sb.cells.LIF(N_IN, 8, threshold=0.3, surrogate="triangle"),
                               sb.cells.GRU(8, 6), sb.cells.LSTM(6, 5)])
    elif kind == "egru":  # "union": embedding_bag (the per-sample path) is slow with 2 busy threads
        cell = sb.cells.EGRU(N_IN, 7, threshold_init=0.1, active_set="union")
    elif kind == "user":
        cell = LeakyTanh(N_IN, 6)
    elif kind == "segment":
        cell = SegmentTanh(N_IN, 6)
    elif kind == "stack-segment":
        cell = sb.cells.Stack([SegmentTanh(N_IN, 6), sb.cells.GRU(6, 4), SegmentTanh(4, 3)])
    elif kind == "noisy":
        cell = NoisyCell(N_IN, 6)
    else:
        raise ValueError(kind)
    return cell.to(dtype)


def run(cell, T, B, dtype, strategy, reduce=None, seed=0, x_kind="normal", rng_seed=None):
    """Forward + backward with loss (out*dout).sum() + sum(hT*dhT); returns outputs and grads."""
    x = seeded(seed, T, B, N_IN, dtype=dtype, kind=x_kind).requires_grad_()
    state0 = tuple((0.3 * seeded(seed + 1 + i, *s.shape, dtype=dtype)).requires_grad_()
                   for i, s in enumerate(cell.initial_state(B, dtype=dtype)))
    for p in cell.parameters():
        p.grad = None
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out, state = sb.scan(cell, x, state0, strategy=strategy, reduce=reduce)
    dout = seeded(seed + 100, *out.shape, dtype=dtype)
    loss = (out * dout).sum()
    for i, s in enumerate(state):
        loss = loss + (s * seeded(seed + 200 + i, *s.shape, dtype=dtype)).sum()
    loss.backward()
    res = {"out": out.detach().clone(), "dx": x.grad.clone()}
    res.update({f"state_T[{i}]": s.detach().clone() for i, s in enumerate(state)})
    res.update({f"dstate0[{i}]": s.grad.clone() if s.grad is not None else None
                for i, s in enumerate(state0)})
    res.update({f"d{n}": p.grad.clone() if p.grad is not None else None for n, p in cell.named_parameters()})
    return res


class SegmentTanh(LeakyTanh):
    """A user cell with a ``scan_segment`` fast path (input projection batched over the segment)."""

    def scan_segment(self, x_seg, state):
        h, a = state
        proj = x_seg @ self.w  # [L, B, n], one matmul for the segment
        ys = []
        for t in range(x_seg.shape[0]):
            h = torch.tanh(proj[t] + h @ self.u)
            a = self.alpha * a + h
            ys.append(2 * h)
        return torch.stack(ys), (h, a)
