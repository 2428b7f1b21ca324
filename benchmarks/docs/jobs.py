"""Tables of one compression job (`compressor run`): its report.json, or, for the two folders
that kept only the report's Markdown (default_job, llm_job_moving_windows), the tables of
report.md, which `compressor/report.py` wrote from the same records."""

from __future__ import annotations

import re

from benchmarks.docs.core import (
    RESULTS,
    ROOT,
    Ctx,
    DocsError,
    ci,
    load_json,
    num,
    pct,
    ratio,
    read_text,
    table,
)

MODEL_ROWS = {  # report name -> label
    "teacher": "teacher",
    "teacher:model.int8.onnx": "teacher, int8 graph",
    "truncated": "student's layers copied, no training",
    "student": "**student** (distilled)",
    "student:model.int8.onnx": "student, int8 graph",
    "mostpop": "MostPop",
    "ease": "EASE",
}


def _md_tables(text: str) -> dict[str, list[list[str]]]:
    """Every Markdown table of a page, keyed by its first header cell (or the heading above it
    when that cell is empty)."""
    out: dict[str, list[list[str]]] = {}
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                if not lines[j].startswith("|---"):
                    rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
                j += 1
            out.setdefault(rows[0][0] or heading, rows)
            i = j
            continue
        i += 1
    return out


def _f(cell: str) -> float:
    return float(cell.replace(",", ""))


def report(folder: str) -> tuple[dict, str]:
    """(the job's records, the file they come from). From report.md only the fields the tables
    below use are read."""
    path = f"{RESULTS}/{folder}/report.json"
    if (ROOT / path).is_file():
        return load_json(path), path
    path = f"{RESULTS}/{folder}/report.md"
    t = _md_tables(read_text(path))
    try:
        q = t["model"]
        head = q[0]
        metrics = {r[0]: {h: _f(v) for h, v in zip(head[1:-1], r[1:-1], strict=True)} for r in q[1:]}
        boot = {r[0]: {"mean_diff": _f(r[1]), "ci_low": _f(r[2]), "ci_high": _f(r[3]),
                       "excludes_zero": r[4] == "yes"} for r in t["comparison"][1:]}
        tv = {r[0]: r for r in t["Teacher vs student"][1:]}
        stages = {r[0]: _f(r[1]) for r in t["stage"][1:]}
        imp = t["method"]
    except (KeyError, IndexError, ValueError) as e:
        raise DocsError(f"{path}: not the compression report's layout ({e})") from None

    def side(col: int) -> dict:
        return {"parameters": int(_f(tv["parameters"][col])),
                "onnx_mb": _f(tv["ONNX size (MB)"][col]),
                "num_layers": int(_f(tv["decoder layers"][col]))}

    timing = {name: {"batch_1": {"ms_median": _f(tv["batch-1 latency (ms, median)"][col])},
                     "batch_64": {"per_second": _f(tv["batch-64 throughput (histories/s)"][col])}}
              for name, col in (("teacher", 1), ("student", 2))}
    importance = {r[0]: {"spearman_vs_ablation": _f(r[1]), "top2": _f(r[2]), "seconds": _f(r[3])}
                  for r in imp[1:] if len(r) >= 4}
    doc = {"evaluation": {"metrics": metrics, "bootstrap_ndcg@10": boot},
           "teacher": side(1), "student": side(2), "speed": {"timing": timing},
           "stage_seconds": stages, "importance_md": importance}
    return doc, path


def _onnx_mb(side: dict, file: str = "model.onnx") -> float | None:
    if "onnx_mb" in side:
        return side["onnx_mb"] if file == "model.onnx" else None
    b = (side.get("onnx_files") or {}).get(file)
    return None if b is None else b / 1e6


def job_quality(ctx: Ctx, folder: str) -> str:
    """Test metrics of every model of the job, with retention and the paired interval vs EASE."""
    doc, src = report(folder)
    m = doc["evaluation"]["metrics"]
    boot = doc["evaluation"]["bootstrap_ndcg@10"]
    t = m["teacher"]["ndcg@10"]
    rows = []
    for key, label in MODEL_ROWS.items():
        if key not in m:
            continue
        r = m[key]
        vs = boot.get(f"{key} - ease")
        rows.append([label, num(r["hr@10"]), num(r["ndcg@10"]), num(r["mrr"]), num(r["coverage@10"], 3),
                     pct(r["ndcg@10"] / t), ci(vs) if vs else "—"])
    return "\n".join([
        table(["test split, full ranking", "HR@10", "NDCG@10", "MRR", "coverage@10",
               "NDCG@10 / teacher", "− EASE, NDCG@10 [95% CI]"], rows), "", ctx.source(src)])


def job_bootstrap(ctx: Ctx, folder: str) -> str:
    doc, src = report(folder)
    rows = [[k, ci(v), "yes" if v["excludes_zero"] else "no"]
            for k, v in doc["evaluation"]["bootstrap_ndcg@10"].items()]
    return "\n".join([table(["paired bootstrap over test users", "NDCG@10 difference [95% CI]",
                             "excludes 0"], rows), "", ctx.source(src)])


def job_models(ctx: Ctx, folder: str) -> str:
    """Teacher vs student: size, quality and ONNX Runtime speed, with the student's ratios."""
    doc, src = report(folder)
    m = doc["evaluation"]["metrics"]
    timing = doc["speed"]["timing"]
    T, S = doc["teacher"], doc["student"]
    rows = []

    def add(label, tv, sv, fmt, rfmt=lambda x: ratio(x, 2)):
        rows.append([label, fmt(tv), fmt(sv), rfmt(sv / tv) if tv and sv is not None else "—"])

    add("decoder layers", T["num_layers"], S["num_layers"], str)
    add("parameters", T["parameters"], S["parameters"], lambda x: f"{x:,}")
    add("ONNX file (MB)", _onnx_mb(T), _onnx_mb(S), lambda x: "—" if x is None else f"{x:.1f}")
    add("test NDCG@10", m["teacher"]["ndcg@10"], m["student"]["ndcg@10"], num)
    add("batch-1 latency (ms, median)", timing["teacher"]["batch_1"]["ms_median"],
        timing["student"]["batch_1"]["ms_median"], lambda x: f"{x:.2f}")
    add("batch-64 throughput (histories/s)", timing["teacher"]["batch_64"]["per_second"],
        timing["student"]["batch_64"]["per_second"], lambda x: f"{x:,.1f}" if x < 100 else f"{x:,.0f}")
    out = [table(["", "teacher", "student", "student ÷ teacher"], rows)]
    int8 = [k for k in ("teacher (int8)", "student (int8)") if k in timing]
    if int8:
        rows = [[k, f"{timing[k]['batch_1']['ms_median']:.2f}",
                 ratio(timing[k]["batch_1"]["ms_median"] / timing["teacher"]["batch_1"]["ms_median"]),
                 f"{timing[k]['batch_64']['per_second']:,.1f}",
                 ratio(timing[k]["batch_64"]["per_second"] / timing["teacher"]["batch_64"]["per_second"]),
                 num(m[k.split()[0] + ":model.int8.onnx"]["ndcg@10"]),
                 num(doc[k.split()[0]]["parity"]["model.int8.onnx"]["topk_agreement"], 2)]
                for k in int8]
        out += ["", table(["int8 graph", "batch-1 ms", "÷ float teacher", "batch-64 /s", "× float teacher",
                           "test NDCG@10", "top-10 agreement with its float graph"], rows)]
    method = doc["speed"].get("method")
    if method:
        out += ["", f"Speed: {method}."]
    return "\n".join(out + ["", ctx.source(src)])


def time_v(path: str) -> tuple[float, int]:
    """Wall-clock minutes and peak RSS (KiB) from a `/usr/bin/time -v` record."""
    text = read_text(path)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)[1]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    return sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":")))) / 60, rss


def job_stages(ctx: Ctx, folder: str) -> str:
    """Seconds per stage and the total; the wall clock and peak memory when time.txt was kept."""
    doc, src = report(folder)
    st = doc["stage_seconds"]
    total = sum(st.values())
    rows = [[k, f"{v:,.1f}", pct(v / total)] for k, v in st.items()]
    rows.append(["**sum of stages**", f"**{total:,.1f}** ({total / 60:.1f} min)", "100%"])
    out = [table(["stage", "seconds", "share"], rows)]
    sources = [src]
    tt = f"{RESULTS}/{folder}/time.txt"
    if (ROOT / tt).is_file():
        minutes, rss = time_v(tt)
        out += ["", f"Whole command (`/usr/bin/time -v`): **{minutes:.1f} min** wall clock, peak RSS "
                    f"**{rss / 2**20:.1f} GiB** ({rss:,} KiB)."]
        sources.append(tt)
    return "\n".join(out + ["", ctx.source(*sources)])


def job_minutes(doc: dict) -> float:
    return sum(doc["stage_seconds"].values()) / 60


def job_importance(ctx: Ctx, folder: str) -> str:
    """Each estimator against ablation and where it puts its weight (thirds of the depth)."""
    doc, src = report(folder)
    if "importance_md" in doc:
        rows = [[k, num(v["spearman_vs_ablation"], 3), num(v["top2"], 2), f"{v['seconds']:.1f}"]
                for k, v in doc["importance_md"].items()]
        return "\n".join([table(["estimator", "Spearman vs ablation", "top-2 overlap", "seconds"], rows),
                          "", ctx.source(src)])
    methods = doc["importance"]["methods"]
    n = len(next(iter(methods.values()))["weights"])
    cuts = [0, round(n / 3), round(2 * n / 3), n]
    bands = [f"layers {a}–{b - 1}" for a, b in zip(cuts, cuts[1:], strict=False)]
    ks = sorted({k for v in methods.values() for k in (v.get("top_k_overlap_vs_ablation") or {})},
                key=lambda k: int(k.split("=")[1]))
    rows = []
    for name, v in methods.items():
        w = v["weights"]
        tot = sum(w) or 1.0
        shares = [pct(sum(w[a:b]) / tot) for a, b in zip(cuts, cuts[1:], strict=False)]
        ov = v.get("top_k_overlap_vs_ablation") or {}
        rows.append([name, *shares, num(v.get("spearman_vs_ablation"), 2),
                     " / ".join(num(ov.get(k), 2) for k in ks), f"{v.get('seconds', 0):.0f}"])
    return "\n".join([table(["estimator", *[f"share of weight, {b}" for b in bands], "Spearman vs ablation",
                             "top-" + " / top-".join(k.split("=")[1] for k in ks) + " overlap", "seconds"], rows),
                      "", ctx.source(src)])


def training_curves(ctx: Ctx, *files: str) -> str:
    """Teacher trainings side by side: validation NDCG@10 by epoch (from a training summary's
    history; a job's report.json keeps only the best epoch), best epoch, time per epoch."""
    rows = []
    srcs = []
    for f in files:
        path = f"{RESULTS}/{f}"
        d = load_json(path)
        label = f.split("/")[0]
        if "teacher_training" in d:  # a job's report.json
            d = d["teacher_training"]
            curve = "—"
            loss = "—"
        else:
            values = [h["valid"]["ndcg@10"] for h in d["history"]]
            best = max(values)
            curve = ", ".join(f"**{num(v)}**" if v == best else num(v) for v in values)
            loss = num(d["history"][d["best_valid"]["epoch"] - 1]["loss"], 2)
            label += " (" + f.split("/")[-1].replace("_training_summary.json", "").replace("_", " ") + ")"
        rows.append([label, curve, num(d["best_valid"]["ndcg@10"]), str(d["best_valid"]["epoch"]), loss,
                     f"{d['seconds_per_epoch']:.0f}", f"{d['train_seconds'] / 60:.1f}", d["device"], d["precision"]])
        srcs.append(path)
    return "\n".join([table(["teacher (results folder)", "valid NDCG@10 by epoch", "best valid", "best epoch",
                             "train loss at best", "s / epoch", "training minutes", "device", "precision"], rows),
                      "", ctx.source(*srcs)])


def llm_vs_small(ctx: Ctx, small: str, *llm: str) -> str:
    """The LLM teacher's best validation NDCG@10 against the small teacher's seeds."""
    sp = f"{RESULTS}/{small}"
    seeds = load_json(sp)["seeds"]
    mean = sum(x["valid_ndcg@10"] for x in seeds) / len(seeds)
    best = max(seeds, key=lambda x: x["valid_ndcg@10"])
    rows = []
    for f in llm:
        path = f"{RESULTS}/{f}"
        d = load_json(path)
        seed = (d.get("config") or {}).get("teacher", d.get("config", {})).get("train", {}).get("seed")
        d = d.get("teacher_training", d)
        v = d["best_valid"]["ndcg@10"]
        rows.append([f"seed {seed} (`{f.split('/')[0]}`)", num(v), ratio(v / mean), ratio(v / best["valid_ndcg@10"])])
    return "\n".join([
        table(["LLM teacher", "best valid NDCG@10", f"÷ small teacher, mean of {len(seeds)} seeds ({num(mean)})",
               f"÷ small teacher, best seed (seed {best['seed']}, {num(best['valid_ndcg@10'])})"], rows), "",
        ctx.source(*[f"{RESULTS}/{f}" for f in llm], sp)])


RENDERERS = {
    "job-quality": job_quality,
    "job-bootstrap": job_bootstrap,
    "job-models": job_models,
    "job-stages": job_stages,
    "job-importance": job_importance,
    "training-curves": training_curves,
    "llm-vs-small": llm_vs_small,
}
