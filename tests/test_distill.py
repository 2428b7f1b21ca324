"""Distillation: every loss on tiny models, Fisher weights and their EMA, the trainer, resume, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.cli import main
from compressor.data import prepare, training_windows
from compressor.distill import (
    LOSSES,
    DistillConfig,
    Distiller,
    LayerWeights,
    distill,
    mapped_weights,
    read_fisher_scores,
    resolve_layer_map,
    uniform_map,
)
from compressor.distill.step import attention_implementation
from compressor.distill.trainer import batch_tensors
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.modeling import load_model, save_model, set_recsys_meta
from compressor.teacher import TrainConfig, build_teacher
from compressor.truncate import truncate
from tests.conftest import tiny_interactions, tiny_teacher_config

MAX_LEN = 20
FAST = TrainConfig(epochs=2, batch_size=64, lr=2e-3, warmup_steps=2, patience=5, max_minutes=2)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    model, _ = load_model(tiny_teacher_dir)
    return model


@pytest.fixture(scope="module")
def windows(tiny_data):
    return training_windows(tiny_data.train_sequences(), MAX_LEN)


def make_distiller(teacher, student, method, windows, **cfg):
    cfg = DistillConfig(method=method, train=FAST, **cfg)
    d = Distiller(teacher, student, cfg, 1, len(windows), 100, np.arange(1, 5, dtype=float))
    return d


def batch(windows, n=16, start=0):
    return batch_tensors(windows, np.arange(start, start + n), MAX_LEN, "cpu")


@pytest.mark.parametrize("output", ["full", "candidates"])
@pytest.mark.parametrize("method", list(LOSSES))
def test_each_loss_is_finite_and_trains_only_the_student(teacher, windows, method, output):
    loss = LOSSES[method]
    if output == "candidates" and loss.full_logits:
        pytest.skip(f"{method} reads the full logits (refused with candidates: test_candidate_output_refusals)")
    student = truncate(teacher, [0, 2])
    teacher.zero_grad(set_to_none=True)
    with attention_implementation([teacher, student], "eager" if loss.attentions else None):
        d = make_distiller(teacher, student, method, windows, output=output, candidates_negatives=32)
        teacher.eval().requires_grad_(False)
        try:
            total, terms, _ = d.compute(*batch(windows))
            assert torch.isfinite(total) and all(np.isfinite(v) for v in terms.values()), terms
            total.backward()
        finally:
            teacher.requires_grad_(True)
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert set(terms) >= {"task"}


@pytest.mark.parametrize("method", [m for m in LOSSES if m != "finetune"])
def test_matching_terms_vanish_for_an_exact_teacher_copy(teacher, windows, method):
    """Student = all teacher layers, identity map: every teacher-matching term is ~0 (the
    task loss is not: it is the teacher's own CE)."""
    student = truncate(teacher, list(range(teacher.config.num_hidden_layers))).eval()
    loss = LOSSES[method]
    with attention_implementation([teacher, student], "eager" if loss.attentions else None), torch.no_grad():
        d = make_distiller(teacher, student, method, windows)
        teacher.eval()
        student.eval()  # the same mode as the teacher, so the two forwards are identical
        _, terms, task = d.compute(*batch(windows))
    assert task > 1.0
    for name, value in terms.items():
        if name != "task":
            assert abs(value) < 1e-5, (name, value)


def _saved_shapes(fn):
    """fn()'s result and the shapes of every tensor autograd saved for the backward pass meanwhile."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("output", ["full", "candidates"])
def test_candidates_never_save_a_catalogue_wide_student_tensor(teacher, windows, output):
    """The student's autograd graph under distill.output=candidates holds no rows x items tensor
    (nor any with an items-sized axis but the item table itself); the full output, the control,
    does: its logits. The teacher's top-k search runs without gradients and saves nothing."""
    student = truncate(teacher, [0, 3])
    d = make_distiller(teacher, student, "fisher_ld", windows, output=output, candidates_topk=5, candidates_negatives=16)
    v = student.config.vocab_size
    table = tuple(student.get_output_embeddings().weight.shape)
    teacher.eval().requires_grad_(False)
    try:
        b = batch(windows)
        (total, terms, _), shapes = _saved_shapes(lambda: d.compute(*b))
        total.backward()
    finally:
        teacher.requires_grad_(True)
    rows = int((b[3] != -100).sum())
    wide = [s for s in shapes if s != table and (v in s or v - 1 in s)]
    if output == "full":
        assert wide and max(np.prod(s) for s in shapes) >= rows * (v - 1)
        return
    assert not wide, wide
    assert max(np.prod(s) for s in shapes) < rows * (v - 1) / 10
    assert terms["kd"] > 0 and all(np.isfinite(x) for x in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_candidate_distillation_lowers_its_loss(teacher, windows):
    """10 steps on one batch in candidate mode; the loss before and after is measured on the same
    negatives (the torch RNG reseeded), so the comparison is not sampling noise."""
    student = truncate(teacher, [0, 3])
    d = make_distiller(teacher, student, "fisher_ld", windows, output="candidates", candidates_topk=10,
                       candidates_negatives=64)
    d.opt.param_groups[0]["lr"] = d.opt.param_groups[1]["lr"] = 5e-3
    d.sched.base_lrs = [5e-3, 5e-3]
    b = batch(windows, n=64)

    def loss() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(d.compute(*b)[0])

    teacher.eval().requires_grad_(False)
    try:
        before = loss()
        rows = [d.step(*b) for _ in range(10)]
        student.eval()
        after = loss()
    finally:
        teacher.requires_grad_(True)
    assert after < before * 0.95, (before, after)
    assert all(np.isfinite(r["kd"]) and np.isfinite(r["task"]) for r in rows)


def test_candidate_kd_vanishes_for_an_exact_teacher_copy(teacher, windows):
    student = truncate(teacher, list(range(teacher.config.num_hidden_layers))).eval()
    d = make_distiller(teacher, student, "logit_kd", windows, output="candidates", candidates_negatives=32)
    teacher.eval()
    with torch.no_grad():
        _, terms, task = d.compute(*batch(windows))
    assert terms["kd"] < 1e-5 and task > 1.0


@pytest.mark.parametrize("search", ["exact", "hnsw"])
def test_candidate_distillation_end_to_end(teacher, tiny_data, tmp_path, search):
    """distill.output=candidates through `distill`: the proposal from the training counts, the
    teacher's Fisher estimated with the sampled softmax, finite terms, the student changed and saved;
    the teacher's top-k found exactly or by the HNSW graph large catalogues use."""
    student = truncate(teacher, [0, 3])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(method="fisher_ld", train=FAST, output="candidates", candidates_topk=20,
                        candidates_negatives=64, candidates_search=search)
    r = distill(teacher, student, tiny_data, cfg, tmp_path / "c", progress=False, max_steps=4)
    rows = [json.loads(x) for x in r.log_path.read_text().splitlines() if "loss" in x]
    assert r.steps == len(rows) == 4 and r.fisher_source.startswith("estimated")
    assert all(np.isfinite(x[k]) for x in rows for k in ("loss", "task", "kd", "layers"))
    ck = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(v, before[k]) for k, v in ck["distiller"]["student"].items())
    assert json.loads((tmp_path / "c" / "result.json").read_text())["config"]["output"] == "candidates"


def test_candidate_output_refusals():
    for method in ("dkd", "ranking_kd"):
        with pytest.raises(ValueError, match=f"distill.method={method} reads the full-catalogue logits"):
            DistillConfig(method=method, output="candidates")
    with pytest.raises(ValueError, match="train.loss is for teacher training"):
        DistillConfig(train={"loss": "sampled"})


def test_source_mapping_matches_the_layers_a_student_came_from(teacher, windows):
    """A truncated student's layers equal their teacher layers until the first dropped one:
    with the source mapping their layer losses start at 0."""
    student = truncate(teacher, [0, 1]).eval()
    assert resolve_layer_map("source", student, teacher) == [0, 1]
    assert resolve_layer_map("uniform", student, teacher) == [1, 3]
    d = make_distiller(teacher, student, "uniform_ld", windows)
    with torch.no_grad():
        teacher.eval()
        sf = d.s_req, d.t_req
        assert sf[1].layers == frozenset([0, 1])
        _, terms, _ = d.compute(*batch(windows))
    assert terms["layers"] < 1e-8 and terms["kd"] > 1e-3


@pytest.mark.parametrize("method", ["minilm", "tinybert", "fisher_ld"])
def test_gpt2_family(tiny_data, windows, method):
    """GPT-2 names its parts differently (h, c_attn as a Conv1D holding q, k and v)."""
    t = build_teacher(tiny_teacher_config("gpt2"), tiny_data.vocab)
    set_recsys_meta(t, max_len=MAX_LEN)
    student = truncate(t, [0, 3])
    with attention_implementation([t, student], "eager" if LOSSES[method].attentions else None):
        d = make_distiller(t, student, method, windows)
        t.eval().requires_grad_(False)
        total, terms, _ = d.compute(*batch(windows))
        total.backward()
        same = make_distiller(t, truncate(t, [0, 1, 2, 3]).eval(), method, windows)
        with torch.no_grad():
            _, copy_terms, _ = same.compute(*batch(windows))
    assert torch.isfinite(total) and all(p.grad is None for p in t.parameters())
    assert all(abs(v) < 1e-5 for k, v in copy_terms.items() if k != "task")


def test_source_mapping_between_two_cuts_of_one_teacher(teacher):
    """Recovering a changed student from the unchanged one (both cut from one original): the
    source layers are read in the original's numbering, so the map is the teacher's positions."""
    cut = truncate(teacher, [0, 2, 3])
    assert resolve_layer_map("source", truncate(teacher, [0, 2, 3]), cut) == [0, 1, 2]
    assert resolve_layer_map("source", truncate(teacher, [2, 3]), cut) == [1, 2]
    with pytest.raises(CompressorError, match=r"original layer\(s\) \[1\]"):
        resolve_layer_map("source", truncate(teacher, [0, 1]), cut)
    # a student cut from the cut itself indexes the cut directly
    assert resolve_layer_map("source", truncate(cut, [0, 2]), cut) == [0, 2]


def test_layer_map_validation(teacher):
    student = truncate(teacher, [0, 3])
    assert uniform_map(4, 16) == [3, 7, 11, 15] and uniform_map(2, 16) == [7, 15]
    with pytest.raises(CompressorError, match="out of range"):
        resolve_layer_map([0, 4], student, teacher)
    with pytest.raises(CompressorError, match="entries"):
        resolve_layer_map([0], student, teacher)


def test_fisher_scores_reader_and_weights(tmp_path):
    doc = {"num_layers": 4, "methods": {"fisher": {"scores": [4.0, 1.0, 1.0, 2.0], "weights": [0.5, 0.125, 0.125, 0.25]}}}
    assert read_fisher_scores(doc, 4).tolist() == [4.0, 1.0, 1.0, 2.0]
    (tmp_path / "importance.json").write_text(json.dumps(doc))
    assert read_fisher_scores(tmp_path / "importance.json", 4)[0] == 4.0
    with pytest.raises(CompressorError, match="4 layers scored, the teacher has 16"):
        read_fisher_scores(doc, 16)
    with pytest.raises(CompressorError, match="no 'fisher' scores"):
        read_fisher_scores({"num_layers": 1, "methods": {"gradient": {"scores": [1], "weights": [1]}}}, 1)
    with pytest.raises(CompressorError, match="num_layers"):  # one strict reader: no guessing at shapes
        read_fisher_scores({"fisher": [1, 2]}, 2)
    # weights of the mapped layers, renormalised; the depth bias favours the deeper one
    assert np.allclose(mapped_weights(np.array([4.0, 1.0, 1.0, 2.0]), [0, 3]), [2 / 3, 1 / 3])
    biased = mapped_weights(np.array([1.0, 1.0]), [0, 1], depth_bias=1.0)
    assert biased[1] > biased[0] and np.isclose(biased.sum(), 1)


def test_ema_moves_weights_toward_the_current_estimate():
    w = LayerWeights(np.array([0.5, 0.5]), eta=0.2)
    assert np.allclose(w.update(np.array([3.0, 1.0])), [0.55, 0.45])  # current normalised to [.75, .25]
    for _ in range(60):
        w.update(np.array([3.0, 1.0]))
    assert np.allclose(w.w, [0.75, 0.25], atol=1e-4)
    assert len(w.history) == 62


def test_dynamic_weights_follow_the_students_fisher(teacher, windows):
    student = truncate(teacher, [0, 3])
    d = make_distiller(teacher, student, "fisher_ld", windows, ema_every=1, ema_eta=0.5)
    start = d.weights.w.copy()
    assert np.allclose(start, [1 / 5, 4 / 5])  # scores 1..4 of the mapped layers 0 and 3
    teacher.eval().requires_grad_(False)
    try:
        rows = [d.step(*batch(windows, start=i * 16, n=16)) for i in range(3)]
    finally:
        teacher.requires_grad_(True)
    assert all("weights" in r for r in rows) and len(d.weights.history) == 4
    assert not np.allclose(d.weights.w, start) and np.isclose(d.weights.w.sum(), 1)
    static = make_distiller(teacher, truncate(teacher, [0, 3]), "fisher_ld_static", windows, ema_every=1)
    teacher.requires_grad_(False)
    try:
        static.step(*batch(windows, n=16))
    finally:
        teacher.requires_grad_(True)
    assert np.allclose(static.weights.w, start)


def test_a_few_steps_lower_the_loss(teacher, windows):
    student = truncate(teacher, [0, 3])
    d = make_distiller(teacher, student, "fisher_ld", windows)
    d.opt.param_groups[0]["lr"] = d.opt.param_groups[1]["lr"] = 5e-3
    d.sched.base_lrs = [5e-3, 5e-3]
    b = batch(windows, n=64)
    teacher.eval().requires_grad_(False)
    try:
        with torch.no_grad():
            before = float(d.compute(*b)[0])
        rows = [d.step(*b) for _ in range(10)]
        with torch.no_grad():
            student.eval()
            after = float(d.compute(*b)[0])
    finally:
        teacher.requires_grad_(True)
    assert after < before * 0.95, (before, after)
    assert rows[-1]["l2"] > 0  # the decoupled L2-SP term is tracked


def test_decoupled_l2_pulls_the_student_back_to_where_it_started(teacher, windows):
    student = truncate(teacher, [0, 3])
    d = make_distiller(teacher, student, "uniform_ld", windows, lam=0.5)
    p = d.student_params[3]
    start = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    value = d.apply_decoupled_l2(lr=1.0)
    assert value == pytest.approx(p.numel(), rel=1e-4)  # Σ(θ−θ₀)² with one tensor moved by 1, the rest at θ₀
    assert torch.allclose(p, start + 0.5, atol=1e-6)  # θ ← θ − lr·λ·(θ − θ₀), λ = 0.5
    assert all(torch.equal(q, q0) for i, (q, q0) in enumerate(zip(d.student_params, d.init_params, strict=True))
               if i != 3)
    as_loss = make_distiller(teacher, truncate(teacher, [0, 3]), "uniform_ld", windows, l2_mode="loss")
    teacher.eval()
    with torch.no_grad():
        assert "l2" in as_loss.compute(*batch(windows, n=8))[1] and not as_loss.decoupled_l2


def test_hidden_size_mismatch_uses_trained_adapters(teacher, tiny_data, tmp_path):
    cfg = copy.deepcopy(teacher.config)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 16, 32, 2
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(cfg)
    set_recsys_meta(student, kind="student", max_len=MAX_LEN)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    r = distill(teacher, student, tiny_data, DistillConfig(method="tinybert", train=FAST), tmp_path / "o",
                progress=False, max_steps=3)
    assert r.layer_map == [1, 3] and r.steps == 3  # no teacher_layers in the meta: uniform spacing
    ck = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(v, before[k]) for k, v in ck["distiller"]["student"].items())
    assert any(k.endswith("weight") for k in ck["distiller"]["adapters"])  # Linear 16 -> 32, trained
    saved, _ = load_model(r.model_dir)
    assert not any("adapter" in k for k in saved.state_dict())


@pytest.mark.parametrize("method", ["rkd", "dkd", "ranking_kd"])
def test_output_methods_distil_a_tiny_student(teacher, tiny_data, tmp_path, method):
    """A short real run of each output-level method: finite loss and terms at every step, the
    method's own terms logged, the student changed and saved."""
    student = truncate(teacher, [0, 3])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    r = distill(teacher, student, tiny_data, DistillConfig(method=method, train=FAST), tmp_path / method,
                progress=False, max_steps=4)
    rows = [json.loads(x) for x in r.log_path.read_text().splitlines() if "loss" in x]
    own = {"rkd": {"rkd_distance", "rkd_angle"}, "dkd": {"tckd", "nckd"}, "ranking_kd": {"ranking"}}[method]
    assert r.steps == len(rows) == 4 and all(own | {"task"} <= set(x) for x in rows)
    assert all(np.isfinite(x[k]) for x in rows for k in own | {"task", "loss"})
    assert any(x[k] > 0 for x in rows for k in own)
    ck = torch.load(tmp_path / method / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(v, before[k]) for k, v in ck["distiller"]["student"].items())
    assert load_model(r.model_dir)[0].config.recsys["distilled_with"] == method


def test_rkd_needs_no_projection_for_a_narrower_student(teacher, tiny_data, tmp_path):
    """RKD compares distances and angles inside each model's own space: a 16-wide student learns
    from the 32-wide teacher with no Adapt layer in its loss."""
    cfg = copy.deepcopy(teacher.config)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 16, 32, 2
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(cfg)
    d = make_distiller(teacher, student, "rkd", training_windows(tiny_data.train_sequences(), MAX_LEN))
    teacher.eval().requires_grad_(False)
    try:
        total, terms, _ = d.compute(*batch(training_windows(tiny_data.train_sequences(), MAX_LEN), n=32))
        total.backward()
    finally:
        teacher.requires_grad_(True)
    assert terms["rkd_distance"] > 0 and terms["rkd_angle"] > 0 and torch.isfinite(total)
    assert all(p.grad is None for p in d.adapters.parameters())  # the loss never used them


def test_distill_end_to_end_writes_student_log_and_checkpoint(teacher, tiny_data, tmp_path):
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = truncate(teacher, [0, 3])
    cfg = DistillConfig(method="fisher_ld", train=FAST, ema_every=3)
    r = distill(teacher, student, tiny_data, cfg, tmp_path / "run", progress=False)
    assert r.steps == 2 * int(np.ceil(len(training_windows(tiny_data.train_sequences(), MAX_LEN)) / 64))
    assert r.stop_reason == "epochs" and r.fisher_source.startswith("estimated")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())  # teacher untouched
    rows = [json.loads(x) for x in r.log_path.read_text().splitlines()]
    # the best validation round of the log is the one kept, and the saved student scores it again
    best = max((x for x in rows if "valid" in x), key=lambda x: x["valid"]["ndcg@10"])
    assert (r.best_valid, r.best_step) == (best["valid"], best["step"])
    saved, _ = load_model(r.model_dir)
    again = evaluate_model(saved, tiny_data.split("valid"), MAX_LEN).metrics["ndcg@10"]
    assert again == pytest.approx(r.best_valid["ndcg@10"], abs=1e-4)
    assert rows[0]["step"] == 0 and "valid" in rows[0]  # the untouched student is validated too
    assert any("weights" in x for x in rows) and sum("valid" in x for x in rows) == 3
    model, vocab = load_model(r.model_dir)
    meta = model.config.recsys
    assert meta["distilled_with"] == "fisher_ld" and meta["teacher_layers"] == [0, 3] and vocab.size == model.config.vocab_size
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "result.json").exists()
    # resuming a finished run trains nothing and keeps the Fisher scores and weights it had
    again = distill(teacher, truncate(teacher, [0, 3]), tiny_data, cfg, tmp_path / "run", progress=False, resume=True)
    assert again.steps == r.steps and again.fisher_source == r.fisher_source and again.fisher_seconds == 0
    assert again.layer_weights == r.layer_weights and again.best_valid == r.best_valid


def test_resume_continues_from_the_saved_step(teacher, tiny_data, tmp_path):
    cfg = DistillConfig(method="uniform_ld", train=FAST, cache_teacher=False)
    full = truncate(teacher, [0, 3])
    r_full = distill(teacher, full, tiny_data, cfg, tmp_path / "a", progress=False)

    part = truncate(teacher, [0, 3])
    r1 = distill(teacher, part, tiny_data, cfg, tmp_path / "b", progress=False, max_steps=3)
    assert r1.steps == 3 and r1.stop_reason == "step limit"
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["distiller"]["step"] == 3
    resumed = truncate(teacher, [0, 3])  # a fresh process would load the student again
    r2 = distill(teacher, resumed, tiny_data, cfg, tmp_path / "b", progress=False, resume=True)
    assert r2.steps == r_full.steps and r2.stop_reason == "epochs"
    steps = [json.loads(x)["step"] for x in r2.log_path.read_text().splitlines() if "loss" in x]
    assert steps == list(range(1, r_full.steps + 1))  # no step repeated or lost
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert r2.best_valid["ndcg@10"] == pytest.approx(r_full.best_valid["ndcg@10"], abs=1e-6)
    with pytest.raises(CompressorError, match="different config"):
        distill(teacher, truncate(teacher, [0, 3]), tiny_data, cfg.model_copy(update={"lam": 0.5}),
                tmp_path / "b", progress=False, resume=True)


def test_partial_train_section_keeps_the_distillation_defaults(tmp_path):
    from compressor.config import load_config
    from compressor.distill import DISTILL_TRAIN

    (tmp_path / "c.yaml").write_text("method: pkd\ntrain:\n  epochs: 3\n")
    cfg = load_config(DistillConfig, tmp_path / "c.yaml")
    assert cfg.method == "pkd" and cfg.train.epochs == 3
    assert cfg.train.lr == DISTILL_TRAIN.lr and cfg.train.max_minutes == DISTILL_TRAIN.max_minutes


def test_bad_inputs_raise(teacher, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="unknown distillation method"):
        DistillConfig(method="nope")
    with pytest.raises(ValueError, match="random_windows is for teacher training"):
        DistillConfig(train={"random_windows": True})
    with pytest.raises(ValueError, match="ema_decay is for teacher training"):
        DistillConfig(train={"ema_decay": 0.99})
    other = copy.deepcopy(teacher.config)
    other.vocab_size = teacher.config.vocab_size + 5
    with pytest.raises(CompressorError, match="different item vocabularies"):
        distill(teacher, AutoModelForCausalLM.from_config(other), tiny_data, DistillConfig(train=FAST), tmp_path)
    with pytest.raises(CompressorError, match="out of range"):
        distill(teacher, truncate(teacher, [0, 3]), tiny_data, DistillConfig(layer_map=[0, 9], train=FAST), tmp_path)


def test_cli_distill_and_its_errors(tiny_teacher_dir, tmp_path, capsys):
    inter = tiny_interactions()
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(tmp_path / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(tmp_path / "movies.csv", index=False)
    data = str(tmp_path)
    teacher, vocab = load_model(tiny_teacher_dir)
    save_model(truncate(teacher, [0, 3]), vocab, tmp_path / "student")
    base = ["distill", "--teacher", str(tiny_teacher_dir), "--student", str(tmp_path / "student"), "--data", data]
    ok = base + ["--method", "logit_kd", "--out", str(tmp_path / "out"), "train.epochs=1", "train.batch_size=128"]
    assert main(ok) == 0
    assert "logit_kd: student saved" in capsys.readouterr().err  # status is logged to stderr
    assert main(base + ["--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown distillation method" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("layer_map: [0, 7]\n")
    assert main(base + ["--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err
    # a student over another catalogue
    d20 = prepare(tiny_interactions(20))
    save_model(build_teacher(tiny_teacher_config(num_layers=2), d20.vocab), d20.vocab, tmp_path / "alien")
    err = base[:4] + [str(tmp_path / "alien"), "--data", data, "--out", str(tmp_path / "x")]
    assert main(err) == 2
    assert "different item vocabularies" in capsys.readouterr().err


class _Payload:
    """A pickle that runs code when loaded: what a crafted checkpoint.pt would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(teacher, tiny_data, tmp_path):
    out, marker = tmp_path / "o", tmp_path / "pwned"
    out.mkdir()
    torch.save({"config": {}, "distiller": _Payload(marker), "loop": {}}, out / "checkpoint.pt")
    cfg = DistillConfig(method="uniform_ld", train=FAST, cache_teacher=False)
    with pytest.raises(CompressorError, match="refused"):
        distill(teacher, truncate(teacher, [0, 3]), tiny_data, cfg, out, progress=False, resume=True)
    assert not marker.exists()
    (out / "checkpoint.pt").write_bytes(b"\x80\x04garbage")  # corrupt, not a zip: refused the same way
    with pytest.raises(CompressorError, match="refused"):
        distill(teacher, truncate(teacher, [0, 3]), tiny_data, cfg, out, progress=False, resume=True)


def test_a_kill_before_the_first_validation_resumes_without_losing_steps(tiny_teacher_dir, tiny_data, tmp_path):
    """checkpoint_minutes writes checkpoints mid-epoch, so SIGKILL before any validation (or any
    step-count checkpoint) loses at most that interval, not the epoch (issue #12 item 11)."""
    import signal
    import subprocess
    import sys
    import time

    inter = tiny_interactions()
    inter.events.rename(columns={"user": "userId", "item": "movieId"}).to_csv(tmp_path / "ratings.csv", index=False)
    inter.items.rename(columns={"item": "movieId"}).to_csv(tmp_path / "movies.csv", index=False)
    teacher, vocab = load_model(tiny_teacher_dir)
    save_model(truncate(teacher, [0, 3]), vocab, tmp_path / "student")
    out = tmp_path / "out"
    # One epoch of batch-1 steps with no validation until its end: only the time-interval
    # checkpoint (every ~0.2 s) can be on disk when the process is killed.
    overrides = ["method=uniform_ld", "eval_at_start=false", "checkpoint_every=0", "checkpoint_minutes=0.003",
                 "train.epochs=1", "train.batch_size=1"]
    cmd = [sys.executable, "-m", "compressor", "distill", "-q", "--teacher", str(tiny_teacher_dir),
           "--student", str(tmp_path / "student"), "--data", str(tmp_path), "--out", str(out), *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, f"ended before a checkpoint appeared: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    saved_step = ck["distiller"]["step"]
    assert ck["loop"]["last_eval_step"] == -1 and ck["loop"]["epoch"] == 0 and saved_step > 0
    assert not (out / "student").exists()  # killed mid-epoch, before the run could finish

    from compressor.config import load_config

    cfg = load_config(DistillConfig, None, overrides)
    windows = training_windows(prepare(inter).train_sequences(), MAX_LEN)
    r = distill(teacher, truncate(teacher, [0, 3]), prepare(inter), cfg, out, progress=False, resume=True)
    assert r.steps == len(windows) and r.stop_reason == "epochs"
    steps = [json.loads(x)["step"] for x in r.log_path.read_text().splitlines() if "loss" in x]
    assert steps == list(range(1, len(windows) + 1))  # the killed run's steps kept, none repeated
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["loop"]["finished"] and ck["distiller"]["step"] == len(windows) > saved_step
