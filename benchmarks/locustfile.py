"""Locust load for the recommendation service: POST /recommend for known users and explicit histories.

Usage (a server must be up; `python -m benchmarks.load_test` does all of this for you):
    python -m benchmarks.make_payloads --artifact ART_DIR --out benchmarks/payloads/ml-latest-small.json
    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --json-file /tmp/stats \
        --payloads benchmarks/payloads/ml-latest-small.json --top-k 10
    locust -f benchmarks/locustfile.py      # web UI on :8089; the options below are in its form

The host defaults to http://127.0.0.1:3000 (`--host` overrides).

Each simulated user sends, back to back (no think time unless --think-time is set), either
`{"user_id": U, "k": K, "exclude_seen": E}` or `{"history": [item ids], "k": K, "exclude_seen": E}`
with U and the history drawn at random from the fixed payload file (test-split histories).
A response counts as a failure unless it is HTTP 200 with exactly K items (and, for an explicit
history with exclusion, none of them from the history), so errors are counted, never hidden.

Options (in the web UI's form; Locust 2.47's `--help` does not list a locustfile's options; each
is also read from its old environment variable, which is its default, so older scripts keep
working):
    --payloads FILE          payload file (RECSYS_PAYLOADS; benchmarks/payloads/ml-latest-small.json)
    --user-weight N          relative weight of user_id requests (RECSYS_USER_WEIGHT; 1)
    --history-weight N       relative weight of explicit-history requests (RECSYS_HISTORY_WEIGHT; 1)
    --top-k K                k of every request (RECSYS_K; 10)
    --exclude-seen 1|0       (RECSYS_EXCLUDE_SEEN; 1)
    --think-time S           constant wait between a user's requests, seconds (RECSYS_WAIT_S; 0)
    --honor-retry-after 1|0  (RECSYS_HONOR_RETRY_AFTER; 1): after a 503 with Retry-After the user
                             waits that long before its next request, as a well-behaved client
                             does; 0 retries at once (a retry storm: shed requests then cost the
                             server CPU too)
    --latency-file FILE      (RECSYS_LATENCY_FILE; unset) every request's (start time s, latency
                             ms, ok, HTTP status or 0) is saved there (.npy) at shutdown:
                             sub-millisecond percentiles, which Locust rounds away; failure
                             messages and counts go beside it (same name, .errors.json).
                             Command line only (not in the web UI).
    --sampling-seed N        seed of the request sampling (RECSYS_SEED; 0)

The web UI may change the options of each run; the payload file is read when a run starts, and
a bad option value stops the run with one error line.

Locust monkey-patches the process with gevent on import: run it as its own process.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
from locust import FastHttpUser, events, task

from benchmarks.make_payloads import load_payloads
from compressor.atomic import atomic_path, atomic_write_json
from compressor.errors import CompressorError

DEFAULT_PAYLOADS = Path(__file__).with_name("payloads") / "ml-latest-small.json"
log = logging.getLogger("recsys.locustfile")


def flag(value: str | bool) -> bool:
    """1|0, true|false, yes|no (a command-line or environment value)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1 or 0, got {value!r}")


flag.__name__ = "1|0"  # argparse names the type in its error message


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    # Defaults come from the old RECSYS_* variables (backwards compatibility); the command line wins.
    parser.add_argument("--payloads", default=_env("RECSYS_PAYLOADS", str(DEFAULT_PAYLOADS)),
                        help="payload file of benchmarks.make_payloads (env RECSYS_PAYLOADS)")
    parser.add_argument("--user-weight", type=int, default=int(_env("RECSYS_USER_WEIGHT", "1")),
                        help="relative weight of user_id requests (env RECSYS_USER_WEIGHT)")
    parser.add_argument("--history-weight", type=int, default=int(_env("RECSYS_HISTORY_WEIGHT", "1")),
                        help="relative weight of explicit-history requests (env RECSYS_HISTORY_WEIGHT)")
    parser.add_argument("--top-k", type=int, default=int(_env("RECSYS_K", "10")),
                        help="k of every /recommend request (env RECSYS_K)")
    parser.add_argument("--exclude-seen", type=flag, default=flag(_env("RECSYS_EXCLUDE_SEEN", "1")),
                        help="exclude_seen of every request, 1|0 (env RECSYS_EXCLUDE_SEEN)")
    parser.add_argument("--think-time", type=float, default=float(_env("RECSYS_WAIT_S", "0")),
                        help="seconds between a user's requests (env RECSYS_WAIT_S)")
    parser.add_argument("--honor-retry-after", type=flag,
                        default=flag(_env("RECSYS_HONOR_RETRY_AFTER", "1")),
                        help="wait a 503's Retry-After before the next request, 1|0 "
                             "(env RECSYS_HONOR_RETRY_AFTER)")
    parser.add_argument("--latency-file", default=os.environ.get("RECSYS_LATENCY_FILE") or None,
                        include_in_web_ui=False,
                        help="save every request's (start s, latency ms, ok, status) here (.npy) at "
                             "shutdown, failures beside it (.errors.json) (env RECSYS_LATENCY_FILE)")
    parser.add_argument("--sampling-seed", type=int, default=int(_env("RECSYS_SEED", "0")),
                        help="seed of the request sampling (env RECSYS_SEED)")


@functools.cache
def _payloads(path: str) -> dict:
    return load_payloads(path)


def check_options(opts) -> dict:
    """The payloads for these options; ValueError (one line) when they cannot make a load."""
    if opts.user_weight < 0 or opts.history_weight < 0 or opts.user_weight + opts.history_weight == 0:
        raise ValueError("--user-weight and --history-weight must be >= 0 and not both 0")
    if opts.top_k < 1 or opts.think_time < 0:
        raise ValueError("--top-k must be >= 1 and --think-time >= 0")
    payloads = _payloads(str(opts.payloads))
    if opts.user_weight and not payloads["user_ids"]:
        raise ValueError("--user-weight > 0 but the payload file has no user ids")
    if opts.history_weight and not payloads["histories"]:
        raise ValueError("--history-weight > 0 but the payload file has no histories")
    return payloads


_latency_file: str | None = None
_records: list[tuple[float, float, bool, int]] = []
_errors: Counter = Counter()


@events.init.add_listener
def _init(environment, **kwargs) -> None:
    global _latency_file
    opts = environment.parsed_options
    if opts is None:  # a library use without a command line
        return
    _latency_file = opts.latency_file
    try:
        check_options(opts)
    except (ValueError, OSError, CompressorError) as e:
        raise SystemExit(f"error: {e}") from None


@events.test_start.add_listener
def _test_start(environment, **kwargs) -> None:
    """Options changed in the web UI are checked before a run's users start."""
    if environment.parsed_options is not None:
        try:
            check_options(environment.parsed_options)
        except (ValueError, OSError, CompressorError) as e:
            log.error("bad option: %s", e)
            if environment.runner is not None:
                environment.runner.quit()


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, **kwargs) -> None:
    if _latency_file:
        status = getattr(kwargs.get("response"), "status_code", 0) or 0  # 0: no HTTP answer
        _records.append((time.time() - response_time / 1e3, float(response_time), exception is None, int(status)))
        if exception is not None:
            _errors[f"{name}: {exception}"[:300]] += 1


@events.quit.add_listener
def _save_records(exit_code: int, **kwargs) -> None:
    if _latency_file:
        path = Path(_latency_file)
        with atomic_path(path) as tmp:
            np.save(tmp, np.asarray(_records, dtype=np.float64).reshape(-1, 4))
        atomic_write_json(path.with_suffix(".errors.json"), dict(_errors.most_common(50)), indent=1)


class RecommendUser(FastHttpUser):
    host = "http://127.0.0.1:3000"  # `bentoml serve`'s default port; --host overrides

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.payloads = check_options(o)  # cached per payload file
        self.k, self.exclude_seen, self.wait_s = o.top_k, o.exclude_seen, o.think_time
        self.honor_retry_after = o.honor_retry_after
        self.history_share = o.history_weight / (o.user_weight + o.history_weight)
        self.rng = random.Random(o.sampling_seed * 100_003 + id(self) % 100_003)
        self.backoff = 0.0

    def wait_time(self) -> float:
        wait, self.backoff = self.wait_s + self.backoff, 0.0
        return wait

    def _recommend(self, body: dict, name: str, history: list | None = None) -> None:
        k = self.k
        with self.client.post("/recommend", json={**body, "k": k, "exclude_seen": self.exclude_seen},
                              name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                retry = resp.headers.get("Retry-After", "") if resp.status_code in (429, 503) else ""
                if self.honor_retry_after and retry.isdigit():
                    self.backoff = float(retry)
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                items = [it["item_id"] for it in resp.json()["items"]]
            except (ValueError, KeyError, TypeError) as e:
                resp.failure(f"malformed response ({type(e).__name__}: {e})")
                return
            if len(items) != k:
                resp.failure(f"{len(items)} items, expected {k}")
            elif history is not None and self.exclude_seen and set(items) & set(history):
                resp.failure(f"seen items returned: {sorted(set(items) & set(history), key=str)[:5]}")

    @task
    def one_request(self) -> None:
        """A user_id or an explicit-history request, in the ratio of the two weights (options, so
        not `@task(weight)`: task weights are fixed when the file is imported)."""
        if self.rng.random() < self.history_share:
            history = self.rng.choice(self.payloads["histories"])
            self._recommend({"history": history}, "/recommend history", history)
        else:
            self._recommend({"user_id": self.rng.choice(self.payloads["user_ids"])}, "/recommend user_id")
