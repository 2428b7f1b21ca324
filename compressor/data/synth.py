"""Synthetic interaction data at any scale: `compressor synth` writes a generic dataset folder.

What a model can learn from it (so a sequence model beats MostPop, as on real data):
- power-law item popularity: item k (0-based popularity rank) has weight (k + 1)^-a;
- latent user tastes: items fall into `clusters` (item k is in cluster k mod C, so every cluster
  has popular and rare items); each user has two favourite clusters and draws from them, by the
  items' popularity inside the cluster;
- item-to-item transitions: each item has `successors` fixed follow-up items (a random map), and
  with probability `p_transition` the next item is one of the previous item's successors.
  Only an order-aware model sees this signal fully.
Remaining draws come from global popularity.

Memory: O(items) for the popularity tables and the successor map, plus one chunk of users'
sequences; no users x items or items x items matrix. Users are generated in fixed chunks, each
written as one Parquet row group, with a random stream per chunk, so the output depends on the
seed and the sizes only.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import DataError

CHUNK_USERS = 50_000  # fixed: the random streams are per chunk, so changing it changes the data
MIN_LENGTH = 3  # leave-one-out needs 3 items for a user to be evaluated
START = 1_500_000_000  # first timestamp (2017-07-14, Unix seconds)


class SynthConfig(BaseModel):
    """The sizes and the structure of a synthetic dataset."""

    model_config = ConfigDict(extra="forbid")
    users: int = Field(1000, ge=1, description="number of users")
    items: int = Field(1000, ge=2, description="catalogue size")
    interactions: int = Field(20_000, ge=3, description="rows written (repeats of a (user, item) pair included)")
    seed: int = Field(0, description="random seed; the same seed and sizes give the same files")
    popularity_exponent: float = Field(1.0, gt=0, description="item k's popularity weight is (k + 1)^-a")
    clusters: int | None = Field(None, ge=1, description="taste clusters; None = round(sqrt(items)), at most 1000")
    successors: int = Field(3, ge=1, description="fixed follow-up items per item (the transition map)")
    p_transition: float = Field(0.5, ge=0, le=1, description="chance the next item follows the previous one")
    p_taste: float = Field(0.35, ge=0, le=1, description="chance it comes from the user's favourite clusters")
    length_sigma: float = Field(1.0, ge=0, description="spread (log-normal sigma) of the users' history lengths")

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.p_transition + self.p_taste > 1:
            raise ValueError(f"p_transition + p_taste = {self.p_transition + self.p_taste:g} exceeds 1")
        if self.interactions < MIN_LENGTH * self.users:
            raise ValueError(f"{self.interactions} interactions for {self.users} users: give at least "
                             f"{MIN_LENGTH} per user ({MIN_LENGTH * self.users}), as leave-one-out needs")
        return self

    @property
    def num_clusters(self) -> int:
        return self.clusters or max(1, min(1000, round(math.sqrt(self.items))))


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


class _Tables:
    """What every chunk samples from: O(items) memory."""

    def __init__(self, cfg: SynthConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 0])
        a, n, c = cfg.popularity_exponent, cfg.items, cfg.num_clusters
        self.n, self.c = n, c
        self.global_cdf = _cdf(np.arange(1, n + 1, dtype=np.float64) ** -a)
        # inside cluster q the j-th item is q + j*C, with popularity rank about j*C: (j + 1)^-a
        self.per_cluster = math.ceil(n / c)
        self.cluster_cdf = _cdf(np.arange(1, self.per_cluster + 1, dtype=np.float64) ** -a)
        # clusters are chosen by users in proportion to their total popularity, so tastes follow it too
        cluster_mass = np.bincount(np.arange(n) % c, weights=np.arange(1, n + 1, dtype=np.float64) ** -a, minlength=c)
        self.taste_cdf = _cdf(cluster_mass)
        self.successor = rng.permutation(n * cfg.successors) % n  # item k's s-th successor: [k * S + s]
        self.successors = cfg.successors

    def popular(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.searchsorted(self.global_cdf, rng.random(size), side="right")

    def in_cluster(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        j = np.searchsorted(self.cluster_cdf, rng.random(len(cluster)), side="right")
        item = cluster + j * self.c
        # the last row of a cluster grid may run past the catalogue: fold back into range
        return np.where(item < self.n, item, cluster)


def _lengths(cfg: SynthConfig) -> np.ndarray:
    """History length per user: log-normal shares of what is left after MIN_LENGTH each, summing
    exactly to `interactions`."""
    rng = np.random.default_rng([cfg.seed, 1])
    share = rng.lognormal(0.0, cfg.length_sigma, cfg.users)
    extra = rng.multinomial(cfg.interactions - MIN_LENGTH * cfg.users, share / share.sum())
    return extra + MIN_LENGTH


def _chunk(cfg: SynthConfig, tables: _Tables, lengths: np.ndarray, first_user: int, index: int) -> pd.DataFrame:
    """The interactions of users first_user .. first_user + len(lengths) - 1, user by user in time order."""
    rng = np.random.default_rng([cfg.seed, 2, index])
    nu = len(lengths)
    tastes = np.searchsorted(tables.taste_cdf, rng.random((nu, 2)), side="right")
    order = np.argsort(-lengths, kind="stable")  # active users at step t are a prefix of `order`
    sorted_len = lengths[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    prev = np.zeros(nu, dtype=np.int64)
    for t in range(int(sorted_len[0]) if nu else 0):
        m = int(np.searchsorted(-sorted_len, -t, side="left"))  # users with length > t
        users = order[:m]
        u = rng.random(m)
        item = tables.popular(rng, m)
        taste = (u >= cfg.p_transition) & (u < cfg.p_transition + cfg.p_taste) if t else u < cfg.p_taste
        if taste.any():
            pick = tastes[users[taste], (rng.random(int(taste.sum())) < 0.3).astype(np.int64)]
            item[taste] = tables.in_cluster(rng, pick)
        if t:
            trans = u < cfg.p_transition
            if trans.any():
                s = rng.integers(0, tables.successors, int(trans.sum()))
                item[trans] = tables.successor[prev[users[trans]] * tables.successors + s]
        prev[users] = item
        flat[offsets[users] + t] = item
    user = np.repeat(np.arange(first_user, first_user + nu, dtype=np.int64), lengths)
    # each user starts somewhere in the first 30 days, then one event every ~hour (strictly increasing)
    start = START + rng.integers(0, 30 * 86_400, nu)
    gaps = rng.integers(60, 7_200, len(flat))
    cum = np.cumsum(gaps)
    timestamp = np.repeat(start - (cum[offsets] - gaps[offsets]), lengths) + cum  # start + within-user cumsum
    return pd.DataFrame({"user": user, "item": flat, "timestamp": timestamp})


def item_table(cfg: SynthConfig) -> pd.DataFrame:
    k = np.arange(cfg.items)
    cluster = k % cfg.num_clusters
    return pd.DataFrame({"item": k, "title": [f"Item {i} (group {g})" for i, g in zip(k, cluster, strict=True)],
                         "genres": [f"group{g}" for g in cluster]})


def synthesize(cfg: SynthConfig, out: str | Path, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write `interactions.parquet` (user, item, timestamp) and `items.parquet` (item, title, genres)
    into `out`, a folder the generic loader reads. The folder appears whole or not at all (written
    beside it, then renamed). Returns a summary (rows, users, items, seconds are the caller's)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("writing Parquet needs pyarrow (pip install '.[parquet]')") from e
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty; give a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tables = _Tables(cfg)
        lengths = _lengths(cfg)
        schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("timestamp", pa.int64())])
        rows, seen_items = 0, np.zeros(cfg.items, dtype=bool)
        with pq.ParquetWriter(tmp / "interactions.parquet", schema) as writer:
            for index, a in enumerate(range(0, cfg.users, CHUNK_USERS)):
                df = _chunk(cfg, tables, lengths[a : a + CHUNK_USERS], a, index)
                writer.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))
                rows += len(df)
                seen_items[df["item"].to_numpy()] = True
                if progress:
                    progress(min(cfg.users, a + CHUNK_USERS), cfg.users)
        item_table(cfg).to_parquet(tmp / "items.parquet", index=False)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"users": cfg.users, "items": cfg.items, "interactions": rows, "items_used": int(seen_items.sum()),
            "clusters": cfg.num_clusters, "seed": cfg.seed, "path": str(out)}
