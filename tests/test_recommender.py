"""The service's logic in-process (no HTTP): configuration from the environment, HNSW path,
the injected model call used for batching, and the request rules."""

from __future__ import annotations

import numpy as np
import pytest

from serving.recommender import BadRequest, NotFoundError, RecommenderEngine


@pytest.fixture
def engine(tiny_artifact_dir, monkeypatch):
    monkeypatch.setenv("RECSYS_ARTIFACT_DIR", str(tiny_artifact_dir))
    monkeypatch.setenv("RECSYS_HNSW_THRESHOLD", "0")  # force the approximate index
    return RecommenderEngine.from_env()


def test_hnsw_engine_returns_k_unseen_items(engine):
    assert engine.model_info["index"] == "hnsw"
    user, hist = next(iter(engine.artifact.histories.items()))
    out = engine.recommend(user_id=user, k=25)
    ids = [i["item_id"] for i in out["items"]]
    assert len(ids) == 25 and len(set(ids)) == 25 and not set(ids) & set(hist)


def test_injected_model_call_is_used(engine):
    calls = []

    def encode(rows):
        calls.append(rows)
        return engine.encoder.encode(rows)

    a = engine.recommend(history=[1, 2, 3], k=5, encode=encode)
    assert calls == [[[engine.artifact.token(i) for i in (1, 2, 3)]]]
    assert a == engine.recommend(history=[1, 2, 3], k=5)


def test_request_rules(engine):
    with pytest.raises(BadRequest, match="exactly one"):
        engine.recommend()
    with pytest.raises(NotFoundError, match="unknown user_id"):
        engine.recommend(user_id="nobody")
    with pytest.raises(BadRequest, match="empty"):
        engine.recommend(history=[])
    with pytest.raises(BadRequest, match="k must be"):
        engine.recommend(history=[1], k=0)
    with pytest.raises(BadRequest, match="not in the catalogue: 777777"):
        engine.rank(history=[1], candidates=[1, 777777])
    q = engine.resolve(history=list(engine.artifact.items[:30]) + [10**9])
    assert q.truncated and len(q.tokens) == 20 and len(q.seen) == 30 and len(q.warnings) == 2
    assert np.array_equal(q.tokens, [engine.artifact.token(i) for i in engine.artifact.items[10:30]])
