"""What the fused kernels share: the dtypes the C kernels are built for, buffers for their
[L, B, H] outputs, and the stand-in context for a forward run outside autograd."""
from __future__ import annotations

import ctypes
import sys

import torch

__all__ = ["NoCtx", "SUFFIX", "empty"]

#: the dtypes the C kernels are compiled for, and the suffix of their functions (``lif_fwd_f32``)
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_HUGE = 2 << 20  # bytes of a transparent huge page (x86-64, aarch64 with 4 KiB pages)
_MADV_HUGEPAGE = 14
_libc = None


def empty(shape, dtype) -> torch.Tensor:
    """``torch.empty`` on CPU for the [L, B, H] buffers, with Linux's huge pages advised on large ones.

    A fresh 32 MiB buffer otherwise costs ~8,000 page faults on its first touch, which (measured
    on the 2-core CI machine) took longer than the kernel that fills it. The advice is a hint:
    where the kernel ignores it, nothing changes.
    """
    global _libc
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= 2 * _HUGE and sys.platform == "linux":
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        a = t.data_ptr()
        lo, hi = -(-a // _HUGE) * _HUGE, (a + nbytes) // _HUGE * _HUGE
        if hi > lo:
            _libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return t


class NoCtx:
    """Stands in for autograd's ctx when a forward runs outside autograd (nothing is kept)."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass
