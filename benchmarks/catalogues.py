"""Catalogues and queries for the retrieval benchmark: synthetic with realistic structure, or real.

Synthetic catalogues are not iid Gaussian (that makes approximate search look too good):
item directions come from Zipf-sized clusters ("genres") in an anisotropic space with a
power-law spectrum, and item norms are log-normal and tied to a Zipf popularity (popular
items score higher under inner product, as with a trained tied output head). Queries
imitate users: the noisy mean of a history of 5-30 items drawn by popularity from 1-3
genres (for real embeddings, from the cosine neighbourhoods of 1-3 anchor items), so they
are never vectors of the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from compressor.errors import CompressorError


@dataclass
class Catalogue:
    name: str
    items: np.ndarray    # (N, d) float32
    queries: np.ndarray  # (Q, d) float32
    source: str          # "synthetic" | "real"


def synthetic_catalogue(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items (n,d), genre label (n,), popularity weight (n,)); see the module docstring."""
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = (np.arange(1, dim + 1) ** -0.7).astype(np.float32)  # a few dominant directions
    n_genres = int(np.clip(round(math.sqrt(n) / 2), 8, 1024))
    genre_share = 1.0 / np.arange(1, n_genres + 1) ** 0.8  # a few big genres, a long tail
    labels = rng.choice(n_genres, size=n, p=genre_share / genre_share.sum())
    centres = (rng.standard_normal((n_genres, dim)) * spectrum) @ basis.T
    within = (rng.standard_normal((n, dim)).astype(np.float32) * spectrum) @ basis.T
    dirs = centres[labels] + 0.6 * within
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rank = rng.permutation(n) + 1
    popularity = 1.0 / rank  # Zipf
    log_pop = np.log(popularity)
    z = (log_pop - log_pop.mean()) / log_pop.std() + 0.5 * rng.standard_normal(n)
    norms = np.exp(0.3 * z / np.sqrt(1.25))  # log-normal, ~0.55x..1.8x, larger for popular items
    return (dirs * norms[:, None]).astype(np.float32), labels, popularity


def _user_query(history: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = history.mean(axis=0)
    noise = rng.standard_normal(mean.shape[0]) * (0.25 * np.linalg.norm(mean) / math.sqrt(mean.shape[0]))
    return (mean + noise).astype(np.float32)


def genre_queries(items: np.ndarray, labels: np.ndarray, popularity: np.ndarray, n_queries: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Users with 1-3 favourite genres (chosen by genre mass), 5-30 items drawn by popularity."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
    mass = np.bincount(labels, weights=popularity)
    out = np.empty((n_queries, items.shape[1]), np.float32)
    for q in range(n_queries):
        genres = rng.choice(len(mass), size=rng.integers(1, 4), p=mass / mass.sum())
        members = np.concatenate([order[bounds[g]:bounds[g + 1]] for g in genres])
        w = popularity[members]
        picks = rng.choice(members, size=int(rng.integers(5, 31)), p=w / w.sum())
        out[q] = _user_query(items[picks], rng)
    return out


def neighbourhood_queries(items: np.ndarray, n_queries: int, rng: np.random.Generator) -> np.ndarray:
    """For real embeddings: histories from the cosine top-50 neighbourhoods of 1-3 anchor items."""
    unit = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
    anchors = rng.integers(0, len(items), size=(n_queries, 3))
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(unit)
    _, hood = index.search(np.ascontiguousarray(unit[anchors.ravel()]), min(50, len(items)))
    hood = hood.reshape(n_queries, 3, -1)
    out = np.empty((n_queries, items.shape[1]), np.float32)
    for q in range(n_queries):
        pool = hood[q, : rng.integers(1, 4)].ravel()
        out[q] = _user_query(items[rng.choice(pool, size=int(rng.integers(5, 31)))], rng)
    return out


def load_real(path: Path, queries_path: Path | None, n_queries: int, rng: np.random.Generator) -> Catalogue:
    """The exported catalogue: float (V,H) with row 0 the padding token, which is skipped."""
    if not path.exists():
        raise CompressorError(f"{path}: no such embeddings file")
    emb = np.load(path)
    if emb.ndim != 2 or emb.shape[0] < 3 or not np.issubdtype(emb.dtype, np.floating):
        raise CompressorError(f"{path}: expected a float (V,H) matrix with V >= 3, got {emb.dtype} {emb.shape}")
    items = np.ascontiguousarray(emb[1:], dtype=np.float32)
    if not np.isfinite(items).all():
        raise CompressorError(f"{path}: embeddings contain NaN or inf")
    if queries_path is not None:
        queries = np.load(queries_path)
        if queries.ndim != 2 or queries.shape[1] != items.shape[1]:
            raise CompressorError(f"{queries_path}: expected (Q,{items.shape[1]}) queries, got {queries.shape}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
    else:
        queries = neighbourhood_queries(items, n_queries, rng)
    return Catalogue(f"real ({len(items):,} items)", items, queries, "real")
