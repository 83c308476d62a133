"""sb.adapters.wrap (peers' neurons as cells) and the peer mapping of docs/peers.md.

1. Every supported neuron, wrapped, under every exact strategy equals the peer's own plain BPTT
   loop in float64 within 1e-10: outputs, final state, dx, the initial state's gradient and every
   parameter's gradient (the synapse's and the peer's learnable ones).
2. Each row of docs/peers.md: a peer neuron (or surrogate) and the `sb.cells.LIF` settings that
   reproduce it, compared the same way.
3. The refusals (stateful configurations, unknown neurons, missing shapes) and their messages.

Each peer is optional: its tests are skipped when it is not installed (`pip install .[peers]`).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.cells.surrogate import surrogate_derivative
from sparsebptt.testing import assert_close, seeded

N_IN, H, T, B = 5, 7, 13, 3
STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=4), sb.Revolve(slots=3), sb.DoubleCheckpoint(outer=8, inner=2)]
TOL = 1e-10


def _peer(name):
    return pytest.importorskip(name, reason=f"{name} is not installed (optional: pip install .[peers])")


# ---- the neurons, each with learnable peer parameters where the peer has them -------------------
def _snntorch(kind):
    snn = _peer("snntorch")
    beta = (0.6 + 0.3 * seeded(1, H, kind="uniform")).float()
    if kind == "Leaky":
        return snn.Leaky(beta=beta, threshold=0.8, learn_beta=True, learn_threshold=True)
    if kind == "Leaky-zero-sigmoid":
        return snn.Leaky(beta=0.9, reset_mechanism="zero", spike_grad=snn.surrogate.sigmoid(slope=5))
    if kind == "Synaptic":
        return snn.Synaptic(alpha=0.7, beta=beta, learn_alpha=True, learn_beta=True)
    if kind == "RLeaky":
        return snn.RLeaky(beta=0.85, linear_features=H, learn_beta=True)
    raise AssertionError(kind)


def _spikingjelly(kind):
    _peer("spikingjelly")
    from spikingjelly.activation_based import neuron, surrogate
    if kind == "IFNode":
        return neuron.IFNode(v_threshold=0.9)
    if kind == "IFNode-soft-atan":
        return neuron.IFNode(v_reset=None, surrogate_function=surrogate.ATan(), detach_reset=True)
    if kind == "LIFNode":
        return neuron.LIFNode(tau=2.0)
    if kind == "ParametricLIFNode":
        return neuron.ParametricLIFNode(init_tau=1.7, v_reset=None)
    raise AssertionError(kind)


def _norse(kind):
    _peer("norse")
    from norse.torch import LICell, LIFBoxCell, LIFCell
    from norse.torch.functional.lif import LIFParameters
    from norse.torch.functional.lif_box import LIFBoxParameters
    if kind == "LIFCell":  # a learnable membrane time constant, kept in Norse's parameter tuple
        return LIFCell(p=LIFParameters(tau_mem_inv=nn.Parameter(torch.tensor(100.0, dtype=torch.float64))))
    if kind == "LIFBoxCell":
        return LIFBoxCell(p=LIFBoxParameters(v_th=torch.tensor(0.3)))
    if kind == "LICell":
        return LICell()
    raise AssertionError(kind)


NEURONS = [("snntorch", k) for k in ("Leaky", "Leaky-zero-sigmoid", "Synaptic", "RLeaky")] + \
    [("spikingjelly", k) for k in ("IFNode", "IFNode-soft-atan", "LIFNode", "ParametricLIFNode")] + \
    [("norse", k) for k in ("LIFCell", "LIFBoxCell", "LICell")]
_MAKE = {"snntorch": _snntorch, "spikingjelly": _spikingjelly, "norse": _norse}
_SCALE = {"snntorch": 2.0, "spikingjelly": 2.0, "norse": 8.0}  # input scale: some spikes in T steps


def make(pkg, kind):
    torch.manual_seed(0)
    neuron = _MAKE[pkg](kind).double()
    synapse = nn.Linear(N_IN, H).double()
    return neuron, synapse


def peer_loop(pkg, kind, neuron, synapse, x, state0):
    """The peer's own plain BPTT loop (its documented usage): (outputs [T, B, H], final state)."""
    ys = []
    if pkg == "snntorch":
        state = state0
        for t in range(x.shape[0]):
            cur = synapse(x[t])
            if kind == "RLeaky":  # snnTorch spikes are float32 (`.float()`): cast back at once to feed V
                spk, mem = neuron(cur, *state)
                spk = spk.to(x.dtype)
                state = (spk, mem)
                ys.append(spk)
            else:
                out = neuron(cur, *state)
                ys.append(out[0])
                state = tuple(out[1:])
        return torch.stack(ys).to(x.dtype), tuple(s.to(x.dtype) for s in state)
    if pkg == "spikingjelly":  # stateful single-step use, the membrane stored in the module
        from spikingjelly.activation_based import functional
        functional.reset_net(neuron)
        neuron.v = state0[0]
        for t in range(x.shape[0]):
            ys.append(neuron(synapse(x[t])))
        vT = neuron.v
        functional.reset_net(neuron)
        return torch.stack(ys), (vT,)
    names = ("v",) if kind == "LIFBoxCell" else ("v", "i")
    state_type = type(neuron.initial_state(x[0, :, :1].expand(-1, H)))
    s = state_type(*state0)
    for t in range(x.shape[0]):
        y, s = neuron(synapse(x[t]), s)
        ys.append(y)
    return torch.stack(ys), tuple(getattr(s, n) for n in names)


def _weights(seed, shape):
    """Random loss weights, multiples of 1/64: snnTorch's spikes are float32, so their gradient is
    rounded to float32 and scaled there (``grad * slope``); these stay exact through that."""
    return torch.round(64 * seeded(seed, *shape)) / 64


def _loss(y, state):
    loss = (y * _weights(100, y.shape)).sum()
    for k, s in enumerate(state):
        loss = loss + (s * _weights(101 + k, s.shape)).sum()
    return loss


def _grads(params: dict, leaves: dict, y, state):
    for p in params.values():
        p.grad = None
    _loss(y, state).backward()
    res = {"out": y.detach(), **{f"state_T[{k}]": s.detach() for k, s in enumerate(state)}}
    res.update({f"d{n}": t.grad for n, t in leaves.items()})
    res.update({f"d{n}": p.grad for n, p in params.items()})
    return res


def _inputs(cell, pkg):
    x = (_SCALE[pkg] * seeded(3, T, B, N_IN)).requires_grad_()
    state0 = tuple((0.2 * seeded(10 + k, *s.shape)).requires_grad_()
                   for k, s in enumerate(cell.initial_state(B, dtype=torch.float64)))
    if pkg == "snntorch" and cell.kind == "RLeaky":  # the state's spikes are spikes
        state0 = ((seeded(20, B, H, kind="spikes")).requires_grad_(), state0[1])
    return x, state0


def _compare(ref, got):
    assert ref.keys() == got.keys(), (ref.keys(), got.keys())
    for name in ref:
        assert_close(name, ref[name], got[name], torch.float64, atol=TOL)


# ---- 1. wrapped neuron == the peer's own loop, under every exact strategy -------------------------
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
@pytest.mark.parametrize("pkg,kind", NEURONS, ids=[f"{p}-{k}" for p, k in NEURONS])
def test_wrapped_equals_peer_loop(pkg, kind, strategy):
    neuron, synapse = make(pkg, kind)
    cell = sb.adapters.wrap(neuron, synapse)
    assert (cell.input_size, cell.hidden_size) == (N_IN, H)
    params = dict(cell.named_parameters())
    x, state0 = _inputs(cell, pkg)
    leaves = {"x": x, **{f"state0[{k}]": s for k, s in enumerate(state0)}}
    expect = _grads(params, leaves, *peer_loop(pkg, kind, neuron, synapse, x, state0))
    for t in leaves.values():
        t.grad = None
    got = _grads(params, leaves, *sb.scan(cell, x, state0, strategy=strategy))
    _compare(expect, got)
    if cell.spiking:
        assert 0 < expect["out"].mean() < 1, "no spikes (or only spikes): the test would prove little"
    learnable = [n for n in params if not n.startswith("synapse.")]
    if kind in ("Leaky", "Synaptic", "RLeaky", "ParametricLIFNode", "LIFCell"):
        assert learnable and all(got[f"d{n}"] is not None for n in learnable), learnable


def test_wrapped_norse_parameter_tuple_is_registered():
    neuron, synapse = make("norse", "LIFCell")
    cell = sb.adapters.wrap(neuron, synapse)
    assert cell.peer_parameters["tau_mem_inv"] is neuron.p.tau_mem_inv


@pytest.mark.parametrize("pkg,kind", [("snntorch", "RLeaky"), ("spikingjelly", "LIFNode"), ("norse", "LIFBoxCell")],
                         ids=lambda v: str(v))
def test_wrapped_counts_macs_and_activity(pkg, kind):
    neuron, synapse = make(pkg, kind)
    cell = sb.adapters.wrap(neuron, synapse)
    x, state0 = _inputs(cell, pkg)
    with sb.trace() as t:
        y, state = sb.scan(cell, x.detach(), tuple(s.detach() for s in state0), strategy=sb.Checkpoint(every=4))
        _loss(y, state).backward()
    rec = T * B * H * H if kind == "RLeaky" else 0  # RLeaky's own nn.Linear on the spikes
    assert t.forward_macs == T * B * N_IN * H + rec
    assert t.recomputed_macs == t.recomputed_steps * (B * N_IN * H + rec // T)  # the recomputed steps
    # dW of the synapse (x needs no grad); RLeaky: dV every step, dspk from the second step on
    assert t.backward_macs == T * B * N_IN * H + ((2 * T - 1) * B * H * H if kind == "RLeaky" else 0)
    assert t.activity["PeerCell"] == pytest.approx(float((y != 0).double().mean()))


def test_wrapped_conv_synapse_equals_peer_loop():
    """A Conv2d synapse: x flat [T, B, C*H*W] to sb.scan, shaped inside the step; MACs counted."""
    snn = _peer("snntorch")
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    neuron = snn.Leaky(beta=0.8, threshold=0.5).double()
    cell = sb.adapters.wrap(neuron, conv, input_shape=(2, 5, 5))
    assert (cell.input_size, cell.hidden_size, cell.neuron_shape) == (50, 75, (3, 5, 5))
    x = seeded(4, 9, 2, 50).requires_grad_()
    params = dict(cell.named_parameters())
    mem0 = (0.1 * seeded(5, 2, 3, 5, 5)).requires_grad_()
    ys, mem = [], mem0
    for t in range(9):
        spk, mem = neuron(conv(x[t].view(2, 2, 5, 5)), mem)
        ys.append(spk.double().flatten(1))
    expect = _grads(params, {"x": x, "mem0": mem0}, torch.stack(ys), (mem.flatten(1),))
    x.grad = mem0.grad = None
    with sb.trace() as tr:
        y, st = sb.scan(cell, x, (mem0.view(2, 75),), strategy=sb.Revolve(slots=2))
        got = _grads(params, {"x": x, "mem0": mem0}, y, st)
    _compare(expect, got)
    assert tr.forward_macs == 9 * 2 * 75 * 2 * 9  # every output: in_channels * 3 * 3 products


def test_wrapped_cells_stack_and_train_in_a_layer():
    """Two wrapped layers from two peers in one Stack, as an sb.Recurrent layer."""
    snn = _peer("snntorch")
    _peer("spikingjelly")
    from spikingjelly.activation_based import neuron as sjn
    torch.manual_seed(0)
    net = sb.cells.Stack([sb.adapters.wrap(snn.Leaky(beta=0.9), nn.Linear(N_IN, H)),
                          sb.adapters.wrap(sjn.LIFNode(), nn.Linear(H, 4))]).double()
    layer = sb.Recurrent(net, strategy="checkpoint:4", reduce="sum", return_state=False)
    out = layer(2 * seeded(3, T, B, N_IN))
    out.sum().backward()
    assert out.shape == (B, 4) and all(p.grad is not None for p in net.parameters())


# ---- 2. docs/peers.md: our LIF reproduces the peers' neurons ------------------------------------
def _lif_vs(peer_step, lif, synapse_scale=1.0, n_state=1, state0_fn=None, x_scale=2.0):
    """Our LIF (weights = the peer's synapse * synapse_scale) against ``peer_step(i_t, v) -> (y, v)``
    driven by the peer's nn.Linear synapse: outputs, final state, dx, dv0, dW, db, (dbeta)."""
    torch.manual_seed(0)
    syn = nn.Linear(N_IN, H).double()
    with torch.no_grad():
        lif.weight.copy_(syn.weight * synapse_scale)
        lif.bias.copy_(syn.bias * synapse_scale)
    x = (x_scale * seeded(3, T, B, N_IN)).requires_grad_()
    v0 = (0.2 * seeded(10, B, H) if state0_fn is None else state0_fn()).requires_grad_()
    ys, v = [], v0
    for t in range(T):
        y, v = peer_step(syn(x[t]), v)
        ys.append(y.to(x.dtype))
    y_peer = torch.stack(ys)
    _loss(y_peer, (v,)).backward()
    expect = {"out": y_peer.detach(), "vT": v.detach(), "dx": x.grad, "dv0": v0.grad,  # our W = scale * theirs
              "dW": syn.weight.grad / synapse_scale, "db": syn.bias.grad / synapse_scale}
    x.grad = v0.grad = None
    y, (vT,) = sb.scan(lif, x, (v0,))
    _loss(y, (vT,)).backward()
    got = {"out": y.detach(), "vT": vT.detach(), "dx": x.grad, "dv0": v0.grad, "dW": lif.weight.grad,
           "db": lif.bias.grad}
    _compare(expect, got)
    assert 0 < float(expect["out"].mean()) < 1
    return lif


def _f64(v: float) -> torch.Tensor:
    """A float64 constant: snnTorch and Norse keep a Python float as a float32 tensor (0.8 becomes
    0.800000011920929), so a float64 comparison passes their constants as float64 tensors. (snnTorch
    also subtracts ``S * threshold`` with float32 spikes, i.e. float32(threshold): the thresholds
    below are exact in float32.)"""
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_map_snntorch_leaky(reset):
    """snntorch.Leaky(beta, threshold, reset_mechanism) with its default atan(alpha=2) surrogate ==
    LIF(reset_timing="after_decay", detach_reset=True, surrogate="atan"); mem == our v."""
    snn = _peer("snntorch")
    leaky = snn.Leaky(beta=_f64(0.8), threshold=_f64(0.75), reset_mechanism=reset)
    lif = sb.cells.LIF(N_IN, H, beta=0.8, threshold=0.75, reset=reset, reset_timing="after_decay",
                       detach_reset=True, surrogate="atan", backend="torch").double()
    _lif_vs(lambda i, v: leaky(i, v), lif)


@pytest.mark.parametrize("name,make_grad,surrogate,scale", [
    ("sigmoid", lambda s: s.sigmoid(slope=25), "sigmoid", 25.0),
    ("fast_sigmoid", lambda s: s.fast_sigmoid(slope=25), "fast_sigmoid", 25.0),
    ("atan", lambda s: s.atan(alpha=3.0), "atan", 3.0),
], ids=lambda v: v if isinstance(v, str) else "")
def test_map_snntorch_surrogates_and_learnable_beta(name, make_grad, surrogate, scale):
    """snnTorch surrogate(slope or alpha) == ours at that scale; learn_beta == learn_beta (dbeta too)."""
    snn = _peer("snntorch")
    beta = 0.6 + 0.3 * seeded(1, H, kind="uniform")
    leaky = snn.Leaky(beta=beta.clone(), threshold=_f64(0.75), spike_grad=make_grad(snn.surrogate), learn_beta=True)
    lif = sb.cells.LIF(N_IN, H, threshold=0.75, reset_timing="after_decay", detach_reset=True, surrogate=surrogate,
                       surrogate_scale=scale, learn_beta=True, backend="torch").double()
    with torch.no_grad():
        lif.beta.copy_(beta)
    _lif_vs(lambda i, v: leaky(i, v), lif)
    assert_close("dbeta", leaky.beta.grad, lif.beta.grad, torch.float64, atol=TOL)


@pytest.mark.parametrize("v_reset,decay_input,detach", [(0.0, True, False), (None, True, False),
                                                        (0.0, False, False), (0.0, True, True)],
                         ids=["hard-decayinput", "soft-decayinput", "hard-nodecayinput", "hard-detachreset"])
def test_map_spikingjelly_lifnode(v_reset, decay_input, detach):
    """LIFNode(tau, decay_input, v_reset, Sigmoid(alpha=4), detach_reset) == LIF(beta=1-1/tau,
    reset="zero" for v_reset=0 / "subtract" for None, surrogate="sigmoid", detach_reset), the
    weights / tau when decay_input."""
    _peer("spikingjelly")
    from spikingjelly.activation_based import neuron
    node = neuron.LIFNode(tau=2.0, decay_input=decay_input, v_threshold=0.6, v_reset=v_reset,
                          detach_reset=detach).double()
    lif = sb.cells.LIF(N_IN, H, beta=0.5, threshold=0.6, reset="zero" if v_reset == 0.0 else "subtract",
                       surrogate="sigmoid", detach_reset=detach, backend="torch").double()
    _lif_vs(lambda i, v: tuple(x[0] for x in node.single_step_functional_forward((i,), (v,))), lif,
            synapse_scale=0.5 if decay_input else 1.0)


@pytest.mark.parametrize("v_reset", [0.0, None], ids=["hard", "soft"])
def test_map_spikingjelly_ifnode(v_reset):
    """IFNode(v_reset=0 / None) == LIF(beta=1, reset="zero" / "subtract", surrogate="sigmoid")."""
    _peer("spikingjelly")
    from spikingjelly.activation_based import neuron
    node = neuron.IFNode(v_threshold=1.5, v_reset=v_reset).double()
    lif = sb.cells.LIF(N_IN, H, beta=1.0, threshold=1.5, reset="zero" if v_reset == 0.0 else "subtract",
                       surrogate="sigmoid", backend="torch").double()
    _lif_vs(lambda i, v: tuple(x[0] for x in node.single_step_functional_forward((i,), (v,))), lif)


@pytest.mark.parametrize("reset", ["value", "subtract"])
def test_map_norse_lifbox(reset):
    """LIFBoxCell(tau_mem_inv, v_th, v_leak=0, v_reset=0, method="super") == LIF(beta=1-dt*tau_mem_inv,
    threshold=v_th, reset="zero" / "subtract", surrogate="fast_sigmoid", surrogate_scale=1), the
    weights scaled by dt*tau_mem_inv ("super" ignores its alpha)."""
    _peer("norse")
    from norse.torch import LIFBoxCell
    from norse.torch.functional.lif_box import LIFBoxParameters
    from norse.torch.functional.reset import reset_subtract, reset_value
    p = LIFBoxParameters(tau_mem_inv=_f64(100.0), v_th=_f64(0.3), alpha=torch.tensor(55.0),
                         reset_method=reset_value if reset == "value" else reset_subtract)
    cell = LIFBoxCell(p)
    lif = sb.cells.LIF(N_IN, H, beta=0.9, threshold=0.3, reset="zero" if reset == "value" else "subtract",
                       surrogate="fast_sigmoid", surrogate_scale=1.0, backend="torch").double()
    state = type(cell.initial_state(torch.zeros(1)))
    _lif_vs(lambda i, v: (lambda z, s: (z, s.v))(*cell(i, state(v))), lif, synapse_scale=0.1, x_scale=6.0)


def _sj_grad(fn, x):
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


@pytest.mark.parametrize("case", ["Sigmoid", "ATan", "SoftSign", "SuperSpike", "PiecewiseQuadratic"])
def test_map_spikingjelly_surrogates(case):
    """SpikingJelly's surrogates in our terms: Sigmoid(a) = sigmoid(a), ATan(a) = atan(a),
    SoftSign(a) = (a/2) fast_sigmoid(a), SuperSpike(a) = a fast_sigmoid(1),
    PiecewiseQuadratic(a) = a triangle(1/a)."""
    _peer("spikingjelly")
    from spikingjelly.activation_based import surrogate
    a = 3.0
    factor, name, scale = {"Sigmoid": (1, "sigmoid", a), "ATan": (1, "atan", a),
                           "SoftSign": (a / 2, "fast_sigmoid", a), "SuperSpike": (a, "fast_sigmoid", 1.0),
                           "PiecewiseQuadratic": (a, "triangle", 1 / a)}[case]
    x = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64) + 1e-3
    got = _sj_grad(getattr(surrogate, case)(alpha=a), x)
    assert_close(case, factor * surrogate_derivative(x, name, scale), got, torch.float64, atol=1e-12)


@pytest.mark.parametrize("method", ["super", "triangle"])
def test_map_norse_surrogates(method):
    """Norse's threshold methods in our terms: "super" = fast_sigmoid(1) whatever alpha is;
    "triangle"(alpha) = alpha * triangle(1)."""
    _peer("norse")
    from norse.torch.functional.threshold import threshold
    x = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64) + 1e-3
    for alpha in (0.5, 100.0):
        got = _sj_grad(lambda v: threshold(v, method, alpha), x)
        expect = surrogate_derivative(x, "fast_sigmoid", 1.0) if method == "super" else \
            alpha * surrogate_derivative(x, "triangle", 1.0)
        assert_close(f"{method}-{alpha}", expect, got, torch.float64, atol=1e-12)


# ---- 3. refusals ----------------------------------------------------------------------------------
def test_refuses_snntorch_init_hidden():
    snn = _peer("snntorch")
    with pytest.raises(ValueError, match=r"init_hidden=True\) keeps its state .* build it with init_hidden=False"):
        sb.adapters.wrap(snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(3, 4))


def test_refuses_spikingjelly_stateful_uses():
    _peer("spikingjelly")
    from spikingjelly.activation_based import neuron
    with pytest.raises(ValueError, match="build it with step_mode='s'"):
        sb.adapters.wrap(neuron.LIFNode(step_mode="m"), nn.Linear(3, 4))
    with pytest.raises(ValueError, match="store_v_seq=False"):
        sb.adapters.wrap(neuron.LIFNode(store_v_seq=True), nn.Linear(3, 4))
    used = neuron.LIFNode()
    used(torch.ones(2, 4))  # now holds v
    with pytest.raises(ValueError, match=r"holds a membrane v of shape \(2, 4\).*call neuron.reset\(\)"):
        sb.adapters.wrap(used, nn.Linear(3, 4))
    used.reset()
    assert sb.adapters.wrap(used, nn.Linear(3, 4)).hidden_size == 4


def test_unknown_neuron_lists_the_supported_ones():
    with pytest.raises(TypeError, match="supported neurons: snntorch.Leaky, snntorch.Synaptic, snntorch.RLeaky, "
                                        "spikingjelly.IFNode.*norse.LICell"):
        sb.adapters.wrap(nn.ReLU(), nn.Linear(3, 4))
    with pytest.raises(TypeError, match="neuron must be an nn.Module"):
        sb.adapters.wrap(lambda x: x)


def test_shape_and_synapse_errors():
    snn = _peer("snntorch")
    with pytest.raises(ValueError, match=r"pass input_shape= \(the neuron's size"):
        sb.adapters.wrap(snn.Leaky(beta=0.9))
    with pytest.raises(ValueError, match=r"pass input_shape= \(the shape of one sample before the Conv2d"):
        sb.adapters.wrap(snn.Leaky(beta=0.9), nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="takes in_features=3; omit input_shape"):
        sb.adapters.wrap(snn.Leaky(beta=0.9), nn.Linear(3, 4), input_shape=5)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        sb.adapters.wrap(snn.Leaky(beta=0.9), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(TypeError, match="synapse must be an nn.Module"):
        sb.adapters.wrap(snn.Leaky(beta=0.9), "linear")
    with pytest.raises(ValueError, match="does not take one sample of input_shape=\\(4,\\)"):
        sb.adapters.wrap(snn.Leaky(beta=0.9), nn.Sequential(nn.Linear(3, 4)), input_shape=4)
    cell = sb.adapters.wrap(snn.Leaky(beta=0.9), input_shape=6)
    assert (cell.input_size, cell.hidden_size) == (6, 6)


def test_module_imports_without_the_peers():
    code = ("import sys\nfor m in ('snntorch', 'spikingjelly', 'norse'): sys.modules[m] = None\n"
            "import sparsebptt as sb\nassert sb.adapters.SUPPORTED\n"
            "import torch\ntry:\n    sb.adapters.wrap(torch.nn.ReLU())\nexcept TypeError as e:\n    print('ok', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
