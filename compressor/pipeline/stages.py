"""The stages of the compression job, one function each: `fn(ctx) -> <its result dataclass>`.

A result's `output()` fields are the paths later stages read (relative to the run directory); the
rest is what the stage record keeps for the report. Order, fingerprints and skipping live in
`compressor.pipeline` and `compressor.pipeline.context`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compressor.artifact import load_manifest
from compressor.atomic import atomic_write_json
from compressor.baselines import ease_skip_reason
from compressor.compare import evaluate_named
from compressor.data import ItemVocab
from compressor.data.protocol import RecData
from compressor.distill import distill_dirs
from compressor.distributed import world_size
from compressor.evaluate import artifact_scorer, evaluate_scorer, paired_bootstrap
from compressor.export import export_artifact
from compressor.importance import (
    IMPORTANCE_FILE,
    layer_scores,
    load_importance,
    run_importance,
    write_importance,
)
from compressor.lowrank import lowrank_dir
from compressor.memory import GIB, check_budget
from compressor.modeling import count_parameters, load_model, model_max_len
from compressor.pipeline.context import Context, StageResult, details, output
from compressor.prune import prune_dir
from compressor.report import write_report
from compressor.speed import compare_latency, machine_info
from compressor.teacher import SUMMARY_FILE, train_teacher
from compressor.truncate import choose_and_truncate

# --- results ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainedTeacher(StageResult):
    """The teacher every later stage reads: trained here, or given by `teacher.path`."""

    stage = "teacher"
    model: Path = output()
    max_len: int  # the history window every later stage uses
    num_layers: int  # the model's own depth (a pretrained LLM's, not the config's num_layers)
    training: dict = details()  # epochs, stop reason, device, ... (or given: true)


@dataclass(kw_only=True)
class LayerImportance(StageResult):
    stage = "importance"
    importance: Path = output()  # importance.json: every estimator's per-layer scores
    spearman_vs_ablation: dict
    seconds: dict
    world_size: int = 1  # torchrun ranks the Fisher sums were split over


@dataclass(kw_only=True)
class TruncatedStudent(StageResult):
    stage = "truncate"
    model: Path = output()
    layers: list[int]
    why: dict = details()  # chosen_by, method, strategy, candidates (compressor.select.LayerChoice)


@dataclass(kw_only=True)
class PrunedStudent(StageResult):
    stage = "prune"
    model: Path = output()
    report: dict = details()  # parameters before/after, sparsity, scorer, seconds


@dataclass(kw_only=True)
class FactorizedStudent(StageResult):
    stage = "lowrank"
    model: Path = output()
    report: dict = details()  # scorer, parameters before/after, matrices factorized, seconds


@dataclass(kw_only=True)
class DistilledStudent(StageResult):
    stage = "distill"
    model: Path = output()  # the distilled student; with distillation off, the input student as is
    log: Path | None = output(optional=True)
    method: str | None  # None: distillation was off
    training: dict = details()  # steps, epochs, best validation, layer map and weights, ...


@dataclass(kw_only=True)
class ExportedArtifacts(StageResult):
    stage = "export"
    teacher: Path = output()  # artifact directories: what serving loads
    student: Path = output()
    parity: dict


@dataclass(kw_only=True)
class Evaluation(StageResult):
    stage = "evaluate"
    evaluation: Path = output()  # evaluation.json
    headline: dict = details()  # the student's retention_ndcg@10 and ndcg@10


@dataclass(kw_only=True)
class SpeedComparison(StageResult):
    stage = "speed"
    speed: Path = output()  # speed.json
    vs_teacher: dict


@dataclass(kw_only=True)
class Report(StageResult):
    stage = "report"
    report: Path = output()
    report_json: Path = output()
    files: list[str]


# --- what several stages read ----------------------------------------------------------------


def run_data(ctx: Context) -> RecData:
    """The prepared data: the teacher stage's, or (in a resumed run) read again with its vocabulary."""
    if ctx.data is None:
        vocab = ItemVocab.load(ctx.path(ctx.result(TrainedTeacher).model)) if ctx.has(TrainedTeacher) else None
        ctx.data = ctx.cfg.data.load(vocab)
    return ctx.data


def check_memory(ctx: Context, data: RecData) -> None:
    """Each stage's peak memory estimated from the data's shape (compressor.memory) against
    `data.memory_budget_gib`: one line naming the stage over it, and by how much."""
    n = sum(len(s) for s in data.sequences.values())
    stages = check_budget(ctx.cfg, len(data.sequences), data.vocab.num_items, n, ctx.cfg.data.budget_bytes())
    top = max(stages, key=lambda s: s.bytes)
    ctx.log(f"[memory] largest estimate: {top.stage} ~{top.bytes / GIB:.2f} GiB of a "
            f"{ctx.cfg.data.budget_bytes() / GIB:.1f} GiB budget")
    users = len(data.split("valid")) if ctx.cfg.data.eval_users is None else 0
    if users * data.vocab.num_items > FULL_RANKING_ADVICE:
        ctx.log(f"[evaluate] every validation and test pass ranks {users:,} users x "
                f"{data.vocab.num_items:,} items per model; data.eval_users=10000 samples the users instead "
                "(every user still trains)")


# user x item scores of one full-ranking pass above which the job suggests data.eval_users
# (10^10: a few minutes a model on 2 cores, and the evaluate stage ranks up to 9 models)
FULL_RANKING_ADVICE = 10**10


def run_max_len(ctx: Context) -> int:
    return ctx.result(TrainedTeacher).max_len


def _student_input(ctx: Context) -> Path:
    """The newest student before distillation: factorized, else pruned, else truncated."""
    for result_type in (FactorizedStudent, PrunedStudent, TruncatedStudent):
        if ctx.has(result_type):
            return ctx.result(result_type).model
    raise KeyError("no student stage has run")


def _onnx_graphs(ctx: Context) -> list[tuple[str, Path]]:
    """(artifact name, graph path) of every float or quantized ONNX graph the export stage wrote."""
    exported = ctx.result(ExportedArtifacts)
    return [(art, ctx.path(rel) / onnx_file)
            for art, rel in (("teacher", exported.teacher), ("student", exported.student))
            for onnx_file in load_manifest(ctx.path(rel))["onnx_files"] if onnx_file.endswith(".onnx")]


# --- the stages ------------------------------------------------------------------------------


def stage_teacher(ctx: Context) -> TrainedTeacher:
    # what the report and the stage record keep of a teacher's training summary
    keep = ("device", "epochs_run", "stop_reason", "best_valid", "train_seconds", "seconds_per_epoch", "parameters",
            "precision", "precision_reason", "world_size", "parallel", "resumed_from_epoch")
    tcfg = ctx.cfg.teacher
    if tcfg.path:
        src = Path(tcfg.path).expanduser().resolve()
        model, _ = load_model(src)
        summary_file = src / SUMMARY_FILE
        # trained elsewhere (by train-teacher or another run): its own summary says how, when it has one
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        return TrainedTeacher(model=src, max_len=model_max_len(model), num_layers=model.config.num_hidden_layers,
                              training={"given": True, "source": str(src), **{k: summary[k] for k in keep if k in summary}})
    ctx.data = ctx.cfg.data.load()
    check_memory(ctx, ctx.data)  # before any training: a dataset too large for the budget stops here
    model, summary = train_teacher(ctx.data, tcfg, ctx.path("models/teacher"),
                                   checkpoint_dir=ctx.work_dir("checkpoints/teacher"))  # resumable
    return TrainedTeacher(model=Path("models/teacher"), max_len=tcfg.max_len,
                          num_layers=model.config.num_hidden_layers,
                          training={**{k: summary[k] for k in keep}, "data_filters": ctx.data.interactions.filters})


def stage_importance(ctx: Context) -> LayerImportance:
    model, _ = load_model(ctx.path(ctx.result(TrainedTeacher).model))
    cfg = ctx.cfg.importance
    if cfg.keep is None:
        cfg = cfg.model_copy(update={"keep": [ctx.cfg.selection.keep]})
    result = run_importance(model, run_data(ctx), cfg, run_max_len(ctx))
    write_importance(result, ctx.path("importance"))
    return LayerImportance(importance=Path("importance") / IMPORTANCE_FILE, spearman_vs_ablation=result.spearman,
                           seconds={n: s.seconds for n, s in result.methods.items()}, world_size=world_size())


def stage_truncate(ctx: Context) -> TruncatedStudent:
    sel, teacher = ctx.cfg.selection, ctx.result(TrainedTeacher)

    def scores(num_layers: int, teacher) -> list[float]:
        return layer_scores(ctx.path(ctx.result(LayerImportance).importance), sel.method, num_layers)

    choice = choose_and_truncate(ctx.path(teacher.model), ctx.path("models/truncated"), lambda vocab: run_data(ctx),
                                 layers=sel.layers, keep=sel.keep, method=sel.method, strategy=sel.strategy,
                                 candidates=sel.candidates, scores=scores)
    return TruncatedStudent(model=Path("models/truncated"), layers=choice.layers, why=choice.why)


def stage_prune(ctx: Context) -> PrunedStudent:
    src = ctx.path(ctx.result(TruncatedStudent).model)
    _, report = prune_dir(src, ctx.path("models/pruned"), ctx.cfg.prune, run_data(ctx))
    keep = ("params_before", "params_after", "nonzero_params_after", "sparsity", "scorer", "seconds")
    # the shapes, not the per-layer lists and scores (those stay in the model's prune_report.json)
    shapes = {k: {"before": v["before"], "after": v["after"]} for k, v in (report.get("structured") or {}).items()
              if isinstance(v, dict) and "before" in v}
    return PrunedStudent(model=Path("models/pruned"), report={**{k: report.get(k) for k in keep}, "structured": shapes})


def stage_lowrank(ctx: Context) -> FactorizedStudent:
    src = ctx.result(PrunedStudent if ctx.has(PrunedStudent) else TruncatedStudent).model
    _, report = lowrank_dir(ctx.path(src), ctx.path("models/lowrank"), ctx.cfg.lowrank, run_data(ctx))
    keep = ("params_before", "params_after", "effective_ratio", "factorized", "kept_dense", "seconds")
    return FactorizedStudent(model=Path("models/lowrank"),
                             report={"scorer": ctx.cfg.lowrank.scorer, **{k: report.get(k) for k in keep}})


def stage_distill(ctx: Context) -> DistilledStudent:
    src = _student_input(ctx)
    cfg = ctx.cfg.distill
    if not cfg.enabled:
        return DistilledStudent(model=src, method=None)
    importance = None
    if ctx.has(LayerImportance):
        importance = load_importance(ctx.path(ctx.result(LayerImportance).importance))
    result = distill_dirs(ctx.path(ctx.result(TrainedTeacher).model), ctx.path(src), lambda vocab: run_data(ctx), cfg,
                          ctx.work_dir("distill"), importance=importance, max_len=run_max_len(ctx), resume=True)
    training = {k: v for k, v in result.to_json().items() if k not in ("log_path", "model_dir", "method")}
    return DistilledStudent(model=result.model_dir.relative_to(ctx.run_dir),
                            log=result.log_path.relative_to(ctx.run_dir), method=result.method, training=training)


def stage_export(ctx: Context) -> ExportedArtifacts:
    sources = {"teacher": ctx.result(TrainedTeacher).model, "student": ctx.result(DistilledStudent).model}
    parity = {name: export_artifact(ctx.path(src), ctx.path(name), run_data(ctx), ctx.cfg.export).parity
              for name, src in sources.items()}
    return ExportedArtifacts(teacher=Path("teacher"), student=Path("student"), parity=parity)


def stage_evaluate(ctx: Context) -> Evaluation:
    """Test metrics of every model the run made, the baselines, the served ONNX graphs, and
    paired bootstraps of the student against the teacher and the truncated floor."""
    test = run_data(ctx).split("test")
    models = {"teacher": ctx.result(TrainedTeacher).model, "truncated": ctx.result(TruncatedStudent).model}
    for name, result_type in (("pruned", PrunedStudent), ("lowrank", FactorizedStudent)):
        if ctx.has(result_type):
            models[name] = ctx.result(result_type).model
    models["student"] = ctx.result(DistilledStudent).model
    results, per_user, params = {}, {}, {}
    for name, path in models.items():
        loaded = load_model(ctx.path(path))
        res, _ = evaluate_named(ctx.path(path), run_data(ctx), "test", loaded, run_max_len(ctx))
        results[name], per_user[name], params[name] = res.metrics, res.per_user["ndcg@10"], count_parameters(loaded[0])
    skipped = {}
    for name in ctx.cfg.evaluate.baselines:
        if name == "ease" and (why := ease_skip_reason(run_data(ctx).vocab.num_items, ctx.cfg.evaluate.ease_max_items)):
            ctx.log(f"[evaluate] {why}")
            skipped[name] = why
            continue
        res, extra = evaluate_named(name, run_data(ctx), "test")
        results[name], per_user[name] = {**res.metrics, **extra}, res.per_user["ndcg@10"]
    for art, path in _onnx_graphs(ctx):
        scorer, _ = artifact_scorer(path.parent, path.name)
        key = f"{art}:{path.name}"
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
           "per_user_ndcg@10": {k: v.tolist() for k, v in per_user.items()}, "baselines_skipped": skipped}
    atomic_write_json(ctx.path("evaluation.json"), doc)
    return Evaluation(evaluation=Path("evaluation.json"),
                      headline={"retention_ndcg@10": retention.get("student"),
                                "student_ndcg@10": results["student"]["ndcg@10"]})


def stage_speed(ctx: Context) -> SpeedComparison:
    cfg = ctx.cfg.speed
    graphs = {}
    for art, path in _onnx_graphs(ctx):  # `student`, `student (int8)`
        tag = path.name.removeprefix("model").removesuffix(".onnx").lstrip(".")
        graphs[art + (f" ({tag})" if tag else "")] = path
    hists = run_data(ctx).split("test").histories
    timing = compare_latency(graphs, hists, run_max_len(ctx), tuple(cfg.batch_sizes), cfg.rounds,
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
    doc = {"machine": machine_info(), "max_len": run_max_len(ctx), "timing": timing, "vs_teacher": ratios,
           "method": f"ONNX Runtime, real test histories, {cfg.rounds} interleaved rounds x "
                     f"{cfg.calls_per_round} calls per model and batch size, median"}
    atomic_write_json(ctx.path("speed.json"), doc)
    return SpeedComparison(speed=Path("speed.json"), vs_teacher=ratios)


def stage_report(ctx: Context) -> Report:
    files = write_report(ctx.run_dir, ctx.cfg, ctx.records)
    return Report(report=Path("report.md"), report_json=Path("report.json"), files=files)
