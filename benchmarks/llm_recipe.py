"""LLM teacher recipes on one budget: validation NDCG@10 per epoch of each recipe, against EASE.

    python -m benchmarks.llm_recipe --config configs/llm.yaml --out benchmarks/results/llm_recipe \\
        --work runs/llm_recipe [--recipe NAME:key=value,key=value ...] [key=value ...]

A recipe is a name and overrides of the run config's `teacher:` section (e.g.
`centered-3e-4:item_init=centered,train.lr=3e-4,train.embedding_lr=3e-3`); the trailing
`key=value` overrides set the shared budget of every recipe (e.g. `teacher.train.epochs=2
teacher.train.recent_windows=3`). Without `--recipe` the grid of `RECIPES` runs. Each recipe
trains with `compressor.teacher.train_recommender` (checkpoint after every epoch, so an
interrupted grid resumes) and writes `WORK/NAME.json`; a recipe whose result exists with the same
config is not rerun. Only the validation split is read: this chooses the recipe, the job's test
numbers report it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import (
    machine_info,
    machine_md,
    md_table,
    run_guarded,
    save_figure,
    write_json,
    write_results,
)

# The grid run for issue #14 (docs/results/llm.md, "How the recipe was chosen"), in two rounds. First: the recipe as
# first shipped, the item table centred (its text rows are nearly parallel), higher rates, and no
# text at all. Second: the text table at higher rates, and the first recipe in bf16 autocast (a
# CPU with AVX512-BF16 runs its step ~1.8x faster; same steps, so this checks what bf16 costs).
RECIPES: dict[str, str] = {
    "text-1e-4": "item_init=text,train.lr=1e-4,train.embedding_lr=1e-3",
    "centered-1e-4": "item_init=centered,train.lr=1e-4,train.embedding_lr=1e-3",
    "centered-3e-4": "item_init=centered,train.lr=3e-4,train.embedding_lr=3e-3",
    "centered-1e-3": "item_init=centered,train.lr=1e-3,train.embedding_lr=3e-3",
    "random-3e-4": "item_init=random,train.lr=3e-4,train.embedding_lr=3e-3",
    "text-1e-3": "item_init=text,train.lr=1e-3,train.embedding_lr=3e-3",
    "text-1e-3-emb1e-2": "item_init=text,train.lr=1e-3,train.embedding_lr=1e-2",
    "text-1e-4-bf16": "item_init=text,train.lr=1e-4,train.embedding_lr=1e-3,train.precision=bf16",
}


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """`NAME:key=value,key=value` -> (NAME, ["teacher.key=value", ...])."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise ValueError(f"recipe {text!r}: expected NAME:key=value,key=value")
    pairs = [p for p in body.split(",") if p]
    if any("=" not in p for p in pairs):
        raise ValueError(f"recipe {text!r}: every override is key=value")
    return name, [f"teacher.{p}" for p in pairs]


def _train(name: str, tcfg, data, work: Path) -> dict:
    from compressor.pretrained import adapt_llm
    from compressor.teacher import build_teacher, train_recommender, training_fingerprint
    from compressor.training import set_seed

    set_seed(tcfg.train.seed)
    model = (adapt_llm(tcfg.pretrained, data, tcfg.max_len, tcfg.item_init) if tcfg.pretrained
             else build_teacher(tcfg, data.vocab, tcfg.train.seed))
    t0 = time.time()
    summary = train_recommender(model, data, tcfg.max_len, tcfg.train, desc=name,
                                checkpoint_dir=work / f"{name}.ckpt", fingerprint=training_fingerprint(tcfg, data))
    (work / f"{name}.ckpt" / "checkpoint.pt").unlink(missing_ok=True)
    summary["wall_seconds"] = time.time() - t0
    return summary


def run(config: str, recipes: dict[str, list[str]], out: str | Path, work: str | Path, overrides: list[str]) -> dict:
    from compressor.baselines import evaluate_baseline
    from compressor.config import load_config
    from compressor.pipeline import RunConfig

    base = load_config(RunConfig, config, overrides)
    data = base.data.load()
    ease, ease_info = evaluate_baseline("ease", data, "valid")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, extra in recipes.items():
        tcfg = load_config(RunConfig, config, overrides + extra).teacher
        wanted = json.loads(tcfg.model_dump_json())
        done = work / f"{name}.json"
        summary = json.loads(done.read_text()) if done.exists() else None
        if summary is None or summary.get("config") != wanted:
            summary = {**_train(name, tcfg, data, work), "config": wanted}
            write_json(done, summary)
        best = summary["best_valid"]
        rows.append({
            "recipe": name, "overrides": extra, "valid_ndcg@10": best["ndcg@10"], "valid_hr@10": best["hr@10"],
            "best_epoch": best.get("epoch"), "epochs_run": summary["epochs_run"],
            "train_windows": summary["train_windows"], "seconds_per_epoch": summary["seconds_per_epoch"],
            "vs_ease": best["ndcg@10"] / ease.metrics["ndcg@10"],
            "curve": [h["valid"]["ndcg@10"] for h in summary["history"] if "valid" in h],
            "loss": [h["loss"] for h in summary["history"]], "device": summary["device"],
        })
    doc = {"config": str(config), "overrides": overrides, "machine": machine_info(), "users": len(data.split("valid")),
           "ease": {"valid_ndcg@10": ease.metrics["ndcg@10"], **ease_info}, "recipes": rows}
    write_results(out, "llm_recipe", doc, _markdown, _plot)
    return doc


def _markdown(doc: dict) -> str:
    header = ["recipe", "teacher overrides", "epochs (best)", "windows/epoch", "s/epoch", "train loss (last)",
              "valid NDCG@10", "x EASE"]
    body = [[r["recipe"], ", ".join(o.removeprefix("teacher.") for o in r["overrides"]),
             f"{r['epochs_run']} ({r['best_epoch']})", r["train_windows"], f"{r['seconds_per_epoch']:.0f}",
             f"{r['loss'][-1]:.3f}", f"{r['valid_ndcg@10']:.4f}", f"{r['vs_ease']:.2f}"] for r in doc["recipes"]]
    shared = " ".join(doc["overrides"]) or "none"
    return "\n".join([
        "# LLM teacher recipes on one budget (validation split)", "",
        f"Machine: {machine_md(doc['machine'])}. Config `{doc['config']}`, shared overrides: `{shared}`. "
        f"Validation split, {doc['users']} users, full ranking. EASE validation NDCG@10 "
        f"{doc['ease']['valid_ndcg@10']:.4f} (λ = {doc['ease']['lambda']:g}).", "",
        md_table(header, body), "",
    ])


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in doc["recipes"]:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", label=r["recipe"])
    ax.axhline(doc["ease"]["valid_ndcg@10"], color="grey", ls="--", label="EASE")
    ax.set_xticks(range(1, max(len(r["curve"]) for r in doc["recipes"]) + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.legend(fontsize=7)
    ax.set_title("LLM teacher recipes, same budget", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/llm.yaml")
    ap.add_argument("--recipe", action="append", default=None, metavar="NAME:key=value,...",
                    help="a recipe (repeatable); default: the RECIPES grid")
    ap.add_argument("--out", default="benchmarks/results/llm_recipe")
    ap.add_argument("--work", default="runs/llm_recipe", help="per-recipe results and checkpoints")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the shared budget, e.g. teacher.train.epochs=2")
    args = ap.parse_args(argv)

    def body() -> None:
        texts = args.recipe or [f"{k}:{v}" for k, v in RECIPES.items()]
        recipes = dict(parse_recipe(t) for t in texts)
        print(_markdown(run(args.config, recipes, args.out, args.work, args.overrides)))

    return run_guarded("llm_recipe", body)


if __name__ == "__main__":
    raise SystemExit(main())
