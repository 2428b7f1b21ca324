"""Quality benchmark: FISHER-LD vs the distillation baselines and the two floors, over seeds.

Usage:
    python -m benchmarks.quality --teacher runs/default/teacher --data ml-latest-small \
        --depths 4,2 --seeds 0,1,2 --out benchmarks/results/quality \
        [--methods fisher_ld,uniform_ld,...] [--epochs 3] [--budget-minutes 2] \
        [--importance importance.json] [--strategy strategic | --layers 4=0,1,2,3;2=0,1] \
        [--config distill.yaml] [--set gamma=1.0 ...] [--prune prune.yaml] [--threads 1] [--report-only]

For every student depth k (layers chosen once from the teacher's Fisher scores by a selection
strategy, or given by hand), every seed and every method it distils a truncated student with
the same budget (epochs and minutes per cell) and scores it on the test split. Beside the
methods: the two floors distillation has to beat — `truncated` (the truncated student, no
training) and `scratch` (same depth, random init, trained on the task loss only, same budget,
at the teacher's learning rate because nothing is being preserved).

`--prune YAML` (PruneConfig fields, e.g. `hidden: 0.5`) prunes each truncated student before any
cell: with `hidden` the student is narrower than the teacher, so layer matching goes through
learned Adapt projections and cannot be exact; `truncated` is then the pruned, untrained student.

Statistics: mean ± std over seeds; and for fisher_ld vs every other method a paired bootstrap
over test users of the NDCG@10 difference, where each user's NDCG@10 is first averaged over the
seeds (so the interval is over users, with seed noise averaged out, not a CI over seeds).
Overhead of Fisher weighting: fisher_ld (dynamic weights) and uniform_ld steps interleaved on
the same batches in one process; the ratio of their mean step times.

Budget: every method gets the same number of epochs (the same optimisation steps over the same
batches); --budget-minutes only caps a cell's wall clock. A cell's cost is about epochs x (student
step + KD over the catalogue + teacher forward in the first epoch only, cached after) + one
validation per epoch. On ml-latest-small (2,277 windows of 50, 9.7k items, batch 64) the full
softmax KL is the largest single cost of a step (dkd and ranking_kd do about the same softmax work
over the catalogue, rkd none); 13 methods + scratch x 2 depths x 3 seeds is 84 trained cells, so
plan about 40 s per cell for a 56-minute grid (3 epochs on a quiet 2-core machine), or drop
seeds/methods. On a machine shared with other jobs use --threads 1: with two
OpenMP threads per process under oversubscription a step was measured ~18x slower.

Resumable: each (method, depth, seed) cell writes cells/<method>_d<k>_s<seed>.json and is
skipped when it exists; an interrupted cell resumes from its distillation checkpoint. A finished
cell keeps its training log under OUT/runs/<cell>/, and its student only with --keep-students.
Writes quality.md, quality.json and quality.png to --out.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, machine_md, md_table, save_figure, write_json
from compressor.data import prepare, training_windows
from compressor.distill import LOSSES, DistillConfig, Distiller, distill, read_fisher_scores
from compressor.distill.step import attention_implementation, frozen
from compressor.distill.trainer import batch_tensors, teacher_fisher
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model, paired_bootstrap
from compressor.fisher import normalise
from compressor.modeling import load_model, model_max_len, set_recsys_meta
from compressor.prune import PruneConfig, prune_model
from compressor.select import DEFAULT_STRATEGY, parse_layers, select_layers
from compressor.truncate import truncate

METHODS = ("fisher_ld", "fisher_ld_static", "uniform_ld", "finetune", "logit_kd", "fitnets", "attention_transfer", "minilm", "pkd", "tinybert",
           "rkd", "dkd", "ranking_kd")
FLOORS = ("truncated", "scratch")
METRIC_COLS = ("hr@10", "ndcg@5", "ndcg@10", "mrr")
TARGETS = {0.25: 0.99, 0.125: 0.95}  # depth share -> retention target (the issue's)


def parse_layer_spec(text: str | None) -> dict[int, list[int]]:
    """'4=0,1,2,3;2=0,1' -> {4: [0, 1, 2, 3], 2: [0, 1]}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        k, _, layers = part.partition("=")
        out[int(k)] = parse_layers(layers)
    return out


def cell_name(method: str, k: int, seed: int) -> str:
    return f"{method}_d{k}_s{seed}"


def fingerprint(payload) -> str:
    """A short hash of everything that decides a result: a stored result is reused only when the
    rerun's fingerprint is the same (a cell's name alone would reuse numbers of another config)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dir_digest(directory: str | Path) -> str:
    """The content of a model directory's files (weights, config, vocabulary): the teacher itself,
    not its path."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(directory).rglob("*") if q.is_file()):
        h.update(p.relative_to(directory).as_posix().encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def cell_key(setup: str, method: str, k: int, seed: int, layers: list[int], scores, base: DistillConfig,
             scratch_lr: float, prune: dict | None) -> str:
    """What decides a cell's numbers: the setup (teacher, data, history window), its layers and
    pruning, and, for a trained cell, the Fisher scores and its whole distillation config."""
    trained = {} if method == "truncated" else {
        "fisher_scores": [float(x) for x in scores], "config": base.model_dump(mode="json"),
        **({"scratch_lr": scratch_lr} if method == "scratch" else {})}
    return fingerprint({"setup": setup, "method": method, "depth": k, "seed": seed, "layers": layers,
                        "prune": prune, **trained})


def finished(path: Path, key: str) -> dict | None:
    """A stored result (a cell, the common setup, the overhead) when it was made with `key`."""
    doc = read_json(path)
    return doc if doc is not None and doc.get("key") == key else None


def test_result(model, data, max_len: int) -> dict:
    r = evaluate_model(model, data.split("test"), max_len)
    return {"test": r.metrics, "per_user_ndcg10": r.per_user["ndcg@10"].tolist()}


def scratch_student(student, seed: int):
    """Same architecture as `student`, fresh random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = copy.deepcopy(student.config)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=getattr(cfg, "_attn_implementation", None))
    set_recsys_meta(model, teacher_layers=None, kind="student")
    return model


def run_cell(args, method: str, k: int, seed: int, teacher, student0, data, base: DistillConfig,
             scores: np.ndarray, max_len: int, out: Path, key: str) -> dict:
    name = cell_name(method, k, seed)
    if method == "truncated":
        return {"cell": name, "method": method, "depth": k, "seed": seed, "seconds": 0.0,
                "valid": evaluate_model(student0, data.split("valid"), max_len).metrics,
                **test_result(student0, data, max_len)}
    if method == "scratch":
        student = scratch_student(student0, seed)
        train = base.train.model_copy(update={"seed": seed, "lr": args.scratch_lr})
        cfg = base.model_copy(update={"method": "finetune", "train": train})
    else:
        student = copy.deepcopy(student0)
        cfg = base.model_copy(update={"method": method, "train": base.train.model_copy(update={"seed": seed})})
    cfg = DistillConfig.model_validate(cfg.model_dump())
    run_dir = out / "runs" / name
    if finished(run_dir / "key.json", key) is None:  # an interrupted cell of another config: start afresh
        shutil.rmtree(run_dir, ignore_errors=True)
        write_json(run_dir / "key.json", {"key": key})
    fisher_doc = {"num_layers": len(scores),  # importance.json's shape, for its one reader
                  "methods": {"fisher": {"scores": scores.tolist(), "weights": normalise(scores).tolist()}}}
    r = distill(teacher, student, data, cfg, run_dir, importance=fisher_doc,
                max_len=max_len, progress=not args.quiet, resume=True)
    row = {"cell": name, "method": method, "depth": k, "seed": seed, "seconds": r.seconds,
           "seconds_per_step": r.seconds_per_step, "steps": r.steps, "epochs": r.epochs, "best_step": r.best_step,
           "stop_reason": r.stop_reason, "valid": r.best_valid, "layer_weights": r.layer_weights,
           "layer_map": r.layer_map, **test_result(r.model, data, max_len)}
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the cell is done; keep the log
    if not args.keep_students:  # an LLM student is ~130 MB a cell; the row holds what the report needs
        shutil.rmtree(run_dir / "student", ignore_errors=True)
    return row


def step_overhead(teacher, student0, data, base: DistillConfig, scores, max_len: int, steps: int) -> dict:
    """Mean step time of fisher_ld (dynamic weights) vs uniform_ld, interleaved on the same batches."""
    windows = training_windows(data.train_sequences(), max_len)
    device = next(teacher.parameters()).device
    steps = -(-steps // base.ema_every) * base.ema_every  # whole EMA periods, so updates are counted fairly
    order = np.random.default_rng(0).permutation(len(windows))
    bs = base.train.batch_size
    methods = ("fisher_ld", "uniform_ld")
    times = {m: [] for m in methods}
    with frozen(teacher):
        ds = {m: Distiller(teacher, copy.deepcopy(student0).to(device), base.model_copy(update={"method": m}),
                           data.vocab.num_special, len(windows), steps + 1, scores) for m in methods}
        for i in range(steps + 1):
            idx = order[(i * bs) % len(order):][:bs]
            b = batch_tensors(windows, idx, max_len, device)
            for m in (methods if i % 2 == 0 else methods[::-1]):  # alternate who goes first
                t = ds[m].step(*b)["step_seconds"]
                if i > 0:  # the first step warms up allocators and caches
                    times[m].append(t)
    f, u = float(np.mean(times["fisher_ld"])), float(np.mean(times["uniform_ld"]))
    return {"steps": steps, "ema_every": base.ema_every, "fisher_ld_seconds_per_step": f,
            "uniform_ld_seconds_per_step": u, "ratio": f / u,
            "note": "first-epoch batches, so the teacher forward is included in both"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(cells: list[dict], teacher_test: dict, depths: list[int], methods: list[str], n_teacher: int) -> dict:
    """Per (depth, method): mean ± std over seeds, retention, time; bootstrap fisher_ld vs others."""
    t_ndcg = teacher_test["test"]["ndcg@10"]
    table, boots = {}, {}
    for k in depths:
        per_method = {}
        for m in methods:
            cs = [c for c in cells if c["depth"] == k and c["method"] == m]
            if not cs:
                continue
            row = {"seeds": len(cs)}
            for col in METRIC_COLS:
                row[col] = _mean_std([c["test"][col] for c in cs])
            row["retention"] = row["ndcg@10"][0] / t_ndcg if t_ndcg > 0 else None
            row["seconds"] = _mean_std([c["seconds"] for c in cs])
            row["seconds_per_step"] = _mean_std([c["seconds_per_step"] for c in cs]) if "seconds_per_step" in cs[0] else None
            row["valid_ndcg@10"] = _mean_std([c["valid"]["ndcg@10"] for c in cs]) if "valid" in cs[0] else None
            row["best_at_step0"] = sum(c.get("best_step", 1) == 0 for c in cs) if m not in FLOORS or m == "scratch" else None
            row["per_user"] = np.mean([c["per_user_ndcg10"] for c in cs], axis=0)
            per_method[m] = row
        if "fisher_ld" in per_method:
            f = per_method["fisher_ld"]["per_user"]
            boots[k] = {}
            for m, r in per_method.items():
                if m == "fisher_ld":
                    continue
                b = paired_bootstrap(f, r["per_user"])
                pairs = [(_seed_ndcg(cells, "fisher_ld", k, s), _seed_ndcg(cells, m, k, s)) for s in seeds_of(cells, k)]
                b["fisher_ld_wins_seeds"] = sum(a > c for a, c in pairs if a is not None and c is not None)
                boots[k][m] = b
        for r in per_method.values():
            r.pop("per_user")
        table[k] = per_method
    return {"table": table, "bootstrap": boots, "teacher_test": teacher_test["test"],
            "targets": {k: TARGETS.get(round(k / n_teacher, 4)) for k in depths}}


def seeds_of(cells: list[dict], k: int) -> list[int]:
    return sorted({c["seed"] for c in cells if c["depth"] == k})


def _seed_ndcg(cells, method, k, seed):
    c = next((c for c in cells if c["method"] == method and c["depth"] == k and c["seed"] == seed), None)
    if c is None and method == "truncated":
        c = next((c for c in cells if c["method"] == method and c["depth"] == k), None)
    return None if c is None else c["test"]["ndcg@10"]


def _fmt(ms) -> str:
    return "–" if ms is None else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def write_report(out: Path, summary: dict) -> None:
    agg, info = summary["aggregate"], summary["machine"]
    lines = [
        "# Distillation quality: FISHER-LD vs baselines and floors", "",
        f"Teacher: `{summary['teacher']}` ({summary['teacher_layers']} layers), data `{summary['data']}`, "
        f"test users: {int(agg['teacher_test']['users'])}. Seeds: {summary['seeds']}. Budget per cell: "
        f"{summary['budget']['epochs']} epochs or {summary['budget']['max_minutes']} min, whichever comes first. "
        f"Machine: {machine_md(info)}.", "",
        f"Teacher test NDCG@10 {agg['teacher_test']['ndcg@10']:.4f}, HR@10 {agg['teacher_test']['hr@10']:.4f}.", "",
        "Mean ± std over seeds (test split). Retention = student NDCG@10 / teacher NDCG@10. "
        "`truncated` is the student before any training (one value, seed-independent); `scratch` has the "
        "same depth, random init, task loss only. `best@0` counts seeds whose best validation checkpoint "
        "was the untouched student.", "",
    ]
    for k, rep in ((summary.get("prune") or {}).get("by_depth") or {}).items():
        st = rep.get("structured", {})
        parts = [f"{name} {st[name]['before']} → {st[name]['after']}" for name in ("hidden", "heads", "mlp") if name in st]
        lines += [f"Every {k}-layer student is pruned before training ({', '.join(parts)}; "
                  f"{rep['params_before']:,} → {rep['params_after']:,} parameters, scorer "
                  f"{summary['prune']['config']['scorer']}); `truncated` is that pruned student, untrained.", ""]
    for k, rows in agg["table"].items():
        layers = summary["layers"].get(str(k), summary["layers"].get(k))
        target = agg["targets"].get(k, agg["targets"].get(str(k)))
        lines += [f"## {k} of {summary['teacher_layers']} layers (teacher layers {layers})"
                  + (f" — retention target {target:.0%}" if target else ""), ""]
        order = sorted(rows, key=lambda m: -rows[m]["ndcg@10"][0])
        lines.append(md_table(
            ["method", "seeds", "HR@10", "NDCG@5", "NDCG@10", "MRR", "retention", "valid NDCG@10", "train s", "s/step", "best@0"],
            [[m, r["seeds"], _fmt(r["hr@10"]), _fmt(r["ndcg@5"]), _fmt(r["ndcg@10"]), _fmt(r["mrr"]),
              None if r["retention"] is None else f"{r['retention']:.1%}", _fmt(r["valid_ndcg@10"]),
              f"{r['seconds'][0]:.0f}", None if r["seconds_per_step"] is None else f"{r['seconds_per_step'][0]:.3f}",
              r["best_at_step0"]] for m, r in ((m, rows[m]) for m in order)]))
        boots = agg["bootstrap"].get(k, agg["bootstrap"].get(str(k)))
        if boots:
            lines += ["", "fisher_ld minus each method, NDCG@10 (per-user values averaged over seeds; paired "
                      "bootstrap over users, 95% interval):", ""]
            lines.append(md_table(
                ["vs", "mean diff", "95% CI", "excludes 0", "seeds fisher_ld ahead"],
                [[m, f"{b['mean_diff']:+.4f}", f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]",
                  "yes" if b["excludes_zero"] else "no", b.get("fisher_ld_wins_seeds")] for m, b in boots.items()]))
        lines.append("")
    ov = summary.get("overhead")
    if ov:
        lines += ["## Overhead of Fisher weighting", "",
                  f"fisher_ld with dynamic weights (EMA every {ov['ema_every']} steps) vs uniform_ld, {ov['steps']} "
                  f"interleaved steps on the same batches at depth {ov['depth']}: "
                  f"{ov['fisher_ld_seconds_per_step']:.4f} s vs {ov['uniform_ld_seconds_per_step']:.4f} s per step, "
                  f"ratio **{ov['ratio']:.3f}** ({ov['note']}).", ""]
    (out / "quality.md").write_text("\n".join(lines))


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = summary["aggregate"]
    depths = list(agg["table"])
    fig, axes = plt.subplots(1, len(depths), figsize=(6 * len(depths), 4.5), squeeze=False)
    for ax, k in zip(axes[0], depths, strict=True):
        rows = agg["table"][k]
        names = sorted(rows, key=lambda m: -rows[m]["ndcg@10"][0])
        means = [rows[m]["ndcg@10"][0] for m in names]
        stds = [rows[m]["ndcg@10"][1] for m in names]
        colors = ["tab:red" if m == "fisher_ld" else "tab:gray" if m in FLOORS else "tab:blue" for m in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        ax.axhline(agg["teacher_test"]["ndcg@10"], color="k", ls="--", lw=1, label="teacher")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{k} of {summary['teacher_layers']} layers")
        ax.set_ylabel("test NDCG@10 (mean ± std over seeds)")
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        hi = max(m + s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(max(0.0, lo * 0.9), max(hi, agg["teacher_test"]["ndcg@10"]) * 1.05)
        ax.legend(loc="lower left")
    save_figure(fig, out / "quality.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher model directory")
    ap.add_argument("--data", default="ml-latest-small")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--depths", default="4,2", help="student depths (layers kept)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help="distillation methods")
    ap.add_argument("--floors", default=",".join(FLOORS),
                    help="floors run beside the methods (e.g. only 'truncated' when comparing layer sets: "
                         "a scratch student does not depend on them)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per cell: the budget every method gets")
    ap.add_argument("--budget-minutes", type=float, default=2.0,
                    help="wall-clock cap per cell (training + validation), a safety net behind --epochs")
    ap.add_argument("--scratch-lr", type=float, default=3e-3, help="learning rate of the from-scratch floor")
    ap.add_argument("--importance", help="importance.json with Fisher scores (else estimated once here)")
    ap.add_argument("--strategy", default=DEFAULT_STRATEGY, help="layer selection from the Fisher scores")
    ap.add_argument("--layers", help="explicit layers per depth, e.g. '4=0,1,2,3;2=0,1' (overrides --strategy)")
    ap.add_argument("--config", help="YAML with DistillConfig fields shared by every cell")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a DistillConfig field of --config, e.g. gamma=1.0 (repeatable)")
    ap.add_argument("--prune", help="YAML with PruneConfig fields applied to every truncated student "
                    "(e.g. hidden: 0.5 for a student half as wide as the teacher)")
    ap.add_argument("--overhead-steps", type=int, default=30, help="interleaved steps for the time ratio (0 = skip)")
    ap.add_argument("--keep-students", action="store_true",
                    help="keep each cell's distilled student under OUT/runs/ (default: only its log and result)")
    ap.add_argument("--threads", type=int, help="torch threads (1 is far faster on a machine shared with other jobs)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables from finished cells")
    ap.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        run(args)
    except CompressorError as e:
        print(f"benchmarks.quality: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> dict:
    from compressor.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    depths = [int(x) for x in args.depths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LOSSES]
    if unknown:
        raise CompressorError(f"unknown method(s) {unknown}; choose from {', '.join(LOSSES)}")
    floors = [f.strip() for f in args.floors.split(",") if f.strip()]
    if bad := [f for f in floors if f not in FLOORS]:
        raise CompressorError(f"unknown floor(s) {bad}; choose from {', '.join(FLOORS)}")
    base = load_config(DistillConfig, args.config, args.overrides)
    prune_cfg = load_config(PruneConfig, args.prune) if args.prune else None  # bad file: error before any work
    base = base.model_copy(update={"train": base.train.model_copy(update={"epochs": args.epochs,
                                                                           "max_minutes": args.budget_minutes})})
    teacher, vocab = load_model(args.teacher)
    data = prepare(args.data, args.format, vocab=vocab)
    L = teacher.config.num_hidden_layers
    max_len = model_max_len(teacher)
    for k in depths:
        if not 1 <= k < L:
            raise CompressorError(f"depth {k}: a student of a {L}-layer teacher keeps 1..{L - 1} layers")
    info = machine_info()
    setup = fingerprint({"teacher": dir_digest(args.teacher), "data": data.interactions.fingerprint(),
                         "max_len": max_len})
    # the Fisher scores (given, or estimated as `teacher_fisher` does: from these config fields) and
    # the layers chosen from them
    t = base.train
    estimated = {"fisher_batches": base.fisher_batches, "batch_size": t.batch_size, "seed": t.seed,
                 "precision": t.precision}
    common_key = fingerprint({"setup": setup, "importance": file_digest(args.importance), "layers": args.layers,
                              "strategy": args.strategy, "estimated": None if args.importance else estimated})
    common = finished(out / "common.json", common_key)
    if common is None:
        if args.importance:
            scores, source = read_fisher_scores(args.importance, L), args.importance
        else:
            windows = training_windows(data.train_sequences(), max_len)
            with frozen(teacher):
                scores, source = teacher_fisher(teacher, base, None, windows, max_len, "cpu")
        explicit = parse_layer_spec(args.layers)
        layers = {k: explicit.get(k) or select_layers(args.strategy, scores, k) for k in depths}
        common = {"key": common_key, "fisher_scores": list(map(float, scores)), "fisher_source": source, "layers": layers,
                  "strategy": "explicit" if args.layers else args.strategy,
                  "teacher": {"path": args.teacher, **test_result(teacher, data, max_len)}}
        write_json(out / "common.json", common)
    scores = np.asarray(common["fisher_scores"])
    layers = {int(k): v for k, v in common["layers"].items()}
    new = [k for k in depths if k not in layers]
    for k in new:
        layers[k] = parse_layer_spec(args.layers).get(k) or select_layers(args.strategy, scores, k)
    if new and not args.report_only:  # a run that adds depths records their layers beside the first ones
        write_json(out / "common.json", {**common, "layers": {str(k): v for k, v in sorted(layers.items())}})
    all_methods = methods + floors
    overhead = None
    cells = []
    t_start = time.time()
    prune_reports = {}
    for k in depths:
        student0 = truncate(teacher, layers[k])
        if prune_cfg is not None:
            student0, rep = prune_model(student0, data, prune_cfg, max_len, progress=not args.quiet)
            prune_reports[k] = {key: rep[key] for key in ("params_before", "params_after", "structured") if key in rep}
            for part in prune_reports[k].get("structured", {}).values():
                if isinstance(part, dict):
                    part.pop("scores", None)
        student0.eval()
        prune = None if prune_cfg is None else prune_cfg.model_dump(mode="json")
        for seed in seeds:
            for m in all_methods:
                if m == "truncated" and seed != seeds[0]:
                    continue
                path = out / "cells" / f"{cell_name(m, k, seed)}.json"
                key = cell_key(setup, m, k, seed, layers[k], scores, base, args.scratch_lr, prune)
                row = finished(path, key)
                if row is None:
                    if args.report_only:
                        continue
                    print(f"[{time.time() - t_start:6.0f}s] depth {k} seed {seed} {m}", flush=True)
                    row = {"key": key, **run_cell(args, m, k, seed, teacher, student0, data, base, scores, max_len,
                                                  out, key)}
                    write_json(path, row)
                cells.append(row)
        ov_path = out / f"overhead_d{k}.json"
        ov_key = fingerprint({"setup": setup, "layers": layers[k], "prune": prune, "config": base.model_dump(mode="json"),
                              "fisher_scores": [float(x) for x in scores], "steps": args.overhead_steps})
        if k == depths[0]:
            overhead = finished(ov_path, ov_key)
            if overhead is None and args.overhead_steps and not args.report_only:
                with attention_implementation([teacher], None):
                    overhead = {"key": ov_key, "depth": k, **step_overhead(teacher, student0, data, base, scores,
                                                                           max_len, args.overhead_steps)}
                write_json(ov_path, overhead)
    summary = {
        "teacher": args.teacher, "teacher_layers": L, "data": data.name, "depths": depths, "seeds": seeds,
        "methods": all_methods, "layers": {str(k): layers[k] for k in depths}, "strategy": common["strategy"],
        "fisher_scores": common["fisher_scores"], "fisher_source": common["fisher_source"],
        "budget": {"epochs": args.epochs, "max_minutes": args.budget_minutes, "scratch_lr": args.scratch_lr},
        "config": base.model_dump(mode="json"), "machine": info,
        "prune": None if prune_cfg is None else {"config": prune_cfg.model_dump(mode="json"),
                                                 "by_depth": {str(k): r for k, r in prune_reports.items()}},
        "overhead": overhead,
        "aggregate": aggregate(cells, common["teacher"], depths, all_methods, L),
        "cells": [{k: v for k, v in c.items() if k not in ("per_user_ndcg10", "key")} for c in cells],
    }
    write_json(out / "quality.json", summary)
    write_report(out, summary)
    if cells:
        plot(out, summary)
    print(f"wrote {out / 'quality.md'}")
    return summary


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def file_digest(path: str | None) -> str | None:
    """The content hash of a file (an importance.json), None for none."""
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
