"""`sb.Recurrent`: the layer is `sb.scan` as an nn.Module (outputs and every gradient equal)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsebptt as sb
import sparsebptt.nn as sb_nn
from sparsebptt.testing import assert_close, seeded

from helpers import LeakyTanh

STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=3), sb.Revolve(slots=2), sb.DoubleCheckpoint(outer=4, inner=2),
              sb.Skipper(every=4, keep=2)]


def _cells():
    return {"gru": sb.cells.GRU(5, 7).double(), "user": LeakyTanh(5, 7).double()}


def _forward_backward(run, cell, x, state0, seed=1):
    """Outputs, final state and the gradients of x, state0 and every parameter, for the loss
    ``(y * dy).sum() + sum((s * ds).sum())``."""
    x = x.detach().clone().requires_grad_()
    state0 = tuple(s.detach().clone().requires_grad_() for s in state0)
    cell.zero_grad(set_to_none=True)
    y, state = run(x, state0)
    loss = (y * seeded(seed, *y.shape)).sum()
    loss = loss + sum((s * seeded(seed + 1 + i, *s.shape)).sum() for i, s in enumerate(state))
    loss.backward()
    grads = {"dx": x.grad, **{f"dstate0[{i}]": s.grad for i, s in enumerate(state0)},
             **{f"d{n}": p.grad.clone() for n, p in cell.named_parameters()}}
    return y.detach(), tuple(s.detach() for s in state), grads


@pytest.mark.parametrize("reduce", [None, "mean", "last"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
@pytest.mark.parametrize("name", ["gru", "user"])
def test_recurrent_equals_scan(name, strategy, reduce):
    cell = _cells()[name]
    x = seeded(0, 11, 2, 5)  # T11-B2-I5, not a multiple of any segment
    state0 = tuple(seeded(7 + i, *s.shape) for i, s in enumerate(cell.initial_state(2, dtype=torch.float64)))
    layer = sb.Recurrent(cell, strategy=strategy, reduce=reduce)
    ref = _forward_backward(lambda x, s: sb.scan(cell, x, s, strategy=strategy, reduce=reduce), cell, x, state0)
    got = _forward_backward(lambda x, s: layer(x, s), cell, x, state0)
    assert_close("y", ref[0], got[0])
    for i, (a, b) in enumerate(zip(ref[1], got[1])):
        assert_close(f"state[{i}]", a, b)
    assert ref[2].keys() == got[2].keys() and len(ref[2]) > 3
    for k in ref[2]:
        assert ref[2][k] is not None or not strategy.exact, k  # Skipper skips the first steps' gradient
        assert_close(k, ref[2][k], got[2][k])


def test_recurrent_strategy_string_and_default_state():
    cell = _cells()["gru"]
    x = seeded(3, 6, 3, 5)
    layer = sb.Recurrent(cell, strategy="checkpoint:2", reduce="sum")
    assert layer.strategy == sb.Checkpoint(every=2)
    y, state = layer(x)
    y_ref, state_ref = sb.scan(cell, x, strategy=sb.Checkpoint(every=2), reduce="sum")
    assert_close("y", y_ref, y)
    assert_close("h", state_ref[0], state[0])
    assert sb.Recurrent(cell).strategy == sb.FullBPTT()
    layer.strategy = "revolve:2"  # settable, parsed like the argument
    assert layer.strategy == sb.Revolve(slots=2)


def test_recurrent_is_a_module_and_composes_in_sequential():
    torch.manual_seed(0)
    cell = sb.cells.GRU(5, 7)
    head = nn.Sequential(sb.Recurrent(cell, strategy=sb.Checkpoint(every=4), reduce="mean", return_state=False),
                         nn.Linear(7, 3))
    assert [n for n, _ in head.named_parameters()] == [f"0.cell.{n}" for n, _ in cell.named_parameters()] + [
        "1.weight", "1.bias"]
    assert set(head.state_dict()) == {f"0.cell.{k}" for k in cell.state_dict()} | {"1.weight", "1.bias"}
    head.double()
    assert all(p.dtype == torch.float64 for p in cell.parameters())
    x = seeded(1, 9, 2, 5)
    logits = head(x)
    assert logits.shape == (2, 3) and logits.dtype == torch.float64
    ref = head[1](sb.scan(cell, x, strategy=sb.Checkpoint(every=4), reduce="mean")[0])
    assert_close("logits", ref, logits)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert "strategy=checkpoint:4, reduce='mean', return_state=False" in repr(head)


def test_memory_budget_plans_once_per_input_shape(monkeypatch):
    cell = _cells()["gru"]
    full = sb.estimate(cell, (13, 2, 5), sb.FullBPTT(), reduce=None).fast_bytes
    budget = full - 1  # full BPTT does not fit: the planner must pick a checkpointing strategy
    calls = []

    def counting_plan(*args, **kwargs):
        calls.append(args[1])
        return sb.plan(*args, **kwargs)

    monkeypatch.setattr(sb_nn, "plan", counting_plan)
    layer = sb.Recurrent(cell, memory_budget=budget)
    assert layer.strategy is None and layer.memory_budget == budget and layer.plans == {}
    x, x3 = seeded(0, 13, 2, 5), seeded(1, 13, 3, 5)
    y, state = layer(x)
    layer(seeded(2, 13, 2, 5))
    with torch.no_grad():  # planning measures a small backward: works under no_grad too
        layer(x3)
    layer(x3)
    assert calls == [(13, 2, 5), (13, 3, 5)]
    chosen = layer.strategy_for(x)
    assert len(calls) == 2 and not isinstance(chosen, sb.FullBPTT)
    assert chosen == sb.plan(cell, (13, 2, 5), budget, reduce=None)
    assert layer.plans == {((13, 2, 5), torch.float64, torch.device("cpu")): chosen,
                           ((13, 3, 5), torch.float64, torch.device("cpu")): layer.strategy_for(x3)}
    y_ref, state_ref = sb.scan(cell, x, strategy=chosen)
    assert_close("y", y_ref, y)
    assert_close("h", state_ref[0], state[0])
    assert "memory_budget=" in repr(layer)
    assert sb.Recurrent(cell, memory_budget="512MiB").memory_budget == 512 * 2 ** 20


@pytest.mark.parametrize("make,exc,match", [
    (lambda c: sb.Recurrent(c, strategy="full", memory_budget="1MiB"), ValueError,
     r"give strategy or memory_budget, not both \(got strategy='full' and memory_budget='1MiB'\)"),
    (lambda c: sb.Recurrent(c, reduce="max"), ValueError,
     r"reduce must be one of None, 'sum', 'mean', 'last', got 'max'"),
    (lambda c: sb.Recurrent(c, strategy="bogus"), ValueError, r"unknown strategy 'bogus'; valid forms are"),
    (lambda c: sb.Recurrent(c, strategy="checkpoint:0"), ValueError, r"every must be a positive int, got 0"),
    (lambda c: sb.Recurrent(c, strategy=3), TypeError, r"strategy must be a Strategy .* got int"),
    (lambda c: sb.Recurrent(c, memory_budget="lots"), ValueError, r"cannot parse memory budget 'lots'"),
    (lambda c: sb.Recurrent(c, return_state="yes"), TypeError, r"return_state must be True or False"),
    (lambda c: sb.Recurrent(object()), TypeError, r"cell must be an nn.Module .* got object"),
    (lambda c: sb.Recurrent(nn.Linear(2, 2)), TypeError, r"cell Linear lacks initial_state, step"),
])
def test_recurrent_construction_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make(_cells()["gru"])


def test_recurrent_errors_at_forward():
    cell = _cells()["gru"]
    layer = sb.Recurrent(cell, memory_budget=1)
    with pytest.raises(ValueError, match=r"no strategy fits a budget of 1 B .* smallest feasible budget"):
        layer(seeded(0, 8, 2, 5))
    with pytest.raises(ValueError, match=r"x must be 3-D \(T, B, input_size\)"):  # sb.scan's check, not the planner's
        layer(seeded(0, 8, 5))
    with pytest.raises(ValueError, match=r"memory_budget=1 and the planner picks its strategy"):
        layer.strategy = "full"
    with pytest.raises(ValueError, match=r"x has T=0 time steps"):
        sb.Recurrent(cell)(seeded(0, 0, 2, 5))
