"""benchmarks.pruning end to end on the tiny teacher: every output written, rows consistent."""

from __future__ import annotations

import json

import pytest

from benchmarks.pruning import PruningBenchConfig, main, run
from compressor.data import prepare
from compressor.evaluate import evaluate_model
from compressor.modeling import load_model


def test_tiny_run_writes_table_json_and_plot(tiny_teacher_dir, tmp_path):
    from tests.conftest import tiny_interactions

    inter = tiny_interactions()
    data = tmp_path / "data"
    data.mkdir()
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(data / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(data / "movies.csv", index=False)
    cfg = PruningBenchConfig(kinds=["mlp", "hidden"], ratios=[0.5], scorers=["magnitude"], recovery="finetune",
                             recovery_epochs=1, sparsity=0.5, quantize=["int8"], fisher_samples=16,
                             rounds=1, calls=2)
    out = tmp_path / "bench"
    payload = run(cfg, tiny_teacher_dir, data, out)
    for name in ("pruning.md", "pruning.json", "pruning.png"):
        assert (out / name).stat().st_size > 0
    rows = {r["name"]: r for r in json.loads((out / "pruning.json").read_text())["rows"]}
    assert set(rows) == {"float", "mlp50-magnitude", "mlp50-magnitude+finetune", "hidden50-magnitude",
                         "hidden50-magnitude+finetune", "sparse50-fisher_weighted", "float int8"}
    assert rows["hidden50-magnitude"]["units"] == "32->16" and rows["hidden50-magnitude"]["kind"] == "hidden"
    base, mlp, sparse = rows["float"], rows["mlp50-magnitude"], rows["sparse50-fisher_weighted"]
    assert base["b1_ratio"] == 1.0 and base["b64_ratio"] == 1.0
    assert mlp["params"] < base["params"] and mlp["units"] == "64->32"
    assert sparse["params"] == base["params"] and sparse["nonzero_params"] < base["nonzero_params"]
    assert abs(sparse["effective_ratio"] - 0.5) < 0.01
    assert rows["float int8"]["top10_agreement"] >= 0.8  # int8 keeps most of the float graph's ranking
    assert rows["mlp50-magnitude+finetune"]["recovery"]["method"] == "finetune"
    # the float row is the teacher as exported: its ranking is the PyTorch teacher's
    teacher, vocab = load_model(tiny_teacher_dir)
    torch_ndcg = evaluate_model(teacher, prepare(data, vocab=vocab).split("test"), 20).metrics["ndcg@10"]
    assert base["ndcg@10"] == pytest.approx(torch_ndcg, abs=1e-3)
    assert base["ndcg@10_vs_float"]["mean_diff"] == 0.0 and not base["ndcg@10_vs_float"]["excludes_zero"]
    for r in rows.values():  # every graph timed; ratios against the float graph's medians
        for b in (1, 64):
            assert r[f"b{b}_ratio"] == pytest.approx(r[f"b{b}_ms"] / base[f"b{b}_ms"]), r["name"]
    assert "| float |" in (out / "pruning.md").read_text() and payload["test_users"] == 60
    # Every cell is cached in the work directory (here --out): a report-only rerun measures
    # nothing new and rebuilds the same rows (latency timed afresh) into another --out.
    again = run(cfg, tiny_teacher_dir, data, tmp_path / "report", work=out, report_only=True)
    same = {r["name"]: r for r in again["rows"]}
    assert list(same) == list(rows)
    assert all(same[n]["ndcg@10"] == rows[n]["ndcg@10"] for n in rows)
    assert not (tmp_path / "report" / "models").exists() and (tmp_path / "report" / "pruning.md").is_file()


def test_bad_ratio_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--ratios", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratios" in err[0]
