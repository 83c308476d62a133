"""The training loop: `train` a `TrainConfig`'s model on a `sparsebptt.data` dataset, `evaluate` it.

The model comes from `build_model` (see `sparsebptt.train.models`) and is scanned under the config's
strategy, or under the fastest strategy `sb.plan` finds for ``memory_budget``. A dataset with
``sequence_targets = True`` (``text``: next-character prediction) has one label per step, y (B, T):
every step is scored, and each metrics line adds ``train_bpc, val_loss, val_bpc`` (bits per
character: the cross-entropy over ln 2). A model's auxiliary loss (EGRU's activity regulariser with
``activity_reg > 0``) is returned by its forward and added to the loss. A run writes into its folder:

- ``config.json``: the `TrainConfig`, the resolved strategy, the library versions and ``backends``:
  the backend each cell of the model runs ("cpu", "triton" or "torch"; see `sparsebptt.kernels`);
- ``metrics.jsonl``: one JSON object per epoch with ``epoch, train_loss, train_acc, val_acc,
  seconds, peak_stored_bytes, activity, backward_macs``;
- ``checkpoint.pt``: model, optimizer, RNG states, best accuracy and the metrics so far, replaced
  atomically after every epoch, with a checksum of its contents; ``train(..., resume=True)``
  (``sparsebptt train --resume DIR``) continues from it and refuses a damaged one (see
  `sparsebptt.train.runs`).

Nothing non-finite is trained on or saved: after every backward the gradients, and after every
optimizer step the parameters, are checked for NaN and infinity (a NaN in a LIF network's weights
may never show in its loss: NaN membranes do not spike), and so is everything a checkpoint would
hold before it is written. The first non-finite value stops the run with a FloatingPointError
naming the tensor, the epoch and the batch; the checkpoint on disk stays the last finite one.

Under ``torchrun`` the processes train one model with DDP, each on its share of every batch
(see `sparsebptt.train.distributed`).

``peak_stored_bytes``, ``activity`` (per layer: spike rate of LIF layers, fraction of transmitted
deltas of Delta layers, event rate of EGRU layers; empty for dense GRU / LSTM) and ``backward_macs``
are what `sb.trace` counts for the scan during the forward and backward of the epoch's first training
batch (a full batch; the readout is not part of the scan).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..cells.base import FusedCell
from ..data import get_dataset
from ..nn import Recurrent
from ..planner import format_bytes, parse_bytes, plan
from ..storage import DiskSpaceError
from ..strategies import Strategy, parse_strategy
from ..trace import trace
from .config import FitConfig, TrainConfig
from .datasets import TorchDatasets
from .distributed import Dist, all_sum, broadcast_object, setup, shard, share_loss, teardown
from .models import build_model
from .runs import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RunError, RunWriteError, atomic_write,
                   check_fit_resume, check_resume,
                   default_out_dir, load_checkpoint, non_finite, prepare_out, remove_stale_temporaries, rng_state,
                   save_checkpoint, set_rng_state)

__all__ = ["fit", "train", "evaluate", "cell_backends", "apply_strategy", "ModelStrategy", "METRIC_KEYS",
           "SEQUENCE_METRIC_KEYS"]

#: keys of every line of metrics.jsonl
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_acc", "seconds", "peak_stored_bytes",
               "activity", "backward_macs")

#: keys of every line of metrics.jsonl for a dataset with one label per step (``text``)
SEQUENCE_METRIC_KEYS = METRIC_KEYS + ("train_bpc", "val_loss", "val_bpc")


def _version() -> str:
    from .. import __version__

    return __version__


def _batch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible data seed per (run seed, epoch); validation uses epoch 0."""
    return seed * 1_000_003 + epoch


def _per_label(logits: torch.Tensor, y: torch.Tensor):
    """Logits and labels with one row per label: a sequence model's (B, T, classes) and (B, T)
    become (B * T, classes) and (B * T,); a classifier's pass through."""
    if logits.dim() == 3:
        return logits.flatten(0, 1), y.flatten()
    return logits, y


@torch.no_grad()
def evaluate(model: nn.Module, dataset, split: str, batch_size: int, seed: int, *,
             dist: "Dist | None" = None, with_loss: bool = False):
    """Accuracy of ``model`` on ``split``, with spikes drawn from ``seed`` (per step for a
    dataset with one label per step); with ``with_loss`` also the mean cross-entropy per label.

    Under DDP (``dist`` with world > 1) each process scores its share of every batch and the
    counts are summed over the processes; every process returns the same accuracy.
    """
    model.eval()
    d = Dist() if dist is None else dist
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for x, y in dataset.batches(split, batch_size, seed=seed):
        x, y, _, empty = shard(x, y, d.rank, d.world)
        if empty:
            continue
        x, y = x.to(device), y.to(device)
        logits, y = _per_label(model(x), y)
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
        if with_loss:
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    correct, total, loss_sum = all_sum([correct, total, loss_sum], d)
    return (correct / total, loss_sum / total) if with_loss else correct / total


def train(config: TrainConfig, out: "str | Path | None" = None, *, progress: bool = True,
          log=None, resume: bool = False, device: "str | torch.device" = "cpu") -> dict:
    """Train as ``config`` says, writing config.json, metrics.jsonl and checkpoint.pt into ``out``.

    After every epoch the model, the optimizer, the RNG states, the best accuracy and the metrics
    so far are saved atomically to ``out/checkpoint.pt`` (see `sparsebptt.train.runs`), so a run
    killed at any moment loses at most the epoch it was in.

    Args:
        config: the run's `TrainConfig`.
        out: run folder (created); default `default_out_dir()`. Raises FileExistsError if it
            already holds a metrics.jsonl (unless ``resume``).
        progress: show a tqdm bar per epoch.
        log: where the per-epoch lines and the summary go (default sys.stdout).
        resume: continue the run in ``out`` from its last finished epoch: ``config`` must equal the
            saved one except in `RESUME_MAY_CHANGE` (raise ``epochs`` to train longer); metrics.jsonl
            is rewritten to the checkpoint's epochs, so no epoch is listed twice. A run killed before
            its first checkpoint starts again from epoch 1. `RunError` if ``out`` is not a run or the
            configs differ. On the CPU the metrics equal those of an uninterrupted run (but
            ``seconds``).
        device: "cpu", "cuda" or "cuda:N". Under torchrun (``WORLD_SIZE`` > 1) the processes join a
            DDP group (gloo on the CPU, NCCL on CUDA with ``cuda:LOCAL_RANK``) and each trains on its
            share of every batch; only rank 0 writes the run folder.

    Returns:
        The summary: ``val_acc`` (final), ``best_val_acc``, ``seconds`` (wall, training and
        validation, this call only), ``peak_stored_bytes`` (max over epochs), ``epochs_run`` (in this
        call), ``resumed_from`` (epoch) and ``out``.

    Raises:
        FloatingPointError: a non-finite loss, gradient, parameter or optimizer state; the message
            names the tensor, the epoch and the batch, and the checkpoint on disk (the last finite
            one, named in the message) stays as it was.
        RunWriteError: a run file could not be written (a full disk); the message names the file
            and the bytes it needed, and the checkpoint on disk stays as it was.
        DiskSpaceError: a ``double-disk`` strategy's checkpoint file does not fit its disk.
    """
    strategy = parse_strategy(config.strategy)  # fail before any work on a bad string
    if config.memory_budget is not None:
        parse_bytes(config.memory_budget)
    if resume and out is None:
        raise ValueError("train: resume=True needs the run folder `out` to continue")
    d = setup(device)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    finished = False
    try:
        summary = _train(config, strategy, out, progress and d.is_main, sys.stdout if log is None else log,
                         resume, d)
        finished = True
        return summary
    finally:
        torch.set_num_threads(prev_threads)
        teardown(d, finished)


@dataclass
class _Progress:
    """What a run has done so far: restored from its checkpoint on resume, grown every epoch."""

    done: int = 0  # finished epochs
    best: float = 0.0  # best val_acc
    peak: int = 0  # max peak_stored_bytes
    lines: list = field(default_factory=list)  # metrics.jsonl lines
    val_acc: float = float("nan")  # of the last finished epoch
    saved: int = 0  # epoch of the checkpoint on disk (0: none)

    @property
    def last(self) -> dict:
        return json.loads(self.lines[-1]) if self.lines else {}


@dataclass
class _EpochStats:
    """Sums over one epoch's training batches and what `sb.trace` counted on its first batch."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    peak: int = 0
    activity: dict = field(default_factory=dict)
    backward_macs: int = 0


def _open_run(config, core: nn.Module, strategy: Strategy, out, resume: bool, d: Dist,
              shape: tuple) -> "tuple[Strategy, Path, dict | None]":
    """(strategy, run folder, checkpoint or None): on resume, the run's strategy as planned then and
    its checkpoint; for a new run, the planner's pick for a ``memory_budget`` (at the per-process
    ``shape``) and the prepared folder (made by rank 0, shared with every process). Sets the model's
    strategy (for `fit`, that of every `sb.Recurrent` in the model: see `apply_strategy`)."""
    ckpt = None
    user = isinstance(config, FitConfig)
    if resume:
        out = Path(out)
        if user:
            check_fit_resume(dataclasses.asdict(config), out)
        else:
            meta = check_resume(config, out)
            strategy = parse_strategy(meta.get("strategy", config.strategy))  # as planned then
        if d.is_main:
            remove_stale_temporaries(out)  # of a process killed while writing
        ckpt = load_checkpoint(out / CHECKPOINT_FILE)
    else:
        if config.memory_budget is not None and not user:
            strategy = plan(core.cell, shape, config.memory_budget)
        err = None
        if d.is_main:
            out = default_out_dir() if out is None else Path(out)
            try:
                prepare_out(out)
            except FileExistsError as e:
                err = str(e)
        out, err = broadcast_object((str(out) if out is not None else None, err), d)
        out = Path(out)
        if err:
            raise FileExistsError(err)
    if user:
        strategy = apply_strategy(core, config.strategy, config.memory_budget)
    else:
        core.strategy = strategy
    return strategy, out, ckpt


def _restore(core: nn.Module, opt: torch.optim.Optimizer, ckpt: "dict | None", config: TrainConfig,
             out: Path) -> _Progress:
    """The run's progress, with the model, the optimizer and the RNG states as at the end of the
    checkpoint's epoch (a fresh start without a checkpoint)."""
    if ckpt is None:
        return _Progress()
    bad = non_finite({"model": ckpt["model"], "optimizer": ckpt["optimizer"]})
    if bad:  # written by a version that did not check
        raise RunError(f"checkpoint {str(out / CHECKPOINT_FILE)!r} holds NaN or infinity ({bad[0]}"
                       f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); it cannot be continued: start "
                       "a new run with --out")
    core.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    prog = _Progress(int(ckpt["epoch"]), float(ckpt["best_val_acc"]), int(ckpt["peak_stored_bytes"]),
                     list(ckpt["metrics"]), float(ckpt["val_acc"]), saved=int(ckpt["epoch"]))
    if len(prog.lines) != prog.done:
        raise RunError(f"checkpoint {str(out / CHECKPOINT_FILE)!r} says epoch {prog.done} but holds "
                       f"{len(prog.lines)} metrics lines; it is damaged")
    if prog.done > config.epochs:
        raise RunError(f"the run in {str(out)!r} already finished {prog.done} epochs; pass --epochs "
                       f"{prog.done} or more to continue it")
    set_rng_state(ckpt["rng"])  # as at the end of epoch `done` (after the model was built)
    return prog


def cell_backends(model: nn.Module) -> "dict[str, str]":
    """The backend each cell with kernels in ``model`` runs, by module name: what "auto" resolved to
    on the weights' device ("torch" where no fused kernel can run, e.g. without a C compiler)."""
    return {name: m.active_backend for name, m in model.named_modules() if isinstance(m, FusedCell)}


def _write_run_files(out: Path, config: TrainConfig, strategy: Strategy, approximate: bool, d: Dist,
                     lines: list, backends: dict) -> None:
    """config.json (the config, the resolved strategy, the versions, the cells' backends) and
    metrics.jsonl (the lines of the finished epochs)."""
    meta = {**dataclasses.asdict(config), "threshold": config.resolved_threshold,
            "strategy": strategy.to_string(), "approximate_gradient": approximate,
            "sparsebptt": _version(), "torch": torch.__version__,
            ("fit" if isinstance(config, FitConfig) else "train_config"): dataclasses.asdict(config),
            "world_size": d.world, "device": str(d.device), "backends": backends}
    atomic_write(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    atomic_write(out / METRICS_FILE, "".join(line + "\n" for line in lines))


def _printer(progress: bool, log, d: Dist):
    """``say(msg)``: a line to ``log`` on rank 0 (through tqdm while a bar is shown)."""
    def say(msg: str) -> None:
        if not d.is_main:
            return
        if progress:
            tqdm.write(msg, file=log)
        else:
            print(msg, file=log, flush=True)
    return say


def _announce(say, config: TrainConfig, dataset, strategy: Strategy, out: Path, d: Dist, local_batch: int,
              sequence: bool, resume: bool, resumed: bool, done: int, approximate: bool) -> None:
    say(f"{config.dataset}: {dataset.num_examples('train')} train / {dataset.num_examples('val')} val, "
        f"T={config.T}, model={config.model}"
        + (f" (threshold {config.resolved_threshold})" if config.resolved_threshold is not None else "")
        + f", strategy={strategy.to_string()}, run folder {out}"
        + (f", {d.world} processes ({d.device.type}), about {local_batch} examples each per batch"
           if d.enabled else ""))
    if sequence and hasattr(dataset, "unigram_bits"):
        say(f"{dataset!r}: a model that ignores context needs {dataset.unigram_bits:.3f} bits per character")
    if resume:
        say(f"resuming after epoch {done}/{config.epochs}" if resumed
            else "resuming: no epoch had finished, starting at epoch 1")
    if approximate:
        say(f"note: {strategy.to_string()} computes an approximate gradient (time-skipped BPTT), "
            "not the gradient of full BPTT")


def _kept(out: Path, saved: int) -> str:
    """Which checkpoint the run folder holds (``saved``: its epoch, 0 for none)."""
    return (f"the checkpoint of epoch {saved} is kept in {out / CHECKPOINT_FILE}" if saved
            else "no epoch had finished, so there is no checkpoint")


def _diverged(what: str, epoch: int, where: str, out: Path, config: TrainConfig, saved: int) -> FloatingPointError:
    return FloatingPointError(f"training diverged: {what} at epoch {epoch}, {where}; {_kept(out, saved)}; "
                              f"lower --lr (now {config.lr}) and start a new run")


def _non_finite_names(named) -> "list[str]":
    """The names of the tensors in ``named`` ((name, tensor or None) pairs) holding NaN or infinity;
    one device sync for all of them."""
    named = [(n, t) for n, t in named if t is not None]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(ok.all()):
        return []
    return [n for (n, _), good in zip(named, ok.tolist()) if not good]


def _names(bad: "list[str]") -> str:
    return bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")


def _train_epoch(model: nn.Module, core: nn.Module, opt: torch.optim.Optimizer, dataset, config: TrainConfig,
                 epoch: int, d: Dist, sequence: bool, progress: bool, out: Path, saved: int,
                 with_aux: bool = True) -> _EpochStats:
    """One pass over the training split: a step of ``opt`` per batch, `sb.trace` on the first.
    FloatingPointError on a non-finite loss or gradient (before the step) or parameter (after it);
    ``saved`` is the epoch of the checkpoint on disk, named in the message. ``with_aux``: the model
    takes ``return_aux=True`` (the CLI's models); else it returns the logits alone."""
    model.train()
    stats = _EpochStats()
    n_batches = dataset.num_batches("train", config.batch_size)
    batches = dataset.batches("train", config.batch_size, seed=_batch_seed(config.seed, epoch))
    bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}/{config.epochs}",
               leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        x, y, n_global, empty = shard(x, y, d.rank, d.world)
        x, y = x.to(d.device), y.to(d.device)
        opt.zero_grad(set_to_none=True)
        with (trace() if i == 0 else contextlib.nullcontext()) as t:
            logits, aux = model(x, return_aux=True) if with_aux else (model(x), None)
            if sequence:  # one label per step: score every step
                n_global *= y.shape[1]
                logits, y = _per_label(logits, y)
            loss, loss_total = share_loss(logits, y, n_global, d.world, empty)
            if aux is not None:  # the EGRU activity regulariser
                loss = loss + aux
            loss.backward()
        if t is not None:
            stats.peak, stats.activity, stats.backward_macs = t.peak_stored_bytes, t.activity, t.backward_macs
        hits = 0 if empty else int((logits.argmax(-1) == y).sum())
        batch_loss, hits, n = all_sum([loss_total.item(), hits, 0 if empty else len(y)], d)
        where = f"batch {i + 1}/{n_batches}"
        if not math.isfinite(batch_loss):
            raise _diverged(f"loss {batch_loss / n}", epoch, where, out, config, saved)
        bad = _non_finite_names((name, p.grad) for name, p in core.named_parameters())
        if bad:  # a finite loss need not mean finite gradients (NaN membranes do not spike)
            raise _diverged(f"the gradient of {_names(bad)} holds NaN or infinity (the loss, "
                            f"{batch_loss / n:.4g}, is finite)", epoch, where, out, config, saved)
        opt.step()
        bad = _non_finite_names(core.named_parameters())
        if bad:
            raise _diverged(f"the optimizer step made {_names(bad)} NaN or infinite", epoch, where, out, config,
                            saved)
        stats.loss_sum += batch_loss
        stats.correct += int(hits)
        stats.seen += int(n)
        bar.set_postfix(loss=f"{stats.loss_sum / stats.seen:.3f}", acc=f"{stats.correct / stats.seen:.3f}")
    bar.close()
    return stats


def _epoch_row(epoch: int, stats: _EpochStats, val, seconds: float, sequence: bool) -> dict:
    """The metrics.jsonl entry of an epoch (``val``: accuracy, or (accuracy, loss) with one label per step)."""
    val_acc, val_loss = val if sequence else (val, None)
    row = {"epoch": epoch, "train_loss": stats.loss_sum / stats.seen, "train_acc": stats.correct / stats.seen,
           "val_acc": val_acc, "seconds": seconds,
           "peak_stored_bytes": stats.peak, "activity": stats.activity, "backward_macs": stats.backward_macs}
    if sequence:
        row.update(train_bpc=row["train_loss"] / math.log(2), val_loss=val_loss, val_bpc=val_loss / math.log(2))
    return row


def _check_state(out: Path, epoch: int, core: nn.Module, opt: torch.optim.Optimizer, prog: _Progress,
                 config: TrainConfig) -> None:
    """FloatingPointError if the model or optimizer state that epoch ``epoch``'s checkpoint would
    hold has NaN or infinity (the checkpoint on disk, of epoch ``prog.saved``, is kept)."""
    bad = non_finite({"model": core.state_dict(), "optimizer": opt.state_dict()})
    if bad:
        raise _diverged(f"{_names(bad)} holds NaN or infinity", epoch, "before its checkpoint", out, config,
                        prog.saved)


def _save_epoch(metrics, out: Path, epoch: int, core: nn.Module, opt: torch.optim.Optimizer, prog: _Progress,
                config: TrainConfig, strategy: Strategy) -> None:
    """The epoch's metrics line first, then the checkpoint that lists it (see runs.py). A write
    that fails raises `RunWriteError` naming the file, the bytes needed and the kept checkpoint."""
    try:
        metrics.write(prog.lines[-1] + "\n")
        metrics.flush()
        os.fsync(metrics.fileno())
    except OSError as e:
        what = f"cannot write {str(out / METRICS_FILE)!r}: {e.strerror or e} ({len(prog.lines[-1]) + 1} bytes needed)"
        raise RunWriteError(f"{what}; {_kept(out, prog.saved)}; free space and continue with --resume {out}",
                            what) from None
    try:
        save_checkpoint(out / CHECKPOINT_FILE, {
            "epoch": epoch, "model": core.state_dict(), "optimizer": opt.state_dict(),
            "rng": rng_state(), "best_val_acc": prog.best, "val_acc": prog.val_acc,
            "peak_stored_bytes": prog.peak, "metrics": list(prog.lines),
            # batches of epoch e are drawn from _batch_seed(seed, e): nothing else to save
            "batch_seed": {"scheme": "seed * 1000003 + epoch", "seed": config.seed},
            "config": dataclasses.asdict(config), "strategy": strategy.to_string()})
    except RunWriteError as e:
        raise RunWriteError(f"{e.what}; {_kept(out, prog.saved)}; free space and continue with --resume {out}") from None


def _epoch_line(row: dict, config: TrainConfig, sequence: bool) -> str:
    activity = row["activity"]
    return (f"epoch {row['epoch']:3d}/{config.epochs}  loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.4f}  val_acc {row['val_acc']:.4f}  {row['seconds']:.1f}s"
            + (f"  bits/char train {row['train_bpc']:.3f} val {row['val_bpc']:.3f}" if sequence else "")
            + ("  activity " + " ".join(f"{k} {v:.3f}" for k, v in activity.items()) if activity else ""))


def _train(config: TrainConfig, strategy: Strategy, out, progress: bool, log, resume: bool, d: Dist) -> dict:
    dataset = get_dataset(config.dataset, config.T, **(config.dataset_options or {}))
    sequence = bool(getattr(dataset, "sequence_targets", False))
    torch.manual_seed(config.seed)
    core = build_model(config, dataset.input_size, dataset.num_classes, sequence=sequence,
                       input_shape=getattr(dataset, "input_shape", None))
    return _run(config, strategy, out, progress, log, resume, d, dataset, core, sequence)


def _run(config, strategy: Strategy, out, progress: bool, log, resume: bool, d: Dist, dataset, core: nn.Module,
         sequence: bool) -> dict:
    """The loop behind `train` and `fit`: ``config`` is a `TrainConfig` (the CLI's models, built-in
    datasets) or a `FitConfig` (a user's model and Datasets behind `TorchDatasets`)."""
    user = isinstance(config, FitConfig)
    local_batch = -(-config.batch_size // d.world)  # what one process holds
    strategy, out, ckpt = _open_run(config, core, strategy, out, resume, d,
                                    (config.T, local_batch,
                                     *getattr(dataset, "input_shape", (getattr(dataset, "input_size", None),))))
    core.to(d.device)
    opt = torch.optim.Adam(core.parameters(), lr=config.lr)
    prog = _restore(core, opt, ckpt, config, out)
    model: nn.Module = core
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(core, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    approximate = getattr(strategy, "approximate", not strategy.exact)
    if d.is_main:
        _write_run_files(out, config, strategy, approximate, d, prog.lines, cell_backends(core))
    say = _printer(progress, log, d)
    _announce(say, config, dataset, strategy, out, d, local_batch, sequence, resume, ckpt is not None, prog.done,
              approximate)
    start, resumed_from = time.perf_counter(), prog.done
    epoch_activity: dict = {}
    val_bpc = prog.last.get("val_bpc", float("nan"))
    metrics_file = open(out / METRICS_FILE, "a") if d.is_main else contextlib.nullcontext()
    with metrics_file as metrics:
        for epoch in range(prog.done + 1, config.epochs + 1):
            t0 = time.perf_counter()
            try:
                stats = _train_epoch(model, core, opt, dataset, config, epoch, d, sequence, progress, out,
                                     prog.saved, with_aux=not user)
            except DiskSpaceError as e:  # a double-disk strategy's file does not fit
                raise DiskSpaceError(f"{e}; {_kept(out, prog.saved)}") from None
            val = (evaluate(core, dataset, "val", config.batch_size, _batch_seed(config.seed, 0), dist=d,
                            with_loss=sequence) if dataset.num_examples("val") else float("nan"))
            row = _epoch_row(epoch, stats, val, time.perf_counter() - t0, sequence)
            prog.done, prog.val_acc = epoch, row["val_acc"]
            prog.best, prog.peak = max(prog.best, prog.val_acc), max(prog.peak, stats.peak)
            val_bpc = row.get("val_bpc", val_bpc)
            prog.lines.append(json.dumps(row))
            epoch_activity = stats.activity
            _check_state(out, epoch, core, opt, prog, config)  # every process: they stop together
            if d.is_main:
                _save_epoch(metrics, out, epoch, core, opt, prog, config, strategy)
            prog.saved = epoch
            say(_epoch_line(row, config, sequence))
    summary = _finish(say, config, dataset, strategy, out, prog, resumed_from, time.perf_counter() - start,
                      approximate, epoch_activity, val_bpc, sequence, resume)
    return {**prog.last, **summary} if user else summary


def _finish(say, config: TrainConfig, dataset, strategy: Strategy, out: Path, prog: _Progress, resumed_from: int,
            seconds: float, approximate: bool, epoch_activity: dict, val_bpc: float, sequence: bool,
            resume: bool) -> dict:
    """The run's summary (see `train`), said in one line."""
    epochs_run = prog.done - resumed_from
    summary = {"val_acc": prog.val_acc, "best_val_acc": prog.best, "seconds": seconds,
               "peak_stored_bytes": prog.peak, "approximate_gradient": approximate, "activity": epoch_activity,
               "epochs_run": epochs_run, "resumed_from": resumed_from if resume else None, "out": str(out)}
    if sequence:
        summary.update(val_bpc=val_bpc, unigram_bits=getattr(dataset, "unigram_bits", None))
    if epochs_run == 0:
        say(f"nothing to do: the run in {out} already finished {prog.done}/{config.epochs} epochs "
            f"(val_acc {prog.val_acc:.4f}, best {prog.best:.4f}); pass a larger --epochs to train longer")
        return summary
    say(f"done: val_acc {prog.val_acc:.4f} (best {prog.best:.4f}), {seconds:.1f}s wall, "
        + (f"val {val_bpc:.3f} bits/char (unigram entropy {dataset.unigram_bits:.3f}), "
           if sequence and hasattr(dataset, "unigram_bits") else "")
        + f"peak stored {prog.peak} bytes ({prog.peak / 2**20:.2f} MiB) with {strategy.to_string()}"
        f"{' (approximate gradient)' if approximate else ''}; "
        f"metrics in {out / METRICS_FILE}")
    return summary


class ModelStrategy:
    """The strategies of a model's `sb.Recurrent` layers, named as one (for the run files and the
    messages): the common strategy's string, ``name=strategy`` pairs when they differ, or
    ``memory_budget:<size>`` when the planner picks them."""

    def __init__(self, layers: "list[tuple[str, Recurrent]]", budget: "int | None" = None):
        self._layers, self._budget = layers, budget

    def to_string(self) -> str:
        if self._budget is not None:
            return f"memory_budget:{format_bytes(self._budget)}"
        names = {name or "model": layer.strategy.to_string() for name, layer in self._layers if layer.strategy}
        if not names:
            return "full" if not self._layers else "planned"
        kinds = set(names.values())
        return kinds.pop() if len(kinds) == 1 else ",".join(f"{k}={v}" for k, v in names.items())

    @property
    def exact(self) -> bool:
        return not self.approximate

    @property
    def approximate(self) -> bool:
        return any(getattr(layer.strategy, "approximate", not layer.strategy.exact)
                   for _, layer in self._layers if layer.strategy is not None)


def apply_strategy(model: nn.Module, strategy: "Strategy | str | None" = None,
                   memory_budget: "int | str | None" = None) -> ModelStrategy:
    """Give every `sb.Recurrent` in ``model`` the ``strategy``, or the ``memory_budget`` (each layer's
    planner then picks its strategy per input shape); with neither, leave them as built. ValueError
    if one is given and the model has no `sb.Recurrent` (a model that calls `sb.scan` itself chooses
    its strategies there)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Recurrent)]
    if (strategy is not None or memory_budget is not None) and not layers:
        what = f"strategy={strategy!r}" if strategy is not None else f"memory_budget={memory_budget!r}"
        raise ValueError(f"sb.fit: {what} applies to the sb.Recurrent layers of the model, and "
                         f"{type(model).__name__} has none; pass the strategy to its own sb.scan calls, or drop it")
    for _, layer in layers:
        if memory_budget is not None:
            layer.memory_budget = memory_budget
        elif strategy is not None:
            layer.memory_budget = None
            layer.strategy = strategy
    return ModelStrategy(layers, None if memory_budget is None else parse_bytes(memory_budget))


def fit(model: nn.Module, train, val=None, *, epochs: int, batch_size: int = 32, lr: float = 1e-3,
        strategy: "Strategy | str | None" = None, memory_budget: "int | str | None" = None,
        out: "str | Path | None" = None, resume: bool = False, seed: int = 0, progress: bool = True,
        log=None) -> dict:
    """Train ``model`` with Adam on a Dataset of ``(x, label)`` items, x shaped (T, ...), writing the
    run folder `sparsebptt train` writes (config.json, metrics.jsonl, checkpoint.pt: see the module
    docstring) and returning the final metrics.

    ``model(x)`` maps a time-major batch x (T, B, ...) to logits (B, classes); batches are
    collated time-major (`collate_time_major`: tonic's ``ToFrame`` output works as it is). Every
    epoch is checkpointed atomically, with a checksum; ``resume=True`` continues the run in ``out``
    from its last finished epoch (each epoch recorded once, the batches it would have seen), with
    the same arguments but ``epochs``. Non-finite losses, gradients, parameters and checkpoints stop
    the run as in `train`.

    Args:
        model: an nn.Module (its parameters' device is the training device).
        train, val: map-style ``torch.utils.data.Dataset``s; ``val`` None leaves ``val_acc`` NaN.
        epochs, batch_size, lr: passes over ``train``, examples per step, Adam's learning rate.
        strategy: a `Strategy` or string given to every `sb.Recurrent` inside ``model``; None
            keeps each layer's own.
        memory_budget: instead of ``strategy``, the budget each `sb.Recurrent`'s planner fits.
        out: the run folder (default ``runs/<timestamp>``); resume: continue the run in ``out``.
        seed: seeds the global RNGs (dropout, stochastic cells) and every epoch's batch order.
        progress: a tqdm bar per epoch; log: where the per-epoch lines go (default stdout).

    Returns:
        The last epoch's metrics (``epoch, train_loss, train_acc, val_acc, peak_stored_bytes,
        activity, backward_macs``) and the run's summary (``best_val_acc``, ``seconds``,
        ``epochs_run``, ``resumed_from``, ``out``...), as `train` returns it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sb.fit: model must be an nn.Module mapping x (T, B, ...) to logits, got "
                        f"{type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"sb.fit: {type(model).__name__} has no parameters to train")
    data = TorchDatasets(train, val)
    if isinstance(strategy, Strategy):
        strategy_name = strategy.to_string()
    else:
        strategy_name = None if strategy is None else parse_strategy(strategy).to_string()
    if memory_budget is not None:
        parse_bytes(memory_budget)
    config = FitConfig(model=type(model).__name__, dataset=data.name, T=data.T, input_shape=data.example_shape,
                       n_train=data.num_examples("train"), n_val=data.num_examples("val"), epochs=epochs,
                       batch_size=batch_size, lr=lr, strategy=strategy_name, memory_budget=memory_budget, seed=seed)
    if resume and out is None:
        raise ValueError("sb.fit: resume=True needs the run folder `out` to continue")
    d = setup(params[0].device)
    finished = False
    try:
        torch.manual_seed(seed)
        summary = _run(config, None, out, progress and d.is_main, sys.stdout if log is None else log, resume, d,
                       data, model, sequence=False)
        finished = True
    finally:
        teardown(d, finished)
    return summary
