"""The models `sparsebptt train` builds: a stack of cells scanned by one `sb.Recurrent`, and a readout.

- `SpikingClassifier`: LIF layers scanned with ``reduce="sum"`` (so no (T, B, H) tensor is held),
  a linear readout of each neuron's spike count over T;
- `RecurrentClassifier`: GRU / LSTM / DeltaGRU / DeltaLSTM layers scanned with ``reduce="last"``
  and a readout of the last hidden state, or EGRU layers with ``reduce="mean"`` (their output is the
  sparse event output, so the readout sees each unit's mean event output over the sequence);
- `SequenceModel`: a recurrent stack scanned with ``reduce=None``, the readout at every step (for a
  dataset with one label per step);
- `ConvSpikingClassifier` (``csnn``): VGG-style conv-BN-LIF-pool blocks on frames (T, B, C, H, W)
  scanned with ``reduce="sum"``, a linear readout of the last block's firing rates.

Each model's ``forward(x, return_aux=False)`` returns the logits; with ``return_aux=True`` it returns
``(logits, aux)``, where ``aux`` is the term the trainer adds to the loss (EGRU models with
``activity_reg > 0``: ``activity_reg`` times `sparsebptt.cells.activity_regularizer`) or None. The
models keep no state between calls.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import cells
from ..nn import Recurrent
from ..strategies import Strategy
from .config import MODELS, TrainConfig

__all__ = ["SpikingClassifier", "RecurrentClassifier", "SequenceModel", "ConvSpikingClassifier", "conv_stack",
           "build_model", "chrono_init_"]


def _stack_keys_before_recurrent(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the models held an `sb.Recurrent` name the stack ``cell.*``; its
    parameters now live at ``recurrent.cell.*``."""
    old, new = prefix + "cell.", prefix + "recurrent.cell."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old):]] = state_dict.pop(key)


class _ScannedModel(nn.Module):
    """``recurrent`` (an `sb.Recurrent` of the stack) and ``readout`` (``Linear(H, classes)``), with
    ``cell`` (the stack) and ``strategy`` (settable) read through to the layer."""

    def __init__(self, stack: nn.Module, hidden: int, num_classes: int, strategy: "Strategy | str",
                 reduce: "str | None", activity_reg: float = 0.0, activity_target: float = 0.05):
        super().__init__()
        self.recurrent = Recurrent(stack, strategy=strategy, reduce=reduce)
        self.readout = nn.Linear(hidden, num_classes)
        self.activity_reg, self.activity_target = float(activity_reg), float(activity_target)
        self.register_load_state_dict_pre_hook(_stack_keys_before_recurrent)

    @property
    def cell(self) -> nn.Module:
        """The stack of cells the model scans."""
        return self.recurrent.cell

    @property
    def strategy(self) -> Strategy:
        return self.recurrent.strategy

    @strategy.setter
    def strategy(self, strategy: "Strategy | str") -> None:
        self.recurrent.strategy = strategy

    def activity_loss(self, state, T: int) -> "torch.Tensor | None":
        """``activity_reg`` times the EGRU activity regulariser of a scan's final ``state`` over T
        steps, or None without one (``activity_reg == 0``)."""
        if self.activity_reg > 0:
            return self.activity_reg * cells.activity_regularizer(self.cell, state, T, self.activity_target)
        return None


class SpikingClassifier(_ScannedModel):
    """``Stack([LIF(in, H), LIF(H, H), ...])`` scanned with reduce="sum", then ``Linear(H, classes)``.

    ``forward(x)`` takes spikes x (T, B, input_size) and returns logits (B, num_classes). The
    readout sees spike counts divided by T (firing rates), so its scale does not depend on T.
    With ``return_aux=True`` it returns ``(logits, None)`` (no auxiliary loss).
    """

    def __init__(self, input_size: int, num_classes: int, *, hidden: int = 128, layers: int = 2,
                 beta: float = 0.9, threshold: float = 1.0, strategy: "Strategy | str" = "full"):
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"SpikingClassifier: layers must be a positive int, got {layers!r}")
        sizes = [input_size] + [hidden] * layers
        stack = cells.Stack([cells.LIF(a, b, beta=beta, threshold=threshold) for a, b in zip(sizes, sizes[1:])])
        super().__init__(stack, hidden, num_classes, strategy, reduce="sum")

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        counts, _ = self.recurrent(x)  # [B, H]
        logits = self.readout(counts / x.shape[0])  # [B, classes]
        return (logits, None) if return_aux else logits


def conv_stack(input_shape, widths=(16, 32, 64), *, beta: float = 0.9, threshold: float = 1.0,
               pool: int = 2) -> "tuple[cells.Stack, int]":
    """A VGG-style spiking conv stack and the number of features it outputs per step.

    For each width: ``Conv2d(c, width, 3, padding=1, bias=False)``, ``BatchNorm2d(width)`` (its
    statistics per time step), ``LIFNeuron((width, h, w))`` and ``MaxPool2d(pool)``; then ``Flatten``.
    ``input_shape`` is (channels, height, width) per step; every pooling must leave at least one pixel.
    """
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
            and all(isinstance(n, int) and n > 0 for n in input_shape)):
        raise ValueError(f"conv_stack: input_shape must be (channels, height, width), got {input_shape!r}")
    widths = tuple(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"conv_stack: widths must be positive ints, one per block, got {widths!r}")
    c, h, w = input_shape
    if min(h, w) < pool ** len(widths):
        raise ValueError(f"conv_stack: {len(widths)} blocks pool {h} x {w} pixels by {pool ** len(widths)}; "
                         f"use fewer widths (at most {int(math.log(min(h, w), pool))}) or larger frames")
    layers: list = []
    for width in widths:
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   cells.LIFNeuron((width, h, w), beta=beta, threshold=threshold), nn.MaxPool2d(pool)]
        c, h, w = width, h // pool, w // pool
    layers.append(nn.Flatten())
    return cells.Stack(layers), c * h * w


class ConvSpikingClassifier(_ScannedModel):
    """``--model csnn``: `conv_stack` (conv-BN-LIF-pool blocks) scanned with reduce="sum", then
    ``Linear(features, classes)`` of the firing rates (spike counts of the last block / T).

    ``forward(x)`` takes frames x (T, B, *input_shape) and returns logits (B, num_classes); with
    ``return_aux=True`` it returns ``(logits, None)``.
    """

    def __init__(self, input_shape, num_classes: int, *, widths=(16, 32, 64), beta: float = 0.9,
                 threshold: float = 1.0, strategy: "Strategy | str" = "full"):
        stack, features = conv_stack(tuple(input_shape), widths, beta=beta, threshold=threshold)
        super().__init__(stack, features, num_classes, strategy, reduce="sum")
        self.input_shape, self.widths = tuple(input_shape), tuple(widths)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        counts, _ = self.recurrent(x)  # [B, features]
        logits = self.readout(counts / x.shape[0])  # [B, classes]
        return (logits, None) if return_aux else logits


def _recurrent_stack(owner: str, model: str, input_size: int, hidden: int, layers: int,
                     threshold, activity_reg: float) -> "cells.Stack":
    """``Stack([cell(in, H), cell(H, H), ...])`` of the recurrent model called ``model``."""
    if model not in MODELS or model in ("lif", "csnn"):
        raise ValueError(f"{owner}: unknown model {model!r}; valid models are: "
                         f"{', '.join(m for m in MODELS if m not in ('lif', 'csnn'))}")
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


class RecurrentClassifier(_ScannedModel):
    """``Stack([cell(in, H), cell(H, H), ...])`` scanned with reduce="last" (EGRU: "mean", its
    output being the sparse event output), then ``Linear(H, classes)``.

    ``model`` is a name from `MODELS` other than "lif"; ``threshold`` is the delta threshold of the
    Delta cells (input and hidden), or EGRU's initial threshold. ``forward(x)`` takes x (T, B,
    input_size) and returns logits (B, classes); ``forward(x, return_aux=True)`` returns ``(logits,
    aux)``, ``aux`` being `activity_loss` of the scan (a tensor with ``activity_reg > 0``, else None).
    """

    def __init__(self, input_size: int, num_classes: int, *, model: str = "gru", hidden: int = 128,
                 layers: int = 1, threshold: float | None = None, strategy: "Strategy | str" = "full",
                 activity_reg: float = 0.0, activity_target: float = 0.05):
        stack = _recurrent_stack("RecurrentClassifier", model, input_size, hidden, layers, threshold, activity_reg)
        super().__init__(stack, hidden, num_classes, strategy, reduce="mean" if model == "egru" else "last",
                         activity_reg=activity_reg, activity_target=activity_target)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        h, state = self.recurrent(x)  # [B, H]
        logits = self.readout(h)  # [B, classes]
        return (logits, self.activity_loss(state, x.shape[0])) if return_aux else logits


class SequenceModel(_ScannedModel):
    """A recurrent stack scanned with reduce=None and ``Linear(H, classes)`` at every step.

    ``forward(x)`` takes x (T, B, input_size) and returns logits (B, T, classes), batch-first
    like the labels of a dataset with ``sequence_targets`` (``text``). Arguments and
    ``return_aux`` as `RecurrentClassifier`.
    """

    def __init__(self, input_size: int, num_classes: int, *, model: str = "egru", hidden: int = 128,
                 layers: int = 1, threshold: float | None = None, strategy: "Strategy | str" = "full",
                 activity_reg: float = 0.0, activity_target: float = 0.05):
        stack = _recurrent_stack("SequenceModel", model, input_size, hidden, layers, threshold, activity_reg)
        super().__init__(stack, hidden, num_classes, strategy, reduce=None,
                         activity_reg=activity_reg, activity_target=activity_target)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        h, state = self.recurrent(x)  # [T, B, H]
        logits = self.readout(h.transpose(0, 1))  # [B, T, classes]
        return (logits, self.activity_loss(state, x.shape[0])) if return_aux else logits


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


def build_model(config: TrainConfig, input_size: int, num_classes: int, *, sequence: bool = False,
                input_shape: "tuple | None" = None) -> nn.Module:
    """The model a `TrainConfig` describes, for a dataset with these sizes; ``sequence``: one
    label per step (a `SequenceModel`); ``input_shape``: the dataset's frame shape (C, H, W) per step
    when it yields frames (``csnn`` needs one, the other models refuse one)."""
    frames = input_shape is not None and len(tuple(input_shape)) > 1
    if config.model == "csnn":
        if not frames:
            raise ValueError(f"model 'csnn' needs a dataset of frames (C, H, W) per step, such as event-shapes; "
                             f"dataset {config.dataset!r} yields {input_size} features per step")
        if sequence:
            raise ValueError(f"dataset {config.dataset!r} has a label per step; model 'csnn' classifies sequences")
        return ConvSpikingClassifier(tuple(input_shape), num_classes, widths=config.csnn_widths, beta=config.beta,
                                     threshold=config.resolved_threshold, strategy=config.strategy)
    if frames:
        raise ValueError(f"dataset {config.dataset!r} yields frames {tuple(input_shape)} per step; train it with "
                         f"--model csnn (a convolutional SNN), not {config.model!r}")
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
