"""Fused CPU GRU / LSTM (issue 8): one training step, backend "torch" vs "cpu" vs torch.nn.

One layer, input 64 -> hidden 256, B = 16, T = 2,000 float32, one thread; one training step is
``sb.scan`` (or ``nn.GRU`` / ``nn.LSTM``) forward, loss ``(out * D).sum()``, backward into x and
every parameter. Methods, all with the same seeded weights:

- ``sb-torch-full``: sparsebptt, backend "torch" (the reference step loop), FullBPTT
- ``sb-cpu-full``: backend "cpu" (`sparsebptt.kernels.rnn.cpu`), FullBPTT
- ``sb-cpu-ckpt``: backend "cpu", Checkpoint(ceil(sqrt T)) (recomputed segments run fused too)
- ``nn``: ``torch.nn.GRU`` / ``torch.nn.LSTM`` (1 layer, the same weights)
- ``floor``: only the matmuls: the batched input projection, one ``h W_hh^T`` a step forward
  and one ``dg W_hh`` a step backward, and the batched weight/input gradients (no gate math)

Before timing, the script checks that backend "cpu" gives backend "torch"'s outputs and
gradients (T = 53) and that ``nn`` gives the same outputs. Each method gets one untimed warm-up
step at the full T; then the repeats run interleaved round-robin (method after method), so the
machine's load drifts over all methods alike; the CSV holds median / p20 / p80 over repeats and
the ratios of the medians (to sb torch, to nn, and to the floor: issue 17 asks <= 1.5x of the
floor for sb-cpu-full and sb-cpu-ckpt).

    .venv/bin/python benchmarks/rnn_cpu.py [--T 2000] [--repeats 5]

Writes benchmarks/results/rnn_cpu.csv (and rnn_cpu.json with the versions and machine).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import metadata, summarize_times  # noqa: E402

import sparsebptt as sb  # noqa: E402
from sparsebptt.testing import assert_close  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
B, H, N_IN = 16, 256, 64
METHODS = ("sb-torch-full", "sb-cpu-full", "sb-cpu-ckpt", "nn", "floor")


def make(kind: str, backend: str):
    torch.manual_seed(0)
    cls = sb.cells.GRU if kind == "gru" else sb.cells.LSTM
    return cls(N_IN, H, backend=backend)


def make_nn(kind: str, cell):
    mod = (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(N_IN, H)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(mod, f"{name}_l0").copy_(getattr(cell, name))
    return mod


def step_fn(kind: str, method: str, T: int):
    """A closure running one training step ``(x, D) -> (out, dx, module)`` for `check`."""
    if method == "nn":
        mod = make_nn(kind, make(kind, "torch"))

        def run(x, D):
            x = x.detach().requires_grad_()
            out, _ = mod(x)
            (out * D).sum().backward()
            return out, x.grad, mod
        return run
    if method == "floor":
        cell = make(kind, "torch")
        G = cell.weight_hh.shape[0]

        def run(x, D):
            with torch.no_grad():
                L = x.shape[0]
                gi = torch.addmm(cell.bias_ih, x.reshape(L * B, N_IN), cell.weight_ih.t())
                hs = torch.empty(L + 1, B, H)
                hs[0].zero_()
                wt = cell.weight_hh.t().contiguous()  # as the fused path
                gh = torch.empty(B, G)
                for t in range(L):
                    torch.addmm(cell.bias_hh, hs[t], wt, out=gh)
                    hs[t + 1].copy_(gh[:, :H])  # stands in for the gate math
                dg = gi.view(L, B, G)
                dh = torch.empty(B, H)
                for t in range(L - 1, -1, -1):
                    torch.mm(dg[t], cell.weight_hh, out=dh)
                dg2 = dg.reshape(L * B, G)
                dx = dg2.mm(cell.weight_ih)
                dg2.t().mm(x.reshape(L * B, N_IN))
                dg2.t().mm(hs[:-1].reshape(L * B, H))
            return None, dx, cell
        return run
    backend = "torch" if method.startswith("sb-torch") else "cpu"
    cell = make(kind, backend)
    strategy = sb.FullBPTT() if method.endswith("full") else sb.Checkpoint(every=math.ceil(math.sqrt(T)))

    def run(x, D):
        x = x.detach().requires_grad_()
        for p in cell.parameters():
            p.grad = None
        out, _ = sb.scan(cell, x, strategy=strategy)
        (out * D).sum().backward()
        return out, x.grad, cell
    return run


def check(kind: str):
    """backend "cpu" equals backend "torch" (outputs, dx, parameter grads); nn equals the output."""
    T = 53
    g = torch.Generator().manual_seed(1)
    x, D = torch.randn(T, B, N_IN, generator=g), torch.randn(T, B, H, generator=g)
    ref_out, ref_dx, ref_cell = step_fn(kind, "sb-torch-full", T)(x, D)
    for method in ("sb-cpu-full", "sb-cpu-ckpt", "nn"):
        out, dx, mod = step_fn(kind, method, T)(x, D)
        assert_close(f"{kind} {method} out", ref_out.detach(), out.detach(), torch.float32)
        assert_close(f"{kind} {method} dx", ref_dx, dx, torch.float32)
        if method != "nn":
            for (n, p), (_, q) in zip(ref_cell.named_parameters(), mod.named_parameters()):
                assert_close(f"{kind} {method} d{n}", p.grad, q.grad, torch.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "rnn_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for kind in ("gru", "lstm"):
        check(kind)
        g = torch.Generator().manual_seed(0)
        x, D = torch.randn(args.T, B, N_IN, generator=g), torch.randn(args.T, B, H, generator=g)
        fns = {m: step_fn(kind, m, args.T) for m in METHODS}
        for fn in fns.values():  # warm-up: builds, page faults, allocator
            fn(x, D)
        times = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for m, fn in fns.items():
                t0 = time.perf_counter()
                fn(x, D)
                times[m].append(time.perf_counter() - t0)
        stats = {m: summarize_times(ts) for m, ts in times.items()}
        for m in METHODS:
            s = stats[m]
            rows.append({"cell": kind, "method": m, "T": args.T, "B": B, "H": H, "input": N_IN,
                         "median_s": round(s["median_s"], 4), "p20_s": round(s["p20_s"], 4),
                         "p80_s": round(s["p80_s"], 4), "n": s["n"],
                         "ms_per_step": round(1e3 * s["median_s"] / args.T, 4),
                         "vs_sb_torch": round(s["median_s"] / stats["sb-torch-full"]["median_s"], 3),
                         "vs_nn": round(s["median_s"] / stats["nn"]["median_s"], 3),
                         "vs_floor": round(s["median_s"] / stats["floor"]["median_s"], 3)})
            print(f"{kind:5s} {m:14s} {s['median_s']:8.3f} s  ({rows[-1]['vs_sb_torch']:.2f}x sb torch, "
                  f"{rows[-1]['vs_nn']:.2f}x nn, {rows[-1]['vs_floor']:.2f}x floor)", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": metadata(1), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
