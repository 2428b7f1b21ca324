"""The synthetic data generator: shape, determinism, structure, the loaders reading it, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from compressor.cli import main
from compressor.data import load_interactions, prepare
from compressor.data.synth import CHUNK_USERS, SynthConfig, _Tables, synthesize


def _make(tmp_path, name="d", **kw):
    cfg = SynthConfig(**{"users": 300, "items": 400, "interactions": 6000, **kw})
    summary = synthesize(cfg, tmp_path / name)
    return cfg, summary, pd.read_parquet(tmp_path / name / "interactions.parquet")


def test_sizes_columns_and_time_order(tmp_path):
    cfg, summary, ev = _make(tmp_path)
    assert list(ev.columns) == ["user", "item", "timestamp"]
    assert len(ev) == summary["interactions"] == 6000
    assert ev["user"].nunique() == 300 and ev["user"].value_counts().min() >= 3
    assert ev["item"].between(0, cfg.items - 1).all()
    # rows come user by user, each user's timestamps strictly increasing
    assert (np.diff(ev["user"].to_numpy()) >= 0).all()
    same_user = ev["user"].to_numpy()[1:] == ev["user"].to_numpy()[:-1]
    assert (np.diff(ev["timestamp"].to_numpy())[same_user] > 0).all()
    items = pd.read_parquet(tmp_path / "d" / "items.parquet")
    assert len(items) == cfg.items and items["title"].str.len().min() > 0


def test_same_seed_same_files_other_seed_other_data(tmp_path):
    _, _, a = _make(tmp_path, "a", seed=3)
    _, _, b = _make(tmp_path, "b", seed=3)
    _, _, c = _make(tmp_path, "c", seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["item"].equals(c["item"])


def test_popularity_is_heavy_tailed_and_transitions_repeat(tmp_path):
    cfg, _, ev = _make(tmp_path, users=500, items=1000, interactions=20_000)
    counts = np.sort(ev["item"].value_counts().to_numpy())[::-1]
    # power law: the top 1% of items hold far more than 1% of the interactions
    assert counts[: cfg.items // 100].sum() > 0.1 * len(ev)
    # sequential structure: the share of consecutive pairs (a, b) with b among a's successors
    # follows p_transition (plus chance), and is near zero without transitions
    def follow_share(cfg, ev):
        t = _Tables(cfg)
        same = ev["user"].to_numpy()[1:] == ev["user"].to_numpy()[:-1]
        a, b = ev["item"].to_numpy()[:-1][same], ev["item"].to_numpy()[1:][same]
        succ = t.successor.reshape(cfg.items, cfg.successors)[a]
        return (succ == b[:, None]).any(axis=1).mean()

    assert 0.45 < follow_share(cfg, ev) < 0.6
    off = SynthConfig(users=500, items=1000, interactions=20_000, p_transition=0.0)
    ev0 = pd.read_parquet(synthesize(off, tmp_path / "flat")["path"] + "/interactions.parquet")
    assert follow_share(off, ev0) < 0.05


def test_more_users_than_one_chunk_stay_consistent(tmp_path):
    users = CHUNK_USERS + 10
    cfg = SynthConfig(users=users, items=50, interactions=3 * users + 100)
    ev = pd.read_parquet(synthesize(cfg, tmp_path / "big")["path"] + "/interactions.parquet")
    assert len(ev) == cfg.interactions and ev["user"].nunique() == users


def test_the_loaders_read_it_like_any_folder(tmp_path):
    _make(tmp_path)
    data = load_interactions(tmp_path / "d")
    assert len(data.events) == 6000 and len(data.items) == 400
    rec = prepare(data)
    assert len(rec.split("test")) == 300


def test_bad_sizes_are_refused():
    with pytest.raises(ValidationError, match="at least 3 per user"):
        SynthConfig(users=10, items=10, interactions=20)
    with pytest.raises(ValidationError, match="exceeds 1"):
        SynthConfig(p_transition=0.8, p_taste=0.3)


def test_cli_writes_the_folder_and_refuses_a_full_one(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--users", "20", "--items", "30", "--interactions", "200", "--seed", "1",
                 "--out", str(out), "p_taste=0.2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["interactions.parquet", "items.parquet"]
    assert main(["synth", "--users", "20", "--items", "30", "--interactions", "200", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", "--users", "20", "--items", "30", "--interactions", "10", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
