"""sb.fit: any model on any Dataset of (x (T, ...), label), with the CLI trainer's run folder,
metrics, checkpoints, resume and guards."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt import cli
from sparsebptt.train import METRIC_KEYS, collate_time_major
from sparsebptt.train import fit as fit_mod
from sparsebptt.train.runs import RunError, load_checkpoint

T, F, CLASSES = 12, 10, 3


class EventFrames(torch.utils.data.Dataset):
    """A tonic-style dataset: (frames (T, F) int16 event counts as numpy, int label); class c fires
    mostly on features c, c + 3, ..."""

    def __init__(self, n, seed):
        g = np.random.default_rng(seed)
        self.labels = g.integers(0, CLASSES, n)
        rate = np.full((n, F), 0.05)
        for i, c in enumerate(self.labels):
            rate[i, c::CLASSES] = 0.6
        self.frames = (g.random((n, T, F)) < rate[:, None, :]).astype(np.int16)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.frames[i], int(self.labels[i])


def _model(strategy=None, seed=0):
    torch.manual_seed(seed)
    stack = sb.cells.Stack([sb.cells.LIF(F, 16), sb.cells.LIF(16, 16)])
    return nn.Sequential(sb.Recurrent(stack, strategy=strategy, reduce="mean", return_state=False),
                         nn.Linear(16, CLASSES))


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_seconds(run):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in _lines(run)]


def _fit(model, out, **kw):
    kw = {"epochs": 3, "batch_size": 16, "lr": 5e-3, "progress": False, "log": open("/dev/null", "w"), **kw}
    return sb.fit(model, EventFrames(96, 0), EventFrames(48, 1), out=out, **kw)


def test_fit_trains_a_users_dataset_into_a_run_folder(tmp_path):
    run = tmp_path / "run"
    result = _fit(_model(), run, epochs=4)
    assert {"config.json", "metrics.jsonl", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    rows = _lines(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(set(r) == set(METRIC_KEYS) for r in rows)
    assert result["val_acc"] == rows[-1]["val_acc"] >= 0.6  # chance is 1/3: it learns
    assert result["epochs_run"] == 4 and result["train_loss"] == rows[-1]["train_loss"]
    assert rows[0]["activity"] and rows[0]["peak_stored_bytes"] > 0
    meta = json.loads((run / "config.json").read_text())
    assert meta["fit"]["dataset"] == "EventFrames" and meta["model"] == "Sequential" and meta["strategy"] == "full"
    assert meta["fit"]["T"] == T and meta["fit"]["input_shape"] == [F]
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 4


def test_fit_is_reproducible_and_exact_strategies_give_the_same_run(tmp_path):
    a = _fit(_model(), tmp_path / "a")
    b = _fit(_model(), tmp_path / "b", strategy="checkpoint:5")
    c = _fit(_model(strategy="revolve:2"), tmp_path / "c")  # the layer's own strategy, kept
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "peak_stored_bytes")}  # noqa: E731
                          for r in rows]
    assert strip(_lines(tmp_path / "a")) == strip(_lines(tmp_path / "b")) == strip(_lines(tmp_path / "c"))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["strategy"] == "checkpoint:5"
    assert json.loads((tmp_path / "c" / "config.json").read_text())["strategy"] == "revolve:2"
    assert _lines(tmp_path / "b")[0]["peak_stored_bytes"] < _lines(tmp_path / "a")[0]["peak_stored_bytes"]
    assert a["val_acc"] == b["val_acc"] == c["val_acc"]


def test_strategy_and_budget_reach_every_recurrent_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(sb.Recurrent(sb.cells.LIF(F, 8), return_state=False),
                          sb.Recurrent(sb.cells.LIF(8, 8), strategy="revolve:3", reduce="sum", return_state=False),
                          nn.Linear(8, CLASSES))
    _fit(model, tmp_path / "a", epochs=1, strategy="checkpoint:4")
    assert [m.strategy.to_string() for m in model if isinstance(m, sb.Recurrent)] == ["checkpoint:4"] * 2
    _fit(model, tmp_path / "b", epochs=1, memory_budget="1MiB")
    assert all(m.memory_budget == 2**20 and m.plans for m in model if isinstance(m, sb.Recurrent))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["strategy"] == "memory_budget:1.0 MiB"


def test_resume_after_a_kill_lists_each_epoch_once(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    _fit(_model(), ref, epochs=3)
    run = tmp_path / "run"
    real = fit_mod._save_epoch

    def killed_in_epoch_2(metrics, out, epoch, *args, **kwargs):
        if epoch == 2:  # the metrics line written, the checkpoint not: as a kill between them
            metrics.write('{"epoch": 2, "train_lo')
            metrics.flush()
            raise KeyboardInterrupt
        return real(metrics, out, epoch, *args, **kwargs)

    monkeypatch.setattr(fit_mod, "_save_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), run, epochs=3)
    monkeypatch.setattr(fit_mod, "_save_epoch", real)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    result = _fit(_model(seed=5), run, epochs=3, resume=True)  # weights come from the checkpoint
    assert result["resumed_from"] == 1 and result["epochs_run"] == 2
    assert [r["epoch"] for r in _lines(run)] == [1, 2, 3]
    assert _without_seconds(run) == _without_seconds(ref)
    more = _fit(_model(), run, epochs=4, resume=True)  # a larger epochs trains longer
    assert more["epochs_run"] == 1 and [r["epoch"] for r in _lines(run)] == [1, 2, 3, 4]


def test_resume_checks_the_arguments(tmp_path, capsys):
    run = tmp_path / "run"
    _fit(_model(), run, epochs=1)
    with pytest.raises(RunError, match=r"cannot resume .* with other arguments \(lr: run has 0.005, given 0.01\)"):
        _fit(_model(), run, epochs=2, lr=1e-2, resume=True)
    with pytest.raises(FileExistsError, match=r"already holds metrics.jsonl"):
        _fit(_model(), run, epochs=2)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(run)])
    assert e.value.code == 2 and "was written by sb.fit" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    class Poisoned(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = _model(), 0

        def forward(self, x):
            self.calls += self.training
            out = self.inner(x)
            return out * float("nan") if self.calls == 8 else out  # epoch 2 (6 batches per epoch), batch 2

    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss nan at epoch 2, batch 2/6; the checkpoint of epoch 1 is kept"):
        _fit(Poisoned(), run, epochs=3)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1 and len(_lines(run)) == 1


def test_without_val_the_accuracy_is_nan(tmp_path):
    result = sb.fit(_model(), EventFrames(32, 0), epochs=1, batch_size=16, out=tmp_path / "r", progress=False,
                    log=open("/dev/null", "w"))
    assert math.isnan(result["val_acc"]) and result["train_acc"] > 0


def test_collate_time_major():
    items = [(np.ones((4, 2, 3), dtype=np.int16) * i, i) for i in range(5)]
    x, y = collate_time_major(items)
    assert x.shape == (4, 5, 2, 3) and x.dtype == torch.get_default_dtype()
    assert torch.equal(x[:, 3], 3 * torch.ones(4, 2, 3))
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("call,exc,match", [
    (lambda p: collate_time_major([(np.ones((4, 3)), 0), (np.ones((5, 3)), 1)]), ValueError,
     r"examples of one batch have different shapes, \(4, 3\) and \(5, 3\) \(T, \.\.\.\); give every example the "
     r"same T \(tonic: ToFrame"),
    (lambda p: collate_time_major([np.ones((4, 3))]), ValueError, r"a dataset item must be \(x, label\)"),
    (lambda p: collate_time_major([(np.ones(4), 0)]), ValueError, r"x must be shaped \(T, features\.\.\.\)"),
    (lambda p: sb.fit(_model(), [1, 2], epochs=1, out=p), ValueError, r"a dataset item must be \(x, label\)"),
    (lambda p: sb.fit(_model(), 5, epochs=1, out=p), TypeError, r"train must be a map-style"),
    (lambda p: sb.fit("model", EventFrames(4, 0), epochs=1, out=p), TypeError, r"model must be an nn.Module"),
    (lambda p: sb.fit(_model(), EventFrames(4, 0), epochs=0, out=p), ValueError, r"epochs must be a positive int"),
    (lambda p: sb.fit(_model(), EventFrames(4, 0), epochs=1, strategy="checkpoint:0", out=p), ValueError,
     r"Checkpoint: every must be a positive int, got 0"),
    (lambda p: sb.fit(_model(), EventFrames(4, 0), epochs=1, strategy="full", memory_budget="1MiB", out=p),
     ValueError, r"give strategy or memory_budget, not both"),
    (lambda p: sb.fit(nn.Linear(F, 3), EventFrames(4, 0), epochs=1, strategy="full", out=p), ValueError,
     r"strategy='full' applies to the sb.Recurrent layers of the model, and Linear has none"),
    (lambda p: sb.fit(_model(), EventFrames(4, 0), epochs=1, resume=True), ValueError,
     r"resume=True needs the run folder"),
], ids=["ragged-T", "not-a-pair", "no-time-axis", "list-items", "not-a-dataset", "not-a-model", "epochs-0",
        "bad-strategy", "strategy-and-budget", "no-recurrent", "resume-without-out"])
def test_fit_bad_input(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path / "run")


def test_the_example_script_trains_and_exports(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fit_event_frames.py"
    spec = importlib.util.spec_from_file_location("fit_event_frames", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--epochs", "2", "--T", "10", "--out", str(tmp_path / "ex")])
    assert result["epochs_run"] == 2 and (tmp_path / "ex" / "model.nir").is_file()
    model = sb.import_nir(tmp_path / "ex" / "model.nir")
    assert isinstance(model[0], sb.Recurrent) and model[0].reduce == "sum"


def test_fit_killed_by_sigkill_resumes_with_each_epoch_once(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run, ref = tmp_path / "killed", tmp_path / "ref"
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import sparsebptt as sb\n"
        "from test_fit import EventFrames, _model\n"
        "sb.fit(_model(), EventFrames(96, 0), EventFrames(48, 1), epochs=int(sys.argv[2]), batch_size=16, lr=5e-3,\n"
        "       out=sys.argv[1], resume=sys.argv[3] == '1', progress=False)\n")
    proc = subprocess.Popen([sys.executable, str(script), str(run), "200", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.005)
        time.sleep(0.05)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done = load_checkpoint(run / "checkpoint.pt")["epoch"]
    total = done + 2
    for folder, resume in ((run, "1"), (ref, "0")):
        r = subprocess.run([sys.executable, str(script), str(folder), str(total), resume], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert [row["epoch"] for row in _lines(run)] == list(range(1, total + 1))
    assert _without_seconds(run) == _without_seconds(ref)
