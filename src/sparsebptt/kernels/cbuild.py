"""Builds the CPU kernels: C source compiled by the system C compiler, loaded with ctypes.

Why C through ctypes (measured with ``benchmarks/lif_routes.py``, 2,000 x 16 x 256 float32, one
thread; see BENCHMARKS.md "Fast paths and peers"): plain C loops run the LIF recurrence 5-10x
faster than a loop of batched torch ops and build once per machine (0.5-3.5 s, cached) with the
``gcc`` every supported machine has, needing no extra package. numba runs the same loop as fast,
but adds numba + llvmlite (tied to numpy versions) and ~5 s of JIT per process; a
``torch.utils.cpp_extension.load_inline`` module runs the same C code but takes ~25-36 s to
build (torch headers) and needs ``ninja``; ``torch.compile`` of the step ran slower than eager.

The library is cached under ``$SPARSEBPTT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sparsebptt`` or
``~/.cache/sparsebptt``), named by a hash of the source, the flags and the compiler's version,
and written atomically, so concurrent processes never load a half-written file.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

__all__ = ["CBuildError", "build", "cache_dir", "compiler"]

log = logging.getLogger("sparsebptt.kernels")

#: -ffp-contract=off: no fused multiply-adds, so each step rounds exactly as the torch reference;
#: -fno-trapping-math lets the threshold compare be if-converted, so the loops vectorise (3x on
#: the LIF forward); it changes no result (floating-point traps are never enabled)
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
          "-std=c99")

_LOADED: dict[str, ctypes.CDLL] = {}


class CBuildError(RuntimeError):
    """The C compiler is missing or failed: the "cpu" backend is unavailable."""


def cache_dir() -> str:
    d = os.environ.get("SPARSEBPTT_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "sparsebptt")
    return d


def compiler() -> str | None:
    """The C compiler used: ``$CC`` if set, else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CBuildError(f"C compiler {cc!r} does not run: {e}") from e


def build(name: str, source: str) -> ctypes.CDLL:
    """Compile ``source`` into a cached shared library (once per source) and load it."""
    cc = compiler()
    if cc is None:
        raise CBuildError("no C compiler found (looked for $CC, cc, gcc, clang on PATH); "
                          "install gcc (apt-get install gcc) to use backend='cpu'")
    key = hashlib.sha256("\0".join([source, " ".join(CFLAGS), _version(cc)]).encode()).hexdigest()[:16]
    if key in _LOADED:
        return _LOADED[key]
    d = cache_dir()
    path = os.path.join(d, f"{name}-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise CBuildError(f"cannot create the kernel cache directory {d!r} ({e}); "
                              "set SPARSEBPTT_CACHE_DIR to a writable directory") from e
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src = os.path.join(tmp, f"{name}.c")
            out = os.path.join(tmp, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            cmd = [cc, *CFLAGS, "-o", out, src, "-lm"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise CBuildError(f"compiling {name} failed to run {cmd[0]}: {e}") from e
            if r.returncode != 0:
                raise CBuildError(f"compiling {name} with {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
            os.replace(out, path)  # atomic: another process sees the old state or the whole file
        log.info("sparsebptt: built CPU kernel %s with %s -> %s", name, cc, path)
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise CBuildError(f"cannot load the compiled kernel {path!r}: {e}") from e
    _LOADED[key] = lib
    return lib
