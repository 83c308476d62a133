"""Train a classifier on a `sparsebptt.data` dataset under any memory strategy.

The model (``--model``) is a stack of LIF layers scanned with ``reduce="sum"`` (so no (T, B, H)
tensor is held) and a linear readout of each neuron's spike count, or a stack of GRU / LSTM /
DeltaGRU / DeltaLSTM layers scanned with ``reduce="last"`` and a readout of the last hidden
state, or of EGRU layers scanned with ``reduce="mean"`` (their output is the sparse event output,
so the readout sees each unit's mean event output over the sequence).

A dataset with ``sequence_targets = True`` (``text``: next-character prediction) has one label
per step, y (B, T): the model is then a `SequenceModel` (the stack scanned with ``reduce=None``
and the readout applied at every step), every step is scored, and each metrics line adds
``train_bpc, val_loss, val_bpc`` (bits per character: the cross-entropy over ln 2).

With ``activity_reg > 0`` (EGRU models) the loss adds ``activity_reg`` times
`sparsebptt.cells.activity_regularizer` (event rates above ``activity_target``). A run writes
into its folder:

- ``config.json``: the `TrainConfig`, the resolved strategy and the library versions;
- ``metrics.jsonl``: one JSON object per epoch with ``epoch, train_loss, train_acc, val_acc,
  seconds, peak_stored_bytes, activity, backward_macs``;
- ``checkpoint.pt``: model, optimizer, RNG states, best accuracy and the metrics so far, replaced
  atomically after every epoch; ``train(..., resume=True)`` (``sparsebptt train --resume DIR``)
  continues from it (see `sparsebptt.train.runs`).

Under ``torchrun`` the processes train one model with DDP, each on its share of every batch
(see `sparsebptt.train.distributed`).

``peak_stored_bytes``, ``activity`` (per layer: spike rate of LIF layers, fraction of transmitted
deltas of Delta layers, event rate of EGRU layers; empty for dense GRU / LSTM) and ``backward_macs`` are what `sb.trace`
counts for the scan during the forward and backward of the epoch's first training batch (a full
batch; the readout is not part of the scan).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import cells
from ..data import get_dataset
from ..scan import scan
from ..planner import parse_bytes, plan
from ..strategies import Strategy, parse_strategy
from ..trace import trace
from .distributed import Dist, all_sum, broadcast_object, setup, shard, share_loss, teardown
from .runs import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RunError, atomic_write, load_checkpoint,
                   read_run_meta, rng_state, save_checkpoint, set_rng_state)

__all__ = ["TrainConfig", "SpikingClassifier", "RecurrentClassifier", "SequenceModel", "build_model", "train",
           "default_out_dir", "chrono_init_", "METRIC_KEYS", "SEQUENCE_METRIC_KEYS", "MODELS", "GATE_INITS"]

#: keys of every line of metrics.jsonl
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_acc", "seconds", "peak_stored_bytes",
               "activity", "backward_macs")

#: keys of every line of metrics.jsonl for a dataset with one label per step (``text``)
SEQUENCE_METRIC_KEYS = METRIC_KEYS + ("train_bpc", "val_loss", "val_bpc")

#: --model name -> (cell class name in `sparsebptt.cells`, default threshold or None). EGRU's
#: default "beta" draws each unit's initial threshold from EvNN's Beta distribution (mean 0.3).
MODELS = {"lif": ("LIF", 1.0), "gru": ("GRU", None), "lstm": ("LSTM", None),
          "delta-gru": ("DeltaGRU", 0.1), "delta-lstm": ("DeltaLSTM", 0.1), "egru": ("EGRU", "beta")}

#: --gate-init names: how the gate biases of the gated models start
GATE_INITS = ("uniform", "chrono")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as config.json.

    dataset: a name from `sparsebptt.data.DATASETS`.
    T: time steps per example.
    epochs, batch_size: passes over the training split and examples per step.
    model: "lif" (spiking), "gru", "lstm", "delta-gru", "delta-lstm" or "egru" (see `MODELS`).
    hidden: neurons per layer; layers: number of layers.
    lr: Adam learning rate.
    strategy: string for `sb.parse_strategy` ("full", "checkpoint:8", "revolve:4", ...).
    memory_budget: if set ("256MiB", bytes), `sb.plan` picks the fastest strategy whose stored
        bytes fit it, instead of ``strategy``.
    beta: LIF membrane decay per step.
    threshold: LIF firing threshold (default 1.0), or the delta threshold of the input and hidden
        deltas of delta-gru / delta-lstm (default 0.1), or the initial threshold of every EGRU
        unit (default "beta": EvNN's per-unit draw, mean 0.3); None takes the model's default.
    seed: seeds the initial weights and every batch (order and spikes).
    threads: torch intra-op threads while training (restored afterwards). The default 1 is the
        fastest for these small matmuls and, on a shared machine, avoids the oversubscription
        that made a 2-thread run 50x slower on 2 busy cores; raise it for large hidden sizes.
    gate_init: "uniform" (PyTorch's initialisation) or "chrono" (gated models only, see
        `chrono_init_`): memory time scales spread up to T, which long-range tasks need.
    dataset_options: keyword options of the dataset (e.g. ``{"noise_rate": 0.02}`` for
        delayed-recall, ``{"max_rate": 0.5}`` for digits-spikes, ``{"path": "my.txt"}`` for
        text); None for its defaults.
    activity_reg: strength of the EGRU activity regulariser added to the loss (0: none; egru
        models only); activity_target: the event rate per step it allows before it penalises.
    """

    dataset: str = "digits-spikes"
    model: str = "lif"
    T: int = 25
    epochs: int = 20
    batch_size: int = 64
    hidden: int = 128
    layers: int = 2
    lr: float = 2e-3
    strategy: str = "full"
    memory_budget: "str | int | None" = None
    beta: float = 0.9
    threshold: float | None = None
    seed: int = 0
    threads: int = 1
    gate_init: str = "uniform"
    dataset_options: "dict | None" = None
    activity_reg: float = 0.0
    activity_target: float = 0.05

    def __post_init__(self):
        for name in ("T", "epochs", "batch_size", "hidden", "layers", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"TrainConfig: lr must be a positive number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig: seed must be an int, got {self.seed!r}")
        if self.model not in MODELS:
            raise ValueError(f"TrainConfig: unknown model {self.model!r}; valid models are: {', '.join(MODELS)}")
        th = self.threshold
        if th is not None:
            if MODELS[self.model][1] is None:
                raise ValueError(f"TrainConfig: model {self.model!r} has no threshold, got threshold={th!r}")
            low_ok = th > 0 if self.model == "lif" else th >= 0
            if isinstance(th, bool) or not isinstance(th, (int, float)) or not (low_ok and th < math.inf):
                raise ValueError(f"TrainConfig: threshold must be a number {'> 0' if self.model == 'lif' else '>= 0'} "
                                 f"for model {self.model!r}, got {th!r}")
        if self.dataset_options is not None and not isinstance(self.dataset_options, dict):
            raise ValueError(f"TrainConfig: dataset_options must be a dict of the dataset's keyword options "
                             f"or None, got {type(self.dataset_options).__name__}")
        for name, hi in (("activity_reg", math.inf), ("activity_target", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi or v == math.inf:
                raise ValueError(f"TrainConfig: {name} must be a number in [0, {hi:g}], got {v!r}")
        if self.activity_reg > 0 and self.model != "egru":
            raise ValueError(f"TrainConfig: activity_reg needs model 'egru' (the event rates it penalises), "
                             f"got model {self.model!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"TrainConfig: unknown gate_init {self.gate_init!r}; valid gate inits are: "
                             f"{', '.join(GATE_INITS)}")
        if self.gate_init == "chrono" and self.model == "lif":
            raise ValueError("TrainConfig: gate_init='chrono' needs a gated model (gru, lstm, delta-gru, "
                             "delta-lstm); model 'lif' has no gates")

    @property
    def resolved_threshold(self) -> float | None:
        """``threshold``, or the model's default when it is None."""
        return MODELS[self.model][1] if self.threshold is None else float(self.threshold)


class SpikingClassifier(nn.Module):
    """``Stack([LIF(in, H), LIF(H, H), ...])`` scanned with reduce="sum", then ``Linear(H, classes)``.

    ``forward(x)`` takes spikes x (T, B, input_size) and returns logits (B, num_classes). The
    readout sees spike counts divided by T (firing rates), so its scale does not depend on T.
    """

    def __init__(self, input_size: int, num_classes: int, *, hidden: int = 128, layers: int = 2,
                 beta: float = 0.9, threshold: float = 1.0, strategy: "Strategy | str" = "full"):
        super().__init__()
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"SpikingClassifier: layers must be a positive int, got {layers!r}")
        sizes = [input_size] + [hidden] * layers
        self.cell = cells.Stack([cells.LIF(a, b, beta=beta, threshold=threshold)
                                 for a, b in zip(sizes, sizes[1:])])
        self.readout = nn.Linear(hidden, num_classes)
        self.strategy = parse_strategy(strategy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts, _ = scan(self.cell, x, strategy=self.strategy, reduce="sum")  # [B, H]
        return self.readout(counts / x.shape[0])  # [B, classes]


def _recurrent_stack(owner: str, model: str, input_size: int, hidden: int, layers: int,
                     threshold, activity_reg: float) -> "cells.Stack":
    """``Stack([cell(in, H), cell(H, H), ...])`` of the recurrent model called ``model``."""
    if model not in MODELS or model == "lif":
        raise ValueError(f"{owner}: unknown model {model!r}; valid models are: "
                         f"{', '.join(m for m in MODELS if m != 'lif')}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{owner}: layers must be a positive int, got {layers!r}")
    cls = getattr(cells, MODELS[model][0])
    default = MODELS[model][1]
    if model == "egru":
        kw = {"threshold_init": default if threshold is None else threshold,
              "count_events": activity_reg > 0}
    else:
        kw = {} if default is None else {"threshold": default if threshold is None else threshold}
    sizes = [input_size] + [hidden] * layers
    return cells.Stack([cls(a, b, **kw) for a, b in zip(sizes, sizes[1:])])


class _ActivityLoss:
    """``aux_loss``: the EGRU activity regulariser of the last forward (None without one)."""

    aux_loss: "torch.Tensor | None" = None

    def _set_aux_loss(self, state, T: int) -> None:
        self.aux_loss = None
        if self.activity_reg > 0:
            self.aux_loss = self.activity_reg * cells.activity_regularizer(
                self.cell, state, T, self.activity_target)


class RecurrentClassifier(_ActivityLoss, nn.Module):
    """``Stack([cell(in, H), cell(H, H), ...])`` scanned with reduce="last" (EGRU: "mean", its
    output being the sparse event output), then ``Linear(H, classes)``.

    ``cell`` is a name from `MODELS` other than "lif"; ``threshold`` is the delta threshold of the
    Delta cells (input and hidden), or EGRU's initial threshold. ``forward(x)`` takes x (T, B,
    input_size) and returns logits; with ``activity_reg > 0`` (EGRU) it also sets ``aux_loss``,
    the term the trainer adds to the loss.
    """

    def __init__(self, input_size: int, num_classes: int, *, model: str = "gru", hidden: int = 128,
                 layers: int = 1, threshold: float | None = None, strategy: "Strategy | str" = "full",
                 activity_reg: float = 0.0, activity_target: float = 0.05):
        super().__init__()
        self.cell = _recurrent_stack("RecurrentClassifier", model, input_size, hidden, layers, threshold,
                                     activity_reg)
        self.readout = nn.Linear(hidden, num_classes)
        self.strategy = parse_strategy(strategy)
        self.reduce = "mean" if model == "egru" else "last"
        self.activity_reg, self.activity_target = float(activity_reg), float(activity_target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, state = scan(self.cell, x, strategy=self.strategy, reduce=self.reduce)  # [B, H]
        self._set_aux_loss(state, x.shape[0])
        return self.readout(h)  # [B, classes]


class SequenceModel(_ActivityLoss, nn.Module):
    """A recurrent stack scanned with reduce=None and ``Linear(H, classes)`` at every step.

    ``forward(x)`` takes x (T, B, input_size) and returns logits (B, T, classes), batch-first
    like the labels of a dataset with ``sequence_targets`` (``text``). Arguments as
    `RecurrentClassifier`.
    """

    def __init__(self, input_size: int, num_classes: int, *, model: str = "egru", hidden: int = 128,
                 layers: int = 1, threshold: float | None = None, strategy: "Strategy | str" = "full",
                 activity_reg: float = 0.0, activity_target: float = 0.05):
        super().__init__()
        self.cell = _recurrent_stack("SequenceModel", model, input_size, hidden, layers, threshold,
                                     activity_reg)
        self.readout = nn.Linear(hidden, num_classes)
        self.strategy = parse_strategy(strategy)
        self.activity_reg, self.activity_target = float(activity_reg), float(activity_target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, state = scan(self.cell, x, strategy=self.strategy)  # [T, B, H]
        self._set_aux_loss(state, x.shape[0])
        return self.readout(h.transpose(0, 1))  # [B, T, classes]


def chrono_init_(cell: nn.Module, T: int) -> nn.Module:
    """Chrono initialisation (Tallec & Ollivier, "Can recurrent neural networks warp time?", 2018).

    Every GRU / DeltaGRU layer of ``cell`` (one cell or a `Stack`) gets update-gate biases
    ``b_z = log(u)``, u ~ U(1, T - 1), so unit j starts by keeping ``sigmoid(b_z) = 1 - 1/(1+u)``
    of its state per step: time scales spread from 1 to T steps. LSTM / DeltaLSTM layers get
    forget-gate biases ``log(u)`` and input-gate biases ``-log(u)``. The gate biases live in
    ``bias_ih`` (their ``bias_hh`` part is zeroed). Draws from the global torch RNG.
    """
    layers = getattr(cell, "layers", [cell])
    with torch.no_grad():
        for layer in layers:
            w, bi, bh = (getattr(layer, n, None) for n in ("weight_ih", "bias_ih", "bias_hh"))
            if w is None or bi is None or bh is None:
                raise ValueError(f"chrono_init_: {type(layer).__name__} has no gate biases "
                                 "(bias_ih, bias_hh); chrono init needs a GRU or LSTM layer with bias")
            H = layer.hidden_size
            if w.shape[0] not in (3 * H, 4 * H):
                raise ValueError(f"chrono_init_: {type(layer).__name__} has {w.shape[0]} gate rows for "
                                 f"{H} units; expected 3 (GRU) or 4 (LSTM) gates")
            b = torch.log(torch.empty(H).uniform_(1.0, max(float(T) - 1.0, 1.0)))
            bi[H:2 * H] = b  # GRU gates r, z, n: z; LSTM gates i, f, g, o: f
            bh[H:2 * H] = 0.0
            if w.shape[0] == 4 * H:
                bi[:H] = -b
                bh[:H] = 0.0
    return cell


def build_model(config: TrainConfig, input_size: int, num_classes: int, *, sequence: bool = False) -> nn.Module:
    """The model a `TrainConfig` describes, for a dataset with these sizes; ``sequence``: one
    label per step (a `SequenceModel`)."""
    if config.model == "lif":
        if sequence:
            raise ValueError(f"dataset {config.dataset!r} has a label per step; train it with a recurrent "
                             f"model ({', '.join(m for m in MODELS if m != 'lif')}), not 'lif'")
        return SpikingClassifier(input_size, num_classes, hidden=config.hidden, layers=config.layers,
                                 beta=config.beta, threshold=config.resolved_threshold,
                                 strategy=config.strategy)
    cls = SequenceModel if sequence else RecurrentClassifier
    model = cls(input_size, num_classes, model=config.model, hidden=config.hidden, layers=config.layers,
                threshold=config.threshold, strategy=config.strategy, activity_reg=config.activity_reg,
                activity_target=config.activity_target)
    if config.gate_init == "chrono":
        chrono_init_(model.cell, config.T)
    return model


def default_out_dir() -> Path:
    """``runs/<timestamp>`` under the current directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


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


def _prepare_out(out: "str | Path") -> Path:
    out = Path(out)
    if (out / METRICS_FILE).exists():
        raise FileExistsError(f"run folder {str(out)!r} already holds metrics.jsonl; choose another --out, "
                              f"remove the old run, or continue it with --resume {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


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
        FloatingPointError: a non-finite loss; the message names the epoch and batch, and the
            checkpoint of the last finished epoch stays as it was.
    """
    strategy = parse_strategy(config.strategy)  # fail before any work on a bad string
    if config.memory_budget is not None:
        parse_bytes(config.memory_budget)
    if resume and out is None:
        raise ValueError("train: resume=True needs the run folder `out` to continue")
    d = setup(device)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, strategy, out, progress and d.is_main, sys.stdout if log is None else log,
                      resume, d)
    finally:
        torch.set_num_threads(prev_threads)
        teardown(d)


def _check_resume(config: TrainConfig, out: Path) -> dict:
    meta = read_run_meta(out)
    diffs = config_mismatches(config_from_run(out), config)
    if diffs:
        raise RunError(f"cannot resume {str(out)!r} with another config ({'; '.join(diffs)}); drop those "
                       "options to continue the run as it was, or start a new run with --out")
    return meta


def _train(config: TrainConfig, strategy: Strategy, out, progress: bool, log, resume: bool, d: Dist) -> dict:
    dataset = get_dataset(config.dataset, config.T, **(config.dataset_options or {}))
    sequence = bool(getattr(dataset, "sequence_targets", False))
    torch.manual_seed(config.seed)
    core = build_model(config, dataset.input_size, dataset.num_classes, sequence=sequence)
    local_batch = -(-config.batch_size // d.world)  # what one process holds
    if resume:
        out = Path(out)
        meta = _check_resume(config, out)
        strategy = parse_strategy(meta.get("strategy", config.strategy))  # as planned then
        core.strategy = strategy
        ckpt = load_checkpoint(out / CHECKPOINT_FILE)
    else:
        if config.memory_budget is not None:
            strategy = plan(core.cell, (config.T, local_batch, dataset.input_size), config.memory_budget)
            core.strategy = strategy
        ckpt = None
        err = None
        if d.is_main:
            out = default_out_dir() if out is None else Path(out)
            try:
                _prepare_out(out)
            except FileExistsError as e:
                err = str(e)
        out, err = broadcast_object((str(out) if out is not None else None, err), d)
        out = Path(out)
        if err:
            raise FileExistsError(err)
    core.to(d.device)
    opt = torch.optim.Adam(core.parameters(), lr=config.lr)
    done, best, peak, lines, val_acc = 0, 0.0, 0, [], float("nan")
    if ckpt is not None:
        core.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        done, best, peak = int(ckpt["epoch"]), float(ckpt["best_val_acc"]), int(ckpt["peak_stored_bytes"])
        lines, val_acc = list(ckpt["metrics"]), float(ckpt["val_acc"])
        if len(lines) != done:
            raise RunError(f"checkpoint {str(out / CHECKPOINT_FILE)!r} says epoch {done} but holds "
                           f"{len(lines)} metrics lines; it is damaged")
        if done > config.epochs:
            raise RunError(f"the run in {str(out)!r} already finished {done} epochs; pass --epochs {done} or "
                           "more to continue it")
        set_rng_state(ckpt["rng"])  # as at the end of epoch `done` (after the model was built)
    model: nn.Module = core
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(core, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    approximate = getattr(strategy, "approximate", not strategy.exact)
    if d.is_main:
        meta = {**dataclasses.asdict(config), "threshold": config.resolved_threshold,
                "strategy": strategy.to_string(), "approximate_gradient": approximate,
                "sparsebptt": _version(), "torch": torch.__version__,
                "train_config": dataclasses.asdict(config), "world_size": d.world,
                "device": str(d.device)}
        atomic_write(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        atomic_write(out / METRICS_FILE, "".join(line + "\n" for line in lines))

    def say(msg: str) -> None:
        if not d.is_main:
            return
        if progress:
            tqdm.write(msg, file=log)
        else:
            print(msg, file=log, flush=True)

    say(f"{config.dataset}: {dataset.num_examples('train')} train / {dataset.num_examples('val')} val, "
        f"T={config.T}, model={config.model}"
        + (f" (threshold {config.resolved_threshold})" if config.resolved_threshold is not None else "")
        + f", strategy={strategy.to_string()}, run folder {out}"
        + (f", {d.world} processes ({d.device.type}), about {local_batch} examples each per batch"
           if d.enabled else ""))
    if sequence and hasattr(dataset, "unigram_bits"):
        say(f"{dataset!r}: a model that ignores context needs {dataset.unigram_bits:.3f} bits per character")
    if resume:
        say(f"resuming after epoch {done}/{config.epochs}" if ckpt is not None
            else "resuming: no epoch had finished, starting at epoch 1")
    if approximate:
        say(f"note: {strategy.to_string()} computes an approximate gradient (time-skipped BPTT), "
            "not the gradient of full BPTT")
    n_batches = dataset.num_batches("train", config.batch_size)
    start = time.perf_counter()
    epoch_activity: dict = {}
    val_bpc = json.loads(lines[-1]).get("val_bpc", float("nan")) if lines else float("nan")
    metrics_file = open(out / METRICS_FILE, "a") if d.is_main else contextlib.nullcontext()
    with metrics_file as metrics:
        for epoch in range(done + 1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum, correct, seen, epoch_peak, activity, bwd_macs = 0.0, 0, 0, 0, {}, 0
            batches = dataset.batches("train", config.batch_size, seed=_batch_seed(config.seed, epoch))
            bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}/{config.epochs}",
                       leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for i, (x, y) in enumerate(bar):
                x, y, n_global, empty = shard(x, y, d.rank, d.world)
                x, y = x.to(d.device), y.to(d.device)
                opt.zero_grad(set_to_none=True)
                with (trace() if i == 0 else contextlib.nullcontext()) as t:
                    logits = model(x)
                    if sequence:  # one label per step: score every step
                        n_global *= y.shape[1]
                        logits, y = _per_label(logits, y)
                    loss, loss_total = share_loss(logits, y, n_global, d.world, empty)
                    aux = getattr(core, "aux_loss", None)
                    if aux is not None:  # the EGRU activity regulariser (dropped: it holds the graph)
                        core.aux_loss = None
                        loss = loss + aux
                    loss.backward()
                if t is not None:
                    epoch_peak, activity, bwd_macs = t.peak_stored_bytes, t.activity, t.backward_macs
                hits = 0 if empty else int((logits.argmax(-1) == y).sum())
                batch_loss, hits, n = all_sum([loss_total.item(), hits, 0 if empty else len(y)], d)
                if not math.isfinite(batch_loss):
                    kept = (f"the checkpoint of epoch {epoch - 1} is kept in {out / CHECKPOINT_FILE}"
                            if epoch > 1 else "no epoch had finished, so there is no checkpoint")
                    raise FloatingPointError(f"training diverged: loss {batch_loss / n} at epoch {epoch}, "
                                             f"batch {i + 1}/{n_batches}; {kept}; lower --lr (now {config.lr}) "
                                             "and start a new run")
                opt.step()
                loss_sum += batch_loss
                correct += int(hits)
                seen += int(n)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.close()
            val_acc = evaluate(core, dataset, "val", config.batch_size, _batch_seed(config.seed, 0), dist=d,
                               with_loss=sequence)
            if sequence:
                val_acc, val_loss = val_acc
            best, peak = max(best, val_acc), max(peak, epoch_peak)
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_acc": val_acc, "seconds": time.perf_counter() - t0,
                   "peak_stored_bytes": epoch_peak, "activity": activity, "backward_macs": bwd_macs}
            if sequence:
                val_bpc = val_loss / math.log(2)
                row.update(train_bpc=row["train_loss"] / math.log(2), val_loss=val_loss, val_bpc=val_bpc)
            lines.append(json.dumps(row))
            epoch_activity = activity
            if d.is_main:  # the line first, then the checkpoint that lists it (see runs.py)
                metrics.write(lines[-1] + "\n")
                metrics.flush()
                os.fsync(metrics.fileno())
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "epoch": epoch, "model": core.state_dict(), "optimizer": opt.state_dict(),
                    "rng": rng_state(), "best_val_acc": best, "val_acc": val_acc,
                    "peak_stored_bytes": peak, "metrics": list(lines),
                    # batches of epoch e are drawn from _batch_seed(seed, e): nothing else to save
                    "batch_seed": {"scheme": "seed * 1000003 + epoch", "seed": config.seed},
                    "config": dataclasses.asdict(config), "strategy": strategy.to_string()})
            say(f"epoch {epoch:3d}/{config.epochs}  loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_acc']:.4f}  val_acc {val_acc:.4f}  {row['seconds']:.1f}s"
                + (f"  bits/char train {row['train_bpc']:.3f} val {row['val_bpc']:.3f}" if sequence else "")
                + ("  activity " + " ".join(f"{k} {v:.3f}" for k, v in activity.items()) if activity else ""))
    seconds = time.perf_counter() - start
    epochs_run = config.epochs - done
    summary = {"val_acc": val_acc, "best_val_acc": best, "seconds": seconds,
               "peak_stored_bytes": peak, "approximate_gradient": approximate, "activity": epoch_activity,
               "epochs_run": epochs_run, "resumed_from": done if resume else None, "out": str(out)}
    if sequence:
        summary.update(val_bpc=val_bpc, unigram_bits=getattr(dataset, "unigram_bits", None))
    if epochs_run == 0:
        say(f"nothing to do: the run in {out} already finished {done}/{config.epochs} epochs "
            f"(val_acc {val_acc:.4f}, best {best:.4f}); pass a larger --epochs to train longer")
        return summary
    say(f"done: val_acc {val_acc:.4f} (best {best:.4f}), {seconds:.1f}s wall, "
        + (f"val {val_bpc:.3f} bits/char (unigram entropy {dataset.unigram_bits:.3f}), "
           if sequence and hasattr(dataset, "unigram_bits") else "")
        + f"peak stored {peak} bytes ({peak / 2**20:.2f} MiB) with {strategy.to_string()}"
        f"{' (approximate gradient)' if approximate else ''}; "
        f"metrics in {out / METRICS_FILE}")
    return summary
