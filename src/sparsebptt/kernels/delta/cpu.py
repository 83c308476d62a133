"""The "cpu" backend of Delta GRU / Delta LSTM: the fused segment scan `fused_recurrent_delta`
(C kernels ``delta.c`` / ``delta_body.h``) and the step-wise memory update `delta_update`.

Segment scan (the cells' ``scan_segment`` for backend "cpu" on CPU float32/float64 tensors): one
autograd node per segment, one C call for its forward and one for its backward. The weights are
taken transposed (``W^T`` [in, G*H]: an active input column is one contiguous row). Per step:

- forward: ``d = v - ref``, ``s = |d| > theta`` (every entry at theta 0), ``ref := v`` on ``s``;
  ``m += W (d * s)`` as one axpy of the row ``W^T[j]`` per active entry (b, j), column by column,
  so each active row is read once for every sample that has it; then the gate math
  (`sparsebptt.cells.delta`'s equations, branch-free exp so it vectorises);
- backward, from ``dL/dm`` (a running sum over the later steps' gate gradients ``gA``)::

      gd[b, j]  = dL/dm[b] . W^T[j]                  active (b, j) only
      dv[b, j] += dL/dref'[b, j] + gd;  dL/dref[b, j] = -gd        active (b, j)
      dL/dref[b, j] = dL/dref'[b, j]                             inactive: v gets nothing
      dW^T[j]  += sum_b d[b, j] dL/dm[b]             over the events, accumulated along the segment

  (``v`` is x_t or h_{t-1}; ``ref' = where(s, v, ref)``, ``d = v - ref``; thresholding is
  piecewise constant, so this is the exact gradient of the thresholded forward.) The input
  side's dots run only when x or the initial x_ref need a gradient.

MACs done (`sb.trace`): forward ``nnz * G*H`` per memory; backward the same per dot pass and per
weight-gradient pass that ran. Equal to the reference (``backend="torch"``,
`sparsebptt.kernels.delta.naive`) up to rounding (tests/test_kernels_delta_cpu.py); denormals
are flushed to zero while a kernel runs (as in EGRU's kernels).

Step-wise (`delta_update`): ``m' = m + W (d * mask)`` through `sparsebptt.kernels.sparse.sparse_linear`
(any device); used by ``delta_gru_step`` / ``delta_lstm_step`` with backend "cpu" and by the
cells for tensors the C kernels do not take.
"""
from __future__ import annotations

import ctypes
import os

import torch

from ..cbuild import build_file, declare_per_dtype
from ..common import SUFFIX, NoCtx, data_ptr, step_blocks
from ..sparse import sparse_linear
from ...trace import current_trace

__all__ = ["C_SOURCE", "delta_update", "fused_recurrent_delta", "fused_takes", "load_library"]

#: the C source (package data): `delta.c` instantiates `delta_body.h` for float and double
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delta.c")

_P, _L, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
_lib = None


def load_library():
    """Build (once, cached on disk) and load the kernels; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        _lib = declare_per_dtype(build_file("sparsebptt_delta", C_SOURCE), {
            "delta_fwd": (None, [_L] * 5 + [_P] * 11 + [_D, _D] + [_P] * 7 + [_L] + [_P] * 3),
            "delta_bwd": (None, [_L] * 5 + [_P] * 19 + [_L] + [_P] * 9 + [_L])})
    return _lib


def delta_update(m: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                 active_set: str = "auto") -> torch.Tensor:
    """``m + W (d * mask)``: m [B, G*H], d and mask [B, n] (mask bool), weight [G*H, n]."""
    return sparse_linear(d, weight, mask, add_to=m, active_set=active_set)


def fused_takes(x: torch.Tensor, *tensors) -> bool:
    """Whether the C segment kernels take these tensors (CPU, float32 or float64, one dtype)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == x.dtype) for t in tensors) and (
        x.device.type == "cpu" and x.dtype in SUFFIX)



class _DeltaSegment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, x, weight_ih, weight_hh, bias_ih, bias_hh, *state):
        lstm, thx, thh = meta
        L, B, nI = x.shape
        H = state[0].shape[1]
        G = 4 if lstm else 3
        dt = x.dtype
        x = x.detach().contiguous()
        wiT = weight_ih.detach().t().contiguous()  # [I, G*H]: an input column is one row
        whT = weight_hh.detach().t().contiguous()  # [H, G*H]
        bi = x.new_zeros(G * H) if bias_ih is None else bias_ih.detach().contiguous()
        bh = x.new_zeros(G * H) if bias_hh is None else bias_hh.detach().contiguous()
        st = [s.detach().clone(memory_format=torch.contiguous_format) for s in state]
        h, c = st[0], (st[1] if lstm else None)
        xr, hr, mx, mh = st[-4:]
        save = not isinstance(ctx, NoCtx)
        ys = x.new_empty(L, B, H)
        if save:
            sx, dxs = torch.empty(L, B, nI, dtype=torch.uint8), x.new_empty(L, B, nI)
            sh, dhs = torch.empty(L, B, H, dtype=torch.uint8), x.new_empty(L, B, H)
            s = x.new_empty(L, B, 4 * H)
            cs = x.new_empty(L, B, H) if lstm else None
        else:  # scratch of one step
            sx, dxs = torch.empty(B, nI, dtype=torch.uint8), x.new_empty(B, nI)
            sh, dhs = torch.empty(B, H, dtype=torch.uint8), x.new_empty(B, H)
            s = x.new_empty(B, 4 * H)
            cs = x.new_empty(B, H) if lstm else None
        counts = torch.empty(L, 2, dtype=torch.long)
        n = max(nI, H)  # scratch: column starts and the active (b, d) pairs of one memory's step
        bs, vs = torch.empty(n + 1 + B * n, dtype=torch.long), x.new_empty(B * n)
        getattr(load_library(), f"delta_fwd_{SUFFIX[dt]}")(
            int(lstm), L, B, nI, H, x.data_ptr(), h.data_ptr(), data_ptr(c), xr.data_ptr(), hr.data_ptr(),
            mx.data_ptr(), mh.data_ptr(), wiT.data_ptr(), whT.data_ptr(), data_ptr(bi), data_ptr(bh), thx, thh,
            ys.data_ptr(), data_ptr(sx), data_ptr(dxs), data_ptr(sh), data_ptr(dhs), data_ptr(s), data_ptr(cs), int(save), bs.data_ptr(),
            vs.data_ptr(), counts.data_ptr())
        nnz = counts.sum(0)
        ctx.macs = (int(nnz[0]) * G * H, int(nnz[1]) * G * H)
        ctx.counts = nnz
        if save:
            ctx.save_for_backward(weight_ih, weight_hh, ys, sx, dxs, sh, dhs, s, cs, *state[:2 if lstm else 1])
            ctx.wt = (wiT, whT)
            ctx.meta = (lstm, L, B, nI, H)
            ctx.has_bias = (bias_ih is not None, bias_hh is not None)
        return (ys, *st)

    @staticmethod
    def backward(ctx, gys, *gstate):
        lstm, L, B, nI, H = ctx.meta
        weight_ih, weight_hh, ys, sx, dxs, sh, dhs, s, cs, *st0 = ctx.saved_tensors
        h0, c0 = st0[0], (st0[1] if lstm else None)
        wiT, whT = ctx.wt
        G = 4 if lstm else 3
        dt = ys.dtype
        needs = ctx.needs_input_grad  # meta, x, w_ih, w_hh, b_ih, b_hh, *state
        need_x, need_wi, need_wh, need_bi, need_bh = needs[1:6]
        need_state = needs[6:]
        n_ref = len(need_state) - 4  # index of x_ref in the state
        g = [torch.zeros_like(h0) if gs is None else gs.detach().clone(memory_format=torch.contiguous_format)
             for gs in gstate[:len(need_state) - 4]]
        grefs = [ys.new_zeros(B, n) if gs is None else gs.detach().clone(memory_format=torch.contiguous_format)
                 for gs, n in zip(gstate[len(need_state) - 4:], (nI, H, G * H, G * H))]
        gh, gc = g[0], (g[1] if lstm else None)
        gxr, ghr, gmx, gmh = grefs
        gx = ys.new_zeros(L, B, nI) if need_x else None
        need_xside = bool(need_x or need_state[n_ref])
        gwiT = ys.new_zeros(nI, G * H) if need_wi else None
        gwhT = ys.new_zeros(H, G * H) if need_wh else None
        gbi, gbh = ys.new_zeros(G * H), ys.new_zeros(G * H)
        gys, gst = step_blocks(gys, B, H, dt)  # gst: entries per step (0: one block for every step)
        gA, gC, ghn = ys.new_empty(B, G * H), ys.new_empty(B, G * H), ys.new_empty(B, H)
        bs, vs = torch.empty(B, dtype=torch.long), ys.new_empty(B)
        h0 = h0.contiguous()  # held while the C call runs
        c0 = None if c0 is None else c0.contiguous()
        getattr(load_library(), f"delta_bwd_{SUFFIX[dt]}")(
            int(lstm), L, B, nI, H, h0.data_ptr(), data_ptr(c0),
            ys.data_ptr(), data_ptr(cs), s.data_ptr(), sx.data_ptr(), dxs.data_ptr(), sh.data_ptr(), dhs.data_ptr(),
            wiT.data_ptr(), whT.data_ptr(), data_ptr(gys), gh.data_ptr(), data_ptr(gc), gxr.data_ptr(), ghr.data_ptr(),
            gmx.data_ptr(), gmh.data_ptr(), data_ptr(gx), int(need_xside), data_ptr(gwiT), data_ptr(gwhT), gbi.data_ptr(),
            gbh.data_ptr(), gA.data_ptr(), gC.data_ptr(), ghn.data_ptr(), bs.data_ptr(), vs.data_ptr(), gst)
        t = current_trace()
        if t is not None:
            mx_, mh_ = ctx.macs
            t.add_backward_macs(mx_ * (int(need_xside) + int(need_wi)) + mh_ * (1 + int(need_wh)))
        state_grads = [gh] + ([gc] if lstm else []) + [gxr, ghr, gmx, gmh]
        gbi = gbi if need_bi and ctx.has_bias[0] else None
        gbh = gbh if need_bh and ctx.has_bias[1] else None
        return (None, gx, None if gwiT is None else gwiT.t(), None if gwhT is None else gwhT.t(), gbi, gbh,
                *[gs if need else None for gs, need in zip(state_grads, need_state)])


def fused_recurrent_delta(x, state, weight_ih, weight_hh, bias_ih=None, bias_hh=None, threshold=0.0,
                          hidden_threshold=0.0, *, lstm: bool, layer=None):
    """A segment of Delta GRU (``lstm=False``) or Delta LSTM steps in the C kernels:
    x [L, B, I] -> (ys [L, B, H], state'), ``state`` as the cell's ((h, x_ref, h_ref, m_x, m_h) or
    (h, c, x_ref, h_ref, m_x, m_h)). CPU float32/float64 tensors of one dtype (`fused_takes`);
    equal to stepping ``delta_gru_step`` / ``delta_lstm_step`` with ``backend="torch"`` up to
    rounding. ``layer``: the key of the activity in `sb.trace`."""
    state = tuple(state)
    n = 6 if lstm else 5
    if len(state) != n:
        raise ValueError(f"fused_recurrent_delta: the Delta {'LSTM' if lstm else 'GRU'} state has {n} "
                         f"tensors, got {len(state)}")
    if x.dim() != 3:
        raise ValueError(f"fused_recurrent_delta: x must be [L, B, I], got {tuple(x.shape)}")
    if not fused_takes(x, *state, weight_ih, weight_hh, bias_ih, bias_hh):
        raise ValueError("fused_recurrent_delta: needs CPU float32 or float64 tensors of one dtype, got "
                         f"x {x.dtype} on {x.device}, weight_ih {weight_ih.dtype} on {weight_ih.device}")
    meta = (bool(lstm), float(threshold), float(hidden_threshold))
    graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight_ih, weight_hh, bias_ih, bias_hh, *state))
    if graph:
        out = _DeltaSegment.apply(meta, x, weight_ih, weight_hh, bias_ih, bias_hh, *state)
        ctx_counts = None
    else:
        ctx = NoCtx()
        with torch.no_grad():
            out = _DeltaSegment.forward(ctx, meta, x, weight_ih, weight_hh, bias_ih, bias_hh, *state)
        ctx_counts = ctx.counts
    t = current_trace()
    if t is not None:
        L, B, nI = x.shape
        H = state[0].shape[1]
        G = 4 if lstm else 3
        counts = ctx_counts if ctx_counts is not None else out[0].grad_fn.counts
        t.add_forward_macs(int(counts.sum()) * G * H)
        t.add_activity(layer, counts.sum(), L * B * (nI + H))
    return out[0], tuple(out[1:])
