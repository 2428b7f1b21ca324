"""benchmarks.teacher_seeds: one teacher per seed, each against one EASE fit, reused when present."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import teacher_seeds

CONFIG = {
    "data": {"name": "ml-latest-small", "max_users": 60},
    "teacher": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32, "max_len": 12,
                "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2}},
    "selection": {"keep": 1},
    "evaluate": {"bootstrap_resamples": 200},
}


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_seeds_are_trained_compared_with_ease_and_reused(tmp_path, config_file):
    out, work = tmp_path / "out", tmp_path / "work"
    doc = teacher_seeds.run(str(config_file), [0, 1], out, work, [])
    rows = doc["seeds"]
    assert [r["seed"] for r in rows] == [0, 1]
    ease = doc["ease"]["test_ndcg@10"]
    for r in rows:
        assert r["vs_ease"] == pytest.approx(r["test_ndcg@10"] / ease)
        assert r["diff_vs_ease"]["mean_diff"] == pytest.approx(r["test_ndcg@10"] - ease, abs=1e-9)
        assert r["diff_vs_ease"]["ci_low"] <= r["diff_vs_ease"]["mean_diff"] <= r["diff_vs_ease"]["ci_high"]
        assert r["epochs_run"] == 1 and r["stop_reason"] == "epochs"
    assert doc["mean_test_ndcg@10"] == pytest.approx((rows[0]["test_ndcg@10"] + rows[1]["test_ndcg@10"]) / 2)
    # seeds change the initialisation, so two seeds give two different teachers
    w0, w1 = (json.loads((work / f"seed-{s}" / "training_summary.json").read_text())["history"][0]["loss"]
              for s in (0, 1))
    assert w0 != w1
    assert (out / "teacher_seeds.md").read_text().count("\n| ") == 3 and (out / "teacher_seeds.png").stat().st_size
    # a second call with the same config reuses the trained teachers instead of training again
    stamp = (work / "seed-0" / "training_summary.json").stat().st_mtime_ns
    again = teacher_seeds.run(str(config_file), [0], out, work, [])
    assert (work / "seed-0" / "training_summary.json").stat().st_mtime_ns == stamp
    assert again["seeds"][0]["test_ndcg@10"] == rows[0]["test_ndcg@10"]
    # another config is another teacher: retrained, not reused
    teacher_seeds.run(str(config_file), [0], out, work, ["teacher.train.lr=0.002"])
    assert (work / "seed-0" / "training_summary.json").stat().st_mtime_ns != stamp
    assert rows[0]["valid_raw_ndcg@10"] is None and "raw weights" not in (out / "teacher_seeds.md").read_text()
    # with weight averaging the raw weights' validation is reported beside the average's
    averaged = teacher_seeds.run(str(config_file), [0], out, work, ["teacher.train.ema_decay=0.9"])["seeds"][0]
    history = json.loads((work / "seed-0" / "training_summary.json").read_text())["history"]
    assert averaged["valid_raw_ndcg@10"] == max(h["valid_raw"]["ndcg@10"] for h in history)
    assert "valid, raw weights" in (out / "teacher_seeds.md").read_text()


def test_a_bad_override_is_one_line_and_exit_2(tmp_path, config_file, capsys):
    code = teacher_seeds.main(["--config", str(config_file), "--out", str(tmp_path / "o"), "--work",
                               str(tmp_path / "w"), "teacher.train.epochs=0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epochs" in err
