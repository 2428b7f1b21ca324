"""Batch scoring: every user's top-k through an exported artifact, written as Parquet.

`recommend_all(artifact_dir, data, k, out)` scores each user's whole history (the newest
`max_len` items are what the model reads, as serving does), excludes every item the user has
seen, and writes one row per (user, rank):

    user     the dataset's user id
    rank     1..k
    item     the dataset's item id
    score    the model's score (inner product of the query vector and the item's embedding)

The model runs in ONNX Runtime on the artifact's graph (`compressor.evaluate.artifact_scorer`,
the same reader the evaluation stage uses), `batch_size` users at a time: each batch holds a
(batch, catalogue) float32 score matrix. Under torchrun each rank scores a contiguous block of
the users and writes its own part, `recs-00001-of-00004.parquet` beside `out`, so millions of
users can be scored on several machines; the parts together hold every user exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from compressor import distributed as dist
from compressor.data.protocol import RecData
from compressor.data.vocab import ItemVocab
from compressor.errors import CompressorError, DataError

COLUMNS = ("user", "rank", "item", "score")


@dataclass
class ScoringResult:
    path: Path  # the file this process wrote
    users: int  # users in it
    rows: int
    rank: int
    world_size: int


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


def check_options(out: str | Path, k: int, batch_size: int) -> Path:
    """The checks that need no data (the CLI runs them before reading any)."""
    out = Path(out)
    if out.suffix != ".parquet":
        raise CompressorError(f"--out {out}: give a .parquet file name")
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


def recommend_all(artifact_dir: str | Path, data: RecData, k: int, out: str | Path, batch_size: int = 256,
                  onnx_file: str | None = None, threads: int | None = None, progress: bool = True) -> ScoringResult:
    """Score this rank's users (all of them in one process) and write their top-k to Parquet."""
    from compressor.artifact import verify_artifact
    from compressor.evaluate import artifact_scorer

    out = check_options(out, k, batch_size)
    manifest = verify_artifact(artifact_dir)
    if onnx_file is not None and onnx_file not in manifest.get("onnx_files", {}):
        raise CompressorError(f"{artifact_dir}: no graph {onnx_file!r} (it has {', '.join(manifest.get('onnx_files', {}))})")
    vocab = data.vocab
    check_k(k, vocab, data)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("writing Parquet needs pyarrow (pip install '.[parquet]')") from e
    scorer, _ = artifact_scorer(artifact_dir, onnx_file, threads)
    users = list(data.sequences)
    mine = users[dist.split(len(users))]  # a contiguous block per rank: every user exactly once
    path = part_path(out, dist.rank(), dist.world_size())
    item_ids = np.asarray(vocab.items, dtype=object)  # token num_special + i -> item id
    cols: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    bar = dist.bar_options() if progress else {"disable": True}  # TQDM_DISABLE still works on rank 0
    for a in tqdm(range(0, len(mine), batch_size), desc="recommend", unit="batch", **bar):
        chunk = mine[a : a + batch_size]
        hists = [data.sequences[u] for u in chunk]
        tokens, scores = top_k(np.array(scorer(hists), dtype=np.float32, copy=True), hists, k, vocab.num_special)
        cols["user"].append(np.repeat(np.asarray(chunk, dtype=object), k))
        cols["rank"].append(np.tile(np.arange(1, k + 1, dtype=np.int32), len(chunk)))
        cols["item"].append(item_ids[tokens.ravel() - vocab.num_special])
        cols["score"].append(scores.ravel())
    dtypes = {"user": object, "rank": np.int32, "item": object, "score": np.float32}
    arrays = {c: np.concatenate(v) if v else np.array([], dtype=dtypes[c]) for c, v in cols.items()}
    # ids keep their Python type (int or str) in Parquet; numbers stay typed arrays
    table = pa.table({c: pa.array(v.tolist()) if v.dtype == object else v for c, v in arrays.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)  # a reader never sees half a part
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ScoringResult(path, len(mine), table.num_rows, dist.rank(), dist.world_size())
