"""The trainer's guards (issue 16): non-finite gradients, parameters and optimizer state stop the run
and never reach a checkpoint; damaged checkpoints are refused; a full disk is one line that names the
file and the bytes; killed runs leave nothing that is not cleaned; Ctrl-C / SIGTERM are one line;
an impossible --lr is refused; "auto" without C kernels says so."""
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sparsebptt import cli
from sparsebptt.kernels import backend as backend_mod
from sparsebptt.planner import parse_bytes
from sparsebptt.train import TrainConfig, train
from sparsebptt.train import fit as fit_mod
from sparsebptt.train.config import LR_MAX
from sparsebptt.train.runs import (CHECKPOINT_FORMAT, RunError, RunWriteError, atomic_write, load_checkpoint,
                                   save_checkpoint, state_digest)

# digits-spikes' train split (1437 examples) in batches of 512: 3 batches per epoch, ~1 s per epoch
CONFIG = dict(T=3, hidden=6, batch_size=512)
SMALL = ["--T", "3", "--hidden", "6", "--batch-size", "512", "--no-progress"]


def _one_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err


def _finite(ck) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in ck["model"].values())


class _NanGrad(torch.autograd.Function):
    """The identity forward; a NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan_grads_at(monkeypatch, epoch, batch, per_epoch=3):
    real = fit_mod.share_loss
    calls = {"n": 0}

    def fake(logits, y, n_global, world, empty=False):
        calls["n"] += 1
        if calls["n"] == (epoch - 1) * per_epoch + batch:
            logits = _NanGrad.apply(logits)
        return real(logits, y, n_global, world, empty)

    monkeypatch.setattr(fit_mod, "share_loss", fake)


# ---- item 6: non-finite gradients, parameters, optimizer state -----------------------------------

def test_nan_in_lif_weights_that_never_shows_in_the_loss_stops_the_run(tmp_path, monkeypatch):
    """NaN membranes do not spike: a NaN gradient of the first LIF layer's weights left the loss finite
    and the run 'done' with NaN weights in its checkpoint. Now the step is refused and named."""
    real = fit_mod.build_model
    calls = {"n": 0}

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        w = next(p for n, p in model.named_parameters() if "layers.0" in n and p.dim() == 2)

        def poison(g):
            calls["n"] += 1
            return g * float("nan") if calls["n"] == 2 else g  # epoch 1, batch 2
        w.register_hook(poison)
        return model

    monkeypatch.setattr(fit_mod, "build_model", build)
    with pytest.raises(FloatingPointError, match=r"training diverged: the gradient of recurrent\.cell\.layers\.0\.\w+ "
                                                 r"holds NaN or infinity \(the loss, [0-9.]+, is finite\) at epoch 1, "
                                                 r"batch 2/3; no epoch had finished, so there is no checkpoint"):
        train(TrainConfig(**CONFIG, epochs=2), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_nan_gradients_on_an_epochs_last_batch_keep_the_finite_checkpoint(tmp_path, monkeypatch):
    """The poisoned epoch-2 checkpoint was saved, and the later NaN-loss stop called it the one kept."""
    _nan_grads_at(monkeypatch, epoch=2, batch=3)
    with pytest.raises(FloatingPointError, match=r"the gradient of .* holds NaN or infinity .* at epoch 2, batch 3/3; "
                                                 r"the checkpoint of epoch 1 is kept in .*checkpoint\.pt; lower --lr"):
        train(TrainConfig(**CONFIG, epochs=3), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 1 and _finite(ck)


def _poison_adam(monkeypatch, at_step, where):
    """After Adam's ``at_step``-th step, put NaN into a parameter or inf into its second moment."""
    real = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_step:
            p = self.param_groups[0]["params"][0]
            with torch.no_grad():
                if where == "param":
                    p.view(-1)[0] = float("nan")
                else:
                    self.state[p]["exp_avg_sq"].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_a_step_that_makes_parameters_nan_stops_naming_the_batch(tmp_path, monkeypatch):
    _poison_adam(monkeypatch, at_step=5, where="param")  # epoch 2, batch 2
    with pytest.raises(FloatingPointError, match=r"the optimizer step made \S+ NaN or infinite at epoch 2, batch 2/3; "
                                                 r"the checkpoint of epoch 1 is kept"):
        train(TrainConfig(**CONFIG, epochs=3), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 1 and _finite(ck)


def test_non_finite_optimizer_state_is_never_checkpointed(tmp_path, monkeypatch):
    """Finite loss, gradients and parameters, but an infinite Adam moment: the epoch's checkpoint
    is not written and the finite one of the epoch before stays."""
    _poison_adam(monkeypatch, at_step=6, where="moment")  # the last step of epoch 2
    with pytest.raises(FloatingPointError, match=r"optimizer\['state'\]\[0\]\['exp_avg_sq'\] holds NaN or infinity at "
                                                 r"epoch 2, before its checkpoint; the checkpoint of epoch 1 is kept"):
        train(TrainConfig(**CONFIG, epochs=3), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 1 and bool(torch.isfinite(ck["optimizer"]["state"][0]["exp_avg_sq"]).all())


def test_save_checkpoint_refuses_non_finite_state_and_keeps_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}, "optimizer": {}})
    before = path.read_bytes()
    with pytest.raises(FloatingPointError, match=r"not writing the checkpoint .*: model\['w'\] holds NaN or infinity; "
                                                 r"the file on disk is unchanged"):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.tensor([1.0, float("inf"), 0.0])}, "optimizer": {}})
    assert path.read_bytes() == before


def test_resume_refuses_a_checkpoint_with_nan_written_before_the_checks(tmp_path):
    train(TrainConfig(**CONFIG, epochs=1), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    name = next(iter(ck["model"]))
    ck["model"][name] = ck["model"][name] * float("nan")
    torch.save({**ck, "format": "sparsebptt-train-checkpoint/1"}, tmp_path / "checkpoint.pt")  # no checksum
    with pytest.raises(RunError, match=rf"checkpoint .* holds NaN or infinity \(model\['{re.escape(name)}'\]\).*start a new run"):
        train(TrainConfig(**CONFIG, epochs=2), tmp_path, progress=False, resume=True)


def test_cli_non_finite_gradient_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    _nan_grads_at(monkeypatch, epoch=1, batch=1)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--epochs", "2", "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "holds NaN or infinity" in err and "at epoch 1, batch 1/3; no epoch had finished" in err


# ---- item 7: checksums -------------------------------------------------------------------------

def test_checkpoint_carries_the_checksum_of_its_contents(tmp_path):
    train(TrainConfig(**CONFIG, epochs=1), tmp_path, progress=False)
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # still a plain torch file
    assert raw["format"] == CHECKPOINT_FORMAT
    digest = raw.pop("sha256")
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and state_digest(raw) == digest
    assert "sha256" not in load_checkpoint(tmp_path / "checkpoint.pt")


def _flip_tensor_bytes(path: Path, tensor: torch.Tensor, n: int = 4, seed: int = 16) -> None:
    """Flip ``n`` bytes inside the stored data of ``tensor`` (torch stores tensor bytes verbatim)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    for i in random.Random(seed).sample(range(len(raw)), n):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_weight_are_refused(tmp_path):
    """torch.load reads such a file without complaint: the checksum is what notices."""
    train(TrainConfig(**CONFIG, epochs=1), tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    ck = load_checkpoint(path)
    _flip_tensor_bytes(path, ck["model"]["readout.weight"])
    torch.load(path, weights_only=True)  # loads fine
    with pytest.raises(RunError, match=r"the training checkpoint '.*checkpoint\.pt' is damaged: its contents do not "
                                       r"match its checksum .*start a new run"):
        load_checkpoint(path)
    with pytest.raises(RunError, match="is damaged"):
        train(TrainConfig(**CONFIG, epochs=2), tmp_path, progress=False, resume=True)


@pytest.mark.parametrize("where", ["in-the-weights", "anywhere"])
def test_cli_resume_of_a_checkpoint_with_100_flipped_bytes_is_one_line(tmp_path, capsys, where):
    """100 bytes flipped in the first layer's weights loaded, resumed and trained on, exit 0;
    flipped anywhere in the file they may also break the zip (refused before too)."""
    run = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--out", str(run)]) == 0
    path = run / "checkpoint.pt"
    if where == "anywhere":
        data = bytearray(path.read_bytes())
        for i in random.Random(16).sample(range(len(data)), 100):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        _flip_tensor_bytes(path, load_checkpoint(path)["model"]["recurrent.cell.layers.0.weight"], n=100)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert re.search(r"sparsebptt train: error: (the training checkpoint '.*checkpoint\.pt' is damaged|cannot read the "
                     r"training checkpoint '.*checkpoint\.pt')", err), err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # nothing trained on top of it


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    state = {"format": "sparsebptt-train-checkpoint/1", "epoch": 1, "model": {"w": torch.ones(2)}}
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 1


# ---- item 8: a full disk -----------------------------------------------------------------------

class _FullDisk:
    """A binary file that takes ``room`` bytes and then fails like a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        b = memoryview(b).cast("B")
        if len(b) > self.room:
            self.f.write(b[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full_on(monkeypatch, name, nth, room=1000):
    """The ``nth`` atomic write of run file ``name`` finds the disk full after ``room`` bytes."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is opened")
    real = os.fdopen
    seen = {"n": 0}

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        if f"/.{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            seen["n"] += 1
            if seen["n"] == nth:
                return _FullDisk(f, room)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_atomic_write_on_a_full_disk_names_the_file_and_the_bytes(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old")
    _disk_full_on(monkeypatch, "config.json", 1, room=10)
    with pytest.raises(RunWriteError, match=r"cannot write '.*config\.json': No space left on device \(5000 bytes "
                                            r"needed, \d+ bytes free there\); the file it would replace is "
                                            r"unchanged; free space there"):
        atomic_write(path, "x" * 5000)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_cli_disk_full_during_the_checkpoint_write_is_one_line_and_keeps_the_last(tmp_path, monkeypatch, capsys):
    """Before: a traceback of OSError [Errno 28] chained with torch's 'enforce fail'."""
    run = tmp_path / "run"
    _disk_full_on(monkeypatch, "checkpoint.pt", 2)  # epoch 2's checkpoint
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--epochs", "3", "--out", str(run)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert re.search(r"error: cannot write '.*checkpoint\.pt': No space left on device \((\d+) bytes needed, \d+ bytes "
                     r"free there\); .*the checkpoint of epoch 1 is kept in .*; free space and continue with --resume",
                     err), err
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_cli_double_disk_on_a_disk_too_small_is_one_line(tmp_path, monkeypatch, capsys):
    """Before: a RuntimeError traceback (the command caught only ValueError and OSError)."""
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--epochs", "1", "--strategy", "double-disk:2,1", "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert re.search(rf"error: not enough space for disk checkpoints in '{re.escape(str(tmp_path))}': needs \d+ bytes "
                     r".*no epoch had finished", err), err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sparsebptt-")]


def _tmpfs_run(tmp_path, size, script):
    """Run ``script`` (sh) with a fresh tmpfs of ``size`` mounted at $FS, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    fs = tmp_path / "fs"
    fs.mkdir()
    env = {**os.environ, "FS": str(fs), "PY": sys.executable}
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$FS"'],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$FS" && {script}'],
                          env=env, capture_output=True, text=True, timeout=600)


def test_double_disk_on_a_small_tmpfs_is_one_line(tmp_path):
    small = " ".join(SMALL)
    r = _tmpfs_run(tmp_path, "8k", f'TMPDIR="$FS" "$PY" -m sparsebptt train {small} --T 40 --hidden 32 --epochs 1 '
                                   f'--strategy double-disk:4,2 --out {tmp_path / "run"}; echo "rc=$?"; ls -A "$FS"')
    out = r.stdout.splitlines()
    assert "rc=1" in out, (r.stdout, r.stderr)
    _one_line(r.stderr)
    assert re.search(r"not enough space for disk checkpoints in '.*fs': needs \d+ bytes", r.stderr), r.stderr
    assert not [n for n in out[out.index("rc=1") + 1:] if n.startswith("sparsebptt-")]  # no disk store left


def test_checkpoint_on_a_full_tmpfs_is_one_line_and_keeps_the_last(tmp_path):
    small = " ".join(SMALL)
    fill = ('import os, shutil; free = shutil.disk_usage(os.environ["FS"]).free; '
            'open(os.path.join(os.environ["FS"], "fill"), "wb").write(bytes(free - 8192))')
    r = _tmpfs_run(tmp_path, "4m", textwrap.dedent(f'''\
        "$PY" -m sparsebptt train {small} --epochs 1 --out "$FS/run" > /dev/null || exit 9
        "$PY" -c '{fill}'
        "$PY" -m sparsebptt train --resume "$FS/run" --epochs 2 --no-progress > /dev/null
        echo "rc=$?"
        "$PY" -c 'from sparsebptt.train.runs import load_checkpoint; import os; print("epoch", load_checkpoint(os.environ["FS"] + "/run/checkpoint.pt")["epoch"])'
        ls -A "$FS/run"'''))
    assert "rc=1" in r.stdout, (r.stdout, r.stderr)
    _one_line(r.stderr)
    assert re.search(r"cannot write '.*run/checkpoint\.pt': No space left on device \(\d+ bytes needed, \d+ bytes free "
                     r"there\).*the checkpoint of epoch 1 is kept", r.stderr), r.stderr
    assert "epoch 1" in r.stdout
    assert sorted(r.stdout.split("epoch 1\n")[1].split()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


# ---- item 9: killed runs, signals, start-up, --lr, parse_bytes, the backend ----------------------

def test_a_run_killed_while_writing_leaves_a_temporary_that_resume_removes(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**CONFIG, epochs=1), run, progress=False)
    # a process killed -9 inside atomic_write's writer: its temporary file stays
    code = ("import sys, time; from sparsebptt.train.runs import atomic_write\n"
            "def w(f):\n    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            f"atomic_write({str(run / 'checkpoint.pt')!r}, writer=w)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.kill()
        p.wait(timeout=30)
    finally:
        p.stdout.close()
    left = [n for n in os.listdir(run) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(f".checkpoint.pt.{p.pid}-")
    (run / ".config.json.abc123_x.tmp").write_text("{")  # left by a version that named no pid
    live = run / f".metrics.jsonl.{os.getppid()}-abcdefgh.tmp"  # a live writer's: kept
    live.write_text("")
    train(TrainConfig(**CONFIG, epochs=2), run, progress=False, resume=True)
    assert [n for n in os.listdir(run) if n.endswith(".tmp")] == [live.name]


def test_interrupt_before_the_first_epoch_has_no_resume_hint(tmp_path, monkeypatch, capsys):
    import sparsebptt.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sparsebptt.train, "train", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--out", str(tmp_path / "new")])
    assert e.value.code == 130
    err = capsys.readouterr().err
    _one_line(err)
    assert "interrupted before any epoch finished; there is nothing to resume in" in err and "--resume" not in err


def test_interrupt_during_start_up_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the command imports and builds its parser: one line, status 130."""
    def slow_imports():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", slow_imports)
    assert cli.main(["train"]) == 130
    err = capsys.readouterr().err
    _one_line(err)
    assert err == "sparsebptt: interrupted\n"


def _wait_until_importing_torch(p, timeout=60.0):
    """Until the child maps libtorch (it is inside ``import sparsebptt``, after the package's first
    line set the command's Ctrl-C handler): a fixed delay raced the interpreter's start-up on a
    loaded machine, where a Ctrl-C is Python's own traceback before any code of ours runs."""
    maps = Path(f"/proc/{p.pid}/maps")
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:  # no /proc: keep the fixed delay alone
            return
        time.sleep(0.005)


def _sigint_default():
    """In the child: Ctrl-C's default disposition, as in a terminal. A test run started in the
    background by a non-interactive shell (``cmd &``) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("after", [0.4, 1.0])
def test_ctrl_c_while_the_command_imports_is_one_line(tmp_path, after):
    """Before: a 15- to 60-line traceback from inside torch's or numpy's imports."""
    p = subprocess.Popen([sys.executable, "-m", "sparsebptt", "train", *SMALL, "--out", str(tmp_path / "r")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_default)
    _wait_until_importing_torch(p)  # past the interpreter's own start-up, which no code of ours sees
    time.sleep(after - 0.4)  # in the package's imports (seconds on a busy machine), or later in main
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    _one_line(err)
    assert re.fullmatch(r"sparsebptt( train: error)?: interrupted.*\n", err) and "--resume" not in err


def test_importing_the_library_keeps_the_programs_ctrl_c():
    code = "import signal, sparsebptt; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=_sigint_default)
    assert r.stdout.strip() == "True", r.stderr


def test_interrupt_after_an_epoch_suggests_resume(tmp_path, monkeypatch, capsys):
    real = fit_mod._save_epoch
    calls = {"n": 0}

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_mod, "_save_epoch", save_then_interrupt)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--epochs", "3", "--out", str(run)])
    assert e.value.code == 130
    err = capsys.readouterr().err
    _one_line(err)
    assert f"interrupted; the run keeps its last finished epoch: continue it with sparsebptt train --resume {run}" in err


def _store_folders(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("sparsebptt-"))


def _start_double_disk(tmp_path, tmpdir):
    argv = ["train", "--T", "200", "--hidden", "64", "--batch-size", "64", "--epochs", "50", "--no-progress",
            "--strategy", "double-disk:20,5", "--out", str(tmp_path / "run")]
    p = subprocess.Popen([sys.executable, "-m", "sparsebptt", *argv], env={**os.environ, "TMPDIR": str(tmpdir)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _store_folders(tmpdir):
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "no disk store after 120 s"
        time.sleep(0.01)
    return p


def test_sigterm_of_a_double_disk_run_is_one_line_and_leaves_no_disk_file(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = _start_double_disk(tmp_path, tmpdir)
    try:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    _one_line(err)
    assert err.startswith("sparsebptt train: error: terminated (SIGTERM)")
    assert _store_folders(tmpdir) == []


def test_sigkill_of_a_double_disk_run_leaves_a_folder_the_next_run_removes(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = _start_double_disk(tmp_path, tmpdir)
    try:
        p.kill()
        p.wait(timeout=30)
    finally:
        p.stderr.close()
    left = _store_folders(tmpdir)
    assert len(left) == 1 and f"-{p.pid}-" in left[0]
    r = subprocess.run([sys.executable, "-m", "sparsebptt", "train", *SMALL, "--epochs", "1", "--strategy",
                        "double-disk:2,1", "--out", str(tmp_path / "next")],
                       env={**os.environ, "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _store_folders(tmpdir) == []


def test_lr_beyond_float32_is_refused_in_one_line(tmp_path, capsys):
    """Before: 'value cannot be converted to type float without overflow' from inside Adam."""
    with pytest.raises(ValueError, match=r"TrainConfig: lr must be at most 3\.4e\+37 .* got 1e\+38"):
        TrainConfig(lr=1e38)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *SMALL, "--lr", "1e38", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "lr must be at most 3.4e+37" in err


def test_the_largest_lr_stops_cleanly(tmp_path):
    """Weights of ~3e37 after one step: the next loss is infinite, a one-line stop (no overflow traceback)."""
    with pytest.raises(FloatingPointError, match=r"training diverged: (loss inf|.* NaN or infinite) at epoch 1, batch "
                                                 r"[12]/3; no epoch had finished"):
        train(TrainConfig(**CONFIG, epochs=1, lr=LR_MAX), tmp_path, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.5, 0, "0.4B"])
def test_parse_bytes_refuses_nan_inf_and_less_than_a_byte(bad):
    with pytest.raises(ValueError, match=r"(budget must be a finite number of bytes, at least 1|memory budget must be "
                                         r"at least 1 byte), got"):
        parse_bytes(bad)


def test_parse_bytes_drops_a_fraction_of_a_byte():
    assert parse_bytes(1.5) == 1 and parse_bytes(4096.0) == 4096


@pytest.fixture
def no_compiler(monkeypatch):
    """As on a machine without a C compiler: the "cpu" backend is unavailable, "auto" not yet resolved."""
    monkeypatch.setattr(backend_mod, "_probes", {"cpu": (False, "no C compiler found (tried cc, gcc, clang)")})
    monkeypatch.setattr(backend_mod, "_resolved", {})


def test_auto_without_c_kernels_warns_once(no_compiler, caplog):
    with caplog.at_level(logging.INFO, logger="sparsebptt"):
        assert backend_mod.resolve_backend("auto", "cpu") == "torch"
        assert backend_mod.resolve_backend("auto", "cpu") == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.search(r"backend 'auto' on cpu runs the slow 'torch' reference: the 'cpu' backend is unavailable "
                     r"\(no C compiler found .*\); install a C compiler", warnings[0].getMessage())


def test_auto_without_c_kernels_warns_on_stderr(tmp_path):
    """Unconfigured logging: the warning reaches stderr (Python's last-resort handler)."""
    code = ("from sparsebptt.kernels import backend as b\n"
            "b._probes['cpu'] = (False, 'no C compiler found')\n"
            "print(b.resolve_backend('auto', 'cpu'), b.resolve_backend('auto', 'cpu'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "torch torch"
    _one_line(r.stderr)
    assert "runs the slow 'torch' reference" in r.stderr


def test_config_json_records_the_backend_each_cell_ran(tmp_path, no_compiler):
    run = tmp_path / "run"
    train(TrainConfig(**CONFIG, epochs=1), run, progress=False)
    meta = json.loads((run / "config.json").read_text())
    assert meta["backends"] == {"recurrent.cell.layers.0": "torch", "recurrent.cell.layers.1": "torch"}
    backend_mod._resolved.clear()
    backend_mod._probes.clear()  # a compiler again: the resumed run records what it ran
    if not backend_mod.backend_available("cpu")[0]:
        pytest.skip("no C compiler on this machine")
    train(TrainConfig(**CONFIG, epochs=2), run, progress=False, resume=True)  # the new entry does not block resume
    meta = json.loads((run / "config.json").read_text())
    assert meta["backends"] == {"recurrent.cell.layers.0": "cpu", "recurrent.cell.layers.1": "cpu"}
