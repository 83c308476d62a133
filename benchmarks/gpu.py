"""GPU proof (issue 18): the Triton paths on a GPU, and the GPU peers measured side by side.

One prepared script for one lent GPU, the whole run within ``--total-s`` (default 450 s):

- ``tests``: the Triton kernel test files (``tests/test_kernels_*triton*.py``, ``--runslow``)
  and every test marked ``gpu``, on the device (no ``TRITON_INTERPRET``), each file set under a
  time limit; the summary lines and the failed ids are recorded.
- ``dtypes``: each Triton cell (LIF feed-forward and recurrent, EGRU, DeltaGRU, DeltaLSTM) in
  float32, bfloat16 and float16 against its "torch" backend in float64: which dtypes run (the
  kernels take float32/float64 and refuse the half types with a TypeError) and the largest error.
- ``on``: the Open Neuromorphic workload (one Linear(N, N) + LIF layer, batch 16, T = 500,
  N = 16,384, forward + backward); ``lif2``: the 2-layer LIF network of ``benchmarks/peers.py``
  (its own adapters, moved to the device) at T in {500, 2000, 20000}. Methods: ``loop`` (plain
  PyTorch steps), ``loop-ckpt`` (``torch.utils.checkpoint`` in segments of ceil(sqrt T)),
  ``sb-triton-full`` / ``sb-triton-ckpt`` (sparsebptt, backend "triton", FullBPTT /
  Checkpoint(ceil(sqrt T))), ``snntorch``, ``norse``, ``spikingjelly-triton`` and
  ``spikingjelly-cuda`` (SpikingJelly 2.x, its implementation forced with
  ``SJ_LIF_CUDA_IMPLEMENTATION``; 2.x has no CuPy backend), ``spikingjelly-cupy`` (SpikingJelly
  0.0.0.0.14's CuPy backend, from a separate ``--sj-cupy-path`` site). Per case: the median time
  of a training step (after one untimed step that compiles) and the peak of
  ``torch.cuda.max_memory_allocated`` over what was allocated before the step.
- ``rnn``: ``torch.nn.GRU`` (cuDNN) vs EGRU and DeltaGRU (backend "triton") of the same size and
  weights at several thresholds (activity measured: the target is 10-20%).
- ``double``: the longest T of the 2-layer LIF network whose training step fits under a memory
  cap (``torch.cuda.set_per_process_memory_fraction``; the input counts), FullBPTT vs
  ``DoubleCheckpoint(outer_storage="host")``, and the time per step at those T.

Every case runs in a worker process (cases of one environment share one), under a time budget:
a case predicted to overrun it (from the same method at a shorter T) is skipped with the
prediction, one that overruns is killed, and one that fails records its error; the run goes on.

    python3 benchmarks/gpu.py                                   # on the GPU (scripts/gpu_check.sh)
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu.py --device cpu --preset tiny --out-dir /tmp/g

Writes ``gpu_<device>.{json,csv,png}`` (and ``gpu_<device>_tests.log``) to ``--out-dir``
(default benchmarks/results).
"""
from __future__ import annotations

import argparse
import collections
import csv
import datetime
import glob
import json
import math
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.abspath(__file__)
sys.path.insert(0, HERE)
import common  # noqa: E402
import peers  # noqa: E402

SECTIONS = ["tests", "dtypes", "on", "lif2", "rnn", "double"]
LIF_METHODS = ["loop", "loop-ckpt", "sb-triton-full", "sb-triton-ckpt", "snntorch", "norse",
               "spikingjelly-triton", "spikingjelly-cuda", "spikingjelly-cupy"]
PEERS = ["snntorch", "norse", "spikingjelly", "nir", "nirtorch", "loguru", "checkpoint_schedules"]
#: the LIF methods in the order they run: the issue's targets need the first tier
TIERS = [("sb-triton-full", "sb-triton-ckpt", "spikingjelly-triton"),
         ("loop", "loop-ckpt", "snntorch", "norse", "spikingjelly-cupy"), ("spikingjelly-cuda",)]
PHASES = [("dtypes", ("dtypes",)), ("lif", ("on", "lif2")), ("rnn", ("rnn",)), ("double", ("double",))]
MARK = "@@gpu "  # prefix of the worker's protocol lines on stdout
SJ_ENV = "SJ_LIF_CUDA_IMPLEMENTATION"

PRESETS = {
    "full": {
        "total_s": 460, "startup_s": 90,
        # seconds per section (a section's cases share it; on and lif2 share their sum), and per case
        "budget_s": {"tests": 140, "dtypes": 20, "on": 70, "lif2": 110, "rnn": 30, "double": 60},
        "case_s": {"dtypes": 15, "on": 20, "lif2": 15, "rnn": 10, "double": 50},
        "tests": {"files": "tests/test_kernels_*triton*.py", "runslow": True, "per_test_s": 60},
        "dtypes": {"T": 64, "B": 4, "I": 32, "H": 256},
        "on": {"T": [500], "B": 16, "N": 16384},
        "lif2": {"T": [500, 2000, 20000], "B": 16, "n_in": 64, "H": 256},
        "rnn": {"T": 500, "B": 16, "I": 64, "H": 1024, "egru": [0.0, 0.1, 0.2, 0.3, 0.5],
                "delta": [0.05, 0.1, 0.2, 0.4, 0.8]},
        "double": {"cap_gib": 2.0, "T0": 2000, "B": 16, "n_in": 64, "H": 256},
    },
    # CPU, TRITON_INTERPRET=1: the same code paths at toy sizes (tests/test_gpu_script.py)
    "tiny": {
        "total_s": 300, "startup_s": 60,
        "budget_s": {"tests": 90, "dtypes": 40, "on": 60, "lif2": 90, "rnn": 40, "double": 40},
        "case_s": {"dtypes": 20, "on": 20, "lif2": 20, "rnn": 20, "double": 30},
        "tests": {"files": "tests/test_kernels_*triton*.py", "runslow": False, "per_test_s": 60,
                  "only_gpu_marked": True},
        "dtypes": {"T": 5, "B": 2, "I": 3, "H": 8},
        "on": {"T": [6], "B": 2, "N": 16},
        "lif2": {"T": [6, 12], "B": 2, "n_in": 4, "H": 8},
        "rnn": {"T": 6, "B": 2, "I": 3, "H": 8, "egru": [0.0, 0.3], "delta": [0.1]},
        "double": {"cap_bytes": 8 * 1024, "T0": 4, "B": 1, "n_in": 1, "H": 16},
    },
}


# =============================================================================================
# worker side: builds and measures one case at a time
# =============================================================================================
def _torch():
    import torch
    return torch


def sync(device):
    torch = _torch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear(params, device):
    import gc
    torch = _torch()
    for p in params:
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step, params, device, budget_s, max_timed=3):
    """One untimed step (compiles; gives the peak memory), then timed steps while the budget
    allows (at least one, at most ``max_timed``): the median is the step's time."""
    torch = _torch()
    t_start = time.perf_counter()
    _clear(params, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = common.current_rss()
        common.reset_peak_rss()
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        peak_abs = torch.cuda.max_memory_allocated(device)
        peak = peak_abs - base
    else:
        peak_abs = common.peak_rss()
        peak = peak_abs - base
    times = []
    while len(times) < max_timed:
        last = times[-1] if times else first
        if times and time.perf_counter() - t_start + last > budget_s:
            break
        _clear(params, device)
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    _clear(params, device)
    return {"time_s": statistics.median(times), "p20_s": common.quantile(times, 0.2),
            "p80_s": common.quantile(times, 0.8), "times_s": times, "first_step_s": first,
            "peak_bytes": int(peak), "peak_abs_bytes": int(peak_abs), "base_bytes": int(base),
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"}


def to_device(fn, device):
    """Move what a ``peers.build`` step function closes over to ``device``, in place
    (``device``: anything ``Tensor.to`` takes, e.g. a dtype in the CPU tests).

    Tensors and parameters keep their identity (``t.data = t.data.to(device)``), modules are
    moved with ``.to`` (and tuples of tensors they hold as plain attributes, e.g. Norse's
    parameter tuples), lists and tuples are walked, and functions defined in peers.py (nested
    step helpers) are followed into their closures; nothing else is touched.
    """
    torch = _torch()
    seen = set()

    def move(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            obj.data = obj.data.to(device)
        elif isinstance(obj, torch.nn.Module):
            obj.to(device)
            for m in obj.modules():
                for v in list(vars(m).values()):
                    if isinstance(v, tuple):
                        move(v)
        elif isinstance(obj, (list, tuple)):
            for e in obj:
                move(e)
        elif callable(obj) and getattr(getattr(obj, "__code__", None), "co_filename", None) == peers.__file__:
            for cell in obj.__closure__ or ():
                try:
                    move(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass

    move(fn)


def closure_modules(fn):
    """The nn.Modules a step function closes over (directly)."""
    torch = _torch()
    out = []
    for cell in fn.__closure__ or ():
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if isinstance(v, torch.nn.Module):
            out.append(v)
    return out


def use_sj_backend(modules, backend):
    """Set ``backend`` on every SpikingJelly neuron of ``modules`` (the 0.0.0.0.x API)."""
    n = 0
    for net in modules:
        for m in net.modules():
            if backend in getattr(m, "supported_backends", ()):
                m.backend = backend
                n += 1
    if n == 0:
        import spikingjelly
        raise RuntimeError(f"no SpikingJelly neuron offers backend {backend!r} (spikingjelly from "
                           f"{os.path.dirname(spikingjelly.__file__)}); pass --sj-cupy-path with 0.0.0.0.14")


def build_lif2(method, T, B, n_in, H, device):
    """peers.py's 2-layer LIF network and adapter for ``method``, moved to ``device``."""
    k = math.ceil(math.sqrt(T))
    base = "spikingjelly" if method.startswith("spikingjelly") else method
    step, params, _ = peers.build(base, T, B, n_in, H, k)
    to_device(step, device)
    if method == "spikingjelly-cupy":
        use_sj_backend(closure_modules(step), "cupy")
    return step, params


def build_on(method, T, B, N, device, seed=0):
    """The Open Neuromorphic workload: Linear(N, N) + LIF (beta 0.9, threshold 1, reset by
    subtraction), input Bernoulli(0.1) spikes (T, B, N), loss sum_t z_t * D."""
    torch = _torch()
    import torch.nn.functional as F
    k = math.ceil(math.sqrt(T))
    g = torch.Generator(device=device).manual_seed(seed)
    bound = 3.0 / math.sqrt(N)
    W = (torch.rand(N, N, generator=g, device=device) * 2 - 1) * bound
    b = (torch.rand(N, generator=g, device=device) * 2 - 1) * bound
    x = (torch.rand(T, B, N, generator=g, device=device) < peers.P_IN).float()
    D = torch.randn(B, N, generator=g, device=device)
    beta, th = peers.BETA, peers.THRESHOLD

    if method in ("loop", "loop-ckpt"):
        from sparsebptt.cells.surrogate import spike
        params = [torch.nn.Parameter(W), torch.nn.Parameter(b)]

        def seg(t0, t1, v):
            acc = 0
            for t in range(t0, t1):
                u = beta * v + F.linear(x[t], *params)
                z = spike(u - th)
                v = u - z * th
                acc = acc + z
            return acc, v

        if method == "loop":
            def step():
                acc, _ = seg(0, T, torch.zeros(B, N, device=device))
                (acc * D).sum().backward()
        else:
            from torch.utils.checkpoint import checkpoint

            def step():
                v, acc = torch.zeros(B, N, device=device), 0
                for t0 in range(0, T, k):
                    r, v = checkpoint(seg, t0, min(t0 + k, T), v, use_reentrant=False)
                    acc = acc + r
                (acc * D).sum().backward()
        return step, params

    if method.startswith("sb-"):
        import sparsebptt as sb
        backend, mode = method.split("-")[1:]
        cell = sb.cells.LIF(N, N, beta=beta, threshold=th, backend=backend).to(device)
        with torch.no_grad():
            cell.weight.copy_(W)
            cell.bias.copy_(b)
        strategy = sb.FullBPTT() if mode == "full" else sb.Checkpoint(every=k)

        def step():
            rate, _ = sb.scan(cell, x, strategy=strategy, reduce="sum")
            (rate * D).sum().backward()
        return step, list(cell.parameters())

    if method == "snntorch":
        import snntorch as snn
        from snntorch import surrogate
        params = [torch.nn.Parameter(W), torch.nn.Parameter(b)]
        lif = snn.Leaky(beta=beta, threshold=th, spike_grad=surrogate.fast_sigmoid(slope=25),
                        reset_mechanism="subtract").to(device)

        def step():
            mem = lif.init_leaky()
            acc = 0
            for t in range(T):
                s, mem = lif(F.linear(x[t], *params), mem)
                acc = acc + s
            (acc * D).sum().backward()
        return step, params

    if method == "norse":
        import norse.torch as norse
        params = [torch.nn.Parameter(W), torch.nn.Parameter(b)]
        p = norse.LIFBoxParameters(tau_mem_inv=torch.tensor(100.0, device=device),
                                   v_leak=torch.tensor(0.0, device=device),
                                   v_th=torch.tensor(th, device=device),
                                   v_reset=torch.tensor(0.0, device=device),
                                   method="super", alpha=torch.tensor(100.0, device=device))
        cell = norse.LIFBoxCell(p, dt=1e-3).to(device)

        def step():
            s, acc = None, 0
            for t in range(T):
                z, s = cell(10.0 * F.linear(x[t], *params), s)  # dt * tau_mem_inv = 0.1
                acc = acc + z
            (acc * D).sum().backward()
        return step, params

    if method.startswith("spikingjelly"):
        from spikingjelly.activation_based import functional, neuron, surrogate
        lin = torch.nn.Linear(N, N).to(device)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        node = neuron.LIFNode(tau=1.0 / (1.0 - beta), decay_input=False, v_threshold=th, v_reset=None,
                              surrogate_function=surrogate.Sigmoid(), step_mode="m")
        net = torch.nn.Sequential(lin, node).to(device)
        if method == "spikingjelly-cupy":
            use_sj_backend([net], "cupy")

        def step():
            functional.reset_net(net)
            (net(x).sum(0) * D).sum().backward()
        return step, list(net.parameters())

    raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(LIF_METHODS)}")


def lif_case(c, device):
    if c["section"] == "lif2":
        step, params = build_lif2(c["method"], c["T"], c["B"], c["n_in"], c["H"], device)
    else:
        step, params = build_on(c["method"], c["T"], c["B"], c["N"], device)
    r = measure(step, params, device, c["budget_s"])
    if c["method"].startswith("spikingjelly"):
        import spikingjelly
        r["peer_path"] = os.path.dirname(spikingjelly.__file__)
        if device.type == "cpu" and c["method"] != "spikingjelly-cupy":
            r["note"] = "on CPU SpikingJelly runs its CPU op: the CUDA implementation choice does not apply"
    return r


def _rnn_weights(I, H, seed=0):
    torch = _torch()
    torch.manual_seed(seed)
    gru = torch.nn.GRU(I, H)
    return gru, {k.removesuffix("_l0"): v.detach().clone() for k, v in gru.state_dict().items()}


def smooth_input(T, B, I, seed=0, a=0.98):
    """An AR(1) sequence with unit variance and step changes of std sqrt(2(1-a)) ~ 0.2: inputs
    that change slowly, as Delta networks assume."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(T, B, I, generator=g)
    x = torch.empty(T, B, I)
    x[0] = noise[0]
    c = math.sqrt(1 - a * a)
    for t in range(1, T):
        x[t] = a * x[t - 1] + c * noise[t]
    return x


def rnn_case(c, device):
    torch = _torch()
    import sparsebptt as sb
    from sparsebptt.cells.egru import event_statistics
    T, B, I, H = c["T"], c["B"], c["I"], c["H"]
    gru, sd = _rnn_weights(I, H)
    x = smooth_input(T, B, I).to(device)
    D = torch.randn(B, H, generator=torch.Generator().manual_seed(7)).to(device)
    extra = {}
    if c["method"] == "gru":
        model = gru.to(device)
        params = list(model.parameters())

        def step():
            y, _ = model(x)
            (y * D).sum().backward()
        extra = {"activity": 1.0, "cudnn": bool(device.type == "cuda" and torch.backends.cudnn.enabled)}
    else:
        th = c["threshold"]
        if c["method"] == "egru":
            cell = sb.cells.EGRU(I, H, threshold_init=th, backend="triton")
        else:
            cell = sb.cells.DeltaGRU(I, H, threshold=th, backend="triton")
        missing, unexpected = cell.load_state_dict(sd, strict=False)
        if unexpected or set(missing) - {"threshold"}:
            raise RuntimeError(f"weights do not map onto {type(cell).__name__}: missing {missing}, "
                               f"unexpected {unexpected}")
        cell = cell.to(device)
        params = list(cell.parameters())
        with torch.no_grad():
            if c["method"] == "egru":
                extra = dict(event_statistics(cell, x)["EGRU"])
            else:
                with sb.trace() as tr:
                    sb.scan(cell, x)
                acts = tr.activity
                extra = {"activity": statistics.fmean(acts.values()) if acts else None}

        def step():
            y, _ = sb.scan(cell, x)
            (y * D).sum().backward()
    r = measure(step, params, device, c["budget_s"])
    r.update(extra)
    return r


def _lif_stack(n_in, H, backend, device):
    torch = _torch()
    import sparsebptt as sb
    net = sb.cells.Stack([sb.cells.LIF(n_in, H, beta=peers.BETA, threshold=peers.THRESHOLD, backend=backend),
                          sb.cells.LIF(H, H, beta=peers.BETA, threshold=peers.THRESHOLD, backend=backend)])
    with torch.no_grad():
        for p, w in zip(net.parameters(), peers.weights(n_in, H)):
            p.copy_(w)
    return net.to(device)


def double_strategy(kind, T):
    """FullBPTT, or DoubleCheckpoint with outer ~ T^(2/3) steps in host memory and inner ~ T^(1/3)."""
    import sparsebptt as sb
    if kind == "full":
        return sb.FullBPTT()
    inner = max(1, math.ceil(T ** (1 / 3)))
    outer = max(inner, math.ceil(T ** (2 / 3)))
    return sb.DoubleCheckpoint(outer=outer, inner=inner, outer_storage="host")


def _is_oom(e):
    torch = _torch()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def attempt(kind, T, c, device):
    """One training step at T under the cap: (fits, seconds, peak bytes)."""
    import gc
    torch = _torch()
    import sparsebptt as sb
    B, n_in, H = c["B"], c["n_in"], c["H"]
    net = x = D = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        net = _lif_stack(n_in, H, "triton", device)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.empty(T, B, n_in, device=device)
        for a in range(0, T, 4096):  # chunk by chunk: no transient of the input's size
            torch.lt(torch.rand(min(T, a + 4096) - a, B, n_in, generator=g, device=device), peers.P_IN,
                     out=x[a:a + 4096])
        D = torch.randn(B, H, generator=g, device=device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            rate, _ = sb.scan(net, x, strategy=double_strategy(kind, T), reduce="sum")
            (rate * D).sum().backward()
            sync(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:  # no allocator cap on CPU: count the bytes held for the backward, plus the input
            with sb.trace() as tr, tr.saving():
                tr.add_external(*net.parameters())
                rate, _ = sb.scan(net, x, strategy=double_strategy(kind, T), reduce="sum")
                (rate * D).sum().backward()
            peak = tr.peak_stored_bytes + x.numel() * x.element_size()
        dt = time.perf_counter() - t0
        return peak <= c["cap_bytes"], dt, int(peak), None
    except Exception as e:  # noqa: BLE001 - an out-of-memory error is the answer "does not fit"
        if not _is_oom(e):
            raise
        return False, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        del net, x, D
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def double_case(c, device, history):
    """The longest T that fits under the cap: doubling from T0 (or, for the host double
    checkpoint, from 10x full BPTT's longest), then two bisection steps; each attempt's time
    is predicted from the last one and skipped when the budget cannot hold it."""
    torch = _torch()
    kind, cap = c["method"], c["cap_bytes"]
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    t_start = time.perf_counter()
    attempts = []
    full = next((h for h in history if h.get("method") == "full" and h.get("status") == "ok"), None)
    T = c["T0"] if kind == "full" or not full or not full.get("longest_T") else 10 * full["longest_T"]
    lo, hi = None, None  # longest that fits, shortest that does not

    def run(T):
        if attempts:
            last = next((a for a in reversed(attempts) if a["time_s"]), None)
            if last and time.perf_counter() - t_start + 1.5 * last["time_s"] * T / last["T"] > c["budget_s"]:
                return None
        ok, dt, peak, why = attempt(kind, T, c, device)
        attempts.append({"T": T, "fits": ok, "time_s": dt, "peak_bytes": peak, "error": why})
        return ok

    while True:  # grow (or, if the first try does not fit, shrink) by factors of 2
        ok = run(T)
        if ok is None:
            break
        if ok:
            lo = T
            if hi is not None:
                break
            T *= 2
        else:
            hi = T
            if lo is not None or T <= 1:
                break
            T //= 2
    for _ in range(2):  # refine between the longest that fits and the shortest that does not
        if lo is None or hi is None or hi - lo <= max(1, lo // 8):
            break
        mid = (lo + hi) // 2
        ok = run(mid)
        if ok is None:
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    best = next((a for a in attempts if a["T"] == lo and a["fits"]), None)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"longest_T": lo, "first_over_T": hi, "cap_bytes": cap, "attempts": attempts,
            "time_s": best["time_s"] if best else None, "peak_bytes": best["peak_bytes"] if best else None,
            "strategy": double_strategy(kind, lo).to_string() if lo else None,
            "memory_kind": "cuda max_memory_allocated under set_per_process_memory_fraction"
            if device.type == "cuda" else "sb.trace stored bytes + input (no allocator cap on CPU)"}


def dtype_case(c, device):
    """A Triton cell in ``c["dtype"]`` against its "torch" backend in float64."""
    torch = _torch()
    import sparsebptt as sb
    from sparsebptt.testing import seeded
    T, B, I, H = c["T"], c["B"], c["I"], c["H"]
    make = {"lif": lambda be: sb.cells.LIF(I, H, threshold=0.5, backend=be),
            "lif-recurrent": lambda be: sb.cells.LIF(I, H, threshold=0.5, recurrent=True, backend=be),
            "egru": lambda be: sb.cells.EGRU(I, H, threshold_init=0.1, backend=be),
            "deltagru": lambda be: sb.cells.DeltaGRU(I, H, threshold=0.05, backend=be),
            "deltalstm": lambda be: sb.cells.DeltaLSTM(I, H, threshold=0.05, backend=be)}[c["kernel"]]
    dtype = getattr(torch, c["dtype"])
    torch.manual_seed(0)
    ref = make("torch").to(device=device, dtype=torch.float64)
    fast = make("triton")
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(device=device, dtype=dtype)
    x = seeded(0, T, B, I, dtype=torch.float64).to(device)
    Dy = seeded(1, T, B, H, dtype=torch.float64).to(device)
    outs = []
    for cell, dt in ((ref, torch.float64), (fast, dtype)):
        y, _ = sb.scan(cell, x.to(dt))
        (y * Dy.to(dt)).sum().backward()
        outs.append([("y", y.detach())] + [(n, p.grad) for n, p in cell.named_parameters()])
    errs = {}
    for (name, a), (_, b) in zip(*outs):
        if a is None or b is None:
            continue
        scale = a.abs().max().item() or 1.0
        errs[name] = (a - b.to(a.dtype)).abs().max().item() / scale
    y = outs[0][0][1]
    return {"max_rel_err": max(errs.values()), "rel_err": errs, "output_mean": float(y.float().mean())}


def meta_case(c, device):
    torch = _torch()
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available(), "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   total_memory_bytes=p.total_memory)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import sparsebptt as sb
    from sparsebptt.kernels.backend import backend_available
    out["sparsebptt"] = sb.__version__
    out["sparsebptt_path"] = os.path.dirname(sb.__file__)
    out["triton_backend"] = backend_available("triton")
    return out


def selftest_case(c, device):
    """Not a benchmark: exercises the runner's guards (tests/test_gpu_script.py)."""
    if c["action"] == "sleep":
        time.sleep(c["seconds"])
    elif c["action"] == "exit":
        os._exit(1)
    elif c["action"] == "raise":
        raise RuntimeError("planted failure")
    return {"time_s": 0.0, "peak_bytes": 0, "pid": os.getpid()}


CASES = {"selftest": selftest_case, "lif2": lif_case, "on": lif_case, "rnn": rnn_case, "dtypes": dtype_case,
         "meta": meta_case}


def emit(event):
    print(MARK + json.dumps(event), flush=True)


def worker(spec):
    """Run ``spec["cases"]`` in order, one protocol line before and after each."""
    torch = _torch()
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    history = list(spec.get("history", []))
    for c in spec["cases"]:
        emit({"event": "start", "id": c["id"]})
        t0 = time.perf_counter()
        try:
            why = predicted_over(c, history)
            if why:
                r = {"status": "skipped", "reason": why}
            elif c["section"] == "double":
                r = {"status": "ok", **double_case(c, device, history)}
            else:
                r = {"status": "ok", **CASES[c["section"]](c, device)}
        except Exception as e:  # noqa: BLE001 - a failing case is recorded, the run goes on
            msg = f"{type(e).__name__}: {e}"
            status = "unavailable" if isinstance(e, ImportError) else \
                "refused" if isinstance(e, TypeError) and "is not supported" in str(e) else "failed"
            r = {"status": status, "reason": msg[:600]}
            if device.type == "cuda":
                import gc
                gc.collect()
                try:
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                except Exception as e2:  # noqa: BLE001 - the context is broken: a fresh worker goes on
                    r["reason"] += f" (then: {type(e2).__name__}: {str(e2)[:200]}; worker restarted)"
                    emit({"event": "done", "id": c["id"], "result": {**r, "case_s": time.perf_counter() - t0}})
                    sys.exit(3)
        r["case_s"] = time.perf_counter() - t0
        r.update({k: c[k] for k in ("section", "method", "T") if k in c})
        history.append(r)
        emit({"event": "done", "id": c["id"], "result": r})


def predicted_over(c, history):
    """Why to skip a LIF case: the same method at a shorter T predicts a step over the budget."""
    if c["section"] not in ("lif2", "on"):
        return None
    prev = [h for h in history if h.get("section") == c["section"] and h.get("method") == c["method"]
            and h.get("status") == "ok" and h.get("T", 0) < c["T"]]
    if not prev:
        return None
    p = max(prev, key=lambda h: h["T"])
    pred = p["time_s"] * c["T"] / p["T"]
    if 2 * pred > c["budget_s"]:
        return (f"predicted {pred:.1f} s per step (from {p['time_s']:.3g} s at T={p['T']}); two steps "
                f"exceed the case budget of {c['budget_s']:g} s")
    return None


# =============================================================================================
# parent side: groups, time limits, the tests, results
# =============================================================================================
class Runner:
    """Runs cases in worker processes under a deadline, restarting a worker after a crash or a
    kill; every case ends with a result (ok, failed, refused, unavailable, skipped or timed out).

    A started case is killed after 1.5x its budget plus ``grace_s`` (the worker checks the budget
    only between steps, and one step may overrun it); a worker gets ``startup_s`` to start.
    """

    def __init__(self, device, startup_s, log=print, grace_s=30.0):
        self.device, self.startup_s, self.log, self.grace_s = device, startup_s, log, grace_s

    def env_for(self, extra):
        env = {**os.environ}
        env.pop("TRITON_INTERPRET", None)
        if self.device == "cpu":
            env["TRITON_INTERPRET"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        for k, v in (extra or {}).items():
            if k == "PYTHONPATH_PREPEND":
                env["PYTHONPATH"] = os.pathsep.join([v] + [p for p in [env.get("PYTHONPATH")] if p])
            else:
                env[k] = v
        return env

    def run(self, cases, env_extra, deadline):
        results = {}
        todo = list(cases)
        while todo:
            if time.monotonic() >= deadline:
                for c in todo:
                    results[c["id"]] = {"status": "skipped", "reason": "the section's time budget is spent"}
                break
            spec = {"device": self.device, "cases": todo,
                    "history": [r for c in cases if (r := results.get(c["id"]))]}
            proc = subprocess.Popen([sys.executable, SCRIPT, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=self.env_for(env_extra),
                                    start_new_session=True, cwd=REPO)
            lines = queue.Queue()
            threading.Thread(target=lambda: ([lines.put(ln) for ln in proc.stdout], lines.put(None)),
                             daemon=True).start()
            tail = collections.deque(maxlen=15)
            current, started, started_at = None, False, time.monotonic()
            wait_until = time.monotonic() + self.startup_s
            by_id = {c["id"]: c for c in todo}
            while True:
                left = min(wait_until, deadline) - time.monotonic()
                try:
                    line = lines.get(timeout=max(0.05, left))
                except queue.Empty:
                    _kill(proc)
                    what = "the section's time budget ran out" if time.monotonic() >= deadline else "timed out"
                    if current is not None:
                        results[current] = {"status": "timed out", "log_tail": list(tail)[-5:],
                                            "reason": f"{what}: killed {time.monotonic() - started_at:.0f} s "
                                                      f"into the case (budget {by_id[current]['budget_s']:g} s)"}
                    else:
                        results[todo[0]["id"]] = {"status": "timed out", "log_tail": list(tail)[-5:],
                                                  "reason": f"{what}: the worker started no case"}
                    break
                if line is None:  # the worker exited
                    rc = proc.wait()
                    if current is not None:
                        results[current] = {"status": "failed", "reason": f"worker died (exit {rc}) during the case",
                                            "log_tail": list(tail)[-8:]}
                    elif not started and todo and todo[0]["id"] not in results:
                        for c in todo:  # nothing ran: it cannot import; do not loop
                            results[c["id"]] = {"status": "failed", "reason": f"worker exited {rc} before any case",
                                                "log_tail": list(tail)[-8:]}
                    break
                line = line.rstrip("\n")
                if not line.startswith(MARK):
                    tail.append(line)
                    self.log("    | " + line[:300])
                    continue
                ev = json.loads(line[len(MARK):])
                if ev["event"] == "start":
                    current, started, started_at = ev["id"], True, time.monotonic()
                    wait_until = time.monotonic() + 1.5 * by_id[current]["budget_s"] + self.grace_s
                else:
                    results[ev["id"]] = ev["result"]
                    self.log("  " + describe(by_id[ev["id"]], ev["result"]))
                    current = None
                    wait_until = time.monotonic() + 2 * self.grace_s  # the next case's start line comes soon
            _kill(proc)
            todo = [c for c in todo if c["id"] not in results]
        return results

def _kill(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


def describe(c, r):
    name = f"{c['section']:>6} {c.get('method') or c.get('kernel', ''):<20} " + \
        " ".join(f"{k}={c[k]}" for k in ("T", "threshold", "dtype") if k in c)
    if r["status"] != "ok":
        return f"{name}: {r['status']}: {r.get('reason', '')[:200]}"
    if c["section"] == "double":
        return (f"{name}: longest T {r['longest_T']} (first over: {r['first_over_T']}), "
                f"{common.fmt_time(r['time_s'])} per step")
    if c["section"] == "dtypes":
        return f"{name}: runs, max rel err {r['max_rel_err']:.2e}"
    if c["section"] == "meta":
        return (f"meta: torch {r.get('torch')} (cuda {r.get('torch_cuda')}), triton {r.get('triton')}, "
                f"{r.get('device_name', 'no GPU')}, triton backend: {r.get('triton_backend')}")
    act = f", activity {r['activity']:.3f}" if r.get("activity") is not None else ""
    return f"{name}: {common.fmt_time(r['time_s'])} per step, peak {common.fmt_bytes(r['peak_bytes'])}{act}"


def run_tests(cfg, device, budget_s, log_path, log=print):
    """The Triton test files and the ``gpu``-marked tests, each run under a time limit."""
    files = sorted(os.path.relpath(f, REPO) for f in glob.glob(os.path.join(REPO, cfg["files"])))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE"]  # -q comes from pyproject
    import importlib.util
    if importlib.util.find_spec("pytest_timeout") is not None:  # on the GPU machine; not in .venv
        base += [f"--timeout={cfg['per_test_s']}"]
    runs = []
    if cfg.get("only_gpu_marked"):
        runs.append(("gpu-marked tests in the Triton files", base + ["-m", "gpu"] + files))
    else:  # one run per file: a file that runs out of time costs only its own counts
        slow = ["--runslow"] if cfg.get("runslow") else []
        runs += [(f, base + slow + [f]) for f in files]
        runs.append(("gpu-marked tests elsewhere", base + ["-m", "gpu", "--continue-on-collection-errors", "tests"]
                     + [f"--ignore={f}" for f in files]))
    out = []
    t0 = time.monotonic()
    t_end = t0 + budget_s
    # all at once (the GPU machine has 16 cores; Triton compiles on the CPU): each run is its own
    # process group, killed at the budget's end with what it printed kept
    procs = [(what, cmd, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
             for what, cmd in runs]
    with open(log_path, "w") as logf:
        for what, cmd, proc in procs:
            try:
                text, _ = proc.communicate(timeout=max(0.1, t_end - time.monotonic()))
                rc, status = proc.returncode, "ran"
            except subprocess.TimeoutExpired:
                _kill(proc)
                text, _ = proc.communicate()
                rc, status = None, "timed out"
            text = text or ""
            logf.write(f"==== {what}: {' '.join(cmd)}\n{text}\n")
            counts = parse_pytest_summary(text)
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
            ok = status == "ran" and rc in (0, 5) and not failed
            r = {"what": what, "command": "python -m " + " ".join(cmd[2:]), "status": status, "returncode": rc,
                 "seconds": round(time.monotonic() - t0, 1), "counts": counts, "failed": failed[:50],
                 "passed_all": ok, "tail": text.strip().splitlines()[-3:]}
            out.append(r)
            log(f"  tests {what}: {status}, rc={rc}, {counts}, {len(failed)} failed, {r['seconds']} s")
    return out


def parse_pytest_summary(text):
    """{'passed': N, 'failed': N, ...} from pytest's closing line (empty if there is none)."""
    counts = {}
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\b(passed|failed|skipped|deselected|error)", ln)
             and re.search(r"\bin [\d.]+s", ln)]
    if lines:
        words = r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)"
        for n, what in re.findall(words, lines[-1]):
            counts[what.rstrip("s") if what.startswith(("error", "warning")) else what] = int(n)
    return counts


def make_cases(preset, sections, methods, sj_cupy_path, cap_bytes):
    """The cases of each section, grouped by the environment their worker needs."""
    cases, n = [], 0

    def add(section, env, **kw):
        nonlocal n
        b = preset["case_s"].get(section, 20)
        cases.append({"id": n, "section": section, "env": env, "budget_s": b, **kw})
        n += 1

    if "dtypes" in sections:
        d = preset["dtypes"]
        for kernel in ("lif", "lif-recurrent", "egru", "deltagru", "deltalstm"):
            for dt in ("float32", "bfloat16", "float16"):
                add("dtypes", "default", kernel=kernel, dtype=dt, **d)
    for tier in TIERS:  # the methods the targets need first: a spent budget drops the others
        for section in ("on", "lif2"):
            if section not in sections:
                continue
            d = preset[section]
            for m in (m for m in methods if m in tier):
                env = {"spikingjelly-triton": "sj-triton", "spikingjelly-cuda": "sj-cuda",
                       "spikingjelly-cupy": "sj-cupy"}.get(m, "default")
                for T in d["T"]:
                    add(section, env, method=m, tier=TIERS.index(tier), **{**d, "T": T})
    if "rnn" in sections:
        d = {k: v for k, v in preset["rnn"].items() if k not in ("egru", "delta")}
        add("rnn", "default", method="gru", **d)
        for th in preset["rnn"]["egru"]:
            add("rnn", "default", method="egru", threshold=th, **d)
        for th in preset["rnn"]["delta"]:
            add("rnn", "default", method="deltagru", threshold=th, **d)
    if "double" in sections:
        d = {k: v for k, v in preset["double"].items() if k not in ("cap_gib", "cap_bytes")}
        cap = cap_bytes or preset["double"].get("cap_bytes") or int(preset["double"]["cap_gib"] * common.GiB)
        for kind in ("full", "double-host"):
            add("double", "default", method=kind, cap_bytes=cap, **d)
    envs = {"default": {}, "sj-triton": {SJ_ENV: "triton"}, "sj-cuda": {SJ_ENV: "cuda"},
            "sj-cupy": {"PYTHONPATH_PREPEND": sj_cupy_path} if sj_cupy_path else None}
    return cases, envs


# ---- targets, tables, files -------------------------------------------------------------------
def targets(rows):
    """The issue's 'done when' ratios, from the rows: [{what, value, bound, passed}]."""
    out = []
    ok = {(r["section"], r.get("method"), r.get("T")): r for r in rows if r["status"] == "ok"}
    for (section, method, T), r in sorted(ok.items(), key=lambda kv: (kv[0][0], kv[0][2] or 0)):
        if method != "sb-triton-full":
            continue
        sj = ok.get((section, "spikingjelly-triton", T))
        if sj:
            out.append({"what": f"{section} T={T}: time sb-triton-full / spikingjelly-triton",
                        "value": r["time_s"] / sj["time_s"], "bound": "<= 0.5",
                        "passed": r["time_s"] <= 0.5 * sj["time_s"]})
            if r["peak_bytes"] > 0 and sj["peak_bytes"] > 0:
                out.append({"what": f"{section} T={T}: peak memory sb-triton-full / spikingjelly-triton",
                            "value": r["peak_bytes"] / sj["peak_bytes"], "bound": "<= 1",
                            "passed": r["peak_bytes"] <= sj["peak_bytes"]})
        ck = ok.get((section, "sb-triton-ckpt", T))
        if ck:
            out.append({"what": f"{section} T={T}: time sb-triton-ckpt / sb-triton-full",
                        "value": ck["time_s"] / r["time_s"], "bound": "<= 1.2",
                        "passed": ck["time_s"] <= 1.2 * r["time_s"]})
            if r["peak_bytes"] > 0 and ck["peak_bytes"] > 0:
                out.append({"what": f"{section} T={T}: peak memory sb-triton-full / sb-triton-ckpt",
                            "value": r["peak_bytes"] / ck["peak_bytes"], "bound": ">= 5",
                            "passed": r["peak_bytes"] >= 5 * ck["peak_bytes"]})
    full, dbl = ok.get(("double", "full", None)), ok.get(("double", "double-host", None))
    if full and dbl and full.get("longest_T") and dbl.get("longest_T"):
        q = dbl["longest_T"] / full["longest_T"]
        out.append({"what": "double: longest T DoubleCheckpoint(host) / FullBPTT under the same cap",
                    "value": q, "bound": ">= 10", "passed": q >= 10})
    for m in ("egru", "deltagru"):
        pts = sorted((r["activity"], r["time_s"]) for r in rows if r["status"] == "ok" and r["section"] == "rnn"
                     and r.get("method") == m and r.get("activity") is not None)
        if len(pts) >= 2:
            falls = pts[0][1] < pts[-1][1]
            out.append({"what": f"rnn: {m} time at activity {pts[0][0]:.3f} / at {pts[-1][0]:.3f}",
                        "value": pts[0][1] / pts[-1][1], "bound": "< 1 (time falls with activity)",
                        "passed": falls})
    return out


def flat_rows(cases, results):
    rows = []
    for c in cases:
        r = results.get(c["id"], {"status": "not run"})
        row = {k: v for k, v in c.items() if k not in ("id", "env", "tier")}
        row.update({k: v for k, v in r.items() if k not in ("section", "method")})
        if row.get("status") == "ok" and row.get("time_s") and row.get("T") and c["section"] in ("on", "lif2"):
            row["ms_per_timestep"] = 1e3 * row["time_s"] / row["T"]
        rows.append(row)
    for section in ("on", "lif2"):  # ratios to the plain loop at the same T
        loops = {r["T"]: r["time_s"] for r in rows if r["section"] == section and r.get("method") == "loop"
                 and r["status"] == "ok"}
        for r in rows:
            if r["section"] == section and r["status"] == "ok" and loops.get(r["T"]):
                r["vs_loop"] = r["time_s"] / loops[r["T"]]
    gru = next((r for r in rows if r["section"] == "rnn" and r.get("method") == "gru" and r["status"] == "ok"), None)
    if gru:
        for r in rows:
            if r["section"] == "rnn" and r["status"] == "ok":
                r["vs_gru"] = r["time_s"] / gru["time_s"]
    return rows


CSV_COLS = ["section", "method", "kernel", "dtype", "T", "B", "N", "n_in", "I", "H", "threshold", "status",
            "time_s", "p20_s", "p80_s", "ms_per_timestep", "vs_loop", "vs_gru", "first_step_s", "peak_bytes",
            "peak_abs_bytes",
            "activity", "longest_T", "first_over_T", "cap_bytes", "max_rel_err", "case_s", "reason"]


def markdown(rows, tests):
    lines = []
    if tests:
        lines += ["| tests | status | counts | failed | s |", "|---|---|---|---|---:|"]
        for t in tests:
            lines.append(f"| {t['what']} | {t['status']} | {t.get('counts', '')} | {len(t.get('failed', []))} | "
                         f"{t.get('seconds', '')} |")
        lines.append("")
    for section in ("on", "lif2"):
        rs = [r for r in rows if r["section"] == section]
        if not rs:
            continue
        Ts = sorted({r["T"] for r in rs})
        lines += [f"**{section}** (B={rs[0]['B']}, " + (f"N={rs[0]['N']}" if section == "on" else
                                                         f"n_in={rs[0]['n_in']}, H={rs[0]['H']}") + ")", "",
                  "| method | " + " | ".join(f"T={T}: step (x loop) | peak" for T in Ts) + " |",
                  "|---|" + "---:|---:|" * len(Ts)]
        for m in dict.fromkeys(r["method"] for r in rs):
            cells = []
            for T in Ts:
                r = next((x for x in rs if x["method"] == m and x["T"] == T), None)
                if r is None or r["status"] != "ok":
                    cells += [r["status"] if r else "-", ""]
                else:
                    cells += [f"{common.fmt_time(r['time_s'])} ({r.get('vs_loop', float('nan')):.2f}x)",
                              common.fmt_bytes(r["peak_bytes"])]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    rs = [r for r in rows if r["section"] == "rnn"]
    if rs:
        lines += ["| rnn | threshold | activity | step | x GRU | peak |", "|---|---:|---:|---:|---:|---:|"]
        for r in rs:
            if r["status"] == "ok":
                lines.append(f"| {r['method']} | {r.get('threshold', '')} | {r.get('activity') or 0:.3f} | "
                             f"{common.fmt_time(r['time_s'])} | {r.get('vs_gru', float('nan')):.2f} | "
                             f"{common.fmt_bytes(r['peak_bytes'])} |")
            else:
                lines.append(f"| {r['method']} | {r.get('threshold', '')} | {r['status']} | | | |")
        lines.append("")
    rs = [r for r in rows if r["section"] == "double"]
    if rs:
        lines += ["| strategy under the cap | longest T | first T over | step at longest T | peak |",
                  "|---|---:|---:|---:|---:|"]
        for r in rs:
            if r["status"] == "ok":
                lines.append(f"| {r['method']} ({r.get('strategy')}) | {r['longest_T']} | {r['first_over_T']} | "
                             f"{common.fmt_time(r['time_s'])} | {common.fmt_bytes(r['peak_bytes'])} |")
            else:
                lines.append(f"| {r['method']} | {r['status']} | | | |")
        lines.append("")
    rs = [r for r in rows if r["section"] == "dtypes"]
    if rs:
        lines += ["| kernel | " + " | ".join(dict.fromkeys(r["dtype"] for r in rs)) + " |",
                  "|---|" + "---|" * len(dict.fromkeys(r["dtype"] for r in rs))]
        for k in dict.fromkeys(r["kernel"] for r in rs):
            cells = []
            for r in (x for x in rs if x["kernel"] == k):
                cells.append(f"runs, rel err {r['max_rel_err']:.1e}" if r["status"] == "ok" else
                             f"{r['status']}: {r.get('reason', '')[:60]}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(14, 10))
    ok = [r for r in rows if r["status"] == "ok"]
    lif = [r for r in ok if r["section"] == "lif2"]
    for i, m in enumerate(dict.fromkeys(r["method"] for r in lif)):
        pts = sorted((r["T"], r["time_s"], r["peak_bytes"] / common.MiB) for r in lif if r["method"] == m)
        st = dict(marker="o", color=f"C{i % 10}", label=m, lw=2.2 if m.startswith("sb-") else 1.2,
                  ls="-" if m.startswith("sb-") else "--")
        ax[0, 0].plot([p[0] for p in pts], [p[1] for p in pts], **st)
        ax[0, 1].plot([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], **st)
    ax[0, 0].set(xscale="log", yscale="log", xlabel="T", ylabel="s per training step", title="2-layer LIF")
    ax[0, 1].set(xscale="log", yscale="log", xlabel="T", ylabel="peak memory over the start (MiB)",
                 title="2-layer LIF")
    if lif:
        ax[0, 0].legend(fontsize=7)
    on = [r for r in ok if r["section"] == "on"]
    if on:
        ax[1, 0].barh([r["method"] for r in on], [r["time_s"] for r in on], color="C0")
        ax[1, 0].set(xscale="log", xlabel="s per training step", title=f"Open Neuromorphic: Linear+LIF, "
                     f"N={on[0]['N']}, B={on[0]['B']}, T={on[0]['T']}")
    rnn = [r for r in ok if r["section"] == "rnn"]
    for i, m in enumerate(("egru", "deltagru")):
        pts = sorted((r["activity"], r["time_s"]) for r in rnn if r["method"] == m and r.get("activity") is not None)
        if pts:
            ax[1, 1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"{m} (triton)")
    gru = next((r for r in rnn if r["method"] == "gru"), None)
    if gru:
        ax[1, 1].axhline(gru["time_s"], color="k", ls=":", label="torch.nn.GRU")
    ax[1, 1].set(xlabel="activity", ylabel="s per training step", yscale="log", title="EGRU / DeltaGRU vs GRU")
    if rnn:
        ax[1, 1].legend(fontsize=8)
    dbl = {r["method"]: r for r in ok if r["section"] == "double"}
    sub = ", ".join(f"{m}: longest T {r['longest_T']}" for m, r in dbl.items())
    fig.suptitle(f"{meta.get('device_name') or meta['device']}  (torch {meta.get('torch')}, triton "
                 f"{meta.get('triton')})" + (f"\nunder the memory cap: {sub}" if sub else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when nvidia-smi lists a GPU) or cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="full on cuda, tiny on cpu")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    ap.add_argument("--methods", nargs="+", choices=LIF_METHODS, default=LIF_METHODS, help="for on and lif2")
    ap.add_argument("--T", type=int, nargs="+", help="lif2's sequence lengths (default: the preset's)")
    ap.add_argument("--total-s", type=float, help="the whole run's time limit (default: the preset's)")
    ap.add_argument("--cap-bytes", type=int, help="the double section's memory cap (default: the preset's)")
    ap.add_argument("--sj-cupy-path", default=os.environ.get("SJ_CUPY_PATH"),
                    help="a site (pip install --target) holding spikingjelly 0.0.0.0.14, for its CuPy backend")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    t_begin = time.monotonic()
    gpus = common.gpu_info()
    device = args.device or ("cuda" if gpus else "cpu")
    if device not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda or cpu, got {device!r}")
    preset = json.loads(json.dumps(PRESETS[args.preset or ("full" if device == "cuda" else "tiny")]))
    if args.T:
        preset["lif2"]["T"] = sorted(args.T)
    total = args.total_s or preset["total_s"]
    deadline = t_begin + total
    name = common.slug(gpus[0]["name"]) if device == "cuda" and gpus else device
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"gpu_{name}")
    runner = Runner(device, preset["startup_s"])
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", os.path.relpath(SCRIPT, REPO)]
                                + (argv if argv is not None else sys.argv[1:])),
            "device": device, "gpus": gpus, "driver": gpus[0]["driver"] if gpus else None,
            "device_name": gpus[0]["name"] if device == "cuda" and gpus else platform.processor() or "cpu",
            "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": common.git_output(REPO, "rev-parse", "HEAD"),
            "git_dirty": bool(common.git_output(REPO, "status", "--porcelain", "--", "src", "benchmarks")),
            "peers": common.package_versions(PEERS),
            "peers_sj_cupy_path": args.sj_cupy_path,
            "spikingjelly_cupy_version": common.package_versions(["spikingjelly"], args.sj_cupy_path)["spikingjelly"]
            if args.sj_cupy_path else None,
            "total_s": total, "preset": args.preset or ("full" if device == "cuda" else "tiny")}
    print(f"gpu.py: device {device} ({meta['device_name']}), preset {meta['preset']}, sections {args.sections}, "
          f"total {total:.0f} s -> {out}.*", flush=True)
    m = runner.run([{"id": "meta", "section": "meta", "budget_s": 30}], {}, deadline)
    meta.update({k: v for k, v in m["meta"].items() if k not in ("status", "case_s", "section")})

    tests = []
    if "tests" in args.sections:
        print("== tests", flush=True)
        tests = run_tests(preset["tests"], device, min(preset["budget_s"]["tests"], deadline - time.monotonic()),
                          out + "_tests.log")
    cases, envs = make_cases(preset, args.sections, args.methods, args.sj_cupy_path, args.cap_bytes)
    results = {}
    save(out, meta, preset, tests, cases, results, t_begin)
    for phase, secs in PHASES:  # a phase's cases share workers: one per (tier, environment)
        sec = [c for c in cases if c["section"] in secs]
        if not sec:
            continue
        budget = sum(preset["budget_s"][x] for x in secs if x in args.sections)
        print(f"== {phase} ({len(sec)} cases, {budget} s)", flush=True)
        phase_deadline = min(deadline, time.monotonic() + budget)
        for key in dict.fromkeys((c.get("tier", 0), c["env"]) for c in sec):
            group = [c for c in sec if (c.get("tier", 0), c["env"]) == key]
            if envs[key[1]] is None:
                for c in group:
                    results[c["id"]] = {"status": "unavailable", "reason": "no --sj-cupy-path (SpikingJelly "
                                        "0.0.0.0.14, the last release with the CuPy backend)"}
                    print("  " + describe(c, results[c["id"]]), flush=True)
                continue
            results.update(runner.run(group, envs[key[1]], phase_deadline))
        save(out, meta, preset, tests, cases, results, t_begin)
    save(out, meta, preset, tests, cases, results, t_begin, final=True)
    return 0


def save(out, meta, preset, tests, cases, results, t_begin, final=False):
    """Write the JSON and CSV (after every phase too: a run killed from outside keeps what it
    measured); at the end the PNG and the tables. A failure in the summaries is recorded, not raised."""
    rows = flat_rows(cases, results)
    errors = []
    try:
        checks = targets(rows)
    except Exception as e:  # noqa: BLE001 - the measurements are worth more than their summary
        checks, errors = [], errors + [f"targets: {type(e).__name__}: {e}"]
    meta["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    meta["complete"] = final

    def dump():
        with open(out + ".json", "w") as f:
            json.dump({"meta": meta, "preset": preset, "tests": tests, "rows": rows, "targets": checks,
                       "summary_errors": errors}, f, indent=1, default=str)
    dump()
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if not final:
        return
    for what, fn in (("plot", lambda: plot(rows, meta, out + ".png")),
                     ("tables", lambda: print("\n" + markdown(rows, tests) + "\n"))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{what}: {type(e).__name__}: {e}")
            print(f"gpu.py: the {what} failed: {type(e).__name__}: {e}", flush=True)
    if errors:
        dump()
    for t in checks:
        print(f"target: {t['what']} = {t['value']:.3g} ({t['bound']}) {'PASS' if t['passed'] else 'FAIL'}")
    print(f"\nwrote {out}.json, .csv, .png, _tests.log in {meta['elapsed_s']} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
