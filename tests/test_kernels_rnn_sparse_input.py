"""The fused CPU GRU and LSTM on a mostly-zero input (one-hot tokens, graded events): the sparse
input route (`SparseRoute`, the products of `SparseRows`) against the matmul route and the torch
reference.

Oracle: `naive_gru` / `naive_lstm` (the reference step under autograd) for the layer functions,
the backend="torch" cells under FullBPTT for scans; outputs, final states and every gradient within
`sparsebptt.testing.assert_close`'s tolerances. Spies on `SparseRows.project` / `.weight_grad`
show which route ran.
"""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
from sparsebptt.kernels import backend as kb
from sparsebptt.kernels.rnn.cpu import fused_gru_layer, fused_lstm_layer
from sparsebptt.kernels.rnn.naive import naive_gru, naive_lstm
from sparsebptt.kernels.sparse_input.cpu import SparseRoute, SparseRows
from sparsebptt.testing import assert_close, scan_grads, seeded

pytestmark = pytest.mark.skipif(not kb.backend_available("cpu")[0],
                                reason=f"cpu backend unavailable: {kb.backend_available('cpu')[1]}")

N_IN, H = 20, 11
#: kind -> (layer function, reference, number of state tensors, gates)
KINDS = {"gru": (fused_gru_layer, naive_gru, 1, 3), "lstm": (fused_lstm_layer, naive_lstm, 2, 4)}
CELLS = {"gru": sb.cells.GRU, "lstm": sb.cells.LSTM}
DTYPES = [torch.float64, torch.float32]
DT_IDS = ["fp64", "fp32"]
#: every exact strategy, with segments cut in several ways
STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=1), sb.Checkpoint(every=4), sb.Checkpoint(every=7),
              sb.Revolve(slots=1), sb.Revolve(slots=2), sb.Revolve(slots=5),
              sb.DoubleCheckpoint(outer=10, inner=3, outer_storage="host"),
              sb.DoubleCheckpoint(outer=8, inner=8, outer_storage="disk"),
              sb.DoubleCheckpoint.optimal(fast_slots=2, slow_slots=3, outer_storage="host")]


def _sid(s):
    return s.to_string() + getattr(s, "outer_storage", "")


def sparse_x(values, L, B, dtype, seed=0, n_in=N_IN):
    """A mostly-zero input [L, B, n_in]: ``onehot`` tokens, or ``graded`` (normal values at ~10 %
    of the entries, at least one nonzero)."""
    if values == "onehot":
        g = torch.Generator().manual_seed(seed)
        return torch.nn.functional.one_hot(torch.randint(0, n_in, (L, B), generator=g), n_in).to(dtype)
    x = seeded(seed, L, B, n_in, dtype=dtype, kind="spikes", p=0.1) * seeded(seed + 1, L, B, n_in, dtype=dtype)
    assert x.count_nonzero() > 0
    return x


def layer_args(kind, dtype, B, seed=10):
    """(states, [W_ih, W_hh, b_ih, b_hh]) seeded, for a layer of ``kind``."""
    _, _, n_states, G = KINDS[kind]
    states = [0.5 * seeded(seed + k, B, H, dtype=dtype) for k in range(n_states)]
    s = 1 / H ** 0.5
    weights = [s * seeded(seed + 5, G * H, N_IN, dtype=dtype), s * seeded(seed + 6, G * H, H, dtype=dtype),
               s * seeded(seed + 7, G * H, dtype=dtype), s * seeded(seed + 8, G * H, dtype=dtype)]
    return states, weights


class Spy:
    """Counts calls of `SparseRows.project` and `.weight_grad` (monkeypatched)."""

    def __init__(self, monkeypatch):
        self.project = self.weight_grad = 0
        project, weight_grad = SparseRows.project, SparseRows.weight_grad

        def spy_project(rows, *a, **k):
            self.project += 1
            return project(rows, *a, **k)

        def spy_weight_grad(rows, *a, **k):
            self.weight_grad += 1
            return weight_grad(rows, *a, **k)

        monkeypatch.setattr(SparseRows, "project", spy_project)
        monkeypatch.setattr(SparseRows, "weight_grad", spy_weight_grad)


def run_layer(fn, x, states, weights, route, need):
    """The layer forward + backward with loss sum(ys*dys) + sum(state_T*d); ``need``: flags (x,
    states, W_ih, W_hh, b_ih, b_hh) of what requires grad. Returns (results, whether the node
    saved an [L, B, in] tensor, i.e. x)."""
    x = x.clone().requires_grad_(need[0])
    states = [s.clone().requires_grad_(need[1]) for s in states]
    weights = [w.clone().requires_grad_(f) for w, f in zip(weights, need[2:])]
    kw = {} if route == "reference" else {"route": route}
    out = fn(x, *states, *weights, **kw)
    x_saved = route != "reference" and any(t is not None and t.shape == x.shape
                                           for t in out[0].grad_fn.saved_tensors)
    loss = sum((o * seeded(100 + k, *o.shape).to(x.dtype)).sum() for k, o in enumerate(out))
    loss.backward()
    res = {"ys": out[0].detach()}
    res.update({f"state_T[{k}]": o.detach() for k, o in enumerate(out[1:])})
    res.update({"dx": x.grad}, **{f"dstate0[{k}]": s.grad for k, s in enumerate(states)})
    res.update({n: w.grad for n, w in zip(("dW_ih", "dW_hh", "db_ih", "db_hh"), weights)})
    return res, x_saved


NEEDS = {"all": (True,) * 6, "no-dx": (False,) + (True,) * 5,
         "frozen-w_ih": (True, True, False, True, True, True), "w_ih-only": (False, False, True, False, False, False)}


@pytest.mark.parametrize("need", NEEDS)
@pytest.mark.parametrize("values", ["onehot", "graded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_layer_equals_the_matmul_layer_and_the_reference(kind, dtype, values, need, monkeypatch):
    """On a sparse route the layer gives the reference's outputs, final states and gradients (and
    the matmul route's); the projection and dW_ih ran from the nonzeros, which the backward keeps
    instead of x."""
    fn, naive, _, _ = KINDS[kind]
    L, B = 300, 3  # several chunks of steps (CHUNK_ROWS)
    x = sparse_x(values, L, B, dtype)
    states, weights = layer_args(kind, dtype, B)
    flags = NEEDS[need]
    ref, _ = run_layer(naive, x.double(), [s.double() for s in states], [w.double() for w in weights],
                       "reference", flags)
    dense, dense_x_saved = run_layer(fn, x, states, weights, None, flags)
    spy = Spy(monkeypatch)
    route = SparseRoute()
    got, sparse_x_saved = run_layer(fn, x, states, weights, route, flags)
    assert route.sparse is True and spy.project > 0
    assert spy.weight_grad == (spy.project if flags[2] else 0)  # dW_ih per chunk, from the nonzeros
    for name in ref:
        expect = None if ref[name] is None else ref[name].to(dtype)
        assert_close(f"{kind} {name} (sparse vs reference)", expect, got[name], dtype)
        assert_close(f"{kind} {name} (sparse vs matmul)", dense[name], got[name], dtype)
    # x is saved only for a matmul dW_ih: the sparse route keeps the nonzeros instead
    assert [dense_x_saved, sparse_x_saved] == [flags[2], False]


@pytest.mark.parametrize("kind", KINDS)
def test_a_dense_input_takes_the_matmuls(kind, monkeypatch):
    """More than SPARSE_INPUT_MAX nonzero: the route says dense and the layer repeats the matmul
    route bit for bit."""
    fn, _, _, _ = KINDS[kind]
    x = seeded(3, 40, 2, N_IN, kind="spikes", p=0.4)
    states, weights = layer_args(kind, torch.float64, 2)
    dense, _ = run_layer(fn, x, states, weights, None, NEEDS["all"])
    spy = Spy(monkeypatch)
    route = SparseRoute()
    got, _ = run_layer(fn, x, states, weights, route, NEEDS["all"])
    assert route.sparse is False and spy.project == spy.weight_grad == 0
    for name in dense:
        assert torch.equal(dense[name], got[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_sparse_layer_equals_the_matmul_layer(kind):
    fn, _, _, _ = KINDS[kind]
    x = sparse_x("graded", 50, 4, torch.float64)
    states, weights = layer_args(kind, torch.float64, 4)
    with torch.no_grad():
        dense = fn(x, *states, *weights)
        route = SparseRoute()
        got = fn(x, *states, *weights, route=route)
    assert route.sparse is True
    for k, (a, b) in enumerate(zip(dense, got)):
        assert_close(f"out[{k}]", a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_trace_counts_the_sparse_products(kind):
    """sb.trace: the projection and dW_ih count nnz*G*H MACs on the sparse route (dx = dgi W_ih
    stays a matmul: L*B*in*G*H); the matmul route counts L*B*in*G*H for each."""
    fn, _, _, G = KINDS[kind]
    L, B = 30, 4
    x = sparse_x("graded", L, B, torch.float64)
    nnz = int(x.count_nonzero())
    states, weights = layer_args(kind, torch.float64, B)
    rec_f, rec_b = L * B * H * G * H, (2 * L) * B * H * G * H  # dh_{t-1} (h0 included) and dW_hh
    for route, x_macs in ((None, L * B * N_IN * G * H), (SparseRoute(), nnz * G * H)):
        with sb.trace() as t:
            run_layer(fn, x, states, weights, route, NEEDS["all"])
        assert t.forward_macs == x_macs + rec_f
        assert t.backward_macs == L * B * N_IN * G * H + x_macs + rec_b
        with sb.trace() as t:
            run_layer(fn, x, states, weights, route, NEEDS["no-dx"])
        assert t.backward_macs == x_macs + rec_b


def test_route_must_be_a_sparse_route():
    states, weights = layer_args("gru", torch.float64, 2)
    with pytest.raises(TypeError, match="SparseRoute"):
        fused_gru_layer(sparse_x("onehot", 3, 2, torch.float64), *states, *weights, route=True)


# ---- scans: the cells bind one route per scan ---------------------------------------------------
def make_pair(kind, dtype):
    torch.manual_seed(0)
    ref = CELLS[kind](N_IN, H, backend="torch").to(dtype)
    fast = CELLS[kind](N_IN, H, backend="cpu").to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def run_scan(cell, x, strategy):
    """`scan_grads` from seeded (nonzero) initial states: outputs, states and every gradient."""
    state0 = tuple(0.5 * seeded(1 + k, *s.shape, dtype=x.dtype)
                   for k, s in enumerate(cell.initial_state(x.shape[1], dtype=x.dtype)))
    return scan_grads(cell, x, state0, strategy)[0]


class RouteSpy:
    """Records each `SparseRoute.rows` call of a scan: (route, density of x, sparse after it)."""

    def __init__(self, monkeypatch):
        self.calls = []
        rows = SparseRoute.rows

        def spy(route, x2, keep):
            r = rows(route, x2, keep)
            self.calls.append((route, float(x2.count_nonzero()) / x2.numel(), route.sparse))
            return r

        monkeypatch.setattr(SparseRoute, "rows", spy)


def test_scan_segment_binds_a_route_per_scan():
    for kind in CELLS:
        cell = CELLS[kind](N_IN, H, backend="cpu")
        a, b = cell.scan_segment, cell.scan_segment
        assert isinstance(a.keywords["route"], SparseRoute) and a.keywords["route"] is not b.keywords["route"]
        assert CELLS[kind](N_IN, H, backend="torch").scan_segment is None


@pytest.mark.parametrize("strategy", STRATEGIES, ids=_sid)
@pytest.mark.parametrize("kind", CELLS)
def test_a_sparse_input_scan_equals_the_reference_under_every_strategy(kind, strategy, monkeypatch):
    """One-hot input: every segment (recomputations included) takes the sparse route; float64
    outputs and every gradient equal the torch reference's under FullBPTT."""
    ref, fast = make_pair(kind, torch.float64)
    x = sparse_x("onehot", 37, 3, torch.float64)
    expect = run_scan(ref, x, sb.FullBPTT())
    spy = RouteSpy(monkeypatch)
    got = run_scan(fast, x, strategy)
    assert spy.calls and all(sparse for _, _, sparse in spy.calls)
    for name in expect:
        assert_close(name, expect[name], got[name], torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", CELLS)
def test_a_graded_sparse_scan_equals_the_reference(kind, dtype):
    ref, fast = make_pair(kind, dtype)
    x = sparse_x("graded", 45, 2, dtype, seed=4)
    expect = run_scan(ref, x, sb.FullBPTT())
    for strategy in (sb.FullBPTT(), sb.Checkpoint(every=6), sb.Revolve(slots=2)):
        got = run_scan(fast, x, strategy)
        for name in expect:
            assert_close(f"{_sid(strategy)} {name}", expect[name], got[name], dtype)


@pytest.mark.parametrize("strategy", STRATEGIES[1:], ids=_sid)
@pytest.mark.parametrize("kind", CELLS)
def test_a_scan_sparse_first_and_dense_later_equals_plain_bptt(kind, strategy, monkeypatch):
    """The first segment decides: one-hot steps first, then dense ones (the whole input over
    SPARSE_INPUT_MAX, so FullBPTT's one segment runs the matmuls). A checkpointed scan keeps the
    sparse route on its dense segments too; its gradients equal plain BPTT's."""
    ref, fast = make_pair(kind, torch.float64)
    x = torch.cat([sparse_x("onehot", 24, 2, torch.float64), seeded(5, 16, 2, N_IN)])
    expect = run_scan(ref, x, sb.FullBPTT())
    spy = RouteSpy(monkeypatch)
    plain = run_scan(fast, x, sb.FullBPTT())
    assert [sparse for _, _, sparse in spy.calls] == [False]
    spy.calls.clear()
    got = run_scan(fast, x, strategy)
    if isinstance(strategy, sb.Checkpoint):  # short first segments: sparse
        assert spy.calls[0][2]
    if spy.calls[0][1] <= 0.25:  # the first segment is sparse: every later one follows it
        assert all(sparse for _, _, sparse in spy.calls)
        assert any(density > 0.25 for _, density, _ in spy.calls)
    for name in expect:
        assert_close(name, expect[name], got[name], torch.float64)
        assert_close(name, plain[name], got[name], torch.float64)


@pytest.mark.parametrize("kind", CELLS)
def test_a_stack_takes_a_route_per_layer(kind, monkeypatch):
    """In a Stack, the first layer (one-hot input) runs sparse, the next (dense hidden states)
    runs the matmuls; gradients equal the reference stack's."""
    torch.manual_seed(0)
    ref = sb.cells.Stack([CELLS[kind](N_IN, H, backend="torch"), CELLS[kind](H, 7, backend="torch")]).double()
    fast = sb.cells.Stack([CELLS[kind](N_IN, H, backend="cpu"), CELLS[kind](H, 7, backend="cpu")]).double()
    fast.load_state_dict(ref.state_dict())
    x = sparse_x("onehot", 29, 3, torch.float64)
    expect = run_scan(ref, x, sb.FullBPTT())
    spy = RouteSpy(monkeypatch)
    got = run_scan(fast, x, sb.Checkpoint(every=5))
    routes = {}
    for route, _, sparse in spy.calls:
        routes.setdefault(id(route), set()).add(sparse)
    assert sorted(map(sorted, routes.values())) == [[False], [True]]
    for name in expect:
        assert_close(name, expect[name], got[name], torch.float64)


def test_an_override_with_the_older_signature_runs_without_a_route():
    """A user's subclass whose ``_scan_segment(x_seg, state)`` takes no ``route`` still scans on the
    "cpu" backend (called without it: the matmul route) and equals the cell it wraps."""
    class Logged(sb.cells.GRU):
        calls = 0

        def _scan_segment(self, x_seg, state):
            type(self).calls += 1
            return super()._scan_segment(x_seg, state)

    torch.manual_seed(0)
    base = sb.cells.GRU(6, 8, backend="cpu").double()
    cell = Logged(6, 8, backend="cpu").double()
    cell.load_state_dict(base.state_dict())
    assert cell.scan_segment == cell._scan_segment and "route" in base.scan_segment.keywords
    x = torch.nn.functional.one_hot(torch.randint(0, 6, (9, 2), generator=torch.Generator().manual_seed(1)), 6)
    x = x.double()
    y, _ = sb.scan(cell, x)
    assert Logged.calls >= 1
    assert_close("out", sb.scan(base, x)[0], y)
