"""Per-step batch norm over a segment (issue 14): one call with time joined to the channels
(`sparsebptt.cells.stack.batch_norm_per_step`) against a call per step (what a step loop does).

Case: BatchNorm2d(C) in training mode on a segment (L, B, C, H, W), float32, forward + backward of
``(y * g).sum()``; alternating runs, median of ``--repeats`` each (torch's default threads). Also
checks that both give the same output and running statistics.

    .venv/bin/python benchmarks/bn_per_step.py [--L 50 --B 16 --C 16 --H 32 --repeats 7]

Writes benchmarks/results/bn_per_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import metadata  # noqa: E402
from sparsebptt.cells.stack import batch_norm_per_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in (("L", 50), ("B", 16), ("C", 16), ("H", 32), ("repeats", 7)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bn_per_step.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.L, a.B, a.C, a.H, a.H)
    g = torch.randn_like(x)
    bns = {"per_step_call": nn.BatchNorm2d(a.C), "one_call": nn.BatchNorm2d(a.C)}

    def run(name):
        bn = bns[name]
        xx = x.clone().requires_grad_()
        t0 = time.perf_counter()
        if name == "one_call":
            y = batch_norm_per_step(bn, xx)
        else:
            y = torch.stack([bn(xx[t]) for t in range(a.L)])
        (y * g).sum().backward()
        return time.perf_counter() - t0, y.detach()

    times = {k: [] for k in bns}
    for _ in range(a.repeats + 1):  # the first round is a warm-up
        outs = {}
        for name in bns:
            dt, outs[name] = run(name)
            times[name].append(dt)
    same_out = float((outs["one_call"] - outs["per_step_call"]).abs().max())
    same_stats = all(torch.equal(p, q) for p, q in zip(bns["one_call"].buffers(), bns["per_step_call"].buffers()))
    stats_diff = max(float((p.double() - q.double()).abs().max())
                     for p, q in zip(bns["one_call"].buffers(), bns["per_step_call"].buffers()))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    res = {"meta": metadata(torch.get_num_threads()), "shape": [a.L, a.B, a.C, a.H, a.H], "median_s": med,
           "speedup": med["per_step_call"] / med["one_call"], "max_abs_out_diff": same_out,
           "running_stats_bitwise_equal": same_stats, "max_abs_running_stats_diff": stats_diff}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("shape", "median_s", "speedup", "max_abs_out_diff",
                                          "running_stats_bitwise_equal", "max_abs_running_stats_diff")}))


if __name__ == "__main__":
    main()
