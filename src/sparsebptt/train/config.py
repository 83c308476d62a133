"""`TrainConfig`: everything that defines a training run (saved as the run's config.json), and the
names of the models (`MODELS`) and gate initialisations (`GATE_INITS`) it may ask for."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TrainConfig", "FitConfig", "MODELS", "GATE_INITS", "LR_MAX", "CSNN_WIDTHS"]

#: --model name -> (cell class name in `sparsebptt.cells`, default threshold or None). EGRU's
#: default "beta" draws each unit's initial threshold from EvNN's Beta distribution (mean 0.3).
MODELS = {"lif": ("LIF", 1.0), "gru": ("GRU", None), "lstm": ("LSTM", None),
          "delta-gru": ("DeltaGRU", 0.1), "delta-lstm": ("DeltaLSTM", 0.1), "egru": ("EGRU", "beta"),
          "csnn": ("LIFNeuron", 1.0)}

#: --widths of --model csnn when none is given: channels of each conv-BN-LIF-pool block
CSNN_WIDTHS = (16, 32, 64)

#: --gate-init names: how the gate biases of the gated models start
GATE_INITS = ("uniform", "chrono")

#: the largest learning rate: Adam's first step is lr / (1 - beta1) = 10 lr, and a larger one
#: overflows float32 (3.4e38) inside the optimizer ("value cannot be converted to type float")
LR_MAX = 3.4e37


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as config.json.

    dataset: a name from `sparsebptt.data.DATASETS`.
    T: time steps per example.
    epochs, batch_size: passes over the training split and examples per step.
    model: "lif" (spiking), "gru", "lstm", "delta-gru", "delta-lstm" or "egru" (see `MODELS`).
    hidden: neurons per layer; layers: number of layers.
    lr: Adam learning rate, at most `LR_MAX`.
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
    widths: csnn only: the channels of its conv blocks, comma-separated ("16,32,64"; one block
        per width, so the count is the depth); None for `CSNN_WIDTHS`.
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
    widths: "str | None" = None

    def __post_init__(self):
        for name in ("T", "epochs", "batch_size", "hidden", "layers", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"TrainConfig: lr must be a positive number, got {self.lr!r}")
        if self.lr > LR_MAX:
            raise ValueError(f"TrainConfig: lr must be at most {LR_MAX:g} (Adam's first step moves a weight by "
                             f"lr / (1 - 0.9), which must be a finite float32), got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig: seed must be an int, got {self.seed!r}")
        if self.model not in MODELS:
            raise ValueError(f"TrainConfig: unknown model {self.model!r}; valid models are: {', '.join(MODELS)}")
        th = self.threshold
        if th is not None:
            if MODELS[self.model][1] is None:
                raise ValueError(f"TrainConfig: model {self.model!r} has no threshold, got threshold={th!r}")
            low_ok = th > 0 if self.model in ("lif", "csnn") else th >= 0
            if isinstance(th, bool) or not isinstance(th, (int, float)) or not (low_ok and th < math.inf):
                raise ValueError(f"TrainConfig: threshold must be a number {'> 0' if self.model in ('lif', 'csnn') else '>= 0'} "
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
        if self.gate_init == "chrono" and self.model in ("lif", "csnn"):
            raise ValueError("TrainConfig: gate_init='chrono' needs a gated model (gru, lstm, delta-gru, "
                             f"delta-lstm); model {self.model!r} has no gates")
        if self.widths is not None:
            if self.model != "csnn":
                raise ValueError(f"TrainConfig: widths are the conv blocks of model 'csnn', got model {self.model!r}")
            self.csnn_widths  # noqa: B018 (checks the string)

    @property
    def csnn_widths(self) -> "tuple[int, ...]":
        """``widths`` as a tuple of ints (`CSNN_WIDTHS` when None)."""
        if self.widths is None:
            return CSNN_WIDTHS
        try:
            out = tuple(int(w) for w in str(self.widths).split(","))
        except ValueError:
            out = ()
        if not out or min(out) < 1:
            raise ValueError(f"TrainConfig: widths must be positive ints separated by commas (e.g. '16,32,64'), "
                             f"got {self.widths!r}")
        return out

    @property
    def resolved_threshold(self) -> float | None:
        """``threshold``, or the model's default when it is None."""
        return MODELS[self.model][1] if self.threshold is None else float(self.threshold)


@dataclass(frozen=True)
class FitConfig:
    """What defines an `sb.fit` run (saved under ``"fit"`` in its config.json; ``--resume`` checks it).

    model, dataset: the class names of the model and of the training Dataset (what the run folder
    says it trained); T: the time steps of the first training example; input_shape: its shape per
    step; n_train, n_val: the examples of each split; the rest are `sb.fit`'s arguments
    (``strategy`` as its string, None to leave each `sb.Recurrent` as built).
    """

    model: str
    dataset: str
    T: int
    input_shape: tuple
    n_train: int
    n_val: int
    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    strategy: "str | None" = None
    memory_budget: "str | int | None" = None
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"sb.fit: {name} must be a positive int, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr <= LR_MAX:
            raise ValueError(f"sb.fit: lr must be a positive number at most {LR_MAX:g}, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"sb.fit: seed must be an int, got {self.seed!r}")
        if self.strategy is not None and self.memory_budget is not None:
            raise ValueError(f"sb.fit: give strategy or memory_budget, not both (got strategy={self.strategy!r} "
                             f"and memory_budget={self.memory_budget!r})")

    @property
    def resolved_threshold(self) -> None:
        """No threshold of its own (the model's cells hold theirs)."""
        return None

    @property
    def threads(self) -> None:
        return None
