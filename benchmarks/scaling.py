"""How the whole job's time and memory grow with the catalogue: synthetic sets of growing size.

    python -m benchmarks.scaling --items 10000 100000 --out benchmarks/results/scaling \\
        --work runs/scaling [key=value ...]

For each catalogue size the data is `compressor synth` (interactions = items x
`interactions_per_item`, users = interactions / `interactions_per_user`), then the whole job
(`compressor run` on the `--config`, a smoke-sized model, with the reduced budget below and any
key=value overrides) runs as a subprocess whose resident memory (the process and its children) is
sampled every `sample_seconds`. Each stage's wall time comes from its stage record; its peak RSS is
the largest sample inside the stage's time window. A size the memory check refuses (data.memory_
budget_gib) is recorded with the refusal line: that is the check working, not a crash.

Reduced budget (stated in every results file): the teacher and the distillation see one epoch over
each user's newest window (`train.recent_windows=1`, no clock cap), so their work grows with users
x catalogue as a full epoch would, at a fraction of its cost; validation and test rank the whole
catalogue for a seeded sample of 10,000 users (`data.eval_users`), so evaluation grows with items
only. Overrides after the reduced budget (e.g. a time cap) are stated beside it. The growth exponent of a stage is the
slope of log(seconds) (or log(peak RSS)) against log(items) between consecutive sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from benchmarks.common import (
    machine_info,
    machine_md,
    md_table,
    run_guarded,
    save_figure,
    write_results,
)

# the reduced job: a smoke-sized model, one pass over each user's newest window, EASE where it fits,
# validation and test on a sample of 10,000 users (full-catalogue ranking costs users x items)
REDUCED = [
    "teacher.train.epochs=1", "teacher.train.recent_windows=1", "teacher.train.max_minutes=null",
    "distill.train.epochs=1", "distill.train.recent_windows=1", "distill.train.max_minutes=null",
    "evaluate.baselines=[mostpop,ease]", "data.eval_users=10000",
]


class ScalingConfig(BaseModel):
    """What `run` measures."""

    model_config = ConfigDict(extra="forbid")
    items: list[int] = Field(default_factory=lambda: [10_000, 100_000], description="catalogue sizes, ascending")
    interactions_per_item: int = Field(10, ge=1, description="interactions = items x this")
    interactions_per_user: int = Field(50, ge=3, description="users = interactions / this (mean history length)")
    seed: int = Field(0, description="synth seed")
    config: str = Field("smoke", description="the job's config (a smoke-sized model)")
    overrides: list[str] = Field(default_factory=list, description="key=value on top of the reduced budget")
    work: str = Field("runs/scaling", description="data and run directories")
    sample_seconds: float = Field(0.5, gt=0, description="RSS sampling period")
    timeout_minutes: float = Field(120.0, gt=0, description="a size's job is stopped after this")


class _RssSampler:
    """Resident memory of a process tree, sampled in a thread: [(unix time, bytes)]."""

    def __init__(self, pid: int, period: float) -> None:
        import psutil

        self.period, self.samples = period, []
        try:
            self.proc = psutil.Process(pid)
        except psutil.Error:  # gone already: nothing to sample
            self.proc = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while self.proc is not None and not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.samples.append((time.time(), rss))
            except psutil.Error:
                break
            self._stop.wait(self.period)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def _measured(cmd: list[str], period: float, timeout_s: float, log_path: Path) -> dict:
    """Run `cmd`, sampling its tree's RSS: returncode, seconds, samples, the last stderr line."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        sampler = _RssSampler(proc.pid, period)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        samples = sampler.stop()
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if " error: " in ln]  # the CLI's one-line error, when there is one
    return {"returncode": code, "seconds": time.time() - start, "samples": samples,
            "last_line": (errors or lines or [""])[-1]}


def _env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1"}


def _peak(samples: list[tuple[float, int]], a: float = -math.inf, b: float = math.inf) -> int | None:
    inside = [r for t, r in samples if a <= t <= b]
    return max(inside) if inside else None


def _stage_rows(run_dir: Path, samples: list[tuple[float, int]]) -> dict:
    """Each finished stage's seconds (its record) and the peak RSS sampled inside its window
    (record end time has 1 s resolution, so the window is widened by one second at the end)."""
    from compressor.pipeline import STAGES

    rows = {}
    for name in STAGES:
        path = run_dir / "stages" / f"{name}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        end = datetime.fromisoformat(rec["finished_at"]).timestamp()
        rows[name] = {"seconds": rec["seconds"], "peak_rss_gib": _gib(_peak(samples, end - rec["seconds"], end + 1))}
        summary = rec.get("summary") or {}
        # a training stage's pace and why it stopped: a time cap makes its seconds a cap, not a growth
        rows[name].update({k: summary[k] for k in ("stop_reason", "steps", "epochs", "epochs_run", "seconds_per_step",
                                                    "seconds_per_epoch") if k in summary})
    return rows


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def measure_size(cfg: ScalingConfig, items: int) -> dict:
    """Synthesize one size and run the reduced job on it: the per-stage record."""
    interactions = items * cfg.interactions_per_item
    users = max(1, interactions // cfg.interactions_per_user)
    work = Path(cfg.work) / f"items-{items}"
    data, run_dir = work / "data", work / "run"
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"items": items, "users": users, "interactions": interactions,
                 "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_average_1m": round(os.getloadavg()[0], 2)}
    if not (data / "interactions.parquet").exists():
        syn = _measured([sys.executable, "-m", "compressor", "synth", "--users", str(users), "--items", str(items),
                         "--interactions", str(interactions), "--seed", str(cfg.seed), "--out", str(data)],
                        cfg.sample_seconds, cfg.timeout_minutes * 60, work / "synth.log")
        if syn["returncode"] != 0:
            raise RuntimeError(f"synth failed for {items} items: {syn['last_line']}")
        row["synth"] = {"seconds": syn["seconds"], "peak_rss_gib": _gib(_peak(syn["samples"]))}
    shutil.rmtree(run_dir, ignore_errors=True)  # every stage runs and is measured (none skipped as up to date)
    job = _measured([sys.executable, "-m", "compressor", "run", "--config", cfg.config, "--out", str(run_dir),
                     f"data.name={data}", *REDUCED, *cfg.overrides],
                    cfg.sample_seconds, cfg.timeout_minutes * 60, work / "run.log")
    row["job"] = {"returncode": job["returncode"], "seconds": job["seconds"],
                  "peak_rss_gib": _gib(_peak(job["samples"]))}
    if job["returncode"] != 0:
        row["job"]["refused" if "memory:" in job["last_line"] else "error"] = job["last_line"]
    row["stages"] = _stage_rows(run_dir, job["samples"])
    if (run_dir / "evaluation.json").exists():
        ev = json.loads((run_dir / "evaluation.json").read_text())
        row["test_ndcg@10"] = {k: v["ndcg@10"] for k, v in ev["metrics"].items() if ":" not in k}
        row["baselines_skipped"] = ev.get("baselines_skipped", {})
    return row


def exponents(rows: list[dict], key: str) -> dict[str, list[float | None]]:
    """Per stage, the slope of log(key) against log(items) between consecutive measured sizes."""
    stages = {s for r in rows for s in r.get("stages", {})}
    out = {}
    for s in sorted(stages):
        slopes = []
        for a, b in zip(rows, rows[1:], strict=False):
            va, vb = (r.get("stages", {}).get(s, {}).get(key) for r in (a, b))
            slopes.append(math.log(vb / va) / math.log(b["items"] / a["items"]) if va and vb else None)
        out[s] = slopes
    return out


def run(cfg: ScalingConfig, earlier: dict | None = None) -> dict:
    """Measure every size in `cfg.items` (ascending); the results document. Sizes that `earlier`
    (a previous results document of the same settings) measured are kept, not measured again, so
    a larger size can be added to a finished run."""
    same = earlier is not None and {k: v for k, v in earlier["config"].items() if k != "items"} == \
        {k: v for k, v in cfg.model_dump().items() if k != "items"}
    kept = {r["items"]: r for r in earlier["sizes"]} if same else {}
    rows = [kept.get(n) or measure_size(cfg, n) for n in sorted(cfg.items)]
    finished = [r for r in rows if r.get("stages")]
    return {"config": cfg.model_dump(), "reduced_budget": REDUCED, "machine": machine_info(), "sizes": rows,
            "exponent_seconds": exponents(finished, "seconds"), "exponent_peak_rss": exponents(finished, "peak_rss_gib")}


def _markdown(doc: dict) -> str:
    from compressor.pipeline import STAGES

    rows = doc["sizes"]
    head = ["stage"] + [f"{r['items']:,} items: s" for r in rows] + [f"{r['items']:,} items: peak GiB" for r in rows]
    body = []
    for s in ["synth", *STAGES]:
        cells = [(r.get("synth") if s == "synth" else r.get("stages", {}).get(s)) or {} for r in rows]
        if not any(cells):
            continue
        body.append([s] + [c.get("seconds") for c in cells] + [c.get("peak_rss_gib") for c in cells])
    body.append(["whole job"] + [r["job"]["seconds"] for r in rows] + [r["job"]["peak_rss_gib"] for r in rows])
    exp_head = ["stage"] + [f"{a['items']:,} → {b['items']:,}: time, RSS"
                            for a, b in zip(rows, rows[1:], strict=False)]
    exp_body = [[s] + [f"{_e(t)}, {_e(m)}" for t, m in zip(doc["exponent_seconds"][s], doc["exponent_peak_rss"][s],
                                                           strict=True)]
                for s in doc["exponent_seconds"]]
    sizes = "; ".join(f"{r['items']:,} items, {r['users']:,} users, {r['interactions']:,} interactions" for r in rows)
    notes = []
    for r in rows:
        for k in ("refused", "error"):
            if k in r["job"]:
                notes.append(f"- {r['items']:,} items: job {k} (exit {r['job']['returncode']}): `{r['job'][k]}`")
        for stage, rec in (r.get("stages") or {}).items():
            if rec.get("stop_reason") in ("time cap", "step limit"):
                pace = (f"{rec['seconds_per_step']:.2f} s a step" if rec.get("seconds_per_step")
                        else f"{rec.get('seconds_per_epoch', 0):.0f} s an epoch")
                done = rec.get("epochs", rec.get("epochs_run"))
                notes.append(f"- {r['items']:,} items: {stage} stopped by `{rec['stop_reason']}` after "
                             + (f"{done:.2f} epochs" if done is not None else "part of its pass")
                             + f" ({pace}): its seconds are the cap, not the full pass")
        for why in (r.get("baselines_skipped") or {}).values():
            notes.append(f"- {r['items']:,} items: {why}")
        if r.get("test_ndcg@10"):
            q = r["test_ndcg@10"]
            notes.append(f"- {r['items']:,} items, test NDCG@10: " + ", ".join(f"{k} {v:.4f}" for k, v in q.items()))
    return "\n".join([
        "# Scaling: time and peak memory per stage against catalogue size", "",
        f"Machine: {machine_md(doc['machine'])}.", "",
        f"Data: `compressor synth` (seed {doc['config']['seed']}): {sizes}. Job: `compressor run --config "
        f"{doc['config']['config']}` with the reduced budget {', '.join(f'`{o}`' for o in doc['reduced_budget'])}"
        + (f" and {', '.join(f'`{o}`' for o in doc['config']['overrides'])}" if doc["config"]["overrides"] else "")
        + ". Each stage's seconds come from its stage record; its peak RSS is the largest sample (every "
        f"{doc['config']['sample_seconds']} s, the job process and its children) inside its time window.", "",
        md_table(head, body), "",
        "Growth exponent (slope of log time and log peak RSS against log items; 1 = linear):", "",
        md_table(exp_head, exp_body), "",
        *notes, "", "![scaling](scaling.png)", "",
    ])


def _e(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["sizes"] if r.get("stages")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    stages = sorted({s for r in rows for s in r["stages"]}, key=lambda s: -max(r["stages"].get(s, {}).get("seconds")
                                                                                 or 0 for r in rows))
    for i, s in enumerate(stages):
        for ax, key in zip(axes, ("seconds", "peak_rss_gib"), strict=True):
            pts = [(r["items"], r["stages"][s][key]) for r in rows if (r["stages"].get(s) or {}).get(key)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s, color=f"C{i % 10}")
    for ax, label in zip(axes, ("seconds (stage record)", "peak RSS (GiB, sampled)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalogue size (items)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if stages:
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Whole job per stage vs catalogue size (log-log)", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--interactions-per-item", type=int, default=10)
    ap.add_argument("--interactions-per-user", type=int, default=50)
    ap.add_argument("--config", default="smoke")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/scaling")
    ap.add_argument("--work", default="runs/scaling")
    ap.add_argument("--timeout-minutes", type=float, default=120.0)
    ap.add_argument("--add", action="store_true", help="keep the sizes OUT/scaling.json measured with the same "
                    "settings; measure only the others")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="job config overrides")
    args = ap.parse_args(argv)

    def body() -> None:
        cfg = ScalingConfig(items=args.items, interactions_per_item=args.interactions_per_item,
                            interactions_per_user=args.interactions_per_user, seed=args.seed, config=args.config,
                            overrides=args.overrides, work=args.work, timeout_minutes=args.timeout_minutes)
        previous = Path(args.out) / "scaling.json"
        doc = run(cfg, json.loads(previous.read_text()) if args.add and previous.exists() else None)
        write_results(args.out, "scaling", doc, _markdown, _plot)
        print(f"scaling: results in {args.out}/scaling.md")

    return run_guarded("benchmarks.scaling", body)


if __name__ == "__main__":
    sys.exit(main())
