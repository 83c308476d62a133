"""Run folders: atomic files, training checkpoints, RNG states, and what `--resume` checks.

A run folder holds ``config.json`` (the run's `TrainConfig` and its resolved strategy),
``metrics.jsonl`` (one line per finished epoch) and ``checkpoint.pt`` (the state after the last
finished epoch). Every file but metrics.jsonl is replaced atomically: written to a temporary file
in the same folder, flushed to disk, then renamed over the old one with `os.replace`, so a run
killed at any moment leaves either the old or the new file, never half of one. At the end of an
epoch the trainer appends the epoch's metrics line first and then replaces the checkpoint, which
also holds every metrics line so far; resuming rewrites metrics.jsonl from the checkpoint, so an
epoch whose line was written but whose checkpoint was not is run again and listed once.

`--resume` continues a run only with the config it was started with (`config_from_run`,
`config_mismatches`), except for the entries in `RESUME_MAY_CHANGE`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..strategies import parse_strategy
from .config import TrainConfig

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "RESUME_MAY_CHANGE", "RunError",
           "atomic_write", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "read_run_meta", "is_run", "default_out_dir", "prepare_out", "config_from_run", "config_mismatches",
           "check_resume"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
#: ``format`` entry of every checkpoint this version writes; other values are refused on load
CHECKPOINT_FORMAT = "sparsebptt-train-checkpoint/1"


class RunError(ValueError):
    """A run folder that cannot be used as asked: not a run, a config mismatch on resume, a
    damaged checkpoint. The message is one line and says the fix."""


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


def atomic_write(path: "str | Path", data: "bytes | str | None" = None, *, writer=None) -> None:
    """Replace ``path`` atomically with ``data`` (bytes or text), or with what ``writer(file)``
    writes into a binary file object: temporary file in the same folder, fsync, `os.replace`."""
    path = Path(path)
    if (data is None) == (writer is None):
        raise TypeError("atomic_write: pass exactly one of data or writer")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            if writer is not None:
                writer(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


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


def save_checkpoint(path: "str | Path", state: dict) -> None:
    """Write a training checkpoint atomically (``state`` gets ``format``)."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write(path, writer=lambda f: torch.save(state, f))


def load_checkpoint(path: "str | Path") -> "dict | None":
    """The checkpoint at ``path`` (tensors on the CPU), or None if there is none.

    Raises `RunError` if the file cannot be read or is not a checkpoint of this format.
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
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RunError(f"{str(path)!r} is not a sparsebptt training checkpoint of format "
                       f"{CHECKPOINT_FORMAT!r} (got {got!r})")
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
    """``out`` created for a new run; FileExistsError if it already holds a run's metrics."""
    out = Path(out)
    if (out / METRICS_FILE).exists():
        raise FileExistsError(f"run folder {str(out)!r} already holds metrics.jsonl; choose another --out, "
                              f"remove the old run, or continue it with --resume {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_resume(config: TrainConfig, out: Path) -> dict:
    """The config.json entries of the run in ``out`` if ``config`` may continue it; else `RunError`
    naming the entries that differ."""
    meta = read_run_meta(out)
    diffs = config_mismatches(config_from_run(out), config)
    if diffs:
        raise RunError(f"cannot resume {str(out)!r} with another config ({'; '.join(diffs)}); drop those "
                       "options to continue the run as it was, or start a new run with --out")
    return meta
