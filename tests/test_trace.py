"""sb.trace counts steps, recomputation, stored bytes, MACs and activity exactly."""
from __future__ import annotations

import gc
from math import comb

import pytest
import torch

import sparsebptt as sb
from sparsebptt.strategies.revolve import binomial_repetitions
from sparsebptt.testing import seeded


def traced(cell, x, strategy, reduce=None):
    with sb.trace() as t:
        y, state = sb.scan(cell, x, strategy=strategy, reduce=reduce)
        (y.sum() + sum(s.sum() for s in state)).backward()
    return t


@pytest.mark.parametrize("T,every", [(1, 3), (10, 3), (37, 5), (40, 8)])
def test_checkpoint_step_counts(T, every):
    cell = sb.cells.GRU(3, 4)
    t = traced(cell, torch.randn(T, 2, 3), sb.Checkpoint(every))
    last = (T - 1) // every * every
    assert t.forward_steps == T
    assert t.recomputed_steps == last  # every segment but the last is recomputed once


@pytest.mark.parametrize("T,slots", [(T, s) for T in (2, 10, 37, 100, 1000) for s in (1, 2, 5, 8)
                                     if not (T == 1000 and s == 1)])  # T^2/2 steps: too slow
def test_revolve_within_binomial_bound(T, slots):
    cell = sb.cells.GRU(2, 2)
    t = traced(cell, torch.randn(T, 1, 2), sb.Revolve(slots))
    r = binomial_repetitions(T, slots)
    assert t.forward_steps == T
    # each step runs once with graph; the plain advances are Griewank's optimum, within r*T
    plain = t.forward_steps + t.recomputed_steps - T
    assert plain == r * T - comb(slots + r, slots + 1)
    assert plain <= r * T


def test_full_counts_and_macs():
    T, B, I, H = 9, 3, 5, 4
    cell = sb.cells.GRU(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    t = traced(cell, x, sb.FullBPTT())
    step_macs = B * (I * 3 * H + H * 3 * H)
    assert t.forward_steps == T and t.recomputed_steps == 0
    assert t.forward_macs == T * step_macs
    assert t.recomputed_macs == 0
    # every matmul's backward: weight grad always; input grad for x (requires grad) and for h
    # except at step 0, where h is state0 and needs no gradient
    assert t.backward_macs == 2 * T * step_macs - B * H * 3 * H


def test_checkpoint_macs_match_full_and_count_recompute():
    T, B, I, H = 23, 2, 3, 5
    cell = sb.cells.LSTM(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    full = traced(cell, x, sb.FullBPTT())
    ck = traced(cell, x, sb.Checkpoint(6))
    assert ck.forward_macs == full.forward_macs
    assert ck.backward_macs == full.backward_macs
    assert ck.recomputed_macs == ck.recomputed_steps * full.forward_macs // T


def test_stored_bytes_fall_with_strategy_and_return_to_zero():
    T = 400
    net = sb.cells.Stack([sb.cells.LIF(8, 32), sb.cells.LIF(32, 32)])
    x = seeded(0, T, 4, 8, dtype=torch.float32, kind="spikes")
    peaks = {}
    for st in [sb.FullBPTT(), sb.Checkpoint(20), sb.Revolve(4)]:
        t = traced(net, x, st, reduce="sum")
        peaks[st.to_string()] = t.peak_stored_bytes
        assert t.stored_bytes == 0, f"{st}: {t.stored_bytes} bytes still counted after backward"
    tensor_bytes = 4 * 32 * 4  # one [B, H] float32 tensor
    # per step: each layer's surrogate input, and layer 1's matmul input (layer 0's spikes); the
    # fused "cpu" layer 1 keeps those spikes as their columns (int32 each, with an int64 row start)
    if net.layers[1].active_backend == "cpu":
        with torch.no_grad():
            spikes = int(sb.scan(net.layers[0], x)[0].count_nonzero())
        assert peaks["full"] == T * 2 * tensor_bytes + 4 * spikes + 8 * (T * 4 + 1)
    else:
        assert peaks["full"] == T * 3 * tensor_bytes
    assert peaks["checkpoint:20"] < peaks["full"] / 5
    assert peaks["revolve:4"] < peaks["checkpoint:20"] / 3


def test_checkpoint_stored_bytes_model():
    """Checkpoint stores (ceil(T/k) - 1) states in preallocated slots plus one segment's graph."""
    T, k, B, H = 100, 10, 4, 16
    cell = sb.cells.GRU(3, H)
    x = torch.randn(T, B, 3)
    seg = traced(cell, x[:k], sb.FullBPTT()).peak_stored_bytes
    t = traced(cell, x, sb.Checkpoint(k))
    slots = (T // k - 1) * B * H * 4
    assert slots + seg <= t.peak_stored_bytes <= slots + 1.5 * seg + B * H * 4 * k


def test_external_tensors_not_counted():
    """x, state0 and parameters exist anyway: a one-step linear cell stores nothing of its own."""
    cell = sb.cells.GRU(3, 4)
    x = torch.randn(1, 2, 3)
    t = traced(cell, x, sb.FullBPTT())
    # GRU saves gate activations (its own tensors) but never x, h0 or the weights
    assert 0 < t.peak_stored_bytes < 20 * 2 * 4 * 4


def test_lif_activity_is_spike_rate():
    cell = sb.cells.Stack([sb.cells.LIF(6, 10, threshold=0.5), sb.cells.LIF(10, 10, threshold=0.5)])
    x = seeded(0, 50, 3, 6, dtype=torch.float32, kind="spikes", p=0.5)
    with sb.trace() as t:
        z, _ = sb.scan(cell, x, strategy=sb.Checkpoint(7))
        z.sum().backward()
    assert set(t.activity) == {"0:LIF", "1:LIF"}
    assert abs(t.activity["1:LIF"] - z.double().mean().item()) < 1e-12  # not diluted by recomputation
    assert 0.0 < t.activity["0:LIF"] < 1.0


def test_no_trace_no_counting():
    cell = sb.cells.GRU(3, 4)
    y, _ = sb.scan(cell, torch.randn(5, 1, 3), strategy=sb.Checkpoint(2))
    y.sum().backward()  # runs without an active trace
    assert sb.trace is not None


def test_graphs_never_back_propagated_are_freed():
    """A graph built under `sb.trace` and dropped without backward (Skipper carry="drop" with
    reduce="last": no gradient reaches the earlier tails) is freed, and its count released."""
    torch.manual_seed(0)
    cell = sb.cells.GRU(5, 7)  # sigmoid / tanh save their outputs: the case that made a cycle
    x = torch.rand(60, 3, 5)
    with sb.trace() as t:
        y, _ = sb.scan(cell, x, strategy=sb.Skipper(10, 5, carry="drop"), reduce="last")
        y.sum().backward()
    del y, _
    gc.collect()  # Python-level cycles may wait for the collector; the C++ cycle never was freed
    assert t.stored_bytes == 0
    with sb.trace() as t2:
        y, _ = sb.scan(cell, x, strategy=sb.Skipper(10, 5, carry="through"), reduce="last")
        y.sum().backward()
    # at most two tails' graphs at once (the one back-propagated and the next recomputed)
    assert t.peak_stored_bytes <= 2 * t2.peak_stored_bytes
    with sb.trace() as t3:
        h = cell.initial_state(3)
        for s in range(20):
            _, h = cell.step(x[s], h)
        del h, _
    gc.collect()
    assert t3.stored_bytes == 0


def test_image_states_stored_bytes_and_activity():
    """LIFNeuron with (B, C, H, W) states: checkpoint slots counted at their full size, activity the spike rate,
    offloaded bytes for disk slots (issue 14)."""
    T, k, B, shape = 40, 8, 2, (3, 5, 7)
    cell = sb.cells.LIFNeuron(shape, threshold=0.5, backend="torch")
    x = seeded(0, T, B, *shape, dtype=torch.float32).requires_grad_()  # a neuron has no parameters of its own
    seg = traced(cell, x[:k], sb.FullBPTT()).peak_stored_bytes
    t = traced(cell, x, sb.Checkpoint(k))
    slots = (T // k - 1) * B * 105 * 4
    assert slots + seg <= t.peak_stored_bytes <= slots + 1.5 * seg + B * 105 * 4 * k
    with sb.trace() as t2:
        z, _ = sb.scan(cell, x, strategy=sb.DoubleCheckpoint(20, 4, "disk"))
        z.sum().backward()
    assert t2.peak_offloaded_bytes == 1 * B * 105 * 4
    assert abs(t2.activity["LIFNeuron"] - z.double().mean().item()) < 1e-12
