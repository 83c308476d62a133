"""Fused LIF kernels (backend="cpu") against the reference step path (backend="torch").

Oracle chain: `lif_step` is the reference (tests/test_cells.py); here the fused CPU path must give
its outputs, final state and every gradient (x, v0, weight, bias, beta) under every exact strategy
and inside a Stack, with the same trace counters. Inputs are seeded and random; seeds whose
membrane comes within `MARGIN` of the threshold are skipped, so no spike flips on rounding.
"""
from __future__ import annotations

import itertools
import logging

import pytest
import torch

import sparsebptt as sb
from sparsebptt.cells.lif import LIFParams
from sparsebptt.kernels import backend as kb
from sparsebptt.kernels import cbuild
from sparsebptt.kernels.lif.cpu import fused_recurrent_lif
from sparsebptt.kernels.lif.naive import naive_recurrent_lif
from sparsebptt.cells.surrogate import surrogate_derivative
from sparsebptt.testing import TOLERANCES, assert_close, scan_grads, seeded

pytestmark = pytest.mark.skipif(not kb.backend_available("cpu")[0],
                                reason=f"cpu backend unavailable: {kb.backend_available('cpu')[1]}")

N_IN, H = 7, 60  # H off any block size
MARGIN = 1e-4  # |u - threshold| of every step, in the float64 reference
CONFIGS = [dict(reset=r, surrogate=s, detach_reset=d, learn_beta=lb)
           for r, s, d, lb in itertools.product(("subtract", "zero"), ("fast_sigmoid", "atan", "triangle"),
                                                 (False, True), (False, True))]
# the peers' defaults: snnTorch's reset after the decay, SpikingJelly's sigmoid surrogate
CONFIGS += [dict(reset=r, surrogate="sigmoid", detach_reset=d, learn_beta=lb, reset_timing="after_decay")
            for r, d, lb in itertools.product(("subtract", "zero"), (False, True), (False, True))]
CONFIGS += [dict(reset=r, surrogate="sigmoid", detach_reset=False, learn_beta=True) for r in ("subtract", "zero")]
CONFIGS += [dict(reset=r, surrogate="atan", detach_reset=False, learn_beta=False, reset_timing="after_decay")
            for r in ("subtract", "zero")]


def _after(c) -> bool:
    return c.get("reset_timing", "before_decay") == "after_decay"


def _cid(c):
    return f"{c['reset']}-{c['surrogate']}" + ("-detach" if c["detach_reset"] else "") + \
        ("-learnbeta" if c["learn_beta"] else "") + ("-afterdecay" if _after(c) else "")


def make_pair(dtype, n_in=N_IN, h=H, backend="cpu", device="cpu", **kw):
    """A reference LIF and a fused one with the same parameters (beta perturbed when learnable)."""
    torch.manual_seed(0)
    kw = {"beta": 0.85, "threshold": 0.6, **kw}
    ref = sb.cells.LIF(n_in, h, backend="torch", **kw).to(dtype)
    if ref.beta is not None:
        with torch.no_grad():
            ref.beta.copy_(0.5 + 0.45 * seeded(9, h, dtype=dtype, kind="uniform"))
    fast = sb.cells.LIF(n_in, h, backend=backend, **kw).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


def _min_margin(cell, x, v0) -> float:
    """min over steps of |u_t - threshold| of the LIF ``cell`` in float64 (no graph)."""
    p = cell.params
    with torch.no_grad():
        w, b = cell.weight.double().cpu(), None if cell.bias is None else cell.bias.double().cpu()
        i = torch.nn.functional.linear(x.double(), w, b)
        beta = p.beta if cell.beta is None else cell.beta.double().cpu().clamp(0, 1)
        v, m = v0.double(), float("inf")
        after = p.reset_timing == "after_decay"
        if after:  # the first step's reset reads v0's spike
            m = (v - p.threshold).abs().min().item()
        for t in range(x.shape[0]):
            v, _, mt = _lif_step64(p, beta, v, i[t])
            m = min(m, mt)
    return m


def _lif_step64(p, beta, v, i_t):
    """One float64 LIF step of either reset timing (no graph) -> (v_t, z_t, min |u_t - threshold|)."""
    th = p.threshold
    if p.reset_timing == "after_decay":
        r = (v > th).double()
        u = beta * v + i_t - r * th if p.reset == "subtract" else beta * (v * (1 - r)) + i_t
        return u, (u > th).double(), (u - th).abs().min().item()
    u = beta * v + i_t
    z = (u > th).double()
    return (u - z * th if p.reset == "subtract" else u * (1 - z)), z, (u - th).abs().min().item()


def inputs(cell, T, B, dtype, x_kind="normal", seed=0, margin=MARGIN):
    """Seeded (x, v0) whose membrane stays ``margin`` away from the threshold at every step."""
    for s in range(seed, seed + 200, 7):
        x = seeded(s, T, B, cell.input_size, dtype=dtype, kind=x_kind)
        v0 = 0.5 * seeded(s + 1, B, cell.hidden_size, dtype=dtype)
        if _min_margin(cell, x, v0) > margin:
            return x.to(cell.weight.device), v0.to(cell.weight.device)
    raise AssertionError("no seed kept the membrane away from the threshold")  # pragma: no cover


def run(cell, x, v0, strategy=None, reduce=None):
    """Forward + backward with loss (out*dout).sum() + (vT*dvT).sum(); outputs and every gradient."""
    x = x.clone().requires_grad_()
    v0 = v0.clone().requires_grad_()
    for p in cell.parameters():
        p.grad = None
    out, state = sb.scan(cell, x, (v0,), strategy=strategy, reduce=reduce)
    loss = (out * seeded(100, *out.shape, dtype=x.dtype).to(x.device)).sum() + \
        (state[-1] * seeded(101, *state[-1].shape, dtype=x.dtype).to(x.device)).sum()
    loss.backward()
    res = {"out": out.detach(), "vT": state[-1].detach(), "dx": x.grad, "dv0": v0.grad}
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    return res


def compare(ref, got, dtype, slack=None):
    """Every output and gradient; ``slack`` (name -> extra absolute error allowed) adds
    `current_rounding_slack`'s bound to the dtype's tolerance."""
    assert ref.keys() == got.keys()
    slack = slack or {}
    for name in ref:
        a0, r0 = TOLERANCES[dtype]
        assert_close(name, ref[name], got[name], dtype, atol=a0 + slack.get(name, 0.0), rtol=r0)


def current_rounding_slack(cell, x, v0) -> dict[str, float]:
    """How far the float32 gradients of a feed-forward LIF may move when the input currents are
    summed in another order: a first-order error bound, computed in float64 from the test's tensors.

    The fused path computes the currents of a segment as one matmul ``[L*B, in] @ W^T`` and the
    reference as one ``[B, in] @ W^T`` per step. Both are correct; BLAS picks a different kernel
    (vector width, blocking, hence summation order) for the two shapes and for each CPU: MKL's
    AVX2 path (``MKL_ENABLE_INSTRUCTIONS=AVX2``, what MKL runs on AMD CPUs) gives currents
    that differ by an ulp, Intel's AVX-512 path gives equal ones. Summing K = in + 2 terms
    (the bias and the final rounding included) in any order, each result is within
    ``gamma_K * (|x| @ |W|^T + |b|)`` of the exact sum (``gamma_K = K eps / (1 - K eps)``), so
    the two differ by at most ``Delta_t = 2 gamma_K (|x_t| @ |W|^T + |b|)``. No spike flips
    (`MARGIN` >> Delta), so the difference propagates linearly:

        forward:  D_t  = |beta| a_{t-1} D_{t-1} + Delta_t        (|du_t|, a = 1 or 1 - z for reset="zero")
        backward: E_t  = |d du_t / d g_t| |beta| E_{t+1} + |d du_t / d u_t| D_t   (E: |d du_t|)

    with ``d du_t / d u_t`` holding the surrogate's slope ``s'`` (50 for fast_sigmoid at scale 25:
    the amplifier that turns one ulp of current into ~1e-5 of dv0). The bound of each gradient
    follows from E (dv0 = beta du_0, dx = du W, dW = du^T x, db = sum du, dbeta = sum du v_{t-1}).
    The slack is this first-order bound (the second-order terms, ~(Delta s')^2, are below 1e-10).
    It is a worst case, ~100x the differences seen; the float64 runs of the same tests keep the
    1e-10 tolerance, so a wrong kernel still fails there.
    """
    p = cell.params
    with torch.no_grad():
        W = cell.weight.double().cpu()
        b = None if cell.bias is None else cell.bias.double().cpu()
        beta = torch.full((W.shape[0],), p.beta, dtype=torch.float64) if cell.beta is None \
            else cell.beta.double().cpu().clamp(0, 1)
        x64, v = x.double().cpu(), v0.double().cpu()
        L, th = x.shape[0], p.threshold
        K = x.shape[-1] + 2
        eps = 2.0 ** -24
        gamma = K * eps / (1 - K * eps)
        delta = 2 * gamma * (x64.abs() @ W.abs().t() + (0 if b is None else b.abs()))
        i = torch.nn.functional.linear(x64, W, b)
        us, zs, vs, Ds, Dvs = [], [], [v], [], [torch.zeros_like(v)]
        for t in range(L):
            u = beta * v + i[t]
            z = (u > th).double()
            v = u - z * th if p.reset == "subtract" else u * (1 - z)
            a = 1.0 if p.reset == "subtract" else 1 - z
            Ds.append(beta.abs() * Dvs[-1] + delta[t])
            us.append(u), zs.append(z), vs.append(v), Dvs.append(Ds[-1] * a)
        dz = seeded(100, L, *v.shape, dtype=x.dtype).double()  # as `run`'s loss
        g = seeded(101, *v.shape, dtype=x.dtype).double()
        Eg = torch.zeros_like(v)
        scale = p.surrogate_scale
    dus, Edus = [None] * L, [None] * L
    Edbeta = torch.zeros_like(beta)
    for t in range(L - 1, -1, -1):
        d = (us[t] - th).clone().requires_grad_()
        s = surrogate_derivative(d, p.surrogate, scale)
        (sp,) = torch.autograd.grad(s.sum(), d)
        s, sp, u, z = s.detach(), sp.abs(), us[t], zs[t]
        if p.reset == "subtract":
            du = g + (dz[t] - (0 if p.detach_reset else th * g)) * s
            dgain = 1 if p.detach_reset else (1 - th * s).abs()
            Edu = Eg * dgain + (dz[t] - (0 if p.detach_reset else th * g)).abs() * sp * Ds[t]
        elif p.detach_reset:
            du = g * (1 - z) + dz[t] * s
            Edu = Eg * (1 - z) + dz[t].abs() * sp * Ds[t]
        else:
            du = g * (1 - z) + (dz[t] - u * g) * s
            Edu = Eg * (1 - z - u * s).abs() + ((dz[t] - u * g).abs() * sp + (g * s).abs()) * Ds[t]
        Edbeta += (Edu * vs[t].abs() + du.abs() * Dvs[t]).sum(0)
        dus[t], Edus[t] = du, Edu
        g, Eg = beta * du, beta.abs() * Edu
    Edu = torch.stack(Edus)  # [L, B, H]
    bound = {"out": 0.0, "vT": Dvs[-1].max().item(), "dx": (Edu @ W.abs()).max().item(),
             "dv0": Eg.max().item(), "dweight": (Edu.reshape(-1, W.shape[0]).t() @ x64.abs().reshape(-1, W.shape[1])).max().item(),
             "dbias": Edu.sum((0, 1)).max().item(), "dbeta": Edbeta.max().item()}
    return bound


# ---- the fused path equals the step path -------------------------------------------------------
# float32 with a reset after the decay: `current_rounding_slack` models the default timing only, so
# those configs are compared from the same currents (test_kernel_matches_naive_every_config)
@pytest.mark.parametrize("cfg,dtype", [(c, d) for c in CONFIGS for d in (torch.float64, torch.float32)
                                       if d == torch.float64 or not _after(c)],
                         ids=lambda v: _cid(v) if isinstance(v, dict) else {torch.float64: "fp64"}.get(v, "fp32"))
def test_fused_equals_reference_every_config(cfg, dtype):
    ref, fast = make_pair(dtype, **cfg)
    x, v0 = inputs(ref, 63, 3, dtype)
    got = run(fast, x, v0)
    expect = run(ref, x, v0)
    compare(expect, got, dtype, current_rounding_slack(ref, x, v0))
    if cfg["learn_beta"]:
        assert got["dbeta"] is not None and got["dbeta"].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_kind", ["normal", "spikes"])
@pytest.mark.parametrize("T,B", [(1, 1), (1, 3), (2, 1), (2, 3), (63, 1), (63, 3)],
                         ids=lambda v: str(v))
def test_fused_equals_reference_shapes(T, B, x_kind, dtype):
    for cfg in (dict(reset="subtract", learn_beta=True), dict(reset="zero", surrogate="atan")):
        ref, fast = make_pair(dtype, **cfg)
        x, v0 = inputs(ref, T, B, dtype, x_kind)
        compare(run(ref, x, v0), run(fast, x, v0), dtype, current_rounding_slack(ref, x, v0))


def test_float32_forward_is_bitwise():
    """Same currents, same rounding: the fused forward equals the reference bit for bit."""
    ref, fast = make_pair(torch.float32, learn_beta=True, reset="zero")
    x, v0 = inputs(ref, 63, 3, torch.float32)
    i = torch.nn.functional.linear(x, ref.weight, ref.bias).detach()
    beta = ref.beta.clamp(0, 1).detach()
    z_ref, v_ref = naive_recurrent_lif(i, v0, beta, ref.params)
    z, v = fused_recurrent_lif(i, v0, beta, ref.params)
    assert torch.equal(z, z_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=5), sb.Revolve(slots=3),
                                      sb.DoubleCheckpoint(outer=16, inner=4),
                                      sb.DoubleCheckpoint(outer=16, inner=4, outer_storage="disk")],
                         ids=lambda s: s.to_string() + getattr(s, "outer_storage", ""))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_under_every_exact_strategy(strategy, dtype):
    ref, fast = make_pair(dtype, learn_beta=True, surrogate="triangle")
    x, v0 = inputs(ref, 63, 3, dtype)
    expect = run(ref, x, v0, sb.FullBPTT())
    compare(expect, run(fast, x, v0, strategy), dtype, current_rounding_slack(ref, x, v0))


@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=5), sb.Revolve(slots=3),
                                      sb.DoubleCheckpoint(outer=16, inner=4)], ids=lambda s: s.to_string())
@pytest.mark.parametrize("recurrent", [False, True], ids=["ff", "recurrent"])
def test_fused_after_decay_sigmoid_under_exact_strategies(strategy, recurrent):
    """The peers' defaults (reset after the decay, sigmoid surrogate) on the fused path, recomputed
    from checkpoints: the state v is the membrane before its reset, so a restored v re-fires."""
    cfg = dict(reset_timing="after_decay", surrogate="sigmoid", learn_beta=True, recurrent=recurrent)
    ref, fast = make_pair(torch.float64, **cfg)
    if recurrent:
        x, s0 = rec_inputs(ref, 37, 2, torch.float64)
        expect, _, _ = run_rec(ref, x, s0, sb.FullBPTT())
        got, _, _ = run_rec(fast, x, s0, strategy)
        compare(expect, got, torch.float64)
    else:
        x, v0 = inputs(ref, 37, 2, torch.float64)
        compare(run(ref, x, v0, sb.FullBPTT()), run(fast, x, v0, strategy), torch.float64)


@pytest.mark.parametrize("reduce", ["sum", "mean", "last"])
@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=10)], ids=lambda s: s.to_string())
def test_fused_with_reduce(strategy, reduce):
    ref, fast = make_pair(torch.float64, reset="zero")
    x, v0 = inputs(ref, 41, 2, torch.float64)
    compare(run(ref, x, v0, sb.FullBPTT(), reduce), run(fast, x, v0, strategy, reduce), torch.float64)


def _stacks(dtype, mixed):
    torch.manual_seed(1)
    layers = {}
    for backend in ("torch", "cpu"):
        torch.manual_seed(1)
        mid = [sb.cells.GRU(24, 24, backend=backend)] if mixed else []
        layers[backend] = sb.cells.Stack(
            [sb.cells.LIF(N_IN, 24, threshold=0.3, backend=backend)] + mid +
            [sb.cells.LIF(24, 17, threshold=0.2, reset="zero", learn_beta=True, backend=backend)]).to(dtype)
    return layers["torch"], layers["cpu"]


def _run_stack(stack, x, strategy, reduce=None):
    state0 = tuple(0.3 * seeded(7 + k, *s.shape, dtype=x.dtype)
                   for k, s in enumerate(stack.initial_state(x.shape[1], dtype=x.dtype)))
    return scan_grads(stack, x, state0, strategy, reduce=reduce)[0]


@pytest.mark.parametrize("mixed", [False, True], ids=["lif-lif", "lif-gru-lif"])
@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=6), sb.Revolve(slots=3),
                                      sb.DoubleCheckpoint(outer=16, inner=4)], ids=lambda s: s.to_string())
def test_fused_inside_a_stack(strategy, mixed):
    ref, fast = _stacks(torch.float64, mixed)
    assert fast.scan_segment is not None and ref.scan_segment is None
    x = seeded(3, 37, 2, N_IN, kind="spikes", p=0.4)
    compare(_run_stack(ref, x, sb.FullBPTT()), _run_stack(fast, x, strategy), torch.float64)


# ---- trace counters ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=7), sb.Revolve(slots=3)],
                         ids=lambda s: s.to_string())
def test_trace_counters_equal_the_reference(strategy):
    ref, fast = _stacks(torch.float32, mixed=False)
    x = seeded(3, 50, 4, N_IN, dtype=torch.float32, kind="spikes", p=0.4)
    traces = []
    for stack in (ref, fast):
        with sb.trace() as t:
            _run_stack(stack, x, strategy)
        traces.append(t)
    a, b = traces
    for name in ("forward_steps", "recomputed_steps", "forward_macs", "recomputed_macs", "backward_macs"):
        assert getattr(a, name) == getattr(b, name), (name, getattr(a, name), getattr(b, name))
    assert a.activity.keys() == b.activity.keys()
    for k in a.activity:
        assert a.activity[k] == pytest.approx(b.activity[k], abs=1e-12), k
    assert b.peak_stored_bytes <= a.peak_stored_bytes, (b.peak_stored_bytes, a.peak_stored_bytes)


def test_fused_saves_one_tensor_per_step_and_layer():
    """The fused LIF keeps u [T, B, H] for its backward (the input x is the caller's)."""
    ref, fast = make_pair(torch.float32)
    x, v0 = inputs(ref, 63, 3, torch.float32)
    with sb.trace() as t:
        run(fast, x, v0)
    T, B = 63, 3
    assert t.peak_stored_bytes == T * B * H * 4


# ---- no-grad path and the kernel function ------------------------------------------------------
def test_no_grad_forward_equals_and_saves_nothing():
    ref, fast = make_pair(torch.float64, reset="zero")
    x, v0 = inputs(ref, 20, 2, torch.float64)
    with torch.no_grad():
        y_ref, s_ref = sb.scan(ref, x, (v0,))
        with sb.trace() as t:
            y, s = sb.scan(fast, x, (v0,))
    assert_close("out", y_ref, y) and assert_close("vT", s_ref[0], s[0])
    assert t.peak_stored_bytes == 0 and not y.requires_grad


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_kernel_gradients_match_naive_with_tensor_beta(reset):
    p = LIFParams(threshold=0.7, reset=reset, surrogate="fast_sigmoid")
    dtype = torch.float64
    i = seeded(1, 30, 3, 11, dtype=dtype)
    v0 = 0.3 * seeded(2, 3, 11, dtype=dtype)
    beta = 0.6 + 0.3 * seeded(3, 11, dtype=dtype, kind="uniform")
    outs = []
    for fn in (naive_recurrent_lif, fused_recurrent_lif):
        leaves = [t.clone().requires_grad_() for t in (i, v0, beta)]
        z, v = fn(*leaves, p)
        ((z * seeded(4, *z.shape, dtype=dtype)).sum() + (v * seeded(5, *v.shape, dtype=dtype)).sum()).backward()
        outs.append([z, v] + [t.grad for t in leaves])
    for name, a, b in zip(["z", "vT", "di", "dv0", "dbeta"], *outs):
        assert_close(name, a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["surrogate"] == "sigmoid" or _after(c)], ids=_cid)
def test_kernel_matches_naive_every_config(cfg, dtype):
    """The recurrence alone from the same currents (no matmul rounding): every gradient, a tensor
    beta included, for the new options (sigmoid surrogate, reset after the decay)."""
    p = LIFParams(threshold=0.7, **{k: v for k, v in cfg.items() if k != "learn_beta"})
    i = seeded(1, 30, 3, 11, dtype=dtype)
    v0 = 0.9 * seeded(2, 3, 11, dtype=dtype)  # some start above the threshold: a reset at t = 0
    beta = 0.6 + 0.3 * seeded(3, 11, dtype=dtype, kind="uniform")
    outs = []
    for fn in (naive_recurrent_lif, fused_recurrent_lif):
        leaves = [t.clone().requires_grad_() for t in (i, v0, beta if cfg["learn_beta"] else None) if t is not None]
        z, v = fn(*leaves, p) if cfg["learn_beta"] else fn(*leaves, 0.8, p)
        ((z * seeded(4, *z.shape, dtype=dtype)).sum() + (v * seeded(5, *v.shape, dtype=dtype)).sum()).backward()
        outs.append([z, v] + [t.grad for t in leaves])
    assert (v0 > 0.7).any() and outs[0][0].sum() > 0
    for name, a, b in zip(["z", "vT", "di", "dv0", "dbeta"], *outs):
        assert_close(name, a, b, dtype)


def test_after_decay_forward_is_bitwise_and_differs_from_before_decay():
    """Same currents, same rounding: bit for bit in float32; and the reset timing matters."""
    i = seeded(1, 40, 3, 13, dtype=torch.float32)
    v0 = 0.9 * seeded(2, 3, 13, dtype=torch.float32)
    for reset in ("subtract", "zero"):
        p = LIFParams(threshold=0.7, reset=reset, reset_timing="after_decay")
        z_ref, v_ref = naive_recurrent_lif(i, v0, 0.8, p)
        z, v = fused_recurrent_lif(i, v0, 0.8, p)
        assert torch.equal(z, z_ref) and torch.equal(v, v_ref)
        z_before, _ = naive_recurrent_lif(i, v0, 0.8, LIFParams(threshold=0.7, reset=reset))
        assert not torch.equal(z, z_before) or reset == "zero"


def test_only_some_outputs_used():
    """Gradient from the spikes alone, or from the final membrane alone (None grads inside)."""
    p = LIFParams(threshold=0.5)
    i = seeded(1, 9, 2, 5).requires_grad_()
    v0 = seeded(2, 2, 5).requires_grad_()
    for pick in (0, 1):
        ref = torch.autograd.grad(naive_recurrent_lif(i, v0, 0.8, p)[pick].sum(), (i, v0))
        got = torch.autograd.grad(fused_recurrent_lif(i, v0, 0.8, p)[pick].sum(), (i, v0))
        for a, b in zip(ref, got):
            assert_close(f"pick{pick}", a, b)


# ---- backend selection and errors --------------------------------------------------------------
def test_scan_segment_only_with_a_fused_backend():
    assert sb.cells.LIF(3, 4, backend="torch").scan_segment is None
    assert sb.cells.LIF(3, 4, backend="torch", recurrent=True).scan_segment is None
    cell = sb.cells.LIF(3, 4, backend="cpu")
    assert cell.scan_segment is not None and cell.active_backend == "cpu"
    assert sb.cells.LIF(3, 4, backend="auto", recurrent=True).active_backend == "cpu"
    assert "backend='cpu'" in repr(cell)


def test_auto_is_resolved_once_logged_and_queryable(monkeypatch, caplog):
    monkeypatch.setattr(kb, "_resolved", {})
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        assert kb.resolve_backend("auto", "cpu") == "cpu"
        assert kb.resolve_backend("auto", "cpu") == "cpu"
        assert sb.cells.LIF(3, 4, backend="auto").active_backend == "cpu"
    logged = [r.getMessage() for r in caplog.records if "resolved" in r.getMessage()]
    assert len(logged) == 1 and "'cpu'" in logged[0]


def test_global_default(monkeypatch):
    monkeypatch.setattr(kb, "_default", None)
    monkeypatch.delenv("SPARSEBPTT_BACKEND", raising=False)
    assert sb.get_backend() == kb.DEFAULT_BACKEND
    sb.set_backend("cpu")
    cell = sb.cells.LIF(3, 4)
    assert sb.get_backend() == "cpu" and cell.active_backend == "cpu" and cell.scan_segment is not None
    sb.set_backend("torch")
    assert cell.active_backend == "torch" and cell.scan_segment is None
    monkeypatch.setattr(kb, "_default", None)
    monkeypatch.setenv("SPARSEBPTT_BACKEND", "cpu")
    assert sb.get_backend() == "cpu"


@pytest.mark.parametrize("bad", ["cuda", "CPU", 3])
def test_unknown_backend_lists_the_valid_ones(bad):
    with pytest.raises(ValueError, match="valid backends are: auto, torch, cpu, triton"):
        sb.cells.LIF(3, 4, backend=bad)
    with pytest.raises(ValueError, match="unknown backend"):
        sb.set_backend(bad)


def test_unavailable_backend_raises(monkeypatch):
    monkeypatch.setitem(kb._probes, "cpu", (False, "no C compiler found"))
    with pytest.raises(kb.BackendUnavailable, match="'cpu' was requested but is unavailable: no C compiler"):
        sb.cells.LIF(3, 4, backend="cpu")
    with pytest.raises(kb.BackendUnavailable, match="no C compiler"):
        sb.set_backend("cpu")
    monkeypatch.setitem(kb._probes, "triton", (False, "triton is not importable"))
    with pytest.raises(kb.BackendUnavailable, match="'triton' was requested but is unavailable"):
        sb.cells.LIF(3, 4, backend="triton")


def test_auto_without_a_fused_backend_runs_torch_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(kb, "_resolved", {})
    monkeypatch.setitem(kb._probes, "cpu", (False, "no C compiler found"))
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        cell = sb.cells.LIF(3, 4, backend="auto")
        assert cell.active_backend == "torch" and cell.scan_segment is None
    # the message (issue 16): "... runs the slow 'torch' reference: the 'cpu' backend is unavailable (no C ...)"
    assert any("'torch'" in r.getMessage() and "(no C compiler found)" in r.getMessage() for r in caplog.records)


def test_recurrent_with_triton_backend_selection(monkeypatch):
    """A recurrent LIF runs the Triton backend when asked (tested in test_kernels_lif_triton.py);
    unavailable, an explicit request raises."""
    monkeypatch.setitem(kb._probes, "triton", (False, "no CUDA device is visible"))
    with pytest.raises(kb.BackendUnavailable, match="backend 'triton' was requested but is unavailable"):
        sb.cells.LIF(3, 4, recurrent=True, backend="triton")
    monkeypatch.setitem(kb._probes, "triton", (True, "pretend"))
    monkeypatch.setattr(kb, "_default", "triton")  # the process default, not the cell's choice
    cell = sb.cells.LIF(3, 4, recurrent=True)
    assert cell.active_backend == "triton" and cell.scan_segment is not None


def test_the_kernels_surrogates_are_the_cells():
    """The kernels (which import nothing from the cells) implement every surrogate of
    `sparsebptt.cells.surrogate`, with the same default scales."""
    from sparsebptt.cells.surrogate import SURROGATES
    from sparsebptt.kernels.lif.function import SURROGATE_IDS, SURROGATE_SCALES
    assert set(SURROGATE_IDS) == set(SURROGATES) == set(SURROGATE_SCALES)
    assert {k: v[1] for k, v in SURROGATES.items()} == SURROGATE_SCALES


def test_missing_compiler_is_a_build_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPARSEBPTT_CACHE_DIR", str(tmp_path))
    with pytest.raises(cbuild.CBuildError, match="does not run"):
        cbuild.build("probe", "int f(void) { return 1; }")


def test_compile_error_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEBPTT_CACHE_DIR", str(tmp_path))
    with pytest.raises(cbuild.CBuildError, match="failed"):
        cbuild.build("broken", "int f(void) { return }")


def test_build_file_instantiates_a_body_per_type_and_rebuilds_when_any_file_changes(monkeypatch, tmp_path):
    """A kernel file includes its body once per scalar type (and cbuild.h from the package); the
    cache key covers every included file and the -D flags."""
    import ctypes
    monkeypatch.setenv("SPARSEBPTT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "k.c").write_text('#include "cbuild.h"\n'
                                  '#define T float\n#define SUF f32\n#include "k_body.h"\n#undef T\n#undef SUF\n'
                                  '#define T double\n#define SUF f64\n#include "k_body.h"\n')
    (tmp_path / "k_body.h").write_text("T FN(twice)(T x) { return x + x + EXTRA; }\n")
    lib = cbuild.build_file("probe_k", str(tmp_path / "k.c"), defines=("EXTRA=0",))
    lib.twice_f64.restype, lib.twice_f64.argtypes = ctypes.c_double, [ctypes.c_double]
    lib.twice_f32.restype, lib.twice_f32.argtypes = ctypes.c_float, [ctypes.c_float]
    assert lib.twice_f64(1.5) == 3.0 and lib.twice_f32(1.5) == 3.0
    assert "#include \"k_body.h\"" not in cbuild.source(str(tmp_path / "k.c"))
    lib2 = cbuild.build_file("probe_k", str(tmp_path / "k.c"), defines=("EXTRA=1",))
    lib2.twice_f64.restype, lib2.twice_f64.argtypes = ctypes.c_double, [ctypes.c_double]
    assert lib2.twice_f64(1.5) == 4.0
    (tmp_path / "k_body.h").write_text("T FN(twice)(T x) { return (x + x) * 2 + EXTRA; }\n")
    lib3 = cbuild.build_file("probe_k", str(tmp_path / "k.c"), defines=("EXTRA=0",))
    lib3.twice_f64.restype, lib3.twice_f64.argtypes = ctypes.c_double, [ctypes.c_double]
    assert lib3.twice_f64(1.5) == 6.0
    assert len(list((tmp_path / "cache").glob("probe_k-*.so"))) == 3


def test_baseline_build_switch(monkeypatch, tmp_path):
    """$SPARSEBPTT_KERNEL_BASELINE=1 builds as for a CPU without AVX (a library of its own: CI runs
    the kernel tests that way too, see scripts/baseline_check.sh); other values are refused."""
    monkeypatch.setenv("SPARSEBPTT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "k.c").write_text('#include "cbuild.h"\n'
                                  'int has_avx2(void) { __builtin_cpu_init(); return SB_CPU_HAS("avx2") != 0; }\n'
                                  'int baseline(void) {\n#ifdef SB_BASELINE_ONLY\nreturn 1;\n#else\nreturn 0;\n#endif\n}\n')
    monkeypatch.setenv("SPARSEBPTT_KERNEL_BASELINE", "1")
    lib = cbuild.build_file("probe_isa", str(tmp_path / "k.c"))
    assert lib.baseline() == 1 and lib.has_avx2() == 0
    monkeypatch.setenv("SPARSEBPTT_KERNEL_BASELINE", "0")
    lib2 = cbuild.build_file("probe_isa", str(tmp_path / "k.c"))
    assert lib2.baseline() == 0
    assert len(list((tmp_path / "cache").glob("probe_isa-*.so"))) == 2
    monkeypatch.setenv("SPARSEBPTT_KERNEL_BASELINE", "yes")
    with pytest.raises(ValueError, match="SPARSEBPTT_KERNEL_BASELINE must be 0 or 1, got 'yes'"):
        cbuild.build_file("probe_isa", str(tmp_path / "k.c"))


def test_the_package_c_sources_are_its_libraries():
    """Every kernels/<cell>/<cell>.c is a library the "cpu" probe builds; their includes resolve."""
    libs = cbuild.libraries()
    assert {"sparsebptt_lif", "sparsebptt_rnn", "sparsebptt_sparse_input"} <= set(libs)
    for path in libs.values():
        assert '#include "' not in cbuild.source(path)
    assert "sparsebptt_lif" in kb.backend_available("cpu")[1]


@pytest.mark.parametrize("case,match", [
    ("rank", "must be a 3-D tensor"),
    ("v0", r"v0 must have shape \(2, 5\)"),
    ("dtype", "dtype torch.float16 is not supported"),
    ("v0dtype", "they must match"),
    ("beta", r"tensor beta must have shape \(5,\)"),
    ("betatype", "beta must be a float"),
])
def test_kernel_input_checks(case, match):
    p = LIFParams()
    i, v0, beta = torch.zeros(3, 2, 5), torch.zeros(2, 5), 0.9
    if case == "rank":
        i = torch.zeros(2, 5)
    elif case == "v0":
        v0 = torch.zeros(5)
    elif case == "dtype":
        i, v0 = i.half(), v0.half()
    elif case == "v0dtype":
        v0 = v0.double()
    elif case == "beta":
        beta = torch.zeros(4)
    elif case == "betatype":
        beta = "0.9"
    with pytest.raises((ValueError, TypeError), match=match):
        fused_recurrent_lif(i, v0, beta, p)


@pytest.mark.parametrize("case,match", [
    ("xrank", r"x must be a 3-D tensor \[L, B, in\]"),
    ("wrank", r"weight must be a 2-D tensor \[H, in\]"),
    ("wshape", r"weight must be \[H, 5\] and bias \[H\]"),
    ("bshape", r"weight must be \[H, 5\] and bias \[H\]"),
    ("wdtype", "they must match"),
    ("v0", r"v0 must have shape \(2, 4\)"),
])
def test_layer_input_checks(case, match):
    from sparsebptt.kernels.lif.cpu import fused_lif_layer
    x, v0, w, b = torch.zeros(3, 2, 5), torch.zeros(2, 4), torch.zeros(4, 5), torch.zeros(4)
    if case == "xrank":
        x = torch.zeros(2, 5)
    elif case == "wrank":
        w = torch.zeros(4)
    elif case == "wshape":
        w = torch.zeros(4, 6)
    elif case == "bshape":
        b = torch.zeros(3)
    elif case == "wdtype":
        w = w.double()
    elif case == "v0":
        v0 = torch.zeros(2, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_lif_layer(x, v0, w, b, 0.9, LIFParams())


def test_layer_without_bias_and_frozen_weight():
    """bias=False, a frozen weight and x without grad: only v0 and the rest get gradients."""
    ref, fast = make_pair(torch.float64, bias=False)
    for cell in (ref, fast):
        cell.weight.requires_grad_(False)
    x, v0 = inputs(ref, 17, 2, torch.float64)
    res = []
    for cell in (ref, fast):
        v = v0.clone().requires_grad_()
        with sb.trace() as t:
            y, (vT,) = sb.scan(cell, x, (v,))
            (y.sum() + vT.sum()).backward()
        res.append((y.detach(), vT.detach(), v.grad, t.backward_macs, t.forward_macs))
    for name, a, b in zip(["out", "vT", "dv0"], res[0], res[1]):
        assert_close(name, a, b)
    assert res[0][3:] == res[1][3:] and res[1][3] == 0


# ---- recurrent weights ---------------------------------------------------------------------------
def rec_inputs(cell, T, B, dtype, seed=0):
    """(x, (v0, z0)) for a recurrent LIF whose membrane stays MARGIN away from the threshold."""
    p = cell.params
    for s in range(seed, seed + 200, 7):
        x = seeded(s, T, B, cell.input_size, dtype=dtype)
        v0 = 0.5 * seeded(s + 1, B, cell.hidden_size, dtype=dtype)
        z0 = (seeded(s + 2, B, cell.hidden_size, dtype=dtype, kind="uniform") < 0.3).to(dtype)
        with torch.no_grad():
            i = torch.nn.functional.linear(x.double(), cell.weight.double(), cell.bias.double())
            beta = p.beta if cell.beta is None else cell.beta.double().clamp(0, 1)
            v, z, m = v0.double(), z0.double(), float("inf")
            if p.reset_timing == "after_decay":  # the first step's reset reads v0's spike
                m = (v - p.threshold).abs().min().item()
            for t in range(T):
                v, z, mt = _lif_step64(p, beta, v, i[t] + z @ cell.recurrent_weight.double().t())
                m = min(m, mt)
        if m > MARGIN:
            return x, (v0, z0)
    raise AssertionError("no seed kept the membrane away from the threshold")  # pragma: no cover


def run_rec(cell, x, state0, strategy):
    x = x.clone().requires_grad_()
    state0 = tuple(s.clone().requires_grad_() for s in state0)
    for p in cell.parameters():
        p.grad = None
    with sb.trace() as t:
        out, state = sb.scan(cell, x, state0, strategy=strategy)
        loss = (out * seeded(100, *out.shape, dtype=x.dtype)).sum()
        for k, s in enumerate(state):
            loss = loss + (s * seeded(101 + k, *s.shape, dtype=x.dtype)).sum()
        loss.backward()
    res = {"out": out.detach(), "vT": state[0].detach(), "zT": state[1].detach(), "dx": x.grad,
           "dv0": state0[0].grad, "dz0": state0[1].grad}
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    counters = {k: getattr(t, k) for k in ("forward_steps", "recomputed_steps", "forward_macs",
                                           "recomputed_macs", "backward_macs")}
    return res, counters, t.activity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=_cid)
def test_recurrent_fused_equals_reference(cfg, dtype):
    ref, fast = make_pair(dtype, recurrent=True, **cfg)
    assert fast.active_backend == "cpu"
    for T, B in ((1, 1), (31, 3)):
        x, s0 = rec_inputs(ref, T, B, dtype)
        expect, c_ref, act_ref = run_rec(ref, x, s0, sb.FullBPTT())
        for st in (sb.FullBPTT(), sb.Checkpoint(every=7), sb.Revolve(slots=3)):
            got, c_got, act_got = run_rec(fast, x, s0, st)
            compare(expect, got, dtype)
            if isinstance(st, sb.FullBPTT):
                assert c_ref == c_got and act_ref == pytest.approx(act_got)


def test_recurrent_trace_counters_under_checkpoint():
    ref, fast = make_pair(torch.float32, recurrent=True)
    x, s0 = rec_inputs(ref, 40, 2, torch.float32)
    _, c_ref, act_ref = run_rec(ref, x, s0, sb.Checkpoint(every=6))
    _, c_got, act_got = run_rec(fast, x, s0, sb.Checkpoint(every=6))
    assert c_ref == c_got and act_ref == pytest.approx(act_got)


def test_recurrent_no_grad_forward():
    ref, fast = make_pair(torch.float64, recurrent=True, reset="zero")
    x, s0 = rec_inputs(ref, 20, 2, torch.float64)
    with torch.no_grad():
        y_ref, s_ref = sb.scan(ref, x, s0)
        y, s = sb.scan(fast, x, s0)
    assert_close("out", y_ref, y)
    for k in range(2):
        assert_close(f"state[{k}]", s_ref[k], s[k])


def test_large_segment_with_huge_page_buffers():
    """[L, B, H] buffers past 4 MiB get madvise(MADV_HUGEPAGE) (and the layer's di the scratch
    buffer): results still equal the reference loop."""
    dtype = torch.float64
    p = LIFParams(threshold=0.8, reset="zero", surrogate="atan")
    i = seeded(1, 40, 64, 256, dtype=dtype)  # 5 MiB
    v0 = 0.3 * seeded(2, 64, 256, dtype=dtype)
    dz = seeded(3, *i.shape, dtype=dtype)
    outs = []
    for fn in (naive_recurrent_lif, fused_recurrent_lif):
        leaves = [t.clone().requires_grad_() for t in (i, v0)]
        z, v = fn(*leaves, 0.9, p)
        ((z * dz).sum() + v.sum()).backward()
        outs.append([z, v] + [t.grad for t in leaves])
    for name, a, b in zip(["z", "vT", "di", "dv0"], *outs):
        assert_close(name, a, b, dtype)


def test_the_fused_path_says_it_ran(caplog):
    base_mod = __import__("sparsebptt.cells.base", fromlist=["_logged"])
    base_mod._logged.discard("sparsebptt: LIF scans run the fused 'cpu' backend")
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        sb.scan(sb.cells.LIF(3, 4, backend="cpu"), torch.rand(5, 2, 3))
    assert any("fused 'cpu' backend" in r.getMessage() for r in caplog.records)


# ---- sparse-input products (issue 17) ------------------------------------------------------------
def test_the_route_is_decided_once_per_scan():
    """The first segment's density decides; later segments follow it whatever their density."""
    from sparsebptt.kernels.sparse_input.cpu import SPARSE_INPUT_MAX, SparseRoute
    sparse = seeded(10, 20, 30, kind="spikes", p=SPARSE_INPUT_MAX / 3)
    dense = seeded(11, 20, 30, kind="spikes", p=0.9)
    route = SparseRoute()
    assert route.rows(sparse, keep=False) is not None and route.rows(dense, keep=False) is not None
    route = SparseRoute()
    assert route.rows(dense, keep=False) is None and route.rows(sparse, keep=False) is None
    cell = sb.cells.LIF(30, 4, backend="cpu")
    a, b = cell.scan_segment, cell.scan_segment
    assert a.keywords["route"] is not b.keywords["route"]  # one per scan
    assert "route" not in sb.cells.LIF(30, 4, backend="cpu", recurrent=True).scan_segment.keywords


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("values", ["spikes", "events"])
def test_sparse_layer_equals_the_matmul_layer(dtype, values):
    """fused_lif_layer with a sparse route: outputs, state and every gradient as with the matmul;
    the backward keeps the nonzeros instead of x."""
    from sparsebptt.kernels.lif.cpu import fused_lif_layer
    from sparsebptt.kernels.sparse_input.cpu import SparseRoute
    x = seeded(13, 23, 4, 30, dtype=dtype, kind="spikes", p=0.2)
    if values == "events":
        x = x * seeded(12, 23, 4, 30, dtype=dtype)
    W, b, v0 = 0.8 * seeded(14, 45, 30, dtype=dtype), seeded(15, 45, dtype=dtype), 0.3 * seeded(16, 4, 45, dtype=dtype)
    beta = 0.5 + 0.4 * seeded(17, 45, dtype=dtype, kind="uniform")
    res, saved = [], []
    for route in (None, SparseRoute()):
        args = [t.clone().requires_grad_() for t in (x, v0, W, b, beta)]
        z, vT = fused_lif_layer(*args, LIFParams(threshold=0.5), route=route)
        saved.append(any(t is not None and t.shape == x.shape for t in z.grad_fn.saved_tensors))
        ((z * seeded(18, *z.shape, dtype=dtype)).sum() + (vT * seeded(19, *vT.shape, dtype=dtype)).sum()).backward()
        res.append([z.detach(), vT.detach()] + [a.grad for a in args])
    for name, a, c in zip(["z", "vT", "dx", "dv0", "dW", "db", "dbeta"], *res):
        assert_close(name, a, c, dtype)
    assert saved == [True, False]  # the nonzeros' columns (and values), not the [L, B, in] input


@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=5), sb.Revolve(slots=2)],
                         ids=lambda s: s.to_string())
def test_a_sparse_input_layer_equals_the_reference_under_every_strategy(strategy, monkeypatch):
    """A LIF on spike input (and one on the first's spikes) takes the sparse route; float64
    outputs and every gradient equal the torch reference's."""
    from sparsebptt.kernels.lif import cpu as lif_cpu
    from sparsebptt.kernels.sparse_input.cpu import SparseRoute
    ref, fast = _stacks(torch.float64, mixed=False)
    x = seeded(3, 37, 2, N_IN, kind="spikes", p=0.15)
    routes = []
    orig = SparseRoute.rows
    monkeypatch.setattr(SparseRoute, "rows", lambda self, *a, **k: routes.append(self) or orig(self, *a, **k))
    one_call = lif_cpu._sparse_layer_forward  # the route's forward in one C call
    monkeypatch.setattr(lif_cpu, "_sparse_layer_forward", lambda *a: routes.append(a[6]) or one_call(*a))
    got = _run_stack(fast, x, strategy)
    assert routes and all(r.sparse for r in routes)
    compare(_run_stack(ref, x, sb.FullBPTT()), got, torch.float64)


def test_a_scan_runs_the_backend_its_forward_resolved(monkeypatch):
    """The segment path is resolved once per scan: a process default changed between the forward
    and the backward does not change what the recomputation runs (it repeats the forward), and
    the next scan follows the new default."""
    import sparsebptt.kernels.lif.cpu as lif_cpu
    monkeypatch.setattr(kb, "_default", None)
    monkeypatch.delenv("SPARSEBPTT_BACKEND", raising=False)
    calls = []
    orig = lif_cpu.layer_forward  # what every fused feed-forward LIF segment runs
    monkeypatch.setattr(lif_cpu, "layer_forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    sb.set_backend("cpu")
    torch.manual_seed(0)
    net = sb.cells.Stack([sb.cells.LIF(6, 9), sb.cells.LIF(9, 5)]).double()
    x = seeded(20, 24, 3, 6, kind="spikes", p=0.4)
    out, _ = sb.scan(net, x)
    ref = dict(zip([n for n, _ in net.named_parameters()],
                   torch.autograd.grad((out * seeded(100, *out.shape)).sum(), list(net.parameters()))))
    out, _ = sb.scan(net, x, strategy=sb.Checkpoint(every=5))
    n_forward = len(calls)
    sb.set_backend("torch")
    (out * seeded(100, *out.shape)).sum().backward()
    assert len(calls) > n_forward  # the recomputation ran the fused layers the forward ran
    for n, p in net.named_parameters():
        assert_close(n, ref[n], p.grad, torch.float64)
    calls.clear()
    with torch.no_grad():
        sb.scan(net, x, strategy=sb.Checkpoint(every=5))
    assert not calls  # the next scan runs the new default


# ---- recomputed segments without autograd (issue 17) -------------------------------------------
def _spy_vjp(monkeypatch):
    from sparsebptt.strategies import executor as ex
    used = []
    orig = ex._advance_vjp
    monkeypatch.setattr(ex, "_advance_vjp", lambda *a, **k: used.append(1) or orig(*a, **k))
    return used


@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=6), sb.Revolve(slots=2), sb.DoubleCheckpoint(outer=12, inner=4)],
                         ids=lambda s: s.to_string())
def test_recomputed_segments_run_the_segment_vjp(strategy, monkeypatch):
    """A Stack of fused feed-forward LIF layers recomputes its segments through `LIFSegmentVJP`
    (no autograd graph); outputs and every gradient equal the reference's in float64."""
    used = _spy_vjp(monkeypatch)
    ref, fast = _stacks(torch.float64, mixed=False)
    assert hasattr(fast.scan_segment, "vjp") and not hasattr(_stacks(torch.float64, mixed=True)[1].scan_segment, "vjp")
    x = seeded(3, 37, 2, N_IN, kind="spikes", p=0.4)
    compare(_run_stack(ref, x, sb.FullBPTT()), _run_stack(fast, x, strategy), torch.float64)
    assert used


@pytest.mark.parametrize("case", ["shared-weight", "frozen-weight-no-bias", "x-without-grad"])
def test_segment_vjp_gradients_in_the_corner_cases(case, monkeypatch):
    """A weight shared by two layers gets the sum of both layers' gradients; a frozen weight and
    no bias get none; an x without grad gets none: as the autograd reference."""
    used = _spy_vjp(monkeypatch)
    nets = []
    for backend in ("torch", "cpu"):
        torch.manual_seed(2)
        a = sb.cells.LIF(9, 9, threshold=0.3, backend=backend, bias=case != "frozen-weight-no-bias")
        b = sb.cells.LIF(9, 9, threshold=0.3, backend=backend, learn_beta=True)
        if case == "shared-weight":
            b.weight = a.weight
        if case == "frozen-weight-no-bias":
            a.weight.requires_grad_(False)
        nets.append(sb.cells.Stack([a, b]).double())
    nets[1].load_state_dict(nets[0].state_dict())
    x = seeded(4, 29, 3, 9, kind="spikes", p=0.3)
    res = []
    for net, st in zip(nets, (sb.FullBPTT(), sb.Checkpoint(every=4))):
        state0 = tuple(0.3 * seeded(7 + k, *s.shape) for k, s in enumerate(net.initial_state(3, dtype=torch.float64)))
        res.append(scan_grads(net, x, state0, st, x_grad=case != "x-without-grad")[0])
    compare(*res, torch.float64)
    assert used


def test_segment_vjp_only_where_it_computes_what_the_layer_does():
    """No VJP for a subclass overriding _scan_segment, nor for a weight that is not the layer's
    registered parameter (a parametrization: its gradient must flow through autograd)."""
    class Noisy(sb.cells.LIF):
        def _scan_segment(self, x_seg, state, **kw):
            return super()._scan_segment(x_seg, state, **kw)

    assert hasattr(sb.cells.LIF(4, 5, backend="cpu").scan_segment, "vjp")
    assert not hasattr(Noisy(4, 5, backend="cpu").scan_segment, "vjp")
    cell = sb.cells.LIF(4, 5, backend="cpu")
    torch.nn.utils.parametrize.register_parametrization(cell, "weight", torch.nn.Identity())
    assert not hasattr(cell.scan_segment, "vjp")
    ref = sb.cells.LIF(4, 5, backend="torch").double()
    cell = cell.double()
    with torch.no_grad():
        ref.weight.copy_(cell.weight)
        ref.bias.copy_(cell.bias)
    x = seeded(5, 23, 2, 4, kind="spikes", p=0.4)
    v0 = (0.3 * seeded(6, 2, 5),)
    a, _ = scan_grads(ref, x, v0, sb.FullBPTT())
    b, _ = scan_grads(cell, x, v0, sb.Checkpoint(every=4))
    assert_close("dweight", a["dweight"], b["dparametrizations.weight.original"], torch.float64)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_segment_vjp_under_a_backward_in_grad_mode(monkeypatch):
    """backward(create_graph=True) runs the executor's backward in grad mode: the segment VJP
    still gives the first-order gradients (a checkpointed scan has no second order)."""
    used = _spy_vjp(monkeypatch)
    ref, fast = _stacks(torch.float64, mixed=False)
    x = seeded(3, 19, 2, N_IN, kind="spikes", p=0.4)
    res = []
    for net, st in ((ref, sb.FullBPTT()), (fast, sb.Checkpoint(every=5))):
        net.zero_grad()
        out, _ = sb.scan(net, x, strategy=st)
        (out * seeded(100, *out.shape)).sum().backward(create_graph=True)
        res.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
    fast.zero_grad()  # the fused layers' own autograd node (FullBPTT) too: first order, once differentiable
    out, _ = sb.scan(fast, x)
    (out * seeded(100, *out.shape)).sum().backward(create_graph=True)
    res.append({n: p.grad.detach().clone() for n, p in fast.named_parameters()})
    compare(res[0], res[1], torch.float64)
    compare(res[0], res[2], torch.float64)
    assert used


# ---- the forward sweep's no-graph segments in one pass (issue 17) ------------------------------
def _nets(kind, dtype, backend="cpu"):
    torch.manual_seed(3)
    if kind == "lif":
        return sb.cells.LIF(N_IN, 24, threshold=0.3, backend=backend).to(dtype)
    inner = [sb.cells.LIF(24, 24, threshold=0.25, backend=backend),
             sb.cells.LIF(24, 17, threshold=0.2, reset="zero", learn_beta=True, backend=backend)]
    if kind == "nested":
        inner = [sb.cells.Stack(inner)]
    return sb.cells.Stack([sb.cells.LIF(N_IN, 24, threshold=0.3, backend=backend)] + inner).to(dtype)


def _spy_stops(monkeypatch, fuse=True):
    from sparsebptt.strategies import executor as ex
    used = []
    orig = ex._forward_fused
    monkeypatch.setattr(ex, "_forward_fused", lambda run, acts, work: used.append(len(acts)) or orig(run, acts, work))
    if not fuse:
        monkeypatch.setattr(ex, "_fusable", lambda run, a: False)
    return used


@pytest.mark.parametrize("reduce", [None, "sum", "last"])
@pytest.mark.parametrize("kind", ["lif", "stack", "nested"])
@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=6), sb.Revolve(slots=3), sb.DoubleCheckpoint(outer=12, inner=4)],
                         ids=lambda s: s.to_string())
def test_forward_sweep_runs_its_segments_in_one_pass(strategy, kind, reduce, monkeypatch):
    """The forward sweep's consecutive no-graph segments of fused LIF layers run as one pass per
    layer (`forward_stops`): with a sparse input the outputs, the stored checkpoints (checked by
    the recomputation) and every gradient equal segment-by-segment advances bit for bit."""
    x = seeded(8, 61, 3, N_IN, kind="spikes", p=0.1).float()
    res = []
    for fuse in (True, False):
        with monkeypatch.context() as m:
            used = _spy_stops(m, fuse)
            net = _nets(kind, torch.float32)
            state0 = tuple(0.3 * seeded(7 + k, *s.shape).float() for k, s in enumerate(net.initial_state(3)))
            res.append(scan_grads(net, x, state0, strategy, reduce=reduce)[0])
            assert (max(used, default=0) > 1) == fuse  # several segments in one pass only where fused
    for k in res[0]:
        assert torch.equal(res[0][k], res[1][k]), k


@pytest.mark.parametrize("kind", ["stack", "nested"])
def test_forward_sweep_in_one_pass_equals_the_reference(kind, monkeypatch):
    """A dense input (its products one matmul over several segments) and float64: outputs and
    gradients equal the torch step reference under FullBPTT."""
    used = _spy_stops(monkeypatch)
    x = seeded(9, 45, 2, N_IN, kind="spikes", p=0.6)
    res = []
    for backend, st in (("torch", sb.FullBPTT()), ("cpu", sb.Checkpoint(every=5))):
        net = _nets(kind, torch.float64, backend)
        state0 = tuple(0.3 * seeded(7 + k, *s.shape, dtype=torch.float64)
                       for k, s in enumerate(net.initial_state(2, dtype=torch.float64)))
        res.append(scan_grads(net, x, state0, st, reduce="mean")[0])
    compare(*res, torch.float64)
    assert max(used) > 1


def test_forward_stops_of_a_layer():
    """`layer_forward_stops` gives what `layer_forward` gives segment by segment; stops that do not
    end at L are refused."""
    from sparsebptt.kernels.lif.cpu import layer_forward, layer_forward_stops
    from sparsebptt.kernels.sparse_input.cpu import SparseRoute
    cell = _nets("lif", torch.float32)
    x = seeded(10, 23, 3, N_IN, kind="spikes", p=0.1).float()
    v0 = 0.3 * seeded(11, 3, 24).float()
    with torch.no_grad():
        z, vs = layer_forward_stops(x, v0, cell.weight, cell.bias, 0.9, cell.params, SparseRoute(), [5, 11, 23])
        route, v, zs = SparseRoute(), v0, []
        for t0, t1, want in ((0, 5, vs[0]), (5, 11, vs[1]), (11, 23, vs[2])):
            zt, v, _ = layer_forward(x[t0:t1].contiguous(), v, cell.weight, cell.bias, 0.9, cell.params, route, keep=False)
            assert torch.equal(v, want)
            zs.append(zt)
        assert torch.equal(z, torch.cat(zs))
        with pytest.raises(ValueError, match="the stops must end at L=23"):
            layer_forward_stops(x, v0, cell.weight, cell.bias, 0.9, cell.params, None, [5, 11])


@pytest.mark.parametrize("values", ["spikes", "graded"])
def test_sparse_layer_forward_in_one_call_equals_the_kernels_one_by_one(values):
    """`lif_layer_fwd` (nonzeros, currents, recurrence in one C call) gives bit for bit what
    `SparseRows.of`, `SparseRows.project` and the recurrence give one after the other; a first
    segment above `SPARSE_INPUT_MAX` runs nothing and turns the route dense."""
    from sparsebptt.kernels.lif import cpu as lif_cpu
    from sparsebptt.kernels.sparse_input.cpu import SparseRoute, SparseRows
    cell = _nets("lif", torch.float32)
    x = seeded(12, 13, 3, N_IN, kind="spikes", p=0.1).float()
    if values == "graded":
        x = x * seeded(13, *x.shape).float()
    v0 = 0.3 * seeded(14, 3, 24).float()
    W, b = cell.weight.detach(), cell.bias.detach()
    route = SparseRoute()
    i = torch.empty(13, 3, 24)
    z, u, vT, rows, nnz = lif_cpu._sparse_layer_forward(x, v0, W, b, 0.9, cell.params, route, True, i, True)
    assert route.sparse and (rows.val is None) == (values == "spikes") and nnz == int(x.count_nonzero())
    ref_rows = SparseRows.of(x.reshape(-1, N_IN), keep=True)
    i2 = torch.empty(39, 24)
    ref_rows.project(W, b, i2)
    z2, u2, vT2 = lif_cpu._lif_fwd(i2.view(13, 3, 24), v0, 0.9, cell.params, save_u=True)
    for a, c in ((z, z2), (u, u2), (vT, vT2), (rows.ptr, ref_rows.ptr), (rows.col, ref_rows.col)):
        assert torch.equal(a, c)
    dense = SparseRoute()
    assert lif_cpu._sparse_layer_forward(torch.ones(13, 3, N_IN), v0, W, b, 0.9, cell.params, dense, True, i,
                                         True) is None
    assert dense.sparse is False


def test_layer_backward_adds_into_the_sums_in_one_call():
    """With the caller's sums (W^T's layout) and a sparse input, dW and db are added by the
    recurrence's own C call (`lif_layer_bwd`): equal to the fresh gradients added afterwards."""
    from sparsebptt.kernels.lif import cpu as lif_cpu
    from sparsebptt.kernels.sparse_input.cpu import SparseRoute
    cell = _nets("lif", torch.float64)
    x = seeded(15, 21, 3, N_IN, kind="spikes", p=0.1)
    v0 = 0.3 * seeded(16, 3, 24)
    W, b = cell.weight.detach(), cell.bias.detach()
    _, _, saved = lif_cpu.layer_forward(x, v0, W, b, 0.9, cell.params, SparseRoute(), need_w=True)
    assert saved.rows is not None
    dz, dvT = seeded(17, 21, 3, 24), seeded(18, 3, 24)
    acc_w0, acc_b0 = seeded(19, 24, N_IN), seeded(20, 24)
    dx, dv0, dw, db, _ = lif_cpu.layer_backward(saved, dz, dvT, True, True, True)
    acc_w, acc_b = acc_w0.t().contiguous().t(), acc_b0.clone()
    dx2, dv02, dw2, db2, _ = lif_cpu.layer_backward(saved, dz, dvT, True, True, True, acc_w, acc_b)
    assert dw2 is None and db2 is None
    assert_close("dW", acc_w0 + dw, acc_w, torch.float64)
    assert_close("db", acc_b0 + db, acc_b, torch.float64)
    assert torch.equal(dx, dx2) and torch.equal(dv0, dv02)


def test_forward_sweep_fuses_at_most_its_step_limit(monkeypatch):
    """Fused no-graph runs stay within `FUSED_FORWARD_ELEMENTS` state elements (their per-thread
    buffers with them): here 20 steps; a segment longer than that runs alone."""
    from sparsebptt.strategies import executor as ex
    spans = []
    orig = ex._forward_fused
    monkeypatch.setattr(ex, "_forward_fused",
                        lambda run, acts, work: spans.append((len(acts), acts[-1].n1 - acts[0].n0)) or orig(run, acts, work))
    monkeypatch.setattr(ex, "FUSED_FORWARD_ELEMENTS", 20 * 2 * (24 + 24 + 17))  # 20 steps of the state
    net = _nets("stack", torch.float32)
    x = seeded(21, 70, 2, N_IN, kind="spikes", p=0.1).float()
    for every in (6, 25):
        spans.clear()
        out, _ = sb.scan(net, x, strategy=sb.Checkpoint(every=every))
        out.sum().backward()
        assert spans and all(n == 1 or steps <= 20 for n, steps in spans)
        assert any(n > 1 for n, _ in spans) == (every == 6)


def test_the_sparse_route_counts_the_macs_it_does():
    """On the sparse-input route the projection and dW count ``nnz * H`` MACs (what they do); dx,
    a matmul, ``L * B * in * H``; on the matmul route every product counts ``L * B * in * H``."""
    import sparsebptt.kernels.sparse_input.cpu as sparse_input_cpu
    torch.manual_seed(3)
    cell = sb.cells.LIF(N_IN, 24, backend="cpu").double()
    x = seeded(30, 20, 3, N_IN, kind="spikes", p=0.1).requires_grad_()
    nnz, dense = int(x.count_nonzero()), 20 * 3 * N_IN
    counts = []
    for max_density in (sparse_input_cpu.SPARSE_INPUT_MAX, 0.0):
        sparse_input_cpu.SPARSE_INPUT_MAX, before = max_density, sparse_input_cpu.SPARSE_INPUT_MAX
        try:
            with sb.trace() as t:
                z, _ = sb.scan(cell, x)
                (z * seeded(31, *z.shape)).sum().backward()
        finally:
            sparse_input_cpu.SPARSE_INPUT_MAX = before
        counts.append((t.forward_macs, t.backward_macs))
    assert counts[0] == (nnz * 24, (dense + nnz) * 24)
    assert counts[1] == (dense * 24, 2 * dense * 24)
