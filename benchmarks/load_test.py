"""Teacher vs student under the same HTTP load: latency, QPS, errors and server memory.

Usage:
    python -m benchmarks.load_test --teacher runs/default/teacher_artifact \
        --student runs/default/student_artifact --users 1,8,32 --duration 20s \
        --out benchmarks/results/load_test

For each artifact in turn (teacher, then student) it starts `bentoml serve serving.service:Recommender`
on a free loopback port with RECSYS_ARTIFACT_DIR and the same ONNX Runtime / Faiss thread
settings, waits for /readyz, sends serial warm-up requests (end-to-end HTTP latency at
concurrency 1), runs headless Locust (`benchmarks/locustfile.py`, same users, spawn rate and
duration) at every concurrency level while sampling the RSS of the server's process tree,
then stops the server's process group. Beside that it profiles where a request's time goes
(ONNX Runtime model call, Faiss retrieval, the rest of the engine) in a fresh process with
the serving code itself. It writes load_test.json, load_test.md and load_test.png to --out
(plus logs/ and the payload file used). Every wait is bounded; every process it started is
stopped, also on Ctrl-C, SIGTERM or failure.

Overload (issue #12 item 6): one artifact past saturation, once per RECSYS_MAX_CONCURRENCY value
(0 = no limit), counting shed requests (503) and the latency of the accepted ones:
    python -m benchmarks.load_test --overload 0,16 --student ART --users 64 --duration 20s \
        --out benchmarks/results/overload
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from benchmarks.common import machine_info, save_figure, write_json
from benchmarks.load_report import compare, level_stats, plot_levels, report_md
from benchmarks.make_payloads import (
    build_payloads,
    load_payloads,
    save_payloads,
    sequences_from_artifact,
)
from benchmarks.processes import (
    ProcessGroup,
    RssSampler,
    bentoml_server,
    log_tail,
    tree_rss,
)
from compressor.artifact import load_manifest
from compressor.atomic import atomic_write
from compressor.errors import CompressorError

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ROLES = ("teacher", "student")


class LoadTestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: Path
    student: Path
    users: list[int] = Field([1, 8, 32], description="concurrency levels (Locust users)")
    duration_s: float = Field(20.0, gt=0, le=3600)
    spawn_rate: float | None = Field(None, gt=0, description="users started per second; None = all at once")
    service: str = "serving.service:Recommender"
    host: str = "127.0.0.1"
    ort_threads: int = Field(1, ge=1, description="RECSYS_ORT_INTRA_THREADS of both services")
    faiss_threads: int = Field(1, ge=1)
    env: dict[str, str] = Field({}, description="extra environment for both services (e.g. RECSYS_WORKERS)")
    teacher_model_file: str | None = Field(
        None, description="ONNX file the teacher serves (RECSYS_MODEL_FILE, e.g. model.int8.onnx); None = its default")
    student_model_file: str | None = Field(
        None, description="ONNX file the student serves: an int8 student against a float teacher in one run")
    payloads: Path | None = Field(None, description="payload file; None = built from the student artifact")
    user_weight: int = Field(1, ge=0)
    history_weight: int = Field(1, ge=0)
    k: int = Field(10, ge=1)
    warmup_requests: int = Field(50, ge=1, description="serial requests before the load (timed)")
    profile_requests: int = Field(200, ge=1, description="in-process model/retrieval timings")
    ready_timeout_s: float = Field(180.0, gt=0)
    rss_interval_s: float = Field(0.2, gt=0)
    cooldown_s: float = Field(1.0, ge=0)


def service_env(cfg: LoadTestConfig, artifact: Path, role: str = "student") -> dict:
    """Identical settings for teacher and student; only the artifact (and, when asked, the ONNX
    file the role serves) differs."""
    home = Path(tempfile.gettempdir()) / "recsys-bench-bentoml-home"  # outside the project, or `bentoml build` packs it
    model_file = getattr(cfg, f"{role}_model_file")
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
            "RECSYS_ARTIFACT_DIR": str(artifact.resolve()),
            "RECSYS_ORT_INTRA_THREADS": str(cfg.ort_threads), "RECSYS_ORT_INTER_THREADS": "1",
            "RECSYS_FAISS_THREADS": str(cfg.faiss_threads), "OMP_NUM_THREADS": str(cfg.faiss_threads),
            **cfg.env, **({"RECSYS_MODEL_FILE": model_file} if model_file else {})}


def _bodies(payloads: dict, n: int, k: int) -> list[dict]:
    """n request bodies alternating known users and explicit histories."""
    users, hists = payloads["user_ids"], payloads["histories"]
    out = []
    for i in range(n):
        if (i % 2 == 0 and users) or not hists:
            out.append({"user_id": users[(i // 2) % len(users)], "k": k})
        else:
            out.append({"history": hists[(i // 2) % len(hists)], "k": k})
    return out


def serial_http(url: str, payloads: dict, n: int, k: int) -> dict:
    """End-to-end latency of one client, one request at a time (also the server's warm-up)."""
    times, errors = [], 0
    with requests.Session() as s:
        for body in _bodies(payloads, n, k):
            t0 = time.perf_counter()
            r = s.post(url + "/recommend", json=body, timeout=30)
            times.append((time.perf_counter() - t0) * 1e3)
            errors += r.status_code != 200 or len(r.json()["items"]) != k
    return {"requests": n, "errors": int(errors), "ms_p50": float(np.median(times)),
            "ms_p95": float(np.percentile(times, 95))}


def profile_artifact(artifact: str, env: dict, payloads: dict, n: int, k: int) -> dict:
    """Model vs retrieval vs the rest, batch 1, with the serving engine in this (fresh) process."""
    os.environ.update({key: v for key, v in env.items() if key.startswith(("RECSYS_", "OMP_"))})
    import psutil

    from serving.recommender import BadRequest, NotFoundError, RecommenderEngine

    me = psutil.Process()
    rss0 = me.memory_info().rss
    engine = RecommenderEngine.from_env()
    rss_loaded = me.memory_info().rss
    model, retrieval, total = [], [], []
    for i, body in enumerate(_bodies(payloads, n + 10, k)):
        try:
            q = engine.resolve(body.get("user_id"), body.get("history"))
        except (BadRequest, NotFoundError) as e:
            raise CompressorError(f"{artifact}: a payload request fails: {e}") from None
        t0 = time.perf_counter()
        vec = engine.encoder.encode([q.tokens])
        t1 = time.perf_counter()
        engine.index.search(vec, k, [q.seen])
        t2 = time.perf_counter()
        engine.recommend(body.get("user_id"), body.get("history"), k)
        t3 = time.perf_counter()
        if i >= 10:  # the first runs warm ORT and the allocator up
            model.append((t1 - t0) * 1e3)
            retrieval.append((t2 - t1) * 1e3)
            total.append((t3 - t2) * 1e3)
    return {"model_ms_p50": float(np.median(model)), "model_ms_p95": float(np.percentile(model, 95)),
            "retrieval_ms_p50": float(np.median(retrieval)),
            "retrieval_ms_p95": float(np.percentile(retrieval, 95)),
            "engine_ms_p50": float(np.median(total)), "requests": n, "index": engine.index.kind,
            "providers": engine.encoder.providers, "model_load_rss_bytes": rss_loaded - rss0,
            "process_rss_bytes": me.memory_info().rss}


def run_profile(cfg: LoadTestConfig, artifact: Path, payloads: dict, role: str = "student") -> dict:
    """`profile_artifact` in a spawned process: clean RSS figures, no state shared with the runner."""
    with mp.get_context("spawn").Pool(1) as pool:
        job = pool.apply_async(profile_artifact, (str(artifact), service_env(cfg, artifact, role), payloads,
                                                   cfg.profile_requests, cfg.k))
        return job.get(timeout=cfg.ready_timeout_s + 120)


def run_locust(cfg: LoadTestConfig, group: ProcessGroup, url: str, users: int, payload_path: Path,
               work: Path, server_pid: int) -> dict:
    prefix = work / f"locust_u{users}"
    latency_file = work / f"latency_u{users}.npy"
    for stale in (Path(f"{prefix}.json"), latency_file, latency_file.with_suffix(".errors.json")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # RECSYS_HONOR_RETRY_AFTER etc. stay defaults
    rate = cfg.spawn_rate or users
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", str(rate), "-t", f"{cfg.duration_s:g}s", "--host", url, "--json-file", str(prefix),
           "--stop-timeout", "5", "--loglevel", "WARNING", "--only-summary",
           # the locustfile's own options (benchmarks/locustfile.py)
           "--payloads", str(payload_path), "--top-k", str(cfg.k), "--user-weight", str(cfg.user_weight),
           "--history-weight", str(cfg.history_weight), "--latency-file", str(latency_file)]
    log = work / f"locust_u{users}.log"
    with RssSampler(server_pid, cfg.rss_interval_s) as rss:
        proc = group.start(cmd, log, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=cfg.duration_s + users / rate + 60)  # bounded even if Locust hangs
        except subprocess.TimeoutExpired:
            group.stop(proc)
            raise CompressorError(f"locust did not finish in time:\n{log_tail(log)}") from None
        group.stop(proc)
    stats_path = Path(f"{prefix}.json")
    if not stats_path.exists():
        raise CompressorError(f"locust wrote no stats (exit code {proc.returncode}):\n{log_tail(log)}")
    stats = json.loads(stats_path.read_text())
    latencies = np.load(latency_file) if latency_file.exists() else None
    errors_file = latency_file.with_suffix(".errors.json")
    errors = json.loads(errors_file.read_text()) if errors_file.exists() else None
    return {**level_stats(stats, latencies, errors), "users": users, "spawn_rate": rate,
            "peak_rss_bytes": rss.peak, "mean_rss_bytes": float(np.mean(rss.samples)),
            "locust_exit_code": proc.returncode}


def run_service(cfg: LoadTestConfig, role: str, artifact: Path, payload_path: Path, payloads: dict,
                out: Path, bar: tqdm) -> dict:
    manifest = load_manifest(artifact)
    logs = out / "logs"
    served = service_env(cfg, artifact, role).get("RECSYS_MODEL_FILE")
    result = {"role": role, "artifact": str(artifact.resolve()), **_model_facts(manifest, served)}
    bar.set_description(f"{role}: profile")
    result["profile"] = run_profile(cfg, artifact, payloads, role)
    bar.set_description(f"{role}: start server")
    # bentoml_server starts again on fresh ports if one was taken between choosing and binding it
    with bentoml_server(service_env(cfg, artifact, role), logs / f"{role}_server.log", cfg.ready_timeout_s,
                        cfg.host, cfg.service) as server:
        result["ready_s"] = server.ready_s
        result["serial_http"] = serial_http(server.url, payloads, cfg.warmup_requests, cfg.k)
        result["idle_rss_bytes"] = tree_rss(server.proc.pid)
        result["levels"] = []
        for users in cfg.users:
            bar.set_description(f"{role}: {users} users")
            result["levels"].append(run_locust(cfg, server.group, server.url, users, payload_path, logs,
                                               server.proc.pid))
            if server.proc.poll() is not None:
                raise CompressorError(f"{role} server died during the load:\n{log_tail(server.log)}")
            bar.update(1)
            time.sleep(cfg.cooldown_s)
    return result


def _model_facts(manifest: dict, model_file: str | None = None) -> dict:
    """What is served: `model_file` (RECSYS_MODEL_FILE) when set, else the manifest's choice."""
    serve = model_file or manifest["serve_model"]
    files = manifest["files"]
    model_bytes = sum(meta["bytes"] for name, meta in files.items() if name == serve or name == serve + ".data")
    return {"kind": manifest["kind"], "architecture": manifest["architecture"],
            "num_layers": manifest["num_layers"], "hidden_size": manifest["hidden_size"],
            "parameters": manifest.get("parameters"), "model_file": serve, "model_bytes": model_bytes,
            "embeddings_bytes": files.get("item_embeddings.npy", {}).get("bytes"),
            "num_items": manifest.get("num_items")}


def check_payloads(payloads: dict, artifact: Path) -> None:
    """Every known-user request must name a user of the artifact, or it would count as an error."""
    users = set(sequences_from_artifact(artifact)[0])
    unknown = [u for u in payloads["user_ids"] if str(u) not in users]
    if unknown:
        raise CompressorError(f"{len(unknown)} of the payload's {len(payloads['user_ids'])} user ids are not "
                              f"users of {artifact} (e.g. {unknown[:5]}); make the payloads from this "
                              "artifact (python -m benchmarks.make_payloads --artifact ...)")


def run(cfg: LoadTestConfig, out: str | Path) -> dict:
    """Run the whole comparison and write load_test.{json,md,png} under `out`; returns the JSON."""
    out = Path(out)
    for role in ROLES:  # fail before starting anything
        onnx_files = load_manifest(getattr(cfg, role))["onnx_files"]
        wanted = getattr(cfg, f"{role}_model_file")
        if wanted and wanted not in onnx_files:
            raise CompressorError(f"--{role}-model-file {wanted}: not in the {role} artifact (it has {sorted(onnx_files)})")
    if not cfg.users or min(cfg.users) < 1:
        raise CompressorError("--users needs positive concurrency levels")
    if cfg.payloads is not None:
        payload_path, payloads = cfg.payloads, load_payloads(cfg.payloads)
    else:
        payloads = build_payloads(*sequences_from_artifact(cfg.student))
        payload_path = save_payloads(payloads, out / "payloads.json")
    for role in ROLES:
        check_payloads(payloads, getattr(cfg, role))
    info = machine_info()
    services = {}
    with tqdm(total=len(ROLES) * len(cfg.users), desc="load test", unit="level") as bar:
        for role in ROLES:
            services[role] = run_service(cfg, role, getattr(cfg, role), payload_path, payloads, out, bar)
    server_env = {k: v for k, v in service_env(cfg, cfg.student).items()
                  if k.startswith(("RECSYS_", "OMP_")) and k != "RECSYS_ARTIFACT_DIR"}
    payload = {"config": cfg.model_dump(mode="json"), "machine": info, "server_env": server_env,
               "load_average_1m_end": round(os.getloadavg()[0], 2), "payloads": str(payload_path),
               "services": services, "comparison": compare(services["teacher"], services["student"])}
    write_json(out / "load_test.json", payload)
    save_figure(plot_levels(services), out / "load_test.png")
    atomic_write(out / "load_test.md", report_md(payload))
    return payload


def overload_stats(records: np.ndarray, window_s: float) -> dict:
    """Accepted (HTTP 200) vs shed (503/429) requests from the locustfile's per-request records
    (start s, ms, ok, status); latency percentiles of the accepted ones only."""
    status, ms, ok = records[:, 3].astype(int), records[:, 1], records[:, 2] == 1
    accepted, shed = ms[status == 200], ms[np.isin(status, (503, 429))]

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else None

    return {"requests": len(records), "accepted": len(accepted), "shed": len(shed),
            "other_errors": int(len(records) - len(accepted) - len(shed)),
            "wrong_answers": int(((status == 200) & ~ok).sum()),
            "accepted_qps": len(accepted) / max(window_s, 1e-9),
            **{f"accepted_p{q}_ms": pct(accepted, q) for q in (50, 95, 99)},
            "accepted_max_ms": float(accepted.max()) if len(accepted) else None,
            "shed_p50_ms": pct(shed, 50), "shed_p99_ms": pct(shed, 99)}


def run_overload(cfg: LoadTestConfig, artifact: Path, limits: list[int], out: Path) -> dict:
    """`cfg.users` Locust users against `artifact` once per max-concurrency limit; writes
    overload.json and overload.md under `out`."""
    payloads = build_payloads(*sequences_from_artifact(artifact))
    payload_path = save_payloads(payloads, out / "logs" / "payloads.json")
    rows = []
    with tqdm(total=len(limits) * len(cfg.users), desc="overload", unit="run") as bar:
        for limit in limits:
            logs = out / "logs" / f"max_concurrency_{limit}"
            env = {**service_env(cfg, artifact), "RECSYS_MAX_CONCURRENCY": str(limit)}
            with bentoml_server(env, logs / "server.log", cfg.ready_timeout_s, cfg.host, cfg.service) as server:
                serial_http(server.url, payloads, cfg.warmup_requests, cfg.k)  # warm-up
                for users in cfg.users:
                    level = run_locust(cfg, server.group, server.url, users, payload_path, logs, server.proc.pid)
                    records = np.load(logs / f"latency_u{users}.npy")
                    rows.append({"max_concurrency": limit, "users": users, "window_s": level["window_s"],
                                 "peak_rss_bytes": level["peak_rss_bytes"], "errors": level["errors"],
                                 **overload_stats(records, level["window_s"])})
                    bar.update(1)
                    time.sleep(cfg.cooldown_s)
    payload = {"config": cfg.model_dump(mode="json"), "artifact": str(artifact.resolve()),
               **_model_facts(load_manifest(artifact), service_env(cfg, artifact).get("RECSYS_MODEL_FILE")), "limits": limits,
               "honor_retry_after": os.environ.get("RECSYS_HONOR_RETRY_AFTER", "1").lower() in ("1", "true", "yes"),
               "machine": machine_info(), "load_average_1m_end": round(os.getloadavg()[0], 2), "runs": rows}
    write_json(out / "overload.json", payload)
    atomic_write(out / "overload.md", overload_md(payload))
    return payload


def overload_md(p: dict) -> str:
    def f(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"# Overload: {p['kind']} ({p['num_layers']} layers), {p['config']['duration_s']:g} s per run", "",
             f"Artifact `{p['artifact']}`; Locust `FastHttpUser`s back to back (no think time), "
             f"loopback; clients {'wait' if p.get('honor_retry_after', True) else 'do NOT wait'} for "
             f"`Retry-After` after a 503 (RECSYS_HONOR_RETRY_AFTER="
             f"{int(p.get('honor_retry_after', True))}); 1-minute load average at the end "
             f"{p['load_average_1m_end']} (2 cores shared with other jobs). Shed = HTTP 503 "
             "(+ `Retry-After`) from serving/guard.py; percentiles are of the accepted (HTTP 200) requests.",
             "", "| max_concurrency | users | requests | accepted | shed (503) | other errors | accepted QPS "
             "| p50 ms | p95 ms | p99 ms | max ms | shed p50 ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["runs"]:
        lines.append(f"| {r['max_concurrency'] or 'off'} | {r['users']} | {r['requests']} | {r['accepted']} | "
                     f"{r['shed']} | {r['other_errors']} | {f(r['accepted_qps'])} | {f(r['accepted_p50_ms'])} | "
                     f"{f(r['accepted_p95_ms'])} | {f(r['accepted_p99_ms'])} | {f(r['accepted_max_ms'])} | "
                     f"{f(r['shed_p50_ms'], '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError) as e:
        raise argparse.ArgumentTypeError(f"duration like 20s, 2m or 20, got {text!r}") from e


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, help="teacher artifact directory")
    p.add_argument("--student", required=True, type=Path, help="student artifact directory")
    p.add_argument("--overload", metavar="LIMITS", help="overload mode: comma-separated "
                   "RECSYS_MAX_CONCURRENCY values (0 = no limit) for the --student artifact only")
    p.add_argument("--users", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=_duration, default=20.0, help="per level, e.g. 20s or 1m")
    p.add_argument("--spawn-rate", type=float, default=None, help="users per second (default: all at once)")
    p.add_argument("--ort-threads", type=int, default=1)
    p.add_argument("--payloads", type=Path, help="payload file (default: built from the student artifact)")
    p.add_argument("--user-weight", type=int, default=1)
    p.add_argument("--history-weight", type=int, default=1)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server env, repeatable")
    p.add_argument("--teacher-model-file", help="ONNX file the teacher serves, e.g. model.int8.onnx")
    p.add_argument("--student-model-file", help="ONNX file the student serves, e.g. model.int8.onnx")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        bad = [item for item in args.env if "=" not in item]
        if bad:
            raise CompressorError(f"--env expects KEY=VALUE, got {bad}")
        env = dict(item.split("=", 1) for item in args.env)
        users = [int(u) for u in args.users.split(",") if u.strip()]
        if args.teacher is None and not args.overload:
            raise CompressorError("--teacher is required (except with --overload)")
        cfg = LoadTestConfig(teacher=args.teacher or args.student, student=args.student, users=users, duration_s=args.duration,
                             spawn_rate=args.spawn_rate, ort_threads=args.ort_threads, env=env,
                             payloads=args.payloads, user_weight=args.user_weight,
                             teacher_model_file=args.teacher_model_file,
                             student_model_file=args.student_model_file,
                             history_weight=args.history_weight, ready_timeout_s=args.ready_timeout)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
        try:
            if args.overload:
                limits = [int(v) for v in args.overload.split(",") if v.strip()]
                result = run_overload(cfg, args.student, limits, args.out)
                print((args.out / "overload.md").read_text())
                return 0 if all(r["other_errors"] == r["wrong_answers"] == 0 for r in result["runs"]) else 1
            payload = run(cfg, args.out)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except ValueError as e:  # includes pydantic's ValidationError and a bad --env / --users
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except CompressorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every server and load generator was stopped", file=sys.stderr)
        return 130
    print((args.out / "load_test.md").read_text().split("\n## ")[1][:1500])
    print(f"wrote {args.out}/load_test.md, load_test.json, load_test.png")
    return 0 if payload["comparison"]["errors_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
