"""`sparsebptt report`: curves and memory of training runs in one PNG, and a comparison table.

    from sparsebptt.report import load_runs, plot_runs, format_table
    runs = load_runs(["runs/full", "runs/ckpt"])
    plot_runs(runs, "report.png")
    print(format_table(runs))

A run is a folder written by `sparsebptt train` (config.json and metrics.jsonl). A report may be
drawn while a run is still training: a last metrics line that is not complete yet is left out.
The figure is drawn with matplotlib's Agg canvas (no display, no pyplot global state).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .train.runs import METRICS_FILE, RunError, read_run_meta

__all__ = ["Run", "load_run", "load_runs", "plot_runs", "format_table", "report"]


@dataclass
class Run:
    """One run folder: ``name`` (for legends and the table), its config.json and its epochs."""

    path: Path
    name: str
    config: dict
    rows: list = field(default_factory=list)

    def column(self, key: str) -> list:
        return [r.get(key) for r in self.rows]

    @property
    def best_val_acc(self) -> "float | None":
        vals = [v for v in self.column("val_acc") if v is not None]
        return max(vals) if vals else None

    @property
    def peak_stored_bytes(self) -> "int | None":
        vals = [v for v in self.column("peak_stored_bytes") if v is not None]
        return max(vals) if vals else None


def load_run(folder: "str | Path", name: "str | None" = None) -> Run:
    """Read a run folder; `RunError` (one line) if it is not a run or its metrics are unreadable."""
    folder = Path(folder)
    meta = read_run_meta(folder)
    rows = []
    path = folder / METRICS_FILE
    if path.exists():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # being written right now
                    break
                raise RunError(f"{str(path)!r} line {i + 1} is not JSON; the file is damaged") from None
            if not isinstance(row, dict) or "epoch" not in row:
                raise RunError(f"{str(path)!r} line {i + 1} is not a metrics row (no 'epoch')")
            rows.append(row)
    return Run(folder, name or folder.name, meta, rows)


def load_runs(folders) -> "list[Run]":
    """`load_run` for each folder; names are the folder names, or longer paths where they clash."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("report: give at least one run folder")
    names = [f.name or str(f) for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return [load_run(f, n) for f, n in zip(folders, names)]


def _label(run: Run) -> str:
    c = run.config
    return f"{run.name} ({c.get('model', '?')}, {c.get('strategy', '?')})"


def plot_runs(runs: "list[Run]", path: "str | Path", *, dpi: int = 120) -> Path:
    """Draw training loss, accuracy (validation solid, training dashed), seconds per epoch and
    peak stored bytes of each run into one PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_time, ax_mem = fig.subplots(2, 2).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        epochs = run.column("epoch")
        if not epochs:
            continue
        label = _label(run)
        ax_loss.plot(epochs, run.column("train_loss"), "o-", color=color, label=label, ms=3)
        ax_acc.plot(epochs, run.column("val_acc"), "o-", color=color, label=f"{run.name} val", ms=3)
        ax_acc.plot(epochs, run.column("train_acc"), "--", color=color, alpha=0.6, label=f"{run.name} train")
        ax_time.plot(epochs, run.column("seconds"), "o-", color=color, label=label, ms=3)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy (validation solid, training dashed)", xlabel="epoch", ylabel="accuracy")
    ax_time.set(title="wall time per epoch", xlabel="epoch", ylabel="seconds")
    ax_time.set_ylim(bottom=0)
    for ax in (ax_loss, ax_acc, ax_time):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if any(run.rows for run in runs):
        ax_loss.legend(fontsize=8)
        ax_acc.legend(fontsize=8, ncol=2)
    mib = [(run.peak_stored_bytes or 0) / 2**20 for run in runs]
    bars = ax_mem.bar(range(len(runs)), mib, color=colors)
    for bar, run, v in zip(bars, runs, mib):
        ax_mem.annotate(f"{v:.2f} MiB\n{run.config.get('strategy', '?')}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_mem.set_xticks(range(len(runs)), [run.name for run in runs], rotation=20 if len(runs) > 3 else 0,
                      fontsize=8)
    ax_mem.set(title="peak stored bytes of the scan (sb.trace)", ylabel="MiB")
    ax_mem.set_ylim(0, max(mib + [1e-3]) * 1.25)
    ax_mem.grid(alpha=0.3, axis="y")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(runs: "list[Run]") -> str:
    """One line per run: dataset, model, strategy, T, epochs, best and final validation accuracy,
    final training loss, peak stored MiB and total training seconds."""
    head = ["run", "dataset", "model", "strategy", "T", "epochs", "best val", "final val", "loss",
            "peak MiB", "seconds"]
    body = []
    for run in runs:
        c, last = run.config, (run.rows[-1] if run.rows else {})
        secs = [s for s in run.column("seconds") if s is not None]
        peak = run.peak_stored_bytes
        body.append([run.name, str(c.get("dataset", "?")), str(c.get("model", "?")), str(c.get("strategy", "?")),
                     str(c.get("T", "?")), f"{len(run.rows)}/{c.get('epochs', '?')}",
                     _fmt(run.best_val_acc, ".4f"), _fmt(last.get("val_acc"), ".4f"),
                     _fmt(last.get("train_loss"), ".4f"), _fmt(None if peak is None else peak / 2**20, ".3f"),
                     _fmt(sum(secs) if secs else None, ".1f")])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    left = {0, 1, 2, 3}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def report(folders, png: "str | Path | None" = None) -> "tuple[str, Path]":
    """Load the runs, write the PNG (default ``<run>/report.png`` for one run, ``report.png`` in
    the current folder for several) and return ``(table, png_path)``."""
    runs = load_runs(folders)
    if png is None:
        png = runs[0].path / "report.png" if len(runs) == 1 else Path("report.png")
    return format_table(runs), plot_runs(runs, png)
