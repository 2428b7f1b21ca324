"""Which teacher each results folder was measured on, and the provenance.json written beside it.

A teacher is named once here with the file that records its config and its test NDCG@10; each
folder is mapped to one. `current` teachers are checked against today's configs (the fields that
define the model; device, precision, parallel mode and the path are not compared), so a recipe
change that leaves a "current" label behind fails `--check`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks.docs.core import RESULTS, ROOT, DocsError, load_json


@dataclass(frozen=True)
class Teacher:
    description: str
    status: str  # current | retired
    path: str  # where it lived when it was measured (run folders are not in the repository)
    config: tuple[str, str] | None  # (results file, dotted key) of its recorded TeacherConfig
    test: tuple[str, str] | None  # (results file, dotted key) of its test NDCG@10
    current_config: str | None = None  # the config file whose teacher it still is


TEACHERS: dict[str, Teacher] = {
    "small-8L-30ep": Teacher(
        "small teacher: 8-layer Llama, hidden 64, 30 epochs with moving windows (seed 0)",
        "current", "runs/default/models/teacher",
        ("teacher_seeds30/teacher_seeds.json", "teacher"),
        ("teacher_seeds30/teacher_seeds.json", "seeds.0.test_ndcg@10"), "configs/default.yaml"),
    "small-8L-24ep": Teacher(
        "small teacher of an earlier recipe: 8 layers, 24 epochs (seed 0)",
        "retired", "runs/default/models/teacher",
        ("teacher_seeds/teacher_seeds.json", "teacher"),
        ("teacher_seeds/teacher_seeds.json", "seeds.0.test_ndcg@10")),
    "small-16L-28ep": Teacher(
        "retired 16-layer small teacher (batch 64, fixed windows, 28-epoch cosine schedule)",
        "retired", "runs/default/models/teacher", None,
        ("quality/common.json", "teacher.test.ndcg@10")),
    "small-16L-b": Teacher(
        "retired 16-layer small teacher of a later run of the same session",
        "retired", "runs/default/models/teacher", None,
        ("quality_ends/common.json", "teacher.test.ndcg@10")),
    "small-reduced": Teacher(
        "reduced-budget small teacher (default architecture of the time, 16 layers, stopped after 3 epochs)",
        "retired", "runs/teacher12", None,
        ("lowrank/lowrank.json", "rows.0.ndcg@10")),
    "llm-8ep": Teacher(
        "retired SmolLM2-135M teacher: 8-epoch schedule, fixed window cuts",
        "retired", "runs/llm/models/teacher", None,
        ("llm_quality/common.json", "teacher.test.ndcg@10")),
    "llm-5ep": Teacher(
        "retired SmolLM2-135M teacher: 5 epochs, fixed window cuts",
        "retired", "runs/llm5/models/teacher",
        ("llm_job_5epochs/report.json", "config.teacher"),
        ("llm_job_5epochs/report.json", "evaluation.metrics.teacher.ndcg@10")),
    "llm-rw": Teacher(
        "SmolLM2-135M teacher: 5 epochs with moving windows (configs/llm.yaml)",
        "current", "runs/llm_e2e/models/teacher",
        ("llm_job/report.json", "config.teacher"),
        ("llm_job/report.json", "evaluation.metrics.teacher.ndcg@10"), "configs/llm.yaml"),
    "llm-rw-fp32": Teacher(
        "SmolLM2-135M teacher of configs/llm.yaml trained in fp32 (what `precision: auto` picks on a CPU "
        "without native bf16; forced on a bf16 machine)",
        "current", "runs/llm_fp32/models/teacher",
        ("llm_job_fp32/report.json", "config.teacher"),
        ("llm_job_fp32/report.json", "evaluation.metrics.teacher.ndcg@10"), "configs/llm.yaml"),
}

# folder -> (teacher id or None, what the folder measured it on / why there is none)
FOLDERS: dict[str, tuple[str | None, str]] = {
    "default_job": ("small-8L-30ep", "the default job (seed 0)"),
    "teacher_seeds30": ("small-8L-30ep", "trains the current recipe over seeds 0, 1, 2"),
    "teacher_seeds": ("small-8L-24ep", "trains the 24-epoch recipe over seeds 0, 1, 2 (compared with 30 epochs)"),
    "teacher_seeds_ema": ("small-8L-24ep", "trains the 24-epoch recipe with weight averaging, seeds 0, 1, 2"),
    "lowrank_default": ("small-8L-24ep", "factorizes the teacher itself"),
    "quality": ("small-16L-28ep", "distils students of it"),
    "pruning": ("small-16L-28ep", "prunes and quantizes the teacher itself"),
    "layer_selection": ("small-16L-28ep", "importance estimators and layer sets of it"),
    "load_test": ("small-16L-28ep", "serves it and its 2-layer student"),
    "retrieval_real": ("small-16L-28ep", "the item embeddings of its student"),
    "quality_ends": ("small-16L-b", "distils [0, 15] students of it"),
    "lowrank": ("small-reduced", "factorizes the teacher itself"),
    "fisher_speed_small": ("small-reduced", "times Fisher on it"),
    "llm_job": ("llm-rw", "the LLM job, one command"),
    "llm_job_fp32": ("llm-rw-fp32", "the LLM job in fp32, one command, timed"),
    "llm_served_float": ("llm-rw-fp32", "serves it and its 8-layer student, both float"),
    "llm_served": ("llm-rw-fp32", "serves it (float) and its student's graph chosen by the quality budget"),
    "llm_served_vs_quantized_teacher": ("llm-rw-fp32", "serves it and its student, each as the quality budget "
                                                       "chose (the fair comparison)"),
    "load_test_current": ("small-8L-30ep", "serves it and its 2-layer student (a rerun of the default job)"),
    "llm_job_moving_windows": ("llm-rw", "the same recipe, trained in a two-part run (runs/llm_rw/teacher)"),
    "llm_quality_rw": ("llm-rw", "distils students of it"),
    "llm_quality_rw_ablation": ("llm-rw", "distils students of ablation's layers of it"),
    "llm_layer_sets_rw": ("llm-rw", "compares layer sets of it"),
    "llm_job_5epochs": ("llm-5ep", "the LLM job of the time"),
    "llm_recipe_regularised": ("llm-5ep", "a regularised recipe compared with it (stopped after 3 epochs)"),
    "llm_quality": ("llm-8ep", "distils students of it"),
    "llm_quality_ablation": ("llm-8ep", "distils students of ablation's layers of it"),
    "llm_quality_distributed": ("llm-8ep", "distils students of its distributed layers"),
    "llm_quality_narrow": ("llm-8ep", "distils half-width students of it"),
    "llm_fisher_ld_variants": ("llm-8ep", "FISHER-LD variants on students of it"),
    "llm_layer_sets": ("llm-8ep", "compares layer sets of it"),
    "llm_lowrank": ("llm-8ep", "factorizes its 8-layer student"),
    "llm_lowrank_global": ("llm-8ep", "factorizes its 8-layer student"),
    "llm_load_test": ("llm-8ep", "serves it and its student"),
    "llm_load_test_u32": ("llm-8ep", "serves it and its student"),
    "llm_load_test_int8": ("llm-8ep", "serves it and its student"),
    "llm_load_test_student_int8": ("llm-8ep", "serves it and its student"),
    "fisher_speed_llm": ("llm-8ep", "times Fisher on it"),
    "llm_recipe": (None, "trains its own short-schedule LLM teachers (2 epochs), one per recipe"),
    "retrieval": (None, "synthetic item vectors: no model"),
    "overload": (None, "a tiny test artifact (4 layers, hidden 32): the service's admission control, not a model"),
    "ddp_throughput": (None, "an untrained default architecture: training throughput only"),
    "scaling": (None, "synthetic catalogues, a smoke-sized model trained for each size: time and memory only"),
    "quantization": (None, "the default recipe cut to 8 epochs (a run of its own, not the config's teacher): "
                           "quantization methods against each model's own float graph"),
    "batch_scoring": (None, "batch-scoring engines over given artifacts: throughput and fault handling, not model quality"),
    "quantization_llm": (None, "the student of a reduced LLM run (40 users, 1 epoch; not the config's teacher): "
                               "quantization methods against its own float graph"),
    "precision_gradients": (None, "the SmolLM2-135M teacher adapted to the catalogue, before training: one "
                                  "batch's gradients only"),
    "retrieval_1e6": (None, "the item vectors of the 10^6-item scaling job's teacher (one pass): retrieval only"),
    "kd_candidates": ("small-8L-30ep", "distils its truncated student again with candidate KD (the default job's run)"),
    "sampled_softmax_full": (None, "a smoke-sized teacher (4 layers, hidden 32) per seed, 20 epochs, full softmax"),
    "sampled_softmax_sampled": (None, "a smoke-sized teacher (4 layers, hidden 32) per seed, 20 epochs, "
                                      "sampled softmax (1,024 logQ-corrected negatives)"),
    "precision_speed": (None, "SmolLM2-135M with a random item table: training step time only, fp32 vs bf16"),
}

MODEL_FIELDS_IGNORED = ("device", "precision", "parallel", "path")


def dig(doc, dotted: str):
    """doc[a][b][c] for "a.b.c"; a list takes an index, and a key that itself holds dots
    ("model.int8.onnx") is matched whole, the longest first."""
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        if isinstance(doc, list):
            try:
                doc = doc[int(parts[i])]
            except (ValueError, IndexError):
                raise DocsError(f"no key {dotted!r}: {parts[i]!r} is not an index of a list") from None
            i += 1
            continue
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if isinstance(doc, dict) and key in doc:
                doc, i = doc[key], j
                break
        else:
            raise DocsError(f"no key {dotted!r}: nothing named {parts[i]!r} at that level")
    return doc


def _model_fields(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k not in MODEL_FIELDS_IGNORED}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in MODEL_FIELDS_IGNORED}
    return out


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def teacher_config(tid: str) -> dict | None:
    t = TEACHERS[tid]
    return None if t.config is None else dig(load_json(f"{RESULTS}/{t.config[0]}"), t.config[1])


def teacher_test(tid: str) -> float | None:
    t = TEACHERS[tid]
    return None if t.test is None else float(dig(load_json(f"{RESULTS}/{t.test[0]}"), t.test[1]))


def _added_at_default(recorded: dict, now: dict, default: dict) -> None:
    """A field added to the config after the results were recorded, and set to its default, changes
    nothing the results measured (a new default that changed behaviour would be a new default, and
    differ): copy it into `recorded` so it is not reported as a difference."""
    for k, v in now.items():
        if k not in recorded and v == default.get(k):
            recorded[k] = v
    if isinstance(recorded.get("train"), dict) and isinstance(now.get("train"), dict):
        _added_at_default(recorded["train"], now["train"], default.get("train") or {})


def check_current() -> None:
    """Every teacher marked current still has the model fields of its config file (resolved with
    its defaults, as `compressor run` resolves it)."""
    from compressor.config import load_config
    from compressor.pipeline.config import RunConfig

    for tid, t in TEACHERS.items():
        if t.status != "current":
            continue
        recorded = _model_fields(teacher_config(tid))
        now = _model_fields(load_config(RunConfig, ROOT / t.current_config).teacher.model_dump(mode="json"))
        _added_at_default(recorded, now, _model_fields(RunConfig().teacher.model_dump(mode="json")))
        diff = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        if "train" in diff:
            rt, nt = recorded.get("train", {}), now.get("train", {})
            diff.remove("train")
            diff += [f"train.{k}" for k in sorted(set(rt) | set(nt)) if rt.get(k) != nt.get(k)]
        if diff:
            raise DocsError(f"teacher {tid} is marked current but {t.current_config} now differs in "
                            f"{', '.join(diff)}: rerun its results or mark it retired in benchmarks/docs/teachers.py")


# ----------------------------------------------------------------------------- machine
_RUN_AT = re.compile(r"Run at (\S+) on ([^(]+?) \((\d+) cores")


def folder_machine(folder: str) -> tuple[dict | None, str | None]:
    """The machine a folder's own files name, and the file that names it."""
    base = ROOT / RESULTS / folder
    for path in sorted(base.glob("*.json")):
        if path.name == "provenance.json":
            continue
        doc = json.loads(path.read_text())
        m = doc.get("machine") or (doc.get("speed") or {}).get("machine")
        if m:
            keep = {k: m[k] for k in ("cpu", "logical_cores", "cores", "memory_gb", "date") if k in m}
            if "date" not in keep and doc.get("created_at"):
                keep["date"] = doc["created_at"]
            return keep, f"{RESULTS}/{folder}/{path.name}"
    report = base / "report.md"
    if report.is_file():
        m = _RUN_AT.search(report.read_text())
        if m:
            return {"cpu": m[2].strip(), "cores": int(m[3]), "date": m[1]}, f"{RESULTS}/{folder}/report.md"
    readme = base / "README.md"
    if readme.is_file() and "AMD EPYC, 2 cores" in readme.read_text():
        return {"cpu": "AMD EPYC", "cores": 2}, f"{RESULTS}/{folder}/README.md"
    # a comparison of other folders' runs (layer_sets.json names them): their machine
    for path in base.glob("layer_sets.json"):
        runs = sorted(set(json.loads(path.read_text())["runs"].values()))
        for run in runs:
            m, src = folder_machine(Path(run).name)
            if m:
                return m, src
    return None, None


def provenance(folder: str) -> dict:
    if folder not in FOLDERS:
        raise DocsError(f"{RESULTS}/{folder}: not mapped to a teacher in benchmarks/docs/teachers.py")
    tid, how = FOLDERS[folder]
    machine, machine_source = folder_machine(folder)
    doc: dict = {"folder": f"{RESULTS}/{folder}"}
    if tid is None:
        doc["teacher"] = {"id": None, "status": "none", "what": how}
    else:
        t = TEACHERS[tid]
        cfg = teacher_config(tid)
        doc["teacher"] = {
            "id": tid, "status": t.status, "description": t.description, "what": how, "path": t.path,
            "config_sha256_16": None if cfg is None else config_hash(cfg),
            "config_source": None if t.config is None else f"{RESULTS}/{t.config[0]} ({t.config[1]})",
            "test_ndcg@10": teacher_test(tid),
            "test_ndcg@10_source": None if t.test is None else f"{RESULTS}/{t.test[0]} ({t.test[1]})",
        }
        if cfg is None:
            doc["teacher"]["config_note"] = "no results file kept this teacher's config"
    doc["machine"] = machine
    doc["machine_source"] = machine_source
    doc["generated_by"] = "python -m benchmarks.docs (benchmarks/docs/teachers.py)"
    return doc


def results_folders() -> list[str]:
    """The results folders the documentation covers: those with a file under version control (a
    benchmark still writing an uncommitted folder does not make the pages stale); every folder
    when this is not a git checkout."""
    import subprocess

    all_dirs = sorted(p.name for p in (ROOT / RESULTS).iterdir() if p.is_dir())
    try:
        r = subprocess.run(["git", "ls-files", "--", RESULTS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return all_dirs
    if r.returncode != 0:
        return all_dirs
    tracked = {Path(line).relative_to(RESULTS).parts[0] for line in r.stdout.splitlines() if line.count("/") >= 3}
    return [d for d in all_dirs if d in tracked]


def provenance_files() -> dict[str, str]:
    """{repository path: content} of every folder's provenance.json."""
    folders = results_folders()
    unmapped = [f for f in folders if f not in FOLDERS]
    if unmapped:
        raise DocsError(f"results folders with no teacher: {', '.join(unmapped)}; add each to FOLDERS in "
                        "benchmarks/docs/teachers.py (the teacher it was measured on, or None and why), "
                        "then run `python -m benchmarks.docs`")
    return {f"{RESULTS}/{f}/provenance.json": json.dumps(provenance(f), indent=2) + "\n" for f in folders}
