"""The compression job: `run(cfg, run_dir)` makes one call per stage, in the order data flows.

    teacher -> importance -> truncate -> prune (optional) -> lowrank (optional) -> distill -> export
        -> evaluate -> speed -> report

Each stage writes its outputs into the run directory (atomically) and then a record
`stages/<name>.json` holding a fingerprint of its configuration and of its inputs' records.
A rerun skips a stage whose record matches and whose outputs are intact; a stage killed midway
left no record, so it runs again (distillation resumes from its checkpoint).

Layout (imports go one way, config <- context <- stages <- this module; tests/test_pipeline.py checks it):
    config.py    RunConfig and its sections
    context.py   Context, StageRecord, StageResult, run_stage (fingerprints, skipping)
    stages.py    the stage bodies, each returning a small typed result

Run directory:
    config.yaml             the resolved configuration
    models/teacher/         teacher checkpoint (absent when `teacher.path` names one)
    models/truncated/       the selected teacher layers, untrained
    models/pruned/          after width pruning (only when pruning is on)
    models/lowrank/         after low-rank factorization (only when lowrank.ratio or .energy is set)
    distill/                distillation log, checkpoint and the distilled student checkpoint
    importance/             importance.json + plots
    teacher/, student/      artifact directories (ONNX + embeddings + manifest): what serving loads
    evaluation.json, speed.json, report.md, report.json, *.png
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from compressor import distributed as dist
from compressor.config import dump_config
from compressor.errors import CompressorError
from compressor.pipeline import stages
from compressor.pipeline.config import (
    DataConfig,
    DistillSection,
    EvaluateConfig,
    RunConfig,
    SelectionConfig,
    SpeedConfig,
    TeacherSection,
    teacher_shape_problem,
)
from compressor.pipeline.context import (
    LOG,
    Context,
    StageRecord,
    StageResult,
    record_path,
    run_stage,
)

STAGES = ("teacher", "importance", "truncate", "prune", "lowrank", "distill", "export", "evaluate", "speed", "report")


def run(cfg: RunConfig, run_dir: str | Path, log: Callable[[str], None] = LOG,
        force: list[str] | None = None) -> dict[str, StageRecord]:
    """Run (or resume) the whole job into `run_dir`; returns each stage's record.

    A failure before the first stage finishes removes a run directory this call created, so a
    bad input never leaves a half-written one behind."""
    run_dir = Path(run_dir)
    for name in force or []:
        if name not in STAGES:
            raise CompressorError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    created = not run_dir.exists()
    dist.barrier()  # every rank has looked before any creates it
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, run_dir, log=log)
    try:
        return _run_stages(ctx, force)
    except Exception:
        if created and not ctx.records:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run_stages(ctx: Context, force: list[str] | None) -> dict[str, StageRecord]:
    cfg, run_dir = ctx.cfg, ctx.run_dir

    def prepare() -> None:
        for name in force or []:
            record_path(run_dir, name).unlink(missing_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    dist.on_main(prepare)  # under torchrun: rank 0 writes, the others wait
    run_stage(ctx, "teacher", cfg.teacher.model_dump(mode="json") | {"data": cfg.data.model_dump()}, [], stages.stage_teacher)
    needs_importance = cfg.selection.layers is None
    if needs_importance:
        run_stage(ctx, "importance", cfg.importance, ["teacher"], stages.stage_importance)
    run_stage(ctx, "truncate", cfg.selection, ["teacher", "importance"], stages.stage_truncate)
    if cfg.prune.structured or cfg.prune.sparsity > 0:
        run_stage(ctx, "prune", cfg.prune, ["truncate"], stages.stage_prune)
    if cfg.lowrank.enabled:
        run_stage(ctx, "lowrank", cfg.lowrank, ["truncate", "prune"], stages.stage_lowrank)
    run_stage(ctx, "distill", cfg.distill, ["teacher", "importance", "truncate", "prune", "lowrank"],
              stages.stage_distill)
    run_stage(ctx, "export", cfg.export, ["teacher", "distill"], stages.stage_export)
    run_stage(ctx, "evaluate", cfg.evaluate, ["export"], stages.stage_evaluate)
    run_stage(ctx, "speed", cfg.speed, ["export"], stages.stage_speed)
    run_stage(ctx, "report", {}, list(STAGES[:-1]), stages.stage_report)
    return ctx.records


__all__ = [
    "STAGES", "Context", "DataConfig", "DistillSection", "EvaluateConfig", "RunConfig", "SelectionConfig",
    "SpeedConfig", "StageRecord", "StageResult", "TeacherSection", "run", "run_stage", "teacher_shape_problem",
]
