"""The autograd node shared by the fused LIF recurrences (C on CPU, Triton on GPU)."""
from __future__ import annotations

import torch

from ...cells.lif import LIFParams

__all__ = ["recurrence_function"]


def recurrence_function(name: str, fwd, bwd) -> type[torch.autograd.Function]:
    """An autograd.Function ``(i, v0, beta, p) -> (z, v_T)`` over the LIF recurrence from currents.

    ``fwd(i, v0, beta, p, save_u) -> (z, u, v_T)`` and ``bwd(u, dz, dv_T, v0, beta, p, need_dbeta)
    -> (di, dv0, dbeta)`` are a backend's kernels (``dz``/``dv_T`` may be None: no gradient). Only
    u [L, B, H] is kept, and v0 only when the gradient of a learnable beta needs v_{-1}.
    """

    def forward(ctx, i, v0, beta, p: LIFParams):
        z, u, vT = fwd(i, v0, beta, p, save_u=True)
        beta_t = beta if isinstance(beta, torch.Tensor) else None
        ctx.p = p
        ctx.beta_s = None if beta_t is not None else beta
        ctx.need_dbeta = beta_t is not None and beta_t.requires_grad
        ctx.save_for_backward(u, v0 if ctx.need_dbeta else None, beta_t)
        ctx.set_materialize_grads(False)
        return z, vT

    def backward(ctx, dz, dvT):
        u, v0, beta_t = ctx.saved_tensors
        beta = beta_t if beta_t is not None else ctx.beta_s
        di, dv0, dbeta = bwd(u, dz, dvT, v0, beta, ctx.p, ctx.need_dbeta)
        return di, dv0, dbeta, None

    return type(name, (torch.autograd.Function,), {
        "__doc__": "The LIF recurrence alone, from currents ``i``: (i, v0, beta) -> (z, v_T).",
        "forward": staticmethod(forward), "backward": staticmethod(backward)})
