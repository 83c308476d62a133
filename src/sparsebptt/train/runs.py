"""Run folders: atomic files, training checkpoints, RNG states, and what `--resume` checks.

A run folder holds ``config.json`` (the run's `TrainConfig` and its resolved strategy),
``metrics.jsonl`` (one line per finished epoch) and ``checkpoint.pt`` (the state after the last
finished epoch). Every file but metrics.jsonl is replaced atomically: written to a temporary file
in the same folder, flushed to disk, then renamed over the old one with `os.replace`, so a run
killed at any moment leaves either the old or the new file, never half of one. At the end of an
epoch the trainer appends the epoch's metrics line first and then replaces the checkpoint, which
also holds every metrics line so far; resuming rewrites metrics.jsonl from the checkpoint, so an
epoch whose line was written but whose checkpoint was not is run again and listed once.

A checkpoint carries the SHA-256 of its contents (`state_digest`: every tensor's dtype, shape and
bytes and every other entry, in a fixed order) and `load_checkpoint` refuses a file whose contents
no longer match it, so a damaged file is never resumed from. `save_checkpoint` refuses a state that
holds NaN or infinity (`non_finite`), so a finite checkpoint is never replaced by a poisoned one.
A write that fails (a full disk) raises `RunWriteError` naming the file and the bytes it needed,
and leaves the file it would have replaced as it was. Temporary files carry the writer's process
id; `remove_stale_temporaries` deletes those of processes that are gone (a run killed mid-write).

`--resume` continues a run only with the config it was started with (`config_from_run`,
`config_mismatches`), except for the entries in `RESUME_MAY_CHANGE`.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..storage import process_alive
from ..strategies import parse_strategy
from .config import TrainConfig

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "RESUME_MAY_CHANGE", "RunError",
           "atomic_write", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "read_run_meta", "is_run", "default_out_dir", "prepare_out", "config_from_run", "config_mismatches",
           "check_resume", "check_fit_resume", "FIT_MAY_CHANGE", "RunWriteError", "state_digest", "non_finite",
           "remove_stale_temporaries"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
#: ``format`` entry of every checkpoint this version writes (with a ``sha256`` of its contents);
#: other values are refused on load, but for `_LEGACY_FORMAT` (written before checksums)
CHECKPOINT_FORMAT = "sparsebptt-train-checkpoint/2"
_LEGACY_FORMAT = "sparsebptt-train-checkpoint/1"


class RunError(ValueError):
    """A run folder that cannot be used as asked: not a run, a config mismatch on resume, a
    damaged checkpoint. The message is one line and says the fix."""


class RunWriteError(OSError):
    """A run file could not be written (a full disk, a quota, no permission). The message is one
    line naming the file, the bytes it needed and the space left; the file it would have replaced
    is unchanged. ``what`` is the message's first clause (file, reason, bytes), for callers that
    say the rest their own way."""

    def __init__(self, message: str, what: "str | None" = None):
        super().__init__(message)
        self.what = message if what is None else what

    def __str__(self) -> str:
        return self.args[0] if self.args else "cannot write a run file"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _free_bytes(folder: Path) -> "int | None":
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_error(path: Path, err: OSError, needed: "int | None") -> RunWriteError:
    """One line: the file, why, the bytes it needed and the space left on its disk."""
    why = err.strerror or str(err) or type(err).__name__
    free = _free_bytes(path.parent)
    need = f"{needed} bytes needed" if needed is not None else "size unknown"
    room = f", {free} bytes free there" if free is not None else ""
    hint = "; free space there" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    what = f"cannot write {str(path)!r}: {why} ({need}{room})"
    e = RunWriteError(f"{what}; the file it would replace is unchanged{hint}", what)
    e.errno, e.filename = err.errno, str(path)
    return e


def atomic_write(path: "str | Path", data: "bytes | bytearray | memoryview | str | None" = None, *,
                 writer=None) -> None:
    """Replace ``path`` atomically with ``data`` (bytes or text), or with what ``writer(file)``
    writes into a binary file object: temporary file in the same folder (named
    ``.<name>.<pid>-<random>.tmp``), fsync, `os.replace`. A failed write (a full disk) removes the
    temporary file, leaves ``path`` as it was and raises `RunWriteError` naming ``path`` and the
    bytes it needed."""
    path = Path(path)
    if (data is None) == (writer is None):
        raise TypeError("atomic_write: pass exactly one of data or writer")
    if isinstance(data, str):
        data = data.encode()
    needed = None if data is None else memoryview(data).nbytes
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e, needed) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            if writer is not None:
                writer(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, RunWriteError):
            raise _write_error(path, e, needed) from None
        raise
    _fsync_dir(path.parent)


#: ``.<file>.<pid>-<random>.tmp`` (this version) or ``.<file>.<random>.tmp`` (before pids were named)
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(?:(?P<pid>[0-9]+)-)?[a-z0-9_]+\.tmp")


def remove_stale_temporaries(folder: "str | Path", names=None) -> "list[Path]":
    """Delete the temporary files `atomic_write` left in ``folder`` for the files ``names`` (default:
    config.json, metrics.jsonl, checkpoint.pt) when a process was killed mid-write: those whose
    writer (the pid in the name) is gone or is this process, and those without a pid (older
    versions). Returns the deleted paths."""
    folder = Path(folder)
    names = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE) if names is None else tuple(names)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMPORARY.fullmatch(p.name)
        if m is None or m.group("name") not in names or not p.is_file():
            continue
        pid = m.group("pid")
        if pid is not None and int(pid) != os.getpid() and process_alive(int(pid)):
            continue  # another live process is writing it
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def rng_state() -> dict:
    """The global RNG states: torch CPU (and CUDA when initialised), Python's `random`, numpy's
    legacy global generator. Only tensors, ints, floats and strings, so ``weights_only`` loads it."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": (version, list(mt), gauss),
             "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)


def _feed(h, obj, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k, where)
            _feed(h, obj[k], f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif isinstance(obj, _PLAIN):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"state_digest: {where} is a {type(obj).__name__}; a checkpoint holds tensors, dicts, "
                        "lists, tuples, numbers, strings and None")


def state_digest(state) -> str:
    """SHA-256 (hex) of a checkpoint's contents: every tensor's dtype, shape and bytes and every
    other entry, dict keys in a fixed order. Equal for a state and what `torch.load` gives back
    for it, so it checks the contents, not the file's layout."""
    h = hashlib.sha256()
    _feed(h, state, "state")
    return h.hexdigest()


def non_finite(state, where: str = "") -> "list[str]":
    """Where ``state`` (nested dicts, lists, tuples of tensors) holds NaN or infinity: the paths of
    the floating-point tensors that do, e.g. ``model['fc.weight']``."""
    found = []
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            found.append(where or "tensor")
    elif isinstance(state, dict):
        for k, v in state.items():
            found += non_finite(v, f"{where}[{k!r}]" if where else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            found += non_finite(v, f"{where}[{i}]")
    elif isinstance(state, float) and not (state == state and abs(state) != float("inf")):
        found.append(where or "value")
    return found


def save_checkpoint(path: "str | Path", state: dict) -> None:
    """Write a training checkpoint atomically, with ``format`` and the ``sha256`` of its contents.

    Raises FloatingPointError, writing nothing, if the model or optimizer state holds NaN or
    infinity (the file on disk stays the last finite one); `RunWriteError` (naming the file and the
    bytes needed) if the disk cannot take it, the old file kept.
    """
    path = Path(path)
    bad = non_finite({k: state[k] for k in ("model", "optimizer") if k in state})
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise FloatingPointError(f"not writing the checkpoint {str(path)!r}: {bad[0]}{more} holds NaN or "
                                 "infinity; the file on disk is unchanged")
    state = {"format": CHECKPOINT_FORMAT, **state}
    state["sha256"] = state_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)  # in memory first: the size is known and a disk error is one OSError
    atomic_write(path, buf.getbuffer())


def load_checkpoint(path: "str | Path") -> "dict | None":
    """The checkpoint at ``path`` (tensors on the CPU, without its ``sha256``), or None if there is
    none.

    Raises `RunError` (one line naming the file) if the file cannot be read, is not a checkpoint
    of this format, or its contents do not match its checksum (it is damaged).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a pickle traceback
        raise RunError(f"cannot read the training checkpoint {str(path)!r} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}); "
                       "it is damaged or not a sparsebptt checkpoint") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, _LEGACY_FORMAT):
        got = fmt if isinstance(state, dict) else type(state).__name__
        raise RunError(f"{str(path)!r} is not a sparsebptt training checkpoint of format "
                       f"{CHECKPOINT_FORMAT!r} (got {got!r})")
    if fmt == CHECKPOINT_FORMAT:
        stored = state.pop("sha256", None)
        try:
            actual = state_digest(state)
        except TypeError:  # an entry of a type this version never writes
            actual = None
        if stored != actual:
            raise RunError(f"the training checkpoint {str(path)!r} is damaged: its contents do not match "
                           f"its checksum (sha256 {str(stored)[:12]}..., contents {str(actual)[:12]}...); "
                           "restore the file from a backup or start a new run with --out")
    return state


def is_run(folder: "str | Path") -> bool:
    """True if ``folder`` holds a run's config.json."""
    return (Path(folder) / CONFIG_FILE).is_file()


def read_run_meta(folder: "str | Path") -> dict:
    """The parsed config.json of the run in ``folder``; `RunError` if it is not a run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"{str(folder)!r} is not a run folder: no such directory; pass the --out folder "
                       "of an earlier `sparsebptt train`")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{str(folder)!r} is not a run folder: it has no {CONFIG_FILE}; pass the --out folder "
                       "of an earlier `sparsebptt train`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(meta, dict) or "dataset" not in meta or "model" not in meta:
        raise RunError(f"{str(path)!r} is not a sparsebptt run config (no dataset / model entries)")
    return meta


def default_out_dir() -> Path:
    """``runs/<timestamp>`` under the current directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


#: config entries a resumed run may change (`--epochs` to train longer, `--threads`)
RESUME_MAY_CHANGE = ("epochs", "threads")


def config_from_run(folder: "str | Path") -> TrainConfig:
    """The `TrainConfig` of the run in ``folder`` (from its config.json); `RunError` if ``folder``
    is not a run or its config no longer validates."""
    meta = read_run_meta(folder)
    if isinstance(meta.get("fit"), dict):
        raise RunError(f"the run in {str(folder)!r} was written by sb.fit (model {meta.get('model')!r}); continue it "
                       "with sb.fit(model, train, ..., out=<that folder>, resume=True)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = meta.get("train_config")
    if not isinstance(saved, dict):  # written before train_config existed: the top-level entries
        saved = {k: v for k, v in meta.items() if k in fields}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise RunError(f"{str(Path(folder) / CONFIG_FILE)!r} has entries this version of sparsebptt does not "
                       f"know: {', '.join(unknown)}; resume it with the version that wrote it "
                       f"({meta.get('sparsebptt', 'unknown')})")
    try:
        return TrainConfig(**saved)
    except (TypeError, ValueError) as e:
        raise RunError(f"{str(Path(folder) / CONFIG_FILE)!r} holds an invalid config: {e}") from None


def config_mismatches(saved: TrainConfig, given: TrainConfig,
                      may_change: "tuple[str, ...]" = RESUME_MAY_CHANGE) -> "list[str]":
    """``"name: run has A, given B"`` for each field (other than ``may_change``) that differs.
    Thresholds compare resolved (None = the model's default); strategies compare parsed."""
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in may_change:
            continue
        a, b = getattr(saved, f.name), getattr(given, f.name)
        if f.name == "threshold":
            a, b = saved.resolved_threshold, given.resolved_threshold
        elif f.name == "strategy":
            a, b = parse_strategy(a).to_string(), parse_strategy(b).to_string()
        elif f.name == "dataset_options":  # where the files are may change, not what they are
            a, b = ({k: v for k, v in (o or {}).items() if k != "data_dir"} or None for o in (a, b))
        if a != b:
            diffs.append(f"{f.name}: run has {a!r}, given {b!r}")
    return diffs


def prepare_out(out: "str | Path") -> Path:
    """``out`` created for a new run (stale temporary files removed); FileExistsError if it already
    holds a run's metrics."""
    out = Path(out)
    if (out / METRICS_FILE).exists():
        raise FileExistsError(f"run folder {str(out)!r} already holds metrics.jsonl; choose another --out, "
                              f"remove the old run, or continue it with --resume {out}")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    return out


#: `sb.fit` arguments a resumed run may change
FIT_MAY_CHANGE = ("epochs",)


def check_fit_resume(given: dict, out: "str | Path") -> dict:
    """The config.json entries of the `sb.fit` run in ``out`` if a call with the `FitConfig` entries
    ``given`` may continue it (all equal but `FIT_MAY_CHANGE`); else `RunError` naming those that
    differ."""
    out = Path(out)
    meta = read_run_meta(out)
    saved = meta.get("fit")
    if not isinstance(saved, dict):
        raise RunError(f"the run in {str(out)!r} was written by `sparsebptt train`, not sb.fit; continue it with "
                       f"sparsebptt train --resume {out}")
    diffs = [f"{k}: run has {saved.get(k)!r}, given {v!r}" for k, v in given.items()
             if k not in FIT_MAY_CHANGE and _plain(saved.get(k)) != _plain(v)]
    if diffs:
        raise RunError(f"cannot resume {str(out)!r} with other arguments ({'; '.join(diffs)}); pass those of the "
                       "run to continue it, or start a new run with another out")
    return meta


def _plain(v):
    """A config value as JSON gives it back (tuples as lists)."""
    return json.loads(json.dumps(v))


def check_resume(config: TrainConfig, out: Path) -> dict:
    """The config.json entries of the run in ``out`` if ``config`` may continue it; else `RunError`
    naming the entries that differ."""
    meta = read_run_meta(out)
    diffs = config_mismatches(config_from_run(out), config)
    if diffs:
        raise RunError(f"cannot resume {str(out)!r} with another config ({'; '.join(diffs)}); drop those "
                       "options to continue the run as it was, or start a new run with --out")
    return meta
