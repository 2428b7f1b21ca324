"""Locust load for the recommendation service: POST /recommend for known users and explicit histories.

Usage (a server must be up; `python -m benchmarks.load_test` does all of this for you):
    python -m benchmarks.make_payloads --artifact ART_DIR --out benchmarks/payloads/ml-latest-small.json
    RECSYS_PAYLOADS=benchmarks/payloads/ml-latest-small.json \
        locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s \
        --host http://127.0.0.1:3000 --json-file /tmp/stats

Each simulated user sends, back to back (no think time unless RECSYS_WAIT_S is set), either
`{"user_id": U, "k": K, "exclude_seen": E}` or `{"history": [item ids], "k": K, "exclude_seen": E}`
with U and the history drawn at random from the fixed payload file (test-split histories).
A response counts as a failure unless it is HTTP 200 with exactly K items (and, for an explicit
history with exclusion, none of them from the history), so errors are counted, never hidden.

Environment:
    RECSYS_PAYLOADS        payload file (default benchmarks/payloads/ml-latest-small.json)
    RECSYS_USER_WEIGHT     relative weight of user_id requests (default 1)
    RECSYS_HISTORY_WEIGHT  relative weight of explicit-history requests (default 1)
    RECSYS_K               k of every request (default 10)
    RECSYS_EXCLUDE_SEEN    1|0 (default 1)
    RECSYS_WAIT_S          constant wait between a user's requests, seconds (default 0)
    RECSYS_HONOR_RETRY_AFTER 1|0 (default 1): after a 503 with Retry-After the user waits that
                           long before its next request, as a well-behaved client does; 0 retries
                           at once (a retry storm: shed requests then cost the server CPU too)
    RECSYS_LATENCY_FILE    if set, every request's (start time s, latency ms, ok, HTTP status or 0)
                           is saved there
                           (.npy) at shutdown: sub-millisecond percentiles, which Locust rounds away;
                           failure messages and counts go beside it (same name, .errors.json)
    RECSYS_SEED            seed of the request sampling (default 0)

Locust monkey-patches the process with gevent on import: run it as its own process.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
from locust import FastHttpUser, events, task

from benchmarks.make_payloads import load_payloads

DEFAULT_PAYLOADS = Path(__file__).with_name("payloads") / "ml-latest-small.json"
PAYLOADS = load_payloads(os.environ.get("RECSYS_PAYLOADS", DEFAULT_PAYLOADS))
USER_WEIGHT = int(os.environ.get("RECSYS_USER_WEIGHT", "1"))
HISTORY_WEIGHT = int(os.environ.get("RECSYS_HISTORY_WEIGHT", "1"))
K = int(os.environ.get("RECSYS_K", "10"))
EXCLUDE_SEEN = os.environ.get("RECSYS_EXCLUDE_SEEN", "1").lower() in ("1", "true", "yes")
WAIT_S = float(os.environ.get("RECSYS_WAIT_S", "0"))
LATENCY_FILE = os.environ.get("RECSYS_LATENCY_FILE")
HONOR_RETRY_AFTER = os.environ.get("RECSYS_HONOR_RETRY_AFTER", "1").lower() in ("1", "true", "yes")

if USER_WEIGHT < 0 or HISTORY_WEIGHT < 0 or USER_WEIGHT + HISTORY_WEIGHT == 0:
    raise ValueError("RECSYS_USER_WEIGHT and RECSYS_HISTORY_WEIGHT must be >= 0 and not both 0")
if USER_WEIGHT and not PAYLOADS["user_ids"]:
    raise ValueError("RECSYS_USER_WEIGHT > 0 but the payload file has no user ids")
if HISTORY_WEIGHT and not PAYLOADS["histories"]:
    raise ValueError("RECSYS_HISTORY_WEIGHT > 0 but the payload file has no histories")

_records: list[tuple[float, float, bool, int]] = []
_errors: Counter = Counter()


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, **kwargs) -> None:
    if LATENCY_FILE:
        status = getattr(kwargs.get("response"), "status_code", 0) or 0  # 0: no HTTP answer
        _records.append((time.time() - response_time / 1e3, float(response_time), exception is None, int(status)))
        if exception is not None:
            _errors[f"{name}: {exception}"[:300]] += 1


@events.quit.add_listener
def _save_records(exit_code: int, **kwargs) -> None:
    if LATENCY_FILE:
        path = Path(LATENCY_FILE)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, np.asarray(_records, dtype=np.float64).reshape(-1, 4))
        os.replace(tmp, path)
        path.with_suffix(".errors.json").write_text(json.dumps(dict(_errors.most_common(50)), indent=1))


class RecommendUser(FastHttpUser):
    def on_start(self) -> None:
        self.rng = random.Random(int(os.environ.get("RECSYS_SEED", "0")) * 100_003 + id(self) % 100_003)
        self.backoff = 0.0

    def wait_time(self) -> float:
        wait, self.backoff = WAIT_S + self.backoff, 0.0
        return wait

    def _recommend(self, body: dict, name: str, history: list | None = None) -> None:
        with self.client.post("/recommend", json={**body, "k": K, "exclude_seen": EXCLUDE_SEEN},
                              name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                retry = resp.headers.get("Retry-After", "") if resp.status_code in (429, 503) else ""
                if HONOR_RETRY_AFTER and retry.isdigit():
                    self.backoff = float(retry)
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                items = [it["item_id"] for it in resp.json()["items"]]
            except (ValueError, KeyError, TypeError) as e:
                resp.failure(f"malformed response ({type(e).__name__}: {e})")
                return
            if len(items) != K:
                resp.failure(f"{len(items)} items, expected {K}")
            elif history is not None and EXCLUDE_SEEN and set(items) & set(history):
                resp.failure(f"seen items returned: {sorted(set(items) & set(history), key=str)[:5]}")

    @task(USER_WEIGHT)
    def known_user(self) -> None:
        self._recommend({"user_id": self.rng.choice(PAYLOADS["user_ids"])}, "/recommend user_id")

    @task(HISTORY_WEIGHT)
    def explicit_history(self) -> None:
        history = self.rng.choice(PAYLOADS["histories"])
        self._recommend({"history": history}, "/recommend history", history)
