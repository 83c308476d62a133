"""Several cells run as one: within a time step each layer feeds the next.

The state is the concatenation of every layer's state tuple, so a checkpoint holds every layer's
state and no layer's output sequence is ever stored.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import log_once, run_steps, step_is_fused

__all__ = ["Stack"]


def _builtin_step(layer) -> bool:
    """Whether ``layer.step`` is a built-in cell's (sparsebptt's own code, which draws no random
    numbers), not a user cell's or an override."""
    if "step" in vars(layer):
        return False
    step = getattr(type(layer), "step", None)
    return getattr(step, "__module__", "").startswith("sparsebptt.")


class Stack(nn.Module):
    """``Stack([LIF(64, 256), LIF(256, 256)])``: a cell whose step runs the layers in order."""

    def __init__(self, layers):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("Stack: needs at least one layer, got an empty list")
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "step") and hasattr(layer, "initial_state")):
                raise TypeError(f"Stack: layer {i} ({type(layer).__name__}) is not a cell: "
                                "it needs `initial_state(batch_size, device, dtype)` and `step(x_t, state)`")
        for i, (a, b) in enumerate(zip(layers, layers[1:])):
            out_a = getattr(a, "output_size", getattr(a, "hidden_size", None))
            in_b = getattr(b, "input_size", None)
            if out_a is not None and in_b is not None and out_a != in_b:
                raise ValueError(f"Stack: layer {i} outputs {out_a} features but layer {i + 1} "
                                 f"expects input_size={in_b}")
        self.layers = nn.ModuleList(layers)
        self._arity = [len(layer.initial_state(1)) for layer in layers]

    @property
    def input_size(self):
        return getattr(self.layers[0], "input_size", None)

    @property
    def hidden_size(self):
        return getattr(self.layers[-1], "hidden_size", None)

    @property
    def output_size(self):
        last = self.layers[-1]
        return getattr(last, "output_size", getattr(last, "hidden_size", None))

    def initial_state(self, batch_size, device=None, dtype=None):
        return tuple(s for layer in self.layers for s in layer.initial_state(batch_size, device, dtype))

    def step(self, x_t, state):
        out, new, i = x_t, [], 0
        for layer, n in zip(self.layers, self._arity):
            out, s = layer.step(out, tuple(state[i:i + n]))
            new.extend(s)
            i += n
        return out, tuple(new)

    @property
    def scan_segment(self):
        """Layer by layer over a segment when some layer has a fused ``scan_segment`` (equal to
        stepping the layers together: no layer feeds an earlier one); None otherwise.

        Running a layer ahead over a segment changes the order in which the layers draw random
        numbers (all of layer 0's steps, then layer 1's, instead of step by step), and with it the
        draws themselves whenever the segment's length changes (a strategy's segments, a
        recomputation's): a layer without a ``scan_segment`` therefore runs ahead only if its
        ``step`` is a built-in cell's (which draws none); a Stack with any other such layer
        steps all its layers together (said once on the log).
        """
        fused = [getattr(layer, "scan_segment", None) is not None for layer in self.layers]
        if not any(fused):
            return None
        if not step_is_fused(self, "_scan_segment", "Stack's layer-by-layer segment path"):
            return None
        for i, (layer, f) in enumerate(zip(self.layers, fused)):
            if not f and not _builtin_step(layer):
                log_once(f"sparsebptt: a Stack steps its layers together: layer {i} ({type(layer).__name__}) "
                         "is not a built-in cell, and running it ahead of the others over a segment could "
                         "draw its random numbers in another order")
                return None
        return self._scan_segment

    def _scan_segment(self, x_seg, state):
        out, new, i = x_seg, [], 0
        for layer, n in zip(self.layers, self._arity):
            s = tuple(state[i:i + n])
            fn = getattr(layer, "scan_segment", None)
            if fn is not None:
                out, s = fn(out, s)
            else:
                ys, s = run_steps(layer.step, out, s)
                out = torch.stack(ys)
            new.extend(s)
            i += n
        return out, tuple(new)

    def forward(self, x_t, state):
        return self.step(x_t, state)
