"""Triton LIF kernels against the reference: on CPU in Triton's interpreter (TRITON_INTERPRET=1,
small shapes, the default suite), and on a CUDA device when there is one (marked ``gpu``).

Triton is optional: without it this module is skipped with the reason.
"""
from __future__ import annotations


import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")

import sparsebptt as sb  # noqa: E402
from sparsebptt.cells.lif import LIFParams  # noqa: E402
from sparsebptt.kernels import backend as kb  # noqa: E402
from sparsebptt.kernels.lif.naive import naive_recurrent_lif  # noqa: E402
from sparsebptt.kernels.lif.triton import fused_recurrent_lif, fused_recurrent_lif_layer  # noqa: E402
from sparsebptt.testing import assert_close, seeded  # noqa: E402

from test_kernels_lif import CONFIGS, _cid, compare, inputs, make_pair, rec_inputs, run  # noqa: E402

kb._probes.pop("triton", None)  # probe again now that the interpreter is on
DEV = "cuda" if CUDA else "cpu"


def _kernel_case(dtype, T, B, H, device, **kw):
    p = LIFParams(threshold=0.7, **kw)
    i = seeded(1, T, B, H, dtype=dtype).to(device)
    v0 = (0.3 * seeded(2, B, H, dtype=dtype)).to(device)
    beta = (0.6 + 0.3 * seeded(3, H, dtype=dtype, kind="uniform")).to(device)
    outs = []
    for fn in (naive_recurrent_lif, fused_recurrent_lif):
        leaves = [t.clone().requires_grad_() for t in (i, v0, beta)]
        z, v = fn(*leaves, p)
        loss = (z * seeded(4, *z.shape, dtype=dtype).to(device)).sum() + \
            (v * seeded(5, *v.shape, dtype=dtype).to(device)).sum()
        loss.backward()
        outs.append([z, v] + [t.grad for t in leaves])
    for name, a, b in zip(["z", "vT", "di", "dv0", "dbeta"], *outs):
        assert_close(name, a, b, dtype)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c["learn_beta"]], ids=_cid)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_kernel_matches_naive(cfg, dtype):
    cfg = {k: v for k, v in cfg.items() if k != "learn_beta"}
    _kernel_case(dtype, 9, 3, 60, DEV, **cfg)  # 180 neurons: two blocks, the second one masked


@pytest.mark.parametrize("T,B", [(1, 1), (2, 3), (63, 1)], ids=lambda v: str(v))
def test_triton_kernel_shapes(T, B):
    _kernel_case(torch.float64, T, B, 11, DEV, reset="zero")


@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=5), sb.Revolve(slots=3)],
                         ids=lambda s: s.to_string())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_lif_cell_under_strategies(strategy, dtype):
    ref, fast = make_pair(dtype, h=20, backend="triton", device=DEV, learn_beta=True, reset="zero")
    assert fast.active_backend == "triton" and fast.scan_segment is not None
    x, v0 = inputs(ref, 23, 2, dtype)
    compare(run(ref, x, v0, sb.FullBPTT()), run(fast, x, v0, strategy), dtype)


def test_triton_input_checks():
    p = LIFParams()
    with pytest.raises(ValueError, match="must be a 3-D tensor"):
        fused_recurrent_lif(torch.zeros(2, 5, device=DEV), torch.zeros(2, 5, device=DEV), 0.9, p)
    with pytest.raises(TypeError, match="dtype torch.float16 is not supported"):
        fused_recurrent_lif(torch.zeros(3, 2, 5, device=DEV).half(), torch.zeros(2, 5, device=DEV).half(), 0.9, p)
    with pytest.raises(ValueError, match=r"v0 must have shape \(2, 5\)"):
        fused_recurrent_lif(torch.zeros(3, 2, 5, device=DEV), torch.zeros(5, device=DEV), 0.9, p)
    with pytest.raises(ValueError, match=r"tensor beta must have shape \(5,\)"):
        fused_recurrent_lif(torch.zeros(3, 2, 5, device=DEV), torch.zeros(2, 5, device=DEV),
                            torch.zeros(4, device=DEV), p)
    if CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            fused_recurrent_lif(torch.zeros(3, 2, 5), torch.zeros(2, 5), 0.9, p)


# ---- recurrent weights: a cuBLAS addmm for V z_{t-1} and one Triton launch per step ---------------
def _run_rec(cell, x, state0, strategy):
    """Forward + backward of a recurrent LIF on DEV; outputs, every gradient, trace counters."""
    x = x.to(DEV).requires_grad_()
    state0 = tuple(s.to(DEV).requires_grad_() for s in state0)
    cell.zero_grad(set_to_none=True)
    with sb.trace() as t:
        out, state = sb.scan(cell, x, state0, strategy=strategy)
        loss = (out * seeded(100, *out.shape, dtype=x.dtype).to(DEV)).sum()
        for k, s in enumerate(state):
            loss = loss + (s * seeded(101 + k, *s.shape, dtype=x.dtype).to(DEV)).sum()
        loss.backward()
    res = {"out": out.detach(), "vT": state[0].detach(), "zT": state[1].detach(), "dx": x.grad,
           "dv0": state0[0].grad, "dz0": state0[1].grad}
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    counters = {k: getattr(t, k) for k in ("forward_steps", "recomputed_steps", "forward_macs",
                                           "recomputed_macs", "backward_macs")}
    return res, counters, t.activity


@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=5), sb.Revolve(slots=3)],
                         ids=lambda s: s.to_string())
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[-1]], ids=_cid)  # subtract and zero+detach, learnable beta
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_recurrent_lif_under_strategies(dtype, cfg, strategy):
    ref, fast = make_pair(dtype, h=20, backend="triton", recurrent=True, **cfg)
    fast.to(DEV)
    assert fast.active_backend == "triton" and fast.scan_segment is not None
    for T in (1, 23):
        x, s0 = rec_inputs(ref, T, 2, dtype)
        expect, c_ref, act_ref = _run_rec(ref.to(DEV), x, s0, sb.FullBPTT())
        got, c_got, act_got = _run_rec(fast, x, s0, strategy)
        compare(expect, got, dtype)
        if isinstance(strategy, sb.FullBPTT):
            assert c_ref == c_got and act_ref == pytest.approx(act_got)
        ref.cpu()


def test_triton_recurrent_lif_layer_no_grad_and_checks():
    p = LIFParams(threshold=0.6)
    ref, fast = make_pair(torch.float64, h=9, backend="triton", recurrent=True, reset="zero", threshold=0.6)
    x, (v0, z0) = rec_inputs(ref, 11, 2, torch.float64)
    with torch.no_grad():
        y_ref, s_ref = sb.scan(ref, x, (v0, z0))
        y, s = sb.scan(fast.to(DEV), x.to(DEV), (v0.to(DEV), z0.to(DEV)))
    assert_close("out", y_ref, y.cpu())
    for k in range(2):
        assert_close(f"state[{k}]", s_ref[k], s[k].cpu())
    w, V = torch.zeros(4, 3, device=DEV), torch.zeros(4, 4, device=DEV)
    x, v0 = torch.zeros(5, 2, 3, device=DEV), torch.zeros(2, 4, device=DEV)
    with pytest.raises(ValueError, match=r"weight must be a 2-D tensor \[H, in\], got \(4,\)"):
        fused_recurrent_lif_layer(x, v0, v0, w[:, 0], None, V, 0.9, p)
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor \[L, B, 3\], got \(5, 2, 2\)"):
        fused_recurrent_lif_layer(x[..., :2], v0, v0, w, None, V, 0.9, p)
    with pytest.raises(ValueError, match=r"recurrent weight must be a torch.float32 tensor .* of shape \(4, 4\)"):
        fused_recurrent_lif_layer(x, v0, v0, w, None, V[:3], 0.9, p)
    with pytest.raises(ValueError, match=r"z0 must be a torch.float32 tensor"):
        fused_recurrent_lif_layer(x, v0, v0.double(), w, None, V, 0.9, p)
    with pytest.raises(TypeError, match="dtype torch.float16 is not supported"):
        fused_recurrent_lif_layer(x.half(), v0.half(), v0.half(), w.half(), None, V.half(), 0.9, p)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_recurrent_on_gpu_large(dtype):
    """On the GPU, a recurrent LIF with T=200, B=4, H=200: Full and Checkpoint."""
    ref, fast = make_pair(dtype, n_in=7, h=200, backend="triton", recurrent=True, learn_beta=True)
    x, s0 = rec_inputs(ref, 200, 4, dtype)
    expect, _, _ = _run_rec(ref.to(DEV), x, s0, sb.FullBPTT())
    fast.to(DEV)
    for st in (sb.FullBPTT(), sb.Checkpoint(every=17)):
        compare(expect, _run_rec(fast, x, s0, st)[0], dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[7], CONFIGS[-1]], ids=_cid)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_on_gpu_large(cfg, dtype):
    """On the GPU, T=200, B=4, H=200 (two blocks of 128 per row, masked): Full and Checkpoint."""
    ref, fast = make_pair(dtype, n_in=7, h=200, backend="triton", device="cuda", **cfg)
    x, v0 = inputs(ref, 200, 4, dtype, margin=2e-5)
    expect = run(ref, x, v0, sb.FullBPTT())
    for st in (sb.FullBPTT(), sb.Checkpoint(every=17)):
        compare(expect, run(fast, x, v0, st), dtype)
