"""Measure /recommend with and without BentoML adaptive batching (RECSYS_BATCHING) on one artifact.

    python -m serving.tools.measure_batching ARTIFACT_DIR [--requests 400] [--concurrency 8] [--rounds 2]

For each setting in turn (interleaved over `--rounds`, so both see the same machine load) it starts
`bentoml serve serving.service:Recommender` on a free loopback port, waits on /readyz, sends 100
sequential requests for known users (p50/p95), then `--requests` from a thread pool of
`--concurrency` clients (QPS, p50/p95/p99, errors), and stops the process group. Prints a
Markdown table; absolute times only mean something with the machine they were taken on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"no batching": {"RECSYS_BATCHING": "0"}, "adaptive batching": {"RECSYS_BATCHING": "1"}}


@contextmanager
def serve(artifact: Path, env: dict, timeout: float = 120):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RECSYS_ARTIFACT_DIR": str(artifact), "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(Path(tempfile.gettempdir()) / "recsys-bentoml-home"), **env}
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:Recommender",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service on {artifact} did not become ready")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def load(url: str, users: list, n: int, concurrency: int) -> dict:
    local = threading.local()

    def one(i: int) -> tuple[float, int]:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        t = time.perf_counter()
        r = s.post(url + "/recommend", json={"user_id": users[i % len(users)], "k": 10})
        return time.perf_counter() - t, r.status_code

    seq = np.array([one(i)[0] for i in range(100)]) * 1000
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in res]) * 1000
    return {"seq_p50": np.percentile(seq, 50), "seq_p95": np.percentile(seq, 95), "qps": n / wall,
            "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99),
            "errors": sum(r[1] != 200 for r in res)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    users = [int(u) if u.lstrip("-").isdigit() else u
             for u in json.loads((args.artifact / "user_histories.json").read_text())]
    rows = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            with serve(args.artifact.resolve(), env) as url:
                rows[name].append(load(url, users, args.requests, args.concurrency))
    print(f"| setting | sequential p50 ms | p95 ms | QPS @{args.concurrency} | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        for r in runs:
            print(f"| {name} | {r['seq_p50']:.2f} | {r['seq_p95']:.2f} | {r['qps']:.1f} | {r['p50']:.1f} | "
                  f"{r['p95']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
