"""The real service: `bentoml serve` on a free loopback port over a tiny exported artifact.

One server for the module; every endpoint and every bad input of the issue, then a check that
it still answers; flat-index top-k against brute-force scoring of the same graph. Hostile
input (issue #12) is in tests/test_hostile.py. The settings model and its README table last.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.processes import bentoml_cmd, bentoml_server, free_port, run_to_exit, server_env
from compressor.errors import CompressorError
from serving.runtime import OnnxEncoder
from serving.settings import ServingSettings, SettingsError, env_name, load_settings, markdown_table

ROOT = Path(__file__).resolve().parent.parent
MAX_K = 5000  # above the tiny catalogue, so "k = every unseen item" can be asked


@pytest.fixture(scope="module")
def server(tiny_artifact_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serving")
    env = server_env(work / "bentoml_home", RECSYS_ARTIFACT_DIR=str(tiny_artifact_dir),
                     RECSYS_MAX_K=str(MAX_K), RECSYS_MAX_CANDIDATES="50", RECSYS_THREADS="2")
    with bentoml_server(env, work / "serve.log", ready_timeout=90) as srv:  # stops the group
        yield srv.url


def post(url: str, route: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(url + route, data=data, headers={"Content-Type": "application/json"}, timeout=30)


@pytest.fixture(scope="module")
def artifact(tiny_artifact_dir):
    return {"histories": json.loads((tiny_artifact_dir / "user_histories.json").read_text()),
            "vocab": json.loads((tiny_artifact_dir / "item_vocab.json").read_text())["items"],
            "emb": np.load(tiny_artifact_dir / "item_embeddings.npy"),
            "encoder": OnnxEncoder(tiny_artifact_dir / "model.onnx", 20)}


def test_recommend_known_user(server, artifact):
    user, hist = next(iter(artifact["histories"].items()))
    r = post(server, "/recommend", {"user_id": int(user), "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 5 and set(body["items"][0]) == {"item_id", "title", "genres", "score"}
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert not {i["item_id"] for i in body["items"]} & set(hist)  # seen items excluded by default
    assert body["model"]["kind"] == "teacher" and body["model"]["index"] == "flat"
    assert body["truncated_history"] == (len(hist) > 20)


def test_flat_top_k_equals_brute_force(server, artifact):
    """The service's top-k is exact scoring of the same graph, seen items masked."""
    vocab, emb, enc = artifact["vocab"], artifact["emb"], artifact["encoder"]
    token = {item: i + 1 for i, item in enumerate(vocab)}
    for user, hist in list(artifact["histories"].items())[:8]:
        toks = [token[i] for i in hist]
        scores = emb @ enc.encode([toks[-20:]])[0]
        scores[0] = -np.inf
        scores[toks] = -np.inf
        top = np.argsort(-scores, kind="stable")[:10]
        got = post(server, "/recommend", {"user_id": user, "k": 10}).json()["items"]
        assert [i["item_id"] for i in got] == [vocab[t - 1] for t in top]
        assert np.allclose([i["score"] for i in got], scores[top], atol=1e-5)


def test_history_unknown_items_truncation_and_exclusion(server, artifact):
    user, hist = max(artifact["histories"].items(), key=lambda kv: len(kv[1]))
    r = post(server, "/recommend", {"history": [*hist, 987654321, "nope"], "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated_history"] is True
    assert any("987654321" in w and "'nope'" in w for w in body["warnings"])  # ignored, and said so
    assert any("newest 20" in w for w in body["warnings"])
    by_user = post(server, "/recommend", {"user_id": int(user), "k": 3}).json()
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in by_user["items"]]
    # Over-fetch: asking for every unseen item returns exactly those.
    n_unseen = len(artifact["vocab"]) - len(set(hist))
    items = post(server, "/recommend", {"user_id": int(user), "k": n_unseen}).json()["items"]
    assert len(items) == n_unseen and not {i["item_id"] for i in items} & set(hist)
    # exclude_seen=false: plain top-k over the whole catalogue (padding still never returned).
    token = {item: i + 1 for i, item in enumerate(artifact["vocab"])}
    scores = artifact["emb"] @ artifact["encoder"].encode([[token[i] for i in hist[-20:]]])[0]
    scores[0] = -np.inf
    top = np.argsort(-scores, kind="stable")[:50]
    got = post(server, "/recommend", {"user_id": int(user), "k": 50, "exclude_seen": False}).json()["items"]
    assert [i["item_id"] for i in got] == [artifact["vocab"][t - 1] for t in top]
    as_strings = post(server, "/recommend", {"history": [str(i) for i in hist[:5]], "k": 3}).json()
    assert as_strings["items"] == post(server, "/recommend", {"history": hist[:5], "k": 3}).json()["items"]


def test_rank_orders_candidates(server, artifact):
    user, _ = next(iter(artifact["histories"].items()))
    cands = artifact["vocab"][:7]
    r = post(server, "/rank", {"user_id": int(user), "candidates": [*cands, cands[0]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(i["item_id"] for i in body["items"]) == sorted(cands)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert any("duplicate" in w for w in body["warnings"])
    rec = post(server, "/recommend", {"user_id": int(user), "k": 5, "exclude_seen": False}).json()["items"]
    ranked = post(server, "/rank", {"user_id": int(user), "candidates": [i["item_id"] for i in rec][::-1]}).json()
    assert [i["item_id"] for i in ranked["items"]] == [i["item_id"] for i in rec]  # same scores, same order


def test_item_lookup(server):
    r = post(server, "/item", {"item_id": 1})
    assert r.status_code == 200 and r.json() == {"item_id": 1, "title": "Toy Story (1995)",
                                                 "genres": "Adventure|Animation|Children|Comedy|Fantasy"}
    r = post(server, "/item", {"item_id": 123456789})
    assert r.status_code == 404 and "unknown item_id 123456789" in r.json()["error"]


BAD = [
    ("/recommend", {"user_id": 999999}, 404, "unknown user_id 999999"),
    ("/recommend", {"history": []}, 400, "at least 1 item"),
    ("/recommend", {"history": [987654321, 87654321]}, 400, "none of the history's items"),
    ("/recommend", {"user_id": 1, "k": 0}, 400, "greater than or equal to 1"),
    ("/recommend", {"user_id": 1, "k": MAX_K + 1}, 400, f"less than or equal to {MAX_K}"),
    ("/recommend", {"user_id": 1, "k": "ten"}, 400, "valid integer"),
    ("/recommend", {}, 400, "exactly one of user_id or history"),
    ("/recommend", {"user_id": 1, "history": [1]}, 400, "exactly one of user_id or history"),
    ("/recommend", {"user": 1}, 400, "Extra inputs are not permitted"),
    ("/recommend", '{"user_id": 1,', 400, "Invalid JSON"),
    ("/recommend", "[1, 2]", 400, "Input should be an object"),
    ("/rank", {"user_id": 1, "candidates": []}, 400, "at least 1 item"),
    ("/rank", {"user_id": 1, "candidates": list(range(51))}, 400, "at most 50 items"),
    ("/rank", {"user_id": 1, "candidates": [1, 987654321]}, 400, "not in the catalogue: 987654321"),
    ("/rank", {"user_id": 999999, "candidates": [1]}, 404, "unknown user_id"),
    ("/rank", {"history": [1]}, 400, "candidates"),
    ("/item", {"item": 1}, 400, "item_id"),
    # ids are parsed one way (compressor.ids): Unicode digits, leading zeros are not the int id
    ("/rank", {"user_id": 1, "candidates": [1, "\u00b2"]}, 400, "not in the catalogue"),
    ("/recommend", {"history": ["\u00b2", "\u0663", "01"]}, 400, "none of the history's items"),
    ("/item", {"item_id": "\u00b9"}, 404, "unknown item_id"),
]


@pytest.mark.parametrize("route,body,status,message", BAD, ids=[f"{r}:{b}"[:60] for r, b, _, _ in BAD])
def test_bad_input_gets_a_clear_4xx(server, route, body, status, message):
    r = post(server, route, body)
    assert r.status_code == status, r.text
    assert message in r.text


def test_still_serving_health_and_metrics(server):
    for route, body in [(r, b) for r, b, _, _ in BAD]:  # hammer it with all the bad input again
        assert post(server, route, body).status_code < 500
    r = post(server, "/recommend", {"history": [1, 2, 3], "k": 2})
    assert r.status_code == 200 and len(r.json()["items"]) == 2
    for route in ("/healthz", "/livez", "/readyz"):
        assert requests.get(server + route, timeout=5).status_code == 200
    metrics = requests.get(server + "/metrics", timeout=5).text
    assert 'bentoml_service_request_duration_seconds_count{endpoint="/recommend"' in metrics
    spec = requests.get(server + "/docs.json", timeout=5).json()
    assert {"/recommend", "/rank", "/item", "/embed"} <= set(spec["paths"])
    assert "IGNORED" in json.dumps(spec["paths"]["/recommend"])  # the unknown-item policy is documented


def _metric(text: str, name: str, labels: str) -> float:
    """The value of one sample `name{labels...}` in a Prometheus text page (0 when absent)."""
    m = re.search(rf"^{name}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_custom_metrics_are_labelled_by_model_kind(server, artifact):
    """recsys_* metrics on /metrics: model and retrieval time histograms, unknown-item and
    truncated-history counters, each labelled with the artifact's kind (the tiny one: teacher)."""
    user, hist = max(artifact["histories"].items(), key=lambda kv: len(kv[1]))
    assert len(hist) > 20  # long enough to be truncated
    label = 'model_kind="teacher"'
    before = requests.get(server + "/metrics", timeout=5).text
    assert post(server, "/recommend", {"user_id": int(user), "k": 3}).status_code == 200
    assert post(server, "/rank", {"history": hist[:3], "candidates": hist[3:6]}).status_code == 200
    r = post(server, "/recommend", {"history": [hist[0], 987654321, "nope"], "k": 3})
    assert r.status_code == 200, r.text
    after = requests.get(server + "/metrics", timeout=5).text
    for name in ("recsys_model_seconds", "recsys_retrieval_seconds"):
        assert _metric(after, name + "_count", label) - _metric(before, name + "_count", label) == 3
        assert _metric(after, name + "_sum", label) > _metric(before, name + "_sum", label)
        assert f'{name}_bucket{{le="0.0005",model_kind="teacher"}}' in after
    assert _metric(after, "recsys_unknown_items_total", label) - \
        _metric(before, "recsys_unknown_items_total", label) == 2
    assert _metric(after, "recsys_truncated_histories_total", label) - \
        _metric(before, "recsys_truncated_histories_total", label) == 1
    assert 'model_kind="student"' not in after


def test_embed_endpoint(server, artifact):
    hist = next(iter(artifact["histories"].values()))
    r = post(server, "/embed", {"histories": [hist[-5:], hist[-20:]]})
    assert r.status_code == 200, r.text
    vecs = np.asarray(r.json(), dtype=np.float32)
    token = {item: i + 1 for i, item in enumerate(artifact["vocab"])}
    ref = artifact["encoder"].encode([[token[i] for i in hist[-5:]], [token[i] for i in hist[-20:]]])
    assert vecs.shape == ref.shape and np.abs(vecs - ref).max() < 1e-5
    r = post(server, "/embed", {"histories": [hist[-5:], [987654321]]})  # a row with no known item
    assert r.status_code == 200 and not np.asarray(r.json())[1].any()
    r = post(server, "/embed", {"histories": [hist[-5:], []]})
    assert r.status_code == 400 and "at least 1 item" in r.text


def test_recommend_latency_known_user(server, artifact, record_property):
    """End-to-end HTTP latency for one known user (reported, loosely bounded: CI machines vary)."""
    user = next(iter(artifact["histories"]))
    s = requests.Session()
    times = []
    for _ in range(50):
        t = time.perf_counter()
        assert s.post(server + "/recommend", json={"user_id": int(user), "k": 10}).status_code == 200
        times.append(time.perf_counter() - t)
    p50 = float(np.median(times)) * 1000
    record_property("recommend_p50_ms", p50)
    print(f"recommend p50 {p50:.2f} ms over 50 sequential requests")
    assert p50 < 200


# -- settings (serving/settings.py) -----------------------------------------------------------------


def test_readme_settings_table_matches_the_model():
    """Every field is in serving/README.md's table with its default, and nothing else is."""
    text = (ROOT / "serving" / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(RECSYS_[A-Z_]+)` \| `([^`]*)` \|", text, flags=re.M))
    expected = dict(re.findall(r"^\| `(RECSYS_[A-Z_]+)` \| `([^`]*)` \|", markdown_table(), flags=re.M))
    assert set(expected) == {env_name(f) for f in ServingSettings.model_fields}
    assert rows == expected
    assert rows["RECSYS_MAX_BODY_BYTES"] == str(ServingSettings.model_fields["max_body_bytes"].default)


def test_settings_parse_and_refuse_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_VERIFY_ARTIFACT", "0")
    monkeypatch.setenv("RECSYS_MODEL_FILE", "")  # empty = unset
    monkeypatch.setenv("RECSYS_ORT_THREADS", "3")  # the old alias still works
    s = load_settings()
    assert s.verify_artifact is False and s.model_file is None and s.ort_intra_threads == 3
    assert s.host == "127.0.0.1"  # loopback unless asked otherwise
    for name, value, message in [("RECSYS_THREADS", "four", "valid integer"),
                                 ("RECSYS_DEVICE", "tpu", "'auto', 'cpu' or 'cuda'"),
                                 ("RECSYS_MAX_BODY_BYTES", "10", "greater than or equal to 1024"),
                                 ("RECSYS_MODEL_FILE", "../x.onnx", "a file name inside the artifact"),
                                 ("RECSYS_HOST", "localhost", "does not appear to be an IPv4 or IPv6")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(SettingsError) as e:
            load_settings()
        assert str(e.value).count("\n") == 0 and f"{name}=" in str(e.value) and message in str(e.value)
        monkeypatch.delenv(name)


# -- the Faiss index cache (serving/retrieval.py): what is read back is what was written -----------


def _overlap(results, ref) -> float:
    return float(np.mean([len(set(t.tolist()) & set(r)) / len(r) for (t, _), r in zip(results, ref, strict=True)]))


def test_index_cache_reads_only_a_verified_file_from_a_private_directory(tmp_path):
    from serving.retrieval import IndexConfig, ItemIndex

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(1501, 8)).astype(np.float32)
    cache = tmp_path / "cache"
    cfg = IndexConfig(hnsw_threshold=0, cache_dir=str(cache))
    q = rng.normal(size=(3, 8)).astype(np.float32)
    ref = [t.tolist() for t, _ in ItemIndex(emb, cfg=cfg, cache_key="k").search(q, 10)]
    (entry,) = cache.iterdir()
    assert cache.stat().st_mode & 0o077 == 0  # created private
    # The checksum in the name is the file's sha256: a file changed after it was written is not
    # read; it is removed and rebuilt.
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    again = ItemIndex(emb, cfg=cfg, cache_key="k")
    assert _overlap(again.search(q, 10), ref) >= 0.9  # a rebuilt HNSW graph (build threads vary)
    (rebuilt,) = cache.iterdir()
    assert rebuilt.read_bytes() != bytes(data)
    # Other vectors under the same caller key: another file (the key hashes the vectors too).
    ItemIndex(emb * 2, cfg=cfg, cache_key="k")
    assert len(list(cache.iterdir())) == 2
    # A directory others can write is not used at all (nothing read, nothing written).
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    planted = shared / "planted.faiss"
    planted.write_bytes(b"not an index")
    idx = ItemIndex(emb, cfg=IndexConfig(hnsw_threshold=0, cache_dir=str(shared)), cache_key="k")
    assert _overlap(idx.search(q, 10), ref) >= 0.9
    assert sorted(p.name for p in shared.iterdir()) == ["planted.faiss"]


def test_model_store_versions_are_served_by_tag(tiny_artifact_dir, tmp_path):
    """`python -m serving.model_store` copies an artifact into a new Model Store version (manifest
    facts as metadata); RECSYS_MODEL_TAG serves it (RECSYS_ARTIFACT_DIR is then not read, and
    the copy passes the sha256 checks); an unknown tag is one line and exit code 2."""
    env = server_env(tmp_path / "home", RECSYS_ARTIFACT_DIR=str(tmp_path / "nowhere"))

    def python(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    tags = [python("-m", "serving.model_store", str(tiny_artifact_dir), "recsys-tiny") for _ in range(2)]
    assert tags[0] != tags[1] and all(t.startswith("recsys-tiny:") for t in tags)  # two versions
    info = json.loads(python("-c", "import bentoml, json, sys; m = bentoml.models.get(sys.argv[1]); "
                                   "print(json.dumps({'meta': m.info.metadata, 'labels': m.info.labels, "
                                   "'path': m.path}))", tags[0]))
    manifest = json.loads((tiny_artifact_dir / "manifest.json").read_text())
    assert info["labels"] == {"kind": "teacher"} and info["meta"]["max_len"] == manifest["max_len"]
    assert Path(info["path"]).is_relative_to(tmp_path / "home")
    assert (Path(info["path"]) / "manifest.json").read_bytes() == (tiny_artifact_dir / "manifest.json").read_bytes()

    with bentoml_server({**env, "RECSYS_MODEL_TAG": tags[0]}, tmp_path / "serve.log", ready_timeout=90) as srv:
        r = post(srv.url, "/recommend", {"history": [1, 2, 3], "k": 2})
        assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text

    log = tmp_path / "bad.log"
    code = run_to_exit(bentoml_cmd(free_port()), log, {**env, "RECSYS_MODEL_TAG": "recsys-tiny:nope"},
                       timeout=90)
    out = log.read_text(errors="replace")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "not in the BentoML Model Store" in errors[0], out[-2000:]
    assert "Traceback" not in out


def test_a_port_taken_before_the_bind_is_retried_on_a_fresh_one(tiny_artifact_dir, tmp_path, monkeypatch):
    """`free_port` can hand out a port that another process takes before `bentoml serve` binds
    it (seen on a loaded CI machine): the server is started again on fresh ports."""
    import socket

    import benchmarks.processes as processes

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    real = processes.free_port
    env = server_env(tmp_path / "home", RECSYS_ARTIFACT_DIR=str(tiny_artifact_dir))
    try:
        monkeypatch.setattr(processes, "free_port", lambda host="127.0.0.1": busy.getsockname()[1])
        monkeypatch.setattr(processes, "PORT_ATTEMPTS", 1)  # without a retry the start fails
        with pytest.raises(CompressorError, match="Address already in use"):
            with processes.bentoml_server(env, tmp_path / "once.log", ready_timeout=90):
                pass
        monkeypatch.undo()
        ports = iter([busy.getsockname()[1]])
        monkeypatch.setattr(processes, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
        with processes.bentoml_server(env, tmp_path / "serve.log", ready_timeout=90) as srv:
            assert not srv.url.endswith(f":{busy.getsockname()[1]}")
            assert requests.get(srv.url + "/readyz", timeout=10).status_code == 200
    finally:
        busy.close()


def test_fuzzing_the_openapi_spec_finds_no_server_error(server, tmp_path):
    """Schemathesis against the served spec (/docs.json), bounded in time, with a fixed seed: any
    5xx, or a response that its own schema does not describe, fails the build."""
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "--no-color", "run", f"{server}/docs.json", "--checks", "not_a_server_error,response_schema_conformance",
           "--max-time", "60", "--seed", "20261203", "--generation-database", "none", "--workers", "1",
           "--max-examples", "300", "--suppress-health-check", "all"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    report = done.stdout[-6000:] + done.stderr[-2000:]
    (tmp_path / "schemathesis.txt").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, report
    # it tested every operation of the spec, with cases generated
    selected = re.search(r"Selected: (\d+)/(\d+)", done.stdout)
    tested = re.search(r"Tested: (\d+)", done.stdout)
    cases = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert selected and tested and cases, report
    assert int(tested[1]) == int(selected[2]) >= 4 and int(cases[2]) == int(cases[1]) > 100, report
