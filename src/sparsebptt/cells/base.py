"""The cell protocol and the pieces every reference cell shares.

A cell is any ``nn.Module`` with::

    initial_state(batch_size, device=None, dtype=None) -> tuple[Tensor, ...]
    step(x_t, state) -> (y_t, state)            # x_t: [B, input_size], y_t: [B, output]

Every exact strategy works with any such module. The reference cells here add ``input_size`` and
``hidden_size`` attributes, which `sb.scan` uses to check inputs early.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math

import torch
from torch import nn

from ..kernels.backend import check_backend, get_backend, require_backend, resolve_backend
from ..trace import linear

__all__ = ["Cell", "FusedCell", "linear", "init_uniform_", "run_steps", "step_is_fused", "log_once"]

log = logging.getLogger("sparsebptt.kernels")
_logged: set[str] = set()


def log_once(msg: str) -> None:
    """Log ``msg`` on the ``sparsebptt.kernels`` logger the first time it is seen."""
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def run_steps(step, x, state, *, on_output=None, t0: int = 0):
    """The time loop, written once: ``y_t, state = step(x[t], state)`` for t in 0..len(x)-1.

    Returns ``(ys, state)`` with ``ys`` the list of what each step gave back: ``y_t`` itself, or
    ``on_output(t0 + t, y_t)`` when ``on_output`` is given (a reducer's hook; None entries are
    kept, so ``ys[t]`` stays step ``t``'s). ``step`` is a cell's ``step`` or any
    ``(x_t, state) -> (y_t, state)`` callable (a pure ``<cell>_step`` with its parameters bound).
    Every reference loop in the package (the plain scan, the executor's segments, `Stack`, the
    ``naive_*`` kernels' oracles) runs through here.
    """
    ys = []
    for t in range(x.shape[0]):
        y, state = step(x[t], state)
        ys.append(y if on_output is None else on_output(t0 + t, y))
    return ys, state


def step_is_fused(cell, segment: str, path: str) -> bool:
    """Whether ``cell.step`` is the step its fused segment path (the method named ``segment``,
    described by ``path`` in the message) implements: the ``step`` of the class that defines that method, not overridden by a subclass
    or on the instance. When it is not, the fused path would silently skip the user's ``step``:
    this says so once on the ``sparsebptt.kernels`` logger and returns False, and the scan steps
    through ``cell.step`` instead.
    """
    cls = type(cell)
    owner = next((c for c in cls.__mro__ if segment in c.__dict__), None)
    if owner is None:  # pragma: no cover - callers pass a method the cell has
        return False
    if "step" not in vars(cell) and getattr(cls, "step", None) is getattr(owner, "step", None):
        return True
    where = f"{cls.__name__} instance" if "step" in vars(cell) else cls.__name__
    log_once(f"sparsebptt: {where} overrides {owner.__name__}.step, which {path} implements; its "
             "scans step through the overriding step instead")
    return False


def init_uniform_(module: nn.Module, hidden_size: int) -> None:
    """PyTorch's RNN initialisation: every parameter uniform in +-1/sqrt(hidden_size)."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-bound, bound)


class Cell(nn.Module):
    """Base class of the reference cells: holds sizes and the ``initial_state`` helper."""

    #: number of tensors in the state tuple (set by subclasses)
    num_states: int = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def _param_like(self, device, dtype):
        p = next(self.parameters(), None)
        if device is None:
            device = p.device if p is not None else torch.device("cpu")
        if dtype is None:
            dtype = p.dtype if p is not None else torch.get_default_dtype()
        return device, dtype

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        device, dtype = self._param_like(device, dtype)
        return tuple(
            torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
            for _ in range(self.num_states)
        )

    def step(self, x_t: torch.Tensor, state: tuple[torch.Tensor, ...]):  # pragma: no cover
        raise NotImplementedError

    def forward(self, x_t, state):
        """Alias of `step`, so a cell can be called like ``nn.GRUCell``."""
        return self.step(x_t, state)


#: the device a fused backend serves, and what its kernels are written in (for messages)
_DEVICE_OF = {"cpu": "CPU", "triton": "CUDA"}
_KERNEL_KIND = {"cpu": "C", "triton": "Triton"}


def _takes_keyword(fn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (a user's override of ``_scan_segment`` with the
    older signature does not: it is then called without it)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class FusedCell(Cell):
    """A reference cell that also has fused kernels: the one place a cell's backend is chosen.

    ``backend`` is "auto", "torch", "cpu", "triton" or None (the process default,
    `sparsebptt.set_backend` / ``$SPARSEBPTT_BACKEND``). Subclasses list the fused backends they
    have kernels for in ``kernels`` (e.g. ``("cpu",)`` for GRU/LSTM), call `_set_backend` in
    ``__init__`` and define ``_scan_segment(x_seg, state)``; their first parameter's device picks
    the backend. An explicit backend without a kernel raises ValueError, one that cannot run here
    raises `BackendUnavailable`; "auto" resolves to the fastest backend available for the device
    (once per device, logged) and runs "torch" where this cell has no kernel for it (logged once).
    """

    #: the fused backends this cell has kernels for
    kernels: tuple[str, ...] = ()

    def _set_backend(self, backend) -> None:
        name = type(self).__name__
        if backend is not None:
            check_backend(backend)
            if backend not in ("auto", "torch") and backend not in self.kernels:
                other = " or ".join(repr(k) for k in ("torch",) + self.kernels)
                raise ValueError(f"{name}: backend {backend!r} has no {name} kernel; use backend={other} "
                                 f"(or 'auto', which runs {name} cells on {_DEVICE_OF[backend]} with 'torch')")
            require_backend(backend)
        self.backend = backend

    def _backend_device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def active_backend(self) -> str:
        """The backend the next scan runs ("torch" or one of ``kernels``), for the weights' device."""
        name = type(self).__name__
        requested = get_backend() if self.backend is None else self.backend
        device = self._backend_device().type
        resolved = resolve_backend(requested, device)
        if resolved != "torch" and resolved not in self.kernels:
            if requested != "auto":
                raise ValueError(f"{name}: backend {resolved!r} (the process default) has no {name} kernel; "
                                 "pass backend='torch' or 'auto' to this cell")
            log_once(f"sparsebptt: backend 'auto' runs {name} cells on {_DEVICE_OF[resolved]} with 'torch' "
                     f"(no {_KERNEL_KIND[resolved]} {name} kernel)")
            return "torch"
        return resolved

    #: the fused backends with a segment kernel (``_scan_segment``); the others run step by step
    #: (None: every backend of ``kernels``)
    segment_kernels: "tuple[str, ...] | None" = None

    #: whether ``_scan_segment`` takes the resolved backend as ``backend=`` (then `scan_segment`
    #: hands it out bound, and the segments of one scan, recomputations included, run the backend
    #: resolved when the scan asked for it, without resolving it again per segment)
    segment_takes_backend: bool = False

    #: whether ``_scan_segment`` takes a `sparsebptt.kernels.sparse_input.cpu.SparseRoute` as
    #: ``route=`` on the "cpu" backend: `scan_segment` then binds one per scan, so its first segment
    #: decides whether the input products run sparse (a mostly-zero input) for every segment of
    #: that scan, recomputations included (each row's projection then repeats bit for bit)
    segment_takes_route: bool = False

    @property
    def scan_segment(self):
        """The fused segment scan when a fused backend with a segment kernel is active and the
        cell's ``step`` is the one that kernel implements (see `step_is_fused`), else None (the
        step path). The executor asks once per scan and runs every segment through what it got."""
        backend = self.active_backend
        segments = self.kernels if self.segment_kernels is None else self.segment_kernels
        if backend == "torch" or backend not in segments or not step_is_fused(
                self, "_scan_segment", f"the fused {backend!r} segment kernel"):
            return None
        log_once(f"sparsebptt: {type(self).__name__} scans run the fused {backend!r} backend")
        kwargs = {"backend": backend} if self.segment_takes_backend else {}
        if self.segment_takes_route and backend == "cpu" and _takes_keyword(self._scan_segment, "route"):
            from ..kernels.sparse_input.cpu import SparseRoute
            kwargs["route"] = SparseRoute()
        return functools.partial(self._scan_segment, **kwargs) if kwargs else self._scan_segment

    def extra_repr(self) -> str:
        bias = getattr(self, "bias_ih", None) is not None
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        return f"{self.input_size}, {self.hidden_size}, bias={bias}{backend}"
