"""EGRU (issue 7): backward MACs and wall time vs activity, side by side with the dense GRU.

For `sb.cells.EGRU` and the dense `sb.cells.GRU` of the same size and weights (EGRU shares the
GRU's parameter names; the threshold sets the activity), per case:

- activity (fraction of units with an event per step), backward activity (events plus silent
  units within ``epsilon`` of the threshold: where ``dL/dy`` is computed) and union activity
  (units with an event in any sample of the batch: the columns the weight gradient reads);
- forward and backward MACs from `sb.trace`;
- median (p20, p80) wall time of the forward (with graph) and of the backward, every case of a
  (B, H) group timed round-robin in one process, so load drift hits them alike.

Ratios EGRU / dense GRU measured side by side are the result; the machine is shared and absolute
times are not comparable across runs. One intra-op thread.

    python benchmarks/egru.py --preset full       # grid B in {1, 16}, H in {512, 1024}: CSV + PNG + JSON
    python benchmarks/egru.py --check             # T=500, B=8, H=512: the issue-7 check, PASS/FAIL
    python benchmarks/egru.py --check --from-run runs/lm512   # the same with a trained EGRU and its text
    python benchmarks/egru.py --check --from-run runs/lm512 --batch 32   # ... at another batch size
    python benchmarks/egru.py --stack --from-run runs/lm512x2   # every layer of a trained stack vs GRUs
    python benchmarks/egru.py --accuracy          # language model: bits/char vs activity (regulariser sweep)
    python benchmarks/egru.py --preset ci         # small shapes, seconds

The weights are PyTorch's GRU initialisation times ``--gain``; inputs are N(0, 1) (I = 64).
``--from-run DIR`` takes the first EGRU layer of a `sparsebptt train --model egru` run (its
``checkpoint.pt``) and windows of that run's validation text as input (one-hot characters
through the trained input weights), so the activity is what training produced; its thresholds
are shifted by ``--threshold-shifts`` to sweep the activity around it.
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
from sparsebptt.cells.egru import event_statistics

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    # batch sizes, hidden sizes, input size, T, repetitions, thresholds, epsilons
    "ci": dict(B=[1, 4], H=[64], I=16, T=30, reps=3, thresholds=[0.0, 0.1, 0.3], epsilons=[0.5]),
    "full": dict(B=[1, 16], H=[512, 1024], I=64, T=100, reps=5,
                 thresholds=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5], epsilons=[0.5, 0.2]),
}
CHECK = dict(B=8, H=512, I=64, T=500, reps=5, thresholds=[0.1, 0.15, 0.2, 0.3], epsilons=[0.5, 0.2])


def make_cells(I, H, gain, thresholds, epsilons, seed=0, state=None, shifts=None):
    """The dense GRU and EGRUs with its weights (times ``gain``) at each (threshold, epsilon);
    with ``state`` (a trained EGRU's state_dict) its weights, thresholds shifted by ``shifts``."""
    torch.manual_seed(seed)
    dense = sb.cells.GRU(I, H, backend="auto")  # the fastest dense GRU we have (the fused C GRU on a CPU)
    with torch.no_grad():
        if state is not None:
            dense.load_state_dict({k: v for k, v in state.items() if k != "threshold"})
        else:
            for p in dense.parameters():
                p.mul_(gain)
    cases = [("gru", None, None, dense)]
    for eps in epsilons:
        if state is not None:
            for s in shifts:
                c = sb.cells.EGRU(I, H, threshold_init=state["threshold"] + s, epsilon=eps)
                c.load_state_dict({**state, "threshold": state["threshold"] + s})
                cases.append(("egru", f"trained{s:+g}", eps, c))
        else:
            for th in thresholds:
                c = sb.cells.EGRU(I, H, threshold_init=th, epsilon=eps)
                c.load_state_dict(dense.state_dict(), strict=False)
                cases.append(("egru", th, eps, c))
    return cases


def bench_group(cases, x, reps):
    """Counters for every case, then round-robin timing; ratios to the dense GRU."""
    T, B, I = x.shape
    H = cases[0][3].hidden_size
    rows = []
    for kind, th, eps, cell in cases:
        with sb.trace() as t:
            y, _ = sb.scan(cell, x)
            y.sum().backward()
        st = event_statistics(cell, x)["EGRU"] if kind == "egru" else \
            {"activity": 1.0, "backward_activity": 1.0, "union_activity": 1.0}
        rows.append(dict(cell=kind, B=B, H=H, I=I, T=T, threshold=th, epsilon=eps, **st,
                         forward_macs=t.forward_macs, backward_macs=t.backward_macs, fwd=[], bwd=[]))
        time_scan_step(cell, x)  # warm-up
    for _ in range(reps):
        for r, (_, _, _, cell) in zip(rows, cases):
            f, b = time_scan_step(cell, x)
            r["fwd"].append(f)
            r["bwd"].append(b)
    for r in rows:
        fwd, bwd = r.pop("fwd"), r.pop("bwd")
        r.update(**ms_columns("fwd", fwd), **ms_columns("bwd", bwd))
    d = rows[0]
    for r in rows:
        r["fwd_macs_vs_gru"] = r["forward_macs"] / d["forward_macs"]
        r["bwd_macs_vs_gru"] = r["backward_macs"] / d["backward_macs"]
        r["fwd_time_vs_gru"] = r["fwd_ms"] / d["fwd_ms"]
        r["bwd_time_vs_gru"] = r["bwd_ms"] / d["bwd_ms"]
    return rows


def _print(rows):
    for r in rows:
        print(f"  {r['cell']:>4} th={r['threshold']!s:>10} eps={r['epsilon']!s:>4} act={r['activity']:.3f} "
              f"bwd_act={r['backward_activity']:.3f} union={r['union_activity']:.3f} "
              f"bwd_macs x{r['bwd_macs_vs_gru']:.3f} bwd_time x{r['bwd_time_vs_gru']:.3f} "
              f"(p20-p80 {r['bwd_p20_ms']:.0f}-{r['bwd_p80_ms']:.0f} ms) fwd_time x{r['fwd_time_vs_gru']:.3f}",
              file=sys.stderr, flush=True)


def run_grid(args):
    p = PRESETS[args.preset]
    rows = []
    for B in p["B"]:
        for H in p["H"]:
            t0 = time.perf_counter()
            x = torch.randn(p["T"], B, p["I"], generator=torch.Generator().manual_seed(1))
            group = bench_group(make_cells(p["I"], H, args.gain, p["thresholds"], p["epsilons"]), x, p["reps"])
            rows += group
            print(f"B={B} H={H}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            _print(group)
    return rows


def _run_input(run: Path, T: int, B: int, layer: int = 0):
    """The trained EGRU layer's state and one-hot windows of the run's validation text."""
    from sparsebptt.data import get_dataset
    from sparsebptt.train.runs import load_checkpoint

    config = json.loads((run / "config.json").read_text())
    if config.get("model") != "egru":
        raise SystemExit(f"--from-run: {run} trained model {config.get('model')!r}, not egru")
    ckpt = load_checkpoint(run / "checkpoint.pt")
    model = ckpt["model"]  # runs written before sb.Recurrent name the stack cell.*, later ones recurrent.cell.*
    prefix = ("recurrent.cell.layers." if any(k.startswith("recurrent.") for k in model) else "cell.layers.") \
        + f"{layer}."
    state = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    if not state:
        raise SystemExit(f"--from-run: {run} has no EGRU layer {layer}")
    ds = get_dataset(config["dataset"], T, **(config.get("dataset_options") or {}))
    x, _ = next(ds.batches("val", B, seed=0))
    return state, x


def run_check(args):
    c = dict(CHECK)
    if args.batch is not None:
        c["B"] = args.batch
    if args.epsilons is not None:
        c["epsilons"] = args.epsilons
    if args.thresholds is not None:
        c["thresholds"] = args.thresholds
    if args.from_run:
        state, x = _run_input(Path(args.from_run), c["T"], c["B"])
        cases = make_cells(x.shape[2], state["weight_hh"].shape[1], 1.0, None, c["epsilons"], state=state,
                           shifts=args.threshold_shifts)
        if state["weight_hh"].shape[1] != c["H"]:
            print(f"note: the run's EGRU has H={state['weight_hh'].shape[1]}, not {c['H']}", file=sys.stderr)
    else:
        x = torch.randn(c["T"], c["B"], c["I"], generator=torch.Generator().manual_seed(1))
        cases = make_cells(c["I"], c["H"], args.gain, c["thresholds"], c["epsilons"])
    rows = bench_group(cases, x, c["reps"])
    _print(rows)
    for r in rows[1:]:
        ok_macs, ok_time = r["bwd_macs_vs_gru"] < 0.5, r["bwd_time_vs_gru"] < 1.0
        r["check"] = ("PASS" if ok_macs and ok_time else "FAIL") if r["activity"] <= 0.2 else "n/a (activity > 20%)"
        print(f"  EGRU th={r['threshold']} eps={r['epsilon']} activity {r['activity']:.3f}: backward MACs "
              f"{r['bwd_macs_vs_gru']:.3f}x GRU ({'<' if ok_macs else '>='} 0.5), backward time "
              f"{r['bwd_time_vs_gru']:.3f}x GRU ({'<' if ok_time else '>='} 1): {r['check']}", file=sys.stderr)
        # issue 17: at 10-25 % activity, backward MACs and time <= 0.5x the fused GRU, forward no slower
        ok17 = r["bwd_macs_vs_gru"] <= 0.5 and r["bwd_time_vs_gru"] <= 0.5 and r["fwd_time_vs_gru"] <= 1.0
        r["check17"] = ("PASS" if ok17 else "FAIL") if 0.10 <= r["activity"] <= 0.25 else "n/a (activity outside 10-25%)"
        print(f"    issue 17: backward MACs {r['bwd_macs_vs_gru']:.3f}x, backward time {r['bwd_time_vs_gru']:.3f}x, "
              f"forward time {r['fwd_time_vs_gru']:.3f}x the fused GRU: {r['check17']}", file=sys.stderr)
    return rows


def run_stack(args):
    """Every EGRU layer of a trained run as one `Stack` (the upper layers read the lower ones'
    events: their input projections run sparse) against a Stack of fused GRUs with the same
    weights, at each epsilon; the run's validation text, T = 500, B = 8 (or --batch)."""
    B = args.batch or CHECK["B"]
    states, layer = [], 0
    while True:
        try:
            state, x = _run_input(Path(args.from_run), CHECK["T"], B, layer)
        except SystemExit:
            break
        states.append(state)
        layer += 1
    if not states:
        raise SystemExit(f"--stack: no EGRU layer in {args.from_run}")

    def stack(make):
        cells = []
        for st in states:
            H, n_in = st["weight_hh"].shape[1], st["weight_ih"].shape[1]
            c = make(n_in, H, st)
            c.load_state_dict(st if isinstance(c, sb.cells.EGRU) else {k: v for k, v in st.items() if k != "threshold"})
            cells.append(c)
        return sb.cells.Stack(cells)

    cases = [("gru", None, stack(lambda i, h, st: sb.cells.GRU(i, h, backend="auto")))]
    for eps in args.epsilons or CHECK["epsilons"]:
        cases.append(("egru", eps, stack(lambda i, h, st: sb.cells.EGRU(i, h, threshold_init=st["threshold"],
                                                                        epsilon=eps))))
    rows = []
    for kind, eps, cell in cases:
        with sb.trace() as t:
            y, _ = sb.scan(cell, x)
            y.sum().backward()
        rows.append(dict(cell=f"{kind} x{len(states)}", epsilon=eps, B=B, T=x.shape[0],
                         activity={k: round(v, 4) for k, v in t.activity.items()},
                         forward_macs=t.forward_macs, backward_macs=t.backward_macs, fwd=[], bwd=[]))
        time_scan_step(cell, x)  # warm-up
    for _ in range(CHECK["reps"]):
        for r, (_, _, cell) in zip(rows, cases):
            f, b = time_scan_step(cell, x)
            r["fwd"].append(f)
            r["bwd"].append(b)
    for r in rows:
        r.update(**ms_columns("fwd", r.pop("fwd")), **ms_columns("bwd", r.pop("bwd")))
    d = rows[0]
    for r in rows:
        for k in ("fwd", "bwd"):
            r[f"{k}_time_vs_gru"] = r[f"{k}_ms"] / d[f"{k}_ms"]
            r[f"{k}_macs_vs_gru"] = r[f"{'forward' if k == 'fwd' else 'backward'}_macs"] / \
                d[f"{'forward' if k == 'fwd' else 'backward'}_macs"]
        print(f"  {r['cell']:>7} eps={r['epsilon']!s:>4} activity {r['activity']}: backward MACs "
              f"x{r['bwd_macs_vs_gru']:.3f} time x{r['bwd_time_vs_gru']:.3f} ({r['bwd_ms']:.0f} ms), forward MACs "
              f"x{r['fwd_macs_vs_gru']:.3f} time x{r['fwd_time_vs_gru']:.3f}", file=sys.stderr, flush=True)
    return rows


def run_accuracy(args):
    """The language model (EGRU, text) at several activity-regulariser strengths, and the GRU."""
    from sparsebptt.train import TrainConfig, train

    rows = []
    runs = [("gru", 0.0)] + [("egru", s) for s in args.acc_reg]
    for model, reg in runs:
        config = TrainConfig(dataset="text", model=model, T=args.acc_T, epochs=args.acc_epochs,
                             hidden=args.acc_hidden, layers=1, batch_size=32, lr=3e-3, seed=0,
                             activity_reg=reg, activity_target=args.acc_target if reg > 0 else 0.05)
        out = RESULTS / "runs" / f"egru-lm-{model}-reg{reg:g}"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        s = train(config, out, progress=False, log=sys.stderr)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        act = metrics[-1]["activity"]
        rows.append(dict(model=model, activity_reg=reg, activity_target=config.activity_target,
                         val_bpc=s["val_bpc"], unigram_bits=s["unigram_bits"],
                         activity=(next(iter(act.values())) if act else 1.0),
                         backward_macs=metrics[-1]["backward_macs"], seconds=s["seconds"]))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["B"], r["H"], r["epsilon"]) for r in rows if r["cell"] == "egru"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, what in zip(axes, ("bwd_time_vs_gru", "bwd_macs_vs_gru")):
        for B, H, eps in groups:
            g = sorted((r for r in rows if r["cell"] == "egru" and (r["B"], r["H"], r["epsilon"]) == (B, H, eps)),
                       key=lambda r: r["activity"])
            ax.plot([r["activity"] for r in g], [r[what] for r in g], "o-" if eps == 0.5 else "s--",
                    label=f"B={B} H={H} eps={eps}")
        ax.axhline(1.0, color="k", lw=1)
        ax.axhline(0.5, color="gray", lw=1, ls=":")
        ax.axvline(0.2, color="gray", lw=1, ls=":")
        ax.set_xlabel("activity (events per unit and step)")
        ax.set_title({"bwd_time_vs_gru": "backward wall time / dense GRU",
                      "bwd_macs_vs_gru": "backward MACs / dense GRU"}[what])
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("ratio (side by side)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    ap.add_argument("--check", action="store_true", help="the issue-7 check at T=500, B=8, H=512")
    ap.add_argument("--from-run", default=None, metavar="DIR", help="--check with a trained EGRU run")
    ap.add_argument("--batch", type=int, default=None, help="--check at this batch size (default 8)")
    ap.add_argument("--threshold-shifts", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    ap.add_argument("--gain", type=float, default=1.0, help="scale of the initial weights (default 1)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=None,
                    help="--check at these pseudo-derivative widths (default 0.5 0.2)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=None,
                    help="--check (untrained) at these thresholds (default 0.1 0.15 0.2 0.3)")
    ap.add_argument("--stack", action="store_true",
                    help="with --from-run: every layer of the trained run as a Stack vs a Stack of GRUs")
    ap.add_argument("--accuracy", action="store_true", help="language model bits/char vs activity")
    ap.add_argument("--acc-reg", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    ap.add_argument("--acc-target", type=float, default=0.05)
    ap.add_argument("--acc-T", type=int, default=64)
    ap.add_argument("--acc-epochs", type=int, default=3)
    ap.add_argument("--acc-hidden", type=int, default=256)
    ap.add_argument("--tag", default=None, help="file name suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {**metadata(torch.get_num_threads()),
            "command": "python benchmarks/egru.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.accuracy:
        rows = run_accuracy(args)
        stem = RESULTS / f"egru_accuracy{'_' + args.tag if args.tag else ''}"
        write_rows_csv(rows, stem.with_suffix(".csv"))
    elif args.stack:
        if not args.from_run:
            ap.error("--stack needs --from-run DIR (a trained EGRU run)")
        rows = run_stack(args)
        stem = RESULTS / f"egru_stack{'_' + args.tag if args.tag else ''}"
        write_rows_csv(rows, stem.with_suffix(".csv"))
    elif args.check:
        rows = run_check(args)
        stem = RESULTS / f"egru_check{'_' + args.tag if args.tag else ''}"
        write_rows_csv(rows, stem.with_suffix(".csv"))
        plot(rows, stem.with_suffix(".png"), meta["command"])
    else:
        rows = run_grid(args)
        stem = RESULTS / f"egru_{args.tag or args.preset}"
        write_rows_csv(rows, stem.with_suffix(".csv"))
        plot(rows, stem.with_suffix(".png"), meta["command"])
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {stem}.csv/.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
