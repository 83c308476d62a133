"""Thread scaling of the fused CPU paths against the dense ones they are compared with (issue 17).

The C kernels of the "cpu" backend run on one thread; torch's matmuls (MKL) use every intra-op
thread. Side by side, interleaved, at each ``--threads`` count: EGRU (the trained character LM of
``benchmarks/egru.py --from-run``, B = 8, T = 500) against the fused GRU with its weights, forward
and backward; and one training step of the 2-layer LIF network of ``benchmarks/peers.py`` (B = 16,
T = 100, full BPTT, backend "cpu") against its dense-matmul floor. Writes
``benchmarks/results/threads[_TAG].json``.

    python benchmarks/threads.py --from-run DIR [--threads 1 2] [--repeats 6] [--tag TAG]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import egru
import peers
from common import metadata, time_scan_step

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", required=True, metavar="DIR", help="a trained EGRU run (sparsebptt train --model egru)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    meta = {**metadata(torch.get_num_threads()),
            "command": "python benchmarks/threads.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    state, x = egru._run_input(Path(args.from_run), 500, 8)
    cells = {kind: cell for kind, _, _, cell in egru.make_cells(x.shape[2], state["weight_hh"].shape[1], 1.0, None,
                                                                [0.5], state=state, shifts=[0.0])}
    lif_full, _, _ = peers.build("sb-cpu-full", 100, 16, 64, 256, 10)
    lif_floor, _, _ = peers.build("floor", 100, 16, 64, 256, 10)
    times: dict = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for n in args.threads:
            torch.set_num_threads(n)
            for kind, cell in cells.items():
                f, b = time_scan_step(cell, x)
                if rep:
                    times.setdefault((n, kind, "forward"), []).append(f)
                    times.setdefault((n, kind, "backward"), []).append(b)
            for name, step in (("lif-full", lif_full), ("lif-floor", lif_floor)):
                for _ in range(5):
                    t0 = time.perf_counter()
                    step()
                    if rep:
                        times.setdefault((n, name, "step"), []).append(time.perf_counter() - t0)
    rows = []
    for n in args.threads:
        med = {k[1:]: statistics.median(v) for k, v in times.items() if k[0] == n}
        row = {"threads": n, **{f"{a}_{b}_ms": round(1e3 * t, 2) for (a, b), t in med.items()},
               "egru_vs_gru_backward": med[("egru", "backward")] / med[("gru", "backward")],
               "egru_vs_gru_forward": med[("egru", "forward")] / med[("gru", "forward")],
               "lif_full_vs_floor": med[("lif-full", "step")] / med[("lif-floor", "step")]}
        rows.append(row)
        print(f"threads={n}: EGRU / GRU backward {row['egru_vs_gru_backward']:.2f}, forward "
              f"{row['egru_vs_gru_forward']:.2f}; LIF full BPTT / floor {row['lif_full_vs_floor']:.2f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"threads{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
