"""Export LIF stacks to NIR, the Neuromorphic Intermediate Representation (``pip install nir``).

    import sparsebptt as sb
    graph = sb.export_nir(model, "model.nir", T=100)   # a nir.NIRGraph, also written to the file

NIR describes neurons in continuous time; our LIF is a discrete map per step::

    u[t] = beta * v[t-1] + I[t]        I[t] = W x[t] + b (+ V z[t-1])
    z[t] = H(u[t] - threshold)         (spike if u > threshold, as NIR's "v > v_threshold")
    v[t] = u[t] - z[t] * threshold     reset="subtract"
    v[t] = u[t] * (1 - z[t])           reset="zero"

**Time step convention.** NIR has no discrete-time neuron, so we fix ``dt = 1`` (one step of our
scan is one time unit) and choose the constants so that NIR's neuron integrated with the forward
Euler rule at that ``dt`` is our map exactly. NIR's ``LI`` / ``LIF`` obey
``tau dv/dt = (v_leak - v) + r I``; one Euler step is ``v += dt/tau * (v_leak - v + r I)``,
i.e. ``v = (1 - dt/tau) v + (dt/tau) r I``. Hence

    tau = dt / (1 - beta),  r = tau / dt = 1 / (1 - beta),  v_leak = 0,  v_threshold = threshold

(beta = 1, no leak, becomes NIR's ``IF`` / ``I`` with ``r = 1 / dt``). A simulator that integrates the
ODE exactly (``v *= exp(-dt/tau)``) instead of with Euler gets ``exp(-(1 - beta))`` as the decay,
not beta: run the graph with dt = 1 and Euler, as snnTorch / nirtorch do.

**Resets.** NIR's ``LIF`` resets to ``v_reset`` (here 0) when it spikes: that is our
``reset="zero"``, exported as ``Affine -> LIF`` exactly. NIR has no subtractive reset. With
``subtract_reset="exact"`` (default) a ``reset="subtract"`` layer is exported as
``Affine -> LI -> Threshold`` with a recurrent edge ``Threshold -> Linear(-beta * threshold) -> LI``:
subtracting ``threshold`` from v after a spike is subtracting ``beta * threshold`` from the next
step's u, so the graph is our map exactly, provided a recurrent (back) edge delivers the previous
step's output, as nirtorch and snnTorch execute cycles. Hardware that only runs ``LIF`` nodes
can take ``subtract_reset="zero"``, which exports ``LIF`` with reset to zero: a different network
(it forgets the overshoot above threshold), recorded as ``"approximate"`` in the graph metadata.

**Readout.** A `SpikingClassifier` reads out spike counts over T steps divided by T; its readout is
exported as ``Affine(W / T, b / T) -> I(r=1/dt)``, an integrator whose value after T steps is the
logits (so the exporter needs T). Recurrent LIF layers add ``Linear(V)`` back edges. Learned
per-neuron betas export per neuron.

`run_nir` is a small reference interpreter of exactly these nodes (dt = 1, Euler, back edges
delayed one step); the tests check that it reproduces the model's spikes and logits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["export_nir", "run_nir", "SUBTRACT_RESETS"]

SUBTRACT_RESETS = ("exact", "zero")


def _require_nir():
    try:
        import nir
    except ImportError:
        raise ImportError("sb.export_nir needs the `nir` package: pip install 'sparsebptt[nir]' "
                          "(or pip install nir)") from None
    return nir


def _np(t, dtype=None) -> np.ndarray:
    """A parameter as a numpy array of its own dtype (float32 for a float32 model)."""
    t = t.detach().cpu()
    return t.numpy().astype(dtype or t.numpy().dtype)


def _lif_layers(model):
    """(layers, readout): the LIF layers of a SpikingClassifier, a Stack of LIF or one LIF."""
    from .cells import LIF, Stack

    readout = None
    cell = model
    if isinstance(getattr(model, "cell", None), nn.Module) and isinstance(getattr(model, "readout", None), nn.Linear):
        cell, readout = model.cell, model.readout
    layers = list(cell.layers) if isinstance(cell, Stack) else [cell]
    bad = [f"{i}: {type(layer).__name__}" for i, layer in enumerate(layers) if not isinstance(layer, LIF)]
    if bad:
        raise TypeError(f"sb.export_nir exports stacks of LIF layers; got {', '.join(bad)} (NIR has no GRU / "
                        "LSTM node). Pass a SpikingClassifier, a cells.Stack of cells.LIF, or a cells.LIF")
    return layers, readout


def export_nir(model: nn.Module, path: "str | Path | None" = None, *, T: "int | None" = None,
               subtract_reset: str = "exact", dt: float = 1.0):
    """The NIR graph of a LIF stack (see the module docstring for the mapping), written to
    ``path`` with `nir.write` if given.

    Args:
        model: a `SpikingClassifier` (LIF stack + readout of spike counts / T), a `cells.Stack` of
            `cells.LIF`, or one `cells.LIF`. Its output node gives the spikes of the last layer,
            or for a classifier the logits after T steps.
        path: where to write the graph (HDF5, read back with ``nir.read``).
        T: the time steps the classifier's readout averages over (required for a classifier).
        subtract_reset: "exact" (LI + Threshold + recurrent edge) or "zero" (NIR LIF with reset to
            0, approximate) for layers with reset="subtract".
        dt: the time unit NIR's constants are expressed in (tau scales with it; r and the
            dynamics per step do not).

    Returns:
        The `nir.NIRGraph`; its ``metadata`` records dt, the discretisation, the reset mapping and
        T.
    """
    nir = _require_nir()
    if subtract_reset not in SUBTRACT_RESETS:
        raise ValueError(f"sb.export_nir: unknown subtract_reset {subtract_reset!r}; valid values are: "
                         f"{', '.join(SUBTRACT_RESETS)}")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"sb.export_nir: dt must be a positive number, got {dt!r}")
    layers, readout = _lif_layers(model)
    fdt = layers[0].weight.detach().cpu().numpy().dtype  # arrays keep the model's precision
    if readout is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
        raise ValueError(f"sb.export_nir: a classifier's readout averages spike counts over T steps; pass "
                         f"T=<positive int> (the T it was trained with), got {T!r}")
    nodes = {"input": nir.Input(input_type=np.array([layers[0].input_size]))}
    edges = []
    src = "input"
    approximate = False
    for i, layer in enumerate(layers):
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
        r = (1.0 / (1.0 - beta) if leaky else np.full(H, 1.0 / dt)).astype(fdt)
        name = f"layer{i}"
        w = _np(layer.weight)
        nodes[f"{name}.affine"] = (nir.Affine(weight=w, bias=_np(layer.bias)) if layer.bias is not None
                                   else nir.Linear(weight=w))
        edges.append((src, f"{name}.affine"))
        feedback = _np(layer.recurrent_weight) if layer.recurrent else None
        if p.reset == "zero" or subtract_reset == "zero":
            approximate |= p.reset == "subtract"
            nodes[f"{name}.lif"] = (nir.LIF(tau=tau, r=r, v_leak=zeros, v_threshold=thr, v_reset=zeros) if leaky
                                    else nir.IF(r=r, v_threshold=thr, v_reset=zeros))
            edges.append((f"{name}.affine", f"{name}.lif"))
            out = f"{name}.lif"
            if feedback is not None:
                nodes[f"{name}.recurrent"] = nir.Linear(weight=feedback)
                edges += [(out, f"{name}.recurrent"), (f"{name}.recurrent", out)]
        else:  # subtractive reset, exactly: LI (no reset) -> Threshold, spikes fed back with -beta*thr
            nodes[f"{name}.li"] = (nir.LI(tau=tau, r=r, v_leak=zeros) if leaky else nir.I(r=r))
            nodes[f"{name}.spike"] = nir.Threshold(threshold=thr)
            back = np.diag(-(beta * p.threshold)).astype(fdt)
            if feedback is not None:
                back = back + feedback
            nodes[f"{name}.recurrent"] = nir.Linear(weight=back)
            edges += [(f"{name}.affine", f"{name}.li"), (f"{name}.li", f"{name}.spike"),
                      (f"{name}.spike", f"{name}.recurrent"), (f"{name}.recurrent", f"{name}.li")]
            out = f"{name}.spike"
        src = out
    n_out = layers[-1].hidden_size
    if readout is not None:
        nodes["readout"] = nir.Affine(weight=_np(readout.weight, fdt) / fdt.type(T),
                                      bias=(_np(readout.bias, fdt) / fdt.type(T) if readout.bias is not None
                                            else np.zeros(readout.out_features, dtype=fdt)))
        nodes["readout.sum"] = nir.I(r=np.full(readout.out_features, 1.0 / dt, dtype=fdt))
        edges += [(src, "readout"), ("readout", "readout.sum")]
        src, n_out = "readout.sum", readout.out_features
    nodes["output"] = nir.Output(output_type=np.array([n_out]))
    edges.append((src, "output"))
    from . import __version__

    metadata = {
        "producer": f"sparsebptt {__version__}",
        "dt": float(dt),
        "discretization": "forward Euler at dt: v[t] = beta v[t-1] + I[t], beta = 1 - dt/tau, r = tau/dt",
        "recurrent_edges": "a back edge delivers the previous step's output",
        "reset": ("subtract exported as LIF reset to zero (approximate)" if approximate else
                  "exact: reset=zero as LIF(v_reset=0); reset=subtract as LI -> Threshold with a "
                  "-beta*threshold back edge"),
        "approximate": int(approximate),
    }
    if readout is not None:
        metadata["readout"] = f"logits = value of readout.sum after T={T} steps (spike counts / T -> Linear)"
        metadata["T"] = int(T)
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        nir.write(str(path), graph)
    return graph


def run_nir(graph, x: torch.Tensor, dt: float = 1.0) -> torch.Tensor:
    """Run an exported graph on ``x`` (T, B, input) with the Euler rule at ``dt``; returns the output
    node's values per step (T, B, output), float64.

    A reference for the nodes `export_nir` writes (Input, Output, Affine, Linear, LIF, IF, LI, I,
    Threshold); a back edge (one that closes a cycle) delivers the previous step's output.
    """
    nir = _require_nir()
    nodes, edges = graph.nodes, list(graph.edges)
    inputs = [k for k, n in nodes.items() if isinstance(n, nir.Input)]
    outputs = [k for k, n in nodes.items() if isinstance(n, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"run_nir: needs one Input and one Output node, got {inputs} and {outputs}")
    succ = {k: [] for k in nodes}
    for a, b in edges:
        succ[a].append(b)
    order, back, state, on_stack = [], set(), {}, set()

    def visit(k):  # depth-first: edges to a node on the stack close a cycle
        state[k] = "open"
        on_stack.add(k)
        for nxt in succ[k]:
            if nxt in on_stack:
                back.add((k, nxt))
            elif nxt not in state:
                visit(nxt)
        on_stack.discard(k)
        order.append(k)

    visit(inputs[0])
    order.reverse()
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
            elif isinstance(n, (nir.LIF, nir.LI)):
                v = mem.get(k, torch.zeros_like(total))
                v = v + dt / f64(n.tau) * (f64(n.v_leak) - v + f64(n.r) * total)
                if isinstance(n, nir.LIF):
                    z = (v > f64(n.v_threshold)).to(torch.float64)
                    v = torch.where(z > 0, f64(n.v_reset).expand_as(v), v)
                    cur[k] = z
                else:
                    cur[k] = v
                mem[k] = v
            elif isinstance(n, (nir.IF, nir.I)):
                v = mem.get(k, torch.zeros_like(total)) + dt * f64(n.r) * total
                if isinstance(n, nir.IF):
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
