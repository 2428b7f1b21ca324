"""The quantization search as a Markdown table and a plot (agreement vs speed): one rendering for
the job's report and for benchmarks/quantization.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from compressor.markdown import table as _table


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _kept(row: dict) -> str:
    kept = row.get("kept_float")
    if isinstance(kept, str):
        return kept
    if not kept:
        return f"none (= {row['same_as']})" if row.get("same_as") else "none"
    params = row.get("kept_float_params") or kept
    return f"{len(kept)} of {row.get('weight_matmuls', '?')}: " + ", ".join(str(p).removesuffix(".weight") for p in params[:4]) + (
        ", ..." if len(kept) > 4 else "")


def rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """One row per method (float first): what it kept in float, agreement, NDCG@10 with the paired
    interval against float, size, batch-1 latency, batch-64 throughput, verdict."""
    k = doc["budget"]["k"]
    head = ["method", "kept in float", f"top-{k} agreement", "valid NDCG@10", "Δ vs float [95% CI]", "MB",
            "batch-1 ms", "× float", "batch-64 /s", "× float", "budget"]
    out = []
    methods = doc["methods"]
    for name in ["float", *[n for n in methods if n != "float"]]:
        r = methods.get(name)
        if r is None:
            continue
        if "error" in r:
            out.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"failed: {r['error'][:80]}"])
            continue
        b = r.get("bootstrap_ndcg@10")
        ci = f"{b['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]" if b else "-"
        verdict = "chosen" if name == doc.get("chosen") else ("reference" if name == "float" else
                                                               "within" if r["passed"] else "outside")
        out.append([name, _kept(r), _f(r.get("topk_agreement")), _f(r.get("ndcg@10")), ci,
                    _f((r.get("file_bytes") or 0) / 2**20, 2), _f(r.get("batch_1_ms"), 3), _f(r.get("latency_speedup"), 2),
                    _f(r.get("batch_64_per_second"), 0), _f(r.get("throughput_ratio"), 2), verdict])
    return head, out


def markdown(doc: dict, plot: str | None = None) -> list[str]:
    """Lines: the budget, the table, the plot, the choice or the refusal, bf16's status."""
    b = doc["budget"]
    head, body = rows(doc)
    out = [f"Budget: top-{b['k']} agreement with the float graph ≥ {b['min_topk_agreement']} and validation NDCG@10 "
           f"at most {b['max_ndcg_drop']:.0%} below float's, on {b['users']} {b['split']} users; the fastest graph "
           f"within it at {doc['rank_by'].replace('_', ' ')} is chosen. Timing: {doc['timing_method']} "
           f"({doc['machine'].get('cpu')}, {doc['machine'].get('cores')} cores).", "", _table(head, body), ""]
    if plot:
        out += [f"![agreement vs speed]({plot})", ""]
    out += [f"Chosen: **{doc['chosen']}**." if doc.get("chosen") else f"Refused: {doc.get('refusal')}.", ""]
    if doc.get("served") is not None:
        out += [f"Served: {'the quantized graph' if doc['served'] else 'the float graph'}"
                + (f" ({doc['refusal']})" if not doc["served"] and doc.get("refusal") else "") + ".", ""]
    if doc.get("bf16"):
        out += [f"bf16: {'runs' if doc['bf16']['runs'] else 'not offered'}: {doc['bf16']['why']}.", ""]
    return out


def plot(docs: dict[str, dict], path: str | Path) -> Path:
    """Top-k agreement against batch-1 speed-up (left) and batch-64 throughput ratio (right), one
    marker per method, one colour per model, the budget's threshold as a line."""
    matplotlib.use("Agg")

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, label in ((axes[0], "latency_speedup", "batch-1 speed-up over float (×)"),
                           (axes[1], "throughput_ratio", "batch-64 throughput / float's (×)")):
        for (model, doc), colour in zip(docs.items(), ("C0", "C1", "C2", "C3"), strict=False):
            for name, r in doc["methods"].items():
                if r.get(key) is None:
                    continue
                ok = r.get("passed")
                ax.scatter(r[key], r["topk_agreement"], color=colour, marker="o" if ok else "x", s=55)
                ax.annotate(name, (r[key], r["topk_agreement"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.axhline(doc["budget"]["min_topk_agreement"], color=colour, ls="--", lw=0.8,
                       label=f"{model}: budget {doc['budget']['min_topk_agreement']}")
        ax.axvline(1.0, color="grey", lw=0.6)
        ax.set_xlabel(label)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("top-k agreement with float (validation)")
    fig.suptitle("Quantization: agreement vs speed (o within the budget, x outside)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
