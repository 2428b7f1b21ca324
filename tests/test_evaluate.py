"""Metrics against hand-worked examples: ranks, ties, seen-item exclusion, coverage, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compressor.baselines import (
    ease_scorer_from_weights,
    ease_weights,
    evaluate_baseline,
    fit_ease,
    train_gram,
)
from compressor.data import Split
from compressor.evaluate import METRICS, evaluate_scorer, paired_bootstrap, target_ranks


def _split(histories, targets):
    return Split("test", list(range(len(targets))), [np.array(h) for h in histories], np.array(targets))


def test_registry_declares_direction_and_keys():
    assert set(METRICS) == {"hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"}
    assert all(m.higher_is_better for m in METRICS.values())


def test_ranks_exclude_padding_and_seen_items_and_count_ties_against_the_model():
    scores = np.array([[9.0, 5.0, 8.0, 7.0, 7.0, 1.0]])  # token 0 is padding
    rank, _ = target_ranks(scores.copy(), [np.array([2])], np.array([3]))
    # padding and seen token 2 removed; token 4 ties with the target and counts above it.
    assert rank.tolist() == [1]
    rank, _ = target_ranks(scores.copy(), [np.array([1])], np.array([2]))
    assert rank.tolist() == [0]


def test_metrics_match_closed_form():
    # Three users whose targets land at ranks 0, 3 and 12 of a 20-item catalogue.
    n_tokens = 21
    ranks = [0, 3, 12]
    rows, targets = [], []
    for r in ranks:
        s = np.linspace(100, 1, n_tokens)  # token t gets the (t)-th highest score
        target = r + 1
        rows.append(s)
        targets.append(target)
    table = np.stack(rows)
    split = _split([[n_tokens - 1]] * 3, targets)  # seen: the lowest-scored token, harmless
    res = evaluate_scorer(lambda h: table[: len(h)], split).metrics
    assert res["hr@5"] == pytest.approx(2 / 3)
    assert res["hr@10"] == pytest.approx(2 / 3)
    assert res["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert res["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert res["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    assert res["users"] == 3


def test_constant_scorer_earns_nothing_and_coverage_counts_distinct_items():
    split = _split([[1], [2]], [3, 4])
    res = evaluate_scorer(lambda h: np.zeros((len(h), 30)), split).metrics
    assert res["hr@10"] == 0.0 and res["ndcg@10"] == 0.0
    assert 0 < res["coverage@10"] <= 20 / 29


def test_paired_bootstrap_of_identical_and_shifted_users_is_exact():
    a = np.random.default_rng(0).random(600)
    same = paired_bootstrap(a, a.copy())
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    shifted = paired_bootstrap(a + 0.05, a)  # every user gains 0.05: every resample's mean is 0.05
    assert shifted["mean_diff"] == pytest.approx(0.05) and shifted["excludes_zero"]
    assert shifted["ci_low"] == pytest.approx(0.05) and shifted["ci_high"] == pytest.approx(0.05)


def test_paired_bootstrap_interval_has_the_width_of_the_normal_theory():
    """Differences ~ N(0, 1) over 900 users: the 95% interval is about ±1.96/30 around their mean."""
    d = np.random.default_rng(1).standard_normal(900)
    res = paired_bootstrap(d, np.zeros(900), n=4000)
    half = 1.96 * d.std() / 30
    assert res["ci_low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert res["ci_high"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert res["n_users"] == 900 and res["resamples"] == 4000


def test_paired_bootstrap_pairs_users_and_does_not_depend_on_the_chunk_size():
    """b is a plus a small steady gain plus a little noise: unpaired, the spread of a would hide
    the gain; paired, the interval excludes zero."""
    rng = np.random.default_rng(2)
    a = rng.random(400)
    b = a + 0.01 + 0.005 * rng.standard_normal(400)
    res = paired_bootstrap(b, a)
    assert res["excludes_zero"] and res["ci_low"] > 0.009 and res["ci_high"] < 0.011
    assert paired_bootstrap(b, a, chunk_elements=1000) == res
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(a, a[:-1])


def test_ease_closed_form_on_a_toy_gram():
    x = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float64)
    import torch

    b = ease_weights(torch.from_numpy(x.T @ x), 1.0).numpy()
    p = np.linalg.inv(x.T @ x + np.eye(3))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    assert np.allclose(b, expected)


def test_baselines_on_real_slice(tiny_data):
    pop, _ = evaluate_baseline("mostpop", tiny_data)
    ease, info = evaluate_baseline("ease", tiny_data)
    assert info["lambda"] > 0
    assert set(pop.metrics) >= {"ndcg@5", "ndcg@10", "hr@5", "hr@10", "mrr", "coverage@10", "users"}
    assert pop.metrics["users"] == ease.metrics["users"] == len(tiny_data.split("test"))


@pytest.mark.parametrize("lambdas", [(0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0), (1.0, 3.0), (5.0,)])
def test_ease_walk_finds_a_local_maximum_of_the_full_search(tiny_data, lambdas):
    """The λ walk evaluates a subset of the grid, with the full search's values, and stops on a λ
    that no grid neighbour beats."""
    gram = train_gram(tiny_data)
    valid = tiny_data.split("valid")
    full = [evaluate_scorer(ease_scorer_from_weights(ease_weights(gram, lam)), valid).metrics["ndcg@10"]
            for lam in lambdas]
    _, info = fit_ease(tiny_data, lambdas)
    assert set(info["search"]) <= {str(lam) for lam in lambdas}
    for lam, ndcg in info["search"].items():
        assert ndcg == pytest.approx(full[lambdas.index(float(lam))])
    i = lambdas.index(info["lambda"])
    assert info["valid_ndcg@10"] == pytest.approx(full[i]) == pytest.approx(max(info["search"].values()))
    assert all(full[j] <= full[i] for j in (i - 1, i + 1) if 0 <= j < len(lambdas))


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 1000, 10**9])
def test_chunked_paired_bootstrap_equals_the_one_array_version(chunk_elements):
    """Drawing resamples a few rows at a time gives the numbers of one (n, users) draw."""
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    d = a - b
    idx = np.random.default_rng(7).integers(0, 50, size=(301, 50))  # the former, unchunked draw
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    got = paired_bootstrap(a, b, n=301, seed=7, chunk_elements=chunk_elements)
    assert got["ci_low"] == lo and got["ci_high"] == hi and got["mean_diff"] == d.mean()
