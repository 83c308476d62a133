"""Fused CPU LIF: one C call runs a whole segment's recurrence forward, one its backward.

Entry points: `fused_lif_layer` (what ``LIF(backend="cpu")`` runs: the input projection of the
whole segment as one matmul, the recurrence, and dW/db/dx as batched matmuls, in one autograd
node), `fused_recurrent_lif` (the recurrence alone, from currents) and
`fused_recurrent_lif_layer` (with recurrent weights: one ``addmm`` and one C step per step).

Given input currents ``i`` [L, B, H] and the membrane ``v0`` [B, H], the forward computes per
step (see `cells.lif`)::

    u_t = beta * v_{t-1} + i_t
    z_t = H(u_t - threshold)
    v_t = u_t - z_t * threshold      (reset="subtract")   |   u_t * (1 - z_t)   (reset="zero")

and saves only ``u`` [L, B, H] for the backward, which recomputes ``z_t`` and ``v_{t-1}`` from it.
With ``g_t = dL/dv_t`` (``g_L`` = the gradient of the final state) and ``s_t`` the surrogate of
``u_t - threshold``, the backward runs once from t = L-1 to 0::

    subtract: du_t = g_t + (dz_t - threshold * g_t) * s_t      (detach_reset: g_t + dz_t * s_t)
    zero:     du_t = g_t * (1 - z_t) + (dz_t - u_t * g_t) * s_t   (detach_reset: no u_t*g_t term)
    di_t = du_t,   g_{t-1} = beta * du_t,   dbeta += sum_b du_t * v_{t-1}

With ``reset_timing="after_decay"`` (snnTorch's order) the reset of step t-1's spike
``r_t = H(v_{t-1} - threshold)`` is applied after the decay and the state is the membrane before
its reset (``v_t = u_t``)::

    u_t = beta * v_{t-1} + i_t - r_t * threshold       (subtract)  |  beta * (v_{t-1} (1 - r_t)) + i_t  (zero)
    du_t = g_t + dz_t * s_t,   s_p = surrogate of v_{t-1} - threshold (0 with detach_reset)
    subtract: g_{t-1} = beta du_t - threshold du_t s_p               dbeta += du_t v_{t-1}
    zero:     g_{t-1} = beta du_t (1 - r_t) - beta du_t v_{t-1} s_p    dbeta += du_t v_{t-1} (1 - r_t)

and v0 is kept for the backward's first step.

Steps are ordered as in the torch reference and compiled without fused multiply-adds, so the
forward is bitwise equal to the reference for the same currents.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch.autograd.function import once_differentiable

from ...trace import current_trace
from ..cbuild import build_file, declare_per_dtype
from ..common import SUFFIX, KernelTable, NoCtx, data_ptr, empty, scratch_buffer, step_blocks, transposed
from ..sparse_input import cpu as sparse_input  # (its SPARSE_INPUT_MAX read at each call: one setting)
from ..sparse_input.cpu import SPARSE_CHUNK, SparseRoute, SparseRows
from .function import (SURROGATE_IDS, LIFConstants, after_decay, apply_recurrence, check_state_and_beta,
                       recurrence_function, recurrent_layer_function, surrogate_scale)

__all__ = ["fused_recurrent_lif", "fused_lif_layer", "fused_recurrent_lif_layer", "load_library", "C_SOURCE",
           "LayerSaved", "layer_forward",
           "layer_forward_stops", "layer_backward"]

#: the C source (package data): ``lif.c`` instantiates ``lif_body.h`` for float and double
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lif.c")

_lib = None
_P = ctypes.c_void_p
_FWD_ARGS = [_P, _P, _P, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int,
             ctypes.c_long, ctypes.c_long, ctypes.c_long, _P, _P, _P]
_BWD_ARGS = [_P, _P, ctypes.c_long, _P, _P, _P, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int,
             ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_long, ctypes.c_long, ctypes.c_long, _P, _P, _P]

_SPARSE_FNS = {# sp_csr's (sparse_input/), then wt, bias, H, i, and lif_fwd's from v0 (L, B, z, u, vT)
               "lif_layer_fwd": (ctypes.c_long, [_P, ctypes.c_long, ctypes.c_long, ctypes.c_long, _P, _P, _P, _P,
                                                 _P, _P, ctypes.c_long, _P, _P, _P, ctypes.c_double, ctypes.c_double,
                                                 ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long, _P, _P, _P]),
               # lif_bwd's arguments, then db_acc, the CSR (ptr, col, val, K) and dwt, cnt, rows, vals
               "lif_layer_bwd": (None, _BWD_ARGS + [_P, _P, _P, _P, ctypes.c_long, _P, _P, _P, _P])}


def load_library():
    """Build (once, cached on disk) and load the C kernels; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        _lib = declare_per_dtype(build_file("sparsebptt_lif", C_SOURCE),
                                 {"lif_fwd": (None, _FWD_ARGS), "lif_bwd": (None, _BWD_ARGS), **_SPARSE_FNS})
    return _lib


_fn = KernelTable(load_library)  # (name, dtype) -> the loaded C function


def _beta_args(beta):
    beta_t = beta if isinstance(beta, torch.Tensor) else None
    return beta_t, (0.0 if beta_t is not None else float(beta))


def _lif_fwd(i, v0, beta, p: LIFConstants, save_u: bool, u_into_i: bool = False):
    """Run the forward kernel; ``u_into_i`` writes u over the currents (the caller's buffer)."""
    L, B, H = i.shape
    fn = _fn("lif_fwd", i.dtype)
    z = empty(i.shape, i.dtype)
    u = (i if u_into_i else empty(i.shape, i.dtype)) if save_u else None
    vT = torch.empty_like(v0)
    beta_t, beta_s = _beta_args(beta)
    fn(data_ptr(i), data_ptr(v0), data_ptr(beta_t), beta_s, float(p.threshold), int(p.reset == "zero"), int(after_decay(p)),
       L, B, H, data_ptr(z), data_ptr(u), data_ptr(vT))
    return z, u, vT


def _lif_bwd(u, dz, dvT, v0, beta, p: LIFConstants, need_dbeta: bool, scratch: bool = False,
             db_acc=None, rows: "SparseRows | None" = None, dwt=None):
    """Run the backward kernel; ``scratch``: di goes to the per-thread buffer (caller consumes it
    before the next call). ``rows`` with ``dwt`` (a contiguous [K, H], W^T's layout) and/or
    ``db_acc`` [H]: the same call adds dW^T (from the input's nonzeros) and db of this segment into
    them in place (C ``lif_layer_bwd``: one call instead of three and their Python)."""
    L, B, H = u.shape
    fused = db_acc is not None or dwt is not None
    fn = _fn("lif_layer_bwd" if fused else "lif_bwd", u.dtype)
    di = scratch_buffer(u.shape, u.dtype, "di") if scratch else empty(u.shape, u.dtype)
    dv0 = torch.empty(B, H, dtype=u.dtype)
    dz, dz_st = step_blocks(dz, B, H, u.dtype)  # (kept alive across the call)
    dvT = None if dvT is None else dvT.contiguous()
    beta_t, beta_s = _beta_args(beta)
    dbeta = torch.zeros(H, dtype=torch.float64) if need_dbeta else None
    args = (data_ptr(u), data_ptr(dz), dz_st, data_ptr(dvT), data_ptr(v0),
            data_ptr(beta_t), beta_s, float(p.threshold), int(p.reset == "zero"), int(p.detach_reset), int(after_decay(p)),
            SURROGATE_IDS[p.surrogate], surrogate_scale(p), L, B, H, data_ptr(di), data_ptr(dv0), data_ptr(dbeta))
    if fused:
        if dwt is not None:
            K = rows.K
            cnt = scratch_buffer((K + 1,), torch.int32, "cnt")
            n = max(1, min(rows.R, SPARSE_CHUNK) * K)
            rws = scratch_buffer((n,), torch.int32, "rows")
            vals = scratch_buffer((n if rows.val is not None else 1,), u.dtype, "vals")
            fn(*args, data_ptr(db_acc), rows.ptr.data_ptr(), rows.col.data_ptr(), data_ptr(rows.val), K, dwt.data_ptr(),
               cnt.data_ptr(), rws.data_ptr(), vals.data_ptr())
        else:
            fn(*args, data_ptr(db_acc), None, None, None, 0, None, None, None, None)
    else:
        fn(*args)
    return di, dv0, (None if dbeta is None else dbeta.to(u.dtype))


FusedRecurrentLIFFunction = recurrence_function("FusedRecurrentLIFFunction", _lif_fwd, _lif_bwd)


def _project(x2, weight, bias, out2, route: "SparseRoute | None", keep: bool):
    """The input currents ``out2 = x2 W^T + b``: by the sparse-input products when ``route`` says
    so (returns the `SparseRows`), else one matmul (returns None)."""
    rows = route.rows(x2, keep) if route is not None else None
    if rows is not None:
        rows.project(weight, bias, out2)
    elif bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)
    return rows


class LayerSaved:
    """What a feed-forward LIF layer's backward reads (`layer_forward` keeps it, `layer_backward`
    reads it): u [L, B, H]; the input as its nonzeros (``rows``, a `SparseRows`) or as x [L, B, in]
    (None when W needs no gradient); the weight; v0 (for dbeta or a reset after the decay); beta
    (a float or the clamped [H] tensor); the constants; and the trace the forward counted into."""

    __slots__ = ("u", "x", "rows", "weight", "v0", "beta", "p", "need_dbeta", "trace", "macs")

    def __init__(self, u, x, rows, weight, v0, beta, p, need_dbeta, trace, macs):
        self.u, self.x, self.rows, self.weight, self.v0 = u, x, rows, weight, v0
        self.beta, self.p, self.need_dbeta, self.trace, self.macs = beta, p, need_dbeta, trace, macs

    def tensors(self):
        """Every tensor kept (for byte counts)."""
        rows = self.rows.tensors() if self.rows is not None else ()
        beta = (self.beta,) if isinstance(self.beta, torch.Tensor) else ()
        return [t for t in (self.u, self.x, self.v0, *beta, *rows) if t is not None]


def _sparse_layer_forward(x, v0, weight, bias, beta, p: LIFConstants, route: SparseRoute, keep_rows: bool, i,
                          save_u: bool):
    """`layer_forward`'s sparse route in one C call (``lif_layer_fwd``: the nonzeros, the currents
    from them, the recurrence; the same kernels as `SparseRows.of`, `SparseRows.project` and
    `_lif_fwd` one after the other). Returns ``(z, u, v_T, rows)`` (``rows``: the `SparseRows`
    kept when ``keep_rows``, else None), or None when the route's first segment finds the input
    too dense (the route then says dense: the caller runs the matmul)."""
    L, B, K = x.shape
    H = weight.shape[0]
    R = L * B
    max_nnz = int((sparse_input.SPARSE_INPUT_MAX if route.sparse is None else 1.0) * R * K)
    ptr = torch.empty(R + 1, dtype=torch.int64) if keep_rows else scratch_buffer((R + 1,), torch.int64, "ptr")
    col = scratch_buffer((max_nnz + K + 1,), torch.int32, "col")
    val = scratch_buffer((max_nnz + K + 1,), x.dtype, "val")
    binary = ctypes.c_int(0)
    z = empty(i.shape, i.dtype)
    vT = torch.empty_like(v0)
    beta_t, beta_s = _beta_args(beta)
    n = _fn("lif_layer_fwd", x.dtype)(
        x.data_ptr(), R, K, max_nnz, ptr.data_ptr(), col.data_ptr(), val.data_ptr(), ctypes.byref(binary),
        transposed(weight).data_ptr(), data_ptr(bias), H, i.data_ptr(), v0.data_ptr(), data_ptr(beta_t), beta_s,
        float(p.threshold), int(p.reset == "zero"), int(after_decay(p)), L, B, z.data_ptr(),
        i.data_ptr() if save_u else None, vT.data_ptr())
    if route.sparse is None:
        route.sparse = n >= 0
    if n < 0:
        return None
    rows = None
    if keep_rows:
        rows = SparseRows(ptr, col[:n].clone(), None if binary.value else val[:n].clone(), R, K)
    return z, (i if save_u else None), vT, rows, n


def layer_forward(x, v0, weight, bias, beta, p: LIFConstants, route=None, keep: bool = True,
                  need_w: bool | None = None, need_dbeta: bool | None = None):
    """A feed-forward LIF layer over a segment, outside autograd: ``(z, v_T, saved)``.

    The currents of every step as one product (`_project`: the matmul, or the sparse-input
    products when ``route`` says so) into a fresh buffer, then the recurrence, which overwrites
    the currents with u (on the sparse route all three in one C call: `_sparse_layer_forward`;
    in `layer_backward`, dW and db of such a layer are added into the caller's sums by the
    recurrence backward's call). ``keep``: return the `LayerSaved` its backward reads (else None);
    ``need_w`` / ``need_dbeta``: whether dW / dbeta will be asked (default: the tensors' flags).
    The forward MACs (``L*B*in*H``) go to an active `sb.trace`, as the per-step `linear` counts them.
    """
    L, B, n_in = x.shape
    H = weight.shape[0]
    need_w = weight.requires_grad if need_w is None else need_w
    i = empty((L, B, H), x.dtype)
    fused = _sparse_layer_forward(x, v0, weight, bias, beta, p, route, keep and need_w, i, keep) \
        if route is not None and route.sparse is not False else None
    if fused is not None:
        z, u, vT, rows, nnz = fused
    else:
        rows = _project(x.reshape(L * B, n_in), weight, bias, i.view(L * B, H), route, keep=keep and need_w)
        z, u, vT = _lif_fwd(i, v0, beta, p, save_u=keep, u_into_i=True)
        nnz = L * B * n_in if rows is None else int(rows.ptr[-1])
    macs = nnz * H  # the projection's multiply-adds done (from the nonzeros on the sparse route)
    t = current_trace()
    if t is not None:
        t.add_forward_macs(macs)
    if not keep:
        return z, vT, None
    if need_dbeta is None:
        need_dbeta = isinstance(beta, torch.Tensor) and beta.requires_grad
    # a sparse input is kept as its nonzeros (int32 column each, and the value unless 1), not as x
    rows = rows if need_w else None
    x_kept = x if need_w and rows is None else None
    return z, vT, LayerSaved(u, x_kept, rows, weight, v0 if need_dbeta or after_decay(p) else None, beta, p,
                             need_dbeta, t, macs)


def layer_forward_stops(x, v0, weight, bias, beta, p: LIFConstants, route, stops, out: str | None = None):
    """`layer_forward` without saving, over several consecutive segments at once: ``x`` [L, B, in]
    holds them all, ``stops`` (increasing, the last = L) ends each. Returns ``(z [L, B, H], [v at
    each stop])``. The currents of all L steps are one product (the sparse-input rows do not depend
    on the rows computed with them, so each segment's currents are what a call per segment gives),
    then the recurrence runs segment by segment, each one C call from the previous one's v: the
    membranes at the stops are what separate calls reach (the same kernel, the same order).
    ``out``: the name of the per-thread buffer z goes to (valid until that name's next use), else
    a fresh one; the currents are computed into it first."""
    L, B, n_in = x.shape
    H = weight.shape[0]
    # the currents go where the spikes will: the recurrence reads each current before it writes
    # that element's spike (as it writes u over i), so one buffer serves both
    z = empty((L, B, H), x.dtype) if out is None else scratch_buffer((L, B, H), x.dtype, out)
    rows = _project(x.reshape(L * B, n_in), weight, bias, z.view(L * B, H), route, keep=False)
    macs = (L * B * n_in if rows is None else int(rows.ptr[-1])) * H
    fn = _fn("lif_fwd", x.dtype)
    beta_t, beta_s = _beta_args(beta)
    th, rz, ad = float(p.threshold), int(p.reset == "zero"), int(after_decay(p))
    pi = pz = z.data_ptr()
    pb, step = data_ptr(beta_t), B * H * x.element_size()
    vs, v, t0 = [], v0, 0
    for t1 in stops:
        vT = torch.empty_like(v0)
        fn(pi + t0 * step, v.data_ptr(), pb, beta_s, th, rz, ad, t1 - t0, B, H, pz + t0 * step, None, vT.data_ptr())
        vs.append(vT)
        v, t0 = vT, t1
    if t0 != L:
        raise ValueError(f"layer_forward_stops: the stops must end at L={L}, got {list(stops)}")
    t = current_trace()
    if t is not None:
        t.add_forward_macs(macs)
    return z, vs


def layer_backward(s: LayerSaved, dz, dvT, need_x: bool, need_w: bool, need_b: bool, acc_w=None, acc_b=None):
    """The backward of `layer_forward`: ``(dx, dv0, dW, db, dbeta)`` (None where not asked). The
    recurrence backward gives di; then dx = di W, dW = di^T x (from the nonzeros when the input
    was kept as them), db = sum di. Backward MACs (``L*B*in*H`` for dx, the forward's count for dW:
    ``nnz*H`` from the nonzeros) go to the trace the forward counted into. ``acc_w`` / ``acc_b``: gradients of earlier segments that the
    caller owns; dW / db are added into them in place where their layout allows (then returned
    as None: nothing left to add), saving a fresh [H, in] buffer and its sum per segment."""
    # dW (from the nonzeros) and db added into the caller's sums by the recurrence's own C call
    fuse_w = need_w and acc_w is not None and s.rows is not None and acc_w.t().is_contiguous()
    fuse_b = need_b and acc_b is not None and acc_b.is_contiguous()
    di, dv0, dbeta = _lif_bwd(s.u, dz, dvT, s.v0, s.beta, s.p, s.need_dbeta, scratch=True,
                              db_acc=acc_b if fuse_b else None, rows=s.rows if fuse_w else None,
                              dwt=acc_w.t() if fuse_w else None)
    L, B, H = di.shape
    di2 = di.view(L * B, H)
    dx = dw = db = None
    if need_x:
        dx = empty((L, B, s.weight.shape[1]), di.dtype)
        torch.mm(di2, s.weight, out=dx.view(L * B, -1))
    if need_w and not fuse_w:
        if acc_w is not None and s.rows is None and acc_w.t().is_contiguous():
            acc_w.t().addmm_(s.x.reshape(L * B, -1).t(), di2)
        elif acc_w is not None and s.rows is None and acc_w.is_contiguous():
            acc_w.addmm_(di2.t(), s.x.reshape(L * B, -1))
        else:
            dw = s.rows.weight_grad(di2) if s.rows is not None else di2.t().mm(s.x.reshape(L * B, -1))
    if need_b and not fuse_b:
        if acc_b is not None:
            acc_b.add_(di2.sum(0))
        else:
            db = di2.sum(0)
    if s.trace is not None and (need_x or need_w):
        L, B, H = s.u.shape
        s.trace.add_backward_macs(int(need_x) * L * B * s.weight.shape[1] * H + int(need_w) * s.macs)
    return dx, dv0, dw, db, dbeta


class FusedLIFLayerFunction(torch.autograd.Function):
    """A whole feed-forward LIF layer over a segment: (x, v0, W, b, beta) -> (z, v_T), as one
    autograd node around `layer_forward` / `layer_backward`.

    Forward: the currents of every step as one matmul into a fresh buffer, then the recurrence,
    which overwrites the currents with u (the one [L, B, H] tensor saved). Backward: the
    recurrence backward gives di; then dW = di^T x, db = sum di, dx = di W, each one matmul.
    MACs are counted in an active `sb.trace` as the per-step reference `linear` counts them
    (``L*B*in*H`` forward or recomputed, and that once more for each of dx and dW) on the matmul
    route; on the sparse-input route the projection and dW count what they do, ``nnz*H``.
    """

    @staticmethod
    def forward(ctx, x, v0, weight, bias, beta, p: LIFConstants, route=None):
        z, vT, s = layer_forward(x, v0, weight, bias, beta, p, route, keep=True)
        ctx.p, ctx.need_dbeta, ctx.trace, ctx.macs = s.p, s.need_dbeta, s.trace, s.macs
        ctx.beta_s = None if isinstance(beta, torch.Tensor) else beta
        ctx.rows_shape = None if s.rows is None else (s.rows.R, s.rows.K)
        # every tensor through save_for_backward (autograd's checks, sb.trace's counts, user hooks)
        ctx.save_for_backward(s.u, s.x, weight, s.v0, beta if ctx.beta_s is None else None,
                              *(s.rows.tensors() if s.rows is not None else (None, None, None)))
        ctx.set_materialize_grads(False)
        return z, vT

    @staticmethod
    @once_differentiable  # (a backward with create_graph=True gets first-order gradients; a second order raises)
    def backward(ctx, dz, dvT):
        u, x, weight, v0, beta_t, ptr, col, val = ctx.saved_tensors
        rows = None if ptr is None else SparseRows(ptr, col, val, *ctx.rows_shape)
        s = LayerSaved(u, x, rows, weight, v0, beta_t if beta_t is not None else ctx.beta_s, ctx.p, ctx.need_dbeta,
                       ctx.trace, ctx.macs)
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        dx, dv0, dw, db, dbeta = layer_backward(s, dz, dvT, need_x, need_w, need_b)
        return dx, dv0, dw, db, dbeta, None, None


def _check(i, v0, beta, who="fused_recurrent_lif", what="i", H=None):
    """Input checks; ``i`` is the [L, B, H] currents (or, for a layer, the [L, B, in] input x
    with ``H`` the number of neurons)."""
    if not isinstance(i, torch.Tensor) or i.dim() != 3:
        raise ValueError(f"{who}: {what} must be a 3-D tensor [L, B, {'H' if H is None else 'in'}], got "
                         f"{tuple(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__}")
    H = i.shape[2] if H is None else H
    if i.dtype not in SUFFIX:
        raise TypeError(f"{who} (cpu): dtype {i.dtype} is not supported; use float32 or "
                        "float64 (or backend='torch')")
    if i.device.type != "cpu":
        raise ValueError(f"{who} (cpu): {what} is on {i.device}; the cpu backend needs CPU "
                         "tensors (use backend='triton' or 'auto' for CUDA)")
    check_state_and_beta(who, what, i, v0, beta, H)


def fused_recurrent_lif(i: torch.Tensor, v0: torch.Tensor, beta, p: LIFConstants):
    """The LIF recurrence over a segment on CPU: ``(z [L, B, H], v_T [B, H])``.

    Args:
        i: input currents ``W x_t + b`` for every step, [L, B, H], float32 or float64.
        v0: membrane before the first step, [B, H].
        beta: decay, a float or a per-neuron [H] tensor (already clamped to [0, 1]; may require
            grad, then its gradient is returned too).
        p: the LIF constants (threshold, reset, surrogate, detach_reset); ``p.beta`` is ignored.

    Differentiable in ``i``, ``v0`` and a tensor ``beta`` (surrogate gradient for the spikes).
    Outside autograd (no input requires grad, or under ``torch.no_grad``) nothing is saved.
    """
    _check(i, v0, beta)
    return apply_recurrence(FusedRecurrentLIFFunction, _lif_fwd, i, v0, beta, p)


def fused_lif_layer(x: torch.Tensor, v0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    beta, p: LIFConstants, route: "SparseRoute | None" = None):
    """A feed-forward LIF layer over a segment on CPU: ``(z [L, B, H], v_T [B, H])``.

    ``x`` [L, B, in]; ``weight`` [H, in]; ``bias`` [H] or None; ``beta`` a float or an [H] tensor
    (clamped by the caller); see `FusedLIFLayerFunction`. Differentiable in every tensor.

    ``route``: a `SparseRoute` (one per scan, as `LIF.scan_segment` makes it) lets a mostly-zero
    input (spikes, events: at most `sparse_input.SPARSE_INPUT_MAX` nonzero) take the sparse-input products, C
    kernels: the currents summed from the rows of W^T at the nonzeros (per row in ascending input
    order, so a row's currents do not depend on the segment it is computed in), dW from the rows
    of dL/di at them, and the backward keeps the nonzeros (int32 column each, and their values
    unless all are 1) instead of x. None: one matmul.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"fused_lif_layer: weight must be a 2-D tensor [H, in], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    _check(x, v0, beta, "fused_lif_layer", "x", H=weight.shape[0])
    if weight.shape[1] != x.shape[2] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"fused_lif_layer: weight must be [H, {x.shape[2]}] and bias [H] for x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"fused_lif_layer: x is {x.dtype} but weight/bias are {weight.dtype}/"
                        f"{None if bias is None else bias.dtype}; they must match")
    x, v0, weight = x.contiguous(), v0.contiguous(), weight.contiguous()
    if isinstance(beta, torch.Tensor):
        beta = beta.contiguous()
    tensors = [t for t in (x, v0, weight, bias, beta) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return FusedLIFLayerFunction.apply(x, v0, weight, bias, beta, p, route)
    z, vT, _ = layer_forward(x, v0, weight, bias, beta, p, route, keep=False)
    return z, vT


def _step_fwd(i_t, v_in, beta, p: LIFConstants, z_t, v_out):
    """One step of the forward kernel from the currents i_t [B, H]; u_t is written over i_t."""
    B, H = i_t.shape
    beta_t, beta_s = _beta_args(beta)
    _fn("lif_fwd", i_t.dtype)(
        data_ptr(i_t), data_ptr(v_in), data_ptr(beta_t), beta_s, float(p.threshold), int(p.reset == "zero"),
        int(after_decay(p)), 1, B, H, data_ptr(z_t), data_ptr(i_t), data_ptr(v_out))


def _step_bwd(u_t, dz_t, g_in, beta, p: LIFConstants, du_t, g_out, v_prev):
    """One step of the backward kernel: du_t and g_out = dL/dv_{t-1} (no dbeta); ``v_prev``
    (v_{t-1}) is read by a reset after the decay."""
    B, H = u_t.shape
    beta_t, beta_s = _beta_args(beta)
    flags = (int(p.reset == "zero"), int(p.detach_reset), int(after_decay(p)), SURROGATE_IDS[p.surrogate],
             surrogate_scale(p))
    _fn("lif_bwd", u_t.dtype)(
        data_ptr(u_t), data_ptr(dz_t), B * H, data_ptr(g_in), data_ptr(v_prev.contiguous()), data_ptr(beta_t), beta_s,
        float(p.threshold), *flags, 1, B, H, data_ptr(du_t), data_ptr(g_out), None)


#: ``i_t = W x_t + b + V z_{t-1}``: one matmul for the inputs, per step one ``addmm`` and one C
#: step, forward and backward (see `recurrent_layer_function`)
FusedRecurrentLIFLayerFunction = recurrent_layer_function(
    "FusedRecurrentLIFLayerFunction", _step_fwd, _step_bwd, lambda shape, dtype, device: empty(shape, dtype))


def fused_recurrent_lif_layer(x: torch.Tensor, v0: torch.Tensor, z0: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, rweight: torch.Tensor, beta, p: LIFConstants):
    """A LIF layer with recurrent weights ``rweight`` [H, H] over a segment on CPU:
    ``(z [L, B, H], v_T [B, H])`` (the final spikes are ``z[-1]``). See
    `FusedRecurrentLIFLayerFunction`; under no_grad the same loop runs without saving."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("fused_recurrent_lif_layer: weight must be a 2-D tensor [H, in]")
    H = weight.shape[0]
    _check(x, v0, beta, "fused_recurrent_lif_layer", "x", H=H)
    for name, t in (("z0", z0), ("recurrent weight", rweight)):
        want = v0.shape if name == "z0" else (H, H)
        if not isinstance(t, torch.Tensor) or t.shape != want or t.dtype != x.dtype:
            raise ValueError(f"fused_recurrent_lif_layer: {name} must be a {x.dtype} tensor of shape "
                             f"{tuple(want)}, got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    x, v0, z0, weight, rweight = (t.contiguous() for t in (x, v0, z0, weight, rweight))
    if isinstance(beta, torch.Tensor):
        beta = beta.contiguous()
    tensors = [t for t in (x, v0, z0, weight, bias, rweight, beta) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return FusedRecurrentLIFLayerFunction.apply(x, v0, z0, weight, bias, rweight, beta, p)
    with torch.no_grad():
        z, vT = FusedRecurrentLIFLayerFunction.forward(NoCtx(), x, v0, z0, weight, bias, rweight, beta, p)
    return z, vT
