"""A VGG-style convolutional SNN under every strategy, against SpikingJelly and plain step loops.

The network (``sparsebptt.train.models.ConvSpikingClassifier``, ``--model csnn``): per width
``Conv2d(3x3, no bias) -> BatchNorm2d -> LIFNeuron -> MaxPool2d(2)``, widths 16-32-64 on ON/OFF
event frames 2 x 32 x 32 (``--dataset event-shapes``), batch 16, then a linear readout of the last
block's firing rates. LIF: beta 0.9, threshold 1, subtractive reset, reset not detached.

Methods (each (method, T) in a fresh process, `common.run_worker`):

- ``sb-full``, ``sb-checkpoint`` (Checkpoint(ceil sqrt T)), ``sb-revolve`` (Revolve(ceil sqrt T)
  slots), ``sb-double-host`` / ``sb-double-disk`` (DoubleCheckpoint(outer ~ T^(2/3), inner ~
  T^(1/3)) with the coarse checkpoints in host memory / a disk file), ``sb-skipper``
  (Skipper(every, keep = every/4), every = 4 * ceil(sqrt(T) / 4): an approximate gradient);
- ``spikingjelly``: SpikingJelly's multi-step model of the same layers (``layer.Conv2d``,
  ``layer.BatchNorm2d``, ``neuron.LIFNode(tau=10, decay_input=False, v_reset=None)`` = beta 0.9
  with subtractive reset, ``layer.MaxPool2d``, ``layer.Flatten``; ``step_mode='m'``,
  LIFNode's own multi-step path on CPU; the same initial weights). Its batch norm, run over
  [T*B, ...], takes its statistics over all steps at once, where ours (and the loops') are per step;
- ``spikingjelly-memopt``: that model under SpikingJelly 2's ``memopt.optimize_memory(level=1)``
  (each conv-BN-LIF-pool block checkpointed, binary inputs compressed; levels 2-4 measure CUDA
  memory and refuse to run on CPU);
- ``loop``: the same modules stepped by a plain Python loop over t (conv, BN, LIF, pool per step);
- ``loop-ckpt``: that loop with ``torch.utils.checkpoint`` (non-reentrant) around each segment of
  ceil(sqrt T) steps (its recomputation updates batch norm's running statistics a second time).

Per (method, T), after a T = 2 warm-up: the peak resident memory growth of the first step at full
T (VmHWM after ``clear_refs``, over the resident set once the model and input exist), an untimed
step, ``--inner`` timed steps (median), and a last step under `sb.trace` with saved-tensor hooks
(the autograd-saved bytes plus the checkpoints in fast memory; x and the parameters not counted;
what ``torch.utils.checkpoint`` saves inside its regions is hidden from the hooks, so that column
understates ``loop-ckpt`` and ``spikingjelly-memopt``: compare their RSS growth). A step is forward + cross-entropy + backward. Accuracy: each method
trains ``--train-epochs`` epochs of ``--train-n`` examples at T = ``--train-T`` (Adam 2e-3,
batch 16, seed 0) and is scored on ``--val-n`` validation examples.

At the largest T the script checks issue 14's targets (PASS/FAIL with the numbers).

    .venv/bin/python benchmarks/deep.py                    # T in 10, 50, 200; every method
    .venv/bin/python benchmarks/deep.py --T 10 --methods sb-full loop --no-train   # a quick look

Writes benchmarks/results/deep.{csv,json,png} (``--name`` to change) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

SCRIPT = os.path.abspath(__file__)
RESULTS = os.path.join(common.REPO, "benchmarks", "results")
METHODS = ["sb-full", "sb-checkpoint", "sb-revolve", "sb-double-host", "sb-double-disk", "sb-skipper",
           "spikingjelly", "spikingjelly-memopt", "loop", "loop-ckpt"]
BETA, THRESHOLD = 0.9, 1.0
SIZE, B_DEFAULT, WIDTHS = 32, 16, (16, 32, 64)


def strategy_for(method: str, T: int) -> str:
    """The strategy string of an ``sb-*`` method at T."""
    k = math.ceil(math.sqrt(T))
    if method == "sb-full":
        return "full"
    if method == "sb-checkpoint":
        return f"checkpoint:{k}"
    if method == "sb-revolve":
        return f"revolve:{k}"
    if method in ("sb-double-host", "sb-double-disk"):
        inner = max(1, math.ceil(T ** (1 / 3)))
        outer = max(inner, math.ceil(T ** (2 / 3)))
        return ("double" if method == "sb-double-host" else "double-disk") + f":{outer},{inner}"
    if method == "sb-skipper":
        every = 4 * math.ceil(k / 4)
        return f"skipper:{every},{every // 4}"
    raise ValueError(f"not a sparsebptt method: {method}")


def _is_lif(layer) -> bool:
    return type(layer).__name__ == "LIFNeuron"


def _loop(layers, x, vs=None):
    """The plain step loop over ``layers`` (the csnn stack's modules) from membranes ``vs``:
    (spike counts of the last layer summed over the steps, final membranes)."""
    from sparsebptt.cells.surrogate import spike

    vs = list(vs) if vs is not None else None
    counts, new = None, []
    for t in range(x.shape[0]):
        h, new, j = x[t], [], 0
        for layer in layers:
            if _is_lif(layer):
                v = h if vs is None else BETA * vs[j] + h
                s = spike(v - THRESHOLD)
                new.append(v - s * THRESHOLD)
                h, j = s, j + 1
            else:
                h = layer(h)
        vs = new
        counts = h if counts is None else counts + h
    return counts, vs


def _loop_ckpt(layers, x, k):
    from torch.utils.checkpoint import checkpoint

    def seg(xs, *vs):
        c, out = _loop(layers, xs, vs if vs else None)
        return (c, *out)

    counts, vs = None, ()
    for a in range(0, x.shape[0], k):
        c, *vs = checkpoint(seg, x[a:a + k], *vs, use_reentrant=False)
        vs = tuple(vs)
        counts = c if counts is None else counts + c
    return counts


class _Block:  # the SpikingJelly block type memopt checkpoints (made a torch Sequential in _sj_net)
    cls = None


def _sj_net(ref, memopt=False):
    """SpikingJelly's multi-step copy of ``ref``'s stack (same weights), as blocks ending at each
    pooling; ``memopt``: under ``memopt.optimize_memory(level=1)``."""
    import torch
    from spikingjelly.activation_based import layer as sjl
    from spikingjelly.activation_based import neuron, surrogate

    if _Block.cls is None:
        _Block.cls = type("SJBlock", (torch.nn.Sequential,), {})
    mods, blocks = [], []
    for m in ref.cell.layers:
        if isinstance(m, torch.nn.Conv2d):
            c = sjl.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, bias=m.bias is not None,
                           step_mode="m")
            c.load_state_dict(m.state_dict())
            mods.append(c)
        elif isinstance(m, torch.nn.BatchNorm2d):
            bn = sjl.BatchNorm2d(m.num_features, step_mode="m")
            bn.load_state_dict(m.state_dict())
            mods.append(bn)
        elif _is_lif(m):
            mods.append(neuron.LIFNode(tau=1.0 / (1.0 - BETA), decay_input=False, v_threshold=THRESHOLD, v_reset=None,
                                       surrogate_function=surrogate.Sigmoid(), step_mode="m"))
        elif isinstance(m, torch.nn.MaxPool2d):
            mods.append(sjl.MaxPool2d(m.kernel_size, step_mode="m"))
            blocks.append(_Block.cls(*mods))
            mods = []
        elif isinstance(m, torch.nn.Flatten):
            mods.append(sjl.Flatten(step_mode="m"))
        else:
            raise TypeError(f"no SpikingJelly twin for {type(m).__name__}")
    net = torch.nn.Sequential(*blocks, *mods)
    if memopt:
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.memopt import optimize_memory

        probe = (torch.rand(2, 2, *ref.input_shape) < 0.1).float()

        def example(model):
            functional.reset_net(model)
            return model(probe)
        optimize_memory(net, (_Block.cls,), example, level=1, checkpoint_budget="memory", compress=True)
    return net


def build(method: str, T: int, widths, disk_dir=None):
    """(forward(x) -> logits, modules holding the parameters)."""
    import torch

    from sparsebptt.train.models import ConvSpikingClassifier

    torch.manual_seed(0)
    ref = ConvSpikingClassifier((2, SIZE, SIZE), 10, widths=widths, beta=BETA, threshold=THRESHOLD)
    if method.startswith("sb-"):
        import sparsebptt as sb

        s = sb.parse_strategy(strategy_for(method, T))
        if disk_dir is not None and getattr(s, "outer_storage", None) == "disk":
            import dataclasses
            s = dataclasses.replace(s, disk_dir=disk_dir)
        ref.strategy = s
        return ref, ref
    layers = list(ref.cell.layers)
    if method == "loop":
        return (lambda x: ref.readout(_loop(layers, x)[0] / x.shape[0])), ref
    if method == "loop-ckpt":
        k = math.ceil(math.sqrt(T))
        return (lambda x: ref.readout(_loop_ckpt(layers, x, k) / x.shape[0])), ref
    if method in ("spikingjelly", "spikingjelly-memopt"):
        from spikingjelly.activation_based import functional

        net = _sj_net(ref, memopt=method == "spikingjelly-memopt")
        holder = torch.nn.ModuleList([net, ref.readout])

        def fwd(x):
            functional.reset_net(net)
            return ref.readout(net(x).sum(0) / x.shape[0])
        return fwd, holder
    raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(METHODS)}")


def _data(T: int, n_train: int, n_val: int):
    from sparsebptt.data.event_shapes import EventShapes

    return EventShapes(T, size=SIZE, n_train=n_train, n_val=n_val, seed=0)


def worker(spec: dict) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    method, T, B, widths = spec["method"], spec["T"], spec["B"], tuple(spec["widths"])
    if spec.get("kind") == "train":
        return train_worker(spec)
    warm, _ = build(method, 2, widths, spec.get("disk_dir"))
    xw = torch.rand(2, 2, 2, SIZE, SIZE).lt(0.1).float()
    F.cross_entropy(warm(xw), torch.zeros(2, dtype=torch.long)).backward()
    del warm, xw
    gc.collect()
    data = _data(T, B, 10)
    x, y = next(data.batches("train", B, seed=0))
    del data
    fwd, mods = build(method, T, widths, spec.get("disk_dir"))
    mods.train()
    params = list(mods.parameters())

    def step():
        F.cross_entropy(fwd(x), y).backward()

    m = common.measure_step(step, params, x, spec["inner"])
    times, tr = m["times_s"], m["trace"]
    return {"status": "ok", "kind": "step", "method": method, "T": T, "B": B,
            "strategy": strategy_for(method, T) if method.startswith("sb-") else None,
            "time_s": statistics.median(times), "times_s": times, "peak_rss_increase": m["peak_rss_increase"],
            "saved_bytes": tr.peak_stored_bytes, "offloaded_bytes": tr.peak_offloaded_bytes}


def train_worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    method, T, B, widths = spec["method"], spec["T"], spec["B"], tuple(spec["widths"])
    data = _data(T, spec["n_train"], spec["n_val"])
    fwd, mods = build(method, T, widths, spec.get("disk_dir"))
    opt = torch.optim.Adam(mods.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for epoch in range(spec["epochs"]):
        mods.train()
        for x, y in data.batches("train", B, seed=epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(fwd(x), y).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    mods.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in data.batches("val", 64, seed=0):
            correct += int((fwd(x).argmax(-1) == y).sum())
            n += len(y)
    return {"status": "ok", "kind": "train", "method": method, "T": T, "val_acc": correct / n,
            "train_seconds": seconds, "epochs": spec["epochs"], "n_train": spec["n_train"], "n_val": n}


# ---- the parent: cases, checks, files ----------------------------------------------------------
def checks(rows: list, T: int) -> list:
    """Issue 14's targets at T: (name, PASS/FAIL/-, numbers)."""
    by = {r["method"]: r for r in rows if r["T"] == T and r.get("kind") == "step" and r["status"] == "ok"}
    out = []

    def add(name, need, ok_fn, numbers):
        if not all(m in by for m in need):
            out.append((name, "-", "missing: " + ", ".join(m for m in need if m not in by)))
            return
        ok, text = ok_fn(), numbers()
        out.append((name, "PASS" if ok else "FAIL", text))

    f, c, s, sj = (by.get(m) for m in ("sb-full", "sb-checkpoint", "sb-skipper", "spikingjelly"))
    add("FullBPTT no slower than SpikingJelly", ["sb-full", "spikingjelly"],
        lambda: f["time_s"] <= sj["time_s"],
        lambda: f"{common.fmt_time(f['time_s'])} vs {common.fmt_time(sj['time_s'])} "
                f"({f['time_s'] / sj['time_s']:.2f}x)")
    add("Checkpoint(ceil sqrt T) stores <= 1/5 of FullBPTT's bytes", ["sb-full", "sb-checkpoint"],
        lambda: c["saved_bytes"] * 5 <= f["saved_bytes"],
        lambda: f"{common.fmt_bytes(c['saved_bytes'])} vs {common.fmt_bytes(f['saved_bytes'])} "
                f"(1/{f['saved_bytes'] / max(c['saved_bytes'], 1):.1f})")
    add("Checkpoint(ceil sqrt T) peak RSS growth <= 1/4 of FullBPTT's", ["sb-full", "sb-checkpoint"],
        lambda: c["peak_rss_increase"] * 4 <= f["peak_rss_increase"],
        lambda: f"{common.fmt_bytes(c['peak_rss_increase'])} vs {common.fmt_bytes(f['peak_rss_increase'])} "
                f"(1/{f['peak_rss_increase'] / max(c['peak_rss_increase'], 1):.1f})")
    add("Checkpoint(ceil sqrt T) within 1.25x SpikingJelly's time", ["sb-checkpoint", "spikingjelly"],
        lambda: c["time_s"] <= 1.25 * sj["time_s"],
        lambda: f"{common.fmt_time(c['time_s'])} vs {common.fmt_time(sj['time_s'])} "
                f"({c['time_s'] / sj['time_s']:.2f}x)")
    add("Skipper 1/4 stores >= 6.7x less than FullBPTT", ["sb-full", "sb-skipper"],
        lambda: f["saved_bytes"] >= 6.7 * s["saved_bytes"],
        lambda: f"{common.fmt_bytes(s['saved_bytes'])} vs {common.fmt_bytes(f['saved_bytes'])} "
                f"({f['saved_bytes'] / max(s['saved_bytes'], 1):.1f}x less)")
    add("Skipper 1/4 no slower than FullBPTT", ["sb-full", "sb-skipper"],
        lambda: s["time_s"] <= f["time_s"],
        lambda: f"{common.fmt_time(s['time_s'])} vs {common.fmt_time(f['time_s'])} "
                f"({s['time_s'] / f['time_s']:.2f}x)")
    return out


def markdown(rows: list, acc: dict, train_T) -> str:
    Ts = sorted({r["T"] for r in rows if r.get("kind") == "step"})
    if not Ts:
        return "\n".join(["| method | val acc (T=%s) | train seconds |" % train_T, "|---|---|---|"]
                         + [f"| {r['method']} | {r['val_acc']:.3f} | {r['train_seconds']:.0f} |"
                            for r in rows if r.get("kind") == "train" and r["status"] == "ok"])
    lines = ["| method | strategy | " + " | ".join(f"T={T}: time / saved / RSS growth" for T in Ts)
             + (f" | val acc (T={train_T}) |" if acc else " |"),
             "|---|---|" + "---|" * len(Ts) + ("---|" if acc else "")]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for m in methods:
        cells = []
        strat = next((r.get("strategy") for r in rows if r["method"] == m and r["T"] == Ts[-1] and r.get("strategy")),
                     None)
        for T in Ts:
            r = next((r for r in rows if r["method"] == m and r["T"] == T and r.get("kind") == "step"), None)
            if r is None or r["status"] != "ok":
                cells.append("failed" if r is not None else "-")
            else:
                cells.append(f"{common.fmt_time(r['time_s'])} / {common.fmt_bytes(r['saved_bytes'])} / "
                             f"{common.fmt_bytes(r['peak_rss_increase'])}")
        a = acc.get(m)
        tail = (f" | {a:.3f} |" if a is not None else " | - |") if acc else " |"
        lines.append(f"| {m} | {strat or '-'} (at T={Ts[-1]}) | " + " | ".join(cells) + tail
                     if strat else f"| {m} | - | " + " | ".join(cells) + tail)
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for m in METHODS:
        rs = sorted((r for r in rows if r["method"] == m and r.get("kind") == "step" and r["status"] == "ok"),
                    key=lambda r: r["T"])
        if not rs:
            continue
        Ts = [r["T"] for r in rs]
        style = "--" if not m.startswith("sb-") else "-"
        axes[0].plot(Ts, [r["time_s"] for r in rs], style, marker="o", label=m)
        axes[1].plot(Ts, [max(r["saved_bytes"], 1) / common.MiB for r in rs], style, marker="o", label=m)
        axes[2].plot(Ts, [max(r["peak_rss_increase"], 1) / common.MiB for r in rs], style, marker="o", label=m)
    for ax, title in zip(axes, ("median step time (s)", "autograd-saved + checkpoint bytes (MiB)",
                                "peak RSS growth (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("csnn 16-32-64 on 2x32x32, B=16, CPU 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--B", type=int, default=B_DEFAULT)
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--inner", type=int, default=3, help="timed steps per process (median)")
    ap.add_argument("--no-train", action="store_true", help="skip the short training (accuracy)")
    ap.add_argument("--no-steps", action="store_true", help="only the short training (no per-T step measurements)")
    ap.add_argument("--train-T", type=int, default=10)
    ap.add_argument("--train-n", type=int, default=640)
    ap.add_argument("--val-n", type=int, default=320)
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--disk-dir", default=None, help="folder of double-disk's file (default: the temp folder)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--name", default="deep")
    ap.add_argument("--table", metavar="JSON", help="print the table and checks of a results file, run nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        rows = saved["rows"]
        acc = {r["method"]: r["val_acc"] for r in rows if r.get("kind") == "train" and r["status"] == "ok"}
        T_check = max((r["T"] for r in rows if r.get("kind") == "step"), default=0)
        print(markdown(rows, acc, saved["args"]["train_T"]))
        for n, v, t in checks(rows, T_check):
            print(f"- {v}: {n}: {t}")
        return 0
    widths = [int(w) for w in args.widths.split(",")]
    meta = common.metadata(1)
    meta["peers"] = common.package_versions(["spikingjelly", "tonic"])
    rows = []
    for T in ([] if args.no_steps else args.T):
        for m in args.methods:
            spec = {"method": m, "T": T, "B": args.B, "widths": widths, "inner": args.inner,
                    "disk_dir": args.disk_dir}
            t0 = time.perf_counter()
            r = common.run_worker(SCRIPT, spec, args.timeout)
            r.setdefault("method", m)
            r.setdefault("T", T)
            r.setdefault("kind", "step")
            rows.append(r)
            if r["status"] == "ok":
                print(f"T={T:4d} {m:15s} {common.fmt_time(r['time_s']):>8s}  saved {common.fmt_bytes(r['saved_bytes']):>10s}"
                      f"  RSS +{common.fmt_bytes(r['peak_rss_increase']):>10s}  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            else:
                print(f"T={T:4d} {m:15s} FAILED: {r.get('reason')}", flush=True)
    acc = {}
    if not args.no_train:
        for m in args.methods:
            spec = {"kind": "train", "method": m, "T": args.train_T, "B": args.B, "widths": widths,
                    "n_train": args.train_n, "n_val": args.val_n, "epochs": args.train_epochs,
                    "disk_dir": args.disk_dir}
            r = common.run_worker(SCRIPT, spec, args.timeout)
            r.setdefault("method", m)
            r.setdefault("T", args.train_T)
            r["kind"] = "train"
            rows.append(r)
            if r["status"] == "ok":
                acc[m] = r["val_acc"]
                print(f"train T={args.train_T} {m:15s} val acc {r['val_acc']:.3f} ({r['train_seconds']:.0f} s)",
                      flush=True)
            else:
                print(f"train {m}: FAILED: {r.get('reason')}", flush=True)
    T_check = max(args.T)
    verdicts = [] if args.no_steps else checks(rows, T_check)
    table = markdown(rows, acc, args.train_T)
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, args.name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "args": vars(args), "rows": rows,
                   "checks": [{"T": T_check, "check": n, "result": v, "numbers": t} for n, v, t in verdicts]},
                  f, indent=1)
    keys = ["kind", "method", "T", "B", "strategy", "time_s", "saved_bytes", "offloaded_bytes", "peak_rss_increase",
            "val_acc", "train_seconds", "status", "reason"]
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if any(r.get("kind") == "step" and r["status"] == "ok" for r in rows):
        plot(rows, base + ".png")
    print()
    print(table)
    print()
    print(f"issue 14's checks at T={T_check}:")
    for n, v, t in verdicts:
        print(f"- {v}: {n}: {t}")
    print(f"\nwrote {base}.json, .csv" + (", .png" if os.path.exists(base + ".png") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
