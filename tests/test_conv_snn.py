"""Deep spiking networks (issue 14): any feature shape, LIFNeuron, stateless layers and batch norm
inside a Stack; every exact strategy equals FullBPTT, buffers included."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.cells.lif import LIFParams, lif_step
import sparsebptt.kernels.backend as kb
from sparsebptt.testing import assert_close, seeded

STRATEGIES = [sb.Checkpoint(every=1), sb.Checkpoint(every=4), sb.Revolve(slots=2),
              sb.DoubleCheckpoint(outer=10, inner=3, outer_storage="host"),
              sb.DoubleCheckpoint(outer=8, inner=2, outer_storage="disk"),
              sb.DoubleCheckpoint.optimal(fast_slots=1, slow_slots=2, outer_storage="disk")]
BACKENDS = ["torch"] + (["cpu"] if kb.backend_available("cpu")[0] else [])


def csnn(dtype=torch.float64, backend="torch", dropout=0.0, H=9, W=7, learn_beta=False):
    """conv-BN-LIF, pooling, conv-BN-LIF, flatten, dense readout with LIF: odd spatial sizes."""
    torch.manual_seed(5)
    h2, w2 = H // 2, W // 2
    layers = [nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
              sb.cells.LIFNeuron((4, H, W), threshold=0.4, backend=backend, learn_beta=learn_beta),
              nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3),
              sb.cells.LIFNeuron((3, h2, w2), beta=0.8, threshold=0.3, reset="zero", surrogate="atan",
                                 backend=backend, learn_beta="channel" if learn_beta else False),
              nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(3 * h2 * w2, 5), sb.cells.LIFNeuron(5, threshold=0.2, backend=backend)]
    net = sb.cells.Stack(layers)
    with torch.no_grad():  # running statistics away from their defaults, so that a wrong update shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return net.to(dtype)


def train_step(net, T, B, strategy, dtype=torch.float64, reduce=None, x=None, seed=0):
    """One training step (forward, backward, SGD update): outputs, dx, grads, buffers, new params."""
    if x is None:
        x = seeded(seed, T, B, 2, 9, 7, dtype=dtype)
    x = x.clone().requires_grad_()
    torch.manual_seed(123)  # dropout draws
    out, state = sb.scan(net, x, strategy=strategy, reduce=reduce)
    loss = (out * seeded(seed + 100, *out.shape, dtype=dtype)).sum()
    for i, s in enumerate(state):
        loss = loss + (s * seeded(seed + 200 + i, *s.shape, dtype=dtype)).sum()
    loss.backward()
    res = {"out": out.detach().clone(), "dx": x.grad.clone()}
    res.update({f"state_T[{i}]": s.detach().clone() for i, s in enumerate(state)})
    res.update({f"d{n}": p.grad.clone() for n, p in net.named_parameters()})
    res.update({f"buffer {n}": b.clone() for n, b in net.named_buffers()})
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    res.update({f"new {n}": p.detach().clone() for n, p in net.named_parameters()})
    return res


def compare(ref, got, dtype):
    assert ref.keys() == got.keys()
    for name in ref:
        if ref[name].dtype == torch.int64:  # num_batches_tracked
            assert torch.equal(ref[name], got[name]), name
        else:
            assert_close(name, ref[name], got[name], dtype)


_REF: dict = {}


def reference(T, B, backend):
    key = (T, B, backend)
    if key not in _REF:
        _REF[key] = train_step(csnn(backend=backend), T, B, sb.FullBPTT())
    return _REF[key]


@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("T", [1, 7, 21], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string() + getattr(s, "outer_storage", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_snn_strategy_equals_full_bptt(backend, strategy, T, B):
    """The issue's done-when grid: outputs, dx, every parameter gradient and the batch norm running
    statistics (and num_batches_tracked) after one training step, float64, odd spatial sizes."""
    ref = reference(T, B, backend)
    got = train_step(csnn(backend=backend), T, B, strategy)
    compare(ref, got, torch.float64)
    assert int(got["buffer layers.1.num_batches_tracked"]) == T  # one update per step, none on recomputation


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_conv_snn_fused_equals_torch(backend):
    ref = train_step(csnn(backend="torch", learn_beta=True), 7, 3, sb.FullBPTT())
    got = train_step(csnn(backend=backend, learn_beta=True), 7, 3, sb.Checkpoint(3))
    compare(ref, got, torch.float64)


def test_conv_snn_equals_step_loop():
    """The Stack (time-batched convolutions, per-step batch norm) equals a plain loop over its layers."""
    T, B = 6, 3
    net = csnn()
    ref_net = csnn()
    x = seeded(0, T, B, 2, 9, 7)
    out, _ = sb.scan(net, x)
    state = list(ref_net.initial_state(B, dtype=torch.float64))
    ys = []
    for t in range(T):
        h, k = x[t], 0
        for layer in ref_net.layers:
            if isinstance(layer, sb.cells.LIFNeuron):
                h, (state[k],) = layer.step(h, (state[k],))
                k += 1
            else:
                h = layer(h)
        ys.append(h)
    assert_close("out", torch.stack(ys), out, torch.float64)
    for (n, b), b2 in zip(ref_net.named_buffers(), net.buffers()):  # per-step batch norm in one call:
        if b.is_floating_point():  # its running statistics agree with the step loop's to rounding
            assert_close(n, b, b2, torch.float64)
        else:
            assert torch.equal(b, b2), n


@pytest.mark.parametrize("reduce", ["sum", "mean", "last"])
def test_conv_snn_reduce(reduce):
    ref = train_step(csnn(), 11, 2, sb.FullBPTT(), reduce=reduce)
    got = train_step(csnn(), 11, 2, sb.Revolve(slots=3), reduce=reduce)
    assert ref["out"].shape == (2, 5)
    compare(ref, got, torch.float64)


@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=3), sb.Revolve(slots=2)], ids=lambda s: s.to_string())
def test_dropout_masks_replayed(strategy, caplog):
    """Dropout in training mode: the Stack steps its layers together and recomputation replays the masks."""
    ref = train_step(csnn(dropout=0.3), 9, 3, sb.FullBPTT())
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        got = train_step(csnn(dropout=0.3), 9, 3, strategy)
    compare(ref, got, torch.float64)
    no_dropout = train_step(csnn(dropout=0.0), 9, 3, sb.FullBPTT())
    assert not torch.equal(no_dropout["dx"], ref["dx"])  # the masks did act


def test_eval_mode_batch_norm_time_batched():
    net = csnn().eval()
    assert net.scan_segment is not None
    x = seeded(1, 8, 2, 2, 9, 7)
    with torch.no_grad():
        y1, _ = sb.scan(net, x)
        y2, _ = sb.scan(net, x, strategy=sb.Checkpoint(3))
    assert torch.equal(y1, y2)


def test_planner_and_trace_with_image_states():
    net = csnn()
    x = seeded(2, 12, 2, 2, 9, 7)
    with sb.trace() as t:
        y, _ = sb.scan(net, x.requires_grad_(), strategy=sb.Checkpoint(4))
        y.sum().backward()
    assert t.forward_steps == 12 and t.recomputed_steps == 8 and t.peak_stored_bytes > 0
    assert set(t.activity) == {"2:LIFNeuron", "6:LIFNeuron", "9:LIFNeuron"}
    strategy = sb.plan(net, (200, 2, 2, 9, 7), "1MiB")
    est = sb.estimate(net, (200, 2, 2, 9, 7), strategy)
    assert est.fast_bytes <= 1024 ** 2


# ---- LIFNeuron ---------------------------------------------------------------------------------
LIF_OPTS = [dict(), dict(reset="zero", surrogate="atan", detach_reset=True),
            dict(reset_timing="after_decay", surrogate="sigmoid"), dict(learn_beta="channel", surrogate="triangle"),
            dict(learn_beta=True, reset="zero", reset_timing="after_decay")]


def _lif_reference(x, v0, opts, beta_param):
    p = LIFParams(0.85, 0.5, opts.get("reset", "subtract"), opts.get("surrogate", "fast_sigmoid"), None,
                  opts.get("detach_reset", False), opts.get("reset_timing", "before_decay"))
    beta = None if beta_param is None else beta_param.clamp(0.0, 1.0)
    v, zs = v0, []
    for t in range(x.shape[0]):
        z, v = lif_step(x[t], v, p, beta)
        zs.append(z)
    return torch.stack(zs), v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", LIF_OPTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_lif_neuron_equals_reference(opts, backend, dtype):
    """LIFNeuron over (T, B, C, H, W) equals a loop over lif_step (fp64 to 1e-10, fp32 to 1e-5 of scale)."""
    shape = (3, 5, 4)
    cell = sb.cells.LIFNeuron(shape, beta=0.85, threshold=0.5, backend=backend, **opts).to(dtype)
    if cell.beta is not None:
        with torch.no_grad():
            cell.beta.copy_(0.6 + 0.3 * seeded(9, *cell.beta.shape, dtype=dtype, kind="uniform"))
    x = (0.4 * seeded(0, 13, 2, *shape, dtype=dtype)).requires_grad_()
    v0 = (0.2 * seeded(1, 2, *shape, dtype=dtype)).requires_grad_()
    dz, dv = seeded(2, 13, 2, *shape, dtype=dtype), seeded(3, 2, *shape, dtype=dtype)
    z, (vT,) = sb.scan(cell, x, (v0,), strategy=sb.Checkpoint(5))
    assert z.shape == (13, 2) + shape and vT.shape == (2,) + shape
    got = torch.autograd.grad((z * dz).sum() + (vT * dv).sum(), [x, v0] + list(cell.parameters()))
    x2, v02 = x.detach().requires_grad_(), v0.detach().requires_grad_()
    beta2 = None if cell.beta is None else cell.beta.detach().clone().requires_grad_()
    z2, vT2 = _lif_reference(x2, v02, opts, beta2)
    ref = torch.autograd.grad((z2 * dz).sum() + (vT2 * dv).sum(), [x2, v02] + ([beta2] if beta2 is not None else []))
    assert_close("z", z2, z, dtype)
    assert_close("vT", vT2, vT, dtype)
    for name, a, b in zip(["dx", "dv0", "dbeta"], ref, got):
        assert_close(name, a, b, dtype)


@pytest.mark.parametrize("strategy", [sb.FullBPTT()] + STRATEGIES,
                         ids=lambda s: s.to_string() + getattr(s, "outer_storage", ""))
def test_lif_neuron_every_strategy(strategy):
    cell = sb.cells.LIFNeuron((2, 3), beta=0.7, threshold=0.3, learn_beta="neuron").double()
    x = seeded(0, 17, 3, 2, 3).requires_grad_()
    z, (v,) = sb.scan(cell, x, strategy=strategy)
    got = torch.autograd.grad((z * seeded(5, *z.shape)).sum() + v.sum(), [x, cell.beta])
    z2, (v2,) = sb.scan(cell, x)
    ref = torch.autograd.grad((z2 * seeded(5, *z.shape)).sum() + v2.sum(), [x, cell.beta])
    for name, a, b in zip(["dx", "dbeta"], ref, got):
        assert_close(name, a, b, torch.float64)
    assert torch.equal(z, z2)


def test_lif_neuron_int_shape_and_repr():
    cell = sb.cells.LIFNeuron(10, learn_beta="channel")
    assert cell.shape == (10,) and cell.beta.shape == (10,)
    assert cell.initial_state(4)[0].shape == (4, 10)
    assert "LIFNeuron((10,)" in repr(cell) or "(10,)" in repr(cell)
    y, _ = sb.scan(cell, seeded(0, 3, 4, 10, dtype=torch.float32))
    assert y.shape == (3, 4, 10)


# ---- bad input ---------------------------------------------------------------------------------
def test_lif_neuron_bad_arguments():
    with pytest.raises(ValueError, match=r"LIFNeuron: shape must be a positive int or a tuple"):
        sb.cells.LIFNeuron((3, 0))
    with pytest.raises(ValueError, match=r"learn_beta must be one of False, True, 'neuron', 'channel', got 'x'"):
        sb.cells.LIFNeuron(3, learn_beta="x")
    with pytest.raises(ValueError, match="beta must be in"):
        sb.cells.LIFNeuron(3, beta=2.0)


def test_state_shape_does_not_match_input():
    cell = sb.cells.LIFNeuron((4, 5, 5))
    with pytest.raises(ValueError, match=r"x has shape \(3, 2, 4, 6, 6\) but LIFNeuron takes \(T, B, 4, 5, 5\)"):
        sb.scan(cell, torch.rand(3, 2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"state0\[0\] has shape \(2, 4, 6, 6\), expected \(2, 4, 5, 5\)"):
        sb.scan(cell, torch.rand(3, 2, 4, 5, 5), (torch.zeros(2, 4, 6, 6),))
    net = sb.cells.Stack([nn.Conv2d(2, 4, 3), sb.cells.LIFNeuron((4, 5, 5))])  # no padding: 3x3 out of 5x5
    with pytest.raises(ValueError, match=r"layer 1 \(LIFNeuron\) takes \(B, 4, 5, 5\) per step but layer 0 "
                                         r"\(Conv2d\) gives \(2, 4, 3, 3\)"):
        sb.scan(net, torch.rand(3, 2, 2, 5, 5))


def test_cell_of_3d_input_given_5d():
    with pytest.raises(ValueError, match=r"LIF takes \(T, B, 8\) \(input_size=8\); flatten the features "
                                         r"with x.flatten\(2\)"):
        sb.scan(sb.cells.LIF(8, 3), torch.rand(3, 2, 2, 2, 2))


def test_batch_first_hint_only_where_right():
    cell = sb.cells.GRU(4, 3)
    with pytest.raises(ValueError, match=r"x looks batch-first .* pass x.transpose\(0, 1\)"):
        sb.scan(cell, torch.rand(2, 7, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"build it with cell.initial_state\(7\)"):
        sb.scan(cell, torch.rand(3, 7, 4), torch.zeros(2, 3))


def test_stateless_layer_changes_batch():
    net = sb.cells.Stack([nn.Flatten(0), sb.cells.LIFNeuron(12)])
    with pytest.raises(ValueError, match=r"layer 0 \(Flatten\) changed the batch dimension: .* must keep dimension 0"):
        sb.scan(net, torch.rand(3, 2, 2, 3))
    with pytest.raises(ValueError, match=r"layer 0 \(Flatten\) changed the batch dimension"):
        sb.scan(net, torch.rand(3, 2, 2, 3), strategy=sb.Checkpoint(2))


def test_batch_norm_of_wrong_rank():
    net = sb.cells.Stack([nn.Flatten(), nn.BatchNorm2d(4), sb.cells.LIFNeuron(36)])
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d\) gets a 2-D tensor of shape \(2, 36\) per step "
                                         r"but needs \(B, C, H, W\)"):
        sb.scan(net, torch.rand(3, 2, 4, 3, 3))
    net = sb.cells.Stack([nn.BatchNorm2d(5), sb.cells.LIFNeuron((4, 3, 3))])
    with pytest.raises(ValueError, match=r"layer 0 \(BatchNorm2d\) has num_features=5 but gets 4 channels"):
        sb.scan(net, torch.rand(3, 2, 4, 3, 3))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_batch_norm_1d_per_step(momentum):
    """BatchNorm1d (cumulative average too) on a dense layer: strategies equal FullBPTT and a step loop."""
    def make():
        torch.manual_seed(1)
        return sb.cells.Stack([nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=momentum),
                               sb.cells.LIFNeuron(8, threshold=0.3)]).double()

    x = seeded(3, 10, 4, 6)
    outs = {}
    for strategy in [sb.FullBPTT(), sb.Checkpoint(3), sb.Revolve(2)]:
        net = make()
        xx = x.clone().requires_grad_()
        y, _ = sb.scan(net, xx, strategy=strategy)
        (y * seeded(4, *y.shape)).sum().backward()
        outs[strategy.to_string()] = [y.detach(), xx.grad] + [p.grad for p in net.parameters()] + list(net.buffers())
    for k, v in outs.items():
        for i, (a, b) in enumerate(zip(outs["full"], v)):
            assert_close(f"{k}[{i}]", a, b, torch.float64) if a.is_floating_point() else torch.equal(a, b)
    loop, state = make(), None
    with torch.no_grad():
        state = loop.initial_state(4, dtype=torch.float64)
        for t in range(10):
            _, state = loop.step(x[t], state)
    for (n, a), b in zip(loop.named_buffers(), net.buffers()):
        assert_close(n, a.double(), b.double(), torch.float64)


def test_which_stateless_layers_run_time_batched():
    from sparsebptt.cells.stack import _stateless_kind
    assert _stateless_kind(nn.Conv2d(1, 1, 3)) == "batched"
    assert _stateless_kind(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU())) == "batched"
    assert _stateless_kind(nn.BatchNorm2d(3)) == "per_step"
    assert _stateless_kind(nn.BatchNorm2d(3).eval()) == "batched"
    assert _stateless_kind(nn.Dropout(0.2)) == "stepped" and _stateless_kind(nn.Dropout(0.2).eval()) == "batched"
    assert _stateless_kind(nn.Softmax(dim=1)) == "batched" and _stateless_kind(nn.Softmax(dim=0)) == "stepped"
    assert _stateless_kind(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))) == "stepped"

    class Mine(nn.Module):
        def forward(self, x):
            return x * 2

    assert _stateless_kind(Mine()) == "stepped"  # unknown: the Stack steps all its layers together
    net = sb.cells.Stack([Mine(), sb.cells.LIFNeuron(4)])
    assert net.scan_segment is None
    y, _ = sb.scan(net, seeded(0, 5, 2, 4), strategy=sb.Checkpoint(2))
    assert y.shape == (5, 2, 4)
    Mine.time_batched = True  # the user's promise: per sample, no random numbers
    assert _stateless_kind(Mine()) == "batched" and net.scan_segment is not None
    y2, _ = sb.scan(net, seeded(0, 5, 2, 4), strategy=sb.Checkpoint(2))
    assert torch.equal(y, y2)


def test_skipper_without_skipping_equals_full_bptt():
    """Skipper(every=k, keep=k) skips nothing: FullBPTT's gradients and batch norm statistics."""
    ref = train_step(csnn(), 13, 2, sb.FullBPTT())
    got = train_step(csnn(), 13, 2, sb.Skipper(every=5, keep=5))
    compare(ref, got, torch.float64)
    skipped = train_step(csnn(), 13, 2, sb.Skipper(every=5, keep=2))  # an approximation: buffers still exact
    for name in ref:
        if name.startswith("buffer"):
            assert torch.equal(ref[name], skipped[name]), name


def test_trace_counts_conv_and_linear_macs():
    """sb.trace counts the MACs of a Stack's convolutions and linear layers, the same under every
    strategy (recomputation counted apart), forward and backward (issue 14)."""
    T, B = 5, 2
    x = seeded(0, T, B, 2, 9, 7)
    per_step = B * (4 * 9 * 7 * 2 * 9 + 3 * 4 * 3 * 4 * 9 + 5 * 36)  # conv1, conv2 (after 2x2 pooling), linear
    counts = {}
    for strategy in (sb.FullBPTT(), sb.Checkpoint(2)):
        with sb.trace() as t:
            y, _ = sb.scan(csnn(), x.clone().requires_grad_(), strategy=strategy)
            y.sum().backward()
        counts[strategy.to_string()] = (t.forward_macs, t.recomputed_macs, t.backward_macs)
    assert counts["full"] == (T * per_step, 0, 2 * T * per_step)
    assert counts["checkpoint:2"] == (T * per_step, 4 * per_step, 2 * T * per_step)
