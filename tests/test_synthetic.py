"""Synthetic long-range tasks: `delayed-recall` and `adding` (sparsebptt.data.synthetic)."""
import pytest
import torch

from sparsebptt.data import DATASETS, Adding, DelayedRecall, get_dataset
from sparsebptt.train import TrainConfig, build_model, chrono_init_, train


@pytest.mark.parametrize("name,n_in,n_cls", [("delayed-recall", 16, 4), ("adding", 2, 2)])
def test_registered_shapes_dtypes(name, n_in, n_cls):
    assert name in DATASETS
    ds = get_dataset(name, 37, train_size=10, val_size=7)
    assert (ds.input_size, ds.num_classes) == (n_in, n_cls)
    for split, n in (("train", 10), ("val", 7)):
        batches = list(ds.batches(split, 4, seed=3))
        assert len(batches) == ds.num_batches(split, 4) == -(-n // 4)
        assert [len(y) for _, y in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
        for x, y in batches:
            assert x.shape == (37, len(y), n_in) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < n_cls


def test_delayed_recall_spikes_cue_and_noise():
    ds = DelayedRecall(300, num_classes=3, channels_per_class=5, cue_steps=6, cue_rate=1.0,
                       noise_rate=0.02, train_size=64)
    x, y = next(ds.batches("train", 64, seed=0))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    for b in range(64):
        group = slice(5 * int(y[b]), 5 * int(y[b]) + 5)
        assert bool((x[:6, b, group] == 1).all())  # cue_rate 1: the whole group fires
    rate = x[6:].mean()  # background after the cue
    assert 0.01 < float(rate) < 0.03
    late = DelayedRecall(300, num_classes=3, channels_per_class=5, cue_steps=6, cue_start=40,
                         noise_rate=0.0, train_size=8)
    x, y = next(late.batches("train", 8, seed=0))
    assert x[:40].sum() == 0 and x[46:].sum() == 0 and x[40:46].sum() == 8 * 6 * 5


def test_label_is_determined_by_the_cue():
    """The class group that fires most in the cue window recovers every label; the steps after the
    cue (pure noise) carry no information about it."""
    ds = DelayedRecall(500, cue_steps=10, cue_rate=0.6, noise_rate=0.01, train_size=256)
    x, y = next(ds.batches("train", 256, seed=1))
    per_group = x[:10].sum(0).view(256, 4, 4).sum(-1)  # [B, K] spikes per class group in the cue
    assert torch.equal(per_group.argmax(-1), y)
    late = x[10:].sum(0).view(256, 4, 4).sum(-1)  # the delay: pure noise
    assert float((late.argmax(-1) == y).float().mean()) < 0.45  # about chance (0.25)


def test_adding_label_is_the_binned_sum_of_marked_values():
    ds = Adding(101, num_classes=4, train_size=400)
    x, y = next(ds.batches("train", 400, seed=2))
    marks = x[:, :, 1]  # [T, B]
    assert torch.equal(marks.sum(0), torch.full((400,), 2.0))
    first, second = marks[:50].argmax(0), 50 + marks[50:].argmax(0)  # one mark in each half
    assert bool((marks[:50].sum(0) == 1).all() and (marks[50:].sum(0) == 1).all())
    s = x[first, torch.arange(400), 0] + x[second, torch.arange(400), 0]
    assert torch.equal(torch.bucketize(s, ds.edges), y)
    assert torch.allclose(ds.edges, torch.tensor([2 ** -0.5, 1.0, 2 - 2 ** -0.5]))
    counts = torch.bincount(y, minlength=4)  # equal-probability bins: balanced classes
    assert int(counts.min()) > 60


@pytest.mark.parametrize("name", ["delayed-recall", "adding"])
def test_reproducible_and_seeded(name):
    ds = get_dataset(name, 50, train_size=9, val_size=5)
    a = list(ds.batches("train", 4, seed=11))
    b = list(ds.batches("train", 4, seed=11))
    c = list(ds.batches("train", 4, seed=12))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # an example depends on its seed only, not on the batch size; val ignores the batch seed
    whole = torch.cat([x for x, _ in ds.batches("train", 9, seed=11)], 1)
    assert torch.equal(whole, torch.cat([x for x, _ in a], 1))
    v1 = torch.cat([x for x, _ in ds.batches("val", 2, seed=1)], 1)
    v2 = torch.cat([x for x, _ in ds.batches("val", 5, seed=99)], 1)
    assert torch.equal(v1, v2)
    assert torch.equal(ds.labels("val"), torch.cat([y for _, y in ds.batches("val", 5, seed=0)]))
    assert not torch.equal(v1, torch.cat([x for x, _ in ds.batches("train", 5, seed=0)], 1)[:, :5])
    other = get_dataset(name, 50, train_size=9, val_size=5, val_seed=1)
    assert not torch.equal(v1, torch.cat([x for x, _ in other.batches("val", 5, seed=0)], 1))


def test_long_T_holds_one_batch_only():
    ds = DelayedRecall(100_000, train_size=3)
    x, y = next(ds.batches("train", 2, seed=0))
    assert x.shape == (100_000, 2, 16)
    assert 0.005 < float(x[10:].mean()) < 0.015


@pytest.mark.parametrize("cls,kwargs,match", [
    (DelayedRecall, {"T": 0}, "delayed-recall: T must be a positive int, got 0"),
    (DelayedRecall, {"T": 10}, r"T must be larger than cue_start \+ cue_steps = 10 .* got T=10"),
    (DelayedRecall, {"T": 50, "cue_start": 45}, r"cue_start \+ cue_steps = 55 .* got T=50"),
    (DelayedRecall, {"T": 50, "cue_start": -1}, "cue_start must be an int >= 0, got -1"),
    (DelayedRecall, {"T": 50, "num_classes": 1}, "num_classes must be >= 2, got 1"),
    (DelayedRecall, {"T": 50, "channels_per_class": 0}, "channels_per_class must be a positive int, got 0"),
    (DelayedRecall, {"T": 50, "cue_rate": 0.0}, r"cue_rate .* must be in \(0, 1\], got 0.0"),
    (DelayedRecall, {"T": 50, "noise_rate": 1.5}, r"noise_rate .* must be in \[0, 1\], got 1.5"),
    (DelayedRecall, {"T": 50, "train_size": 0}, "train_size must be a positive int, got 0"),
    (DelayedRecall, {"T": 50, "val_seed": 1.5}, "val_seed must be an int, got 1.5"),
    (Adding, {"T": 1}, r"adding: T must be >= 2 \(one marker in each half\), got 1"),
    (Adding, {"T": 10, "num_classes": 1}, "adding: num_classes must be >= 2, got 1"),
])
def test_bad_options(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_unknown_option_split_and_batch_size():
    with pytest.raises(TypeError, match="unexpected keyword argument 'cue_lenght'"):
        get_dataset("delayed-recall", 50, cue_lenght=3)
    ds = Adding(20)
    with pytest.raises(ValueError, match="adding: unknown split 'test'; valid splits are: train, val"):
        next(ds.batches("test", 4, seed=0))
    with pytest.raises(ValueError, match="adding: batch_size must be a positive int, got 0"):
        next(ds.batches("train", 0, seed=0))
    with pytest.raises(TypeError, match="adding: seed must be an int, got float"):
        next(ds.batches("train", 4, seed=1.0))


# ---- the trainer's chrono gate initialisation (for long-range tasks) -------------------------

@pytest.mark.parametrize("model,gates", [("gru", 3), ("lstm", 4), ("delta-gru", 3)])
def test_chrono_init_spreads_memory_time_scales(model, gates):
    torch.manual_seed(0)
    net = build_model(TrainConfig(model=model, hidden=40, layers=2, T=1000, gate_init="chrono"), 5, 3)
    for layer in net.cell.layers:
        b = (layer.bias_ih[40:80] + layer.bias_hh[40:80]).detach()  # GRU update gate z / LSTM forget gate f
        assert float(b.min()) >= 0.0 and float(b.max()) <= torch.log(torch.tensor(999.0)) + 1e-6
        assert float(b.max()) > 5.0  # some units keep their state for hundreds of steps
        if gates == 4:
            torch.testing.assert_close((layer.bias_ih[:40] + layer.bias_hh[:40]).detach(), -b)


def test_chrono_init_errors():
    with pytest.raises(ValueError, match="gate_init='chrono' needs a gated model"):
        TrainConfig(model="lif", gate_init="chrono")
    with pytest.raises(ValueError, match="unknown gate_init 'zeros'; valid gate inits are: uniform, chrono"):
        TrainConfig(model="gru", gate_init="zeros")
    import sparsebptt as sb

    with pytest.raises(ValueError, match="LIF has no gate biases"):
        chrono_init_(sb.cells.LIF(3, 4), 100)


def test_train_runs_on_delayed_recall_with_dataset_options(tmp_path):
    cfg = TrainConfig(dataset="delayed-recall", model="gru", layers=1, hidden=8, T=30, epochs=1,
                      batch_size=512, gate_init="chrono", strategy="skipper:8,2",
                      dataset_options={"train_size": 40, "val_size": 24, "cue_start": 5})
    with open(tmp_path / "log.txt", "w") as log:
        summary = train(cfg, tmp_path / "run", progress=False, log=log)
    assert 0.0 <= summary["val_acc"] <= 1.0 and summary["approximate_gradient"] is True
    assert "40 train / 24 val" in (tmp_path / "log.txt").read_text()
    with pytest.raises(ValueError, match="dataset_options must be a dict"):
        TrainConfig(dataset_options=[("cue_start", 5)])


def test_cli_layers_and_gate_init(tmp_path, capsys):
    from sparsebptt import cli

    assert cli.main(["train", "--dataset", "delayed-recall", "--model", "gru", "--layers", "1",
                     "--gate-init", "chrono", "--T", "20", "--epochs", "1", "--hidden", "4",
                     "--batch-size", "512", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    cfg = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["layers"], cfg["gate_init"], cfg["dataset"]) == (1, "chrono", "delayed-recall")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--gate-init", "chrono", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "gate_init='chrono' needs a gated model" in capsys.readouterr().err


def test_slow_sines_is_slow_and_labelled_by_frequency():
    from sparsebptt.data import get_dataset

    ds = get_dataset("slow-sines", 400, noise=0.0)
    x, y = next(ds.batches("train", 16, seed=0))
    assert x.shape == (400, 16, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (x[1:] - x[:-1]).abs().max() <= 2 * 3.1416 * 4 / 400 + 1e-5  # slowly varying
    for b in range(16):  # zero crossings per channel = 2 * cycles
        s = torch.sign(x[:, b, 0])
        crossings = int((s[1:] != s[:-1]).sum())
        assert abs(crossings - 2 * (1 + int(y[b]))) <= 1
    x2, y2 = next(ds.batches("train", 16, seed=0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_slow_sines_bad_options():
    from sparsebptt.data import get_dataset

    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        get_dataset("slow-sines", 100, num_classes=1)
    with pytest.raises(ValueError, match="noise must be a standard deviation >= 0"):
        get_dataset("slow-sines", 100, noise=-1)
