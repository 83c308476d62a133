"""Exact counters of what a scan did: steps, recomputation, stored bytes, MACs, activity.

Use it as a context manager around the forward *and* the backward::

    with sb.trace() as t:
        y, _ = sb.scan(cell, x, strategy=sb.Revolve(slots=8))
        y.sum().backward()
    print(t.forward_steps, t.recomputed_steps, t.peak_stored_bytes, t.backward_macs)

Stored bytes are the bytes held for the backward of scans in fast memory: checkpoint buffers,
graph outputs kept for a later reverse sweep, and every tensor autograd saves while a scan builds
a graph (seen through ``torch.autograd.graph.saved_tensors_hooks``). Tensors the caller passed in
(x, state0, parameters) exist anyway and are not counted; each storage is counted once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Trace", "trace", "current_trace", "linear"]

_ACTIVE: list["Trace"] = []


def current_trace() -> "Trace | None":
    """The innermost active trace, or None (the fast path: no counting at all)."""
    return _ACTIVE[-1] if _ACTIVE else None


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class _Held:
    """What the pack hook returns: keeps the tensor and releases its count when freed.

    It keeps ``tensor.detach()``: the same storage and version counter, but no link to the
    tensor's ``grad_fn``. Keeping the tensor itself would make a cycle through C++ that Python's
    garbage collector cannot see (graph node -> saved variable -> this handle -> tensor -> its
    grad_fn, the same node) whenever a node saves its own output (sigmoid, tanh, ...), so a
    graph that is never back-propagated (a Skipper tail no gradient reaches) would never be freed.
    """

    __slots__ = ("tensor", "key", "trace", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key, trace: "Trace"):
        self.tensor = tensor.detach()
        self.key = key
        self.trace = trace

    def __del__(self):
        self.trace._release_saved(self.key)


@dataclass
class Trace:
    """Counters filled in by scans that run while this trace is active (see module docstring).

    Attributes:
        forward_steps: cell steps run in the first forward pass.
        recomputed_steps: cell steps run again during the backward pass.
        peak_stored_bytes: peak bytes held for backward in fast memory.
        peak_offloaded_bytes: peak bytes held in slow storage (host memory or disk).
        forward_macs: multiply-accumulates of the cells' matmuls in the first forward.
        recomputed_macs: multiply-accumulates of the matmuls of recomputed steps.
        backward_macs: multiply-accumulates of the matmuls' backward (input and weight grads).
        activity: fraction of active units per layer (spikes, events, deltas), over all steps.
    """

    forward_steps: int = 0
    recomputed_steps: int = 0
    peak_stored_bytes: int = 0
    peak_offloaded_bytes: int = 0
    forward_macs: int = 0
    recomputed_macs: int = 0
    backward_macs: int = 0
    stored_bytes: int = 0
    offloaded_bytes: int = 0
    _saved: dict = field(default_factory=dict, repr=False)
    _external: set = field(default_factory=set, repr=False)
    _activity: dict = field(default_factory=dict, repr=False)
    _names: dict = field(default_factory=dict, repr=False)
    recomputing: bool = field(default=False, repr=False)

    # ---- stored bytes --------------------------------------------------------------------
    def add_stored(self, nbytes: int) -> None:
        self.stored_bytes += nbytes
        if self.stored_bytes > self.peak_stored_bytes:
            self.peak_stored_bytes = self.stored_bytes

    def add_offloaded(self, nbytes: int) -> None:
        self.offloaded_bytes += nbytes
        if self.offloaded_bytes > self.peak_offloaded_bytes:
            self.peak_offloaded_bytes = self.offloaded_bytes

    def add_external(self, *tensors) -> None:
        """Mark tensors the caller owns (inputs, initial state, parameters) as not counted."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._external.add(_storage_key(t))

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key in self._external:
            return t
        entry = self._saved.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self._saved[key] = [1, nbytes]
            self.add_stored(nbytes)
        else:
            entry[0] += 1
        return _Held(t, key, self)

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Held) else h

    def _release_saved(self, key) -> None:
        entry = self._saved.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._saved[key]
            self.stored_bytes -= entry[1]

    def saving(self):
        """Context in which autograd-saved tensors are counted as stored bytes."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # ---- MACs and activity ---------------------------------------------------------------
    def add_forward_macs(self, macs: int) -> None:
        if self.recomputing:
            self.recomputed_macs += macs
        else:
            self.forward_macs += macs

    def add_backward_macs(self, macs: int) -> None:
        self.backward_macs += macs

    def name_layers(self, cell) -> None:
        """Give each layer of ``cell`` (a Stack or a single cell) a readable activity name."""
        layers = getattr(cell, "layers", None)
        if layers is None:
            self._names.setdefault(id(cell), type(cell).__name__)
        else:
            for i, layer in enumerate(layers):
                self._names.setdefault(id(layer), f"{i}:{type(layer).__name__}")

    def add_activity(self, layer, active: torch.Tensor, total: int) -> None:
        """Record ``active`` (a 0-d tensor count, kept lazy) of ``total`` units for ``layer``."""
        if self.recomputing:
            return
        name = self._names.get(id(layer), type(layer).__name__)
        acc = self._activity.get(name)
        if acc is None:
            self._activity[name] = [active.detach().double(), total]
        else:
            acc[0] = acc[0] + active.detach().double()
            acc[1] += total

    @property
    def activity(self) -> dict[str, float]:
        return {k: float(a) / n for k, (a, n) in self._activity.items() if n}

    def summary(self) -> dict:
        return {
            "forward_steps": self.forward_steps,
            "recomputed_steps": self.recomputed_steps,
            "peak_stored_bytes": self.peak_stored_bytes,
            "peak_offloaded_bytes": self.peak_offloaded_bytes,
            "forward_macs": self.forward_macs,
            "recomputed_macs": self.recomputed_macs,
            "backward_macs": self.backward_macs,
            "activity": self.activity,
        }


@contextlib.contextmanager
def trace():
    """Count what every scan does inside the block (forward and backward); yields a `Trace`."""
    t = Trace()
    _ACTIVE.append(t)
    try:
        yield t
    finally:
        _ACTIVE.remove(t)


@contextlib.contextmanager
def recomputing(t: "Trace | None"):
    """Mark steps run inside the block as recomputation (their MACs go to recomputed_macs)."""
    if t is None:
        yield
        return
    prev, t.recomputing = t.recomputing, True
    try:
        yield
    finally:
        t.recomputing = prev


def saving(t: "Trace | None"):
    """`Trace.saving()` of ``t``, or a no-op when no trace is active."""
    return t.saving() if t is not None else contextlib.nullcontext()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose multiply-accumulates are counted by an active `sb.trace` (the
    reference cells' and the kernels' projections alike).

    Forward MACs are ``B * in * out``; the backward adds the same for the input gradient (when
    x needs it) and for the weight gradient (when the weight needs it), counted when autograd
    actually runs that backward.
    """
    y = F.linear(x, weight, bias)
    t = current_trace()
    if t is not None:
        macs = x.numel() // x.shape[-1] * weight.shape[0] * weight.shape[1]
        t.add_forward_macs(macs)
        if y.requires_grad:
            n_bwd = macs * (int(x.requires_grad) + int(weight.requires_grad))
            y.register_hook(lambda g, _t=t, _n=n_bwd: _t.add_backward_macs(_n))
    return y
