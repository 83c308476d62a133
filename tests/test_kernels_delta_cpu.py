"""The Delta cells' C segment scan (backend "cpu", `sparsebptt.kernels.delta.cpu.fused_recurrent_delta`)
equals the reference (backend "torch", the step loop of `sparsebptt.kernels.delta.naive`): outputs,
final states and every gradient (x, the whole initial state, every parameter), float64 within
1e-10 and float32 within a bound derived from the arithmetic, at thresholds 0 and above, under
every exact strategy; counters; the fallback for other dtypes; the error paths (issue 17)."""
from __future__ import annotations

import logging

import pytest
import torch

import sparsebptt as sb
from sparsebptt.kernels.delta.cpu import fused_recurrent_delta, load_library
from sparsebptt.kernels.delta.naive import naive_recurrent_delta_gru, naive_recurrent_delta_lstm
from sparsebptt.testing import assert_close, scan_grads, seeded

N_IN, H = 5, 6
CELLS = {"delta-gru": sb.cells.DeltaGRU, "delta-lstm": sb.cells.DeltaLSTM}
STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=3), sb.Revolve(slots=2), sb.DoubleCheckpoint(outer=8, inner=3)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def f32_rtol(T: int, n: int) -> float:
    """float32 bound relative to the tensor's largest magnitude: the kernel and the reference sum
    the same products in other orders (dot products of n = G*H + I terms, memories summed over
    T steps, gradients carried back over T steps), each rounding costing up to eps = 2^-24 of the
    running sum; ~sqrt(terms) for random signs, times 8 for the gate derivatives' amplification."""
    return 8 * 2.0 ** -24 * ((n + 1) * (T + 1)) ** 0.5


def pair(kind, dtype, threshold, hidden_threshold=None, bias=True):
    torch.manual_seed(7)
    ref = CELLS[kind](N_IN, H, threshold, hidden_threshold, bias=bias, backend="torch").to(dtype)
    got = CELLS[kind](N_IN, H, threshold, hidden_threshold, bias=bias, backend="cpu").to(dtype)
    got.load_state_dict(ref.state_dict())
    return ref, got


def slow_input(T, B, dtype, seed=0):
    """Slowly varying input (a random walk): many deltas stay under the threshold."""
    return (seeded(seed, T, B, N_IN, dtype=dtype) * 0.3).cumsum(0)


def random_state(cell, B, dtype, seed=50):
    """A random (consistent or not: the math is the same) initial state, every component non-zero."""
    return tuple(seeded(seed + i, *s.shape, dtype=dtype) * 0.3
                 for i, s in enumerate(cell.initial_state(B, dtype=dtype)))


def run(cell, x, state0, strategy=None, x_grad=True, state_grad=True):
    return scan_grads(cell, x, state0, strategy, x_grad=x_grad, state_grad=state_grad)


def compare(ref, got, dtype, T):
    assert ref.keys() == got.keys()
    for name in ref:
        if dtype == torch.float64:
            assert_close(name, ref[name], got[name])
        else:
            assert_close(name, ref[name], got[name], atol=0.0, rtol=f32_rtol(T, 4 * H + N_IN))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("thresholds", [(0.0, 0.0), (0.2, 0.1), (0.0, 0.15), (0.3, 0.0)],
                         ids=lambda t: f"theta{t[0]}-{t[1]}")
@pytest.mark.parametrize("kind", list(CELLS))
def test_segment_scan_equals_reference(kind, thresholds, dtype, strategy):
    ref, got = pair(kind, dtype, *thresholds)
    assert got.scan_segment is not None and ref.scan_segment is None
    T = 13
    x = slow_input(T, 3, dtype)
    state0 = random_state(ref, 3, dtype)
    r, tr = run(ref, x, state0, strategy)
    g, tg = run(got, x, state0, strategy)
    compare(r, g, dtype, T)
    if thresholds != (0.0, 0.0):  # some deltas skipped, some sent
        assert 0.0 < tg.activity[type(got).__name__] < 1.0
    assert tg.activity == pytest.approx(tr.activity, abs=1e-12)


@pytest.mark.parametrize("kind", list(CELLS))
def test_segment_equals_the_naive_loop_directly(kind):
    """`fused_recurrent_delta` against the naive loop, gradients of a loss on outputs and every
    final state component, and without biases."""
    lstm = kind == "delta-lstm"
    naive = naive_recurrent_delta_lstm if lstm else naive_recurrent_delta_gru
    G = 4 if lstm else 3
    for bias in (True, False):
        ws = [seeded(1, G * H, N_IN) * 0.5, seeded(2, G * H, H) * 0.5]
        bs = [seeded(3, G * H), seeded(4, G * H)] if bias else [None, None]
        x = slow_input(9, 2, torch.float64, seed=5)
        sizes = [H] * (2 if lstm else 1) + [N_IN, H, G * H, G * H]
        st = [seeded(10 + i, 2, n) * 0.3 for i, n in enumerate(sizes)]
        leaves = [t.requires_grad_() for t in [x, *ws, *[b for b in bs if b is not None], *st]]

        def loss_of(fn):
            ys, s = fn(x, st, *ws, *bs, 0.25, 0.1)
            loss = (ys * seeded(20, *ys.shape)).sum() + sum((v * seeded(30 + k, *v.shape)).sum()
                                                              for k, v in enumerate(s))
            return [ys, *s, *torch.autograd.grad(loss, leaves)]

        want = loss_of(naive)
        have = loss_of(lambda *a: fused_recurrent_delta(*a, lstm=lstm))
        for i, (a, b) in enumerate(zip(want, have)):
            assert_close(f"{kind} bias={bias} [{i}]", a, b)


@pytest.mark.parametrize("kind", list(CELLS))
def test_no_input_gradient_and_no_state_gradient(kind):
    """x and the initial state without gradients (the input side's dots are skipped): weights'
    gradients unchanged; a no-grad forward gives the same outputs."""
    ref, got = pair(kind, torch.float64, 0.2)
    x = slow_input(11, 4, torch.float64)
    state0 = random_state(ref, 4, torch.float64)
    r, _ = run(ref, x, state0, x_grad=False, state_grad=False)
    g, _ = run(got, x, state0, x_grad=False, state_grad=False)
    compare(r, g, torch.float64, 11)
    with torch.no_grad():
        out, _ = sb.scan(got, x, state0)
    assert_close("no-grad out", r["out"], out)


def test_macs_fall_with_the_threshold():
    """Forward and backward MACs done are those of the active entries: at threshold 0 the same
    as the reference's dense products; above it a fraction near the activity."""
    x = slow_input(20, 4, torch.float64)
    counts = {}
    for th in (0.0, 0.3):
        _, got = pair("delta-gru", torch.float64, th)
        _, t = run(got, x, random_state(got, 4, torch.float64))
        counts[th] = (t.forward_macs, t.backward_macs, t.activity["DeltaGRU"])
    G3H = 3 * H
    assert counts[0.0][0] == 20 * 4 * (N_IN + H) * G3H  # every entry active
    assert counts[0.0][1] == 2 * counts[0.0][0]  # one dot and one dW axpy per entry
    fwd, bwd, act = counts[0.3]
    assert fwd == pytest.approx(act * counts[0.0][0], rel=1e-9) and bwd == 2 * fwd and act < 0.8


def test_other_dtypes_run_step_by_step_and_log(caplog):
    """bfloat16 is not a C kernel dtype: the "cpu" backend steps through `sparse_linear` (logged)."""
    ref, got = pair("delta-gru", torch.float64, 0.1)
    got = got.to(torch.bfloat16)
    x = slow_input(5, 2, torch.float64).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        out, _ = sb.scan(got, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert any("runs step by step for torch.bfloat16" in r.getMessage() for r in caplog.records)


def test_errors():
    x = slow_input(4, 2, torch.float64)
    ref, _ = pair("delta-gru", torch.float64, 0.1)
    st = ref.initial_state(2, dtype=torch.float64)
    w = (ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh)
    with pytest.raises(ValueError, match="the Delta GRU state has 5 tensors, got 4"):
        fused_recurrent_delta(x, st[:4], *w, lstm=False)
    with pytest.raises(ValueError, match=r"x must be \[L, B, I\], got \(2, 5\)"):
        fused_recurrent_delta(x[0], st, *w, lstm=False)
    with pytest.raises(ValueError, match="needs CPU float32 or float64 tensors of one dtype"):
        fused_recurrent_delta(x.float(), st, *w, lstm=False)


def test_library_has_both_dtypes():
    lib = load_library()
    for name in ("delta_fwd_f32", "delta_fwd_f64", "delta_bwd_f32", "delta_bwd_f64"):
        assert hasattr(lib, name)
