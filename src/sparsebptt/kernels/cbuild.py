"""Builds the CPU kernels: C source compiled by the system C compiler, loaded with ctypes.

Why C through ctypes (measured with ``benchmarks/lif_routes.py``, 2,000 x 16 x 256 float32, one
thread; see BENCHMARKS.md "Fast paths and peers"): plain C loops run the LIF recurrence 5-10x
faster than a loop of batched torch ops and build once per machine (0.5-3.5 s, cached) with the
``gcc`` every supported machine has, needing no extra package. numba runs the same loop as fast,
but adds numba + llvmlite (tied to numpy versions) and ~5 s of JIT per process; a
``torch.utils.cpp_extension.load_inline`` module runs the same C code but takes ~25-36 s to
build (torch headers) and needs ``ninja``; ``torch.compile`` of the step ran slower than eager.

The C sources are files of the package (shipped as package data): one library per
``kernels/<cell>/<cell>.c``, which instantiates a body file (``<cell>_body.h``) once per scalar
type with the preprocessor (``#define T float``, ``#define SUF f32``, ``FN(name)`` -> ``name_f32``;
see ``kernels/cbuild.h``, the header they share, on the include path). API:

- ``build_file(name, path, defines=())``: compile the package file ``path`` (relative to
  ``sparsebptt/kernels``, e.g. ``"lif/lif.c"``, or absolute) with ``-D`` ``defines`` into the
  cached library ``name`` and load it (a ``ctypes.CDLL``; the caller sets ``argtypes``).
- `libraries` / `build_all`: every ``kernels/*/*.c`` as ``sparsebptt_<stem>``; the "cpu" backend
  probe builds them all, so a failure shows when the backend is chosen, not at the first scan.
- `source`: a file's text with its local ``#include "..."`` inlined (what the cache key hashes).
- `build(name, text)`: the same from a source string.

The library is cached under ``$SPARSEBPTT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sparsebptt`` or
``~/.cache/sparsebptt``), named by a hash of the source (with every file it includes), the flags
and the compiler's version, and written atomically, so concurrent processes never load a
half-written file.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile

__all__ = ["CBuildError", "CFLAGS", "KERNELS_DIR", "baseline_flags", "build", "build_all", "build_file", "cache_dir",
           "declare_per_dtype",
           "compiler", "libraries", "source"]

log = logging.getLogger("sparsebptt.kernels")

#: -ffp-contract=off: no fused multiply-adds, so each step rounds exactly as the torch reference;
#: -fno-trapping-math lets the threshold compare be if-converted, so the loops vectorise (3x on
#: the LIF forward); it changes no result (floating-point traps are never enabled)
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
          "-std=c99")

#: the directory of the package's C sources (``<cell>/<cell>.c``) and of their shared ``cbuild.h``
KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))

_LOADED: dict[str, ctypes.CDLL] = {}  # path of the built library -> loaded library
_NO_OPENMP: set[str] = set()  # libraries whose -fopenmp build failed (warned once)
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


def baseline_flags() -> tuple[str, ...]:
    """``("-DSB_BASELINE_ONLY",)`` when ``$SPARSEBPTT_KERNEL_BASELINE`` is 1: the kernels built as
    for an x86-64 CPU without AVX (no AVX-512/AVX2 copies; a library of its own in the cache), so
    the tests can check the baseline code on any machine. Else ``()``."""
    v = os.environ.get("SPARSEBPTT_KERNEL_BASELINE", "0")
    if v not in ("0", "1"):
        raise ValueError(f"SPARSEBPTT_KERNEL_BASELINE must be 0 or 1, got {v!r}")
    return ("-DSB_BASELINE_ONLY",) if v == "1" else ()


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


def _resolve(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(KERNELS_DIR, path)


def source(path: str) -> str:
    """The text of the package C file ``path`` with its local ``#include "..."`` inlined, each
    looked up as the compiler does (beside the including file, then in `KERNELS_DIR`); system
    headers (``<...>``) and names found nowhere stay as they are (the scan is textual: keep
    ``#include "..."`` lines out of comments). Raises `CBuildError` for a missing file."""
    path = _resolve(path)

    def expand(p: str, depth: int) -> str:
        if depth > 16:
            raise CBuildError(f"#include nesting deeper than 16 at {p!r}")
        try:
            with open(p) as f:
                text = f.read()
        except OSError as e:
            raise CBuildError(f"cannot read the kernel source {p!r}: {e}") from e

        def sub(m: re.Match) -> str:
            for d in (os.path.dirname(p), KERNELS_DIR):
                q = os.path.join(d, m.group(1))
                if os.path.exists(q):
                    return expand(q, depth + 1)
            return m.group(0)  # not ours: left to the compiler

        return _INCLUDE.sub(sub, text)

    return expand(path, 0)


def libraries() -> dict[str, str]:
    """The package's C libraries: ``{"sparsebptt_<stem>": path}`` for every ``kernels/*/*.c``."""
    paths = sorted(glob.glob(os.path.join(KERNELS_DIR, "*", "*.c")))
    return {f"sparsebptt_{os.path.splitext(os.path.basename(p))[0]}": p for p in paths}


def build_all() -> dict[str, ctypes.CDLL]:
    """Build (or load from the cache) every library of `libraries`; raises `CBuildError`."""
    return {name: build_file(name, path) for name, path in libraries().items()}


def declare_per_dtype(lib: ctypes.CDLL, signatures: dict) -> ctypes.CDLL:
    """Set ``restype`` and ``argtypes`` of both copies (``<name>_f32``, ``<name>_f64``) of each
    function of a kernel library: ``signatures`` maps a name to ``(restype, argtypes)``. Returns
    ``lib``."""
    for name, (restype, argtypes) in signatures.items():
        for suf in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{suf}")
            fn.restype, fn.argtypes = restype, argtypes
    return lib


def build_file(name: str, path: str, defines=()) -> ctypes.CDLL:
    """Compile the package C file ``path`` (relative to `KERNELS_DIR` or absolute) into the cached
    shared library ``name`` (once per source text, flags and compiler) and load it.

    ``defines``: extra ``-D`` flags, e.g. ``("WIDTH=8",)``; they are part of the cache key. A
    source with ``#pragma omp`` is built with ``-fopenmp -DSB_OMP=1`` (unless
    ``$SPARSEBPTT_KERNEL_OPENMP`` is 0); where the compiler cannot, without (a warning, once).
    """
    path = _resolve(path)
    flags = (*CFLAGS, *(f"-D{d}" for d in defines), *baseline_flags())
    text = source(path)
    includes = ("-I", os.path.dirname(path), "-I", KERNELS_DIR)
    if "#pragma omp" in text and os.environ.get("SPARSEBPTT_KERNEL_OPENMP", "1") != "0":
        try:  # the pragmas take effect with -fopenmp; the library then binds to torch's libgomp
            return _build(name, text, (*flags, "-fopenmp", "-DSB_OMP=1"), path, includes)
        except CBuildError as e:
            if name not in _NO_OPENMP:
                _NO_OPENMP.add(name)
                log.warning("sparsebptt: %s built without OpenMP (its parallel loops run on one thread): %s",
                            name, str(e).splitlines()[0])
    return _build(name, text, flags, path, includes)


def build(name: str, source: str) -> ctypes.CDLL:
    """Compile the C text ``source`` into a cached shared library (once per source) and load it."""
    return _build(name, source, (*CFLAGS, *baseline_flags()), None)


def _build(name: str, text: str, flags, src_path: str | None, includes=()) -> ctypes.CDLL:
    """Compile ``src_path`` (or, if None, ``text`` written to a temporary file) with ``flags`` and
    the ``-I`` ``includes``; ``text`` (the full source, includes inlined) and ``flags`` key the
    cache."""
    cc = compiler()
    if cc is None:
        raise CBuildError("no C compiler found (looked for $CC, cc, gcc, clang on PATH); "
                          "install gcc (apt-get install gcc) to use backend='cpu'")
    key = hashlib.sha256("\0".join([text, " ".join(flags), _version(cc)]).encode()).hexdigest()[:16]
    d = cache_dir()
    path = os.path.join(d, f"{name}-{key}.so")
    if path in _LOADED:
        return _LOADED[path]
    if not os.path.exists(path):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise CBuildError(f"cannot create the kernel cache directory {d!r} ({e}); "
                              "set SPARSEBPTT_CACHE_DIR to a writable directory") from e
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src = src_path
            if src is None:
                src = os.path.join(tmp, f"{name}.c")
                with open(src, "w") as f:
                    f.write(text)
            out = os.path.join(tmp, f"{name}.so")
            cmd = [cc, *flags, *includes, "-o", out, src, "-lm"]
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
    _LOADED[path] = lib
    return lib
