"""Batch scoring: every user's top-k through an exported artifact, written as Parquet.

One scoring function, two engines. `BatchScorer` holds an artifact's ONNX Runtime session and
item table and turns a batch of histories into rows; it reads the newest `max_len` items of each
history (as serving does), excludes every item the user has seen, and returns one row per
(user, rank):

    user     the user id, as the input spells it (int or str)
    rank     1..k (int32)
    item     the item id, as the artifact's vocabulary spells it
    score    the model's score (float32): the query vector's inner product with the item's
             embedding (+ the item's bias when the head has one)

The local engine (`recommend_all`, this module) runs it in this process, `batch_size` users per
call, streaming the rows into one Parquet file; the Ray engine (`compressor.recommend_ray`) runs
it in a pool of Ray Data actors and writes a directory of parts. Each batch holds a
(batch, catalogue) float32 score matrix.

Histories come from a dataset (`--data`, put through the protocol against the artifact's
vocabulary) or from a Parquet file or directory a user brings (`--histories`):

    user     int or str, one row per user
    items    list<int> or list<str>: the user's item ids, oldest first

Items outside the artifact's vocabulary are dropped (as `prepare` drops them); a user left with
no known item is skipped. Under torchrun each rank of the local engine scores its share of the
users (a contiguous block of a dataset's users; every N-th batch of a histories file) and writes
its own part, `recs-00001-of-00004.parquet` beside `out`; the parts hold every user exactly once.

`write_item_embeddings` writes the artifact's item table (item, vector[, bias]) as Parquet for an
external index.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from compressor import distributed as dist
from compressor.artifact import load_manifest, verify_artifact
from compressor.atomic import atomic_path
from compressor.data.protocol import RecData, left_pad
from compressor.data.vocab import ItemVocab
from compressor.errors import CompressorError, DataError
from compressor.speed import ort_session

COLUMNS = ("user", "rank", "item", "score")
HISTORY_COLUMNS = ("user", "items")
ENGINES = ("local", "ray")
PYARROW_EXTRA = "writing Parquet needs pyarrow (pip install 'recsys-compressor[parquet]')"


@dataclass
class ScoringResult:
    path: Path  # the file this process wrote
    users: int  # users in it
    rows: int
    rank: int
    world_size: int
    seconds: float = 0.0  # scoring and writing (reading the artifact and the data excluded)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(PYARROW_EXTRA) from e
    return pa, pq


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """`out` alone; under torchrun `<stem>-<rank>-of-<world size>.parquet` beside it."""
    if world_size == 1:
        return out
    return out.with_name(f"{out.stem}-{rank:05d}-of-{world_size:05d}{out.suffix}")


def top_k(scores: np.ndarray, histories: list[np.ndarray], k: int, num_special: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, scores) of each row's k best items, best first; special tokens and each row's
    history excluded. `scores` (B, V) is modified in place."""
    scores[:, :num_special] = -np.inf
    for i, h in enumerate(histories):
        scores[i, h] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    best = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(best, order, axis=1)


def check_options(out: str | Path, k: int, batch_size: int, engine: str = "local") -> Path:
    """The checks that need no data (the CLI runs them before reading any). The local engine
    writes one .parquet file; the Ray engine a directory of parts, new or holding only parts."""
    out = Path(out)
    if engine not in ENGINES:
        raise CompressorError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "local" and out.suffix != ".parquet":
        raise CompressorError(f"--out {out}: give a .parquet file name")
    if engine != "local" and out.exists():
        # the run replaces OUT as a whole: never a directory that holds anything but parts
        if not out.is_dir() or any(p.suffix != ".parquet" for p in out.iterdir()):
            raise CompressorError(f"--out {out}: exists and is not a directory of Parquet parts; "
                                  "give a new directory")
    if k < 1:
        raise CompressorError(f"--k {k}: give a positive number of items")
    if batch_size < 1:
        raise CompressorError(f"--batch-size {batch_size}: give a positive number")
    return out


def check_k(k: int, vocab: ItemVocab, data: RecData) -> None:
    """k must leave k unseen items for every user (the catalogue minus the longest history)."""
    longest = max(len(np.unique(s)) for s in data.sequences.values())
    room = vocab.num_items - longest
    if not 1 <= k <= room:
        raise CompressorError(f"--k {k}: give 1 to {room} (the catalogue has {vocab.num_items} items and a "
                              f"user has seen {longest} of them)")


def check_onnx(artifact_dir: str | Path, onnx_file: str | None) -> dict:
    """The artifact's manifest, its files checked against it; `onnx_file` must be one of its graphs."""
    manifest = verify_artifact(artifact_dir)
    if onnx_file is not None and onnx_file not in manifest.get("onnx_files", {}):
        raise CompressorError(f"{artifact_dir}: no graph {onnx_file!r} (it has {', '.join(manifest.get('onnx_files', {}))})")
    return manifest


def check_histories(path: str | Path, vocab: ItemVocab) -> Path:
    """A Parquet file or directory with the `user` and `items` (list) columns, its item ids of
    the vocabulary's kind (numbers or strings: the other kind would match no item)."""
    pa, pq = _pyarrow()
    path = Path(path)
    if not path.exists():
        raise DataError(f"--histories {path}: no such file or directory")
    try:
        schema = pq.ParquetDataset(path).schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"--histories {path}: not readable as Parquet ({' '.join(str(e).split())})") from e
    missing = [c for c in HISTORY_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"--histories {path}: no column {', '.join(missing)} (it has {', '.join(schema.names)}); "
                        "give user and items (a list of item ids, oldest first)")
    items = schema.field("items").type
    if not (pa.types.is_list(items) or pa.types.is_large_list(items)):
        raise DataError(f"--histories {path}: column items is {items}, not a list of item ids")
    numeric = pa.types.is_integer(items.value_type)
    if numeric != all(isinstance(i, int) for i in vocab.items[:100]):
        raise DataError(f"--histories {path}: item ids are {items.value_type}, the artifact's are "
                        f"{type(vocab.items[0]).__name__} (e.g. {vocab.items[0]!r})")
    return path


def histories_table(data: RecData):
    """A dataset's histories as a (user, items) Arrow table of item ids: what `--histories` holds."""
    pa, _ = _pyarrow()
    ids = np.asarray(data.vocab.items, dtype=object)
    users = list(data.sequences)
    offsets = np.concatenate([[0], np.cumsum([len(data.sequences[u]) for u in users])]).astype(np.int32)
    flat = np.concatenate([data.sequences[u] for u in users]) - data.vocab.num_special
    return pa.table({"user": pa.array(users),
                     "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[flat].tolist()))})


class BatchScorer:
    """The scoring function of both engines: one artifact's ONNX Runtime session and item table.

    `rows(users, token_histories)` is the core; `rows_from_ids(table)` takes a (user, items) table
    of item ids, as `--histories` and the Ray engine's blocks hold them. Torch-free, so a Ray actor
    that holds one starts quickly and small."""

    def __init__(self, artifact_dir: str | Path, k: int, onnx_file: str | None = None, threads: int | None = None):
        d = Path(artifact_dir)
        manifest = json.loads((d / "manifest.json").read_text())
        self.session = ort_session(d / (onnx_file or manifest["serve_model"]), threads)
        self.emb = np.load(d / "item_embeddings.npy")
        self.bias = np.load(d / "item_bias.npy") if manifest.get("has_bias") else None
        self.max_len = int(manifest["max_len"])
        self.vocab = ItemVocab.load(d)
        self.k = k
        self.item_ids = np.asarray(self.vocab.items, dtype=object)  # token num_special + i -> item id
        self._index = pd.Index(self.vocab.items)  # vectorised id -> position lookups

    def scores(self, hists: list[np.ndarray]) -> np.ndarray:
        """(B, V) float32 scores of every token, specials included."""
        ids, mask = left_pad(hists, self.max_len)
        hidden = self.session.run(["hidden"], {"input_ids": ids, "attention_mask": mask})[0]
        scores = hidden.astype(np.float32) @ self.emb.T
        return scores + self.bias if self.bias is not None else scores

    def rows(self, users: list, hists: list[np.ndarray]):
        """The top-k rows (an Arrow table with COLUMNS) of these users' token histories."""
        pa, _ = _pyarrow()
        vocab, k = self.vocab, self.k
        if not users:
            return self.empty()
        tokens, best = top_k(np.array(self.scores(hists), dtype=np.float32, copy=True), hists, k, vocab.num_special)
        if len(best) and np.isneginf(best[:, -1]).any():
            i = int(np.flatnonzero(np.isneginf(best[:, -1]))[0])
            raise DataError(f"--k {k}: user {users[i]} has seen {len(np.unique(hists[i]))} of the "
                            f"{vocab.num_items} items, fewer than {k} are left")
        return pa.table({
            "user": pa.array(np.repeat(np.asarray(users, dtype=object), k).tolist()),  # ids keep their type
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            "item": pa.array(self.item_ids[tokens.ravel() - vocab.num_special].tolist()),
            "score": best.ravel().astype(np.float32),
        })

    def empty(self, user_type=None):
        """A table of no rows with the columns' types (the user column's given or int64)."""
        pa, _ = _pyarrow()
        return pa.table({"user": pa.array([], user_type or pa.int64()), "rank": pa.array([], pa.int32()),
                         "item": pa.array(self.vocab.items[:1]).slice(0, 0), "score": pa.array([], pa.float32())})

    def tokens(self, items) -> list[np.ndarray]:
        """Token histories of an Arrow list column of item ids; unknown items dropped."""
        pa, _ = _pyarrow()
        items = items.combine_chunks() if isinstance(items, pa.ChunkedArray) else items
        flat = items.flatten().to_numpy(zero_copy_only=False)
        pos = self._index.get_indexer(flat) if len(flat) else np.zeros(0, dtype=np.int64)
        known = pos >= 0
        offsets = items.offsets.to_numpy() - items.offsets[0].as_py()
        kept = np.concatenate([[0], np.cumsum(known)])[offsets]  # known items before each row's start
        tokens = pos[known] + self.vocab.num_special
        return [tokens[a:b] for a, b in zip(kept[:-1], kept[1:], strict=True)]

    def rows_from_ids(self, table):
        """`rows` of a (user, items) table of item ids; users with no known item are skipped."""
        hists = self.tokens(table.column("items"))
        users = table.column("user").to_pylist()
        keep = [i for i, h in enumerate(hists) if len(h)]
        if not keep:
            return self.empty(table.schema.field("user").type)
        return self.rows([users[i] for i in keep], [hists[i] for i in keep])


def _batches(data: RecData | None, histories: Path | None, batch_size: int, scorer: BatchScorer) -> Iterator:
    """This rank's batches of rows, as `scorer` makes them (dataset users or a histories file)."""
    if histories is None:
        users = list(data.sequences)
        mine = users[dist.split(len(users))]  # a contiguous block per rank: every user exactly once
        for a in range(0, len(mine), batch_size):
            chunk = mine[a : a + batch_size]
            yield len(chunk), scorer.rows(chunk, [data.sequences[u] for u in chunk])
        return
    import pyarrow.dataset as ds

    for i, batch in enumerate(ds.dataset(histories, format="parquet").to_batches(
            columns=list(HISTORY_COLUMNS), batch_size=batch_size)):
        if i % dist.world_size() == dist.rank():  # every N-th batch per rank: every user exactly once
            yield batch.num_rows, scorer.rows_from_ids(batch)


def recommend_all(artifact_dir: str | Path, data: RecData | None, k: int, out: str | Path, batch_size: int = 256,
                  onnx_file: str | None = None, threads: int | None = None, progress: bool = True,
                  histories: str | Path | None = None) -> ScoringResult:
    """The local engine: score this rank's users (all of them in one process) and write their
    top-k to one Parquet file, batch by batch. Give `data` or `histories`."""
    out = check_options(out, k, batch_size)
    check_onnx(artifact_dir, onnx_file)
    if (data is None) == (histories is None):
        raise CompressorError("give either data or histories")
    if histories is not None:
        histories = check_histories(histories, ItemVocab.load(artifact_dir))
    if data is not None:
        check_k(k, data.vocab, data)
    _, pq = _pyarrow()
    scorer = BatchScorer(artifact_dir, k, onnx_file, threads)
    path = part_path(out, dist.rank(), dist.world_size())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    bar = dist.bar_options() if progress else {"disable": True}  # TQDM_DISABLE still works on rank 0
    users = rows = 0
    writer = None
    t0 = time.perf_counter()
    try:
        with tqdm(desc="recommend", unit="user", **bar) as pbar:
            for n, table in _batches(data, histories, batch_size, scorer):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))  # streamed: memory stays one batch
                users, rows = users + table.num_rows // k, rows + table.num_rows
                pbar.update(n)
        if writer is None:  # no user to score on this rank: an empty file with the columns
            pq.write_table(scorer.empty(), tmp)
        else:
            writer.close()
        tmp.replace(path)  # a reader never sees half a part
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ScoringResult(path, users, rows, dist.rank(), dist.world_size(), time.perf_counter() - t0)


def write_item_embeddings(artifact_dir: str | Path, path: str | Path) -> Path:
    """The artifact's catalogue as Parquet for an external index: item (the vocabulary's id),
    vector (float32 list, the embedding a query vector is multiplied with) and, when the head
    has one, bias (float32, added to the inner product). Specials (padding) are left out."""
    pa, pq = _pyarrow()
    path = Path(path)
    if path.suffix != ".parquet":
        raise CompressorError(f"--items-out {path}: give a .parquet file name")
    d = Path(artifact_dir)
    manifest = load_manifest(d)
    vocab = ItemVocab.load(d)
    emb = np.load(d / "item_embeddings.npy")[vocab.num_special:].astype(np.float32)
    cols = {"item": pa.array(vocab.items),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])}
    if manifest.get("has_bias"):
        cols["bias"] = pa.array(np.load(d / "item_bias.npy")[vocab.num_special:].astype(np.float32))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)
    return path
