"""The planner's model agrees with sb.trace, and its plans fit their budgets when measured."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
from sparsebptt.planner import estimate, measure, parse_bytes

CELLS = {
    "lif-stack": lambda: sb.cells.Stack([sb.cells.LIF(8, 32), sb.cells.LIF(32, 32)]),
    "lif-recurrent": lambda: sb.cells.LIF(8, 24, recurrent=True),
    "gru": lambda: sb.cells.GRU(8, 16),
    "lstm": lambda: sb.cells.LSTM(8, 16),
}
STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(1), sb.Checkpoint(7), sb.Checkpoint(17), sb.Revolve(3),
              sb.DoubleCheckpoint(40, 5), sb.DoubleCheckpoint(16, 16, "disk"),
              sb.DoubleCheckpoint.optimal(3, 4)]


def measured(cell, T, B, strategy, reduce):
    x = (torch.rand(T, B, 8, generator=torch.Generator().manual_seed(T)) < 0.3).float()
    with sb.trace() as t:
        y, s = sb.scan(cell, x, strategy=strategy, reduce=reduce)
        (y.sum() + sum(q.sum() for q in s)).backward()
    return t


@pytest.mark.parametrize("reduce", ["sum", None, "last"], ids=str)
@pytest.mark.parametrize("T", [50, 301])
@pytest.mark.parametrize("kind", list(CELLS))
def test_model_within_10_percent_of_trace(kind, T, reduce):
    torch.manual_seed(0)
    cell = CELLS[kind]()
    shape = (T, 4, 8)
    costs = measure(cell, shape, reduce)
    for st in STRATEGIES:
        e = estimate(cell, shape, st, reduce, costs)
        t = measured(cell, T, 4, st, reduce)
        assert e.steps == t.forward_steps + t.recomputed_steps, st
        assert abs(e.fast_bytes / t.peak_stored_bytes - 1) <= 0.10, (st, e.fast_bytes, t.peak_stored_bytes)
        assert e.slow_bytes == t.peak_offloaded_bytes, st


@pytest.mark.parametrize("T,B,budget", [(100, 2, b) for b in ("4KiB", "16KiB", "64KiB", "256KiB", "4MiB")]
                         + [(1000, 4, b) for b in ("24KiB", "64KiB", "256KiB", "4MiB")])
def test_plan_fits_budget_when_measured(T, B, budget):
    cell = sb.cells.Stack([sb.cells.LIF(8, 32), sb.cells.LIF(32, 32)])
    try:
        strategy = sb.plan(cell, (T, B, 8), budget)
    except ValueError as e:
        assert "smallest feasible budget" in str(e)
        return
    t = measured(cell, T, B, strategy, "sum")
    assert t.peak_stored_bytes <= parse_bytes(budget), (strategy, t.peak_stored_bytes)


def test_plan_prefers_full_when_it_fits_and_recomputes_less_with_more_memory():
    cell = sb.cells.GRU(8, 16)
    assert sb.plan(cell, (50, 2, 8), "1GiB") == sb.FullBPTT()
    _, table = sb.plan(cell, (2000, 2, 8), "64KiB", return_table=True)
    small, big = sb.plan(cell, (2000, 2, 8), "64KiB"), sb.plan(cell, (2000, 2, 8), "1MiB")
    steps = {e.strategy: e.steps for e in table}
    assert steps[big] <= steps[small]


def test_plan_impossible_budget_names_smallest():
    cell = sb.cells.GRU(8, 16)
    with pytest.raises(ValueError, match=r"no strategy fits a budget of 100 B.*smallest feasible budget is .* with revolve:1"):
        sb.plan(cell, (500, 2, 8), 100)


@pytest.mark.parametrize("text,n", [("4096", 4096), (4096, 4096), ("512MiB", 512 * 2 ** 20), ("1.5GiB", int(1.5 * 2 ** 30)),
                                    ("200MB", 200 * 10 ** 6), ("2G", 2 * 10 ** 9), (" 64 KiB ", 65536)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "", "-5MiB"])
def test_parse_bytes_bad_shows_forms(bad):
    with pytest.raises(ValueError, match="accepted forms"):
        parse_bytes(bad)


def test_plan_bad_shape():
    with pytest.raises(ValueError, match=r"shape must be \(T, B, \*features\)"):
        sb.plan(sb.cells.GRU(2, 2), (10, 2), "1MiB")


def test_measure_leaves_buffers_and_rng_alone():
    """The planner's tiny traced runs restore batch norm's running statistics and the RNG (issue 14)."""
    torch.manual_seed(0)
    net = sb.cells.Stack([torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.2),
                          sb.cells.LIFNeuron(6)])
    before = [b.clone() for b in net.buffers()]
    torch.manual_seed(7)
    sb.plan(net, (50, 4, 3), "1MiB")
    after_rng = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_rng, torch.rand(3))
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
