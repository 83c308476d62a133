"""The longest sequence each strategy trains within a fixed RAM budget (issue 4's headline).

Each (strategy, T) runs one forward+backward of the memory benchmark's workload (2-layer LIF
Stack, B=16, H=256, 64 spike inputs, reduce="sum") in a fresh process and records its whole
peak resident set (VmHWM: the interpreter, torch, the input x and everything the scan holds).
A strategy "fits" at T when that peak is within the budget. No timing here: see memory.py.

    python benchmarks/longest_T.py --budget-gib 2 --cases full:10000,20000,25000 double-disk:1024,32:100000,250000
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = os.path.abspath(__file__)
RESULTS = os.path.join(common.REPO, "benchmarks", "results")


def worker(spec: dict) -> dict:
    import torch

    import sparsebptt as sb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = sb.cells.Stack([sb.cells.LIF(64, 256), sb.cells.LIF(256, 256)])
    x = common.spike_input(spec["T"], 16, 64, 0.1, seed=0)
    strategy = sb.parse_strategy(spec["strategy"])
    y, _ = sb.scan(net, x, strategy=strategy, reduce="sum")
    y.sum().backward()
    return {"peak_rss_bytes": common.peak_rss(), "x_bytes": x.numel() * x.element_size()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--cases", nargs="+", default=[],
                    help="STRATEGY:T1,T2,... (the strategy string may itself contain ':')")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "longest_T.json"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    budget = args.budget_gib * common.GiB
    rows = []
    for case in args.cases:
        strategy, _, ts = case.rpartition(":")
        for T in (int(t) for t in ts.split(",")):
            r = common.run_worker(SCRIPT, {"strategy": strategy, "T": T}, timeout=3600)
            if "peak_rss_bytes" not in r:
                print(f"{strategy} T={T}: {r}", flush=True)
                continue
            row = {"strategy": strategy, "T": T, **r, "fits": r["peak_rss_bytes"] <= budget}
            rows.append(row)
            print(f"{strategy:>22} T={T:>8}: peak RSS {common.fmt_bytes(row['peak_rss_bytes'])} "
                  f"(x {common.fmt_bytes(row['x_bytes'])}) {'fits' if row['fits'] else 'over'} "
                  f"{args.budget_gib:g} GiB", flush=True)
    longest = {}
    for r in rows:
        if r["fits"]:
            longest[r["strategy"]] = max(longest.get(r["strategy"], 0), r["T"])
    print("longest T within budget:", longest)
    with open(args.out, "w") as f:
        json.dump({"meta": common.metadata(1), "budget_gib": args.budget_gib, "rows": rows,
                   "longest_T": longest}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
