"""Train a classifier on a `sparsebptt.data` dataset under any memory strategy.

The model (``--model``) is a stack of LIF layers scanned with ``reduce="sum"`` (so no (T, B, H)
tensor is held) and a linear readout of each neuron's spike count, or a stack of GRU / LSTM /
DeltaGRU / DeltaLSTM layers scanned with ``reduce="last"`` and a readout of the last hidden
state. A run writes into its folder:

- ``config.json``: the `TrainConfig`, the resolved strategy and the library versions;
- ``metrics.jsonl``: one JSON object per epoch with ``epoch, train_loss, train_acc, val_acc,
  seconds, peak_stored_bytes, activity, backward_macs``.

``peak_stored_bytes``, ``activity`` (per layer: spike rate of LIF layers, fraction of transmitted
deltas of Delta layers; empty for dense GRU / LSTM) and ``backward_macs`` are what `sb.trace`
counts for the scan during the forward and backward of the epoch's first training batch (a full
batch; the readout is not part of the scan).
"""
from __future__ import annotations

import dataclasses
import json
import math
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

__all__ = ["TrainConfig", "SpikingClassifier", "RecurrentClassifier", "build_model", "train",
           "default_out_dir", "chrono_init_", "METRIC_KEYS", "MODELS", "GATE_INITS"]

#: keys of every line of metrics.jsonl
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_acc", "seconds", "peak_stored_bytes",
               "activity", "backward_macs")

#: --model name -> (cell class name in `sparsebptt.cells`, default threshold or None)
MODELS = {"lif": ("LIF", 1.0), "gru": ("GRU", None), "lstm": ("LSTM", None),
          "delta-gru": ("DeltaGRU", 0.1), "delta-lstm": ("DeltaLSTM", 0.1)}

#: --gate-init names: how the gate biases of the gated models start
GATE_INITS = ("uniform", "chrono")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as config.json.

    dataset: a name from `sparsebptt.data.DATASETS`.
    T: time steps per example.
    epochs, batch_size: passes over the training split and examples per step.
    model: "lif" (spiking), "gru", "lstm", "delta-gru" or "delta-lstm" (see `MODELS`).
    hidden: neurons per layer; layers: number of layers.
    lr: Adam learning rate.
    strategy: string for `sb.parse_strategy` ("full", "checkpoint:8", "revolve:4", ...).
    memory_budget: if set ("256MiB", bytes), `sb.plan` picks the fastest strategy whose stored
        bytes fit it, instead of ``strategy``.
    beta: LIF membrane decay per step.
    threshold: LIF firing threshold (default 1.0), or the delta threshold of the input and hidden
        deltas of delta-gru / delta-lstm (default 0.1); None takes the model's default.
    seed: seeds the initial weights and every batch (order and spikes).
    threads: torch intra-op threads while training (restored afterwards). The default 1 is the
        fastest for these small matmuls and, on a shared machine, avoids the oversubscription
        that made a 2-thread run 50x slower on 2 busy cores; raise it for large hidden sizes.
    gate_init: "uniform" (PyTorch's initialisation) or "chrono" (gated models only, see
        `chrono_init_`): memory time scales spread up to T, which long-range tasks need.
    dataset_options: keyword options of the dataset (e.g. ``{"noise_rate": 0.02}`` for
        delayed-recall, ``{"max_rate": 0.5}`` for digits-spikes); None for its defaults.
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


class RecurrentClassifier(nn.Module):
    """``Stack([cell(in, H), cell(H, H), ...])`` scanned with reduce="last", then ``Linear(H, classes)``.

    ``cell`` is a name from `MODELS` other than "lif"; ``threshold`` is the delta threshold of the
    Delta cells (input and hidden). ``forward(x)`` takes x (T, B, input_size) and returns logits.
    """

    def __init__(self, input_size: int, num_classes: int, *, model: str = "gru", hidden: int = 128,
                 layers: int = 1, threshold: float | None = None, strategy: "Strategy | str" = "full"):
        super().__init__()
        if model not in MODELS or model == "lif":
            raise ValueError(f"RecurrentClassifier: unknown model {model!r}; valid models are: "
                             f"{', '.join(m for m in MODELS if m != 'lif')}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"RecurrentClassifier: layers must be a positive int, got {layers!r}")
        cls = getattr(cells, MODELS[model][0])
        kw = {} if MODELS[model][1] is None else {
            "threshold": MODELS[model][1] if threshold is None else threshold}
        sizes = [input_size] + [hidden] * layers
        self.cell = cells.Stack([cls(a, b, **kw) for a, b in zip(sizes, sizes[1:])])
        self.readout = nn.Linear(hidden, num_classes)
        self.strategy = parse_strategy(strategy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = scan(self.cell, x, strategy=self.strategy, reduce="last")  # [B, H]
        return self.readout(h)  # [B, classes]


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


def build_model(config: TrainConfig, input_size: int, num_classes: int) -> nn.Module:
    """The model a `TrainConfig` describes, for a dataset with these sizes."""
    if config.model == "lif":
        return SpikingClassifier(input_size, num_classes, hidden=config.hidden, layers=config.layers,
                                 beta=config.beta, threshold=config.resolved_threshold,
                                 strategy=config.strategy)
    model = RecurrentClassifier(input_size, num_classes, model=config.model, hidden=config.hidden,
                                layers=config.layers, threshold=config.threshold, strategy=config.strategy)
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


@torch.no_grad()
def evaluate(model: nn.Module, dataset, split: str, batch_size: int, seed: int) -> float:
    """Accuracy of ``model`` on ``split``, with spikes drawn from ``seed``."""
    model.eval()
    correct = total = 0
    for x, y in dataset.batches(split, batch_size, seed=seed):
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def _prepare_out(out: "str | Path") -> Path:
    out = Path(out)
    if (out / "metrics.jsonl").exists():
        raise FileExistsError(f"run folder {str(out)!r} already holds metrics.jsonl; "
                              "choose another --out or remove the old run")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(config: TrainConfig, out: "str | Path | None" = None, *, progress: bool = True,
          log=None) -> dict:
    """Train as ``config`` says, writing config.json and metrics.jsonl into ``out``.

    Args:
        config: the run's `TrainConfig`.
        out: run folder (created); default `default_out_dir()`. Raises FileExistsError if it
            already holds a metrics.jsonl.
        progress: show a tqdm bar per epoch.
        log: where the per-epoch lines and the summary go (default sys.stdout).

    Returns:
        The summary: ``val_acc`` (final), ``best_val_acc``, ``seconds`` (wall, training and
        validation), ``peak_stored_bytes`` (max over epochs) and ``out``.
    """
    strategy = parse_strategy(config.strategy)  # fail before any work on a bad string
    if config.memory_budget is not None:
        parse_bytes(config.memory_budget)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, strategy, out, progress, sys.stdout if log is None else log)
    finally:
        torch.set_num_threads(prev_threads)


def _train(config: TrainConfig, strategy: Strategy, out, progress: bool, log) -> dict:
    dataset = get_dataset(config.dataset, config.T, **(config.dataset_options or {}))
    torch.manual_seed(config.seed)
    model = build_model(config, dataset.input_size, dataset.num_classes)
    if config.memory_budget is not None:
        strategy = plan(model.cell, (config.T, config.batch_size, dataset.input_size), config.memory_budget)
        model.strategy = strategy
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)

    out = _prepare_out(default_out_dir() if out is None else out)
    approximate = getattr(strategy, "approximate", not strategy.exact)
    meta = {**dataclasses.asdict(config), "threshold": config.resolved_threshold,
            "strategy": strategy.to_string(), "approximate_gradient": approximate,
            "sparsebptt": _version(), "torch": torch.__version__}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    def say(msg: str) -> None:
        if progress:
            tqdm.write(msg, file=log)
        else:
            print(msg, file=log, flush=True)

    say(f"{config.dataset}: {dataset.num_examples('train')} train / {dataset.num_examples('val')} val, "
        f"T={config.T}, model={config.model}"
        + (f" (threshold {config.resolved_threshold})" if config.resolved_threshold is not None else "")
        + f", strategy={strategy.to_string()}, run folder {out}")
    if approximate:
        say(f"note: {strategy.to_string()} computes an approximate gradient (time-skipped BPTT), "
            "not the gradient of full BPTT")
    n_batches = dataset.num_batches("train", config.batch_size)
    start = time.perf_counter()
    val_acc, best, peak = float("nan"), 0.0, 0
    with open(out / "metrics.jsonl", "w") as metrics:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum, correct, seen, epoch_peak, activity, bwd_macs = 0.0, 0, 0, 0, {}, 0
            batches = dataset.batches("train", config.batch_size, seed=_batch_seed(config.seed, epoch))
            bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch}/{config.epochs}",
                       leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for i, (x, y) in enumerate(bar):
                opt.zero_grad(set_to_none=True)
                if i == 0:
                    with trace() as t:
                        logits = model(x)
                        loss = F.cross_entropy(logits, y)
                        loss.backward()
                    epoch_peak, activity, bwd_macs = t.peak_stored_bytes, t.activity, t.backward_macs
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    loss.backward()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training diverged: loss {loss_value} at epoch {epoch}, "
                                             f"batch {i}; lower --lr (now {config.lr})")
                opt.step()
                loss_sum += loss_value * len(y)
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.close()
            val_acc = evaluate(model, dataset, "val", config.batch_size, _batch_seed(config.seed, 0))
            best, peak = max(best, val_acc), max(peak, epoch_peak)
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_acc": val_acc, "seconds": time.perf_counter() - t0,
                   "peak_stored_bytes": epoch_peak, "activity": activity, "backward_macs": bwd_macs}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            say(f"epoch {epoch:3d}/{config.epochs}  loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_acc']:.4f}  val_acc {val_acc:.4f}  {row['seconds']:.1f}s"
                + ("  activity " + " ".join(f"{k} {v:.3f}" for k, v in activity.items()) if activity else ""))
    seconds = time.perf_counter() - start
    summary = {"val_acc": val_acc, "best_val_acc": best, "seconds": seconds,
               "peak_stored_bytes": peak, "approximate_gradient": approximate, "activity": activity,
               "out": str(out)}
    say(f"done: val_acc {val_acc:.4f} (best {best:.4f}), {seconds:.1f}s wall, "
        f"peak stored {peak} bytes ({peak / 2**20:.2f} MiB) with {strategy.to_string()}"
        f"{' (approximate gradient)' if approximate else ''}; "
        f"metrics in {out / 'metrics.jsonl'}")
    return summary
