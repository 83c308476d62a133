"""Memory vs sequence length: full BPTT vs Checkpoint(ceil(sqrt T)) vs Revolve(8).

Case (digits-like input size): a 2-layer LIF ``Stack`` (64 -> 256 -> 256), batch 16, input spikes
Bernoulli(0.1) float32 (seeded), ``reduce="sum"``, loss ``(y * D).sum()`` with D a fixed seeded
random (B, H) projection; one forward + backward.

Every (strategy, T) runs in fresh processes:

1. memory worker: one forward+backward under ``sb.trace()`` (no warm-up); reports the library's
   counters (peak stored bytes, forward and recomputed steps) and the process's resident memory:
   baseline just before the forward, absolute peak, and the peak's increase over the baseline;
2. time worker (no trace): 1 warm-up + N timed forward+backward runs (median, p20, p80); also
   reports the peak-RSS increase of the first, clean untraced run and after all runs.

A case whose predicted peak RSS exceeds ``--max-gib``, or whose predicted single run exceeds
``--max-minutes``, is skipped and recorded with the prediction (extrapolated from the same
strategy at a smaller T). Before any case, a gate checks that each strategy's output and
gradients equal full BPTT's at T=97.

    .venv/bin/python benchmarks/memory.py                  # T in 1e3, 1e4, 1e5 (tens of minutes)
    .venv/bin/python benchmarks/memory.py --preset ci      # T in 1000, 3000 (about a minute)
    .venv/bin/python benchmarks/memory.py --T 2000 5000 --strategies full checkpoint:50

Writes benchmarks/results/memory.{csv,json,png} (``--out`` changes the prefix).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = os.path.abspath(__file__)
PRESETS = {"ci": [1000, 3000], "full": [1000, 10_000, 100_000]}
DEFAULT_STRATEGIES = ["full", "checkpoint", "revolve"]
LABELS = {"full": "full BPTT", "checkpoint": "checkpoint(ceil sqrt T)", "revolve": "revolve(8)"}
CHECK_T = 10_000
REVOLVE_SLOTS = 8

CSV_FIELDS = [
    "case", "strategy", "spec", "T", "backend", "status", "reason",
    "peak_stored_bytes", "stored_bytes_per_step", "forward_steps", "recomputed_steps", "steps_per_T",
    "rss_baseline_bytes", "peak_rss_bytes", "ru_maxrss_bytes", "rss_increase_bytes", "untraced_peak_rss_bytes",
    "rss_increase_min_bytes", "rss_increase_max_bytes", "mem_samples",
    "untraced_rss_increase_first_bytes", "untraced_rss_increase_all_bytes",
    "time_first_s", "time_median_s", "time_p20_s", "time_p80_s", "time_repeats", "cpu_median_s", "traced_time_s",
    "loadavg_1m",
    "predicted_peak_rss_bytes", "predicted_rss_increase_bytes", "predicted_time_s",
]


# ---- the case -------------------------------------------------------------------------------
def resolve(name: str, T: int) -> str:
    """A strategy name of this benchmark (full / checkpoint / revolve) or any parse_strategy
    string -> the exact strategy string for length T."""
    import sparsebptt as sb

    if name == "full":
        return "full"
    if name == "checkpoint":
        return f"checkpoint:{math.isqrt(T - 1) + 1 if T > 1 else 1}"  # ceil(sqrt(T))
    if name == "revolve":
        return f"revolve:{REVOLVE_SLOTS}"
    return sb.parse_strategy(name).to_string()


def scheduled_steps(spec: str, T: int) -> tuple[int, int]:
    """(forward steps, recomputed steps) that the strategy's schedule runs, without running it."""
    import sparsebptt as sb
    from checkpoint_schedules import EndForward, Forward

    plan = sb.parse_strategy(spec).plan(T)
    if plan.keep_graph:
        return T, 0
    fwd = rec = 0
    forward = True
    for a in plan.actions:
        if isinstance(a, EndForward):
            forward = False
        elif isinstance(a, Forward):
            if forward:
                fwd += a.n1 - a.n0
            else:
                rec += a.n1 - a.n0
    return fwd, rec


def build(cfg: dict, T: int):
    """(net, x, D): the 2-layer LIF stack, the spike input (T, B, I) and the loss projection."""
    import torch

    import sparsebptt as sb

    torch.manual_seed(cfg["seed"])
    kw = {} if cfg.get("backend") is None else {"backend": cfg["backend"]}
    net = sb.cells.Stack([sb.cells.LIF(cfg["input"], cfg["hidden"], **kw),
                          sb.cells.LIF(cfg["hidden"], cfg["hidden"], **kw)])
    x = common.spike_input(T, cfg["batch"], cfg["input"], cfg["p"], cfg["seed"] + 1)
    D = torch.randn(cfg["batch"], cfg["hidden"], generator=torch.Generator().manual_seed(cfg["seed"] + 2))
    return net, x, D


def step_once(net, x, D, strategy):
    """One forward + backward; returns the loss value."""
    import sparsebptt as sb

    y, _ = sb.scan(net, x, strategy=strategy, reduce="sum")  # (B, H)
    loss = (y * D).sum()
    loss.backward()
    return loss.item()


# ---- workers (fresh processes) --------------------------------------------------------------
def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["cfg"]["threads"])
    if spec.get("limit_bytes"):
        common.limit_address_space(spec["limit_bytes"])
    mode = spec["mode"]
    if mode == "gate":
        return gate_worker(spec)
    import sparsebptt as sb

    cfg, T = spec["cfg"], spec["T"]
    strategy = sb.parse_strategy(spec["spec"])
    net, x, D = build(cfg, T)
    gc.collect()
    reset_ok = common.reset_peak_rss()
    rss0 = common.current_rss()
    out = {"status": "ok", "spec": spec["spec"], "T": T, "mode": mode, "peak_reset": reset_ok,
           "rss_baseline_bytes": rss0, "input_bytes": x.numel() * x.element_size(),
           "backend": [getattr(layer, "active_backend", "torch") for layer in net.layers]}
    try:
        if mode == "memory":
            t0 = time.perf_counter()
            with sb.trace() as tr:
                loss = step_once(net, x, D, strategy)
            out["traced_time_s"] = time.perf_counter() - t0
            out.update(peak_stored_bytes=tr.peak_stored_bytes, forward_steps=tr.forward_steps,
                       recomputed_steps=tr.recomputed_steps, activity=tr.activity, loss=loss)
            out["peak_rss_bytes"] = common.peak_rss()
            out["ru_maxrss_bytes"] = common.ru_maxrss()
            out["rss_increase_bytes"] = out["peak_rss_bytes"] - rss0
            out["rss_after_bytes"] = common.current_rss()
            grads = [p.grad for p in net.parameters()]
            out["grads_finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        elif mode == "time":
            times, cpu = [], []
            for i in range(1 + spec["repeats"]):
                net.zero_grad(set_to_none=True)
                t0, c0 = time.perf_counter(), time.process_time()
                step_once(net, x, D, strategy)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if i == 0:
                    out["untraced_rss_increase_first_bytes"] = common.peak_rss() - rss0
            out["untraced_rss_increase_all_bytes"] = common.peak_rss() - rss0
            out["times_s"], out["cpu_times_s"] = times, cpu
        else:
            raise ValueError(f"unknown worker mode {mode!r}")
        out["numba_loaded"] = "numba" in sys.modules  # checkpoint_schedules JIT-compiles with it
    except (RuntimeError, MemoryError) as e:  # RLIMIT_AS reached: record, do not take the box down
        return {"status": "failed", "spec": spec["spec"], "T": T, "reason": f"{type(e).__name__}: {e}"[:300]}
    return out


def gate_worker(spec: dict) -> dict:
    """Each strategy's output and gradients vs full BPTT on a short odd-length run: equal up to
    float32 summation order (max |a - b| / max |a| <= 1e-5); whether bitwise equal is recorded."""
    import torch

    import sparsebptt as sb

    cfg, T = spec["cfg"], spec["T"]
    results, ref = {}, None
    for s in ["full"] + spec["specs"]:
        net, x, D = build(cfg, T)
        y, _ = sb.scan(net, x, strategy=sb.parse_strategy(s), reduce="sum")
        (y * D).sum().backward()
        got = [y.detach()] + [p.grad for p in net.parameters()]
        if ref is None:
            ref = got
            continue
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        rel = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(ref, got))
        results[s] = {"max_abs_diff": diff, "max_rel_diff": rel,
                      "bitwise": all(torch.equal(a, b) for a, b in zip(ref, got)), "ok": rel <= 1e-5}
    return {"status": "ok", "T": T, "strategies": results}


# ---- predictions for skipping ---------------------------------------------------------------
def predict(rows: list[dict], cfg: dict, spec: str, T: int) -> dict | None:
    """Peak RSS and single-run time of (strategy, T), extrapolated from the same strategy's largest
    measured T' < T: the RSS increase linearly in T (an upper bound for sqrt-T and O(1) strategies),
    the input's bytes exactly, the time by the ratio of scheduled steps (forward + recomputed)."""
    done = [r for r in rows if r["status"] == "ok" and r["T"] < T]
    if not done:
        return None
    ref = max(done, key=lambda r: r["T"])
    in_bytes = 4 * cfg["batch"] * cfg["input"]
    inc = max(ref["rss_increase_max_bytes"], ref.get("untraced_rss_increase_all_bytes") or 0)
    peak = ref["rss_baseline_bytes"] + in_bytes * (T - ref["T"]) + inc * T / ref["T"]
    f, r = scheduled_steps(spec, T)
    t_ref = max(ref["traced_time_s"], ref.get("time_median_s") or 0)
    t = t_ref * (f + r) / (ref["forward_steps"] + ref["recomputed_steps"])
    return {"peak_rss_bytes": peak, "rss_increase_bytes": inc * T / ref["T"], "time_s": t, "from_T": ref["T"],
            "stored_bytes": ref["peak_stored_bytes"] * T / ref["T"]}


# ---- orchestration --------------------------------------------------------------------------
def run_case(name: str, T: int, cfg: dict, args, rows: list[dict]) -> dict:
    spec = resolve(name, T)
    row = {"case": f"{name}-T{T}", "strategy": name, "spec": spec, "T": T, "status": "ok", "reason": ""}
    pred = predict(rows, cfg, spec, T)
    if pred is None and T > 3000:
        calib = run_case(name, 1000, cfg, args, [])  # calibrate on a short run first
        pred = predict([calib], cfg, spec, T) if calib["status"] == "ok" else None
    if pred is not None:
        row["predicted_peak_rss_bytes"] = round(pred["peak_rss_bytes"])
        row["predicted_rss_increase_bytes"] = round(pred["rss_increase_bytes"])
        row["predicted_time_s"] = pred["time_s"]
        if pred["peak_rss_bytes"] > args.max_gib * common.GiB:
            row.update(status="skipped", reason=(
                f"predicted peak RSS {common.fmt_bytes(pred['peak_rss_bytes'])} > --max-gib {args.max_gib} "
                f"(RSS increase per step at T={pred['from_T']}, extrapolated linearly)"),
                peak_stored_bytes=round(pred["stored_bytes"]))
            return row
        if pred["time_s"] > args.max_minutes * 60:
            row.update(status="skipped", reason=(
                f"predicted time of one forward+backward {pred['time_s'] / 60:.1f} min > --max-minutes "
                f"{args.max_minutes} (from T={pred['from_T']}, scaled by scheduled steps)"))
            return row
    one = pred["time_s"] if pred else 0.0  # no prediction: a short case (T <= 3000)
    limit = int((args.max_gib + 4) * common.GiB)
    base = {"cfg": cfg, "T": T, "spec": spec, "limit_bytes": limit}
    mem_n = args.mem_repeats if one < 20 else 1
    mems = []
    for _ in range(mem_n):
        m = common.run_worker(SCRIPT, {**base, "mode": "memory"}, timeout=max(300, 4 * one + 120),
                                 env=args.env)
        if m["status"] != "ok":
            row.update(status="failed", reason="memory worker: " + m["reason"])
            return row
        mems.append(m)
    m = mems[0]
    for other in mems[1:]:
        if (other["peak_stored_bytes"], other["forward_steps"], other["recomputed_steps"]) != \
                (m["peak_stored_bytes"], m["forward_steps"], m["recomputed_steps"]):
            row["reason"] = "trace counters differ between memory samples"
    incs = sorted(x["rss_increase_bytes"] for x in mems)
    row.update(
        peak_stored_bytes=m["peak_stored_bytes"], stored_bytes_per_step=m["peak_stored_bytes"] / T,
        forward_steps=m["forward_steps"], recomputed_steps=m["recomputed_steps"],
        steps_per_T=(m["forward_steps"] + m["recomputed_steps"]) / T,
        rss_baseline_bytes=m["rss_baseline_bytes"], peak_rss_bytes=m["peak_rss_bytes"],
        ru_maxrss_bytes=m["ru_maxrss_bytes"], rss_increase_bytes=round(common.quantile(incs, 0.5)),
        rss_increase_min_bytes=incs[0], rss_increase_max_bytes=incs[-1], mem_samples=len(incs),
        traced_time_s=m["traced_time_s"], backend="/".join(m["backend"]),
        _activity=m["activity"], _peak_reset=all(x["peak_reset"] for x in mems),
        _rss_increase_samples=incs, _grads_finite=m["grads_finite"], _numba_loaded=m["numba_loaded"])
    one = max(one, m["traced_time_s"])
    budget = args.max_minutes * 60
    repeats = args.repeats if one * (1 + args.repeats) <= budget else max(1, int(budget // one) - 1)
    t = common.run_worker(SCRIPT, {**base, "mode": "time", "repeats": repeats},
                          timeout=max(300, (repeats + 1) * one * 3 + 120), env=args.env)
    if t["status"] != "ok":
        row.update(status="failed", reason="time worker: " + t["reason"])
        return row
    stats = common.summarize_times(t["times_s"][1:])
    row.update(time_first_s=t["times_s"][0], time_median_s=stats["median_s"], time_p20_s=stats["p20_s"],
               time_p80_s=stats["p80_s"], time_repeats=repeats, _times_s=t["times_s"],
               cpu_median_s=common.quantile(t["cpu_times_s"][1:], 0.5), _cpu_times_s=t["cpu_times_s"],
               untraced_peak_rss_bytes=t["rss_baseline_bytes"] + t["untraced_rss_increase_first_bytes"],
               untraced_rss_increase_first_bytes=t["untraced_rss_increase_first_bytes"],
               untraced_rss_increase_all_bytes=t["untraced_rss_increase_all_bytes"])
    return row


def binomial_bound(T: int) -> int:
    from sparsebptt.strategies.revolve import binomial_repetitions

    return binomial_repetitions(T, REVOLVE_SLOTS)


def checks(rows: list[dict], T: int, floors: dict | None = None) -> list[dict]:
    """The issue's acceptance checks at length T, from this run's rows."""
    by = {r["strategy"]: r for r in rows if r["T"] == T and r["status"] == "ok"}
    full, ck, rv = by.get("full"), by.get("checkpoint"), by.get("revolve")
    out = []

    def add(cid, what, value, bound, ok, detail):
        out.append({"id": cid, "what": what, "value": value, "bound": bound,
                    "status": "N/A" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    if full and ck:
        v = ck["peak_stored_bytes"] / full["peak_stored_bytes"]
        b = 3 * math.sqrt(T) / T
        add("a", "checkpoint stored bytes / full's <= 3*sqrt(T)/T", v, b, v <= b,
            f"{common.fmt_bytes(ck['peak_stored_bytes'])} vs {common.fmt_bytes(full['peak_stored_bytes'])}")
        v = ck["time_median_s"] / full["time_median_s"]
        first = ck["time_first_s"] / full["time_first_s"]
        add("b", "checkpoint time / full's <= 1.6 (median of repeats)", v, 1.6, v <= 1.6,
            f"{common.fmt_time(ck['time_median_s'])} vs {common.fmt_time(full['time_median_s'])}; "
            f"CPU-time ratio {ck['cpu_median_s'] / full['cpu_median_s']:.2f}; first (warm-up) run ratio {first:.2f}")
        v = ck["untraced_rss_increase_first_bytes"] / full["untraced_rss_increase_first_bytes"]
        traced = ck["rss_increase_bytes"] / full["rss_increase_bytes"]
        absolute = ck["untraced_peak_rss_bytes"] / full["untraced_peak_rss_bytes"]
        fl_ck, fl_full = (floors or {}).get("checkpoint") or 0, (floors or {}).get("full") or 0
        net_ratio = ((ck["untraced_rss_increase_first_bytes"] - fl_ck)
                     / (full["untraced_rss_increase_first_bytes"] - fl_full))
        add("d", "checkpoint peak-RSS increase / full's <= 1/5 (untraced run)", v, 0.2, v <= 0.2,
            f"{common.fmt_bytes(ck['untraced_rss_increase_first_bytes'])} vs "
            f"{common.fmt_bytes(full['untraced_rss_increase_first_bytes'])}; traced run ratio {traced:.3f}; "
            f"absolute peak RSS ratio {absolute:.3f} ({common.fmt_bytes(ck['untraced_peak_rss_bytes'])} vs "
            f"{common.fmt_bytes(full['untraced_peak_rss_bytes'])}, baseline {common.fmt_bytes(ck['rss_baseline_bytes'])} "
            f"= interpreter + torch + input); less each strategy's first-run floor (a T=16 run's "
            f"increase: {common.fmt_bytes(fl_ck)} vs {common.fmt_bytes(fl_full)}) the ratio is {net_ratio:.3f}")
    else:
        for cid in "abd":
            add(cid, "needs full and checkpoint at this T", None, None, None, "not run")
    if ck and rv:
        v = rv["peak_stored_bytes"] / ck["peak_stored_bytes"]
        r = binomial_bound(T)
        steps = rv["forward_steps"] + rv["recomputed_steps"]
        ok = v <= 0.1 and steps <= r * T
        # Griewank's optimum: r*T - C(s+r, s+1) forward steps besides the T taped (reversed) ones
        optimum = r * T - math.comb(REVOLVE_SLOTS + r, REVOLVE_SLOTS + 1)
        add("c", f"revolve stored / checkpoint's <= 1/10 and steps <= r*T (r={r})", v, 0.1, ok,
            f"{common.fmt_bytes(rv['peak_stored_bytes'])} vs {common.fmt_bytes(ck['peak_stored_bytes'])}; "
            f"forward+recomputed steps {steps} <= {r}*T = {r * T}: {steps <= r * T}; untaped steps "
            f"{steps - T} vs Griewank's minimum r*T - C(s+r, s+1) = {optimum}")
    else:
        add("c", "needs checkpoint and revolve at this T", None, None, None, "not run")
    return sorted(out, key=lambda c: c["id"])


# ---- outputs --------------------------------------------------------------------------------
def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [("peak_stored_bytes", "peak stored bytes (sb.trace)", 1 / common.MiB, "MiB"),
              ("untraced_rss_increase_first_bytes", "peak RSS increase over baseline", 1 / common.MiB, "MiB"),
              ("time_median_s", "forward+backward time (median, p20-p80)", 1.0, "s")]
    colors = {"full": "C3", "checkpoint": "C0", "revolve": "C2"}
    for ax, (key, label, scale, unit) in zip(axes, panels):
        for name in dict.fromkeys(r["strategy"] for r in rows):
            rs = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["T"])
            c = colors.get(name)
            ok = [r for r in rs if r["status"] == "ok" and r.get(key) is not None]
            if ok:
                ys = [r[key] * scale for r in ok]
                if key == "time_median_s":
                    err = [[(r[key] - r["time_p20_s"]) * scale for r in ok],
                           [(r["time_p80_s"] - r[key]) * scale for r in ok]]
                    ax.errorbar([r["T"] for r in ok], ys, yerr=err, marker="o", color=c, capsize=3,
                                label=LABELS.get(name, name))
                else:
                    ax.plot([r["T"] for r in ok], ys, marker="o", color=c, label=LABELS.get(name, name))
                if key == "untraced_rss_increase_first_bytes":
                    ax.plot([r["T"] for r in ok], [r["rss_increase_bytes"] * scale for r in ok],
                            ls=":", marker="x", color=c, alpha=0.6)
            pkey = {"peak_stored_bytes": "peak_stored_bytes",
                    "untraced_rss_increase_first_bytes": "predicted_rss_increase_bytes",
                    "time_median_s": "predicted_time_s"}[key]
            skipped = [r for r in rs if r["status"] == "skipped" and r.get(pkey) is not None]
            if ok and skipped:
                xs = [ok[-1]["T"]] + [r["T"] for r in skipped]
                ys = [ok[-1][key] * scale] + [r[pkey] * scale for r in skipped]
                ax.plot(xs, ys, ls="--", color=c, alpha=0.5)
                ax.plot(xs[1:], ys[1:], ls="none", marker="o", mfc="none", color=c,
                        label=f"{LABELS.get(name, name)}: skipped, predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(f"{label} [{unit}]")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].plot([], [], ls=":", marker="x", color="grey", label="traced run (sb.trace on)")
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    head = ("| strategy | T | peak stored | stored / full | fwd+recomp steps / T | peak RSS (abs, untraced) | "
            "RSS increase (untraced) | RSS increase (traced) | time median [p20, p80] | time / full |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    full = {r["T"]: r for r in rows if r["strategy"] == "full" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            pred = []
            if r.get("predicted_peak_rss_bytes"):
                pred.append(f"predicted peak RSS {common.fmt_bytes(r['predicted_peak_rss_bytes'])}")
            if r.get("predicted_time_s"):
                pred.append(f"predicted time {common.fmt_time(r['predicted_time_s'])}")
            lines.append(f"| {r['spec']} | {r['T']} | {r['status']}: {r['reason']}"
                         f"{'; ' + ', '.join(pred) if pred else ''} |" + " |" * 7)
            continue
        f = full.get(r["T"])
        ratio = f"{r['peak_stored_bytes'] / f['peak_stored_bytes']:.4f}" if f else "-"
        tratio = f"{r['time_median_s'] / f['time_median_s']:.2f}" if f else "-"
        lines.append(
            f"| {r['spec']} | {r['T']} | {common.fmt_bytes(r['peak_stored_bytes'])} | {ratio} | "
            f"{r['steps_per_T']:.2f} | {common.fmt_bytes(r['untraced_peak_rss_bytes'])} | "
            f"{common.fmt_bytes(r['untraced_rss_increase_first_bytes'])} | "
            f"{common.fmt_bytes(r['rss_increase_bytes'])} | {common.fmt_time(r['time_median_s'])} "
            f"[{common.fmt_time(r['time_p20_s'])}, {common.fmt_time(r['time_p80_s'])}] (n={r['time_repeats']}) | "
            f"{tratio} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full",
                    help="T values: ci = 1000 3000, full = 1000 10000 100000 (default)")
    ap.add_argument("--T", type=int, nargs="+", help="sequence lengths (override the preset)")
    ap.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES,
                    help="full, checkpoint (every=ceil(sqrt T)), revolve (8 slots), or any "
                         "parse_strategy string such as checkpoint:50")
    ap.add_argument("--max-gib", type=float, default=16.0, help="skip cases predicted to need more peak RSS")
    ap.add_argument("--max-minutes", type=float, default=10.0,
                    help="skip cases whose one forward+backward is predicted to take longer")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after 1 warm-up (fewer for long cases)")
    ap.add_argument("--mem-repeats", type=int, default=3,
                    help="memory samples (fresh processes) per case; 1 for cases over a minute")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the workers")
    ap.add_argument("--backend", default=None, choices=["auto", "torch", "cpu", "triton"],
                    help="LIF backend (default: the package's default, recorded in the JSON)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.1, help="input spike probability")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-T", type=int, default=None,
                    help=f"T of the acceptance checks (default {CHECK_T}, else the largest T run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(SCRIPT), "results", "memory"),
                    help="output prefix: writes PREFIX.csv, PREFIX.json, PREFIX.png")
    ap.add_argument("--no-gate", action="store_true", help="skip the exactness gate")
    ap.add_argument("--worker-env", nargs="+", default=[], metavar="KEY=VALUE",
                    help="environment of the workers, e.g. MALLOC_MMAP_THRESHOLD_=8192 (allocator studies)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    Ts = sorted(set(args.T or PRESETS[args.preset]))
    if Ts[0] < 1:
        raise SystemExit(f"--T: sequence lengths must be >= 1, got {Ts[0]}")
    cfg = {"batch": args.batch, "hidden": args.hidden, "input": args.input, "p": args.p,
           "seed": args.seed, "threads": args.threads, "backend": args.backend}
    for name in args.strategies:
        resolve(name, Ts[0])  # fail early on a bad strategy string
    try:
        worker_env = dict(kv.split("=", 1) for kv in args.worker_env)
    except ValueError:
        raise SystemExit(f"--worker-env: expected KEY=VALUE items, got {args.worker_env}") from None
    args.env = worker_env
    meta = common.metadata(args.threads)
    meta["worker_env"] = worker_env
    meta["case"] = {"model": f"Stack([LIF({args.input}, {args.hidden}), LIF({args.hidden}, {args.hidden})])",
                    "input": f"Bernoulli({args.p}) spikes, float32, (T, {args.batch}, {args.input}), "
                             "input size 64 as scikit-learn digits (8x8)",
                    "reduce": "sum", "loss": "(y * D).sum(), D fixed seeded randn(B, H)", **cfg}
    print(f"# memory benchmark: T={Ts} strategies={args.strategies} threads={args.threads} "
          f"torch {meta['torch']} on {meta['cpu_count']} CPUs ({meta['cpu_model']})", flush=True)
    gate = None
    if not args.no_gate:
        specs = sorted({resolve(n, 97) for n in args.strategies} - {"full"})
        gate = common.run_worker(SCRIPT, {"mode": "gate", "cfg": cfg, "T": 97, "specs": specs}, timeout=600,
                                 env=worker_env)
        bad = gate.get("status") != "ok" or not all(v["ok"] for v in gate["strategies"].values())
        print(f"# gate (outputs and grads equal full BPTT at T=97): {json.dumps(gate)}", flush=True)
        if bad:
            print("# gate FAILED: not benchmarking strategies that disagree with full BPTT", file=sys.stderr)
            return 1
    # RSS a first forward+backward adds whatever T is (lazy imports and initialisation in torch,
    # allocator arenas), per strategy, from a T=16 run; it is inside every case's RSS increase
    meta["first_run_floor_bytes"] = {}
    for name in args.strategies:
        fl = common.run_worker(SCRIPT, {"mode": "memory", "cfg": cfg, "T": 16, "spec": resolve(name, 16)},
                               timeout=300, env=worker_env)
        meta["first_run_floor_bytes"][name] = fl.get("rss_increase_bytes")
    print("# first-run RSS floor (T=16): " + ", ".join(
        f"{k} {common.fmt_bytes(v)}" for k, v in meta["first_run_floor_bytes"].items()), flush=True)
    rows = []
    t_start = time.perf_counter()
    done = {name: [] for name in args.strategies}
    for T in Ts:  # strategies side by side at each T, so the ones compared run close in time
        for name in args.strategies:
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            row = run_case(name, T, cfg, args, done[name])
            row["loadavg_1m"] = load
            done[name].append(row)
            rows.append(row)
            extra = (f"stored {common.fmt_bytes(row.get('peak_stored_bytes'))}, "
                     f"RSS +{common.fmt_bytes(row.get('untraced_rss_increase_first_bytes'))} "
                     f"(traced +{common.fmt_bytes(row.get('rss_increase_bytes'))}), "
                     f"time {common.fmt_time(row.get('time_median_s'))}") if row["status"] == "ok" else row["reason"]
            print(f"{row['case']:>20} [{row['spec']}] {row['status']}: {extra} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    order = {name: i for i, name in enumerate(args.strategies)}
    rows.sort(key=lambda r: (order[r["strategy"]], r["T"]))
    check_T = args.check_T or (CHECK_T if CHECK_T in Ts else Ts[-1])
    result_checks = checks(rows, check_T, meta.get("first_run_floor_bytes"))
    meta["total_wall_s"] = time.perf_counter() - t_start
    meta["loadavg_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(args.out + ".csv", rows)
    with open(args.out + ".json", "w") as f:
        json.dump({"metadata": meta, "gate": gate, "check_T": check_T, "checks": result_checks,
                   "cases": [{k.lstrip("_"): v for k, v in r.items()} for r in rows]}, f, indent=1)
    backends = sorted({r["backend"] for r in rows if r.get("backend")})
    plot(args.out + ".png", rows,
         f"2-layer LIF {args.input}-{args.hidden}-{args.hidden} (backend {', '.join(backends)}), "
         f"B={args.batch}, reduce=sum; "
         f"{meta['cpu_count']}-CPU {meta['machine']}, torch {meta['torch']}, {args.threads} thread(s)")
    print()
    print(markdown_table(rows))
    print()
    print(f"checks at T={check_T}:")
    for c in result_checks:
        val = "-" if c["value"] is None else f"{c['value']:.4g}"
        print(f"  ({c['id']}) {c['status']}: {c['what']}: {val} (bound {c['bound']}); {c['detail']}")
    print(f"\nwrote {args.out}.csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
