"""NIR export of LIF stacks: round trip through nir.write / nir.read, and the exported graph run
with dt = 1 (forward Euler) reproduces the model's spikes and logits."""
import numpy as np
import pytest
import torch

import sparsebptt as sb
from sparsebptt import cli
from sparsebptt.export import run_nir
from sparsebptt.train import TrainConfig, build_model

nir = pytest.importorskip("nir")


def _spikes(T, B, n, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, n, generator=g) < p).to(torch.float64)


def _stack(reset, *, recurrent=False, beta=0.75, learn_beta=False, sizes=(7, 11, 5), threshold=0.6):
    torch.manual_seed(1)
    layers = [sb.cells.LIF(a, b, beta=beta, threshold=threshold, reset=reset, recurrent=recurrent,
                           learn_beta=learn_beta) for a, b in zip(sizes, sizes[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3.0)  # enough drive that every layer spikes often
            if learn_beta:
                layer.beta.copy_(torch.tensor([0.5, 0.75, 0.875, 0.25] * 10)[:layer.hidden_size])
    return sb.cells.Stack(layers).double()


def _roundtrip(graph, tmp_path):
    nir.write(str(tmp_path / "g.nir"), graph)
    back = nir.read(str(tmp_path / "g.nir"))
    assert set(back.nodes) == set(graph.nodes)
    assert sorted(back.edges) == sorted(graph.edges)
    for name, node in graph.nodes.items():
        assert type(back.nodes[name]) is type(node), name
        for k, v in vars(node).items():
            if isinstance(v, np.ndarray) and k not in ("input_type", "output_type"):
                np.testing.assert_array_equal(getattr(back.nodes[name], k), v, err_msg=f"{name}.{k}")
    return back


@pytest.mark.parametrize("reset,recurrent,learn_beta,beta", [
    ("zero", False, False, 0.75), ("subtract", False, False, 0.75), ("subtract", True, False, 0.5),
    ("zero", True, False, 0.5), ("subtract", False, True, 0.75), ("zero", False, False, 1.0),
    ("subtract", False, False, 1.0)],
    ids=["zero", "subtract", "subtract-recurrent", "zero-recurrent", "subtract-learned-beta",
         "zero-no-leak", "subtract-no-leak"])
def test_export_roundtrip_reproduces_spikes(tmp_path, reset, recurrent, learn_beta, beta):
    cell = _stack(reset, recurrent=recurrent, learn_beta=learn_beta, beta=beta)
    graph = sb.export_nir(cell)
    back = _roundtrip(graph, tmp_path)
    kinds = {type(n).__name__ for n in back.nodes.values()}
    if reset == "zero":
        assert ("LIF" if beta < 1 else "IF") in kinds and "Threshold" not in kinds
    else:
        assert {"Threshold", ("LI" if beta < 1 else "I")} <= kinds and "LIF" not in kinds
    assert back.metadata["approximate"] == 0 and back.metadata["dt"] == 1.0
    x = _spikes(23, 4, 7)
    with torch.no_grad():
        ref, _ = sb.scan(cell, x)  # [T, B, 5] spikes of the last layer
    got = run_nir(back, x)
    assert got.shape == ref.shape
    assert 0.05 < float(ref.mean()) < 0.95  # a real test: spikes and silences
    assert torch.equal(got, ref)


def test_lif_constants_follow_the_dt_convention():
    cell = _stack("zero", beta=0.75, sizes=(3, 4))
    graph = sb.export_nir(cell, dt=0.5)
    lif = graph.nodes["layer0.lif"]
    np.testing.assert_allclose(lif.tau, 0.5 / (1 - 0.75))  # tau = dt / (1 - beta)
    np.testing.assert_allclose(lif.r, 1 / (1 - 0.75))  # r = tau / dt
    np.testing.assert_array_equal(lif.v_leak, 0.0)
    np.testing.assert_array_equal(lif.v_threshold, 0.6)
    np.testing.assert_array_equal(lif.v_reset, 0.0)
    x = _spikes(15, 3, 3, seed=2)
    with torch.no_grad():
        ref, _ = sb.scan(cell, x)
    assert torch.equal(run_nir(graph, x, dt=0.5), ref)  # same dynamics per step at any dt


def test_classifier_export_gives_the_logits(tmp_path):
    T = 11
    torch.manual_seed(0)
    model = build_model(TrainConfig(hidden=9, layers=2, T=T), 64, 10).double()
    with torch.no_grad():
        for layer in model.cell.layers:
            layer.weight.mul_(4.0)
    graph = sb.export_nir(model, tmp_path / "m.nir", T=T)
    back = nir.read(str(tmp_path / "m.nir"))
    assert back.metadata["T"] == T and "readout" in back.nodes
    x = _spikes(T, 6, 64, seed=3)
    with torch.no_grad():
        logits = model(x)
    got = run_nir(back, x)[-1]  # the integrator after T steps
    torch.testing.assert_close(got, logits, rtol=1e-6, atol=1e-6)
    assert graph.nodes["readout"].weight.shape == (10, 9)


def test_subtract_as_zero_is_marked_approximate():
    cell = _stack("subtract")
    graph = sb.export_nir(cell, subtract_reset="zero")
    assert graph.metadata["approximate"] == 1 and "approximate" in graph.metadata["reset"]
    assert {type(n).__name__ for n in graph.nodes.values()} >= {"LIF"}
    zero = _stack("zero")  # same weights: it is the reset="zero" network
    x = _spikes(30, 4, 7, seed=5)
    with torch.no_grad():
        ref_zero, _ = sb.scan(zero, x)
        ref_sub, _ = sb.scan(cell, x)
    got = run_nir(graph, x)
    assert torch.equal(got, ref_zero) and not torch.equal(got, ref_sub)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: sb.export_nir(sb.cells.GRU(3, 4)), TypeError, r"exports stacks of LIF layers; got 0: GRU"),
    (lambda: sb.export_nir(build_model(TrainConfig(hidden=4), 64, 10)), ValueError,
     r"readout averages spike counts over T steps; pass T=<positive int>"),
    (lambda: sb.export_nir(sb.cells.LIF(3, 4), subtract_reset="drop"), ValueError,
     r"unknown subtract_reset 'drop'; valid values are: exact, zero"),
    (lambda: sb.export_nir(sb.cells.LIF(3, 4), dt=0), ValueError, r"dt must be a positive number, got 0"),
])
def test_export_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cli_export_writes_a_readable_graph(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--T", "6", "--hidden", "8", "--batch-size", "256", "--epochs", "1",
                     "--no-progress", "--out", str(run)]) == 0
    assert cli.main(["export", "--nir", str(run)]) == 0
    assert f"wrote {run / 'model.nir'}: 2 LIF layers (64 -> 8 -> 8)" in capsys.readouterr().out
    graph = nir.read(str(run / "model.nir"))
    assert graph.metadata["T"] == 6 and graph.nodes["layer0.affine"].weight.shape == (8, 64)
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--nir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run folder" in err
    gru = tmp_path / "gru"
    assert cli.main(["train", "--model", "gru", "--T", "3", "--hidden", "4", "--batch-size", "512", "--epochs", "1",
                     "--no-progress", "--out", str(gru)]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--nir", str(gru)])
    assert e.value.code == 2 and "NIR export covers LIF models" in capsys.readouterr().err
