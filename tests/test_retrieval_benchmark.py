"""benchmarks.retrieval: tiny end-to-end runs, real-embedding input, and the serving-default rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.catalogues import genre_queries, synthetic_catalogue
from benchmarks.retrieval import (
    RetrievalBenchConfig,
    auto_nlist,
    exact_topk,
    main,
    mips_to_l2,
    recall_at_k,
    run,
    time_searches,
)
from benchmarks.retrieval_report import flat_threshold, recommend
from compressor.errors import CompressorError

FAST = dict(queries=40, repeats=5, batch=8, batch_repeats=3, ef_search=[8, 64], nprobe=[1, 4, 64], hnsw_m=[8],
            recall_target=0.9)


def test_tiny_sizes_end_to_end_write_all_outputs(tmp_path):
    cfg = RetrievalBenchConfig(dim=16, sizes=[400, 1200], **FAST)
    payload = run(cfg, tmp_path)
    for name in ("retrieval.md", "retrieval.json", "retrieval.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    rows = saved["results"]
    assert {r["index"] for r in rows} == {"flat", "hnsw", "ivf", "ivf_l2"}
    assert {r["n"] for r in rows} == {400, 1200}
    for r in rows:
        assert 0.0 <= r["recall"] <= 1.0 and r["b1_ms_p50"] > 0 and r["memory_bytes"] > 0 and r["build_s"] >= 0
    flat = [r for r in rows if r["index"] == "flat"]
    # HNSW memory carries the graph on top of the vectors; more probes never lose recall
    for n in (400, 1200):
        f = next(r for r in flat if r["n"] == n)
        h = next(r for r in rows if r["index"] == "hnsw" and r["n"] == n)
        assert h["memory_bytes"] > f["memory_bytes"] >= n * 16 * 4
        for kind in ("ivf", "ivf_l2"):
            ivf = sorted((r for r in rows if r["index"] == kind and r["n"] == n), key=lambda r: r["search"]["nprobe"])
            assert ivf[-1]["recall"] >= ivf[0]["recall"]
            assert ivf[-1]["recall"] == 1.0  # nprobe >= nlist scans every list: exact (also after the transform)
    assert payload["recommendation"]["hnsw"] is not None
    assert "Serving defaults" in (tmp_path / "retrieval.md").read_text()


def test_real_embeddings_skip_padding_row(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((301, 12)).astype(np.float32)
    emb[0] = 1e3  # padding row: would dominate every inner-product top-k if it were indexed
    np.save(tmp_path / "item_embeddings.npy", emb)
    cfg = RetrievalBenchConfig(sizes=[], real_embeddings=tmp_path / "item_embeddings.npy", indexes=["flat", "hnsw"],
                               **FAST)
    rows = run(cfg, tmp_path / "out")["results"]
    assert {r["n"] for r in rows} == {300} and {r["dim"] for r in rows} == {12}
    assert {r["source"] for r in rows} == {"real"}
    md = (tmp_path / "out" / "retrieval.md").read_text()
    assert "real (300 items)" in md


def test_real_queries_file_is_used_and_checked(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "emb.npy", rng.standard_normal((200, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((7, 8)).astype(np.float32))
    np.save(tmp_path / "bad_q.npy", rng.standard_normal((7, 5)).astype(np.float32))
    cfg = RetrievalBenchConfig(sizes=[], real_embeddings=tmp_path / "emb.npy", real_queries=tmp_path / "q.npy",
                               indexes=["flat"], **{**FAST, "batch": 4})
    run(cfg, tmp_path / "out")
    cfg = cfg.model_copy(update={"real_queries": tmp_path / "bad_q.npy"})
    with pytest.raises(CompressorError, match="queries"):
        run(cfg, tmp_path / "out2")


def test_bad_input_is_a_clear_error(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10, np.float32))
    with pytest.raises(CompressorError, match="unknown index"):
        run(RetrievalBenchConfig(sizes=[500], indexes=["flat", "lsh"]), tmp_path)
    with pytest.raises(CompressorError, match=r"\(V,H\)"):
        run(RetrievalBenchConfig(sizes=[], real_embeddings=tmp_path / "flat.npy"), tmp_path)
    with pytest.raises(CompressorError, match="no such"):
        run(RetrievalBenchConfig(sizes=[], real_embeddings=tmp_path / "missing.npy"), tmp_path)
    assert main(["--sizes", "500", "--indexes", "flat,annoy", "--out", str(tmp_path / "x")]) == 2
    assert main(["--sizes", "500", "--recall-target", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_synthetic_catalogue_has_structure():
    rng = np.random.default_rng(0)
    items, labels, pop = synthetic_catalogue(5000, 32, rng)
    assert items.shape == (5000, 32) and items.dtype == np.float32
    norms = np.linalg.norm(items, axis=1)
    assert np.percentile(norms, 99) / np.percentile(norms, 1) > 2  # norm spread: MIPS is not cosine search
    assert np.corrcoef(np.log(pop), np.log(norms))[0, 1] > 0.5  # popular items have larger norms
    sizes = np.bincount(labels)
    assert sizes.max() > 5 * np.median(sizes)  # Zipf-sized genres
    # same-genre items are closer than random pairs
    unit = items / norms[:, None]
    same = np.mean([unit[np.flatnonzero(labels == g)[:20]].mean(0) @ unit[np.flatnonzero(labels == g)[20:40]].mean(0)
                    for g in range(3)])
    assert same > 0.3
    queries = genre_queries(items, labels, pop, 20, rng)
    assert queries.shape == (20, 32) and np.isfinite(queries).all()
    assert not (np.abs(queries[:, None, :] - items[None]).max(-1) < 1e-6).any()  # never an index vector


def test_mips_to_l2_keeps_inner_product_order():
    rng = np.random.default_rng(3)
    items = rng.standard_normal((50, 6)).astype(np.float32) * rng.uniform(0.2, 3, (50, 1)).astype(np.float32)
    q = rng.standard_normal(6).astype(np.float32)
    aug = mips_to_l2(items)
    assert aug.shape == (50, 7)
    assert np.allclose(np.linalg.norm(aug, axis=1), np.linalg.norm(items, axis=1).max(), rtol=1e-5)
    dist = np.linalg.norm(aug - np.append(q, 0), axis=1)  # |a|^2 + |q|^2 - 2 q.x: constant - 2 q.x
    assert np.array_equal(np.argsort(dist, kind="stable"), np.argsort(-(items @ q), kind="stable"))


def test_exact_topk_is_brute_force_inner_product():
    rng = np.random.default_rng(4)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    expected = np.argsort(-(queries @ items.T), axis=1)[:, :5]
    assert np.array_equal(np.sort(exact_topk(items, queries, 5), axis=1), np.sort(expected, axis=1))


def test_time_budget_bounds_the_repetitions():
    import faiss

    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32))
    q = np.zeros((10, 8), np.float32)
    assert len(time_searches(index, q, 5, 1, 50)) == 50
    assert len(time_searches(index, q, 5, 1, 10_000_000, budget_s=0.05)) >= 3  # returns, and soon


def test_recall_at_k_closed_form():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [8, 7, 6, 5]])  # -1 = faiss "no result"
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_auto_nlist():
    assert auto_nlist(1_000_000) == 4096
    assert auto_nlist(10_000) == 256  # 4*sqrt(1e4)=400 -> 2^9=512, capped at 10000/39 points per list
    assert auto_nlist(100) == 2


def test_flat_threshold_rules():
    # ratio 2x already at 10k; flat crosses 1 ms exactly at 100k -> both hold from 100k
    pts = [(10_000, 0.1, 0.05), (100_000, 1.0, 0.1), (1_000_000, 10.0, 0.2)]
    assert flat_threshold(pts, 2.0, 1.0)["flat_max_items"] == 100_000
    # budget crossed between 10k (0.5 ms) and 100k (5 ms): log-log midpoint of the decade is 10^4.5
    pts = [(10_000, 0.5, 0.05), (100_000, 5.0, 0.1)]
    assert flat_threshold(pts, 2.0, 0.5 * 10 ** 0.5)["flat_max_items"] == 32_000
    # HNSW never 2x faster: no threshold, keep flat
    assert flat_threshold([(10_000, 0.1, 0.09), (100_000, 1.1, 0.6)], 2.0, 1.0)["flat_max_items"] is None
    # flat under budget everywhere: extrapolate linearly in N from the largest size
    got = flat_threshold([(10_000, 0.02, 0.005), (100_000, 0.2, 0.01)], 2.0, 1.0)
    assert got["flat_max_items"] == 500_000


def test_recommend_picks_cheapest_setting_at_target():
    def row(n, kind, ms, recall, search):
        build = {"M": 32, "efConstruction": 40} if kind == "hnsw" else {}
        return {"catalogue": f"s{n}", "source": "synthetic", "n": n, "index": kind, "build": build,
                "search": search, "b1_ms_p50": ms, "recall": recall, "memory_bytes": 1}

    rows = [row(1000, "flat", 0.5, 1.0, {}), row(1000, "hnsw", 0.05, 0.9, {"efSearch": 16}),
            row(1000, "hnsw", 0.08, 0.97, {"efSearch": 32}), row(1000, "hnsw", 0.2, 1.0, {"efSearch": 64}),
            row(10_000, "flat", 5.0, 1.0, {}), row(10_000, "hnsw", 0.3, 0.93, {"efSearch": 32}),
            row(10_000, "hnsw", 0.4, 0.96, {"efSearch": 64})]
    rec = recommend(rows, 0.95, 2.0, 1.0)
    assert rec["hnsw"] == {"M": 32, "efConstruction": 40, "efSearch": 64, "at_items": 10_000}  # largest decides
    assert rec["per_size"][0]["hnsw"]["efSearch"] == 32
    assert rec["ivf"] is None
    assert rec["flat_max_items"] == 2000  # flat reaches 1 ms at 2k (0.5 ms at 1k, linear in N)


def test_quantized_hnsw_storage_is_smaller_and_keeps_recall(tmp_path):
    """fp16 and SQ8 store the indexed vectors in 2 and 1 bytes a dimension: the index shrinks,
    recall at a wide efSearch stays near the float graph's."""
    cfg = RetrievalBenchConfig(dim=32, sizes=[3000], indexes=["hnsw", "hnsw_fp16", "hnsw_sq8"], **FAST)
    rows = run(cfg, tmp_path)["results"]
    at = {r["index"]: r for r in rows if r["search"]["efSearch"] == 64}
    assert at["hnsw"]["memory_bytes"] > at["hnsw_fp16"]["memory_bytes"] > at["hnsw_sq8"]["memory_bytes"]
    assert at["hnsw"]["memory_bytes"] - at["hnsw_sq8"]["memory_bytes"] >= 3000 * 32 * 3 * 0.9
    assert at["hnsw_fp16"]["recall"] >= at["hnsw"]["recall"] - 0.02
    assert at["hnsw_sq8"]["recall"] >= at["hnsw"]["recall"] - 0.1
