"""Sparse-input products of the fused CPU LIF layer against the dense matmul (issue 17).

For an input x [R, K] with a fraction ``density`` of nonzero entries (spikes: every nonzero 1),
times, one thread, interleaved repeats (median):

- ``forward``: the currents ``x W^T + b`` [R, H]: `SparseRows.of` (the CSR pass) + `project`
  against ``torch.addmm``;
- ``dW``: ``d^T x`` [H, K]: `SparseRows.weight_grad` against ``d.t() @ x``.

R = 160 is one segment of 10 steps at B = 16 (Checkpoint(10) at T = 100), R = 1600 a whole
T = 100 scan. The crossover density sets `sparsebptt.kernels.sparse_input.cpu.SPARSE_INPUT_MAX`.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/lif_sparse_input.py [--tag issue17a]

Writes benchmarks/results/lif_sparse_input[_TAG].csv and .json (machine, versions).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import metadata  # noqa: E402

from sparsebptt.kernels.sparse_input.cpu import SparseRows  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DENSITIES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.5, 1.0)


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[160, 1600])
    ap.add_argument("--K", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows_out = []
    H = args.H
    for R in args.rows:
        for K in args.K:
            for dens in DENSITIES:
                g = torch.Generator().manual_seed(0)
                x = (torch.rand(R, K, generator=g) < dens).float()
                W, b = torch.randn(H, K, generator=g), torch.randn(H, generator=g)
                d = torch.randn(R, H, generator=g)
                out = torch.empty(R, H)
                sp = SparseRows.of(x, keep=True)
                inner = max(3, 20000 // R)
                fns = {"forward sparse": lambda: SparseRows.of(x, keep=False).project(W, b, out),
                       "forward dense": lambda: torch.addmm(b, x, W.t(), out=out),
                       "dW sparse": lambda: sp.weight_grad(d),
                       "dW dense": lambda: d.t().mm(x)}
                for f in fns.values():
                    f()
                ts = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, f in fns.items():
                        ts[k].append(_time(f, inner))
                med = {k: statistics.median(v) for k, v in ts.items()}
                row = {"R": R, "K": K, "H": H, "density": dens,
                       "forward_sparse_us": round(med["forward sparse"] * 1e6, 1),
                       "forward_dense_us": round(med["forward dense"] * 1e6, 1),
                       "forward_ratio": round(med["forward sparse"] / med["forward dense"], 3),
                       "dW_sparse_us": round(med["dW sparse"] * 1e6, 1),
                       "dW_dense_us": round(med["dW dense"] * 1e6, 1),
                       "dW_ratio": round(med["dW sparse"] / med["dW dense"], 3)}
                rows_out.append(row)
                print(f"R={R:5d} K={K:4d} density {dens:4.2f}: forward sparse/dense {row['forward_ratio']:.2f} "
                      f"({row['forward_sparse_us']:.0f} / {row['forward_dense_us']:.0f} us), dW "
                      f"{row['dW_ratio']:.2f} ({row['dW_sparse_us']:.0f} / {row['dW_dense_us']:.0f} us)", flush=True)
    out = os.path.join(HERE, "results", "lif_sparse_input" + (f"_{args.tag}" if args.tag else ""))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        w.writeheader()
        w.writerows(rows_out)
    with open(out + ".json", "w") as f:
        json.dump({"meta": metadata(1), "command": " ".join(["python"] + sys.argv), "rows": rows_out}, f, indent=1)
    print(f"wrote {out}.csv, .json")


if __name__ == "__main__":
    main()
