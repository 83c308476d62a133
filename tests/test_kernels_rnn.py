"""Fused CPU GRU and LSTM (backend="cpu") against the reference step path (backend="torch").

Oracle chain: `gru_step` / `lstm_step` equal ``nn.GRUCell`` / ``nn.LSTMCell`` (tests/test_cells.py);
here the fused segments must give the reference's outputs, final states and every gradient (x,
each initial state, each parameter) under every exact strategy, with reduce None and "sum", with
and without biases, inside a Stack with LIF layers, and the same `sb.trace` counters.
Tolerances (`sparsebptt.testing.TOLERANCES`): float64 1e-10 absolute, float32 1e-5 relative to
the tensor's largest magnitude (the C gate math rounds differently from torch's, ~1e-7).
"""
from __future__ import annotations

import logging

import pytest
import torch

import sparsebptt as sb
from sparsebptt.cells import base as cells_base
from sparsebptt.kernels import backend as kb
from sparsebptt.kernels.rnn import cpu as rnn_cpu
from sparsebptt.kernels.rnn.cpu import _history, fused_gru_layer, fused_lstm_layer
from sparsebptt.kernels.rnn.naive import naive_gru, naive_lstm
from sparsebptt.testing import assert_close, seeded

pytestmark = pytest.mark.skipif(not kb.backend_available("cpu")[0],
                                reason=f"cpu backend unavailable: {kb.backend_available('cpu')[1]}")

N_IN, H = 5, 11  # H off any vector width
CELLS = {"gru": sb.cells.GRU, "lstm": sb.cells.LSTM}
DTYPES = [torch.float64, torch.float32]
DT_IDS = ["fp64", "fp32"]
STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=3), sb.Revolve(slots=2),
              sb.DoubleCheckpoint(outer=8, inner=3)]


def make_pair(kind, dtype, bias=True, n_in=N_IN, h=H):
    """A reference cell and a fused one with the same (seeded) parameters."""
    torch.manual_seed(0)
    ref = CELLS[kind](n_in, h, bias, backend="torch").to(dtype)
    fast = CELLS[kind](n_in, h, bias, backend="cpu").to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def inputs(cell, T, B, dtype, seed=0):
    x = seeded(seed, T, B, cell.input_size, dtype=dtype)
    state0 = tuple(0.5 * seeded(seed + 1 + k, *s.shape, dtype=dtype)
                   for k, s in enumerate(cell.initial_state(B, dtype=dtype)))
    return x, state0


def run(cell, x, state0, strategy=None, reduce=None, state_grad=True, x_grad=True):
    """Forward + backward with loss (out*dout).sum() + sum(state_T*dstate_T); outputs and grads."""
    x = x.clone().requires_grad_(x_grad)
    state0 = tuple(s.clone().requires_grad_(state_grad) for s in state0)
    for p in cell.parameters():
        p.grad = None
    out, state = sb.scan(cell, x, state0, strategy=strategy, reduce=reduce)
    loss = (out * seeded(100, *out.shape, dtype=x.dtype)).sum()
    for k, s in enumerate(state):
        loss = loss + (s * seeded(200 + k, *s.shape, dtype=x.dtype)).sum()
    loss.backward()
    res = {"out": out.detach(), "dx": x.grad}  # None when x needs no gradient
    res.update({f"state_T[{k}]": s.detach() for k, s in enumerate(state)})
    res.update({f"dstate0[{k}]": s.grad for k, s in enumerate(state0)})
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    return res


def compare(ref, got, dtype, where=""):
    assert ref.keys() == got.keys()
    for name in ref:
        assert_close(f"{where}{name}", ref[name], got[name], dtype)


# ---- the fused path equals the step path -------------------------------------------------------
@pytest.mark.parametrize("reduce", [None, "sum"], ids=["seq", "sum"])
@pytest.mark.parametrize("T", [1, 7, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", CELLS)
def test_fused_equals_reference_under_every_strategy(kind, dtype, T, reduce):
    ref, fast = make_pair(kind, dtype)
    x, state0 = inputs(ref, T, 3, dtype)
    expect = run(ref, x, state0, sb.FullBPTT(), reduce)
    for key, g in expect.items():
        assert g is not None and (key == "dx" or g.abs().max() > 0), key  # every gradient is reached
    for strategy in STRATEGIES:
        compare(expect, run(fast, x, state0, strategy, reduce), dtype, f"{strategy.to_string()}: ")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T", [1, 2, 13], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", CELLS)
def test_fused_layer_equals_naive_loop(kind, dtype, T, bias):
    """`fused_gru_layer` / `fused_lstm_layer` against `naive_gru` / `naive_lstm` (the plain loop
    over the cell step) called directly: outputs, final states and the gradients of x, every
    initial state and every weight and bias."""
    n_states = 1 if kind == "gru" else 2
    G = 3 if kind == "gru" else 4
    B, h = 3, H
    tensors = {"x": seeded(1, T, B, N_IN, dtype=dtype)}
    tensors.update({f"s0[{k}]": 0.5 * seeded(2 + k, B, h, dtype=dtype) for k in range(n_states)})
    tensors["weight_ih"] = 0.4 * seeded(5, G * h, N_IN, dtype=dtype)
    tensors["weight_hh"] = 0.4 * seeded(6, G * h, h, dtype=dtype)
    if bias:
        tensors["bias_ih"] = 0.3 * seeded(7, G * h, dtype=dtype)
        tensors["bias_hh"] = 0.3 * seeded(8, G * h, dtype=dtype)
    results = []
    for fn in ((naive_gru, fused_gru_layer) if kind == "gru" else (naive_lstm, fused_lstm_layer)):
        leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
        out = fn(*leaves.values())
        loss = sum((o * seeded(100 + k, *o.shape, dtype=dtype)).sum() for k, o in enumerate(out))
        loss.backward()
        res = {f"out[{k}]": o.detach() for k, o in enumerate(out)}
        res.update({f"d{k}": t.grad for k, t in leaves.items()})
        for k, g in res.items():
            assert g is not None and g.abs().max() > 0, f"{fn.__name__}: {k} is zero or missing"
        results.append(res)
    compare(*results, dtype)
    assert len(results[0]) == n_states + 1 + len(tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", CELLS)
def test_fused_without_bias(kind, dtype):
    ref, fast = make_pair(kind, dtype, bias=False)
    assert fast.bias_ih is None and fast.bias_hh is None
    x, state0 = inputs(ref, 23, 2, dtype)
    expect = run(ref, x, state0)
    for strategy in (sb.FullBPTT(), sb.Checkpoint(every=5)):
        compare(expect, run(fast, x, state0, strategy), dtype, f"{strategy.to_string()}: ")


@pytest.mark.parametrize("reduce", [None, "sum"], ids=["seq", "sum"])
@pytest.mark.parametrize("kind", CELLS)
def test_segments_of_many_chunks(kind, reduce, monkeypatch):
    """Projections and batched gradients run chunk by chunk (here 3 steps of B=3, the last one
    short); the result is the same."""
    monkeypatch.setattr(rnn_cpu, "CHUNK_ROWS", 10)
    ref, fast = make_pair(kind, torch.float64)
    x, state0 = inputs(ref, 23, 3, torch.float64)
    compare(run(ref, x, state0, sb.FullBPTT(), reduce), run(fast, x, state0, sb.FullBPTT(), reduce),
            torch.float64)
    with torch.no_grad():
        y_ref, y = sb.scan(ref, x, state0)[0], sb.scan(fast, x, state0)[0]
    assert_close("no-grad out", y_ref, y)


@pytest.mark.parametrize("reduce", ["mean", "last"])
@pytest.mark.parametrize("kind", CELLS)
def test_fused_with_other_reductions_and_no_state_grad(kind, reduce):
    ref, fast = make_pair(kind, torch.float64)
    x, state0 = inputs(ref, 17, 2, torch.float64)
    expect = run(ref, x, state0, sb.FullBPTT(), reduce, state_grad=False)
    assert expect["dstate0[0]"] is None
    compare(expect, run(fast, x, state0, sb.Revolve(slots=3), reduce, state_grad=False), torch.float64)


def _stacks(dtype):
    stacks = {}
    for backend in ("torch", "cpu"):
        torch.manual_seed(1)
        stacks[backend] = sb.cells.Stack([
            sb.cells.LIF(N_IN, 12, threshold=0.3, backend=backend),
            sb.cells.GRU(12, 10, backend=backend),
            sb.cells.LSTM(10, 9, backend=backend),
            sb.cells.LIF(9, 7, threshold=0.05, reset="zero", learn_beta=True, backend=backend),
        ]).to(dtype)
    return stacks["torch"], stacks["cpu"]


@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=6), sb.Revolve(slots=3),
                                      sb.DoubleCheckpoint(outer=12, inner=4)], ids=lambda s: s.to_string())
def test_fused_inside_a_stack_with_lif(strategy):
    ref, fast = _stacks(torch.float64)
    assert ref.scan_segment is None and fast.scan_segment is not None
    x = seeded(3, 37, 2, N_IN, kind="spikes", p=0.4)
    state0 = tuple(0.3 * seeded(7 + k, *s.shape) for k, s in enumerate(ref.initial_state(2)))
    compare(run(ref, x, state0, sb.FullBPTT()), run(fast, x, state0, strategy), torch.float64)


# ---- trace counters ----------------------------------------------------------------------------
@pytest.mark.parametrize("grads", ["all", "no-dstate0", "no-dx"])
@pytest.mark.parametrize("strategy", [sb.FullBPTT(), sb.Checkpoint(every=7), sb.Revolve(slots=3)],
                         ids=lambda s: s.to_string())
@pytest.mark.parametrize("kind", CELLS)
def test_trace_counters_equal_the_reference(kind, strategy, grads):
    ref, fast = make_pair(kind, torch.float32)
    x, state0 = inputs(ref, 30, 4, torch.float32)
    traces = []
    for cell in (ref, fast):
        with sb.trace() as t:
            run(cell, x, state0, strategy, state_grad=grads != "no-dstate0", x_grad=grads != "no-dx")
        traces.append(t)
    a, b = traces
    for name in ("forward_steps", "recomputed_steps", "forward_macs", "recomputed_macs", "backward_macs"):
        assert getattr(a, name) == getattr(b, name), (name, getattr(a, name), getattr(b, name))
    assert a.forward_macs > 0 and a.backward_macs > 0
    assert b.peak_stored_bytes <= a.peak_stored_bytes, (b.peak_stored_bytes, a.peak_stored_bytes)


# ---- no-grad path and the layer functions ------------------------------------------------------
@pytest.mark.parametrize("kind", CELLS)
def test_no_grad_forward_equals_and_saves_nothing(kind):
    ref, fast = make_pair(kind, torch.float64)
    x, state0 = inputs(ref, 20, 2, torch.float64)
    with torch.no_grad():
        y_ref, s_ref = sb.scan(ref, x, state0)
        with sb.trace() as t:
            y, s = sb.scan(fast, x, state0)
    assert_close("out", y_ref, y)
    for k, (a, b) in enumerate(zip(s_ref, s)):
        assert_close(f"state_T[{k}]", a, b)
    assert t.peak_stored_bytes == 0 and not y.requires_grad
    assert t.forward_macs == 20 * 2 * (N_IN + H) * len(ref.weight_ih) and t.backward_macs == 0


def _naive(kind, x, state, w_ih, w_hh, b_ih, b_hh):
    """The reference loop over the step function: (ys, *final state)."""
    ys = []
    for t in range(x.shape[0]):
        if kind == "gru":
            state = (sb.cells.gru.gru_step(x[t], state[0], w_ih, w_hh, b_ih, b_hh),)
        else:
            state = sb.cells.lstm.lstm_step(x[t], *state, w_ih, w_hh, b_ih, b_hh)
        ys.append(state[0])
    return (torch.stack(ys), *state)


@pytest.mark.parametrize("kind", CELLS)
def test_layer_gradient_from_some_outputs_only(kind):
    """A gradient from the outputs alone, or from one final state alone (None grads inside)."""
    dtype = torch.float64
    cell = make_pair(kind, dtype)[0]
    x, state0 = inputs(cell, 9, 2, dtype)
    fused = fused_gru_layer if kind == "gru" else fused_lstm_layer
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    for pick in range(1 + len(state0)):
        leaves = [x.clone().requires_grad_()] + [s.clone().requires_grad_() for s in state0]
        want = torch.autograd.grad(_naive(kind, *leaves[:1], tuple(leaves[1:]), *params)[pick].sum(),
                                   leaves + params)
        got = torch.autograd.grad(fused(*leaves, *params)[pick].sum(), leaves + params)
        for k, (a, b) in enumerate(zip(want, got)):
            assert_close(f"output {pick}, grad {k}", a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", CELLS)
def test_backward_recomputes_the_hidden_states_bitwise(kind, dtype):
    """The outputs are not saved: the backward's h_{t-1} (from the saved gates) equal them exactly."""
    cell = make_pair(kind, dtype)[1]
    x, state0 = inputs(cell, 40, 3, dtype)
    with sb.trace() as t, t.saving():
        t.add_external(x, *cell.parameters())  # the caller's tensors
        ys, *_ = cell.scan_segment(x, tuple(s.requires_grad_() for s in state0))
    saved = ys.grad_fn.saved_tensors
    s, cs = saved[0], (saved[1] if kind == "lstm" else None)
    hs = _history(f"{kind}_hist", s, cs, state0[0].detach(), 40, 3, H)
    assert torch.equal(hs[0], state0[0]) and torch.equal(hs[1:], ys[:-1].detach())
    per_step = (4 * H + (H if kind == "lstm" else 0)) * 3 * x.element_size()  # gates (+ c)
    assert t.peak_stored_bytes == 40 * per_step + sum(s.numel() * s.element_size() for s in state0)


def test_final_state_is_not_a_view_of_the_outputs():
    cell = make_pair("gru", torch.float64)[1]
    x, state0 = inputs(cell, 6, 2, torch.float64)
    ys, (h,) = cell.scan_segment(x, state0)
    assert h.untyped_storage().data_ptr() != ys.untyped_storage().data_ptr()
    assert torch.equal(h, ys[-1])


# ---- backend selection and errors --------------------------------------------------------------
@pytest.mark.parametrize("kind", CELLS)
def test_backend_selection(kind, monkeypatch):
    cls = CELLS[kind]
    assert cls(3, 4, backend="torch").scan_segment is None
    cell = cls(3, 4, backend="cpu")
    assert cell.active_backend == "cpu" and cell.scan_segment is not None
    assert "backend='cpu'" in repr(cell)
    assert cls(3, 4, backend="auto").active_backend == kb.resolve_backend("auto", "cpu") == "cpu"
    monkeypatch.setattr(kb, "_default", None)
    monkeypatch.delenv("SPARSEBPTT_BACKEND", raising=False)
    default = cls(3, 4)
    assert default.backend is None and default.active_backend == "cpu"  # default "auto" on CPU
    sb.set_backend("torch")
    assert default.active_backend == "torch" and default.scan_segment is None
    sb.set_backend("cpu")
    assert default.active_backend == "cpu"


def test_scans_log_the_fused_backend(caplog, monkeypatch):
    monkeypatch.setattr(cells_base, "_logged", set())
    cell = sb.cells.LSTM(3, 4, backend="cpu")
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        sb.scan(cell, torch.randn(5, 2, 3))
        sb.scan(cell, torch.randn(5, 2, 3))
    logged = [r.getMessage() for r in caplog.records if "LSTM scans run" in r.getMessage()]
    assert logged == ["sparsebptt: LSTM scans run the fused 'cpu' backend"]


@pytest.mark.parametrize("kind", CELLS)
def test_triton_requested_raises(kind, monkeypatch):
    cls = CELLS[kind]
    name = cls.__name__
    with pytest.raises(ValueError, match=f"backend 'triton' has no {name} kernel; use backend='torch'"):
        cls(3, 4, backend="triton")
    monkeypatch.setitem(kb._probes, "triton", (True, "pretend"))
    monkeypatch.setattr(kb, "_default", "triton")  # the process default, not the cell's choice
    cell = cls(3, 4)
    with pytest.raises(ValueError, match=f"'triton' \\(the process default\\) has no {name} kernel"):
        cell.active_backend


def test_auto_on_cuda_runs_torch_and_logs_once(monkeypatch, caplog):
    """"auto" resolved to "triton" (a CUDA device) runs these cells with "torch", logged once."""
    monkeypatch.setattr(cells_base, "resolve_backend", lambda name, device: "triton")
    monkeypatch.setattr(cells_base, "_logged", set())
    cell = sb.cells.GRU(3, 4, backend="auto")
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        assert cell.active_backend == "torch" and cell.scan_segment is None
        assert cell.active_backend == "torch"
    logged = [r.getMessage() for r in caplog.records if "on CUDA with 'torch'" in r.getMessage()]
    assert logged == ["sparsebptt: backend 'auto' runs GRU cells on CUDA with 'torch' (no Triton GRU kernel)"]


@pytest.mark.parametrize("bad", ["cuda", "CPU", 3])
def test_unknown_backend_lists_the_valid_ones(bad):
    for cls in CELLS.values():
        with pytest.raises(ValueError, match="valid backends are: auto, torch, cpu, triton"):
            cls(3, 4, backend=bad)


def test_unavailable_backend_raises(monkeypatch):
    monkeypatch.setitem(kb._probes, "cpu", (False, "no C compiler found"))
    for cls in CELLS.values():
        with pytest.raises(kb.BackendUnavailable, match="'cpu' was requested but is unavailable: no C compiler"):
            cls(3, 4, backend="cpu")


def test_half_precision_is_refused_with_the_fix():
    cell = sb.cells.GRU(3, 4, backend="cpu").half()
    with pytest.raises(TypeError, match=r"dtype torch.float16 is not supported; use float32 or float64 "
                                        r"\(or backend='torch'\)"):
        sb.scan(cell, torch.randn(2, 1, 3).half())


@pytest.mark.parametrize("case,match", [
    ("xrank", r"x must be a 3-D tensor \[L, B, in\]"),
    ("whh", r"weight_hh must be \[3\*H, H\]"),
    ("wih", r"weight_ih must have shape \(12, 5\)"),
    ("bias", r"bias_hh must have shape \(12,\)"),
    ("h0", r"h0 must have shape \(2, 4\)"),
    ("dtype", "they must match"),
])
def test_layer_input_checks(case, match):
    x, h0, w_ih, w_hh, b = torch.zeros(3, 2, 5), torch.zeros(2, 4), torch.zeros(12, 5), torch.zeros(12, 4), \
        torch.zeros(12)
    b_hh = b
    if case == "xrank":
        x = torch.zeros(2, 5)
    elif case == "whh":
        w_hh = torch.zeros(12, 5)
    elif case == "wih":
        w_ih = torch.zeros(12, 6)
    elif case == "bias":
        b_hh = torch.zeros(9)
    elif case == "h0":
        h0 = torch.zeros(2, 3)
    elif case == "dtype":
        w_ih = w_ih.double()
    with pytest.raises((ValueError, TypeError), match=match):
        fused_gru_layer(x, h0, w_ih, w_hh, b, b_hh)


# ---- W_hh^T made once per value of the weight (issue 17) ----------------------------------------
def test_transposed_copy_is_reused_until_the_weight_changes():
    import gc

    from sparsebptt.kernels import common
    w = torch.nn.Parameter(seeded(1, 6, 4))
    a = common.transposed(w)
    assert torch.equal(a, w.t()) and a.is_contiguous() and not a.requires_grad
    assert common.transposed(w) is a  # reused
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step: the version counter moves
    b = common.transposed(w)
    assert b is not a and torch.equal(b, w.t())
    w.data = seeded(2, 6, 4)  # a new storage
    c = common.transposed(w)
    assert c is not b and torch.equal(c, w.t())
    held = len(common._transposed_cache.entries)
    del w, a, b, c
    gc.collect()
    common.transposed(torch.ones(2, 2))  # the next miss drops the copies of weights gone since
    assert len(common._transposed_cache.entries) <= held


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_checkpointed_training_steps_see_the_updated_weights(kind):
    """Two SGD steps under Checkpoint: the second scan's segments multiply by the updated W_hh,
    as the reference (FullBPTT, backend "torch") does."""
    ref, fast = make_pair(kind, torch.float64, h=18)
    x = seeded(3, 20, 2, N_IN)
    for cell, strategy in ((ref, sb.FullBPTT()), (fast, sb.Checkpoint(every=6))):
        opt = torch.optim.SGD(cell.parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            out, _ = sb.scan(cell, x, strategy=strategy)
            (out * seeded(4, *out.shape)).sum().backward()
            opt.step()
    for (n, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert_close(n, p.detach(), q.detach(), torch.float64)
