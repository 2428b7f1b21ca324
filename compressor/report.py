"""The compression report: `report.md`, `report.json` and PNG plots, from the stage results only.

Every figure in it was measured by this run: the stage records (`compressor.pipeline.context.
StageRecord`: summaries, and the paths of the files each stage wrote, which are read from there,
never assumed); nothing is typed in by hand.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compressor import quantize_report  # noqa: E402
from compressor.atomic import atomic_write  # noqa: E402
from compressor.importance import depth_bands, depth_shares  # noqa: E402
from compressor.markdown import fmt as _fmt  # noqa: E402
from compressor.markdown import table as _table  # noqa: E402

QUALITY_KEYS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "coverage@10")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def _output(run_dir: Path, records: dict, stage: str, key: str) -> Path | None:
    """The path a finished stage recorded under `key` (None when the stage did not run)."""
    rec = records.get(stage)
    return run_dir / rec.outputs[key] if rec is not None and key in rec.outputs else None


def _read_output(run_dir: Path, records: dict, stage: str, key: str, file: str | None = None) -> dict:
    path = _output(run_dir, records, stage, key)
    return {} if path is None else _read(path / file if file else path)


def collect(run_dir: Path, cfg, records: dict) -> dict:
    """Everything the report shows, as one JSON document."""
    manifests = {a: _read_output(run_dir, records, "export", a, "manifest.json") for a in ("teacher", "student")}
    evaluation = _read_output(run_dir, records, "evaluate", "evaluation")
    evaluation.pop("per_user_ndcg@10", None)
    importance = _read_output(run_dir, records, "importance", "importance")
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "data": manifests["student"].get("data", {}),
        "teacher": {k: manifests["teacher"].get(k) for k in ("num_layers", "hidden_size", "parameters", "onnx_files", "parity", "architecture", "quantization")},
        "student": {k: manifests["student"].get(k) for k in ("num_layers", "teacher_layers", "hidden_size", "parameters", "onnx_files", "parity", "architecture", "quantization")},
        "teacher_training": records["teacher"].summary,
        "selection": records["truncate"].summary,
        "importance": {
            "methods": {n: {"weights": m["weights"], "seconds": m["seconds"], "samples": m["samples"],
                            "spearman_vs_ablation": m.get("spearman_vs_ablation"),
                            "top_k_overlap_vs_ablation": m.get("top_k_overlap_vs_ablation")}
                        for n, m in importance.get("methods", {}).items()},
        } if importance else None,
        "pruning": records["prune"].summary if "prune" in records else None,
        "lowrank": records["lowrank"].summary if "lowrank" in records else None,
        "distillation": records["distill"].summary,
        "evaluation": evaluation,
        "speed": _read_output(run_dir, records, "speed", "speed"),
        "stage_seconds": {n: r.seconds for n, r in records.items()},
        "stages_skipped_this_run": [n for n, r in records.items() if r.skipped],
        "versions": manifests["student"].get("versions", {}),
    }


def plot_quality_vs_size(doc: dict, path: Path) -> Path:
    ev = doc["evaluation"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, params in ev.get("parameters", {}).items():
        ndcg = ev["metrics"][name]["ndcg@10"]
        ax.scatter(params / 1e6, ndcg, s=60)
        ax.annotate(name, (params / 1e6, ndcg), textcoords="offset points", xytext=(5, 5))
    for name, style in (("ease", "--"), ("mostpop", ":")):
        if name in ev.get("metrics", {}):
            ax.axhline(ev["metrics"][name]["ndcg@10"], ls=style, color="grey", label=f"{name} (no parameters plotted)")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_title("Quality vs size")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency_vs_size(doc: dict, path: Path) -> Path:
    timing = doc["speed"].get("timing", {})
    sizes = {"teacher": doc["teacher"]["parameters"], "student": doc["student"]["parameters"]}
    batches = sorted({k for t in timing.values() for k in t}, key=lambda k: int(k.split("_")[1]))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8))
    axes = [axes] if len(batches) == 1 else axes
    for ax, b in zip(axes, batches, strict=True):
        for name, t in timing.items():
            base = name.split(" ")[0]
            ax.scatter(sizes[base] / 1e6, t[b]["ms_median"], s=60)
            ax.annotate(name, (sizes[base] / 1e6, t[b]["ms_median"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("median ms per call")
        ax.set_title(f"ONNX Runtime latency, {b.replace('_', ' ')}")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_stage_times(doc: dict, path: Path) -> Path:
    secs = doc["stage_seconds"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.barh(list(secs), list(secs.values()), color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (when the stage last ran)")
    ax.set_title("Time per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_markdown(doc: dict) -> str:
    out = ["# Compression report", "", *_overview(doc), *_teacher_vs_student(doc), *_quality(doc),
           *_importance_section(doc), *_compression(doc), *_parity(doc), *_quantization_section(doc)]
    out += ["## Time per stage", "", _table(["stage", "seconds"], [[k, _fmt(v, 1)] for k, v in doc["stage_seconds"].items()]),
            "", "![stage times](stage_times.png)", ""]
    if doc["stages_skipped_this_run"]:
        out += [f"Stages reused from an earlier run: {', '.join(doc['stages_skipped_this_run'])}.", ""]
    vers = doc.get("versions", {})
    out += ["Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), ""]
    return "\n".join(out)


def _overview(doc: dict) -> list[str]:
    """The machine, the data and its protocol, the data filters."""
    ev, speed, data = doc["evaluation"], doc["speed"], doc["data"]
    out = []
    out += [f"Run at {doc['created_at']} on {speed.get('machine', {}).get('cpu', '?')} "
            f"({speed.get('machine', {}).get('cores', '?')} cores, no GPU used unless listed: "
            f"{', '.join(speed.get('machine', {}).get('providers', []))}). Data: **{data.get('name')}** "
            f"({data.get('users')} users, fingerprint `{data.get('fingerprint')}`); protocol: leave-one-out, "
            f"full ranking over the whole catalogue, "
            f"{'repeats kept, seen items ranked too' if doc['config']['data'].get('keep_repeats') else 'seen items excluded'}, "
            f"{ev.get('users')} test users"
            + (f" (a seeded sample: data.eval_users={doc['config']['data']['eval_users']}; every user trained)"
               if doc["config"]["data"].get("eval_users") else "") + ".", ""]
    for f in (doc.get("teacher_training") or {}).get("data_filters") or []:
        out += [f"Data filter {f['filter']}: removed {f['removed_interactions']:,} interactions, "
                f"{f['removed_users']:,} users and {f['removed_items']:,} items ({f['left_interactions']:,} left).", ""]
    return out


def _teacher_vs_student(doc: dict) -> list[str]:
    ev, speed, t, s = doc["evaluation"], doc["speed"], doc["teacher"], doc["student"]
    m = ev["metrics"]
    timing = speed.get("timing", {})
    b1 = lambda name: timing.get(name, {}).get("batch_1", {}).get("ms_median")  # noqa: E731
    b64 = lambda name: timing.get(name, {}).get("batch_64", {}).get("per_second")  # noqa: E731
    size = lambda man: sum(v for k, v in (man.get("onnx_files") or {}).items() if k.startswith("model.onnx"))  # noqa: E731
    tsize, ssize = size(t), size(s)
    out = []
    out += ["## Teacher vs student", ""]
    rows = [
        ["decoder layers", t["num_layers"], s["num_layers"], _ratio(s["num_layers"], t["num_layers"])],
        ["parameters", t["parameters"], s["parameters"], _ratio(s["parameters"], t["parameters"])],
        ["ONNX size (MB)", _mb(tsize), _mb(ssize), _ratio(ssize, tsize)],
        ["test NDCG@10", m["teacher"]["ndcg@10"], m["student"]["ndcg@10"], ev["retention_ndcg@10"].get("student")],
        ["test HR@10", m["teacher"]["hr@10"], m["student"]["hr@10"], _ratio(m["student"]["hr@10"], m["teacher"]["hr@10"])],
        ["batch-1 latency (ms, median)", b1("teacher"), b1("student"), _ratio(b1("student"), b1("teacher"))],
        ["batch-64 throughput (histories/s)", b64("teacher"), b64("student"), _ratio(b64("student"), b64("teacher"))],
    ]
    out += [_table(["", "teacher", "student", "student / teacher"], rows), ""]
    out += [f"Student layers = teacher layers {s.get('teacher_layers')} ({doc['selection'].get('chosen_by')}). "
            "Latency and throughput: " + speed.get("method", "") + ".", "", "![latency vs size](latency_vs_size.png)", ""]
    return out


def _quality(doc: dict) -> list[str]:
    ev = doc["evaluation"]
    m = ev["metrics"]
    out = []
    out += ["## Quality (test split)", ""]
    rows = [[name] + [v.get(k) for k in QUALITY_KEYS] + [ev["retention_ndcg@10"].get(name)]
            for name, v in m.items()]
    out += [_table(["model"] + list(QUALITY_KEYS) + ["NDCG@10 retention"], rows), ""]
    out += ["`truncated` is the student's layers copied from the teacher with no training (the floor "
            "distillation must beat); `teacher:model.onnx` / `student:model.*.onnx` are the exported graphs as "
            "served (scores = ONNX query vector · item embeddings).", "", "![quality vs size](quality_vs_size.png)", ""]
    for why in (ev.get("baselines_skipped") or {}).values():
        out += [f"Baseline not run: {why}.", ""]
    boot = ev.get("bootstrap_ndcg@10", {})
    if boot:
        out += ["Paired bootstrap over test users (NDCG@10 difference, 95% interval):", ""]
        out += [_table(["comparison", "mean diff", "CI low", "CI high", "excludes 0"],
                       [[k, v["mean_diff"], v["ci_low"], v["ci_high"], v["excludes_zero"]] for k, v in boot.items()]), ""]
    return out


def _importance_section(doc: dict) -> list[str]:
    out = []
    imp = doc.get("importance")
    if imp:
        out += ["## Which layers matter", "", "![importance](importance_by_method.png)", "",
                _teacher_training_line(doc["teacher_training"]), ""]
        ks = sorted({k for v in imp["methods"].values() for k in (v.get("top_k_overlap_vs_ablation") or {})})
        rows = [[n, v.get("spearman_vs_ablation"), *[(v.get("top_k_overlap_vs_ablation") or {}).get(k) for k in ks],
                 v["seconds"], v["samples"], " ".join(f"{w:.2f}" for w in v["weights"])]
                for n, v in imp["methods"].items()]
        out += [_table(["method", "Spearman vs ablation", *[f"top-{k[2:]} overlap with ablation" for k in ks],
                        "seconds", "samples", "normalised weight per layer"], rows), ""]
        n_layers = len(next(iter(imp["methods"].values()))["weights"])
        bands = [f"layers {b[0]}-{b[-1]}" for b in depth_bands(n_layers)]
        out += ["Share of each method's weight by depth (do the upper layers matter more than the lower?):", "",
                "![importance by depth](importance_by_depth.png)", "",
                _table(["method", *bands], [[n, *[f"{v:.0%}" for v in depth_shares(m["weights"])]]
                                            for n, m in imp["methods"].items()]), ""]
    return out


def _compression(doc: dict) -> list[str]:
    """Pruning, low-rank factorization and distillation, each when it ran."""
    out = []
    if doc.get("pruning"):
        p = doc["pruning"]
        st = p.get("structured") or {}
        names = {"heads": "query heads", "mlp": "MLP channels", "hidden": "model width"}
        shapes = "".join(f"{label} {st[k]['before']} → {st[k]['after']}; " for k, label in names.items() if k in st)
        out += ["## Pruning", "", f"Parameters {_fmt(p.get('params_before'))} → {_fmt(p.get('params_after'))}; "
                f"{shapes}sparsity of decoder weights {_fmt((p.get('sparsity') or {}).get('model_total'))}. Unstructured "
                "sparsity (zeros inside dense tensors) does not make a dense runtime such as ONNX Runtime faster; "
                "only structured pruning (heads, channels, width) shrinks the tensors.", ""]
    if doc.get("lowrank"):
        lr = doc["lowrank"]
        out += ["## Low-rank factorization", "", f"Parameters {_fmt(lr.get('params_before'))} → "
                f"{_fmt(lr.get('params_after'))}: {lr.get('factorized')} matrices factorized by {lr.get('scorer')} SVD "
                f"(keeping {_fmt(lr.get('effective_ratio'))} of their parameters), {lr.get('kept_dense')} kept dense "
                "(a rank that saves nothing).", ""]
    d = doc["distillation"]
    if d.get("method"):
        out += ["## Distillation", "", f"Method `{d['method']}`, {d.get('steps')} steps ({_fmt(d.get('epochs'), 1)} epochs, "
                f"{_fmt(d.get('seconds'), 0)} s{_processes(d)}, stop: {d.get('stop_reason')}), best validation NDCG@10 "
                f"{_fmt((d.get('best_valid') or {}).get('ndcg@10'))} at step {d.get('best_step')}; layer map "
                f"{d.get('layer_map')}, final layer weights {[round(w, 3) for w in d.get('layer_weights') or []]}.", ""]
    return out


def _parity(doc: dict) -> list[str]:
    t, s = doc["teacher"], doc["student"]
    out = []
    out += ["## Export parity (ONNX Runtime vs PyTorch, real validation histories)", ""]
    rows = []
    for art, man in (("teacher", t), ("student", s)):
        for f, par in (man.get("parity") or {}).items():
            gate = "; ".join(f"{name} ≤ {par[key]:g}" for name, key in
                             (("relative", "rtol"), ("absolute", "atol")) if par.get(key) is not None)
            gate += ("; " if gate else "") + f"top-{par.get('k', 10)} ≥ {par.get('min_topk_agreement')}"
            rows.append([f"{art}/{f}", par.get("max_abs_diff"), par.get("max_rel_diff"), par.get("topk_agreement"),
                         par.get("n"), gate])
    out += ["Each graph ran on the same left-padded histories as the PyTorch model; the gate judges the "
            "query vector's largest difference relative to its largest component (scale-aware: LLM "
            "hidden states have outlier dimensions) and the top-k item agreement.", "",
            _table(["graph", "max abs diff", "max relative diff", "top-k agreement", "histories", "gate"], rows), ""]
    return out


def _quantization_section(doc: dict) -> list[str]:
    """The export stage's quantization search (compressor.quantize_budget), per artifact."""
    out = []
    for art in ("student", "teacher"):
        q = (doc.get(art) or {}).get("quantization")
        if q:
            out += [f"## Quantization of the {art} (quality budget against its float graph)", "",
                    *quantize_report.markdown(q, "quantization.png")]
    return out


def _teacher_training_line(tt: dict) -> str:
    """How the teacher was trained, on what device, and whether the clock cut it short (loudly)."""
    given = f"Teacher given by `teacher.path` ({tt.get('source', 'a model directory')})"
    if tt.get("given") and "epochs_run" not in tt:
        return f"{given}, not trained in this run; it has no training summary."
    how = (f"{tt.get('epochs_run')} epochs ({tt.get('stop_reason')}), "
           f"{_fmt(tt.get('seconds_per_epoch'), 1)} s per epoch on {tt.get('device', 'an unrecorded device')}"
           f"{_processes(tt)}" + _precision(tt) + ".")
    line = f"{given}, trained elsewhere; its training summary: {how}" if tt.get("given") else f"Teacher training: {how}"
    if tt.get("resumed_from_epoch"):
        line += f" Resumed from its checkpoint after epoch {tt['resumed_from_epoch']}."
    if tt.get("stop_reason") == "time cap":
        line += (" **Stopped by the wall-clock cap, not by epochs or early stopping: this teacher depends on "
                 "the machine's speed.**")
    return line


def _precision(summary: dict) -> str:
    """", bf16 (auto: this CPU has native bf16 kernels ...)": what training computed in, and why."""
    if not summary.get("precision"):
        return ""
    why = summary.get("precision_reason")
    return f", {summary['precision']}" + (f" ({why})" if why else "")


def _processes(summary: dict) -> str:
    """`, 2 data-parallel processes (ddp)` for a torchrun stage; nothing for one process."""
    n = summary.get("world_size") or 1
    if n == 1:
        return ""
    mode = summary.get("parallel")
    return f", {n} data-parallel processes" + (f" ({mode})" if mode else "")


def _ratio(a, b) -> float | None:
    return None if a in (None, 0) or b in (None, 0) else a / b


def write_report(run_dir: str | Path, cfg, records: dict) -> list[str]:
    run_dir = Path(run_dir)
    doc = collect(run_dir, cfg, records)
    files = [plot_quality_vs_size(doc, run_dir / "quality_vs_size.png").name,
             plot_latency_vs_size(doc, run_dir / "latency_vs_size.png").name,
             plot_stage_times(doc, run_dir / "stage_times.png").name]
    quantized = {a: doc[a]["quantization"] for a in ("student", "teacher") if (doc.get(a) or {}).get("quantization")}
    if quantized:
        files.append(quantize_report.plot(quantized, run_dir / "quantization.png").name)
    importance = _output(run_dir, records, "importance", "importance")
    for png in ("importance_by_method.png", "importance_by_depth.png", "selected_layers.png"):
        src = importance.parent / png if importance is not None else None
        if src is not None and src.exists():
            shutil.copyfile(src, run_dir / png)
            files.append(png)
    for name, text in (("report.json", json.dumps(doc, indent=2, default=str)), ("report.md", render_markdown(doc))):
        atomic_write(run_dir / name, text)
        files.append(name)
    return files
