"""Measure /recommend with and without BentoML adaptive batching (RECSYS_BATCHING) on one artifact.

    python -m benchmarks.measure_batching ARTIFACT_DIR [--requests 400] [--concurrency 8] [--rounds 2]

For each setting in turn (interleaved over `--rounds`, so both see the same machine load) it starts
`bentoml serve serving.service:Recommender` on a free loopback port and waits on /readyz
(`benchmarks.processes.bentoml_server`), sends `--sequential` requests one at a time for known users
(p50/p95), then `--requests` from a thread pool of `--concurrency` clients (QPS, p50/p95/p99,
errors), and stops the process group. Prints a Markdown table; absolute times only mean something
with the machine they were taken on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from benchmarks.processes import bentoml_server, server_env
from compressor.artifact import load_manifest
from compressor.errors import CompressorError
from compressor.ids import parse_id

SETTINGS = {"no batching": {"RECSYS_BATCHING": "0"}, "adaptive batching": {"RECSYS_BATCHING": "1"}}


def load(url: str, users: list, n: int, concurrency: int, sequential: int = 100) -> dict:
    local = threading.local()

    def one(i: int) -> tuple[float, int]:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        t = time.perf_counter()
        r = s.post(url + "/recommend", json={"user_id": users[i % len(users)], "k": 10})
        return time.perf_counter() - t, r.status_code

    seq = np.array([one(i)[0] for i in range(sequential)]) * 1000
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
    p.add_argument("--sequential", type=int, default=100, help="one-at-a-time requests before the concurrent ones")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds a server may take to be ready")
    args = p.parse_args(argv)
    rows = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="measure_batching.") as work:
        try:
            load_manifest(args.artifact)  # not an artifact directory: one line, before any server starts
            users = [parse_id(u)
                     for u in json.loads((args.artifact / "user_histories.json").read_text())]
            for r in range(args.rounds):
                for i, (name, settings) in enumerate(SETTINGS.items()):
                    env = server_env(Path(work) / "bentoml_home", RECSYS_ARTIFACT_DIR=str(args.artifact.resolve()),
                                     **settings)
                    with bentoml_server(env, Path(work) / f"serve_{r}_{i}.log", args.ready_timeout) as server:
                        rows[name].append(load(server.url, users, args.requests, args.concurrency, args.sequential))
        except CompressorError as e:  # not an artifact; a server that exits or is never ready (its log's tail)
            print(f"measure_batching: error: {e}", file=sys.stderr)
            return 2
    print(f"| setting | sequential p50 ms | p95 ms | QPS @{args.concurrency} | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        for r in runs:
            print(f"| {name} | {r['seq_p50']:.2f} | {r['seq_p95']:.2f} | {r['qps']:.1f} | {r['p50']:.1f} | "
                  f"{r['p95']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
