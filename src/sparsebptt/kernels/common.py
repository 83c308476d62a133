"""What the fused kernels share: the dtypes the C kernels are built for, buffers for their
[L, B, H] outputs, and the stand-in context for a forward run outside autograd."""
from __future__ import annotations

import ctypes
import sys
import threading
import weakref

import torch

__all__ = ["KernelTable", "NoCtx", "SUFFIX", "data_ptr", "empty", "scratch_buffer", "step_blocks", "transposed"]

#: the dtypes the C kernels are compiled for, and the suffix of their functions (``lif_fwd_f32``)
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def data_ptr(t: "torch.Tensor | None"):
    """``t.data_ptr()``, or None (a NULL pointer for a C kernel) for None."""
    return None if t is None else t.data_ptr()


class KernelTable:
    """A C library's functions by name and dtype: ``table("lif_fwd", torch.float32)`` is its
    ``lif_fwd_f32``, looked up once; ``load()`` builds and loads the library at the first call."""

    def __init__(self, load):
        self._load, self._fns = load, {}

    def __call__(self, name: str, dtype):
        fn = self._fns.get((name, dtype))
        if fn is None:
            fn = self._fns[(name, dtype)] = getattr(self._load(), f"{name}_{SUFFIX[dtype]}")
        return fn


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


_scratch_tls = threading.local()


def scratch_buffer(shape, dtype, name: str) -> torch.Tensor:
    """A per-thread reusable buffer of ``shape`` for temporaries that never leave a call (one buffer
    per ``name`` and dtype, e.g. di of a LIF layer's backward, the nonzeros of a sparse input
    while they are listed and used; a later call with the same name reuses it): a fresh 32 MiB
    buffer costs more in page faults than the kernel that fills it."""
    views = getattr(_scratch_tls, "views", None)
    if views is None:
        views = _scratch_tls.views = {}
        _scratch_tls.scratch = {}
    key = (name, dtype, tuple(shape))
    hit = views.get(key)  # the view of this shape made before, while its buffer is still the one
    cache = _scratch_tls.scratch
    if hit is not None and hit[0] is cache.get((name, dtype)):
        return hit[1]
    n = 1
    for d in shape:
        n *= d
    buf = cache.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = cache[(name, dtype)] = empty((n,), dtype)
    if len(views) >= 256:  # (segments of many lengths: the views are cheap to make again)
        views.clear()
    view = buf[:n].view(shape)
    views[key] = (buf, view)
    return view


def step_blocks(g: "torch.Tensor | None", B: int, H: int, dtype) -> tuple[torch.Tensor, int]:
    """An outputs' gradient ``g`` [L, B, H] as the kernels read it: ``(tensor, entries per step)``.
    One contiguous [B, H] block with step 0 when every step has the same one (``g`` None: zeros;
    ``g`` expanded along the steps, as a sum's gradient is), else ``(g.contiguous(), B * H)``."""
    if g is None:
        return torch.zeros(B, H, dtype=dtype), 0
    if g.stride(0) == 0:
        return g[0].contiguous(), 0
    return g.contiguous(), B * H


_transposed_cache = threading.local()
#: weights whose transposed copy `transposed` keeps (per thread; the oldest is dropped)
TRANSPOSED_KEEP = 8


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``weight.t()``, made once per value of the weight and reused by every
    segment of a scan (a 256 x 768 copy costs about as much as 4 steps of a GRU at B=16).

    The copy is keyed on the tensor itself (a weak reference), its storage address and its
    version counter, which every in-place change bumps (an optimizer step, ``copy_``, ``.data``
    assignment changes the address): a changed weight is copied again. Made under no_grad (the
    kernels' forward runs outside autograd); per thread, at most `TRANSPOSED_KEEP` weights; the copies of
    weights that no longer exist are dropped at the next miss.
    """
    cache = _transposed_cache.__dict__.setdefault("entries", {})
    key = id(weight)
    hit = cache.get(key)
    if hit is not None:
        ref, version, ptr, shape, wt = hit
        if ref() is weight and version == weight._version and ptr == weight.data_ptr() \
                and shape == weight.shape:
            return wt
        del cache[key]
    with torch.no_grad():
        wt = weight.detach().t().contiguous()
    for k in [k for k, e in cache.items() if e[0]() is None]:  # copies of weights gone since
        del cache[k]
    if len(cache) >= TRANSPOSED_KEEP:
        del cache[next(iter(cache))]
    cache[key] = (weakref.ref(weight), weight._version, weight.data_ptr(), weight.shape, wt)
    return wt


class NoCtx:
    """Stands in for autograd's ctx when a forward runs outside autograd (nothing is kept)."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass
