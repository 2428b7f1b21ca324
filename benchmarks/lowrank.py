"""Low-rank factorization benchmark: plain vs Fisher-weighted SVD, before and after recovery, with int8.

    python -m benchmarks.lowrank --model runs/teacher12 --data ml-latest-small --out benchmarks/results/lowrank \\
        --work runs/lowrank_work

For each ratio of parameters kept (in the decoder layers' linears) and each scorer (plain SVD,
Fisher-weighted SVD) it factorizes the model, then runs a short recovery distillation from the
unfactorized model (FISHER-LD, benchmarks.pruning's recovery) and int8-quantizes the recovered
graph. Each graph gets: parameters, ONNX size, validation loss (next-item cross-entropy, from
PyTorch; the loss the Fisher describes), test NDCG@10 / HR@10 of the exported graph (full
ranking, seen items excluded) with a paired bootstrap CI of the change against the float model,
and single-request and batch-64 latency as a ratio to the float graph (ONNX Runtime, all graphs
timed interleaved in one run). Writes lowrank.json, lowrank.md and lowrank.png to --out; models,
graphs, recovery runs and a per-cell cache go to --work, so a rerun reuses finished cells.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
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
from benchmarks.pruning import PruningBenchConfig, _onnx_scorer, _recover, recovery_distill_config
from compressor.atomic import atomic_write

CELLS = "cells"


class LowRankBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratios: list[float] = Field([0.75, 0.5, 0.25], description="fractions of the factorized parameters kept")
    scorers: list[Literal["svd", "fisher"]] = ["svd", "fisher"]
    scopes: list[Literal["per_matrix", "global"]] = ["per_matrix"]
    recovery_epochs: int = Field(1, ge=0, description="FISHER-LD epochs after factorizing; 0 = no recovery")
    recovery_minutes: float = Field(4.0, gt=0, description="wall-clock cap of each recovery run")
    recovery_recent_windows: int | None = Field(
        None, ge=1, description="recovery on each user's newest N windows only (None = all): an LLM student's epoch on a CPU")
    recovery_config: str | None = Field(
        None, description="YAML of DistillConfig fields for the recovery distillation (e.g. "
                          "benchmarks/configs/llm_distill.yaml for an LLM student); None = the distill defaults")
    int8: bool = Field(True, description="also measure the int8 graph of the float model and of each recovered one")
    fisher_samples: int = Field(512, ge=1)
    users: int | None = Field(None, ge=1, description="test users evaluated; None = all")
    rounds: int = Field(3, ge=1)
    calls: int = Field(10, ge=1)
    threads: int | None = Field(1, ge=1)
    seed: int = 0

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        return open_unit_ratios(v)


def valid_loss(model, data, max_len: int, users: int = 10_000) -> np.ndarray:
    """Per-user next-item cross-entropy on the validation split (the split the Fisher reads)."""
    from compressor.fisher import ProbeSet, last_item_loss

    probe = ProbeSet.from_data(data, max_len, users)
    with torch.no_grad():
        return torch.cat([last_item_loss(model.eval(), *b, reduction="none")
                          for b in probe.batches(128)]).double().numpy()


def run(cfg: LowRankBenchConfig, model_dir: str | Path, data_name: str, out: str | Path,
        work: str | Path | None = None) -> dict:
    from compressor.data import prepare
    from compressor.evaluate import evaluate_scorer, paired_bootstrap
    from compressor.export import export_onnx, item_embeddings
    from compressor.lowrank import LowRankConfig, factorize
    from compressor.modeling import count_parameters, load_model, model_max_len, save_model
    from compressor.quantize import compare_onnx, quantize_onnx
    from compressor.speed import compare_latency

    recovery = PruningBenchConfig(recovery="distill", recovery_epochs=max(1, cfg.recovery_epochs),
                                  recovery_minutes=cfg.recovery_minutes, recovery_recent_windows=cfg.recovery_recent_windows,
                                  recovery_config=cfg.recovery_config, seed=cfg.seed)
    recovery_distill = recovery_distill_config(recovery)  # a bad recovery config fails before any work
    out = Path(out)
    work = Path(work).resolve() if work is not None else out.resolve()
    for d in (out, work / "onnx", work / CELLS):
        d.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    teacher, vocab = load_model(model_dir)
    data = prepare(data_name, vocab=vocab)
    max_len = model_max_len(teacher)
    test = data.split("test")
    test = test.subset(cfg.users, cfg.seed) if cfg.users else test
    key = {"model": str(Path(model_dir).resolve()), "data": data_name, "users": cfg.users, "seed": cfg.seed,
           "fisher_samples": cfg.fisher_samples, "recovery_epochs": cfg.recovery_epochs,
           "recovery_minutes": cfg.recovery_minutes, "recovery_recent_windows": cfg.recovery_recent_windows}
    if cfg.recovery_config is not None:
        key["recovery_distill"] = recovery_distill.model_dump(mode="json")
    rows: list[dict] = []
    per_user: dict[str, np.ndarray] = {}
    base_loss = valid_loss(teacher, data, max_len)

    def reuse(name: str) -> dict | None:
        path = work / CELLS / f"{name}.json"
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        if cell["key"] != key or not Path(cell["row"]["onnx"]).is_file():
            return None
        rows.append(cell["row"])
        per_user[name] = np.asarray(cell["per_user_ndcg@10"])
        print(f"{name}: reused", file=sys.stderr)
        return cell["row"]

    def record(row: dict, res) -> dict:
        per_user[row["name"]] = res.per_user["ndcg@10"]
        row.update({"ndcg@10": res.metrics["ndcg@10"], "hr@10": res.metrics["hr@10"]})
        rows.append(row)
        write_json(work / CELLS / f"{row['name']}.json", {"key": key, "row": row,
                                                          "per_user_ndcg@10": per_user[row["name"]].tolist()})
        print(f"{row['name']}: NDCG@10 {row['ndcg@10']:.4f}, {row.get('params', 0):,} parameters", file=sys.stderr)
        return row

    def measure(name: str, model, **info) -> dict:
        model = model.cpu().eval()
        save_model(model, vocab, work / "models" / name)
        path = export_onnx(model, work / "onnx" / f"{name}.onnx", max_len)
        res = evaluate_scorer(_onnx_scorer(path, item_embeddings(model)[0], max_len), test)
        loss = valid_loss(model, data, max_len)
        return record({"name": name, "params": count_parameters(model), "onnx_bytes": path.stat().st_size,
                       "onnx": str(path), "valid_loss": float(loss.mean()),
                       "valid_loss_increase": float((loss - base_loss).mean()), **info}, res)

    def int8(name: str, src: dict, model_dir: Path) -> None:
        qname = f"{name} int8"
        if reuse(qname) is not None:
            return
        emb = item_embeddings(load_model(model_dir)[0])[0]
        path = quantize_onnx(src["onnx"], work / "onnx" / f"{name}.int8.onnx", "int8")
        cmp = compare_onnx(src["onnx"], path, test.histories, max_len, emb)
        res = evaluate_scorer(_onnx_scorer(path, emb, max_len), test)
        record({"name": qname, "kind": "int8", "of": name, "params": src["params"], "onnx_bytes": path.stat().st_size,
                "onnx": str(path), "top10_agreement_with_float_graph": cmp["top10_agreement"]}, res)

    base = reuse("float") or measure("float", teacher, kind="float")
    if cfg.int8:
        int8("float", base, Path(model_dir))
    # First every factorization (cheap), then the recovery runs (the expensive part), so a run
    # stopped midway has the whole before-recovery table.
    grid = [(scope, ratio, scorer) for scope in cfg.scopes for ratio in cfg.ratios for scorer in cfg.scorers]
    infos = {}
    for scope, ratio, scorer in grid:
        name = f"r{round(ratio * 100)}-{scorer}" + ("-global" if scope == "global" else "")
        row = reuse(name)
        if row is None:
            lcfg = LowRankConfig(ratio=ratio, scorer=scorer, scope=scope, samples=cfg.fisher_samples, seed=cfg.seed)
            t0 = time.time()
            model, rep = factorize(copy.deepcopy(teacher), data, lcfg, max_len, progress=False)
            ranks = sorted({m["rank"] for m in rep["matrices"] if m["rank"] is not None})
            row = measure(name, model, kind="lowrank", ratio=ratio, scorer=scorer, scope=scope,
                          effective_ratio=rep["effective_ratio"], factorized=rep["factorized"],
                          kept_dense=rep["kept_dense"], ranks=f"{ranks[0]}–{ranks[-1]}" if ranks else "",
                          factorize_seconds=time.time() - t0, recovered=False)
        infos[name] = {k: row[k] for k in ("ratio", "scorer", "scope", "effective_ratio", "factorized", "kept_dense",
                                           "ranks")}
    if cfg.recovery_epochs > 0:
        # The control: the unfactorized model given the same recovery run, so a gain that any extra
        # training would bring is not read as a benefit of factorizing.
        for name in ["float", *infos]:
            rname = f"{name}+distill"
            rrow = reuse(rname)
            if rrow is None:
                model, _ = load_model(work / "models" / name)
                rec, rinfo = _recover(teacher, model, data, max_len, recovery, work / "recovery" / name)
                rrow = measure(rname, rec, kind="lowrank" if name in infos else "control", **infos.get(name, {}),
                               recovered=True, recovery=rinfo)
            if cfg.int8 and name != "float":
                int8(rname, rrow, work / "models" / rname)
    for r in rows:
        r["ndcg@10_vs_float"] = paired_bootstrap(per_user[r["name"]], per_user["float"], seed=cfg.seed)
    print("timing all graphs, interleaved ...", file=sys.stderr)
    lat = compare_latency({r["name"]: r["onnx"] for r in rows}, test.histories, max_len, (1, 64),
                          cfg.rounds, cfg.calls, cfg.threads)
    for r in rows:
        for b in (1, 64):
            r[f"b{b}_ms"] = lat[r["name"]][f"batch_{b}"]["ms_median"]
            r[f"b{b}_ratio"] = r[f"b{b}_ms"] / lat["float"][f"batch_{b}"]["ms_median"]
    payload = {"config": cfg.model_dump(), "model": str(model_dir), "data": data_name, "max_len": max_len,
               "test_users": len(test), "machine": machine, "work": str(work), "rows": rows}
    write_json(out / "lowrank.json", payload)
    atomic_write(out / "lowrank.md", _markdown(payload))
    _plot(rows, out / "lowrank.png")
    return payload


def _markdown(p: dict) -> str:
    headers = ["model", "params", "ONNX MB", "Δ valid loss", "NDCG@10", "Δ NDCG@10 [95% CI]", "HR@10",
               "latency ×, 1 req", "latency ×, batch 64", "notes"]
    rows = []
    for r in p["rows"]:
        d = r["ndcg@10_vs_float"]
        notes = []
        if r.get("kind") == "lowrank":
            notes.append(f"{r['factorized']} matrices at ranks {r['ranks']} keep {r['effective_ratio']:.0%} of their "
                         f"parameters" + (f", {r['kept_dense']} dense" if r["kept_dense"] else ""))
        if r.get("recovery"):
            notes.append(f"{r['recovery']['method']} {r['recovery']['steps']} steps, {r['recovery']['seconds']:.0f} s")
        if "top10_agreement_with_float_graph" in r:
            notes.append(f"top-10 agreement with its float graph {r['top10_agreement_with_float_graph']:.3f}")
        loss = r.get("valid_loss_increase")
        rows.append([r["name"], f"{r['params']:,}", f"{r['onnx_bytes'] / 2**20:.2f}",
                     None if loss is None else f"{loss:+.3f}", f"{r['ndcg@10']:.4f}",
                     f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]", f"{r['hr@10']:.4f}",
                     f"{r['b1_ratio']:.2f}", f"{r['b64_ratio']:.2f}", "; ".join(notes)])
    base = next(r for r in p["rows"] if r["name"] == "float")
    cfg = p["config"]
    return "\n".join([
        "# Low-rank factorization", "",
        f"Model `{p['model']}` on `{p['data']}`: {p['test_users']} test users, full ranking, seen items excluded; "
        "NDCG@10 / HR@10 from the exported ONNX graph, Δ valid loss = mean change of the next-item cross-entropy on "
        f"the validation split (PyTorch; the float model's is {base['valid_loss']:.3f}). Ratios are parameters kept "
        "in the decoder layers' linears (embeddings and head untouched). Latency: ONNX Runtime, "
        f"{cfg['threads'] or 'default'} intra-op thread(s), histories left-padded to {p['max_len']}, median of "
        f"{cfg['rounds']}×{cfg['calls']} calls per graph, all graphs interleaved in one run; ratios are to the float "
        f"graph ({base['b1_ms']:.2f} ms per request, {base['b64_ms']:.2f} ms per batch of 64).", "",
        md_table(headers, rows), "",
        f"Machine: {machine_md(p['machine'])}.", "",
    ])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"svd": "tab:blue", "fisher": "tab:orange"}
    for ax, (key, label) in zip(axes, (("params", "parameters"), ("b64_ratio", "latency ratio to float, batch 64")),
                                strict=True):
        for r in rows:
            color = colors.get(r.get("scorer"), "black")
            marker = "^" if r.get("kind") == "int8" else ("s" if r.get("recovered") else "o")
            ax.scatter(r[key], r["ndcg@10"], color=color, marker=marker)
            ax.annotate(r["name"], (r[key], r["ndcg@10"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("test NDCG@10")
    axes[0].set_title("quality vs size; blue svd, orange fisher, black float")
    axes[1].set_title("quality vs latency; o factorized, s +distill, ^ int8")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lowrank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (the teacher)")
    ap.add_argument("--data", default="ml-latest-small")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", help="models, graphs, recovery runs and the per-cell cache (default: --out)")
    ap.add_argument("--ratios", nargs="+", type=float)
    ap.add_argument("--scorers", nargs="+", choices=["svd", "fisher"])
    ap.add_argument("--scopes", nargs="+", choices=["per_matrix", "global"])
    ap.add_argument("--recovery-epochs", type=int)
    ap.add_argument("--recovery-minutes", type=float)
    ap.add_argument("--recovery-recent-windows", type=int)
    ap.add_argument("--recovery-config", help="YAML of DistillConfig fields for the recovery distillation")
    ap.add_argument("--no-int8", dest="int8", action="store_false", default=None)
    ap.add_argument("--fisher-samples", type=int)
    ap.add_argument("--users", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--calls", type=int)
    ap.add_argument("--threads", type=int)
    args = vars(ap.parse_args(argv))
    model, data, out, work = args.pop("model"), args.pop("data"), args.pop("out"), args.pop("work")
    def body() -> None:
        cfg = LowRankBenchConfig(**{k: v for k, v in args.items() if v is not None})
        print(_markdown(run(cfg, model, data, out, work)))

    return run_guarded("benchmarks.lowrank", body)

if __name__ == "__main__":
    sys.exit(main())
