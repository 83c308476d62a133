"""What the recomputation checks cost (issue 16): one training step with the checks on and off.

The checks (`sparsebptt.strategies.executor`): each graph segment's autograd graph walked to its
leaves (`_check_graph`), a float64 sum and sum of |values| of each stored checkpoint (`_digest`),
and the recomputed state compared with it at each checkpoint step (`_check_recomputed`). Case: the
network of ``benchmarks/peers.py`` (two feed-forward LIF layers n_in 64 -> H 256 -> 256, B 16, T 200,
``Checkpoint(every=14)``, reduce "sum"), backends "cpu" (fused C kernels) and "torch" (the step
path, where the values are compared too). "Off" patches the three functions out in the same
process; on and off alternate step by step (a drifting machine load hits both alike), and the
median of ``--steps`` timed steps each is reported (one thread).

    .venv/bin/python benchmarks/recompute_checks.py [--steps 40]

Writes benchmarks/results/recompute_checks.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402  (the same network and inputs)
from common import metadata  # noqa: E402

T, B, H, N_IN = 200, 16, 256, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per mode and method")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "recompute_checks.json"))
    args = ap.parse_args()
    from sparsebptt.strategies import executor as ex

    torch.set_num_threads(1)
    k = max(1, round(math.sqrt(T)))
    checks = (ex._check_graph, ex._check_recomputed, ex._digest)

    def set_checks(on: bool):
        if on:
            ex._check_graph, ex._check_recomputed, ex._digest = checks
        else:
            ex._check_graph = lambda run, seg: None
            ex._check_recomputed = lambda run, n, state: None
            ex._digest = lambda state, values: None

    rows = []
    for method in ("sb-cpu-ckpt", "sb-torch-ckpt"):
        step, params, _ = peers.build(method, T, B, N_IN, H, k)
        times = {True: [], False: []}
        for i in range(args.steps + 2):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                set_checks(on)
                for p in params:
                    p.grad = None
                t0 = time.perf_counter()
                step()
                if i >= 2:  # two warm-up rounds
                    times[on].append(time.perf_counter() - t0)
        set_checks(True)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        row = {"method": method, "T": T, "B": B, "H": H, "every": k, "checks_on_ms": 1e3 * on,
               "checks_off_ms": 1e3 * off, "overhead_pct": 100 * (on / off - 1), "steps": args.steps}
        rows.append(row)
        print(f"{method}: checks on {row['checks_on_ms']:.2f} ms, off {row['checks_off_ms']:.2f} ms per "
              f"training step (median of {args.steps}); overhead {row['overhead_pct']:+.1f} %")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": metadata(1), "rows": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
