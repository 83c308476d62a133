"""Triton EGRU kernels against the reference (`naive_egru`, the cell with backend="torch"): on CPU
in Triton's interpreter (TRITON_INTERPRET=1, tiny shapes, the default suite), and on a CUDA
device when there is one (marked ``gpu``). Backend selection and input checks.

Tolerances: float64 1e-9 absolute; float32 1e-5 relative to the tensor's largest magnitude
(`sparsebptt.testing.TOLERANCES`). Inputs are checked to keep every unit at least 1e-5 away
from its threshold, so both sides see the same events.

Triton is optional: without it this module is skipped with the reason.
"""
from __future__ import annotations

import logging

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")

import sparsebptt as sb  # noqa: E402
from sparsebptt.cells.egru import _pointwise, egru_step  # noqa: E402
from sparsebptt.kernels import backend as kb  # noqa: E402
from sparsebptt.kernels.egru.naive import naive_egru  # noqa: E402
from sparsebptt.kernels.egru.triton import fused_recurrent_egru  # noqa: E402
from sparsebptt.testing import assert_close, seeded  # noqa: E402

kb._probes.pop("triton", None)  # probe again now that the interpreter is on
DEV = "cuda" if CUDA else "cpu"
N_IN = 3
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
MARGIN = 1e-5  # smallest |c~ - threshold| the inputs may reach (rounding differences: ~1e-7)


def _tol(dtype):
    return {"atol": 1e-9} if dtype == torch.float64 else {}


def _params(dtype, H, n_in=N_IN, bias=True, seed=3, device=DEV):
    """(W_ih, W_hh, b_ih, b_hh, threshold) as EGRU draws them; thresholds around 0.15."""
    torch.manual_seed(seed)
    cell = sb.cells.EGRU(n_in, H, threshold_init=0.15, bias=bias, backend="torch")
    with torch.no_grad():
        cell.threshold.add_(0.05 * seeded(seed, H, dtype=torch.float32))
    cell = cell.to(dtype=dtype, device=device)
    return [p.detach() if p is not None else None
            for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, cell.threshold)]


def _stats(x, state, params, epsilon=0.5):
    """(smallest |c~ - threshold|, event rate, share within epsilon of the threshold) along a
    reference run."""
    w_ih, w_hh, b_ih, b_hh, thr = params
    c, y = state[0], state[1]
    m, fired, near, n = float("inf"), 0.0, 0.0, 0
    with torch.no_grad():
        for t in range(x.shape[0]):
            gi = torch.nn.functional.linear(x[t], w_ih, b_ih)
            gh = torch.nn.functional.linear(y, w_hh, b_hh)
            y, c, _, v = _pointwise(gi, gh, c, thr, 0.7, epsilon)
            m = min(m, float(v.abs().min()))
            fired += float((v > 0).double().mean())
            near += float((v.abs() < epsilon).double().mean())
            n += 1
    return m, fired / n, near / n


def _kernel_case(dtype, T, B, H, *, bias=True, count=False, device=DEV, epsilon=0.5, margin=MARGIN):
    params = _params(dtype, H, bias=bias, device=device)
    x = seeded(0, T, B, N_IN, dtype=dtype).to(device)
    state = [(0.3 * seeded(1 + i, B, H, dtype=dtype)).to(device) for i in range(2)]
    if count:
        state.append(seeded(9, B, H, dtype=dtype, kind="uniform").mul(3).floor().to(device))
    m, rate, near = _stats(x, state, params, epsilon)
    assert m > margin, f"inputs come within {m:.2e} of the threshold; pick other seeds"
    assert 0 < rate < 1, rate  # events and silent units
    outs = []
    for fn in (naive_egru, fused_recurrent_egru):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *state, *params)]
        s = tuple(leaves[1:1 + len(state)])
        ys, new = fn(leaves[0], s, *leaves[1 + len(state):], epsilon=epsilon)
        assert len(new) == len(state)
        loss = (ys * seeded(4, *ys.shape, dtype=dtype).to(device)).sum()
        for i, st in enumerate(new):
            loss = loss + (st * seeded(5 + i, *st.shape, dtype=dtype).to(device)).sum()
        loss.backward()
        outs.append([ys, *new] + [t.grad if t is not None else None for t in leaves])
    names = (["ys", "c_T", "y_T"] + (["n_T"] if count else []) + ["dx", "dc0", "dy0"] + (["dn0"] if count else [])
             + ["dweight_ih", "dweight_hh", "dbias_ih", "dbias_hh", "dthreshold"])
    for name, a, b in zip(names, *outs):
        assert_close(name, a, b, dtype, **_tol(dtype))
    return rate, near


# ---- the kernels against naive_egru -------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("T", [1, 7, 100], ids=lambda t: f"T{t}")
def test_triton_kernel_matches_naive(T, dtype):
    """Outputs, final state and every gradient (x, c0, y0, weights, biases, threshold)."""
    rate, near = _kernel_case(dtype, T, 2, 5)
    if T > 1:  # the pseudo-derivative is active somewhere, and zero somewhere
        assert 0 < near < 1, near


@pytest.mark.parametrize("H,T,B", [(1, 5, 3), (130, 3, 1)], ids=lambda v: str(v))
def test_triton_kernel_block_edges(H, T, B):
    """H=1 (one unit, BH=1) and H=130 (two blocks of 128 units, the second masked)."""
    _kernel_case(torch.float64, T, B, H)


def test_triton_kernel_no_bias_event_counts_narrow_epsilon():
    """No biases, the event-count state (c, y, n) and its gradient, epsilon 0.1."""
    _kernel_case(torch.float64, 7, 3, 5, bias=False, count=True, epsilon=0.1)


# ---- the cell under every strategy -------------------------------------------------------------

def _cell(backend, dtype, H=5, count=False, device=DEV):
    torch.manual_seed(3)
    cell = sb.cells.EGRU(N_IN, H, threshold_init=0.15, backend=backend, count_events=count)
    with torch.no_grad():
        cell.threshold.add_(0.05 * seeded(3, H, dtype=torch.float32))
    return cell.to(dtype=dtype, device=device)


def _run(cell, x, state0, strategy, reduce=None):
    x = x.clone().requires_grad_()
    state0 = tuple(s.clone().requires_grad_() for s in state0)
    cell.zero_grad(set_to_none=True)
    out, state = sb.scan(cell, x, state0, strategy=strategy, reduce=reduce)
    loss = (out * seeded(100, *out.shape, dtype=x.dtype).to(x.device)).sum()
    for i, s in enumerate(state):
        loss = loss + (s * seeded(200 + i, *s.shape, dtype=x.dtype).to(x.device)).sum()
    loss.backward()
    res = {"out": out.detach(), "dx": x.grad}
    res.update({f"state_T[{i}]": s.detach() for i, s in enumerate(state)})
    res.update({f"dstate0[{i}]": s.grad for i, s in enumerate(state0)})
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    return res


def _compare(ref, got, dtype):
    assert ref.keys() == got.keys()
    for name in ref:
        assert_close(name, ref[name], got[name], dtype, **_tol(dtype))


STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=3), sb.Revolve(slots=2)]


@DTYPES
@pytest.mark.parametrize("T", [1, 7, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
def test_triton_cell_under_strategies(strategy, T, dtype):
    """backend="triton" under Full, Checkpoint(3) and Revolve(2) equals backend="torch" under
    FullBPTT: outputs, final state, dx, dstate0 and every parameter gradient."""
    ref, fast = _cell("torch", dtype), _cell("triton", dtype)
    assert fast.active_backend == "triton" and fast.scan_segment is not None
    x = seeded(0, T, 2, N_IN, dtype=dtype).to(DEV)
    s0 = [(0.3 * seeded(1 + i, 2, 5, dtype=dtype)).to(DEV) for i in range(2)]
    assert _stats(x, s0, [p.detach() for p in ref._params()])[0] > MARGIN
    _compare(_run(ref, x, s0, sb.FullBPTT()), _run(fast, x, s0, strategy), dtype)


def test_triton_cell_count_events_reduce_and_step():
    """count_events with the activity regulariser under Checkpoint, reduce="mean"; the step
    path (a segment of one step) equals the reference step."""
    dtype, T = torch.float64, 9
    res = {}
    for backend in ("torch", "triton"):
        cell = _cell(backend, dtype, count=True)
        x = seeded(0, T, 2, N_IN, dtype=dtype).to(DEV).requires_grad_()
        y, state = sb.scan(cell, x, cell.initial_state(2, device=DEV, dtype=dtype),
                           strategy=sb.Checkpoint(every=4), reduce="mean")
        reg = sb.cells.activity_regularizer(cell, state, T, target=0.05)
        ((y * seeded(3, *y.shape, dtype=dtype).to(DEV)).sum() + 2.0 * reg).backward()
        res[backend] = {"y": y.detach(), "count": state[2].detach(), "reg": reg.detach(), "dx": x.grad,
                        **{f"d{n}": p.grad for n, p in cell.named_parameters()}}
    assert float(res["triton"]["reg"]) > 0
    _compare(res["torch"], res["triton"], dtype)

    ref, fast = _cell("torch", dtype), _cell("triton", dtype)
    x_t = seeded(0, 2, N_IN, dtype=dtype).to(DEV)
    s = tuple((0.3 * seeded(1 + i, 2, 5, dtype=dtype)).to(DEV) for i in range(2))
    (ya, sa), (yb, sb_) = ref.step(x_t, s), fast.step(x_t, s)
    for name, a, b in zip(["y", "c", "y_state"], [ya, *sa], [yb, *sb_]):
        assert_close(name, a, b, dtype, atol=1e-12)


def test_triton_trace_counts_activity_and_macs():
    dtype, T, B, H = torch.float64, 6, 2, 5
    acts = {}
    for backend in ("torch", "triton"):
        cell = _cell(backend, dtype, H=H)
        x = seeded(0, T, B, N_IN, dtype=dtype).to(DEV)
        with sb.trace() as t:
            y, _ = sb.scan(cell, x)
            y.sum().backward()
        acts[backend] = t.activity["EGRU"]
    assert acts["torch"] == pytest.approx(acts["triton"], abs=1e-12) and 0 < acts["triton"] < 1
    assert t.forward_macs == T * B * 3 * H * (N_IN + H)  # dense: every unit, every step
    # x needs no gradient: dW_ih, dW_hh, and dL/dy for steps 1..T-1 (y0 needs none)
    assert t.backward_macs == T * B * 3 * H * (N_IN + H) + (T - 1) * B * 3 * H * H


# ---- backend selection ------------------------------------------------------------------------

def test_backend_auto_and_explicit(caplog, monkeypatch):
    monkeypatch.setattr(kb, "_resolved", {})
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        cell = sb.cells.EGRU(N_IN, 4, backend="auto")
        assert cell.active_backend == "cpu"  # CPU weights
        assert cell.active_backend == "cpu"  # resolved once
        if CUDA:
            assert cell.cuda().active_backend == "triton"
    logged = [r.getMessage() for r in caplog.records if "backend 'auto' on cpu" in r.getMessage()]
    assert len(logged) == 1, logged
    assert sb.cells.EGRU(N_IN, 4).active_backend == "cpu"  # the default (auto) on CPU weights
    assert sb.cells.EGRU(N_IN, 4, backend="torch").scan_segment is None
    assert sb.cells.EGRU(N_IN, 4, backend="triton").active_backend == "triton"


def test_backend_triton_unavailable_raises(monkeypatch):
    monkeypatch.setitem(kb._probes, "triton", (False, "no CUDA device is visible"))
    with pytest.raises(kb.BackendUnavailable, match="backend 'triton' was requested but is unavailable: no CUDA"):
        sb.cells.EGRU(N_IN, 4, backend="triton")
    cell = sb.cells.EGRU(N_IN, 4)
    cell.backend = "triton"  # switched after construction: raises at use, never falls back
    with pytest.raises(kb.BackendUnavailable, match="unavailable"):
        sb.scan(cell, torch.randn(3, 2, N_IN))
    monkeypatch.setattr(kb, "_resolved", {})
    assert kb.resolve_backend("auto", "cuda") == "torch"  # auto never picks it


def test_backend_errors():
    with pytest.raises(ValueError, match="EGRU: unknown backend 'cuda'; valid backends are: auto, torch, cpu, triton"):
        sb.cells.EGRU(N_IN, 4, backend="cuda")
    p = _params(torch.float64, 4, device="cpu")
    with pytest.raises(ValueError, match="egru_step: backend must be 'cpu' or 'torch', got 'triton'"):
        egru_step(torch.zeros(2, N_IN, dtype=torch.float64), (torch.zeros(2, 4, dtype=torch.float64),) * 2,
                  *p, backend="triton")


def test_triton_input_checks(monkeypatch):
    d = torch.float64
    p = _params(d, 4)
    x = torch.zeros(3, 2, N_IN, dtype=d, device=DEV)
    s = (torch.zeros(2, 4, dtype=d, device=DEV),) * 2
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor \[L, B, input_size\] with L >= 1, got \(2, 3\)"):
        fused_recurrent_egru(x[0], s, *p)
    with pytest.raises(ValueError, match=r"with L >= 1, got \(0, 2, 3\)"):
        fused_recurrent_egru(x[:0], s, *p)
    with pytest.raises(TypeError, match="dtype torch.float16 is not supported"):
        fused_recurrent_egru(x.half(), s, *p)
    with pytest.raises(ValueError, match=r"state\[1\] must have shape \(2, 4\)"):
        fused_recurrent_egru(x, (s[0], s[1][:, :3]), *p)
    with pytest.raises(ValueError, match=r"state must be \(c, y\) or \(c, y, n\), got tuple of 1"):
        fused_recurrent_egru(x, s[:1], *p)
    with pytest.raises(ValueError, match=r"weight_ih must have shape \(12, 3\)"):
        fused_recurrent_egru(x, s, p[0][:, :2], *p[1:])
    with pytest.raises(ValueError, match=r"weight_hh must be \[3H, H\], got \(12, 3\)"):
        fused_recurrent_egru(x, s, p[0], p[1][:, :3], *p[2:])
    with pytest.raises(TypeError, match="threshold is torch.float32 on .* but x is torch.float64"):
        fused_recurrent_egru(x, s, *p[:4], p[4].float())
    with pytest.raises(ValueError, match="give both biases or neither"):
        fused_recurrent_egru(x, s, p[0], p[1], None, p[3], p[4])
    if CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            fused_recurrent_egru(x.cpu(), tuple(t.cpu() for t in s), *(t.cpu() for t in p))
    else:
        monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
        with pytest.raises(ValueError, match="the triton backend needs CUDA tensors .* use backend='cpu' on CPU"):
            fused_recurrent_egru(x, s, *p)


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@DTYPES
def test_triton_on_gpu_large(dtype):
    """On the GPU, T=200, B=4, H=200 (two blocks of 128 units, masked): the kernels against
    naive_egru, and the cell under Full and Checkpoint against backend="torch". 160k (step,
    sample, unit) values come within 5.7e-6 of the threshold (float32; 7.9e-6 float64), still
    far above the float32 rounding differences (~1e-7)."""
    margin = 2e-6 if dtype == torch.float32 else 1e-9
    _kernel_case(dtype, 200, 4, 200, device="cuda", margin=margin)
    ref, fast = _cell("torch", dtype, H=200, device="cuda"), _cell("triton", dtype, H=200, device="cuda")
    x = seeded(0, 200, 4, N_IN, dtype=dtype).cuda()
    s0 = [(0.3 * seeded(1 + i, 4, 200, dtype=dtype)).cuda() for i in range(2)]
    assert _stats(x, s0, [p.detach() for p in ref._params()])[0] > margin
    expect = _run(ref, x, s0, sb.FullBPTT())
    for st in (sb.FullBPTT(), sb.Checkpoint(every=17)):
        _compare(expect, _run(fast, x, s0, st), dtype)
