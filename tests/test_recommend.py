"""Batch scoring (`compressor recommend`): every user's top-k from an exported artifact, as the
service would answer; its torchrun form writes parts whose union is the single-process file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from compressor.cli import main
from tests.conftest import tiny_interactions


@pytest.fixture(scope="module")
def ratings_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ratings")
    inter = tiny_interactions()
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(d / "ratings.csv", index=False)
    return d


@pytest.fixture(scope="module")
def recs(tiny_artifact_dir, ratings_dir, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("recs") / "recs.parquet"
    assert main(["recommend", str(tiny_artifact_dir), "--data", str(ratings_dir), "--k", "7", "--out", str(out),
                 "--batch-size", "16"]) == 0
    return pd.read_parquet(out)


def test_every_user_gets_k_unseen_items_best_first(recs, tiny_data):
    assert list(recs.columns) == ["user", "rank", "item", "score"]
    assert sorted(recs["user"].unique()) == sorted(tiny_data.sequences) and len(recs) == 7 * len(tiny_data.sequences)
    for user, rows in recs.groupby("user"):
        assert rows["rank"].tolist() == list(range(1, 8))
        assert np.all(np.diff(rows["score"].to_numpy()) <= 0)
        seen = {tiny_data.vocab.item(t) for t in tiny_data.sequences[user]}
        assert rows["item"].nunique() == 7 and not seen & set(rows["item"])


def test_the_lists_are_what_the_service_answers(recs, tiny_artifact_dir, monkeypatch):
    from serving.recommender import RecommenderEngine

    monkeypatch.setenv("RECSYS_ARTIFACT_DIR", str(tiny_artifact_dir))
    engine = RecommenderEngine.from_env()  # exact (flat) Faiss index over the same embeddings
    for user in list(recs["user"].unique())[:10]:
        served = engine.recommend(user_id=int(user), k=7)["items"]
        mine = recs[recs["user"] == user]
        assert [i["item_id"] for i in served] == mine["item"].tolist()
        assert np.allclose([i["score"] for i in served], mine["score"], rtol=1e-5, atol=1e-6)


def test_two_torchrun_ranks_write_parts_whose_union_is_the_single_process_file(recs, tiny_artifact_dir,
                                                                               ratings_dir, tmp_path):
    from tests.test_distributed import torchrun

    out = tmp_path / "recs.parquet"
    proc = torchrun("-m", "compressor", "recommend", str(tiny_artifact_dir), "--data", str(ratings_dir),
                    "--k", "7", "--out", str(out), "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(tmp_path.glob("recs-*.parquet"))
    assert [p.name for p in parts] == ["recs-00000-of-00002.parquet", "recs-00001-of-00002.parquet"]
    assert not out.exists()
    frames = [pd.read_parquet(p) for p in parts]
    assert not set(frames[0]["user"]) & set(frames[1]["user"])  # each user scored exactly once
    both = pd.concat(frames).sort_values(["user", "rank"]).reset_index(drop=True)
    one = recs.sort_values(["user", "rank"]).reset_index(drop=True)
    assert both[["user", "rank", "item"]].equals(one[["user", "rank", "item"]])
    assert np.allclose(both["score"], one["score"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "--k 0: give a positive number"),
    (["--k", "100000"], "--k 100000: give 1 to"),
    (["--out", "recs.csv"], "give a .parquet file name"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--onnx", "model.fp16.onnx"], "no graph 'model.fp16.onnx'"),
])
def test_bad_arguments_are_one_line_errors(extra, message, tiny_artifact_dir, ratings_dir, tmp_path, capsys):
    argv = ["recommend", str(tiny_artifact_dir), "--data", str(ratings_dir), "--out", str(tmp_path / "r.parquet"), *extra]
    if "--out" in extra:
        argv = argv[:4] + argv[6:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_model_checkpoint_is_not_an_artifact(tiny_teacher_dir, ratings_dir, tmp_path, capsys):
    assert main(["recommend", str(tiny_teacher_dir), "--data", str(ratings_dir), "--out", str(tmp_path / "r.parquet")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and len(err.strip().splitlines()) == 1


def test_items_out_is_the_artifacts_catalogue_for_an_external_index(tiny_artifact_dir, ratings_dir, tmp_path):
    from compressor.data.vocab import ItemVocab

    items = tmp_path / "items.parquet"
    assert main(["recommend", str(tiny_artifact_dir), "--data", str(ratings_dir), "--out", str(tmp_path / "r.parquet"),
                 "--items-out", str(items), "-q"]) == 0
    got = pd.read_parquet(items)
    vocab = ItemVocab.load(tiny_artifact_dir)
    emb = np.load(tiny_artifact_dir / "item_embeddings.npy")
    assert list(got.columns) == ["item", "vector"]  # the tiny Llama's head has no bias
    assert got["item"].tolist() == vocab.items
    assert np.array_equal(np.stack(got["vector"].to_numpy()), emb[vocab.num_special:])


def test_two_torchrun_ranks_split_a_histories_file_by_batch(tiny_artifact_dir, tmp_path):
    """--histories under torchrun: every N-th batch per rank, so the parts hold every user once."""
    from tests.test_distributed import torchrun

    events = tiny_interactions().events.sort_values(["user", "timestamp"], kind="mergesort")
    hist = events.groupby("user", sort=True)["item"].agg(list).reset_index().rename(columns={"item": "items"})
    path = tmp_path / "histories.parquet"
    hist.to_parquet(path)
    one = tmp_path / "one.parquet"
    assert main(["recommend", str(tiny_artifact_dir), "--histories", str(path), "--k", "7", "--out", str(one),
                 "--batch-size", "8", "-q"]) == 0
    proc = torchrun("-m", "compressor", "recommend", str(tiny_artifact_dir), "--histories", str(path),
                    "--k", "7", "--out", str(tmp_path / "recs.parquet"), "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = [pd.read_parquet(p) for p in sorted(tmp_path.glob("recs-*-of-00002.parquet"))]
    assert len(frames) == 2 and all(len(f) for f in frames)
    assert not set(frames[0]["user"]) & set(frames[1]["user"])
    both = pd.concat(frames).sort_values(["user", "rank"]).reset_index(drop=True)
    single = pd.read_parquet(one).sort_values(["user", "rank"]).reset_index(drop=True)
    assert both[["user", "rank", "item"]].equals(single[["user", "rank", "item"]])
    assert np.allclose(both["score"], single["score"], rtol=1e-5, atol=1e-6)
