"""What the fused LIF recurrences share (C on CPU, Triton on GPU): the constants they take and
their autograd nodes.

The kernels take the LIF constants as any object with the attributes of `LIFConstants` (the
cells pass their `sparsebptt.cells.LIFParams`), so that they import nothing from the cells.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ...trace import current_trace

__all__ = ["LIFConstants", "SURROGATE_IDS", "SURROGATE_SCALES", "surrogate_scale", "after_decay",
           "recurrence_function", "recurrent_layer_function", "check_state_and_beta", "apply_recurrence"]

#: the surrogate gradients the kernels implement, by the id their C and Triton code switches on
SURROGATE_IDS = {"fast_sigmoid": 0, "atan": 1, "triangle": 2, "sigmoid": 3}
#: each one's default scale: the same as `sparsebptt.cells.surrogate.SURROGATES` (a test checks)
SURROGATE_SCALES = {"fast_sigmoid": 25.0, "atan": 2.0, "triangle": 1.0, "sigmoid": 4.0}


class LIFConstants(Protocol):
    """The LIF constants a kernel reads (`sparsebptt.cells.LIFParams` has them; ``beta`` is
    passed separately): threshold (> 0), reset ("subtract" or "zero"), surrogate (a key of
    `SURROGATE_IDS`), surrogate_scale (None: the surrogate's default), detach_reset, reset_timing
    ("before_decay" or "after_decay"; an object without it is "before_decay")."""

    threshold: float
    reset: str
    surrogate: str
    surrogate_scale: float | None
    detach_reset: bool
    reset_timing: str


def check_state_and_beta(who: str, what: str, i: torch.Tensor, v0, beta, H: int) -> None:
    """The checks every backend makes of a segment's initial membrane ``v0`` (a [B, H] tensor of
    ``i``'s dtype and device, B = ``i.shape[1]``) and ``beta`` (a float or an [H] tensor like
    ``i``); ``who``: the entry point named in the messages, ``what``: the name of ``i``."""
    B = i.shape[1]
    if not isinstance(v0, torch.Tensor) or v0.shape != (B, H):
        raise ValueError(f"{who}: v0 must have shape {(B, H)} (B, H), got "
                         f"{tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
    if v0.dtype != i.dtype or v0.device != i.device:
        raise TypeError(f"{who}: v0 is {v0.dtype} on {v0.device} but {what} is {i.dtype} on "
                        f"{i.device}; they must match")
    if isinstance(beta, torch.Tensor):
        if beta.shape != (H,) or beta.dtype != i.dtype or beta.device != i.device:
            raise ValueError(f"{who}: a tensor beta must have shape ({H},), dtype {i.dtype} "
                             f"and device {i.device}; got shape {tuple(beta.shape)}, {beta.dtype}, "
                             f"{beta.device}")
    elif not isinstance(beta, (int, float)):
        raise TypeError(f"{who}: beta must be a float or a [H] tensor, got {type(beta).__name__}")


def apply_recurrence(function, forward, i: torch.Tensor, v0: torch.Tensor, beta, p: LIFConstants):
    """``(z, v_T)`` of a backend's recurrence over checked inputs, made contiguous: its autograd
    node ``function`` (from `recurrence_function`) when a gradient is wanted, else its
    ``forward(i, v0, beta, p, save_u=False)`` alone (nothing saved)."""
    i, v0 = i.contiguous(), v0.contiguous()
    if isinstance(beta, torch.Tensor):
        beta = beta.contiguous()
    needs_grad = torch.is_grad_enabled() and (
        i.requires_grad or v0.requires_grad or (isinstance(beta, torch.Tensor) and beta.requires_grad))
    if not needs_grad:
        z, _, vT = forward(i, v0, beta, p, save_u=False)
        return z, vT
    return function.apply(i, v0, beta, p)


def surrogate_scale(p: LIFConstants) -> float:
    """The surrogate's scale: ``p.surrogate_scale``, or the surrogate's default when None."""
    return float(SURROGATE_SCALES[p.surrogate] if p.surrogate_scale is None else p.surrogate_scale)


def after_decay(p: LIFConstants) -> bool:
    """True when the reset of a spike is applied at the next step, after the decay (snnTorch's
    subtract reset): the state then holds the membrane before its reset, and the backward reads
    ``v_{t-1}`` (u_{t-1}, or v0 at the first step) at every step, so v0 is always kept."""
    return getattr(p, "reset_timing", "before_decay") == "after_decay"


def recurrence_function(name: str, fwd, bwd) -> type[torch.autograd.Function]:
    """An autograd.Function ``(i, v0, beta, p) -> (z, v_T)`` over the LIF recurrence from currents.

    ``fwd(i, v0, beta, p, save_u) -> (z, u, v_T)`` and ``bwd(u, dz, dv_T, v0, beta, p, need_dbeta)
    -> (di, dv0, dbeta)`` are a backend's kernels (``dz``/``dv_T`` may be None: no gradient). Only
    u [L, B, H] is kept, and v0 only when the gradient of a learnable beta or a reset after the
    decay (`after_decay`) needs v_{-1}.
    """

    def forward(ctx, i, v0, beta, p: LIFConstants):
        z, u, vT = fwd(i, v0, beta, p, save_u=True)
        beta_t = beta if isinstance(beta, torch.Tensor) else None
        ctx.p = p
        ctx.beta_s = None if beta_t is not None else beta
        ctx.need_dbeta = beta_t is not None and beta_t.requires_grad
        ctx.save_for_backward(u, v0 if ctx.need_dbeta or after_decay(p) else None, beta_t)
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


def recurrent_layer_function(name: str, step_fwd, step_bwd, empty) -> type[torch.autograd.Function]:
    """An autograd.Function ``(x, v0, z0, W, b, V, beta, p) -> (z, v_T)`` over a LIF layer with
    recurrent weights V [H, H]: ``i_t = W x_t + b + V z_{t-1}``.

    The input projection of every step is one matmul; then per step one ``addmm`` adds
    ``V z_{t-1}`` in place and one backend call advances the membrane (no autograd graph per
    step). Saved: u [L, B, H] (written over the currents) and the inputs. Backward per step: the
    backend's step backward (with the spike gradient plus ``du_{t+1} V``), then one matmul for
    the recurrent path; dW, dV, db, dx and dbeta are batched over the segment at the end.

    A backend gives ``step_fwd(i_t, v_in, beta, p, z_t, v_out)`` (writes z_t, v_out, and u_t
    over i_t), ``step_bwd(u_t, dz_t, g_in, beta, p, du_t, g_out, v_prev)`` (writes du_t and
    g_out = dL/dv_{t-1}; no dbeta; ``v_prev`` = v_{t-1}, read by a reset after the decay) and
    ``empty(shape, dtype, device)`` for the [L, B, H] buffers.
    """

    def forward(ctx, x, v0, z0, weight, bias, rweight, beta, p: LIFConstants):
        L, B, n_in = x.shape
        H = weight.shape[0]
        i = empty((L, B, H), x.dtype, x.device)
        x2 = x.reshape(L * B, n_in)
        if bias is None:
            torch.mm(x2, weight.t(), out=i.view(L * B, H))
        else:
            torch.addmm(bias, x2, weight.t(), out=i.view(L * B, H))
        z = empty((L, B, H), x.dtype, x.device)
        v = [v0, torch.empty_like(v0), torch.empty_like(v0)]
        vt = rweight.t()
        for t in range(L):
            i[t].addmm_(z0 if t == 0 else z[t - 1], vt)  # + V z_{t-1}
            v_in, v_out = v[0] if t == 0 else v[1 + (t + 1) % 2], v[1 + t % 2]
            step_fwd(i[t], v_in, beta, p, z[t], v_out)
        vT = v[1 + (L - 1) % 2]
        t_ = current_trace()
        macs_x, macs_r = L * B * n_in * H, L * B * H * H
        if t_ is not None:
            t_.add_forward_macs(macs_x + macs_r)
        beta_t = beta if isinstance(beta, torch.Tensor) else None
        ctx.p, ctx.trace = p, t_
        ctx.beta_s = None if beta_t is not None else beta
        ctx.need_dbeta = beta_t is not None and beta_t.requires_grad
        # the reference's per-step linear(z_{t-1}, V): z_{t-1} needs grad for t >= 1 (it depends on
        # whatever requires grad here), at t = 0 when z0 does
        ctx.bwd_macs = macs_x * (int(x.requires_grad) + int(weight.requires_grad)) + \
            B * H * H * ((L - 1) + int(z0.requires_grad) + L * int(rweight.requires_grad))
        ctx.save_for_backward(i, x, v0, z0, weight, rweight, beta_t)
        ctx.set_materialize_grads(False)
        return z, vT

    def backward(ctx, dz, dvT):
        u, x, v0, z0, weight, rweight, beta_t = ctx.saved_tensors
        p = ctx.p
        L, B, H = u.shape
        beta = beta_t if beta_t is not None else ctx.beta_s
        du = empty((L, B, H), u.dtype, u.device)
        g = [torch.zeros_like(v0) if dvT is None else dvT.contiguous(), torch.empty_like(v0),
             torch.empty_like(v0)]
        dz_carry = None
        dz_t = torch.empty_like(v0)
        th = float(p.threshold)
        after = after_decay(p)
        for t in range(L - 1, -1, -1):
            if dz is None:
                dz_in = dz_carry if dz_carry is not None else torch.zeros_like(v0)
            elif dz_carry is None:
                dz_in = dz[t].contiguous()
            else:
                dz_in = torch.add(dz[t], dz_carry, out=dz_t)
            g_in = g[0] if t == L - 1 else g[1 + (t + 1) % 2]
            g_out = g[1 + t % 2]
            v_prev = (u[t - 1] if t > 0 else v0) if after else g_in  # v_{t-1} = u_{t-1} after the decay
            step_bwd(u[t], dz_in, g_in, beta, p, du[t], g_out, v_prev)
            dz_carry = du[t].mm(rweight)  # dL/dz_{t-1} through V
        dv0 = g[1]  # g_out of t = 0
        need = ctx.needs_input_grad
        du2 = du.view(L * B, H)
        dx = dw = db = dV = dbeta = None
        if need[0]:
            dx = empty(x.shape, x.dtype, x.device)
            torch.mm(du2, weight, out=dx.view(L * B, -1))
        if need[3]:
            dw = du2.t().mm(x.reshape(L * B, -1))
        if need[4]:
            db = du2.sum(0)
        z = (u > th).to(u.dtype)  # z_t recomputed from u_t
        if need[5]:
            zprev = torch.cat([z0.unsqueeze(0), z[:-1]]).view(L * B, H)
            dV = du2.t().mm(zprev)
        if ctx.need_dbeta:
            if after:  # v_t = u_t; the zero reset scales v_{t-1} by 1 - H(v_{t-1} - th)
                vprev = torch.cat([v0.unsqueeze(0), u[:-1]])
                if p.reset == "zero":
                    vprev = vprev * (vprev <= th).to(u.dtype)
            else:
                v = u - z * th if p.reset == "subtract" else u * (1 - z)  # v_t
                vprev = torch.cat([v0.unsqueeze(0), v[:-1]])
            dbeta = (du.double() * vprev.double()).sum((0, 1)).to(u.dtype)
        if ctx.trace is not None and ctx.bwd_macs:
            ctx.trace.add_backward_macs(ctx.bwd_macs)
        return dx, dv0, dz_carry, dw, db, dV, dbeta, None

    return type(name, (torch.autograd.Function,), {
        "__doc__": "A LIF layer with recurrent weights over a segment: (x, v0, z0, W, b, V, beta) -> (z, v_T).",
        "forward": staticmethod(forward), "backward": staticmethod(backward)})

