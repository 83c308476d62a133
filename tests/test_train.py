"""Data, trainer and command line: `sparsebptt.data`, `sparsebptt.train`, `sparsebptt.cli`."""
import json
import re
import subprocess
import sys

import pytest
import torch

import sparsebptt as sb
from sparsebptt import cli
from sparsebptt.data import DATASETS, DigitsSpikes, get_dataset
from sparsebptt.train import METRIC_KEYS, TrainConfig, build_model, train

# a run small enough for a few seconds on one CPU core
TINY = ["--T", "4", "--epochs", "1", "--hidden", "8", "--batch-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits-spikes", 7)


# ---- data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,shuffle", [("train", None), ("val", None), ("train", False)])
def test_digits_batches_shapes_dtypes_values(digits, split, shuffle):
    batches = list(digits.batches(split, 50, seed=3, shuffle=shuffle))
    n = digits.num_examples(split)
    assert len(batches) == digits.num_batches(split, 50) == -(-n // 50)
    for i, (x, y) in enumerate(batches):
        b = 50 if i < len(batches) - 1 else n - 50 * (len(batches) - 1)
        assert x.shape == (7, b, 64) and x.dtype == torch.float32
        assert y.shape == (b,) and y.dtype == torch.int64
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        assert 0 <= int(y.min()) and int(y.max()) <= 9
    labels = torch.cat([y for _, y in batches])
    assert labels.numel() == n


def test_digits_split_is_stratified_and_disjoint(digits):
    assert digits.num_examples("train") + digits.num_examples("val") == 1797
    assert digits.num_examples("val") == 360  # 20 %
    counts = torch.bincount(digits.labels("val"), minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    both = torch.cat([digits.indices["train"], digits.indices["val"]])
    assert torch.equal(both.sort().values, torch.arange(1797))  # disjoint and complete
    assert torch.equal(DigitsSpikes(T=2).indices["val"], digits.indices["val"])  # fixed split


def test_digits_rate_follows_pixel_intensity():
    ds = DigitsSpikes(T=400, max_rate=0.5)
    x, _ = next(ds.batches("val", 8, seed=0))
    rate = x.mean(0)  # [B, 64]
    expected = ds.features("val")[:8] * 0.5
    assert float((rate - expected).abs().max()) < 0.1
    assert bool((rate[expected == 0] == 0).all())  # dark pixels never fire


def test_digits_same_seed_same_batches(digits):
    a = list(digits.batches("train", 64, seed=11))
    b = list(digits.batches("train", 64, seed=11))
    c = list(digits.batches("train", 64, seed=12))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])  # another order
    assert not torch.equal(a[0][0], c[0][0])  # other spikes


def test_val_batches_keep_order(digits):
    y1 = torch.cat([y for _, y in digits.batches("val", 100, seed=1)])
    y2 = torch.cat([y for _, y in digits.batches("val", 100, seed=2)])
    assert torch.equal(y1, y2) and torch.equal(y1, digits.labels("val"))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; valid datasets are: .*digits-spikes"):
        get_dataset("mnist", 10)
    assert "digits-spikes" in DATASETS


@pytest.mark.parametrize("kwargs,match", [
    ({"T": 0}, "T must be a positive int, got 0"),
    ({"T": 5, "max_rate": 1.5}, r"max_rate .* must be in \(0, 1\], got 1.5"),
    ({"T": 5, "val_fraction": 1.0}, r"val_fraction must be in \(0, 1\), got 1.0"),
])
def test_digits_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsSpikes(**kwargs)


def test_bad_split_and_batch_size(digits):
    with pytest.raises(ValueError, match="unknown split 'test'; valid splits are: train, val"):
        next(digits.batches("test", 8, seed=0))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(digits.batches("train", 0, seed=0))


# ---- model and trainer -----------------------------------------------------------------------

def test_build_model_shapes_and_strategies_agree(digits):
    x, y = next(digits.batches("train", 16, seed=0))
    losses, grads = {}, {}
    for s in ("full", "checkpoint:3", "revolve:2"):
        torch.manual_seed(0)
        model = build_model(TrainConfig(hidden=12, strategy=s), 64, 10)
        assert isinstance(model.cell, sb.cells.Stack) and len(model.cell.layers) == 2
        logits = model(x)
        assert logits.shape == (16, 10) and logits.dtype == torch.float32
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        losses[s] = loss.detach()
        grads[s] = [p.grad for p in model.parameters()]
    for s in ("checkpoint:3", "revolve:2"):
        torch.testing.assert_close(losses[s], losses["full"])
        for gf, gs in zip(grads["full"], grads[s]):
            torch.testing.assert_close(gs, gf)


def _attributes(model):
    """Every module's own attributes (what a forward must not change: no state hidden in a module)."""
    return [(name, dict(vars(m))) for name, m in model.named_modules()]


@pytest.mark.parametrize("model,sequence", [("lif", False), ("gru", False), ("egru", False), ("egru", True)])
def test_models_are_recurrent_layers_and_return_the_aux_loss(model, sequence):
    torch.manual_seed(0)
    reg = 0.7 if model == "egru" else 0.0
    net = build_model(TrainConfig(model=model, hidden=6, layers=2, activity_reg=reg, strategy="checkpoint:3"),
                      8, 5, sequence=sequence)
    assert isinstance(net.recurrent, sb.Recurrent) and net.cell is net.recurrent.cell
    assert net.strategy == sb.Checkpoint(every=3) == net.recurrent.strategy
    x = torch.rand(9, 3, 8)
    before = _attributes(net)
    logits, aux = net(x, return_aux=True)
    after = _attributes(net)
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, a), (_, b) in zip(before, after):
        assert a.keys() == b.keys() and all(a[k] is b[k] for k in a), f"forward changed {name or 'the model'}"
    assert not hasattr(net, "aux_loss")
    torch.testing.assert_close(net(x), logits)  # return_aux only adds the second value
    assert logits.shape == ((3, 9, 5) if sequence else (3, 5))
    if model != "egru":
        assert aux is None
        return
    _, state = sb.scan(net.cell, x, strategy=sb.Checkpoint(every=3), reduce=None if sequence else "mean")
    torch.testing.assert_close(aux, reg * sb.cells.activity_regularizer(net.cell, state, 9, 0.05))
    (logits.sum() + aux).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.strategy = "revolve:2"  # the trainer sets the planned (or resumed) strategy
    assert net.recurrent.strategy == sb.Revolve(slots=2)


def test_models_load_state_dicts_written_before_the_recurrent_layer():
    """Checkpoints of earlier versions name the stack ``cell.*``; they load into ``recurrent.cell.*``."""
    torch.manual_seed(0)
    net = build_model(TrainConfig(hidden=6), 64, 10)
    old = {k.replace("recurrent.cell.", "cell."): v.clone() + 0.5 for k, v in net.state_dict().items()}
    assert any(k.startswith("cell.layers.0.") for k in old)
    fresh = build_model(TrainConfig(hidden=6), 64, 10)
    fresh.load_state_dict(old)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, old[k.replace("recurrent.cell.", "cell.")])


@pytest.mark.parametrize("kwargs,match", [
    ({"epochs": 0}, "TrainConfig: epochs must be a positive int, got 0"),
    ({"hidden": 2.5}, "TrainConfig: hidden must be a positive int, got 2.5"),
    ({"lr": 0.0}, "TrainConfig: lr must be a positive number, got 0.0"),
    ({"threads": 0}, "TrainConfig: threads must be a positive int, got 0"),
])
def test_train_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_bad_strategy_and_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown strategy 'nope'; valid forms are"):
        train(TrainConfig(strategy="nope"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown dataset .imagenet.; valid datasets are: .*digits-spikes"):
        train(TrainConfig(dataset="imagenet"), tmp_path, progress=False)


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "2", "--strategy", "checkpoint:2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == "checkpoint:2" and config["T"] == 4 and config["epochs"] == 2
    assert config["dataset"] == "digits-spikes" and config["seed"] == 0
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert tuple(r) == METRIC_KEYS
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
        assert r["train_loss"] > 0 and r["seconds"] > 0 and r["peak_stored_bytes"] > 0
    printed = capsys.readouterr().out
    assert "val_acc" in printed and "peak stored" in printed


def test_train_is_reproducible(tmp_path):
    config = TrainConfig(T=4, epochs=1, hidden=8, batch_size=256, seed=5)
    a = train(config, tmp_path / "a", progress=False)
    b = train(config, tmp_path / "b", progress=False)
    ra, rb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for r in ra + rb:
        del r["seconds"]
    assert ra == rb and a["val_acc"] == b["val_acc"]


def test_train_restores_thread_count(tmp_path):
    before = torch.get_num_threads()
    train(TrainConfig(T=2, epochs=1, hidden=4, batch_size=512, threads=1), tmp_path, progress=False)
    assert torch.get_num_threads() == before


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--out", str(tmp_path)]) == 0
    with pytest.raises(FileExistsError, match="already holds metrics.jsonl"):
        train(TrainConfig(T=4, epochs=1), tmp_path, progress=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *TINY, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "already holds metrics.jsonl" in capsys.readouterr().err


# ---- command line errors ---------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--strategy", "bogus:3"], r"argument --strategy: unknown strategy 'bogus:3'; valid forms are: .*checkpoint"),
    (["--strategy", "checkpoint:x"], r"argument --strategy: cannot parse strategy 'checkpoint:x'"),
    (["--strategy", "revolve:0"], r"argument --strategy: .*slots must be a positive int, got 0"),
    (["--dataset", "mnist"], r"argument --dataset: invalid choice: 'mnist' \(choose from .*digits-spikes"),
    (["--T", "0"], r"argument --T: expected a positive integer, got 0"),
    (["--lr", "-1"], r"argument --lr: expected a positive number, got '-1'"),
    (["--epochs", "two"], r"argument --epochs: expected a positive integer, got 'two'"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
])
def test_cli_usage_errors_exit_2_without_traceback(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv, "--out", str(tmp_path / "never")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "never").exists()


def test_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_python_m_help():
    r = subprocess.run([sys.executable, "-m", "sparsebptt", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: sparsebptt" in r.stdout and "train" in r.stdout


def test_python_m_train_help():
    r = subprocess.run([sys.executable, "-m", "sparsebptt", "train", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--dataset", "--T", "--epochs", "--batch-size", "--hidden", "--lr", "--strategy",
                 "--seed", "--out"):
        assert flag in r.stdout
