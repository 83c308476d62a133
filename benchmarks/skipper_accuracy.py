"""Skipper's accuracy cost: train with full BPTT, Checkpoint(every) and Skipper(every, keep).

For each task, every strategy is trained with the library's trainer
(``sparsebptt.train.train(TrainConfig(...))``) for 3 seeds; we record the final validation
accuracy (mean, min, max, standard deviation over seeds), the peak stored bytes that `sb.trace`
counts for the scan of a full training batch, and the time per epoch (training plus validation,
median over epochs, then over seeds). Skipper runs at keep/every in {1/2, 1/4, 1/8}.

Tasks of the default preset (``--preset full``):

- ``digits-T100``: digits-spikes, T=100, 2-layer LIF (64 units), every=32, so keep = 16, 8, 4
  are integers (T=100 is 3 segments of 32 and a last one of 4 steps, which is always kept).
- ``digits-T500``: digits-spikes, T=500, 2-layer LIF (64 units), every=64 (keep = 32, 16, 8).
- ``recall-T2000``: delayed-recall, T=2000 (a 10-step cue, then 1990 steps of sparse noise;
  label = cue class, 4 classes), 1-layer GRU (32 units, chrono-initialised gates) read out from
  its last hidden state, every=64 (keep = 32, 16, 8), Skipper with carry="drop" and "through".

Usage (from the repository root)::

    .venv/bin/python benchmarks/skipper_accuracy.py                 # default preset, ~25 min on 2 cores
    .venv/bin/python benchmarks/skipper_accuracy.py --preset ci     # smoke run, about a minute
    .venv/bin/python benchmarks/skipper_accuracy.py --jobs 14       # runs in parallel processes
    .venv/bin/python benchmarks/skipper_accuracy.py --preset cue-in-tail   # the cue at steps 48..57

Writes ``benchmarks/results/skipper_accuracy.{csv,json,png}`` (``--out`` changes the stem). Run
folders (config.json, metrics.jsonl) go under ``--runs`` (default ``runs/skipper_accuracy``);
a run whose folder already holds a finished metrics.jsonl is read back, not retrained, so an
interrupted study resumes (``--fresh`` retrains). The study is gated on the Skipper and data
tests (``--no-gate`` skips them).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(SCRIPT))
RATIOS = (2, 4, 8)  # keep = every / ratio

# name -> task: the trainer config (without strategy/seed), Skipper's `every`, and whether
# carry="through" is run too
PRESETS = {
    "full": {
        "digits-T100": {"config": dict(dataset="digits-spikes", T=100, model="lif", hidden=64, layers=2,
                                       epochs=10, batch_size=64, lr=2e-3),
                        "every": 32, "through": False},
        "digits-T500": {"config": dict(dataset="digits-spikes", T=500, model="lif", hidden=64, layers=2,
                                       epochs=4, batch_size=64, lr=2e-3),
                        "every": 64, "through": False},
        "recall-T2000": {"config": dict(dataset="delayed-recall", T=2000, model="gru", hidden=32, layers=1,
                                        epochs=4, batch_size=32, lr=1e-2, gate_init="chrono"),
                         "every": 64, "through": True},
    },
    "ci": {
        "digits-T100": {"config": dict(dataset="digits-spikes", T=24, model="lif", hidden=16, layers=2,
                                       epochs=1, batch_size=128, lr=2e-3),
                        "every": 8, "through": False},
        "recall-T2000": {"config": dict(dataset="delayed-recall", T=200, model="gru", hidden=16, layers=1,
                                        epochs=1, batch_size=256, lr=1e-2, gate_init="chrono"),
                         "every": 16, "through": True},
    },
}
# not in the default study: the cue moved into the kept tail of the first segment (steps 48..57;
# every=64 keeps 32..63, 48..63 and 56..63), to tell apart the two things Skipper drops
PRESETS["cue-in-tail"] = {
    "recall-T2000-cue48": {"config": dict(PRESETS["full"]["recall-T2000"]["config"],
                                          dataset_options={"cue_start": 48}),
                           "every": 64, "through": True},
}
SEEDS = {"full": (0, 1, 2), "ci": (0,), "cue-in-tail": (0, 1, 2)}


def strategies(every: int, through: bool) -> list[tuple[str, str, str]]:
    """(label, strategy string, carry) of every strategy a task runs, full BPTT first."""
    out = [("full", "full", ""), (f"checkpoint:{every}", f"checkpoint:{every}", "")]
    for carry in ("drop", "through") if through else ("drop",):
        for r in RATIOS:
            s = f"skipper:{every},{every // r}"
            out.append((s + ("" if carry == "drop" else " through"), s, carry))
    return out


def make_strategy(text: str, carry: str):
    import sparsebptt as sb

    s = sb.parse_strategy(text)
    return dataclasses.replace(s, carry=carry) if carry else s


def run_one(spec: dict) -> dict:
    """Train one (task, strategy, seed); return its summary (read back if already finished)."""
    from sparsebptt.train import TrainConfig, train

    out = spec["run_dir"]
    metrics = os.path.join(out, "metrics.jsonl")
    done = os.path.join(out, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    if os.path.exists(out):
        shutil.rmtree(out)  # an unfinished run: start it again
    config = TrainConfig(**spec["config"], strategy=make_strategy(spec["strategy"], spec["carry"]),
                         seed=spec["seed"], threads=1)
    with open(os.devnull, "w") as log:
        summary = train(config, out, progress=False, log=log)
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    result = {k: spec[k] for k in ("task", "label", "strategy", "carry", "seed", "every", "keep")}
    result.update(val_acc=summary["val_acc"], best_val_acc=summary["best_val_acc"],
                  peak_stored_bytes=summary["peak_stored_bytes"],
                  epoch_seconds=statistics.median(r["seconds"] for r in rows),
                  epoch_seconds_all=[r["seconds"] for r in rows], wall_seconds=summary["seconds"],
                  val_acc_per_epoch=[r["val_acc"] for r in rows])
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def specs(preset: str, runs_dir: str, tasks: list[str] | None, seeds) -> list[dict]:
    out = []
    for task, t in PRESETS[preset].items():
        if tasks and task not in tasks:
            continue
        for label, s, carry in strategies(t["every"], t["through"]):
            for seed in seeds:
                keep = int(s.split(",")[1]) if s.startswith("skipper") else (
                    t["every"] if s.startswith("checkpoint") else None)
                out.append({"task": task, "label": label, "strategy": s, "carry": carry, "seed": seed,
                            "every": t["every"] if s != "full" else None, "keep": keep,
                            "config": t["config"],
                            "run_dir": os.path.join(runs_dir, preset, task,
                                                    label.replace(":", "-").replace(",", "-").replace(" ", "-"),
                                                    f"seed{seed}")})
    return out


def summarize(results: list[dict], preset: str) -> list[dict]:
    """One row per (task, strategy): accuracy statistics over seeds, memory and time vs full."""
    rows = []
    for task in PRESETS[preset]:
        mine = [r for r in results if r["task"] == task]
        if not mine:
            continue
        labels = list(dict.fromkeys(r["label"] for r in mine))
        full = [r for r in mine if r["label"] == "full"]
        full_bytes = max(r["peak_stored_bytes"] for r in full) if full else None
        full_time = statistics.median(r["epoch_seconds"] for r in full) if full else None
        full_acc = statistics.mean(r["val_acc"] for r in full) if full else None
        for label in labels:
            rs = [r for r in mine if r["label"] == label]
            accs = [r["val_acc"] for r in rs]
            stored = max(r["peak_stored_bytes"] for r in rs)
            sec = statistics.median(r["epoch_seconds"] for r in rs)
            r0 = rs[0]
            rows.append({
                "task": task, "T": PRESETS[preset][task]["config"]["T"],
                "dataset": PRESETS[preset][task]["config"]["dataset"],
                "model": PRESETS[preset][task]["config"]["model"], "strategy": label,
                "every": r0["every"], "keep": r0["keep"], "carry": r0["carry"] or None,
                "keep_fraction": (r0["keep"] / r0["every"]) if r0["every"] else 1.0,
                "seeds": len(rs), "val_acc_mean": statistics.mean(accs),
                "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "val_acc_min": min(accs), "val_acc_max": max(accs), "val_acc_per_seed": accs,
                "acc_delta_vs_full": (statistics.mean(accs) - full_acc) if full_acc is not None else None,
                "peak_stored_bytes": stored,
                "memory_saved": (1 - stored / full_bytes) if full_bytes else None,
                "memory_ratio_full_over": (full_bytes / stored) if full_bytes and stored else None,
                "epoch_seconds": sec,
                "time_ratio_vs_full": (sec / full_time) if full_time else None,
            })
    return rows


CSV_FIELDS = ["task", "dataset", "model", "T", "strategy", "every", "keep", "carry", "keep_fraction", "seeds",
              "val_acc_mean", "val_acc_std", "val_acc_min", "val_acc_max", "acc_delta_vs_full",
              "peak_stored_bytes", "memory_saved", "memory_ratio_full_over", "epoch_seconds",
              "time_ratio_vs_full"]


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    style = {"full": ("k", "o"), "checkpoint": ("tab:blue", "s"), "drop": ("tab:red", "v"),
             "through": ("tab:green", "^")}
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == task]
        for kind in ("full", "checkpoint", "drop", "through"):
            pts = [r for r in rs if (r["strategy"] == "full" if kind == "full" else
                                     r["strategy"].startswith("checkpoint") if kind == "checkpoint" else
                                     r["carry"] == kind)]
            if not pts:
                continue
            c, m = style[kind]
            x = [r["memory_ratio_full_over"] for r in pts]
            y = [100 * r["val_acc_mean"] for r in pts]
            err = [[100 * (r["val_acc_mean"] - r["val_acc_min"]) for r in pts],
                   [100 * (r["val_acc_max"] - r["val_acc_mean"]) for r in pts]]
            name = {"full": "full BPTT", "checkpoint": "Checkpoint(every)",
                    "drop": "Skipper carry=drop", "through": "Skipper carry=through"}[kind]
            ax.errorbar(x, y, yerr=err, color=c, marker=m, ls="-" if kind in ("drop", "through") else "",
                        capsize=3, label=name)
            for r, xi, yi in zip(pts, x, y):
                if r["carry"]:
                    ax.annotate(f"{r['keep']}/{r['every']}", (xi, yi), textcoords="offset points",
                                xytext=(-8, 7 if kind == "drop" else -13), fontsize=7, color=c)
        r0 = rs[0]
        chance = {"delayed-recall": 25.0, "digits-spikes": 10.0}.get(r0["dataset"])
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_title(f"{task}: {r0['dataset']}, T={r0['T']}, {r0['model']}", fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("memory saved: stored bytes of full BPTT / strategy (log)")
        ax.set_ylabel("final val. accuracy (%): mean, min-max of seeds")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | strategy | val acc % (mean ± std, [min, max]) | Δ vs full | peak stored | saved | time/epoch | vs full |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["acc_delta_vs_full"]
        lines.append(
            f"| {r['task']} | {r['strategy']} | {100 * r['val_acc_mean']:.1f} ± {100 * r['val_acc_std']:.1f} "
            f"[{100 * r['val_acc_min']:.1f}, {100 * r['val_acc_max']:.1f}] | "
            f"{'' if d is None else f'{100 * d:+.1f}'} | {r['peak_stored_bytes'] / 2 ** 20:.2f} MiB | "
            f"{100 * r['memory_saved']:.0f}% ({r['memory_ratio_full_over']:.1f}x) | "
            f"{r['epoch_seconds']:.1f} s | {r['time_ratio_vs_full']:.2f}x |")
    return "\n".join(lines)


def metadata(args) -> dict:
    return {**common.metadata(1), "preset": args.preset, "jobs": args.jobs, "torch_threads_per_run": 1}


def gate() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", os.path.join(REPO, "tests", "test_skipper.py"),
           os.path.join(REPO, "tests", "test_synthetic.py")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.exit("gate failed: the Skipper / synthetic-data tests do not pass:\n" + p.stdout[-3000:])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full",
                    help="full: the study (default); ci: a smoke run of about a minute; cue-in-tail: "
                         "delayed recall with the cue inside a kept tail (a diagnostic)")
    ap.add_argument("--tasks", nargs="+", help="run only these tasks of the preset")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2, ci: 0)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    ap.add_argument("--runs", default=os.path.join(REPO, "runs", "skipper_accuracy"),
                    help="folder of the run folders (default runs/skipper_accuracy)")
    ap.add_argument("--out", default=None,
                    help="output stem (default benchmarks/results/skipper_accuracy, ci: ..._ci)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    ap.add_argument("--no-gate", action="store_true", help="skip the test gate")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot and CSV of a results JSON")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            rows = json.load(f)["summary"]
        stem = args.replot[:-len(".json")] if args.replot.endswith(".json") else args.replot
        write_csv(stem + ".csv", rows)
        plot(stem + ".png", rows)
        print(markdown_table(rows))
        return 0
    if args.tasks:
        bad = [t for t in args.tasks if t not in PRESETS[args.preset]]
        if bad:
            sys.exit(f"unknown task(s) {bad} for preset {args.preset!r}; valid: {', '.join(PRESETS[args.preset])}")
    stem = args.out or os.path.join(REPO, "benchmarks", "results",
                                    "skipper_accuracy" + ("" if args.preset == "full" else f"_{args.preset}"))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    if not args.no_gate:
        gate()
    meta = metadata(args)
    todo = specs(args.preset, args.runs, args.tasks, args.seeds or SEEDS[args.preset])
    if args.fresh:
        for s in todo:
            shutil.rmtree(s["run_dir"], ignore_errors=True)
    # longest first, so parallel jobs finish together
    cost = {"full": 3.0, "checkpoint": 3.2}
    todo.sort(key=lambda s: -s["config"]["T"] * s["config"]["epochs"]
              * cost.get(s["strategy"].split(":")[0], 1.0 + 2.0 * (s["keep"] or 0) / (s["every"] or 1)))
    t0 = time.perf_counter()
    results = []
    print(f"{len(todo)} runs, {args.jobs} at a time", flush=True)
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_one, s): s for s in todo}
            for fut in cf.as_completed(futures):
                r = fut.result()
                results.append(r)
                print(f"[{time.perf_counter() - t0:6.0f}s] {r['task']:<13} {r['label']:<24} seed {r['seed']}: "
                      f"val_acc {r['val_acc']:.3f}  {r['epoch_seconds']:.1f} s/epoch", flush=True)
    else:
        import torch

        torch.set_num_threads(1)
        for s in todo:
            r = run_one(s)
            results.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {r['task']:<13} {r['label']:<24} seed {r['seed']}: "
                  f"val_acc {r['val_acc']:.3f}  {r['epoch_seconds']:.1f} s/epoch", flush=True)
    meta["wall_seconds"] = time.perf_counter() - t0
    order = {(s["task"], s["label"], s["seed"]): i for i, s in enumerate(specs(args.preset, args.runs, args.tasks,
                                                                              args.seeds or SEEDS[args.preset]))}
    results.sort(key=lambda r: order[(r["task"], r["label"], r["seed"])])
    rows = summarize(results, args.preset)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "tasks": PRESETS[args.preset], "summary": rows, "runs": results}, f, indent=1)
    write_csv(stem + ".csv", rows)
    plot(stem + ".png", rows)
    print(markdown_table(rows))
    print(f"wrote {stem}.json, .csv, .png in {meta['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
