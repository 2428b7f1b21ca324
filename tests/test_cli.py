"""The CLI's contract: JSON keys, and one-line errors with exit code 2 (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.cli import main

KEYS = {"ndcg@5", "ndcg@10", "hr@5", "hr@10", "mrr", "coverage@10", "users"}


@pytest.fixture(scope="module")
def tiny_csv_dir(tmp_path_factory):
    from tests.conftest import tiny_interactions

    inter = tiny_interactions(30)
    d = tmp_path_factory.mktemp("data")
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(d / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(d / "movies.csv", index=False)
    return d


def test_evaluate_baseline_writes_the_documented_keys(tiny_csv_dir, tmp_path, capsys):
    out = tmp_path / "pop.json"
    assert main(["evaluate", "--baseline", "mostpop", "--data", str(tiny_csv_dir), "--json", str(out)]) == 0
    assert KEYS <= set(json.loads(out.read_text()))


def test_train_teacher_then_evaluate(tiny_csv_dir, tmp_path):
    out = tmp_path / "teacher"
    code = main(["train-teacher", "--data", str(tiny_csv_dir), "--out", str(out), "num_layers=2",
                 "hidden_size=16", "num_heads=2", "intermediate_size=32", "max_len=10", "train.epochs=1"])
    assert code == 0
    assert main(["evaluate", str(out), "--data", str(tiny_csv_dir), "--split", "valid",
                 "--json", str(tmp_path / "m.json"), "--against", "mostpop", "--against", str(out)]) == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    assert KEYS <= set(doc)
    pop = main_json(["evaluate", "--baseline", "mostpop", "--data", str(tiny_csv_dir), "--split", "valid"],
                    tmp_path / "pop.json")
    vs_pop = doc["against"]["mostpop"]["ndcg@10"]
    assert vs_pop["other"] == pop["ndcg@10"]
    assert vs_pop["mean_diff"] == pytest.approx(doc["ndcg@10"] - pop["ndcg@10"])
    assert vs_pop["ci_low"] <= vs_pop["mean_diff"] <= vs_pop["ci_high"]
    itself = doc["against"][str(out)]["hr@10"]  # a model against itself: no difference at all
    assert itself["mean_diff"] == itself["ci_low"] == itself["ci_high"] == 0 and not itself["excludes_zero"]


def main_json(argv: list[str], path: Path) -> dict:
    assert main([*argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--baseline", "mostpop", "--data", "/no/such/place"], "no such dataset"),
        (["evaluate", "/no/such/model", "--data", "ml-latest-small"], "no such model directory"),
        (["train-teacher", "--data", "ml-latest-small", "--out", "x", "num_layerz=2"], "num_layerz"),
        (["train-teacher", "--data", "ml-latest-small", "--out", "x", "--config", "/no/cfg.yaml"], "no such config"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_model_dir_without_vocabulary_exits_2(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["evaluate", str(tmp_path / "m"), "--data", "ml-latest-small"]) == 2
    assert "item_vocab.json" in capsys.readouterr().err
