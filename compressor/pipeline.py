"""The compression job: `run(cfg, run_dir)` makes one call per stage, in the order data flows.

    teacher -> importance -> truncate -> prune (optional) -> lowrank (optional) -> distill -> export
        -> evaluate -> speed -> report

Each stage writes its outputs into the run directory (atomically) and then a record
`stages/<name>.json` holding a fingerprint of its configuration and of its inputs' records.
A rerun skips a stage whose record matches and whose outputs are intact; a stage killed midway
left no record, so it runs again (distillation resumes from its checkpoint).

Stage bodies live in `compressor.stages`.

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

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compressor import distributed as dist
from compressor import stages
from compressor.config import dump_config
from compressor.data.protocol import RecData, prepare
from compressor.distill.config import DistillConfig
from compressor.errors import ArtifactError, CompressorError
from compressor.export import ExportConfig
from compressor.importance import ImportanceConfig
from compressor.lowrank import LowRankConfig
from compressor.modeling import is_model_dir
from compressor.prune import PruneConfig
from compressor.select import SELECTION, VALIDATED, validate_layers
from compressor.teacher import TeacherConfig

LOG = logging.getLogger("compressor").info
STAGES = ("teacher", "importance", "truncate", "prune", "lowrank", "distill", "export", "evaluate", "speed", "report")
# Under torchrun these stages run on every rank (data-parallel inside); the others on rank 0 alone.
DATA_PARALLEL_STAGES = ("teacher", "importance", "distill")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("ml-latest-small", description="bundled name, downloadable MovieLens name, or a path")
    format: str = Field("auto", description="auto, ml-latest, ml-100k, ml-1m or generic")
    max_users: int | None = Field(None, ge=3, description="keep only the first N users (by id): quick runs")

    @field_validator("name")
    @classmethod
    def _known_data(cls, v: str) -> str:
        """A name that is neither known nor a path fails here, not after the run directory exists."""
        from compressor.data.loaders import BUNDLED, DOWNLOADS

        if v not in BUNDLED and v not in DOWNLOADS and not Path(v).expanduser().exists():
            raise ValueError(f"no such dataset or path: {v} (names: {', '.join([*BUNDLED, *DOWNLOADS])})")
        return v

    def load(self, vocab=None) -> RecData:
        from compressor.data import load_interactions

        inter = load_interactions(self.name, self.format)
        if self.max_users is not None:
            users = sorted(inter.events["user"].unique())[: self.max_users]
            inter.events = inter.events[inter.events["user"].isin(users)].reset_index(drop=True)
        return prepare(inter, vocab=vocab)


def teacher_shape_problem(cfg: TeacherConfig) -> str | None:
    """Why the Hugging Face config of `cfg` could not be built, or None. The same builder training
    uses runs here, at config load, so a bad shape (hidden size not divisible by heads, an odd
    RoPE head size, ...) fails before data is read or a directory is written."""
    from compressor.teacher import build_hf_config

    if cfg.pretrained:
        return None  # the pretrained model's own sizes are used
    try:
        build_hf_config(cfg, vocab_size=16)
    except Exception as e:  # ValueError, HF's StrictDataclass...Error: whatever the builder rejects
        return " ".join(str(e).split())[:300] or type(e).__name__
    kv = cfg.num_kv_heads
    if kv is not None and cfg.architecture != "gpt2" and cfg.num_heads % kv:  # HF does not check this
        return f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {kv}"
    return None


class TeacherStage(TeacherConfig):
    path: str | None = Field(None, description="use this trained teacher model dir instead of training one")

    @model_validator(mode="after")
    def _buildable(self) -> TeacherStage:
        if self.path is None and (problem := teacher_shape_problem(self)):
            raise ValueError(problem)
        return self


class SelectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: int = Field(2, ge=1, description="decoder layers the student keeps")
    method: str = Field("fisher", description="importance method whose scores choose the layers")
    strategy: str = Field("top_k", description="selection strategy (top_k, distributed, strategic, hybrid), "
                          "or validated: the best of the `candidates` sets on the validation split")
    candidates: list[str] = Field(default_factory=lambda: list(SELECTION),
                                  description="strategies whose sets `validated` compares")
    layers: list[int] | None = Field(None, description="explicit teacher layers; overrides keep/method/strategy")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v != VALIDATED and v not in SELECTION:
            raise ValueError(f"unknown selection strategy {v!r}; choose one of {', '.join([*SELECTION, VALIDATED])}")
        return v

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v: list[str]) -> list[str]:
        if not v or any(c not in SELECTION for c in v):
            raise ValueError(f"candidates {v}: give one or more of {', '.join(SELECTION)}")
        return v


class DistillStage(DistillConfig):
    enabled: bool = Field(True, description="false: the student is the truncated (and pruned) model as is")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    baselines: list[str] = Field(default_factory=lambda: ["mostpop", "ease"])
    bootstrap_resamples: int = Field(2000, ge=100)

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        from compressor.baselines import BASELINES

        if bad := [b for b in v if b not in BASELINES]:
            raise ValueError(f"unknown baseline {bad[0]!r}; choose from {', '.join(sorted(BASELINES))}")
        return v


class SpeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    rounds: int = Field(5, ge=1, description="interleaved rounds; the median of all calls is reported")
    calls_per_round: int = Field(20, ge=1)
    threads: int | None = Field(None, description="ONNX Runtime intra-op threads; None = runtime default")


class RunConfig(BaseModel):
    """Everything the job does, one section per stage; `configs/default.yaml` shows every default."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    teacher: TeacherStage = TeacherStage()
    importance: ImportanceConfig = ImportanceConfig()
    selection: SelectionConfig = SelectionConfig()
    prune: PruneConfig = Field(PruneConfig(), description="width pruning of the student; all ratios 0 = off")
    lowrank: LowRankConfig = Field(LowRankConfig(), description="low-rank factorization after pruning; "
                                   "ratio and energy null = off")
    distill: DistillStage = DistillStage()
    export: ExportConfig = Field(ExportConfig(), description="export.quantize: int8|fp16 adds a quantized graph")
    evaluate: EvaluateConfig = EvaluateConfig()
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """Cross-stage checks that would otherwise fail only when their stage runs."""
        t = self.teacher
        if t.path is None and t.pretrained is None:  # the teacher's shape is known now
            n = t.num_layers
            if self.selection.layers is None and not 1 <= self.selection.keep < n:
                raise ValueError(f"selection.keep {self.selection.keep}: must be between 1 and {n - 1} "
                                 f"for a {n}-layer teacher")
            if self.selection.layers is not None:
                try:  # the truncate stage's own check (range, order, duplicates, removes something)
                    validate_layers(self.selection.layers, n)
                except CompressorError as e:
                    raise ValueError(f"selection.layers: {e}") from e
            if self.prune.heads > 0 and t.architecture == "gpt2":
                raise ValueError("prune.heads: GPT-2 derives the head size from n_embd / n_head, so its heads "
                                 "cannot be pruned; prune mlp channels instead")
        return self


@dataclass
class StageRecord:
    """What a finished stage left: its fingerprint, outputs (paths relative to the run dir), summary."""

    name: str
    fingerprint: str
    seconds: float
    outputs: dict[str, str]
    summary: dict = field(default_factory=dict)
    skipped: bool = False
    finished_at: str = ""

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "skipped"}


@dataclass
class Context:
    """Shared state of one run: config, run dir, prepared data, finished stage records."""

    cfg: RunConfig
    run_dir: Path
    records: dict[str, StageRecord] = field(default_factory=dict)
    _data: RecData | None = None
    log: Callable[[str], None] = LOG
    fingerprint: str | None = None  # of the stage running now

    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def work_dir(self, rel: str) -> Path:
        """The running stage's resumable working directory: kept after a kill (same fingerprint,
        so a checkpoint in it resumes), emptied when the fingerprint changed, since partial work
        there then belongs to another configuration or another input."""
        d = self.path(rel)

        def prepare() -> None:
            marker = d / ".stage_fingerprint"
            if d.exists() and (not marker.exists() or marker.read_text() != self.fingerprint):
                self.log(f"{d}: partial work from another configuration or input, starting over")
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            marker.write_text(self.fingerprint or "")

        dist.on_main(prepare)  # under torchrun: rank 0 prepares it while the others wait
        return d

    def output(self, stage: str, key: str) -> Path:
        return self.path(self.records[stage].outputs[key])

    @property
    def data(self) -> RecData:
        if self._data is None:
            from compressor.data import ItemVocab

            vocab = ItemVocab.load(self.output("teacher", "model")) if "teacher" in self.records else None
            self._data = self.cfg.data.load(vocab)
        return self._data

    @property
    def max_len(self) -> int:
        return int(self.records["teacher"].summary["max_len"])


def _fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_path(run_dir: Path, name: str) -> Path:
    return run_dir / "stages" / f"{name}.json"


def _load_record(run_dir: Path, name: str) -> StageRecord | None:
    p = _record_path(run_dir, name)
    if not p.exists():
        return None
    try:
        raw = json.loads(p.read_text())
        return StageRecord(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ArtifactError(f"{p}: corrupt stage record ({e}); delete it to rerun the stage") from e


def _outputs_intact(ctx: Context, rec: StageRecord) -> None:
    """Raise ArtifactError when a finished stage's outputs are gone or damaged."""
    from compressor.artifact import verify_artifact

    for key, rel in rec.outputs.items():
        p = ctx.path(rel) if not Path(rel).is_absolute() else Path(rel)
        if not p.exists():
            raise ArtifactError(f"{p}: output {key!r} of finished stage {rec.name!r} is missing")
        if p.is_dir() and (p / "manifest.json").exists():
            verify_artifact(p)
        elif p.is_dir() and (p / "config.json").exists() and not is_model_dir(p):
            raise ArtifactError(f"{p}: model directory of stage {rec.name!r} lacks its item vocabulary")


def run_stage(ctx: Context, name: str, config: BaseModel | dict | None, upstream: list[str],
              fn: Callable[[Context], tuple[dict[str, str], dict]]) -> StageRecord:
    """Run `fn` unless a record with the same fingerprint exists and its outputs are intact."""
    cfg_json = config.model_dump(mode="json") if isinstance(config, BaseModel) else (config or {})
    fp = _fingerprint({"stage": name, "config": cfg_json,
                       "upstream": {u: ctx.records[u].fingerprint for u in upstream if u in ctx.records}})
    old = _load_record(ctx.run_dir, name)
    if old is not None and old.fingerprint == fp:
        try:
            _outputs_intact(ctx, old)
        except ArtifactError as e:
            raise ArtifactError(f"{e}; the run directory is damaged: rerun with --force {name} "
                                "(or delete the run directory)") from e
        old.skipped = True
        ctx.records[name] = old
        ctx.log(f"[{name}] up to date, skipped")
        return old
    ctx.log(f"[{name}] running")
    ctx.fingerprint = fp
    t0 = time.time()
    outputs, summary = fn(ctx) if name in DATA_PARALLEL_STAGES else dist.on_main(fn, ctx)
    rec = StageRecord(name, fp, round(time.time() - t0, 2), outputs, summary,
                      finished_at=datetime.now(UTC).isoformat(timespec="seconds"))
    rec = dist.on_main(_save_record, ctx.run_dir, rec)  # every rank holds rank 0's record
    ctx.records[name] = rec
    ctx.log(f"[{name}] done in {rec.seconds:.1f} s")
    return rec


def _save_record(run_dir: Path, rec: StageRecord) -> StageRecord:
    p = _record_path(run_dir, rec.name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec.to_json(), indent=2, default=str))
    tmp.replace(p)
    return rec


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
            _record_path(run_dir, name).unlink(missing_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    dist.on_main(prepare)  # under torchrun: rank 0 writes, the others wait
    run_stage(ctx, "teacher", cfg.teacher.model_dump(mode="json") | {"data": cfg.data.model_dump()}, [], stages.stage_teacher)
    needs_importance = cfg.selection.layers is None
    if needs_importance:
        run_stage(ctx, "importance", cfg.importance, ["teacher"], stages.stage_importance)
    run_stage(ctx, "truncate", cfg.selection, ["teacher", "importance"], stages.stage_truncate)
    if cfg.prune.heads > 0 or cfg.prune.mlp > 0 or cfg.prune.sparsity > 0:
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
