"""The quality benchmark end to end on the tiny teacher: every output, the floors, resumable cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality import main, parse_layer_spec
from compressor.data import prepare
from compressor.evaluate import evaluate_model
from compressor.modeling import load_model
from compressor.truncate import truncate
from tests.conftest import tiny_interactions


def _tiny_data_dir(tmp_path):
    """The tiny teacher's interactions as a MovieLens-style folder the benchmark reads."""
    inter = tiny_interactions()
    data = tmp_path / "data"
    data.mkdir()
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(data / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(data / "movies.csv", index=False)
    return data


def test_quality_benchmark_end_to_end_and_resumable(tiny_teacher_dir, tmp_path, capsys):
    data = _tiny_data_dir(tmp_path)
    out = tmp_path / "q"
    (tmp_path / "d.yaml").write_text("ema_every: 2\ntrain:\n  batch_size: 128\n")
    argv = ["--teacher", str(tiny_teacher_dir), "--data", str(data), "--depths", "2", "--seeds", "0,1",
            "--methods", "fisher_ld", "--epochs", "1", "--budget-minutes", "1", "--layers", "2=0,3",
            "--overhead-steps", "2", "--config", str(tmp_path / "d.yaml"), "--set", "gamma=0.5", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["layers"] == {"2": [0, 3]} and doc["fisher_source"].startswith("estimated")
    assert doc["config"]["train"]["batch_size"] == 128 and doc["config"]["train"]["lr"] == 1e-3  # distill defaults kept
    assert doc["config"]["gamma"] == 0.5 and doc["config"]["ema_every"] == 2  # --set on top of --config
    table = doc["aggregate"]["table"]["2"]
    assert set(table) == {"fisher_ld", "truncated", "scratch"}
    assert table["fisher_ld"]["seeds"] == 2 and table["truncated"]["seeds"] == 1
    # each row is the mean of its cells, and retention is that over the teacher's test NDCG@10
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    teacher_ndcg = doc["aggregate"]["teacher_test"]["ndcg@10"]
    for method, row in table.items():
        mine = [c["test"]["ndcg@10"] for c in cells if c["method"] == method]
        assert row["ndcg@10"][0] == pytest.approx(np.mean(mine)) and len(mine) == row["seeds"], method
        assert row["retention"] == pytest.approx(row["ndcg@10"][0] / teacher_ndcg), method
    # the truncated floor is the untrained [0, 3] student, measured here independently
    teacher, vocab = load_model(tiny_teacher_dir)
    test = prepare(data, vocab=vocab).split("test")
    floor = evaluate_model(truncate(teacher, [0, 3]).eval(), test, 20).metrics["ndcg@10"]
    assert table["truncated"]["ndcg@10"][0] == pytest.approx(floor, abs=1e-6)
    assert teacher_ndcg == pytest.approx(evaluate_model(teacher, test, 20).metrics["ndcg@10"], abs=1e-6)
    boot = doc["aggregate"]["bootstrap"]["2"]
    assert set(boot) == {"truncated", "scratch"}
    assert all(b["ci_low"] <= b["mean_diff"] <= b["ci_high"] for b in boot.values())
    ov = doc["overhead"]
    assert ov["ratio"] == pytest.approx(ov["fisher_ld_seconds_per_step"] / ov["uniform_ld_seconds_per_step"])
    assert ov["steps"] == 2 == ov["ema_every"]  # --overhead-steps 2 rounded up to whole EMA periods of 2
    assert (out / "quality.png").stat().st_size > 0 and "fisher_ld minus each method" in (out / "quality.md").read_text()
    assert len(list((out / "cells").glob("*.json"))) == 5  # fisher_ld and scratch x 2 seeds + truncated
    assert not list((out / "runs").glob("*/checkpoint.pt"))  # finished cells drop their checkpoint
    assert not list((out / "runs").glob("*/student")) and list((out / "runs").glob("*/train_log.jsonl"))
    # a second run skips every finished cell (a run that trained would print its cells)
    capsys.readouterr()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(argv) == 0
    assert "seed" not in capsys.readouterr().out
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    # a rerun with another config into the same folder trains its cells again (they are keyed by a
    # fingerprint of everything that decides them, not by name); the untrained floor does not change
    assert main(argv + ["--set", "gamma=0.7", "--seeds", "0", "--floors", "truncated", "--overhead-steps", "0"]) == 0
    printed = capsys.readouterr().out
    assert "seed 0 fisher_ld" in printed and "truncated" not in printed
    assert json.loads((out / "quality.json").read_text())["config"]["gamma"] == 0.7
    assert json.loads((out / "cells" / "fisher_ld_d2_s0.json").read_text())["key"] != json.loads(
        (out / "cells" / "fisher_ld_d2_s1.json").read_text())["key"]
    # --floors picks the floors reported (comparing layer sets needs no scratch student)
    assert main(argv + ["--floors", "truncated", "--report-only"]) == 0
    assert set(json.loads((out / "quality.json").read_text())["aggregate"]["table"]["2"]) == {"fisher_ld", "truncated"}


def test_layer_spec_and_bad_input(tiny_teacher_dir, tmp_path):
    assert parse_layer_spec("4=0,1,2,3; 2=0,1") == {4: [0, 1, 2, 3], 2: [0, 1]}
    base = ["--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "x"), "--quiet"]
    assert main(base + ["--methods", "nope"]) == 2
    assert main(base + ["--floors", "truncated,nope"]) == 2
    assert main(base + ["--depths", "4"]) == 2  # a 4-layer teacher keeps 1..3 layers
    (tmp_path / "bad.yaml").write_text("hidden: 2\n")
    assert main(base + ["--prune", str(tmp_path / "bad.yaml")]) == 2  # before any work
    assert main(base + ["--set", "gamma=-1"]) == 2


def test_a_narrower_student_distils_through_adapt_projections(tiny_teacher_dir, tmp_path):
    """--prune hidden: 0.5 halves every student's width before the cells: the floor is the
    pruned untrained student, and fisher_ld's layer terms go through learned 16 -> 32 projections."""
    (tmp_path / "p.yaml").write_text("hidden: 0.5\nscorer: magnitude\n")
    out, data = tmp_path / "q", _tiny_data_dir(tmp_path)
    assert main(["--teacher", str(tiny_teacher_dir), "--data", str(data), "--depths", "2", "--seeds", "0", "--methods", "fisher_ld",
                 "--floors", "truncated", "--epochs", "1", "--layers", "2=0,3", "--overhead-steps", "0",
                 "--prune", str(tmp_path / "p.yaml"), "--keep-students", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "quality.json").read_text())
    width = doc["prune"]["by_depth"]["2"]["structured"]["hidden"]
    assert (width["before"], width["after"]) == (32, 16) and doc["prune"]["config"]["hidden"] == 0.5
    student, _ = load_model(out / "runs" / "fisher_ld_d2_s0" / "student")
    assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 2
    assert "hidden 32 → 16" in (out / "quality.md").read_text()
    # the floor is the pruned, untrained [0, 3] student
    from compressor.prune import PruneConfig, prune_model

    teacher, vocab = load_model(tiny_teacher_dir)
    test = prepare(data, vocab=vocab).split("test")
    narrow, _ = prune_model(truncate(teacher, [0, 3]), None, PruneConfig(hidden=0.5, scorer="magnitude"), 20)
    floor = evaluate_model(narrow.eval(), test, 20).metrics["ndcg@10"]
    assert doc["aggregate"]["table"]["2"]["truncated"]["ndcg@10"][0] == pytest.approx(floor, abs=1e-6)
