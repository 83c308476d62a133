"""The longest sequence each strategy trains within a fixed RAM budget (issue 4's headline).

Each (strategy, T) runs one forward+backward of the memory benchmark's workload (2-layer LIF
Stack, B=16, H=256, 64 spike inputs, reduce="sum") in a fresh process and records its whole
peak resident set (VmHWM: the interpreter, torch, the input x and everything the scan holds).
A strategy "fits" at T when that peak is within the budget. No timing here: see memory.py.

    python benchmarks/longest_T.py --budget-gib 2 --cases full:10000,20000,25000 double-disk:1024,32:100000,250000

``--input`` chooses how x reaches the scan: ``dense`` (a float32 tensor in memory, the default:
4 GiB at T = 10^6), ``source`` (an `sb.SegmentSource` regenerating the seeded Bernoulli spikes of
each block of 1024 steps on demand, as bool: nothing of x is resident beyond the segments the
scan holds) or ``mmap`` (uint8 spikes written to a file first and passed as ``torch.from_file``,
read a segment at a time; its pages read count in the resident set while the kernel keeps them).
A strategy ``plan:SIZE`` is `sb.plan`'s pick for a budget of SIZE (slow storage on disk). Issue
14's T = 10^6 check (one training step in < 1 GiB peak resident memory)::

    python benchmarks/longest_T.py --budget-gib 1 --input source --cases double-disk:1024,32:1000000 \
        plan:256MiB:1000000 --out benchmarks/results/longest_T_streamed.json
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


BLOCK = 1024  # steps per seeded block of the streamed input


def _block(i: int, B: int, n_in: int, p: float, T: int):
    import torch

    g = torch.Generator().manual_seed(1_000_003 * i + 17)
    n = min(BLOCK, T - i * BLOCK)
    return torch.rand(n, B, n_in, generator=g) < p  # bool


def streamed_spikes(T: int, B: int, n_in: int, p: float):
    """An `sb.SegmentSource` of Bernoulli(p) spikes (bool), the same for any segmentation: steps
    come from seeded blocks of `BLOCK` steps, regenerated when a segment needs them."""
    import torch

    import sparsebptt as sb

    cache: dict = {}  # the last block made: a recomputed segment usually lies in it

    def block(i):
        if i not in cache:
            cache.clear()
            cache[i] = _block(i, B, n_in, p, T)
        return cache[i]

    def fn(t0: int, t1: int):
        parts = [block(i) for i in range(t0 // BLOCK, (t1 - 1) // BLOCK + 1)]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        a = t0 - (t0 // BLOCK) * BLOCK
        return x[a:a + (t1 - t0)]
    return sb.SegmentSource(fn, T=T, shape=(B, n_in), dtype=torch.bool)


def mmap_spikes(T: int, B: int, n_in: int, p: float, path: str):
    """The same spikes as `streamed_spikes`, written to ``path`` as uint8 and memory-mapped."""
    import torch

    with open(path, "wb") as f:
        for i in range(-(-T // BLOCK)):
            f.write(_block(i, B, n_in, p, T).to(torch.uint8).numpy().tobytes())
    return torch.from_file(path, shared=False, size=T * B * n_in, dtype=torch.uint8).view(T, B, n_in)


def worker(spec: dict) -> dict:
    import tempfile
    import time

    import torch

    import sparsebptt as sb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    T, B, n_in = spec["T"], 16, 64
    net = sb.cells.Stack([sb.cells.LIF(n_in, 256), sb.cells.LIF(256, 256)])
    kind = spec.get("input", "dense")
    tmp = None
    if kind == "dense":
        x = common.spike_input(T, B, n_in, 0.1, seed=0)
        x_bytes = x.numel() * x.element_size()
    elif kind == "source":
        x = streamed_spikes(T, B, n_in, 0.1)
        x_bytes = 0
    elif kind == "mmap":
        tmp = tempfile.NamedTemporaryFile(prefix="longest_T_", suffix=".u8", dir=spec.get("disk_dir"), delete=False)
        tmp.close()
        x = mmap_spikes(T, B, n_in, 0.1, tmp.name)
        x_bytes = T * B * n_in
    else:
        raise ValueError(f"unknown input {kind!r}")
    text = spec["strategy"]
    if text.startswith("plan:"):
        strategy = sb.plan(net, (T, B, n_in), text[len("plan:"):], slow_storage="disk", streamed=kind != "dense")
    else:
        strategy = sb.parse_strategy(text)
    rss0 = common.current_rss()  # the peak reported is the whole process's, from its start
    t0 = time.perf_counter()
    try:
        with sb.trace() as tr:
            y, _ = sb.scan(net, x, strategy=strategy, reduce="sum")
            y.sum().backward()
    finally:
        if tmp is not None:
            import os as _os
            _os.unlink(tmp.name)
    seconds = time.perf_counter() - t0
    grad_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    return {"peak_rss_bytes": common.peak_rss(), "rss_before_step": rss0, "x_bytes": x_bytes, "input": kind,
            "strategy_used": strategy.to_string(), "seconds": seconds, "forward_steps": tr.forward_steps,
            "recomputed_steps": tr.recomputed_steps, "peak_stored_bytes": tr.peak_stored_bytes,
            "peak_offloaded_bytes": tr.peak_offloaded_bytes, "finite_grads": grad_ok,
            "spike_rate_out": float(y.sum()) / (T * B * 256)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--cases", nargs="+", default=[],
                    help="STRATEGY:T1,T2,... (the strategy string may itself contain ':')")
    ap.add_argument("--input", choices=["dense", "source", "mmap"], default="dense",
                    help="how x reaches the scan (see the module docstring)")
    ap.add_argument("--disk-dir", default=None, help="folder of the mmap input file (default: the temp folder)")
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
            r = common.run_worker(SCRIPT, {"strategy": strategy, "T": T, "input": args.input,
                                           "disk_dir": args.disk_dir}, timeout=3600)
            if "peak_rss_bytes" not in r:
                print(f"{strategy} T={T}: {r}", flush=True)
                continue
            row = {"strategy": strategy, "T": T, **r, "fits": r["peak_rss_bytes"] <= budget}
            rows.append(row)
            print(f"{strategy:>22} T={T:>8}: peak RSS {common.fmt_bytes(row['peak_rss_bytes'])} "
                  f"(x {common.fmt_bytes(row['x_bytes'])}, {row['input']}) {'fits' if row['fits'] else 'over'} "
                  f"{args.budget_gib:g} GiB; {row['strategy_used']}, {row['seconds']:.0f} s", flush=True)
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
