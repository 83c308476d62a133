"""Triton Delta GRU / Delta LSTM recurrences (GPU): a whole segment in one autograd node.

Same equations and state as `sparsebptt.cells.delta` (see its docstring); the result equals the
cell's ``backend="torch"`` reference (dense matmuls on the masked deltas, plain autograd) up to
rounding, outputs and every gradient. Forward of a segment of L steps:

- ``x_ref`` does not depend on ``h``: one kernel (`delta_encode_fwd_kernel`) walks all L steps of
  the input and writes the masked deltas ``dx * sx`` [L, B, I] and the masks ``sx`` (int8); their
  product with ``W_ih`` is one GEMM for the segment, ``px`` [L, B, G*H].
- per step: ``ph = (dh * sh) @ W_hh^T`` (a torch matmul), then one kernel
  (`delta_gru_fwd_kernel` / `delta_lstm_fwd_kernel`) adds ``px_t`` and ``ph`` to the memories,
  computes the gates and the new ``h`` (and ``c``), and delta-encodes the new ``h`` against
  ``h_ref`` for the next step (``h_0`` is encoded by `delta_encode_fwd_kernel` with L = 1).
  It saves the gate activations (GRU: ``r, z, n`` and the n gate's hidden input
  ``m_h,n + b_hn``; LSTM: ``sigma(i), sigma(f), tanh(g), sigma(o)`` and ``c``).

Saved per step for the backward: the masked deltas and their int8 masks (``(I + H) * (itemsize
+ 1)`` bytes per row), the gates (``G*H``), ``h`` (the output) and ``m_h,n + b_hn`` or ``c``
(``H`` each): no memory states, no pre-activations.

The matmuls are dense here: the masked deltas are mostly zero at a high threshold, so gathering
the active columns of ``W_ih`` / ``W_hh`` (as `sparse_linear` does on CPU) is where column sparsity
could be exploited later, forward (``px``, ``ph``) and backward (``ddx``, ``ddh``, ``dW``).

Backward, per step from the last: one kernel (`delta_gru_bwd_kernel` / `delta_lstm_bwd_kernel`)
first takes the gradient of step t+1's encoding of ``h_t`` (``ddh = G_h(t+1) @ W_hh``, masked by
``sh``: only the deltas that passed the threshold carry gradient, to ``h_t`` and, negated, to
``h_ref``; the reference update ``where(sh, h_t, h_ref)`` routes the ``h_ref`` gradient), then the
gate backward, and accumulates the memory gradients ``G_x(t) = G_x(t+1) + dgates_x(t)`` (and
``G_h``) step by step, as autograd does for the reference. The input side's encoding
backward is one kernel over the segment (`delta_encode_bwd_kernel`) after one GEMM
``ddx = G_x @ W_ih``; the weight gradients are one GEMM each over the segment
(``dW_ih = G_x^T (dx * sx)``, ``dW_hh = G_h^T (dh * sh)``); the bias gradients are summed per
(batch, unit) in the kernel and over the batch afterwards (deterministic: no atomics).

Runs on CUDA tensors; under ``TRITON_INTERPRET=1`` (set before this module is imported) also on
CPU tensors in Triton's interpreter, which is how the default test suite checks it. The
thresholds are passed as a tensor of the data's dtype, so that float64 runs compare in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...trace import current_trace

__all__ = ["fused_recurrent_delta_gru", "fused_recurrent_delta_lstm"]

_DTYPES = (torch.float32, torch.float64)
_GATES = {"gru": 3, "lstm": 4}


@triton.jit
def delta_encode_fwd_kernel(v, ref, c, d, s, L, N, C: tl.constexpr, BN: tl.constexpr,
                            ENCODE_ALL: tl.constexpr):
    """L steps of ``d = v_t - ref; s = |d| > theta; ref = where(s, v_t, ref)``; ``ref`` in place."""
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    c_th = tl.load(c + C)
    b_ref = tl.load(ref + o_n, mask=m_n, other=0)
    p_v, p_d, p_s = v + o_n, d + o_n, s + o_n
    for _ in range(0, L):
        b_v = tl.load(p_v, mask=m_n, other=0)
        b_d = b_v - b_ref
        if ENCODE_ALL:  # threshold 0 transmits every entry, even an unchanged one
            b_s = tl.full([BN], 1, tl.int1)
        else:
            b_s = tl.abs(b_d) > c_th
        tl.store(p_d, tl.where(b_s, b_d, 0.0), mask=m_n)
        tl.store(p_s, b_s.to(tl.int8), mask=m_n)
        b_ref = tl.where(b_s, b_v, b_ref)
        p_v += N
        p_d += N
        p_s += N
    tl.store(ref + o_n, b_ref, mask=m_n)


@triton.jit
def delta_encode_bwd_kernel(dd, s, dref, dv, L, N, BN: tl.constexpr):
    """Backward of `delta_encode_fwd_kernel`, walking back from the last step (``dd``, ``s``,
    ``dv`` point at it): ``dd`` is the gradient of the masked delta before masking; ``dref`` (the
    gradient of the final ``ref``) is updated in place to the gradient of the first."""
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_g = tl.load(dref + o_n, mask=m_n, other=0)
    p_dd, p_s, p_dv = dd + o_n, s + o_n, dv + o_n
    for _ in range(0, L):
        b_s = tl.load(p_s, mask=m_n, other=0) != 0
        b_dd = tl.where(b_s, tl.load(p_dd, mask=m_n, other=0), 0.0)
        tl.store(p_dv, b_dd + tl.where(b_s, b_g, 0.0), mask=m_n)
        b_g = tl.where(b_s, 0.0, b_g) - b_dd
        p_dd -= N
        p_s -= N
        p_dv -= N
    tl.store(dref + o_n, b_g, mask=m_n)


# The step kernels: one program per block of BH entries of the flattened [B, H]; unit j of row
# b reads gate k at b * G*H + k*H + j of the [B, G*H] memories. (Helpers are inlined: each
# nested jit call costs milliseconds in the interpreter the default tests run in.)

@triton.jit
def _encode_next(b_h, h_ref, c, dh, sh, o, m, BH: tl.constexpr, ENCODE_ALL: tl.constexpr):
    """Delta-encode the new ``h`` for the next step (as `delta_encode_fwd_kernel`, one step)."""
    b_ref = tl.load(h_ref + o, mask=m, other=0)
    b_d = b_h - b_ref
    if ENCODE_ALL:
        b_s = tl.full([BH], 1, tl.int1)
    else:
        b_s = tl.abs(b_d) > tl.load(c + 1)
    tl.store(dh + o, tl.where(b_s, b_d, 0.0), mask=m)
    tl.store(sh + o, b_s.to(tl.int8), mask=m)
    tl.store(h_ref + o, tl.where(b_s, b_h, b_ref), mask=m)


@triton.jit
def delta_gru_fwd_kernel(mx, px, mh, ph, b_ih, b_hh, h, h_ref, c, hout, dh, sh, gates, hn, N, H,
                         BH: tl.constexpr, HAS_BIAS: tl.constexpr, ENCODE_NEXT: tl.constexpr,
                         ENCODE_ALL: tl.constexpr, SAVE: tl.constexpr):
    i_n = tl.program_id(0)
    o_s = i_n * BH + tl.arange(0, BH)  # flattened (b, j) of [B, H]
    m_s = o_s < N
    o_h = o_s % H
    o_g = (o_s // H) * 3 * H + o_h  # gate r of (b, j); z at + H, n at + 2H
    for k in tl.static_range(3):  # the memories m' = m + W d, in place
        p_x, p_h = mx + o_g + k * H, mh + o_g + k * H
        tl.store(p_x, tl.load(p_x, mask=m_s, other=0) + tl.load(px + o_g + k * H, mask=m_s, other=0), mask=m_s)
        tl.store(p_h, tl.load(p_h, mask=m_s, other=0) + tl.load(ph + o_g + k * H, mask=m_s, other=0), mask=m_s)
    b_ir = tl.load(mx + o_g, mask=m_s, other=0)
    b_iz = tl.load(mx + o_g + H, mask=m_s, other=0)
    b_in = tl.load(mx + o_g + 2 * H, mask=m_s, other=0)
    b_hr = tl.load(mh + o_g, mask=m_s, other=0)
    b_hz = tl.load(mh + o_g + H, mask=m_s, other=0)
    b_hn = tl.load(mh + o_g + 2 * H, mask=m_s, other=0)
    if HAS_BIAS:
        b_ir += tl.load(b_ih + o_h, mask=m_s, other=0)
        b_iz += tl.load(b_ih + H + o_h, mask=m_s, other=0)
        b_in += tl.load(b_ih + 2 * H + o_h, mask=m_s, other=0)
        b_hr += tl.load(b_hh + o_h, mask=m_s, other=0)
        b_hz += tl.load(b_hh + H + o_h, mask=m_s, other=0)
        b_hn += tl.load(b_hh + 2 * H + o_h, mask=m_s, other=0)
    b_r = tl.sigmoid(b_ir + b_hr)
    b_z = tl.sigmoid(b_iz + b_hz)
    b_n = 2.0 * tl.sigmoid(2.0 * (b_in + b_r * b_hn)) - 1.0  # tanh (no tl.tanh; libdevice's
    b_h = tl.load(h + o_s, mask=m_s, other=0)                 # does not run in the interpreter)
    b_h = b_n + b_z * (b_h - b_n)
    tl.store(hout + o_s, b_h, mask=m_s)
    if SAVE:
        tl.store(gates + o_g, b_r, mask=m_s)
        tl.store(gates + o_g + H, b_z, mask=m_s)
        tl.store(gates + o_g + 2 * H, b_n, mask=m_s)
        tl.store(hn + o_s, b_hn, mask=m_s)
    if ENCODE_NEXT:
        _encode_next(b_h, h_ref, c, dh, sh, o_s, m_s, BH, ENCODE_ALL)


@triton.jit
def delta_lstm_fwd_kernel(mx, px, mh, ph, b_ih, b_hh, h_ref, c, cprev, hout, cout, dh, sh, gates, N, H,
                          BH: tl.constexpr, HAS_BIAS: tl.constexpr, ENCODE_NEXT: tl.constexpr,
                          ENCODE_ALL: tl.constexpr, SAVE: tl.constexpr):
    i_n = tl.program_id(0)
    o_s = i_n * BH + tl.arange(0, BH)  # flattened (b, j) of [B, H]
    m_s = o_s < N
    o_h = o_s % H
    o_g = (o_s // H) * 4 * H + o_h  # gate i of (b, j); f at + H, g at + 2H, o at + 3H
    for k in tl.static_range(4):  # the memories m' = m + W d, in place
        p_x, p_h = mx + o_g + k * H, mh + o_g + k * H
        tl.store(p_x, tl.load(p_x, mask=m_s, other=0) + tl.load(px + o_g + k * H, mask=m_s, other=0), mask=m_s)
        tl.store(p_h, tl.load(p_h, mask=m_s, other=0) + tl.load(ph + o_g + k * H, mask=m_s, other=0), mask=m_s)
    b_xi = tl.load(mx + o_g, mask=m_s, other=0)
    b_xf = tl.load(mx + o_g + H, mask=m_s, other=0)
    b_xg = tl.load(mx + o_g + 2 * H, mask=m_s, other=0)
    b_xo = tl.load(mx + o_g + 3 * H, mask=m_s, other=0)
    b_hi = tl.load(mh + o_g, mask=m_s, other=0)
    b_hf = tl.load(mh + o_g + H, mask=m_s, other=0)
    b_hg = tl.load(mh + o_g + 2 * H, mask=m_s, other=0)
    b_ho = tl.load(mh + o_g + 3 * H, mask=m_s, other=0)
    if HAS_BIAS:
        b_xi += tl.load(b_ih + o_h, mask=m_s, other=0)
        b_xf += tl.load(b_ih + H + o_h, mask=m_s, other=0)
        b_xg += tl.load(b_ih + 2 * H + o_h, mask=m_s, other=0)
        b_xo += tl.load(b_ih + 3 * H + o_h, mask=m_s, other=0)
        b_hi += tl.load(b_hh + o_h, mask=m_s, other=0)
        b_hf += tl.load(b_hh + H + o_h, mask=m_s, other=0)
        b_hg += tl.load(b_hh + 2 * H + o_h, mask=m_s, other=0)
        b_ho += tl.load(b_hh + 3 * H + o_h, mask=m_s, other=0)
    b_i = tl.sigmoid(b_xi + b_hi)
    b_f = tl.sigmoid(b_xf + b_hf)
    b_g = 2.0 * tl.sigmoid(2.0 * (b_xg + b_hg)) - 1.0  # tanh
    b_o = tl.sigmoid(b_xo + b_ho)
    b_c = b_f * tl.load(cprev + o_s, mask=m_s, other=0) + b_i * b_g
    b_h = b_o * (2.0 * tl.sigmoid(2.0 * b_c) - 1.0)
    tl.store(cout + o_s, b_c, mask=m_s)
    tl.store(hout + o_s, b_h, mask=m_s)
    if SAVE:
        tl.store(gates + o_g, b_i, mask=m_s)
        tl.store(gates + o_g + H, b_f, mask=m_s)
        tl.store(gates + o_g + 2 * H, b_g, mask=m_s)
        tl.store(gates + o_g + 3 * H, b_o, mask=m_s)
    if ENCODE_NEXT:
        _encode_next(b_h, h_ref, c, dh, sh, o_s, m_s, BH, ENCODE_ALL)


@triton.jit
def _grad_h(dh, dy, ddh, sh, dhref, o_s, m_s, HAS_DY: tl.constexpr, HAS_NEXT: tl.constexpr):
    """Gradient of ``h_t``: carried (``dh``: the final state's, or the next gate's direct path),
    the output's, and that of step t+1's encoding of ``h_t`` (only through passed deltas);
    updates the ``h_ref`` gradient ``dhref`` in place."""
    b_g = tl.load(dh + o_s, mask=m_s, other=0)
    if HAS_DY:
        b_g += tl.load(dy + o_s, mask=m_s, other=0)
    if HAS_NEXT:
        b_s = tl.load(sh + o_s, mask=m_s, other=0) != 0
        b_dd = tl.where(b_s, tl.load(ddh + o_s, mask=m_s, other=0), 0.0)
        b_gr = tl.load(dhref + o_s, mask=m_s, other=0)
        b_g += b_dd + tl.where(b_s, b_gr, 0.0)
        tl.store(dhref + o_s, tl.where(b_s, 0.0, b_gr) - b_dd, mask=m_s)
    return b_g


@triton.jit
def delta_gru_bwd_kernel(gates, hn, h, dy, dh, ddh, sh, dhref, gx_in, gh_in, gx, gh, dbx, dbh, N, H,
                         BH: tl.constexpr, HAS_DY: tl.constexpr, HAS_NEXT: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
    i_n = tl.program_id(0)
    o_s = i_n * BH + tl.arange(0, BH)
    m_s = o_s < N
    o_g = (o_s // H) * 3 * H + o_s % H
    b_g = _grad_h(dh, dy, ddh, sh, dhref, o_s, m_s, HAS_DY, HAS_NEXT)
    b_r = tl.load(gates + o_g, mask=m_s, other=0)
    b_z = tl.load(gates + o_g + H, mask=m_s, other=0)
    b_n = tl.load(gates + o_g + 2 * H, mask=m_s, other=0)
    # h' = n + z (h - n)
    b_dn = b_g * (1.0 - b_z)
    b_dz = b_g * (tl.load(h + o_s, mask=m_s, other=0) - b_n)
    tl.store(dh + o_s, b_g * b_z, mask=m_s)  # the direct path to h_{t-1}
    b_dan = b_dn * (1.0 - b_n * b_n)
    b_dar = b_dan * tl.load(hn + o_s, mask=m_s, other=0) * b_r * (1.0 - b_r)
    b_daz = b_dz * b_z * (1.0 - b_z)
    b_dhn = b_dan * b_r
    # memory gradients G(t) = G(t+1) + dgates(t); the gates' inputs r, z share x and h parts
    tl.store(gx + o_g, tl.load(gx_in + o_g, mask=m_s, other=0) + b_dar, mask=m_s)
    tl.store(gx + o_g + H, tl.load(gx_in + o_g + H, mask=m_s, other=0) + b_daz, mask=m_s)
    tl.store(gx + o_g + 2 * H, tl.load(gx_in + o_g + 2 * H, mask=m_s, other=0) + b_dan, mask=m_s)
    tl.store(gh + o_g, tl.load(gh_in + o_g, mask=m_s, other=0) + b_dar, mask=m_s)
    tl.store(gh + o_g + H, tl.load(gh_in + o_g + H, mask=m_s, other=0) + b_daz, mask=m_s)
    tl.store(gh + o_g + 2 * H, tl.load(gh_in + o_g + 2 * H, mask=m_s, other=0) + b_dhn, mask=m_s)
    if HAS_BIAS:  # summed per (b, j) over the steps, over b afterwards
        tl.store(dbx + o_g, tl.load(dbx + o_g, mask=m_s, other=0) + b_dar, mask=m_s)
        tl.store(dbx + o_g + H, tl.load(dbx + o_g + H, mask=m_s, other=0) + b_daz, mask=m_s)
        tl.store(dbx + o_g + 2 * H, tl.load(dbx + o_g + 2 * H, mask=m_s, other=0) + b_dan, mask=m_s)
        tl.store(dbh + o_s, tl.load(dbh + o_s, mask=m_s, other=0) + b_dhn, mask=m_s)  # n's hidden part


@triton.jit
def delta_lstm_bwd_kernel(gates, c, cprev, dy, dh, dc, ddh, sh, dhref, gx_in, gh_in, gx, gh, dbx, N, H,
                          BH: tl.constexpr, HAS_DY: tl.constexpr, HAS_NEXT: tl.constexpr,
                          HAS_BIAS: tl.constexpr):
    i_n = tl.program_id(0)
    o_s = i_n * BH + tl.arange(0, BH)
    m_s = o_s < N
    o_g = (o_s // H) * 4 * H + o_s % H
    b_g = _grad_h(dh, dy, ddh, sh, dhref, o_s, m_s, HAS_DY, HAS_NEXT)
    tl.store(dh + o_s, tl.zeros_like(b_g), mask=m_s)  # no direct path to h_{t-1}
    b_i = tl.load(gates + o_g, mask=m_s, other=0)
    b_f = tl.load(gates + o_g + H, mask=m_s, other=0)
    b_gg = tl.load(gates + o_g + 2 * H, mask=m_s, other=0)
    b_o = tl.load(gates + o_g + 3 * H, mask=m_s, other=0)
    b_tc = 2.0 * tl.sigmoid(2.0 * tl.load(c + o_s, mask=m_s, other=0)) - 1.0  # tanh(c')
    # h' = o tanh(c'),  c' = f c + i g
    b_dc = tl.load(dc + o_s, mask=m_s, other=0) + b_g * b_o * (1.0 - b_tc * b_tc)
    tl.store(dc + o_s, b_dc * b_f, mask=m_s)
    b_dai = b_dc * b_gg * b_i * (1.0 - b_i)
    b_daf = b_dc * tl.load(cprev + o_s, mask=m_s, other=0) * b_f * (1.0 - b_f)
    b_dag = b_dc * b_i * (1.0 - b_gg * b_gg)
    b_dao = b_g * b_tc * b_o * (1.0 - b_o)
    # memory gradients G(t) = G(t+1) + dgates(t) (the x and h parts of a gate are its sum)
    tl.store(gx + o_g, tl.load(gx_in + o_g, mask=m_s, other=0) + b_dai, mask=m_s)
    tl.store(gx + o_g + H, tl.load(gx_in + o_g + H, mask=m_s, other=0) + b_daf, mask=m_s)
    tl.store(gx + o_g + 2 * H, tl.load(gx_in + o_g + 2 * H, mask=m_s, other=0) + b_dag, mask=m_s)
    tl.store(gx + o_g + 3 * H, tl.load(gx_in + o_g + 3 * H, mask=m_s, other=0) + b_dao, mask=m_s)
    tl.store(gh + o_g, tl.load(gh_in + o_g, mask=m_s, other=0) + b_dai, mask=m_s)
    tl.store(gh + o_g + H, tl.load(gh_in + o_g + H, mask=m_s, other=0) + b_daf, mask=m_s)
    tl.store(gh + o_g + 2 * H, tl.load(gh_in + o_g + 2 * H, mask=m_s, other=0) + b_dag, mask=m_s)
    tl.store(gh + o_g + 3 * H, tl.load(gh_in + o_g + 3 * H, mask=m_s, other=0) + b_dao, mask=m_s)
    if HAS_BIAS:  # both biases get the gates' gradient: summed per (b, j) over the steps
        tl.store(dbx + o_g, tl.load(dbx + o_g, mask=m_s, other=0) + b_dai, mask=m_s)
        tl.store(dbx + o_g + H, tl.load(dbx + o_g + H, mask=m_s, other=0) + b_daf, mask=m_s)
        tl.store(dbx + o_g + 2 * H, tl.load(dbx + o_g + 2 * H, mask=m_s, other=0) + b_dag, mask=m_s)
        tl.store(dbx + o_g + 3 * H, tl.load(dbx + o_g + 3 * H, mask=m_s, other=0) + b_dao, mask=m_s)


# ---- launchers ---------------------------------------------------------------------------

def _block(N: int) -> int:
    return min(triton.next_power_of_2(N), 128)


def _encode(v, ref, c, d, s, C: int, theta: float):
    """`delta_encode_fwd_kernel` over ``v`` [L, B, N] from ``ref`` [B, N] (updated in place)."""
    L = v.shape[0]
    N = ref.numel()
    BN = _block(N)
    delta_encode_fwd_kernel[(triton.cdiv(N, BN),)](v, ref, c, d, s, L, N, C=C, BN=BN, ENCODE_ALL=theta == 0)


def _encode_bwd(dd, s, dref, dv):
    """`delta_encode_bwd_kernel` over [L, B, N]; ``dref`` [B, N] updated in place."""
    L = dd.shape[0]
    N = dref.numel()
    BN = _block(N)
    # pointers at the last step (64-bit pointer arithmetic from there, no (L-1)*N in int32)
    delta_encode_bwd_kernel[(triton.cdiv(N, BN),)](dd[L - 1], s[L - 1], dref, dv[L - 1], L, N, BN=BN)


def fused_recurrent_delta_fwd(kind: str, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold: float,
                              hidden_threshold: float, save: bool):
    """Forward of a segment: ``(ys [L, B, H], state', saved)``; ``saved`` holds what the backward
    needs with ``save``, else only the masks ``(sx, sh)``."""
    L, B, I = x.shape
    GH, H = weight_hh.shape
    if kind == "gru":
        h0, xr0, hr0, mx0, mh0 = state
    else:
        h0, c0, xr0, hr0, mx0, mh0 = state
    dtype, device = x.dtype, x.device
    c = torch.tensor([threshold, hidden_threshold], dtype=dtype, device=device)
    # input side: every step's masked delta at once, and one GEMM for its memory updates
    dxm = torch.empty_like(x)                                            # [L, B, I]
    sx = torch.empty(L, B, I, dtype=torch.int8, device=device)
    x_ref = xr0.clone()
    _encode(x, x_ref, c, dxm, sx, 0, threshold)
    # dense GEMM; with a high threshold most rows of dxm^T are zero: gathering the active
    # columns of W_ih (per segment or per step) is where column sparsity could be used later
    px = torch.matmul(dxm, weight_ih.t())                                # [L, B, G*H]
    # hidden side: h_0 encoded here, h_t (t < L-1) by the gate kernel of step t
    dhm = torch.empty(L, B, H, dtype=dtype, device=device)
    sh = torch.empty(L, B, H, dtype=torch.int8, device=device)
    h_ref = hr0.clone()
    _encode(h0.unsqueeze(0), h_ref, c, dhm, sh, 1, hidden_threshold)
    mx, mh = mx0.clone(), mh0.clone()
    ys = torch.empty(L, B, H, dtype=dtype, device=device)
    gates = torch.empty(L, B, GH, dtype=dtype, device=device) if save else ys
    has_bias = bias_ih is not None
    b_ih = bias_ih if has_bias else c
    b_hh = bias_hh if has_bias else c
    N = B * H
    BH = _block(N)
    grid = (triton.cdiv(N, BH),)
    if kind == "gru":
        hn = torch.empty(L, B, H, dtype=dtype, device=device) if save else ys
    else:
        cs = torch.empty(L, B, H, dtype=dtype, device=device)
    for t in range(L):
        nxt = t + 1 < L
        ph = torch.matmul(dhm[t], weight_hh.t())                         # [B, G*H] (dense, see above)
        h_prev = ys[t - 1] if t else h0
        if kind == "gru":
            delta_gru_fwd_kernel[grid](
                mx, px[t], mh, ph, b_ih, b_hh, h_prev, h_ref, c, ys[t], dhm[t + 1] if nxt else dhm[t],
                sh[t + 1] if nxt else sh[t], gates[t] if save else ys, hn[t] if save else ys, N, H,
                BH=BH, HAS_BIAS=has_bias, ENCODE_NEXT=nxt, ENCODE_ALL=hidden_threshold == 0, SAVE=save)
        else:
            delta_lstm_fwd_kernel[grid](
                mx, px[t], mh, ph, b_ih, b_hh, h_ref, c, cs[t - 1] if t else c0, ys[t], cs[t],
                dhm[t + 1] if nxt else dhm[t], sh[t + 1] if nxt else sh[t], gates[t] if save else ys, N, H,
                BH=BH, HAS_BIAS=has_bias, ENCODE_NEXT=nxt, ENCODE_ALL=hidden_threshold == 0, SAVE=save)
    hT = ys[L - 1].clone()
    if kind == "gru":
        new_state = (hT, x_ref, h_ref, mx, mh)
        saved = (dxm, sx, dhm, sh, gates, hn, h0) if save else (sx, sh)
    else:
        new_state = (hT, cs[L - 1].clone(), x_ref, h_ref, mx, mh)
        saved = (dxm, sx, dhm, sh, gates, cs, c0) if save else (sx, sh)
    return ys, new_state, saved


def fused_recurrent_delta_bwd(kind: str, saved, ys, weight_ih, weight_hh, has_bias: bool, dys, dstate,
                              need_x: bool = True, need_w: tuple = (True, True)):
    """Backward of a segment: ``(dx, dW_ih, dW_hh, db_ih, db_hh, dstate0)``. Without ``need_x``
    (neither x nor x_ref0 needs a gradient) ``dx`` and ``dx_ref0`` are None; without
    ``need_w[i]`` the weight gradient ``i`` (ih, hh) is None."""
    dxm, sx, dhm, sh, gates, aux, s0 = saved
    L, B, I = dxm.shape
    GH, H = weight_hh.shape
    dtype, device = dxm.dtype, dxm.device
    if kind == "gru":
        dhT, dxrefT, dhrefT, dmxT, dmhT = dstate
    else:
        dhT, dcT, dxrefT, dhrefT, dmxT, dmhT = dstate

    def grad0(g, *shape):
        return torch.zeros(*shape, dtype=dtype, device=device) if g is None else g.contiguous().clone()

    dh = grad0(dhT, B, H)           # carried gradient of h (in place)
    dhref = grad0(dhrefT, B, H)     # gradient of h_ref (in place)
    gx = torch.empty(L + 1, B, GH, dtype=dtype, device=device)  # G_x(t): gradient of m_x after step t
    gh = torch.empty(L + 1, B, GH, dtype=dtype, device=device)
    gx[L] = 0 if dmxT is None else dmxT
    gh[L] = 0 if dmhT is None else dmhT
    dbx = torch.zeros(B, GH, dtype=dtype, device=device) if has_bias else gx  # the gates' gradients
    dbh = torch.zeros(B, H, dtype=dtype, device=device) if has_bias else gh   # GRU: n's hidden part
    has_dy = dys is not None
    if has_dy:
        dys = dys.contiguous()
    if kind == "lstm":
        dc = grad0(dcT, B, H)
    N = B * H
    BH = _block(N)
    grid = (triton.cdiv(N, BH),)
    for t in range(L - 1, -1, -1):
        nxt = t + 1 < L
        ddh = torch.matmul(gh[t + 1], weight_hh) if nxt else dh              # [B, H] (dense)
        dy = dys[t] if has_dy else dh
        if kind == "gru":
            delta_gru_bwd_kernel[grid](
                gates[t], aux[t], ys[t - 1] if t else s0, dy, dh, ddh, sh[t + 1] if nxt else sh[t], dhref,
                gx[t + 1], gh[t + 1], gx[t], gh[t], dbx, dbh, N, H,
                BH=BH, HAS_DY=has_dy, HAS_NEXT=nxt, HAS_BIAS=has_bias)
        else:
            delta_lstm_bwd_kernel[grid](
                gates[t], aux[t], aux[t - 1] if t else s0, dy, dh, dc, ddh, sh[t + 1] if nxt else sh[t], dhref,
                gx[t + 1], gh[t + 1], gx[t], gh[t], dbx, N, H,
                BH=BH, HAS_DY=has_dy, HAS_NEXT=nxt, HAS_BIAS=has_bias)
    # step 0's encoding of h_0
    ddh0 = torch.matmul(gh[0], weight_hh).unsqueeze(0)                       # [1, B, H]
    dh0 = torch.empty(1, B, H, dtype=dtype, device=device)
    _encode_bwd(ddh0, sh[:1], dhref, dh0)
    dh0 = dh0[0] + dh
    # input side: one GEMM for the masked deltas' gradients, one kernel for the encoding
    GX, GHs = gx[:L], gh[:L]
    dx = dxref = dW_ih = dW_hh = None
    if need_x:
        ddx = torch.matmul(GX, weight_ih)                                    # [L, B, I] (dense)
        dx = torch.empty(L, B, I, dtype=dtype, device=device)
        dxref = grad0(dxrefT, B, I)
        _encode_bwd(ddx, sx, dxref, dx)
    if need_w[0]:
        dW_ih = GX.reshape(L * B, GH).t() @ dxm.reshape(L * B, I)            # [G*H, I]
    if need_w[1]:
        dW_hh = GHs.reshape(L * B, GH).t() @ dhm.reshape(L * B, H)           # [G*H, H]
    db_ih = db_hh = None
    if has_bias:
        db_ih = dbx.sum(0)
        db_hh = torch.cat([db_ih[:2 * H], dbh.sum(0)]) if kind == "gru" else db_ih.clone()
    if kind == "gru":
        dstate0 = (dh0, dxref, dhref, gx[0].clone(), gh[0].clone())
    else:
        dstate0 = (dh0, dc, dxref, dhref, gx[0].clone(), gh[0].clone())
    return dx, dW_ih, dW_hh, db_ih, db_hh, dstate0


class FusedRecurrentDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, threshold, hidden_threshold, layer, x, weight_ih, weight_hh, bias_ih, bias_hh, *state):
        with torch.autocast(x.device.type, enabled=False):  # the kernels run in the data's dtype
            ys, new_state, saved = fused_recurrent_delta_fwd(kind, x, state, weight_ih, weight_hh, bias_ih,
                                                             bias_hh, threshold, hidden_threshold, save=True)
        _count_activity(layer, saved[1], saved[3])
        ctx.kind = kind
        ctx.has_bias = bias_ih is not None
        ctx.trace = current_trace()
        ctx.save_for_backward(*saved, ys, weight_ih, weight_hh)
        ctx.set_materialize_grads(False)
        return (ys, *new_state)

    @staticmethod
    def backward(ctx, dys, *dstate):
        *saved, ys, weight_ih, weight_hh = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_x = needs[4] or needs[9 + len(dstate) - 4]  # x or x_ref0
        need_w = (needs[5], needs[6])
        with torch.autocast(ys.device.type, enabled=False):
            dx, dW_ih, dW_hh, db_ih, db_hh, dstate0 = fused_recurrent_delta_bwd(
                ctx.kind, saved, ys, weight_ih, weight_hh, ctx.has_bias, dys, dstate, need_x, need_w)
        t = ctx.trace
        if t is not None:  # the dense GEMMs done: the masked deltas' gradients, the weight gradients
            L, B, H = ys.shape
            GH, I = weight_ih.shape
            t.add_backward_macs(L * B * GH * (H + I * need_x + I * need_w[0] + H * need_w[1]))
        return (None, None, None, None, dx, dW_ih, dW_hh, db_ih, db_hh, *dstate0)


def _count_activity(layer, sx, sh):
    """The transmitted fraction of deltas (as the reference counts it per step) for `sb.trace`."""
    t = current_trace()
    if t is not None and layer is not None:
        t.add_activity(layer, sx.sum() + sh.sum(), sx.numel() + sh.numel())


def _check(kind, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, hidden_threshold):
    name = f"fused_recurrent_delta_{kind} (triton)"
    G = _GATES[kind]
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{name}: x must be a 3-D tensor [L, B, I], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    L, B, I = x.shape
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; use float32 or float64 (or backend='torch')")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"{name}: x is on {x.device}; the triton backend needs CUDA tensors (CPU tensors only "
                         "under TRITON_INTERPRET=1); use backend='cpu' or 'torch' on CPU")
    if not isinstance(weight_hh, torch.Tensor) or weight_hh.dim() != 2 or weight_hh.shape[0] != G * weight_hh.shape[1]:
        raise ValueError(f"{name}: weight_hh must be [{G}*H, H], got "
                         f"{tuple(weight_hh.shape) if isinstance(weight_hh, torch.Tensor) else weight_hh!r}")
    H = weight_hh.shape[1]
    if not isinstance(weight_ih, torch.Tensor) or weight_ih.shape != (G * H, I):
        raise ValueError(f"{name}: weight_ih must be [{G}*H, I] = {(G * H, I)}, got "
                         f"{tuple(weight_ih.shape) if isinstance(weight_ih, torch.Tensor) else weight_ih!r}")
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError(f"{name}: give both bias_ih and bias_hh or neither")
    tensors = [("weight_ih", weight_ih), ("weight_hh", weight_hh)]
    for bname, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            if not isinstance(b, torch.Tensor) or b.shape != (G * H,):
                raise ValueError(f"{name}: {bname} must be [{G * H}], got "
                                 f"{tuple(b.shape) if isinstance(b, torch.Tensor) else b!r}")
            tensors.append((bname, b))
    names = ("h", "x_ref", "h_ref", "m_x", "m_h") if kind == "gru" else ("h", "c", "x_ref", "h_ref", "m_x", "m_h")
    widths = {"h": H, "c": H, "x_ref": I, "h_ref": H, "m_x": G * H, "m_h": G * H}
    if not isinstance(state, (tuple, list)) or len(state) != len(names):
        raise ValueError(f"{name}: state must be a tuple ({', '.join(names)}), got "
                         f"{len(state) if isinstance(state, (tuple, list)) else type(state).__name__} tensors")
    for sname, s in zip(names, state):
        if not isinstance(s, torch.Tensor) or s.shape != (B, widths[sname]):
            raise ValueError(f"{name}: state {sname} must have shape {(B, widths[sname])}, got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        tensors.append((f"state {sname}", s))
    for tname, t in tensors:
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name}: {tname} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                            "they must match")
    for arg, v in (("threshold", threshold), ("hidden_threshold", hidden_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < float("inf"):
            raise ValueError(f"{name}: {arg} must be a number >= 0, got {v!r}")


def _fused(kind, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, hidden_threshold, layer):
    _check(kind, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, hidden_threshold)
    x, weight_ih, weight_hh = x.contiguous(), weight_ih.contiguous(), weight_hh.contiguous()
    if bias_ih is not None:
        bias_ih, bias_hh = bias_ih.contiguous(), bias_hh.contiguous()
    state = tuple(s.contiguous() for s in state)
    threshold, hidden_threshold = float(threshold), float(hidden_threshold)
    t = current_trace()
    if t is not None:
        L, B, I = x.shape
        GH, H = weight_hh.shape
        t.add_forward_macs(L * B * GH * (I + H))  # dense GEMMs
    inputs = (x, weight_ih, weight_hh, bias_ih, bias_hh, *state)
    if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs):
        ys, *new_state = FusedRecurrentDeltaFunction.apply(kind, threshold, hidden_threshold, layer, *inputs)
        return ys, tuple(new_state)
    with torch.autocast(x.device.type, enabled=False):
        ys, new_state, masks = fused_recurrent_delta_fwd(kind, x, state, weight_ih, weight_hh, bias_ih, bias_hh,
                                                         threshold, hidden_threshold, save=False)
    _count_activity(layer, *masks)
    return ys, new_state


def fused_recurrent_delta_gru(x: torch.Tensor, state, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                              bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None,
                              threshold: float = 0.0, hidden_threshold: float = 0.0, *, layer=None):
    """The Delta GRU over a segment with Triton: ``(ys [L, B, H], (h, x_ref, h_ref, m_x, m_h))``.

    Args:
        x: inputs [L, B, I], float32 or float64, on CUDA (CPU only under ``TRITON_INTERPRET=1``).
        state: ``(h, x_ref, h_ref, m_x, m_h)`` of shapes [B, H], [B, I], [B, H], [B, 3H], [B, 3H].
        weight_ih, weight_hh: [3H, I], [3H, H] (gates r, z, n as `GRU`).
        bias_ih, bias_hh: [3H] each, or both None.
        threshold, hidden_threshold: delta thresholds theta_x, theta_h (>= 0; 0 transmits all).
        layer: the cell, for `sb.trace`'s activity (the transmitted fraction of deltas).

    Differentiable in ``x``, every state tensor, the weights and the biases; equals
    `naive_recurrent_delta_gru` (the cell's ``backend="torch"``), outputs and gradients.
    """
    return _fused("gru", x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, hidden_threshold, layer)


def fused_recurrent_delta_lstm(x: torch.Tensor, state, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                               bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None,
                               threshold: float = 0.0, hidden_threshold: float = 0.0, *, layer=None):
    """The Delta LSTM over a segment with Triton: ``(ys [L, B, H], (h, c, x_ref, h_ref, m_x, m_h))``.

    Args as `fused_recurrent_delta_gru`, with state ``(h, c, x_ref, h_ref, m_x, m_h)`` (``m_x``,
    ``m_h`` [B, 4H]) and weights [4H, I], [4H, H] (gates i, f, g, o as `LSTM`).
    """
    return _fused("lstm", x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, hidden_threshold, layer)
