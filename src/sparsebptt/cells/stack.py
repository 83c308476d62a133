"""Several layers run as one cell: within a time step each layer feeds the next.

A layer is a cell (``initial_state`` and ``step``) or any other ``nn.Module``, a *stateless*
layer (convolution, linear, pooling, flatten, dropout, batch norm, layer norm, a user module),
applied to each step's tensor as it is: ``Stack([nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16),
LIFNeuron((16, 32, 32)), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4096, 10), LIFNeuron(10)])``.

The state is the concatenation of every cell's state tuple (stateless layers add none), so a
checkpoint holds every layer's state and no layer's output sequence is ever stored.

Over a segment of L steps (the executor's graph segments and no-grad advances, FullBPTT's whole
sequence) a Stack runs layer by layer (`Stack.scan_segment`): a stateless layer that treats each
sample on its own and draws no random numbers (convolutions, linear, pooling, flatten, layer
norm, activations, dropout and batch norm in eval mode: `TIME_BATCHED`) runs once on the whole
segment as [L*B, ...], the "multi-step" trick; batch norm in training mode normalises each step
with the statistics of that step's batch, exactly as a step loop, in one call
(`batch_norm_per_step`: time joins the channels); fused cells run their kernels.
A Stack holding a layer whose per-sample independence or randomness it cannot know (a user
module, unless it sets ``time_batched = True``; dropout in training mode) steps all its layers
together instead, so that random numbers are drawn in the same order under every strategy (and
replayed on recomputation).

Module buffers (batch norm's running statistics) are updated once per step of the forward;
the executor restores them after a recomputation (`sparsebptt.strategies.executor`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..trace import current_trace
from .base import log_once, run_steps, step_is_fused

__all__ = ["Stack", "StackSegmentVJP", "TIME_BATCHED", "is_cell", "batch_norm_per_step"]

#: stateless modules that treat each sample on its own and draw no random numbers: run on a whole
#: segment at once as [L*B, ...] (the same rank as one step's (B, ...), so a Flatten that would merge
#: the batch dimension fails the same way in both paths: "changed the batch dimension")
TIME_BATCHED = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.LayerNorm,
    nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Mish, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
)

#: per-step input rank each batch norm class accepts (with the batch dimension)
_BN_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_BN_SHAPES = {2: "(B, C)", 3: "(B, C, L)", 4: "(B, C, H, W)", 5: "(B, C, D, H, W)"}


def is_cell(layer) -> bool:
    """Whether ``layer`` has the cell protocol (``initial_state`` and ``step``)."""
    return callable(getattr(layer, "initial_state", None)) and callable(getattr(layer, "step", None))


def _builtin_step(layer) -> bool:
    """Whether ``layer.step`` is a built-in cell's (sparsebptt's own code, which draws no random
    numbers), not a user cell's or an override."""
    if "step" in vars(layer):
        return False
    step = getattr(type(layer), "step", None)
    return getattr(step, "__module__", "").startswith("sparsebptt.")


def _bn_uses_batch_stats(layer) -> bool:
    return layer.training or layer.running_mean is None


def _stateless_kind(layer) -> str:
    """How a stateless layer runs over a segment: "batched" ([L*B, ...] at once), "per_step" (batch
    norm with batch statistics: once per step) or "stepped" (unknown: the whole Stack steps).

    A user module opts in with a ``time_batched = True`` attribute: it promises to treat each sample
    on its own and to draw no random numbers, so a segment (L*B, ...) gives what L steps would."""
    flag = getattr(layer, "time_batched", None)
    if isinstance(flag, bool):
        return "batched" if flag else "stepped"
    if isinstance(layer, _BatchNorm):
        return "per_step" if _bn_uses_batch_stats(layer) else "batched"
    if isinstance(layer, nn.Dropout) or isinstance(layer, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                                             nn.AlphaDropout)):
        return "batched" if not layer.training or layer.p == 0 else "stepped"
    if isinstance(layer, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):  # over the batch (dim None/0) it mixes samples
        return "batched" if isinstance(layer.dim, int) and layer.dim >= 1 else "stepped"
    if isinstance(layer, nn.Sequential):
        kinds = [_stateless_kind(m) for m in layer]
        return "batched" if all(k == "batched" for k in kinds) else "stepped"
    if isinstance(layer, TIME_BATCHED):
        return "batched"
    return "stepped"


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _count_macs(layer, x, y) -> None:
    """Multiply-accumulates of a stateless Linear or convolution, for an active `sb.trace`: forward
    ``out elements * in_features`` (linear) or ``out elements * in_channels/groups * kernel size``
    (convolution); the backward adds as many for each of the input and weight gradients it computes."""
    t = current_trace()
    if t is None:
        return
    if isinstance(layer, nn.Linear):
        macs = y.numel() * layer.in_features
    elif isinstance(layer, _CONVS):
        k = 1
        for d in layer.kernel_size:
            k *= d
        macs = y.numel() * (layer.in_channels // layer.groups) * k
    else:
        return
    t.add_forward_macs(macs)
    if y.requires_grad:
        n_bwd = macs * (int(x.requires_grad) + int(layer.weight.requires_grad))
        y.register_hook(lambda g, _t=t, _n=n_bwd: _t.add_backward_macs(_n))


def _bn_check(i: int, layer, x, lead: int) -> None:
    """One-line error for a batch norm that would see the wrong rank or channel count per step."""
    ranks = next((r for cls, r in _BN_RANKS.items() if isinstance(layer, cls)), None)
    shape = tuple(x.shape[lead:])  # one step's (B, ...)
    if ranks is not None and len(shape) not in ranks:
        want = " or ".join(_BN_SHAPES[r] for r in ranks)
        raise ValueError(f"Stack: layer {i} ({type(layer).__name__}) gets a {len(shape)}-D tensor of shape {shape} "
                         f"per step but needs {want}; place it where each step's tensor has that rank (e.g. "
                         "before nn.Flatten), or use the batch norm of that rank")
    if len(shape) >= 2 and shape[1] != layer.num_features:
        raise ValueError(f"Stack: layer {i} ({type(layer).__name__}) has num_features={layer.num_features} but gets "
                         f"{shape[1]} channels per step (shape {shape})")


def batch_norm_per_step(layer, x):
    """Batch norm of every step of ``x`` (L, B, C, ...) with each step's own batch statistics, in one
    call: time joins the channels, (B, L*C, ...), so each (step, channel) pair is normalised over
    its own batch (the same elements, in the same order, as a call per step), and the running
    statistics are then updated once per step, in time order, as a step loop would (with
    ``num_batches_tracked`` and ``momentum=None``'s cumulative average). For the exact types
    ``nn.BatchNorm1d/2d/3d`` (a subclass may have its own forward: it is called once per step)."""
    if type(layer) not in _BN_RANKS:
        return torch.stack([layer(x[t]) for t in range(x.shape[0])])
    L, B, C = x.shape[:3]
    rest = tuple(x.shape[3:])
    xx = x.transpose(0, 1).reshape((B, L * C) + rest)  # [B, L*C, ...]
    w = None if layer.weight is None else layer.weight.repeat(L)
    b = None if layer.bias is None else layer.bias.repeat(L)
    track = layer.training and layer.track_running_stats and layer.running_mean is not None
    if not track:
        y = F.batch_norm(xx, None, None, w, b, True, 0.0, layer.eps)
    else:
        # momentum 1 into zeroed buffers: batch norm's own batch mean and unbiased variance of
        # each (step, channel), computed as in a call per step (no second pass over the data)
        mean = torch.zeros(L * C, dtype=layer.running_mean.dtype, device=xx.device)
        var = torch.zeros_like(mean)
        y = F.batch_norm(xx, mean, var, w, b, True, 1.0, layer.eps)
        with torch.no_grad():
            rm, rv, n = layer.running_mean, layer.running_var, layer.num_batches_tracked
            for t in range(L):  # as batch norm updates them, once per step in time order
                f = layer.momentum
                if n is not None:
                    n.add_(1)
                    if f is None:
                        f = 1.0 / float(n)
                elif f is None:  # pragma: no cover - torch keeps num_batches_tracked when tracking
                    f = 0.0
                rm.copy_(f * mean[t * C:(t + 1) * C] + (1 - f) * rm)
                rv.copy_(f * var[t * C:(t + 1) * C] + (1 - f) * rv)
    return y.view((B, L, C) + rest).transpose(0, 1)


class StackSegmentVJP:
    """A Stack whose layers are all cells with a segment VJP (e.g. `LIFSegmentVJP`), over a
    segment without autograd: the layers' forwards in order, their backwards in reverse, each
    layer's input gradient the previous layer's output gradient (see `LIFSegmentVJP`)."""

    def __init__(self, stack: "Stack", vjps):
        self.stack, self.vjps = stack, vjps
        self.offsets = [sum(stack._arity[:k]) for k in range(len(vjps))]

    def forward(self, x_seg, state, keep: bool = True):
        out, new, saved = x_seg, [], []
        for k, (vjp, i) in enumerate(zip(self.vjps, self.offsets)):
            self.stack._check_cell_input(k, out, 1)
            out, s, rec = vjp.forward(out, tuple(state[i:i + self.stack._arity[k]]), keep)
            new.extend(s)
            saved.append(rec)
        return out, tuple(new), saved

    def forward_stops(self, x_seg, state, stops, transient: bool = False, out: str | None = None,
                      prefix: str = "stops"):
        """The forward alone over consecutive segments ending at ``stops`` (see
        `LIFSegmentVJP.forward_stops`): each layer over all of them, then the next layer;
        ``(ys, [state at each stop])``. The layers between write their outputs to two per-thread
        buffers in turn (``prefix`` + ``_z0`` / ``_z1``: a fresh [L, B, H] buffer costs its page
        faults at every call); the last layer to the buffer named ``out``, else with ``transient``
        to one of those two (``ys`` is then valid until the next such call), else to a fresh one."""
        per_stop, last = [[] for _ in stops], len(self.vjps) - 1
        h = x_seg
        for k, (vjp, i) in enumerate(zip(self.vjps, self.offsets)):
            self.stack._check_cell_input(k, h, 1)
            buf = f"{prefix}_z{k % 2}" if k < last or (transient and out is None) else out
            kw = {"prefix": f"{prefix}_{k}"} if isinstance(vjp, StackSegmentVJP) else {}  # a Stack inside
            h, states = vjp.forward_stops(h, tuple(state[i:i + self.stack._arity[k]]), stops, out=buf, **kw)
            for acc, s in zip(per_stop, states):
                acc.extend(s)
        return h, [tuple(s) for s in per_stop]

    def backward(self, saved, dys, dstate, need_x: bool, need_state, acc=None):
        dstate_in, grads, dz = [None] * len(dstate), {}, dys
        for k in reversed(range(len(self.vjps))):
            i, n = self.offsets[k], self.stack._arity[k]
            dz, ds, g = self.vjps[k].backward(saved[k], dz, tuple(dstate[i:i + n]), need_x if k == 0 else True,
                                              tuple(need_state[i:i + n]), acc)
            saved[k] = None  # this layer's tensors go as soon as its backward is done
            dstate_in[i:i + n] = ds
            for key, v in g.items():  # a parameter shared by several layers: the sum
                grads[key] = v if key not in grads else grads[key] + v
        return dz, tuple(dstate_in), grads


class Stack(nn.Module):
    """``Stack([LIF(64, 256), LIF(256, 256)])``: a cell whose step runs the layers in order.

    Layers may be cells or stateless ``nn.Module``s (see the module docstring)."""

    def __init__(self, layers):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("Stack: needs at least one layer, got an empty list")
        for i, layer in enumerate(layers):
            if not is_cell(layer) and not isinstance(layer, nn.Module):
                raise TypeError(f"Stack: layer {i} ({type(layer).__name__}) is not a cell (it needs "
                                "`initial_state(batch_size, device, dtype)` and `step(x_t, state)`) nor an nn.Module "
                                "(a stateless layer, applied to each step)")
        for i, (a, b) in enumerate(zip(layers, layers[1:])):
            if not (is_cell(a) and is_cell(b)):
                continue
            out_a = getattr(a, "output_size", getattr(a, "hidden_size", None))
            in_b = getattr(b, "input_size", None)
            if out_a is not None and in_b is not None and out_a != in_b:
                raise ValueError(f"Stack: layer {i} outputs {out_a} features but layer {i + 1} "
                                 f"expects input_size={in_b}")
        self.layers = nn.ModuleList(layers)
        self._cell = [is_cell(layer) for layer in layers]
        self._arity = [len(layer.initial_state(1)) if c else 0 for layer, c in zip(layers, self._cell)]
        self._expect = [self._expected_input(layer) if c else None for layer, c in zip(layers, self._cell)]

    @staticmethod
    def _expected_input(layer):
        shape = getattr(layer, "input_shape", None)
        if isinstance(shape, tuple) and shape:
            return shape
        n = getattr(layer, "input_size", None)
        return (n,) if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def input_size(self):
        first = self.layers[0]
        if self._cell[0]:
            return getattr(first, "input_size", None)
        return getattr(first, "in_features", None) if isinstance(first, nn.Linear) else None

    @property
    def input_shape(self):
        shape = getattr(self.layers[0], "input_shape", None) if self._cell[0] else None
        return shape if isinstance(shape, tuple) else None

    @property
    def hidden_size(self):
        last = self.layers[-1]
        return getattr(last, "hidden_size", getattr(last, "out_features", None))

    @property
    def output_size(self):
        last = self.layers[-1]
        return getattr(last, "output_size", getattr(last, "hidden_size", getattr(last, "out_features", None)))

    @property
    def binary_states(self) -> tuple[bool, ...]:
        """Which state components only hold 0/1 (spikes, stored bit-packed): the cells' own, in order."""
        mask = []
        for layer, n in zip(self.layers, self._arity):
            m = getattr(layer, "binary_states", None)
            mask.extend((False,) * n if m is None else (bool(b) for b in m))
        return tuple(mask)

    def initial_state(self, batch_size, device=None, dtype=None):
        return tuple(s for layer, c in zip(self.layers, self._cell) if c
                     for s in layer.initial_state(batch_size, device, dtype))

    # ---- one step -----------------------------------------------------------------------
    def _check_cell_input(self, i: int, x, lead: int) -> None:
        want = self._expect[i]
        if want is not None and tuple(x.shape[lead + 1:]) != want:
            src = f"layer {i - 1} ({type(self.layers[i - 1]).__name__})" if i else "the input"
            raise ValueError(f"Stack: layer {i} ({type(self.layers[i]).__name__}) takes "
                             f"(B, {', '.join(map(str, want))}) "
                             f"per step but {src} gives {tuple(x.shape[lead:])}")

    def _stateless(self, i: int, layer, x, lead: int):
        """A stateless layer on one step (lead=0: x is (B, ...)) or a segment at once (lead=1: (L, B, ...))."""
        if isinstance(layer, _BatchNorm):
            _bn_check(i, layer, x, lead)
        if lead == 0:
            x_in = x
            B = x.shape[0]
        else:
            L, B = x.shape[:2]
            x_in = x.reshape((L * B,) + tuple(x.shape[2:]))
        y = layer(x_in)
        if isinstance(y, torch.Tensor):
            _count_macs(layer, x_in, y)
        if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != (B if lead == 0 else L * B):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"Stack: layer {i} ({type(layer).__name__}) changed the batch dimension: it got "
                             f"{tuple(x.shape[lead:]) if lead == 0 else (L * B,) + tuple(x.shape[2:])} and gave "
                             f"{got}; a stateless layer must keep dimension 0 (the batch)")
        return y if lead == 0 else y.view((L, B) + tuple(y.shape[1:]))

    def step(self, x_t, state):
        out, new, i = x_t, [], 0
        for k, (layer, n) in enumerate(zip(self.layers, self._arity)):
            if not self._cell[k]:
                out = self._stateless(k, layer, out, 0)
                continue
            self._check_cell_input(k, out, 0)
            out, s = layer.step(out, tuple(state[i:i + n]))
            new.extend(s)
            i += n
        return out, tuple(new)

    # ---- a segment, layer by layer --------------------------------------------------------
    @property
    def scan_segment(self):
        """Layer by layer over a segment (equal to stepping the layers together: no layer feeds an
        earlier one) when some cell has a fused ``scan_segment`` or some stateless layer runs on
        the whole segment at once; None otherwise (the executor steps `step`).

        Running a layer ahead over a segment changes the order in which the layers draw random
        numbers (all of layer 0's steps, then layer 1's, instead of step by step), and with it the
        draws themselves whenever the segment's length changes (a strategy's segments, a
        recomputation's): a cell without a ``scan_segment`` therefore runs ahead only if its
        ``step`` is a built-in cell's (which draws none), and a stateless layer only if it is one
        of `TIME_BATCHED` (or batch norm, dropout in eval mode); a Stack with any other such layer
        steps all its layers together (said once on the log).
        """
        fns = self._segment_fns()
        fused = [fn is not None for fn in fns]
        kinds = [None if c else _stateless_kind(layer) for layer, c in zip(self.layers, self._cell)]
        if not any(fused) and not any(k is not None for k in kinds):
            return None
        if not step_is_fused(self, "_scan_segment", "Stack's layer-by-layer segment path"):
            return None
        for i, (layer, f, kind) in enumerate(zip(self.layers, fused, kinds)):
            if kind == "stepped":
                log_once(f"sparsebptt: a Stack steps its layers together: layer {i} ({type(layer).__name__}) is a "
                         "stateless layer that may draw random numbers or mix samples (not one of "
                         "sparsebptt.cells.stack.TIME_BATCHED), so it cannot run on a whole segment at once")
                return None
            if kind is None and not f and not _builtin_step(layer):
                log_once(f"sparsebptt: a Stack steps its layers together: layer {i} ({type(layer).__name__}) "
                         "is not a built-in cell, and running it ahead of the others over a segment could "
                         "draw its random numbers in another order")
                return None
        fn = functools.partial(self._scan_segment, fns=fns)
        if all(self._cell) and all(hasattr(f, "vjp") for f in fns):  # every layer has one: so has the Stack
            fn.vjp = StackSegmentVJP(self, [f.vjp for f in fns])
        return fn

    def _segment_fns(self) -> list:
        """Each cell's fused ``scan_segment`` (None for a cell without one, and for stateless
        layers), asked once for a scan: every segment of the scan, recomputations included, runs
        what it got (a layer's backend, a `LIF`'s choice of sparse-input products)."""
        return [getattr(layer, "scan_segment", None) if c else None for layer, c in zip(self.layers, self._cell)]

    def _scan_segment(self, x_seg, state, fns=None):
        """Layer by layer over a segment; ``fns``: the cells' segment functions as `_segment_fns`
        gave them (None: resolved now)."""
        if fns is None:
            fns = self._segment_fns()
        out, new, i = x_seg, [], 0
        for k, (layer, n) in enumerate(zip(self.layers, self._arity)):
            if not self._cell[k]:
                if isinstance(layer, _BatchNorm) and _bn_uses_batch_stats(layer):
                    _bn_check(k, layer, out, 1)  # statistics of each step's batch, as a step loop
                    out = batch_norm_per_step(layer, out)
                else:
                    out = self._stateless(k, layer, out, 1)
                continue
            self._check_cell_input(k, out, 1)
            s = tuple(state[i:i + n])
            fn = fns[k]
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
