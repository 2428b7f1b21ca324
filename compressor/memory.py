"""Peak memory of each stage, estimated from the data's shape before anything trains.

The terms that grow with the catalogue dominate at scale, and they are simple to count:
- a full softmax over the catalogue at every position: logits (batch x positions x items, float32)
  plus the log-softmax and the gradient of the same size (3 copies); distillation holds the
  teacher's and the student's logits and their softmaxes and the gradient (5 copies). The sampled
  teacher loss and candidate distillation (`distill.output=candidates`) count their sample instead
  of the catalogue: batch x positions x (1 + negatives), resp. (1 + top-k + negatives);
- the item table with its gradient and two Adam moments (4 copies of items x hidden);
- the evaluate stage: one chunk of 256 users' scores over the catalogue (3 copies: scores, the
  masked copy, the partition) and EASE's dense items x items matrices when EASE runs;
- the data: the events table and the per-user token arrays (~64 bytes per interaction, pandas);
  the per-interaction constant was measured on ml-latest-small.
Model weights other than the item table, activations of the small decoder and the Python heap are
left out, so the estimate is a floor, not a bound; `check_budget` compares it with the budget and
names the stage that does not fit. The functions read a `RunConfig`'s sections by attribute and
never import the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.baselines import ease_bytes
from compressor.data.vocab import SPECIAL_TOKENS
from compressor.errors import CompressorError
from compressor.sampled_softmax import TOPK_CHUNK_FLOATS

F32 = 4
EVAL_BATCH = 256  # compressor.evaluate.evaluate_scorer's default chunk of users
BYTES_PER_INTERACTION = 64  # events DataFrame + sequences (ml-latest-small: ~6 MB for 100k ratings)
GIB = 2**30
# what the refusal suggests for a stage whose full softmax does not fit (the job never switches by itself)
SUGGEST = {"teacher": ", use teacher.train.loss=sampled", "distill": ", use distill.output=candidates"}


@dataclass(frozen=True)
class StageMemory:
    stage: str
    bytes: int
    what: str  # the dominating term, in words


def _softmax(batch: int, positions: int, vocab: int, copies: int) -> int:
    return copies * batch * positions * vocab * F32


def estimate_stages(cfg: Any, users: int, items: int, interactions: int) -> list[StageMemory]:
    """Each stage's dominating memory for `cfg` (a RunConfig) on data of this shape."""
    vocab = items + len(SPECIAL_TOKENS)
    t, L = cfg.teacher, cfg.teacher.max_len
    data = interactions * BYTES_PER_INTERACTION
    table = 4 * vocab * t.hidden_size * F32
    sampled = getattr(t.train, "loss", "full") == "sampled"
    # a sampled softmax holds each position's target and the shared negatives, not the catalogue
    logits = _softmax(t.train.batch_size, L, t.train.sampled_negatives + 1 if sampled else vocab, 3)
    out = [StageMemory("data", data, f"{interactions:,} interactions x ~{BYTES_PER_INTERACTION} bytes"),
           StageMemory("teacher", data + table + logits,
                       (f"sampled-softmax logits {t.train.batch_size} x {L} x {t.train.sampled_negatives + 1:,}"
                        if sampled else f"full-softmax logits {t.train.batch_size} x {L} x {vocab:,}")
                       + " x 4 bytes x 3 (logits, log-softmax, gradient) + item table and Adam state")]
    imp = cfg.importance
    # importance scores the newest position only (compressor/importance: last_item_loss), plus one
    # gradient of the item table (the gradient estimator's backward); never per-sample table gradients
    out.append(StageMemory("importance", data + _softmax(imp.batch_size, 1, vocab, 3) + vocab * t.hidden_size * F32,
                           f"last-position logits {imp.batch_size} x {vocab:,} x 4 bytes x 3 + one item-table gradient"))
    if getattr(cfg.distill, "enabled", True):
        out.append(_distill(cfg.distill, L, vocab, t.hidden_size, data + 2 * table))
    ev = _softmax(EVAL_BATCH, 1, vocab, 3)
    what = f"scores {EVAL_BATCH} x {vocab:,} x 4 bytes x 3"
    if "ease" in cfg.evaluate.baselines and items <= cfg.evaluate.ease_max_items:
        ev += ease_bytes(vocab)
        what += f" + EASE's 4 dense {vocab:,}² float32 matrices"
    out.append(StageMemory("evaluate", data + ev, what))
    return out


def _distill(d: Any, positions: int, vocab: int, hidden: int, base: int) -> StageMemory:
    """Both models' logits: over the catalogue (distill.output=full) or over each position's
    candidates (target, teacher top-k, shared negatives), plus the gathered item rows of the
    exactly scored candidates (both models, the student's gradient: 3 copies of batch x positions x
    (1 + top-k) x hidden) and the teacher's top-k search, one chunk of TOPK_CHUNK_FLOATS scores at
    a time (3 copies: the scores, their concatenation with the running top-k, the top-k's sort)."""
    b = d.train.batch_size
    if getattr(d, "output", "full") == "candidates":
        c = 1 + d.candidates_topk + d.candidates_negatives
        rows = 3 * b * positions * (1 + d.candidates_topk) * hidden * F32
        return StageMemory("distill", base + _softmax(b, positions, c, 5) + rows + 3 * TOPK_CHUNK_FLOATS * F32,
                           f"teacher and student candidate logits {b} x {positions} x {c:,} (target, top "
                           f"{d.candidates_topk}, {d.candidates_negatives:,} negatives) x 4 bytes x 5 + the "
                           "teacher's top-k search in chunks")
    return StageMemory("distill", base + _softmax(b, positions, vocab, 5),
                       f"teacher and student logits {b} x {positions} x {vocab:,} x 4 bytes x 5 "
                       "(both logits, both softmaxes, gradient)")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def check_budget(cfg: Any, users: int, items: int, interactions: int, budget_bytes: int) -> list[StageMemory]:
    """The estimates, or a one-line CompressorError naming the first stage over `budget_bytes` and
    by how much."""
    stages = estimate_stages(cfg, users, items, interactions)
    for s in stages:
        if s.bytes > budget_bytes:
            raise CompressorError(
                f"memory: the {s.stage} stage needs about {_size(s.bytes)} ({s.what}), "
                f"{_size(s.bytes - budget_bytes)} over the budget of {_size(budget_bytes)} "
                f"(data: {users:,} users, {items:,} items, {interactions:,} interactions); lower the batch "
                "size or max_len" + SUGGEST.get(s.stage, "") + ", or raise data.memory_budget_gib")
    return stages
