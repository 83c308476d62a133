"""Triton EGRU recurrence (GPU): torch matmuls for the projections, one Triton kernel per step for
everything pointwise, forward and backward.

Equations and backward are those of `sparsebptt.cells.egru` (`cpu.FusedPointwiseFunction` is the
torch version of the two kernels here; `naive.naive_egru` is the reference they are tested against)::

    gi = x W_ih^T + b_ih                          # all L steps at once: one GEMM      [L, B, 3H]
    gh = y W_hh^T + b_hh                          # per step (cuBLAS)                  [B, 3H]
    r, u = sigma(gi_r + gh_r), sigma(gi_z + gh_z);   n = tanh(gi_n + r gh_n)
    c~ = n + u (c - n);   e = H(c~ - threshold);   y' = c~ e;   c' = c~ - threshold e

Each kernel program handles a block of ``BN`` flattened (sample, unit) entries of [B, H].
Forward per step: the recurrent GEMM, then `fused_recurrent_egru_fwd_kernel` (gates, candidate,
internal state, event, output, reset, event count). Saved for the backward: ``r, u, n, gh_n, c~``
[L, B, H] each; the previous internal state and the event output are recomputed from ``c~``
(``c = c~ - threshold e``, ``y = c~ e``: exact, ``e`` is 0 or 1).

Backward per step, last to first: `fused_recurrent_egru_bwd_kernel` (pseudo-derivative
``psi(v) = gamma max(0, 1 - |v| / epsilon)``, the gate gradients ``dgi``/``dgh`` [B, 3H], ``dc``,
and the per-(sample, unit) threshold gradient accumulated in a float64 [B, H] buffer that only
its own program touches: no atomics, deterministic), then ``dL/dy = dgh W_hh`` (cuBLAS). At the
end the weight, bias and input gradients are batched GEMMs over the segment, and the threshold
gradient is the sum of the buffer over B.

The recurrent GEMMs are dense. ``y`` is zero off the events, and ``dL/dy`` is needed only at
events and within ``epsilon`` of the threshold, so both could run as event-sparse GEMMs (gathered
columns, as the CPU backend's `sparse_linear`) once activity is low enough to beat cuBLAS.

Runs on CUDA tensors; under ``TRITON_INTERPRET=1`` (set before this module is imported) also on
CPU tensors in Triton's interpreter, which is how the default test suite checks it. The
pseudo-derivative's constants are passed as a tensor of the data's dtype, so that float64 runs
do not round them to float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...trace import current_trace

__all__ = ["fused_recurrent_egru"]

_DTYPES = (torch.float32, torch.float64)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # sign(x) (1 - exp(-2|x|)) / (1 + exp(-2|x|)): no overflow for large |x|
    b_e = tl.exp(-2.0 * tl.abs(x))
    b_t = (1.0 - b_e) / (1.0 + b_e)
    return tl.where(x < 0, -b_t, b_t)


@triton.jit
def fused_recurrent_egru_fwd_kernel(gi, gh, c, thr, y, r, u, n, hn, ct, ns, N, H,
                                    BN: tl.constexpr, SAVE: tl.constexpr):
    """One step for the flattened (sample, unit) entries [i_n*BN, (i_n+1)*BN) of [B, H]: reads
    the step's gi and gh [B, 3H], updates c and the event count ns [B, H] in place, writes the
    step's y (and its saved r, u, n, gh_n, c~) [B, H]."""
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)  # b * H + h
    m_n = o_n < N
    o_g = o_n + (o_n // H) * (2 * H)  # b * 3H + h: gate r of (b, h) in [B, 3H]
    o_h = o_n % H

    b_c = tl.load(c + o_n, mask=m_n, other=0)
    b_thr = tl.load(thr + o_h, mask=m_n, other=0)
    b_r = _sigmoid(tl.load(gi + o_g, mask=m_n, other=0) + tl.load(gh + o_g, mask=m_n, other=0))
    b_u = _sigmoid(tl.load(gi + o_g + H, mask=m_n, other=0) + tl.load(gh + o_g + H, mask=m_n, other=0))
    b_hn = tl.load(gh + o_g + 2 * H, mask=m_n, other=0)
    b_n = _tanh(tl.load(gi + o_g + 2 * H, mask=m_n, other=0) + b_r * b_hn)
    b_ct = b_n + b_u * (b_c - b_n)  # c~
    b_e = tl.where(b_ct - b_thr > 0, 1.0, 0.0).to(b_ct.dtype)
    tl.store(y + o_n, b_ct * b_e, mask=m_n)
    tl.store(c + o_n, b_ct - b_thr * b_e, mask=m_n)
    tl.store(ns + o_n, tl.load(ns + o_n, mask=m_n, other=0) + b_e, mask=m_n)
    if SAVE:
        tl.store(r + o_n, b_r, mask=m_n)
        tl.store(u + o_n, b_u, mask=m_n)
        tl.store(n + o_n, b_n, mask=m_n)
        tl.store(hn + o_n, b_hn, mask=m_n)
        tl.store(ct + o_n, b_ct, mask=m_n)


@triton.jit
def fused_recurrent_egru_bwd_kernel(r, u, n, hn, ct, cp, thr, k, dys, dy, dc, dns, dgi, dgh, dthr, N, H,
                                    BN: tl.constexpr, CP_FROM_CT: tl.constexpr, HAS_DYS: tl.constexpr,
                                    HAS_DNS: tl.constexpr, NEED_DTHR: tl.constexpr):
    """The backward of one step: from dy [B, H] (the recurrent gradient; plus the step's dys) and
    dc [B, H] (overwritten with dc of the previous state), writes the step's dgi, dgh [B, 3H] and
    adds the threshold gradient to dthr [B, H] (float64). ``cp`` is the previous state c, or
    (CP_FROM_CT) the previous step's c~, from which c is recomputed as in the forward."""
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_g = o_n + (o_n // H) * (2 * H)
    o_h = o_n % H
    c_gamma = tl.load(k + 0)
    c_eps = tl.load(k + 1)

    b_thr = tl.load(thr + o_h, mask=m_n, other=0)
    b_r = tl.load(r + o_n, mask=m_n, other=0)
    b_u = tl.load(u + o_n, mask=m_n, other=0)
    b_n = tl.load(n + o_n, mask=m_n, other=0)
    b_hn = tl.load(hn + o_n, mask=m_n, other=0)
    b_ct = tl.load(ct + o_n, mask=m_n, other=0)
    b_v = b_ct - b_thr
    b_e = tl.where(b_v > 0, 1.0, 0.0).to(b_ct.dtype)
    b_cp = tl.load(cp + o_n, mask=m_n, other=0)
    if CP_FROM_CT:
        b_cp = b_cp - b_thr * tl.where(b_cp - b_thr > 0, 1.0, 0.0).to(b_cp.dtype)

    b_dy = tl.load(dy + o_n, mask=m_n, other=0)
    if HAS_DYS:
        b_dy += tl.load(dys + o_n, mask=m_n, other=0)
    b_dc = tl.load(dc + o_n, mask=m_n, other=0)
    b_de = b_dy * b_ct - b_dc * b_thr
    if HAS_DNS:
        b_de += tl.load(dns + o_n, mask=m_n, other=0)
    b_dv = b_de * (c_gamma * tl.maximum(1.0 - tl.abs(b_v) / c_eps, 0.0))  # psi(v)
    b_dct = b_dv + b_dy * b_e + b_dc
    if NEED_DTHR:
        b_dthr = -(b_dv + b_dc * b_e)
        tl.store(dthr + o_n, tl.load(dthr + o_n, mask=m_n, other=0) + b_dthr.to(tl.float64), mask=m_n)
    b_dcp = b_dct * b_u
    b_dn = b_dct - b_dcp  # dc~ (1 - u)
    b_du = b_dct * (b_cp - b_n)
    b_dan = b_dn * (1.0 - b_n * b_n)
    b_dau = b_du * b_u * (1.0 - b_u)
    b_dar = b_dan * b_hn * b_r * (1.0 - b_r)
    tl.store(dc + o_n, b_dcp, mask=m_n)
    tl.store(dgi + o_g, b_dar, mask=m_n)
    tl.store(dgi + o_g + H, b_dau, mask=m_n)
    tl.store(dgi + o_g + 2 * H, b_dan, mask=m_n)
    tl.store(dgh + o_g, b_dar, mask=m_n)
    tl.store(dgh + o_g + H, b_dau, mask=m_n)
    tl.store(dgh + o_g + 2 * H, b_dan * b_r, mask=m_n)


def _block(N: int) -> int:
    return min(triton.next_power_of_2(N), 256)


def _events(ct: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``y = c~ e`` from the saved c~, bit for bit as the forward kernel computed it."""
    return torch.where(ct - threshold > 0, ct, torch.zeros((), dtype=ct.dtype, device=ct.device))


def fused_recurrent_egru_fwd(x, c0, y0, weight_ih, weight_hh, bias_ih, bias_hh, threshold, save: bool):
    """Forward of a segment: ``(ys, c_T, n_T, saved)``, ``n_T`` the events per unit; ``saved``
    is ``(r, u, n, gh_n, c~)`` [L, B, H] each when ``save``, else None."""
    L, B, _ = x.shape
    H = weight_hh.shape[1]
    gi = torch.nn.functional.linear(x, weight_ih, bias_ih)  # [L, B, 3H], one GEMM
    c = c0.clone()  # [B, H], updated in place
    ys = x.new_empty(L, B, H)
    ns = x.new_zeros(B, H)
    saved = tuple(x.new_empty(L, B, H) for _ in range(5)) if save else None
    r, u, n, hn, ct = saved if save else (ys,) * 5  # dummy pointers when nothing is saved
    gh = x.new_empty(B, 3 * H)
    N = B * H
    BN = _block(N)
    for t in range(L):
        # dense on the GPU; y is zero off the events: an event-sparse GEMM could go here
        y = y0 if t == 0 else ys[t - 1]
        if bias_hh is None:
            torch.mm(y, weight_hh.t(), out=gh)
        else:
            torch.addmm(bias_hh, y, weight_hh.t(), out=gh)  # [B, 3H]
        fused_recurrent_egru_fwd_kernel[(triton.cdiv(N, BN),)](
            gi[t], gh, c, threshold, ys[t], r[t], u[t], n[t], hn[t], ct[t], ns, N, H, BN=BN, SAVE=save)
    return ys, c, ns, saved


def fused_recurrent_egru_bwd(x, c0, y0, weight_ih, weight_hh, threshold, saved, dys, dcT, dyT, dns,
                             gamma, epsilon, needs):
    """Backward of a segment; ``needs``: which of (x, c0, y0, W_ih, W_hh, b_ih, b_hh, threshold)
    want a gradient. Returns their gradients (None where not wanted)."""
    need_x, need_c0, need_y0, need_wih, need_whh, need_bih, need_bhh, need_thr = needs
    r, u, n, hn, ct = saved
    L, B, I = x.shape
    H = weight_hh.shape[1]
    dys = None if dys is None else dys.contiguous()
    dns = None if dns is None else dns.contiguous()
    dy = torch.zeros(B, H, dtype=x.dtype, device=x.device) if dyT is None else dyT.contiguous().clone()
    dc = torch.zeros(B, H, dtype=x.dtype, device=x.device) if dcT is None else dcT.contiguous().clone()
    dgi = x.new_empty(L, B, 3 * H)
    dgh = x.new_empty(L, B, 3 * H)
    dthr = torch.zeros(B, H, dtype=torch.float64, device=x.device) if need_thr else dy
    k = torch.tensor([gamma, epsilon], dtype=x.dtype, device=x.device)
    N = B * H
    BN = _block(N)
    tr = current_trace()
    macs = 0
    for t in range(L - 1, -1, -1):
        fused_recurrent_egru_bwd_kernel[(triton.cdiv(N, BN),)](
            r[t], u[t], n[t], hn[t], ct[t], c0 if t == 0 else ct[t - 1], threshold, k,
            dy if dys is None else dys[t], dy, dc, dy if dns is None else dns, dgi[t], dgh[t], dthr, N, H,
            BN=BN, CP_FROM_CT=t > 0, HAS_DYS=dys is not None, HAS_DNS=dns is not None, NEED_DTHR=need_thr)
        if t > 0 or need_y0:
            # dense; dL/dy matters only at events and within epsilon of the threshold (sparse later)
            torch.mm(dgh[t], weight_hh, out=dy)  # [B, H]
            macs += B * 3 * H * H
    dgi2, dgh2 = dgi.view(L * B, 3 * H), dgh.view(L * B, 3 * H)
    dx = dwih = dbih = dwhh = dbhh = None
    if need_x:
        dx = (dgi2 @ weight_ih).view(L, B, I)
        macs += L * B * 3 * H * I
    if need_wih:
        dwih = dgi2.t() @ x.reshape(L * B, I)  # [3H, I]
        macs += L * B * 3 * H * I
    if need_whh:
        yprev = torch.cat([y0.unsqueeze(0), _events(ct[:-1], threshold)]) if L > 1 else y0.unsqueeze(0)
        dwhh = dgh2.t() @ yprev.view(L * B, H)  # [3H, H]
        macs += L * B * 3 * H * H
    if need_bih:
        dbih = dgi2.sum(0)
    if need_bhh:
        dbhh = dgh2.sum(0)
    if tr is not None:
        tr.add_backward_macs(macs)
    return (dx, dc if need_c0 else None, dy if need_y0 else None, dwih, dwhh, dbih, dbhh,
            dthr.sum(0).to(x.dtype) if need_thr else None)


class FusedRecurrentEGRUFunction(torch.autograd.Function):
    """A segment of EGRU steps: (x, c0, y0, W_ih, W_hh, b_ih, b_hh, threshold) -> (ys, c_T, y_T, n_T)
    with ``n_T`` [B, H] the number of events per unit (gradient: the pseudo-derivative)."""

    @staticmethod
    def forward(ctx, x, c0, y0, weight_ih, weight_hh, bias_ih, bias_hh, threshold, gamma, epsilon):
        ys, cT, ns, saved = fused_recurrent_egru_fwd(x, c0, y0, weight_ih, weight_hh, bias_ih, bias_hh,
                                                     threshold, save=True)
        ctx.save_for_backward(x, c0, y0, weight_ih, weight_hh, threshold, *saved)
        ctx.gamma, ctx.epsilon = gamma, epsilon
        ctx.set_materialize_grads(False)
        return ys, cT, ys[-1].clone(), ns  # y_T a copy: a view would hold the whole block as state

    @staticmethod
    def backward(ctx, dys, dcT, dyT, dns):
        x, c0, y0, weight_ih, weight_hh, threshold, *saved = ctx.saved_tensors
        grads = fused_recurrent_egru_bwd(x, c0, y0, weight_ih, weight_hh, threshold, saved, dys, dcT, dyT,
                                         dns, ctx.gamma, ctx.epsilon, ctx.needs_input_grad[:8])
        return (*grads, None, None)


def _check(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold):
    name = "fused_recurrent_egru (triton)"
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] < 1:
        raise ValueError(f"{name}: x must be a 3-D tensor [L, B, input_size] with L >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    L, B, I = x.shape
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; use float32 or float64 "
                        "(or backend='torch')")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"{name}: x is on {x.device}; the triton backend needs CUDA tensors (CPU "
                         "tensors only under TRITON_INTERPRET=1); use backend='cpu' on CPU")
    if not isinstance(weight_hh, torch.Tensor) or weight_hh.dim() != 2 or weight_hh.shape[0] != 3 * weight_hh.shape[1]:
        raise ValueError(f"{name}: weight_hh must be [3H, H], got "
                         f"{tuple(weight_hh.shape) if isinstance(weight_hh, torch.Tensor) else weight_hh!r}")
    H = weight_hh.shape[1]
    expect = {"weight_ih": (3 * H, I), "bias_ih": (3 * H,), "bias_hh": (3 * H,), "threshold": (H,)}
    tensors = {"weight_ih": weight_ih, "bias_ih": bias_ih, "bias_hh": bias_hh, "threshold": threshold}
    if not isinstance(state, (tuple, list)) or len(state) not in (2, 3):
        raise ValueError(f"{name}: state must be (c, y) or (c, y, n), got "
                         f"{type(state).__name__} of {len(state) if isinstance(state, (tuple, list)) else '?'}")
    for i, s in enumerate(state):
        expect[f"state[{i}]"] = (B, H)
        tensors[f"state[{i}]"] = s
    tensors["weight_hh"], expect["weight_hh"] = weight_hh, (3 * H, H)
    for key, t in tensors.items():
        if t is None and key.startswith("bias"):
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expect[key]:
            raise ValueError(f"{name}: {key} must have shape {expect[key]} (L, B, I, H = {L}, {B}, {I}, {H}), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name}: {key} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                            "they must match (move the cell with .to(x))")
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError(f"{name}: give both biases or neither (bias_ih is "
                         f"{'None' if bias_ih is None else 'set'}, bias_hh is {'None' if bias_hh is None else 'set'})")


def fused_recurrent_egru(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7,
                         epsilon=0.5, layer=None):
    """A segment of EGRU steps with Triton: x [L, B, I] -> (ys [L, B, H], state').

    Args:
        x: inputs [L, B, input_size], float32 or float64, on CUDA (CPU under TRITON_INTERPRET=1).
        state: ``(c, y)`` or ``(c, y, n)`` [B, H] each: internal state, event output, and the
            event counts (``count_events=True``).
        weight_ih [3H, I], weight_hh [3H, H], bias_ih, bias_hh [3H] (or both None), threshold [H]:
            the `EGRU` parameters, gates in the order r, z, n.
        gamma, epsilon: the pseudo-derivative ``gamma * max(0, 1 - |v| / epsilon)``.
        layer: the cell, for the activity counters of an active `sb.trace`.

    Equal to `sparsebptt.kernels.egru.naive.naive_egru` (outputs and every gradient, the threshold's
    included) up to rounding; differentiable in x, the state and every parameter.
    """
    _check(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold)
    c0, y0 = state[0].contiguous(), state[1].contiguous()
    x = x.contiguous()
    weight_ih, weight_hh, threshold = weight_ih.contiguous(), weight_hh.contiguous(), threshold.contiguous()
    L, B, I = x.shape
    H = weight_hh.shape[1]
    params = (weight_ih, weight_hh, bias_ih, bias_hh, threshold)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, c0, y0, *params))
    if needs_grad:
        ys, c, y, ns = FusedRecurrentEGRUFunction.apply(x, c0, y0, *params, float(gamma), float(epsilon))
    else:
        ys, c, ns, _ = fused_recurrent_egru_fwd(x, c0, y0, *params, save=False)
        y = ys[-1].clone()
    tr = current_trace()
    if tr is not None:
        tr.add_forward_macs(L * B * 3 * H * (I + H))
        if layer is not None:
            tr.add_activity(layer, ns.detach().sum(), L * B * H)
    if len(state) > 2:
        return ys, (c, y, state[2] + ns)
    return ys, (c, y)
