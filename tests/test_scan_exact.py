"""Every exact strategy gives the outputs and gradients of FullBPTT (DESIGN section 4)."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
from sparsebptt.testing import assert_close

from helpers import make_cell, run

CELLS = ["lif", "lif-zero", "gru", "lstm", "stack", "user", "segment", "stack-segment", "egru"]
STRATEGIES = [sb.Checkpoint(every=1), sb.Checkpoint(every=4), sb.Checkpoint(every=7),
              sb.Revolve(slots=1), sb.Revolve(slots=2), sb.Revolve(slots=5),
              sb.DoubleCheckpoint(outer=10, inner=3, outer_storage="host"),
              sb.DoubleCheckpoint(outer=8, inner=8, outer_storage="disk"),
              sb.DoubleCheckpoint(outer=40, inner=7, outer_storage="disk"),
              sb.DoubleCheckpoint.optimal(fast_slots=2, slow_slots=3, outer_storage="host"),
              sb.DoubleCheckpoint.optimal(fast_slots=1, slow_slots=2, outer_storage="disk")]
_REF: dict = {}


def reference(kind, T, B, dtype, reduce=None):
    key = (kind, T, B, dtype, reduce)
    if key not in _REF:
        _REF[key] = run(make_cell(kind, dtype), T, B, dtype, sb.FullBPTT(), reduce)
    return _REF[key]


def compare(ref, got, dtype):
    assert ref.keys() == got.keys()
    for name in ref:
        assert_close(name, ref[name], got[name], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("T", [1, 2, 37, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string() + getattr(s, "outer_storage", ""))
@pytest.mark.parametrize("kind", CELLS)
def test_exact_strategy_equals_full_bptt(kind, strategy, T, B, dtype):
    ref = reference(kind, T, B, dtype)
    got = run(make_cell(kind, dtype), T, B, dtype, strategy)
    compare(ref, got, dtype)


@pytest.mark.parametrize("reduce", ["sum", "mean", "last"])
@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=6), sb.Revolve(slots=3)], ids=lambda s: s.to_string())
@pytest.mark.parametrize("kind", ["stack", "user"])
def test_reduce_equals_full_bptt(kind, strategy, reduce):
    dtype = torch.float64
    ref = reference(kind, 29, 2, dtype, reduce)
    got = run(make_cell(kind, dtype), 29, 2, dtype, strategy, reduce)
    assert ref["out"].shape == (2, make_cell(kind).initial_state(1)[0].shape[1] if kind == "user" else 5)
    compare(ref, got, dtype)


@pytest.mark.parametrize("reduce", [None, "sum", "mean", "last"], ids=str)
@pytest.mark.parametrize("kind", ["segment", "stack-segment"])
def test_scan_segment_path_equals_step_path(kind, reduce):
    """A cell's fused scan_segment gives what stepping it gives, under every strategy."""
    dtype = torch.float64
    cell = make_cell(kind, dtype)
    stepped = run(_StepOnly(cell), 41, 2, dtype, sb.FullBPTT(), reduce)
    for st in [sb.FullBPTT(), sb.Checkpoint(6), sb.Revolve(3), sb.DoubleCheckpoint(16, 4, "disk")]:
        got = run(cell, 41, 2, dtype, st, reduce)
        for name in stepped:
            assert_close(name, stepped[name], got[name.replace("dcell.", "d")], dtype)


class _StepOnly(torch.nn.Module):
    """Hides a cell's scan_segment, so scans step it one step at a time."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def initial_state(self, *a, **k):
        return self.cell.initial_state(*a, **k)

    def step(self, x_t, state):
        return self.cell.step(x_t, state)


def test_reduce_matches_reducing_the_full_sequence():
    cell = make_cell("gru")
    full = run(cell, 13, 2, torch.float64, sb.FullBPTT())["out"]
    for reduce, expect in [("sum", full.sum(0)), ("mean", full.mean(0)), ("last", full[-1])]:
        got = run(cell, 13, 2, torch.float64, sb.Checkpoint(every=5), reduce)["out"]
        assert_close(reduce, expect, got, atol=1e-12)


@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=3), sb.Revolve(slots=2)], ids=lambda s: s.to_string())
def test_stochastic_cell_replays_rng(strategy):
    """Dropout and noise inside a step are replayed identically on recomputation."""
    ref = run(make_cell("noisy"), 23, 2, torch.float64, sb.FullBPTT(), rng_seed=5)
    got = run(make_cell("noisy"), 23, 2, torch.float64, strategy, rng_seed=5)
    compare(ref, got, torch.float64)


def test_backward_leaves_user_rng_untouched():
    cell = make_cell("noisy")
    torch.manual_seed(1)
    x = torch.randn(9, 2, 5, dtype=torch.float64, requires_grad=True)
    y, _ = sb.scan(cell, x, strategy=sb.Checkpoint(every=2))
    state_after_forward = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), state_after_forward)


def test_inputs_without_grad_and_frozen_params():
    """x and state0 not requiring grad, one frozen parameter: only the rest gets gradients."""
    cell = make_cell("gru")
    cell.bias_hh.requires_grad_(False)
    x = torch.randn(11, 2, 5, dtype=torch.float64)
    outs = {}
    for st in [sb.FullBPTT(), sb.Checkpoint(every=4), sb.Revolve(slots=2)]:
        cell.zero_grad(set_to_none=True)
        y, (h,) = sb.scan(cell, x, strategy=st)
        (y.sum() + h.sum()).backward()
        outs[st] = [p.grad for p in cell.parameters()]
        assert cell.bias_hh.grad is None
    for st, grads in outs.items():
        for name, a, b in zip(["w_ih", "w_hh", "b_ih", "b_hh"], outs[sb.FullBPTT()], grads):
            assert_close(name, a, b)


def test_second_backward_raises():
    cell = make_cell("gru")
    x = torch.randn(5, 1, 5, dtype=torch.float64, requires_grad=True)
    y, _ = sb.scan(cell, x, strategy=sb.Checkpoint(every=2))
    loss = y.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


def test_string_strategy_and_stack_state_layout():
    net = make_cell("stack")
    x = torch.randn(8, 2, 5, dtype=torch.float64)
    y, state = sb.scan(net, x, strategy="checkpoint:3")
    assert y.shape == (8, 2, 5)
    assert [tuple(s.shape) for s in state] == [(2, 8), (2, 6), (2, 5), (2, 5)]


# ---- strategies are pure plans; the executor runs them ----------------------------------------
def test_full_bptt_plan_keeps_the_graph_and_autograd_semantics():
    plan = sb.FullBPTT().plan(9)
    assert plan.keep_graph and plan.T == 9 and plan.fast_slots == 0 and plan.slow_slots == 0
    cell = make_cell("user")
    x = torch.randn(9, 2, 5, dtype=torch.float64, requires_grad=True)
    for reduce in (None, "sum", "mean", "last"):
        y, state = sb.scan(cell, x, reduce=reduce)
        loss = (y ** 2).sum() + state[1].sum()
        loss.backward(retain_graph=True)  # plain autograd: a second backward works
        (g,) = torch.autograd.grad(loss, x, create_graph=True)  # and double backward
        (gg,) = torch.autograd.grad((g ** 2).sum(), x)
        assert gg.shape == x.shape and torch.isfinite(gg).all()


def test_plan_carries_schedule_and_storage():
    plan = sb.DoubleCheckpoint(outer=8, inner=2, outer_storage="disk", disk_dir="/tmp").plan(20)
    assert not plan.keep_graph and plan.T == 20
    assert (plan.fast_slots, plan.slow_slots, plan.slow_storage, plan.disk_dir) == (3, 2, "disk", "/tmp")
    plan = sb.Checkpoint(every=4).plan(10)
    assert (plan.fast_slots, plan.slow_slots, plan.slow_storage) == (2, 0, None)


class EveryOther(sb.Strategy):
    """A user strategy: only a plan (periodic checkpoints every 2 steps); the executor runs it."""

    name = "every-other-test"

    def schedule(self, T):
        return list(sb.Checkpoint(every=2).schedule(T))  # a list, not an iterator

    def fast_slots(self, T):
        return sb.Checkpoint(every=2).fast_slots(T)


@pytest.mark.parametrize("T", [1, 7, 10])
def test_user_strategy_runs_through_its_plan(T):
    ref = reference("user", T, 2, torch.float64)
    compare(ref, run(make_cell("user", torch.float64), T, 2, torch.float64, EveryOther()), torch.float64)


def test_reducer_with_graph_stacks_steps_and_blocks():
    from sparsebptt.strategies.executor import Reducer

    ys = torch.randn(5, 2, 3, requires_grad=True)
    r = Reducer(None, 5, keep_graph=True)
    r.add_block(0, ys[:3])
    r.add(3, ys[3])
    r.add(4, ys[4])
    out = r.result()
    assert torch.equal(out, ys) and out.requires_grad
    whole = Reducer(None, 5, keep_graph=True)
    whole.add_block(0, ys)
    assert whole.result() is ys  # one block: the cell's own output, no copy


def test_executor_knows_no_strategy():
    import ast
    import inspect

    from sparsebptt.strategies import executor

    tree = ast.parse(inspect.getsource(executor))
    imported = {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"checkpoint", "double", "full", "revolve", "skipper"}, imported
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "strategy" not in attrs  # what it needs travels in the plan and its actions


@pytest.mark.parametrize("kind", ["lif", "gru", "lstm", "egru", "deltagru", "deltalstm"])
def test_a_plain_sum_of_the_outputs_gives_the_references_gradients(kind):
    """``y.sum()``: its gradient is expanded along every dimension (one [B, H] block of ones read for
    every step by the fused "cpu" kernels, `kernels.common.step_blocks`): every gradient equals the
    torch reference's, under full BPTT and checkpointing."""
    from sparsebptt.testing import seeded
    dtype = torch.float64
    make = {"lif": lambda b: sb.cells.LIF(5, 7, threshold=0.3, backend=b),
            "gru": lambda b: sb.cells.GRU(5, 6, backend=b), "lstm": lambda b: sb.cells.LSTM(5, 4, backend=b),
            "egru": lambda b: sb.cells.EGRU(5, 7, threshold_init=0.1, backend=b),
            "deltagru": lambda b: sb.cells.DeltaGRU(5, 6, threshold=0.1, backend=b),
            "deltalstm": lambda b: sb.cells.DeltaLSTM(5, 4, threshold=0.1, backend=b)}[kind]
    torch.manual_seed(2)
    ref = make("torch").to(dtype)
    got = make("cpu").to(dtype)
    got.load_state_dict(ref.state_dict())
    x = seeded(4, 23, 3, 5, dtype=dtype)
    grads = []
    for cell, strategy in ((ref, sb.FullBPTT()), (got, sb.FullBPTT()), (got, sb.Checkpoint(every=5))):
        xg = x.clone().requires_grad_()
        y, _ = sb.scan(cell, xg, strategy=strategy)
        y.sum().backward()
        grads.append({"dx": xg.grad, **{n: p.grad.clone() for n, p in cell.named_parameters()}})
        cell.zero_grad(set_to_none=True)
    for g in grads[1:]:
        for name in grads[0]:
            assert_close(name, grads[0][name], g[name], dtype)
