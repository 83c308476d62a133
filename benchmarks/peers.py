"""Peers benchmark: one training step (forward + backward) of the same 2-layer LIF, side by side.

Case: ``n_in -> H -> H`` feed-forward LIF (beta 0.9, threshold 1, reset by subtraction), batch B,
input spikes Bernoulli(0.1) float32 (seeded), loss ``(sum_t z2_t * D).sum()`` with D a fixed
seeded (B, H) tensor. Every method builds the same weights (seeded uniform +-3/sqrt(fan_in)).

Methods (each an adapter below; peers are optional imports, skipped with a note when absent):

- ``loop``: a plain PyTorch step loop (F.linear + the LIF step with a surrogate spike)
- ``loop-ckpt``: the same loop under ``torch.utils.checkpoint`` in segments of k = ceil(sqrt T)
- ``sb-torch-full`` / ``sb-torch-ckpt``: sparsebptt, backend "torch", FullBPTT / Checkpoint(k)
- ``sb-cpu-full`` / ``sb-cpu-ckpt``: sparsebptt, backend "cpu" (fused C kernels), same strategies
- ``snntorch``, ``norse`` (``LIFBoxCell``, the current-free LIF), ``spikingjelly`` (multi-step
  ``LIFNode``, ``nn.Linear`` over the whole sequence; on CPU its registered ``sj_lif`` op),
  ``spikingjelly-torch`` (multi-step ``SimpleLIFNode``, SpikingJelly's pure-PyTorch neuron,
  stepped; it has no reset by subtraction, so it resets to zero): the peers' own idiomatic code
- ``gru``: ``torch.nn.GRU`` of the same size (2 layers), for scale
- ``floor``: the same matmuls batched over all T steps (forward and backward of both layers'
  input projections, no recurrence): the hardware's floor for this network

Every (method, repeat) runs in a fresh process: after a T=4 warm-up (one-time set-up), a first
step at full T gives the peak resident memory increase (``/proc/self/status`` VmHWM after resetting it with ``clear_refs``, over the resident
set once the model and input exist), after one more untimed step the next ``--inner`` steps are
timed (their median is that
process's time), a last one gives the peak autograd-saved
bytes (``saved_tensors_hooks``, the caller's x and parameters not counted; tensors saved inside a
``torch.utils.checkpoint`` region are hidden from the hooks, so that column understates
``loop-ckpt``). Repeats are interleaved round-robin over the methods; the median over repeats is
reported with the ratio to ``loop`` (the time is the median over processes of each process's
median). ``torch.set_num_threads(1)`` in every worker.

    .venv/bin/python benchmarks/peers.py                 # T in 100, 1000, 2000, 5000; 3 repeats
    .venv/bin/python benchmarks/peers.py --preset ci     # T=200
    .venv/bin/python benchmarks/peers.py --methods loop sb-cpu-full --T 500 --repeats 5

Writes benchmarks/results/peers[_ci].{csv,json,png}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import measure_step, run_worker  # noqa: E402
METHODS = ["loop", "loop-ckpt", "sb-torch-full", "sb-torch-ckpt", "sb-cpu-full", "sb-cpu-ckpt",
           "snntorch", "norse", "spikingjelly", "spikingjelly-torch", "gru", "floor"]
PEER_MODULES = {"snntorch": "snntorch", "norse": "norse", "spikingjelly": "spikingjelly",
                "spikingjelly-torch": "spikingjelly"}
PRESETS = {"ci": {"T": [200], "repeats": 3}, "full": {"T": [100, 1000, 2000, 5000], "repeats": 3}}
BETA, THRESHOLD, P_IN = 0.9, 1.0, 0.1


# ---- the network, shared by every adapter ----------------------------------------------------
def weights(n_in, H, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for fan_in, fan_out in ((n_in, H), (H, H)):
        bound = 3.0 / math.sqrt(fan_in)
        W = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
        out += [W, b]
    return out  # W1 [H, n_in], b1, W2 [H, H], b2


def inputs(T, B, n_in, H, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(T, B, n_in, generator=g) < P_IN).float()
    D = torch.randn(B, H, generator=g)
    return x, D


def _params(n_in, H):
    import torch
    return [torch.nn.Parameter(w.clone()) for w in weights(n_in, H)]


def _lif_loop(x, params, t0=0, t1=None, state=None):
    """The plain loop over steps t0..t1: returns (sum of layer-2 spikes, state)."""
    import torch.nn.functional as F
    from sparsebptt.cells.surrogate import spike
    W1, b1, W2, b2 = params
    t1 = x.shape[0] if t1 is None else t1
    v1, v2 = state
    acc = 0
    for t in range(t0, t1):
        u1 = BETA * v1 + F.linear(x[t], W1, b1)
        z1 = spike(u1 - THRESHOLD)
        v1 = u1 - z1 * THRESHOLD
        u2 = BETA * v2 + F.linear(z1, W2, b2)
        z2 = spike(u2 - THRESHOLD)
        v2 = u2 - z2 * THRESHOLD
        acc = acc + z2
    return acc, (v1, v2)


def build(method, T, B, n_in, H, k):
    """(step function running forward + backward, parameters) for ``method``."""
    import torch
    x, D = inputs(T, B, n_in, H)
    zeros = (torch.zeros(B, H), torch.zeros(B, H))
    if method == "loop":
        params = _params(n_in, H)

        def step():
            rate, _ = _lif_loop(x, params, state=zeros)
            (rate * D).sum().backward()
        return step, params, x

    if method == "loop-ckpt":
        from torch.utils.checkpoint import checkpoint
        params = _params(n_in, H)

        def seg(t0, t1, v1, v2):
            rate, (v1, v2) = _lif_loop(x, params, t0, t1, (v1, v2))
            return rate, v1, v2

        def step():
            v1, v2 = zeros
            rate = 0
            for t0 in range(0, T, k):
                r, v1, v2 = checkpoint(seg, t0, min(t0 + k, T), v1, v2, use_reentrant=False)
                rate = rate + r
            (rate * D).sum().backward()
        return step, params, x

    if method.startswith("sb-"):
        import sparsebptt as sb
        backend, mode = method.split("-")[1:]
        net = sb.cells.Stack([sb.cells.LIF(n_in, H, beta=BETA, threshold=THRESHOLD, backend=backend),
                              sb.cells.LIF(H, H, beta=BETA, threshold=THRESHOLD, backend=backend)])
        with torch.no_grad():
            for p, w in zip(net.parameters(), weights(n_in, H)):
                p.copy_(w)
        strategy = sb.FullBPTT() if mode == "full" else sb.Checkpoint(every=k)

        def step():
            rate, _ = sb.scan(net, x, strategy=strategy, reduce="sum")
            (rate * D).sum().backward()
        return step, list(net.parameters()), x

    if method == "snntorch":
        import snntorch as snn
        from snntorch import surrogate
        params = _params(n_in, H)
        W1, b1, W2, b2 = params
        lif1 = snn.Leaky(beta=BETA, threshold=THRESHOLD, spike_grad=surrogate.fast_sigmoid(slope=25),
                         reset_mechanism="subtract")
        lif2 = snn.Leaky(beta=BETA, threshold=THRESHOLD, spike_grad=surrogate.fast_sigmoid(slope=25),
                         reset_mechanism="subtract")

        def step():
            import torch.nn.functional as F
            m1, m2 = lif1.init_leaky(), lif2.init_leaky()
            acc = 0
            for t in range(T):
                s1, m1 = lif1(F.linear(x[t], W1, b1), m1)
                s2, m2 = lif2(F.linear(s1, W2, b2), m2)
                acc = acc + s2
            (acc * D).sum().backward()
        return step, params, x

    if method == "norse":
        import norse.torch as norse
        params = _params(n_in, H)
        W1, b1, W2, b2 = params
        # dt * tau_mem_inv = 0.1: v <- 0.9 v + 0.1 i (the same decay, inputs scaled by 0.1)
        p = norse.LIFBoxParameters(tau_mem_inv=torch.tensor(100.0), v_leak=torch.tensor(0.0),
                                   v_th=torch.tensor(THRESHOLD), v_reset=torch.tensor(0.0),
                                   method="super", alpha=torch.tensor(100.0))
        cell1, cell2 = norse.LIFBoxCell(p, dt=1e-3), norse.LIFBoxCell(p, dt=1e-3)

        def step():
            import torch.nn.functional as F
            s1 = s2 = None
            acc = 0
            for t in range(T):
                z1, s1 = cell1(10.0 * F.linear(x[t], W1, b1), s1)
                z2, s2 = cell2(10.0 * F.linear(z1, W2, b2), s2)
                acc = acc + z2
            (acc * D).sum().backward()
        return step, params, x

    if method == "spikingjelly":
        from spikingjelly.activation_based import functional, neuron, surrogate
        lin1, lin2 = torch.nn.Linear(n_in, H), torch.nn.Linear(H, H)
        with torch.no_grad():
            for p, w in zip(list(lin1.parameters()) + list(lin2.parameters()), weights(n_in, H)):
                p.copy_(w)
        kw = dict(tau=1.0 / (1.0 - BETA), decay_input=False, v_threshold=THRESHOLD, v_reset=None,
                  surrogate_function=surrogate.Sigmoid(), step_mode="m")
        lif1, lif2 = neuron.LIFNode(**kw), neuron.LIFNode(**kw)
        net = torch.nn.Sequential(lin1, lif1, lin2, lif2)

        def step():
            functional.reset_net(net)
            out = net(x)  # Linear over [T, B, *], multi-step LIF
            (out.sum(0) * D).sum().backward()
        return step, list(net.parameters()), x

    if method == "spikingjelly-torch":
        from spikingjelly.activation_based import functional, neuron, surrogate
        lin1, lin2 = torch.nn.Linear(n_in, H), torch.nn.Linear(H, H)
        with torch.no_grad():
            for p, w in zip(list(lin1.parameters()) + list(lin2.parameters()), weights(n_in, H)):
                p.copy_(w)
        kw = dict(tau=1.0 / (1.0 - BETA), decay_input=False, v_threshold=THRESHOLD, v_reset=0.0,
                  surrogate_function=surrogate.Sigmoid(), step_mode="m")
        net = torch.nn.Sequential(lin1, neuron.SimpleLIFNode(**kw), lin2, neuron.SimpleLIFNode(**kw))

        def step():
            functional.reset_net(net)
            out = net(x)  # Linear over [T, B, *], the pure-PyTorch neuron stepped over T
            (out.sum(0) * D).sum().backward()
        return step, list(net.parameters()), x

    if method == "gru":
        gru = torch.nn.GRU(n_in, H, num_layers=2)

        def step():
            y, _ = gru(x)
            (y.sum(0) * D).sum().backward()
        return step, list(gru.parameters()), x

    if method == "floor":
        import torch.nn.functional as F
        params = _params(n_in, H)
        W1, b1, W2, b2 = params
        z1 = (torch.rand(T, B, H, generator=torch.Generator().manual_seed(5)) < 0.1).float()

        def step():  # both projections over all steps at once, forward and backward, no recurrence
            i1 = F.linear(x, W1, b1)
            i2 = F.linear(z1.requires_grad_(), W2, b2)
            (i1.sum(0) * D).sum().backward()
            (i2.sum(0) * D).sum().backward()
            z1.grad = None
        return step, params, x

    raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(METHODS)}")


def worker(spec):
    """Steps in a fresh process: after a T=4 warm-up (lazy imports, one-time set-up; too small to
    grow the heap), the first step at full T for the peak resident memory increase, then
    ``inner`` timed ones (their median is the worker's time), the last under saved-tensor hooks
    for the autograd-saved bytes."""
    import gc

    import torch
    torch.set_num_threads(1)
    method, T, B, n_in, H, k = (spec[n] for n in ("method", "T", "B", "n_in", "H", "k"))
    warm, _, _ = build(method, 4, B, n_in, H, 2)  # lazy imports and one-time set-up, tiny heap
    warm()
    del warm
    gc.collect()
    step, params, x = build(method, T, B, n_in, H, k)
    m = measure_step(step, params, x, spec.get("inner", 3))
    return {"status": "ok", "method": method, "time_s": statistics.median(m["times_s"]), "times_s": m["times_s"],
            "peak_rss_increase": m["peak_rss_increase"],
            "peak_saved_bytes": m["trace"].peak_stored_bytes}


def _version(mod):
    """The installed version of ``mod`` if it imports, None if absent, else why it fails."""
    try:
        importlib.import_module(mod)
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - a peer that is installed but broken is reported
        return f"import failed: {e}"
    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gate(n_in, H):
    """sparsebptt's backends must agree on this network before anything is timed."""
    import torch
    import sparsebptt as sb
    from sparsebptt.testing import assert_close
    T, B = 53, 3
    x, D = inputs(T, B, n_in, H)
    res = []
    for backend in ("torch", "cpu"):
        net = sb.cells.Stack([sb.cells.LIF(n_in, H, beta=BETA, threshold=THRESHOLD, backend=backend),
                              sb.cells.LIF(H, H, beta=BETA, threshold=THRESHOLD, backend=backend)])
        with torch.no_grad():
            for p, w in zip(net.parameters(), weights(n_in, H)):
                p.copy_(w)
        for st in (sb.FullBPTT(), sb.Checkpoint(every=8)):
            rate, _ = sb.scan(net, x, strategy=st, reduce="sum")
            (rate * D).sum().backward()
            res.append([rate.detach()] + [p.grad.clone() for p in net.parameters()])
            net.zero_grad()
    for r in res[1:]:
        for a, b in zip(res[0], r):
            assert_close("gate", a, b, torch.float32)


def metadata():
    import torch
    import sparsebptt as sb
    from sparsebptt.kernels.backend import resolve_backend
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
            "torch": torch.__version__, "sparsebptt": sb.__version__, "git_commit": commit,
            "default_backend": sb.get_backend(),  # what a cell built without backend= runs:
            "default_backend_on_cpu": resolve_backend(None, "cpu"),
            "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": 1, "gpu": None,
            "peers": {m: _version(mod) for m, mod in PEER_MODULES.items()},
            "loadavg_at_start": os.getloadavg()}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok"]
    Ts = sorted({r["T"] for r in ok})
    fig, ax = plt.subplots(1, 2, figsize=(13, 5))
    for i, m in enumerate(dict.fromkeys(r["method"] for r in ok)):
        pts = sorted((r["T"], r["ms_per_step"], r["peak_rss_increase"] / 2 ** 20) for r in ok if r["method"] == m)
        style = dict(marker="o", lw=2.2 if m.startswith("sb-") else 1.2, ls="-" if m.startswith("sb-") else "--",
                     color=f"C{i % 10}", label=m)
        ax[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
        ax[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
    ax[0].set(xscale="log", yscale="log", xlabel="T (time steps)",
              ylabel="ms per time step (forward + backward), median")
    ax[1].set(xscale="log", yscale="log", xlabel="T (time steps)", ylabel="peak resident memory increase (MiB)")
    ax[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"2-layer LIF, one training step on CPU (1 thread), T in {Ts}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the issue's targets: (method, peer, largest allowed time ratio); checked at every T
TARGETS = [("sb-cpu-full", "snntorch", 0.25), ("sb-cpu-full", "norse", 0.25), ("sb-cpu-full", "loop", 0.4),
           ("sb-cpu-full", "spikingjelly", 0.4), ("sb-cpu-ckpt", "loop-ckpt", 0.5),
           ("sb-cpu-full", "floor", 2.0), ("sb-cpu-ckpt", "floor", 2.0)]


def targets(rows, T):
    """The issue's ratios at sequence length T: [(text, ratio, bound, passed)]."""
    by = {r["method"]: r for r in rows if r["status"] == "ok" and r["T"] == T}
    out = []
    for a, b, bound in TARGETS:
        if a in by and b in by:
            q = by[a]["time_s"] / by[b]["time_s"]
            out.append((f"time {a} / {b}", q, bound, q <= bound))
    if "sb-cpu-ckpt" in by and "loop" in by:
        q = by["sb-cpu-ckpt"]["peak_rss_increase"] / by["loop"]["peak_rss_increase"]
        out.append(("peak RSS increase sb-cpu-ckpt / loop", q, 0.2, q <= 0.2))
    return out


def summarise(runs, T):
    """One row per method at T from the per-process results (medians over repeats)."""
    rows = []
    for m, res in runs.items():
        ok = [x for x in res if x["status"] == "ok"]
        if not ok:
            rows.append({"T": T, "method": m, "status": "failed", "reason": res[0].get("reason")})
            continue
        times = [x["time_s"] for x in ok]
        rows.append({"T": T, "method": m, "status": "ok", "n": len(ok), "time_s": statistics.median(times),
                     "min_s": min(times), "max_s": max(times),
                     "ms_per_step": statistics.median(times) / T * 1e3,
                     "peak_rss_increase": int(statistics.median(x["peak_rss_increase"] for x in ok)),
                     "peak_saved_bytes": int(statistics.median(x["peak_saved_bytes"] for x in ok))})
    base = next((r["time_s"] for r in rows if r["method"] == "loop" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and base:
            r["vs_loop"] = r["time_s"] / base
    return rows


def markdown(rows, Ts):
    """A table: one line per method, ms/step (and x loop) per T, then peak RSS increase per T."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["T"]): r for r in rows}
    head = ("| method | " + " | ".join(f"T={T}: ms/step (x loop)" for T in Ts) + " | "
            + " | ".join(f"T={T}: peak RSS" for T in Ts) + " |")
    lines = [head, "|---|" + "---:|" * (2 * len(Ts))]
    for m in methods:
        cells, mem = [], []
        for T in Ts:
            r = by.get((m, T))
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
                mem.append("")
                continue
            cells.append(f"{r['ms_per_step']:.3f} ({r.get('vs_loop', float('nan')):.2f}x)")
            mem.append(f"{r['peak_rss_increase'] / 2 ** 20:.1f} MiB")
        lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(mem) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--T", type=int, nargs="+", help="sequence lengths (default: the preset's)")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--n-in", type=int, default=64)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--inner", type=int, default=3, help="timed steps per process (median)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", help="output prefix (default benchmarks/results/peers[_ci])")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    Ts = args.T or PRESETS[args.preset]["T"]
    repeats = args.repeats or PRESETS[args.preset]["repeats"]
    if repeats < 1 or args.inner < 1 or min(Ts) < 1:
        ap.error(f"--repeats, --inner and every --T must be >= 1, got {repeats}, {args.inner}, {Ts}")
    out = args.out or os.path.join(HERE, "results", "peers" + ("_ci" if args.preset == "ci" and not args.T else ""))
    gate(args.n_in, args.H)
    print(f"gate passed: sparsebptt backends agree (T=53). T={Ts} B={args.B} H={args.H} n_in={args.n_in} "
          f"repeats={repeats}", flush=True)
    meta = metadata()
    methods = [m for m in args.methods if m not in PEER_MODULES or meta["peers"][m]
               and not str(meta["peers"][m]).startswith("import failed")]
    skipped = {m: f"not importable ({meta['peers'][m] or 'not installed'})" for m in args.methods if m not in methods}
    for m, why in skipped.items():
        print(f"skip {m}: {why}", flush=True)
    rows, all_runs = [], {}
    for T in Ts:
        k = math.ceil(math.sqrt(T))
        runs = {m: [] for m in methods}
        for r in range(repeats):  # interleaved: every method once per round
            for m in methods:
                res = run_worker(os.path.abspath(__file__), {"method": m, "T": T, "B": args.B, "n_in": args.n_in,
                                                             "H": args.H, "k": k, "inner": args.inner}, args.timeout)
                runs[m].append(res)
                shown = f"{res['time_s'] * 1e3:9.1f} ms" if res["status"] == "ok" else res["reason"]
                print(f"T={T} round {r + 1}/{repeats} {m:18s} {shown}", flush=True)
        rows += summarise(runs, T)
        all_runs[str(T)] = runs
        for m, why in skipped.items():
            rows.append({"T": T, "method": m, "status": "skipped", "reason": why})
    checks = {str(T): targets(rows, T) for T in Ts}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "config": {"T": Ts, "B": args.B, "H": args.H, "n_in": args.n_in,
                                            "k": {str(T): math.ceil(math.sqrt(T)) for T in Ts},
                                            "repeats": repeats, "inner": args.inner},
                   "rows": rows, "targets": checks, "runs": all_runs}, f, indent=1)
    cols = ["T", "method", "status", "n", "time_s", "min_s", "max_s", "ms_per_step", "vs_loop",
            "peak_rss_increase", "peak_saved_bytes", "reason"]
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, out + ".png")
    print("\n" + markdown(rows, Ts))
    for T in Ts:
        for text, q, bound, ok in checks[str(T)]:
            print(f"T={T}: {text} = {q:.2f} (target <= {bound}) {'PASS' if ok else 'FAIL'}")
    print(f"\nwrote {out}.csv, .json, .png")


if __name__ == "__main__":
    main()
