"""Losses that never build logits over the whole catalogue: what training needs at 10^5-10^7 items.

- `sampled_softmax_loss`: next-item cross-entropy over the target and K negatives shared by the
  batch, drawn from a proposal Q (uniform or popularity^alpha), with the logQ correction
  (Bengio & Senécal 2008; Jean et al. 2015; Yi et al. 2019): each negative's logit has log(K·Q(i))
  subtracted, so the softmax over the sample estimates the full softmax over the catalogue instead
  of favouring what Q over-samples; the target's logit stays exact (its gradient term is exact).
  Measured on the tests' 40-item toy with a steep popularity proposal (300 draws, a script):
  correcting the target too moved the item table's mean gradient away from the full softmax's
  (cosine 0.78 vs 0.86 at K = 8; 0.82 vs 0.89 at K = 20). Negatives equal to a row's target are masked (accidental hits). Cost: N x K x H
  instead of N x V x H, memory N x K logits.
- `candidate_kd_loss`: distillation over a candidate set per row (the teacher's top-K plus the
  shared sampled negatives, logQ-corrected in both models alike): T²·KL(teacher ‖ student) on the
  candidates only, so the full-catalogue distribution is never formed.

Pure functions of tensors (hidden states, item tables, ids); the caller picks the rows (positions
with a label) and the proposal. With every item as a negative and a uniform proposal both reduce to
their full-catalogue versions exactly (tests/test_sampled_softmax.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from compressor.modeling import hidden_states


class Proposal:
    """A sampling distribution Q over item tokens (specials get probability 0): `log_q` (V,) and
    `sample(k, generator)` (k token ids, with replacement)."""

    def __init__(self, weights: torch.Tensor) -> None:
        w = weights.double().clamp_min(0)
        if not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("a proposal needs finite, non-negative weights with a positive sum")
        self.probs = (w / w.sum()).float()
        self.log_q = torch.log(self.probs.double()).float()  # -inf where Q is 0: never sampled

    @classmethod
    def uniform(cls, vocab_size: int, num_special: int = 1) -> Proposal:
        w = torch.ones(vocab_size)
        w[:num_special] = 0
        return cls(w)

    @classmethod
    def popularity(cls, counts: torch.Tensor, alpha: float = 0.75, num_special: int = 1) -> Proposal:
        """Q ∝ (count + 1)^alpha over items (alpha 0 = uniform, 1 = popularity; word2vec used 0.75)."""
        w = (counts.double() + 1.0) ** alpha
        w[:num_special] = 0
        return cls(w)

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(self.probs, k, replacement=True, generator=generator)


def sampled_logits(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                   log_q: torch.Tensor, bias: torch.Tensor | None = None, correct: bool = True) -> torch.Tensor:
    """(N, 1 + K) logits of [target, negatives]: the negatives' minus log(K·Q) (when `correct`),
    accidental hits (a negative equal to the row's target) at -inf."""
    pos = (hidden * table[targets]).sum(-1, keepdim=True)  # (N, 1)
    neg = hidden @ table[negatives].T  # (N, K)
    if bias is not None:
        pos, neg = pos + bias[targets, None], neg + bias[negatives][None, :]
    if correct:
        neg = neg - (log_q[negatives][None, :] + math.log(negatives.numel()))
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    return torch.cat([pos, neg], dim=1)


def sampled_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                         log_q: torch.Tensor, bias: torch.Tensor | None = None, correct: bool = True) -> torch.Tensor:
    """Mean cross-entropy of each row's target against the shared `negatives`.

    hidden (N, H): the rows to predict from (positions with a label); table (V, H): the output item
    embeddings; targets (N,); negatives (K,) sampled from Q; log_q (V,) = log Q. `correct=False`
    drops the logQ correction (for comparison only: it biases towards Q's unpopular items)."""
    logits = sampled_logits(hidden, table, targets, negatives, log_q, bias, correct)
    return F.cross_entropy(logits.float(), torch.zeros(len(targets), dtype=torch.long, device=logits.device))


def candidate_kd_loss(student_hidden: torch.Tensor, student_table: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_table: torch.Tensor, candidates: torch.Tensor, temperature: float = 2.0,
                      log_q: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(teacher ‖ student) over each row's candidate items only.

    candidates (N, C): per row, e.g. the teacher's top-K and the batch's sampled negatives (a row may
    repeat an id: duplicates are masked after their first occurrence). With `log_q` (V,), the
    candidates' logits of both models are logQ-corrected alike, as in the sampled softmax."""
    s = torch.einsum("nh,nch->nc", student_hidden, student_table[candidates])
    t = torch.einsum("nh,nch->nc", teacher_hidden, teacher_table[candidates])
    if log_q is not None:
        s, t = s - log_q[candidates], t - log_q[candidates]
    # mask repeated ids inside a row (a top-K item also drawn as a negative) after the first
    sorted_ids, order = candidates.sort(dim=1, stable=True)
    repeat_sorted = torch.zeros_like(candidates, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter(1, order, repeat_sorted)
    s = s.masked_fill(repeat, float("-inf")) / temperature
    t = t.masked_fill(repeat, float("-inf")) / temperature
    log_ps, log_pt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).masked_fill(repeat, 0.0).sum(-1)
    return kl.mean() * temperature**2


def teacher_candidates(teacher_hidden: torch.Tensor, teacher_table: torch.Tensor, k: int, negatives: torch.Tensor,
                       num_special: int = 1, chunk: int = 65_536) -> torch.Tensor:
    """(N, k + K): each row's teacher top-k items (specials excluded), then the shared negatives.
    The teacher's scores are computed a catalogue chunk at a time, keeping only a running top-k, so
    memory is N x (k + chunk), not N x V."""
    n, v = teacher_hidden.shape[0], teacher_table.shape[0]
    best_v = torch.full((n, 0), float("-inf"), device=teacher_hidden.device)
    best_i = torch.zeros((n, 0), dtype=torch.long, device=teacher_hidden.device)
    with torch.no_grad():
        for a in range(num_special, v, chunk):
            b = min(v, a + chunk)
            scores = teacher_hidden @ teacher_table[a:b].T
            vals = torch.cat([best_v, scores], 1)
            ids = torch.cat([best_i, torch.arange(a, b, device=scores.device).expand(n, -1)], 1)
            top = vals.topk(min(k, vals.shape[1]), dim=1)
            best_v, best_i = top.values, ids.gather(1, top.indices)
    return torch.cat([best_i, negatives.expand(n, -1)], dim=1)


class SampledNextItemLoss(torch.nn.Module):
    """The teacher's training forward with a sampled softmax: the decoder body, then the loss over
    each labelled position's target and `negatives` items shared by the batch, drawn from
    `proposal`. A module, like the full-softmax one, so DDP sees the whole forward. The item head's
    weight is read directly (tied or not), so the (N, V) logits are never formed; under FSDP that
    weight is sharded, hence DDP (or one process) only."""

    def __init__(self, model, proposal: Proposal, negatives: int) -> None:
        super().__init__()
        self.model, self.proposal, self.negatives = model, proposal, negatives

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = hidden_states(self.model, ids, mask).last_hidden_state
        keep = labels != -100
        head = self.model.get_output_embeddings()
        negs = self.proposal.sample(self.negatives).to(h.device)
        return sampled_softmax_loss(h[keep], head.weight, labels[keep], negs, self.proposal.log_q.to(h.device),
                                    getattr(head, "bias", None))


def train_proposal(sequences, vocab_size: int, alpha: float, num_special: int = 1) -> Proposal:
    """Q ∝ (training count + 1)^alpha over the items of `sequences` (token arrays)."""
    flat = np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, dtype=np.int64)
    counts = torch.from_numpy(np.bincount(flat, minlength=vocab_size).astype(np.float64))
    return Proposal.popularity(counts, alpha, num_special)
