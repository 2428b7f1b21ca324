"""EASE without a dense users x items matrix: the same numbers as the dense reference, and the
memory guard that skips it for catalogues past the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.baselines import (
    BASELINES,
    _binary_csr,
    ease_scorer_from_weights,
    ease_skip_reason,
    ease_weights,
    evaluate_baseline,
    fit_ease,
    train_gram,
)
from compressor.evaluate import evaluate_scorer


def _dense_train_matrix(data) -> torch.Tensor:
    """The reference: the dense users x items 0/1 matrix EASE used to build."""
    x = torch.zeros(len(data.sequences), data.vocab.size)
    for u, s in enumerate(data.train_sequences()):
        x[u, torch.from_numpy(s)] = 1.0
    return x


def _dense_scorer(b: torch.Tensor):
    def score(hists):
        x = torch.zeros(len(hists), b.shape[0])
        for i, h in enumerate(hists):
            x[i, torch.from_numpy(h)] = 1.0
        return (x @ b).numpy()

    return score


def test_sparse_gram_equals_the_dense_one(tiny_data):
    x = _dense_train_matrix(tiny_data)
    assert torch.equal(train_gram(tiny_data), x.T @ x)


def test_sparse_scores_equal_the_dense_product(tiny_data):
    gram = train_gram(tiny_data)
    b = ease_weights(gram, 50.0)
    hists = tiny_data.split("test").histories[:40]
    np.testing.assert_allclose(ease_scorer_from_weights(b)(hists), _dense_scorer(b)(hists), rtol=1e-5, atol=1e-6)


def test_fitted_ease_gives_the_dense_reference_metrics(tiny_data):
    """The whole fit (λ walk, choice, test metrics) matches EASE computed the dense way."""
    lambdas = (1.0, 10.0, 100.0)
    x = _dense_train_matrix(tiny_data)
    gram = x.T @ x
    valid, test = tiny_data.split("valid"), tiny_data.split("test")
    ref_valid = {lam: evaluate_scorer(_dense_scorer(ease_weights(gram, lam)), valid).metrics["ndcg@10"] for lam in lambdas}
    scorer, info = fit_ease(tiny_data, lambdas)
    for lam, ndcg in info["search"].items():
        assert ndcg == pytest.approx(ref_valid[float(lam)], abs=1e-12)
    assert info["search"][str(info["lambda"])] == max(info["search"].values())
    ref_test = evaluate_scorer(_dense_scorer(ease_weights(gram, info["lambda"])), test).metrics
    got = evaluate_scorer(scorer, test).metrics
    # the sparse product sums in another order: a float tie may move one user's deep rank by a place
    # (MRR moves by (1/r - 1/(r+1)) / users, ~3e-6 here), while NDCG@10, HR and coverage match exactly
    assert {k: got[k] for k in got if k != "mrr"} == pytest.approx({k: ref_test[k] for k in got if k != "mrr"},
                                                                  abs=1e-12)
    assert got["mrr"] == pytest.approx(ref_test["mrr"], abs=1e-4)


def test_repeated_items_count_once():
    m = _binary_csr([np.array([1, 2, 1]), np.array([3])], 5).to_dense()
    assert m.tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]


def test_the_guard_says_why_ease_is_skipped():
    assert ease_skip_reason(10_000, 15_000) is None
    assert ease_skip_reason(15_000, 15_000) is None
    why = ease_skip_reason(100_000, 15_000)
    assert why.startswith("EASE skipped: 100,000 items > evaluate.ease_max_items 15,000")
    assert "149.0 GiB" in why  # 4 float32 matrices of 10^10 entries


def test_baselines_registry(tiny_data):
    assert set(BASELINES) == {"mostpop", "ease"}
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_baseline("knn", tiny_data)
