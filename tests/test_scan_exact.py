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
