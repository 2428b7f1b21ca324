"""The compression job: `run(cfg, run_dir)` makes one call per stage, in the order data flows.

    teacher -> importance -> truncate -> prune (optional) -> distill -> export -> evaluate -> speed -> report

Each stage writes its outputs into the run directory (atomically) and then a record
`stages/<name>.json` holding a fingerprint of its configuration and of its inputs' records.
A rerun skips a stage whose record matches and whose outputs are intact; a stage killed midway
left no record, so it runs again (distillation resumes from its checkpoint).

Run directory:
    config.yaml             the resolved configuration
    models/teacher/         teacher checkpoint (absent when `teacher.path` names one)
    models/truncated/       the selected teacher layers, untrained
    models/pruned/          after width pruning (only when pruning is on)
    distill/                distillation log, checkpoint and the distilled student checkpoint
    importance/             importance.json + plots
    teacher/, student/      artifact directories (ONNX + embeddings + manifest): what serving loads
    evaluation.json, speed.json, report.md, report.json, *.png
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from compressor.config import dump_config
from compressor.data.protocol import RecData, prepare
from compressor.distill.config import DistillConfig
from compressor.errors import ArtifactError, CompressorError
from compressor.export import ExportConfig
from compressor.importance import ImportanceConfig
from compressor.modeling import is_model_dir
from compressor.prune import PruneConfig
from compressor.teacher import TeacherConfig

STAGES = ("teacher", "importance", "truncate", "prune", "distill", "export", "evaluate", "speed", "report")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("ml-latest-small", description="bundled name, downloadable MovieLens name, or a path")
    format: str = Field("auto", description="auto, ml-latest, ml-100k, ml-1m or generic")
    max_users: int | None = Field(None, ge=3, description="keep only the first N users (by id): quick runs")

    def load(self, vocab=None) -> RecData:
        from compressor.data import load_interactions

        inter = load_interactions(self.name, self.format)
        if self.max_users is not None:
            users = sorted(inter.events["user"].unique())[: self.max_users]
            inter.events = inter.events[inter.events["user"].isin(users)].reset_index(drop=True)
        return prepare(inter, vocab=vocab)


class TeacherStage(TeacherConfig):
    path: str | None = Field(None, description="use this trained teacher model dir instead of training one")


class SelectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: int = Field(2, ge=1, description="decoder layers the student keeps")
    method: str = Field("fisher", description="importance method whose scores choose the layers")
    strategy: str = Field("top_k", description="selection strategy (top_k, distributed, strategic, hybrid)")
    layers: list[int] | None = Field(None, description="explicit teacher layers; overrides keep/method/strategy")


class DistillStage(DistillConfig):
    enabled: bool = Field(True, description="false: the student is the truncated (and pruned) model as is")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    baselines: list[str] = Field(default_factory=lambda: ["mostpop", "ease"])
    bootstrap_resamples: int = Field(2000, ge=100)


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
    distill: DistillStage = DistillStage()
    export: ExportConfig = Field(ExportConfig(), description="export.quantize: int8|fp16 adds a quantized graph")
    evaluate: EvaluateConfig = EvaluateConfig()
    speed: SpeedConfig = SpeedConfig()


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
    log: Callable[[str], None] = print

    def path(self, rel: str) -> Path:
        return self.run_dir / rel

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
    t0 = time.time()
    outputs, summary = fn(ctx)
    rec = StageRecord(name, fp, round(time.time() - t0, 2), outputs, summary,
                      finished_at=datetime.now(UTC).isoformat(timespec="seconds"))
    p = _record_path(ctx.run_dir, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec.to_json(), indent=2, default=str))
    tmp.replace(p)
    ctx.records[name] = rec
    ctx.log(f"[{name}] done in {rec.seconds:.1f} s")
    return rec


# ---------------------------------------------------------------- stages


def stage_teacher(ctx: Context) -> tuple[dict, dict]:
    from compressor.modeling import load_model, recsys_meta
    from compressor.teacher import SUMMARY_FILE, train_teacher

    tcfg = ctx.cfg.teacher
    if tcfg.path:
        src = Path(tcfg.path).expanduser().resolve()
        model, _ = load_model(src)
        meta = recsys_meta(model)
        summary_file = src / SUMMARY_FILE
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        return {"model": str(src)}, {"max_len": meta.get("max_len", tcfg.max_len),
                                     "num_layers": model.config.num_hidden_layers, "given": True,
                                     "seconds_per_epoch": summary.get("seconds_per_epoch")}
    data = ctx.cfg.data.load()
    ctx._data = data
    out = ctx.path("models/teacher")
    model, summary = train_teacher(data, TeacherConfig(**tcfg.model_dump(exclude={"path"})), out)
    keep = ("epochs_run", "stop_reason", "best_valid", "train_seconds", "seconds_per_epoch", "parameters")
    return {"model": "models/teacher"}, {"max_len": tcfg.max_len, "num_layers": tcfg.num_layers,
                                         **{k: summary[k] for k in keep}}


def stage_importance(ctx: Context) -> tuple[dict, dict]:
    from compressor.importance import run_importance, write_importance
    from compressor.modeling import load_model

    model, _ = load_model(ctx.output("teacher", "model"))
    cfg = ctx.cfg.importance
    if cfg.keep is None:
        cfg = cfg.model_copy(update={"keep": [ctx.cfg.selection.keep]})
    result = run_importance(model, ctx.data, cfg, ctx.max_len)
    write_importance(result, ctx.path("importance"))
    return {"importance": "importance/importance.json"}, {
        "spearman_vs_ablation": result.spearman,
        "seconds": {n: s.seconds for n, s in result.methods.items()},
    }


def choose_layers(ctx: Context) -> tuple[list[int], dict]:
    """The teacher layers the student keeps, and why."""
    from compressor.importance import load_importance, method_scores
    from compressor.select import select_layers, validate_keep, validate_layers

    sel = ctx.cfg.selection
    L = int(ctx.records["teacher"].summary["num_layers"])
    if sel.layers is not None:
        return validate_layers(sel.layers, L), {"chosen_by": "explicit list"}
    validate_keep(sel.keep, L)
    doc = load_importance(ctx.output("importance", "importance"))
    layers = select_layers(sel.strategy, method_scores(doc, sel.method), sel.keep)
    return layers, {"chosen_by": f"{sel.strategy} over {sel.method} importance", "method": sel.method,
                    "strategy": sel.strategy}


def stage_truncate(ctx: Context) -> tuple[dict, dict]:
    from compressor.truncate import truncate_dir

    layers, why = choose_layers(ctx)
    truncate_dir(ctx.output("teacher", "model"), ctx.path("models/truncated"), layers, why)
    return {"model": "models/truncated"}, {"layers": layers, **why}


def stage_prune(ctx: Context) -> tuple[dict, dict]:
    from compressor.prune import REPORT_FILE, prune_dir

    out = prune_dir(ctx.output("truncate", "model"), ctx.path("models/pruned"), ctx.cfg.prune, ctx.data)
    report = json.loads((out / REPORT_FILE).read_text())
    keep = ("params_before", "params_after", "nonzero_params_after", "sparsity", "scorer", "seconds")
    return {"model": "models/pruned"}, {k: report.get(k) for k in keep}


def _student_input(ctx: Context) -> Path:
    return ctx.output("prune", "model") if "prune" in ctx.records else ctx.output("truncate", "model")


def stage_distill(ctx: Context) -> tuple[dict, dict]:
    from compressor.distill import distill
    from compressor.modeling import load_model

    src = _student_input(ctx)
    if not ctx.cfg.distill.enabled:
        return {"model": str(src.relative_to(ctx.run_dir))}, {"method": None}
    teacher, _ = load_model(ctx.output("teacher", "model"))
    student, _ = load_model(src)
    cfg = DistillConfig(**ctx.cfg.distill.model_dump(exclude={"enabled"}))
    importance = None
    if "importance" in ctx.records:
        from compressor.importance import load_importance

        importance = load_importance(ctx.output("importance", "importance"))
    result = distill(teacher, student, ctx.data, cfg, ctx.path("distill"), importance=importance,
                     max_len=ctx.max_len, resume=True)
    summary = {k: v for k, v in result.to_json().items() if k not in ("log_path", "model_dir")}
    return {"model": str(result.model_dir.relative_to(ctx.run_dir)),
            "log": str(result.log_path.relative_to(ctx.run_dir))}, summary


def stage_export(ctx: Context) -> tuple[dict, dict]:
    from compressor.export import export_artifact

    cfg = ctx.cfg.export
    out, parity = {}, {}
    for name, src in (("teacher", ctx.output("teacher", "model")), ("student", ctx.output("distill", "model"))):
        res = export_artifact(src, ctx.path(name), ctx.data, cfg)
        out[name] = name
        parity[name] = res.parity
    return out, {"parity": parity}


def stage_evaluate(ctx: Context) -> tuple[dict, dict]:
    """Test metrics of every model the run made, the baselines, the served ONNX graphs, and
    paired bootstraps of the student against the teacher and the truncated floor."""
    from compressor.baselines import evaluate_baseline
    from compressor.evaluate import (
        artifact_scorer,
        evaluate_model,
        evaluate_scorer,
        paired_bootstrap,
    )
    from compressor.modeling import count_parameters, load_model

    test = ctx.data.split("test")
    models = {"teacher": ctx.output("teacher", "model"), "truncated": ctx.output("truncate", "model")}
    if "prune" in ctx.records:
        models["pruned"] = ctx.output("prune", "model")
    models["student"] = ctx.output("distill", "model")
    results, per_user, params = {}, {}, {}
    for name, path in models.items():
        model, _ = load_model(path)
        res = evaluate_model(model, test, ctx.max_len)
        results[name], per_user[name], params[name] = res.metrics, res.per_user["ndcg@10"], count_parameters(model)
    for name in ctx.cfg.evaluate.baselines:
        res, info = evaluate_baseline(name, ctx.data, "test")
        results[name], per_user[name] = {**res.metrics, **({"fit": info} if info else {})}, res.per_user["ndcg@10"]
    for art in ("teacher", "student"):
        manifest = json.loads(ctx.path(f"{art}/manifest.json").read_text())
        for onnx_file in manifest["onnx_files"]:
            if not onnx_file.endswith(".onnx"):
                continue
            scorer, _ = artifact_scorer(ctx.path(art), onnx_file)
            key = f"{art}:{onnx_file}"
            res = evaluate_scorer(scorer, test)
            results[key], per_user[key] = res.metrics, res.per_user["ndcg@10"]
    n = ctx.cfg.evaluate.bootstrap_resamples
    pairs = [("student", "teacher"), ("student", "truncated"), ("teacher", "ease"), ("student", "ease")]
    boot = {f"{a} - {b}": paired_bootstrap(per_user[a], per_user[b], n) for a, b in pairs
            if a in per_user and b in per_user}
    teacher_ndcg = results["teacher"]["ndcg@10"]
    retention = {k: v["ndcg@10"] / teacher_ndcg for k, v in results.items() if teacher_ndcg > 0}
    doc = {"split": "test", "users": len(test), "metrics": results, "parameters": params,
           "retention_ndcg@10": retention, "bootstrap_ndcg@10": boot,
           "per_user_ndcg@10": {k: v.tolist() for k, v in per_user.items()}}
    _write_json(ctx.path("evaluation.json"), doc)
    return {"evaluation": "evaluation.json"}, {"retention_ndcg@10": retention.get("student"),
                                               "student_ndcg@10": results["student"]["ndcg@10"]}


def stage_speed(ctx: Context) -> tuple[dict, dict]:
    from compressor.speed import compare_latency, machine_info

    cfg = ctx.cfg.speed
    graphs = {}
    for art in ("teacher", "student"):
        manifest = json.loads(ctx.path(f"{art}/manifest.json").read_text())
        for onnx_file in manifest["onnx_files"]:
            if onnx_file.endswith(".onnx"):
                tag = onnx_file.removeprefix("model").removesuffix(".onnx").lstrip(".")
                graphs[art + (f" ({tag})" if tag else "")] = ctx.path(art) / onnx_file
    hists = ctx.data.split("test").histories
    timing = compare_latency(graphs, hists, ctx.max_len, tuple(cfg.batch_sizes), cfg.rounds,
                             cfg.calls_per_round, cfg.threads)
    ratios = {}
    for name in timing:
        if name == "teacher":
            continue
        ratios[name] = {
            f"batch_{b}": {
                "latency_speedup": timing["teacher"][f"batch_{b}"]["ms_median"] / timing[name][f"batch_{b}"]["ms_median"],
                "throughput_ratio": timing[name][f"batch_{b}"]["per_second"] / timing["teacher"][f"batch_{b}"]["per_second"],
            }
            for b in cfg.batch_sizes
        }
    doc = {"machine": machine_info(), "max_len": ctx.max_len, "timing": timing, "vs_teacher": ratios,
           "method": f"ONNX Runtime, real test histories, {cfg.rounds} interleaved rounds x "
                     f"{cfg.calls_per_round} calls per model and batch size, median"}
    _write_json(ctx.path("speed.json"), doc)
    return {"speed": "speed.json"}, {"vs_teacher": ratios}


def stage_report(ctx: Context) -> tuple[dict, dict]:
    from compressor.report import write_report

    files = write_report(ctx.run_dir, ctx.cfg, ctx.records)
    return {"report": "report.md", "report_json": "report.json"}, {"files": files}


def _write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def run(cfg: RunConfig, run_dir: str | Path, log: Callable[[str], None] = print,
        force: list[str] | None = None) -> dict[str, StageRecord]:
    """Run (or resume) the whole job into `run_dir`; returns each stage's record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in force or []:
        if name not in STAGES:
            raise CompressorError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        _record_path(run_dir, name).unlink(missing_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    ctx = Context(cfg, run_dir, log=log)
    run_stage(ctx, "teacher", cfg.teacher.model_dump(mode="json") | {"data": cfg.data.model_dump()}, [], stage_teacher)
    needs_importance = cfg.selection.layers is None
    if needs_importance:
        run_stage(ctx, "importance", cfg.importance, ["teacher"], stage_importance)
    run_stage(ctx, "truncate", cfg.selection, ["teacher", "importance"], stage_truncate)
    if cfg.prune.heads > 0 or cfg.prune.mlp > 0 or cfg.prune.sparsity > 0:
        run_stage(ctx, "prune", cfg.prune, ["truncate"], stage_prune)
    run_stage(ctx, "distill", cfg.distill, ["teacher", "importance", "truncate", "prune"], stage_distill)
    run_stage(ctx, "export", cfg.export, ["teacher", "distill"], stage_export)
    run_stage(ctx, "evaluate", cfg.evaluate, ["export"], stage_evaluate)
    run_stage(ctx, "speed", cfg.speed, ["export"], stage_speed)
    run_stage(ctx, "report", {}, list(STAGES[:-1]), stage_report)
    return ctx.records
