"""Batch scoring throughput and memory: the local engine against Ray Data with 1 and 2 actors,
and what a SIGKILLed actor costs.

    python -m benchmarks.batch_scoring --artifact /tmp/smoke/student --users 1000000 \\
        --out benchmarks/results/batch_scoring

Every run is the real command, `python -m compressor recommend ARTIFACT ... --k K`, in a
subprocess, on two inputs:

    bundled     --data ml-latest-small (610 users), `bundled_reps` times per set-up
    synthetic   --histories FILE: `users` users generated here with a fixed seed over the
                artifact's catalogue (Zipf popularity, log-normal history lengths), written
                once as Parquet and reused

and three set-ups: `--engine local` (one process; ONNX Runtime's own threads), `--engine ray
--actors 1` (one actor, CPUs threads) and `--engine ray --actors 2` (two actors, CPUs / 2 threads
each), Ray started by the command on this machine's cores. Per run: the end-to-end wall time
(what a user waits, Python and Ray start-up included), the engine's own time from its log line
(local: scoring and writing; Ray: the Ray Data job, Ray's start-up excluded but its actors'
included), and peak memory of the whole process tree (the command, and for Ray its raylet, GCS
and workers), sampled every `sample_s`: the sum of PSS (shared pages such as the object store
counted once) and the sum of RSS (shared pages counted in every process).

The kill trial repeats the 2-actor synthetic run and SIGKILLs one scoring actor (`ray::MapWorker`)
from outside, `kill_at` of the unkilled run's job time after the first actor appeared; it records
whether the command succeeded, every user's presence exactly once, the extra time, and the new
actor that replaced the dead one. The Ray and local outputs of the synthetic file are compared
row for row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from benchmarks.common import (
    machine_info,
    machine_md,
    md_table,
    run_guarded,
    save_figure,
    write_results,
)

NAME = "batch_scoring"
SETUPS = {"local": ("local", None), "ray, 1 actor": ("ray", 1), "ray, 2 actors": ("ray", 2)}


class BatchScoringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(description="artifact directory to score with (`compressor export` or a run's student/)")
    artifact_note: str = Field("", description="how the artifact was made, recorded with the results")
    users: int = Field(1_000_000, ge=1_000, description="users in the synthetic histories file")
    mean_history: float = Field(40.0, gt=1, description="median history length of the synthetic users (log-normal)")
    zipf: float = Field(1.1, gt=1, description="Zipf exponent of item popularity in the synthetic histories")
    seed: int = Field(0, description="seed of the synthetic histories")
    k: int = Field(10, ge=1, description="items per user")
    batch_size: int = Field(256, ge=1, description="users per ONNX Runtime call (both engines)")
    bundled_reps: int = Field(3, ge=1, description="runs per set-up on the bundled data")
    synthetic_reps: int = Field(1, ge=1, description="runs per set-up on the synthetic file")
    kill: bool = Field(True, description="run the kill trial (2 actors, synthetic file)")
    kill_at: float = Field(0.4, gt=0, lt=1, description="when to kill: this fraction of the unkilled job time")
    compare: bool = Field(True, description="compare the Ray and local outputs of the synthetic file row for row")
    sample_s: float = Field(0.5, gt=0, description="memory sampling interval (seconds)")
    timeout_s: float = Field(3600, gt=0, description="limit per command (seconds)")
    work: str = Field("/tmp/batch_scoring", description="scratch directory: the histories file and outputs")


def synth_histories(path: Path, vocab_items: list, users: int, median_len: float, zipf: float, seed: int,
                    chunk: int = 100_000) -> dict:
    """`users` histories (user, items) over the catalogue, written as Parquet in row groups of
    `chunk` users; item popularity is Zipf over a random order of the catalogue, lengths are
    log-normal (sigma 1) clipped to [3, 1000]. Returns what was generated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    items = np.asarray(vocab_items)[rng.permutation(len(vocab_items))]
    p = 1.0 / np.arange(1, len(items) + 1) ** zipf
    cdf = np.cumsum(p / p.sum())
    total = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pq.ParquetWriter(tmp, pa.schema([("user", pa.int64()), ("items", pa.list_(pa.int64()))])) as w:
        for a in range(0, users, chunk):
            n = min(chunk, users - a)
            lens = np.clip(rng.lognormal(np.log(median_len), 1.0, n).astype(np.int64), 3, 1000)
            flat = items[np.minimum(np.searchsorted(cdf, rng.random(lens.sum())), len(items) - 1)]
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            w.write_table(pa.table({"user": np.arange(a, a + n, dtype=np.int64),
                                    "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))}))
            total += int(lens.sum())
    tmp.replace(path)
    return {"users": users, "interactions": total, "mean_length": total / users, "median_length": median_len,
            "zipf": zipf, "seed": seed, "bytes": path.stat().st_size}


class TreeSampler:
    """Peak PSS and RSS sums of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float):
        import psutil

        self.root, self.every = psutil.Process(pid), every
        self.peak_pss = self.peak_rss = 0
        self.workers: set[int] = set()  # pids of Ray scoring actors seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def tree(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def actors(self) -> list:
        import psutil

        out = []
        for p in self.tree():
            try:
                if "MapWorker" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            pss = rss = 0
            for p in self.tree():
                try:
                    m = p.memory_full_info()
                    pss, rss = pss + getattr(m, "pss", m.rss), rss + m.rss
                except psutil.Error:
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.workers |= {p.pid for p in self.actors()}
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def one_run(cfg: BatchScoringConfig, source: list[str], engine: str, actors: int | None, out: Path,
            log: Path, kill_after: float | None = None) -> dict:
    """One command; `kill_after`: SIGKILL a scoring actor this many seconds after the first appears."""
    import shutil

    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "compressor", "recommend", cfg.artifact, *source, "--k", str(cfg.k),
           "--out", str(out), "--batch-size", str(cfg.batch_size), "--engine", engine]
    if actors:
        cmd += ["--actors", str(actors)]
    env = {**os.environ, "TQDM_DISABLE": "1"}  # Ray's progress too (the command turns it off)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        sampler = TreeSampler(proc.pid, cfg.sample_s)
        killed = None
        try:
            if kill_after is not None:
                first = None
                while proc.poll() is None and killed is None:
                    live = sampler.actors()
                    if live and first is None:
                        first = time.perf_counter()
                    if first is not None and time.perf_counter() - first >= kill_after:
                        victim = live[0]
                        victim.send_signal(signal.SIGKILL)  # as `kill -9`: no clean-up
                        killed = {"pid": victim.pid, "at_s": round(time.perf_counter() - t0, 2),
                                  "after_first_actor_s": round(time.perf_counter() - first, 2)}
                    time.sleep(0.2)
            rc = proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        finally:
            sampler.stop()
    wall = time.perf_counter() - t0
    text = log.read_text()
    m = re.search(r"top-\d+ items of ([\d,]+) users written to .*?([\d.]+) s\)", text)
    users = int(m.group(1).replace(",", "")) if m else None
    job = float(m.group(2)) if m else None
    return {"engine": engine, "actors": actors, "ok": rc == 0, "returncode": rc, "wall_s": round(wall, 2),
            "job_s": job, "users": users, "users_per_s_wall": round(users / wall, 1) if users else None,
            "users_per_s_job": round(users / job, 1) if users and job else None,
            "peak_pss_mb": round(sampler.peak_pss / 2**20), "peak_rss_sum_mb": round(sampler.peak_rss / 2**20),
            "actor_pids": len(sampler.workers), "killed": killed, "load_1m_at_start": round(load, 2),
            "error": None if rc == 0 else text.strip().splitlines()[-1] if text.strip() else "no output"}


def check_output(out: Path, k: int, users: int) -> dict:
    """Every user exactly once with k rows, in whatever parts the engine wrote."""
    import pyarrow.parquet as pq

    col = pq.read_table(out, columns=["user"]).column("user").to_numpy()
    uniq, counts = np.unique(col, return_counts=True)
    return {"rows": int(len(col)), "users": int(len(uniq)), "every_user_k_rows": bool((counts == k).all()),
            "complete": bool(len(uniq) == users and (counts == k).all())}


def compare(a: Path, b: Path) -> dict:
    import pandas as pd

    x = pd.read_parquet(a).sort_values(["user", "rank"], kind="stable").reset_index(drop=True)
    y = pd.read_parquet(b).sort_values(["user", "rank"], kind="stable").reset_index(drop=True)
    same = len(x) == len(y) and bool((x["user"].to_numpy() == y["user"].to_numpy()).all())
    items = float((x["item"].to_numpy() == y["item"].to_numpy()).mean()) if same else None
    return {"rows": len(x), "same_users_and_ranks": same, "same_item_fraction": items,
            "max_abs_score_diff": float(np.abs(x["score"] - y["score"]).max()) if same else None}


def run(cfg: BatchScoringConfig, progress=print, update=None) -> dict:
    """All runs; `update(doc)` after each one (the results so far, so a long run that is stopped
    still leaves what it measured)."""
    from compressor.artifact import verify_artifact
    from compressor.data.vocab import ItemVocab

    manifest = verify_artifact(cfg.artifact)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    hist = work / f"histories-{cfg.users}-seed{cfg.seed}.parquet"
    t0 = time.perf_counter()
    synth = synth_histories(hist, ItemVocab.load(cfg.artifact).items, cfg.users, cfg.mean_history, cfg.zipf, cfg.seed)
    synth["generate_s"] = round(time.perf_counter() - t0, 1)
    progress(f"synthetic histories: {synth}")
    inputs = {"bundled": (["--data", "ml-latest-small"], cfg.bundled_reps, 610),
              "synthetic": (["--histories", str(hist)], cfg.synthetic_reps, cfg.users)}
    runs, outs = [], {}
    doc = {"benchmark": NAME, "config": cfg.model_dump(), "machine": machine_info(),
           "artifact": {"path": cfg.artifact, "note": cfg.artifact_note,
                        **{f: manifest.get(f) for f in ("architecture", "num_layers", "hidden_size", "max_len",
                                                        "vocab_size", "serve_model")}},
           "data": {"bundled": {"name": "ml-latest-small", "users": 610}, "synthetic": synth}, "runs": runs}

    def changed() -> None:
        doc["summary"] = summarise(runs)
        if update is not None:
            update(doc)

    def measure(data: str, name: str, rep: int) -> None:
        engine, actors = SETUPS[name]
        out = work / f"{data}-{engine}-{actors}.{'parquet' if engine == 'local' else 'dir'}"
        r = {"data": data, "setup": name, "rep": rep, **one_run(
            cfg, inputs[data][0], engine, actors, out, work / f"{data}-{engine}-{actors}-{rep}.log")}
        runs.append(r)
        outs[(data, name)] = out
        progress(json.dumps(r))
        changed()

    for rep in range(cfg.bundled_reps):  # set-ups interleaved within a rep: other jobs' load hits them alike
        for name in SETUPS:
            measure("bundled", name, rep)
    # the synthetic file: the most wanted numbers first (local, 2 actors, the kill trial), so a run
    # stopped early has them
    for rep in range(cfg.synthetic_reps):
        measure("synthetic", "local", rep)
        measure("synthetic", "ray, 2 actors", rep)
        if rep == 0 and cfg.compare:
            doc["synthetic_ray_vs_local"] = compare(outs[("synthetic", "ray, 2 actors")], outs[("synthetic", "local")])
            progress(f"compare: {doc['synthetic_ray_vs_local']}")
            changed()
        if rep == 0 and cfg.kill:
            base = [r for r in runs if r["data"] == "synthetic" and r["setup"] == "ray, 2 actors" and r["ok"]]
            job = statistics.median(r["job_s"] for r in base) if base else 60.0
            out = work / "synthetic-ray-kill.dir"
            r = one_run(cfg, inputs["synthetic"][0], "ray", 2, out, work / "synthetic-ray-kill.log",
                        kill_after=cfg.kill_at * job)
            r["output"] = check_output(out, cfg.k, cfg.users) if r["ok"] else None
            r["unkilled_job_s"] = job
            doc["kill"] = r
            progress(f"kill: {json.dumps(r)}")
            changed()
        measure("synthetic", "ray, 1 actor", rep)
    changed()
    return doc


def summarise(runs: list[dict]) -> list[dict]:
    """Medians per (data, set-up), with ratios to the local engine in the same data set."""
    rows = []
    for data in dict.fromkeys(r["data"] for r in runs):
        local = None
        for name in SETUPS:
            rs = [r for r in runs if r["data"] == data and r["setup"] == name and r["ok"]]
            if not rs:
                continue
            row = {"data": data, "setup": name, "runs": len(rs), "users": rs[0]["users"],
                   "wall_s": statistics.median(r["wall_s"] for r in rs),
                   "job_s": statistics.median(r["job_s"] for r in rs),
                   "users_per_s_wall": statistics.median(r["users_per_s_wall"] for r in rs),
                   "users_per_s_job": statistics.median(r["users_per_s_job"] for r in rs),
                   "peak_pss_mb": max(r["peak_pss_mb"] for r in rs), "peak_rss_sum_mb": max(r["peak_rss_sum_mb"] for r in rs)}
            local = local or row
            row["job_throughput_vs_local"] = round(row["users_per_s_job"] / local["users_per_s_job"], 3)
            row["wall_throughput_vs_local"] = round(row["users_per_s_wall"] / local["users_per_s_wall"], 3)
            rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    a, s = doc["artifact"], doc["data"]["synthetic"]
    lines = [f"# Batch scoring: local engine vs Ray Data ({doc['machine']['date']})", "",
             f"Machine: {machine_md(doc['machine'])}.", "",
             f"Artifact: `{a['path']}` ({a['note'] or 'no note'}): {a['architecture']}, {a['num_layers']} layers, "
             f"hidden {a['hidden_size']}, max_len {a['max_len']}, {a['vocab_size']:,} tokens; graph {a['serve_model']}.",
             "", f"Data: ml-latest-small (610 users, {doc['config']['bundled_reps']} runs per set-up) and "
             f"{s['users']:,} synthetic users ({s['interactions']:,} interactions, mean history {s['mean_length']:.1f}, "
             f"Zipf {s['zipf']}, seed {s['seed']}; {doc['config']['synthetic_reps']} run(s) per set-up); "
             f"k = {doc['config']['k']}, batch {doc['config']['batch_size']} users.", "",
             "End to end = the whole command (Python and Ray start-up included); job = the engine's own time "
             "(local: scoring and writing; Ray: the Ray Data job, actor start-up included). Peak memory of the "
             "command's process tree: PSS sum (shared pages once) and RSS sum (shared pages in every process).", "",
             md_table(["data", "set-up", "runs", "users", "end to end s", "job s", "users/s (job)", "x local (job)",
                       "users/s (end to end)", "x local (end to end)", "peak PSS MB", "peak RSS sum MB"],
                      [[r["data"], r["setup"], r["runs"], r["users"], r["wall_s"], r["job_s"], r["users_per_s_job"],
                        r["job_throughput_vs_local"], r["users_per_s_wall"], r["wall_throughput_vs_local"],
                        r["peak_pss_mb"], r["peak_rss_sum_mb"]] for r in doc["summary"]])]
    if c := doc.get("synthetic_ray_vs_local"):
        lines += ["", f"Ray (2 actors) vs local on the synthetic file: {c['rows']:,} rows, same users and ranks: "
                  f"{c['same_users_and_ranks']}, same item at every rank: {c['same_item_fraction']}, "
                  f"max |score difference| {c['max_abs_score_diff']}."]
    if k := doc.get("kill"):
        o = k.get("output") or {}
        lines += ["", "## A killed actor", "",
                  f"2 actors on the synthetic file; one `ray::MapWorker` was SIGKILLed from outside "
                  f"{(k['killed'] or {}).get('after_first_actor_s')} s after the first actor appeared "
                  f"(the unkilled job took {k['unkilled_job_s']} s). The command "
                  f"{'succeeded' if k['ok'] else 'failed: ' + str(k['error'])} in {k['wall_s']} s end to end "
                  f"(job {k['job_s']} s); scoring actor processes seen: {k['actor_pids']} (2 at the start, "
                  f"so {k['actor_pids'] - 2} restarted); output: {o.get('rows')} rows, {o.get('users')} users, "
                  f"every user exactly once with k rows: {o.get('complete')}."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    datas = list(dict.fromkeys(r["data"] for r in doc["summary"]))
    for ax, key, title in ((axes[0], "users_per_s_job", "users/s, engine job"),
                           (axes[1], "users_per_s_wall", "users/s, end to end"),
                           (axes[2], "peak_pss_mb", "peak PSS of the process tree (MB)")):
        width = 0.8 / len(SETUPS)
        for i, name in enumerate(SETUPS):
            vals = [next((r[key] for r in doc["summary"] if r["data"] == d and r["setup"] == name), 0) for d in datas]
            ax.bar(np.arange(len(datas)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(datas)) + width, [f"{d}\n({doc['data'][d]['users']:,} users)" for d in datas])
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"Batch scoring on {doc['machine']['logical_cores']} cores: local engine vs Ray Data actors")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--artifact-note", default="")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--bundled-reps", type=int, default=3)
    p.add_argument("--synthetic-reps", type=int, default=1)
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--work", default="/tmp/batch_scoring")
    p.add_argument("--out", default="benchmarks/results/batch_scoring")
    args = p.parse_args(argv)

    def body() -> None:
        cfg = BatchScoringConfig(artifact=args.artifact, artifact_note=args.artifact_note, users=args.users,
                                 bundled_reps=args.bundled_reps, synthetic_reps=args.synthetic_reps,
                                 kill=not args.no_kill, work=args.work)
        doc = run(cfg, progress=lambda m: print(m, flush=True),
                  update=lambda d: write_results(args.out, NAME, d, markdown, plot))
        print(markdown(doc))

    return run_guarded(NAME, body)


if __name__ == "__main__":
    sys.exit(main())
