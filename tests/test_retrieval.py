"""Faiss retrieval: exact flat search equals brute force (bias, exclusions, over-fetch), padding is
never returned, and HNSW recall@10 against exact search on the real exported embeddings."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from serving.artifact import load_artifact
from serving.retrieval import IndexConfig, ItemIndex
from serving.runtime import OnnxEncoder


def brute_force(emb, bias, q, k, exclude=(), num_special=1):
    s = emb @ q + (bias if bias is not None else 0)
    s[:num_special] = -np.inf
    s[list(exclude)] = -np.inf
    top = np.argsort(-s, kind="stable")[:k]
    return top, s[top]


@pytest.mark.parametrize("with_bias", [False, True])
def test_flat_equals_brute_force_with_exclusions(with_bias):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(501, 16)).astype(np.float32)
    bias = rng.normal(size=501).astype(np.float32) if with_bias else None
    index = ItemIndex(emb, bias)
    assert index.kind == "flat" and faiss.omp_get_max_threads() == 1
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    excl = [rng.choice(np.arange(1, 501), 40, replace=False) for _ in range(5)]
    for (tok, sc), q, e in zip(index.search(queries, 10, excl), queries, excl, strict=True):
        ref_tok, ref_sc = brute_force(emb, bias, q, 10, e)
        assert tok.tolist() == ref_tok.tolist() and np.allclose(sc, ref_sc, atol=1e-5)


def test_padding_never_returned_and_k_filled_after_exclusion():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(101, 8)).astype(np.float32)
    emb[0] = 100.0  # the pad row would win every query if it were indexed
    index = ItemIndex(emb)
    q = np.ones((1, 8), dtype=np.float32)
    seen = np.arange(1, 91)  # 90 of the 100 items excluded: exactly 10 remain
    tok, _ = index.search(q, 10, [seen])[0]
    assert sorted(tok.tolist()) == list(range(91, 101))
    tok, _ = index.search(q, 20, [seen])[0]
    assert len(tok) == 10  # fewer than k only when the catalogue has no more
    tok, _ = index.search(q, 100, None)[0]
    assert 0 not in tok and len(tok) == 100


@pytest.mark.parametrize("storage", ["float", "sq8"])
def test_hnsw_recall_at_10_on_real_embeddings(tiny_artifact_dir, record_property, storage):
    """Recall@10 of HNSW (forced on the 3k-item tiny catalogue) against exact search, with real
    user queries from the exported model and each user's seen items excluded; with the graph's
    vectors stored in 8 bits too (the candidates are re-scored exactly)."""
    art = load_artifact(tiny_artifact_dir, verify=False)
    enc = OnnxEncoder(art.onnx_path, art.max_len)
    toks = [[art.token(i) for i in h] for h in art.histories.values()]
    queries = enc.encode(toks)
    seen = [np.unique(t) for t in toks]
    flat = ItemIndex(art.embeddings, art.bias, art.num_special)
    hnsw = ItemIndex(art.embeddings, art.bias, art.num_special, IndexConfig(hnsw_threshold=0, storage=storage))
    assert hnsw.kind == "hnsw" and not hnsw.exact
    exact = flat.search(queries, 10, seen)
    approx = hnsw.search(queries, 10, seen)
    recall = np.mean([len(set(a[0]) & set(e[0])) / 10 for a, e in zip(approx, exact, strict=True)])
    record_property(f"hnsw_{storage}_recall_at_10", float(recall))
    print(f"HNSW recall@10 vs exact: {recall:.4f} over {len(queries)} users, {flat.num_items} items")
    assert all(len(a[0]) == 10 and not set(a[0].tolist()) & set(s.tolist()) for a, s in zip(approx, seen, strict=True))
    assert recall >= 0.95


def test_hnsw_graph_is_cached_and_read_back(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(2001, 16)).astype(np.float32)
    cfg = IndexConfig(hnsw_threshold=0, cache_dir=str(tmp_path))
    first = ItemIndex(emb, cfg=cfg, cache_key="abc123")
    (cached,) = list(tmp_path.iterdir())
    stamp = cached.stat().st_mtime_ns
    second = ItemIndex(emb, cfg=cfg, cache_key="abc123")
    assert cached.stat().st_mtime_ns == stamp and second.index.hnsw.efSearch == cfg.ef_search
    q = rng.normal(size=(4, 16)).astype(np.float32)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first.search(q, 10), second.search(q, 10), strict=True))
    ItemIndex(emb, cfg=cfg, cache_key="other")  # other embeddings, other file
    assert len(list(tmp_path.iterdir())) == 2
    sq8 = ItemIndex(emb, cfg=IndexConfig(hnsw_threshold=0, cache_dir=str(tmp_path), storage="sq8"), cache_key="abc123")
    assert len(list(tmp_path.iterdir())) == 3 and isinstance(sq8.index, faiss.IndexHNSWSQ)  # other storage, other file
    again = ItemIndex(emb, cfg=IndexConfig(hnsw_threshold=0, cache_dir=str(tmp_path), storage="sq8"), cache_key="abc123")
    assert len(list(tmp_path.iterdir())) == 3 and isinstance(again.index, faiss.IndexHNSWSQ)
