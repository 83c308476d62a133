"""benchmarks/gpu.py (issue 18), the script prepared for a lent GPU, rehearsed on CPU: Triton in its
interpreter (TRITON_INTERPRET=1), toy shapes. The default suite runs its parts and one small
end-to-end run (seconds); the whole tiny preset and the shell entry are marked ``slow``.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
gpu = pytest.importorskip("gpu", reason="benchmarks/gpu.py did not import")
import peers  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")


# ---- parts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["loop", "loop-ckpt", "sb-torch-full", "snntorch", "norse"])
def test_to_device_moves_what_the_peers_step_holds_in_place(method):
    pytest.importorskip(peers.PEER_MODULES.get(method, "torch"))
    step, params, x = peers.build(method, 3, 2, 4, 8, 2)
    ids = [id(p) for p in params]
    # no GPU here: a dtype is the target that Tensor.to and Module.to take alike (and set_data allows)
    gpu.to_device(step, torch.float64)
    assert [id(p) for p in params] == ids, "parameters must keep their identity (optimisers hold them)"
    assert all(p.dtype == torch.float64 for p in params)
    assert x.dtype == torch.float64
    left = [t for t in _closure_tensors(step) if t.is_floating_point() and t.dtype != torch.float64]
    assert not left, f"{method}: {len(left)} tensors not moved"
    if method == "snntorch":
        return  # its spike function returns float32 whatever the input: a dtype artefact, not a device one
    step()  # still one consistent network
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in params)


def _closure_tensors(fn, seen=None):
    seen = set() if seen is None else seen
    out = []
    for cell in fn.__closure__ or ():
        v = cell.cell_contents
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [t for t in v if isinstance(t, torch.Tensor)]
        elif isinstance(v, torch.nn.Module):
            out += list(v.parameters()) + list(v.buffers())
        elif callable(v) and getattr(getattr(v, "__code__", None), "co_filename", None) == peers.__file__:
            out += _closure_tensors(v, seen)
    return out


def test_use_sj_backend_names_the_missing_backend():
    pytest.importorskip("spikingjelly")
    with pytest.raises(RuntimeError, match=r"no SpikingJelly neuron offers backend 'cupy'.*--sj-cupy-path"):
        gpu.use_sj_backend([torch.nn.Linear(2, 2)], "cupy")


def test_parse_pytest_summary():
    text = "....F.s\nFAILED tests/a.py::t - boom\n1 failed, 5 passed, 1 skipped, 3 deselected in 2.31s\n"
    assert gpu.parse_pytest_summary(text) == {"failed": 1, "passed": 5, "skipped": 1, "deselected": 3}
    assert gpu.parse_pytest_summary("2 errors in 0.5s") == {"error": 2}
    assert gpu.parse_pytest_summary("killed before the end\n....") == {}


def test_predicted_over_uses_the_same_method_at_a_shorter_T():
    hist = [{"section": "lif2", "method": "loop", "status": "ok", "T": 2000, "time_s": 1.0},
            {"section": "lif2", "method": "norse", "status": "ok", "T": 2000, "time_s": 0.1}]
    case = {"section": "lif2", "method": "loop", "T": 20000, "budget_s": 15}
    assert "predicted 10.0 s per step (from 1 s at T=2000)" in gpu.predicted_over(case, hist)
    assert gpu.predicted_over({**case, "method": "norse"}, hist) is None
    assert gpu.predicted_over({**case, "method": "snntorch"}, hist) is None  # nothing to predict from
    assert gpu.predicted_over({"section": "rnn", "method": "gru", "T": 5, "budget_s": 1}, hist) is None


def test_make_cases_runs_the_targets_methods_first_and_needs_a_path_for_cupy():
    preset = gpu.PRESETS["full"]
    cases, envs = gpu.make_cases(preset, ["on", "lif2"], gpu.LIF_METHODS, None, None)
    first = [c["method"] for c in cases[:8]]
    assert set(first) == {"sb-triton-full", "sb-triton-ckpt", "spikingjelly-triton"}
    assert {c["T"] for c in cases if c["section"] == "lif2"} == {500, 2000, 20000}
    assert {c["N"] for c in cases if c["section"] == "on"} == {16384}
    assert envs["sj-cupy"] is None and envs["sj-triton"] == {gpu.SJ_ENV: "triton"}
    _, envs = gpu.make_cases(preset, ["on"], ["spikingjelly-cupy"], "/x/site", None)
    assert envs["sj-cupy"] == {"PYTHONPATH_PREPEND": "/x/site"}
    cases, _ = gpu.make_cases(preset, ["double"], [], None, 12345)
    assert [(c["method"], c["cap_bytes"]) for c in cases] == [("full", 12345), ("double-host", 12345)]


def _row(section, method, T, time_s, peak):
    return {"section": section, "method": method, "T": T, "status": "ok", "time_s": time_s, "peak_bytes": peak}


def test_targets_are_the_issues_ratios():
    rows = [_row("lif2", "sb-triton-full", 500, 1.0, 100), _row("lif2", "spikingjelly-triton", 500, 3.0, 100),
            _row("lif2", "sb-triton-ckpt", 500, 1.3, 10),
            {"section": "double", "method": "full", "T": None, "status": "ok", "longest_T": 1000},
            {"section": "double", "method": "double-host", "T": None, "status": "ok", "longest_T": 12000},
            {**_row("rnn", "egru", 5, 1.0, 1), "activity": 0.1}, {**_row("rnn", "egru", 5, 2.0, 1), "activity": 0.5}]
    got = {t["what"]: (round(t["value"], 3), t["passed"]) for t in gpu.targets(rows)}
    assert got == {
        "lif2 T=500: time sb-triton-full / spikingjelly-triton": (0.333, True),
        "lif2 T=500: peak memory sb-triton-full / spikingjelly-triton": (1.0, True),
        "lif2 T=500: time sb-triton-ckpt / sb-triton-full": (1.3, False),
        "lif2 T=500: peak memory sb-triton-full / sb-triton-ckpt": (10.0, True),
        "double: longest T DoubleCheckpoint(host) / FullBPTT under the same cap": (12.0, True),
        "rnn: egru time at activity 0.100 / at 0.500": (0.5, True)}


def test_runner_records_failures_restarts_after_a_crash_and_kills_an_overrun():
    cases = [{"id": 0, "section": "selftest", "action": "ok", "budget_s": 5},
             {"id": 1, "section": "selftest", "action": "raise", "budget_s": 5},
             {"id": 2, "section": "selftest", "action": "exit", "budget_s": 5},
             {"id": 3, "section": "selftest", "action": "sleep", "seconds": 60, "budget_s": 0.2},
             {"id": 4, "section": "selftest", "action": "ok", "budget_s": 5}]
    logged = []
    res = gpu.Runner("cpu", startup_s=60, log=logged.append, grace_s=1.0).run(cases, {}, deadline=1e12)
    assert res[0]["status"] == "ok"
    assert res[1]["status"] == "failed" and "RuntimeError: planted failure" in res[1]["reason"]
    assert res[2]["status"] == "failed" and "worker died (exit 1)" in res[2]["reason"]
    assert res[3]["status"] == "timed out" and "budget 0.2 s" in res[3]["reason"]
    assert res[4]["status"] == "ok" and res[4]["pid"] != res[0]["pid"]  # a fresh worker went on


def test_runner_skips_what_the_deadline_leaves_out():
    import time
    cases = [{"id": 0, "section": "selftest", "action": "ok", "budget_s": 5}]
    res = gpu.Runner("cpu", startup_s=60, log=lambda s: None).run(cases, {}, deadline=time.monotonic() - 1)
    assert res[0] == {"status": "skipped", "reason": "the section's time budget is spent"}


# ---- end to end ---------------------------------------------------------------------------------
def _run(tmp_path, *args):
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--device", "cpu",
                        "--preset", "tiny", "--out-dir", str(out), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out / "gpu_cpu.json") as f:
        res = json.load(f)
    with open(out / "gpu_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert (out / "gpu_cpu.png").stat().st_size > 0
    return res, rows, p.stdout


def test_tiny_run_sparsebptt_and_the_loop(tmp_path):
    res, rows, _ = _run(tmp_path, "--sections", "lif2", "--methods", "sb-triton-full", "loop", "--T", "4")
    assert res["meta"]["device"] == "cpu" and res["meta"]["triton_backend"][0] is True
    assert res["meta"]["complete"] is True and res["summary_errors"] == []
    assert [(r["method"], r["status"]) for r in rows] == [("sb-triton-full", "ok"), ("loop", "ok")]
    by = {r["method"]: r for r in res["rows"]}
    assert by["sb-triton-full"]["time_s"] > 0 and by["loop"]["vs_loop"] == 1.0
    assert set(res["meta"]["peers"]) >= {"snntorch", "norse", "spikingjelly"}


@pytest.mark.slow
def test_tiny_preset_every_section(tmp_path):
    res, rows, out = _run(tmp_path)
    status = {(r["section"], r["method"] or r["kernel"], r["T"], r["threshold"], r["dtype"]): r["status"] for r in rows}
    bad = {k: v for k, v in status.items() if v not in ("ok", "refused")
           and k[1] not in ("spikingjelly-cupy",)}  # no --sj-cupy-path given: 'unavailable'
    assert not bad, bad
    assert {r["dtype"]: r["status"] for r in rows if r["kernel"] == "lif"} == \
        {"float32": "ok", "bfloat16": "refused", "float16": "refused"}
    assert all(t["passed_all"] for t in res["tests"]), res["tests"]
    dbl = {r["method"]: r for r in res["rows"] if r["section"] == "double"}
    assert dbl["double-host"]["longest_T"] >= 10 * dbl["full"]["longest_T"]
    assert "target: double: longest T" in out


@pytest.mark.slow
def test_shell_entry_installs_the_wheels_and_runs(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "GPU_SITE": str(tmp_path / "site"),
           "SJ_CUPY_SITE": str(tmp_path / "sj")}
    p = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--device", "cpu", "--preset", "tiny",
                        "--sections", "on", "--methods", "sb-triton-full", "spikingjelly-cupy", "norse"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "site" / "norse").is_dir() and (tmp_path / "sj" / "spikingjelly").is_dir()
    with open(tmp_path / "out" / "gpu_cpu.json") as f:
        res = json.load(f)
    assert res["meta"]["spikingjelly_cupy_version"] == "0.0.0.0.14"
    by = {r["method"]: r for r in res["rows"]}
    assert by["sb-triton-full"]["status"] == "ok" and by["norse"]["status"] == "ok"
    # SpikingJelly 0.0.0.0.14 imports from its own site; its CuPy backend needs cupy (not here)
    assert by["spikingjelly-cupy"]["status"] == "unavailable" and "CuPy" in by["spikingjelly-cupy"]["reason"]
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0


def test_run_tests_keeps_what_a_killed_run_printed(tmp_path):
    cfg = {"files": "tests/test_kernels_*triton*.py", "per_test_s": 60, "only_gpu_marked": True}
    got = gpu.run_tests(cfg, "cpu", 0.3, str(tmp_path / "tests.log"), log=lambda s: None)
    assert [(r["status"], r["returncode"], r["passed_all"]) for r in got] == [("timed out", None, False)]
    assert "==== gpu-marked tests in the Triton files" in (tmp_path / "tests.log").read_text()
