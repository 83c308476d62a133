"""Fused CPU GRU/LSTM on one-hot input: the sparse-input route against the matmuls (issue 17).

A char-LM-like layer: x [T, B, I] one-hot (one nonzero per row), W_ih and W_hh needing gradients,
x and h0 not. Per kind, one segment of T steps through `fused_gru_layer` / `fused_lstm_layer`
(what a FullBPTT scan runs), forward and backward of ``ys.sum()`` timed separately with

- ``sparse``: a fresh `SparseRoute` (it decides sparse: the projection and dW_ih from the nonzeros);
- ``dense``: a route whose ``sparse`` is set False (the matmuls, as without a route);

interleaved repeats, median (and 20th / 80th percentiles), one torch thread.

    taskset -c 1 .venv/bin/python benchmarks/rnn_sparse_input.py [--tag issue17] [--kinds gru lstm]

Writes benchmarks/results/rnn_sparse_input[_TAG].csv and .json (machine, versions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import metadata, ms_columns, quantile, write_rows_csv  # noqa: E402

from sparsebptt.kernels.rnn.cpu import fused_gru_layer, fused_lstm_layer  # noqa: E402
from sparsebptt.kernels.sparse_input.cpu import SparseRoute  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = {"gru": (fused_gru_layer, 1, 3), "lstm": (fused_lstm_layer, 2, 4)}


def route_of(name: str) -> SparseRoute:
    """A fresh route; "dense": one already decided dense."""
    route = SparseRoute()
    if name == "dense":
        route.sparse = False
    return route


def time_layer(fn, x, states, weights, route) -> tuple[float, float]:
    """Seconds of the layer's forward and of the backward of ``ys.sum()`` (gradients cleared)."""
    for w in weights:
        w.grad = None
    t0 = time.perf_counter()
    ys = fn(x, *states, *weights, route=route)[0]
    t1 = time.perf_counter()
    ys.sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["gru"], choices=list(LAYERS))
    ap.add_argument("--H", type=int, default=512)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=500)
    ap.add_argument("--I", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    T, B, I, H = args.T, args.B, args.I, args.H
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.one_hot(torch.randint(0, I, (T, B), generator=g), I).float()
    rows = []
    for kind in args.kinds:
        fn, n_states, G = LAYERS[kind]
        states = [torch.zeros(B, H) for _ in range(n_states)]
        s = H ** -0.5
        weights = [(s * torch.randn(*shape, generator=g)).requires_grad_()
                   for shape in ((G * H, I), (G * H, H), (G * H,), (G * H,))]
        times = {r: ([], []) for r in ("sparse", "dense")}
        for r in times:  # warm-up: the C libraries, W^T copies, scratch buffers
            time_layer(fn, x, states, weights, route_of(r))
        for _ in range(args.repeats):
            for r, (fw, bw) in times.items():
                f, b = time_layer(fn, x, states, weights, route_of(r))
                fw.append(f)
                bw.append(b)
        row = {"kind": kind, "T": T, "B": B, "I": I, "H": H, "repeats": args.repeats}
        for r, (fw, bw) in times.items():
            row.update(ms_columns(f"fwd_{r}", fw))
            row.update(ms_columns(f"bwd_{r}", bw))
        med = {(r, k): quantile(ts, 0.5) for r, pair in times.items() for k, ts in zip(("fwd", "bwd"), pair)}
        row["fwd_ratio"] = med["sparse", "fwd"] / med["dense", "fwd"]
        row["bwd_ratio"] = med["sparse", "bwd"] / med["dense", "bwd"]
        row["total_ratio"] = (med["sparse", "fwd"] + med["sparse", "bwd"]) / (med["dense", "fwd"] + med["dense", "bwd"])
        rows.append(row)
        print(f"{kind} T={T} B={B} I={I} H={H}: forward sparse {1e3 * med['sparse', 'fwd']:.1f} ms / dense "
              f"{1e3 * med['dense', 'fwd']:.1f} ms = {row['fwd_ratio']:.3f}; backward sparse "
              f"{1e3 * med['sparse', 'bwd']:.1f} ms / dense {1e3 * med['dense', 'bwd']:.1f} ms = "
              f"{row['bwd_ratio']:.3f}; total {row['total_ratio']:.3f}", flush=True)
    out = os.path.join(HERE, "results", "rnn_sparse_input" + (f"_{args.tag}" if args.tag else ""))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_rows_csv(rows, out + ".csv")
    with open(out + ".json", "w") as f:
        json.dump({"meta": metadata(1), "command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=1)
    print(f"wrote {out}.csv, .json")


if __name__ == "__main__":
    main()
