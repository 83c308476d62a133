"""Fast paths of the cells, beside the references they must match (`sparsebptt.cells`).

``kernels/<cell>/cpu.py`` holds fused CPU kernels (C, built at first use), ``triton.py`` the
Triton GPU kernels, ``naive.py`` the reference loop they are tested against. Which one a cell
runs is chosen by its ``backend`` (see `sparsebptt.kernels.backend`).
"""
from .backend import (BACKENDS, DEFAULT_BACKEND, BackendUnavailable, backend_available,
                      check_backend, get_backend, require_backend, resolve_backend, set_backend)

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "BackendUnavailable", "backend_available", "check_backend", "get_backend",
           "require_backend", "resolve_backend", "set_backend"]
