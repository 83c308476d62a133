"""Triton Delta GRU / Delta LSTM kernels against the reference (``backend="torch"``: dense matmuls
on the masked deltas, plain autograd): on CPU in Triton's interpreter (TRITON_INTERPRET=1, tiny
shapes, the default suite), and on a CUDA device when there is one (marked ``gpu``).

Inputs stay away from the thresholds: the input is on a grid of 0.1 with theta_x = 0.25 (so
``|x_t - x_ref|`` is at least 0.05 from it), and each x_t is drawn again until the reference's
hidden deltas are more than `MARGIN` from theta_h, so rounding cannot flip a mask.
Tolerances: float64 1e-9 absolute; float32 `sparsebptt.testing.TOLERANCES` (1e-5 of the
tensor's largest magnitude).

Triton is optional: without it this module is skipped with the reason.
"""
from __future__ import annotations

import logging

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")

import sparsebptt as sb  # noqa: E402
from sparsebptt.kernels import backend as kb  # noqa: E402
from sparsebptt.kernels.delta.naive import naive_recurrent_delta_gru, naive_recurrent_delta_lstm  # noqa: E402
from sparsebptt.kernels.delta.triton import fused_recurrent_delta_gru, fused_recurrent_delta_lstm  # noqa: E402
from sparsebptt.testing import assert_close, seeded  # noqa: E402

kb._probes.pop("triton", None)  # probe again now that the interpreter is on
DEV = "cuda" if CUDA else "cpu"
MARGIN = 1e-3
THETA_X, THETA_H = 0.25, 0.2
KINDS = {
    "gru": (sb.cells.DeltaGRU, naive_recurrent_delta_gru, fused_recurrent_delta_gru),
    "lstm": (sb.cells.DeltaLSTM, naive_recurrent_delta_lstm, fused_recurrent_delta_lstm),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny ops only lose to OpenMP wake-ups on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tol(dtype):
    return {"atol": 1e-9} if dtype == torch.float64 else {}


def make_pair(kind, dtype, I=3, H=5, bias=True, device=DEV, threshold=THETA_X, hidden_threshold=THETA_H):
    """The reference cell and a "triton" cell with the same weights."""
    torch.manual_seed(0)
    ref = KINDS[kind][0](I, H, threshold, hidden_threshold, bias=bias, backend="torch").to(dtype)
    fast = KINDS[kind][0](I, H, threshold, hidden_threshold, bias=bias, backend="triton").to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


def hidden_margin(cell, state):
    """Distance of the next step's hidden |delta| to theta_h (the closest entry)."""
    h, h_ref = state[0], state[-3]
    return float(((h - h_ref).abs() - cell.hidden_threshold).abs().min())


def inputs(ref, T, B, dtype, seed=0, min_margin=MARGIN, tries=200):
    """``(x, state0)``: a random state (memories and references included) and x on a 0.1 grid,
    each x_t drawn again until the reference's next hidden deltas are ``min_margin`` away from
    theta_h (so that no mask is decided by rounding)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0, grid=False):
        v = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
        return (torch.round(10 * v) / 10 if grid else v).to(dtype).to(DEV)

    i_x = ref.num_states - 4
    for _ in range(tries):
        state0 = tuple(draw(*z.shape, scale=0.5, grid=i == i_x) for i, z in enumerate(ref.initial_state(B)))
        if hidden_margin(ref, state0) > min_margin:
            break
    else:
        raise AssertionError("no initial state keeps the hidden deltas away from the threshold")
    xs, state = [], state0
    with torch.no_grad():
        for _ in range(T):
            for _ in range(tries):
                x_t = draw(B, ref.input_size, grid=True)
                _, new = ref.step(x_t, state)
                if hidden_margin(ref, new) > min_margin:
                    break
            else:
                raise AssertionError("no input keeps the hidden deltas away from the threshold")
            xs.append(x_t)
            state = new
    return torch.stack(xs), state0


def run(cell, x, state0, strategy=sb.FullBPTT(), reduce=None):
    """Outputs, final state and every gradient of ``(out*dout).sum() + sum (s*ds).sum()``."""
    cell.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    s0 = tuple(s.clone().requires_grad_() for s in state0)
    with sb.trace() as t:
        y, state = sb.scan(cell, x, s0, strategy=strategy, reduce=reduce)
        loss = (y * seeded(7, *y.shape, dtype=y.dtype).to(y.device)).sum()
        for i, s in enumerate(state):
            loss = loss + (s * seeded(8 + i, *s.shape, dtype=s.dtype).to(s.device)).sum()
        loss.backward()
    res = {"out": y.detach(), "dx": x.grad}
    res.update({f"state[{i}]": s.detach() for i, s in enumerate(state)})
    res.update({f"dstate0[{i}]": s.grad for i, s in enumerate(s0)})
    res.update({f"d{k}": p.grad for k, p in cell.named_parameters()})
    return res, t.activity


def compare(ref, got, dtype):
    assert set(ref) == set(got)
    for name in ref:
        assert_close(name, ref[name], got[name], dtype, **tol(dtype))


# ---- the segment function against the reference loop ------------------------------------------

def _kernel_case(kind, dtype, T, B=2, bias=True, threshold=THETA_X, hidden_threshold=THETA_H):
    ref_cell, _ = make_pair(kind, dtype, bias=bias, threshold=threshold, hidden_threshold=hidden_threshold)
    x, state0 = inputs(ref_cell, T, B, dtype)
    params = [ref_cell.weight_ih, ref_cell.weight_hh, ref_cell.bias_ih, ref_cell.bias_hh]
    outs = []
    for fn in KINDS[kind][1:]:
        leaves = [None if v is None else v.detach().clone().requires_grad_() for v in [x, *params, *state0]]
        ys, state = fn(leaves[0], tuple(leaves[5:]), *leaves[1:5], threshold, hidden_threshold)
        loss = (ys * seeded(1, *ys.shape, dtype=dtype).to(DEV)).sum()
        for i, s in enumerate(state):
            loss = loss + (s * seeded(2 + i, *s.shape, dtype=dtype).to(DEV)).sum()
        loss.backward()
        outs.append([ys, *state] + [None if v is None else v.grad for v in leaves])
    names = (["ys"] + [f"state[{i}]" for i in range(len(state0))] + ["dx", "dW_ih", "dW_hh", "db_ih", "db_hh"]
             + [f"dstate0[{i}]" for i in range(len(state0))])
    for name, a, b in zip(names, *outs):
        assert_close(name, a, b, dtype, **tol(dtype))


@pytest.mark.parametrize("T", [1, 7, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kernel_matches_reference(kind, dtype, T):
    """ys, the final state and the gradients of x, state0 and all parameters."""
    _kernel_case(kind, dtype, T)


@pytest.mark.parametrize("kind", list(KINDS))
def test_kernel_without_bias(kind):
    _kernel_case(kind, torch.float64, 5, B=3, bias=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_kernel_threshold_zero_transmits_unchanged_entries(kind):
    """theta = 0 transmits every entry, also one equal to its reference (mask 1, delta 0): the
    gradient then reaches the input and, negated, the reference, as in the reference."""
    ref_cell, fast = make_pair(kind, torch.float64, threshold=0.0, hidden_threshold=0.0)
    x = seeded(3, 4, 2, 3).to(DEV)
    s0 = tuple((0.5 * seeded(4 + i, *z.shape)).to(DEV) for i, z in enumerate(ref_cell.initial_state(2)))
    i_x = ref_cell.num_states - 4
    s0 = s0[:i_x] + (x[0].clone(), s0[0].clone()) + s0[i_x + 2:]  # x_ref = x_0, h_ref = h_0
    ref, _ = run(ref_cell, x, s0)
    got, _ = run(fast, x, s0)
    compare(ref, got, torch.float64)


def test_kernel_no_grad_equals_grad_forward():
    ref_cell, _ = make_pair("lstm", torch.float64)
    x, s0 = inputs(ref_cell, 6, 2, torch.float64)
    args = (ref_cell.weight_ih, ref_cell.weight_hh, ref_cell.bias_ih, ref_cell.bias_hh, THETA_X, THETA_H)
    with torch.no_grad():
        ys0, st0 = fused_recurrent_delta_lstm(x, s0, *args)
    ys1, st1 = fused_recurrent_delta_lstm(x, s0, *args)
    assert ys1.requires_grad and not ys0.requires_grad
    for name, a, b in zip(["ys", *map(str, range(6))], [ys0, *st0], [ys1, *st1]):
        assert torch.equal(a, b.detach()), name


# ---- cells under every exact strategy ----------------------------------------------------------

STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=3), sb.Revolve(slots=2)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
@pytest.mark.parametrize("T", [1, 7], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_cell_under_strategies(kind, dtype, T, strategy):
    """The "triton" cell under each strategy equals the reference cell under full BPTT."""
    ref_cell, fast = make_pair(kind, dtype)
    assert fast.active_backend == "triton" and fast.scan_segment is not None
    assert ref_cell.scan_segment is None
    x, s0 = inputs(ref_cell, T, 2, dtype)
    ref, act_ref = run(ref_cell, x, s0)
    got, act = run(fast, x, s0, strategy)
    compare(ref, got, dtype)
    assert act == pytest.approx(act_ref)  # the same transmitted fraction, counted once per step


@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=3),
                                      pytest.param(sb.Revolve(slots=2), marks=pytest.mark.slow)],
                         ids=lambda s: s.to_string())
@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_cell_long_sequence(kind, strategy):
    """T = 100, float64 (full BPTT at T = 100 is `test_kernel_matches_reference`; Revolve(2)
    recomputes ~850 steps: slow in the interpreter, run with --runslow)."""
    ref_cell, fast = make_pair(kind, torch.float64)
    x, s0 = inputs(ref_cell, 100, 2, torch.float64)
    ref, act_ref = run(ref_cell, x, s0)
    assert 0.1 < act_ref["Delta" + kind.upper()] < 0.9, "the masks must matter"
    got, _ = run(fast, x, s0, strategy)
    compare(ref, got, torch.float64)


def test_stack_of_triton_cells_reduced():
    """A Stack (layer by layer over each segment) with reduce="sum" under Checkpoint."""
    def net(backend):
        torch.manual_seed(0)
        return sb.cells.Stack([sb.cells.DeltaGRU(3, 5, THETA_X, 0.05, backend=backend),
                               sb.cells.DeltaLSTM(5, 4, 0.05, 0.05, backend=backend)]).double().to(DEV)

    ref_net, fast_net = net("torch"), net("triton")
    x = (torch.round(10 * seeded(5, 9, 2, 3)) / 10).to(DEV)
    s0 = tuple(s.to(DEV) for s in ref_net.initial_state(2, dtype=torch.float64))
    ref, _ = run(ref_net, x, s0, reduce="sum")
    got, _ = run(fast_net, x, s0, sb.Checkpoint(every=4), reduce="sum")
    compare(ref, got, torch.float64)


@pytest.mark.parametrize("kind", list(KINDS))
def test_only_parameter_gradients(kind):
    """x and state0 without gradients (the input side's backward is skipped): the parameters'."""
    ref_cell, fast = make_pair(kind, torch.float64)
    x, s0 = inputs(ref_cell, 5, 2, torch.float64)
    grads = []
    for cell in (ref_cell, fast):
        y, state = sb.scan(cell, x, s0)
        ((y * seeded(1, *y.shape).to(DEV)).sum() + state[-1].sum()).backward()
        grads.append({k: p.grad for k, p in cell.named_parameters()})
    for k in grads[0]:
        assert_close(f"d{k}", grads[0][k], grads[1][k], atol=1e-9)


def test_step_runs_the_kernels():
    ref_cell, fast = make_pair("gru", torch.float64)
    x, s0 = inputs(ref_cell, 1, 2, torch.float64)
    y_ref, st_ref = ref_cell.step(x[0], s0)
    y, st = fast.step(x[0], s0)
    assert_close("y", y_ref, y, atol=1e-12)
    for i, (a, b) in enumerate(zip(st_ref, st)):
        assert_close(f"state[{i}]", a, b, atol=1e-12)


def test_trace_counts_dense_macs():
    ref_cell, fast = make_pair("gru", torch.float64)
    x, s0 = inputs(ref_cell, 4, 2, torch.float64)
    with sb.trace() as t:
        y, _ = sb.scan(fast, x.requires_grad_(), s0)
        y.sum().backward()
    per_step = 2 * 15 * (3 + 5)  # B * 3H * (I + H)
    assert t.forward_macs == 4 * per_step
    assert t.backward_macs == 2 * 4 * per_step


# ---- backend selection -------------------------------------------------------------------------

def test_auto_backend_resolves_once_and_logs(monkeypatch, caplog):
    monkeypatch.setattr(kb, "_resolved", {})
    cell = sb.cells.DeltaGRU(3, 5, 0.1, backend="auto").to(DEV)
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        first = cell.active_backend
        assert cell.active_backend == first
    expect = "triton" if CUDA else "cpu"
    assert first == expect
    assert cell.scan_segment is not None  # "cpu" has its C segment scan too (issue 17)
    logs = [r.getMessage() for r in caplog.records if "backend 'auto' on" in r.getMessage()]
    assert len(logs) == 1 and f"resolved to {expect!r}" in logs[0]
    assert sb.cells.DeltaGRU(3, 5).active_backend == "cpu"  # the default (auto) on CPU weights


def test_reference_backend_has_no_segment_scan():
    for backend, fused in (("cpu", True), ("torch", False)):  # "cpu": the C segment scan (issue 17)
        cell = sb.cells.DeltaLSTM(3, 5, 0.1, backend=backend)
        assert cell.active_backend == backend and (cell.scan_segment is not None) == fused


def test_triton_unavailable_raises(monkeypatch):
    monkeypatch.setitem(kb._probes, "triton", (False, "no CUDA device (test)"))
    with pytest.raises(kb.BackendUnavailable, match=r"backend 'triton' was requested but is unavailable: "
                                                     r"no CUDA device \(test\)"):
        sb.cells.DeltaGRU(3, 5, backend="triton")
    monkeypatch.setattr(kb, "_resolved", {})
    expect = "torch" if CUDA else "cpu"  # auto: no raise
    assert sb.cells.DeltaGRU(3, 5, backend="auto").to(DEV).active_backend == expect


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"DeltaLSTM: unknown backend 'cuda'; valid backends are: "
                                         r"auto, torch, cpu, triton"):
        sb.cells.DeltaLSTM(3, 5, backend="cuda")


def test_input_checks():
    H, I, B = 5, 3, 2
    w_ih, w_hh, b = torch.zeros(3 * H, I), torch.zeros(3 * H, H), torch.zeros(3 * H)
    state = sb.cells.DeltaGRU(I, H).initial_state(B)
    x = torch.zeros(4, B, I)
    f = fused_recurrent_delta_gru
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor \[L, B, I\], got \(2, 3\)"):
        f(torch.zeros(B, I), state, w_ih, w_hh)
    with pytest.raises(TypeError, match="dtype torch.float16 is not supported"):
        f(x.half(), state, w_ih, w_hh)
    with pytest.raises(ValueError, match=r"weight_hh must be \[3\*H, H\], got \(15, 4\)"):
        f(x, state, w_ih, torch.zeros(15, 4))
    with pytest.raises(ValueError, match=r"weight_ih must be \[3\*H, I\] = \(15, 3\), got \(15, 4\)"):
        f(x, state, torch.zeros(15, 4), w_hh)
    with pytest.raises(ValueError, match="give both bias_ih and bias_hh or neither"):
        f(x, state, w_ih, w_hh, b, None)
    with pytest.raises(ValueError, match=r"bias_hh must be \[15\], got \(14,\)"):
        f(x, state, w_ih, w_hh, b, torch.zeros(14))
    with pytest.raises(ValueError, match=r"state must be a tuple \(h, x_ref, h_ref, m_x, m_h\), got 4 tensors"):
        f(x, state[:4], w_ih, w_hh)
    with pytest.raises(ValueError, match=r"state m_h must have shape \(2, 15\), got \(2, 20\)"):
        f(x, state[:4] + (torch.zeros(B, 20),), w_ih, w_hh)
    with pytest.raises(TypeError, match="weight_hh is torch.float64 on cpu but x is torch.float32"):
        f(x, state, w_ih, w_hh.double())
    with pytest.raises(ValueError, match="hidden_threshold must be a number >= 0, got -1"):
        f(x, state, w_ih, w_hh, hidden_threshold=-1)
    lstm_state = sb.cells.DeltaLSTM(I, H).initial_state(B)
    with pytest.raises(ValueError, match=r"weight_hh must be \[4\*H, H\], got \(15, 5\)"):
        fused_recurrent_delta_lstm(x, lstm_state, w_ih, w_hh)
    if CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            f(x, state, w_ih, w_hh)


# ---- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_on_gpu_large(kind, dtype):
    """On the GPU, T=100, B=4, H=200 (800 units: seven blocks of 128, the last one masked), I=7:
    Full, Checkpoint and Revolve against the reference under full BPTT. (80,000 hidden deltas:
    kept 1e-4 from the threshold.)"""
    ref_cell, fast = make_pair(kind, dtype, I=7, H=200, device="cuda", hidden_threshold=0.05)
    x, s0 = inputs(ref_cell, 100, 4, dtype, min_margin=1e-4)
    ref, _ = run(ref_cell, x, s0)
    for st in (sb.FullBPTT(), sb.Checkpoint(every=17), sb.Revolve(slots=8)):
        compare(ref, run(fast, x, s0, st)[0], dtype)
