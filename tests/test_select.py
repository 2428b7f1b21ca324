"""Selection strategies: pure functions from per-layer scores to kept layers, worked by hand."""

from __future__ import annotations

import pytest

from compressor.errors import CompressorError
from compressor.select import (
    DEFAULT_STRATEGY,
    SELECTION,
    VALIDATED,
    LayerChoice,
    choose_layers,
    distributed,
    hybrid,
    parse_layers,
    propose_layer_sets,
    select_layers,
    strategic,
    top_k,
    validate_keep,
    validate_layers,
)

# 8 layers; importance falls with depth except a strong layer 6.
S = [0.9, 0.5, 0.4, 0.3, 0.1, 0.05, 0.8, 0.2]


def test_registry():
    assert set(SELECTION) == {"top_k", "distributed", "strategic", "hybrid"}
    assert DEFAULT_STRATEGY in SELECTION
    for name, fn in SELECTION.items():
        for k in range(1, len(S) + 1):
            kept = fn(S, k)
            assert kept == sorted(set(kept)) and len(kept) == k, (name, k, kept)
            assert all(0 <= i < len(S) for i in kept)


def test_top_k():
    assert top_k(S, 1) == [0]
    assert top_k(S, 3) == [0, 1, 6]
    assert top_k([1, 1, 1, 1], 2) == [0, 1]  # ties toward the lower index


def test_distributed():
    # 4 bands of 2 layers, one layer each: best of {0,1}, {2,3}, {4,5}, {6,7}
    assert distributed(S, 4) == [0, 2, 4, 6]
    # 2 bands of 4 layers, two from each: {0..3} -> 0,1 ; {4..7} -> 6,7
    assert distributed(S, 4, bands=2) == [0, 1, 6, 7]
    # 3 layers over 2 bands: shares 1.5/1.5 -> the shallower band gets the extra one
    assert distributed(S, 3, bands=2) == [0, 1, 6]
    with pytest.raises(CompressorError, match="bands"):
        distributed(S, 2, bands=0)


def test_strategic_keeps_both_ends():
    assert strategic(S, 2) == [0, 7]
    assert strategic(S, 3) == [0, 6, 7]
    assert strategic(S, 4) == [0, 1, 6, 7]
    assert strategic(S, 1) == [0]  # the more important end
    assert strategic([0.1, 0.2, 0.9], 1) == [2]


def test_hybrid_importance_then_coverage():
    # k=4: two by importance (0, 6), then two bands {0..3}, {4..7}: best unused 1 and 7... band 2 best is 6
    # (taken) so 7; band 1 best is 0 (taken) so 1.
    assert hybrid(S, 4) == [0, 1, 6, 7]
    # share=1 is top_k; share=0 still keeps one by importance
    assert hybrid(S, 3, share=1.0) == top_k(S, 3)
    assert hybrid(S, 2, share=0.0) == [0, 6]
    with pytest.raises(CompressorError, match="share"):
        hybrid(S, 2, share=1.5)


@pytest.mark.parametrize("k", [0, 9, -1])
def test_bad_budget(k):
    with pytest.raises(CompressorError, match="cannot keep"):
        top_k(S, k)


def test_bad_scores():
    with pytest.raises(CompressorError, match="finite"):
        top_k([1.0, float("nan")], 1)
    with pytest.raises(CompressorError, match="one score per layer"):
        top_k([], 1)


def test_select_layers_by_name():
    assert select_layers("top_k", S, 2) == [0, 6]
    with pytest.raises(CompressorError, match="unknown selection strategy 'best'"):
        select_layers("best", S, 2)
    with pytest.raises(CompressorError, match="needs the teacher and the data"):
        select_layers("validated", S, 2)


def test_propose_layer_sets_merges_equal_proposals():
    # layers 0 and 6 are the two best and one per half: three strategies agree, strategic keeps the ends
    sets = propose_layer_sets(["strategic", "top_k", "distributed", "hybrid"], S, 2)
    assert sets == {(0, 7): ["strategic"], (0, 6): ["top_k", "distributed", "hybrid"]}
    assert list(sets)[0] == (0, 7)  # first proposer first: ties in `validated` go to it


def test_parse_layers():
    assert parse_layers("0,5,10") == [0, 5, 10]
    assert parse_layers(" 3 , 1 ") == [3, 1]
    for bad in ("", "0,,2", "a,b", "1.5"):
        with pytest.raises(CompressorError, match="layers"):
            parse_layers(bad)


def test_validate_layers():
    assert validate_layers([0, 3], 4) == [0, 3]
    assert validate_layers([0, 1, 2, 3], 4, allow_all=True) == [0, 1, 2, 3]
    cases = [
        ([0, 4], "out of range"),
        ([-1, 2], "out of range"),
        ([1, 1], "more than once"),
        ([2, 1], "increasing order"),
        ([], "at least one"),
        ([0, 1, 2, 3], "removes nothing"),
    ]
    for layers, msg in cases:
        with pytest.raises(CompressorError, match=msg):
            validate_layers(layers, 4)


def test_validate_keep():
    assert validate_keep(3, 4) == 3
    for k in (0, 4, 5):
        with pytest.raises(CompressorError, match="between 1 and 3"):
            validate_keep(k, 4)


def test_choose_layers_explicit_list_is_checked_and_needs_no_scores():
    def no_scores():
        raise AssertionError("an explicit list must not estimate importance")

    choice = choose_layers(8, layers=[0, 6], scores=no_scores)
    assert choice == LayerChoice([0, 6], {"chosen_by": "explicit list"})
    with pytest.raises(CompressorError, match="more than once"):
        choose_layers(8, layers=[1, 1], scores=no_scores)


def test_choose_layers_checks_strategy_and_budget_before_reading_scores():
    calls = []

    def scores():
        calls.append(1)
        return S

    with pytest.raises(CompressorError, match="unknown selection strategy 'best'"):
        choose_layers(8, keep=2, method="fisher", strategy="best", scores=scores)
    with pytest.raises(CompressorError, match="between 1 and 7"):
        choose_layers(8, keep=8, method="fisher", scores=scores)
    assert calls == []
    choice = choose_layers(8, keep=2, method="fisher", scores=scores)  # the default strategy
    assert choice.layers == SELECTION[DEFAULT_STRATEGY](S, 2) == [0, 6] and calls == [1]
    assert choice.why == {"chosen_by": f"{DEFAULT_STRATEGY} over fisher importance", "method": "fisher",
                          "strategy": DEFAULT_STRATEGY}


def test_choose_layers_validated_asks_the_judge_about_each_candidate():
    seen = {}

    def judge(strategies, scores, k):
        seen.update(strategies=strategies, k=k)
        return [0, 7], [{"layers": [0, 7], "strategies": ["strategic"], "valid_ndcg@10": 0.5}]

    choice = choose_layers(8, keep=2, method="fisher", strategy=VALIDATED, candidates=["top_k", "strategic"],
                           scores=lambda: S, judge=judge)
    assert choice.layers == [0, 7] and seen == {"strategies": ["top_k", "strategic"], "k": 2}
    assert choice.why["candidates"][0]["valid_ndcg@10"] == 0.5
    with pytest.raises(CompressorError, match="teacher and the data"):
        choose_layers(8, keep=2, method="fisher", strategy=VALIDATED, scores=lambda: S)
