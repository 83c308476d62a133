"""sb.import_nir: our own graphs come back as the model that wrote them (outputs, spikes, under every
strategy), and graphs written by snnTorch, Norse and SpikingJelly run as their own runtimes run them."""
import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.testing import assert_close
from sparsebptt.train import TrainConfig, build_model

nir = pytest.importorskip("nir")

STRATEGIES = ["full", "checkpoint:4", "revolve:3", "double:8,2"]


def _spikes(T, B, n, seed=0, p=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, n, generator=g) < p).to(dtype)


def _lifs(reset, *, recurrent=False, beta=0.75, learn_beta=False, sizes=(7, 11, 5), threshold=0.6,
          reset_timing="before_decay"):
    torch.manual_seed(1)
    layers = [sb.cells.LIF(a, b, beta=beta, threshold=threshold, reset=reset, recurrent=recurrent,
                           learn_beta=learn_beta, reset_timing=reset_timing) for a, b in zip(sizes, sizes[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3.0)  # every layer spikes often
            if learn_beta:
                layer.beta.copy_(torch.tensor([0.5, 0.75, 0.875, 0.25] * 10)[:layer.hidden_size])
    return [layer.double() for layer in layers]


def _imported_lifs(model):
    return [m for m in model.modules() if isinstance(m, sb.cells.LIF)]


@pytest.mark.parametrize("reset,recurrent,learn_beta,beta,timing", [
    ("zero", False, False, 0.9, "before_decay"), ("subtract", False, False, 0.9, "before_decay"),
    ("subtract", True, False, 0.5, "before_decay"), ("zero", True, False, 0.5, "before_decay"),
    ("subtract", False, True, 0.75, "before_decay"), ("zero", False, False, 1.0, "before_decay"),
    ("subtract", False, False, 1.0, "before_decay"), ("subtract", False, False, 0.8, "after_decay")],
    ids=["zero", "subtract", "subtract-recurrent", "zero-recurrent", "subtract-learned-beta", "zero-no-leak",
         "subtract-no-leak", "subtract-after-decay"])
@pytest.mark.parametrize("fold_r", [False, True], ids=["r", "fold-r"])
def test_import_of_export_is_the_model(tmp_path, reset, recurrent, learn_beta, beta, timing, fold_r):
    stack = sb.cells.Stack(_lifs(reset, recurrent=recurrent, learn_beta=learn_beta, beta=beta, reset_timing=timing))
    sb.export_nir(stack, tmp_path / "m.nir", fold_r=fold_r)
    model = sb.import_nir(tmp_path / "m.nir")
    assert isinstance(model, nn.Sequential) and isinstance(model[0], sb.Recurrent) and len(model) == 1
    got_layers, ref_layers = _imported_lifs(model), list(stack.layers)
    assert len(got_layers) == 2
    for ref, got in zip(ref_layers, got_layers):
        assert (got.params.reset, got.recurrent, got.params.reset_timing) == (ref.params.reset, ref.recurrent,
                                                                              ref.params.reset_timing)
        if not fold_r:  # the same parameters, bit for bit
            assert got.params.threshold == ref.params.threshold
            if learn_beta:  # a beta per neuron: learnable again
                assert torch.equal(got.beta, ref.beta)
            else:
                assert got.params.beta == ref.params.beta and got.beta is None
            assert torch.equal(got.weight, ref.weight) and torch.equal(got.bias, ref.bias)
    x = _spikes(23, 4, 7)
    with torch.no_grad():
        ref, _ = sb.scan(stack, x)
        got = model(x)
    assert 0.05 < float(ref.mean()) < 0.95
    if fold_r:  # r folded into the weights and back: equal to rounding, the same spikes
        assert (got != ref).float().mean() < 0.01
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_imported_model_runs_under_every_strategy(strategy):
    stack = sb.cells.Stack(_lifs("subtract", recurrent=True, beta=0.5))
    graph = sb.export_nir(stack)
    ref_model = sb.import_nir(graph)
    model = sb.import_nir(graph, strategy=strategy)
    assert model[0].strategy.to_string() == sb.parse_strategy(strategy).to_string()
    x = _spikes(19, 3, 7, seed=4).requires_grad_()
    dout = torch.randn(19, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = ref_model(x)
    (ref * dout).sum().backward()
    ref_grads = [p.grad.clone() for p in ref_model.parameters()] + [x.grad.clone()]
    x.grad = None
    got = model(x)
    (got * dout).sum().backward()
    assert torch.equal(got, ref)
    names = [n for n, _ in model.named_parameters()] + ["x"]
    for name, r, g in zip(names, ref_grads, [p.grad for p in model.parameters()] + [x.grad]):
        assert_close(name, r, g, torch.float64)


def test_classifier_comes_back_with_its_logits():
    T = 13
    torch.manual_seed(0)
    model = build_model(TrainConfig(hidden=9, layers=2, T=T), 64, 10).double()
    with torch.no_grad():
        for layer in model.cell.layers:
            layer.weight.mul_(4.0)
    back = sb.import_nir(sb.export_nir(model, T=T))
    assert back[0].reduce == "sum" and isinstance(back[1], nn.Linear)
    x = _spikes(T, 6, 64, seed=3)
    with torch.no_grad():
        assert_close("logits", model(x), back(x), torch.float64)


def test_sequential_with_linear_between_spiking_layers():
    torch.manual_seed(2)
    a, b = _lifs("zero", sizes=(6, 8)), _lifs("subtract", sizes=(5, 4))
    model = nn.Sequential(sb.Recurrent(sb.cells.Stack(a), return_state=False), nn.Linear(8, 5).double(),
                          sb.Recurrent(b[0], return_state=False), nn.Linear(4, 3).double())
    back = sb.import_nir(sb.export_nir(model))
    assert [type(m).__name__ for m in back] == ["Recurrent", "Linear", "Recurrent", "Linear"]
    x = _spikes(17, 3, 6, seed=6)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def _graph(nodes, edges, metadata=None):
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata or {})


def _snntorch_style_graph(dt=1e-4, seed=0):
    """What snnTorch's export_to_nir writes for Linear -> Leaky(reset zero) -> Linear -> RLeaky (its
    exporter fails on nir 1.0's type inference, so the graph is written here as its code does)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    beta1, beta2 = np.full(6, 0.9), np.full(4, 0.8)
    lif = lambda beta: nir.LIF(tau=(dt / (1 - beta)).astype(f32), r=(1 / (1 - beta)).astype(f32),  # noqa: E731
                               v_leak=np.zeros(beta.size, f32), v_threshold=np.ones(beta.size, f32),
                               v_reset=np.zeros(beta.size, f32))
    rec = _graph({"input": nir.Input(input_type=np.array([4])), "lif": lif(beta2),
                  "w_rec": nir.Linear(weight=(rng.normal(size=(4, 4)) * 0.5).astype(f32)),
                  "output": nir.Output(output_type=np.array([4]))},
                 [("input", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "output")])
    nodes = {"input": nir.Input(input_type=np.array([5])),
             "0": nir.Affine(weight=rng.normal(size=(6, 5)).astype(f32) * 1.5, bias=rng.normal(size=6).astype(f32)),
             "1": lif(beta1),
             "2": nir.Affine(weight=rng.normal(size=(4, 6)).astype(f32) * 1.5, bias=rng.normal(size=4).astype(f32)),
             "3": rec, "output": nir.Output(output_type=np.array([4]))}
    return _graph(nodes, [("input", "0"), ("0", "1"), ("1", "2"), ("2", "3"), ("3", "output")])


def _run_peer(net, x, reset=None):
    outs, state = [], None
    with torch.no_grad():
        for t in range(x.shape[0]):
            out = net(x[t]) if state is None else net(x[t], state)
            out, state = out if isinstance(out, tuple) else (out, None)
            outs.append(out)
    return torch.stack(outs)


def test_snntorch_graph_runs_as_snntorch_runs_it():
    pytest.importorskip("snntorch")
    from snntorch.import_nir import import_from_nir

    graph = _snntorch_style_graph()
    x = _spikes(30, 8, 5, seed=7, dtype=torch.float32)
    with contextlib.redirect_stdout(io.StringIO()):
        peer = import_from_nir(_snntorch_style_graph())
    ref = _run_peer(peer, x)
    model = sb.import_nir(graph, dt=1e-4)
    lifs = _imported_lifs(model)
    assert [m.recurrent for m in lifs] == [False, True] and lifs[1].params.beta == pytest.approx(0.8)
    with torch.no_grad():
        got = model(x)
    assert 0.05 < float(ref.mean()) < 0.95
    assert (got == ref).float().mean() >= 0.999


def test_norse_graph_runs_as_norse_runs_it():
    norse = pytest.importorskip("norse.torch")
    torch.manual_seed(3)
    net = norse.SequentialState(nn.Linear(5, 6), norse.LIFBoxCell(), nn.Linear(6, 4), norse.LIFBoxCell())
    with torch.no_grad():
        net[0].weight.mul_(40.0)  # LIFBoxCell takes dt/tau = 0.1 of its input per step
        net[2].weight.mul_(40.0)
    graph = norse.to_nir(net, torch.randn(1, 5), dt=1.0)  # Norse writes tau = dt / tau_mem_inv: dt=1 gives tau
    x = _spikes(30, 8, 5, seed=8, dtype=torch.float32)
    ref = _run_peer(net, x)
    model = sb.import_nir(graph, dt=1e-3)  # LIFBoxCell's step
    with torch.no_grad():
        got = model(x)
    assert 0.05 < float(ref.mean()) < 0.95
    assert (got == ref).float().mean() >= 0.999


def test_spikingjelly_graph_runs_as_spikingjelly_runs_it():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.nir_exchange.to_nir import export_to_nir

    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 6), neuron.LIFNode(tau=2.0), nn.Linear(6, 4), neuron.IFNode())
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[2].weight.mul_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_to_nir(net, torch.randn(1, 5), dt=1e-4)
    x = _spikes(30, 8, 5, seed=9, dtype=torch.float32)
    functional.reset_net(net)
    with torch.no_grad():
        ref = torch.stack([net(x[t]) for t in range(x.shape[0])])
    model = sb.import_nir(graph, dt=1e-4)
    with torch.no_grad():
        got = model(x)
    assert 0.05 < float(ref.mean()) < 0.95
    assert (got == ref).float().mean() >= 0.999


def _lif_node(n, **kw):
    p = dict(tau=np.full(n, 10.0), r=np.full(n, 10.0), v_leak=np.zeros(n), v_threshold=np.ones(n),
             v_reset=np.zeros(n))
    p.update(kw)
    return nir.LIF(**p)


def _chain(*mid, n_in=3):
    nodes = {"input": nir.Input(input_type=np.array([n_in])), **{f"n{i}": m for i, m in enumerate(mid)},
             "output": nir.Output(output_type=np.array([4]))}
    names = list(nodes)
    return _graph(nodes, list(zip(names, names[1:])), {"dt": 1.0})


@pytest.mark.parametrize("graph,exc,match", [
    (lambda: _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)),
                    nir.CubaLIF(tau_syn=np.full(4, 5.0), tau_mem=np.full(4, 10.0), r=np.ones(4),
                                v_leak=np.zeros(4), v_threshold=np.ones(4))),
     TypeError, r"node 'n1' is a nir\.CubaLIF, which sparsebptt cannot map; supported: Input, Output, Affine"),
    (lambda: _graph(_chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), _lif_node(4)).nodes,
                    _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), _lif_node(4)).edges),
     ValueError, r"does not record its time step; pass dt="),
    (lambda: _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), _lif_node(4, v_leak=np.ones(4))),
     ValueError, r"node 'n1' has v_leak != 0"),
    (lambda: _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)),
                    _lif_node(4, v_threshold=np.array([1.0, 2.0, 1.0, 1.0]))),
     ValueError, r"node 'n1' has a different v_threshold per neuron \(1 \.\. 2\)"),
    (lambda: _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), _lif_node(4, tau=np.full(4, 0.5))),
     ValueError, r"node 'n1' has tau < dt"),
    (lambda: _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), nir.LI(tau=np.full(4, 10.0),
                                                                                  r=np.ones(4), v_leak=np.zeros(4))),
     TypeError, r"node 'n1' is a nir\.LI that no Threshold follows"),
    (lambda: _chain(nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4))),
     TypeError, r"has no spiking layer"),
    (lambda: 3.5, TypeError, r"expected a nir\.NIRGraph or the path of a \.nir file, got float"),
], ids=["cuba-lif", "no-dt", "v-leak", "threshold-per-neuron", "tau-below-dt", "li-readout", "no-spiking-layer",
        "not-a-graph"])
def test_import_bad_graphs(graph, exc, match):
    with pytest.raises(exc, match=match):
        sb.import_nir(graph())


def test_import_refuses_branching_graphs():
    nodes = {"input": nir.Input(input_type=np.array([3])),
             "a": nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), "lif": _lif_node(4),
             "b": nir.Affine(weight=np.ones((4, 3)), bias=np.zeros(4)), "output": nir.Output(output_type=np.array([4]))}
    g = _graph(nodes, [("input", "a"), ("input", "b"), ("a", "lif"), ("b", "output"), ("lif", "output")], {"dt": 1.0})
    with pytest.raises(TypeError, match=r"node 'input' feeds \['a', 'b'\]; sparsebptt maps chains of layers"):
        sb.import_nir(g)
