"""How the CPU LIF recurrence is compiled, decided by measurement (issue 8).

The recurrence alone (input currents given, [L, B, H] = [2000, 16, 256] float32, one thread):
forward (z, u, v_T) and backward (di, dv0), each route checked against the torch loop first.

- ``torch``: a Python loop of batched torch ops into preallocated outputs (3 ops a step forward,
  1 a step backward after vectorised surrogate terms)
- ``C``: sparsebptt's kernels (`sparsebptt.kernels.lif.cpu`: C built by the system compiler,
  called through ctypes), with the build time of a cold cache
- ``numba``: the same loops under ``numba.njit`` (if numba imports), with its JIT time
- ``torch.compile``: the step compiled by inductor, looped in Python (``--compile``; slow to build)
- ``load_inline``: only the build time of a ``torch.utils.cpp_extension.load_inline`` module with
  the same C code (``--load-inline``; needs ninja), since it runs the same loop as ``C``

    .venv/bin/python benchmarks/lif_routes.py [--compile] [--load-inline]

Writes benchmarks/results/lif_routes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
L, B, H = 2000, 16, 256
BETA, TH = 0.9, 1.0


def timeit(fn, n=7):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}


def torch_fwd(i, v0):
    z, u, v = torch.empty_like(i), torch.empty_like(i), v0.clone()
    for t in range(i.shape[0]):
        torch.add(i[t], v, alpha=BETA, out=u[t])
        torch.gt(u[t], TH, out=z[t])
        torch.sub(u[t], z[t], alpha=TH, out=v)
    return z, u, v


def torch_bwd(u, dz, dvT):
    s = 1.0 / (25.0 * (u - TH).abs() + 1.0) ** 2  # fast sigmoid
    a, c = dz * s, 1.0 - TH * s
    du, g = torch.empty_like(u), dvT.clone()
    for t in range(u.shape[0] - 1, -1, -1):
        torch.addcmul(a[t], c[t], g, out=du[t])
        torch.mul(du[t], BETA, out=g)
    return du, g


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes)")
    ap.add_argument("--load-inline", action="store_true", help="also build a load_inline module")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    i = torch.randn(L, B, H, generator=g) * 0.5
    v0 = torch.zeros(B, H)
    dz, dvT = torch.randn(L, B, H, generator=g), torch.randn(B, H, generator=g)
    res = {"shape": [L, B, H], "torch_version": torch.__version__, "threads": 1}

    z_ref, u_ref, _ = torch_fwd(i, v0)
    res["torch"] = {"fwd": timeit(lambda: torch_fwd(i, v0)), "bwd": timeit(lambda: torch_bwd(u_ref, dz, dvT))}

    from sparsebptt.cells.lif import LIFParams
    from sparsebptt.kernels import cbuild
    from sparsebptt.kernels.lif import cpu
    with tempfile.TemporaryDirectory() as d:  # a cold cache: time the build
        os.environ["SPARSEBPTT_CACHE_DIR"] = d
        t0 = time.perf_counter()
        cbuild.build_file("sparsebptt_lif_timing", cpu.C_SOURCE)
        build_s = time.perf_counter() - t0
        del os.environ["SPARSEBPTT_CACHE_DIR"]
    p = LIFParams(beta=BETA, threshold=TH)
    z, u, _ = cpu._lif_fwd(i, v0, BETA, p, save_u=True)
    assert torch.equal(z, z_ref), "C forward differs from the torch loop"
    res["C"] = {"build_s": build_s, "fwd": timeit(lambda: cpu._lif_fwd(i, v0, BETA, p, save_u=True)),
                "bwd": timeit(lambda: cpu._lif_bwd(u, dz, dvT, None, BETA, p, False))}

    try:
        import numba
        import numpy as np
    except ImportError as e:
        res["numba"] = {"skipped": f"not importable ({e})"}
    else:
        @numba.njit(cache=False)
        def nb_fwd(i, v0, beta, th, z, u, v):
            v[:] = v0
            for t in range(i.shape[0]):
                for b in range(i.shape[1]):
                    for h in range(i.shape[2]):
                        uu = beta * v[b, h] + i[t, b, h]
                        s = np.float32(1.0) if uu > th else np.float32(0.0)
                        z[t, b, h] = s
                        u[t, b, h] = uu
                        v[b, h] = uu - s * th

        def nb_call():
            z, u, v = torch.empty_like(i), torch.empty_like(i), torch.empty_like(v0)
            nb_fwd(i.numpy(), v0.numpy(), np.float32(BETA), np.float32(TH), z.numpy(), u.numpy(), v.numpy())
            return z, u, v
        t0 = time.perf_counter()
        nb_fwd(i[:2].numpy(), v0.numpy(), np.float32(BETA), np.float32(TH), *(torch.empty(2, B, H).numpy()
                                                                              for _ in range(2)),
               torch.empty(B, H).numpy())
        res["numba"] = {"version": numba.__version__, "jit_s": time.perf_counter() - t0,
                        "fwd": timeit(nb_call)}

    if args.compile:
        @torch.compile(dynamic=False)
        def step(it, v):
            uu = BETA * v + it
            zz = (uu > TH).to(uu.dtype)
            return zz, uu, uu - zz * TH

        def tc_fwd():
            v, zs, us = v0, torch.empty_like(i), torch.empty_like(i)
            for t in range(L):
                zz, uu, v = step(i[t], v)
                zs[t], us[t] = zz, uu
        t0 = time.perf_counter()
        step(i[0], v0)
        res["torch.compile"] = {"compile_s": time.perf_counter() - t0, "fwd": timeit(tc_fwd, 3)}

    if args.load_inline:
        from torch.utils.cpp_extension import load_inline
        src = "#include <torch/extension.h>\n" + cbuild.source(cpu.C_SOURCE) + "\nint probe() { return 1; }\n"
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            load_inline("lif_routes_probe", cpp_sources=[src], functions=["probe"], build_directory=d,
                        extra_cflags=["-O3", "-ffp-contract=off"])
            res["load_inline"] = {"build_s": time.perf_counter() - t0}

    for k, v in res.items():
        print(k, v)
    out = os.path.join(HERE, "results", "lif_routes.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
