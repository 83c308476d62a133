"""Inputs larger than memory (issue 14): spike tensors (bool/uint8), memory maps and SegmentSource,
read a segment at a time, equal to the same input as a float tensor under every strategy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.sources import Input
from sparsebptt.strategies.executor import NO_GRAD_CHUNK
from sparsebptt.testing import assert_close, seeded

STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=5), sb.Revolve(slots=3),
              sb.DoubleCheckpoint(outer=12, inner=4, outer_storage="host"),
              sb.DoubleCheckpoint(outer=8, inner=3, outer_storage="disk"), sb.Skipper(every=10, keep=4)]
IDS = lambda s: s.to_string() + getattr(s, "outer_storage", "")  # noqa: E731


def dense_net(backend="torch"):
    torch.manual_seed(2)
    return sb.cells.Stack([sb.cells.LIF(6, 9, threshold=0.3, backend=backend),
                           sb.cells.LIF(9, 4, threshold=0.2, recurrent=True, backend=backend)]).double()


def conv_net():
    torch.manual_seed(2)
    return sb.cells.Stack([nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3),
                           sb.cells.LIFNeuron((3, 5, 5), threshold=0.3),
                           nn.Flatten(), nn.Linear(75, 4), sb.cells.LIFNeuron(4, threshold=0.2)]).double()


def spikes(T, *shape, seed=0):
    return seeded(seed, T, *shape, kind="spikes", dtype=torch.float64).bool()


def grads(make, x, strategy, reduce="sum"):
    net = make()
    y, state = sb.scan(net, x, strategy=strategy, reduce=reduce)
    loss = (y * seeded(7, *y.shape)).sum() + sum((s * seeded(8 + i, *s.shape)).sum() for i, s in enumerate(state))
    loss.backward()
    out = {"y": y.detach()}
    out.update({n: p.grad.clone() for n, p in net.named_parameters()})
    out.update({n: b.clone() for n, b in net.named_buffers() if b.is_floating_point()})
    return out


def compare(ref, got):
    assert ref.keys() == got.keys()
    for k in ref:
        assert_close(k, ref[k], got[k], torch.float64)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("kind", ["bool", "uint8", "source", "source-bool"])
def test_spike_inputs_equal_float(kind, strategy):
    T = 37
    s = spikes(T, 3, 6)
    ref = grads(dense_net, s.double(), strategy)
    if kind == "bool":
        x = s
    elif kind == "uint8":
        x = s.to(torch.uint8)
    else:
        src = s if kind == "source-bool" else s.double()
        x = sb.SegmentSource(lambda t0, t1: src[t0:t1], T=T, shape=(3, 6))
    compare(ref, grads(dense_net, x, strategy))


@pytest.mark.parametrize("strategy", STRATEGIES[:4], ids=IDS)
def test_conv_spike_frames_equal_float(strategy):
    s = spikes(13, 2, 2, 5, 5, seed=3)
    compare(grads(conv_net, s.double(), strategy, reduce=None), grads(conv_net, s, strategy, reduce=None))


def test_memory_mapped_inputs(tmp_path):
    T, B, F = 23, 2, 6
    x = seeded(4, T, B, F)
    path = tmp_path / "x.bin"
    x.numpy().tofile(path)
    mm = torch.from_file(str(path), size=T * B * F, dtype=torch.float64).view(T, B, F)
    ref = grads(dense_net, x, sb.Checkpoint(4))
    compare(ref, grads(dense_net, mm, sb.Checkpoint(4)))
    npm = np.memmap(path, dtype=np.float64, mode="r", shape=(T, B, F))
    compare(ref, grads(dense_net, npm, sb.Checkpoint(4)))
    s = spikes(T, B, F)  # a bool memmap: converted per segment
    sp = tmp_path / "s.bin"
    s.numpy().tofile(sp)
    npb = np.memmap(sp, dtype=np.bool_, mode="r", shape=(T, B, F))
    compare(grads(dense_net, s.double(), sb.Revolve(2)), grads(dense_net, npb, sb.Revolve(2)))


def test_memory_mapped_float_input_keeps_its_gradient(tmp_path):
    x = seeded(4, 9, 2, 6)
    path = tmp_path / "x.bin"
    x.numpy().tofile(path)
    mm = torch.from_file(str(path), size=x.numel(), dtype=torch.float64).view(9, 2, 6).requires_grad_()
    y, _ = sb.scan(dense_net(), mm, strategy=sb.Checkpoint(2), reduce="sum")
    y.sum().backward()
    x.requires_grad_()
    y2, _ = sb.scan(dense_net(), x, reduce="sum")
    y2.sum().backward()
    assert_close("dx", x.grad, mm.grad, torch.float64)


@pytest.mark.parametrize("strategy,T", [(sb.FullBPTT(), 600), (sb.Checkpoint(every=16), 300),
                                        (sb.DoubleCheckpoint(outer=64, inner=8, outer_storage="disk"), 300)],
                         ids=["full-600", "checkpoint16-300", "double-disk-300"])
def test_source_read_per_segment(strategy, T):
    """A SegmentSource is read segment by segment (never the whole input, at most NO_GRAD_CHUNK steps
    at once), and again on recomputation."""
    s = spikes(T, 2, 6)
    reads = []

    def fn(t0, t1):
        reads.append((t0, t1))
        return s[t0:t1]

    src = sb.SegmentSource(fn, T=T, shape=(2, 6))
    ref = grads(dense_net, s.double(), strategy)
    compare(ref, grads(dense_net, src, strategy))
    assert max(t1 - t0 for t0, t1 in reads) <= min(NO_GRAD_CHUNK, T - 1)
    covered = sum(t1 - t0 for t0, t1 in reads)
    assert covered >= T if strategy.plan(T).keep_graph else covered > T  # read again on recomputation


def test_bool_tensor_converted_per_segment(monkeypatch):
    """A bool tensor is converted one segment at a time, never as a whole."""
    T = 300
    s = spikes(T, 2, 6)
    sizes = []
    read = Input.read

    def spy(self, t0, t1):
        sizes.append(t1 - t0)
        return read(self, t0, t1)

    monkeypatch.setattr(Input, "read", spy)
    compare(grads(dense_net, s.double(), sb.FullBPTT()), grads(dense_net, s, sb.Checkpoint(20)))
    assert max(sizes) <= NO_GRAD_CHUNK


def test_planner_counts_a_streamed_input():
    net = dense_net()
    shape = (1000, 16, 6)
    st = sb.Checkpoint(32)
    plain = sb.estimate(net, shape, st)
    streamed = sb.estimate(net, shape, st, streamed=True)
    step = 16 * 6 * 8
    assert plain.input_bytes == 0
    assert streamed.input_bytes == (32 + NO_GRAD_CHUNK) * step
    assert streamed.fast_bytes == plain.fast_bytes + streamed.input_bytes
    full = sb.estimate(net, shape, sb.FullBPTT(), streamed=True)
    assert full.input_bytes == 1000 * step
    assert sb.plan(net, shape, streamed.fast_bytes, streamed=True) is not None


def test_source_errors():
    with pytest.raises(TypeError, match=r"fn must be a callable fn\(t0, t1\) -> Tensor, got int"):
        sb.SegmentSource(3, T=4, shape=(2, 3))
    with pytest.raises(ValueError, match=r"T must be a positive int, got 0"):
        sb.SegmentSource(lambda a, b: None, T=0, shape=(2, 3))
    with pytest.raises(ValueError, match=r"shape must be \(B, \*features\) of positive ints"):
        sb.SegmentSource(lambda a, b: None, T=4, shape=(2,))
    src = sb.SegmentSource(lambda t0, t1: torch.zeros(t1 - t0, 2, 3), T=4, shape=(2, 3))
    with pytest.raises(ValueError, match="gradients w.r.t. a streamed input are not supported"):
        src.requires_grad_()
    bad = sb.SegmentSource(lambda t0, t1: torch.zeros(t1 - t0, 2, 5), T=4, shape=(2, 3))
    with pytest.raises(ValueError, match=r"fn\(0, 4\) returned shape \(4, 2, 5\), expected \(4, 2, 3\)"):
        sb.scan(sb.cells.LIF(3, 2), bad)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor or spikes \(bool/uint8/int8\), "
                                        r"got dtype torch.int32"):
        sb.scan(sb.cells.LIF(3, 2), torch.zeros(4, 2, 3, dtype=torch.int32))


def test_recurrent_memory_budget_plans_image_and_streamed_inputs():
    """sb.Recurrent(memory_budget=...) plans for (T, B, C, H, W) inputs and streamed ones (it no longer
    runs FullBPTT for an x that is not 3-D)."""
    torch.manual_seed(0)
    net = sb.cells.Stack([nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), sb.cells.LIFNeuron((4, 8, 8)),
                          nn.Flatten(), nn.Linear(256, 3), sb.cells.LIFNeuron(3)])
    layer = sb.Recurrent(net, memory_budget="2MiB", reduce="sum", return_state=False)
    x = seeded(0, 300, 4, 2, 8, 8, kind="spikes", dtype=torch.float32)
    layer(x)
    layer(x.bool())
    layer(sb.SegmentSource(lambda t0, t1: x[t0:t1].bool(), T=300, shape=(4, 2, 8, 8)))
    picks = layer.plans
    assert len(picks) == 3 and all(not s.plan(300).keep_graph for s in picks.values())
