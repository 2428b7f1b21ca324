"""Loaders on small files written here, format detection, the vocabulary and the protocol."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.data import (
    ItemVocab,
    left_pad,
    load_interactions,
    prepare,
    training_windows,
    window_batches,
)
from compressor.data.loaders import detect_format
from compressor.errors import DataError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_dataset_is_complete():
    data = load_interactions("ml-latest-small")
    assert len(data.events) == 100_836
    assert data.events["user"].nunique() == 610
    assert "Toy Story (1995)" in set(data.items["title"])


def test_ml_latest_csv(tmp_path):
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,5\n1,20,3.0,3\n2,10,5.0,1\n")
    _write(tmp_path / "movies.csv", 'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n20,B,Drama\n')
    assert detect_format(tmp_path) == "ml-latest"
    data = load_interactions(tmp_path)
    assert list(data.events.columns) == ["user", "item", "timestamp", "rating"]
    assert data.items.set_index("item").loc[10, "title"] == "Heat, The (1995)"


def test_ml_100k(tmp_path):
    _write(tmp_path / "u.data", "1\t10\t4\t5\n1\t20\t3\t3\n")
    genre_flags = "|".join(["0"] * 19)
    _write(tmp_path / "u.item", f"10|Toy Story (1995)|01-Jan-1995||http://x|{genre_flags[:-1]}1\n")
    assert detect_format(tmp_path) == "ml-100k"
    data = load_interactions(tmp_path)
    assert len(data.events) == 2
    assert data.items.set_index("item").loc[10, "genres"] == "Western"


def test_ml_1m(tmp_path):
    _write(tmp_path / "ratings.dat", "1::10::4::5\n2::20::3::3\n")
    _write(tmp_path / "movies.dat", "10::A (1990)::Comedy\n20::B (1991)::Drama|War\n")
    assert detect_format(tmp_path) == "ml-1m"
    data = load_interactions(tmp_path)
    assert sorted(data.events["item"]) == [10, 20]
    assert data.items.set_index("item").loc[20, "genres"] == "Drama|War"


def test_generic_csv_with_string_ids_and_item_file(tmp_path):
    _write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu2,a,1\n")
    _write(tmp_path / "items.csv", "item_id,title\na,Alpha\nb,Beta\n")
    assert detect_format(tmp_path) == "generic"
    data = load_interactions(tmp_path)
    assert set(data.events["item"]) == {"a", "b"}
    assert data.items.set_index("item").loc["b", "title"] == "Beta"
    # A single file works too, and an explicit format wins over detection.
    assert len(load_interactions(tmp_path / "interactions.csv", fmt="generic").events) == 3


def test_bad_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such dataset"):
        load_interactions(tmp_path / "missing")
    with pytest.raises(DataError, match="unknown data format"):
        load_interactions(tmp_path)
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError):
        load_interactions(tmp_path)
    with pytest.raises(DataError, match="unknown format"):
        load_interactions("ml-latest-small", fmt="nope")


def test_vocab_round_trip(tmp_path):
    vocab = ItemVocab.from_items([30, 10, 20])
    assert vocab.size == 4 and vocab.token(30) == 1 and vocab.item(3) == 20
    vocab.save(tmp_path)
    again = ItemVocab.load(tmp_path)
    assert again.same_as(vocab) and again.coerce("10") == 10


def test_protocol_orders_by_time_with_stable_ties_and_leaves_one_out(tmp_path):
    # user 1: items 7,8 share a timestamp -> file order decides; item 9 repeated -> first kept.
    _write(tmp_path / "ratings.csv",
           "userId,movieId,rating,timestamp\n1,5,1,1\n1,8,1,3\n1,7,1,3\n1,9,1,2\n1,6,1,4\n1,9,1,9\n2,5,1,1\n2,6,1,2\n")
    data = prepare(tmp_path)
    seq = [data.vocab.item(t) for t in data.sequences[1]]
    assert seq == [5, 9, 8, 7, 6]
    valid, test = data.split("valid"), data.split("test")
    assert valid.users == [1] and test.users == [1]  # user 2 has only 2 items: training only
    assert data.vocab.item(valid.targets[0]) == 7 and data.vocab.item(test.targets[0]) == 6
    assert [data.vocab.item(t) for t in test.histories[0]] == [5, 9, 8, 7]
    assert [data.vocab.item(t) for t in data.train_sequences()[0]] == [5, 9, 8]


def test_left_pad_and_windows_predict_each_item_once():
    ids, mask = left_pad([np.array([1, 2, 3]), np.array([4])], 4)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]] and mask.sum() == 4
    seq = np.arange(1, 12)  # 11 items -> 10 predictions
    windows = training_windows([seq], max_len=4)
    targets = np.concatenate([w[1:] for w in windows])
    assert sorted(targets.tolist()) == list(range(2, 12))
    batch = next(window_batches(windows, 4, 8, None))
    assert (batch[2][batch[1] == 0] == -100).all()


def test_random_windows_still_predict_each_item_once_but_move_the_cuts():
    seq = np.arange(1, 40)
    rng = np.random.default_rng(0)
    cuts = set()
    for _ in range(5):
        windows = training_windows([seq], max_len=8, rng=rng)
        assert all(2 <= len(w) <= 9 for w in windows)
        assert sorted(np.concatenate([w[1:] for w in windows]).tolist()) == list(range(2, 40))
        cuts.add(tuple(int(w[0]) for w in windows))
    assert len(cuts) > 1


def test_prepare_with_a_model_vocab_drops_unknown_items(tiny_data):
    inter = tiny_data.interactions
    vocab = ItemVocab.from_items(tiny_data.vocab.items[:200])
    data = prepare(inter, vocab=vocab)
    assert data.vocab is vocab
    assert all(t < vocab.size for s in data.sequences.values() for t in s)


def test_length_grouped_batches_keep_every_window_and_pad_only_to_the_longest():
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, n) for n in rng.integers(3, 60, size=40)]
    windows = training_windows(seqs, max_len=8, rng=np.random.default_rng(1))
    plain = list(window_batches(windows, 8, 4, np.random.default_rng(2)))
    grouped = list(window_batches(windows, 8, 4, np.random.default_rng(2), group_by_length=True))
    assert len(grouped) == len(plain)
    targets = sorted(t for _, _, labels in grouped for t in labels[labels != -100].tolist())
    assert targets == sorted(t for _, _, labels in plain for t in labels[labels != -100].tolist())
    for ids, mask, labels in grouped:
        assert mask[:, 0].any()  # no all-padding column is kept
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == 0).all()
    # sorting inside groups gathers the short windows: less padding than random batches
    assert sum(m.size for _, m, _ in grouped) < 0.9 * sum(m.size for _, m, _ in plain)


def test_trimming_padding_columns_does_not_change_the_model_output(tiny_data):
    import torch

    from compressor.modeling import hidden_states
    from compressor.teacher import TeacherConfig, build_teacher

    model = build_teacher(TeacherConfig(hidden_size=16, num_layers=2, intermediate_size=32, max_len=12),
                          tiny_data.vocab).eval()
    hist = [np.array([5, 6, 7]), np.array([8, 9])]
    with torch.no_grad():
        outs = [hidden_states(model, *map(torch.from_numpy, left_pad(hist, width))).last_hidden_state[:, -3:]
                for width in (12, 3)]
    torch.testing.assert_close(outs[0][:, -2:], outs[1][:, -2:], rtol=1e-5, atol=1e-6)


# --- users' data as they have it: column mapping, ratings, repeats, minimum counts, Parquet ---------


def _shop(tmp_path, suffix=".csv"):
    """A shop log with its own column names, ratings, a repeat purchase and a rare item."""
    import pandas as pd

    rows = [("c1", "s1", 1, 5.0, "x"), ("c1", "s2", 2, 4.0, "x"), ("c1", "s1", 3, 5.0, "x"), ("c1", "s3", 4, 2.0, "x"),
            ("c2", "s1", 1, 4.0, "x"), ("c2", "s2", 2, 5.0, "x"), ("c2", "s3", 3, 5.0, "x"), ("c2", "s9", 4, 5.0, "x"),
            ("c3", "s2", 1, 3.0, "x"), ("c3", "s1", 2, 4.0, "x"), ("c1", "s4", 5, 4.0, "x"), ("c2", "s4", 5, 5.0, "x")]
    df = pd.DataFrame(rows, columns=["customer_id", "sku", "ts", "stars", "unused"])
    path = tmp_path / f"interactions{suffix}"
    df.to_parquet(path, index=False, row_group_size=3) if suffix == ".parquet" else df.to_csv(path, index=False)
    return tmp_path


COLS = {"user": "customer_id", "item": "sku", "timestamp": "ts", "rating": "stars"}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_explicit_column_mapping_reads_only_those_columns(tmp_path, suffix):
    data = load_interactions(_shop(tmp_path, suffix), columns=COLS)
    assert list(data.events.columns) == ["user", "item", "timestamp", "rating"]
    assert len(data.events) == 12 and set(data.events["user"]) == {"c1", "c2", "c3"}
    with pytest.raises(DataError, match="sku_id"):
        load_interactions(tmp_path, columns={**COLS, "item": "sku_id"})
    with pytest.raises(DataError, match="applies to the generic format"):
        load_interactions("ml-latest-small", columns=COLS)


def test_parquet_is_read_in_row_groups(tmp_path, monkeypatch):
    from compressor.data import loaders

    monkeypatch.setattr(loaders, "PARQUET_BATCH_ROWS", 2)  # 12 rows in 3-row groups, 2 rows per batch
    assert load_interactions(_shop(tmp_path, ".parquet"), columns=COLS).events["timestamp"].tolist() == \
        [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 5]


def test_filters_record_what_each_removed(tmp_path):
    from compressor.data.config import DataConfig

    cfg = DataConfig(name=str(_shop(tmp_path)), columns=COLS, min_rating=4, min_item_interactions=2, kcore=True,
                     min_user_interactions=2)
    data = cfg.load()
    rating, repeats, core = data.interactions.filters
    assert rating["filter"] == "rating >= 4" and rating["removed_interactions"] == 2  # 2 and 3 stars
    assert repeats["filter"].startswith("repeated") and repeats["removed_interactions"] == 1  # c1's second s1
    assert core["filter"] == "k-core: users >= 2, items >= 2 (2 rounds)"
    # c3 (1 item after the rating filter) goes, then s9 (1 buyer) and s3 (1 buyer after the rating filter)
    assert core["removed_users"] == 1 and core["removed_items"] == 2 and core["left_interactions"] == 6
    assert [[data.vocab.item(t) for t in data.sequences[u]] for u in ("c1", "c2")] == [["s1", "s2", "s4"]] * 2


def test_kcore_repeats_the_minimum_counts_until_stable():
    import pandas as pd

    from compressor.data.filters import _min_counts

    # users 1 {a, b}, 2 {a, c}, 3 {c}; at least 2 each: user 3 goes, then b and c (1 buyer each);
    # one pass stops there, with users 1 and 2 holding one item each; k-core goes on and empties it
    ev = pd.DataFrame({"user": [1, 1, 2, 2, 3], "item": ["a", "b", "a", "c", "c"], "timestamp": range(5)})
    once, _ = _min_counts(ev, 2, 2, kcore=False)
    core, rounds = _min_counts(ev, 2, 2, kcore=True)
    assert once["user"].tolist() == [1, 2] and once["item"].tolist() == ["a", "a"]
    assert core.empty and rounds == 3


def test_kept_repeats_stay_in_the_sequence_and_evaluation_ranks_seen_items(tmp_path):
    from compressor.data.config import DataConfig
    from compressor.evaluate import evaluate_scorer

    _write(tmp_path / "interactions.csv", "user,item,timestamp\nr1,a,1\nr1,b,2\nr1,a,3\nr1,c,4\nr1,a,5\n")
    data = DataConfig(name=str(tmp_path), keep_repeats=True).load()
    assert [data.vocab.item(t) for t in data.sequences["r1"]] == ["a", "b", "a", "c", "a"]
    assert data.interactions.filters == []
    test = data.split("test")
    assert not test.exclude_seen and data.vocab.item(test.targets[0]) == "a"  # the target is in the history

    def first_item_first(hists):  # ranks each history's first item (here a) first
        s = np.zeros((len(hists), data.vocab.size), dtype=np.float32)
        for i, h in enumerate(hists):
            s[i, h[0]] = 1.0
        return s

    assert evaluate_scorer(first_item_first, test).metrics["hr@5"] == 1.0
    plain = DataConfig(name=str(tmp_path)).load()  # repeats dropped: a, b, c; the seen-item rule holds
    assert [plain.vocab.item(t) for t in plain.sequences["r1"]] == ["a", "b", "c"] and plain.split("test").exclude_seen


def test_a_filter_that_leaves_nothing_says_so(tmp_path):
    from compressor.data.config import DataConfig

    with pytest.raises(DataError, match="removed every interaction"):
        DataConfig(name=str(_shop(tmp_path)), columns=COLS, min_rating=6).load()
    with pytest.raises(DataError, match="needs a rating column"):
        DataConfig(name=str(_shop(tmp_path)), columns={"user": "customer_id", "item": "sku", "timestamp": "ts"},
                   min_rating=4).load()


def test_default_filters_leave_the_bundled_data_as_it_was():
    from compressor.data.config import DataConfig

    data = DataConfig().load()
    plain = prepare("ml-latest-small")
    assert data.vocab.same_as(plain.vocab) and data.interactions.filters == []
    assert all(np.array_equal(data.sequences[u], plain.sequences[u]) for u in plain.sequences)


def test_eval_users_samples_the_same_users_for_validation_and_test_and_trains_on_all():
    from compressor.data.config import DataConfig

    full = DataConfig().load()
    sampled = DataConfig(eval_users=50).load()
    valid, test = sampled.split("valid"), sampled.split("test")
    assert len(valid) == len(test) == 50 and valid.users == test.users
    assert set(valid.users) < set(full.split("valid").users)
    assert sampled.split("test").users == test.users  # seeded: the same sample every call
    assert len(sampled.train_sequences()) == len(full.train_sequences())
    by_user = dict(zip(full.split("test").users, full.split("test").targets, strict=True))
    assert all(by_user[u] == t for u, t in zip(test.users, test.targets, strict=True))
