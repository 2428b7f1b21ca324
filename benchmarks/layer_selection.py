"""Does Fisher information pick the decoder layers that matter? Measured, not assumed.

Usage:
    python -m benchmarks.layer_selection --teacher runs/default/teacher --data ml-latest-small \
        --keep 4 --out benchmarks/results/layer_selection [--samples 512] [--random-draws 5] [--fisher-sweep]

On one teacher it measures:
1. every importance estimator's Spearman rank correlation with ablation (the ground truth:
   skip one layer, measure the validation loss increase), and its cost;
2. the cost of Fisher estimation against one training epoch: the teacher's recorded
   `seconds_per_epoch` (training_summary.json) and one epoch timed here, in the same process;
3. test NDCG@10, before any distillation, of students keeping `--keep` layers chosen by each
   (method, strategy), against random layer sets (several draws) and the first / last k layers.
Importance uses validation users only; students are scored on the test split. It writes
layer_selection.md, layer_selection.json, layer_selection.png and importance/ to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    machine_info,
    machine_md,
    md_table,
    run_guarded,
    save_figure,
    write_json,
)
from compressor.atomic import atomic_write
from compressor.data import prepare, training_windows, window_batches
from compressor.evaluate import evaluate_model, paired_bootstrap
from compressor.importance import (
    IMPORTANCE,
    ImportanceConfig,
    check_method,
    run_importance,
    write_importance,
)
from compressor.modeling import load_model, model_max_len
from compressor.select import SELECTION, validate_keep
from compressor.teacher import SUMMARY_FILE, next_item_loss
from compressor.training import make_optimizer
from compressor.truncate import truncate

FISHER_TARGET = 0.8  # the issue's target for Fisher's Spearman correlation with ablation


def time_one_epoch(model, data, max_len: int, batch_size: int, lr: float = 1e-3) -> dict:
    """Seconds for one pass of teacher-style training over all training windows (on a copy)."""
    student = copy.deepcopy(model).train()
    device = next(student.parameters()).device
    windows = training_windows(data.train_sequences(), max_len)
    opt = make_optimizer(student, lr, 0.1, (0.9, 0.98))
    t0 = time.perf_counter()
    steps = 0
    for ids, mask, labels in window_batches(windows, max_len, batch_size, np.random.default_rng(0)):
        loss = next_item_loss(student, *(torch.from_numpy(x).to(device) for x in (ids, mask, labels)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return {"seconds": time.perf_counter() - t0, "windows": len(windows), "steps": steps, "batch_size": batch_size}


def fisher_sweep(model, data, max_len: int, base: ImportanceConfig, ablation_scores: list[float]) -> list[dict]:
    """Fisher's agreement with ablation and cost over sample counts and per-sample vs batched gradients."""
    from compressor.importance import spearman

    rows = []
    for samples in (128, 512):
        for bs in (1, 16):
            for bias in (False, True):
                cfg = base.model_copy(update={"methods": ["fisher"], "samples": samples, "keep": [],
                                              "fisher": base.fisher.model_copy(update={"batch_size": bs,
                                                                                       "use_depth_bias": bias})})
                s = run_importance(model, data, cfg, max_len, progress=False).methods["fisher"]
                rows.append({"samples": s.samples, "batch_size": bs, "depth_bias": bias, "seconds": s.seconds,
                             "spearman_vs_ablation": spearman(s.scores, ablation_scores)})
    return rows


def student_quality(model, layers: list[int], test, max_len: int, cache: dict):
    """Test metrics of the truncated student keeping `layers` (cached per layer set)."""
    key = tuple(layers)
    if key not in cache:
        cache[key] = evaluate_model(truncate(model, list(layers)), test, max_len)
    return cache[key]


def run(teacher: str | Path, data, out: str | Path, keep: int | None = None, methods: list[str] | None = None,
        samples: int = 512, random_draws: int = 5, sweep: bool = False, seed: int = 0, fmt: str = "auto") -> dict:
    """The whole measurement; `data` is a name, a path or an `Interactions`. Returns the JSON payload."""
    info = machine_info()
    model, vocab = load_model(teacher)
    data = prepare(data, fmt, vocab=vocab)
    max_len = model_max_len(model)
    L = model.config.num_hidden_layers
    k = validate_keep(keep if keep is not None else max(1, round(L / 4)), L)
    methods = [check_method(m) for m in methods] if methods else list(IMPORTANCE)
    if "ablation" not in methods:
        methods.append("ablation")  # the ground truth every other method is judged against
    cfg = ImportanceConfig(methods=methods, samples=samples, keep=[k], seed=seed)
    out = Path(out)

    # 1. importance on validation users
    result = run_importance(model, data, cfg, max_len)
    write_importance(result, out / "importance")
    ablation_scores = result.methods["ablation"].scores

    # 2. Fisher cost against one epoch of training
    summary_path = Path(teacher) / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    train_cfg = summary.get("config", {}).get("train", {})
    epoch = time_one_epoch(model, data, max_len, train_cfg.get("batch_size", 128), train_cfg.get("lr", 1e-3))
    model.eval()
    fisher_s = result.methods["fisher"].seconds if "fisher" in result.methods else None
    cost = {
        "fisher_seconds": fisher_s,
        "fisher_samples": result.methods["fisher"].samples if "fisher" in result.methods else None,
        "fisher_batch_size": cfg.fisher.batch_size,
        "epoch_seconds_recorded": summary.get("seconds_per_epoch"),
        "epoch_seconds_measured": epoch["seconds"], "epoch": epoch,
        "ratio_measured": fisher_s / epoch["seconds"] if fisher_s else None,
        "ratio_recorded": (fisher_s / summary["seconds_per_epoch"]
                           if fisher_s and summary.get("seconds_per_epoch") else None),
    }
    sweep_rows = fisher_sweep(model, data, max_len, cfg, ablation_scores) if sweep else []

    # 3. students of k layers, no distillation, on the test split
    test = data.split("test")
    cache: dict = {}
    teacher_metrics = evaluate_model(model, test, max_len)
    reference = list(range(k))  # paired comparisons are against keeping the first k layers
    ref = student_quality(model, reference, test, max_len, cache)

    def row(kind: str, name: str, layers: list[int]) -> dict:
        ev = student_quality(model, layers, test, max_len, cache)
        nd = ev.per_user["ndcg@10"]
        return {"kind": kind, "name": name, "layers": list(layers), "ndcg@10": ev.metrics["ndcg@10"],
                "hr@10": ev.metrics["hr@10"], "se": float(nd.std(ddof=1) / np.sqrt(len(nd))),
                "share_of_teacher": ev.metrics["ndcg@10"] / max(1e-12, teacher_metrics.metrics["ndcg@10"]),
                "vs_first_k": paired_bootstrap(nd, ref.per_user["ndcg@10"], seed=seed)}

    rows = [row("baseline", "first-k", reference), row("baseline", "last-k", list(range(L - k, L)))]
    for method, s in result.methods.items():
        for strategy, fn in SELECTION.items():
            rows.append(row("selected", f"{strategy}/{method}", fn(s.scores, k)))
    rng = np.random.default_rng(seed)
    random_rows = [row("random", f"random #{i}", sorted(rng.choice(L, k, replace=False).tolist()))
                   for i in range(random_draws)]
    rand = np.array([r["ndcg@10"] for r in random_rows]) if random_rows else np.array([np.nan])
    payload = {
        "machine": info, "teacher": str(teacher), "data": data.name, "num_layers": L, "keep": k,
        "importance_samples": result.samples, "ablation_samples": result.methods["ablation"].samples,
        "spearman_vs_ablation": result.spearman,
        "seconds": {n: s.seconds for n, s in result.methods.items()},
        "ablation": {"loss_increase": ablation_scores, **result.methods["ablation"].detail},
        "fisher_cost": cost, "fisher_sweep": sweep_rows,
        "teacher_test": teacher_metrics.metrics, "students": rows, "random": random_rows,
        "random_summary": {"draws": len(random_rows), "mean": float(np.mean(rand)), "std": float(np.std(rand)),
                           "min": float(np.min(rand)), "max": float(np.max(rand))},
        "config": cfg.model_dump(mode="json"),
    }
    write_json(out / "layer_selection.json", payload)
    atomic_write(out / "layer_selection.md", markdown(payload))
    plot(payload, out / "layer_selection.png")
    return payload


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(p: dict) -> str:
    L, k = p["num_layers"], p["keep"]
    rho = {m: r for m, r in p["spearman_vs_ablation"].items() if m != "ablation"}
    ranked = sorted((m for m in rho if rho[m] is not None), key=lambda m: -rho[m])
    c = p["fisher_cost"]
    t = p["teacher_test"]["ndcg@10"]
    lines = [
        f"# Layer selection on {p['teacher']} ({L} layers, keep {k})", "",
        f"Machine: {machine_md(p['machine'])}.", "",
        f"Importance on {p['importance_samples']} validation users (ablation on {p['ablation_samples']}); "
        f"students scored on {int(p['teacher_test']['users'])} test users, full ranking, no distillation.", "",
        "## Estimators against ablation", "",
        md_table(["method", "Spearman vs ablation", "seconds"],
                 [[m, _fmt(p["spearman_vs_ablation"].get(m)), _fmt(p["seconds"][m], ".2f")] for m in p["seconds"]]),
        "",
    ]
    if "fisher" in rho:
        r = rho["fisher"]
        verdict = "meets" if r is not None and r >= FISHER_TARGET else "misses"
        lines.append(f"Fisher's Spearman correlation with ablation is {_fmt(r)}: it {verdict} the target of "
                     f"{FISHER_TARGET}. Best agreement: {ranked[0] if ranked else '–'} "
                     f"({_fmt(rho.get(ranked[0])) if ranked else '–'}).")
        lines += ["", "## Fisher cost against one training epoch", "",
                  f"Fisher ({c['fisher_samples']} users, gradient batch {c['fisher_batch_size']}): "
                  f"{_fmt(c['fisher_seconds'], '.2f')} s; one training epoch timed in this run: "
                  f"{_fmt(c['epoch_seconds_measured'], '.2f')} s ({c['epoch']['windows']} windows, "
                  f"{c['epoch']['steps']} steps) -> ratio {_fmt(c['ratio_measured'], '.2f')}; "
                  f"epoch recorded at training: {_fmt(c['epoch_seconds_recorded'], '.2f')} s "
                  f"-> ratio {_fmt(c['ratio_recorded'], '.2f')}.", ""]
    if p["fisher_sweep"]:
        lines += ["### Fisher variants", "",
                  md_table(["users", "gradient batch", "depth bias", "seconds", "Spearman vs ablation"],
                           [[r["samples"], r["batch_size"], r["depth_bias"], _fmt(r["seconds"], ".2f"),
                             _fmt(r["spearman_vs_ablation"])] for r in p["fisher_sweep"]]), ""]
    rs = p["random_summary"]
    by_name = {r["name"]: r for r in p["students"]}
    methods = list(dict.fromkeys(r["name"].split("/")[1] for r in p["students"] if r["kind"] == "selected"))
    strategies = list(dict.fromkeys(r["name"].split("/")[0] for r in p["students"] if r["kind"] == "selected"))
    lines += [
        f"## {k}-layer students (test NDCG@10; teacher {t:.4f})", "",
        f"Baselines: first-k {by_name['first-k']['ndcg@10']:.4f}, last-k {by_name['last-k']['ndcg@10']:.4f}; "
        f"random layer sets ({rs['draws']} draws): mean {_fmt(rs['mean'], '.4f')}, std {_fmt(rs['std'], '.4f')}, "
        f"range {_fmt(rs['min'], '.4f')}-{_fmt(rs['max'], '.4f')}.", "",
        "NDCG@10 [kept layers] by importance method and selection strategy:", "",
        md_table(["method", *strategies],
                 [[m, *(f"{by_name[f'{s}/{m}']['ndcg@10']:.4f} [{','.join(map(str, by_name[f'{s}/{m}']['layers']))}]"
                        for s in strategies)] for m in methods]),
        "",
        "Every distinct layer set measured (`vs first-k`: paired bootstrap mean difference over users, 95% CI):",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in p["students"] + p["random"]:
        groups.setdefault(tuple(r["layers"]), []).append(r)
    table = []
    for layers, rs_ in sorted(groups.items(), key=lambda g: -g[1][0]["ndcg@10"]):
        r = rs_[0]
        b = r["vs_first_k"]
        table.append([",".join(map(str, layers)), f"{r['ndcg@10']:.4f}", f"{r['se']:.4f}", f"{r['hr@10']:.4f}",
                      f"{100 * r['share_of_teacher']:.1f}%",
                      f"{b['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]",
                      ", ".join(x["name"] for x in rs_)])
    lines += [md_table(["layers", "NDCG@10", "± s.e.", "HR@10", "share of teacher", "vs first-k", "chosen by"],
                       table), ""]
    a = p["ablation"]
    lines += ["Ablation (one layer skipped; validation loss increase / NDCG@10 drop): "
              + ", ".join(f"L{i}: {x:+.4f}/{d:+.4f}" for i, (x, d) in
                          enumerate(zip(a["loss_increase"], a["ndcg@10_drop"], strict=True))), ""]
    return "\n".join(lines)


def plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_sets = len({tuple(r["layers"]) for r in p["students"]})
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 4 + 0.32 * n_sets),
                               gridspec_kw={"height_ratios": [3, max(3, 0.32 * n_sets)]})
    rho = {m: r for m, r in p["spearman_vs_ablation"].items() if m != "ablation" and r is not None}
    a.bar(list(rho), list(rho.values()), color=["tab:red" if m == "fisher" else "tab:blue" for m in rho])
    a.axhline(FISHER_TARGET, color="gray", linestyle="--", label=f"target {FISHER_TARGET}")
    a.axhline(0, color="black", linewidth=0.8)
    a.set_ylim(-1, 1)
    a.set_ylabel("Spearman correlation with ablation")
    a.set_title("Estimators vs ablation")
    a.tick_params(axis="x", rotation=20)
    a.legend()
    groups: dict[tuple, list[dict]] = {}
    for r in p["students"]:
        groups.setdefault(tuple(r["layers"]), []).append(r)
    rows = sorted(groups.values(), key=lambda g: -g[0]["ndcg@10"])
    y = np.arange(len(rows))
    colors = ["tab:gray" if any(r["kind"] == "baseline" for r in g) else
              "tab:red" if any(r["name"].endswith("/fisher") for r in g) else "tab:blue" for g in rows]
    b.barh(y, [g[0]["ndcg@10"] for g in rows], xerr=[g[0]["se"] for g in rows], color=colors,
           error_kw={"ecolor": "dimgray", "capsize": 2, "elinewidth": 0.8})
    b.set_yticks(y)

    def label(g: list[dict]) -> str:
        names = ", ".join(r["name"] for r in g)
        return f"[{','.join(map(str, g[0]['layers']))}] {names[:60] + '…' if len(names) > 60 else names}"

    b.set_yticklabels([label(g) for g in rows], fontsize=7)
    b.invert_yaxis()
    b.axvline(p["teacher_test"]["ndcg@10"], color="black", linestyle="--", label="teacher")
    rs = p["random_summary"]
    if rs["draws"]:
        b.axvspan(rs["min"], rs["max"], color="orange", alpha=0.25, label=f"random ({rs['draws']} draws)")
        b.axvline(rs["mean"], color="orange")
    b.set_xlabel("test NDCG@10 (no distillation)")
    b.set_title(f"{p['keep']}-of-{p['num_layers']}-layer students")
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layer_selection", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher model directory")
    ap.add_argument("--data", default="ml-latest-small")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--keep", type=int, help="layers the students keep (default 25%% of depth)")
    ap.add_argument("--methods", help="comma-separated estimators (default all; ablation always runs)")
    ap.add_argument("--samples", type=int, default=512, help="validation users for the estimators")
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--fisher-sweep", action="store_true", help="also time Fisher variants (samples, batch, bias)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    def body() -> None:
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        print(markdown(run(args.teacher, args.data, args.out, args.keep, methods, args.samples, args.random_draws,
                           args.fisher_sweep, args.seed, args.format)))

    return run_guarded("layer_selection", body)

if __name__ == "__main__":
    sys.exit(main())
