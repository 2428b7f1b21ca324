"""The stages of the compression job, one function each: `fn(ctx) -> (outputs, summary)`.

`outputs` maps names to paths relative to the run directory (what later stages and the skip
check read); `summary` is the small JSON the stage record keeps for the report. The order,
fingerprints and skipping live in `compressor.pipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.distill.config import DistillConfig
from compressor.teacher import TeacherConfig

if TYPE_CHECKING:
    from compressor.pipeline import Context


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
    model, summary = train_teacher(data, TeacherConfig(**tcfg.model_dump(exclude={"path"})), out,
                                   checkpoint_dir=ctx.work_dir("checkpoints/teacher"))  # resumable
    keep = ("epochs_run", "stop_reason", "best_valid", "train_seconds", "seconds_per_epoch", "parameters",
            "precision", "world_size", "parallel", "resumed_from_epoch")
    # the model's own depth: a pretrained LLM's is its own, not the config's num_layers
    return {"model": "models/teacher"}, {"max_len": tcfg.max_len, "num_layers": model.config.num_hidden_layers,
                                         "device": summary["device"], **{k: summary[k] for k in keep}}


def stage_importance(ctx: Context) -> tuple[dict, dict]:
    from compressor.distributed import world_size
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
        "world_size": world_size(),  # torchrun ranks the Fisher sums were split over
    }


def choose_layers(ctx: Context) -> tuple[list[int], dict]:
    """The teacher layers the student keeps, and why."""
    from compressor.importance import load_importance, method_scores
    from compressor.select import VALIDATED, select_layers, validate_keep, validate_layers

    sel = ctx.cfg.selection
    L = int(ctx.records["teacher"].summary["num_layers"])
    if sel.layers is not None:
        return validate_layers(sel.layers, L), {"chosen_by": "explicit list"}
    validate_keep(sel.keep, L)
    doc = load_importance(ctx.output("importance", "importance"))
    scores = method_scores(doc, sel.method)
    why = {"chosen_by": f"{sel.strategy} over {sel.method} importance", "method": sel.method,
           "strategy": sel.strategy}
    if sel.strategy == VALIDATED:
        from compressor.modeling import load_model
        from compressor.truncate import validated

        teacher, _ = load_model(ctx.output("teacher", "model"))
        layers, why["candidates"] = validated(teacher, sel.candidates, scores, sel.keep, ctx.data, ctx.max_len)
        return layers, why
    return select_layers(sel.strategy, scores, sel.keep), why


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


def stage_lowrank(ctx: Context) -> tuple[dict, dict]:
    from compressor.lowrank import REPORT_FILE, lowrank_dir

    src = ctx.output("prune", "model") if "prune" in ctx.records else ctx.output("truncate", "model")
    out = lowrank_dir(src, ctx.path("models/lowrank"), ctx.cfg.lowrank, ctx.data)
    report = json.loads((out / REPORT_FILE).read_text())
    keep = ("params_before", "params_after", "effective_ratio", "factorized", "kept_dense", "seconds")
    return {"model": "models/lowrank"}, {"scorer": ctx.cfg.lowrank.scorer, **{k: report.get(k) for k in keep}}


def _student_input(ctx: Context) -> Path:
    for stage in ("lowrank", "prune"):
        if stage in ctx.records:
            return ctx.output(stage, "model")
    return ctx.output("truncate", "model")


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
    result = distill(teacher, student, ctx.data, cfg, ctx.work_dir("distill"), importance=importance,
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
    if "lowrank" in ctx.records:
        models["lowrank"] = ctx.output("lowrank", "model")
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
