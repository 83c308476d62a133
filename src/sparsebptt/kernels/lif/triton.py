"""Triton LIF recurrence (GPU): one program per block of BH neurons walks all L steps.

Same equations, saved tensor (``u`` [L, B, H]) and backward as `sparsebptt.kernels.lif.cpu`
(see its docstring). The backward keeps the per-neuron ``dbeta`` partial sums in registers and
writes one [B, H] buffer, summed over B afterwards (deterministic: no atomics).

Runs on CUDA tensors; under ``TRITON_INTERPRET=1`` (set before this module is imported) also on
CPU tensors in Triton's interpreter, which is how the default test suite checks it.
Constants (threshold, beta, surrogate scale) are passed as a tensor of the data's dtype, so that
float64 runs do not round them to float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common import NoCtx
from .function import (SURROGATE_IDS, LIFConstants, after_decay, apply_recurrence, check_state_and_beta,
                       recurrence_function, recurrent_layer_function, surrogate_scale)

__all__ = ["fused_recurrent_lif", "fused_recurrent_lif_layer"]

_DTYPES = (torch.float32, torch.float64)


@triton.jit
def _surrogate(x, c_scale, c_atan_k, c_atan_a, SURROGATE: tl.constexpr):
    if SURROGATE == 0:  # fast sigmoid
        a = c_scale * tl.abs(x) + 1.0
        s = 1.0 / (a * a)
    elif SURROGATE == 1:  # atan
        y = c_atan_k * x
        s = c_atan_a / (1.0 + y * y)
    elif SURROGATE == 3:  # sigmoid
        sg = 1.0 / (1.0 + tl.exp(-(c_scale * x)))
        s = (1.0 - sg) * sg * c_scale
    else:  # triangle
        s = tl.maximum(1.0 - tl.abs(x) / c_scale, 0.0)
    return s


@triton.jit
def fused_recurrent_lif_fwd_kernel(i, v0, beta, c, z, u, vT, L, N, H,
                                   BH: tl.constexpr, HAS_BETA: tl.constexpr, RESET_ZERO: tl.constexpr,
                                   SAVE_U: tl.constexpr, AFTER: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BH + tl.arange(0, BH)  # flattened (b, h)
    m_n = o_n < N
    c_th = tl.load(c + 0)
    b_v = tl.load(v0 + o_n, mask=m_n, other=0)
    if HAS_BETA:
        b_beta = tl.load(beta + o_n % H, mask=m_n, other=0)
    else:
        b_beta = tl.load(c + 1) + tl.zeros_like(b_v)
    for t in range(0, L):
        p_i = i + t * N + o_n
        if AFTER:  # the previous spike's reset after the decay; the state is u itself
            b_r = tl.where(b_v > c_th, 1.0, 0.0).to(b_v.dtype)
            if RESET_ZERO:
                b_u = b_beta * (b_v * (1.0 - b_r))
                b_u = b_u + tl.load(p_i, mask=m_n, other=0)
            else:
                b_u = b_beta * b_v
                b_u = b_u + tl.load(p_i, mask=m_n, other=0)
                b_u = b_u - b_r * c_th
        else:
            b_u = b_beta * b_v
            b_u = b_u + tl.load(p_i, mask=m_n, other=0)
        b_z = tl.where(b_u > c_th, 1.0, 0.0).to(b_u.dtype)
        tl.store(z + t * N + o_n, b_z, mask=m_n)
        if SAVE_U:
            tl.store(u + t * N + o_n, b_u, mask=m_n)
        if AFTER:
            b_v = b_u
        elif RESET_ZERO:
            b_v = b_u * (1.0 - b_z)
        else:
            b_v = b_u - b_z * c_th
    tl.store(vT + o_n, b_v, mask=m_n)


@triton.jit
def fused_recurrent_lif_bwd_kernel(u, dz, dvT, v0, beta, c, di, dv0, dbeta, L, N, H,
                                   BH: tl.constexpr, HAS_BETA: tl.constexpr, RESET_ZERO: tl.constexpr,
                                   DETACH: tl.constexpr, SURROGATE: tl.constexpr, HAS_DZ: tl.constexpr,
                                   HAS_DVT: tl.constexpr, NEED_DBETA: tl.constexpr, AFTER: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BH + tl.arange(0, BH)
    m_n = o_n < N
    c_th = tl.load(c + 0)
    c_scale = tl.load(c + 2)
    c_atan_k = tl.load(c + 3)
    c_atan_a = tl.load(c + 4)
    b_g = tl.zeros([BH], dtype=c_th.dtype)
    if HAS_DVT:
        b_g = tl.load(dvT + o_n, mask=m_n, other=0)
    if HAS_BETA:
        b_beta = tl.load(beta + o_n % H, mask=m_n, other=0)
    else:
        b_beta = tl.load(c + 1) + tl.zeros_like(b_g)
    b_dbeta = tl.zeros([BH], dtype=tl.float64)
    for k in range(0, L):
        t = L - 1 - k
        b_u = tl.load(u + t * N + o_n, mask=m_n, other=0)
        b_s = _surrogate(b_u - c_th, c_scale, c_atan_k, c_atan_a, SURROGATE)
        b_dz = tl.zeros_like(b_u)
        if HAS_DZ:
            b_dz = tl.load(dz + t * N + o_n, mask=m_n, other=0)
        if AFTER:  # v_t = u_t; the reset of v_{t-1}'s spike acts in this step (see cpu.py)
            b_du = b_g + b_dz * b_s
            tl.store(di + t * N + o_n, b_du, mask=m_n)
            if t > 0:
                b_vp = tl.load(u + (t - 1) * N + o_n, mask=m_n, other=0)
            else:
                b_vp = tl.load(v0 + o_n, mask=m_n, other=0)
            b_keep = tl.where(b_vp > c_th, 0.0, 1.0).to(b_vp.dtype)
            if RESET_ZERO:
                b_gp = b_beta * b_du * b_keep
                if not DETACH:
                    b_sp = _surrogate(b_vp - c_th, c_scale, c_atan_k, c_atan_a, SURROGATE)
                    b_gp = b_gp - b_beta * b_du * b_vp * b_sp
                if NEED_DBETA:
                    b_dbeta += b_du.to(tl.float64) * (b_vp * b_keep).to(tl.float64)
            else:
                b_gp = b_beta * b_du
                if not DETACH:
                    b_sp = _surrogate(b_vp - c_th, c_scale, c_atan_k, c_atan_a, SURROGATE)
                    b_gp = b_gp - c_th * b_du * b_sp
                if NEED_DBETA:
                    b_dbeta += b_du.to(tl.float64) * b_vp.to(tl.float64)
            b_g = b_gp
        else:
            if RESET_ZERO:
                b_keep = tl.where(b_u > c_th, 0.0, 1.0).to(b_u.dtype)
                if DETACH:
                    b_du = b_g * b_keep + b_dz * b_s
                else:
                    b_du = b_g * b_keep + (b_dz - b_u * b_g) * b_s
            else:
                if DETACH:
                    b_du = b_g + b_dz * b_s
                else:
                    b_du = b_g + (b_dz - c_th * b_g) * b_s
            tl.store(di + t * N + o_n, b_du, mask=m_n)
            if NEED_DBETA:
                if t > 0:
                    b_up = tl.load(u + (t - 1) * N + o_n, mask=m_n, other=0)
                    b_zp = tl.where(b_up > c_th, 1.0, 0.0).to(b_up.dtype)
                    if RESET_ZERO:
                        b_vp = b_up * (1.0 - b_zp)
                    else:
                        b_vp = b_up - b_zp * c_th
                else:
                    b_vp = tl.load(v0 + o_n, mask=m_n, other=0)
                b_dbeta += b_du.to(tl.float64) * b_vp.to(tl.float64)
            b_g = b_beta * b_du
    tl.store(dv0 + o_n, b_g, mask=m_n)
    if NEED_DBETA:
        tl.store(dbeta + o_n, b_dbeta, mask=m_n)


def _block(N: int) -> int:
    return min(triton.next_power_of_2(N), 128)


def _consts(p: LIFConstants, beta_s: float, dtype, device) -> torch.Tensor:
    scale = surrogate_scale(p)
    return torch.tensor([p.threshold, beta_s, scale, math.pi / 2 * scale, scale / 2], dtype=dtype, device=device)


def fused_recurrent_lif_fwd(i, v0, beta, p: LIFConstants, save_u: bool):
    L, B, H = i.shape
    N = B * H
    z = torch.empty_like(i)
    u = torch.empty_like(i) if save_u else z  # dummy pointer when not saved
    vT = torch.empty_like(v0)
    has_beta = isinstance(beta, torch.Tensor)
    c = _consts(p, 0.0 if has_beta else float(beta), i.dtype, i.device)
    BH = _block(N)
    fused_recurrent_lif_fwd_kernel[(triton.cdiv(N, BH),)](
        i, v0, beta if has_beta else c, c, z, u, vT, L, N, H,
        BH=BH, HAS_BETA=has_beta, RESET_ZERO=p.reset == "zero", SAVE_U=save_u, AFTER=after_decay(p))
    return z, (u if save_u else None), vT


def fused_recurrent_lif_bwd(u, dz, dvT, v0, beta, p: LIFConstants, need_dbeta: bool):
    dz = None if dz is None else dz.contiguous()
    dvT = None if dvT is None else dvT.contiguous()
    L, B, H = u.shape
    N = B * H
    di = torch.empty_like(u)
    dv0 = torch.empty(B, H, dtype=u.dtype, device=u.device)
    has_beta = isinstance(beta, torch.Tensor)
    c = _consts(p, 0.0 if has_beta else float(beta), u.dtype, u.device)
    dbeta = torch.empty(B, H, dtype=torch.float64, device=u.device) if need_dbeta else dv0
    BH = _block(N)
    fused_recurrent_lif_bwd_kernel[(triton.cdiv(N, BH),)](
        u, u if dz is None else dz, dv0 if dvT is None else dvT, u if v0 is None else v0,
        beta if has_beta else c, c, di, dv0, dbeta, L, N, H,
        BH=BH, HAS_BETA=has_beta, RESET_ZERO=p.reset == "zero", DETACH=bool(p.detach_reset),
        SURROGATE=SURROGATE_IDS[p.surrogate], HAS_DZ=dz is not None, HAS_DVT=dvT is not None,
        NEED_DBETA=need_dbeta, AFTER=after_decay(p))
    return di, dv0, (dbeta.sum(0).to(u.dtype) if need_dbeta else None)


FusedRecurrentLIFFunction = recurrence_function("FusedRecurrentLIFFunction", fused_recurrent_lif_fwd,
                                                fused_recurrent_lif_bwd)


def _step_fwd(i_t, v_in, beta, p: LIFConstants, z_t, v_out):
    """One step of the forward kernel from the currents i_t [B, H]; u_t is written over i_t (each
    element is read before its own program overwrites it)."""
    B, H = i_t.shape
    N = B * H
    has_beta = isinstance(beta, torch.Tensor)
    c = _consts(p, 0.0 if has_beta else float(beta), i_t.dtype, i_t.device)
    BH = _block(N)
    fused_recurrent_lif_fwd_kernel[(triton.cdiv(N, BH),)](
        i_t, v_in, beta if has_beta else c, c, z_t, i_t, v_out, 1, N, H,
        BH=BH, HAS_BETA=has_beta, RESET_ZERO=p.reset == "zero", SAVE_U=True, AFTER=after_decay(p))


def _step_bwd(u_t, dz_t, g_in, beta, p: LIFConstants, du_t, g_out, v_prev):
    """One step of the backward kernel: du_t and g_out = dL/dv_{t-1} (dbeta is left to the caller);
    ``v_prev`` (v_{t-1}) is read by a reset after the decay."""
    B, H = u_t.shape
    N = B * H
    has_beta = isinstance(beta, torch.Tensor)
    c = _consts(p, 0.0 if has_beta else float(beta), u_t.dtype, u_t.device)
    BH = _block(N)
    fused_recurrent_lif_bwd_kernel[(triton.cdiv(N, BH),)](
        u_t, dz_t, g_in, v_prev.contiguous(), beta if has_beta else c, c, du_t, g_out, g_out, 1, N, H,
        BH=BH, HAS_BETA=has_beta, RESET_ZERO=p.reset == "zero", DETACH=bool(p.detach_reset),
        SURROGATE=SURROGATE_IDS[p.surrogate], HAS_DZ=True, HAS_DVT=True, NEED_DBETA=False, AFTER=after_decay(p))


#: a LIF layer with recurrent weights: per step one ``addmm`` (cuBLAS) for ``V z_{t-1}`` and one
#: Triton launch, forward and backward (see `recurrent_layer_function`)
FusedRecurrentLIFLayerFunction = recurrent_layer_function(
    "FusedRecurrentLIFLayerFunction", _step_fwd, _step_bwd,
    lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))


def _check(i, v0, beta):
    if not isinstance(i, torch.Tensor) or i.dim() != 3:
        raise ValueError(f"fused_recurrent_lif (triton): i must be a 3-D tensor [L, B, H] of input currents, "
                         f"got {tuple(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__}")
    if i.dtype not in _DTYPES:
        raise TypeError(f"fused_recurrent_lif (triton): dtype {i.dtype} is not supported; use float32 or "
                        "float64 (or backend='torch')")
    if i.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"fused_recurrent_lif (triton): i is on {i.device}; the triton backend needs CUDA "
                         "tensors (CPU tensors only under TRITON_INTERPRET=1); use backend='cpu' on CPU")
    check_state_and_beta("fused_recurrent_lif (triton)", "i", i, v0, beta, i.shape[2])


def fused_recurrent_lif(i: torch.Tensor, v0: torch.Tensor, beta, p: LIFConstants):
    """The LIF recurrence over a segment with Triton: ``(z [L, B, H], v_T [B, H])``.

    Args:
        i: input currents ``W x_t + b`` for every step, [L, B, H], float32 or float64, on CUDA.
        v0: membrane before the first step, [B, H].
        beta: decay, a float or a per-neuron [H] tensor (already clamped to [0, 1]).
        p: the LIF constants (threshold, reset, surrogate, detach_reset); ``p.beta`` is ignored.

    Differentiable in ``i``, ``v0`` and a tensor ``beta``; saves only ``u`` [L, B, H].
    """
    _check(i, v0, beta)
    return apply_recurrence(FusedRecurrentLIFFunction, fused_recurrent_lif_fwd, i, v0, beta, p)


def fused_recurrent_lif_layer(x: torch.Tensor, v0: torch.Tensor, z0: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, rweight: torch.Tensor, beta, p: LIFConstants):
    """A LIF layer with recurrent weights ``rweight`` [H, H] over a segment with Triton:
    ``(z [L, B, H], v_T [B, H])`` (the final spikes are ``z[-1]``).

    ``i_t = W x_t + b + V z_{t-1}``: the input projection of all steps is one matmul, ``V z_{t-1}``
    one cuBLAS ``addmm`` per step (dense; z is binary and sparse, an event-sparse product could
    go here), the membrane one Triton launch per step. Differentiable in every tensor argument;
    under no_grad the same loop runs without saving.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("fused_recurrent_lif_layer (triton): weight must be a 2-D tensor [H, in], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    H = weight.shape[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != weight.shape[1]:
        raise ValueError(f"fused_recurrent_lif_layer (triton): x must be a 3-D tensor [L, B, {weight.shape[1]}], "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check(x.new_empty(x.shape[0], x.shape[1], H), v0, beta)  # dtype, device, v0 and beta as the currents'
    for name, t, want in (("z0", z0, v0.shape), ("recurrent weight", rweight, (H, H)), ("weight", weight, None),
                          ("bias", bias, (H,))):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or (want is not None and t.shape != want) or t.dtype != x.dtype \
                or t.device != x.device:
            raise ValueError(f"fused_recurrent_lif_layer (triton): {name} must be a {x.dtype} tensor on {x.device}"
                             f"{'' if want is None else f' of shape {tuple(want)}'}, got "
                             f"{(t.dtype, tuple(t.shape), str(t.device)) if isinstance(t, torch.Tensor) else t!r}")
    x, v0, z0, weight, rweight = (t.contiguous() for t in (x, v0, z0, weight, rweight))
    if isinstance(beta, torch.Tensor):
        beta = beta.contiguous()
    tensors = [t for t in (x, v0, z0, weight, bias, rweight, beta) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return FusedRecurrentLIFLayerFunction.apply(x, v0, z0, weight, bias, rweight, beta, p)
    with torch.no_grad():
        return FusedRecurrentLIFLayerFunction.forward(NoCtx(), x, v0, z0, weight, bias, rweight, beta, p)
