"""Non-neural references every report compares against: MostPop (the floor) and EASE.

Both are fitted on the training part of the protocol (each sequence minus its validation
and test items) and score a split's histories like any model, through `evaluate_scorer`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from compressor.data.protocol import RecData
from compressor.evaluate import EvalResult, Scorer, evaluate_scorer

EASE_LAMBDAS = (10.0, 25.0, 50.0, 100.0, 250.0)


def mostpop_scorer(data: RecData) -> Scorer:
    counts = np.zeros(data.vocab.size, dtype=np.float32)
    for s in data.train_sequences():
        np.add.at(counts, s, 1.0)

    def score(hists: list[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(counts, (len(hists), len(counts)))

    return score


def _pairs(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) of each distinct (sequence, item) pair: the nonzeros of a binary matrix."""
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    rows = np.repeat(np.arange(len(seqs), dtype=np.int64), lens)
    cols = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, dtype=np.int64)
    width = int(cols.max(initial=0)) + 1
    key = np.unique(rows * width + cols)  # sorted by row, then token; repeats (if kept) count once
    return key // width, key % width


def _csr(crow: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A 0/1 CSR matrix. torch warns that CSR is beta: the products used here are checked against
    the dense ones (tests/test_baselines.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols), torch.ones(len(cols)), shape,
                                       check_invariants=False)


def _binary_csr(seqs: list[np.ndarray], num_cols: int) -> torch.Tensor:
    """The (len(seqs), num_cols) 0/1 matrix of who saw what, sparse (CSR)."""
    rows, cols = _pairs(seqs)
    crow = np.searchsorted(rows, np.arange(len(seqs) + 1))
    return _csr(crow, cols, (len(seqs), num_cols))


GRAM_CHUNK = 2048  # Gram columns built per sparse product: a users x 2048 dense slice at a time


def train_gram(data: RecData) -> torch.Tensor:
    """XᵀX of the binary users x items training matrix X, without X ever being dense.

    Built column block by column block as a sparse product Xᵀ (CSR) @ X[:, block], so the cost is
    nnz x items rather than users x items²; the counts are integers, exact in float32."""
    seqs = data.train_sequences()
    rows, cols = _pairs(seqs)
    order = np.argsort(cols, kind="stable")
    rows, cols = rows[order], cols[order]
    n, v = len(seqs), data.vocab.size
    xt = _csr(np.searchsorted(cols, np.arange(v + 1)), rows, (v, n))
    gram = torch.empty(v, v)
    for a in range(0, v, GRAM_CHUNK):
        lo, hi = np.searchsorted(cols, [a, a + GRAM_CHUNK])
        block = torch.zeros(n, min(GRAM_CHUNK, v - a))
        block[torch.from_numpy(rows[lo:hi]), torch.from_numpy(cols[lo:hi] - a)] = 1.0
        gram[:, a : a + GRAM_CHUNK] = xt @ block
    return gram


def ease_bytes(num_items: int) -> int:
    """Peak memory of fitting EASE: four dense items x items float32 matrices (the Gram, its
    Cholesky factor or the working copy, the inverse, and the best λ's weights kept while the next
    λ is fitted)."""
    return 4 * 4 * num_items**2


def ease_skip_reason(num_items: int, max_items: int) -> str | None:
    """Why EASE is skipped for this catalogue, or None when it fits `max_items`."""
    if num_items <= max_items:
        return None
    return (f"EASE skipped: {num_items:,} items > evaluate.ease_max_items {max_items:,} (its dense items x items "
            f"matrices would need {ease_bytes(num_items) / 2**30:.1f} GiB; raise the limit if the machine has it)")


def ease_weights(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """EASE (Steck 2019): B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, zero diagonal.

    Computed in float32 (half the time of float64: 10 s instead of 20 s per λ for the bundled
    9.7k-item catalogue on 2 cores, with the same validation and test NDCG@10 to 5 decimals at
    λ = 10 and 50); float64 only when float32 is not numerically positive definite. The working
    copies are freed as soon as they are used, so the peak is the Gram plus two items² matrices."""
    for dtype in (torch.float32, torch.float64):
        g = gram.to(dtype, copy=True)
        g.diagonal().add_(lam)
        # XᵀX + λI is symmetric positive definite: Cholesky is about twice as fast as a general inverse.
        factor, info = torch.linalg.cholesky_ex(g)
        del g
        if int(info) == 0:
            break
    p = torch.cholesky_inverse(factor)
    del factor
    p.div_(-p.diagonal().clone()[None, :])
    b = p.float()
    b.diagonal().zero_()
    return b


def ease_scorer_from_weights(b: torch.Tensor) -> Scorer:
    """Scores = X_batch @ B as a sparse product: each history's rows of B summed (nnz x items
    work), never a dense batch x items input."""

    def score(hists: list[np.ndarray]) -> np.ndarray:
        return (_binary_csr(hists, b.shape[0]) @ b).numpy()

    return score


def fit_ease(data: RecData, lambdas=EASE_LAMBDAS, log: Callable[[str], None] | None = None) -> tuple[Scorer, dict]:
    """Fit EASE on the training part, choosing λ by validation NDCG@10.

    The grid is walked from its middle towards the better neighbour and the walk stops when
    validation falls: validation NDCG@10 is unimodal in λ (a ridge penalty), and each λ costs a
    Cholesky inverse of the item Gram matrix (~10 s on the bundled data), so on the bundled data
    this fits 3 of the 5 grid points and finds the same λ as the full search."""
    grid = sorted(float(v) for v in lambdas)
    if not grid:
        raise ValueError("EASE needs at least one λ")
    gram = train_gram(data)  # co-occurrence counts: integers, exact in float32
    valid = data.split("valid")
    search: dict[str, float] = {}

    def fit(i: int) -> tuple[float, torch.Tensor]:
        b = ease_weights(gram, grid[i])
        ndcg = search[str(grid[i])] = evaluate_scorer(ease_scorer_from_weights(b), valid).metrics["ndcg@10"]
        if log:
            log(f"EASE λ={grid[i]:g}: valid NDCG@10 {ndcg:.4f}")
        return ndcg, b

    best = len(grid) // 2
    best_ndcg, best_b = fit(best)
    for step in (-1, 1):
        moved, i = False, best + step
        while 0 <= i < len(grid):
            ndcg, b = fit(i)
            if ndcg <= best_ndcg:
                break
            best, best_ndcg, best_b, moved = i, ndcg, b, True
            i += step
        if moved:  # unimodal: the other side of the middle is worse
            break
    return ease_scorer_from_weights(best_b), {"lambda": grid[best], "valid_ndcg@10": best_ndcg, "search": search}


# name -> fit(data) -> (scorer, fit details); the YAML's `evaluate.baselines` values
BASELINES: dict[str, Callable[[RecData], tuple[Scorer, dict]]] = {
    "mostpop": lambda data: (mostpop_scorer(data), {}),
    "ease": fit_ease,
}


def evaluate_baseline(name: str, data: RecData, split: str = "test") -> tuple[EvalResult, dict]:
    """Fit a named baseline on the training part and evaluate it on `split`."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(sorted(BASELINES))}")
    scorer, info = BASELINES[name](data)
    return evaluate_scorer(scorer, data.split(split)), info
