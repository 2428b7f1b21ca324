"""Issue #12, items 2-9, replayed against the real `bentoml serve` on a free loopback port.

One server (tiny exported artifact, small limits) for the module; the bad-artifact cases start
their own `bentoml serve` and expect it to exit non-zero within a bounded time with one line.
The worker-restart test runs last: it kills the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.processes import (
    Server,
    bentoml_cmd,
    bentoml_server,
    free_port,
    run_to_exit,
    server_env,
    tree_rss,
)

MAX_BODY = 131_072
MAX_ROWS = 8
MAX_CONCURRENCY = 3
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def server(tiny_artifact_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    env = server_env(work / "bentoml_home", RECSYS_ARTIFACT_DIR=str(tiny_artifact_dir),
                     RECSYS_MAX_BODY_BYTES=str(MAX_BODY), RECSYS_MAX_EMBED_ROWS=str(MAX_ROWS),
                     RECSYS_MAX_CONCURRENCY=str(MAX_CONCURRENCY), RECSYS_THREADS="2",
                     RECSYS_MAX_CANDIDATES="50")
    with bentoml_server(env, work / "serve.log") as srv:
        yield srv


def post(srv: Server, route: str, body, content_type: str | None = "application/json") -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(srv.url + route, data=data, headers=headers, timeout=30)


def raw_post(port: int, route: str, head: dict[str, str], chunks, read_timeout: float = 30) -> tuple[int, bytes]:
    """POST over a plain socket: headers, then `chunks` from a thread (which stops quietly when
    the server closes), then the status line and body the server answers."""
    s = socket.create_connection((HOST, port), timeout=read_timeout)
    lines = [f"POST {route} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close",
             *(f"{k}: {v}" for k, v in head.items())]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def feed():
        try:
            for c in chunks:
                s.sendall(c)
        except OSError:  # the server answered and closed: it stopped reading, as it should
            pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
        t.join(timeout=10)
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def port_of(srv: Server) -> int:
    return int(srv.url.rsplit(":", 1)[1])


# -- 2. size limits and echoes ----------------------------------------------------------------------


def test_declared_oversize_body_is_413_before_reading(server):
    # 100 MB announced, 64 KB sent: the answer comes without the server waiting for the rest.
    head = {"Content-Type": "application/json", "Content-Length": str(100 * 2**20)}
    status, body = raw_post(port_of(server), "/recommend", head, [b'{"history": [' + b"1," * 32_000])
    assert status == 413 and b"RECSYS_MAX_BODY_BYTES" in body


def test_chunked_oversize_body_is_413_and_rss_stays_flat(server):
    worker_rss = tree_rss(server.proc.pid)
    piece = b"1," * 2**19  # 1 MiB of history ids

    def framed():  # 40 MiB of history, chunked: no Content-Length to check up front
        for data in [b'{"history": ['] + [piece] * 40:
            yield b"%x\r\n%s\r\n" % (len(data), data)
        yield b"0\r\n\r\n"

    head = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    status, body = raw_post(port_of(server), "/recommend", head, framed())
    assert status == 413, body[:200]
    grown = tree_rss(server.proc.pid) - worker_rss
    print(f"server RSS grew by {grown / 2**20:.1f} MiB after a 40 MiB chunked body")
    assert grown < 30 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB"
    assert post(server, "/recommend", {"history": [1, 2, 3], "k": 2}).status_code == 200


def test_client_values_are_never_echoed_at_length(server):
    long = "u" * 100_000
    for route, body in [("/recommend", {"user_id": long}), ("/item", {"item_id": long}),
                        ("/recommend", {"history": [long]})]:
        r = post(server, route, body)
        assert r.status_code == 400 and "at most 64 characters" in r.text, r.text[:300]
        assert len(r.content) < 2000 and "u" * 100 not in r.text
    unknown = "z" * 64  # the longest accepted id: named in the 404, clipped
    r = post(server, "/item", {"item_id": unknown})
    assert r.status_code == 404 and len(r.content) < 300 and unknown not in r.text
    r = post(server, "/recommend", {"history": [f"x{i:063d}" for i in range(500)]})
    assert r.status_code == 400 and "500 in all" in r.text and len(r.content) < 1500


def test_every_list_is_bounded(server):
    r = post(server, "/recommend", {"history": list(range(10_001))})
    assert r.status_code == 400 and "at most 10000 items" in r.text
    r = post(server, "/rank", {"user_id": 1, "candidates": list(range(51))})
    assert r.status_code == 400 and "at most 50 items" in r.text


# -- 4. /embed: a request the service accepts succeeds, or a 400 states the row limit ---------------


def test_embed_row_limit_is_a_400_stating_it(server):
    r = post(server, "/embed", {"histories": [[1, 2, 3]] * MAX_ROWS})
    assert r.status_code == 200 and np.asarray(r.json()).shape[0] == MAX_ROWS
    for rows in (MAX_ROWS + 1, 330):
        r = post(server, "/embed", {"histories": [[1, 2, 3]] * rows})
        assert r.status_code == 400 and f"at most {MAX_ROWS} items" in r.text, r.text[:300]


# -- 7. types, unknown fields, media type ------------------------------------------------------------

STRICT = [
    ("/recommend", {"user_id": True}),
    ("/recommend", {"history": [True, 1]}),
    ("/recommend", {"user_id": 1, "k": True}),
    ("/recommend", {"user_id": 1, "exclude_seen": "yes"}),
    ("/recommend", {"user_id": 1.0}),
    ("/item", {"item_id": True}),
    ("/item", {"item_id": [1]}),
    ("/rank", {"user_id": 1, "candidates": [False]}),
    ("/embed", {"histories": [[True]]}),
    ("/embed", {"histories": [[1]], "normalize": True}),
    ("/item", {"item_id": 1, "title": "x"}),
    ("/rank", {"user_id": 1, "candidates": [1], "k": 3}),
]


@pytest.mark.parametrize("route,body", STRICT, ids=[f"{r}:{json.dumps(b)}"[:50] for r, b in STRICT])
def test_strict_types_and_unknown_fields_are_400(server, route, body):
    r = post(server, route, body)
    assert r.status_code == 400, r.text[:300]
    assert isinstance(r.json().get("detail"), list)  # the documented shape (see test_openapi)


def test_only_json_bodies_are_parsed(server):
    r = post(server, "/item", "item_id=1", "application/x-www-form-urlencoded")
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert post(server, "/recommend", '{"user_id": 1}', None).status_code == 415  # no Content-Type
    assert post(server, "/recommend", '{"user_id": 1}', "text/plain").status_code == 415
    r = post(server, "/recommend", '{"user_id": 1}', "application/json; charset=utf-8")
    assert r.status_code == 200


# -- 5. logs: a client's mistake is one short line ------------------------------------------------


def test_client_errors_log_one_line_without_traceback(server):
    marker = "no-such-user-marker"
    assert post(server, "/recommend", {"user_id": marker}).status_code == 404
    assert post(server, "/recommend", {"user_id": 1, "k": "ten", "x": 1}).status_code == 400
    assert post(server, "/recommend", {"history": [987654321]}).status_code == 400
    time.sleep(1.0)  # the worker's log lines reach the file
    text = server.log.read_text(errors="replace")
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    lines = text.splitlines()
    assert sum(marker in line for line in lines) == 1  # the 404 is logged, once
    assert any("400 /recommend" in line and "validation error" in line for line in lines)
    assert all(len(line) < 600 for line in lines if "/recommend" in line)


# -- 8. OpenAPI declares the errors and the one-of rule ---------------------------------------------


def test_openapi_declares_error_responses_and_one_of(server):
    spec = requests.get(server.url + "/docs.json", timeout=10).json()
    ref = "#/components/schemas/ErrorBody"
    for path in ("/recommend", "/rank", "/item", "/embed"):
        responses = spec["paths"][path]["post"]["responses"]
        expected = {"400", "413", "415", "503"} | ({"404"} if path != "/embed" else set())
        assert expected <= set(responses), (path, sorted(responses))
        for code in expected:
            assert responses[code]["content"]["application/json"]["schema"]["$ref"] == ref
        assert "Retry-After" in responses["503"]["headers"]
    error = spec["components"]["schemas"]["ErrorBody"]
    detail = error["properties"]["detail"]
    assert "array" in json.dumps(detail) and error["required"] == ["error"]
    for path in ("/recommend", "/rank"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert [o["required"] for o in schema["oneOf"]] == [["user_id"], ["history"]]


# -- 6. load shedding: a fast 503 with Retry-After beyond the limit -------------------------------


def test_excess_concurrency_is_shed_with_retry_after(server):
    hist = [[1, 2, 3, 5, 6, 7, 10, 11, 16, 17, 18, 19, 21, 22, 24, 25, 29, 31, 32, 34]] * MAX_ROWS
    barrier = threading.Barrier(32)

    def one(_):
        barrier.wait(timeout=30)
        t0 = time.perf_counter()
        r = post(server, "/embed", {"histories": hist})
        return r.status_code, r.headers.get("Retry-After"), time.perf_counter() - t0

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    shed = [(h, t) for c, h, t in results if c == 503]
    assert shed, "32 simultaneous requests against a limit of 3 in flight: some must be shed"
    assert all(h == "1" for h, _ in shed)
    assert post(server, "/recommend", {"user_id": 1, "k": 3}).status_code == 200  # still serving


# -- 3. a bad artifact: `bentoml serve` exits non-zero with one line ------------------------------


def _break(kind: str, src: Path, dst: Path) -> dict[str, str]:
    """A broken copy of the artifact; returns the extra settings it is served with."""
    if kind == "missing":
        return {"RECSYS_ARTIFACT_DIR": str(dst / "nope")}
    shutil.copytree(src, dst)
    if kind == "sha256":
        emb = dst / "item_embeddings.npy"
        data = bytearray(emb.read_bytes())
        data[-1] ^= 0xFF
        emb.write_bytes(bytes(data))
        return {}
    if kind == "random_onnx":
        (dst / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
        return {"RECSYS_VERIFY_ARTIFACT": "0"}
    if kind == "wrong_graph":  # a valid ONNX graph, not the encoder: (B, L) ints -> (B, L) floats
        import onnx
        from onnx import TensorProto, helper

        ids, mask = (helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "L"])
                     for n in ("input_ids", "attention_mask"))
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "L"])
        graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["out"], to=TensorProto.FLOAT)],
                                  "not_the_encoder", [ids, mask], [out])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10  # ONNX Runtime 1.31 reads IR <= 13; onnx 1.23's helpers write 14
        onnx.save(model, dst / "model.onnx")
        return {"RECSYS_VERIFY_ARTIFACT": "0"}
    if kind == "truncated_npy":
        emb = dst / "item_embeddings.npy"
        emb.write_bytes(emb.read_bytes()[: emb.stat().st_size // 2])
        return {"RECSYS_VERIFY_ARTIFACT": "0"}
    if kind == "manifest":
        (dst / "manifest.json").write_text('{"format_version": 1, "files": [')
        return {}
    if kind == "bad_setting":
        return {"RECSYS_THREADS": "four"}
    raise AssertionError(kind)


BROKEN = ["missing", "sha256", "random_onnx", "wrong_graph", "truncated_npy", "manifest", "bad_setting"]


@pytest.mark.parametrize("kind", BROKEN)
def test_bad_artifact_exits_non_zero_with_one_line(kind, tiny_artifact_dir, tmp_path):
    extra = _break(kind, tiny_artifact_dir, tmp_path / "art")
    env = server_env(tmp_path / "home", **{"RECSYS_ARTIFACT_DIR": str(tmp_path / "art"), **extra})
    log = tmp_path / "serve.log"
    t0 = time.monotonic()
    code = run_to_exit(bentoml_cmd(free_port(), HOST), log, env, timeout=90)
    took = time.monotonic() - t0
    out = log.read_text(errors="replace")
    assert code is not None, f"still running after 90 s:\n{out[-2000:]}"
    assert code == 2 and took < 90
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out and "startup failed" not in out, out[-2000:]
    assert len(errors[0]) < 600
    print(f"{kind}: exit {code} after {took:.1f} s: {errors[0]}")


# -- 6. readiness while the worker restarts (last: it kills the worker) ----------------------------


def test_readyz_is_not_ready_while_the_worker_restarts(server):
    (worker,) = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 90:
        try:
            code = requests.get(server.url + "/readyz", timeout=1).status_code
        except requests.RequestException:
            code = "no answer"
        if code == 200 and seen:
            break
        seen.append(code)
        time.sleep(0.1)
    assert seen and 200 not in seen, seen  # never "ready" before the new worker's engine is loaded
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    assert post(server, "/recommend", {"user_id": 1, "k": 3}).status_code == 200
    print(f"/readyz after the kill: {seen}")
