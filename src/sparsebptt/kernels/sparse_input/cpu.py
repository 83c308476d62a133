"""Products over a mostly-zero input (spikes, events, one-hot tokens): its nonzeros listed once
per segment (`SparseRows`, CSR), the projection ``x W^T + b`` and the weight gradient
``dL/dout^T x`` taken from them in C (``sparse_input.c``), and the per-scan choice between them
and the matmul (`SparseRoute`). A row's projection adds the rows of ``W^T`` at its nonzeros in
ascending column order, so it does not depend on the rows computed with it: a recomputed segment
repeats the forward bit for bit however the scan was cut. Used by the fused "cpu" LIF, GRU and
LSTM layers and the EGRU segment scan (their cells bind one `SparseRoute` per scan:
`FusedCell.segment_takes_route`)."""
from __future__ import annotations

import ctypes
import os

import torch

from ..cbuild import build_file, declare_per_dtype
from ..common import KernelTable, data_ptr, scratch_buffer, transposed

__all__ = ["SparseRows", "SparseRoute", "SPARSE_CHUNK", "SPARSE_INPUT_MAX", "load_library", "C_SOURCE"]

#: the C source (package data): ``sparse_input.c`` instantiates ``sparse_input_body.h`` per dtype
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_input.c")

#: rows per chunk of `sp_mm_t` (``SP_CHUNK`` in sparse_input_body.h)
SPARSE_CHUNK = 256
#: the largest fraction of nonzero inputs at which a layer takes the sparse-input products: on
#: the AVX-512 box, one thread, in -> 256 for 160 or 1,600 rows, they equal the matmul near 40-45 %
#: (forward) and 25-30 % (dW) and take 0.2-0.5x its time at 2-10 % (benchmarks/lif_sparse_input.py,
#: results/lif_sparse_input_issue17a.csv)
SPARSE_INPUT_MAX = 0.25

_P, _L = ctypes.c_void_p, ctypes.c_long
_lib = None


def load_library():
    """Build (once, cached on disk) and load the C products; raises `CBuildError` if impossible."""
    global _lib
    if _lib is None:
        _lib = declare_per_dtype(build_file("sparsebptt_sparse_input", C_SOURCE), {
            "sp_csr": (_L, [_P, _L, _L, _L, _P, _P, _P, _P]),
            "sp_mm": (None, [_P, _P, _P, _P, _P, _L, _L, _P]),
            "sp_mm_t": (None, [_P, _P, _P, _P, _L, _L, _L, _P, _P, _P, _P])})
    return _lib


_fn = KernelTable(load_library)  # (name, dtype) -> the loaded C function


class SparseRows:
    """The nonzeros of an input x [R, K] row by row (CSR): what the sparse-input products read
    instead of x. ``ptr`` int64 [R + 1], ``col`` int32 [nnz], ``val`` [nnz] (None: every nonzero
    is 1, spikes)."""

    __slots__ = ("ptr", "col", "val", "R", "K")

    def __init__(self, ptr, col, val, R, K):
        self.ptr, self.col, self.val, self.R, self.K = ptr, col, val, R, K

    @classmethod
    def of(cls, x2: torch.Tensor, keep: bool, max_density: float = 1.0):
        """The rows of ``x2`` [R, K] (contiguous), or None when more than ``max_density`` of its
        entries are nonzero (it stops counting there). ``keep``: trim to the nnz entries (saved)."""
        R, K = x2.shape
        max_nnz = int(max_density * R * K)
        # listed into per-thread buffers; what is kept is copied out at its size
        ptr = torch.empty(R + 1, dtype=torch.int64) if keep else scratch_buffer((R + 1,), torch.int64, "ptr")
        col = scratch_buffer((max_nnz + K + 1,), torch.int32, "col")
        val = scratch_buffer((max_nnz + K + 1,), x2.dtype, "val")
        binary = ctypes.c_int(0)
        n = _fn("sp_csr", x2.dtype)(
            x2.data_ptr(), R, K, max_nnz, ptr.data_ptr(), col.data_ptr(), val.data_ptr(), ctypes.byref(binary))
        if n < 0:
            return None
        val = None if binary.value else (val[:n].clone() if keep else val)
        return cls(ptr, col[:n].clone() if keep else col, val, R, K)

    def part(self, r0: int, r1: int) -> "SparseRows":
        """Rows ``r0 .. r1 - 1`` (their nonzeros are not copied): their products alone."""
        return SparseRows(self.ptr[r0:r1 + 1], self.col, self.val, r1 - r0, self.K)

    def project(self, weight, bias, out2):
        """``out2 = x W^T + b`` [R, H]: per row, the rows of W^T at its nonzeros, times their
        values, added in ascending column order."""
        H = weight.shape[0]
        fn = _fn("sp_mm", out2.dtype)
        fn(self.ptr.data_ptr(), self.col.data_ptr(), data_ptr(self.val), transposed(weight).data_ptr(), data_ptr(bias),
           self.R, H, out2.data_ptr())

    def weight_grad(self, d2, into=None):
        """``d2^T x`` [H, K] (dL/dW of ``x W^T``) from ``d2`` = dL/dout [R, H] (contiguous), as the
        transpose of a contiguous [K, H]: per input column the rows of d2 at its nonzeros are
        summed (in chunks of `SPARSE_CHUNK` rows); the copy into W's layout is left to whoever
        accumulates the gradient (once per scan, not once per segment). ``into``: such a transpose
        (an earlier result) to add into in place, and return."""
        H = d2.shape[1]
        dwt = torch.zeros(self.K, H, dtype=d2.dtype) if into is None else into.t()
        cnt = scratch_buffer((self.K + 1,), torch.int32, "cnt")
        n = max(1, min(self.R, SPARSE_CHUNK) * self.K)
        rows = scratch_buffer((n,), torch.int32, "rows")
        vals = scratch_buffer((n if self.val is not None else 1,), d2.dtype, "vals")
        _fn("sp_mm_t", d2.dtype)(
            self.ptr.data_ptr(), self.col.data_ptr(), data_ptr(self.val), d2.data_ptr(), self.R, self.K, H,
            dwt.data_ptr(), cnt.data_ptr(), rows.data_ptr(), vals.data_ptr())
        return dwt.t()

    def tensors(self):
        """What the backward keeps: (ptr, col, val)."""
        return self.ptr, self.col, self.val


class SparseRoute:
    """Whether one scan's input products run sparse: decided on the scan's first segment (at most
    `SPARSE_INPUT_MAX` of its inputs nonzero) and kept for every later segment of that scan,
    recomputations included, so the forward and its recomputation take the same path (each row's
    currents then repeat bit for bit). A layer's `scan_segment` makes one per scan."""

    __slots__ = ("sparse",)

    def __init__(self):
        self.sparse = None

    def rows(self, x2: torch.Tensor, keep: bool):
        """`SparseRows` of ``x2`` when this scan runs sparse, else None."""
        if self.sparse is False:
            return None
        rows = SparseRows.of(x2, keep, SPARSE_INPUT_MAX if self.sparse is None else 1.0)
        if self.sparse is None:
            self.sparse = rows is not None
        return rows
