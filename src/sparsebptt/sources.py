"""Inputs read one segment at a time: spike tensors stored as bool/uint8, memory maps, and
`SegmentSource` (a callable that makes a segment on demand).

At T = 10^6 the input alone can outgrow memory (B = 16, 64 features, float32: 4 GiB), and no
checkpointing strategy helps then. `sb.scan` therefore also takes:

- a **bool / uint8 / int8 tensor** (spikes): each segment the scan reads is converted to the
  cell's dtype when it is read, never the whole input (1 byte per value instead of 4 or 8);
- a **memory-mapped tensor** (``torch.from_file(path, size=..., dtype=...)`` viewed as
  (T, B, *features), or a ``numpy.memmap``, taken as it is through ``torch.from_numpy``): a
  segment is a view, so only the pages of the segments read are brought in;
- a **`SegmentSource`**: ``fn(t0, t1) -> Tensor`` of shape (t1 - t0, B, *features), called when
  the scan first needs steps t0..t1 and again when a memory strategy recomputes them.

Gradients w.r.t. such inputs are not computed: a spike tensor cannot require grad, and a
`SegmentSource` refuses ``requires_grad_(True)``. (A floating-point tensor of the cell's dtype,
memory-mapped or not, keeps its gradient as any tensor input does.)

`as_input` wraps whatever `sb.scan` got into an `Input`, the one object the executor reads
segments from.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SegmentSource", "Input", "as_input", "SPIKE_DTYPES"]

#: integer dtypes a scan accepts as spike inputs (converted per segment to the cell's dtype)
SPIKE_DTYPES = (torch.bool, torch.uint8, torch.int8)


class SegmentSource:
    """An input of T steps, each of shape ``shape`` = (B, *features), made on demand by ``fn``.

    ``fn(t0, t1)`` returns the steps t0..t1 (a tensor of shape (t1 - t0, B, *features)); the scan
    calls it when it first needs a segment and again when a memory strategy recomputes it, so it
    must return the same values every time (read a file, regenerate from a seed). Any dtype works
    (converted to the cell's dtype per segment; ``dtype`` only records it). ``device`` is the
    cell's device (default CPU): each segment is moved there when read, so ``fn`` may return CPU
    tensors for a CUDA cell.

    Example::

        src = sb.SegmentSource(lambda t0, t1: spikes_from_file(t0, t1), T=1_000_000, shape=(16, 64))
        rate, _ = sb.scan(net, src, strategy="double:1024,32", reduce="sum")

    Gradients w.r.t. a source are not computed (``requires_grad_(True)`` raises).
    """

    def __init__(self, fn, T: int, shape, *, dtype: torch.dtype | None = None, device=None):
        if not callable(fn):
            raise TypeError(f"SegmentSource: fn must be a callable fn(t0, t1) -> Tensor, got {type(fn).__name__}")
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"SegmentSource: T must be a positive int, got {T!r}")
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"SegmentSource: shape must be (B, *features) of positive ints (one step's "
                             f"shape, at least 2-D), got {shape!r}")
        self.fn, self.T, self.step_shape = fn, T, shape
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)

    @property
    def shape(self) -> torch.Size:
        """(T, B, *features), like a tensor's."""
        return torch.Size((self.T,) + self.step_shape)

    def dim(self) -> int:
        return 1 + len(self.step_shape)

    @property
    def requires_grad(self) -> bool:
        return False

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise ValueError("SegmentSource: gradients w.r.t. a streamed input are not supported; pass a "
                             "floating-point tensor (memory-mapped if large) to get dL/dx")
        return self

    def read(self, t0: int, t1: int) -> torch.Tensor:
        seg = self.fn(t0, t1)
        if not isinstance(seg, torch.Tensor):
            raise TypeError(f"SegmentSource: fn({t0}, {t1}) returned {type(seg).__name__}, expected a Tensor")
        want = (t1 - t0,) + self.step_shape
        if tuple(seg.shape) != want:
            raise ValueError(f"SegmentSource: fn({t0}, {t1}) returned shape {tuple(seg.shape)}, expected {want} "
                             "(t1 - t0, B, *features)")
        return seg

    def __repr__(self) -> str:
        return f"SegmentSource(T={self.T}, shape={self.step_shape})"


class Input:
    """What the executor reads segments from: ``read(t0, t1)`` gives steps t0..t1 in the cell's
    dtype. ``tensor`` is the caller's tensor when segments are views of it in that dtype (its
    gradient is then computed as before), else None (converted or streamed: no gradient)."""

    def __init__(self, x, dtype: torch.dtype):
        self.x, self.dtype = x, dtype
        self.shape = torch.Size(x.shape)
        self.T = self.shape[0]
        self.device = x.device
        self.tensor = x if isinstance(x, torch.Tensor) and x.dtype == dtype else None
        self.requires_grad = bool(self.tensor is not None and self.tensor.requires_grad)

    @property
    def streamed(self) -> bool:
        """Whether segments are converted or produced on read (not views of a tensor in the cell's dtype)."""
        return self.tensor is None

    def step_bytes(self) -> int:
        """Bytes of one step as the cell reads it (converted)."""
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()

    def read(self, t0: int, t1: int) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[t0:t1]
        x = self.x
        seg = x.read(t0, t1) if isinstance(x, SegmentSource) else x[t0:t1]
        return seg.to(device=self.device, dtype=self.dtype)

    def whole(self) -> torch.Tensor:
        return self.read(0, self.T)


def as_input(x, dtype: torch.dtype) -> Input:
    """Wrap a scan's input (a tensor, a numpy array or memmap, a `SegmentSource`) for the executor."""
    if isinstance(x, Input):
        return x
    return Input(x, dtype)
