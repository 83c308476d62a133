"""Training checkpoints and `sparsebptt train --resume`: atomic files, exact continuation, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparsebptt import cli
from sparsebptt.train import TrainConfig, train
from sparsebptt.train import fit as fit_mod
from sparsebptt.train.runs import CHECKPOINT_FORMAT, RunError, load_checkpoint

# a few seconds on one CPU core; batch 128 gives 12 batches per epoch
SMALL = ["--T", "5", "--hidden", "12", "--batch-size", "128", "--no-progress"]


def _lines(folder):
    return (folder / "metrics.jsonl").read_text().splitlines()


def _without_seconds(folder):
    rows = [json.loads(line) for line in _lines(folder)]
    for r in rows:
        del r["seconds"]  # wall time: the one entry that may differ
    return rows


@pytest.mark.parametrize("strategy", ["full", "checkpoint:2"])
def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path, strategy, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", *SMALL, "--strategy", strategy, "--epochs", "3", "--out", str(a)]) == 0
    assert cli.main(["train", *SMALL, "--strategy", strategy, "--epochs", "1", "--out", str(b)]) == 0
    assert [json.loads(x)["epoch"] for x in _lines(b)] == [1]
    assert cli.main(["train", "--resume", str(b), "--epochs", "2", "--no-progress"]) == 0
    assert cli.main(["train", "--resume", str(b), "--epochs", "3", "--no-progress"]) == 0
    assert "resuming after epoch 2/3" in capsys.readouterr().out
    assert _without_seconds(a) == _without_seconds(b)
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"] == 3
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert json.loads((b / "config.json").read_text())["epochs"] == 3  # the run's new length


def test_checkpoint_holds_the_training_state(tmp_path):
    summary = train(TrainConfig(T=3, epochs=2, hidden=6, batch_size=512, seed=4), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["format"] == CHECKPOINT_FORMAT and ck["epoch"] == 2
    assert set(ck) >= {"model", "optimizer", "rng", "best_val_acc", "val_acc", "peak_stored_bytes",
                       "metrics", "batch_seed", "config", "strategy"}
    assert set(ck["rng"]) >= {"torch", "python", "numpy"}
    assert ck["best_val_acc"] == summary["best_val_acc"] and ck["config"]["seed"] == 4
    assert ck["metrics"] == _lines(tmp_path)
    assert ck["optimizer"]["state"]  # Adam moments are saved
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary file left


def test_resume_after_a_kill_before_the_first_checkpoint(tmp_path):
    config = TrainConfig(T=3, epochs=1, hidden=6, batch_size=512)
    train(config, tmp_path / "a", progress=False)
    b = tmp_path / "b"
    train(config, b, progress=False)
    os.remove(b / "checkpoint.pt")  # as if killed during epoch 1, with its line half written
    (b / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')
    summary = train(config, b, progress=False, resume=True)
    assert summary["resumed_from"] == 0 and summary["epochs_run"] == 1
    assert _without_seconds(tmp_path / "a") == _without_seconds(b)


def test_killed_mid_epoch_resumes_and_lists_each_epoch_once(tmp_path):
    run = tmp_path / "killed"
    argv = ["train", "--T", "20", "--hidden", "32", "--batch-size", "32", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "sparsebptt", *argv, "--epochs", "50", "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.005)
        time.sleep(0.05)  # inside a later epoch (or its checkpoint write): any point must resume
        assert proc.poll() is None  # killed mid-run, not after it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done = load_checkpoint(run / "checkpoint.pt")["epoch"]
    assert 1 <= done < 50
    total = done + 2
    assert cli.main([*argv, "--resume", str(run), "--epochs", str(total)]) == 0
    assert [json.loads(x)["epoch"] for x in _lines(run)] == list(range(1, total + 1))
    ref = tmp_path / "ref"
    assert cli.main([*argv, "--epochs", str(total), "--out", str(ref)]) == 0
    assert _without_seconds(ref) == _without_seconds(run)


def _fail_at(monkeypatch, epoch, batch):
    """Make the loss of (epoch, batch) NaN by patching the trainer's share_loss."""
    real = fit_mod.share_loss
    calls = {"n": 0}
    per_epoch = -(-1437 // 512)  # digits-spikes train split, batch 512

    def fake(logits, y, n_global, world, empty=False):
        loss, total = real(logits, y, n_global, world, empty)
        calls["n"] += 1
        if calls["n"] == (epoch - 1) * per_epoch + batch:
            return loss * float("nan"), total * float("nan")
        return loss, total

    monkeypatch.setattr(fit_mod, "share_loss", fake)


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = TrainConfig(T=3, epochs=3, hidden=6, batch_size=512)
    _fail_at(monkeypatch, epoch=2, batch=2)
    with pytest.raises(FloatingPointError, match=r"loss nan at epoch 2, batch 2/3; the checkpoint of epoch 1 "
                                                 r"is kept in .*checkpoint.pt; lower --lr"):
        train(config, tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 1 and len(_lines(tmp_path)) == 1
    for p in ck["model"].values():
        assert bool(torch.isfinite(p).all())


def test_cli_nan_loss_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    _fail_at(monkeypatch, epoch=1, batch=1)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--T", "3", "--hidden", "6", "--batch-size", "512", "--epochs", "2",
                  "--no-progress", "--out", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "loss nan at epoch 1, batch 1/3; no epoch had finished" in err


@pytest.mark.parametrize("extra,match", [
    (["--hidden", "16"], r"error: --hidden does not match the run in .*\(hidden: run has 12, given 16\); drop it"),
    (["--lr", "0.1", "--seed", "3"], r"error: --lr, --seed do not match the run .*lr: run has 0.002, given 0.1; "
                                     r"seed: run has 0, given 3"),
    (["--strategy", "revolve:2"], r"--strategy does not match .*strategy: run has 'full', given 'revolve:2'"),
    (["--epochs", "1"], r"error: the run in .* already finished 2 epochs; pass --epochs 2 or more"),
    (["--out", "elsewhere"], r"error: --resume continues the run in .*; drop --out 'elsewhere'"),
])
def test_resume_errors_are_one_line(tmp_path, capsys, extra, match):
    run = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--epochs", "2", "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(run), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("sparsebptt train: error: ")
    import re
    assert re.search(match, err), err
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_same_options_and_finished_run_is_fine(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--out", str(run)]) == 0
    before = _lines(run)
    assert cli.main(["train", "--resume", str(run), *SMALL, "--epochs", "1"]) == 0  # same values: allowed
    assert "nothing to do: the run in" in capsys.readouterr().out
    assert _lines(run) == before


@pytest.mark.parametrize("make,match", [
    (lambda p: None, r"is not a run folder: no such directory"),
    (lambda p: p.mkdir(), r"is not a run folder: it has no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), r"cannot read .*config.json"),
])
def test_resume_on_a_folder_that_is_not_a_run(tmp_path, capsys, make, match):
    folder = tmp_path / "x"
    make(folder)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(folder)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    import re
    assert re.search(match, err), err


def test_damaged_checkpoint_is_a_run_error(tmp_path):
    config = TrainConfig(T=3, epochs=1, hidden=6, batch_size=512)
    train(config, tmp_path, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(RunError, match="cannot read the training checkpoint .* damaged or not a sparsebptt"):
        train(config, tmp_path, progress=False, resume=True)
    with pytest.raises(RunError, match="cannot resume .* with another config \\(hidden: run has 6, given 7\\)"):
        train(TrainConfig(T=3, epochs=1, hidden=7, batch_size=512), tmp_path, progress=False, resume=True)


def test_existing_run_error_suggests_resume(tmp_path):
    config = TrainConfig(T=3, epochs=1, hidden=6, batch_size=512)
    train(config, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match=r"already holds metrics.jsonl; .* continue it with --resume"):
        train(config, tmp_path, progress=False)


def test_bad_device_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--epochs", "1", "--device", "tpu", "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown device 'tpu'; valid devices are: cpu, cuda, cuda:N" in err
    assert not (tmp_path / "r").exists()
