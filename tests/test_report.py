"""`sparsebptt report`: a PNG of the curves and memory of runs, and a comparison table."""
import json
import re

import pytest

from sparsebptt import cli
from sparsebptt.report import load_run, load_runs
from sparsebptt.train.runs import RunError

TINY = ["--T", "12", "--hidden", "8", "--batch-size", "256", "--epochs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", *TINY, "--out", str(root / "full")]) == 0
    assert cli.main(["train", *TINY, "--strategy", "checkpoint:4", "--out", str(root / "ckpt")]) == 0
    return root / "full", root / "ckpt"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_two_runs_writes_png_and_table(two_runs, tmp_path, capsys):
    full, ckpt = two_runs
    png = tmp_path / "cmp.png"
    capsys.readouterr()
    assert cli.main(["report", str(full), str(ckpt), "--png", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "dataset", "model", "strategy", "T", "epochs", "best", "val", "final", "val",
                              "loss", "peak", "MiB", "seconds"]
    rows = {line.split()[0]: line.split() for line in out[2:4]}
    assert rows["full"][3] == "full" and rows["ckpt"][3] == "checkpoint:4"
    assert rows["full"][5] == "2/2"
    peak_full, peak_ckpt = float(rows["full"][9]), float(rows["ckpt"][9])
    assert 0 < peak_ckpt < peak_full  # checkpointing stores less
    assert out[-1] == f"figure: {png}"
    w, h = _png_size(png)
    assert w >= 800 and h >= 600 and png.stat().st_size > 20_000


def test_report_one_run_defaults_into_its_folder(two_runs, capsys):
    full, _ = two_runs
    assert cli.main(["report", str(full)]) == 0
    assert _png_size(full / "report.png")[0] >= 800
    assert f"figure: {full / 'report.png'}" in capsys.readouterr().out


def test_report_skips_a_line_being_written(two_runs, tmp_path):
    full, _ = two_runs
    run = tmp_path / "live"
    run.mkdir()
    (run / "config.json").write_text((full / "config.json").read_text())
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    r = load_run(run)
    assert [row["epoch"] for row in r.rows] == [1]
    (run / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(RunError, match=r"line 1 is not JSON; the file is damaged"):
        load_run(run)


def test_report_names_clash_use_paths(two_runs, tmp_path):
    full, _ = two_runs
    runs = load_runs([full, full])
    assert runs[0].name == str(full)
    assert json.loads((full / "config.json").read_text())["dataset"] == runs[0].config["dataset"]


def test_report_not_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(r"sparsebptt report: error: .* is not a run folder: it has no config.json", err)
