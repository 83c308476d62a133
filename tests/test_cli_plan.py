"""`sparsebptt plan` and `sparsebptt train --memory-budget`."""
from __future__ import annotations

import json

import pytest

import sparsebptt as sb
from sparsebptt.cli import main
from sparsebptt.planner import _counts, _walk


@pytest.mark.parametrize("T", [1, 2, 5, 37, 1000])
def test_closed_form_counts_match_schedule_walk(T):
    for st in [sb.Checkpoint(1), sb.Checkpoint(3), sb.Checkpoint(64), sb.DoubleCheckpoint(8, 2),
               sb.DoubleCheckpoint(10, 3), sb.DoubleCheckpoint(64, 64), sb.DoubleCheckpoint(512, 16)]:
        assert _counts(st, T) == _walk(st, T), st


def test_plan_prints_table_with_chosen_marked(capsys):
    assert main(["plan", "--model", "lif", "--T", "5000", "--batch-size", "4", "--hidden", "32",
                 "--memory-budget", "256KiB"]) == 0
    out = capsys.readouterr().out
    assert "fast memory" in out and "slow memory" in out and "recompute" in out
    chosen = [line for line in out.splitlines() if line.startswith("*")]
    assert len(chosen) == 1
    assert "chosen: " + chosen[0].split()[1] in out


def test_plan_impossible_budget_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "gru", "--T", "1000", "--memory-budget", "1KiB"])
    assert e.value.code == 1
    assert "smallest feasible budget" in capsys.readouterr().err


def test_plan_bad_budget_string(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--T", "100", "--memory-budget", "lots"])
    assert e.value.code == 2
    assert "accepted forms" in capsys.readouterr().err


def test_train_with_memory_budget_uses_planner(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--T", "8", "--hidden", "16", "--memory-budget", "64KiB",
                 "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["memory_budget"] == "64KiB"
    assert config["strategy"] != "full"  # 8 steps of full BPTT at B=64 (~96 KiB) do not fit
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["peak_stored_bytes"] <= 64 * 1024


def test_train_with_impossible_budget_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "1", "--T", "8", "--memory-budget", "1KiB", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "smallest feasible budget" in capsys.readouterr().err
