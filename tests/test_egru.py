"""EGRU (issue 7): the cell against a hand-written step, the sparse backward against autograd
through the dense reference, every exact strategy against FullBPTT, MAC and activity counters,
the activity regulariser, errors."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
from sparsebptt.cells.egru import egru_step, event, event_statistics, pseudo_derivative
from sparsebptt.kernels.egru.cpu import load_library
from sparsebptt.kernels.sparse import full_above
from sparsebptt.testing import assert_close, seeded

from helpers import N_IN, run


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny ops only lose to OpenMP wake-ups on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_egru(dtype=torch.float64, H=9, threshold_init=0.15, seed=3, **kw):
    torch.manual_seed(seed)
    cell = sb.cells.EGRU(N_IN, H, threshold_init=threshold_init, **kw)
    with torch.no_grad():  # per-unit thresholds spread around threshold_init
        cell.threshold.add_(0.05 * seeded(seed, H, dtype=torch.float32))
    return cell.to(dtype)


def margin(cell, x, state0) -> float:
    """Smallest |c~ - threshold| along a reference run: how close any unit came to flipping."""
    ref = sb.cells.EGRU(cell.input_size, cell.hidden_size, backend="torch").to(x.dtype)
    ref.load_state_dict(cell.state_dict())
    m, state = float("inf"), tuple(state0)
    with torch.no_grad():
        for t in range(x.shape[0]):
            c, y = state[0], state[1]
            gi = torch.nn.functional.linear(x[t], ref.weight_ih, ref.bias_ih)
            gh = torch.nn.functional.linear(y, ref.weight_hh, ref.bias_hh)
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, u = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            m = min(m, float((n + u * (c - n) - ref.threshold).abs().min()))
            _, state = ref.step(x[t], state)
    return m


# ---- the step against a hand-written formula ------------------------------------------------

def test_step_matches_hand_formula():
    cell = make_egru(H=7)
    x, c, y = seeded(0, 3, N_IN), 0.5 * seeded(1, 3, 7), 0.5 * seeded(2, 3, 7)
    W_ir, W_iz, W_in = cell.weight_ih.chunk(3, 0)
    W_hr, W_hz, W_hn = cell.weight_hh.chunk(3, 0)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ W_ir.T + b_ir + y @ W_hr.T + b_hr)
    u = torch.sigmoid(x @ W_iz.T + b_iz + y @ W_hz.T + b_hz)
    n = torch.tanh(x @ W_in.T + b_in + r * (y @ W_hn.T + b_hn))
    c_new = n + u * (c - n)
    e = (c_new > cell.threshold).double()
    assert 0 < float(e.mean()) < 1
    for backend in ("cpu", "torch"):
        cell.backend = backend
        out, (c1, y1) = cell.step(x, (c, y))
        assert_close("y", c_new * e, out)
        assert out is y1
        assert_close("c", c_new - cell.threshold * e, c1)


def test_event_pseudo_derivative():
    v = torch.tensor([-0.6, -0.25, 0.0, 0.1, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    e = event(v, 0.7, 0.5)
    assert e.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # H(0) = 0, as EvNN's heaviside(x, x)
    e.sum().backward()
    assert_close("psi", torch.tensor([0.0, 0.35, 0.7, 0.56, 0.0, 0.0], dtype=torch.float64), v.grad, atol=1e-15)
    assert_close("pseudo_derivative", v.grad, pseudo_derivative(v.detach(), 0.7, 0.5), atol=0.0)


def test_parameter_names_and_layout_shared_with_gru():
    gru, egru = sb.cells.GRU(N_IN, 6), sb.cells.EGRU(N_IN, 6)
    names = [n for n, _ in egru.named_parameters()]
    assert names == [n for n, _ in gru.named_parameters()] + ["threshold"]
    missing, unexpected = egru.load_state_dict(gru.state_dict(), strict=False)
    assert missing == ["threshold"] and unexpected == []
    assert torch.equal(egru.weight_hh, gru.weight_hh) and egru.threshold.shape == (6,)


# ---- the sparse backward equals autograd through the dense reference ------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("active_set", ["auto", "union", "sample"])
@pytest.mark.parametrize("epsilon", [0.5, 0.1], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("B", [1, 4], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("T", [1, 2, 23], ids=lambda t: f"T{t}")
def test_sparse_backward_equals_reference(T, B, epsilon, active_set, dtype):
    """Outputs, final state and every gradient (x, c0, y0, all parameters, the threshold);
    epsilon 0.1 leaves few units near the threshold: the input gradient runs sparse too."""
    ref_cell = make_egru(dtype, backend="torch", epsilon=epsilon)
    cell = make_egru(dtype, backend="cpu", active_set=active_set, epsilon=epsilon)
    x = seeded(0, T, B, N_IN, dtype=dtype)
    s0 = [0.3 * seeded(1 + i, B, 9, dtype=dtype) for i in range(2)]
    assert margin(cell, x, s0) > (1e-9 if dtype == torch.float64 else 1e-4)
    ref = run(ref_cell, T, B, dtype, sb.FullBPTT())
    got = run(cell, T, B, dtype, sb.FullBPTT())
    assert set(ref) == set(got) and "dthreshold" in ref
    for name in ref:
        assert_close(name, ref[name], got[name], dtype)


def test_activity_of_the_equality_check_is_mixed():
    """The runs above see events, silent units near the threshold and silent units far from it."""
    cell = make_egru()
    stats = event_statistics(cell, seeded(0, 23, 4, N_IN), tuple(0.3 * seeded(1 + i, 4, 9) for i in range(2)))
    s = stats["EGRU"]
    assert 0.1 < s["activity"] < 0.6 and s["activity"] < s["backward_activity"] < 0.95, s
    narrow = event_statistics(make_egru(epsilon=0.1), seeded(0, 23, 4, N_IN),
                              tuple(0.3 * seeded(1 + i, 4, 9) for i in range(2)))["EGRU"]
    assert narrow["backward_activity"] < full_above(4), narrow  # the sparse products run
    load_library()  # this machine has a C compiler: the C kernels build


@pytest.mark.parametrize("y0", ["zeros", "sparse"])
def test_initial_output_gets_every_gradient(y0):
    """dL/dy0 is the reference's at every unit, also where y0 is 0 (nothing says it came from
    an event): the first step of a scan takes the dense input gradient."""
    B = 3
    grads = {}
    for backend in ("torch", "cpu"):
        cell = make_egru(backend=backend)
        x = seeded(0, 11, B, N_IN).requires_grad_()
        y = torch.zeros(B, 9, dtype=torch.float64) if y0 == "zeros" else \
            0.5 * seeded(5, B, 9) * (seeded(6, B, 9, kind="uniform") < 0.3)
        c = (0.3 * seeded(2, B, 9)).requires_grad_()
        y = y.requires_grad_()
        out, state = sb.scan(cell, x, (c, y))
        ((out * seeded(7, *out.shape)).sum() + (state[0] * seeded(8, B, 9)).sum()).backward()
        grads[backend] = (y.grad, c.grad, x.grad, cell.weight_hh.grad, cell.threshold.grad)
    for name, a, b in zip(["dy0", "dc0", "dx", "dweight_hh", "dthreshold"], *grads.values()):
        assert_close(name, a, b)
    assert bool((grads["cpu"][0] != 0).all())


def test_count_events_and_regularizer_gradients_equal_reference():
    dtype, T, B = torch.float64, 17, 3
    res = {}
    for backend in ("torch", "cpu"):
        cell = make_egru(count_events=True, backend=backend)
        x = seeded(0, T, B, N_IN).requires_grad_()
        s0 = cell.initial_state(B, dtype=dtype)
        y, state = sb.scan(cell, x, s0, strategy=sb.Checkpoint(every=5), reduce="mean")
        assert len(state) == 3
        reg = sb.cells.activity_regularizer(cell, state, T, target=0.05)
        loss = (y * seeded(3, *y.shape)).sum() + 2.0 * reg
        loss.backward()
        res[backend] = {"reg": reg.detach(), "count": state[2].detach(), "dx": x.grad,
                        **{n: p.grad for n, p in cell.named_parameters()}}
    counts = res["cpu"]["count"]
    assert torch.equal(counts, counts.round()) and float(counts.max()) <= T
    assert float(res["cpu"]["reg"]) > 0
    for name in res["torch"]:
        assert_close(name, res["torch"][name], res["cpu"][name])


def test_regularizer_lowers_activity():
    """A few Adam steps on the regulariser alone push the event rate towards the target."""
    cell = make_egru(dtype=torch.float32, H=16, threshold_init=0.0, count_events=True)
    x = seeded(0, 30, 8, N_IN, dtype=torch.float32)
    opt = torch.optim.Adam(cell.parameters(), lr=0.02)
    rates = []
    for _ in range(15):
        opt.zero_grad()
        _, state = sb.scan(cell, x, reduce="last")
        rates.append(float(state[2].detach().mean()) / 30)
        sb.cells.activity_regularizer(cell, state, 30, target=0.02).backward()
        opt.step()
    assert rates[-1] < 0.5 * rates[0], rates


def test_stack_of_egru_under_checkpoint_and_partial_backward():
    """Two EGRU layers in a Stack; a first backward that reaches only x does not leak into the
    weight gradient of the full backward that follows (the segment's gradient chain)."""
    torch.manual_seed(0)
    layers = lambda backend: [sb.cells.EGRU(N_IN, 8, threshold_init=0.05, backend=backend),  # noqa: E731
                              sb.cells.EGRU(8, 6, threshold_init=0.02, backend=backend)]
    ref_net = sb.cells.Stack(layers("torch")).double()
    net = sb.cells.Stack(layers("cpu")).double()
    net.load_state_dict(ref_net.state_dict())
    ref = run(ref_net, 29, 2, torch.float64, sb.FullBPTT(), reduce="sum")
    got = run(net, 29, 2, torch.float64, sb.Checkpoint(every=6), reduce="sum")
    for name in ref:
        assert_close(name, ref[name], got[name])
    x = seeded(0, 29, 2, N_IN).requires_grad_()
    net.zero_grad()
    y, _ = sb.scan(net, x)
    loss = (y * seeded(1, *y.shape)).sum()
    torch.autograd.grad(loss, [x], retain_graph=True)
    loss.backward()
    ref_net.zero_grad()
    y_ref, _ = sb.scan(ref_net, x.detach())
    (y_ref * seeded(1, *y.shape)).sum().backward()
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        assert_close(f"d{name}", q.grad, p.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B,H,O", [(1, 5, 7), (3, 11, 37), (4, 9, 64)], ids=lambda v: str(v))
def test_c_kernels_equal_torch(B, H, O, dtype):
    """The masked products of the sparse backward (odd sizes: the SIMD loops' remainders)."""
    from sparsebptt.kernels.egru.cpu import masked_rows_axpy_, masked_rows_dot

    g, wt, y = seeded(0, B, O, dtype=dtype), seeded(1, H, O, dtype=dtype), seeded(2, B, H, dtype=dtype)
    for mask in (seeded(3, B, H, kind="uniform") < 0.4, torch.zeros(B, H, dtype=torch.bool),
                 torch.ones(B, H, dtype=torch.bool)):
        assert_close("dy", (g @ wt.t()) * mask, masked_rows_dot(g, wt, mask), dtype)
        buf = seeded(4, H, O, dtype=dtype)
        assert_close("buf", buf + (y * mask).t() @ g, masked_rows_axpy_(buf.clone(), y, g, mask), dtype)
    tiny = torch.full((B, O), 1e-40, dtype=torch.float32)  # denormals are flushed to zero
    assert float(masked_rows_dot(tiny, wt.float(), torch.ones(B, H, dtype=torch.bool)).abs().max()) == 0.0


def test_c_kernels_bad_arguments():
    from sparsebptt.kernels.egru.cpu import masked_rows_axpy_, masked_rows_dot

    g, wt, mask = torch.randn(2, 6), torch.randn(3, 6), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="masked_rows_dot: g must be a contiguous CPU tensor"):
        masked_rows_dot(g.t().contiguous().t(), wt, mask)
    with pytest.raises(ValueError, match="needs float32 or float64 tensors of one dtype"):
        masked_rows_dot(g.double(), wt, mask)
    with pytest.raises(ValueError, match=r"masked_rows_dot: g \[B, O\], wt \[H, O\], mask bool \[B, H\]"):
        masked_rows_dot(g, wt, mask.t().contiguous())
    with pytest.raises(ValueError, match=r"masked_rows_axpy_: buf \[H, O\]"):
        masked_rows_axpy_(torch.zeros(3, 5), torch.randn(2, 3), g, mask)


@pytest.mark.parametrize("B", [1, 4], ids=lambda b: f"B{b}")
def test_torch_gather_paths_equal_reference(B, monkeypatch):
    """Without the C kernels (no compiler) the sparse backward runs torch gathers: still exact."""
    from sparsebptt.kernels.egru import cpu

    monkeypatch.setattr(cpu, "use_c_kernels", False)
    ref = run(make_egru(backend="torch"), 23, B, torch.float64, sb.FullBPTT())
    got = run(make_egru(), 23, B, torch.float64, sb.Checkpoint(every=6))
    for name in ref:
        assert_close(name, ref[name], got[name])


# ---- every exact strategy equals FullBPTT ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("T", [1, 2, 19], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("strategy", [
    sb.Checkpoint(every=1), sb.Checkpoint(every=7), sb.Revolve(slots=2), sb.Revolve(slots=5),
    sb.DoubleCheckpoint(outer=10, inner=3, outer_storage="host"),
    sb.DoubleCheckpoint.optimal(fast_slots=2, slow_slots=3, outer_storage="disk"),
], ids=lambda s: s.to_string())
def test_exact_strategies_equal_full_bptt(strategy, T, B, dtype):
    ref = run(make_egru(dtype), T, B, dtype, sb.FullBPTT())
    got = run(make_egru(dtype), T, B, dtype, strategy)
    for name in ref:
        assert_close(name, ref[name], got[name], dtype)


# ---- counters: activity and backward MACs fall with the threshold ------------------------------

def test_backward_macs_fall_with_activity():
    x = seeded(0, 40, 4, 16, dtype=torch.float32)
    rows = []
    for th in (-5.0, 0.0, 0.1, 0.3, 5.0):
        torch.manual_seed(0)
        cell = sb.cells.EGRU(16, 48, threshold_init=th, epsilon=0.1)
        with sb.trace() as t:
            y, _ = sb.scan(cell, x)
            y.sum().backward()
        rows.append((th, t.activity["EGRU"], t.forward_macs, t.backward_macs))
        if th == -5.0:  # every unit fires at every step: the dense GRU's MACs
            torch.manual_seed(0)
            gru = sb.cells.GRU(16, 48)
            with sb.trace() as tg:
                yg, _ = sb.scan(gru, x)
                yg.sum().backward()
    assert rows[0][1] == 1.0 and rows[-1][1] == 0.0
    assert rows[0][2] <= tg.forward_macs and rows[0][3] <= tg.backward_macs
    for (_, a0, f0, b0), (_, a1, f1, b1) in zip(rows, rows[1:]):
        assert a1 < a0 and f1 <= f0 and b1 <= b0, rows  # dense GEMMs above full_above(B) (issue 17)
    assert rows[2][3] < rows[1][3] and rows[3][3] < rows[2][3], rows  # below it the sparse products
    assert rows[-1][3] == 3 * 48 * 16 * 4 * 40  # no event: only dW_ih is left (x needs no gradient)


def test_event_statistics_match_trace():
    cell = make_egru(dtype=torch.float32, H=12, threshold_init=0.05)
    x = seeded(0, 25, 3, N_IN, dtype=torch.float32)
    with sb.trace() as t:
        sb.scan(cell, x)
    s = event_statistics(cell, x)["EGRU"]
    assert abs(s["activity"] - t.activity["EGRU"]) < 1e-6
    assert s["activity"] <= s["union_activity"] and s["activity"] <= s["backward_activity"]


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": -0.1}, r"EGRU: gamma \(pseudo-derivative dampening\) must be a number >= 0, got -0.1"),
    ({"epsilon": 0.0}, r"EGRU: epsilon \(pseudo-derivative width\) must be a number > 0, got 0.0"),
    ({"epsilon": True}, r"EGRU: epsilon .* got True"),
    ({"backend": "cuda"}, r"EGRU: unknown backend 'cuda'; valid backends are: auto, torch, cpu, triton"),
    ({"active_set": "rows"}, r"EGRU: unknown active_set 'rows'; valid values are: auto, union, sample"),
    ({"threshold_init": float("nan")}, r"EGRU: threshold_init must be finite, got nan"),
    ({"threshold_init": "gauss"}, r"EGRU: threshold_init must be a number .* got 'gauss'"),
    ({"threshold_init": "beta:1.5"}, r"EGRU: threshold_init 'beta:MEAN' needs 0 < MEAN < 1, got 'beta:1.5'"),
    ({"threshold_init": torch.zeros(3)}, r"EGRU: threshold_init as a tensor must hold 4 finite floats"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb.cells.EGRU(3, 4, **kwargs)


def test_backend_sparse_is_deprecated_cpu():
    with pytest.warns(DeprecationWarning, match="EGRU: backend 'sparse' is now called 'cpu'; use backend='cpu'"):
        cell = sb.cells.EGRU(3, 4, backend="sparse")
    assert cell.backend == "cpu" and cell.active_backend == "cpu" and cell.scan_segment is not None
    state = cell.initial_state(2)
    with pytest.warns(DeprecationWarning, match="egru_step: backend 'sparse' is now called 'cpu'"):
        egru_step(torch.randn(2, 3), state, *cell._params(), backend="sparse")


def test_bad_count_events_and_sizes():
    with pytest.raises(TypeError, match="EGRU: count_events must be a bool, got 1"):
        sb.cells.EGRU(3, 4, count_events=1)
    with pytest.raises(ValueError, match="EGRU: hidden_size must be a positive int, got 0"):
        sb.cells.EGRU(3, 0)


def test_threshold_init_forms():
    torch.manual_seed(0)
    assert torch.equal(sb.cells.EGRU(3, 4, threshold_init=0.2).threshold.data, torch.full((4,), 0.2))
    t = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(sb.cells.EGRU(3, 4, threshold_init=t).threshold.data, t)
    beta = sb.cells.EGRU(3, 2000, threshold_init="beta:0.2").threshold.data
    assert 0.0 < float(beta.min()) and float(beta.max()) < 1.0 and abs(float(beta.mean()) - 0.2) < 0.02


def test_regularizer_bad_arguments():
    cell = sb.cells.EGRU(3, 4)
    state = cell.initial_state(2)
    with pytest.raises(ValueError, match="no EGRU layer with count_events=True in EGRU"):
        sb.cells.activity_regularizer(cell, state, 5)
    counting = sb.cells.EGRU(3, 4, count_events=True)
    with pytest.raises(ValueError, match=r"target is an event rate per step in \[0, 1\], got 2"):
        sb.cells.activity_regularizer(counting, counting.initial_state(2), 5, target=2)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sb.cells.activity_regularizer(counting, counting.initial_state(2), 0)


# ---- tasks: the text corpus, training on digits-seq and the language model --------------------

def _pangrams(path, n=120):
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * n, encoding="utf-8")
    return path


def test_text_dataset_windows_and_entropy(tmp_path):
    import math

    from sparsebptt.data import CharText, get_dataset

    f = _pangrams(tmp_path / "p.txt")
    ds = get_dataset("text", 16, path=str(f))
    assert isinstance(ds, CharText) and ds.sequence_targets
    text = f.read_text()
    assert ds.vocab == sorted(set(text)) and ds.input_size == ds.num_classes == len(set(text))
    p = [text.count(c) / len(text) for c in set(text)]
    assert abs(ds.unigram_bits - -sum(q * math.log2(q) for q in p)) < 1e-12
    x, y = next(ds.batches("train", 5, seed=1))
    assert x.shape == (16, 5, ds.input_size) and x.dtype == torch.float32 and y.shape == (5, 16)
    assert torch.equal(x.argmax(-1)[1:], y.t()[:-1])  # the target is the next input
    assert ds.decode(y[0]) in text
    again = next(ds.batches("train", 5, seed=1))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    val = torch.cat([yv for _, yv in ds.batches("val", 4, seed=0)])
    assert val.shape == (ds.num_examples("val"), 16)
    assert ds.decode(val.flatten()) == text[len(text) - int(len(text) * 0.1) + 1:][:val.numel()]


def test_text_dataset_builtin_corpus_and_errors(tmp_path):
    from sparsebptt.data import CharText

    ds = CharText(64)
    assert ds.num_chars == 400_000 and ds.files == sorted(ds.files)
    assert all(f.endswith(".py") and not f.startswith("_") for f in ds.files)
    assert 3.5 < ds.unigram_bits < 5.5 and len(ds.vocab) <= 256
    with pytest.raises(ValueError, match="text: path .* is not a file"):
        CharText(8, path=str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match=r"text: the train split has 3 characters, fewer than T \+ 1 = 9"):
        CharText(8, path=str(tmp_path / "short.txt"), val_fraction=0.01)
    with pytest.raises(ValueError, match=r"text: val_fraction must be in \(0, 1\), got 0"):
        CharText(8, path=str(tmp_path / "short.txt"), val_fraction=0)


def test_cli_language_model_on_own_text(tmp_path, capsys):
    import json

    from sparsebptt import cli
    from sparsebptt.train import SEQUENCE_METRIC_KEYS

    f = _pangrams(tmp_path / "p.txt", 200)
    out = tmp_path / "lm"
    argv = ["train", "--model", "egru", "--text", str(f), "--T", "16", "--epochs", "3", "--hidden", "48",
            "--layers", "1", "--batch-size", "16", "--lr", "0.01", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert tuple(rows[0]) == SEQUENCE_METRIC_KEYS
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "text" and config["dataset_options"] == {"path": str(f)}
    from sparsebptt.data import CharText
    unigram = CharText(16, path=str(f)).unigram_bits
    assert rows[-1]["val_bpc"] < 0.5 * unigram and rows[-1]["val_bpc"] < rows[0]["val_bpc"]
    assert 0.0 < rows[-1]["activity"]["0:EGRU"] < 1.0 and rows[-1]["backward_macs"] > 0
    printed = capsys.readouterr().out
    assert "bits per character" in printed and "unigram entropy" in printed


def test_cli_egru_digits_seq_with_activity_regulariser(tmp_path):
    import json

    from sparsebptt import cli

    out = tmp_path / "run"
    argv = ["train", "--model", "egru", "--dataset", "digits-seq", "--T", "8", "--epochs", "1", "--hidden", "16",
            "--batch-size", "512", "--activity-reg", "0.5", "--activity-target", "0.1", "--threshold", "0.2",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["activity"]) == {"0:EGRU", "1:EGRU"}
    config = json.loads((out / "config.json").read_text())
    assert config["activity_reg"] == 0.5 and config["threshold"] == 0.2


def test_models_with_egru():
    from sparsebptt.train import SequenceModel, TrainConfig, build_model

    net = build_model(TrainConfig(model="egru", hidden=6, layers=2, activity_reg=1.0), 8, 10)
    x = seeded(0, 9, 3, 8, dtype=torch.float32)
    logits, aux = net(x, return_aux=True)
    assert logits.shape == (3, 10) and aux is not None and aux.requires_grad
    seq = build_model(TrainConfig(model="egru", hidden=6, layers=1), 8, 8, sequence=True)
    assert isinstance(seq, SequenceModel) and seq(x).shape == (3, 9, 8) and seq(x, return_aux=True)[1] is None


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "gru", "activity_reg": 0.1}, r"activity_reg needs model 'egru' .* got model 'gru'"),
    ({"model": "egru", "activity_target": 1.5}, r"activity_target must be a number in \[0, 1\], got 1.5"),
    ({"model": "egru", "threshold": -0.1}, r"threshold must be a number >= 0 for model 'egru'"),
])
def test_train_config_egru_checks(kwargs, match):
    from sparsebptt.train import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_cli_text_with_other_dataset_exits_2(tmp_path, capsys):
    from sparsebptt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "egru", "--dataset", "digits-seq", "--text", str(tmp_path / "a.txt"),
                  "--out", str(tmp_path / "never")])
    assert e.value.code == 2
    assert "--text trains the character language model" in capsys.readouterr().err
    from sparsebptt.train import TrainConfig, build_model

    with pytest.raises(ValueError, match="has a label per step; train it with a recurrent model"):
        build_model(TrainConfig(model="lif", dataset="text"), 8, 8, sequence=True)
