"""Matmuls over the active columns only, with a backward that skips the same columns: the sparse
products Delta cells and EGRU share (their "cpu" backend).

``sparse_linear(x, weight, mask)`` computes ``(x * mask) @ weight.T`` (plus ``add_to``), where
``mask`` [B, in] marks the active entries of ``x`` (delta above threshold, events, spikes). Only
active columns of ``weight`` are read, in the forward and in the backward:

- forward:   y[b]          = sum_{j active in b} x[b, j] * W[:, j]
- backward:  dx[b, j]      = g[b] . W[:, j]                 for active (b, j) only, else 0
             dW[:, j]     += sum_b g[b] * x[b, j]            for active columns j only

This is the exact gradient of the masked product (``mask`` is a constant: thresholding is
piecewise constant). MACs done are counted in an active `sb.trace` (forward, and backward when
autograd runs it), so the counters fall with activity exactly as the work does.

How a batch shares the active set (``active_set``), chosen by measurement (BENCHMARKS.md,
"Delta RNN sparsity"):

- ``"union"``: the columns active in *any* sample are gathered (``index_select`` of rows of the
  cached ``W.T``) and one smaller dense matmul runs over them. Work ``B * |union| * out`` at
  GEMM speed; good when the samples' active sets overlap (correlated inputs), useless when
  B = 16 samples are independently 10 % active (the union is then ~80 %).
- ``"sample"``: every sample's own active entries (a CSR-like list of (b, j)), run with
  ``F.embedding_bag`` (per-sample weights, sum mode) in the forward and its fused gather-dot
  (``aten._embedding_bag_per_sample_weights_backward``) for dx in the backward: ``nnz * out``
  MACs, one pass over the active rows, at vector (not GEMM) speed. The weight gradient still
  runs over the union of the batch's active columns, as one GEMM (``B * |union| * out`` MACs):
  on a CPU that is far cheaper than materialising ``nnz`` rows of outer products to scatter.
- ``"auto"`` (default): per call, a dense GEMM on the masked input when at least
  ``full_above(B)`` of the entries are active (80 % at B = 1, 20 % at B = 16); the union when
  the samples share their active columns (``B * |union| <= UNION_OVERLAP * nnz``, B > 1); else
  per sample (always with B = 1: the same MACs as the union in one pass instead of a gather
  and a GEMV). Measured (BENCHMARKS.md, "Delta RNN sparsity"): with B = 16 independent samples
  the union is ~90 % of the columns at 15 % activity and never pays; the per-sample path
  beats the dense GEMM below ~15 % activity at B = 16 and below ~70 % at B = 1.

`full_above` is the dense switch of these per-sample products; EGRU's step-wise sparse
backward (`sparsebptt.kernels.egru.cpu`, dtypes and devices without its C segment scan) uses it
too. EGRU's C segment scan has its own switches, measured for its register-blocked products
(`DOTS_BELOW`, `DW_SPARSE_BELOW` there).

Whatever the choice, when every column is active in some sample the product runs as one dense
GEMM on the masked input (no gather): threshold 0 costs what the dense cell costs.

Weight gradients along a chain (`Chain`). A delta memory is updated every step, ``m_t = m_{t-1}
+ W dx_t``. Returning a full-size dW from every step would cost a dense [out, in] write and add
per step, however few columns were active. So when ``add_to`` is the output of an earlier
`sparse_linear` with the same weight, the two calls share one accumulator: each step's backward
adds only its active rows into it, and the first call of the chain (whose backward autograd
runs last, as every later call depends on its output) hands the whole sum to the weight. The
accumulator is tied to the autograd graph task, so a partial backward never leaks into another.
EGRU's recurrent products accumulate their weight gradient along a segment in the same `Chain`.
The chain also holds the weight's transposed copy (`transposed_weight`), made at the chain's
first call: one weight-sized copy per scan or recomputed segment, never a cache that could go
stale when a weight is edited in place (through ``.data`` the version counter does not move).
A chain never spans a change of grad mode: a no-grad call and a graph call start new chains.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..trace import current_trace

__all__ = ["ACTIVE_SETS", "FULL_ABOVE", "UNION_OVERLAP", "Chain", "full_above", "renamed_backend",
           "sparse_linear", "transposed_weight"]

ACTIVE_SETS = ("auto", "union", "sample")

#: "auto" thresholds: a dense GEMM on the masked input once at least ``full_above(B)`` of the
#: entries are active (see there); the union's gathered GEMM while it is at most
#: ``UNION_OVERLAP`` times the per-sample work (B * |union| <= UNION_OVERLAP * nnz: the samples
#: share their active columns); else the per-sample path.
FULL_ABOVE = 0.8


def full_above(B: int) -> float:
    """Share of active entries (of B x in) from which a masked product runs as one dense GEMM:
    ``max(0.15, FULL_ABOVE / sqrt(B))``, 0.8 at B = 1, 0.4 at B = 4, 0.28 at B = 8, 0.2 at
    B = 16. The one dense switch of the package: `sparse_linear`'s "auto" (its per-sample
    path) and EGRU's sparse backward (the C kernels of `sparsebptt.kernels.egru.cpu`). Results
    are exact either way; only the time changes.

    Chosen by the measurements behind the two former thresholds, which this replaces:

    - `sparse_linear`'s ``0.75 / sqrt(B)`` (benchmarks/sparsity.py, one core, H = 1024): the
      per-sample path costs about as much per MAC as a GEMV at B = 1 but ~5x a GEMM's at
      B = 16, so it paid below ~70-75 % activity at B = 1 and below ~15-20 % at B = 16;
    - EGRU's fixed 0.4 (H = 512, B = 8, one thread, random masks): its C kernels cost 0.86x
      the dense GEMM at 30 % activity and 1.2x at 50 % (input gradient), 0.9x and 1.5x
      (weight gradient).

    Remeasured for this choice (H = 512, 3H outputs, one thread, random masks, a shared 2-core
    machine: noisy), the break-even activity of the C kernels was ~0.75-0.8 at B = 1, ~0.3-0.35
    at B = 4, ~0.2 at B = 8 and ~0.2-0.25 at B = 16, and of the per-sample path ~0.6, 0.28,
    0.17, 0.14: the sparse paths' cost per MAC relative to a GEMM grows with B, as the
    ``1 / sqrt(B)`` rule has it, and the two kinds of measurement disagree by up to 2x at
    B = 8. ``FULL_ABOVE = 0.8`` stays inside that spread and keeps EGRU's former 0.4 where its
    tests run (B = 4).
    """
    return max(0.15, FULL_ABOVE / B ** 0.5)


UNION_OVERLAP = 2.0


def renamed_backend(owner: str, backend):
    """``backend`` with the former name of the sparse path, "sparse" (Delta cells, EGRU and their
    step functions), replaced by "cpu" (the backend it now is) with a DeprecationWarning."""
    if backend == "sparse":
        warnings.warn(f"{owner}: backend 'sparse' is now called 'cpu'; use backend='cpu'",
                      DeprecationWarning, stacklevel=3)
        return "cpu"
    return backend

_CHAIN_ATTR = "_sb_weight_grad_chain"


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight.T`` as a new contiguous tensor [in, out]: its rows are the columns of ``weight``.

    Gathering rows of ``W.T`` is ~6x faster than gathering columns of ``W`` on a CPU, so every
    chain of `sparse_linear` calls (one scan, or one recomputed segment) makes this copy once at
    its first call and reuses it; a call without a chain makes its own unless given ``weight_t``.
    """
    return weight.detach().t().contiguous()


class _Plan:
    """Which entries are active and how the product runs over them: "full" (every column, a
    dense GEMM on the masked x), "union" (gathered columns active in any sample) or "sample"
    (each sample's own entries)."""

    __slots__ = ("mode", "idx", "rows", "cols", "offsets", "macs_per_out")

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, active_set: str):
        B, n_in = x.shape
        if active_set == "sample":
            mode = "sample"
        else:
            union = mask.any(0)
            k = int(union.sum())
            if active_set == "union":
                mode = "full" if k == n_in else "union"
            else:  # auto: by the measured rule (see FULL_ABOVE, UNION_OVERLAP)
                nnz = int(mask.sum())
                if nnz >= full_above(B) * B * n_in:
                    mode = "full"
                elif B > 1 and B * k <= UNION_OVERLAP * nnz:
                    mode = "full" if k == n_in else "union"
                else:
                    mode = "sample"
        self.mode = mode
        self.idx = self.rows = self.cols = self.offsets = None
        if mode == "full":
            self.macs_per_out = B * n_in
        elif mode == "union":
            self.idx = union.nonzero().squeeze(1)  # [k]
            self.macs_per_out = B * self.idx.numel()
        else:
            nz = mask.nonzero()  # [nnz, 2], sorted by sample
            self.rows, self.cols = nz[:, 0], nz[:, 1]
            self.offsets = torch.searchsorted(self.rows, torch.arange(B, device=x.device))
            self.macs_per_out = self.rows.numel()


def _forward(add_to, x, mask, wt, plan: _Plan):
    """``add_to + (x * mask) @ wt`` over the active entries; returns (y, saved values)."""
    B, out = x.shape[0], wt.shape[1]
    if plan.mode != "sample":
        xa = x * mask  # [B, in]
        if plan.mode == "union":
            xa = xa.index_select(1, plan.idx)  # [B, k]
            wa = wt.index_select(0, plan.idx)  # [k, out]
        else:
            wa = wt
        y = xa @ wa if add_to is None else torch.addmm(add_to, xa, wa)
        return y, xa
    vals = x[plan.rows, plan.cols]  # [nnz]
    if plan.rows.numel() == 0:
        y = x.new_zeros(B, out)
    else:
        y = F.embedding_bag(plan.cols, wt, plan.offsets, mode="sum", per_sample_weights=vals)  # [B, out]
    return (y if add_to is None else add_to + y), vals


class Chain:
    """A weight gradient accumulated along consecutive products with one weight (a delta memory's
    steps, an EGRU segment's recurrent products), kept as dW.T [in, out] (rows per input column)
    and handed to the weight once, by the chain's first call, whose backward autograd runs last.

    Holds the weight, its transposed copy ``wt`` (`transposed_weight`, made once per chain) and
    ``graph`` (whether the chain was built with autograd: a chain never spans a change of grad
    mode). The accumulator is tied to the autograd graph task, so a partial backward never
    leaks into another.
    """

    __slots__ = ("weight", "wt", "graph", "buf", "task")

    def __init__(self, weight, wt, graph: bool = True):
        self.weight, self.wt, self.graph = weight, wt, graph
        self.buf = None
        self.task = None

    def _fresh(self) -> bool:
        task = torch._C._current_graph_task_id()
        if self.buf is None or self.task != task:  # a new backward pass: start from zero
            self.buf, self.task = None, task
            return True
        return False

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        """The accumulator dW.T [in, out] of this backward pass (zeros at its first use, with
        ``like``'s dtype and device), for kernels that add into it in place."""
        if self._fresh():
            self.buf = like.new_zeros(self.wt.shape)
        return self.buf

    def add(self, idx: "torch.Tensor | None", rows: torch.Tensor) -> None:
        """Add ``rows`` into the rows ``idx`` (distinct) of dW.T (every row when ``idx`` is None).

        ``index_add_`` with one intra-op thread; with more, ``index_copy_`` of the sum (the same
        values): on a shared 2-core machine with 2 threads ``index_add_`` took 65 ms for a
        [3, 21] add (its scatter_add_ wakes every thread), ``index_copy_`` 5 us.
        """
        if self._fresh() and idx is None:
            self.buf = rows.clone()
            return
        buf = self.buffer(rows)
        if idx is None:
            buf += rows
        elif not idx.numel():
            return
        elif torch.get_num_threads() == 1:
            buf.index_add_(0, idx, rows)
        else:
            buf.index_copy_(0, idx, buf.index_select(0, idx) + rows)

    def take(self):
        """dW [out, in] summed over the chain (None if nothing was added); resets the chain."""
        buf, self.buf, self.task = self.buf, None, None
        return None if buf is None else buf.t()


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, add_to, x, mask, weight, wt, plan, chain, root):
        y, saved = _forward(add_to, x, mask, wt, plan)
        ctx.plan, ctx.chain, ctx.root, ctx.wt = plan, chain, root, wt
        ctx.x_shape = x.shape
        ctx.has_add_to = add_to is not None
        if plan.mode == "union":
            ctx.save_for_backward(weight, saved, mask.index_select(1, plan.idx))
        elif plan.mode == "full":
            ctx.save_for_backward(weight, saved, mask)
        else:
            ctx.save_for_backward(weight, saved)
        return y

    @staticmethod
    def backward(ctx, g):
        plan, wt = ctx.plan, ctx.wt
        weight, saved, *rest = ctx.saved_tensors  # unpacking weight checks its version
        need_add, need_x, _, need_w = ctx.needs_input_grad[:4]
        out = wt.shape[1]
        t = current_trace()
        dadd = g if (need_add and ctx.has_add_to) else None
        dx = dw = None
        if need_x:
            dx = g.new_zeros(ctx.x_shape)
        if plan.mode == "full":
            idx = None
            if need_x:
                dx = (g @ wt.t()) * rest[0]
            rows = saved.t() @ g if need_w else None  # [in, out]
        elif plan.mode == "union":
            idx = plan.idx
            if need_x and idx.numel():
                wa = wt.index_select(0, idx)  # [k, out]
                dxa = (g @ wa.t()) * rest[0]  # [B, k], only active entries
                dx.index_copy_(1, idx, dxa)
            rows = saved.t() @ g if need_w else None  # [k, out]
        else:
            r, c = plan.rows, plan.cols
            if need_x and r.numel():  # fused gather-dot: dx[r, c] = g[r] . W.T[c], one pass
                dx[r, c] = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    g, wt, c, plan.offsets, r, 0, -1)
            idx = rows = None
            if need_w:  # dW over the batch's active columns as one GEMM (never nnz x out copies)
                xm = g.new_zeros(ctx.x_shape)
                xm[r, c] = saved
                idx = torch.unique(c)  # [k], sorted
                rows = xm.index_select(1, idx).t() @ g  # [k, out]
        if t is not None:  # MACs done: dx over the plan's entries, dW over the rows computed
            macs_w = (out * ctx.x_shape[0] * (ctx.x_shape[1] if idx is None else idx.numel())
                      if need_w else 0)
            t.add_backward_macs(plan.macs_per_out * out * int(need_x) + macs_w)
        if need_w:
            chain = ctx.chain
            if chain is None:
                if idx is None:
                    dw = rows.t()
                else:
                    dw = g.new_zeros(wt.shape)
                    dw.index_add_(0, idx, rows)
                    dw = dw.t()
            else:
                chain.add(idx, rows)
                dw = chain.take() if ctx.root else None
        return dadd, dx, None, dw, None, None, None, None


def _check(x, weight, mask, add_to, active_set):
    if active_set not in ACTIVE_SETS:
        raise ValueError(f"sparse_linear: unknown active_set {active_set!r}; valid values are: "
                         f"{', '.join(ACTIVE_SETS)}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"sparse_linear: x must be [B, in] and weight [out, in], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"sparse_linear: mask must be a bool tensor of x's shape {tuple(x.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if add_to is not None and add_to.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"sparse_linear: add_to must be [B, out] = {(x.shape[0], weight.shape[0])}, "
                         f"got {tuple(add_to.shape)}")


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, *,
                  add_to: torch.Tensor | None = None, active_set: str = "auto",
                  weight_t: torch.Tensor | None = None) -> torch.Tensor:
    """``add_to + (x * mask) @ weight.T``, reading only the active columns of ``weight``.

    Args:
        x: [B, in]; entries where ``mask`` is False are ignored (they get zero gradient).
        weight: [out, in] (the ``nn.Linear`` layout).
        mask: [B, in] bool, the active entries.
        add_to: optional [B, out] added to the product (a delta memory). When it is the output
            of an earlier call with the same weight, the weight gradient is accumulated along
            the chain (see the module docstring) instead of one dense dW per call.
        active_set: "auto", "union" or "sample": how a batch shares the active set.
        weight_t: ``transposed_weight(weight)`` made by the caller for several calls without a
            chain (it must be current: the caller answers for it); default: made here.

    Returns:
        [B, out]. MACs actually done go to the active `sb.trace` (forward and backward).
    """
    _check(x, weight, mask, add_to, active_set)
    plan = _Plan(x, mask, active_set)
    t = current_trace()
    if t is not None:
        t.add_forward_macs(plan.macs_per_out * weight.shape[0])
    graph = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (add_to is not None and add_to.requires_grad))
    chain = getattr(add_to, _CHAIN_ATTR, None) if add_to is not None else None
    root = chain is None or chain.weight is not weight or chain.graph != graph
    if root:
        wt = transposed_weight(weight) if weight_t is None else weight_t
        chain = Chain(weight, wt, graph) if add_to is not None else None
    else:
        wt = chain.wt
    if graph:
        y = _SparseLinear.apply(add_to, x, mask, weight, wt, plan, chain, root)
    else:
        with torch.no_grad():
            y = _forward(add_to, x, mask, wt, plan)[0]
    if chain is not None:
        setattr(y, _CHAIN_ATTR, chain)
    return y
