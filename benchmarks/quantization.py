"""Quantization benchmark: every method of `compressor.quantize_budget` on exported artifacts.

For each artifact (a student, and its teacher quantized the same way for the fair comparison) the
budgeted search runs once: each method's graph is judged against the float graph on validation
histories (top-10 agreement, NDCG@10 with a paired bootstrap), timed in one interleaved ONNX
Runtime run (batch-1 latency, batch-64 throughput), and the fastest within the budget is chosen.
Every graph is then also scored on the TEST split (the choice is made on validation; test is
reported): NDCG@10 and its paired bootstrap interval against the float graph.

    python -m benchmarks.quantization --artifact student=runs/default/student \\
        --artifact teacher=runs/default/teacher --out benchmarks/results/quantization

Writes results.json, results.md and agreement_vs_speed.png under --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from benchmarks.common import machine_info, run_guarded, write_json
from compressor.atomic import atomic_write
from compressor.quantize_budget import QuantizeConfig


class QuantBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifacts: dict[str, str] = Field(description="label -> artifact directory (its float model.onnx is quantized)")
    model_dirs: dict[str, str] = Field({}, description="label -> model directory for fisher_mixed (default: the "
                                       "manifest's source_model_dir)")
    data: str = Field("ml-latest-small", description="data (bundled name or path) in the artifacts' vocabulary")
    quantization: QuantizeConfig = Field(QuantizeConfig(), description="methods and budget")
    test_users: int | None = Field(None, ge=1, description="test users scored per graph (None = all)")
    note: str = Field("", description="what the artifacts are (recorded in the results)")


def _test_quality(graphs: dict[str, Path], split, emb: np.ndarray, bias, max_len: int, resamples: int) -> dict:
    """Test NDCG@10 / HR@10 of each graph and the paired bootstrap of NDCG@10 against float."""
    from compressor.evaluate import METRICS, paired_bootstrap, target_ranks
    from compressor.quantize import onnx_hidden

    per_user, out = {}, {}
    for name, path in graphs.items():
        hidden = onnx_hidden(path, split.histories, max_len)
        ranks = []
        for a in range(0, len(hidden), 256):
            scores = hidden[a : a + 256] @ emb.T + (bias if bias is not None else 0)
            ranks.append(target_ranks(scores, split.histories[a : a + 256], split.targets[a : a + 256])[0])
        rank = np.concatenate(ranks)
        per_user[name] = METRICS["ndcg@10"].fn(rank, 10)
        out[name] = {"ndcg@10": float(per_user[name].mean()), "hr@10": float(METRICS["hr@10"].fn(rank, 10).mean())}
    for name in graphs:
        if name != "float":
            out[name]["bootstrap_vs_float"] = paired_bootstrap(per_user[name], per_user["float"], resamples)
    return out


def run(cfg: QuantBenchConfig, out: str | Path, log=print) -> dict:
    """Search every artifact, score every graph on test, write results.json / .md / .png to `out`."""
    from compressor import artifact as art
    from compressor.data import prepare
    from compressor.data.vocab import ItemVocab
    from compressor.modeling import load_model
    from compressor.quantize_budget import search_quantization
    from compressor.quantize_report import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(), "config": cfg.model_dump(), "note": cfg.note, "models": {}}
    for label, adir in cfg.artifacts.items():
        adir = Path(adir)
        manifest = art.verify_artifact(adir, check_hashes=False)
        data = prepare(cfg.data, vocab=ItemVocab.load(adir))
        emb = np.load(adir / art.EMBEDDINGS)
        bias = np.load(adir / art.BIAS) if manifest.get("has_bias") else None
        model_dir = cfg.model_dirs.get(label) or manifest.get("source_model_dir")
        model = load_model(model_dir)[0] if "fisher_mixed" in cfg.quantization.methods and model_dir \
            and Path(model_dir).is_dir() else None
        work = out / f".work-{label}"
        t0 = time.perf_counter()
        try:
            log(f"[{label}] {adir}: {manifest.get('num_layers')} layers, hidden {manifest.get('hidden_size')}, "
                f"{len(data.split('valid'))} validation users")
            res = search_quantization(adir / art.MODEL_ONNX, work, data.split("valid"), emb, bias,
                                      int(manifest["max_len"]), cfg.quantization, model, log)
            test = data.split("test")
            if cfg.test_users:
                test = test.subset(cfg.test_users, cfg.quantization.seed)
            log(f"[{label}] scoring {len(res.graphs) + 1} graphs on {len(test)} test users")
            res.doc["test"] = _test_quality({"float": adir / art.MODEL_ONNX, **res.graphs}, test, emb, bias,
                                            int(manifest["max_len"]), cfg.quantization.bootstrap_resamples)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        res.doc.update({"artifact": str(adir), "num_layers": manifest.get("num_layers"),
                        "hidden_size": manifest.get("hidden_size"), "parameters": manifest.get("parameters"),
                        "seconds": round(time.perf_counter() - t0, 1)})
        results["models"][label] = res.doc
    plot(results["models"], out / "agreement_vs_speed.png")
    write_json(out / "results.json", results)
    atomic_write(out / "results.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    from compressor.quantize_report import markdown as search_markdown
    from compressor.report import _table

    m = results["machine"]
    lines = ["# Quantization: every method within a quality budget", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, ONNX Runtime {m['onnxruntime']}, "
             f"load average {m['load_average_1m']} at {m['date']} (other jobs shared the CPU: ratios measured "
             "interleaved in one run are what to read).", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    lines += ["![agreement vs speed](agreement_vs_speed.png)", ""]
    for label, doc in results["models"].items():
        lines += [f"## {label}: {doc['num_layers']} layers, hidden {doc['hidden_size']}, "
                  f"{doc['parameters']:,} parameters ({doc['seconds']} s)", "", *search_markdown(doc)]
        test = doc.get("test") or {}
        rows = []
        for name, t in test.items():
            b = t.get("bootstrap_vs_float")
            rows.append([name, f"{t['ndcg@10']:.4f}", f"{t['hr@10']:.4f}",
                         f"{b['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]" if b else "-",
                         ("yes" if b["excludes_zero"] else "no") if b else "-"])
        if rows:
            lines += ["Test split (reported, not used for the choice):", "",
                      _table(["graph", "test NDCG@10", "test HR@10", "Δ NDCG@10 vs float [95% CI]",
                              "CI excludes 0"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", action="append", required=True, metavar="LABEL=DIR",
                    help="an artifact directory to quantize (repeat: student=..., teacher=...)")
    ap.add_argument("--model-dir", action="append", default=[], metavar="LABEL=DIR",
                    help="the model directory of an artifact, for fisher_mixed (default: its manifest's)")
    ap.add_argument("--data", default="ml-latest-small")
    ap.add_argument("--out", required=True)
    ap.add_argument("--test-users", type=int)
    ap.add_argument("--note", default="")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="QuantizeConfig fields, e.g. users=610")
    args = ap.parse_args(argv)

    def pairs(items: list[str], what: str) -> dict[str, str]:
        from compressor.errors import CompressorError

        bad = [i for i in items if "=" not in i]
        if bad:
            raise CompressorError(f"{what} {bad[0]!r}: expected LABEL=DIR")
        return dict(i.split("=", 1) for i in items)

    def body() -> None:
        from compressor.config import load_config

        qcfg = load_config(QuantizeConfig, None, args.overrides)
        cfg = QuantBenchConfig(artifacts=pairs(args.artifact, "--artifact"), model_dirs=pairs(args.model_dir, "--model-dir"),
                               data=args.data, quantization=qcfg, test_users=args.test_users, note=args.note)
        print(markdown(run(cfg, args.out)))

    return run_guarded("benchmarks.quantization", body)


if __name__ == "__main__":
    sys.exit(main())
