"""Tables of the benchmark folders (`python -m benchmarks.X` outputs), one renderer per kind.
Every table ends with a line linking to the files it was rendered from."""

from __future__ import annotations

import json

from benchmarks.docs.core import (
    RESULTS,
    ROOT,
    Ctx,
    DocsError,
    ci,
    load_json,
    mean_std,
    num,
    pct,
    ratio,
    signed,
    table,
)
from benchmarks.docs.teachers import FOLDERS, TEACHERS, provenance, results_folders


def _src(folder: str, name: str) -> str:
    return f"{RESULTS}/{folder}/{name}"


# ----------------------------------------------------------------------------- provenance
def provenance_table(ctx: Ctx, *folders: str) -> str:
    """Which teacher and machine each folder was measured on (all folders when none is named)."""
    if not folders:
        folders = tuple(results_folders())
    rows = []
    for f in folders:
        p = provenance(f)
        t, m = p["teacher"], p["machine"] or {}
        teacher = "none: " + t["what"] if t["id"] is None else f"`{t['id']}` ({t['status']}): {t['what']}"
        machine = (f"{m.get('cpu', '?')}, {m.get('logical_cores') or m.get('cores')} cores"
                   if m else "not recorded")
        date = str(m.get("date", ""))[:10] or "—"
        rows.append([ctx.link(f, _src(f, "provenance.json")), teacher,
                     num(t.get("test_ndcg@10")) if t.get("test_ndcg@10") is not None else "—", machine, date])
    return table(["results folder", "teacher it was measured on", "teacher test NDCG@10", "machine", "date"], rows)


def teachers_table(ctx: Ctx) -> str:
    """The teachers results were measured on, current and retired."""
    rows = []
    for tid, t in TEACHERS.items():
        p = provenance(next(f for f, (x, _) in FOLDERS.items() if x == tid))["teacher"]
        folders = ", ".join(f"`{f}`" for f, (x, _) in FOLDERS.items() if x == tid)
        rows.append([f"`{tid}`", t.description, "**current**" if t.status == "current" else "retired",
                     ctx.link(num(p["test_ndcg@10"]), p["test_ndcg@10_source"].split(" ")[0]),
                     f"`{p['config_sha256_16']}`" if p["config_sha256_16"] else "not kept", folders])
    return table(["id", "teacher", "status", "test NDCG@10", "config hash", "results folders"], rows)


# ----------------------------------------------------------------------------- teacher seeds
def teacher_seeds(ctx: Ctx, *folders: str) -> str:
    """Seeds of one or more teacher recipes side by side (validation decides, test reported)."""
    docs = [load_json(_src(f, "teacher_seeds.json")) for f in folders]
    labels = [", ".join([f"{d['teacher']['train']['epochs']} epochs"]
                        + [o for o in d.get("overrides") or [] if not o.startswith("teacher.train.epochs=")])
              for d in docs]
    heads = ["seed"]
    for lab in labels:
        heads += [f"valid ({lab})", f"test ({lab})", "× EASE", "test − EASE [95% CI]"]
    seeds = [s["seed"] for s in docs[0]["seeds"]]
    rows = []
    for i, seed in enumerate(seeds):
        row = [str(seed)]
        for d in docs:
            s = d["seeds"][i]
            row += [num(s["valid_ndcg@10"]), num(s["test_ndcg@10"]), ratio(s["vs_ease"]), ci(s["diff_vs_ease"])]
        rows.append(row)
    row = ["**mean**"]
    for d in docs:
        n = len(d["seeds"])
        v = sum(s["valid_ndcg@10"] for s in d["seeds"]) / n
        t = sum(s["test_ndcg@10"] for s in d["seeds"]) / n
        row += [f"**{num(v)}**", f"**{num(t)}**", f"**{ratio(t / d['ease']['test_ndcg@10'])}**", ""]
    rows.append(row)
    ease = docs[0]["ease"]
    out = [table(heads, rows), "",
           f"EASE (λ = {ease['lambda']:g}, chosen on validation): test NDCG@10 {num(ease['test_ndcg@10'])}. "
           f"Each seed's teacher: {docs[0]['seeds'][0]['device']}.", "",
           ctx.source(*[_src(f, "teacher_seeds.json") for f in folders])]
    if any(s.get("valid_raw_ndcg@10") is not None for d in docs for s in d["seeds"]):
        out.insert(1, "\n" + table(["seed", "valid, raw weights (same run)", "valid, averaged weights"],
                                  [[str(s["seed"]), num(s["valid_raw_ndcg@10"]), num(s["valid_ndcg@10"])]
                                   for s in docs[0]["seeds"]]))
    return "\n".join(out)


# ----------------------------------------------------------------------------- quality grids
def _quality(folder: str) -> dict:
    return load_json(_src(folder, "quality.json"))


def quality_grid(ctx: Ctx, folder: str) -> str:
    """Test NDCG@10 (mean ± std over seeds) and retention of every method at every depth."""
    q = _quality(folder)
    agg = q["aggregate"]["table"]
    depths = list(agg)
    methods = sorted({m for d in depths for m in agg[d]},
                     key=lambda m: -max(agg[d][m]["ndcg@10"][0] for d in depths if m in agg[d]))
    floors = [m for m in methods if m in ("truncated", "scratch")]
    methods = [m for m in methods if m not in floors] + floors
    name = {"truncated": "floor: truncated, no training", "scratch": "floor: same depth from scratch"}
    heads = ["method"]
    for d in depths:
        layers = q["layers"].get(str(d))
        heads += [f"{d} of {q['teacher_layers']} layers {layers if layers else ''}".rstrip(), "retention"]
    rows = []
    for m in methods:
        row = [name.get(m, f"`{m}`")]
        for d in depths:
            r = agg[d].get(m)
            if r is None:
                row += ["—", "—"]
                continue
            seeds = r["seeds"]
            cell = mean_std(r["ndcg@10"]) if seeds > 1 else num(r["ndcg@10"][0])
            best = max(agg[d][x]["ndcg@10"][0] for x in agg[d])
            row += [f"**{cell}**" if r["ndcg@10"][0] == best else cell,
                    pct(r["retention"]) if r.get("retention") is not None else "—"]
        rows.append(row)
    t = q["aggregate"]["teacher_test"]["ndcg@10"]
    return "\n".join([
        table(heads, rows), "",
        f"Teacher `{q['teacher']}`: test NDCG@10 {num(t)}; seeds {q['seeds']}; budget per cell "
        f"{q['budget']['epochs']} epoch(s) or {q['budget']['max_minutes']:g} min. Mean ± std over seeds "
        "where a cell has more than one.", "", ctx.source(_src(folder, "quality.json"))])


def quality_bootstrap(ctx: Ctx, folder: str) -> str:
    """FISHER-LD minus every other method (paired over users, per-user NDCG@10 averaged over seeds)."""
    q = _quality(folder)
    boot = q["aggregate"]["bootstrap"]
    rows = []
    for d, against in boot.items():
        for m, b in against.items():
            wins = b.get("fisher_ld_wins_seeds")
            rows.append([str(d), f"`{m}`", ci(b), "—" if wins is None else str(wins)])
    ov = q.get("overhead") or {}
    out = [table(["depth", "fisher_ld minus", "NDCG@10 difference [95% CI]", "seeds fisher_ld is ahead in"], rows)]
    if ov:
        out += ["", f"Fisher weighting's cost per step over uniform weights: {ratio(ov['ratio'], 3)} "
                    f"({ov['fisher_ld_seconds_per_step']:.3f} vs {ov['uniform_ld_seconds_per_step']:.3f} s, "
                    f"depth {ov['depth']}, interleaved)."]
    return "\n".join(out + ["", ctx.source(_src(folder, "quality.json"))])


def layer_sets(ctx: Ctx, folder: str) -> str:
    doc = load_json(_src(folder, "layer_sets.json"))
    rows = []
    for d, sets in doc["depths"].items():
        for name, r in sets.items():
            rows.append([str(d), f"`{name}`", f"`{r.get('method', doc['method'])}`", str(r["layers"]),
                         num(r.get("truncated_valid_ndcg@10")), mean_std(r["valid_ndcg@10"]),
                         mean_std(r["test_ndcg@10"]),
                         ci(r["minus_reference"]) if "minus_reference" in r else "reference"])
    return "\n".join([
        table(["layers kept", "run", "method", "teacher layers", "untrained cut, valid", "valid NDCG@10",
               "test NDCG@10", f"test − `{doc['reference']}` [95% CI]"], rows), "",
        "Runs: " + ", ".join(f"`{k}` = `{v}`" for k, v in doc["runs"].items()) + ".", "",
        ctx.source(_src(folder, "layer_sets.json"))])


def layer_selection(ctx: Ctx, folder: str) -> str:
    doc = load_json(_src(folder, "layer_selection.json"))
    rows = [[m, num(s, 3), f"{doc['seconds'][m]:.1f}"] for m, s in doc["spearman_vs_ablation"].items()]
    out = [table(["estimator", f"Spearman vs ablation ({doc['num_layers']} layers)", "seconds"], rows)]
    seen: set = set()
    srows = []
    for st in doc.get("students") or []:
        if tuple(st["layers"]) in seen:
            continue  # strategies that chose the same set
        seen.add(tuple(st["layers"]))
        srows.append([st["name"], str(st["layers"]), num(st["ndcg@10"]), pct(st["share_of_teacher"]),
                      ci(st.get("vs_first_k"))])
    rs = doc.get("random_summary")
    if rs:
        srows.append([f"random sets ({rs['draws']} draws)", "—", mean_std([rs["mean"], rs["std"]]), "—", "—"])
    if srows:
        out += ["", table([f"untrained {doc['keep']}-layer student (first set of each layer list)", "layers",
                           "test NDCG@10", "of teacher", "− first-k [95% CI]"], srows)]
    return "\n".join(out + ["", ctx.source(_src(folder, "layer_selection.json"))])


# ----------------------------------------------------------------------------- compression rows
def _rows_table(ctx: Ctx, folder: str, name: str) -> str:
    doc = load_json(_src(folder, f"{name}.json"))
    rows = []
    for r in doc["rows"]:
        agree = r.get("top10_agreement_with_float_graph")
        rows.append([
            f"`{r['name']}`", f"{r['params']:,}", f"{r['onnx_bytes'] / 1e6:.1f}" if r.get("onnx_bytes") else "—",
            signed(r["valid_loss_increase"], 3) if r.get("valid_loss_increase") is not None else "—",
            num(r["ndcg@10"]), ci(r.get("ndcg@10_vs_float")) if r["kind"] != "float" else "—",
            ratio(r.get("b1_ratio")), ratio(r.get("b64_ratio")), num(agree, 3) if agree is not None else "—"])
    ref = doc["rows"][0]
    return "\n".join([
        table(["model", "parameters", "ONNX MB", "Δ valid loss", "test NDCG@10", "Δ vs float [95% CI]",
               "latency ×, batch 1", "latency ×, batch 64", "top-10 agreement (int8)"], rows), "",
        f"Model `{doc['model']}`, {doc['test_users']} test users; float graph {ref['b1_ms']:.2f} ms at batch 1, "
        f"{ref['b64_ms']:.1f} ms at batch 64 ({doc['config']['threads']} ONNX Runtime thread(s), all graphs "
        "interleaved in one run: read the ratios). `+distill` = after the recovery run.", "",
        ctx.source(_src(folder, f"{name}.json"))])


def lowrank(ctx: Ctx, folder: str) -> str:
    return _rows_table(ctx, folder, "lowrank")


def pruning(ctx: Ctx, folder: str) -> str:
    return _rows_table(ctx, folder, "pruning")


# ----------------------------------------------------------------------------- serving
def load_test(ctx: Ctx, folder: str) -> str:
    """Teacher and student servers under the same Locust load: absolute figures and ratios."""
    doc = load_json(_src(folder, "load_test.json"))
    T, S = doc["services"]["teacher"], doc["services"]["student"]
    rows = []
    for lt, ls, c in zip(T["levels"], S["levels"], doc["comparison"]["levels"], strict=True):
        errs = lt["failures"] + ls["failures"]
        rows.append([str(lt["users"]), f"{lt['p99_ms']:.1f}", f"{ls['p99_ms']:.1f}", ratio(c["p99_ms"]),
                     f"{lt['qps']:.0f}", f"{ls['qps']:.0f}", ratio(c["qps"]), ratio(c["peak_rss_bytes"]),
                     f"{errs:,}"])
    env = doc["config"].get("env") or {}
    files = f"teacher `{T['model_file']}`, student `{S['model_file']}`"
    return "\n".join([
        table(["users", "teacher p99 ms", "student p99 ms", "p99 ×", "teacher QPS", "student QPS", "QPS ×",
               "peak RSS ×", "failed requests"], rows), "",
        f"{files}; {doc['config']['duration_s']:g} s per level; server settings "
        + (", ".join(f"`{k}={v}`" for k, v in env.items()) or "defaults")
        + f". One request at a time (p50): model {T['profile']['model_ms_p50']:.2f} → "
          f"{S['profile']['model_ms_p50']:.2f} ms, end to end over HTTP {T['serial_http']['ms_p50']:.2f} → "
          f"{S['serial_http']['ms_p50']:.2f} ms.", "", ctx.source(_src(folder, "load_test.json"))])


def _ms_or_zero(ms: float) -> str:
    """A difference of separately measured medians: within 0.005 ms of zero (or below) reads ~0."""
    return f"{ms:.2f}" if ms >= 0.005 else "~0"


def load_time_split(ctx: Ctx, *folders: str) -> str:
    """Where one request's time goes (batch 1, serial, p50 ms) for every service of the named load
    tests: the ONNX Runtime call, Faiss retrieval, the rest of the engine, and HTTP + framework."""
    rows, sources = [], []
    for folder in folders:
        src = _src(folder, "load_test.json")
        sources.append(src)
        for role, svc in load_json(src)["services"].items():
            p, http = svc["profile"], svc["serial_http"]["ms_p50"]
            rows.append([ctx.link(folder, src), role, f"`{svc['model_file']}`", f"{p['model_ms_p50']:.2f}",
                         f"{p['retrieval_ms_p50']:.2f}", _ms_or_zero(p['engine_ms_p50'] - p['model_ms_p50'] - p['retrieval_ms_p50']),
                         f"{http - p['engine_ms_p50']:.2f}", f"{http:.2f}", f"{p['model_ms_p50'] / http:.0%}"])
    return "\n".join([table(["load test", "model", "served file", "model (ONNX Runtime)", "retrieval (Faiss)",
                             "rest of the engine", "HTTP + framework", "end to end", "model share"], rows), "",
                      ctx.source(*sources)])


def overload(ctx: Ctx, folder: str) -> str:
    doc = load_json(_src(folder, "overload.json"))
    rows = [[str(r["max_concurrency"] or "off"), str(r["users"]), f"{r['requests']:,}", f"{r['accepted']:,}",
             f"{r['shed']:,}", f"{r['accepted_qps']:.0f}", f"{r['accepted_p50_ms']:.0f}", f"{r['accepted_p99_ms']:.0f}",
             str(r["wrong_answers"])] for r in doc["runs"]]
    return "\n".join([table(["admission limit", "users", "requests", "accepted", "shed (503)", "accepted QPS",
                             "accepted p50 ms", "accepted p99 ms", "wrong answers"], rows), "",
                      ctx.source(_src(folder, "overload.json"))])


def retrieval(ctx: Ctx, folder: str) -> str:
    """Per catalogue and index: the fastest setting that reaches the recall target."""
    doc = load_json(_src(folder, "retrieval.json"))
    target = doc["config"]["recall_target"]
    best: dict = {}
    for r in doc["results"]:
        key = (r["catalogue"], r["index"])
        def rank(x: dict) -> tuple:  # reaching the target first, then faster; else higher recall
            return (True, -x["b1_ms_p50"]) if x["recall"] >= target else (False, x["recall"])

        cur = best.get(key)
        if cur is None or rank(r) > rank(cur):
            best[key] = r
    rows = []
    for (cat, index), r in best.items():
        setting = ", ".join(f"{k} {v}" for k, v in {**r["build"], **r["search"]}.items()) or "—"
        rows.append([cat, index, setting, num(r["recall"], 3), f"{r['b1_ms_p50']:.3f}",
                     f"{r['memory_bytes'] / 1e6:.1f}"])
    return "\n".join([table(["catalogue", "index", "setting", "recall@10", "batch-1 ms (p50)", "memory MB"], rows),
                      "", f"Per index the fastest setting with recall@10 ≥ {target} (or the best recall when none "
                          f"reaches it); {doc['search_threads']} search thread, dim "
                          f"{', '.join(sorted({str(r['dim']) for r in doc['results']}))}.", "",
                      ctx.source(_src(folder, "retrieval.json"))])


# ----------------------------------------------------------------------------- training
def ddp(ctx: Ctx, folder: str) -> str:
    doc = load_json(_src(folder, "ddp_throughput.json"))
    base = doc["median_samples_per_second"]["1 process x 1 thread"]
    rows = [[k, f"{v:.1f}", ratio(v / base)] for k, v in doc["median_samples_per_second"].items()]
    return "\n".join([table(["setup", "samples/s (median of rounds)", "÷ 1 process × 1 thread"], rows), "",
                      f"{doc['teacher']}; {doc['users']} users, {doc['batch_size_per_process']} windows per step "
                      "per process; 1-min load average at start "
                      f"{doc['machine']['load_average_1m']}.", "", ctx.source(_src(folder, "ddp_throughput.json"))])


def fisher_speed(ctx: Ctx, folder: str) -> str:
    doc = load_json(_src(folder, "fisher_speed.json"))
    loop = doc["rows"][0]["seconds_per_sample"]
    rows = [[r["method"], f"{r['seconds_per_sample']:.3f}", ratio(loop / r["seconds_per_sample"], 1),
             f"{r['max_rel_diff']:.1e}"] for r in doc["rows"]]
    return "\n".join([table(["per-sample Fisher", "s / sample", "speed-up", "max relative difference of traces"], rows),
                      "", f"Model `{doc['model']}` ({doc['decoder_parameters']:,} decoder parameters), "
                          f"{doc['samples']} samples, {doc['threads']} threads.", "",
                      ctx.source(_src(folder, "fisher_speed.json"))])


def llm_recipe(ctx: Ctx, folder: str) -> str:
    doc = load_json(_src(folder, "llm_recipe.json"))
    rows = [[f"`{r['recipe']}`", " → ".join(num(v) for v in r["curve"]), num(r["valid_ndcg@10"]),
             ratio(r["vs_ease"]), num(r["loss"][-1], 2), f"{r['seconds_per_epoch']:.0f}", str(r["train_windows"])]
            for r in doc["recipes"]]
    return "\n".join([table(["recipe", "valid NDCG@10 by epoch", "best", "× EASE (valid)", "final train loss",
                             "s / epoch", "windows"], rows), "",
                      f"Every recipe: `{doc['config']}` with {', '.join(f'`{o}`' for o in doc['overrides'])}; "
                      f"EASE validation NDCG@10 {num(doc['ease']['valid_ndcg@10'])}.", "",
                      ctx.source(_src(folder, "llm_recipe.json"))])


def precision_speed(ctx: Ctx, folder: str) -> str:
    """fp32 against bf16 autocast training steps, alternated in one run."""
    path = _src(folder, "precision_speed.json")
    d = load_json(path)
    rows = [[k, f"{v:.3f}"] for k, v in d["seconds_per_step"].items()]
    rows.append(["fp32 ÷ bf16", ratio(d["fp32_over_bf16"])])
    return "\n".join([table(["precision", "s / step (median)"], rows), "",
                      f"{d['what']}; `{d['llm']}`, histories of {d['max_len']}, batch {d['batch_size']}, "
                      f"{d['threads']} thread, {d['rounds']} alternated rounds of {d['steps_per_round']} steps; "
                      f"{d['machine']['cpu']}.", "", ctx.source(path)])


def precision_gradients(ctx: Ctx, folder: str) -> str:
    """The same batches' gradient in fp32 and under bf16 autocast, each against float64."""
    path = _src(folder, "gradients.json")
    d = load_json(path)
    modes = [k for k in d["batches"][0] if k not in ("batch", "loss_fp64")]
    rows = [[str(b["batch"]), mode, f"{b[mode]['loss']:.5f} ({b['loss_fp64']:.5f})",
             f"{b[mode]['all']['norm']:.2f} ({b[mode]['all']['norm_fp64']:.2f})",
             *(f"{b[mode][part]['cosine_vs_fp64']:+.4f}" for part in ("all", "item table", "attention", "mlp", "norms"))]
            for b in d["batches"] for mode in modes]
    return "\n".join([table(["batch", "computed in", "loss (float64)", "gradient norm (float64)", "cosine with the "
                             "float64 gradient", "item table", "attention", "MLP", "norms"], rows), "",
                      f"{d['what'].split(' Run once')[0]} Machine: {d['machine']['cpu']}, native bf16: {d['machine']['native_bf16']}, torch "
                      f"{d['machine']['torch']}, {d['machine']['threads']} thread.", "", ctx.source(path)])


def scaling(ctx: Ctx, folder: str) -> str:
    """Seconds and peak RSS of every stage of the (reduced) job per catalogue size, with the growth
    exponent between consecutive sizes."""
    path = _src(folder, "scaling.json")
    d = load_json(path)
    sizes = d["sizes"]
    heads = ["stage"] + [f"{s['items']:,} items, {s['users']:,} users: s / peak GiB" for s in sizes]
    heads.append("time exponent")
    rows = []
    for stage in sizes[0]["stages"]:
        cells = [f"{s['stages'][stage]['seconds']:,.0f} / {s['stages'][stage]['peak_rss_gib']:.1f}"
                 if stage in s["stages"] else "—" for s in sizes]
        exp = (d.get("exponent_seconds") or {}).get(stage) or []
        rows.append([stage, *cells, ", ".join(num(e, 2) for e in exp) or "—"])
    rows.append(["**whole job**", *[f"**{s['job']['seconds']:,.0f} / {s['job']['peak_rss_gib']:.1f}**"
                                   for s in sizes], ""])
    return "\n".join([table(heads, rows), "",
                      f"`compressor run --config {d['config']['config']}` on `compressor synth` data "
                      f"({d['config']['interactions_per_item']} interactions per item, "
                      f"{d['config']['interactions_per_user']} per user), reduced budget: "
                      + ", ".join(f"`{o}`" for o in d["reduced_budget"] + d["config"].get("overrides", [])) + "; "
                      f"{d['machine']['cpu']}, {d['machine']['logical_cores']} cores.", "", ctx.source(path)])


def scaling_stages(ctx: Ctx, folder: str) -> str:
    """The guide's short form of `scaling`: seconds of the stages that take at least 5% of the job
    at some size (the rest summed on one row), EASE skipped where it was, the whole job's seconds
    and peak RSS."""
    path = _src(folder, "scaling.json")
    d = load_json(path)
    sizes = d["sizes"]
    stages = list(sizes[0]["stages"])
    main = [st for st in stages
            if any(st in s["stages"] and s["stages"][st]["seconds"] >= 0.05 * s["job"]["seconds"] for s in sizes)]
    rest = [st for st in stages if st not in main]
    exps = d.get("exponent_seconds") or {}
    heads = ["stage"] + [f"{s['items']:,} items, {s['users']:,} users, {s['interactions']:,} interactions"
                         for s in sizes] + ["time exponent"]

    def secs(s: dict, names: list[str]) -> str:
        have = [s["stages"][n]["seconds"] for n in names if n in s["stages"]]
        return f"{sum(have):,.0f} s" if have else "—"

    rows = []
    for st in main:
        cells = []
        for s in sizes:
            cell = secs(s, [st])
            if st == "evaluate" and "ease" in (s.get("baselines_skipped") or {}):
                cell += " (EASE skipped)"
            elif st == "evaluate" and "ease" in (s.get("test_ndcg@10") or {}):
                cell += " (EASE fitted)"
            rec = s["stages"].get(st) or {}
            if rec.get("stop_reason") in ("time cap", "step limit"):  # the cap, not the full pass
                done = rec.get("epochs", rec.get("epochs_run"))
                cell += f" ({rec['stop_reason']} at {done:.2f} of the pass)" if done is not None else f" ({rec['stop_reason']})"
            cells.append(cell)
        rows.append([st, *cells, ", ".join(num(e, 2) for e in exps.get(st) or []) or "—"])
    if rest:
        rows.append([", ".join(rest), *[secs(s, rest) + " together" for s in sizes], "fixed sample counts"])
    rows.append(["**whole job**", *[f"**{s['job']['seconds']:,.0f} s, peak RSS {s['job']['peak_rss_gib']:.1f} GiB**"
                                   for s in sizes], ""])
    return "\n".join([table(heads, rows), "",
                      "Each stage's seconds from its stage record; peak RSS of the whole job sampled. "
                      + (f"Settings beside the reduced budget: {', '.join(f'`{o}`' for o in d['config']['overrides'])}. "
                         if d["config"].get("overrides") else "")
                      + f"{d['machine']['cpu']}, {d['machine']['logical_cores']} cores, "
                      f"{str(d['machine'].get('date', ''))[:10]}.", "", ctx.source(path)])


# ----------------------------------------------------------------------------- quantization
def _quant_model(folder: str, model: str) -> dict:
    doc = load_json(_src(folder, "results.json"))
    if model not in doc["models"]:
        raise DocsError(f"{_src(folder, 'results.json')}: no model {model!r} (has {', '.join(doc['models'])})")
    return doc["models"][model]


def quantization(ctx: Ctx, folder: str, model: str) -> str:
    """Every quantization method of one model against its float graph: what stayed float,
    agreement, speed ratios, file size and the budget's verdict."""
    m = _quant_model(folder, model)
    methods = m["methods"]
    order = ["float"] + [k for k in methods if k != "float"]
    rows = []
    for k in order:
        r = methods[k]
        kept = r.get("kept_float")
        if kept == "everything":
            kept_s = "everything"
        elif kept:
            kept_s = f"{len(kept)} of {r.get('weight_matmuls', '?')} MatMuls"
        else:
            kept_s = "none"
        if k == "float":
            verdict = "reference"
        elif k == m["chosen"]:
            verdict = "**chosen**"
        else:
            verdict = "within" if r["passed"] else "outside"
        b1, b64 = ratio(r["latency_speedup"]), ratio(r["throughput_ratio"])
        if k == "float":
            b1 += f" ({r['batch_1_ms']:.{1 if r['batch_1_ms'] >= 10 else 2}f} ms)"
            b64 += f" ({r['batch_64_per_second']:,.0f}/s)"
        name = f"**{k}**" if k == m["chosen"] else k
        rows.append([name, kept_s, num(r["topk_agreement"]), b1, b64, f"{r['file_bytes'] / 2**20:.1f}", verdict])
    return "\n".join([
        table(["method", "kept in float", f"top-{m['budget']['k']} agreement", "batch-1 speed × float",
               "batch-64 throughput × float", "MiB", "budget"], rows), "",
        f"{m['num_layers']} layers, hidden {m['hidden_size']}, {m['parameters']:,} parameters. "
        + _quant_setup(m), "", ctx.source(_src(folder, "results.json"))])


def _quant_setup(m: dict) -> str:
    """The budget and the timing of one model's quantization search, in a sentence each."""
    b = m["budget"]
    split = {"valid": "validation"}.get(b["split"], b["split"])
    return (f"Budget: top-{b['k']} agreement ≥ {b['min_topk_agreement']} and {split} NDCG@10 at most "
            f"{b['max_ndcg_drop']:.0%} below float's, on {b['users']} {split} users. "
            f"Timing: {m['timing_method']}; ONNX Runtime {m['machine']['onnxruntime']} on "
            f"{m['machine']['cpu']}, {m['machine']['cores']} cores.")


def quantization_models(ctx: Ctx, folder: str) -> str:
    """One row per model of a quantization run: float latency, the agreement of int8, int4 and
    fp16, int8's speed and the graph chosen."""
    path = _src(folder, "results.json")
    doc = load_json(path)
    rows = []
    for name, m in doc["models"].items():
        meth = m["methods"]

        def agree(k: str, meth: dict = meth) -> str:
            r = meth.get(k)
            if r is None:
                return "—"
            return num(r["topk_agreement"], 3) + ("" if r["passed"] else " (outside)")

        int8 = meth.get("int8")
        rows.append([f"{name} ({m['num_layers']} layers, {m['parameters']:,} parameters)",
                     f"{meth['float']['batch_1_ms']:.2f} ms", agree("int8"),
                     ratio(int8["latency_speedup"]) if int8 else "—", agree("int4"), agree("fp16"),
                     f"`{m['chosen']}`" if m["chosen"] else "none (refused)"])
    first = next(iter(doc["models"].values()))
    return "\n".join([table(["model", "float batch-1", "int8 agreement", "int8 batch-1 speed × float",
                             "int4 agreement", "fp16 agreement", "chosen"], rows), "",
                      "(outside) = outside the budget. " + _quant_setup(first), "", ctx.source(path)])


# ----------------------------------------------------------------------------- batch scoring
def batch_scoring(ctx: Ctx, folder: str) -> str:
    """Local engine against Ray Data: per data set and set-up, the engine's throughput, its ratio
    to the local engine, the command's end-to-end seconds and peak PSS."""
    path = _src(folder, "batch_scoring.json")
    doc = load_json(path)
    names = {"bundled": doc["data"]["bundled"]["name"], "synthetic": "synthetic"}
    rows = []
    for r in doc["summary"]:
        data = f"{names.get(r['data'], r['data'])} ({r['users']:,} users)"
        rows.append([data, r["setup"], str(r["runs"]), f"{r['users_per_s_job']:,.0f}",
                     ratio(r["job_throughput_vs_local"]), f"{r['wall_s']:,.1f}", f"{r['peak_pss_mb']:,}"])
    return "\n".join([table(["data", "set-up", "runs", "users/s (engine)", "× local", "end to end s",
                             "peak PSS MB"], rows), "",
                      "Where a set-up ran several times: the median of its runs, and the largest peak PSS.", "",
                      ctx.source(path)])


def value_range(ctx: Ctx, path: str, fmt: str, *keys: str) -> str:
    """The smallest and largest of several numbers of one results file, "a–b", linked to it."""
    from benchmarks.docs.teachers import dig

    if len(keys) < 2:
        raise DocsError("range needs FILE FORMAT and at least two keys")
    doc = load_json(path)
    vals = [dig(doc, k) for k in keys]
    unit = ""
    if fmt.endswith("x"):
        fmt, unit = fmt[:-1], "×"
    lo, hi = format(min(vals), fmt), format(max(vals), fmt)
    text = lo + unit if lo == hi else f"{lo}–{hi}{unit}"
    return ctx.link(text.replace("-", "\u2212"), path)


def value_ratio(ctx: Ctx, path: str, numerator: str, denominator: str, fmt: str = ".1fx") -> str:
    """One number of a results file divided by another (a growth, a speed-up), linked to it."""
    from benchmarks.docs.teachers import dig

    doc = load_json(path)
    v = dig(doc, numerator) / dig(doc, denominator)
    text = f"{v:{fmt[:-1]}}×" if fmt.endswith("x") else format(v, fmt)
    return ctx.link(text, path)


def results_file(ctx: Ctx, path: str) -> str:
    """A link to one results file (for prose that points at a file without a table)."""
    if not (ROOT / path).exists():
        raise DocsError(f"{path}: no such file")
    return ctx.link(f"`{path}`", path)


def json_value(ctx: Ctx, path: str, dotted: str, fmt: str = ".4f") -> str:
    """One number from a results file, linked to it (for a figure inside prose)."""
    from benchmarks.docs.teachers import dig

    v = dig(load_json(path), dotted)
    if fmt.endswith("%"):
        text = f"{100 * v:.{fmt[1:-1] or 0}f}%"
    elif fmt.endswith("x"):
        text = f"{v:{fmt[:-1]}}×"
    else:
        text = format(v, fmt).replace("-", "\u2212")
    return ctx.link(text, path)


RENDERERS = {
    "provenance": provenance_table,
    "teachers": teachers_table,
    "teacher-seeds": teacher_seeds,
    "quality-grid": quality_grid,
    "quality-bootstrap": quality_bootstrap,
    "layer-sets": layer_sets,
    "layer-selection": layer_selection,
    "lowrank": lowrank,
    "pruning": pruning,
    "load-test": load_test,
    "load-time-split": load_time_split,
    "overload": overload,
    "retrieval": retrieval,
    "ddp": ddp,
    "fisher-speed": fisher_speed,
    "llm-recipe": llm_recipe,
    "precision-speed": precision_speed,
    "precision-gradients": precision_gradients,
    "scaling": scaling,
    "scaling-stages": scaling_stages,
    "quantization": quantization,
    "quantization-models": quantization_models,
    "batch-scoring": batch_scoring,
    "range": value_range,
    "ratio": value_ratio,
    "file": results_file,
    "value": json_value,
}

__all__ = ["RENDERERS", "json"]
