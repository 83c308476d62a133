"""EGRU's C segment scan (backend "cpu", `sparsebptt.kernels.egru.cpu.SegmentFunction`: the
recurrence forward and backward in two C calls) equals the reference (backend "torch"): outputs,
final states and every gradient (x, c0, y0, event counts, every parameter incl. the thresholds),
float64 within 1e-10 and float32 within a bound derived from the arithmetic, under every exact
strategy; its MAC counters; thresholds held in a strided tensor (issue 17)."""
from __future__ import annotations

import pytest
import torch

import sparsebptt as sb
import sparsebptt.kernels.egru.cpu as egru_cpu
from sparsebptt.testing import assert_close, scan_grads, seeded

N_IN, H = 5, 12
STRATEGIES = [sb.FullBPTT(), sb.Checkpoint(every=3), sb.Revolve(slots=2), sb.DoubleCheckpoint(outer=8, inner=3)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def f32_rtol(T: int, H: int = H) -> float:
    """float32 bound relative to each tensor's largest magnitude: sums of up to n = 3H + I
    products in another order (and a Cephes exp against torch's), carried back over T steps;
    ~eps * sqrt(n * T) for random signs, times 8 for the gate derivatives' amplification."""
    return 8 * 2.0 ** -24 * ((3 * H + N_IN + 1) * (T + 1)) ** 0.5


def pair(dtype, count_events=False, epsilon=0.3, gamma=0.7, bias=True, H=H):
    torch.manual_seed(5)
    ref = sb.cells.EGRU(N_IN, H, threshold_init=0.1, epsilon=epsilon, gamma=gamma, bias=bias,
                        count_events=count_events, backend="torch")
    with torch.no_grad():
        ref.threshold.add_(0.05 * seeded(9, H, dtype=torch.float32))
    ref = ref.to(dtype)
    got = sb.cells.EGRU(N_IN, H, epsilon=epsilon, gamma=gamma, bias=bias, count_events=count_events,
                        backend="cpu").to(dtype)
    got.load_state_dict(ref.state_dict())
    return ref, got


def run(cell, x, state0, strategy=None, y0_grad=True, x_grad=True):
    return scan_grads(cell, x, state0, strategy, x_grad=x_grad,
                      state_grad=[k != 1 or y0_grad for k in range(len(state0))])


def state0_of(cell, B, dtype):
    H = cell.hidden_size
    c = seeded(40, B, H, dtype=dtype) * 0.3
    y = torch.where(seeded(41, B, H, dtype=dtype) > 0.5, c.abs() + 0.2, torch.zeros_like(c))  # some events
    st = (c, y)
    if cell.count_events:
        st = st + (seeded(42, B, H, dtype=dtype).abs(),)
    return st


def compare(ref, got, dtype, T, H=H):
    assert ref.keys() == got.keys()
    for name in ref:
        if dtype == torch.float64:
            assert_close(name, ref[name], got[name])
        else:
            assert_close(name, ref[name], got[name], atol=0.0, rtol=f32_rtol(T, H))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("count_events", [False, True], ids=["plain", "counts"])
def test_segment_scan_equals_reference(count_events, dtype, strategy):
    ref, got = pair(dtype, count_events)
    assert got.scan_segment is not None and ref.scan_segment is None
    T, B = 17, 3
    x = seeded(0, T, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    r, tr = run(ref, x, s0, strategy)
    g, tg = run(got, x, s0, strategy)
    compare(r, g, dtype, T)
    a = tg.activity["EGRU"]
    assert 0.0 < a < 1.0 and a == pytest.approx(tr.activity["EGRU"], abs=1e-12)


@pytest.fixture
def isa_cap():
    """Caps the register-blocked products' instruction set for one test (restored after)."""
    best = egru_cpu.kernel_isa(2)

    def cap(level):
        if level > best:
            pytest.skip(f"the CPU has no instruction set level {level} (best {best})")
        assert egru_cpu.kernel_isa(level) == level
    yield cap
    egru_cpu.kernel_isa(2)


@pytest.mark.parametrize("dw_bytes", [1, 1 << 20], ids=["dw_block1", "dw_block_all"])
@pytest.mark.parametrize("dots_below", [0.0, 2.0], ids=["dy_gemm", "dy_dots"])
@pytest.mark.parametrize("isa", [2, 1, 0], ids=["avx512", "avx2", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_register_blocked_paths(dtype, isa, dots_below, dw_bytes, isa_cap, monkeypatch):
    """Issue 17's register-blocked products (egru_mm.h) in each instruction set the CPU has, with
    dL/dy as dots in C (every step, y0 included) or as GEMMs, and the weight gradient over events in
    blocks of one step or of the whole segment: H = 100 (3H = 300: full 8-vector blocks, single
    vectors and a scalar tail; two forward chunks), B = 5 (groups of 4 samples and a rest of 1)."""
    isa_cap(isa)
    monkeypatch.setattr(egru_cpu, "DOTS_BELOW", dots_below)
    monkeypatch.setattr(egru_cpu, "DW_BLOCK_BYTES", dw_bytes)
    Hb, T, B = 100, 11, 5
    ref, got = pair(dtype, H=Hb, epsilon=0.4)
    x = seeded(6, T, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    r, tr = run(ref, x, s0)
    g, tg = run(got, x, s0)
    compare(r, g, dtype, T, Hb)
    assert 0.05 < tg.activity["EGRU"] < egru_cpu.DW_SPARSE_BELOW  # the weight gradient over events runs


@pytest.mark.parametrize("fire", ["quads", "rare", "none"])
@pytest.mark.parametrize("dw_bytes", [1, 1 << 24], ids=["dw_block1", "dw_block_all"])
@pytest.mark.parametrize("isa", [2, 1, 0], ids=["avx512", "avx2", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_weight_gradient_sub_blocks_and_quads(dtype, isa, dw_bytes, fire, isa_cap, monkeypatch):
    """dW_hh over events (dw_block), T = 30, B = 5: 150 rows, in sub-blocks of 64, 64 and 22 (one
    block) or blocks of one step (5 rows); 3H = 210 (H = 70): full column chunks and a narrower last
    one. "quads": 20 units fire at every step (thresholds below any c~: with AVX-512 they run in
    quads, 4 units sharing each loaded row), the others rarely; "rare": ~4 % of the units fire
    (sub-blocks with fewer than 4 events per row add whole rows unpacked); "none": no unit fires
    after the initial state's events (blocks without events)."""
    isa_cap(isa)
    monkeypatch.setattr(egru_cpu, "DW_BLOCK_BYTES", dw_bytes)
    Hb, T, B = 70, 30, 5
    ref, got = pair(dtype, H=Hb, epsilon=0.4)
    with torch.no_grad():
        if fire == "quads":
            ref.threshold[:20] = -1.0
            ref.threshold[20:] += 0.5
        elif fire == "rare":
            ref.threshold += 0.1
        else:
            ref.threshold.fill_(5.0)
    got.load_state_dict(ref.state_dict())
    x = seeded(8, T, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    r, tr = run(ref, x, s0)
    g, tg = run(got, x, s0)
    compare(r, g, dtype, T, Hb)
    low, high = {"quads": (20 / Hb, egru_cpu.DW_SPARSE_BELOW), "rare": (0.0, 4 / Hb), "none": (-1.0, 0.5 / Hb)}[fire]
    assert low < tg.activity["EGRU"] < high  # the weight gradient over events runs


@pytest.mark.parametrize("group_b", [8, 64], ids=["per_unit", "grouped"])
@pytest.mark.parametrize("isa", [2, 1], ids=["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dots_over_sample_blocks(dtype, isa, group_b, isa_cap, monkeypatch):
    """dL/dy as dots for B = 11: per unit over all its samples (B > DOTS_GROUP_B), or units
    grouped by the samples that want them within blocks of 8 samples (a block of 8 and one of 3),
    tiles of 4, 2 and 1 units."""
    isa_cap(isa)
    monkeypatch.setattr(egru_cpu, "DOTS_BELOW", 2.0)
    monkeypatch.setattr(egru_cpu, "DOTS_GROUP_B", group_b)
    Hb, T, B = 40, 7, 11
    ref, got = pair(dtype, H=Hb, epsilon=0.4)
    x = seeded(7, T, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    compare(run(ref, x, s0)[0], run(got, x, s0)[0], dtype, T, Hb)


@pytest.mark.parametrize("kw", [dict(bias=False), dict(epsilon=0.05), dict(gamma=0.0)], ids=str)
def test_options_and_y0_without_gradient(kw):
    ref, got = pair(torch.float64, **kw)
    x = seeded(1, 9, 2, N_IN)
    s0 = state0_of(ref, 2, torch.float64)
    for y0_grad in (True, False):
        r, _ = run(ref, x, s0, y0_grad=y0_grad)
        g, _ = run(got, x, s0, y0_grad=y0_grad)
        compare(r, g, torch.float64, 9)


def test_strided_threshold():
    """Thresholds in a strided tensor (EGRU's Beta draw gives one): the C call gets a contiguous
    copy it holds while running."""
    ref, got = pair(torch.float32)
    strided = torch.empty(2 * H).view(H, 2)[:, 0]
    strided.copy_(got.threshold.detach())
    assert not strided.is_contiguous()
    got.threshold = torch.nn.Parameter(strided)
    x = seeded(2, 6, 4, N_IN, dtype=torch.float32)
    s0 = state0_of(ref, 4, torch.float32)
    compare(run(ref, x, s0)[0], run(got, x, s0)[0], torch.float32, 6)


@pytest.mark.parametrize("epsilon", [0.02, 0.2], ids=lambda e: f"eps{e}")
def test_backward_macs_are_the_sparse_products(epsilon):
    """Backward MACs: dW_ih (a GEMM, dense), dL/dy of each step before (dots at its events and
    units within epsilon of the threshold, or one dense GEMM when at least `DOTS_BELOW` of them
    are needed (issue 17: was `full_above(B)`); y0 needs every unit: a GEMM) and the dW_hh axpys
    (the previous step's non-zero y; one GEMM when `DW_SPARSE_BELOW` of them are non-zero; issue 17:
    was `full_above(B)`), each
    row 3H long."""
    _, got = pair(torch.float64, epsilon=epsilon)
    T, B = 8, 3
    x = seeded(3, T, B, N_IN)
    s0 = state0_of(got, B, torch.float64)
    _, t = run(got, x, s0)
    with torch.no_grad():  # count what the backward needs from a plain reference run
        c, y = s0
        full = egru_cpu.DW_SPARSE_BELOW * B * H
        dots_below = egru_cpu.DOTS_BELOW * B * H
        dy_macs = B * H  # y0 needs a gradient: every entry, as a GEMM
        events = int((y != 0).sum())
        for k in range(T):
            gi = torch.nn.functional.linear(x[k], got.weight_ih, got.bias_ih)
            gh = torch.nn.functional.linear(y, got.weight_hh, got.bias_hh)
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, u = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            ct = n + u * (c - n)
            v = ct - got.threshold
            e = (v > 0).to(ct.dtype)
            y, c = ct * e, ct - got.threshold * e
            if k < T - 1:
                wanted = int(((v > 0) | (v.abs() < got.epsilon)).sum())
                dy_macs += wanted if wanted < dots_below else B * H
                events += int((y != 0).sum())
    G3 = 3 * H
    dense_ih = T * B * N_IN * G3 * 2  # dW_ih and dx
    dw_hh = events if events < full * T else T * B * H
    assert t.backward_macs == dense_ih + (dy_macs + dw_hh) * G3
    assert dy_macs < T * B * H or epsilon > 0.1  # the narrow support skips some dL/dy


@pytest.mark.parametrize("group_b", [8, 64], ids=["per_unit", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_threads_give_the_same_gradients(dtype, group_b, monkeypatch):
    """With OpenMP the dots (either path) and the dW_hh blocks run on torch's intra-op threads;
    each entry is still summed by one thread in one order: 1 and 3 threads give bitwise the same
    gradients. B = 11, H = 150 (pieces of 16 units, several column chunks), dW blocks of 2 steps."""
    if not egru_cpu.kernel_openmp():
        pytest.skip("the EGRU kernels were built without OpenMP")
    monkeypatch.setattr(egru_cpu, "DOTS_BELOW", 2.0)
    monkeypatch.setattr(egru_cpu, "DOTS_GROUP_B", group_b)
    monkeypatch.setattr(egru_cpu, "DW_BLOCK_BYTES", 2 * 11 * 450 * 8)
    Hb, T, B = 150, 9, 11
    _, got = pair(dtype, H=Hb, epsilon=0.4)
    x = seeded(3, T, B, N_IN, dtype=dtype)
    s0 = state0_of(got, B, dtype)
    one, t1 = run(got, x, s0)
    torch.set_num_threads(3)
    three, t3 = run(got, x, s0)
    assert 0.05 < t1.activity["EGRU"] < egru_cpu.DW_SPARSE_BELOW  # the weight gradient over events runs
    for name in one:
        assert torch.equal(one[name], three[name]), name


def test_built_without_openmp_when_the_compiler_cannot(tmp_path):
    """A compiler that rejects -fopenmp: the kernels build without it (a warning; their parallel
    loops then run on one thread, as test_threads_give_the_same_gradients's one-thread run);
    $SPARSEBPTT_KERNEL_OPENMP=0 does the same on purpose, without a warning."""
    import os
    import shutil
    import subprocess
    import sys
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler")
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {gcc} "$@"\n')
    cc.chmod(0o755)
    code = ("import logging, torch; import sparsebptt.kernels.egru.cpu as k; "
            "logging.basicConfig(level=logging.WARNING); print('openmp', k.kernel_openmp())")
    for env in ({"CC": str(cc)}, {"SPARSEBPTT_KERNEL_OPENMP": "0"}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "SPARSEBPTT_CACHE_DIR": str(tmp_path / "cache"), **env})
        assert r.returncode == 0, r.stderr
        assert "openmp False" in r.stdout
        assert ("built without OpenMP" in r.stderr) == ("CC" in env), r.stderr


def _one_hot(seed, T, B, K, dtype):
    idx = torch.randint(0, K, (T, B), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(idx, K).to(dtype)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.to_string())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["one_hot", "events", "sparse_then_dense", "one_hot_no_dx"])
def test_a_sparse_input_takes_the_sparse_products(kind, dtype, strategy, monkeypatch):
    """A mostly-zero input (one-hot tokens, graded events at ~10 %; a scan whose first segment is
    sparse and later ones dense keeps the first's route) runs the projection and dW_ih from its
    nonzeros (`SparseRows`; dW_ih in the C pass, per step): outputs, states and every gradient (dx
    included; "no_dx": x needs none, so no dL/d(x W_ih^T) is written) equal the reference under
    every exact strategy, and the backward counts nnz * 3H MACs for dW_ih, not T B I 3H."""
    import sparsebptt.kernels.sparse_input.cpu as sparse_input_cpu
    from sparsebptt.kernels.sparse_input.cpu import SparseRows
    calls = []
    orig = SparseRows.project
    monkeypatch.setattr(SparseRows, "project", lambda self, *a: calls.append(self.R) or orig(self, *a))
    x_grad = kind != "one_hot_no_dx"
    ref, got = pair(dtype, count_events=not x_grad)  # (event counts: the pointwise pass's other branch)
    T, B = 17, 3
    if kind.startswith("one_hot"):
        x = _one_hot(1, T, B, N_IN, dtype)
    else:
        x = seeded(2, T, B, N_IN, dtype=dtype) * (seeded(3, T, B, N_IN, dtype=dtype) > 0.9)
        if kind == "sparse_then_dense":
            x[3:] = seeded(4, T - 3, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    r, _ = run(ref, x, s0, strategy, x_grad=x_grad)
    g, tg = run(got, x, s0, strategy, x_grad=x_grad)
    compare(r, g, dtype, T)
    if kind != "sparse_then_dense" or strategy.to_string() == STRATEGIES[1].to_string():
        assert sum(calls) >= T * B  # every step's projection from the nonzeros (first segment: 3 steps)
    monkeypatch.setattr(sparse_input_cpu, "SPARSE_INPUT_MAX", 0.0)  # every route dense: the GEMMs
    calls.clear()
    d, td = run(got, x, s0, strategy, x_grad=x_grad)
    assert not calls
    compare(r, d, dtype, T)
    if strategy.to_string() == sb.FullBPTT().to_string() and kind == "one_hot":
        assert td.backward_macs - tg.backward_macs == (T * B * N_IN - T * B) * 3 * H


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_a_stacked_egru_reads_the_lower_layers_events_sparse(dtype, monkeypatch):
    """In a Stack the upper EGRU's input is the lower one's y (events, mostly zero): it takes the
    sparse products, and the stack's gradients equal the reference stack's."""
    from sparsebptt.kernels.sparse_input.cpu import SparseRows
    calls = []
    orig = SparseRows.project
    monkeypatch.setattr(SparseRows, "project", lambda self, *a: calls.append(self.K) or orig(self, *a))
    torch.manual_seed(7)
    ref = sb.cells.Stack([sb.cells.EGRU(N_IN, H, threshold_init=0.3, backend="torch"),
                    sb.cells.EGRU(H, H, threshold_init=0.3, backend="torch")]).to(dtype)
    got = sb.cells.Stack([sb.cells.EGRU(N_IN, H, backend="cpu"), sb.cells.EGRU(H, H, backend="cpu")]).to(dtype)
    got.load_state_dict(ref.state_dict())
    T, B = 15, 4
    x = seeded(5, T, B, N_IN, dtype=dtype)
    s0 = tuple(torch.zeros(B, H, dtype=dtype) for _ in range(4))
    for strategy in (sb.FullBPTT(), sb.Checkpoint(every=4)):
        r, _ = scan_grads(ref, x, s0, strategy)
        g, _ = scan_grads(got, x, s0, strategy)
        compare(r, g, dtype, T)
    assert H in calls and N_IN not in calls  # the upper layer sparse, the random input dense


@pytest.mark.parametrize("reduce", ["sum", "last", "mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reduced_outputs_gradients_equal_the_reference(dtype, reduce):
    """The outputs' gradient as the scan's reductions hand it over (an expanded block read in place
    for every step: "sum", "mean"; one step's: "last"): every gradient equals the reference's."""
    ref, got = pair(dtype)
    T, B = 13, 3
    x = seeded(6, T, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    r, _ = scan_grads(ref, x, s0, sb.Checkpoint(every=4), reduce=reduce)
    g, _ = scan_grads(got, x, s0, sb.Checkpoint(every=4), reduce=reduce)
    compare(r, g, dtype, T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_the_weight_gradient_as_one_gemm_equals_the_reference(dtype, monkeypatch):
    """With most y non-zero (`DW_SPARSE_BELOW` set to 0 here) dW_hh is one GEMM over the segment,
    in W_hh's layout: every gradient still equals the reference's."""
    monkeypatch.setattr(egru_cpu, "DW_SPARSE_BELOW", 0.0)
    ref, got = pair(dtype)
    T, B = 15, 3
    x = seeded(7, T, B, N_IN, dtype=dtype)
    s0 = state0_of(ref, B, dtype)
    for strategy in (sb.FullBPTT(), sb.Checkpoint(every=4)):
        compare(run(ref, x, s0, strategy)[0], run(got, x, s0, strategy)[0], dtype, T)
