"""The whole job on the smoke config: artifacts, report, skipping, resuming, damaged run dirs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compressor.artifact import verify_artifact
from compressor.cli import main
from compressor.config import load_config
from compressor.errors import ArtifactError, CompressorError
from compressor.pipeline import STAGES, RunConfig, run
from tests.conftest import SMOKE, SMOKE_FAST, smoke_config

FAST = SMOKE_FAST
_cfg = smoke_config


def test_smoke_run_writes_verified_artifacts_and_a_measured_report(smoke_run):
    run_dir, records = smoke_run
    assert set(records) == set(STAGES)
    teacher, student = verify_artifact(run_dir / "teacher"), verify_artifact(run_dir / "student")
    assert student["num_layers"] == 2 and teacher["num_layers"] == 4
    assert student["parameters"] < teacher["parameters"]  # layers dropped and heads/channels pruned
    # a narrower student (prune.hidden): served with its own 16-wide item table, distilled through
    # learned Adapt projections to the teacher's 32-wide hidden states
    assert np.load(run_dir / "student" / "item_embeddings.npy").shape[1] == 16
    assert np.load(run_dir / "teacher" / "item_embeddings.npy").shape[1] == 32
    assert "model.int8.onnx" in student["onnx_files"]
    assert student["parity"]["model.onnx"]["max_abs_diff"] <= 1e-4
    report = json.loads((run_dir / "report.json").read_text())
    metrics = report["evaluation"]["metrics"]
    assert {"teacher", "truncated", "pruned", "lowrank", "student", "mostpop", "student:model.int8.onnx"} <= set(metrics)
    assert student["recsys"]["lowrank"]["ranks"]  # the factorized student went through distil and export
    # The exported float graph ranks exactly as the PyTorch student does.
    assert metrics["student:model.onnx"]["ndcg@10"] == pytest.approx(metrics["student"]["ndcg@10"], abs=1e-3)
    # every served graph timed at every batch size, the ratios computed from those medians (the
    # speedup itself depends on the machine's load, so it is not asserted here)
    timing = report["speed"]["timing"]
    assert set(timing) == {"teacher", "teacher (int8)", "student", "student (int8)"}  # export.quantize: int8
    assert all(set(t) == {"batch_1", "batch_64"} for t in timing.values())
    for name, batches in report["speed"]["vs_teacher"].items():
        for b, ratio in batches.items():
            assert ratio["latency_speedup"] == pytest.approx(timing["teacher"][b]["ms_median"] / timing[name][b]["ms_median"])
            assert ratio["throughput_ratio"] == pytest.approx(timing[name][b]["per_second"] / timing["teacher"][b]["per_second"])
    md = (run_dir / "report.md").read_text()
    assert "Teacher vs student" in md and "Export parity" in md
    for png in ("quality_vs_size.png", "latency_vs_size.png", "importance_by_method.png", "stage_times.png"):
        assert (run_dir / png).stat().st_size > 1000


def test_the_runs_distill_config_is_what_compressor_distill_reads(smoke_run):
    from compressor.distill.config import DistillConfig

    run_dir, _ = smoke_run
    written = load_config(DistillConfig, run_dir / "distill" / "distill_config.yaml")
    assert written == DistillConfig.model_validate(_distill_section(run_dir))


def _distill_section(run_dir: Path) -> dict:
    """The run's distill section, less the pipeline's own switch."""
    section = load_config(RunConfig, run_dir / "config.yaml").distill.model_dump()
    section.pop("enabled")
    return section


def test_rerun_skips_finished_stages_and_a_changed_stage_reruns_downstream(smoke_run):
    run_dir, first = smoke_run
    again = run(_cfg(), run_dir, log=lambda m: None)
    assert all(r.skipped for r in again.values())
    changed = run(_cfg("speed.rounds=1"), run_dir, log=lambda m: None)
    assert not changed["speed"].skipped and not changed["report"].skipped
    assert changed["distill"].skipped and changed["export"].skipped


def test_damaged_artifact_is_a_clear_error_not_a_silent_reuse(smoke_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir)
    onnx = run_dir / "student" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="model.onnx"):
        run(_cfg(), run_dir, log=lambda m: None)
    code = main(["run", "--config", str(SMOKE), "--out", str(run_dir), *FAST])
    assert code == 2 and "--force export" in capsys.readouterr().err
    # Forcing the damaged stage rebuilds it.
    records = run(_cfg(), run_dir, log=lambda m: None, force=["export"])
    assert not records["export"].skipped
    verify_artifact(run_dir / "student")


def _run_until(run_dir: Path, overrides: list[str], marker: Path) -> None:
    """Start `compressor run` and SIGKILL it as soon as `marker` exists."""
    cmd = [sys.executable, "-m", "compressor.cli", "run", "--config", str(SMOKE), "--out", str(run_dir), *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_run_resumes_and_finishes(tmp_path):
    run_dir = tmp_path / "killed"
    epochs = ["teacher.train.epochs=3", "teacher.train.max_minutes=null"]  # 3 epochs whatever the load
    # killed while the teacher trains, after its first epoch's checkpoint
    _run_until(run_dir, [*FAST, *epochs], run_dir / "checkpoints" / "teacher" / "checkpoint.pt")
    assert not (run_dir / "stages" / "teacher.json").exists()
    # killed again after truncation: the teacher went on from its checkpoint, not from scratch
    _run_until(run_dir, [*FAST, *epochs], run_dir / "stages" / "truncate.json")
    teacher = json.loads((run_dir / "stages" / "teacher.json").read_text())["summary"]
    assert teacher["resumed_from_epoch"] >= 1 and teacher["epochs_run"] == 3
    assert not (run_dir / "checkpoints" / "teacher" / "checkpoint.pt").exists()
    assert not (run_dir / "report.md").exists()
    records = run(_cfg(*epochs), run_dir, log=lambda m: None)
    assert records["teacher"].skipped and records["truncate"].skipped
    assert not records["report"].skipped
    verify_artifact(run_dir / "student")


def test_two_torchrun_processes_write_the_same_layout_and_record_their_world_size(smoke_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m compressor run` (gloo on CPU): teacher, importance and
    distillation data-parallel, the other stages on rank 0; the same files as one process."""
    from tests.test_distributed import torchrun

    run_dir = tmp_path / "two"
    proc = torchrun("-m", "compressor", "run", "--config", str(SMOKE), "--out", str(run_dir), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def layout(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    assert layout(run_dir) == layout(smoke_run[0])
    records = {n: json.loads((run_dir / "stages" / f"{n}.json").read_text()) for n in STAGES}
    assert {n: records[n]["summary"].get("world_size") for n in ("teacher", "importance", "distill")} == \
        {"teacher": 2, "importance": 2, "distill": 2}
    assert records["teacher"]["summary"]["parallel"] == "ddp"
    assert json.loads((run_dir / "importance" / "importance.json").read_text())["methods"]["fisher"]["detail"]["processes"] == 2
    verify_artifact(run_dir / "teacher")
    verify_artifact(run_dir / "student")
    md = (run_dir / "report.md").read_text()
    assert "2 data-parallel processes (ddp)" in md and "2 data-parallel processes, stop" in md
    assert proc.stderr.count("[teacher] running") == 1  # rank 0 reports; rank 1 only warns


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(CompressorError, match="teacher.num_layerz"):
        load_config(RunConfig, SMOKE, ["teacher.num_layerz=3"])
    with pytest.raises(CompressorError, match="unknown stage"):
        run(_cfg(), tmp_path, force=["nope"])
    with pytest.raises(CompressorError, match="keep"):
        run(_cfg("selection.keep=4"), tmp_path / "bad", log=lambda m: None)
    with pytest.raises(CompressorError, match="unknown selection strategy 'best'"):
        load_config(RunConfig, SMOKE, ["selection.strategy=best"])
    with pytest.raises(CompressorError, match="candidates"):
        load_config(RunConfig, SMOKE, ["selection.strategy=validated", "selection.candidates=[top_k,nope]"])


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from a import b` gives a.b
    when a/b.py exists, else a)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if (root / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return found


def test_the_pipeline_package_imports_one_way():
    """config <- context <- stages <- __init__: no module imports one above it, so no circle."""
    package = Path(__file__).resolve().parent.parent / "compressor" / "pipeline"
    above = {"config": {"compressor.pipeline", "compressor.pipeline.context", "compressor.pipeline.stages"},
             "context": {"compressor.pipeline", "compressor.pipeline.stages"},
             "stages": {"compressor.pipeline"}}
    assert {p.stem for p in package.glob("*.py")} == {"__init__", *above}
    for name, forbidden in above.items():
        bad = _imports(package / f"{name}.py") & forbidden
        assert not bad, f"compressor/pipeline/{name}.py imports {sorted(bad)}"
    # nothing below the pipeline imports it (the report reads stage records, not the pipeline)
    for path in (package.parent).rglob("*.py"):
        if package not in path.parents and path.name != "cli.py":
            assert not any(m.startswith("compressor.pipeline") for m in _imports(path)), path
