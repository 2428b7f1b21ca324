"""The README's results summary: the current default and LLM configs side by side, every figure
a link to the file it comes from."""

from __future__ import annotations

from benchmarks.docs.core import RESULTS, Ctx, load_json, num, ratio, signed
from benchmarks.docs.jobs import report, time_v

JOBS = {"default": "default_job", "llm": "llm_job", "llm_fp32": "llm_job_fp32"}
# default_job kept only report.md (4 decimals); the same teacher (seed 0) in its seed run, unrounded
SEED_RUN = {"default_job": ("teacher_seeds30", 0)}
# Served (HTTP) ratios: the load tests of each config's current artifacts (float vs float, then the
# served student graph against the float teacher where the budget chose a quantized one)
LOAD_TESTS = {"default": ["load_test_current"], "llm": ["llm_served_float", "llm_served"]}


def _job_cells(ctx: Ctx, folder: str) -> dict[str, str]:
    doc, src = report(folder)
    m = doc["evaluation"]["metrics"]
    boot = doc["evaluation"]["bootstrap_ndcg@10"]["teacher - ease"]
    t, s, e = m["teacher"]["ndcg@10"], m["student"]["ndcg@10"], m["ease"]["ndcg@10"]
    timing = doc["speed"]["timing"]
    T, S = doc["teacher"], doc["student"]
    L = lambda text: ctx.link(text, src)  # noqa: E731
    ci = f"[{signed(boot['ci_low'])}, {signed(boot['ci_high'])}]"
    vs_ease = L(ratio(t / e))
    if src.endswith(".md"):  # 4-decimal figures: take the ratio from the unrounded seed run
        seeds = f"{RESULTS}/{SEED_RUN[folder][0]}/teacher_seeds.json"
        vs_ease = ctx.link(ratio(load_json(seeds)["seeds"][SEED_RUN[folder][1]]["vs_ease"]), seeds)
    return {
        "teacher": L(f"{num(t)}") + f", {vs_ease} EASE's {L(num(e))}",
        "teacher_ci": L(f"{signed(boot['mean_diff'])} {ci}")
                      + (" (excludes 0)" if boot["excludes_zero"] else " (includes 0)"),
        "student": f"{S['num_layers']} of {T['num_layers']} layers, "
                   f"{L(ratio(S['parameters'] / T['parameters']))} the parameters",
        "retention": L(num(s)) + f" = {L(f'{100 * s / t:.0f}%')} of the teacher",
        "b1": L(ratio(timing["student"]["batch_1"]["ms_median"] / timing["teacher"]["batch_1"]["ms_median"])),
        "b64": L(ratio(timing["student"]["batch_64"]["per_second"] / timing["teacher"]["batch_64"]["per_second"])),
        "minutes": L(f"{sum(doc['stage_seconds'].values()) / 60:.1f} min") + " (sum of stage times)",
    }


def _served(ctx: Ctx, folders: list[str]) -> str:
    parts = []
    for f in folders:
        path = f"{RESULTS}/{f}/load_test.json"
        d = load_json(path)
        lv = {c["users"]: c for c in d["comparison"]["levels"]}
        c = lv.get(8) or next(iter(lv.values()))
        files = d["services"]["teacher"]["model_file"], d["services"]["student"]["model_file"]
        what = "float vs float" if files == ("model.onnx", "model.onnx") else f"student `{files[1]}` vs teacher `{files[0]}`"
        parts.append(f"p99 {ctx.link(ratio(c['p99_ms']), path)}, QPS {ctx.link(ratio(c['qps']), path)} "
                     f"({what}, {c['users']} users)")
    from benchmarks.docs.teachers import FOLDERS, TEACHERS

    tid = FOLDERS[folders[0]][0]
    if TEACHERS[tid].status == "current":
        return "; ".join(parts) + f" (teacher `{tid}`)"
    return "; ".join(parts) + f"; *measured on the retired teacher `{tid}`, not rerun yet*"


def summary(ctx: Ctx) -> str:
    d, g, f = (_job_cells(ctx, JOBS[k]) for k in ("default", "llm", "llm_fp32"))
    rows = [
        ("teacher, test NDCG@10 (× EASE)", "teacher"),
        ("teacher − EASE, paired 95% CI", "teacher_ci"),
        ("student", "student"),
        ("student, test NDCG@10 (retention)", "retention"),
        ("student ÷ teacher, ONNX batch-1 latency", "b1"),
        ("student ÷ teacher, ONNX batch-64 throughput", "b64"),
        ("whole job on 2 CPU cores", "minutes"),
    ]
    lines = ["| | default config (`configs/default.yaml`) | LLM config (`configs/llm.yaml`), native-bf16 CPU "
             "| LLM config, CPU without native bf16 (fp32) |", "|---|---|---|---|"]
    lines += [f"| {label} | {d[key]} | {g[key]} | {f[key]} |" for label, key in rows]
    lines.append(f"| served over HTTP, student ÷ teacher | {_served(ctx, LOAD_TESTS['default'])} | "
                 f"not load-tested (the fp32 job's artifacts were) | {_served(ctx, LOAD_TESTS['llm'])} |")
    return "\n".join(lines) + ("\n\nTest split of the bundled ml-latest-small, full ranking over the catalogue, "
                               "one run of each job; speed is ONNX Runtime on the job's machine.")


def _machine(folder: str) -> str:
    from benchmarks.docs.teachers import folder_machine

    m, _ = folder_machine(folder)
    return f"{m.get('logical_cores') or m.get('cores')} CPU cores ({m['cpu']})"


def _min(doc: dict, stage: str) -> str:
    return f"{doc['stage_seconds'][stage] / 60:.1f} min"


def job_times(ctx: Ctx) -> str:
    """The quick start's measured times: one bullet per job, linked to its report. The LLM job's
    fp32 run stands for a CPU without native bf16 (forced on the measuring machine)."""
    doc, src = report(JOBS["default"])
    job_min = sum(doc["stage_seconds"].values()) / 60
    out = [f"- command 1 (the default job): {ctx.link(f'{job_min:.1f} min', src)} "
           f"(the sum of its stage times) on {_machine(JOBS['default'])}, plus the install;"]
    where = {"llm": "on a CPU with native bf16 (AVX512-BF16 or AMX), where `precision: auto` trains in bf16",
             "llm_fp32": "on a CPU without native bf16 (most laptops and many cloud VMs), where `precision: auto` "
                         "trains in fp32 (forced with `teacher.train.precision=fp32 distill.train.precision=fp32`)"}
    for key, cpu in where.items():
        doc, src = report(JOBS[key])
        tt = f"{RESULTS}/{JOBS[key]}/time.txt"
        minutes, rss = time_v(tt)
        rss /= 2**20
        teacher = doc["evaluation"]["metrics"]["teacher"]["ndcg@10"]
        out.append(f"- command 3 (the LLM job) {cpu}: {ctx.link(f'{minutes:.1f} min', tt)} wall clock, peak RSS "
                   f"{ctx.link(f'{rss:.1f} GiB', tt)} on {_machine(JOBS[key])}, training in "
                   f"{doc['teacher_training']['precision']} (teacher training {ctx.link(_min(doc, 'teacher'), src)}, "
                   f"export including quantization {ctx.link(_min(doc, 'export'), src)}); its teacher's test "
                   f"NDCG@10 {ctx.link(num(teacher), src)};")
    return "\n".join(out)

RENDERERS = {"summary": summary, "job-times": job_times}
