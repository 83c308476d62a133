"""EGRU's "cpu" backend: the event-sparse segment scan `fused_recurrent_egru` and its C kernels.

For CPU float32/float64 tensors a segment runs as one GEMM for the input projections and
`SegmentFunction` (issue 17): the whole recurrence, forward and backward, in C (``egru_fwd`` /
``egru_bwd`` in ``egru_body.h``, one call each per segment; the backward hands back to Python
only for steps whose ``dL/dy`` it takes as a GEMM): per step the rows of ``W_hh^T`` of each
sample's events added in registers forward; backward the pointwise part fused in one pass,
``dL/dy`` of the step before only at its events and near-threshold units (register-blocked
dots: per unit over the samples that want it, or for batches up to `DOTS_GROUP_B` units
grouped by those samples in tiles of up to 4 units x 4 samples; nothing for the others), and
``dW_hh^T`` rows accumulated over its events in blocks of steps (each row held in registers
while its events' rows are added). The products (``egru_mm.h``) run in AVX-512 or AVX2 (the
best the CPU has, `kernel_isa`) or plain C. It does the same products as the path below,
without a Python-level node per step. Other tensors (other dtypes, devices, or
``use_c_kernels = False``) take the step-wise path described next.

The forward reads only the columns of units with an event (``y`` is zero elsewhere): ``W_hh y``
runs through `sparsebptt.kernels.sparse.sparse_linear` with the events as mask. The backward of
that product (`RecurrentGradFunction`) is sparse in the same way:

- the weight gradient ``dW_hh[:, j] += sum_b g[b] y[b, j]`` is accumulated over the events
  only, in place along the segment (a `sparsebptt.kernels.sparse.Chain`; no dense [3H, H]
  gradient per step);
- the input gradient ``dL/dy = W_hh^T g`` is needed only where ``dy/dc~ = e + c~ psi(c~ -
  threshold)`` is non-zero: at events and within ``epsilon`` of the threshold. Every unit
  farther away is skipped (the pseudo-derivative is zero there).

Both run in the C kernels below (``nnz * 3H`` MACs), or as one dense GEMM once
`sparsebptt.kernels.sparse.full_above` of the entries are needed (faster then on a CPU), or as
torch gathers for tensors the C kernels do not take (other dtypes or devices). The MACs done go
to `sb.trace`. The pointwise part of a step is one autograd node with a hand-written backward
(`FusedPointwiseFunction`). The equations are `sparsebptt.cells.egru`'s; its reference step
(``backend="torch"``: dense matmuls, plain autograd, the same pseudo-derivative) is what this
path equals, up to rounding (and denormals below 1.2e-38, flushed to zero in the kernels).

Where ``y`` enters a segment from outside (``state0`` or a checkpoint), nothing tells which of
its units were near the threshold, so the first step of a segment takes ``dL/dy`` at every unit
(when ``y`` needs a gradient). (`sparse_linear`'s own backward is not used: it gives the input
gradient only on its forward mask.)

The C kernels: two loops over the units j, each reading row j of its matrix once for all
samples of the batch:

- `masked_rows_dot`: ``dy[b, j] = g[b] . wt[j]`` where ``mask[b, j]``, else 0 (the input
  gradient of ``W_hh y`` at events and near-threshold units; ``wt = W_hh.T`` [H, 3H]);
- `masked_rows_axpy_`: ``buf[j] += sum_b y[b, j] * g[b]`` over ``mask[b, j]`` (the weight
  gradient rows of units with an event, accumulated in place).

Work is ``nnz * 3H`` multiply-adds, with no gathered copy of the weight: torch's gather-then-GEMM
(``index_select`` of the active rows, then a matmul) moves each active row twice, and its
per-sample ``embedding_bag`` backward runs at scalar speed. The loops use AVX2 + FMA where the
CPU has them (chosen at run time), else plain C: ``egru.c`` (package data, one copy of
``egru_body.h`` per dtype), built and cached with `sparsebptt.kernels.cbuild`.
Denormal numbers are flushed to zero while a kernel runs (FTZ/DAZ on x86): a trained EGRU's
gradients hold some (saturated gates), and each one cost a microcode assist, 6x the run time.
"""
from __future__ import annotations

import ctypes
import os

import torch

from ..cbuild import build_file, declare_per_dtype
from ..common import SUFFIX, NoCtx, data_ptr, empty, scratch_buffer, step_blocks
from ..sparse_input.cpu import SparseRoute
from ..sparse import UNION_OVERLAP, Chain, full_above, sparse_linear, transposed_weight
from ...trace import current_trace, linear

__all__ = ["load_library", "kernel_isa", "kernel_openmp", "masked_rows_dot", "masked_rows_axpy_", "C_SOURCE",
           "FusedPointwiseFunction", "RecurrentGradFunction", "SegmentFunction", "fused_recurrent_egru"]

#: the C source (package data): `egru.c` instantiates `egru_body.h` for float and double
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "egru.c")

_lib = None
_P = ctypes.c_void_p
_L = ctypes.c_long


def load_library():
    """Build (once, cached on disk) and load the kernels; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        lib = declare_per_dtype(build_file("sparsebptt_egru", C_SOURCE), {
            "masked_rows_dot": (None, [_P, _P, _P, _P, _L, _L, _L]),
            "masked_rows_axpy": (None, [_P, _P, _P, _P, _L, _L, _L, _P, _P]),
            "egru_fwd": (None, [_L] * 3 + [_P] * 4 + [ctypes.c_double] + [_P] * 10),
            "egru_bwd": (_L, [_L] * 5 + [_P] * 7 + [ctypes.c_double] * 2 + [_P] * 4 + [_L, _P, _L, _L, _L, _L]
                         + [_P] * 10 + [_L] + [_P] * 6),
            "egru_transpose": (None, [_P, _L, _L, _P])})
        lib.egru_set_threads.restype, lib.egru_set_threads.argtypes = None, [ctypes.c_int]
        lib.egru_openmp.restype = ctypes.c_int
        lib.egru_simd.restype = ctypes.c_int
        lib.egru_isa.restype, lib.egru_isa.argtypes = ctypes.c_int, [ctypes.c_int]
        _lib = lib
    return _lib


def kernel_openmp() -> bool:
    """Whether the kernels were built with OpenMP: the segment scan's forward (per sample and
    chunk of outputs) and the backward's ``dL/dy`` dots and ``dW_hh`` blocks then run on
    ``torch.get_num_threads()`` threads (the backward's pointwise part on one)."""
    return bool(load_library().egru_openmp())


def kernel_isa(cap: int = -1) -> int:
    """The instruction set of the segment scan's register-blocked products: 2 AVX-512F, 1 AVX2 +
    FMA, 0 plain C (the best the CPU has, at most ``cap`` once a ``cap >= 0`` was given: tests
    run each copy)."""
    return int(load_library().egru_isa(int(cap)))


def _check(name, **tensors):
    dtypes = {t.dtype for t in tensors.values() if t.dtype != torch.bool}
    for k, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: {k} must be a contiguous CPU tensor, got {t.device} "
                             f"{'contiguous' if t.is_contiguous() else 'non-contiguous'}")
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUFFIX:
        raise ValueError(f"{name}: needs float32 or float64 tensors of one dtype, got "
                         f"{ {k: str(t.dtype) for k, t in tensors.items()} }")
    return SUFFIX[next(iter(dtypes))]


def masked_rows_dot(g: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``dy [B, H]``: ``g[b] . wt[j]`` where ``mask[b, j]`` (bool [B, H]), else 0.

    g [B, O], wt [H, O]: contiguous CPU tensors of one float dtype.
    """
    suf = _check("masked_rows_dot", g=g, wt=wt, mask=mask)
    B, O = g.shape
    H = wt.shape[0]
    if wt.shape[1] != O or mask.shape != (B, H) or mask.dtype != torch.bool:
        raise ValueError(f"masked_rows_dot: g [B, O], wt [H, O], mask bool [B, H], got {tuple(g.shape)}, "
                         f"{tuple(wt.shape)}, {mask.dtype} {tuple(mask.shape)}")
    dy = g.new_zeros(B, H)
    getattr(load_library(), f"masked_rows_dot_{suf}")(g.data_ptr(), wt.data_ptr(), mask.data_ptr(),
                                                      dy.data_ptr(), B, H, O)
    return dy


def masked_rows_axpy_(buf: torch.Tensor, y: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``buf[j] += sum_b y[b, j] * g[b]`` over ``mask[b, j]``, in place; returns ``buf``.

    buf [H, O], y [B, H], g [B, O], mask bool [B, H]: contiguous CPU tensors of one float dtype.
    """
    suf = _check("masked_rows_axpy_", buf=buf, y=y, g=g, mask=mask)
    B, H = y.shape
    O = g.shape[1]
    if buf.shape != (H, O) or g.shape[0] != B or mask.shape != (B, H) or mask.dtype != torch.bool:
        raise ValueError(f"masked_rows_axpy_: buf [H, O], y [B, H], g [B, O], mask bool [B, H], got "
                         f"{tuple(buf.shape)}, {tuple(y.shape)}, {tuple(g.shape)}, {mask.dtype} {tuple(mask.shape)}")
    bs = torch.empty(B, dtype=torch.long)
    vs = y.new_empty(B)
    getattr(load_library(), f"masked_rows_axpy_{suf}")(y.data_ptr(), g.data_ptr(), mask.data_ptr(), buf.data_ptr(),
                                                       B, H, O, bs.data_ptr(), vs.data_ptr())
    return buf


# ---- the sparse products of the backward --------------------------------------------------------

#: the C kernels run for CPU tensors of these dtypes; anything else takes the torch gathers
#: (tests switch this off to check those)
use_c_kernels = True


def _use_kernels(*tensors) -> bool:
    return use_c_kernels and all(t.device.type == "cpu" and t.dtype in SUFFIX for t in tensors)


def masked_input_grad(g: torch.Tensor, weight: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor):
    """``dy[b, j] = g[b] . W[:, j]`` where ``mask[b, j]``, else 0; returns (dy, MACs done).

    A dense GEMM ``g @ W`` (masked) when at least ``full_above(B)`` of the entries are wanted;
    else the C kernel over the wanted entries (``nnz * 3H`` MACs, no gathered copy); for tensors
    it does not take, the torch paths of `sparse_linear` (the batch's union of columns when the
    samples share them, else per sample).
    """
    B, n = mask.shape
    out = wt.shape[1]
    nnz = int(mask.sum())
    if nnz >= full_above(B) * B * n:  # g @ W (row-major W): 3x faster here than g @ wt.T
        return (g @ weight).masked_fill_(~mask, 0.0), B * n * out
    if nnz == 0:
        return g.new_zeros(B, n), 0
    if _use_kernels(g, wt):
        return masked_rows_dot(g.contiguous(), wt, mask), nnz * out
    union = mask.any(0)
    k = int(union.sum())
    dy = g.new_zeros(B, n)
    if B > 1 and B * k <= UNION_OVERLAP * nnz:
        idx = union.nonzero().squeeze(1)  # [k]
        part = (g @ wt.index_select(0, idx).t()).masked_fill_(~mask.index_select(1, idx), 0.0)  # [B, k]
        dy.index_copy_(1, idx, part)
        return dy, B * k * out
    nz = mask.nonzero()  # [nnz, 2], sorted by sample
    r, c = nz[:, 0], nz[:, 1]
    offsets = torch.searchsorted(r, torch.arange(B, device=g.device))
    dy[r, c] = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, wt, c, offsets, r, 0, -1)
    return dy, nnz * out


def accumulate_weight_grad(chain: Chain, y: torch.Tensor, g: torch.Tensor, fired: torch.Tensor) -> int:
    """``dW.T += y.T @ g`` over the entries with an event, into ``chain``; returns the MACs done.

    One dense in-place GEMM over every unit (silent ones add exact zeros) once ``full_above(B)``
    of the entries have an event; else the C kernel over the events (``nnz * 3H`` MACs), or for
    tensors it does not take a GEMM over the batch's union of units added into its rows.
    """
    buf = chain.buffer(g)  # [H, 3H]
    B, H = y.shape
    nnz = int(fired.sum())
    if nnz == 0:
        return 0
    if nnz >= full_above(B) * B * H:
        buf.addmm_(y.t(), g)
        return B * H * g.shape[1]
    if _use_kernels(y, g):
        masked_rows_axpy_(buf, y.contiguous(), g.contiguous(), fired)
        return nnz * g.shape[1]
    idx = fired.any(0).nonzero().squeeze(1)  # [k]
    chain.add(idx, y.index_select(1, idx).t() @ g)  # [k, 3H]
    return B * idx.numel() * g.shape[1]


class RecurrentGradFunction(torch.autograd.Function):
    """``gh + bias`` in the forward (``gh = W_hh y``, computed over the events by `sparse_linear`
    without a graph); the backward of the product, sparse:

    - ``dL/dy[b, j] = g[b] . W_hh[:, j]`` only where ``grad_mask`` (events, and silent units
      within epsilon of the threshold; every entry for a ``y`` from outside the segment);
    - ``dW_hh[:, j] += sum_b g[b] * y[b, j]`` only over the events, accumulated along the
      segment's ``chain`` (no dense [3H, H] gradient per step), handed to the weight by the
      segment's first step (``root``).
    """

    @staticmethod
    def forward(ctx, gh, y, weight, bias, fired, grad_mask, chain, root):
        ctx.save_for_backward(y, fired, grad_mask, weight)
        ctx.chain, ctx.root = chain, root
        ctx.has_bias = bias is not None
        return gh + bias if bias is not None else gh.clone()

    @staticmethod
    def backward(ctx, g):
        y, fired, grad_mask, weight = ctx.saved_tensors
        chain = ctx.chain
        need_y, need_w, need_b = ctx.needs_input_grad[1:4]
        t = current_trace()
        dy = dw = None
        if need_y:
            dy, macs = masked_input_grad(g, weight, chain.wt, grad_mask)
            if t is not None:
                t.add_backward_macs(macs)
        if need_w:
            macs = accumulate_weight_grad(chain, y, g, fired)
            if t is not None:
                t.add_backward_macs(macs)
            dw = chain.take() if ctx.root else None
        dbias = g.sum(0) if ctx.has_bias and need_b else None
        return g, dy, dw, dbias, None, None, None, None


def _recurrent(y, weight_hh, bias_hh, fired, grad_mask, chain, active_set, root):
    """``W_hh y + b_hh``: the forward reads the columns in ``fired`` (`sparse_linear`); with
    autograd, `RecurrentGradFunction` gives ``dL/dy`` on ``grad_mask`` and dW_hh over ``fired``."""
    with torch.no_grad():
        gh = sparse_linear(y.detach(), weight_hh.detach(), fired, active_set=active_set, weight_t=chain.wt)
    if torch.is_grad_enabled() and (y.requires_grad or weight_hh.requires_grad
                                    or (bias_hh is not None and bias_hh.requires_grad)):
        if grad_mask is None:
            grad_mask = fired
        return RecurrentGradFunction.apply(gh, y, weight_hh, bias_hh, fired, grad_mask, chain, root)
    return gh if bias_hh is None else gh + bias_hh


def _entry_masks(y):
    """Masks for a ``y`` from outside a segment: the forward reads its non-zero entries; its
    gradient is wanted at every entry (nothing tells which were near the threshold)."""
    fired = y != 0
    grad_mask = torch.ones_like(fired) if (torch.is_grad_enabled() and y.requires_grad) else None
    return fired, grad_mask


# ---- the pointwise part of a step ----------------------------------------------------------------

class FusedPointwiseFunction(torch.autograd.Function):
    """The pointwise part of an EGRU step (`sparsebptt.cells.egru`'s gates, internal state, event,
    output and reset) as one autograd node with a hand-written backward (the sparse path's: a step
    has ~15 elementwise nodes otherwise, whose overhead rivals the sparse products). Outputs
    ``(y', c', e, v)``; ``v = c~ - threshold`` carries no gradient. Checked against autograd
    through the reference step (``backend="torch"``) by the cell's tests.

    Backward, from ``dy'``, ``dc'`` and ``de`` (the event counts)::

        dv  = (dy' c~ - dc' threshold + de) psi(v)
        dc~ = dy' e + dc' + dv;   dthreshold = -sum_b (dc' e + dv)
        dc  = dc~ u;   du = dc~ (c - n);   dn = dc~ (1 - u)
        da_n = dn (1 - n^2);   da_u = du u (1 - u);   da_r = da_n (W_hn y + b_hn) r (1 - r)
        dgi = [da_r, da_u, da_n];   dgh = [da_r, da_u, da_n r]
    """

    @staticmethod
    def forward(ctx, gi, gh, c, threshold, gamma, epsilon):
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        u = torch.sigmoid(i_z + h_z)
        n = torch.tanh(torch.addcmul(i_n, r, h_n))
        ct = torch.addcmul(n, u, c - n)  # c~ [B, H]
        v = ct - threshold
        e = (v > 0).to(ct.dtype)
        y = ct * e
        c_new = torch.addcmul(ct, e, threshold, value=-1.0)
        ctx.save_for_backward(r, u, n, c, h_n, v, e, threshold)
        ctx.gamma, ctx.epsilon = gamma, epsilon
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(v)
        return y, c_new, e, v

    @staticmethod
    def backward(ctx, dy, dc_new, de, _dv):
        r, u, n, c, h_n, v, e, threshold = ctx.saved_tensors
        ct = v + threshold
        de_total = dy * ct if dy is not None else torch.zeros_like(v)
        if dc_new is not None:
            de_total = torch.addcmul(de_total, dc_new, threshold, value=-1.0)
        if de is not None:
            de_total = de_total + de
        dv = de_total * (ctx.gamma * torch.clamp(1.0 - v.abs() / ctx.epsilon, min=0.0))  # psi(v)
        dct = dv if dy is None else torch.addcmul(dv, dy, e)
        if dc_new is not None:
            dct = dct + dc_new
        dthr = dv if dc_new is None else torch.addcmul(dv, dc_new, e)
        dthr = -dthr.sum(0)
        dc = dct * u
        dn = dct - dc  # dc~ (1 - u)
        du = dct * (c - n)
        da_n = dn * (1.0 - n * n)
        da_u = du * u * (1.0 - u)
        da_r = da_n * h_n * r * (1.0 - r)
        dgi = torch.cat([da_r, da_u, da_n], 1)
        dgh = torch.cat([da_r, da_u, da_n * r], 1)
        return dgi, dgh, dc, dthr, None, None


def _record(layer, fired):
    t = current_trace()
    if t is not None:
        t.add_activity(layer, fired.sum(), fired.numel())



# ---- the segment in C ----------------------------------------------------------------------------


#: rows (steps x batch) of a chunk of the input projection: the segment's ``x W_ih^T + b_ih`` and
#: its gradient run chunk by chunk through one reused [chunk, B, 3H] buffer (a fresh [L, B, 3H]
#: tensor per segment cost its page faults: ~6 ms per 25 MB)
CHUNK_ROWS = 256


def _chunks(L: int, B: int):
    """(t0, t1) step ranges of about `CHUNK_ROWS` rows covering 0..L."""
    n = max(1, CHUNK_ROWS // B)
    return [(t0, min(L, t0 + n)) for t0 in range(0, L, n)]


def _project(x, weight, bias, out):
    """``out = x W^T + b`` for x [m, B, I] into out [m, B, O] (one GEMM)."""
    m, B, n_in = x.shape
    o = out.view(m * B, -1)
    if bias is None:
        torch.mm(x.reshape(m * B, n_in), weight.t(), out=o)
    else:
        torch.addmm(bias, x.reshape(m * B, n_in), weight.t(), out=o)


#: the backward's weight gradient over events runs over blocks of steps whose dL/d(W_hh y) rows
#: take about this many bytes (kept in cache while each row of dW_hh^T is read and written once)
DW_BLOCK_BYTES = 1 << 20

#: the backward's weight gradient runs over the events (C, `DW_BLOCK_BYTES` blocks) below this
#: share of non-zero ``y``, as one GEMM over the segment from it on. Its cost per event does not
#: depend on the batch size (unlike `full_above`'s per-sample products, the former switch):
#: measured (H = 512, one thread, untrained) the same at ~40 % activity for B = 8 and 32, sparse
#: 1.10-1.27x faster at 25 %, the GEMM 1.03-1.07x faster at 49 %
DW_SPARSE_BELOW = 0.4

#: the backward takes ``dL/dy_{t-1}`` as dots in C (register-blocked, each row of ``W_hh^T`` read
#: once for the samples that want it) below this share of wanted entries, as one GEMM from it on
DOTS_BELOW = 0.6

#: up to this batch size the dots group units by the set of samples that want them (tiles of
#: units x samples); above it each unit's row runs once for all its samples. Measured on the
#: trained char LM (H = 512, one thread): the same time at B = 8, grouping 1.2x slower at B = 16
#: and 1.05x at B = 32 (it reads a row once per block of 8 samples)
DOTS_GROUP_B = 8


class SegmentFunction(torch.autograd.Function):
    """A whole segment's recurrence in two C calls (``egru_fwd`` / ``egru_bwd``): inputs
    ``meta = (gamma, epsilon, route)``, x, the weights, the thresholds and the initial state;
    outputs ``(ys, c', y'[, n'])``. The input projection ``x W_ih^T + b_ih`` runs per chunk of
    steps, a GEMM or, on the scan's sparse `SparseRoute` (a mostly-zero x), from x's nonzeros,
    which are then kept instead of x; its backward: ``dx`` a GEMM when x needs it, ``dW_ih`` a
    GEMM or, on the sparse route, added at x's nonzeros in the C pass (``dL/d(x W_ih^T)`` then
    written only when dx needs it), ``db_ih`` summed in the C pass.

    Forward per step: ``gh = b_hh + sum_j y[b, j] W_hh^T[j]`` over the non-zero ``y`` (per
    chunk of 1 KiB of outputs, each sample's event rows added in registers; the chunk's columns
    of ``W_hh^T`` stay in L2 for all samples), then the pointwise part fused
    (`FusedPointwiseFunction`'s equations). Backward per step: the pointwise backward fused (one
    pass, ``dthreshold`` summed in place); then ``dL/dy_{t-1} = dgh . W_hh^T[j]`` only at the
    previous step's events and near-threshold units (every unit of a ``y0`` that needs a
    gradient) as dots, or one GEMM (``dgh W_hh``) when at least `DOTS_BELOW` of the entries are
    wanted; and ``dW_hh^T[j] += y_{t-1}[b, j] dgh[b]`` over its events, in blocks of steps
    (`DW_BLOCK_BYTES`), or one GEMM over the segment when `DW_SPARSE_BELOW` of the ``y`` are
    non-zero. Nothing is done for units outside the pseudo-derivative's support but carrying
    ``dc``. MACs to `sb.trace`: the dots, axpys and GEMMs done (``3H`` each row).
    """

    @staticmethod
    def forward(ctx, meta, x, weight_ih, bias_ih, weight_hh, bias_hh, threshold, c0, y0, n0):
        gamma, epsilon, route = meta
        L, B, n_in = x.shape
        O = weight_ih.shape[0]
        H = O // 3
        dt = x.dtype
        xd = x.detach().contiguous()
        w_ih = weight_ih.detach()
        b_ih = None if bias_ih is None else bias_ih.detach()
        whT = transposed_weight(weight_hh)
        bh = x.new_zeros(O) if bias_hh is None else bias_hh.detach().contiguous()
        thr = threshold.detach().contiguous()
        c = c0.detach().clone(memory_format=torch.contiguous_format)
        y = y0.detach().clone(memory_format=torch.contiguous_format)
        n = None if n0 is None else n0.detach().clone(memory_format=torch.contiguous_format)
        save = not isinstance(ctx, NoCtx)
        ys = empty((L, B, H), dt)  # (huge pages advised: no page fault per 4 KiB, fewer TLB misses)
        s = empty((L, B, 4 * H), dt) if save else None
        cts = empty((L, B, H), dt) if save else None
        gh = x.new_empty(B, O)
        bs, vs = torch.empty(B * (H + 1), dtype=torch.long), x.new_empty(B * H)
        counts = torch.empty(L, 3, dtype=torch.long)
        lib = load_library()
        fwd = getattr(lib, f"egru_fwd_{SUFFIX[dt]}")
        lib.egru_set_threads(torch.get_num_threads())  # its OpenMP threads (1 without OpenMP)
        chunks = _chunks(L, B)
        gi = x.new_empty(chunks[0][1], B, O)  # one chunk's input projection
        # a mostly-zero x (one-hot tokens, events, a lower layer's y): its nonzeros, kept for dW_ih
        rows = route.rows(xd.view(L * B, n_in), keep=save)
        for t0, t1 in chunks:
            m = t1 - t0
            if rows is None:
                _project(xd[t0:t1], w_ih, b_ih, gi[:m])
            else:
                rows.part(t0 * B, t1 * B).project(weight_ih, b_ih, gi[:m].view(m * B, O))
            fwd(m, B, H, gi.data_ptr(), whT.data_ptr(), bh.data_ptr(), thr.data_ptr(), epsilon, c.data_ptr(),
                y.data_ptr(), data_ptr(n), ys[t0].data_ptr(), None if s is None else s[t0].data_ptr(),
                None if cts is None else cts[t0].data_ptr(), gh.data_ptr(), bs.data_ptr(), vs.data_ptr(),
                counts[t0].data_ptr())
        ctx.counts = counts.sum(0)
        ctx.step_counts = counts
        ctx.input_nnz = L * B * n_in if rows is None else int(rows.ptr[-1])
        if save:
            ctx.rows = rows  # (x is then not kept: dW_ih comes from its nonzeros, dx needs only W_ih)
            ctx.save_for_backward(None if rows is not None else xd, weight_ih, bias_ih, weight_hh, threshold, c0, y0, ys, s, cts)
            ctx.whT, ctx.meta = whT, meta
            ctx.has_bias, ctx.has_count = bias_hh is not None, n0 is not None
        return (ys, c, y) if n is None else (ys, c, y, n)

    @staticmethod
    def backward(ctx, gys, gcT, gyT, gnT=None):
        xd, weight_ih, bias_ih, weight_hh, threshold, c0, y0, ys, s, cts = ctx.saved_tensors
        gamma, epsilon, _ = ctx.meta
        rows = ctx.rows
        L, B, H = ys.shape
        O = 3 * H
        need_x, need_wih, need_bih = ctx.needs_input_grad[1:4]
        need_w, need_b, need_thr, need_c0, need_y0 = ctx.needs_input_grad[4:9]
        gys, gst = step_blocks(gys, B, H, ys.dtype)  # gst: entries per step (0: one block for every step)
        gc = torch.zeros_like(c0) if gcT is None else gcT.detach().clone(memory_format=torch.contiguous_format)
        gy = torch.zeros_like(y0) if gyT is None else gyT.detach().clone(memory_format=torch.contiguous_format)
        gn = None if (gnT is None or not ctx.has_count) else gnT.contiguous()
        w_ih = weight_ih.detach()
        n_in = w_ih.shape[1]
        # dL/dW_ih from x's nonzeros in the C pass, each step's rows while they are in cache ([I, 3H],
        # W_ih^T's layout); else dgi (dL/d(x W_ih^T + b_ih)) per chunk of steps for the GEMMs (dx, dW_ih)
        in_c = need_wih and rows is not None
        need_dgi = need_x or (need_wih and not in_c)
        chunks = _chunks(L, B) if need_dgi else [(0, L)]
        dgi = ys.new_empty(chunks[0][1], B, O) if need_dgi else None
        dgn = ys.new_empty(B, H)  # the C pass's scratch: dgi's n part
        dx = ys.new_empty(L, B, n_in) if need_x else None
        dwih = ys.new_zeros(n_in, O) if in_c else (torch.zeros_like(w_ih) if need_wih else None)
        gbn = ys.new_zeros(H) if (need_bih and bias_ih is not None) else None  # dL/db_ih's n part
        gbh, gthr = ys.new_zeros(O), ys.new_zeros(H)
        macs = torch.zeros(2, dtype=torch.long)
        c0_, y0_, thr = c0.contiguous(), y0.contiguous(), threshold.detach().contiguous()  # held while C runs
        # the weight gradient over events (C) unless most y are non-zero: then one GEMM at the end
        counts = ctx.step_counts  # per step: events, non-zero y read, dL/dy entries wanted
        axpy = need_w and int(counts[:, 1].sum()) < DW_SPARSE_BELOW * L * B * H
        # dW_hh^T [H, 3H], summed in a per-thread buffer (W_hh's layout is written from it at the end)
        gwhT = scratch_buffer((H, O), ys.dtype, "egru_gwhT").zero_() if axpy else None
        # dL/dy_{t-1} as one GEMM (the caller's) where most of it is wanted, else dots in C
        wanted = torch.cat([torch.tensor([B * H if need_y0 else 0]), counts[:-1, 2]])
        dense = (wanted >= DOTS_BELOW * B * H).to(torch.uint8)
        # dW_hh over events in blocks of steps whose dgh rows fit in ~DW_BLOCK_BYTES (each dW row
        # read and written once per block, not per step)
        blk = min(L, max(1, DW_BLOCK_BYTES // (B * O * ys.element_size())))
        R = blk if axpy else L  # dL/d(W_hh y) of the steps: a ring of one block unless a GEMM takes dW_hh
        dghs = ys.new_empty(R, B, O)
        wl = torch.empty(3 * H + 256, dtype=torch.long)  # masked_dots' scratch
        cnt = torch.empty(2 * H, dtype=torch.long)
        # dw_block's scratch (sizes in its comment in egru_body.h): per sub-block of rows (at most
        # ceil(N / 64) of them) the units' event masks, rows and y, the quads' (the packed rows of a
        # column chunk are on each thread's stack)
        N, nsub = blk * B, -(-blk * B // 64)
        idx, val = ((torch.empty(2 * H + nsub * (H + 2) + 2 + 6 * nsub * (H // 4) + 128 + -(-5 * N * H // 32),
                                 dtype=torch.long), ys.new_empty(2 * N * H))
                    if axpy else (None, None))
        lib = load_library()
        run = getattr(lib, f"egru_bwd_{SUFFIX[ys.dtype]}")
        lib.egru_set_threads(torch.get_num_threads())  # the dots' and dW's OpenMP threads (1 without OpenMP)
        w_hh = weight_hh.detach()
        dense_macs = 0
        rest = (c0_.data_ptr(), y0_.data_ptr(), ys.data_ptr(), s.data_ptr(), cts.data_ptr(), ctx.whT.data_ptr(),
                thr.data_ptr(), gamma, epsilon, gys.data_ptr(), gc.data_ptr(), gy.data_ptr(), data_ptr(gn), int(need_y0),
                dense.data_ptr(), int(B <= DOTS_GROUP_B), int(axpy), blk, R, data_ptr(dgi), dghs.data_ptr(), data_ptr(gwhT),
                gbh.data_ptr(), gthr.data_ptr(), wl.data_ptr(), cnt.data_ptr(), data_ptr(idx), data_ptr(val),
                macs.data_ptr(), gst, data_ptr(gbn), dgn.data_ptr(), *((rows.ptr.data_ptr(), rows.col.data_ptr(),
                data_ptr(rows.val), dwih.data_ptr()) if in_c else (None,) * 4))  # fixed for the segment
        for t0, t1 in reversed(chunks):
            k = t1 - 1
            while k >= t0:
                k = run(L, B, H, k, t0, *rest)
                if k >= t0:  # dL/dy_{k-1} = dgh_k W_hh, one GEMM
                    torch.mm(dghs[k % R], w_hh, out=gy)
                    dense_macs += B * O * H
                    k -= 1
            if not need_dgi:
                continue
            g = dgi[:t1 - t0].view((t1 - t0) * B, O)  # the chunk's input-projection gradients
            if need_x:
                torch.mm(g, w_ih, out=dx[t0:t1].view((t1 - t0) * B, n_in))
            if need_wih and not in_c:
                dwih.addmm_(g.t(), xd[t0:t1].reshape((t1 - t0) * B, n_in))
        dense_macs += (int(need_x) * L * B * n_in + int(need_wih) * ctx.input_nnz) * O
        transpose = getattr(lib, f"egru_transpose_{SUFFIX[ys.dtype]}")  # (blocked; autograd's copy is slower)
        gw_hh = None
        if need_w and not axpy:  # dW_hh = dgh^T [y0, y_1 .. y_{L-1}], one GEMM
            yprev = torch.cat([y0_.unsqueeze(0), ys[:-1]]).reshape(L * B, H)
            gw_hh = dghs.reshape(L * B, O).t() @ yprev
            dense_macs += L * B * H * O
        elif axpy:  # summed over events in W_hh^T's layout [H, 3H]: into W_hh's
            gw_hh = ys.new_empty(O, H)
            transpose(gwhT.data_ptr(), H, O, gw_hh.data_ptr())
        if in_c:  # dW_ih^T [I, 3H] from x's nonzeros: into W_ih's layout
            gw = ys.new_empty(O, n_in)
            transpose(dwih.data_ptr(), n_in, O, gw.data_ptr())
            dwih = gw
        t = current_trace()
        if t is not None:
            t.add_backward_macs(int(macs.sum()) * O + dense_macs)
        dbih = None if gbn is None else torch.cat([gbh[:2 * H], gbn])  # dgi's r, z parts are dgh's
        dn0 = None
        if ctx.has_count and ctx.needs_input_grad[9]:
            dn0 = torch.zeros_like(y0) if gnT is None else gnT
        return (None, dx, dwih, dbih, gw_hh,
                gbh if (need_b and ctx.has_bias) else None, gthr if need_thr else None,
                gc if need_c0 else None, gy if need_y0 else None, dn0)


def _segment_in_c(x, state, weight_ih, bias_ih, weight_hh, bias_hh, threshold, gamma, epsilon, layer, route):
    c, y = state[0], state[1]
    n = state[2] if len(state) > 2 else None
    meta = (float(gamma), float(epsilon), SparseRoute() if route is None else route)
    args = (x, weight_ih, bias_ih, weight_hh, bias_hh, threshold, c, y, n)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        out = SegmentFunction.apply(meta, *args)
        ctx = out[0].grad_fn
    else:
        ctx = NoCtx()
        with torch.no_grad():
            out = SegmentFunction.forward(ctx, meta, *args)
    counts = ctx.counts
    t = current_trace()
    if t is not None:
        L, B, n_in = x.shape
        O = weight_ih.shape[0]
        t.add_forward_macs((ctx.input_nnz + int(counts[1])) * O)
        t.add_activity(layer, counts[0], L * B * (O // 3))
    return out[0], tuple(out[1:])

# ---- the segment ---------------------------------------------------------------------------------

def fused_recurrent_egru(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, *, gamma=0.7,
                         epsilon=0.5, active_set="auto", layer=None, route=None):
    """A segment of EGRU steps with the sparse backward: x [L, B, I] -> (ys [L, B, H], state').

    ``state`` is ``(c, y)`` or ``(c, y, n)`` (``n``: event counts). Equal to stepping
    `sparsebptt.cells.egru.egru_step` with ``backend="torch"`` up to rounding. One GEMM for the
    input projection of all steps and one transposed copy of ``W_hh`` for all the sparse
    products. Inside the segment each step reads the previous step's events (forward, weight
    gradient) and takes ``dL/dy`` at the events and at silent units within ``epsilon`` of the
    threshold only; the first step takes it at every unit. ``active_set``: how a batch shares
    the active columns in `sparse_linear`; ``layer``: the key of the activity in `sb.trace`.
    """
    tensors = [t for t in (x, *state, weight_ih, bias_ih, weight_hh, bias_hh, threshold) if t is not None]
    if _use_kernels(*tensors) and len({t.dtype for t in tensors}) == 1:
        return _segment_in_c(x, state, weight_ih, bias_ih, weight_hh, bias_hh, threshold, gamma, epsilon, layer,
                             route)
    gis = linear(x, weight_ih, bias_ih)  # [L, B, 3H], one GEMM (one backward node)
    c, y = state[0], state[1]
    count = state[2] if len(state) > 2 else None
    chain = Chain(weight_hh, transposed_weight(weight_hh))  # W_hh.T [H, 3H], once per segment
    fired, grad_mask = _entry_masks(y)
    ys = []
    for t, gi in enumerate(gis.unbind(0)):
        gh = _recurrent(y, weight_hh, bias_hh, fired, grad_mask, chain, active_set, root=t == 0)
        y, c, e, v = FusedPointwiseFunction.apply(gi, gh, c, threshold, gamma, epsilon)
        fired = v > 0
        _record(layer, fired)
        grad_mask = fired | (v.abs() < epsilon)  # dy/dc~ = e + c~ psi(v) is zero elsewhere
        if count is not None:
            count = count + e
        ys.append(y)
    new = (c, y) if count is None else (c, y, count)
    return torch.stack(ys), new
