"""torch.compile around models that call sb.scan: the scan is a graph break (it runs eagerly, with its
strategy's recomputation), the layers around it compile, and outputs and gradients equal eager's."""
import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.testing import assert_close

STRATEGIES = ["full", "checkpoint:4", "revolve:3", "double:8,2", "skipper:6,3"]


class ScanModel(nn.Module):
    """Linear -> sb.scan(LIF) -> tanh -> Linear, calling sb.scan itself."""

    def __init__(self, strategy, backend="torch"):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.cell = sb.cells.LIF(6, 7, backend=backend)
        self.out = nn.Linear(7, 3)
        self.strategy = sb.parse_strategy(strategy)

    def forward(self, x):
        y, _ = sb.scan(self.cell, self.inp(x) * 2.0, strategy=self.strategy, reduce="sum")
        return self.out(torch.tanh(y))


def _layer_model(strategy):
    stack = sb.cells.Stack([sb.cells.GRU(5, 6), sb.cells.LIF(6, 7, backend="torch")])
    return nn.Sequential(sb.Recurrent(stack, strategy=strategy, reduce="mean", return_state=False), nn.Linear(7, 3))


def _grads(call, model, x):
    """Outputs of ``call(x)`` and the gradients it gives ``model``'s parameters and x."""
    x = x.clone().requires_grad_()
    y = call(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["x"] = x.grad
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _compare(model, backend):
    torch._dynamo.reset()
    x = torch.randn(11, 4, 5, generator=torch.Generator().manual_seed(0))
    ref_y, ref = _grads(model, model, x)
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # the second call runs the cached graph
        y, got = _grads(compiled, model, x)
        assert_close("y", ref_y, y, torch.float32)
        assert set(got) == set(ref)
        for name in ref:
            assert_close(name, ref[name], got[name], torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_scan_gives_eager_gradients(strategy):
    torch.manual_seed(1)
    _compare(ScanModel(strategy), "aot_eager")


@pytest.mark.parametrize("strategy", ["full", "checkpoint:4"])
def test_compiled_recurrent_layer_gives_eager_gradients(strategy):
    torch.manual_seed(2)
    _compare(_layer_model(strategy), "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inductor_compiled_scan_gives_eager_gradients(strategy):
    torch.manual_seed(3)
    _compare(ScanModel(strategy), "inductor")


def test_eager_scans_leave_dynamo_unimported():
    """torch._dynamo costs about a second to import: the package and eager scans never import it."""
    import subprocess
    import sys

    code = ("import sys, torch, sparsebptt as sb; y, _ = sb.scan(sb.cells.LIF(3, 4), torch.randn(5, 2, 3), "
            "strategy='checkpoint:2'); y.sum().backward(); print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False", r.stderr
