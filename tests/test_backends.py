"""One backend vocabulary for every built-in cell: "auto" | "torch" | "cpu" (| "triton"), None
following `sb.set_backend`; every fused backend equal to "torch" on random inputs."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
import sparsebptt.kernels.backend as kb
from sparsebptt.testing import assert_close, seeded

N_IN, H = 5, 6

#: name -> factory(backend) for every built-in cell (spiking thresholds kept off the inputs' scale)
CELLS = {
    "lif": lambda b: sb.cells.LIF(N_IN, H, beta=0.8, threshold=0.5, backend=b),
    "lif-recurrent": lambda b: sb.cells.LIF(N_IN, H, threshold=0.4, recurrent=True, learn_beta=True, backend=b),
    "gru": lambda b: sb.cells.GRU(N_IN, H, backend=b),
    "lstm": lambda b: sb.cells.LSTM(N_IN, H, backend=b),
    "delta-gru": lambda b: sb.cells.DeltaGRU(N_IN, H, threshold=0.1, backend=b),
    "delta-lstm": lambda b: sb.cells.DeltaLSTM(N_IN, H, threshold=0.1, backend=b),
    "egru": lambda b: sb.cells.EGRU(N_IN, H, threshold_init=0.1, backend=b),
}


def _run(kind, backend, strategy, T=11, B=3, dtype=torch.float64):
    torch.manual_seed(5)
    cell = CELLS[kind](backend).to(dtype)
    x = seeded(1, T, B, N_IN, dtype=dtype).requires_grad_()
    state0 = tuple((0.3 * seeded(2 + i, *s.shape, dtype=dtype)).requires_grad_()
                   for i, s in enumerate(cell.initial_state(B, dtype=dtype)))
    y, state = sb.scan(cell, x, state0, strategy=strategy)
    dy = seeded(9, *y.shape, dtype=dtype)
    loss = (y * dy).sum() + sum((s * seeded(20 + i, *s.shape, dtype=dtype)).sum()
                                for i, s in enumerate(state) if s.is_floating_point())
    loss.backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out.update({f"state[{i}]": s.detach() for i, s in enumerate(state)})
    out.update({f"state0[{i}].grad": s.grad for i, s in enumerate(state0)})
    out.update({f"{n}.grad": p.grad for n, p in cell.named_parameters()})
    return cell, out


@pytest.mark.parametrize("strategy", ["full", "checkpoint:4"])
@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_every_backend_equals_torch(kind, backend, strategy):
    _, ref = _run(kind, "torch", strategy)
    cell, got = _run(kind, backend, strategy)
    assert cell.active_backend == "cpu"  # "auto" on CPU with a C compiler
    assert ref.keys() == got.keys()
    for name in ref:
        assert_close(f"{kind}/{backend}/{strategy}: {name}", ref[name], got[name])


@pytest.mark.parametrize("kind", list(CELLS))
def test_backend_none_follows_set_backend(kind, monkeypatch):
    monkeypatch.setattr(kb, "_default", None)
    sb.set_backend("torch")
    cell = CELLS[kind](None)
    assert cell.backend is None and cell.active_backend == "torch"
    assert cell.scan_segment is None  # the step path: the user's step runs
    sb.set_backend("cpu")
    assert cell.active_backend == "cpu"
    assert CELLS[kind]("torch").active_backend == "torch"  # an explicit choice wins over the default


@pytest.mark.parametrize("kind", list(CELLS))
def test_unknown_backend_lists_the_valid_ones(kind):
    with pytest.raises(ValueError, match="valid backends are: auto, torch, cpu, triton"):
        CELLS[kind]("cuda")


@pytest.mark.parametrize("kind", list(CELLS))
def test_unavailable_backend_raises(kind, monkeypatch):
    monkeypatch.setitem(kb._probes, "cpu", (False, "no C compiler (pretend)"))
    with pytest.raises(kb.BackendUnavailable, match="backend 'cpu' was requested but is unavailable: "
                                                    r"no C compiler \(pretend\)"):
        CELLS[kind]("cpu")
