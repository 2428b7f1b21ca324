"""Which teacher layers distil best: one method, several layer sets, the same budget and seeds.

    python -m benchmarks.layer_sets --runs top_k=benchmarks/results/llm_quality \\
        distributed=benchmarks/results/llm_quality_distributed ablation=... --method fisher_ld \\
        --out benchmarks/results/llm_layer_sets

A run may name its own method (`NAME=DIR@METHOD`), so the same table compares variants of one
method (different configs in different directories) with other methods' cells too.

Each run is a finished `benchmarks.quality` output directory whose student layers came from one
selection (a strategy, or `--layers` by hand) with the same method, seeds and budget. For every
depth the runs share, it reports the layers, the untrained truncation (the number the
`validated` strategy ranks sets by, on validation) and the distilled student (mean ± std over
seeds, validation and test NDCG@10), and a paired bootstrap over test users of each set minus
the first (per-user NDCG@10 averaged over seeds first, as benchmarks.quality does). Nothing is
trained here. Writes layer_sets.json, layer_sets.md and layer_sets.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import md_table, run_guarded, save_figure, write_results
from benchmarks.quality import _mean_std
from compressor.errors import CompressorError
from compressor.evaluate import paired_bootstrap


def _cells(run_dir: Path, method: str, depth: int) -> list[dict]:
    cells = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob(f"{method}_d{depth}_s*.json"))]
    return [c for c in cells if c["method"] == method and c["depth"] == depth]


def _run_layers(run_dir: Path) -> dict[int, list[int]]:
    common = run_dir / "common.json"
    if not common.is_file():
        raise CompressorError(f"{run_dir}: no common.json (not a benchmarks.quality output directory)")
    return {int(k): v for k, v in json.loads(common.read_text())["layers"].items()}


def compare(runs: dict[str, Path], method: str, methods: dict[str, str] | None = None,
            depths: list[int] | None = None) -> dict:
    """The table of every depth all runs measured (or `depths`), the first run as the reference.
    `methods`: a run's own method instead of `method`."""
    methods = {name: (methods or {}).get(name) or method for name in runs}
    layers = {name: _run_layers(d) for name, d in runs.items()}
    shared = set.intersection(*(set(ls) for ls in layers.values()))
    depths = sorted(shared if depths is None else shared & set(depths), reverse=True)
    reference = next(iter(runs))
    out: dict = {"method": method, "runs": {n: str(d) for n, d in runs.items()}, "methods": methods,
                 "reference": reference, "depths": {}}
    for k in depths:
        rows, ref = {}, None
        for name, d in runs.items():
            cs, floor = _cells(d, methods[name], k), _cells(d, "truncated", k)
            if not cs:
                if name == reference:  # no reference, no differences: the depth is skipped
                    break
                continue
            per_user = np.mean([c["per_user_ndcg10"] for c in cs], axis=0)
            test = [c["test"]["ndcg@10"] for c in cs]
            valid = [c["valid"]["ndcg@10"] for c in cs]
            row = {"layers": layers[name][k], "method": methods[name], "seeds": sorted(c["seed"] for c in cs),
                   "test_ndcg@10": list(_mean_std(test)), "valid_ndcg@10": list(_mean_std(valid)),
                   "truncated_valid_ndcg@10": floor[0]["valid"]["ndcg@10"] if floor else None,
                   "truncated_test_ndcg@10": floor[0]["test"]["ndcg@10"] if floor else None}
            if ref is None:
                ref = per_user
            elif len(per_user) == len(ref):
                row["minus_reference"] = paired_bootstrap(per_user, ref)
            rows[name] = row
        if rows:
            out["depths"][str(k)] = rows
    if not out["depths"]:
        raise CompressorError(f"no depth where the reference run {reference!r} has {methods[reference]} cells")
    return out


def markdown(doc: dict) -> str:
    several = len(set((doc.get("methods") or {}).values())) > 1
    lines = [f"# Layer sets distilled with {doc['method']}" if not several else "# Runs compared", "",
             "Test and validation NDCG@10 mean ± std over seeds; `untrained` = the truncated student before "
             "training (validation / test), which the `validated` strategy ranks sets by; the last column is "
             f"the paired bootstrap over test users of each set minus `{doc['reference']}`.", ""]
    for k, rows in doc["depths"].items():
        table = []
        for name, r in rows.items():
            b = r.get("minus_reference")
            untrained = (None if r["truncated_valid_ndcg@10"] is None
                         else f"{r['truncated_valid_ndcg@10']:.4f} / {r['truncated_test_ndcg@10']:.4f}")
            table.append([name, *([r["method"]] if several else []), str(r["layers"]), len(r["seeds"]), untrained,
                          f"{r['valid_ndcg@10'][0]:.4f} ± {r['valid_ndcg@10'][1]:.4f}",
                          f"{r['test_ndcg@10'][0]:.4f} ± {r['test_ndcg@10'][1]:.4f}",
                          "—" if b is None else f"{b['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]"])
        lines += [f"## {k} layers", "", md_table(["set", *(["method"] if several else []), "layers", "seeds",
                                                 "untrained valid / test",
                                                 "valid NDCG@10", "test NDCG@10", "test − reference [95% CI]"],
                                                table), ""]
    lines += ["Runs: " + ", ".join(f"{n} = `{d}`" for n, d in doc["runs"].items()) + ".", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = list(doc["depths"])
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
    for ax, k in zip(axes[0], depths, strict=True):
        rows = doc["depths"][k]
        names = list(rows)
        x = np.arange(len(names))
        for off, key, label in ((-0.2, "valid_ndcg@10", "valid"), (0.2, "test_ndcg@10", "test")):
            ax.bar(x + off, [rows[n][key][0] for n in names], 0.4, yerr=[rows[n][key][1] for n in names],
                   capsize=3, label=label)
        ax.set_xticks(x, names)
        ax.set_title(f"{k} layers, {doc['method']}")
        ax.set_ylabel("NDCG@10 (mean ± std over seeds)")
        ax.legend(loc="lower right")
    save_figure(fig, path)


def _named_dir(text: str) -> tuple[str, Path, str | None]:
    name, sep, rest = text.partition("=")
    path, _, method = rest.partition("@")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=DIR or NAME=DIR@METHOD")
    return name, Path(path), method or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layer_sets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=_named_dir, required=True,
                    help="NAME=DIR or NAME=DIR@METHOD of finished benchmarks.quality runs; the first is the reference")
    ap.add_argument("--method", default="fisher_ld", help="the method of runs that name none")
    ap.add_argument("--depths", type=lambda t: [int(x) for x in t.split(",")], help="only these depths, e.g. 4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> None:
        runs = {name: path for name, path, _ in args.runs}
        if len(runs) < 2:
            raise CompressorError("give at least two runs to compare")
        doc = compare(runs, args.method, {name: m for name, _, m in args.runs if m}, args.depths)
        write_results(args.out, "layer_sets", doc, markdown, plot)
        print(markdown(doc))

    return run_guarded("benchmarks.layer_sets", body)


if __name__ == "__main__":
    sys.exit(main())
