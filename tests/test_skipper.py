"""Skipper: exact at keep == every, a documented approximation otherwise."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
from sparsebptt.testing import assert_close, seeded

from helpers import make_cell, run


@pytest.mark.parametrize("T", [1, 2, 37, 100])
@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize("kind", ["lif", "gru", "stack", "user"])
def test_keep_equal_every_is_checkpoint(kind, k, T):
    ref = run(make_cell(kind), T, 3, torch.float64, sb.Checkpoint(k))
    got = run(make_cell(kind), T, 3, torch.float64, sb.Skipper(k, k))
    for name in ref:
        assert_close(name, ref[name], got[name], atol=1e-10)


def test_skipped_steps_get_no_gradient_and_drop_truncates():
    """dx is zero on skipped steps, nonzero on kept ones; with carry=drop the loss on the last
    step reaches only the last segment's kept tail."""
    cell = make_cell("gru")
    T, every, keep = 20, 8, 3
    x = seeded(0, T, 2, 5).requires_grad_()
    y, _ = sb.scan(cell, x, strategy=sb.Skipper(every, keep))
    y[-1].sum().backward()
    nonzero = [t for t in range(T) if x.grad[t].abs().sum() > 0]
    assert nonzero == [17, 18, 19]


def test_carry_through_reaches_earlier_segments():
    cell = make_cell("gru")
    T, every, keep = 20, 8, 3
    x = seeded(0, T, 2, 5).requires_grad_()
    y, _ = sb.scan(cell, x, strategy=sb.Skipper(every, keep, carry="through"))
    y[-1].sum().backward()
    nonzero = [t for t in range(T) if x.grad[t].abs().sum() > 0]
    assert nonzero == [5, 6, 7, 13, 14, 15, 17, 18, 19]  # every kept tail, no skipped head


def test_kept_windows_equal_truncated_bptt():
    """With carry=drop each kept tail's gradient is plain BPTT of that window from its true state."""
    cell = make_cell("lstm")
    T, every, keep = 24, 6, 2
    x = seeded(1, T, 2, 5)
    dy = seeded(2, T, 2, 4)
    cell.zero_grad()
    y, _ = sb.scan(cell, x, strategy=sb.Skipper(every, keep))
    (y * dy).sum().backward()
    got = [p.grad.clone() for p in cell.parameters()]
    # reference: run the true forward, then back-propagate each window separately
    cell.zero_grad()
    state = cell.initial_state(2, dtype=torch.float64)
    windows = []
    for a in range(0, T, every):
        with torch.no_grad():
            if a + every - keep > a:
                _, state = sb.scan(cell, x[a:a + every - keep], state)
        windows.append((a + every - keep, tuple(s.clone() for s in state)))
        with torch.no_grad():
            _, state = sb.scan(cell, x[a + every - keep:a + every], state)
    for k, s0 in windows:
        yk, _ = sb.scan(cell, x[k:k + keep], s0)
        (yk * dy[k:k + keep]).sum().backward()
    for a, b in zip([p.grad for p in cell.parameters()], got):
        assert_close("param", a, b, atol=1e-12)


def test_skipper_counts_and_memory():
    net = sb.cells.Stack([sb.cells.LIF(8, 32), sb.cells.LIF(32, 32)])
    x = seeded(0, 512, 4, 8, dtype=torch.float32, kind="spikes")
    res = {}
    for st in [sb.FullBPTT(), sb.Checkpoint(64), sb.Skipper(64, 16)]:
        with sb.trace() as t:
            y, _ = sb.scan(net, x, strategy=st, reduce="sum")
            y.sum().backward()
        res[st.name] = t
    assert res["skipper"].forward_steps == 512
    assert res["skipper"].recomputed_steps == 7 * 16  # every tail but the last, once
    assert res["skipper"].peak_stored_bytes * 3.3 <= res["full"].peak_stored_bytes
    assert res["skipper"].peak_stored_bytes < res["checkpoint"].peak_stored_bytes


@pytest.mark.parametrize("every,keep,match", [(8, 9, "keep must be <= every, got keep=9, every=8"),
                                              (8, 0, "keep must be a positive int"),
                                              (0, 1, "every must be a positive int")])
def test_bad_sizes(every, keep, match):
    with pytest.raises(ValueError, match=match):
        sb.Skipper(every, keep)


def test_bad_carry():
    with pytest.raises(ValueError, match="unknown carry 'all'; valid carries are: drop, through"):
        sb.Skipper(8, 2, carry="all")


def test_parse_and_flags():
    st = sb.parse_strategy("skipper:64,16")
    assert st == sb.Skipper(64, 16) and st.approximate and not st.exact
    assert not sb.Skipper(8, 8).approximate


def test_train_says_gradient_is_approximate(tmp_path, capsys):
    from sparsebptt.cli import main
    import json

    assert main(["train", "--strategy", "skipper:8,4", "--epochs", "1", "--T", "16", "--hidden", "16",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "approximate gradient" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["approximate_gradient"] is True


def test_carry_through_string_roundtrip():
    st = sb.Skipper(64, 16, carry="through")
    assert st.to_string() == "skipper-through:64,16"
    assert sb.parse_strategy(st.to_string()) == st
    assert sb.parse_strategy("skipper:64,16").carry == "drop"


def test_no_recompute_where_no_gradient_reaches():
    """reduce="last" with carry=drop: only the last tail is back-propagated; earlier tails are
    not recomputed at all (no gradient can reach them)."""
    cell = make_cell("gru")
    x = seeded(0, 40, 2, 5).requires_grad_()
    with sb.trace() as t:
        y, _ = sb.scan(cell, x, strategy=sb.Skipper(8, 3), reduce="last")
        y.sum().backward()
    assert t.recomputed_steps == 0
    assert [s for s in range(40) if x.grad[s].abs().sum() > 0] == [37, 38, 39]
    assert t.stored_bytes == 0


def test_early_exit_keeps_exact_strategies_exact():
    """A loss on the final state only still reaches every step through the state: no early exit."""
    for kind in ["gru", "lif"]:
        cell = make_cell(kind)
        ref = run(cell, 30, 2, torch.float64, sb.FullBPTT(), reduce="last")
        got = run(cell, 30, 2, torch.float64, sb.Checkpoint(7), reduce="last")
        for name in ref:
            assert_close(name, ref[name], got[name])


def _backend_cells(backend):
    torch.manual_seed(5)
    return {"lif-stack": sb.cells.Stack([sb.cells.LIF(5, 8, threshold=0.3, backend=backend),
                                         sb.cells.LIF(8, 6, threshold=0.3, recurrent=True, backend=backend)]),
            "gru": sb.cells.GRU(5, 6, backend=backend),
            "lstm": sb.cells.LSTM(5, 4, backend=backend)}  # float32; .double() in the test


@pytest.mark.parametrize("carry", ["drop", "through"])
@pytest.mark.parametrize("kind", ["lif-stack", "gru", "lstm"])
def test_fused_cpu_backend_gives_the_reference_skipper_gradients(kind, carry):
    """Skipper runs the fused segments too: its (approximate) gradients equal the torch backend's."""
    strategy = sb.Skipper(8, 3, carry=carry)
    fused = _backend_cells("cpu")[kind].double()
    assert fused.scan_segment is not None
    ref = run(_backend_cells("torch")[kind].double(), 29, 3, torch.float64, strategy)
    got = run(fused, 29, 3, torch.float64, strategy)
    for name in ref:
        assert_close(name, ref[name], got[name], atol=1e-10)


def test_skip_reverse_carries_the_policy():
    from sparsebptt.strategies import SkipReverse

    for carry in ("drop", "through"):
        skips = [a for a in sb.Skipper(6, 2, carry=carry).schedule(20) if isinstance(a, SkipReverse)]
        assert [(a.n1, a.n0, a.carry) for a in skips] == [(16, 12, carry), (10, 6, carry), (4, 0, carry)]
    with pytest.raises(ValueError, match="unknown carry 'all'; valid carries are: drop, through"):
        SkipReverse(4, 0, "all")
