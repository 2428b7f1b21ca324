"""Which teacher layers a student keeps: pure functions from per-layer scores to kept indices.

Every strategy is `fn(scores, k, **opts) -> sorted list[int]` (higher score = more important) and
is registered in `SELECTION` under its CLI/YAML name. Ties are broken toward the lower layer
index, so a selection is deterministic. `parse_layers` / `validate_layers` handle a list of
layers given by hand; `choose_layers` is the one decision the pipeline and `compressor truncate`
both call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from compressor.errors import CompressorError

Strategy = Callable[..., list[int]]

# The one default strategy: the pipeline's `selection.strategy`, `compressor truncate --keep` and
# the quality benchmark. On the default teacher the first layers carry the model and top_k keeps
# them; `validated` confirmed it there (docs/results/earlier-small.md, "Which layers matter, and which set to keep").
DEFAULT_STRATEGY = "top_k"


def _check(scores: Sequence[float], k: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise CompressorError("selection needs one score per layer")
    if not np.all(np.isfinite(s)):
        raise CompressorError(f"selection needs finite scores, got {s.tolist()}")
    if not 1 <= k <= len(s):
        raise CompressorError(f"cannot keep {k} of {len(s)} layers (1 <= k <= {len(s)})")
    return s


def _ranked(s: np.ndarray, among: Sequence[int] | None = None) -> list[int]:
    """Indices by descending score, ties toward the lower index."""
    idx = np.arange(len(s)) if among is None else np.asarray(list(among), dtype=np.int64)
    order = np.lexsort((idx, -s[idx]))
    return idx[order].tolist()


def _bands(num_layers: int, n: int) -> list[range]:
    """`n` contiguous depth bands of (nearly) equal size covering all layers."""
    edges = np.linspace(0, num_layers, n + 1).round().astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """The k highest-scoring layers."""
    s = _check(scores, k)
    return sorted(_ranked(s)[:k])


def distributed(scores: Sequence[float], k: int, bands: int | None = None) -> list[int]:
    """Split depth into `bands` contiguous bands (default k, i.e. one layer per band) and give each
    band a share of the budget proportional to its size (largest remainder); each band keeps its
    most important layers."""
    s = _check(scores, k)
    n = len(s)
    bands = k if bands is None else bands
    if bands < 1:
        raise CompressorError(f"distributed selection needs bands >= 1, got {bands}")
    parts = _bands(n, min(bands, n))
    quota = np.array([k * len(p) / n for p in parts])
    share = np.floor(quota).astype(int)
    # Largest remainder (ties toward shallower bands), so the shares add up to k.
    for i in np.argsort(-(quota - share), kind="stable")[: k - share.sum()]:
        share[i] += 1
    keep: list[int] = []
    for p, m in zip(parts, share, strict=True):
        keep += _ranked(s, p)[: min(m, len(p))]
    if len(keep) < k:  # a band smaller than its share: fill from the best remaining layers
        keep += [i for i in _ranked(s) if i not in keep][: k - len(keep)]
    return sorted(keep)


def strategic(scores: Sequence[float], k: int) -> list[int]:
    """Always the first and the last layer (they touch the embeddings and the head), the rest by
    importance. With k = 1 the more important of the two ends is kept."""
    s = _check(scores, k)
    n = len(s)
    ends = [0, n - 1] if n > 1 else [0]
    if k < len(ends):
        return [_ranked(s, ends)[0]]
    rest = [i for i in _ranked(s) if i not in ends]
    return sorted(ends + rest[: k - len(ends)])


def hybrid(scores: Sequence[float], k: int, share: float = 0.5) -> list[int]:
    """Importance first, then depth coverage: round(share * k) layers (at least one) by global
    importance, and the remaining budget spread over as many equal depth bands, each keeping its
    most important layer not already kept (a band with nothing left yields the next-best layer
    overall)."""
    s = _check(scores, k)
    if not 0 <= share <= 1:
        raise CompressorError(f"hybrid selection needs 0 <= share <= 1, got {share}")
    ranked = _ranked(s)
    m = min(k, max(1, round(share * k)))
    keep = ranked[:m]
    if k > m:
        for band in _bands(len(s), k - m):
            free = [i for i in _ranked(s, band) if i not in keep]
            keep.append(free[0] if free else next(i for i in ranked if i not in keep))
    return sorted(keep)


SELECTION: dict[str, Strategy] = {
    "top_k": top_k,
    "distributed": distributed,
    "strategic": strategic,
    "hybrid": hybrid,
}


# Not a function of the scores alone: every strategy in `candidates` proposes a set and the set
# whose truncated student scores best on the validation split wins (compressor.truncate.validated).
VALIDATED = "validated"


def propose_layer_sets(strategies: Sequence[str], scores: Sequence[float], k: int) -> dict[tuple[int, ...], list[str]]:
    """Distinct layer sets the named strategies choose, each with the strategies that chose it
    (in the order given, so ties go to the first strategy listed)."""
    sets: dict[tuple[int, ...], list[str]] = {}
    for name in strategies:
        sets.setdefault(tuple(select_layers(name, scores, k)), []).append(name)
    return sets


def select_layers(strategy: str, scores: Sequence[float], k: int, **opts) -> list[int]:
    """Look `strategy` up in `SELECTION` and apply it (a clear error for an unknown name)."""
    if strategy == VALIDATED:
        raise CompressorError("the validated strategy needs the teacher and the data: use "
                              "compressor.truncate.validated (the CLI and the pipeline do)")
    if strategy not in SELECTION:
        raise CompressorError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(SELECTION)}")
    return SELECTION[strategy](scores, k, **opts)


# (strategies, scores, k) -> (the best proposal, one row per proposal): compressor.truncate.validated
# bound to a teacher and data. A callable, so this module stays free of models and data.
Judge = Callable[[list[str], list[float], int], tuple[list[int], list[dict]]]


@dataclass
class LayerChoice:
    """The teacher layers a student keeps, and why (what truncation.json and the stage record keep:
    `chosen_by`, and with scores the `method` and `strategy`, with `validated` the `candidates`)."""

    layers: list[int]
    why: dict


def choose_layers(num_layers: int, *, layers: Sequence[int] | None = None, keep: int | None = None,
                  method: str = "", strategy: str = DEFAULT_STRATEGY, candidates: Sequence[str] = tuple(SELECTION),
                  scores: Callable[[], list[float]] | None = None, judge: Judge | None = None) -> LayerChoice:
    """An explicit `layers` list (checked), else `keep` layers chosen by `strategy` over the
    importance `scores` of `method`. The strategy and the budget are checked before `scores` is
    called, since estimating importance can take minutes; `judge` runs the `validated` strategy."""
    if layers is not None:
        return LayerChoice(validate_layers(layers, num_layers), {"chosen_by": "explicit list"})
    if strategy != VALIDATED and strategy not in SELECTION:
        raise CompressorError(f"unknown selection strategy {strategy!r}; choose one of {', '.join([*SELECTION, VALIDATED])}")
    if keep is None or scores is None:
        raise CompressorError("choosing layers needs an explicit list, or a budget and importance scores")
    validate_keep(keep, num_layers)
    found = scores()
    why = {"chosen_by": f"{strategy} over {method} importance", "method": method, "strategy": strategy}
    if strategy != VALIDATED:
        return LayerChoice(select_layers(strategy, found, keep), why)
    if judge is None:
        raise CompressorError("the validated strategy needs the teacher and the data to judge the proposals")
    chosen, why["candidates"] = judge(list(candidates), found, keep)
    return LayerChoice(chosen, why)


def parse_layers(text: str) -> list[int]:
    """'0,5,10' -> [0, 5, 10] (spaces allowed)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not str(text).strip() or any(p == "" for p in parts):
        raise CompressorError(f"layers {text!r}: give comma-separated layer indices such as 0,5,10")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise CompressorError(f"layers {text!r}: every entry must be an integer layer index") from None


def validate_layers(layers: Sequence[int], num_layers: int, allow_all: bool = False) -> list[int]:
    """Check a layer list against a teacher of `num_layers` layers and return it as a list.

    Indices must be in range, unique and increasing (a student keeps teacher order); at least one
    layer, and fewer than all unless `allow_all` (keeping every layer is not a compression)."""
    layers = [int(i) for i in layers]
    if not layers:
        raise CompressorError("keep at least one layer")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CompressorError(f"layer index {bad[0]} out of range: the teacher has layers 0..{num_layers - 1}")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise CompressorError(f"layer {dup[0]} listed more than once")
    if layers != sorted(layers):
        raise CompressorError(f"layers {layers} are not in increasing order (a student keeps teacher order)")
    if not allow_all and len(layers) >= num_layers:
        raise CompressorError(f"keeping {len(layers)} of {num_layers} layers removes nothing; keep fewer")
    return layers


def validate_keep(k: int, num_layers: int) -> int:
    """A layer budget for a teacher of `num_layers` layers: 1 <= k < num_layers."""
    if not 1 <= k < num_layers:
        raise CompressorError(f"--keep {k}: must be between 1 and {num_layers - 1} for a {num_layers}-layer teacher")
    return k
