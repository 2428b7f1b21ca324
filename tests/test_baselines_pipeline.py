"""The evaluate stage's EASE guard in a real run: past `evaluate.ease_max_items` the stage skips
EASE with one line saying why, and the report says so."""

from __future__ import annotations

import json
import shutil

from tests.conftest import smoke_config


def test_a_catalogue_past_the_ease_budget_skips_ease_and_the_report_says_why(smoke_run, tmp_path):
    from compressor.pipeline import run

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    lines: list[str] = []
    cfg = smoke_config("evaluate.baselines=[mostpop,ease]", "evaluate.ease_max_items=10")
    records = run(cfg, run_dir, log=lines.append)
    assert records["teacher"].skipped and not records["evaluate"].skipped
    said = [m for m in lines if "EASE skipped" in m]
    assert len(said) == 1 and "> evaluate.ease_max_items 10 " in said[0]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert "ease" not in evaluation["metrics"] and "mostpop" in evaluation["metrics"]
    assert evaluation["baselines_skipped"]["ease"].startswith("EASE skipped:")
    assert "Baseline not run: EASE skipped:" in (run_dir / "report.md").read_text()
