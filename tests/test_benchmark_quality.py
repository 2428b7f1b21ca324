"""The quality benchmark end to end on the tiny teacher: every output, the floors, resumable cells."""

from __future__ import annotations

import json

from benchmarks.quality import main, parse_layer_spec
from tests.conftest import tiny_interactions


def test_quality_benchmark_end_to_end_and_resumable(tiny_teacher_dir, tmp_path, capsys):
    inter = tiny_interactions()
    data = tmp_path / "data"
    data.mkdir()
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(data / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(data / "movies.csv", index=False)
    out = tmp_path / "q"
    (tmp_path / "d.yaml").write_text("ema_every: 2\ntrain:\n  batch_size: 128\n")
    argv = ["--teacher", str(tiny_teacher_dir), "--data", str(data), "--depths", "2", "--seeds", "0,1",
            "--methods", "fisher_ld", "--epochs", "1", "--budget-minutes", "1", "--layers", "2=0,3",
            "--overhead-steps", "2", "--config", str(tmp_path / "d.yaml"), "--quiet", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["layers"] == {"2": [0, 3]} and doc["fisher_source"].startswith("estimated")
    assert doc["config"]["train"]["batch_size"] == 128 and doc["config"]["train"]["lr"] == 1e-3  # distill defaults kept
    table = doc["aggregate"]["table"]["2"]
    assert set(table) == {"fisher_ld", "truncated", "scratch"}
    assert table["fisher_ld"]["seeds"] == 2 and table["truncated"]["seeds"] == 1
    assert all(0 <= r["ndcg@10"][0] <= 1 and r["retention"] is not None for r in table.values())
    boot = doc["aggregate"]["bootstrap"]["2"]
    assert set(boot) == {"truncated", "scratch"}
    assert all(b["ci_low"] <= b["mean_diff"] <= b["ci_high"] for b in boot.values())
    assert doc["overhead"]["ratio"] > 0 and doc["overhead"]["steps"] % doc["config"]["ema_every"] == 0
    assert (out / "quality.png").stat().st_size > 0 and "fisher_ld minus each method" in (out / "quality.md").read_text()
    assert len(list((out / "cells").glob("*.json"))) == 5  # fisher_ld and scratch x 2 seeds + truncated
    assert not list((out / "runs").glob("*/checkpoint.pt"))  # finished cells drop their checkpoint
    # a second run skips every finished cell (a run that trained would print its cells)
    capsys.readouterr()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(argv) == 0
    assert "seed" not in capsys.readouterr().out
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_layer_spec_and_bad_input(tiny_teacher_dir, tmp_path):
    assert parse_layer_spec("4=0,1,2,3; 2=0,1") == {4: [0, 1, 2, 3], 2: [0, 1]}
    base = ["--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "x"), "--quiet"]
    assert main(base + ["--methods", "nope"]) == 2
    assert main(base + ["--depths", "4"]) == 2  # a 4-layer teacher keeps 1..3 layers
