"""Pruning and quantization benchmark: quality, size and ONNX Runtime latency of each step.

    python -m benchmarks.pruning --model runs/default/models/teacher --data ml-latest-small --out benchmarks/results/pruning \\
        --work runs/pruning_work

For head, MLP-channel and model-width (hidden size) pruning at each ratio and with each scorer (Fisher mask gradients vs weight
magnitude), optionally followed by a short recovery run (FISHER-LD distillation from the
unpruned model, or a plain fine-tune), plus one unstructured-sparsity model and the int8 /
fp16 graphs of the unpruned model, it records: parameters (and non-zero ones), checkpoint and
ONNX file size, test NDCG@10 / HR@10 of the exported graph (full ranking, seen items
excluded, with a paired bootstrap CI of the change against the float model) and single-request
and batch-64 latency as a ratio to the unpruned float graph. Every graph is timed in the same
run, interleaved (compressor.speed.compare_latency). Writes pruning.json, pruning.md and
pruning.png to --out; models, graphs, recovery runs and a per-cell cache go to --work (default
--out): a rerun reuses the cells measured with the same settings, and --report-only builds the
tables from the finished cells alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from benchmarks.common import (
    machine_info,
    machine_md,
    md_table,
    open_unit_ratios,
    run_guarded,
    save_figure,
    write_json,
)
from compressor.atomic import atomic_write
from compressor.errors import CompressorError


class PruningBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kinds: list[Literal["heads", "mlp", "hidden"]] = Field(
        ["heads", "mlp"], description="structured pruning kinds: heads, MLP channels, hidden = the model width "
        "(item table and every layer; the recovery distillation then learns Adapt projections)")
    ratios: list[float] = Field([0.25, 0.5], description="fractions removed, each in (0, 1)")
    scorers: list[Literal["fisher", "magnitude"]] = ["fisher", "magnitude"]
    recovery: Literal["distill", "finetune", "none"] = Field(
        "distill", description="after pruning: FISHER-LD distillation from the unpruned model, fine-tune, or none")
    recovery_epochs: int = Field(2, ge=1)
    recovery_minutes: float = Field(3.0, gt=0, description="wall-clock budget of each recovery run")
    recovery_recent_windows: int | None = Field(
        None, ge=1, description="recovery on each user's newest N windows only (None = all; as train.recent_windows)")
    recovery_config: str | None = Field(
        None, description="YAML of DistillConfig fields for the recovery distillation (an LLM student needs "
                          "layer_loss: relative, its batch size, rate and precision); None = the distill defaults")
    sparsity: float = Field(0.5, ge=0, lt=1, description="one unstructured (Fisher-weighted, global) model; 0 = skip")
    quantize: list[Literal["int8", "int8_per_channel", "fp16"]] = ["int8", "int8_per_channel", "fp16"]
    fisher_samples: int = Field(512, ge=1, description="validation users for the Fisher scores")
    users: int | None = Field(None, ge=1, description="test users evaluated; None = all")
    rounds: int = Field(5, ge=1, description="interleaved timing rounds (median over all calls)")
    calls: int = Field(20, ge=1, description="calls per model per round")
    threads: int | None = Field(1, ge=1, description="ONNX Runtime intra-op threads; None = runtime default")
    seed: int = 0

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        return open_unit_ratios(v)


def _dir_bytes(path: Path) -> tuple[int, int]:
    """Bytes of a checkpoint's weight files, raw and zlib-compressed (zeros compress; dense runtimes
    still multiply them)."""
    files = sorted(path.glob("*.safetensors"))
    raw = sum(f.stat().st_size for f in files)
    packed = sum(len(zlib.compress(f.read_bytes(), 6)) for f in files)
    return raw, packed


def _onnx_scorer(path: Path, emb: np.ndarray, max_len: int):
    from compressor.quantize import onnx_hidden

    return lambda hists: onnx_hidden(path, hists, max_len) @ emb.T


def recovery_distill_config(cfg: PruningBenchConfig):
    """The DistillConfig of a recovery run: `recovery_config`'s fields (or the defaults) with the
    benchmark's epochs, clock cap, seed and, when given, recent windows."""
    from compressor.config import load_config
    from compressor.distill import DistillConfig

    base = load_config(DistillConfig, cfg.recovery_config)
    update = {"epochs": cfg.recovery_epochs, "max_minutes": cfg.recovery_minutes, "seed": cfg.seed}
    if cfg.recovery_recent_windows is not None:
        update["recent_windows"] = cfg.recovery_recent_windows
    return base.model_copy(update={"train": base.train.model_copy(update=update)})


def _recover(teacher, student, data, max_len: int, cfg: PruningBenchConfig, out: Path) -> tuple[object, dict]:
    """A short recovery run on `student` (in place); returns it and a summary."""
    t0 = time.time()
    if cfg.recovery == "distill":
        from compressor.distill import distill

        dcfg = recovery_distill_config(cfg)
        r = distill(teacher, student, data, dcfg, out, max_len=max_len)
        info = {"method": dcfg.method, "steps": r.steps, "stop_reason": r.stop_reason,
                "best_valid_ndcg@10": r.best_valid.get("ndcg@10")}
        student = r.model if r.model is not None else student
    else:
        from compressor.teacher import TrainConfig, train_recommender

        train = TrainConfig(epochs=cfg.recovery_epochs, max_minutes=cfg.recovery_minutes, lr=1e-3,
                            weight_decay=0.01, warmup_steps=20, patience=1, batch_size=64, seed=cfg.seed)
        s = train_recommender(student, data, max_len, train, desc="fine-tune")
        info = {"method": "finetune", "epochs": s["epochs_run"], "stop_reason": s["stop_reason"],
                "best_valid_ndcg@10": s["best_valid"].get("ndcg@10")}
    info["seconds"] = time.time() - t0
    return student.cpu().eval(), info


CELLS = "cells"  # per-cell cache under the work directory: one JSON per measured graph


def _cell_key(cfg: PruningBenchConfig, model_dir, data_name, recovered: bool,
              recovery_distill: dict | None) -> dict:
    """What a cached cell's numbers depend on (beyond its name): reuse only on an exact match.
    `recovery_distill` is the recovery run's DistillConfig as JSON (read once per run by the caller)."""
    key = {"model": str(Path(model_dir).resolve()), "data": str(data_name), "users": cfg.users, "seed": cfg.seed,
           "fisher_samples": cfg.fisher_samples}
    if recovered:
        key.update(recovery=cfg.recovery, recovery_epochs=cfg.recovery_epochs, recovery_minutes=cfg.recovery_minutes)
        if cfg.recovery_config is not None:
            key["recovery_distill"] = recovery_distill
    return key


def run(cfg: PruningBenchConfig, model_dir: str | Path, data_name: str | Path, out: str | Path,
        work: str | Path | None = None, report_only: bool = False) -> dict:
    """Measure the grid and write the results to `out`; models, graphs, recovery runs and the
    per-cell cache go to `work` (default `out`). A cell already measured in `work` with the same
    settings is reused, so a stopped run resumes; `report_only` measures nothing new and builds
    the tables (latency timed afresh) from the finished cells."""
    from compressor.data import prepare
    from compressor.evaluate import evaluate_scorer, paired_bootstrap
    from compressor.export import export_onnx, item_embeddings
    from compressor.modeling import count_parameters, load_model, model_max_len, save_model
    from compressor.prune import PruneConfig, prune_model
    from compressor.quantize import compare_onnx, quantize_onnx
    from compressor.speed import compare_latency

    # Read the recovery YAML once: a bad one fails now, not after the first model.
    recovery_distill = (recovery_distill_config(cfg).model_dump(mode="json")
                        if cfg.recovery == "distill" or cfg.recovery_config is not None else None)
    out = Path(out)
    work = Path(work).resolve() if work is not None else out
    out.mkdir(parents=True, exist_ok=True)
    (work / "onnx").mkdir(parents=True, exist_ok=True)
    (work / CELLS).mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    teacher, vocab = load_model(model_dir)
    data = prepare(data_name, vocab=vocab)
    max_len = model_max_len(teacher)
    test = data.split("test")
    test = test.subset(cfg.users, cfg.seed) if cfg.users else test
    emb = item_embeddings(teacher)[0]
    rows: list[dict] = []
    per_user: dict[str, np.ndarray] = {}

    def store(row: dict) -> None:
        write_json(work / CELLS / f"{row['name']}.json",
                   {"key": _cell_key(cfg, model_dir, data_name, bool(row.get("recovered")), recovery_distill), "row": row,
                    "per_user_ndcg@10": per_user[row["name"]].tolist()})

    def reuse(name: str, recovered: bool = False) -> dict | None:
        path = work / CELLS / f"{name}.json"
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        if cell["key"] != _cell_key(cfg, model_dir, data_name, recovered, recovery_distill) or not Path(cell["row"]["onnx"]).is_file():
            return None
        row = cell["row"]
        rows.append(row)
        per_user[name] = np.asarray(cell["per_user_ndcg@10"], dtype=np.float64)
        print(f"{name}: reused from {path}", file=sys.stderr)
        return row

    def measure(name: str, model, **info) -> dict:
        model = model.cpu().eval()
        mdir = save_model(model, vocab, work / "models" / name)
        onnx_path = export_onnx(model, work / "onnx" / f"{name}.onnx", max_len)
        res = evaluate_scorer(_onnx_scorer(onnx_path, item_embeddings(model)[0], max_len), test)
        per_user[name] = res.per_user["ndcg@10"]
        raw, packed = _dir_bytes(mdir)
        nonzero = sum(int((p != 0).sum()) for p in {id(p): p for p in model.parameters()}.values())
        row = {"name": name, "params": count_parameters(model), "nonzero_params": nonzero, "ckpt_bytes": raw,
               "ckpt_zlib_bytes": packed, "onnx_bytes": onnx_path.stat().st_size, "onnx": str(onnx_path),
               "ndcg@10": res.metrics["ndcg@10"], "hr@10": res.metrics["hr@10"], **info}
        rows.append(row)
        store(row)
        print(f"{name}: NDCG@10 {row['ndcg@10']:.4f}, {row['params']:,} parameters", file=sys.stderr)
        return row

    base = reuse("float")
    if base is None:
        if report_only:
            raise CompressorError(f"{work}: no finished float cell to report on; run without --report-only first")
        base = measure("float", teacher, kind="float")
    for kind in cfg.kinds:
        for ratio in cfg.ratios:
            for scorer in cfg.scorers:
                name = f"{kind}{round(ratio * 100)}-{scorer}"
                pruned = None
                row = reuse(name)
                if row is None:
                    if report_only:
                        continue
                    pcfg = PruneConfig(**{kind: ratio}, scorer=scorer, samples=cfg.fisher_samples, seed=cfg.seed)
                    t0 = time.time()
                    pruned, rep = prune_model(copy.deepcopy(teacher), data, pcfg, max_len)
                    s = rep["structured"][kind]
                    row = measure(name, pruned, kind=kind, ratio=ratio, scorer=scorer,
                                  effective_ratio=s["effective_ratio"], units=f"{s['before']}->{s['after']}",
                                  prune_seconds=time.time() - t0, recovered=False)
                info = {k: row[k] for k in ("kind", "ratio", "scorer", "effective_ratio", "units", "prune_seconds")}
                # A ratio the model cannot express (e.g. 25% of 2 heads) changed nothing: no recovery.
                if cfg.recovery == "none" or row["effective_ratio"] <= 0:
                    continue
                rname = f"{name}+{cfg.recovery}"
                if reuse(rname, recovered=True) is None and not report_only:
                    if pruned is None:
                        pruned, _ = load_model(work / "models" / name)
                    rec, rinfo = _recover(teacher, pruned, data, max_len, cfg, work / "recovery" / name)
                    measure(rname, rec, **info, recovered=True, recovery=rinfo)
    if cfg.sparsity > 0:
        sname = f"sparse{round(cfg.sparsity * 100)}-fisher_weighted"
        if reuse(sname) is None and not report_only:
            pcfg = PruneConfig(sparsity=cfg.sparsity, samples=cfg.fisher_samples, seed=cfg.seed)
            sparse, rep = prune_model(copy.deepcopy(teacher), data, pcfg, max_len)
            measure(sname, sparse, kind="unstructured", ratio=cfg.sparsity, effective_ratio=rep["sparsity"]["total"],
                    scorer="fisher_weighted")
    base_onnx = Path(base["onnx"])
    for q in cfg.quantize:
        qname = f"float {q}"
        if reuse(qname) is not None or report_only:
            continue
        mode = "fp16" if q == "fp16" else "int8"
        path = quantize_onnx(base_onnx, work / "onnx" / f"float.{q}.onnx", mode, per_channel=q == "int8_per_channel")
        cmp = compare_onnx(base_onnx, path, test.histories, max_len, emb, test.targets)
        res = evaluate_scorer(_onnx_scorer(path, emb, max_len), test)
        per_user[qname] = res.per_user["ndcg@10"]
        rows.append({"name": qname, "kind": q, "params": base["params"], "nonzero_params": base["nonzero_params"],
                     "ckpt_bytes": None, "ckpt_zlib_bytes": None, "onnx_bytes": path.stat().st_size, "onnx": str(path),
                     "ndcg@10": res.metrics["ndcg@10"], "hr@10": res.metrics["hr@10"],
                     "top10_agreement": cmp["top10_agreement"], "max_abs_diff": cmp["max_abs_diff"]})
        store(rows[-1])
    for r in rows:
        r["ndcg@10_vs_float"] = paired_bootstrap(per_user[r["name"]], per_user["float"], seed=cfg.seed)
    print("timing all graphs, interleaved ...", file=sys.stderr)
    lat = compare_latency({r["name"]: r["onnx"] for r in rows}, test.histories, max_len, (1, 64),
                          cfg.rounds, cfg.calls, cfg.threads)
    for r in rows:
        for b in (1, 64):
            ms = lat[r["name"]][f"batch_{b}"]["ms_median"]
            r[f"b{b}_ms"] = ms
            r[f"b{b}_ratio"] = ms / lat["float"][f"batch_{b}"]["ms_median"]
    payload = {"config": cfg.model_dump(), "model": str(model_dir), "data": str(data_name), "max_len": max_len,
               "test_users": len(test), "machine": machine, "work": str(work), "report_only": report_only,
               "rows": rows}
    write_json(out / "pruning.json", payload)
    atomic_write(out / "pruning.md", _markdown(payload))
    _plot(rows, out / "pruning.png")
    return payload


def _markdown(p: dict) -> str:
    headers = ["model", "params", "non-zero", "ckpt MB (zlib)", "ONNX MB", "NDCG@10", "Δ NDCG@10 [95% CI]", "HR@10",
               "latency ×, 1 req", "latency ×, batch 64", "notes"]
    rows = []
    for r in p["rows"]:
        d = r["ndcg@10_vs_float"]
        notes = []
        if "units" in r:
            notes.append(f"{r['kind']} {r['units']} (removed {r['effective_ratio']:.0%} of {r['ratio']:.0%} asked)")
        if r["kind"] == "unstructured":
            notes.append(f"sparsity {r['effective_ratio']:.1%}")
        if "top10_agreement" in r:
            notes.append(f"top-10 agreement with float {r['top10_agreement']:.3f}")
        if r.get("recovery"):
            notes.append(f"{r['recovery']['method']} {r['recovery']['seconds']:.0f} s")
        ckpt = (f"{r['ckpt_bytes'] / 2**20:.2f} ({r['ckpt_zlib_bytes'] / 2**20:.2f})" if r["ckpt_bytes"] else None)
        rows.append([r["name"], f"{r['params']:,}", f"{r['nonzero_params']:,}", ckpt, f"{r['onnx_bytes'] / 2**20:.2f}",
                     f"{r['ndcg@10']:.4f}", f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]",
                     f"{r['hr@10']:.4f}", f"{r['b1_ratio']:.2f}", f"{r['b64_ratio']:.2f}", "; ".join(notes)])
    base = next(r for r in p["rows"] if r["name"] == "float")
    cfg = p["config"]
    return "\n".join([
        "# Pruning and quantization", "",
        f"Model `{p['model']}` on `{p['data']}`: {p['test_users']} test users, full ranking, seen items excluded; "
        "metrics computed from the exported ONNX graph. Latency: ONNX Runtime, "
        f"{cfg['threads'] or 'default'} intra-op thread(s), histories left-padded to {p['max_len']}, median of "
        f"{cfg['rounds']}×{cfg['calls']} calls per graph, all graphs interleaved in one run; ratios are to the float "
        f"graph ({base['b1_ms']:.2f} ms per request, {base['b64_ms']:.2f} ms per batch of 64).", "",
        md_table(headers, rows), "",
        "Unstructured sparsity zeroes weights but keeps every tensor dense: ONNX Runtime multiplies the zeros, so it "
        "gives no speed-up (only a smaller compressed checkpoint). Structured pruning shrinks the tensors; every layer "
        "keeps the same number of heads/channels so stock `from_pretrained` loads the result.", "",
        f"Machine: {machine_md(p['machine'])}.", "",
    ])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"float": "black", "heads": "tab:blue", "mlp": "tab:orange", "hidden": "tab:brown", "unstructured": "tab:gray",
              "int8": "tab:green", "int8_per_channel": "tab:olive", "fp16": "tab:purple"}
    for ax, b in zip(axes, (1, 64), strict=True):
        for r in rows:
            marker = "s" if r.get("recovered") else ("x" if r.get("scorer") == "magnitude" else "o")
            ax.scatter(r[f"b{b}_ratio"], r["ndcg@10"], color=colors.get(r["kind"], "tab:red"), marker=marker)
            ax.annotate(r["name"], (r[f"b{b}_ratio"], r["ndcg@10"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axvline(1.0, color="lightgray", lw=0.8)
        ax.set_xlabel(f"latency ratio to float, batch {b}")
        ax.set_ylabel("test NDCG@10")
        ax.set_title(f"quality vs latency (batch {b}); o fisher, x magnitude, s recovered")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pruning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (the teacher)")
    ap.add_argument("--data", default="ml-latest-small")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kinds", nargs="+", choices=["heads", "mlp", "hidden"])
    ap.add_argument("--ratios", nargs="+", type=float)
    ap.add_argument("--scorers", nargs="+", choices=["fisher", "magnitude"])
    ap.add_argument("--recovery", choices=["distill", "finetune", "none"])
    ap.add_argument("--recovery-epochs", type=int)
    ap.add_argument("--recovery-minutes", type=float)
    ap.add_argument("--recovery-config", help="YAML of DistillConfig fields for the recovery distillation")
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--quantize", nargs="*", choices=["int8", "int8_per_channel", "fp16"])
    ap.add_argument("--fisher-samples", type=int)
    ap.add_argument("--users", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--calls", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", help="models, ONNX graphs, recovery runs and the per-cell cache (default: --out)")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing new: tables from the cells finished in the work directory")
    args = vars(ap.parse_args(argv))
    model, data, out = args.pop("model"), args.pop("data"), args.pop("out")
    work, report_only = args.pop("work"), args.pop("report_only")
    def body() -> None:
        cfg = PruningBenchConfig(**{k: v for k, v in args.items() if v is not None})
        print(_markdown(run(cfg, model, data, out, work, report_only)))

    return run_guarded("benchmarks.pruning", body)

if __name__ == "__main__":
    sys.exit(main())
