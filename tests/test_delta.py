"""Delta GRU / Delta LSTM and the sparse matmul: dense equality at threshold 0, the exact gradient
of the thresholded forward, every exact strategy, MAC and activity counters (issue 6)."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
from sparsebptt.cells.delta import delta_encode
from sparsebptt.kernels.sparse import sparse_linear
from sparsebptt.testing import assert_close, seeded

from helpers import N_IN, run

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny ops only lose to OpenMP wake-ups on a shared machine
    (index_add_ on a 6x18 tensor took 59 ms with 2 threads on 2 busy cores, 4 us with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DELTA = {"delta-gru": (sb.cells.DeltaGRU, sb.cells.GRU), "delta-lstm": (sb.cells.DeltaLSTM, sb.cells.LSTM)}


def make_delta(kind, dtype=torch.float64, H=6, **kw):
    torch.manual_seed(3)
    return DELTA[kind][0](N_IN, H, **kw).to(dtype)


def dense_state(kind, state0):
    """The dense cell's state from a Delta state with zero references and memories."""
    return state0[:1] if kind == "delta-gru" else state0[:2]


def _forward_backward(cell, x, state0, n_loss, strategy=sb.FullBPTT()):
    for p in cell.parameters():
        p.grad = None
    for t in (x, *state0):
        t.grad = None
    y, state = sb.scan(cell, x, state0, strategy=strategy)
    loss = (y * seeded(100, *y.shape, dtype=y.dtype)).sum()
    for i, s in enumerate(state[:n_loss]):
        loss = loss + (s * seeded(200 + i, *s.shape, dtype=y.dtype)).sum()
    loss.backward()
    res = {"out": y.detach().clone(), "dx": x.grad.clone()}
    res.update({f"dstate0[{i}]": s.grad.clone() for i, s in enumerate(state0) if s.requires_grad})
    res.update({f"d{k}": p.grad.clone() for k, p in cell.named_parameters()})
    return res


# ---- threshold 0: the dense cell ---------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", list(DELTA))
def test_threshold_zero_equals_dense_cell(kind, backend):
    """Outputs and every gradient (x, h0/c0, parameters) of the dense cell, float64 within 1e-9."""
    torch.manual_seed(0)
    dense = DELTA[kind][1](N_IN, 6).double()
    delta = DELTA[kind][0](N_IN, 6, threshold=0.0, backend=backend).double()
    delta.load_state_dict(dense.state_dict())
    assert [n for n, _ in delta.named_parameters()] == [n for n, _ in dense.named_parameters()]
    x = seeded(1, 31, 3, N_IN).requires_grad_()
    s0 = delta.initial_state(3)
    s0 = tuple((0.5 * seeded(2 + i, *s.shape)).requires_grad_() if i < len(dense_state(kind, s0)) else s
               for i, s in enumerate(s0))
    n = len(dense_state(kind, s0))
    got = _forward_backward(delta, x, s0, n)
    ref = _forward_backward(dense, x, dense_state(kind, s0), n)
    for name in ref:
        assert_close(name, ref[name], got[name], atol=1e-9)
    dense.load_state_dict(delta.state_dict())  # and back


# ---- sparse backward == autograd through the reference (dense matmuls on masked deltas) -----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("active_set", ["union", "sample", "auto"])
@pytest.mark.parametrize("B", [1, 4], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("threshold", [0.0, 0.3], ids=lambda t: f"th{t}")
@pytest.mark.parametrize("kind", list(DELTA))
def test_sparse_backend_equals_reference(kind, threshold, B, active_set, dtype):
    ref_cell = make_delta(kind, dtype, threshold=threshold, backend="torch")
    cell = make_delta(kind, dtype, threshold=threshold, backend="cpu", active_set=active_set)
    ref = run(ref_cell, 23, B, dtype, sb.FullBPTT())
    got = run(cell, 23, B, dtype, sb.FullBPTT())
    for name in ref:
        assert_close(name, ref[name], got[name], dtype)


def _margin(cell, x, state0):
    """Smallest distance of any |delta| to the threshold along the run (gradcheck needs > eps)."""
    m = float("inf")
    state = state0
    with torch.no_grad():
        for t in range(x.shape[0]):
            h = state[0]
            x_ref, h_ref = state[-4], state[-3]
            m = min(m, float(((x[t] - x_ref).abs() - cell.threshold).abs().min()),
                    float(((h - h_ref).abs() - cell.hidden_threshold).abs().min()))
            _, state = cell.step(x[t], state)
    return m


@pytest.mark.parametrize("active_set", ["union", "sample"])
@pytest.mark.parametrize("kind", list(DELTA))
def test_gradcheck_at_threshold(kind, active_set):
    """The sparse backward is the exact gradient of the thresholded forward (float64, theta=0.1)."""
    cell = make_delta(kind, H=4, threshold=0.1, active_set=active_set)
    x = seeded(7, 6, 2, N_IN).requires_grad_()
    s0 = tuple((0.5 * seeded(8 + i, *s.shape)).requires_grad_() for i, s in enumerate(cell.initial_state(2)))
    assert _margin(cell, x, s0) > 1e-4, "inputs too close to the threshold for finite differences"
    params = list(cell.parameters())

    def f(x, *rest):
        state0 = rest[:len(s0)]
        y, state = sb.scan(cell, x, state0)
        return y, state[0]

    with sb.trace() as t:
        y, _ = sb.scan(cell, x, s0)
    act = t.activity[type(cell).__name__]
    assert 0.1 < act < 0.95, f"the check must see both active and silent deltas, activity {act}"
    assert torch.autograd.gradcheck(f, (x, *s0), eps=1e-6, atol=1e-7)
    # parameters: the gradient of a scalar loss vs central differences
    loss = lambda: sum((o * seeded(9, *o.shape)).sum() for o in f(x, *s0))  # noqa: E731
    grads = torch.autograd.grad(loss(), params)
    for (name, p), g in zip(cell.named_parameters(), grads):
        num = torch.zeros_like(p)
        picked = torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[:10]
        with torch.no_grad():
            for i in picked.tolist():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + 1e-6
                up = loss()
                p.view(-1)[i] = old - 1e-6
                down = loss()
                p.view(-1)[i] = old
                num.view(-1)[i] = (up - down) / 2e-6
        assert_close(f"d{name}", num.view(-1)[picked], g.reshape(-1)[picked], atol=1e-6)


# ---- the sparse matmul itself -------------------------------------------------------------

@pytest.mark.parametrize("active_set", ["union", "sample"])
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
def test_sparse_linear_gradcheck_and_chain(active_set, B):
    x = seeded(0, B, 9).requires_grad_()
    w = seeded(1, 7, 9).requires_grad_()
    m0 = seeded(2, B, 7).requires_grad_()
    mask = seeded(3, B, 9, kind="uniform") < 0.4
    assert torch.autograd.gradcheck(lambda x, w: sparse_linear(x, w, mask, active_set=active_set), (x, w))

    def chain(x, w, m0):  # three chained updates: the weight gradient is accumulated along them
        m = m0
        for k in range(3):
            m = sparse_linear(x * (k + 1), w, mask.roll(k, 1), add_to=m, active_set=active_set)
        return m

    assert torch.autograd.gradcheck(chain, (x, w, m0))
    ref = m0 + sum(((x * (k + 1)) * mask.roll(k, 1)) @ w.t() for k in range(3))
    assert_close("chain", ref, chain(x, w, m0))


def test_chain_partial_backward_does_not_leak():
    """A backward that never reaches the chain's first call leaves no stale weight gradient."""
    x = seeded(0, 2, 9).requires_grad_()
    w = seeded(1, 7, 9).requires_grad_()
    mask = torch.ones(2, 9, dtype=torch.bool)
    m1 = sparse_linear(x, w, mask, add_to=torch.zeros(2, 7, dtype=torch.float64))
    x2 = seeded(4, 2, 9).requires_grad_()
    m2 = sparse_linear(x2, w, mask, add_to=m1)
    torch.autograd.grad(m2.sum(), [x2], retain_graph=True)  # runs only the second call
    m2.sum().backward(retain_graph=True)
    assert_close("dw", torch.ones(2, 7, dtype=torch.float64).t() @ (x + x2), w.grad)
    w.grad = None
    m2.sum().backward()  # a second full backward gives the same gradient again
    assert_close("dw again", torch.ones(2, 7, dtype=torch.float64).t() @ (x + x2), w.grad)


def test_sparse_linear_counts_macs_done():
    x = seeded(0, 1, 10).requires_grad_()
    w = seeded(1, 6, 10).requires_grad_()
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [1, 4, 7]] = True
    with sb.trace() as t:
        sparse_linear(x, w, mask).sum().backward()
    assert t.forward_macs == 3 * 6 and t.backward_macs == 2 * 3 * 6
    mask2 = torch.zeros(2, 10, dtype=torch.bool)
    mask2[0, [1, 2]] = True
    mask2[1, [2, 5, 9]] = True
    x2 = seeded(0, 2, 10)
    with sb.trace() as t:
        sparse_linear(x2, w, mask2, active_set="union").sum().backward()
    assert t.forward_macs == 2 * 4 * 6 and t.backward_macs == 2 * 4 * 6  # union of 4 columns, dW only
    with sb.trace() as t:
        sparse_linear(x2, w, mask2, active_set="sample").sum().backward()
    assert t.forward_macs == 5 * 6  # 5 active entries
    assert t.backward_macs == 2 * 4 * 6  # dW only, as one GEMM over the union of 4 columns


# ---- every exact strategy ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("T", [1, 2, 19], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=1), sb.Checkpoint(every=7), sb.Revolve(slots=2),
                                      sb.Revolve(slots=5)], ids=lambda s: s.to_string())
@pytest.mark.parametrize("kind", list(DELTA))
def test_exact_strategies_equal_full_bptt(kind, strategy, T, B, dtype):
    ref = run(make_delta(kind, dtype, threshold=0.3), T, B, dtype, sb.FullBPTT())
    got = run(make_delta(kind, dtype, threshold=0.3), T, B, dtype, strategy)
    for name in ref:
        assert_close(name, ref[name], got[name], dtype)


def test_stack_of_delta_cells_under_checkpoint():
    torch.manual_seed(0)
    net = sb.cells.Stack([sb.cells.DeltaGRU(N_IN, 8, threshold=0.2), sb.cells.DeltaLSTM(8, 6, threshold=0.05)])
    net = net.double()
    ref = run(net, 29, 2, torch.float64, sb.FullBPTT(), reduce="sum")
    got = run(net, 29, 2, torch.float64, sb.Checkpoint(every=5), reduce="sum")
    for name in ref:
        assert_close(name, ref[name], got[name])


# ---- counters: MACs and activity fall with the threshold -----------------------------------

def test_macs_and_activity_fall_with_threshold():
    x = torch.cumsum(0.05 * seeded(0, 40, 2, 16), 0)  # slowly varying input
    rows = []
    for th in (0.0, 0.05, 0.2):
        torch.manual_seed(0)
        net = sb.cells.Stack([sb.cells.DeltaGRU(16, 32, threshold=th), sb.cells.DeltaLSTM(32, 32, threshold=th)])
        net = net.double()
        with sb.trace() as t:
            y, _ = sb.scan(net, x)
            y.sum().backward()
        rows.append((t.activity, t.forward_macs, t.backward_macs))
    assert set(rows[0][0]) == {"0:DeltaGRU", "1:DeltaLSTM"}
    assert rows[0][0]["0:DeltaGRU"] == 1.0  # threshold 0 transmits everything
    for (a0, f0, b0), (a1, f1, b1) in zip(rows, rows[1:]):
        assert all(a1[k] < a0[k] for k in a0)
        assert f1 < f0 and b1 < b0


def test_delta_encode_threshold_zero_transmits_every_entry():
    v = torch.tensor([[1.0, 2.0, 3.0]])
    d, mask, ref = delta_encode(v, v.clone(), 0.0)
    assert bool(mask.all()) and torch.equal(ref, v)
    d, mask, ref = delta_encode(v, torch.tensor([[1.05, 2.5, 3.0]]), 0.1)
    assert mask.tolist() == [[False, True, False]]
    assert torch.allclose(ref, torch.tensor([[1.05, 2.0, 3.0]]))


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": -0.1}, r"DeltaGRU: threshold must be a number >= 0 .*got -0.1"),
    ({"hidden_threshold": float("nan")}, r"DeltaGRU: hidden_threshold must be a number >= 0"),
    ({"backend": "cuda"}, r"DeltaGRU: unknown backend 'cuda'; valid backends are: auto, torch, cpu, triton"),
    ({"active_set": "rows"}, r"DeltaGRU: unknown active_set 'rows'; valid values are: auto, union, sample"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb.cells.DeltaGRU(4, 3, **kwargs)


@pytest.mark.parametrize("kind", list(DELTA))
def test_backend_sparse_is_deprecated_cpu(kind):
    with pytest.warns(DeprecationWarning, match="backend 'sparse' is now called 'cpu'; use backend='cpu'"):
        cell = DELTA[kind][0](4, 3, 0.1, backend="sparse")
    assert cell.backend == "cpu" and cell.active_backend == "cpu" and cell.scan_segment is not None  # the C segment scan (issue 17)
    step = sb.cells.delta_gru_step if kind == "delta-gru" else sb.cells.delta_lstm_step
    state = cell.initial_state(2)
    with pytest.warns(DeprecationWarning, match="delta_.*_step: backend 'sparse' is now called 'cpu'"):
        step(torch.randn(2, 4), state, cell.weight_ih, cell.weight_hh, backend="sparse")
    with pytest.raises(ValueError, match="delta_.*_step: backend must be 'cpu' or 'torch', got 'triton'"):
        step(torch.randn(2, 4), state, cell.weight_ih, cell.weight_hh, backend="triton")


def test_sparse_linear_bad_inputs():
    x, w = torch.randn(2, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="mask must be a bool tensor of x's shape"):
        sparse_linear(x, w, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"x must be \[B, in\] and weight \[out, in\]"):
        sparse_linear(x, torch.randn(5, 3), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="add_to must be"):
        sparse_linear(x, w, torch.ones(2, 5, dtype=torch.bool), add_to=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown active_set 'x'"):
        sparse_linear(x, w, torch.ones(2, 5, dtype=torch.bool), active_set="x")


# ---- digits-seq ------------------------------------------------------------------------------

def test_digits_seq_rows_held_with_noise():
    from sparsebptt.data import DATASETS, DigitsSeq, get_dataset

    assert DATASETS["digits-seq"] is DigitsSeq
    ds = get_dataset("digits-seq", 20, noise=0.0)
    x, y = next(ds.batches("val", 5, seed=0))
    assert x.shape == (20, 5, 8) and x.dtype == torch.float32 and y.shape == (5,)
    img = ds.features("val")[:5].view(5, 8, 8)
    for t in range(20):
        assert torch.equal(x[t], img[:, t * 8 // 20])  # row t*8//T at step t, held
    noisy = DigitsSeq(64, noise=0.02)
    x1, _ = next(noisy.batches("train", 8, seed=3))
    x2, _ = next(noisy.batches("train", 8, seed=3))
    assert torch.equal(x1, x2)  # same seed, same noise
    jitter = (x1[1:] - x1[:-1]).abs()
    assert float((jitter > 0.15).float().mean()) < 0.1  # slowly varying: most steps only jitter


@pytest.mark.parametrize("kwargs,match", [
    ({"T": 7}, r"digits-seq: T must be >= 8"),
    ({"T": 16, "noise": -1.0}, r"digits-seq: noise must be a standard deviation >= 0, got -1.0"),
])
def test_digits_seq_bad_options(kwargs, match):
    from sparsebptt.data import DigitsSeq

    with pytest.raises(ValueError, match=match):
        DigitsSeq(**kwargs)


# ---- trainer and command line ----------------------------------------------------------------

def test_cli_train_delta_gru_reports_activity(tmp_path, capsys):
    from sparsebptt import cli

    out = tmp_path / "run"
    argv = ["train", "--model", "delta-gru", "--threshold", "0.1", "--dataset", "digits-seq", "--T", "8",
            "--epochs", "1", "--hidden", "8", "--batch-size", "512", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    import json
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "delta-gru" and config["threshold"] == 0.1
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["activity"]) == {"0:DeltaGRU", "1:DeltaGRU"}
    assert all(0.0 < a < 1.0 for a in row["activity"].values()) and row["backward_macs"] > 0
    assert "activity 0:DeltaGRU" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["gru", "lstm", "delta-lstm"])
def test_build_recurrent_models(model):
    from sparsebptt.train import TrainConfig, build_model

    net = build_model(TrainConfig(model=model, hidden=6, layers=2), 8, 10)
    x = seeded(0, 9, 3, 8, dtype=torch.float32)
    logits = net(x)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "rnn"}, r"unknown model 'rnn'; valid models are: lif, gru, lstm, delta-gru, delta-lstm"),
    ({"model": "gru", "threshold": 0.1}, r"model 'gru' has no threshold"),
    ({"model": "lif", "threshold": 0.0}, r"threshold must be a number > 0 for model 'lif'"),
    ({"model": "delta-gru", "threshold": -1.0}, r"threshold must be a number >= 0 for model 'delta-gru'"),
])
def test_train_config_model_checks(kwargs, match):
    from sparsebptt.train import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_cli_threshold_without_one_exits_2(tmp_path, capsys):
    from sparsebptt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "gru", "--threshold", "0.1", "--out", str(tmp_path / "never")])
    assert e.value.code == 2
    assert "model 'gru' has no threshold" in capsys.readouterr().err
