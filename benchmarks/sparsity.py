"""Delta RNN sparsity (issue 6): MACs and wall time of the forward and the backward vs threshold.

For DeltaGRU and DeltaLSTM over a slowly varying input (every channel holds a level for ~10
steps, then jumps; small noise on top), at thresholds from 0 (dense: every delta transmitted) up
to ~95 % silent deltas, it measures per case:

- activity (fraction of transmitted deltas, inputs and hidden), forward and backward MACs, all
  from `sb.trace`;
- median (p20, p80) wall time of the forward (with graph) and of the backward, all thresholds of
  a (cell, B, H) group timed round-robin in the same process so load drift hits them alike;
- the dense `sb.cells.GRU` / `LSTM` of the same size, timed in the same round-robin.

``--active-set`` also times the three ways a batch can share the active set (union, sample,
auto). Ratios (time at a threshold / time at threshold 0) are the result to quote: the machine
is shared, absolute times are not comparable across runs.

    python benchmarks/sparsity.py --preset full            # CSV + PNG + JSON in benchmarks/results/
    python benchmarks/sparsity.py --preset ci              # small shapes, a few seconds
    python benchmarks/sparsity.py --preset batch --stepped # issue 17: B = 8, 16; C segment scan vs step path
    python benchmarks/sparsity.py --accuracy --seeds 0 1 2 # accuracy vs threshold on digits-seq
    python benchmarks/sparsity.py --accuracy --acc-cell lstm --seeds 0 1 2   # LSTM vs DeltaLSTM
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import sparsebptt as sb
from common import metadata, ms_columns, time_scan_step, write_rows_csv

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    # cells, batch sizes, hidden sizes, input size, T, repetitions, thresholds
    "ci": dict(cells=["gru", "lstm"], B=[1, 4], H=[32], I=16, T=20, reps=3,
               thresholds=[0.0, 0.05, 0.2]),
    "full": dict(cells=["gru", "lstm"], B=[1, 16], H=[256, 1024], I=64, T=50, reps=5,
                 thresholds=[0.0, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3]),
    # issue 17's done-when: training batch sizes, 80-90 % zero deltas around thresholds 0.03-0.1
    "batch": dict(cells=["gru", "lstm"], B=[8, 16], H=[256, 1024], I=64, T=100, reps=5,
                  thresholds=[0.0, 0.03, 0.05, 0.1, 0.15]),
}


def stepwise(Delta):
    """``Delta`` without its C segment scan: the issue-6 path (each step's memory updates through
    `sparse_linear`), for the before/after comparison (``--stepped``)."""
    return type(f"Stepped{Delta.__name__}", (Delta,), {"segment_kernels": ("triton",)})

CELLS = {"gru": (sb.cells.DeltaGRU, sb.cells.GRU), "lstm": (sb.cells.DeltaLSTM, sb.cells.LSTM)}


def slow_input(T: int, B: int, I: int, seed: int = 0, hold: float = 10.0, noise: float = 0.01):
    """(T, B, I): per channel a level held ~``hold`` steps, then a jump to a new N(0, 1) level."""
    g = torch.Generator().manual_seed(seed)
    jump = torch.rand(T, B, I, generator=g) < 1.0 / hold
    jump[0] = True
    levels = torch.randn(T, B, I, generator=g)
    idx = torch.where(jump, torch.arange(T).view(T, 1, 1), torch.zeros((), dtype=torch.long))
    idx = torch.cummax(idx, 0).values  # step of the last jump
    x = torch.gather(levels, 0, idx)
    return x + noise * torch.randn(T, B, I, generator=g)


def bench_group(kind, B, H, I, T, reps, thresholds, active_sets, stepped=False):
    """All thresholds (and the dense cell: backend "auto", the fused C GRU/LSTM on a CPU) of one
    (cell, B, H), timed round-robin. ``stepped``: also the Delta cell without its segment scan
    (rows with active_set "stepped", the issue-6 path)."""
    Delta, Dense = CELLS[kind]
    torch.manual_seed(0)
    dense = Dense(I, H, backend="auto")
    cases = [("dense", None, dense)]
    for aset in active_sets:
        for th in thresholds:
            c = Delta(I, H, threshold=th, active_set=aset)
            c.load_state_dict(dense.state_dict())
            cases.append((aset, th, c))
    if stepped:
        for th in thresholds:
            c = stepwise(Delta)(I, H, threshold=th)
            c.load_state_dict(dense.state_dict())
            cases.append(("stepped", th, c))
    x = slow_input(T, B, I)
    rows = {}
    for name, th, cell in cases:  # counters (traced run), then one warm-up
        with sb.trace() as t:
            y, _ = sb.scan(cell, x)
            y.sum().backward()
        act = t.activity
        rows[(name, th)] = dict(cell=kind, B=B, H=H, I=I, T=T, active_set=name, threshold=th,
                                activity=(next(iter(act.values())) if act else 1.0),
                                forward_macs=t.forward_macs, backward_macs=t.backward_macs,
                                fwd=[], bwd=[])
        time_scan_step(cell, x)
    for _ in range(reps):
        for name, th, cell in cases:
            f, b = time_scan_step(cell, x)
            rows[(name, th)]["fwd"].append(f)
            rows[(name, th)]["bwd"].append(b)
    out = []
    base = {aset: rows[(aset, thresholds[0])] for aset in active_sets + (["stepped"] if stepped else [])}
    d = rows[("dense", None)]
    for (name, th), r in rows.items():
        fwd, bwd = r.pop("fwd"), r.pop("bwd")
        r.update(**ms_columns("fwd", fwd), **ms_columns("bwd", bwd))
        out.append(r)
    for r in out:
        b0 = base.get(r["active_set"])
        if b0 is None:  # the dense cell: relative to the delta cell at threshold 0 (first set)
            b0 = base[active_sets[0]]
        r["bwd_macs_vs_th0"] = r["backward_macs"] / max(1, b0["backward_macs"])
        r["bwd_time_vs_th0"] = r["bwd_ms"] / b0["bwd_ms"]
        r["fwd_time_vs_th0"] = r["fwd_ms"] / b0["fwd_ms"]
        r["bwd_time_vs_dense"] = r["bwd_ms"] / d["bwd_ms"]
        r["fwd_time_vs_dense"] = r["fwd_ms"] / d["fwd_ms"]
    return out


def run_timing(args):
    p = PRESETS[args.preset]
    active_sets = ["auto", "union", "sample"] if args.active_set else ["auto"]
    rows = []
    for kind in p["cells"]:
        for B in p["B"]:
            for H in p["H"]:
                sets = active_sets if B > 1 else ["auto"]
                t0 = time.perf_counter()
                group = bench_group(kind, B, H, p["I"], p["T"], p["reps"], p["thresholds"], sets, args.stepped)
                rows += group
                print(f"{kind} B={B} H={H}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
                for r in group:
                    print(f"  {r['active_set']:>6} th={r['threshold']!s:>5} act={r['activity']:.3f} "
                          f"bwd_macs x{r['bwd_macs_vs_th0']:.3f} bwd_time x{r['bwd_time_vs_th0']:.3f} "
                          f"fwd_time x{r['fwd_time_vs_th0']:.3f} bwd vs dense x{r['bwd_time_vs_dense']:.3f} "
                          f"fwd vs dense x{r['fwd_time_vs_dense']:.3f}", file=sys.stderr, flush=True)
    return rows


def plot_timing(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["cell"], r["B"], r["H"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, what in zip(axes, ("bwd", "fwd")):
        for kind, B, H in groups:
            g = [r for r in rows if (r["cell"], r["B"], r["H"]) == (kind, B, H) and r["active_set"] == "auto"]
            g.sort(key=lambda r: -r["activity"])
            ax.plot([1 - r["activity"] for r in g], [r[f"{what}_time_vs_th0"] for r in g], "o-",
                    label=f"Delta{kind.upper()} B={B} H={H}")
        ref = sorted({1 - r["activity"] for r in rows if r["active_set"] == "auto"})
        ax.plot(ref, [max(1 - s, 1e-3) for s in ref], "k--", lw=1, label="MACs (ideal)")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction of silent deltas)")
        ax.set_title({"bwd": "backward", "fwd": "forward"}[what] + " wall time / time at threshold 0")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ratio (log)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- accuracy vs threshold on digits-seq ----------------------------------------------------

def run_accuracy(args):
    from sparsebptt.train import TrainConfig, train

    rows = []
    dense = args.acc_cell  # "gru" or "lstm": the dense cell, then its Delta cell at each threshold
    for model, th in [(dense, None)] + [(f"delta-{dense}", t) for t in args.acc_thresholds]:
        for seed in args.seeds:
            config = TrainConfig(dataset="digits-seq", model=model, threshold=th, T=args.acc_T,
                                 epochs=args.acc_epochs, hidden=args.acc_hidden, layers=1,
                                 batch_size=64, lr=5e-3, seed=seed)
            out = RESULTS / "runs" / f"sparsity-acc-{model}-th{th}-s{seed}"
            if out.exists():
                import shutil
                shutil.rmtree(out)
            s = train(config, out, progress=False, log=sys.stderr)
            rows.append(dict(model=model, threshold=th, seed=seed, val_acc=s["val_acc"],
                             best_val_acc=s["best_val_acc"], activity=s.get("activity", {}),
                             seconds=s["seconds"]))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    ap.add_argument("--active-set", action="store_true", help="also time union / sample / auto (B > 1)")
    ap.add_argument("--stepped", action="store_true",
                    help="also time the Delta cells without their C segment scan (the issue-6 step path)")
    ap.add_argument("--accuracy", action="store_true", help="accuracy vs threshold on digits-seq instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--acc-thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    ap.add_argument("--acc-cell", choices=["gru", "lstm"], default="gru",
                    help="--accuracy: GRU vs DeltaGRU (default) or LSTM vs DeltaLSTM")
    ap.add_argument("--acc-T", type=int, default=32)
    ap.add_argument("--acc-epochs", type=int, default=15)
    ap.add_argument("--acc-hidden", type=int, default=64)
    ap.add_argument("--tag", default=None, help="file name suffix (default: the preset)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {**metadata(torch.get_num_threads()),
            "command": "python benchmarks/sparsity.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.accuracy:
        rows = run_accuracy(args)
        stem = RESULTS / f"sparsity_accuracy{'_' + args.tag if args.tag else ''}"
        stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        return 0
    tag = args.tag or args.preset
    rows = run_timing(args)
    stem = RESULTS / f"sparsity_{tag}"
    write_rows_csv(rows, stem.with_suffix(".csv"))
    plot_timing(rows, stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps({**meta, "preset": PRESETS[args.preset]}, indent=1) + "\n")
    print(f"wrote {stem}.csv/.png/.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
