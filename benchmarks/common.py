"""Helpers shared by the benchmarks: resident memory, seeded inputs, statistics, metadata, workers.

Resident memory on Linux is read from ``/proc/self``: the current resident set from ``statm`` and
the peak (high-water mark, ``VmHWM``) from ``status``. ``reset_peak_rss()`` writes ``5`` to
``/proc/self/clear_refs``, which resets the high-water mark (and ``ru_maxrss``) to the current
resident set, so the peak read after a run is the peak *of that run*, not of the set-up before it
(building the input, or the parent's resident set that ``ru_maxrss`` inherits across ``exec``).

Workers are fresh ``python`` processes that print one JSON line (the last line of stdout).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
GiB = 1024 ** 3
MiB = 1024 ** 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- resident memory ------------------------------------------------------------------------
def current_rss() -> int:
    """Bytes resident now (``/proc/self/statm``, second field, times the page size)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(m.group(1))


def peak_rss() -> int:
    """Peak resident bytes of this process since start or the last `reset_peak_rss` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def ru_maxrss() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS; True if the kernel honoured it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss() <= current_rss() + 64 * PAGE


def limit_address_space(nbytes: int) -> None:
    """Cap this process's virtual memory so a case that outgrows its estimate fails, not the box."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        nbytes = min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, hard))


# ---- inputs ---------------------------------------------------------------------------------
def spike_input(T: int, B: int, n_in: int, p: float, seed: int, chunk: int = 1024):
    """Bernoulli(p) spikes, float32, (T, B, n_in), seeded; built chunk by chunk into one buffer
    so that making it has no transient peak (a ``torch.rand(T, B, I)`` would briefly need 2x)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.empty(T, B, n_in, dtype=torch.float32)
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        torch.lt(torch.rand(b - a, B, n_in, generator=g), p, out=x[a:b])
    return x


# ---- statistics -----------------------------------------------------------------------------
def quantile(xs, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def write_rows_csv(rows, path) -> None:
    """``rows`` (dicts) as a CSV at ``path``: the columns every row's keys in order of first use,
    floats to 6 significant digits."""
    import csv
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def time_scan_step(cell, x) -> tuple[float, float]:
    """Seconds of ``sb.scan(cell, x)`` and of the backward of its outputs' sum (gradients cleared
    first): one side-by-side sample of a cell's forward and backward."""
    import sparsebptt as sb
    for p in cell.parameters():
        p.grad = None
    t0 = time.perf_counter()
    y, _ = sb.scan(cell, x)
    loss = y.sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def ms_columns(name: str, xs) -> dict:
    """``{name}_ms``, ``{name}_p20_ms``, ``{name}_p80_ms``: median and 20th / 80th percentiles of
    the times ``xs`` (seconds) in milliseconds, a result row's columns."""
    return {f"{name}_ms": 1e3 * quantile(xs, 0.5), f"{name}_p20_ms": 1e3 * quantile(xs, 0.2),
            f"{name}_p80_ms": 1e3 * quantile(xs, 0.8)}


def summarize_times(xs) -> dict:
    return {"median_s": quantile(xs, 0.5), "p20_s": quantile(xs, 0.2), "p80_s": quantile(xs, 0.8),
            "n": len(xs)}


# ---- metadata -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def git_output(where: str, *args) -> str | None:
    """stdout of ``git -C where *args``, or None where git fails (no git, not a checkout)."""
    try:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def metadata(torch_threads: int) -> dict:
    """Versions, machine and environment a result depends on (saved in the JSON)."""
    import checkpoint_schedules
    import numpy
    import torch

    import sparsebptt

    pkg = os.path.dirname(os.path.abspath(sparsebptt.__file__))  # the sparsebptt actually imported
    dirty = git_output(pkg, "status", "--porcelain", "--", ".")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "checkpoint_schedules": getattr(checkpoint_schedules, "__version__", "unknown"),
        "sparsebptt": sparsebptt.__version__,
        # checkpoint_schedules JIT-compiles its multistage (Revolve) schedule with numba when it
        # imports: memory and first-run time of revolve depend on it
        "numba": sys.modules["numba"].__version__ if "numba" in sys.modules else None,
        "sparsebptt_path": pkg,
        "sparsebptt_git_commit": git_output(pkg, "rev-parse", "HEAD"),
        "sparsebptt_git_dirty": bool(dirty) if dirty is not None else None,
        "benchmark_git_commit": git_output(REPO, "rev-parse", "HEAD"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "mem_total_bytes": _mem_total(),
        "libc": " ".join(platform.libc_ver()),
        "gpu": None,
        "torch_threads": torch_threads,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))},
        "loadavg_at_start": os.getloadavg(),
    }


# ---- workers --------------------------------------------------------------------------------
def run_worker(script: str, spec: dict, timeout: float, env: dict | None = None) -> dict:
    """Run ``python script --worker JSON`` in a fresh process; return its last JSON line.

    A worker that crashes, times out or prints no JSON gives ``{"status": "failed", "reason": ...}``.
    """
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"status": "failed", "reason": f"worker exited {p.returncode}: " + " | ".join(tail)}


def measure_step(step, params, x, inner: int) -> dict:
    """One training step ``step()`` measured as every worker measures it: the resident-memory
    increase over the first step (grads cleared, garbage collected), one more untimed step (the
    allocator settles: glibc adapts its mmap threshold), ``inner`` timed steps, and a last one under
    `sb.trace` with saved-tensor hooks (``x`` and ``params`` counted as external). Returns
    ``times_s``, ``peak_rss_increase`` and ``trace``."""
    import gc
    import time

    import sparsebptt as sb

    def clear():
        for p in params:
            p.grad = None
        gc.collect()

    clear()
    rss0 = current_rss()
    reset_peak_rss()
    step()
    peak = peak_rss()
    clear()
    step()
    times = []
    for _ in range(inner):
        clear()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    clear()
    with sb.trace() as tr, tr.saving():
        tr.add_external(x, *params)
        step()
    return {"times_s": times, "peak_rss_increase": peak - rss0, "trace": tr}


def kernel_variants(module, variants: dict) -> dict:
    """``{key: library}``: a kernel module's ``load_library()`` once per entry ``key: (library name,
    extra -D defines)`` of ``variants``, each built as its own cached library (for A/B runs of a
    compile-time choice; point ``module._lib`` at one to use it). The module's own library is
    loaded afresh afterwards."""
    libs = {}
    real = module.build_file
    try:
        for key, (lib_name, defines) in variants.items():
            module._lib = None
            module.build_file = lambda name, path, _n=lib_name, _d=tuple(defines): real(_n, path, defines=_d)
            libs[key] = module.load_library()
    finally:
        module.build_file = real
        module._lib = None
    return libs


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, k in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_time(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.3g} s"


# ---- GPU runs (benchmarks/gpu.py) -------------------------------------------------------------
def gpu_info() -> list[dict]:
    """One dict per GPU that ``nvidia-smi`` lists (name, driver, memory); [] without a driver.

    Asks the driver, not torch, so the caller opens no CUDA context (and holds no GPU memory).
    """
    fields = ["name", "driver_version", "memory.total", "pci.bus_id"]
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if p.returncode != 0:
        return []
    out = []
    for line in p.stdout.strip().splitlines():
        vals = [v.strip() for v in line.split(",")]
        if len(vals) == len(fields):
            d = dict(zip(["name", "driver", "memory_mib", "bus_id"], vals))
            d["memory_mib"] = int(d["memory_mib"]) if d["memory_mib"].isdigit() else d["memory_mib"]
            out.append(d)
    return out


def package_versions(names, path=None) -> dict:
    """``{name: installed version or None}`` from package metadata, without importing anything;
    ``path``: look only in that folder (a ``pip install --target`` site)."""
    import importlib.metadata as md
    out = {}
    for n in names:
        if path is None:
            try:
                out[n] = md.version(n)
            except md.PackageNotFoundError:
                out[n] = None
        else:
            dist = next(iter(md.distributions(name=n, path=[path])), None)
            out[n] = dist.version if dist is not None else None
    return out


def slug(text: str) -> str:
    """A file-name-safe lower-case form: 'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"
