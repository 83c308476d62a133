"""`sb.adapters.wrap`: snnTorch, SpikingJelly and Norse neurons as sparsebptt cells.

    import snntorch, sparsebptt as sb
    cell = sb.adapters.wrap(snntorch.Leaky(beta=0.9, init_hidden=False), synapse=nn.Linear(64, 256))
    y, state = sb.scan(cell, x, strategy=sb.Checkpoint(every=32))      # x: (T, B, 64)

The wrapped cell calls the peer's own code for one time step, with the state passed in and out
(never kept in the module), so every exact strategy recomputes it and gives the gradients of the
peer's own BPTT loop (tests/test_adapters.py checks outputs, dx, the initial state's gradient and
every parameter's, learnable peer parameters included, in float64, under FullBPTT, Checkpoint,
Revolve and DoubleCheckpoint). Per step::

    i_t = synapse(x_t)                     # optional, stateless: nn.Linear, nn.Conv2d, ...
    y_t, state_t = neuron(i_t, state_{t-1})  # the peer's explicit-state step

Supported (`SUPPORTED`); the state tuple (each [B, hidden_size], flattened) and the step called:

- snnTorch ``Leaky`` (mem,) ``Synaptic`` (syn, mem) ``RLeaky`` (spk, mem): ``neuron(i, *state)``
  with ``init_hidden=False``.
- SpikingJelly ``IFNode``, ``LIFNode``, ``ParametricLIFNode`` (v,):
  ``neuron.single_step_functional_forward((i,), (v,))`` with ``step_mode='s'``.
- Norse ``LIFCell`` (v, i), ``LIFBoxCell`` (v,), ``LICell`` (v, i): ``neuron(i, State(*state))``;
  ``LICell`` outputs its membrane, the others spikes. Tensors of the Norse parameter tuple that
  are ``nn.Parameter`` s are registered on the wrapped cell (Norse keeps them in a NamedTuple,
  which ``neuron.parameters()`` does not list), so strategies and optimisers see them.

Configurations that keep state in the module (snnTorch ``init_hidden=True``, SpikingJelly
``step_mode='m'``, a stored membrane or ``store_v_seq=True``) are refused with the fix; a batch
norm that tracks running statistics is refused as a synapse (recomputation would update them
twice). The peers are optional: this module imports none of them.

MACs: an ``nn.Linear`` synapse runs through `sparsebptt.trace.linear`; the ``nn.Linear`` and
``nn.Conv*`` layers inside any other synapse and inside the neuron (RLeaky's recurrent weights)
are counted by forward hooks, added only while a step runs under an active `sb.trace`. Activity
is the fraction of nonzero outputs of spiking neurons (not counted for ``LICell``).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .trace import current_trace, linear

__all__ = ["wrap", "PeerCell", "SUPPORTED"]

#: the neurons `wrap` accepts, by the package that defines them
SUPPORTED = {
    "snntorch": ("Leaky", "Synaptic", "RLeaky"),
    "spikingjelly": ("IFNode", "LIFNode", "ParametricLIFNode"),
    "norse": ("LIFCell", "LIFBoxCell", "LICell"),
}

#: the state components of each neuron, in the order of the state tuple
_STATES = {
    "Leaky": ("mem",), "Synaptic": ("syn", "mem"), "RLeaky": ("spk", "mem"),
    "IFNode": ("v",), "LIFNode": ("v",), "ParametricLIFNode": ("v",),
    "LIFCell": ("v", "i"), "LIFBoxCell": ("v",), "LICell": ("v", "i"),
}
#: what snnTorch's forward leaves on the module; restored after each step (no graph kept there)
_SNNTORCH_ATTRS = ("mem", "syn", "spk", "reset")


def _supported_list() -> str:
    return ", ".join(f"{pkg}.{name}" for pkg, names in SUPPORTED.items() for name in names)


def _identify(neuron) -> tuple[str, str]:
    """(package, class name) of the first supported class in ``type(neuron)``'s MRO."""
    for cls in type(neuron).__mro__:
        pkg = cls.__module__.split(".")[0]
        if cls.__name__ in SUPPORTED.get(pkg, ()):
            return pkg, cls.__name__
    raise TypeError(f"sb.adapters.wrap: cannot wrap {type(neuron).__module__}.{type(neuron).__name__}; "
                    f"supported neurons: {_supported_list()}. Any other module becomes a cell with two "
                    "methods: initial_state(batch_size, device=None, dtype=None) and step(x_t, state)")


def _check_stateless(pkg: str, name: str, neuron) -> None:
    """Refuse the configurations that keep state in the module, with the fix."""
    if pkg == "snntorch":
        if getattr(neuron, "init_hidden", False):
            raise ValueError(f"sb.adapters.wrap: snntorch.{name}(init_hidden=True) keeps its state in the module, "
                             "which recomputation cannot replay; build it with init_hidden=False (sb.scan passes "
                             "the state in and out)")
    elif pkg == "spikingjelly":
        if getattr(neuron, "step_mode", "s") != "s":
            raise ValueError(f"sb.adapters.wrap: spikingjelly {name} has step_mode={neuron.step_mode!r}; build it "
                             "with step_mode='s' (sb.scan runs the time loop and steps the neuron once per step)")
        if getattr(neuron, "store_v_seq", False):
            raise ValueError(f"sb.adapters.wrap: spikingjelly {name} has store_v_seq=True, which records into the "
                             "module; build it with store_v_seq=False (the membrane is the state sb.scan returns)")
        if isinstance(getattr(neuron, "v", None), torch.Tensor):
            raise ValueError(f"sb.adapters.wrap: spikingjelly {name} holds a membrane v of shape "
                             f"{tuple(neuron.v.shape)} from an earlier call, which the wrapped cell would ignore; "
                             "call neuron.reset() (or spikingjelly.activation_based.functional.reset_net(model)) "
                             "first and pass an initial state to sb.scan instead")


def _check_synapse(synapse) -> None:
    if not isinstance(synapse, nn.Module):
        raise TypeError(f"sb.adapters.wrap: synapse must be an nn.Module (e.g. nn.Linear, nn.Conv2d) or None, "
                        f"got {type(synapse).__name__}")
    for m in synapse.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            raise ValueError(f"sb.adapters.wrap: synapse holds {type(m).__name__} with track_running_stats=True; "
                             "recomputation would update its running statistics twice. Use "
                             "track_running_stats=False, or normalise outside the scan")


def _as_shape(shape, what="input_shape") -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"sb.adapters.wrap: {what} must be an int or a tuple of ints, got {shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"sb.adapters.wrap: {what} must be positive sizes, got {shape}")
    return shape


# ---- MACs of the layers inside a step -------------------------------------------------------------
def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return out.numel() // module.out_features * module.in_features * module.out_features
    # nn.Conv1d/2d/3d: every output element is a dot product over in_channels/groups * kernel
    return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _count_hook(module, args, out):
    t = current_trace()
    if t is None or not isinstance(out, torch.Tensor):
        return
    macs = _layer_macs(module, out)
    t.add_forward_macs(macs)
    if out.requires_grad:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        n_bwd = macs * (int(x is not None and x.requires_grad) + int(module.weight.requires_grad))
        out.register_hook(lambda g, _t=t, _n=n_bwd: _t.add_backward_macs(_n))


@contextlib.contextmanager
def _counting(layers):
    """Count the MACs of ``layers`` (Linear/Conv modules) while the block runs under a trace."""
    if not layers or current_trace() is None:
        yield
        return
    handles = [m.register_forward_hook(_count_hook) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _mac_layers(*modules) -> list[nn.Module]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [m for mod in modules if mod is not None for m in mod.modules() if isinstance(m, kinds)]


class PeerCell(nn.Module):
    """A peer's neuron (and an optional stateless synapse before it) as a sparsebptt cell.

    Built by `wrap`. ``input_size``/``hidden_size`` are the flattened sizes of one step's input
    and of the neuron; states are [B, hidden_size] each (``state_names`` says which is which).
    ``step`` takes ``x_t`` flat [B, input_size] (what `sb.scan` passes) or shaped
    [B, *input_shape]; its output has the same form (flat or [B, *neuron_shape]).
    """

    def __init__(self, neuron: nn.Module, synapse: nn.Module | None, input_shape, neuron_shape,
                 package: str, kind: str):
        super().__init__()
        self.neuron = neuron
        self.synapse = synapse
        self.package, self.kind = package, kind
        self.input_shape, self.neuron_shape = tuple(input_shape), tuple(neuron_shape)
        self.input_size = math.prod(self.input_shape)
        self.hidden_size = math.prod(self.neuron_shape)
        self.state_names = _STATES[kind]
        self.num_states = len(self.state_names)
        self.spiking = kind != "LICell"
        self._linear = isinstance(synapse, nn.Linear)
        self._counted = _mac_layers(None if self._linear else synapse, neuron)
        if package == "norse":  # Norse keeps its parameters in a NamedTuple: register the learnable ones
            p = getattr(neuron, "p", None)
            fields = p._asdict() if hasattr(p, "_asdict") else {}
            self.peer_parameters = nn.ParameterDict(
                {k: v for k, v in fields.items() if isinstance(v, nn.Parameter)})
            with torch.no_grad():
                self._norse_state = type(neuron.initial_state(torch.zeros(1, *self.neuron_shape)))

    @property
    def output_size(self) -> int:
        return self.hidden_size

    # ---- state ----------------------------------------------------------------------------------
    def _fill_values(self) -> tuple[torch.Tensor | float, ...]:
        """What each state component starts at, as the peer's own first step would see it."""
        if self.package == "spikingjelly":
            v_reset = self.neuron.v_reset
            return (0.0 if v_reset is None else float(v_reset),)
        if self.package == "norse":
            with torch.no_grad():
                s = self.neuron.initial_state(torch.zeros(1, *self.neuron_shape))
            return tuple(getattr(s, name).detach() for name in self.state_names)
        return (0.0,) * self.num_states  # snnTorch starts from zeros (reset_mem / init_leaky)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        p = next(iter(self.parameters()), None)
        device = device if device is not None else (p.device if p is not None else torch.device("cpu"))
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.get_default_dtype())
        out = []
        for value in self._fill_values():
            s = torch.zeros(batch_size, *self.neuron_shape, device=device, dtype=dtype)
            if isinstance(value, torch.Tensor):  # Norse: a scalar (v_leak) or one sample's zeros: broadcast
                s = s + value.to(device=device, dtype=dtype)
            elif value != 0.0:
                s = s.fill_(value)
            out.append(s.reshape(batch_size, self.hidden_size))
        return tuple(out)

    # ---- one step -------------------------------------------------------------------------------
    def _synapse(self, x):
        if self.synapse is None:
            return x
        if self._linear:
            return linear(x, self.synapse.weight, self.synapse.bias)
        return self.synapse(x)

    def _neuron_step(self, i, state):
        n = self.neuron
        if self.package == "snntorch":
            saved = {k: (n._buffers[k] if k in n._buffers else n.__dict__[k])
                     for k in _SNNTORCH_ATTRS if k in n._buffers or k in n.__dict__}
            try:
                out = n(i, *state)
            finally:  # snnTorch's forward stores its last state on the module: put back what was there
                for k in _SNNTORCH_ATTRS:
                    if k in n._buffers:
                        n._buffers[k] = saved.get(k)
                    elif k in saved:
                        n.__dict__[k] = saved[k]
                    else:
                        n.__dict__.pop(k, None)
            y, new = out[0], tuple(out[1:])
            if y.dtype != i.dtype:  # snnTorch's surrogates make float32 spikes (`.float()`), whatever the dtype
                y = y.to(i.dtype)
            if self.kind == "RLeaky":  # forward returns (spk, mem): spk is also the state's first component
                new = (y, new[0])
            return y, new
        if self.package == "spikingjelly":
            (y,), new = n.single_step_functional_forward((i,), tuple(state))
            return y, tuple(new)
        y, s = n(i, self._norse_state(*state))  # norse: the peer's state NamedTuple, built from ours
        return y, tuple(getattr(s, name) for name in self.state_names)

    def step(self, x_t: torch.Tensor, state):
        B = x_t.shape[0]
        flat = x_t.dim() == 2 and (len(self.input_shape) > 1 or x_t.shape[1] == self.input_size)
        if flat and len(self.input_shape) > 1:
            x_t = x_t.reshape(B, *self.input_shape)
        with _counting(self._counted):
            i = self._synapse(x_t)
            y, new = self._neuron_step(i, tuple(s.reshape(B, *self.neuron_shape) for s in state))
        if self.spiking:
            t = current_trace()
            if t is not None:
                t.add_activity(self, torch.count_nonzero(y), y.numel())
        new = tuple(s.reshape(B, self.hidden_size) for s in new)
        return (y.reshape(B, self.hidden_size) if flat else y), new

    def forward(self, x_t, state):
        """Alias of `step`."""
        return self.step(x_t, state)

    def extra_repr(self) -> str:
        return (f"{self.package}.{self.kind}, input_shape={self.input_shape}, neuron_shape={self.neuron_shape}, "
                f"state={self.state_names}")


def _neuron_shape(synapse, input_shape) -> tuple[int, ...]:
    """The synapse's output shape for one sample of ``input_shape`` (a dry run, no graph)."""
    if isinstance(synapse, nn.Linear):
        return (synapse.out_features,)
    p = next(iter(synapse.parameters()), None)
    x = torch.zeros(1, *input_shape, device=None if p is None else p.device, dtype=None if p is None else p.dtype)
    training = synapse.training
    try:
        synapse.eval()
        with torch.no_grad():
            y = synapse(x)
    except Exception as e:
        raise ValueError(f"sb.adapters.wrap: the synapse {type(synapse).__name__} does not take one sample of "
                         f"input_shape={input_shape}: {e}") from e
    finally:
        synapse.train(training)
    return tuple(y.shape[1:])


def wrap(neuron: nn.Module, synapse: nn.Module | None = None, *, input_shape=None) -> PeerCell:
    """A snnTorch, SpikingJelly or Norse neuron (see `SUPPORTED`) as a cell for `sb.scan`.

    Args:
        neuron: the peer's neuron module, built stateless (snnTorch ``init_hidden=False``,
            SpikingJelly ``step_mode='s'``); it is kept as ``cell.neuron`` (its parameters train).
        synapse: an optional stateless module applied before the neuron each step (``nn.Linear``,
            ``nn.Conv2d``, an ``nn.Sequential`` of such); ``cell.synapse``.
        input_shape: the shape of one sample of ``x_t`` (without the batch): inferred from an
            ``nn.Linear`` synapse; otherwise required (the neuron's size without a synapse,
            ``(C, H, W)`` before a convolution). `sb.scan` passes ``x_t`` flattened; the cell
            reshapes it.

    Returns:
        a `PeerCell`: ``initial_state(B)`` and ``step(x_t, state)``, ``input_size`` and
        ``hidden_size`` (flattened), MACs and activity counted under `sb.trace`.

    Raises:
        TypeError: an unsupported neuron (the message lists the supported ones) or synapse.
        ValueError: a stateful configuration (the message says how to build it stateless), a
            missing or inconsistent ``input_shape``, a batch norm with running statistics.
    """
    if not isinstance(neuron, nn.Module):
        raise TypeError(f"sb.adapters.wrap: neuron must be an nn.Module, got {type(neuron).__name__}; "
                        f"supported neurons: {_supported_list()}")
    pkg, kind = _identify(neuron)
    _check_stateless(pkg, kind, neuron)
    if synapse is not None:
        _check_synapse(synapse)
    if isinstance(synapse, nn.Linear):
        inferred = (synapse.in_features,)
        if input_shape is not None and _as_shape(input_shape) != inferred:
            raise ValueError(f"sb.adapters.wrap: input_shape={_as_shape(input_shape)} but the nn.Linear synapse "
                             f"takes in_features={synapse.in_features}; omit input_shape")
        input_shape = inferred
    elif input_shape is None:
        what = "the neuron's size, e.g. input_shape=256" if synapse is None else \
            f"the shape of one sample before the {type(synapse).__name__}, e.g. input_shape=(2, 32, 32)"
        raise ValueError(f"sb.adapters.wrap: pass input_shape= ({what}); it is inferred only from an "
                         "nn.Linear synapse")
    input_shape = _as_shape(input_shape)
    neuron_shape = input_shape if synapse is None else _neuron_shape(synapse, input_shape)
    return PeerCell(neuron, synapse, input_shape, neuron_shape, pkg, kind)
