"""The README's results summary: the current default and LLM configs side by side, every figure
a link to the file it comes from."""

from __future__ import annotations

from benchmarks.docs.core import RESULTS, Ctx, load_json, num, ratio, signed
from benchmarks.docs.jobs import report

JOBS = {"default": "default_job", "llm": "llm_job"}
# default_job kept only report.md (4 decimals); the same teacher (seed 0) in its seed run, unrounded
SEED_RUN = {"default_job": ("teacher_seeds30", 0)}
# Served (HTTP) ratios: no load test has been run on the current teachers yet; these folders are
# the latest, and the table names the teacher they used.
LOAD_TESTS = {"default": ["load_test"], "llm": ["llm_load_test", "llm_load_test_student_int8"]}


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
        files = d["services"]["student"]["model_file"]
        what = "int8 student vs float teacher" if files != "model.onnx" else "float vs float"
        parts.append(f"p99 {ctx.link(ratio(c['p99_ms']), path)}, QPS {ctx.link(ratio(c['qps']), path)} "
                     f"({what}, {c['users']} users)")
    from benchmarks.docs.teachers import FOLDERS

    tid = FOLDERS[folders[0]][0]
    return "; ".join(parts) + f"; *measured on the retired teacher `{tid}`, not rerun yet*"


def summary(ctx: Ctx) -> str:
    d, g = _job_cells(ctx, JOBS["default"]), _job_cells(ctx, JOBS["llm"])
    rows = [
        ("teacher, test NDCG@10 (× EASE)", "teacher"),
        ("teacher − EASE, paired 95% CI", "teacher_ci"),
        ("student", "student"),
        ("student, test NDCG@10 (retention)", "retention"),
        ("student ÷ teacher, ONNX batch-1 latency", "b1"),
        ("student ÷ teacher, ONNX batch-64 throughput", "b64"),
        ("whole job on 2 CPU cores", "minutes"),
    ]
    lines = ["| | default config (`configs/default.yaml`) | LLM config (`configs/llm.yaml`) |", "|---|---|---|"]
    lines += [f"| {label} | {d[key]} | {g[key]} |" for label, key in rows]
    lines.append(f"| served over HTTP, student ÷ teacher | {_served(ctx, LOAD_TESTS['default'])} | "
                 f"{_served(ctx, LOAD_TESTS['llm'])} |")
    return "\n".join(lines) + ("\n\nTest split of the bundled ml-latest-small, full ranking over the catalogue, "
                               "one run of each job; speed is ONNX Runtime on the job's machine.")


def _machine(folder: str) -> str:
    from benchmarks.docs.teachers import folder_machine

    m, _ = folder_machine(folder)
    return f"{m.get('logical_cores') or m.get('cores')} CPU cores ({m['cpu']})"


def job_times(ctx: Ctx) -> str:
    """The quick start's measured times: one bullet per job, linked to its report."""
    import re

    from benchmarks.docs.core import read_text

    doc, src = report(JOBS["default"])
    job_min = sum(doc["stage_seconds"].values()) / 60
    out = [f"- command 1 (the default job): {ctx.link(f'{job_min:.1f} min', src)} "
           f"(the sum of its stage times) on {_machine(JOBS['default'])}, plus the install;"]
    doc, src = report(JOBS["llm"])
    tt = f"{RESULTS}/{JOBS['llm']}/time.txt"
    text = read_text(tt)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)[1]
    minutes = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":")))) / 60
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) / 2**20
    prec = doc["teacher_training"]["precision"]
    out.append(f"- command 3 (the LLM job) on {_machine(JOBS['llm'])}, training in "
               f"{prec}: {ctx.link(f'{minutes:.1f} min', tt)} wall clock, peak RSS "
               f"{ctx.link(f'{rss:.1f} GiB', tt)};")
    # a CPU without native bf16: `precision: auto` trains in fp32 there
    speed = f"{RESULTS}/precision_speed/precision_speed.json"
    ratio = load_json(speed)["fp32_over_bf16"]
    train_s = doc["stage_seconds"]["teacher"] + doc["stage_seconds"]["distill"]
    fp32_min = minutes + train_s * (ratio - 1) / 60
    out.append(f"- command 3 on a CPU without native bf16 (no AVX512-BF16/AMX, most laptops and many cloud "
               f"VMs), where `precision: auto` trains in fp32: an fp32 training step took "
               f"{ctx.link(f'{ratio:.2f}x', speed)} a bf16 step on {_machine('precision_speed')} (1 thread), so about {fp32_min:.0f} min, an estimate "
               f"from the training stages (the whole job in fp32 is not measured yet; AVX2 fp32 kernels are "
               f"slower than this machine's, so expect more);")
    return "\n".join(out)


RENDERERS = {"summary": summary, "job-times": job_times}
