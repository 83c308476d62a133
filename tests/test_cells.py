"""Reference cells against closed forms and torch.nn cells."""
from __future__ import annotations

import math

import pytest
import torch

import sparsebptt as sb
from sparsebptt.cells.surrogate import surrogate_derivative
from sparsebptt.testing import assert_close, seeded


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_gru_matches_torch_grucell(dtype):
    ours = sb.cells.GRU(5, 7).to(dtype)
    ref = torch.nn.GRUCell(5, 7).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = seeded(0, 3, 5, dtype=dtype)
    h = seeded(1, 3, 7, dtype=dtype)
    y, (h1,) = ours.step(x, (h,))
    assert_close("h", ref(x, h), h1)
    assert y is h1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_lstm_matches_torch_lstmcell(dtype):
    ours = sb.cells.LSTM(5, 7).to(dtype)
    ref = torch.nn.LSTMCell(5, 7).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x, h, c = seeded(0, 3, 5, dtype=dtype), seeded(1, 3, 7, dtype=dtype), seeded(2, 3, 7, dtype=dtype)
    h_ref, c_ref = ref(x, (h, c))
    y, (h1, c1) = ours.step(x, (h, c))
    assert_close("h", h_ref, h1)
    assert_close("c", c_ref, c1)


def test_gru_sequence_matches_torch_gru():
    ours = sb.cells.GRU(4, 6).double()
    ref = torch.nn.GRU(4, 6).double()
    ref.load_state_dict({k + "_l0": v for k, v in ours.state_dict().items()})
    x = seeded(0, 21, 3, 4)
    y_ref, h_ref = ref(x)
    y, (h,) = sb.scan(ours, x, strategy=sb.Checkpoint(every=5))
    assert_close("y", y_ref, y, atol=1e-12)
    assert_close("h", h_ref[0], h, atol=1e-12)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_lif_closed_form(reset):
    """A LIF neuron with constant drive: membrane, spike times and reset by hand."""
    cell = sb.cells.LIF(1, 1, beta=0.5, threshold=1.0, reset=reset, bias=False).double()
    with torch.no_grad():
        cell.weight.fill_(1.0)
    x = torch.full((6, 1, 1), 0.7, dtype=torch.float64)
    z, _ = sb.scan(cell, x)
    v, expect = 0.0, []
    for _ in range(6):
        u = 0.5 * v + 0.7
        s = 1.0 if u > 1.0 else 0.0
        v = u - s if reset == "subtract" else u * (1 - s)
        expect.append(s)
    assert z.flatten().tolist() == expect
    assert sum(expect) >= 1  # the drive does reach threshold


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_lif_closed_form_reset_after_decay(reset):
    """reset_timing="after_decay" (snnTorch's order): U_t = beta U_{t-1} + I_t - S_{t-1} theta,
    the state is U_t itself (before its reset), by hand."""
    cell = sb.cells.LIF(1, 1, beta=0.5, threshold=1.0, reset=reset, bias=False,
                        reset_timing="after_decay").double()
    with torch.no_grad():
        cell.weight.fill_(1.0)
    x = torch.full((8, 1, 1), 0.7, dtype=torch.float64)
    z, (vT,) = sb.scan(cell, x)
    v, s, expect = 0.0, 0.0, []
    for _ in range(8):
        v = 0.5 * v + 0.7 - s * 1.0 if reset == "subtract" else 0.5 * v * (1 - s) + 0.7
        s = 1.0 if v > 1.0 else 0.0
        expect.append(s)
    assert z.flatten().tolist() == expect and sum(expect) >= 2
    assert abs(vT.item() - v) < 1e-15
    if reset == "subtract":  # the default subtracts beta * theta (before the decay): other spikes
        default = sb.cells.LIF(1, 1, beta=0.5, threshold=1.0, bias=False).double()
        default.load_state_dict(cell.state_dict())
        assert sb.scan(default, x)[0].flatten().tolist() != expect


def test_lif_reset_after_decay_gradient_through_the_reset():
    """Without detach_reset the reset term r = H(v_{t-1} - theta) carries its surrogate gradient."""
    p = sb.cells.lif.LIFParams(beta=0.5, threshold=1.0, reset_timing="after_decay", surrogate="atan")
    v = torch.tensor([1.1], dtype=torch.float64, requires_grad=True)
    i = torch.tensor([0.2], dtype=torch.float64)
    _, u = sb.cells.lif.lif_step(i, v, p)
    (dv,) = torch.autograd.grad(u.sum(), v)
    assert abs(dv.item() - (0.5 - surrogate_derivative(torch.tensor(0.1, dtype=torch.float64), "atan").item())) < 1e-12
    _, u = sb.cells.lif.lif_step(i, v, sb.cells.lif.LIFParams(beta=0.5, threshold=1.0, reset_timing="after_decay",
                                                               detach_reset=True))
    (dv,) = torch.autograd.grad(u.sum(), v)
    assert dv.item() == 0.5


def test_lif_unknown_reset_timing_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid reset timings are: before_decay, after_decay"):
        sb.cells.LIF(2, 3, reset_timing="after")


def test_lif_surrogate_gradient_is_used():
    cell = sb.cells.LIF(1, 1, beta=0.0, threshold=1.0, bias=False, surrogate="fast_sigmoid").double()
    with torch.no_grad():
        cell.weight.fill_(1.0)
    x = torch.tensor([[[0.9]]], dtype=torch.float64, requires_grad=True)
    z, _ = sb.scan(cell, x)
    z.sum().backward()
    assert_close("dz/dx", torch.tensor([[[1 / (25 * 0.1 + 1) ** 2]]], dtype=torch.float64), x.grad, atol=1e-12)


@pytest.mark.parametrize("name,scale,x,expect", [
    ("fast_sigmoid", None, 0.2, 1 / (25 * 0.2 + 1) ** 2),
    ("atan", None, 0.2, 1.0 / (1 + (math.pi / 2 * 2 * 0.2) ** 2)),
    ("triangle", None, 0.25, 0.75),
    ("triangle", 0.5, 0.75, 0.0),
    ("sigmoid", None, 0.2, 4 * math.exp(-0.8) / (1 + math.exp(-0.8)) ** 2),
    ("sigmoid", 25.0, -0.1, 25 * math.exp(2.5) / (1 + math.exp(2.5)) ** 2),
])
def test_surrogate_values(name, scale, x, expect):
    got = surrogate_derivative(torch.tensor(x, dtype=torch.float64), name, scale)
    assert abs(got.item() - expect) < 1e-12


def test_learnable_beta_gets_gradient():
    cell = sb.cells.LIF(3, 4, learn_beta=True, threshold=0.3).double()
    x = seeded(0, 10, 2, 3, kind="spikes")
    z, _ = sb.scan(cell, x)
    z.sum().backward()
    assert cell.beta.grad is not None and cell.beta.grad.abs().sum() > 0


def test_stack_runs_layers_in_order():
    a, b = sb.cells.GRU(3, 4).double(), sb.cells.LSTM(4, 2).double()
    net = sb.cells.Stack([a, b])
    x = seeded(0, 7, 2, 3)
    y, state = sb.scan(net, x)
    ya, _ = sb.scan(a, x)
    yb, sb_state = sb.scan(b, ya)
    assert_close("y", yb, y, atol=0)
    assert len(state) == 3
