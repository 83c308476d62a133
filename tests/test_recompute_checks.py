"""No silent wrong results under recomputation (issue 16).

- a subclass that overrides ``step`` is run through its ``step``, not the fused kernel of the step
  it replaced (said once on the log);
- tensors a cell uses without registering them (a closure, a list, another module's Parameter)
  get their gradients under every strategy;
- checkpoint storage follows the dtype of the state it stores;
- state kept in the module instead of the state tuple is caught by the determinism check, which
  names the cell, the state component and the step;
- scans under ``torch.no_grad()`` / ``torch.inference_mode()`` run a plain forward.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import sparsebptt as sb
from sparsebptt.kernels import backend as kb
from sparsebptt.testing import assert_close, seeded

from helpers import N_IN, run

CPU = kb.backend_available("cpu")[0]
needs_cpu = pytest.mark.skipif(not CPU, reason="cpu backend unavailable")

EXACT = [sb.Checkpoint(every=4), sb.Revolve(slots=2), sb.DoubleCheckpoint(outer=8, inner=3, outer_storage="host"),
         sb.DoubleCheckpoint(outer=8, inner=3, outer_storage="disk")]


def _sid(s):
    return s.to_string() + getattr(s, "outer_storage", "")


def compare(ref, got, dtype=torch.float64):
    assert ref.keys() == got.keys()
    for name in ref:
        assert_close(name, ref[name], got[name], dtype)


@pytest.fixture
def fresh_log(monkeypatch):
    """Messages logged once are logged again in this test."""
    import sparsebptt.cells.base as cells_base

    monkeypatch.setattr(cells_base, "_logged", set())


# ---- item 2: an overridden step is honoured by the fused path ----------------------------------
class HalfInputLIF(sb.cells.LIF):
    """A user subclass that scales its input by 0.5 before the built-in step."""

    def step(self, x_t, state):
        return super().step(0.5 * x_t, state)


class HalfInputGRU(sb.cells.GRU):
    def step(self, x_t, state):
        return super().step(0.5 * x_t, state)


class HalfInputStack(sb.cells.Stack):
    def step(self, x_t, state):
        return super().step(0.5 * x_t, state)


def _lif(cls, backend):
    torch.manual_seed(4)
    return cls(N_IN, 9, threshold=0.3, learn_beta=True, backend=backend).double()


@needs_cpu
@pytest.mark.parametrize("strategy", [sb.FullBPTT()] + EXACT[:2], ids=_sid)
@pytest.mark.parametrize("kind", ["lif", "gru"])
def test_overridden_step_runs_not_the_fused_kernel(kind, strategy, caplog, fresh_log):
    cls = {"lif": HalfInputLIF, "gru": HalfInputGRU}[kind]

    def make(backend, cls=cls):
        torch.manual_seed(4)
        if kind == "lif":
            return cls(N_IN, 9, threshold=0.3, learn_beta=True, backend=backend).double()
        return cls(N_IN, 6, backend=backend).double()

    fused = make("cpu")
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        assert fused.scan_segment is None
    assert f"{cls.__name__} overrides" in caplog.text and "step through the overriding step" in caplog.text
    expect = run(make("torch"), 23, 2, torch.float64, sb.FullBPTT())
    compare(expect, run(fused, 23, 2, torch.float64, strategy))
    base = run(make("torch", cls.__bases__[0]), 23, 2, torch.float64, sb.FullBPTT())
    assert not torch.allclose(base["out"], expect["out"])  # the override does change the result


@needs_cpu
def test_step_overridden_on_the_instance_is_honoured(caplog, fresh_log):
    cell = _lif(sb.cells.LIF, "cpu")
    builtin_step = cell.step
    cell.step = lambda x_t, state: builtin_step(0.5 * x_t, state)
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        assert cell.scan_segment is None
    assert "LIF instance overrides LIF.step" in caplog.text
    expect = run(_lif(HalfInputLIF, "torch"), 19, 2, torch.float64, sb.FullBPTT())
    compare(expect, run(cell, 19, 2, torch.float64, sb.Checkpoint(every=5)))


@needs_cpu
def test_subclass_that_keeps_the_step_keeps_the_fused_path():
    class Named(sb.cells.LIF):
        pass

    assert Named(N_IN, 4, backend="cpu").scan_segment is not None


@needs_cpu
def test_stack_subclass_overriding_step_runs_its_step(caplog, fresh_log):
    def make(cls, backend):
        torch.manual_seed(5)
        return cls([sb.cells.LIF(N_IN, 8, threshold=0.3, backend=backend),
                    sb.cells.GRU(8, 5, backend=backend)]).double()

    fused = make(HalfInputStack, "cpu")
    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        assert fused.scan_segment is None
    assert "HalfInputStack overrides Stack.step" in caplog.text
    expect = run(make(HalfInputStack, "torch"), 21, 2, torch.float64, sb.FullBPTT())
    for st in [sb.FullBPTT(), sb.Revolve(slots=3)]:
        compare(expect, run(fused, 21, 2, torch.float64, st))
    assert make(sb.cells.Stack, "cpu").scan_segment is not None


@needs_cpu
def test_stack_layer_with_overridden_step_is_stepped():
    torch.manual_seed(6)
    fused = sb.cells.Stack([HalfInputLIF(N_IN, 8, threshold=0.3, backend="cpu"),
                            sb.cells.LIF(8, 5, threshold=0.2, backend="cpu")]).double()
    torch.manual_seed(6)
    ref = sb.cells.Stack([HalfInputLIF(N_IN, 8, threshold=0.3, backend="torch"),
                          sb.cells.LIF(8, 5, threshold=0.2, backend="torch")]).double()
    assert fused.layers[0].scan_segment is None and fused.layers[1].scan_segment is not None
    compare(run(ref, 17, 2, torch.float64, sb.FullBPTT()), run(fused, 17, 2, torch.float64, sb.Checkpoint(4)))


# ---- item 9: grad mode off runs a plain forward -----------------------------------------------
def _builtin(kind):
    torch.manual_seed(7)
    return {"lif": lambda: sb.cells.LIF(N_IN, 7, threshold=0.3, recurrent=True),
            "lif-ff": lambda: sb.cells.LIF(N_IN, 7, threshold=0.3, learn_beta=True),
            "gru": lambda: sb.cells.GRU(N_IN, 6),
            "lstm": lambda: sb.cells.LSTM(N_IN, 4),
            "delta": lambda: sb.cells.DeltaGRU(N_IN, 5, threshold=0.05),
            "egru": lambda: sb.cells.EGRU(N_IN, 6, threshold_init=0.1, active_set="union"),
            "stack": lambda: sb.cells.Stack([sb.cells.LIF(N_IN, 8, threshold=0.3), sb.cells.GRU(8, 5)]),
            }[kind]().double()


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("strategy", [sb.FullBPTT()] + EXACT, ids=_sid)
@pytest.mark.parametrize("kind", ["lif", "lif-ff", "gru", "lstm", "delta", "egru", "stack"])
def test_scan_without_grad_is_a_plain_forward(kind, strategy, mode):
    cell = _builtin(kind)
    x = seeded(1, 19, 2, N_IN)
    for reduce in (None, "sum", "last"):
        expect, expect_state = sb.scan(cell, x, strategy=sb.FullBPTT(), reduce=reduce)
        with getattr(torch, mode)(), sb.trace() as t:
            y, state = sb.scan(cell, x, strategy=strategy, reduce=reduce)
        assert not y.requires_grad and all(not s.requires_grad for s in state)
        assert_close("out", expect.detach(), y.clone())
        for i, (a, b) in enumerate(zip(expect_state, state)):
            assert_close(f"state_T[{i}]", a.detach(), b.clone())
        assert (t.forward_steps, t.recomputed_steps) == (19, 0)
        assert t.peak_stored_bytes == 0 and t.peak_offloaded_bytes == 0  # no checkpoint, no graph


# ---- item 4: checkpoint storage follows the dtype of the state stored --------------------------
class Float32Zeros(nn.Module):
    """A user cell whose initial_state ignores ``dtype``: float32 zeros for a float64 cell."""

    def __init__(self, n_in, n):
        super().__init__()
        g = torch.Generator().manual_seed(12)
        self.w = nn.Parameter(torch.randn(n_in, n, generator=g) / n_in ** 0.5)
        self.c = nn.Parameter(torch.rand(n, generator=g))
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.n, device=device), torch.zeros(batch_size, self.n, device=device))

    def step(self, x_t, state):
        h, a = state
        h = torch.tanh(x_t @ self.w + self.c * h)  # float64 from the first step on (promotion)
        return h, (h, 0.9 * a + h)


def _default_state_run(cell, strategy, T=23):
    """Forward + backward from the cell's own initial state (state0=None)."""
    x = seeded(3, T, 2, N_IN).requires_grad_()
    cell.zero_grad(set_to_none=True)
    out, state = sb.scan(cell, x, strategy=strategy)
    loss = (out * seeded(4, *out.shape)).sum() + sum((s * seeded(5 + i, *s.shape)).sum() for i, s in enumerate(state))
    loss.backward()
    res = {"out": out.detach(), "dx": x.grad}
    res.update({f"state_T[{i}]": s.detach() for i, s in enumerate(state)})
    res.update({f"d{n}": p.grad for n, p in cell.named_parameters()})
    return res


@pytest.mark.parametrize("strategy", EXACT + [sb.DoubleCheckpoint.optimal(fast_slots=1, slow_slots=2,
                                                                          outer_storage="disk")], ids=_sid)
def test_checkpoints_follow_the_dtype_of_the_stored_state(strategy):
    cell = Float32Zeros(N_IN, 6).double()
    assert cell.initial_state(2, dtype=torch.float64)[0].dtype == torch.float32
    expect = _default_state_run(cell, sb.FullBPTT())
    assert expect["state_T[0]"].dtype == torch.float64
    got = _default_state_run(cell, strategy)
    for name in expect:  # float64 tolerance: a float32 checkpoint would be off by ~1e-7
        assert_close(name, expect[name], got[name], torch.float64)


class DtypeDrift(Float32Zeros):
    """A step whose second state component changes dtype after step 12: float64, then float32
    (the step count is the third state component)."""

    def initial_state(self, batch_size, device=None, dtype=None):
        return tuple(s.to(dtype) for s in super().initial_state(batch_size, device)) + \
            (torch.zeros(batch_size, 1, device=device, dtype=dtype),)

    def step(self, x_t, state):
        h, a, t = state
        h = torch.tanh(x_t @ self.w + self.c * h)
        a = 0.9 * a + h
        return h, (h, a if t[0, 0] < 12 else a.float(), t + 1)


@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=3), sb.DoubleCheckpoint(outer=8, inner=3,
                                                                                  outer_storage="disk")],
                         ids=_sid)
def test_state_that_changes_dtype_is_an_error_naming_the_component(strategy):
    cell = DtypeDrift(N_IN, 6).double()
    x = seeded(3, 23, 2, N_IN).requires_grad_()
    with pytest.raises(ValueError, match=r"sb.scan of DtypeDrift: state component 1 at step \d+ is "
                                         r"torch.float(32|64) of shape \(2, 6\), but the checkpoints before it hold "
                                         r"torch.float(64|32) of shape \(2, 6\); a cell's step must keep"):
        y, _ = sb.scan(cell, x, strategy=strategy)
        y.sum().backward()  # double-disk: the inner checkpoints of a recomputed outer segment


def test_state0_in_the_dtype_of_x_is_accepted_when_initial_state_ignores_dtype():
    cell = Float32Zeros(N_IN, 6).double()
    x = seeded(3, 9, 2, N_IN)
    state0 = tuple(s.double() for s in cell.initial_state(2))
    y, _ = sb.scan(cell, x, state0, strategy=sb.Checkpoint(every=3))
    assert y.dtype == torch.float64
    with pytest.raises(TypeError, match=r"state0\[0\] has dtype torch.float16, expected torch.float32 \(what "
                                        r"Float32Zeros.initial_state gives for dtype=torch.float64\) or "
                                        "torch.float64 like x"):
        sb.scan(cell, x, tuple(s.half() for s in state0))


# ---- item 3: tensors a cell uses without registering them get their gradients ------------------
def _closure_cell(n):
    """A cell built by a function: its input weights are a tensor the step closes over."""
    g = torch.Generator().manual_seed(21)
    w_in = (torch.randn(N_IN, n, generator=g, dtype=torch.float64) / N_IN ** 0.5).requires_grad_()

    class Closure(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5)

        def initial_state(self, batch_size, device=None, dtype=None):
            return (torch.zeros(batch_size, n, device=device, dtype=dtype),)

        def step(self, x_t, state):
            h = torch.tanh(x_t @ w_in + state[0] @ self.u)
            return h, (h,)

    return Closure(), {"w_in": w_in}


class ListLinear(nn.Module):
    """Keeps its input layer in a plain list: not registered, so not in parameters()."""

    def __init__(self, n):
        super().__init__()
        torch.manual_seed(22)
        self.layers = [nn.Linear(N_IN, n).double()]
        self.u = nn.Parameter(torch.randn(n, n, dtype=torch.float64) / n ** 0.5)
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.n, device=device, dtype=dtype),)

    def step(self, x_t, state):
        h = torch.tanh(self.layers[0](x_t) + state[0] @ self.u)
        return h, (h,)


class Shared(nn.Module):
    """Uses a Parameter owned by another module (a shared embedding, a tied weight)."""

    def __init__(self, owner: nn.Module, n):
        super().__init__()
        self._owner = (owner,)  # a tuple: not a submodule
        torch.manual_seed(23)
        self.u = nn.Parameter(torch.randn(n, n, dtype=torch.float64) / n ** 0.5)
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.n, device=device, dtype=dtype),)

    def step(self, x_t, state):
        h = torch.tanh(self._owner[0](x_t) + state[0] @ self.u)
        return h, (h,)


def _unregistered(kind):
    if kind == "closure":
        return _closure_cell(6)
    if kind == "list":
        cell = ListLinear(6)
        return cell, {"layers[0].weight": cell.layers[0].weight, "layers[0].bias": cell.layers[0].bias}
    torch.manual_seed(24)
    owner = nn.Linear(N_IN, 6).double()
    return Shared(owner, 6), {"owner.weight": owner.weight, "owner.bias": owner.bias}


@pytest.mark.parametrize("strategy", EXACT + [sb.DoubleCheckpoint.optimal(fast_slots=1, slow_slots=2,
                                                                          outer_storage="host")], ids=_sid)
@pytest.mark.parametrize("kind", ["closure", "list", "other-module"])
def test_unregistered_tensors_get_their_gradients(kind, strategy):
    results = []
    for st in (sb.FullBPTT(), strategy):
        cell, hidden = _unregistered(kind)
        res = run(cell, 23, 2, torch.float64, st)
        res.update({f"d{name}": t.grad for name, t in hidden.items()})
        results.append(res)
    for name, g in results[1].items():
        if name.startswith("d") and name[1:] in hidden:
            assert g is not None, f"{name}: no gradient under {_sid(strategy)}"
    compare(*results)


def test_unregistered_leaf_gradient_accumulates_with_its_other_uses():
    """A shared weight also used outside the scan: both contributions, as under FullBPTT."""
    grads = []
    for st in (sb.FullBPTT(), sb.Revolve(slots=2)):
        cell, hidden = _unregistered("other-module")
        x = seeded(2, 17, 2, N_IN)
        y, (h,) = sb.scan(cell, x, strategy=st)
        extra = cell._owner[0](x[0]).pow(2).sum()  # the same Linear used outside the scan
        (y.sum() + h.sum() + extra).backward()
        grads.append([t.grad.clone() for t in hidden.values()])
    for a, b in zip(*grads):
        assert_close("d_shared", a, b)


# ---- item 5: module-held state is caught, named and explained ----------------------------------
class ModuleStateLIF(nn.Module):
    """Keeps its membrane in ``self.v`` (as snnTorch's init_hidden=True): the state tuple is empty."""

    def __init__(self, n):
        super().__init__()
        torch.manual_seed(25)
        self.fc = nn.Linear(N_IN, n)
        self.v = None
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        return ()

    def step(self, x_t, state):
        v = torch.zeros(x_t.shape[0], self.n, dtype=x_t.dtype) if self.v is None else self.v
        self.v = 0.9 * v + self.fc(x_t)
        return torch.tanh(self.v), state


class CountingCell(nn.Module):
    """Its step depends on a Python counter in the module: recomputation does not repeat it."""

    def __init__(self, n):
        super().__init__()
        torch.manual_seed(26)
        self.fc = nn.Linear(N_IN, n)
        self.calls = 0
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.n, device=device, dtype=dtype),)

    def step(self, x_t, state):
        self.calls += 1
        h = torch.tanh(self.fc(x_t) + 0.5 * state[0] + 0.01 * self.calls)
        return h, (h,)


@pytest.mark.parametrize("strategy", EXACT, ids=_sid)
def test_module_held_state_is_an_error_that_says_what_to_fix(strategy):
    cell = ModuleStateLIF(6).double()
    x = seeded(2, 23, 2, N_IN).requires_grad_()
    y, _ = sb.scan(cell, x, strategy=strategy)
    with pytest.raises(sb.RecomputationError, match=r"sb.scan of ModuleStateLIF: steps \d+\.\.\d+ reach "
                                                    r"(x at steps|state component) .* not in the state tuple: "
                                                    r"the cell keeps state in the module .* keep every tensor"):
        y.sum().backward()


@pytest.mark.parametrize("strategy", EXACT, ids=_sid)
def test_step_that_is_not_a_function_of_its_state_is_an_error_naming_component_and_step(strategy):
    cell = CountingCell(6).double()
    x = seeded(2, 23, 2, N_IN).requires_grad_()
    y, _ = sb.scan(cell, x, strategy=strategy)
    with pytest.raises(sb.RecomputationError, match=r"sb.scan of CountingCell: state component 0 at step \d+ "
                                                    r"differs between the forward and its recomputation .* "
                                                    r"keep every tensor a step carries"):
        y.sum().backward()


def test_full_bptt_needs_no_check():
    """FullBPTT recomputes nothing: module-held state works there as in a hand-written loop."""
    cell = CountingCell(6).double()
    x = seeded(2, 9, 2, N_IN).requires_grad_()
    y, _ = sb.scan(cell, x)
    y.sum().backward()
    assert x.grad is not None


def test_the_check_passes_every_builtin_cell_and_a_stochastic_one():
    """Deterministic steps (and dropout with preserve_rng) reproduce their checkpoints exactly."""
    from helpers import make_cell

    for kind in ("lif", "gru", "stack", "noisy", "egru"):
        for st in (sb.Revolve(slots=2), sb.DoubleCheckpoint(outer=8, inner=3, outer_storage="host")):
            run(make_cell(kind), 23, 2, torch.float64, st, rng_seed=3)


# ---- a stochastic user layer beside a fused one ------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("strategy", [sb.Checkpoint(every=1), sb.Revolve(slots=2)], ids=_sid)
def test_stack_with_a_user_layer_steps_so_random_draws_follow_the_steps(strategy, caplog, fresh_log):
    """Layer by layer over a segment, a stochastic user layer would draw its noise in another
    order for each segmentation: FullBPTT, the strategy and its recomputation would disagree."""
    from helpers import NoisyCell

    def make():
        torch.manual_seed(8)
        return sb.cells.Stack([NoisyCell(N_IN, 4), sb.cells.LIF(4, 3, threshold=0.3, backend="cpu"),
                               NoisyCell(3, 2)]).double()

    with caplog.at_level(logging.INFO, logger="sparsebptt.kernels"):
        assert make().scan_segment is None
    assert "layer 0 (NoisyCell) is not a built-in cell" in caplog.text
    compare(run(make(), 9, 2, torch.float64, sb.FullBPTT(), rng_seed=4),
            run(make(), 9, 2, torch.float64, strategy, rng_seed=4))


class MaskedCell(nn.Module):
    """Carries -inf entries in its state (a mask): the check compares them as equal."""

    def __init__(self, n):
        super().__init__()
        torch.manual_seed(27)
        self.fc = nn.Linear(N_IN, n)
        self.n = n

    def initial_state(self, batch_size, device=None, dtype=None):
        m = torch.zeros(batch_size, self.n, device=device, dtype=dtype)
        m[:, 0] = float("-inf")
        return (torch.zeros(batch_size, self.n, device=device, dtype=dtype), m)

    def step(self, x_t, state):
        h, m = state
        h = torch.tanh(self.fc(x_t) + 0.5 * h + m.clamp(min=-1))
        return h, (h, m + 0)


@pytest.mark.parametrize("strategy", EXACT[:2], ids=_sid)
def test_states_with_infinities_pass_the_check(strategy):
    results = []
    for st in (sb.FullBPTT(), strategy):
        cell = MaskedCell(6).double()
        x = seeded(5, 17, 2, N_IN).requires_grad_()
        y, (h, m) = sb.scan(cell, x, strategy=st)  # state0: the cell's, with -inf in m
        assert torch.isinf(m).any()
        (y * seeded(6, *y.shape)).sum().backward()
        results.append({"out": y.detach(), "h": h.detach(), "dx": x.grad} |
                       {f"d{n}": p.grad for n, p in cell.named_parameters()})
    compare(*results)
