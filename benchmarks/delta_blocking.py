"""Delta cells' C segment scan (issue 17): does blocking the forward's memory update over output
columns pay? Builds `kernels/delta/delta.c` with ``UPD_CHUNK`` = 128 ... one pass (the default),
times the no-grad forward of each build round-robin in one process (one thread, medians of
``--reps``), on the slowly varying input of benchmarks/sparsity.py, and writes
benchmarks/results/delta_blocking.{csv,json}.

    python benchmarks/delta_blocking.py            # B in {8, 16}, H in {256, 1024}, T = 100
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsebptt as sb
import sparsebptt.kernels.delta.cpu as delta_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sparsity import slow_input  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = [128, 256, 512, 2048, 1 << 30]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--T", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    libs = common.kernel_variants(delta_cpu, {c: (f"sparsebptt_delta_chunk{c}", [f"UPD_CHUNK={c}L"])
                                              for c in CHUNKS})
    rows = []
    for B, H, th in [(8, 256, 0.1), (16, 256, 0.1), (8, 1024, 0.05), (16, 1024, 0.05)]:
        x = slow_input(args.T, B, 64)
        cell = sb.cells.DeltaGRU(64, H, th, backend="cpu")
        st = cell.initial_state(B)
        times = {c: [] for c in CHUNKS}
        for _ in range(args.reps):
            for c, lib in libs.items():
                delta_cpu._lib = lib
                t0 = time.perf_counter()
                with torch.no_grad():
                    delta_cpu.fused_recurrent_delta(x, st, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                    cell.bias_hh, th, th, lstm=False)
                times[c].append(time.perf_counter() - t0)
        base = statistics.median(times[CHUNKS[-1]])
        for c in CHUNKS:
            med = statistics.median(times[c])
            rows.append(dict(B=B, H=H, threshold=th, chunk=("one pass" if c == CHUNKS[-1] else c),
                             fwd_ms=1e3 * med, vs_one_pass=med / base))
            print(f"B={B} H={H} th={th} chunk={rows[-1]['chunk']}: {1e3 * med:.2f} ms "
                  f"(x{med / base:.3f} one pass)", file=sys.stderr)
    delta_cpu._lib = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "delta_blocking.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (RESULTS / "delta_blocking.json").write_text(json.dumps(
        {"command": "python benchmarks/delta_blocking.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "torch": torch.__version__, "threads": 1, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
