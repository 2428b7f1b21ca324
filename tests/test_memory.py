"""Peak-memory estimates from the data's shape, and the early refusal naming the stage."""

from __future__ import annotations

import pytest

from compressor.cli import main
from compressor.config import load_config
from compressor.data.synth import SynthConfig, synthesize
from compressor.errors import CompressorError
from compressor.memory import GIB, check_budget, estimate_stages
from compressor.pipeline import RunConfig


def test_the_full_softmax_term_is_counted_as_stated():
    cfg = RunConfig()
    t = cfg.teacher
    by = {s.stage: s for s in estimate_stages(cfg, users=1000, items=10**6, interactions=10**7)}
    logits = 3 * t.train.batch_size * t.max_len * (10**6 + 1) * 4
    assert by["teacher"].bytes >= logits and by["teacher"].bytes < logits * 1.2
    assert by["distill"].bytes > by["teacher"].bytes  # two models' logits
    assert "EASE" not in by["evaluate"].what  # 10^6 items is past evaluate.ease_max_items


def test_the_bundled_shape_fits_and_a_million_items_do_not():
    cfg = RunConfig()
    stages = check_budget(cfg, users=610, items=9_742, interactions=100_836, budget_bytes=16 * GIB)
    ev = next(s for s in stages if s.stage == "evaluate")
    assert "EASE" in ev.what and ev.bytes > 16 * 9_743**2  # EASE runs here, and is counted
    with pytest.raises(CompressorError, match=r"memory: the teacher stage needs about \d+\.\d GiB .* GiB over the "
                       r"budget of 16\.0 GiB"):
        check_budget(cfg, users=10**5, items=10**6, interactions=10**7, budget_bytes=16 * GIB)


def test_a_run_past_the_budget_stops_before_training_with_one_line(tmp_path, capsys):
    data = tmp_path / "synth"
    synthesize(SynthConfig(users=50, items=200, interactions=600), data)
    out = tmp_path / "run"
    code = main(["run", "--config", "smoke", "--out", str(out), f"data.name={data}", "data.memory_budget_gib=0.001"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1
    assert err[-1].startswith("compressor run: error: memory: the ") and "over the budget of 1.0 MiB" in err[-1]
    assert not out.exists()  # nothing trained, nothing half-written


def test_evaluation_keeps_k_columns_per_user_not_the_whole_partition():
    """Each batch's top-10 is its own small array: a view would keep the (B, V) argpartition
    alive for every batch (the whole users x items index array by the end of a split)."""
    import numpy as np

    from compressor.evaluate import target_ranks

    scores = np.random.default_rng(0).random((4, 1000), dtype=np.float32)
    _, top = target_ranks(scores, [np.array([1])] * 4, np.array([2, 3, 4, 5]))
    assert top.shape == (4, 10) and (top.base is None or top.base.size == top.size)


def test_a_sampled_teacher_is_estimated_by_its_negatives_not_the_catalogue():
    cfg = load_config(RunConfig, None, ["teacher.train.loss=sampled", "teacher.train.sampled_negatives=1023"])
    by = {s.stage: s for s in estimate_stages(cfg, users=1000, items=10**6, interactions=10**7)}
    t = cfg.teacher
    assert "sampled-softmax logits" in by["teacher"].what
    full = {s.stage: s for s in estimate_stages(RunConfig(), users=1000, items=10**6, interactions=10**7)}
    # the logits term is batch x positions x (negatives + target) x 4 bytes x 3; data and item table are as before
    assert full["teacher"].bytes - by["teacher"].bytes == 3 * t.train.batch_size * t.max_len * (10**6 + 1 - 1024) * 4
    assert by["distill"].bytes > 10 * by["teacher"].bytes  # distillation still takes the full softmax


def test_candidate_distillation_is_estimated_by_its_candidates_not_the_catalogue():
    cfg = load_config(RunConfig, None, ["distill.output=candidates", "distill.candidates_topk=99",
                                        "distill.candidates_negatives=900"])
    by = {s.stage: s for s in estimate_stages(cfg, users=1000, items=10**6, interactions=10**7)}
    full = {s.stage: s for s in estimate_stages(RunConfig(), users=1000, items=10**6, interactions=10**7)}
    d, L, h = cfg.distill.train.batch_size, cfg.teacher.max_len, cfg.teacher.hidden_size
    assert "candidate logits" in by["distill"].what and "1,000 (target, top 99, 900 negatives)" in by["distill"].what
    # full: 5 copies of d x L x items logits; candidates: 5 copies of d x L x (1 + 99 + 900), the gathered
    # exact rows (3 x d x L x 100 x hidden) and the top-k search's chunk (3 x 2^24 floats)
    candidates = 5 * d * L * 1000 * 4 + 3 * d * L * 100 * h * 4 + 3 * 2**24 * 4
    assert full["distill"].bytes - by["distill"].bytes == 5 * d * L * (10**6 + 1) * 4 - candidates
    assert by["distill"].bytes < full["distill"].bytes / 10


def test_a_million_items_refuse_full_distillation_and_accept_candidates():
    """The smoke config with the sampled teacher on 10^6 items and 10^7 interactions: full-softmax
    distillation is refused (naming the stage and the option to set), candidates fit the budget."""
    from tests.conftest import smoke_config

    shape = {"users": 200_000, "items": 10**6, "interactions": 10**7, "budget_bytes": 16 * GIB}
    with pytest.raises(CompressorError, match=r"memory: the distill stage needs about .* use distill\.output=candidates"):
        check_budget(smoke_config("teacher.train.loss=sampled"), **shape)
    stages = check_budget(smoke_config("teacher.train.loss=sampled", "distill.output=candidates"), **shape)
    assert {s.stage for s in stages} >= {"teacher", "distill"}
    assert all(s.bytes <= 16 * GIB for s in stages)


def test_the_default_config_fits_a_million_items_with_the_large_catalogue_options():
    """Importance scores the newest position only (B x V logits, not B x L x V): with the sampled
    teacher loss and candidate distillation every stage of the default config fits 16 GiB at 10^6
    items, and the importance estimate is the last-position term, not the L-times larger one."""
    cfg = load_config(RunConfig, "default", ["teacher.train.loss=sampled", "distill.output=candidates"])
    stages = check_budget(cfg, users=200_000, items=10**6, interactions=10**7, budget_bytes=16 * GIB)
    by = {s.stage: s for s in stages}
    last_position = 3 * cfg.importance.batch_size * (10**6 + 1) * 4
    assert last_position <= by["importance"].bytes - by["data"].bytes < 2 * last_position


def test_the_job_suggests_sampled_evaluation_users_when_full_ranking_is_large(monkeypatch):
    """Above FULL_RANKING_ADVICE user x item scores a pass, the pre-training check says
    `data.eval_users` in one line; with it set, or below the threshold, it says nothing."""
    from types import SimpleNamespace

    from compressor.pipeline import stages
    from compressor.pipeline.config import RunConfig

    def lines(cfg: RunConfig) -> list[str]:
        said: list[str] = []
        stages.check_memory(SimpleNamespace(cfg=cfg, log=said.append), cfg.data.load())
        return [s for s in said if "eval_users" in s]

    assert lines(RunConfig()) == []  # 610 users x 9,724 items: far below
    monkeypatch.setattr(stages, "FULL_RANKING_ADVICE", 1_000_000)
    (line,) = lines(RunConfig())
    assert "610 users x 9,724 items" in line and "data.eval_users=10000" in line
    assert lines(RunConfig.model_validate({"data": {"eval_users": 100}})) == []
