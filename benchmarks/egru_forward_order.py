"""EGRU's C forward (issue 17): which loop order for ``gh = b_hh + W_hh y`` over the events pays?

- column order (``EGRU_FWD_BY_SAMPLE=0``): for each unit j, the row ``W_hh^T[j]`` read once and
  added (an axpy) into every sample with an event at j;
- sample order (``EGRU_FWD_BY_SAMPLE=1``, the default since issue 17's second session): per chunk
  of 1 KiB of outputs, each sample's event rows added into registers (``acc_rows``, AVX-512 /
  AVX2); the chunk's columns of ``W_hh^T`` stay in L2 for the batch. (The first session's sample
  order, scalar chunks of 64 without the L2 chunking, was 1.2-1.9x slower than column order.)

Builds `kernels/egru/egru.c` both ways, times the no-grad scan of each and of the fused dense
`GRU(backend="auto")` round-robin (one thread, medians of 7), T=200, B=8, H=512, untrained weights,
N(0, 1) input, thresholds 0.1 (~15 % activity) and 0.2 (~3 %); writes
benchmarks/results/egru_forward_order[_TAG].json.

    python benchmarks/egru_forward_order.py [--tag TAG]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsebptt as sb
import sparsebptt.kernels.egru.cpu as egru_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default=None, help="file name suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    libs = common.kernel_variants(egru_cpu, {v: (f"sparsebptt_egru_v{v}", [f"EGRU_FWD_BY_SAMPLE={v}"])
                                             for v in (0, 1)})
    T, B, H = 200, 8, 512
    torch.manual_seed(0)
    gru = sb.cells.GRU(64, H, backend="auto")
    x = torch.randn(T, B, 64)
    rows = []
    for th in (0.1, 0.2):
        cell = sb.cells.EGRU(64, H, threshold_init=th)
        cell.load_state_dict(gru.state_dict(), strict=False)
        times = {"column": [], "sample": [], "gru": []}
        for _ in range(7):
            for name in times:
                if name != "gru":
                    egru_cpu._lib = libs[name == "sample"]
                t0 = time.perf_counter()
                with torch.no_grad():
                    sb.scan(gru if name == "gru" else cell, x)
                times[name].append(time.perf_counter() - t0)
        m = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append(dict(threshold=th, **{f"{k}_ms": v for k, v in m.items()},
                         sample_vs_column=m["sample"] / m["column"], column_vs_gru=m["column"] / m["gru"]))
        print(rows[-1], file=sys.stderr)
    egru_cpu._lib = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "egru_forward_order" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"command": "python benchmarks/egru_forward_order.py" + (f" --tag {args.tag}" if args.tag else ""),
         "torch": torch.__version__, "threads": 1, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
