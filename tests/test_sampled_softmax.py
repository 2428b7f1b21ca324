"""Sampled losses against their full-catalogue versions: exact where they must be equal, and the
logQ correction's gradient closer to the full softmax's than the uncorrected one's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor.sampled_softmax import (
    Proposal,
    candidate_kd_loss,
    sampled_logits,
    sampled_softmax_loss,
    teacher_candidates,
)

V, H, N = 41, 8, 12  # token 0 is padding; items are tokens 1..40


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randint(1, V, (N,), generator=g))


def test_every_item_as_a_negative_under_a_uniform_proposal_is_the_full_softmax(batch):
    hidden, table, targets = batch
    every = torch.arange(1, V)
    loss = sampled_softmax_loss(hidden, table, targets, every, Proposal.uniform(V).log_q)
    full = F.cross_entropy(hidden @ table[1:].T, targets - 1)  # the full softmax over items
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_bias_and_accidental_hits(batch):
    hidden, table, targets = batch
    bias = torch.randn(V)
    every = torch.arange(1, V)
    loss = sampled_softmax_loss(hidden, table, targets, every, Proposal.uniform(V).log_q, bias=bias)
    assert loss.item() == pytest.approx(F.cross_entropy(hidden @ table[1:].T + bias[1:], targets - 1).item(), rel=1e-5)
    # only the target drawn as negatives: masked, so the loss is 0 (the target alone in its softmax)
    alone = sampled_softmax_loss(hidden[:1], table, targets[:1], targets[:1].repeat(5), Proposal.uniform(V).log_q)
    assert alone.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k", [8, 20])
def test_logq_correction_brings_the_sample_softmax_towards_the_full_one(batch, k):
    """Averaged over draws from a steep popularity proposal, the softmax weight each negative gets
    in the sample estimates its full-softmax probability (over non-target items) more closely with
    the correction than without (total variation distance, 500 draws)."""
    hidden, table, targets = batch
    q = Proposal.popularity(torch.arange(V, 0, -1).float() ** 2, alpha=1.0)
    full = torch.softmax(hidden @ table.T, -1)
    full[:, 0] = 0
    full[torch.arange(N), targets] = 0
    full /= full.sum(-1, keepdim=True)
    tv = {}
    for correct in (True, False):
        g = torch.Generator().manual_seed(1)
        mean = torch.zeros(N, V)
        for _ in range(500):
            negs = q.sample(k, g)
            w = torch.softmax(sampled_logits(hidden, table, targets, negs, q.log_q, correct=correct)[:, 1:], -1)
            mean.index_add_(1, negs, w / 500)
        tv[correct] = 0.5 * (mean - full).abs().sum(-1).mean().item()
    assert tv[True] < tv[False] - 0.03


def test_proposals():
    q = Proposal.popularity(torch.tensor([0.0, 5.0, 1.0, 0.0]), alpha=1.0)
    assert q.probs[0] == 0 and q.log_q[0] == float("-inf") and q.probs.sum().item() == pytest.approx(1.0)
    assert q.probs[1] > q.probs[2] > q.probs[3] > 0
    draws = q.sample(2000, torch.Generator().manual_seed(0))
    assert (draws > 0).all()
    with pytest.raises(ValueError, match="positive sum"):
        Proposal(torch.zeros(3))


def test_candidate_kd_over_every_item_is_the_full_kd(batch):
    hidden, table, _ = batch
    g = torch.Generator().manual_seed(2)
    t_hidden, t_table = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    cands = torch.arange(1, V).expand(N, -1)
    T = 2.0
    loss = candidate_kd_loss(hidden, table, t_hidden, t_table, cands, T)
    ls, lt = F.log_softmax(hidden @ table[1:].T / T, -1), F.log_softmax(t_hidden @ t_table[1:].T / T, -1)
    full = (lt.exp() * (lt - ls)).sum(-1).mean() * T**2
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    # a candidate repeated in a row counts once
    doubled = torch.cat([cands, cands[:, :5]], dim=1)
    assert candidate_kd_loss(hidden, table, t_hidden, t_table, doubled, T).item() == pytest.approx(full.item(), rel=1e-5)
    # a student equal to the teacher has nothing to learn
    assert candidate_kd_loss(t_hidden, t_table, t_hidden, t_table, cands[:, :7], T).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_candidates_are_the_top_k_found_chunk_by_chunk(batch):
    hidden, table, _ = batch
    negs = torch.tensor([3, 4])
    cands = teacher_candidates(hidden, table, k=5, negatives=negs, chunk=7)
    scores = hidden @ table.T
    scores[:, 0] = float("-inf")
    assert cands.shape == (N, 7) and (cands[:, 5:] == negs).all()
    assert torch.equal(cands[:, :5].sort(1).values, scores.topk(5, dim=1).indices.sort(1).values)


def test_the_model_level_loss_trains_the_decoder_and_only_the_sampled_item_rows(tiny_data):
    from compressor.sampled_softmax import SampledNextItemLoss, train_proposal
    from compressor.teacher import build_teacher
    from tests.conftest import tiny_teacher_config

    cfg = tiny_teacher_config(num_layers=2)
    model = build_teacher(cfg, tiny_data.vocab)
    q = train_proposal(tiny_data.train_sequences(), tiny_data.vocab.size, alpha=0.75)
    assert q.probs[0] == 0 and q.probs.sum().item() == pytest.approx(1.0)
    loss_module = SampledNextItemLoss(model, q, negatives=16)
    ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, 4, 5, 6], [7, 8, 9, 10]])
    torch.manual_seed(0)
    loss = loss_module(ids, mask, labels)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    table = model.get_output_embeddings().weight
    touched = (table.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    # tied embeddings: the input ids, the targets and the 16 negatives at most
    assert len(touched) <= 10 + 16 and all(t in touched for t in (4, 5, 6, 7, 8, 9, 10))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "layers" in n)


def test_a_teacher_trains_with_the_sampled_loss_and_learns(tiny_data, tmp_path):
    """teacher.train.loss=sampled end to end (TeacherTask): the loss falls and validation beats an
    untrained model; FSDP is refused with one line."""
    from compressor.evaluate import evaluate_model
    from compressor.teacher import build_teacher, train_teacher
    from tests.conftest import tiny_teacher_config

    cfg = tiny_teacher_config(num_layers=2, loss="sampled", sampled_negatives=64)
    cfg.train.epochs = 3
    model, summary = train_teacher(tiny_data, cfg, tmp_path / "t")
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert losses and losses[-1] < losses[0]
    untrained = build_teacher(cfg, tiny_data.vocab)
    valid = tiny_data.split("valid")
    assert evaluate_model(model, valid, cfg.max_len).metrics["ndcg@10"] > \
        evaluate_model(untrained, valid, cfg.max_len).metrics["ndcg@10"]
