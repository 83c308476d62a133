"""NIR, the Neuromorphic Intermediate Representation (``pip install nir``), both ways.

    import sparsebptt as sb
    graph = sb.export_nir(model, "model.nir", T=100)   # a nir.NIRGraph, also written to the file
    model2 = sb.import_nir("model.nir")                # nn.Sequential of sb.Recurrent and nn.Linear

NIR describes neurons in continuous time; our LIF is a discrete map per step::

    u[t] = beta * v[t-1] + I[t]        I[t] = W x[t] + b (+ V z[t-1])
    z[t] = H(u[t] - threshold)         (spike if u > threshold, as NIR's "v > v_threshold")
    v[t] = u[t] - z[t] * threshold     reset="subtract"
    v[t] = u[t] * (1 - z[t])           reset="zero"

**Time step convention.** NIR has no discrete-time neuron, so one step of our scan is ``dt`` time
units (default ``dt = 1``; snnTorch and SpikingJelly assume ``dt = 1e-4``, Norse's importer takes
``dt``) and the constants are chosen so that NIR's neuron integrated with the forward Euler rule at
that ``dt`` is our map exactly. NIR's ``LI`` / ``LIF`` obey ``tau dv/dt = (v_leak - v) + r I``; one
Euler step is ``v += dt/tau * (v_leak - v + r I)``, i.e. ``v = (1 - dt/tau) v + (dt/tau) r I``. Hence

    tau = dt / (1 - beta),  r = tau / dt = 1 / (1 - beta),  v_leak = 0,  v_threshold = threshold

(beta = 1, no leak, becomes NIR's ``IF`` / ``I`` with ``r = 1 / dt``). These are snnTorch's own
export constants. Norse's importer ignores ``r`` (it warns and uses 1): ``fold_r=True`` writes
``r = 1`` and multiplies the weights feeding the neuron by the old ``r`` instead, the same network
in NIR's semantics. A simulator that integrates the ODE exactly (``v *= exp(-dt/tau)``) instead of
with Euler gets ``exp(-(1 - beta))`` as the decay, not beta: run the graph with Euler, as snnTorch,
Norse and nirtorch do.

**Resets.** NIR's ``LIF`` resets to ``v_reset`` (here 0) when it spikes: that is our
``reset="zero"``, exported as ``Affine -> LIF`` exactly. NIR has no subtractive reset. With
``subtract_reset="exact"`` (default) a ``reset="subtract"`` layer is exported as
``Affine -> LI -> Threshold`` with a recurrent edge ``Threshold -> Linear(-beta * threshold) -> LI``:
subtracting ``threshold`` from v after a spike is subtracting ``beta * threshold`` from the next
step's u (``threshold`` with ``reset_timing="after_decay"``), so the graph is our map exactly,
provided a recurrent (back) edge delivers the previous step's output, as nirtorch executes cycles.
snnTorch's and Norse's importers know no ``LI -> Threshold`` neuron: for them (and for hardware that
only runs ``LIF`` nodes) take ``subtract_reset="zero"``, which exports ``LIF`` with reset to zero: a
different network (it forgets the overshoot above threshold), recorded as ``"approximate"`` in the
graph metadata.

**Readouts.** Layers after the spiking layers (``nn.Linear`` in an ``nn.Sequential``, a
classifier's ``readout``) become ``Affine`` nodes applied at every step. A layer that reduces over
time (``sb.Recurrent(..., reduce="sum" | "mean")``, the `SpikingClassifier`'s spike counts / T) is
exported so that **the sum of the output node over the T steps is the model's output**: every
bias after the reduction is divided by T, and for "mean" also the first weight (so the exporter
needs T); ``metadata["reduce"] = "sum"`` and ``metadata["T"]`` say so. Recurrent LIF layers add
``Linear(V)`` back edges. Learned per-neuron betas export per neuron.

**Import.** `import_nir` reads graphs of these nodes written by us, snnTorch (``Leaky``, ``RLeaky``
as a recurrent sub-graph), Norse and SpikingJelly (hard-reset ``IFNode`` / ``LIFNode``): a chain
``[Affine | Linear] -> LIF | IF | (LI | I -> Threshold)`` per spiking layer, each with an optional
recurrent ``Linear`` edge, and ``Affine`` / ``Linear`` layers; ``beta = 1 - dt/tau`` and the input
scale ``dt r / tau`` (``dt r`` for ``IF``) is folded into the weights. Spiking layers that follow
each other are scanned together (one `sb.Recurrent` of a `sb.cells.Stack`).

`run_nir` is a small reference interpreter of exactly these nodes (Euler at ``dt``, back edges
delayed one step); the tests check that it reproduces the model's spikes and outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cells import LIF, Stack
from .nn import Recurrent

__all__ = ["export_nir", "import_nir", "run_nir", "SUBTRACT_RESETS", "IMPORTED_NODES"]

SUBTRACT_RESETS = ("exact", "zero")

#: the NIR node types `import_nir` maps (nested NIRGraph sub-graphs are inlined)
IMPORTED_NODES = ("Input", "Output", "Affine", "Linear", "LIF", "IF", "LI -> Threshold", "I -> Threshold")


def _require_nir(what: str = "sb.export_nir"):
    try:
        import nir
    except ImportError:
        raise ImportError(f"{what} needs the `nir` package: pip install 'sparsebptt[nir]' "
                          "(or pip install nir)") from None
    return nir


def _np(t, dtype=None) -> np.ndarray:
    """A parameter as a numpy array of its own dtype (float32 for a float32 model)."""
    t = t.detach().cpu()
    return t.numpy().astype(dtype or t.numpy().dtype)


_SUPPORTED_EXPORT = ("a SpikingClassifier, a cells.LIF, a cells.Stack of cells.LIF (and nn.Linear), an "
                     "sb.Recurrent of those, or an nn.Sequential of sb.Recurrent(..., return_state=False) "
                     "and nn.Linear")


def _cell_ops(cell: nn.Module, where: str) -> list:
    """[("lif", LIF) | ("linear", nn.Linear)] of a LIF, or of a Stack of LIF and Linear layers."""
    layers = list(cell.layers) if isinstance(cell, Stack) else [cell]
    ops, bad = [], []
    for i, layer in enumerate(layers):
        if isinstance(layer, LIF):
            ops.append(("lif", layer))
        elif isinstance(layer, nn.Linear):
            ops.append(("linear", layer))
        else:
            bad.append(f"{i}: {type(layer).__name__}")
    if bad:
        raise TypeError(f"sb.export_nir exports stacks of LIF layers; got {', '.join(bad)}{where} (NIR has no "
                        f"GRU / LSTM node). Pass {_SUPPORTED_EXPORT}")
    return ops


def _model_ops(model: nn.Module) -> "tuple[list, str | None]":
    """(ops, reduce): the layers of ``model`` in order and how the model reduces over time after
    the last spiking layer (None: not at all, "sum" or "mean")."""
    if isinstance(getattr(model, "cell", None), nn.Module) and isinstance(getattr(model, "readout", None), nn.Linear):
        # a SpikingClassifier: spike counts / T -> readout
        return _cell_ops(model.cell, "") + [("linear", model.readout)], "mean"
    if isinstance(model, Recurrent):
        model = nn.Sequential(model)
    if not isinstance(model, nn.Sequential):
        return _cell_ops(model, ""), None
    ops, reduce = [], None
    for k, m in enumerate(model):
        if isinstance(m, Recurrent):
            if reduce is not None:
                raise TypeError(f"sb.export_nir: item {k} of the nn.Sequential is an sb.Recurrent after one that "
                                f"reduces over time (reduce={reduce!r}); only nn.Linear layers may follow it")
            if m.reduce not in (None, "sum", "mean"):
                raise TypeError(f"sb.export_nir: item {k} has reduce={m.reduce!r}; NIR graphs run step by step, "
                                "so the exporter takes reduce=None, 'sum' or 'mean'")
            ops += _cell_ops(m.cell, f" (in item {k} of the nn.Sequential)")
            reduce = m.reduce
        elif isinstance(m, nn.Linear):
            ops.append(("linear", m))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue  # nothing at inference
        else:
            raise TypeError(f"sb.export_nir: item {k} of the nn.Sequential is a {type(m).__name__}; supported are "
                            "sb.Recurrent (LIF cells or Stacks of them), nn.Linear, nn.Identity and nn.Dropout")
    return ops, reduce


def export_nir(model: nn.Module, path: "str | Path | None" = None, *, T: "int | None" = None,
               subtract_reset: str = "exact", dt: float = 1.0, fold_r: bool = False):
    """The NIR graph of a LIF model (see the module docstring for the mapping), written to
    ``path`` with `nir.write` if given.

    Args:
        model: a `SpikingClassifier` (LIF stack + readout of spike counts / T), a `cells.LIF`, a
            `cells.Stack` of `cells.LIF` (and ``nn.Linear``), an `sb.Recurrent` of one, or an
            ``nn.Sequential`` of ``sb.Recurrent(..., return_state=False)`` LIF stacks and
            ``nn.Linear`` layers. The output node gives, per step, the last layer's output; for a
            model that reduces over time (a classifier), its sum over the T steps is the model's
            output.
        path: where to write the graph (HDF5, read back with ``nir.read``).
        T: the time steps a reduction over time covers (required when the model reduces).
        subtract_reset: "exact" (LI + Threshold + recurrent edge) or "zero" (NIR LIF with reset to
            0, approximate) for layers with reset="subtract".
        dt: the seconds one step stands for (tau scales with it; the dynamics per step do not).
            snnTorch's `import_from_nir` assumes 1e-4; Norse's `from_nir` takes it as ``dt``.
        fold_r: write ``r = 1`` and scale the weights into each neuron by r instead (for Norse,
            whose importer ignores r).

    Returns:
        The `nir.NIRGraph`; its ``metadata`` records dt, the discretisation, the reset mapping,
        ``reduce`` and T.
    """
    nir = _require_nir()
    if subtract_reset not in SUBTRACT_RESETS:
        raise ValueError(f"sb.export_nir: unknown subtract_reset {subtract_reset!r}; valid values are: "
                         f"{', '.join(SUBTRACT_RESETS)}")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"sb.export_nir: dt must be a positive number, got {dt!r}")
    ops, reduce = _model_ops(model)
    lifs = [m for kind, m in ops if kind == "lif"]
    if not lifs:
        raise TypeError(f"sb.export_nir: the model has no cells.LIF layer; pass {_SUPPORTED_EXPORT}")
    last_lif = max(i for i, (kind, _) in enumerate(ops) if kind == "lif")
    fdt = lifs[0].weight.detach().cpu().numpy().dtype  # arrays keep the model's precision
    if reduce is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
        raise ValueError(f"sb.export_nir: a classifier's readout averages spike counts over T steps; pass "
                         f"T=<positive int> (the T it was trained with), got {T!r}")
    first = ops[0][1]
    n_in = first.input_size if isinstance(first, LIF) else first.in_features
    nodes = {"input": nir.Input(input_type=np.array([n_in]))}
    edges = []
    src = "input"
    approximate = False
    n_lif = n_readout = n_linear = 0
    for j, (kind, layer) in enumerate(ops):
        if kind == "linear":
            w, b = _np(layer.weight, fdt), (_np(layer.bias, fdt) if layer.bias is not None else None)
            if j > last_lif and reduce is not None:  # per step, summed over T: the model's output
                if reduce == "mean" and n_readout == 0:
                    w = w / fdt.type(T)
                b = (np.zeros(layer.out_features, dtype=fdt) if b is None else b) / fdt.type(T)
            if j > last_lif:
                name = "readout" if n_readout == 0 else f"readout{n_readout}"
                n_readout += 1
            else:
                name = f"linear{n_linear}"
                n_linear += 1
            nodes[name] = nir.Affine(weight=w, bias=b) if b is not None else nir.Linear(weight=w)
            edges.append((src, name))
            src = name
            continue
        src, approx = _export_lif(nir, nodes, edges, src, f"layer{n_lif}", layer, n_lif, fdt, dt, subtract_reset,
                                  fold_r)
        approximate |= approx
        n_lif += 1
    last = ops[-1][1]
    n_out = last.hidden_size if isinstance(last, LIF) else last.out_features
    nodes["output"] = nir.Output(output_type=np.array([n_out]))
    edges.append((src, "output"))
    from . import __version__

    metadata = {
        "producer": f"sparsebptt {__version__}",
        "dt": float(dt),
        "discretization": "forward Euler at dt: v[t] = beta v[t-1] + I[t], beta = 1 - dt/tau, r = tau/dt",
        "r": "folded into the weights (r = 1)" if fold_r else "tau / dt",
        "recurrent_edges": "a back edge delivers the previous step's output",
        "reset": ("subtract exported as LIF reset to zero (approximate)" if approximate else
                  "exact: reset=zero as LIF(v_reset=0); reset=subtract as LI -> Threshold with a "
                  "-beta*threshold back edge"),
        "approximate": int(approximate),
    }
    if reduce is not None:
        metadata["reduce"] = "sum"
        metadata["readout"] = f"the model's output = sum of the output node over T={T} steps"
        metadata["T"] = int(T)
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        nir.write(str(path), graph)
    return graph


def _export_lif(nir, nodes, edges, src, name, layer, i, fdt, dt, subtract_reset, fold_r):
    """Add the nodes of one LIF layer fed by ``src``; returns (its output node, approximate)."""
    p, H = layer.params, layer.hidden_size
    beta = (layer.beta.detach().clamp(0.0, 1.0) if layer.beta is not None
            else torch.full((H,), float(p.beta), dtype=torch.float64))
    beta = beta.to(torch.float64).cpu().numpy()
    thr = np.full(H, p.threshold, dtype=fdt)
    zeros = np.zeros(H, dtype=fdt)
    leaky = bool((beta < 1.0).all())
    if not leaky and not bool((beta == 1.0).all()):
        raise ValueError(f"sb.export_nir: layer {i} mixes beta = 1 (no leak) with beta < 1 across neurons; "
                         "NIR needs one node type per layer")
    tau = (dt / (1.0 - beta)).astype(fdt) if leaky else None
    r = (1.0 / (1.0 - beta) if leaky else np.full(H, 1.0 / dt))  # float64
    scale = r if fold_r else np.ones(H)  # what the weights into the neuron are multiplied by
    r_node = (np.ones(H) if fold_r else r).astype(fdt)
    w = _np(layer.weight)
    if fold_r:
        w = (w * scale[:, None]).astype(w.dtype)
    bias = None if layer.bias is None else _np(layer.bias)
    if fold_r and bias is not None:
        bias = (bias * scale).astype(w.dtype)
    nodes[f"{name}.affine"] = nir.Affine(weight=w, bias=bias) if bias is not None else nir.Linear(weight=w)
    edges.append((src, f"{name}.affine"))
    feedback = _np(layer.recurrent_weight).astype(np.float64) if layer.recurrent else None
    approximate = False
    if p.reset == "zero" or subtract_reset == "zero":
        approximate = p.reset == "subtract"
        nodes[f"{name}.lif"] = (nir.LIF(tau=tau, r=r_node, v_leak=zeros, v_threshold=thr, v_reset=zeros) if leaky
                                else nir.IF(r=r_node, v_threshold=thr, v_reset=zeros))
        edges.append((f"{name}.affine", f"{name}.lif"))
        out = f"{name}.lif"
        if feedback is not None:
            nodes[f"{name}.recurrent"] = nir.Linear(weight=(feedback * scale[:, None]).astype(fdt))
            edges += [(out, f"{name}.recurrent"), (f"{name}.recurrent", out)]
        return out, approximate
    # subtractive reset, exactly: LI (no reset) -> Threshold, spikes fed back with -beta*thr
    nodes[f"{name}.li"] = (nir.LI(tau=tau, r=r_node, v_leak=zeros) if leaky else nir.I(r=r_node))
    nodes[f"{name}.spike"] = nir.Threshold(threshold=thr)
    drop = beta * p.threshold if p.reset_timing == "before_decay" else np.full(H, float(p.threshold))
    back = np.diag(-drop)
    if feedback is not None:
        back = back + feedback
    nodes[f"{name}.recurrent"] = nir.Linear(weight=(back * scale[:, None]).astype(fdt))
    edges += [(f"{name}.affine", f"{name}.li"), (f"{name}.li", f"{name}.spike"),
              (f"{name}.spike", f"{name}.recurrent"), (f"{name}.recurrent", f"{name}.li")]
    return f"{name}.spike", approximate


def _flatten(nir, graph, prefix: str = ""):
    """(nodes, edges) of ``graph`` with every nested NIRGraph node inlined (its Input and Output
    dropped, the edges into and out of it rewired to the nodes they stand for)."""
    nodes, edges = {}, [(prefix + a, prefix + b) for a, b in graph.edges]
    for k, n in graph.nodes.items():
        if not isinstance(n, nir.NIRGraph):
            nodes[prefix + k] = n
            continue
        sub_nodes, sub_edges = _flatten(nir, n, f"{prefix}{k}.")
        ins = [s for s, m in sub_nodes.items() if isinstance(m, nir.Input)]
        outs = [s for s, m in sub_nodes.items() if isinstance(m, nir.Output)]
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"sb.import_nir: the sub-graph {prefix + k!r} needs one Input and one Output node, "
                             f"got {len(ins)} and {len(outs)}")
        entry = [b for a, b in sub_edges if a == ins[0]]
        exit_ = [a for a, b in sub_edges if b == outs[0]]
        nodes.update({s: m for s, m in sub_nodes.items() if s not in (ins[0], outs[0])})
        edges += [e for e in sub_edges if ins[0] not in e and outs[0] not in e]
        me = prefix + k
        rewired = []
        for a, b in edges:
            if b == me:
                rewired += [(a, e) for e in entry]
            elif a == me:
                rewired += [(x, b) for x in exit_]
            else:
                rewired.append((a, b))
        edges = rewired
    return nodes, edges


def _walk(nodes: dict, edges: list, start: str):
    """(order, back): nodes reachable from ``start`` in topological order of the forward edges, and
    the back edges (those that close a cycle, found depth-first)."""
    succ = {k: [] for k in nodes}
    for a, b in edges:
        succ[a].append(b)
    order, back, seen, on_stack = [], set(), set(), set()

    def visit(k):
        seen.add(k)
        on_stack.add(k)
        for nxt in succ[k]:
            if nxt in on_stack:
                back.add((k, nxt))
            elif nxt not in seen:
                visit(nxt)
        on_stack.discard(k)
        order.append(k)

    visit(start)
    order.reverse()
    return order, back


def _uniform(owner: str, what: str, a) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size and not np.allclose(a, a[0], rtol=0, atol=0):
        raise ValueError(f"sb.import_nir: node {owner!r} has a different {what} per neuron "
                         f"({a.min():g} .. {a.max():g}); sparsebptt's LIF takes one {what} per layer")
    return float(a[0])


def _snap(x: np.ndarray) -> np.ndarray:
    """beta = 1 - dt/tau rounded to 15 significant digits: what an export of beta wrote, back exactly
    (0.9 comes back 0.9, not 0.8999999999999999)."""
    return np.array([float(f"{v:.15g}") for v in np.asarray(x, dtype=np.float64).reshape(-1)])


@dataclass
class _Layer:
    """One spiking layer read from the graph (already in sparsebptt's units)."""

    weight: np.ndarray  # (H, in), the input scale folded in
    bias: "np.ndarray | None"
    beta: np.ndarray  # (H,)
    threshold: float
    reset: str
    reset_timing: str = "before_decay"
    recurrent: "np.ndarray | None" = None  # (H, H)


def _neuron(nir, key, nodes, edges, back, seq, i, dt, W, b, dtype):
    """The `_Layer` of the neuron at ``seq[i]`` fed by (W, b); returns (layer, next index)."""
    n = nodes[key]
    if isinstance(n, (nir.LIF, nir.LI)):
        tau = np.asarray(n.tau, dtype=np.float64).reshape(-1)
        beta = _snap(1.0 - dt / tau)
        scale = dt * np.asarray(n.r, dtype=np.float64).reshape(-1) / tau
        if not np.allclose(np.asarray(n.v_leak, dtype=np.float64), 0.0):
            raise ValueError(f"sb.import_nir: node {key!r} has v_leak != 0; sparsebptt's LIF leaks to 0")
    else:  # IF, I
        beta = np.ones(np.asarray(n.r).size)
        scale = dt * np.asarray(n.r, dtype=np.float64).reshape(-1)
    if (beta < 0).any() or (beta > 1).any():
        raise ValueError(f"sb.import_nir: node {key!r} has tau < dt (tau min {np.min(np.asarray(n.tau)):g}, dt "
                         f"{dt:g}): beta = 1 - dt/tau leaves [0, 1]; pass the dt the graph was written for (Norse's "
                         "to_nir(..., dt=d) writes tau / d: import with dt = d * its step, e.g. 1e-6)")
    H = beta.size
    scale = np.broadcast_to(scale, (H,))
    if W is None:
        W = np.eye(H, dtype=dtype)
    W = W.astype(np.float64) * scale[:, None] if not (scale == 1).all() else W
    b = None if b is None else (b.astype(np.float64) * scale if not (scale == 1).all() else b)
    rec = [a for a, c in back if c == key]
    spike_key, nxt = key, i + 1
    if isinstance(n, (nir.LIF, nir.IF)):
        if not np.allclose(np.asarray(n.v_reset, dtype=np.float64), 0.0):
            raise ValueError(f"sb.import_nir: node {key!r} resets to v_reset != 0; sparsebptt's LIF resets to 0")
        thr = _uniform(key, "v_threshold", n.v_threshold)
        layer = _Layer(W, b, beta, thr, "zero")
    else:  # LI / I -> Threshold: the spike and its subtractive reset through a back edge
        if nxt >= len(seq) or not isinstance(nodes[seq[nxt]], nir.Threshold):
            raise TypeError(f"sb.import_nir: node {key!r} is a nir.{type(n).__name__} that no Threshold follows (a "
                            "non-spiking integrator readout); sparsebptt maps LI / I only as LI -> Threshold")
        spike_key, nxt = seq[nxt], nxt + 1
        thr = _uniform(spike_key, "threshold", nodes[spike_key].threshold)
        layer = _Layer(W, b, beta, thr, "subtract")
        if not rec:
            raise TypeError(f"sb.import_nir: {key!r} -> {spike_key!r} has no back edge that resets the membrane "
                            "(Threshold -> Linear -> LI); sparsebptt's LIF resets after a spike")
    if len(rec) > 1:
        raise TypeError(f"sb.import_nir: node {key!r} has {len(rec)} back edges; one recurrent Linear per layer "
                        "is supported")
    if rec:
        r = nodes[rec[0]]
        preds = [a for a, c in edges if c == rec[0]]
        if not isinstance(r, (nir.Linear, nir.Affine)) or preds != [spike_key]:
            raise TypeError(f"sb.import_nir: the cycle through {rec[0]!r} ({type(r).__name__}) is not a recurrent "
                            f"Linear from {spike_key!r} back to {key!r}, the only cycle sparsebptt maps")
        V = np.asarray(r.weight, dtype=np.float64) * scale[:, None]
        if isinstance(r, nir.Affine) and r.bias is not None and np.any(np.asarray(r.bias) != 0):
            extra = np.asarray(r.bias, dtype=np.float64) * scale  # every step, as snnTorch's RLeaky runs it
            layer.bias = extra if layer.bias is None else layer.bias + extra
        if layer.reset == "subtract":
            # the back edge's diagonal is the reset plus any self-recurrence: -beta*thr (reset before the
            # decay), -thr (after it; the same spikes as before_decay with thr - beta*thr more self-weight)
            drop = -np.diag(V)
            if np.allclose(drop, layer.beta * thr, rtol=1e-6, atol=1e-12):
                V = V - np.diag(np.diag(V))
            elif np.allclose(drop, thr, rtol=1e-6, atol=1e-12):
                layer.reset_timing = "after_decay"
                V = V - np.diag(np.diag(V))
            else:
                V = V + np.diag(layer.beta * thr)
        layer.recurrent = V if np.any(V != 0) else None
    return layer, nxt


def _lif_module(layer: _Layer, dtype) -> LIF:
    H, n_in = layer.weight.shape
    uniform = bool(np.all(layer.beta == layer.beta[0]))
    cell = LIF(n_in, H, beta=float(layer.beta[0]) if uniform else 0.9, threshold=layer.threshold,
               reset=layer.reset, reset_timing=layer.reset_timing, recurrent=layer.recurrent is not None,
               learn_beta=not uniform, bias=layer.bias is not None)
    cell.to(dtype)
    with torch.no_grad():
        cell.weight.copy_(torch.as_tensor(layer.weight))
        if layer.bias is not None:
            cell.bias.copy_(torch.as_tensor(layer.bias))
        if layer.recurrent is not None:
            cell.recurrent_weight.copy_(torch.as_tensor(layer.recurrent))
        if not uniform:
            cell.beta.copy_(torch.as_tensor(layer.beta))
    return cell


def import_nir(graph, *, dt: "float | None" = None, strategy=None) -> nn.Sequential:
    """A sparsebptt model of a NIR graph (a `nir.NIRGraph` or a file written by ``nir.write``):
    ``nn.Sequential`` of ``sb.Recurrent(sb.cells.Stack([LIF, ...]), return_state=False)`` (spiking
    layers that follow each other, scanned together) and ``nn.Linear`` (layers applied per step).

    The model maps x (T, B, input) to the output node's values per step (T, B, output); for a graph
    whose metadata says ``reduce = "sum"`` (a classifier exported by `export_nir`) the last spiking
    group reduces with "sum" and the model returns the classifier's output (B, output).

    Args:
        graph: the graph or the path of its file.
        dt: the seconds one step stands for: beta = 1 - dt/tau. Default: the graph's
            ``metadata["dt"]`` (ours); snnTorch and SpikingJelly write graphs for dt = 1e-4, Norse
            for the dt its exporter was given.
        strategy: the memory strategy of every `sb.Recurrent` (a `Strategy` or a string; None is
            full BPTT).

    Raises:
        TypeError: a node type or a graph shape sparsebptt cannot map, naming the node and what
            is supported (see `IMPORTED_NODES`).
        ValueError: parameters our LIF cannot express (v_leak or v_reset != 0, a threshold per
            neuron, tau < dt), or no dt.
    """
    nir = _require_nir("sb.import_nir")
    if isinstance(graph, (str, Path)):
        graph = nir.read(str(graph))
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"sb.import_nir: expected a nir.NIRGraph or the path of a .nir file, got "
                        f"{type(graph).__name__}")
    meta = dict(getattr(graph, "metadata", None) or {})
    if dt is None:
        dt = meta.get("dt")
        if dt is None:
            raise ValueError("sb.import_nir: the graph does not record its time step; pass dt= (snnTorch and "
                             "SpikingJelly write graphs for dt=1e-4; Norse for the dt given to its exporter)")
    dt = float(np.asarray(dt).reshape(-1)[0])
    if not dt > 0:
        raise ValueError(f"sb.import_nir: dt must be a positive number, got {dt!r}")
    nodes, edges = _flatten(nir, graph)
    known = (nir.Input, nir.Output, nir.Affine, nir.Linear, nir.LIF, nir.IF, nir.LI, nir.I, nir.Threshold)
    for k, n in nodes.items():
        if not isinstance(n, known):
            raise TypeError(f"sb.import_nir: node {k!r} is a nir.{type(n).__name__}, which sparsebptt cannot map; "
                            f"supported: {', '.join(IMPORTED_NODES)}, and a recurrent Linear edge per layer")
    inputs = [k for k, n in nodes.items() if isinstance(n, nir.Input)]
    outputs = [k for k, n in nodes.items() if isinstance(n, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise TypeError(f"sb.import_nir: needs one Input and one Output node, got {inputs} and {outputs}")
    _, back = _walk(nodes, edges, inputs[0])
    recurrent = {a for a, _ in back}
    seq, k = [], inputs[0]
    while True:  # the forward chain
        seq.append(k)
        nxt = [b for a, b in edges if a == k and (a, b) not in back and b not in recurrent]
        if not nxt:
            break
        if len(nxt) > 1:
            raise TypeError(f"sb.import_nir: node {k!r} feeds {nxt}; sparsebptt maps chains of layers, not "
                            "branching graphs")
        k = nxt[0]
    if seq[-1] != outputs[0]:
        raise TypeError(f"sb.import_nir: the chain from {inputs[0]!r} ends at {seq[-1]!r}, not at the Output node "
                        f"{outputs[0]!r}")
    arrays = [np.asarray(n.weight) for n in nodes.values() if isinstance(n, (nir.Affine, nir.Linear))]
    dtype = torch.float64 if any(a.dtype == np.float64 for a in arrays) else torch.get_default_dtype()
    items, i, seq = [], 0, seq[1:-1]
    while i < len(seq):
        key, n = seq[i], nodes[seq[i]]
        W = b = None
        if isinstance(n, (nir.Affine, nir.Linear)):
            W = np.asarray(n.weight)
            b = np.asarray(n.bias) if isinstance(n, nir.Affine) and n.bias is not None else None
            if i + 1 >= len(seq) or not isinstance(nodes[seq[i + 1]], (nir.LIF, nir.IF, nir.LI, nir.I)):
                items.append(("linear", W, b))
                i += 1
                continue
            i += 1
            key, n = seq[i], nodes[seq[i]]
        if isinstance(n, nir.Threshold):
            raise TypeError(f"sb.import_nir: node {key!r} is a Threshold without an LI / I before it")
        layer, i = _neuron(nir, key, nodes, edges, back, seq, i, dt, W, b, dtype)
        items.append(("lif", layer))
    reduce = meta.get("reduce")
    T = meta.get("T")
    if reduce not in (None, "sum") or (reduce == "sum" and T is None):
        raise ValueError(f"sb.import_nir: metadata reduce={reduce!r} (T={T!r}) is not one sparsebptt wrote")
    last_lif = max((j for j, it in enumerate(items) if it[0] == "lif"), default=-1)
    if last_lif < 0:
        raise TypeError("sb.import_nir: the graph has no spiking layer (LIF, IF or LI / I -> Threshold)")
    modules, group = [], []

    def close(reduce_):
        if group:
            modules.append(Recurrent(Stack([_lif_module(g, dtype) for g in group]), strategy=strategy,
                                     reduce=reduce_, return_state=False))
            group.clear()

    for j, item in enumerate(items):
        if item[0] == "lif":
            group.append(item[1])
            if j == last_lif:
                close("sum" if reduce == "sum" else None)
            continue
        close(None)
        _, W, b = item
        if reduce == "sum" and j > last_lif and b is not None:
            b = np.asarray(b, dtype=np.float64) * int(np.asarray(T).reshape(-1)[0])  # per step, summed over T
        lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(W))
            if b is not None:
                lin.bias.copy_(torch.as_tensor(b))
        modules.append(lin)
    return nn.Sequential(*modules)


def run_nir(graph, x: torch.Tensor, dt: float = 1.0) -> torch.Tensor:
    """Run an exported graph on ``x`` (T, B, input) with the Euler rule at ``dt``; returns the output
    node's values per step (T, B, output), float64.

    A reference for the nodes `export_nir` writes (Input, Output, Affine, Linear, LIF, IF, LI, I,
    Threshold); a back edge (one that closes a cycle) delivers the previous step's output.
    """
    nir = _require_nir("run_nir")
    nodes, edges = graph.nodes, list(graph.edges)
    inputs = [k for k, n in nodes.items() if isinstance(n, nir.Input)]
    outputs = [k for k, n in nodes.items() if isinstance(n, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"run_nir: needs one Input and one Output node, got {inputs} and {outputs}")
    order, back = _walk(nodes, edges, inputs[0])
    preds = {k: [a for a, b in edges if b == k] for k in nodes}
    f64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    Tn, B = x.shape[0], x.shape[1]
    prev = {}  # node -> output of the previous step (for back edges)
    mem = {}
    ys = []
    for t in range(Tn):
        cur = {}
        for k in order:
            n = nodes[k]
            if isinstance(n, nir.Input):
                cur[k] = x[t].to(torch.float64)
                continue
            total = None
            for a in preds[k]:
                v = prev.get(a) if (a, k) in back else cur[a]
                if v is None:
                    continue  # nothing yet from a back edge at t = 0
                total = v if total is None else total + v
            if total is None:
                total = torch.zeros(B, *np.asarray(n.input_type["input"]).tolist(), dtype=torch.float64)
            if isinstance(n, nir.Output):
                cur[k] = total
            elif isinstance(n, nir.Affine):
                cur[k] = total @ f64(n.weight).T + f64(n.bias)
            elif isinstance(n, nir.Linear):
                cur[k] = total @ f64(n.weight).T
            elif isinstance(n, (nir.LIF, nir.LI, nir.IF, nir.I)):
                v = mem.get(k, torch.zeros_like(total))
                if isinstance(n, (nir.LIF, nir.LI)):  # leaky
                    v = v + dt / f64(n.tau) * (f64(n.v_leak) - v + f64(n.r) * total)
                else:  # integrate only
                    v = v + dt * f64(n.r) * total
                if isinstance(n, (nir.LIF, nir.IF)):  # spike and reset
                    z = (v > f64(n.v_threshold)).to(torch.float64)
                    v = torch.where(z > 0, f64(n.v_reset).expand_as(v), v)
                    cur[k] = z
                else:
                    cur[k] = v
                mem[k] = v
            elif isinstance(n, nir.Threshold):
                cur[k] = (total > f64(n.threshold)).to(torch.float64)
            else:
                raise TypeError(f"run_nir: node {k!r} of type {type(n).__name__} is not supported")
        prev = cur
        ys.append(cur[outputs[0]])
    return torch.stack(ys)
