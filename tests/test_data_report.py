"""The report states what each data filter removed (read from the teacher stage's record)."""

from __future__ import annotations

import shutil

from compressor.config import load_config
from compressor.pipeline import STAGES, RunConfig
from compressor.pipeline.context import load_record
from compressor.report import collect, render_markdown


def test_the_report_states_each_filter(smoke_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    records = {n: r for n in STAGES if (r := load_record(run_dir, n)) is not None}
    assert records["teacher"].summary["data_filters"] == []  # the smoke data has no repeats, no filter set
    records["teacher"].summary["data_filters"] = [
        {"filter": "rating >= 4", "removed_interactions": 1200, "removed_users": 3, "removed_items": 450,
         "left_interactions": 8800}]
    md = render_markdown(collect(run_dir, load_config(RunConfig, run_dir / "config.yaml"), records))
    assert ("Data filter rating >= 4: removed 1,200 interactions, 3 users and 450 items (8,800 left)." in md)
    assert "seen items excluded" in md
