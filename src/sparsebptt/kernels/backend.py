"""Which implementation runs a cell's recurrence: the backend registry.

Backends:

- ``"torch"``: the reference cell, one autograd graph per time step (works for every cell).
- ``"cpu"``: fused CPU kernels (C compiled at first use, see `sparsebptt.kernels.cbuild`): a whole
  segment per call, the input projection as one matmul, a hand-written backward.
- ``"triton"``: Triton GPU kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``"auto"``: the fastest backend available for the tensors' device, resolved **once** per process
  and device type, logged on the ``sparsebptt`` logger, and queryable with `resolve_backend`:
  "cpu" on CPU when a C compiler works, "triton" on CUDA when triton imports, else "torch". When
  the device's fused backend cannot run (no C compiler, no triton), the fallback to "torch" is a
  WARNING (shown once on stderr when logging is not configured), with the reason.

An explicitly requested backend that is unavailable raises `BackendUnavailable`; nothing falls
back silently. The process-wide default (for cells built with ``backend=None``) is set with
`set_backend` and starts from ``$SPARSEBPTT_BACKEND``, else `DEFAULT_BACKEND`.
"""
from __future__ import annotations

import logging
import os

from . import cbuild

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "BackendUnavailable", "check_backend", "set_backend",
           "get_backend", "backend_available", "require_backend", "resolve_backend"]

log = logging.getLogger("sparsebptt.kernels")

BACKENDS = ("auto", "torch", "cpu", "triton")

#: the fastest available backend per device ("cpu" C kernels on CPU, "triton" on CUDA)
DEFAULT_BACKEND = "auto"

_default: str | None = None
_resolved: dict[str, str] = {}  # device type -> what "auto" resolved to
_probes: dict[str, tuple[bool, str]] = {}  # backend -> (available, reason)


#: what makes a fused backend available, for the warning when "auto" cannot use it
_FIX = {"cpu": "install a C compiler (cc, gcc or clang) for the fused C kernels, or pass backend='torch' "
               "to choose the reference",
        "triton": "install triton for the fused GPU kernels, or pass backend='torch' to choose the reference"}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why and what to do)."""


def check_backend(name) -> str:
    """Validate a backend name; unknown names raise ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends are: {', '.join(BACKENDS)}")
    return name


def _probe_cpu() -> tuple[bool, str]:
    try:  # every C library the "cpu" backend runs: a failure shows here, not at the first scan
        built = cbuild.build_all()
    except cbuild.CBuildError as e:
        return False, str(e)
    return True, f"C kernels built ({', '.join(built)})"


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not importable ({e}); install it with `pip install triton`"
    import torch
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} with CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter, slow)"
    return False, ("triton imports but no CUDA device is visible (set TRITON_INTERPRET=1 to run its "
                   "kernels on CPU in the interpreter, for testing only)")


def backend_available(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for a concrete backend; probed once per process."""
    check_backend(name)
    if name == "auto":
        return True, "auto picks an available backend"
    if name == "torch":
        return True, "reference implementation"
    if name not in _probes:
        _probes[name] = _probe_cpu() if name == "cpu" else _probe_triton()
    return _probes[name]


def require_backend(name: str) -> None:
    """Raise `BackendUnavailable` (with the reason) unless backend ``name`` can run."""
    ok, reason = backend_available(name)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} was requested but is unavailable: {reason}. "
                                 f"Valid backends: {', '.join(BACKENDS)}; 'torch' always works")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (used by cells built with ``backend=None``)."""
    global _default
    check_backend(name)
    require_backend(name)
    _default = name
    log.info("sparsebptt: default backend set to %r", name)


def get_backend() -> str:
    """The process-wide default backend name (may be "auto"; see `resolve_backend`)."""
    global _default
    if _default is None:
        _default = check_backend(os.environ.get("SPARSEBPTT_BACKEND") or DEFAULT_BACKEND)
    return _default


def resolve_backend(name: str | None = None, device_type: str = "cpu") -> str:
    """The concrete backend that ``name`` (default: `get_backend`) runs as on ``device_type``.

    "auto" is resolved once per device type and logged; explicit names are checked for
    availability (raising `BackendUnavailable`) and returned as they are.
    """
    name = get_backend() if name is None else check_backend(name)
    if name != "auto":
        require_backend(name)
        return name
    if device_type not in _resolved:
        first = "triton" if device_type == "cuda" else "cpu" if device_type == "cpu" else None
        chosen, why = "torch", f"no fused backend for device {device_type!r}"
        if first is not None:
            ok, why = backend_available(first)
            if ok:
                chosen = first
        _resolved[device_type] = chosen
        if first is not None and chosen != first:  # the fast path this device has cannot run: say so
            log.warning("sparsebptt: backend 'auto' on %s runs the slow 'torch' reference: the %r backend "
                        "is unavailable (%s); %s", device_type, first, why.splitlines()[0] if why else "",
                        _FIX[first])
        else:
            log.info("sparsebptt: backend 'auto' on %s resolved to %r (%s)", device_type, chosen, why)
    return _resolved[device_type]

