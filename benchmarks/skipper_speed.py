"""Skipper vs full BPTT vs checkpointing, side by side in one process (issue 5's speed check).

A 2-layer LIF `Stack` (input 64 -> 128 -> 128), T=4000, B=16, Bernoulli(0.1) input spikes,
``reduce="sum"`` and the loss ``(rates * w).sum()`` for a fixed random ``w``. For each strategy
(FullBPTT, Checkpoint(64), Skipper(64, 16)) we count the peak stored bytes with `sb.trace`
(one traced forward+backward) and time forward+backward without a trace: one warm-up round,
then ``--repeats`` rounds in which every strategy runs once, in an order rotated each round, so
that the machine's noise is shared (interleaved). We report the median, p20 and p80 per strategy,
and per round the time ratios to the other strategies in the same round (median of the ratios).

Optionally (``--rss``) the peak resident memory of one forward+backward in a fresh process per
strategy: VmHWM (reset with /proc/self/clear_refs once the model and input exist) minus the
resident set at that moment, after a warm-up on 8 steps only (lazy initialisation, but no freed
heap of the size being measured to reuse).

Issue 5 asks: Skipper(64, 16) stores >= 3.3x less than FullBPTT, runs faster than Checkpoint(64)
and no slower than FullBPTT. The script prints PASS/FAIL for each and writes
``benchmarks/results/skipper_speed.{json,csv}``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/skipper_speed.py                 # T=4000, 5 repeats, ~1-2 min
    .venv/bin/python benchmarks/skipper_speed.py --preset ci     # T=400, a few seconds
    .venv/bin/python benchmarks/skipper_speed.py --rss           # also peak RSS per strategy
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(SCRIPT))
PRESETS = {"full": dict(T=4000, repeats=5), "ci": dict(T=400, repeats=3)}
STRATEGIES = ("full", "checkpoint:64", "skipper:64,16")


def build(args):
    import torch

    import sparsebptt as sb

    torch.manual_seed(args.seed)
    net = sb.cells.Stack([sb.cells.LIF(args.input, args.hidden), sb.cells.LIF(args.hidden, args.hidden)])
    g = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(args.T, args.batch, args.input, generator=g) < args.p).float()  # [T, B, I]
    w = torch.randn(args.batch, args.hidden, generator=g)  # [B, H]
    return net, x, w


def step(net, x, w, strategy):
    import sparsebptt as sb

    net.zero_grad(set_to_none=True)
    rates, _ = sb.scan(net, x, strategy=strategy, reduce="sum")  # [B, H]
    loss = (rates / x.shape[0] * w).sum()
    loss.backward()
    return loss


def rss_worker(spec: dict) -> dict:
    """In a fresh process: peak RSS of one forward+backward of ``spec['strategy']``."""
    import torch

    import sparsebptt as sb

    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec)
    net, x, w = build(args)
    strategy = sb.parse_strategy(spec["strategy"])
    step(net, x[:8], w, strategy)  # warm-up on 8 steps: lazy inits, but no large heap to reuse
    net.zero_grad(set_to_none=True)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def hwm():
        with open("/proc/self/status") as f:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    base = rss()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    step(net, x, w, strategy)
    return {"strategy": spec["strategy"], "rss_before": base, "peak_rss": hwm(),
            "peak_rss_delta": hwm() - base if reset else None, "hwm_reset": reset}


def metadata(args) -> dict:
    import torch

    return common.metadata(torch.get_num_threads())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--T", type=int, help="time steps (override the preset)")
    ap.add_argument("--repeats", type=int, help="timed rounds after the warm-up (override the preset)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.1, help="input spike probability per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS, a fresh process per strategy")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/skipper_speed[_ci])")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    args.T = args.T or p["T"]
    args.repeats = args.repeats or p["repeats"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(rss_worker(json.loads(args.worker))))
        return 0
    import torch

    import sparsebptt as sb

    torch.set_num_threads(args.threads)
    meta = metadata(args)
    net, x, w = build(args)
    strategies = {s: sb.parse_strategy(s) for s in STRATEGIES}

    # memory: one traced forward+backward each; also check the gradients' sanity
    stored, grads = {}, {}
    for name, s in strategies.items():
        with sb.trace() as t:
            step(net, x, w, s)
        stored[name] = {"peak_stored_bytes": t.peak_stored_bytes, "forward_steps": t.forward_steps,
                        "recomputed_steps": t.recomputed_steps}
        grads[name] = [p.grad.clone() for p in net.parameters()]
    ckpt_err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                   for a, b in zip(grads["checkpoint:64"], grads["full"]))

    # time: warm-up round, then interleaved rounds with a rotating order
    names = list(strategies)
    times = {n: [] for n in names}
    ratios = {"skipper/full": [], "skipper/checkpoint": [], "checkpoint/full": []}
    for r in range(args.repeats + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {}
        for n in order:
            t0 = time.perf_counter()
            step(net, x, w, strategies[n])
            got[n] = time.perf_counter() - t0
        if r == 0:
            continue  # warm-up
        for n in names:
            times[n].append(got[n])
        ratios["skipper/full"].append(got["skipper:64,16"] / got["full"])
        ratios["skipper/checkpoint"].append(got["skipper:64,16"] / got["checkpoint:64"])
        ratios["checkpoint/full"].append(got["checkpoint:64"] / got["full"])
        print(f"round {r}: " + "  ".join(f"{n} {got[n]:.3f}s" for n in names), flush=True)

    rss = {}
    if args.rss:
        for n in names:
            spec = {k: getattr(args, k) for k in ("T", "batch", "hidden", "input", "p", "seed", "threads")}
            spec["strategy"] = n
            p = subprocess.run([sys.executable, SCRIPT, "--worker", json.dumps(spec)], capture_output=True,
                               text=True)
            line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
            rss[n] = json.loads(line) if line else {"error": p.stderr[-500:]}

    rows = []
    for n in names:
        rows.append({"strategy": n, "T": args.T, "batch": args.batch, "hidden": args.hidden,
                     "peak_stored_bytes": stored[n]["peak_stored_bytes"],
                     "stored_ratio_full_over": stored["full"]["peak_stored_bytes"] / stored[n]["peak_stored_bytes"],
                     "forward_steps": stored[n]["forward_steps"], "recomputed_steps": stored[n]["recomputed_steps"],
                     "median_s": statistics.median(times[n]), "p20_s": common.quantile(times[n], 0.2),
                     "p80_s": common.quantile(times[n], 0.8), "times_s": times[n],
                     "peak_rss_delta": rss.get(n, {}).get("peak_rss_delta")})
    med = {k: statistics.median(v) for k, v in ratios.items()}
    mem_ratio = stored["full"]["peak_stored_bytes"] / stored["skipper:64,16"]["peak_stored_bytes"]
    checks = [
        {"check": "Skipper(64,16) stores >= 3.3x less than FullBPTT", "value": mem_ratio, "bound": 3.3,
         "pass": mem_ratio >= 3.3},
        {"check": "Skipper(64,16) faster than Checkpoint(64) (median of per-round time ratios < 1)",
         "value": med["skipper/checkpoint"], "bound": 1.0, "pass": med["skipper/checkpoint"] < 1.0},
        {"check": "Skipper(64,16) no slower than FullBPTT (median of per-round time ratios <= 1)",
         "value": med["skipper/full"], "bound": 1.0, "pass": med["skipper/full"] <= 1.0},
    ]
    meta["checkpoint_grad_max_rel_diff_vs_full"] = ckpt_err
    stem = args.out or os.path.join(REPO, "benchmarks", "results",
                                    "skipper_speed" + ("" if args.preset == "full" else f"_{args.preset}"))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "config": {k: getattr(args, k) for k in
                                            ("T", "batch", "hidden", "input", "p", "seed", "threads", "repeats")},
                   "rows": rows, "ratios_per_round": ratios, "median_ratios": med, "checks": checks,
                   "rss": rss}, f, indent=1)
    fields = ["strategy", "T", "batch", "hidden", "peak_stored_bytes", "stored_ratio_full_over", "forward_steps",
              "recomputed_steps", "median_s", "p20_s", "p80_s", "peak_rss_delta"]
    with open(stem + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    print(f"\n2-layer LIF Stack, T={args.T}, B={args.batch}, H={args.hidden}, input {args.input}, "
          f"reduce=sum, {args.repeats} interleaved rounds, {args.threads} thread(s)")
    print("| strategy | peak stored | full / this | median fwd+bwd | p20 | p80 |"
          + (" peak RSS delta |" if rss else ""))
    print("|---|---|---|---|---|---|" + ("---|" if rss else ""))
    for r in rows:
        rs = f" {r['peak_rss_delta'] / 2 ** 20:.1f} MiB |" if rss and r["peak_rss_delta"] is not None else (
            " - |" if rss else "")
        print(f"| {r['strategy']} | {r['peak_stored_bytes'] / 2 ** 20:.2f} MiB | {r['stored_ratio_full_over']:.2f}x | "
              f"{r['median_s']:.3f} s | {r['p20_s']:.3f} s | {r['p80_s']:.3f} s |" + rs)
    print("median per-round time ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}: {c['check']}: {c['value']:.3f} (bound {c['bound']})")
    print(f"checkpoint vs full BPTT gradients: max |diff| / max |grad| = {ckpt_err:.2e}")
    print(f"wrote {stem}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
