"""The layer-selection measurement runs end to end on the tiny teacher and writes its outputs."""

from __future__ import annotations

import json

from benchmarks.layer_selection import main, run
from compressor.select import SELECTION
from tests.conftest import tiny_interactions


def test_end_to_end_on_the_tiny_teacher(tiny_teacher_dir, tmp_path):
    out = tmp_path / "ls"
    p = run(tiny_teacher_dir, tiny_interactions(), out, keep=1, samples=16, random_draws=2)
    for name in ("layer_selection.md", "layer_selection.json", "layer_selection.png",
                 "importance/importance.json", "importance/importance_by_method.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "layer_selection.json").read_text())
    assert doc["num_layers"] == 4 and doc["keep"] == 1
    assert doc["spearman_vs_ablation"]["ablation"] == 1.0
    assert doc["fisher_cost"]["epoch_seconds_measured"] > 0 and doc["fisher_cost"]["ratio_measured"] > 0
    assert doc["fisher_cost"]["epoch_seconds_recorded"] > 0  # read from training_summary.json
    names = {r["name"] for r in p["students"]}
    assert {"first-k", "last-k"} <= names
    assert {f"{s}/fisher" for s in SELECTION} <= names
    assert len(p["random"]) == 2
    first = next(r for r in p["students"] if r["name"] == "first-k")
    assert first["layers"] == [0] and 0 <= first["ndcg@10"] <= 1
    md = (out / "layer_selection.md").read_text()
    assert "Spearman vs ablation" in md and "first-k" in md


def test_bad_keep_is_exit_2(tiny_teacher_dir, tmp_path, capsys):
    code = main(["--teacher", str(tiny_teacher_dir), "--keep", "4", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "between 1 and 3" in capsys.readouterr().err
