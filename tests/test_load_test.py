"""benchmarks.load_test: a few seconds of real Locust load against real `bentoml serve` processes
on a tiny exported artifact, plus the pieces (payloads, statistics, process cleanup, response
validation) on their own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks.load_report import compare, level_stats
from benchmarks.load_test import (
    LoadTestConfig,
    _model_facts,
    check_payloads,
    main,
    run,
    service_env,
)
from benchmarks.make_payloads import build_payloads, load_payloads, sequences_from_artifact
from benchmarks.processes import ProcessGroup, RssSampler, free_port
from compressor.errors import ArtifactError, CompressorError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_teacher_dir, tiny_data):
    from compressor.export import ExportConfig, export_artifact

    out = tmp_path_factory.mktemp("load") / "artifact"
    export_artifact(tiny_teacher_dir, out, tiny_data, ExportConfig(parity_users=32))
    return out


def test_short_load_test_end_to_end(tiny_artifact, tmp_path):
    """The CI version: 2 users for 3 s against each service; no request may fail."""
    cfg = LoadTestConfig(teacher=tiny_artifact, student=tiny_artifact, users=[2], duration_s=3,
                         warmup_requests=10, profile_requests=20, cooldown_s=0)
    t0 = time.monotonic()
    payload = run(cfg, tmp_path)
    assert time.monotonic() - t0 < 90
    for name in ("load_test.md", "load_test.json", "load_test.png", "payloads.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "load_test.json").read_text())
    assert saved["comparison"]["errors_total"] == 0 == payload["comparison"]["errors_total"]
    for role in ("teacher", "student"):
        svc = saved["services"][role]
        (level,) = svc["levels"]
        assert level["users"] == 2 and level["requests"] > 10 and level["failures"] == 0
        assert set(level["by_name"]) == {"/recommend user_id", "/recommend history"}  # both kinds were sent
        assert level["percentile_source"] == "exact"
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
        assert level["qps"] > 0 and level["peak_rss_bytes"] > 50 * 2**20  # a real server process tree
        assert svc["serial_http"]["errors"] == 0
        assert 0 < svc["profile"]["model_ms_p50"] < svc["serial_http"]["ms_p50"]
        assert svc["model_bytes"] > 0 and svc["parameters"] > 0
    # every process this run started is gone
    me = psutil.Process()
    assert not [c for c in me.children(recursive=True) if "bentoml" in " ".join(c.cmdline())]
    md = (tmp_path / "load_test.md").read_text()
    assert "Student / teacher" in md and "Where the time goes" in md


def test_each_role_can_serve_its_own_onnx_file(tmp_path):
    """An int8 student against a float teacher in one run: RECSYS_MODEL_FILE for that role only."""
    cfg = LoadTestConfig(teacher=tmp_path / "t", student=tmp_path / "s", student_model_file="model.int8.onnx",
                         env={"RECSYS_MAX_CONCURRENCY": "64"})
    student, teacher = service_env(cfg, cfg.student, "student"), service_env(cfg, cfg.teacher, "teacher")
    assert student["RECSYS_MODEL_FILE"] == "model.int8.onnx" and "RECSYS_MODEL_FILE" not in teacher
    assert student["RECSYS_MAX_CONCURRENCY"] == teacher["RECSYS_MAX_CONCURRENCY"] == "64"
    manifest = {"serve_model": "model.onnx", "kind": "student", "architecture": "llama", "num_layers": 2,
                "hidden_size": 8, "files": {"model.onnx": {"bytes": 400}, "model.int8.onnx": {"bytes": 100}}}
    assert _model_facts(manifest)["model_bytes"] == 400
    assert _model_facts(manifest, "model.int8.onnx")["model_bytes"] == 100


def test_a_missing_model_file_fails_before_starting_anything(tiny_artifact, tmp_path, capsys):
    code = main(["--teacher", str(tiny_artifact), "--student", str(tiny_artifact), "--student-model-file",
                 "model.int8.onnx", "--users", "1", "--duration", "1s", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--student-model-file model.int8.onnx: not in the student artifact" in err
    assert not (tmp_path / "o").exists()


def test_bad_artifact_fails_before_starting_anything(tmp_path, tiny_artifact):
    with pytest.raises(ArtifactError):
        run(LoadTestConfig(teacher=tmp_path / "nope", student=tiny_artifact), tmp_path / "out")
    assert main(["--teacher", str(tmp_path / "nope"), "--student", str(tiny_artifact), "--out",
                 str(tmp_path / "out")]) == 2
    assert main(["--teacher", str(tiny_artifact), "--student", str(tiny_artifact), "--users", "0",
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "load_test.json").exists()


def test_payloads_are_test_split_histories(tiny_artifact, tmp_path):
    seqs, source = sequences_from_artifact(tiny_artifact)
    payload = build_payloads(seqs, source, n_users=7, n_histories=5, seed=3)
    assert len(payload["user_ids"]) == 7 and len(payload["histories"]) == 5
    assert all(str(u) in seqs for u in payload["user_ids"])
    full = {tuple(s[:-1]) for s in seqs.values()}
    assert all(tuple(h) in full for h in payload["histories"])  # the sequence without its test item
    assert payload == build_payloads(seqs, source, n_users=7, n_histories=5, seed=3)  # fixed
    (tmp_path / "p.json").write_text(json.dumps(payload))
    assert load_payloads(tmp_path / "p.json") == payload
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CompressorError, match="payload"):
        load_payloads(tmp_path / "bad.json")
    with pytest.raises(CompressorError, match="no user"):
        build_payloads({"1": [5, 6]}, "x")
    check_payloads(payload, tiny_artifact)  # made from it: every user is known
    with pytest.raises(CompressorError, match="not users of"):
        check_payloads({**payload, "user_ids": [*payload["user_ids"], "no-such-user"]}, tiny_artifact)


def test_level_stats_and_ratios_closed_form():
    entries = [{"name": "a", "num_requests": 90, "num_failures": 0, "response_times": {"2": 45, "4": 45},
                "total_response_time": 270, "start_time": 100.0, "last_request_timestamp": 110.0},
               {"name": "b", "num_requests": 10, "num_failures": 10, "response_times": {"100": 10},
                "total_response_time": 1000, "start_time": 100.0, "last_request_timestamp": 110.0}]
    s = level_stats(entries)
    assert s["requests"] == 100 and s["failures"] == 10 and s["error_rate"] == pytest.approx(0.1)
    assert s["qps"] == pytest.approx(90 / 10) and s["mean_ms"] == pytest.approx(12.7)
    assert (s["p50_ms"], s["p95_ms"]) == (4.0, 100.0)
    lat = np.array([[0.0, 10.0, 1], [0.5, 20.0, 1], [1.0, 30.0, 1], [1.97, 30.0, 1]])
    exact = level_stats([{**entries[0], "num_requests": 4}], lat)
    assert exact["p50_ms"] == pytest.approx(25.0) and exact["window_s"] == pytest.approx(2.0)

    def svc(p99, qps, rss, failures=0):
        level = {"users": 4, "p50_ms": p99 / 2, "p95_ms": p99, "p99_ms": p99, "qps": qps,
                 "peak_rss_bytes": rss, "failures": failures, "requests": 100}
        return {"levels": [level], "parameters": 10, "model_bytes": 10, "serial_http": {"ms_p50": 1.0},
                "idle_rss_bytes": 1, "profile": {"model_ms_p50": 1.0, "engine_ms_p50": 1.0,
                                                 "model_load_rss_bytes": 1}}

    good = compare(svc(40.0, 100.0, 400), svc(10.0, 400.0, 200))["levels"][0]
    assert good["p99_ms"] == 0.25 and good["qps"] == 4.0 and all(good["targets"].values())
    bad = compare(svc(40.0, 100.0, 400), svc(11.0, 399.0, 201, failures=1))
    assert not any(bad["levels"][0]["targets"].values()) and bad["errors_total"] == 1


def test_process_group_stops_children_and_grandchildren(tmp_path):
    with ProcessGroup(stop_timeout=5) as group:
        proc = group.start(["sh", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "sh.log")
        time.sleep(0.3)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) == 3
        with RssSampler(proc.pid, 0.05) as rss:
            time.sleep(0.2)
        assert rss.peak > 0 and len(rss.samples) >= 2
    time.sleep(0.2)
    assert not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


class _Flaky(BaseHTTPRequestHandler):
    """A real HTTP server that answers /recommend correctly, short, or with a 500, in turn."""

    count = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).count += 1
        mode = type(self).count % 3
        items = [{"item_id": 10_000 + i} for i in range(body["k"] - (mode == 1))]
        code = 500 if mode == 2 else 200
        data = json.dumps({"items": items}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_locustfile_counts_wrong_answers_as_failures(tmp_path):
    payloads = build_payloads({"1": [1, 2, 3, 4], "2": [5, 6, 7]}, "hand-made")
    (tmp_path / "p.json").write_text(json.dumps(payloads))
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The payload file as a command-line option, the latency file from its old environment variable.
    env = {"RECSYS_LATENCY_FILE": str(tmp_path / "lat.npy"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"),
                               "--headless", "-u", "1", "-r", "1", "-t", "4s", "--host", f"http://127.0.0.1:{port}",
                               "--json-file", str(tmp_path / "stats"), "--only-summary", "--loglevel", "WARNING",
                               "--payloads", str(tmp_path / "p.json"), "--top-k", "10"],
                              env=env, cwd=ROOT, timeout=60, capture_output=True, text=True)
    finally:
        server.shutdown()
    stats = level_stats(json.loads((tmp_path / "stats.json").read_text()), np.load(tmp_path / "lat.npy"),
                        json.loads((tmp_path / "lat.errors.json").read_text()))
    assert stats["requests"] > 6, done.stderr[-3000:]
    assert stats["failures"] == pytest.approx(stats["requests"] * 2 / 3, abs=2)  # short and 500 both count
    assert any("9 items, expected 10" in msg for msg in stats["errors"])
    assert any("HTTP 500" in msg for msg in stats["errors"])


def _cmdline(p: psutil.Process) -> list[str]:
    """A process's command line; [] for one that exited meanwhile (a zombie raises on cmdline())."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_sigterm_stops_every_process(tiny_artifact, tmp_path):
    """SIGTERM in the middle of a load level: servers and Locust are stopped, exit 130. (SIGTERM is
    turned into the KeyboardInterrupt that Ctrl-C raises, so this covers both cleanup paths.)"""
    runner = subprocess.Popen([sys.executable, "-m", "benchmarks.load_test", "--teacher", str(tiny_artifact),
                               "--student", str(tiny_artifact), "--users", "1", "--duration", "60s",
                               "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until Locust is loading the teacher's server
            kids = psutil.Process(runner.pid).children(recursive=True)
            family |= {k.pid for k in kids}
            if any("locust" in " ".join(_cmdline(k)) for k in kids):
                break
            assert runner.poll() is None, runner.stderr.read().decode()[-2000:]
            time.sleep(0.3)
        else:
            pytest.fail("the load never started")
        time.sleep(1)
        family |= {k.pid for k in psutil.Process(runner.pid).children(recursive=True)}
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 130
    finally:
        if runner.poll() is None:
            runner.kill()
    time.sleep(0.5)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [_cmdline(psutil.Process(p)) for p in alive]
    assert not (tmp_path / "load_test.json").exists()  # no report from an interrupted run


def test_locustfile_options_refuse_bad_values_in_one_line(tmp_path):
    """The locustfile's settings are Locust options (environment variables only their defaults):
    a bad value stops Locust before any user starts, with one line naming it."""
    payloads = build_payloads({"1": [1, 2, 3, 4]}, "hand-made")
    (tmp_path / "p.json").write_text(json.dumps(payloads))
    base = [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless",
            "-u", "1", "-t", "1s", "--payloads", str(tmp_path / "p.json")]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RECSYS_USER_WEIGHT": "0"}
    for extra, message in [(["--history-weight", "0"], "--user-weight and --history-weight must be"),
                           (["--exclude-seen", "maybe"], "argument --exclude-seen"),
                           (["--payloads", str(tmp_path / "none.json")], "no payload file")]:
        done = subprocess.run(base + extra, env=env, cwd=ROOT, timeout=60, capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
