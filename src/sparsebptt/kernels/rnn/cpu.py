"""Fused CPU GRU and LSTM layers: a whole segment per autograd node, the gate math in C.

Entry points: `fused_gru_layer` and `fused_lstm_layer` (what ``GRU(backend="cpu")`` and
``LSTM(backend="cpu")`` run for every segment a strategy hands them). With ``G`` gates (GRU 3,
LSTM 4) and a segment of ``L`` steps:

- forward: ``gi = x W_ih^T + b_ih`` as one matmul per chunk of steps (`CHUNK_ROWS` rows,
  so the buffer stays in cache), or, on a sparse `SparseRoute` (a mostly-zero input: one-hot
  tokens, events), from the input's nonzeros (`SparseRows`); then per step one ``addmm``
  ``gh = h W_hh^T + b_hh`` [B, G*H] and one C call for the fused gate math (nonlinearities,
  state update, the saved activations);
- backward, per step from t = L-1 to 0: one C call for the gate derivatives (``dgi``, ``dgh``
  [B, G*H]) and one ``addmm`` for ``dh_{t-1} = dh_direct + dgh W_hh``; after each chunk, dW_ih,
  dW_hh, db and dx of its steps as one matmul each (dW_ih from the nonzeros on the sparse route).

GRU (gates r, z, n; as `cells.gru`)::

    r = sigma(gi_r + gh_r),  z = sigma(gi_z + gh_z),  n = tanh(gi_n + r * gh_n),  h' = n + z (h - n)
    saved per step: r, z, n, gh_n [B, 4H]; the backward recomputes h_{t-1} from h0, z and n
    g = dy + dh';  dn = g (1 - z);  da_n = dn (1 - n^2);  da_r = da_n gh_n r (1 - r);
    da_z = g (h - n) z (1 - z);  dgi = [da_r, da_z, da_n];  dgh = [da_r, da_z, da_n r];
    dh = g z + dgh W_hh

LSTM (gates i, f, g, o; as `cells.lstm`)::

    a = gi + gh;  i, f, o = sigma(a_i, a_f, a_o);  g = tanh(a_g);  c' = f c + i g;  h' = o tanh(c')
    saved per step: i, f, g, o [B, 4H] and c'; the backward recomputes h_{t-1} = o tanh(c)
    dc = dc' + (dy + dh') o (1 - tanh(c')^2);  dgates = [dc g i (1-i), dc c f (1-f),
    dc i (1 - g^2), (dy + dh') tanh(c') o (1-o)] (= dgi = dgh);  dc_prev = dc f;  dh = dgates W_hh

The exponential is a branch-free Cephes polynomial (float: < 2 ulp; double: < 3 ulp), so the
gate loops vectorise (an AVX2 clone is picked at load time on x86-64 Linux); sigma and tanh are
built from it. Measured per step at B=16, H=256, one thread (GRU forward gate math; see
BENCHMARKS.md "Fused CPU GRU/LSTM"): torch pointwise ops 29-51 us (float32) / 44 us (float64),
C with libm's expf/tanhf 132-189 us / 143 us (scalar: libm calls do not vectorise), this
vectorised C 14 us / 30 us. The float32 forward differs from torch's by rounding only (~1e-7).
"""
from __future__ import annotations

import ctypes
import os

import torch

from ...trace import current_trace
from ..cbuild import build_file, declare_per_dtype
from ..common import SUFFIX, KernelTable, NoCtx, empty, step_blocks, transposed
from ..sparse_input.cpu import SparseRoute, SparseRows

__all__ = ["fused_gru_layer", "fused_lstm_layer", "load_library", "C_SOURCE"]

#: the C source (package data): ``rnn.c`` instantiates ``rnn_body.h`` for float and double
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rnn.c")

_P, _L = ctypes.c_void_p, ctypes.c_long
_ARGS = {
    "gru_fwd": [_P, _P, _P, _L, _L, _P, _P],
    "gru_bwd": [_P, _P, _P, _P, _L, _L, _P, _P, _P],
    "lstm_fwd": [_P, _P, _P, _L, _L, _P, _P, _P],
    "lstm_bwd": [_P, _P, _P, _P, _P, _P, _L, _L, _P, _P],
    "gru_hist": [_P, _P, _L, _L, _L, _P],
    "lstm_hist": [_P, _P, _P, _L, _L, _L, _P],
}
_lib = None


def load_library():
    """Build (once, cached on disk) and load the C kernels; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        _lib = declare_per_dtype(build_file("sparsebptt_rnn", C_SOURCE),
                                 {name: (None, args) for name, args in _ARGS.items()})
    return _lib


_kernel = KernelTable(load_library)  # (name, dtype) -> the loaded C function


#: rows (steps x batch) of a chunk: the input projection and the batched gradients run over
#: chunks of about this many rows, so their [chunk, B, G*H] buffers stay in cache and no
#: [L, B, G*H] temporary is allocated however long the segment
CHUNK_ROWS = 512


def _chunks(L: int, B: int):
    """(c0, c1) step ranges of about `CHUNK_ROWS` rows covering 0..L."""
    n = max(1, CHUNK_ROWS // B)
    return [(c0, min(L, c0 + n)) for c0 in range(0, L, n)]


def _transposed(weight_hh, L: int):
    """A contiguous copy of W_hh^T: ``h @ W^T`` with a transposed view ran at 60 us a step, with the
    copy at 36 us (GRU, B=16, H=256, one thread; LSTM 88 -> 57 us). The copy (~150 us) is made
    once per value of the weight (`sparsebptt.kernels.common.transposed`), not once per segment:
    a checkpointed scan of T = 2,000 in segments of 45 made 90 of them. Every segment multiplies
    by the same copy, so a recomputed segment repeats the forward's products whatever its length."""
    return transposed(weight_hh)


def _input_rows(x, weight_ih, route, save: bool):
    """The `SparseRows` of x [L, B, in] when ``route`` runs this scan's input products sparse (kept
    for the backward when ``save`` and W_ih needs a gradient), else None (the matmuls)."""
    if route is None:
        return None
    L, B, n_in = x.shape
    return route.rows(x.view(L * B, n_in), keep=save and weight_ih.requires_grad)


def _project(x, rows, c0, c1, weight, bias, out):
    """``out = x W^T + b`` for steps c0..c1-1 (x [L, B, in], out [c1-c0, B, G*H]): from their
    nonzeros when ``rows`` (the `SparseRows` of all of x) is given, else as one matmul."""
    B = x.shape[1]
    o2 = out.view((c1 - c0) * B, -1)
    if rows is not None:
        rows.part(c0 * B, c1 * B).project(weight, bias, o2)
        return
    x2 = x[c0:c1].reshape((c1 - c0) * B, -1)
    if bias is None:
        torch.mm(x2, weight.t(), out=o2)
    else:
        torch.addmm(bias, x2, weight.t(), out=o2)


def _save(ctx, weight_ih, rows, x, *tensors):
    """``ctx.save_for_backward(*tensors, W_ih, x, ptr, col, val)``. The input is read only for
    dW_ih: when W_ih needs a gradient, as its nonzeros ``rows`` (a `SparseRows` kept by the
    forward) or else as x; otherwise neither is saved."""
    if not weight_ih.requires_grad:
        rows = x = None
    elif rows is not None:
        x = None
    ctx.rows_shape = None if rows is None else (rows.R, rows.K)
    ctx.save_for_backward(*tensors, weight_ih, x,
                          *(rows.tensors() if rows is not None else (None, None, None)))


def _saved(ctx):
    """What `_save` saved: ``(*tensors, W_ih, x, rows)`` (x or rows None where not saved)."""
    *tensors, x, ptr, col, val = ctx.saved_tensors
    return (*tensors, x, None if ptr is None else SparseRows(ptr, col, val, *ctx.rows_shape))


def _step_grads(dys, B, H):
    """(keep-alive tensor, pointer of step 0, bytes per step) of the output gradients, or
    (None, None, 0) when none reach the outputs. One block for every step (a sum's gradient) is
    read as such (`step_blocks`)."""
    if dys is None:
        return None, None, 0
    dys, step = step_blocks(dys, B, H, dys.dtype)
    return dys, dys.data_ptr(), step * dys.element_size()


def _count(ctx, rows, x, h0, weight_ih, weight_hh):
    """Forward MACs now; the backward's as the per-step reference `linear` counts them: the
    input gradient of ``h_{t-1} W_hh^T`` at t >= 1 always, at t = 0 when h0 needs it. The products
    with x count ``L*B*in*G*H`` as matmuls, ``nnz*G*H`` on the sparse route (the projection and
    dW_ih; dx = dgi W_ih stays a matmul)."""
    L, B, n_in = x.shape
    GH, H = weight_hh.shape
    t_ = current_trace()
    macs_x = L * B * n_in * GH
    macs_sparse = macs_x if rows is None else int(rows.ptr[-1] - rows.ptr[0]) * GH
    macs_h = L * B * H * GH
    if t_ is not None:
        t_.add_forward_macs(macs_sparse + macs_h)
    ctx.trace = t_
    ctx.bwd_macs = macs_x * int(x.requires_grad) + macs_sparse * int(weight_ih.requires_grad) + \
        B * H * GH * ((L - 1) + int(h0.requires_grad) + L * int(weight_hh.requires_grad))


class _Grads:
    """dx, dW_ih, dW_hh, db_ih, db_hh, accumulated chunk by chunk with one product each.

    ``need``: the flags (x, W_ih, W_hh, b_ih, b_hh). The input is x [L, B, in] or, on the sparse
    route, ``rows`` (its `SparseRows`: dW_ih then sums the rows of dgi at the nonzeros, as the
    transpose of a [in, G*H] sum; dx = dgi W_ih is a matmul either way). `add` takes a chunk's
    gradients of the two projections, ``dgi`` / ``dgh`` [n, B, G*H] (the same tensor for the
    LSTM), and the hidden states h_{t-1} ``hs`` [n, B, H] that ``dgh`` multiplies."""

    def __init__(self, x, rows, L, B, weight_ih, weight_hh, need):
        self.x, self.rows, self.weight_ih = x, rows, weight_ih
        dtype = weight_hh.dtype
        self.dx = empty((L, B, weight_ih.shape[1]), dtype) if need[0] else None
        self.need_dw_ih = need[1]
        # the sparse route's dW_ih is the first chunk's weight_grad, then added into
        self.dw_ih = torch.zeros_like(weight_ih) if need[1] and rows is None else None
        self.dw_hh = torch.zeros_like(weight_hh) if need[2] else None
        GH = weight_hh.shape[0]
        self.db_ih = torch.zeros(GH, dtype=dtype) if need[3] else None
        self.db_hh = torch.zeros(GH, dtype=dtype) if need[4] else None

    def add(self, c0, c1, dgi, dgh, hs):
        n, B, GH = dgi.shape
        dgi2, dgh2 = dgi.view(n * B, GH), dgh.view(n * B, GH)
        if self.dx is not None:
            torch.mm(dgi2, self.weight_ih, out=self.dx[c0:c1].view(n * B, -1))
        if self.need_dw_ih and self.rows is not None:
            self.dw_ih = self.rows.part(c0 * B, c1 * B).weight_grad(dgi2, into=self.dw_ih)
        elif self.need_dw_ih:
            self.dw_ih.addmm_(dgi2.t(), self.x[c0:c1].reshape(n * B, -1))
        if self.dw_hh is not None:
            self.dw_hh.addmm_(dgh2.t(), hs.reshape(n * B, -1))
        if self.db_ih is not None:
            self.db_ih += dgi2.sum(0)
        if self.db_hh is not None:
            self.db_hh += dgh2.sum(0)

    def result(self, ctx):
        if ctx.trace is not None and ctx.bwd_macs:
            ctx.trace.add_backward_macs(ctx.bwd_macs)
        return self.dx, self.dw_ih, self.dw_hh, self.db_ih, self.db_hh


def _history(name, s, cs, h0, L, B, H):
    """h_{t-1} of every step, [L, B, H], recomputed from the saved gates (a backward temporary)."""
    hs = empty((L, B, H), h0.dtype)
    fn = _kernel(name, h0.dtype)
    if cs is None:
        fn(s.data_ptr(), h0.data_ptr(), L, B, H, hs.data_ptr())
    else:
        fn(s.data_ptr(), cs.data_ptr(), h0.data_ptr(), L, B, H, hs.data_ptr())
    return hs


class FusedGRULayerFunction(torch.autograd.Function):
    """A GRU layer over a segment: (x, h0, W_ih, W_hh, b_ih, b_hh) -> (ys [L, B, H], h_T).

    Saved: the gate activations r, z, n and ``gh_n`` [L, B, 4H] (the reference's graph keeps
    about 6H a step), h0 and, when W_ih needs a gradient, x (on the sparse route its nonzeros
    instead); not the outputs: the backward recomputes the hidden states from h0, z and n
    (bitwise, one elementwise pass). ``h_T`` is a copy of ``ys[-1]``, so the carried
    state does not hold the output block.
    """

    @staticmethod
    def forward(ctx, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, route=None):
        L, B, n_in = x.shape
        H = h0.shape[1]
        save = not isinstance(ctx, NoCtx)
        rows = _input_rows(x, weight_ih, route, save)
        fwd = _kernel("gru_fwd", x.dtype)
        chunks = _chunks(L, B)
        gi = empty((chunks[0][1], B, 3 * H), x.dtype)  # one chunk's input projection
        ys = empty((L, B, H), x.dtype)
        s = empty((L, B, 4 * H), x.dtype) if save else None
        gh = torch.empty(B, 3 * H, dtype=x.dtype)
        wt = _transposed(weight_hh, L)
        esz = x.element_size()
        p_gi, p_gh, p_ys = gi.data_ptr(), gh.data_ptr(), ys.data_ptr()
        p_s = None if s is None else s.data_ptr()
        h_steps = ys.unbind(0)
        h = h0
        for c0, c1 in chunks:
            _project(x, rows, c0, c1, weight_ih, bias_ih, gi[:c1 - c0])
            for t in range(c0, c1):
                if bias_hh is None:
                    torch.mm(h, wt, out=gh)
                else:
                    torch.addmm(bias_hh, h, wt, out=gh)
                fwd(p_gi + (t - c0) * B * 3 * H * esz, p_gh, h.data_ptr(), B, H, p_ys + t * B * H * esz,
                    None if p_s is None else p_s + t * B * 4 * H * esz)
                h = h_steps[t]
        _count(ctx, rows, x, h0, weight_ih, weight_hh)
        _save(ctx, weight_ih, rows, x, s, h0, weight_hh)
        ctx.set_materialize_grads(False)
        return ys, ys[-1].clone()

    @staticmethod
    def backward(ctx, dys, dhT):
        s, h0, weight_hh, weight_ih, x, rows = _saved(ctx)
        L, B, H = s.shape[0], s.shape[1], h0.shape[1]
        bwd = _kernel("gru_bwd", s.dtype)
        esz = s.element_size()
        need = ctx.needs_input_grad
        grads = _Grads(x, rows, L, B, weight_ih, weight_hh, (need[0], need[2], need[3], need[4], need[5]))
        hs = _history("gru_hist", s, None, h0, L, B, H)  # h_{t-1}
        chunks = _chunks(L, B)
        dgi, dgh = empty((chunks[0][1], B, 3 * H), s.dtype), empty((chunks[0][1], B, 3 * H), s.dtype)
        keep, p_dy, dy_step = _step_grads(dys, B, H)
        dh = [torch.zeros_like(h0) if dhT is None else dhT.contiguous(), torch.empty_like(h0),
              torch.empty_like(h0)]
        dhd = torch.empty_like(h0)
        dgh_steps = dgh.unbind(0)
        p_s, p_hs, p_dgi, p_dgh = s.data_ptr(), hs.data_ptr(), dgi.data_ptr(), dgh.data_ptr()
        dh_in, dh0 = dh[0], None
        for c0, c1 in reversed(chunks):
            for t in range(c1 - 1, c0 - 1, -1):
                k = t - c0
                bwd(p_s + t * B * 4 * H * esz, p_hs + t * B * H * esz,
                    None if p_dy is None else p_dy + t * dy_step, dh_in.data_ptr(), B, H,
                    p_dgi + k * B * 3 * H * esz, p_dgh + k * B * 3 * H * esz, dhd.data_ptr())
                if t > 0 or need[1]:
                    dh_out = dh[1 + t % 2]
                    torch.addmm(dhd, dgh_steps[k], weight_hh, out=dh_out)  # dL/dh_{t-1}
                    dh_in = dh0 = dh_out
            grads.add(c0, c1, dgi[:c1 - c0], dgh[:c1 - c0], hs[c0:c1])
        del keep
        dx, dw_ih, dw_hh, db_ih, db_hh = grads.result(ctx)
        return dx, (dh0 if need[1] else None), dw_ih, dw_hh, db_ih, db_hh, None


class FusedLSTMLayerFunction(torch.autograd.Function):
    """An LSTM layer over a segment: (x, h0, c0, W_ih, W_hh, b_ih, b_hh) -> (ys [L, B, H], h_T, c_T).

    Saved: the gate activations i, f, g, o [L, B, 4H] and the cell states c [L, B, H] (the
    reference's graph keeps about 7H a step), h0, c0 and the input as `FusedGRULayerFunction`
    keeps it; the backward recomputes the hidden states ``o tanh(c)`` (bitwise). ``h_T`` and
    ``c_T`` are copies.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, route=None):
        L, B, n_in = x.shape
        H = h0.shape[1]
        save = not isinstance(ctx, NoCtx)
        rows = _input_rows(x, weight_ih, route, save)
        fwd = _kernel("lstm_fwd", x.dtype)
        chunks = _chunks(L, B)
        gi = empty((chunks[0][1], B, 4 * H), x.dtype)  # one chunk's input projection
        ys = empty((L, B, H), x.dtype)
        s = empty((L, B, 4 * H), x.dtype) if save else None
        cs = empty((L, B, H), x.dtype) if save else torch.empty(2, B, H, dtype=x.dtype)
        gh = torch.empty(B, 4 * H, dtype=x.dtype)
        wt = _transposed(weight_hh, L)
        esz = x.element_size()
        p_gi, p_gh, p_ys = gi.data_ptr(), gh.data_ptr(), ys.data_ptr()
        p_s = None if s is None else s.data_ptr()
        h_steps = ys.unbind(0)
        h, c = h0, c0
        for c0_, c1_ in chunks:
            _project(x, rows, c0_, c1_, weight_ih, bias_ih, gi[:c1_ - c0_])
            for t in range(c0_, c1_):
                if bias_hh is None:
                    torch.mm(h, wt, out=gh)
                else:
                    torch.addmm(bias_hh, h, wt, out=gh)
                c_out = cs[t] if save else cs[t % 2]
                fwd(p_gi + (t - c0_) * B * 4 * H * esz, p_gh, c.data_ptr(), B, H, p_ys + t * B * H * esz,
                    c_out.data_ptr(), None if p_s is None else p_s + t * B * 4 * H * esz)
                h, c = h_steps[t], c_out
        _count(ctx, rows, x, h0, weight_ih, weight_hh)
        _save(ctx, weight_ih, rows, x, s, cs, h0, c0, weight_hh)
        ctx.set_materialize_grads(False)
        return ys, ys[-1].clone(), c.clone()

    @staticmethod
    def backward(ctx, dys, dhT, dcT):
        s, cs, h0, c0, weight_hh, weight_ih, x, rows = _saved(ctx)
        L, B, H = cs.shape
        bwd = _kernel("lstm_bwd", s.dtype)
        esz = s.element_size()
        need = ctx.needs_input_grad
        grads = _Grads(x, rows, L, B, weight_ih, weight_hh, (need[0], need[3], need[4], need[5], need[6]))
        hs = _history("lstm_hist", s, cs, h0, L, B, H) if need[4] else None  # h_{t-1}, for dW_hh
        chunks = _chunks(L, B)
        dg = empty((chunks[0][1], B, 4 * H), s.dtype)
        keep, p_dy, dy_step = _step_grads(dys, B, H)
        dh = [torch.zeros_like(h0) if dhT is None else dhT.contiguous(), torch.empty_like(h0),
              torch.empty_like(h0)]
        dc = [torch.zeros_like(c0) if dcT is None else dcT.contiguous(), torch.empty_like(c0),
              torch.empty_like(c0)]
        dg_steps = dg.unbind(0)
        p_s, p_cs, p_dg = s.data_ptr(), cs.data_ptr(), dg.data_ptr()
        dh_in, dc_in, dh0 = dh[0], dc[0], None
        for c0_, c1_ in reversed(chunks):
            for t in range(c1_ - 1, c0_ - 1, -1):
                k = t - c0_
                c_prev = c0 if t == 0 else cs[t - 1]
                dc_out = dc[1 + t % 2]
                bwd(p_s + t * B * 4 * H * esz, p_cs + t * B * H * esz, c_prev.data_ptr(),
                    None if p_dy is None else p_dy + t * dy_step, dh_in.data_ptr(), dc_in.data_ptr(), B, H,
                    p_dg + k * B * 4 * H * esz, dc_out.data_ptr())
                dc_in = dc_out
                if t > 0 or need[1]:
                    dh_out = dh[1 + t % 2]
                    torch.mm(dg_steps[k], weight_hh, out=dh_out)  # dL/dh_{t-1}
                    dh_in = dh0 = dh_out
            grads.add(c0_, c1_, dg[:c1_ - c0_], dg[:c1_ - c0_], None if hs is None else hs[c0_:c1_])
        del keep
        dx, dw_ih, dw_hh, db_ih, db_hh = grads.result(ctx)
        return dx, (dh0 if need[1] else None), (dc_in if need[2] else None), dw_ih, dw_hh, db_ih, db_hh, None


def _check(who, gates, x, states, weight_ih, weight_hh, bias_ih, bias_hh, route):
    """Input checks of the layer functions (shapes, dtypes, device, route)."""
    if route is not None and not isinstance(route, SparseRoute):
        raise TypeError(f"{who}: route must be a SparseRoute or None, got {type(route).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{who}: x must be a 3-D tensor [L, B, in], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in SUFFIX:
        raise TypeError(f"{who} (cpu): dtype {x.dtype} is not supported; use float32 or float64 "
                        "(or backend='torch')")
    if x.device.type != "cpu":
        raise ValueError(f"{who} (cpu): x is on {x.device}; the cpu backend needs CPU tensors "
                         "(use backend='torch' or 'auto' for CUDA)")
    if not isinstance(weight_hh, torch.Tensor) or weight_hh.dim() != 2 or \
            weight_hh.shape[0] != gates * weight_hh.shape[1]:
        raise ValueError(f"{who}: weight_hh must be [{gates}*H, H], got "
                         f"{tuple(weight_hh.shape) if isinstance(weight_hh, torch.Tensor) else weight_hh!r}")
    L, B, n_in = x.shape
    H = weight_hh.shape[1]
    want = {"weight_ih": (gates * H, n_in), "weight_hh": (gates * H, H), "bias_ih": (gates * H,),
            "bias_hh": (gates * H,)}
    tensors = dict(zip(("h0", "c0"), states))
    tensors.update(weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh)
    for name, t in tensors.items():
        if t is None and name.startswith("bias"):
            continue
        shape = want.get(name, (B, H))
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{who}: {name} must have shape {shape} for x {tuple(x.shape)} and H={H}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{who}: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                            "they must match")


def _apply(fn, x, states, weight_ih, weight_hh, bias_ih, bias_hh, route):
    args = [t.contiguous() for t in (x, *states, weight_ih, weight_hh)] + [
        None if b is None else b.contiguous() for b in (bias_ih, bias_hh)]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return fn.apply(*args, route)
    with torch.no_grad():
        return fn.forward(NoCtx(), *args, route)


def fused_gru_layer(x: torch.Tensor, h0: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                    bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None,
                    route: SparseRoute | None = None):
    """A GRU layer over a segment on CPU: ``(ys [L, B, H], h_T [B, H])``.

    ``x`` [L, B, in], ``h0`` [B, H], float32 or float64; the weights in ``torch.nn.GRUCell``'s
    layout (``weight_ih`` [3H, in], ``weight_hh`` [3H, H], gates r, z, n; biases [3H] or None).
    Equal to stepping `sparsebptt.cells.gru.gru_step` (float64 to ~1e-15, float32 to rounding);
    differentiable in every tensor (see `FusedGRULayerFunction`); under no_grad (or when nothing
    requires grad) the same loop runs without saving anything.

    ``route``: a `SparseRoute` (one per scan, as ``GRU.scan_segment`` makes it) lets a mostly-zero
    input (one-hot tokens, events: at most `SPARSE_INPUT_MAX` nonzero on the scan's first segment)
    take the sparse-input products: ``x W_ih^T + b_ih`` and dW_ih from its nonzeros, which the
    backward keeps instead of x (dx stays a matmul). None: the matmuls.
    """
    _check("fused_gru_layer", 3, x, (h0,), weight_ih, weight_hh, bias_ih, bias_hh, route)
    return _apply(FusedGRULayerFunction, x, (h0,), weight_ih, weight_hh, bias_ih, bias_hh, route)


def fused_lstm_layer(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weight_ih: torch.Tensor,
                     weight_hh: torch.Tensor, bias_ih: torch.Tensor | None = None,
                     bias_hh: torch.Tensor | None = None, route: SparseRoute | None = None):
    """An LSTM layer over a segment on CPU: ``(ys [L, B, H], h_T [B, H], c_T [B, H])``.

    As `fused_gru_layer` (``route`` included), with the state ``(h0, c0)`` and
    ``torch.nn.LSTMCell``'s layout (gates i, f, g, o; ``weight_ih`` [4H, in], ``weight_hh``
    [4H, H]); see `FusedLSTMLayerFunction`.
    """
    _check("fused_lstm_layer", 4, x, (h0, c0), weight_ih, weight_hh, bias_ih, bias_hh, route)
    return _apply(FusedLSTMLayerFunction, x, (h0, c0), weight_ih, weight_hh, bias_ih, bias_hh, route)
