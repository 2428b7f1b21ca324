"""Faiss maximum-inner-product retrieval over the item embeddings, with exact re-scoring.

Only item rows are indexed (special tokens such as padding can never come back). A head bias is
folded in exactly: items become [e_i, b_i] and queries [q, 1]. Flat (exact) below
`hnsw_threshold` items, HNSW above it (approximate, no training); flat moves to the GPU when
Faiss has one. Retrieval over-fetches when items are excluded, so k results come back whenever
the catalogue has k items left, and the candidates are re-scored exactly with the embeddings.

What is trusted: the embeddings come from the verified artifact. A cached HNSW graph
(`RECSYS_INDEX_CACHE_DIR`, off by default) is read only from a directory this user owns and
nobody else can write, only under a name derived from the sha256 of the exact vectors and
build parameters, and only when the file still hashes to the checksum written into its name;
otherwise it is deleted and rebuilt. The checksum catches corruption and stale files, not an
attacker who can write as the service user (who could replace the code anyway).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from serving.settings import ServingSettings, load_settings

log = logging.getLogger("bentoml.recsys.retrieval")  # in a worker BentoML configures this tree


# `RECSYS_HNSW_STORAGE` below float: the Faiss scalar quantizer of the graph's vectors
HNSW_STORAGE = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}


@dataclass(frozen=True)
class IndexConfig:
    hnsw_threshold: int = 100_000  # flat is exact and ~ms up to ~1e5 items on one core
    hnsw_m: int = 32
    ef_construction: int = 40  # Faiss' default; measured recall@10 0.99 at 1e6 items with ef_search 128
    ef_search: int = 128
    storage: str = "float"  # float | fp16 | sq8: the graph's copy of the vectors (IndexHNSWSQ below float)
    faiss_threads: int = 1  # searches, one per serving worker: more threads contend on small machines
    gpu: str = "auto"  # auto | never
    cache_dir: str | None = None  # keep built HNSW graphs here (building 1e6 items takes minutes)

    @classmethod
    def from_settings(cls, s: ServingSettings) -> IndexConfig:
        return cls(hnsw_threshold=s.hnsw_threshold, hnsw_m=s.hnsw_m, ef_construction=s.hnsw_ef_construction,
                   ef_search=s.hnsw_ef_search, storage=s.hnsw_storage, faiss_threads=s.faiss_threads, gpu=s.faiss_gpu,
                   cache_dir=str(s.index_cache_dir) if s.index_cache_dir else None)

    @classmethod
    def from_env(cls) -> IndexConfig:
        """The RECSYS_* settings as they are now (serving/settings.py)."""
        return cls.from_settings(load_settings())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def private_dir(path: Path) -> str | None:
    """Why `path` is not a directory only this user can write (None when it is). A cached index is
    read with `faiss.read_index`, a C++ deserializer that is not hardened against crafted files,
    so the cache must be as private as the code: owned by us, not writable by group or others."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot stat it ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class ItemIndex:
    """Top-k items for query vectors; tokens >= `num_special` only."""

    def __init__(self, embeddings: np.ndarray, bias: np.ndarray | None = None, num_special: int = 1,
                 cfg: IndexConfig | None = None, cache_key: str | None = None):
        """`cache_key` names the embeddings (e.g. their sha256): with `cfg.cache_dir` set, an HNSW
        graph built once is read back instead of rebuilt."""
        self.cfg = cfg or IndexConfig()
        self.num_special = num_special
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        vectors = self.embeddings[num_special:]
        if self.bias is not None:
            vectors = np.hstack([vectors, self.bias[num_special:, None]])
        vectors = np.ascontiguousarray(vectors)
        self.num_items = len(vectors)
        if self.num_items == 0:
            raise ValueError("no items to index")
        dim = vectors.shape[1]
        if self.num_items >= self.cfg.hnsw_threshold:
            index = self._hnsw(vectors, cache_key)
            self.kind = "hnsw"
        else:
            index = faiss.IndexFlatIP(dim)
            index.add(vectors)
            self.kind = "flat"
        faiss.omp_set_num_threads(self.cfg.faiss_threads)  # after the build, which may use every core
        if self.kind == "flat" and self.cfg.gpu == "auto" and _gpu_count() > 0:
            index = faiss.index_cpu_to_all_gpus(index)  # HNSW has no GPU version
            self.kind = "flat-gpu"
        self.index = index
        self.exact = self.kind.startswith("flat")

    def _hnsw(self, vectors: np.ndarray, cache_key: str | None):
        c = self.cfg
        path = self._cache_path(vectors, cache_key)
        index = self._read_cached(path, vectors) if path is not None else None
        if index is not None:
            index.hnsw.efSearch = c.ef_search
            return index
        if c.storage == "float":
            index = faiss.IndexHNSWFlat(vectors.shape[1], c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:  # scalar-quantized vectors in the graph; search re-scores exactly with the float table
            index = faiss.IndexHNSWSQ(vectors.shape[1], HNSW_STORAGE[c.storage], c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        index.hnsw.efConstruction = c.ef_construction
        index.hnsw.efSearch = c.ef_search
        index.add(vectors)
        if path is not None:
            self._write_cached(index, path)
        return index

    def _cache_path(self, vectors: np.ndarray, cache_key: str | None) -> Path | None:
        """`<key>.<sha256 of the file>.faiss`, key = sha256 of the caller's key (the artifact's
        embedding checksums), the indexed vectors themselves and every build parameter, so a
        file is only ever read for the exact index it was built as; None = no usable cache."""
        c = self.cfg
        if not (c.cache_dir and cache_key):
            return None
        directory = Path(c.cache_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = private_dir(directory)
        if why is not None:
            log.warning("index cache %s not used: %s; building the index in memory", directory, why)
            return None
        h = hashlib.sha256(f"{cache_key}|{vectors.shape}|M{c.hnsw_m}|efc{c.ef_construction}|"
                           f"{c.storage}|faiss{faiss.__version__}|".encode())
        h.update(np.ascontiguousarray(vectors).data)
        return directory / f"{h.hexdigest()[:32]}.faiss"  # the file's checksum is added on write

    @staticmethod
    def _entries(path: Path) -> list[Path]:
        return sorted(path.parent.glob(f"{path.stem}.*.faiss"))

    def _read_cached(self, path: Path, vectors: np.ndarray):
        """A cached graph whose file still hashes to the checksum in its name and that holds
        these vectors' shape; anything else is removed and rebuilt."""
        for entry in self._entries(path):
            expected = entry.name[len(path.stem) + 1:-len(".faiss")]
            if len(expected) == 64 and _sha256(entry) == expected:
                index = faiss.read_index(str(entry))
                if (isinstance(index, faiss.IndexHNSW) and index.ntotal == len(vectors)
                        and index.d == vectors.shape[1] and index.metric_type == faiss.METRIC_INNER_PRODUCT):
                    return index
            log.warning("index cache entry %s does not verify; rebuilding", entry.name)
            entry.unlink(missing_ok=True)
        return None

    def _write_cached(self, index, path: Path) -> None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        faiss.write_index(index, str(tmp))
        final = path.with_name(f"{path.stem}.{_sha256(tmp)}.faiss")
        os.replace(tmp, final)  # workers starting together never read a half-written file

    def _query(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.bias is not None:
            q = np.hstack([q, np.ones((len(q), 1), dtype=np.float32)])
        return q

    def score(self, query: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Exact scores of `tokens` for one query vector (H,)."""
        s = self.embeddings[tokens] @ query
        return s + self.bias[tokens] if self.bias is not None else s

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[np.ndarray] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query (B, H): (tokens, scores) of its best k items not in `exclude[i]`, best
        first, exactly scored; fewer than k only when the catalogue has fewer items left."""
        exclude = exclude if exclude is not None else [np.empty(0, dtype=np.int64)] * len(queries)
        q = self._query(queries)
        excluded = [set(np.asarray(e, dtype=np.int64).tolist()) for e in exclude]
        # Exact search needs k + |excluded| (+ a few for float ties at the cut); HNSW gets 2x slack.
        fetch = [min(self.num_items, (k + len(e) + 8) * (1 if self.exact else 2)) for e in excluded]
        out: list = [None] * len(q)
        todo = list(range(len(q)))
        while todo:
            n = max(fetch[i] for i in todo)
            _, ids = self.index.search(q[todo], n)
            retry = []
            for row, i in zip(ids, todo, strict=True):
                tokens = row[row >= 0] + self.num_special
                tokens = tokens[[t not in excluded[i] for t in tokens.tolist()]] if excluded[i] else tokens
                if len(tokens) < k and n < self.num_items:  # approximate search came back short
                    fetch[i] = min(self.num_items, 2 * n)
                    retry.append(i)
                    continue
                scores = self.score(queries[i], tokens)
                order = np.lexsort((tokens, -scores))[:k]  # score desc, token asc on exact ties
                out[i] = (tokens[order], scores[order])
            todo = retry
        return out
