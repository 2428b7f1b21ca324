"""compressor.report: built from a finished smoke run's stage records and the files they name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressor.config import load_config
from compressor.pipeline import STAGES, RunConfig
from compressor.pipeline.context import load_record
from compressor.pipeline.stages import LayerImportance, TrainedTeacher
from compressor.report import _fmt, _teacher_training_line, collect, render_markdown, write_report


def _config(run_dir: Path) -> RunConfig:
    return load_config(RunConfig, run_dir / "config.yaml")  # the resolved config the run saved


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    """A copy of the smoke run and its records as read back from `stages/` (what a rerun sees)."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    records = {n: r for n in STAGES if (r := load_record(run_dir, n)) is not None}
    return run_dir, records


def test_the_report_shows_what_the_run_measured(run_copy):
    run_dir, records = run_copy
    doc = collect(run_dir, _config(run_dir), records)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert doc["evaluation"]["metrics"] == evaluation["metrics"] and "per_user_ndcg@10" not in doc["evaluation"]
    manifest = json.loads((run_dir / "student" / "manifest.json").read_text())
    assert doc["student"]["parameters"] == manifest["parameters"] and doc["student"]["num_layers"] == 2
    assert doc["selection"]["layers"] == manifest["teacher_layers"] == records["truncate"].summary["layers"]
    assert doc["stage_seconds"] == {n: r.seconds for n, r in records.items()}
    assert set(doc["importance"]["methods"]) == set(json.loads((run_dir / "importance" / "importance.json").read_text())["methods"])
    md = render_markdown(doc)
    student_ndcg = evaluation["metrics"]["student"]["ndcg@10"]
    assert f"| test NDCG@10 | {_fmt(evaluation['metrics']['teacher']['ndcg@10'])} | {_fmt(student_ndcg)} |" in md
    for section in ("## Pruning", "## Low-rank factorization", "## Distillation", "## Which layers matter"):
        assert section in md  # the smoke run prunes, factorizes and distils
    assert "query heads 2 → 1; MLP channels 64 → 48; model width 32 → 16;" in md  # the smoke config's cuts


def test_the_report_reads_paths_from_the_stage_records_not_fixed_names(run_copy):
    """Move evaluation.json and importance/ elsewhere and say so in the records: the report follows."""
    run_dir, records = run_copy
    (run_dir / "elsewhere").mkdir()
    (run_dir / "evaluation.json").rename(run_dir / "elsewhere" / "eval.json")
    shutil.move(run_dir / "importance", run_dir / "elsewhere" / "imp")
    records["evaluate"].outputs["evaluation"] = "elsewhere/eval.json"
    records["importance"].outputs["importance"] = "elsewhere/imp/importance.json"
    files = write_report(run_dir, _config(run_dir), records)
    doc = json.loads((run_dir / "report.json").read_text())
    assert doc["evaluation"]["metrics"]["student"]  # read from the moved file
    assert doc["importance"]["methods"] and "importance_by_method.png" in files
    assert (run_dir / "importance_by_method.png").stat().st_size > 1000


def test_a_run_without_optional_stages_has_no_sections_for_them(run_copy):
    run_dir, records = run_copy
    for optional in ("prune", "lowrank", "importance"):
        records.pop(optional)
    doc = collect(run_dir, _config(run_dir), records)
    assert doc["pruning"] is None and doc["lowrank"] is None and doc["importance"] is None
    md = render_markdown(doc)
    assert "## Pruning" not in md and "## Low-rank" not in md and "## Which layers matter" not in md


def test_typed_results_round_trip_through_the_records(run_copy):
    run_dir, records = run_copy
    teacher = TrainedTeacher.from_record(records["teacher"])
    assert (teacher.model, teacher.num_layers, teacher.max_len) == (Path("models/teacher"), 4, 20)
    assert "device" in teacher.training and "max_len" not in teacher.training
    assert (teacher.outputs(), teacher.summary()) == (records["teacher"].outputs, records["teacher"].summary)
    imp = LayerImportance.from_record(records["importance"])
    assert (imp.outputs(), imp.summary()) == (records["importance"].outputs, records["importance"].summary)


@pytest.mark.parametrize(("value", "text"), [
    (None, "—"), (True, "yes"), (0.123456, "0.1235"), (2e-6, "2.0e-06"), (12345.6, "12,346"), (1234567, "1,234,567"),
    ("top_k", "top_k"),
])
def test_numbers_are_formatted_for_reading(value, text):
    assert _fmt(value) == text


def test_a_teacher_cut_by_the_clock_says_so_loudly():
    line = _teacher_training_line({"epochs_run": 3, "stop_reason": "time cap", "seconds_per_epoch": 12.0,
                                   "device": "cpu (2 threads)"})
    assert line.startswith("Teacher training: 3 epochs (time cap), 12.0 s per epoch on cpu (2 threads).")
    assert "depends on the machine's speed" in line
    assert "machine's speed" not in _teacher_training_line({"epochs_run": 3, "stop_reason": "epochs"})


def test_a_given_teacher_is_reported_as_trained_elsewhere(smoke_run, tmp_path):
    """`teacher.path`: the stage keeps the given model's own training summary, and the report says
    the teacher was not trained in this run."""
    from compressor.pipeline.context import Context
    from compressor.pipeline.stages import stage_teacher
    from tests.conftest import smoke_config

    run_dir, _ = smoke_run
    src = run_dir / "models" / "teacher"
    training = stage_teacher(Context(smoke_config(f"teacher.path={src}"), tmp_path / "run")).training
    summary = json.loads((src / "training_summary.json").read_text())
    assert training["given"] and training["source"] == str(src.resolve())
    assert training["epochs_run"] == summary["epochs_run"] and training["device"] == summary["device"]
    line = _teacher_training_line(training)
    assert line.startswith(f"Teacher given by `teacher.path` ({src.resolve()}), trained elsewhere; its training summary: "
                           f"{summary['epochs_run']} epochs")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "training_summary.json").unlink()
    training = stage_teacher(Context(smoke_config(f"teacher.path={bare}"), tmp_path / "run2")).training
    assert _teacher_training_line(training).endswith("not trained in this run; it has no training summary.")
