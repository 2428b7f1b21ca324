"""Serving defaults derived from retrieval measurements, their Markdown, and the plot.

Pure functions of the result rows written by `benchmarks.retrieval`, so the rules can be
tested on hand-made rows.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import machine_md, md_table  # noqa: E402

KIND_STYLE = {"flat": ("k", "*"), "hnsw": ("tab:blue", "o"), "ivf": ("tab:orange", "s"),
              "ivf_l2": ("tab:green", "^")}


def best_row(rows: list[dict], catalogue: str, kind: str, target: float) -> dict | None:
    """The fastest (batch-1 p50) setting of `kind` on `catalogue` with recall >= target."""
    ok = [r for r in rows if r["catalogue"] == catalogue and r["index"] == kind and r["recall"] >= target]
    return min(ok, key=lambda r: r["b1_ms_p50"]) if ok else None


def _round2(x: float) -> int:
    """Two significant figures: a threshold is an order of magnitude, not a measurement."""
    if x <= 0:
        return 0
    digits = int(math.floor(math.log10(x))) - 1
    return int(round(x, -digits))


def _crossing(xs: list[int], ys: list[float], level: float) -> tuple[float | None, str]:
    """First x where y reaches `level`, interpolated linearly in log-log space between measured points."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y < level:
            continue
        if i == 0:
            return float(x), f"already {y:.3g} at the smallest size {x:,}"
        x0, y0 = xs[i - 1], ys[i - 1]
        t = (math.log(level) - math.log(y0)) / (math.log(y) - math.log(y0))
        est = math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))
        return est, f"{y0:.3g} at {x0:,}, {y:.3g} at {x:,}"
    return None, f"{ys[-1]:.3g} at {xs[-1]:,}, the largest size measured"


def flat_threshold(points: list[tuple[int, float, float]], speedup: float, budget_ms: float) -> dict:
    """Catalogue size above which HNSW should replace exact flat search.

    points: (n, flat_ms, hnsw_ms) sorted by n (batch-1 p50, HNSW at the recall target). Two
    conditions must both hold: flat costs more than `budget_ms` per query (below that, exact
    search is negligible next to the model), and HNSW is `speedup` x faster. Each crossing is
    interpolated in log-log space (flat grows ~N, HNSW ~log N); if flat never exceeds the
    budget it is extrapolated linearly in N from the largest size.
    """
    if not points:
        return {"flat_max_items": None, "basis": "flat and HNSW at the recall target were not both measured"}
    ns = [p[0] for p in points]
    n_speed, why_speed = _crossing(ns, [f / h for _, f, h in points], speedup)
    n_budget, why_budget = _crossing(ns, [f for _, f, _ in points], budget_ms)
    if n_budget is None:
        n_budget = ns[-1] * budget_ms / points[-1][1]
        why_budget += f"; extrapolated linearly to {_round2(n_budget):,}"
    basis = f"flat/HNSW latency ratio {why_speed}; flat batch-1 ms {why_budget}"
    if n_speed is None:
        return {"flat_max_items": None, "basis": f"HNSW never became {speedup:g}x faster than flat ({basis})"}
    return {"flat_max_items": _round2(max(n_speed, n_budget)), "basis": basis}


# ANN kinds the recommendation covers: (search-time parameter, build-time parameters it reports)
ANN = {"hnsw": ("efSearch", ("M", "efConstruction")), "ivf": ("nprobe", ("nlist",)),
       "ivf_l2": ("nprobe", ("nlist", "transform"))}
ANN_NOTE = {"hnsw": "graph, no training, CPU only",
            "ivf": "inner-product lists (spherical k-means)",
            "ivf_l2": "lists over MIPS-to-L2 augmented vectors; IVF has a GPU version and no graph memory"}


def recommend(rows: list[dict], target: float, speedup: float, budget_ms: float = 1.0) -> dict:
    """Serving defaults: flat below a size threshold, HNSW above; IVF parameters as the alternative."""
    synth = sorted({(r["n"], r["catalogue"]) for r in rows if r["source"] == "synthetic"})
    points, per_size = [], []
    for n, cat in synth:
        flat = best_row(rows, cat, "flat", 0.0)
        size = {"n": n, "flat_ms": flat and flat["b1_ms_p50"], "flat_memory_bytes": flat and flat["memory_bytes"]}
        for kind in ANN:
            b = best_row(rows, cat, kind, target)
            measured = any(r["catalogue"] == cat and r["index"] == kind for r in rows)
            size[kind] = b and {**b["build"], **b["search"], "ms": b["b1_ms_p50"], "recall": b["recall"],
                                "memory_bytes": b["memory_bytes"]}
            size[f"{kind}_measured"] = measured
        per_size.append(size)
        if flat and size["hnsw"]:
            points.append((n, flat["b1_ms_p50"], size["hnsw"]["ms"]))
    rec = {"recall_target": target, "ann_speedup": speedup, "flat_budget_ms": budget_ms,
           **flat_threshold(points, speedup, budget_ms), "per_size": per_size}
    # ANN parameters from the largest catalogue where they met the target: the most demanding case
    for kind, (key, build_keys) in ANN.items():
        found = [s[kind] for s in per_size if s[kind]]
        rec[kind] = {k: found[-1][k] for k in (*build_keys, key) if k in found[-1]} if found else None
        if rec[kind] is not None:
            rec[kind]["at_items"] = max(s["n"] for s in per_size if s[kind])
    rec["real"] = _real_check(rows, rec, target)
    return rec


def _real_check(rows: list[dict], rec: dict, target: float) -> list[dict]:
    """Recall of the recommended settings on the real catalogue(s): synthetic recall may be optimistic."""
    out = []
    for cat in dict.fromkeys(r["catalogue"] for r in rows if r["source"] == "real"):
        entry = {"catalogue": cat}
        for kind, (key, _) in ANN.items():
            if rec[kind] is None:
                continue
            match = [r for r in rows if r["catalogue"] == cat and r["index"] == kind
                     and r["search"].get(key) == rec[kind][key]]
            if match:
                entry[kind] = {key: rec[kind][key], "recall": match[0]["recall"], "ms": match[0]["b1_ms_p50"]}
            best = best_row(rows, cat, kind, target)
            entry[f"{kind}_min_{key}_at_target"] = best and best["search"].get(key)
        out.append(entry)
    return out


def recommendation_md(rec: dict) -> str:
    lines = ["## Serving defaults derived from these numbers", "",
             f"Rule: the fastest batch-1 setting with recall@10 >= {rec['recall_target']}; keep exact flat "
             f"search until it costs more than {rec['flat_budget_ms']:g} ms per query (1 thread) and HNSW is "
             f"{rec['ann_speedup']:g}x faster.", ""]
    if rec["flat_max_items"] is not None:
        lines.append(f"- **Flat (exact) up to ~{rec['flat_max_items']:,} items**, HNSW above ({rec['basis']}).")
    else:
        lines.append(f"- **Flat (exact) at every size measured**: {rec['basis']}.")
    for kind in ANN:
        v = rec.get(kind)
        if v:
            params = ", ".join(f"{k}={x}" for k, x in v.items() if k != "at_items")
            rule = "; nlist = 4*sqrt(N) as a power of two" if "nlist" in v else ""
            lines.append(f"- **{kind}** ({ANN_NOTE[kind]}): {params}: the cheapest setting at the target "
                         f"on {v['at_items']:,} items (largest size where it was reached{rule}).")
        elif any(s.get(f"{kind}_measured") for s in rec["per_size"]):
            lines.append(f"- **{kind}** ({ANN_NOTE[kind]}): never reached the target in the sweep.")
    for s in rec["per_size"]:
        parts = [f"flat {s['flat_ms']:.3g} ms" if s["flat_ms"] is not None else "flat –"]
        for kind, (key, _) in ANN.items():
            v = s[kind]
            if v:
                parts.append(f"{kind} {key}={v[key]} {v['ms']:.3g} ms (recall {v['recall']:.3f}, "
                             f"{v['memory_bytes'] / 2**20:.0f} MB)")
            elif s.get(f"{kind}_measured"):
                parts.append(f"{kind}: target not reached")
        lines.append(f"  - {s['n']:,} items: " + "; ".join(parts))
    for r in rec["real"]:
        got = [f"{kind} {key}={v[key]}: recall {v['recall']:.3f}, smallest {key} at target "
               f"{r.get(f'{kind}_min_{key}_at_target')}"
               for kind, (key, _) in ANN.items() if (v := r.get(kind))]
        if got:
            lines.append(f"- On the {r['catalogue']} catalogue the recommended settings give: " + "; ".join(got) + ".")
        else:
            lines.append(f"- {r['catalogue']}: no synthetic size was measured, so no recommended setting "
                         "to check here; read the table above.")
    return "\n".join(lines)


def plot_results(rows: list[dict], target: float):
    """Recall@k vs batch-1 latency per catalogue, plus best latency vs catalogue size."""
    cats = list(dict.fromkeys(r["catalogue"] for r in rows))
    fig, axes = plt.subplots(1, len(cats) + 1, figsize=(4.2 * (len(cats) + 1), 3.8), squeeze=False)
    for ax, cat in zip(axes[0], cats, strict=False):
        sub = [r for r in rows if r["catalogue"] == cat]
        for key in dict.fromkeys((r["index"], tuple(r["build"].items())) for r in sub):
            line = [r for r in sub if (r["index"], tuple(r["build"].items())) == key]
            color, marker = KIND_STYLE.get(key[0], ("gray", "x"))
            label = key[0] + "".join(f" {k}={v}" for k, v in key[1] if k != "efConstruction")
            ax.plot([r["b1_ms_p50"] for r in line], [r["recall"] for r in line], marker=marker, color=color,
                    label=label, ms=8 if key[0] == "flat" else 4)
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set(xscale="log", title=cat, xlabel="batch-1 latency p50 (ms, 1 thread)", ylabel="recall@10")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    synth = sorted({(r["n"], r["catalogue"]) for r in rows if r["source"] == "synthetic"})
    for kind in KIND_STYLE:
        pts = [(n, b["b1_ms_p50"]) for n, c in synth if (b := best_row(rows, c, kind, target))]
        if pts:
            color, marker = KIND_STYLE[kind]
            ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=f"{kind} (recall>={target})")
    ax.set(xscale="log", yscale="log", title="fastest setting vs catalogue size", xlabel="items (synthetic)",
           ylabel="batch-1 latency p50 (ms)")
    if ax.get_lines():
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def report_md(payload: dict) -> str:
    cfg, rows = payload["config"], payload["results"]
    lines = ["# Retrieval benchmark: Faiss flat vs HNSW vs IVF (inner product)", "",
             f"Machine: {machine_md(payload['machine'])}; load average at the end "
             f"{payload.get('load_average_1m_end')} (the machine is shared: single timings can be inflated "
             f"by other jobs). Faiss {payload['faiss']}; searches timed with "
             f"1 thread (as in a serving worker), builds with {payload['build_threads']}.", "",
             "Synthetic items: Zipf-sized genres in an anisotropic space (power-law spectrum), log-normal "
             "norms tied to Zipf popularity; queries: noisy means of 5-30-item histories from 1-3 genres "
             "(see `benchmarks/catalogues.py`). "
             f"Recall@{cfg['k']} is against exact search over {cfg['queries']} queries; latency is the "
             f"median of {cfg['repeats']} batch-1 and {cfg['batch_repeats']} batch-{cfg['batch']} searches "
             f"(fewer, at least 3, where a series took over {cfg.get('time_budget_s', 'inf')} s). "
             "Flat is the exact search itself, so its recall is 1 by construction.", ""]
    for name in dict.fromkeys(r["catalogue"] for r in rows):
        sub = [r for r in rows if r["catalogue"] == name]
        lines += [f"## {name} items, dim {sub[0]['dim']}", "", md_table(
            ["index", "build params", "search", "build s", "memory MB", f"recall@{cfg['k']}",
             "batch-1 p50 ms", "batch-1 p95 ms", f"batch-{cfg['batch']} ms", "ms/query in batch"],
            [[r["index"], _fmt(r["build"]), _fmt(r["search"]), r["build_s"], r["memory_bytes"] / 2**20,
              r["recall"], r["b1_ms_p50"], r["b1_ms_p95"], r["batch_ms_p50"], r["batch_ms_per_query"]]
             for r in sub]), ""]
    lines += [recommendation_md(payload["recommendation"]), "", "![retrieval](retrieval.png)", "",
              "Reproduce: `python -m benchmarks.retrieval --dim " + str(cfg["dim"]) + " --sizes '"
              + ",".join(str(s) for s in cfg["sizes"]) + "'"
              + (f" --real-embeddings {cfg['real_embeddings']}" if cfg.get("real_embeddings") else "")
              + (f" --real-queries {cfg['real_queries']}" if cfg.get("real_queries") else "")
              + f" --indexes {','.join(cfg['indexes'])} --hnsw-m {','.join(map(str, cfg['hnsw_m']))}"
              + f" --ef-search {','.join(map(str, cfg['ef_search']))}"
              + (f" --nprobe {','.join(map(str, cfg['nprobe']))}" if any(i.startswith('ivf') for i in cfg['indexes']) else "")
              + f" --queries {cfg['queries']} --build-threads {cfg['build_threads']} --out DIR`", ""]
    return "\n".join(lines)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "–"
