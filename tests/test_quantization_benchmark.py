"""benchmarks/quantization.py on the tiny artifact: every graph judged on validation, scored on
test with a paired interval against float, results JSON + Markdown + plot written; bad input is
one line and exit code 2."""

from __future__ import annotations

import json

from benchmarks.quantization import QuantBenchConfig, main, run
from compressor.quantize_budget import QuantizeConfig

FAST = QuantizeConfig(methods=["int8", "int4"], speed_rounds=1, speed_calls=2, bootstrap_resamples=100)


def test_benchmark_writes_every_method_with_test_quality(tiny_artifact_dir, tmp_path):
    cfg = QuantBenchConfig(artifacts={"teacher": str(tiny_artifact_dir)}, quantization=FAST, test_users=40,
                           note="tiny test artifact")
    res = run(cfg, tmp_path, log=lambda m: None)
    doc = res["models"]["teacher"]
    assert set(doc["methods"]) == {"float", "int8", "int4"}
    assert set(doc["test"]) == {"float", "int8", "int4"}
    b = doc["test"]["int4"]["bootstrap_vs_float"]
    assert b["n_users"] == 40 and b["ci_low"] <= b["mean_diff"] <= b["ci_high"]
    assert "bootstrap_vs_float" not in doc["test"]["float"]
    assert json.loads((tmp_path / "results.json").read_text())["note"] == "tiny test artifact"
    md = (tmp_path / "results.md").read_text()
    assert "agreement_vs_speed.png" in md and "| int4 |" in md and "Test split" in md
    assert (tmp_path / "agreement_vs_speed.png").stat().st_size > 0
    assert not list(tmp_path.glob(".work-*"))  # graphs are scratch


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--artifact", "nolabel", "--out", str(tmp_path)]) == 2
    assert main(["--artifact", f"s={tmp_path / 'missing'}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("benchmarks.quantization: error:") for e in err), err
