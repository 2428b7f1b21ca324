"""The recommendation logic behind the HTTP service: artifact + ONNX encoder + Faiss index.

It never imports bentoml, so it can be used and tested on its own; bad requests raise
`BadRequest` (-> 400) or `NotFoundError` (-> 404), which `service.py` maps to HTTP errors.
Measurements (model and retrieval time, unknown items, truncated histories) go to an optional
`observer(name, value)` callback; `service.py` turns them into Prometheus metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.artifact import ServingArtifact, load_artifact
from serving.retrieval import IndexConfig, ItemIndex
from serving.runtime import OnnxEncoder
from serving.settings import ServingSettings, load_settings

Encode = Callable[[Sequence[Sequence[int]]], np.ndarray]  # token histories -> (B, H)
# observer(name, value) with name one of MEASUREMENTS: seconds for the times, counts otherwise.
Observer = Callable[[str, float], None]
MEASUREMENTS = ("model_seconds", "retrieval_seconds", "unknown_items", "truncated_histories")


class BadRequest(ValueError):
    """The request cannot be answered as given (HTTP 400)."""


class NotFoundError(LookupError):
    """The request names a user or item the served data does not have (HTTP 404)."""


@dataclass
class Query:
    tokens: list[int]  # what the model reads: the newest max_len known items
    seen: np.ndarray  # every known item of the full history (excluded from recommendations)
    truncated: bool
    warnings: list[str] = field(default_factory=list)


def clip(value, n: int = 30) -> str:
    """repr of a client's value, at most about `n` characters: errors and logs never echo more."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def _shorten(ids: list, n: int = 10) -> str:
    return ", ".join(map(clip, ids[:n])) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


class RecommenderEngine:
    def __init__(self, artifact: ServingArtifact, encoder: OnnxEncoder, index: ItemIndex,
                 observer: Observer | None = None):
        self.artifact, self.encoder, self.index = artifact, encoder, index
        self.observer = observer  # set after construction too (the service does, after warm-up)
        m = artifact.manifest
        self.model_info = {
            "kind": m["kind"], "architecture": m["architecture"], "num_layers": m["num_layers"],
            "teacher_layers": m.get("teacher_layers"), "parameters": m.get("parameters", 0),
            "max_len": m["max_len"], "num_items": len(artifact.items), "onnx_file": artifact.onnx_path.name,
            "index": index.kind, "data": m.get("data", {}).get("name", ""),
            "data_fingerprint": m.get("data", {}).get("fingerprint", ""), "created_at": m.get("created_at", ""),
        }

    @classmethod
    def from_settings(cls, s: ServingSettings) -> RecommenderEngine:
        """Artifact (verified unless RECSYS_VERIFY_ARTIFACT=0), ONNX graph (checked against the
        export contract and the artifact's width) and Faiss index; ArtifactError when unusable."""
        artifact = load_artifact(s.artifact_dir, s.model_file, verify=s.verify_artifact)
        encoder = OnnxEncoder.from_settings(s, artifact.onnx_path, artifact.max_len,
                                            int(artifact.manifest["hidden_size"]))
        files = artifact.manifest["files"]
        key = "".join(files[f]["sha256"][:12] for f in ("item_embeddings.npy", "item_bias.npy") if f in files)
        index = ItemIndex(artifact.embeddings, artifact.bias, artifact.num_special,
                          IndexConfig.from_settings(s), key)
        return cls(artifact, encoder, index)

    @classmethod
    def from_env(cls) -> RecommenderEngine:
        """`from_settings` with the RECSYS_* environment as it is now (serving/settings.py)."""
        return cls.from_settings(load_settings())

    # -- measurements ---------------------------------------------------------------------------

    def _observe(self, name: str, value: float) -> None:
        if self.observer is not None:
            self.observer(name, value)

    def _encode(self, encode: Encode | None, rows: list[list[int]]) -> np.ndarray:
        """The model call. A local ONNX Runtime call is timed as `model_seconds`; a replacement
        `encode` (the service's batched /embed) is not: /embed times the batch's own ONNX call,
        so the queueing in the dispatcher is never counted as model time, nor a call twice."""
        if encode is not None:
            return encode(rows)
        start = time.perf_counter()
        out = self.encoder.encode(rows)
        self._observe("model_seconds", time.perf_counter() - start)
        return out

    # -- requests -------------------------------------------------------------------------------

    def resolve(self, user_id=None, history: list | None = None) -> Query:
        """The model input and the seen set for a known user or an explicit history."""
        if (user_id is None) == (history is None):
            raise BadRequest("give exactly one of user_id or history")
        warnings = []
        if user_id is not None:
            history = self.artifact.user_history(user_id)
            if history is None:
                raise NotFoundError(f"unknown user_id {clip(user_id)}: not a user of the served data "
                                    f"({self.model_info['data']}); send a history instead")
        if not history:
            raise BadRequest("history is empty: give at least one item id")
        tokens, unknown = [], []
        for item in history:
            tok = self.artifact.token(item)
            (unknown.append(item) if tok is None else tokens.append(tok))
        if unknown:
            self._observe("unknown_items", len(unknown))
            if not tokens:
                raise BadRequest(f"none of the history's items is in the catalogue: {_shorten(unknown)}")
            warnings.append(f"ignored {len(unknown)} item id(s) not in the catalogue: {_shorten(unknown)}")
        max_len = self.artifact.max_len
        truncated = len(tokens) > max_len
        if truncated:
            self._observe("truncated_histories", 1)
            warnings.append(f"history has {len(tokens)} known items; the model reads the newest {max_len}")
        return Query(tokens[-max_len:], np.unique(np.asarray(tokens, dtype=np.int64)), truncated, warnings)

    def _items(self, tokens: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [{**self.artifact.item_info(t), "score": float(s)} for t, s in zip(tokens, scores, strict=True)]

    def _response(self, q: Query, tokens, scores) -> dict:
        return {"items": self._items(tokens, scores), "model": self.model_info,
                "truncated_history": q.truncated, "warnings": q.warnings}

    def recommend(self, user_id=None, history=None, k: int = 10, exclude_seen: bool = True,
                  encode: Encode | None = None) -> dict:
        """Top-k items; `encode` replaces the local ONNX call (the service's batched path)."""
        if k < 1:
            raise BadRequest(f"k must be >= 1, got {k}")
        q = self.resolve(user_id, history)
        vector = self._encode(encode, [q.tokens])[0]
        exclude = [q.seen] if exclude_seen else None
        start = time.perf_counter()
        tokens, scores = self.index.search(vector[None], k, exclude)[0]
        self._observe("retrieval_seconds", time.perf_counter() - start)
        if len(tokens) < k:
            q.warnings.append(f"only {len(tokens)} items left to recommend")
        return self._response(q, tokens, scores)

    def rank(self, user_id=None, history=None, candidates: list | None = None,
             encode: Encode | None = None) -> dict:
        """The candidates in descending exact score (seen items are ranked too: they were asked for)."""
        if not candidates:
            raise BadRequest("candidates is empty: give at least one item id")
        tokens, unknown, kept = [], [], set()
        for item in candidates:
            tok = self.artifact.token(item)
            if tok is None:
                unknown.append(item)
            elif tok not in kept:
                kept.add(tok)
                tokens.append(tok)
        dups = len(candidates) - len(unknown) - len(tokens)
        if unknown:
            self._observe("unknown_items", len(unknown))
            raise BadRequest(f"{len(unknown)} candidate item id(s) not in the catalogue: {_shorten(unknown)}")
        q = self.resolve(user_id, history)
        if dups:
            q.warnings.append(f"{dups} duplicate candidate(s) ranked once")
        vector = self._encode(encode, [q.tokens])[0]
        toks = np.asarray(tokens, dtype=np.int64)
        start = time.perf_counter()
        scores = self.index.score(vector, toks)
        self._observe("retrieval_seconds", time.perf_counter() - start)
        order = np.lexsort((toks, -scores))
        return self._response(q, toks[order], scores[order])

    def item(self, item_id) -> dict:
        tok = self.artifact.token(item_id)
        if tok is None:
            raise NotFoundError(f"unknown item_id {clip(item_id)}: not in the served catalogue")
        return dict(self.artifact.item_info(tok))

    def encode_items(self, histories: Sequence[Sequence]) -> np.ndarray:
        """Query vectors for histories of item ids. Unknown ids are dropped and a history with no
        known item gets the zero vector: rows of different clients share a batch, so one client's
        bad row must not fail the others."""
        rows = [[t for t in (self.artifact.token(i) for i in h) if t is not None] for h in histories]
        dropped = sum(len(h) for h in histories) - sum(map(len, rows))
        if dropped:
            self._observe("unknown_items", dropped)
        out = np.zeros((len(rows), self.artifact.embeddings.shape[1]), dtype=np.float32)
        known = [i for i, r in enumerate(rows) if r]
        if known:
            out[known] = self._encode(None, [rows[i] for i in known])
        return out
