"""Resident growth of a long scan's forward beyond what it stores: glibc heap growth, by allocator setting.

The 2-layer LIF network of `longest_T.py` (B = 16, 64 -> 256 -> 256, reduce="sum"), a streamed
bool spike input (`longest_T.streamed_spikes`), ``checkpoint:1000``: the forward of one scan in a
fresh process per case; reported: resident-set growth over the forward (``/proc/self/statm``), the
bytes `sb.trace` says are stored, and the autograd graph's node count. Cases differ in T, in the
environment (``MALLOC_MMAP_THRESHOLD_``) and in whether the LIF kernels' buffers get
``MADV_HUGEPAGE`` (``--no-huge`` patches `sparsebptt.kernels.lif.cpu.empty` to a plain
``torch.empty`` inside the worker).

    .venv/bin/python benchmarks/heap_growth.py        # T 100,000 and 200,000 x {default, threshold, no huge pages}

Writes benchmarks/results/heap_growth.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

SCRIPT = os.path.abspath(__file__)


def worker(spec: dict) -> dict:
    import torch

    import longest_T
    import sparsebptt as sb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if spec["no_huge"]:
        import sparsebptt.kernels.lif.cpu as kc
        kc.empty = lambda shape, dtype: torch.empty(shape, dtype=dtype)
    T = spec["T"]
    net = sb.cells.Stack([sb.cells.LIF(64, 256), sb.cells.LIF(256, 256)])
    src = longest_T.streamed_spikes(T, 16, 64, 0.1)
    r0 = common.current_rss()
    with sb.trace() as tr:
        y, _ = sb.scan(net, src, strategy=spec["strategy"], reduce="sum")
    r1 = common.current_rss()
    seen, todo = set(), [y.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        todo.extend(g for g, _ in f.next_functions)
    return {"status": "ok", "forward_rss_growth": r1 - r0, "stored_bytes": tr.peak_stored_bytes,
            "graph_nodes": len(seen)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[100_000, 200_000])
    ap.add_argument("--strategy", default="checkpoint:1000")
    ap.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "heap_growth.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    cases = [("default", {}, False), ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
             ("no MADV_HUGEPAGE", {}, True)]
    rows = []
    for T in args.T:
        for name, env, no_huge in cases:
            r = common.run_worker(SCRIPT, {"T": T, "strategy": args.strategy, "no_huge": no_huge}, 1800, env=env)
            rows.append({"case": name, "T": T, "strategy": args.strategy, **r})
            if r["status"] == "ok":
                print(f"T={T:>7} {name:32s} forward RSS growth {common.fmt_bytes(r['forward_rss_growth']):>10s}  "
                      f"stored {common.fmt_bytes(r['stored_bytes'])}  graph nodes {r['graph_nodes']}", flush=True)
            else:
                print(f"T={T} {name}: {r}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": common.metadata(1), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
