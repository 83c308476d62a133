"""NIR export of LIF stacks: round trip through nir.write / nir.read, and the exported graph run
with dt = 1 (forward Euler) reproduces the model's spikes and logits."""
import numpy as np
import pytest
import torch

import sparsebptt as sb
from sparsebptt import cli
from sparsebptt.nir import run_nir
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
    got = run_nir(back, x).sum(0)  # the readout per step, summed over the T steps
    assert back.metadata["reduce"] == "sum"
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


def _two_layer_classifier(reset, T, seed=0):
    """Sequential(Recurrent(Stack[LIF, LIF], reduce="sum"), Linear): a two-layer LIF classifier of
    spike counts, float32 as a peer runs it."""
    torch.manual_seed(seed)
    stack = sb.cells.Stack([sb.cells.LIF(12, 16, beta=0.9, reset=reset), sb.cells.LIF(16, 16, beta=0.8, reset=reset)])
    with torch.no_grad():
        for layer in stack.layers:
            layer.weight.mul_(3.0)
    return torch.nn.Sequential(sb.Recurrent(stack, reduce="sum", return_state=False), torch.nn.Linear(16, 5))


def _run_peer(net, x):
    outs, state = [], None
    with torch.no_grad():
        for t in range(x.shape[0]):
            out = net(x[t]) if state is None else net(x[t], state)
            out, state = out if isinstance(out, tuple) else (out, None)
            outs.append(out)
    return torch.stack(outs)


def _agreement(reset, T=20, B=200, *, subtract_reset="exact"):
    """(fraction of predictions snnTorch's import_from_nir shares with ours, max |logit difference|)."""
    import contextlib
    import io

    from snntorch.import_nir import import_from_nir

    model = _two_layer_classifier(reset, T)
    x = _spikes(T, B, 12, seed=11).float()
    with torch.no_grad():
        ref = model(x)
    graph = sb.export_nir(model, T=T, dt=1e-4, subtract_reset=subtract_reset)
    with contextlib.redirect_stdout(io.StringIO()):
        net = import_from_nir(graph)
    got = _run_peer(net, x).sum(0)  # the readout per step, summed over T
    return float((got.argmax(-1) == ref.argmax(-1)).float().mean()), float((got - ref).abs().max())


def test_two_layer_lif_runs_in_snntorch():
    pytest.importorskip("snntorch")
    agree, diff = _agreement("zero")
    assert agree >= 0.95 and diff < 1e-4  # the same network: float32 rounding only


def test_subtract_reset_exported_as_zero_runs_in_snntorch():
    """snnTorch has no subtractive reset in NIR: the approximate graph runs, as the reset=zero network."""
    pytest.importorskip("snntorch")
    agree, _ = _agreement("subtract", subtract_reset="zero")
    assert 0.0 <= agree <= 1.0  # measured: see docs/nir.md


def test_two_layer_lif_runs_in_norse():
    norse = pytest.importorskip("norse.torch")
    T = 20
    model = _two_layer_classifier("zero", T)
    x = _spikes(T, 200, 12, seed=12).float()
    with torch.no_grad():
        ref = model(x)
    graph = sb.export_nir(model, T=T, dt=1e-3, fold_r=True)  # Norse ignores r
    assert all(np.all(n.r == 1) for n in graph.nodes.values() if isinstance(n, nir.LIF))
    got = _run_peer(norse.from_nir(graph, dt=1e-3), x).sum(0)
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.95
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_export_of_a_sequential_runs_per_step():
    torch.manual_seed(3)
    a = sb.cells.LIF(6, 8, beta=0.75, threshold=0.6, reset="zero").double()
    b = sb.cells.LIF(5, 4, beta=0.5, threshold=0.6).double()
    with torch.no_grad():
        a.weight.mul_(3.0)
        b.weight.mul_(3.0)
    model = torch.nn.Sequential(sb.Recurrent(a, return_state=False), torch.nn.Linear(8, 5).double(),
                                sb.Recurrent(b, return_state=False), torch.nn.Linear(4, 3).double())
    graph = sb.export_nir(model)
    assert {"linear0", "readout"} <= set(graph.nodes) and "reduce" not in graph.metadata
    x = _spikes(17, 3, 6, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(run_nir(graph, x), model(x), rtol=1e-12, atol=1e-12)
    mean = torch.nn.Sequential(sb.Recurrent(a, reduce="mean", return_state=False), torch.nn.Linear(8, 5).double())
    with torch.no_grad():
        torch.testing.assert_close(run_nir(sb.export_nir(mean, T=17), x).sum(0), mean(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model,match", [
    (lambda: torch.nn.Sequential(sb.Recurrent(sb.cells.GRU(3, 4), return_state=False)),
     r"exports stacks of LIF layers; got 0: GRU \(in item 0 of the nn.Sequential\)"),
    (lambda: torch.nn.Sequential(sb.Recurrent(sb.cells.LIF(3, 4), reduce="last", return_state=False)),
     r"item 0 has reduce='last'; NIR graphs run step by step"),
    (lambda: torch.nn.Sequential(sb.Recurrent(sb.cells.LIF(3, 4), return_state=False), torch.nn.ReLU()),
     r"item 1 of the nn.Sequential is a ReLU; supported are sb.Recurrent"),
    (lambda: torch.nn.Sequential(sb.Recurrent(sb.cells.LIF(3, 4), reduce="sum", return_state=False),
                                 sb.Recurrent(sb.cells.LIF(4, 4), return_state=False)),
     r"item 1 of the nn.Sequential is an sb.Recurrent after one that reduces over time"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 4)), r"the model has no cells.LIF layer"),
], ids=["gru", "reduce-last", "relu", "after-reduce", "no-lif"])
def test_export_bad_sequential(model, match):
    with pytest.raises(TypeError, match=match):
        sb.export_nir(model(), T=5)


def test_cli_export_dt_and_fold_r(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--T", "5", "--hidden", "6", "--batch-size", "512", "--epochs", "1",
                     "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "snn.nir"
    assert cli.main(["export", "--nir", str(run), "--dt", "1e-4", "--subtract-reset", "zero", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "one step = dt = 0.0001" in said and "note:" not in said
    graph = nir.read(str(out))
    assert graph.metadata["dt"] == 1e-4 and graph.metadata["approximate"] == 1
    np.testing.assert_allclose(graph.nodes["layer0.lif"].tau, 1e-4 / (1 - 0.9), rtol=1e-6)
    assert cli.main(["export", "--nir", str(run), "--fold-r", "--out", str(tmp_path / "n.nir")]) == 0
    assert "note: snnTorch's and Norse's NIR importers run only LIF / IF neurons" in capsys.readouterr().out
    assert np.all(nir.read(str(tmp_path / "n.nir")).nodes["layer0.li"].r == 1)
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--nir", str(run), "--dt", "0"])
    assert e.value.code == 2 and "expected a positive number, got '0'" in capsys.readouterr().err


def test_old_module_name_still_imports_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("sparsebptt.export", None)
    with pytest.warns(DeprecationWarning, match=r"sparsebptt.export is now sparsebptt.nir"):
        old = importlib.import_module("sparsebptt.export")
    assert old.export_nir is sb.export_nir and old.import_nir is sb.import_nir and old.run_nir is run_nir


@pytest.mark.parametrize("kind", ["IF", "I", "LIF", "LI"])
def test_run_nir_neurons_against_a_hand_loop(kind):
    """run_nir's integrate(-and-fire) and leaky nodes: v += dt/tau (v_leak - v + r i) (leaky) or
    v += dt r i; spiking ones emit v > v_threshold and reset to v_reset, the others emit v."""
    n_in, n, T, B, dt = 3, 4, 6, 2, 0.5
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    r = np.linspace(0.5, 2.0, n)
    tau, leak, thr, reset = np.full(n, 2.0), np.full(n, 0.1), np.full(n, 0.3), np.full(n, -0.2)
    node = {"IF": lambda: nir.IF(r=r, v_threshold=thr, v_reset=reset), "I": lambda: nir.I(r=r),
            "LIF": lambda: nir.LIF(tau=tau, r=r, v_leak=leak, v_threshold=thr, v_reset=reset),
            "LI": lambda: nir.LI(tau=tau, r=r, v_leak=leak)}[kind]()
    graph = nir.NIRGraph(nodes={"in": nir.Input(input_type={"input": np.array([n_in])}),
                                "lin": nir.Linear(weight=w.numpy()), "cell": node,
                                "out": nir.Output(output_type={"output": np.array([n])})},
                         edges=[("in", "lin"), ("lin", "cell"), ("cell", "out")])
    x = torch.randn(T, B, n_in, generator=g, dtype=torch.float64)
    v, ref = torch.zeros(B, n, dtype=torch.float64), []
    rt = torch.as_tensor(r)
    for t in range(T):
        i = x[t] @ w.T
        if kind in ("LIF", "LI"):
            v = v + dt / torch.as_tensor(tau) * (torch.as_tensor(leak) - v + rt * i)
        else:
            v = v + dt * rt * i
        if kind in ("IF", "LIF"):
            z = (v > torch.as_tensor(thr)).double()
            v = torch.where(z > 0, torch.as_tensor(reset).expand_as(v), v)
            ref.append(z)
        else:
            ref.append(v)
    got = run_nir(graph, x, dt=dt)
    assert torch.equal(got, torch.stack(ref))
    if kind in ("IF", "LIF"):
        assert 0 < got.sum() < got.numel()  # some spikes, not all
