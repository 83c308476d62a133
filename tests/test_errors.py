"""Every bad input fails early with a message naming the argument, the expectation and what came."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb


@pytest.fixture
def cell():
    return sb.cells.GRU(4, 3)


def test_x_not_a_tensor(cell):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sb.scan(cell, [[1.0]])


def test_x_not_3d(cell):
    with pytest.raises(ValueError, match=r"x must be 3-D \(T, B, input_size\).*got shape \(2, 4\)"):
        sb.scan(cell, torch.zeros(2, 4))


def test_x_wrong_features(cell):
    with pytest.raises(ValueError, match="x has 5 features.*input_size=4"):
        sb.scan(cell, torch.zeros(2, 1, 5))


def test_t_zero_raises(cell):
    with pytest.raises(ValueError, match="T=0"):
        sb.scan(cell, torch.zeros(0, 1, 4))


def test_x_dtype_mismatch(cell):
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the cell's parameters are torch.float32"):
        sb.scan(cell, torch.zeros(2, 1, 4, dtype=torch.float64))


def test_x_integer_dtype(cell):
    with pytest.raises(TypeError, match="floating-point"):
        sb.scan(cell, torch.zeros(2, 1, 4, dtype=torch.int64))


def test_x_device_mismatch(cell):
    x = torch.zeros(2, 1, 4, device="meta")
    with pytest.raises(ValueError, match="x is on meta but the cell's parameters are on cpu"):
        sb.scan(cell, x)


def test_state_wrong_count(cell):
    with pytest.raises(ValueError, match="state0 has 2 tensors but GRU has a state of 1"):
        sb.scan(cell, torch.zeros(2, 1, 4), (torch.zeros(1, 3), torch.zeros(1, 3)))


def test_state_wrong_shape(cell):
    with pytest.raises(ValueError, match=r"state0\[0\] has shape \(2, 3\), expected \(1, 3\)"):
        sb.scan(cell, torch.zeros(2, 1, 4), (torch.zeros(2, 3),))


def test_state_wrong_dtype(cell):
    with pytest.raises(TypeError, match=r"state0\[0\] has dtype torch.float64, expected torch.float32"):
        sb.scan(cell, torch.zeros(2, 1, 4), (torch.zeros(1, 3, dtype=torch.float64),))


def test_state_not_tuple(cell):
    with pytest.raises(TypeError, match="state0 must be a tuple of tensors"):
        sb.scan(cell, torch.zeros(2, 1, 4), [1.0])


def test_reduce_unknown(cell):
    with pytest.raises(ValueError, match="reduce must be one of None, 'sum', 'mean', 'last', got 'max'"):
        sb.scan(cell, torch.zeros(2, 1, 4), reduce="max")


def test_not_a_cell():
    with pytest.raises(TypeError, match="lacks initial_state, step"):
        sb.scan(torch.nn.Linear(2, 2), torch.zeros(2, 1, 2))


def test_strategy_wrong_type(cell):
    with pytest.raises(TypeError, match="strategy must be a Strategy"):
        sb.scan(cell, torch.zeros(2, 1, 4), strategy=32)


def test_nan_check(cell):
    x = torch.zeros(3, 1, 4)
    x[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        sb.scan(cell, x, check_finite=True)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_checkpoint_every_positive(bad):
    with pytest.raises(ValueError, match="Checkpoint: every must be a positive int"):
        sb.Checkpoint(every=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_revolve_slots_positive(bad):
    with pytest.raises(ValueError, match="Revolve: slots must be a positive int"):
        sb.Revolve(slots=bad)


@pytest.mark.parametrize("text,expect", [
    ("full", sb.FullBPTT()), ("checkpoint:32", sb.Checkpoint(32)), ("revolve:8", sb.Revolve(8)),
    (" Checkpoint:5 ", sb.Checkpoint(5)),
])
def test_parse_strategy(text, expect):
    assert sb.parse_strategy(text) == expect
    assert sb.parse_strategy(expect.to_string()) == expect


def test_parse_strategy_unknown_lists_forms():
    with pytest.raises(ValueError, match=r"unknown strategy 'bogus:3'; valid forms are: .*'checkpoint:EVERY'.*'revolve:SLOTS'"):
        sb.parse_strategy("bogus:3")


@pytest.mark.parametrize("text", ["checkpoint:x", "checkpoint:1,2", "full:3"])
def test_parse_strategy_bad_args(text):
    with pytest.raises(ValueError, match="cannot parse strategy"):
        sb.parse_strategy(text)


def test_parse_strategy_bad_value():
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        sb.parse_strategy("checkpoint:0")


def test_unknown_surrogate_lists_valid():
    with pytest.raises(ValueError, match="unknown surrogate 'relu'; valid surrogates are: atan, fast_sigmoid, sigmoid, triangle"):
        sb.cells.LIF(2, 2, surrogate="relu")


def test_unknown_reset_lists_valid():
    with pytest.raises(ValueError, match="unknown reset 'none'; valid resets are: subtract, zero"):
        sb.cells.LIF(2, 2, reset="none")


@pytest.mark.parametrize("kw,match", [({"beta": 1.5}, "beta must be in"), ({"threshold": 0}, "threshold must be > 0")])
def test_lif_bad_constants(kw, match):
    with pytest.raises(ValueError, match=match):
        sb.cells.LIF(2, 2, **kw)


def test_cell_bad_size():
    with pytest.raises(ValueError, match="GRU: hidden_size must be a positive int, got 0"):
        sb.cells.GRU(3, 0)


def test_stack_size_mismatch():
    with pytest.raises(ValueError, match="layer 0 outputs 4 features but layer 1 expects input_size=5"):
        sb.cells.Stack([sb.cells.GRU(3, 4), sb.cells.GRU(5, 2)])


def test_stack_empty_and_non_cell():
    with pytest.raises(ValueError, match="at least one layer"):
        sb.cells.Stack([])
    with pytest.raises(TypeError, match=r"layer 0 \(object\) is not a cell .* nor an nn.Module"):
        sb.cells.Stack([object()])  # an nn.Module without the cell protocol is a stateless layer (issue 14)


_FILE_FREE_DATASETS = ["adding", "delayed-recall", "digits-seq", "digits-spikes", "event-shapes", "slow-sines",
                       "text"]


@pytest.mark.parametrize("name", _FILE_FREE_DATASETS)
@pytest.mark.parametrize("bad, error, message", [
    (dict(split="test"), ValueError, r"unknown split 'test'; valid splits are: train, val"),
    (dict(batch_size=0), ValueError, r"batch_size must be a positive int, got 0"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got float"),
], ids=["split", "batch_size", "seed"])
def test_dataset_batches_arguments(name, bad, error, message):
    from sparsebptt.data import get_dataset

    args = dict(split="train", batch_size=2, seed=0)
    args.update(bad)
    d = get_dataset(name, T=12)
    with pytest.raises(error, match=f"^{name}: {message}"):
        next(d.batches(args.pop("split"), args.pop("batch_size"), **args))
