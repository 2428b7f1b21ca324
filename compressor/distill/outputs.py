"""How a distillation step scores items, `distill.output` (the registry `OUTPUTS`):

    full        both models' logits over the whole catalogue at every label position; the task
                loss is the full-softmax cross-entropy, KD the full T²·KL (the default)
    candidates  logits on a candidate set per position only: its target and the teacher's top
                `candidates_topk` items, scored exactly, plus `candidates_negatives` items shared
                by the batch, drawn from a (training count + 1)^`candidates_alpha` proposal and
                logQ-corrected (compressor/sampled_softmax.py). The task loss is the sampled
                softmax of the target over them (the teacher's top-k act as exactly scored extra
                negatives), KD the T²·KL over them. The teacher's top-k is found without
                gradients, a catalogue chunk at a time; the student's graph holds N x (1 + k + K)
                logits and an N x (1 + k) x H gather of its item table, never N x items.

Built once per run, `OUTPUTS[cfg.output](cfg, n_special, proposal)`, and called per step with both
models and the label positions' final hidden states (N, H): it returns the `Scores` the losses read.

Under torchrun each rank draws its own negatives from the torch RNG the trainer seeds per rank
(seed + rank, kept in checkpoints): every rank's loss is its own estimate, and the gradients DDP
averages have seen world_size x K negatives, with no communication and the same draws on a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from compressor.errors import CompressorError
from compressor.sampled_softmax import (
    TOPK_SEARCH,
    Proposal,
    candidate_kd_loss,
    candidate_scores,
    sample_log_weights,
    topk_search,
)


@dataclass
class Scores:
    """One step's item scores, as the losses read them (`losses.Batch`)."""

    task: torch.Tensor  # the student's next-item cross-entropy, scalar
    s_logits: torch.Tensor | None = None  # (N, items): full only
    t_logits: torch.Tensor | None = None  # (N, items) teacher, no gradient: full only
    target: torch.Tensor | None = None  # (N,) index of each row's next item into the logits: full only
    kd: Callable[[float], torch.Tensor] | None = None  # temperature -> T²·KL(teacher ‖ student), where the logits are not full


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class FullSoftmax:
    """Logits over every item (specials dropped: padding is never a target)."""

    def __init__(self, cfg, n_special: int, proposal: Proposal | None = None) -> None:
        self.ns = n_special

    def __call__(self, student, teacher, s_last: torch.Tensor, t_last: torch.Tensor | None,
                 labels: torch.Tensor) -> Scores:
        ns = self.ns
        s_logits = student.get_output_embeddings()(s_last)[:, ns:]
        target = labels - ns
        t_logits = None
        if t_last is not None:
            with torch.no_grad():
                t_logits = teacher.get_output_embeddings()(t_last)[:, ns:]
        return Scores(F.cross_entropy(s_logits, target), s_logits, t_logits, target)


class CandidateSoftmax:
    """Logits on each row's target, the teacher's top-k and the batch's sampled negatives only."""

    def __init__(self, cfg, n_special: int, proposal: Proposal | None = None) -> None:
        self.k, self.negatives, self.ns = cfg.candidates_topk, cfg.candidates_negatives, n_special
        self.search, self.topk = cfg.candidates_search, None  # built on the first step, from the teacher
        self.proposal = proposal
        self.log_q = None if proposal is None else proposal.log_q

    def __call__(self, student, teacher, s_last: torch.Tensor, t_last: torch.Tensor | None,
                 labels: torch.Tensor) -> Scores:
        """`t_last` None (a method that reads no teacher distribution): the plain sampled softmax."""
        if self.proposal is None:
            self.proposal = Proposal.uniform(student.config.vocab_size, self.ns)
            self.log_q = self.proposal.log_q
        dev = s_last.device
        if self.log_q.device != dev:
            self.log_q = self.log_q.to(dev)  # once, not a catalogue-sized copy per step
        negs = self.proposal.sample(self.negatives).to(dev)  # the torch RNG: seeded per rank
        exact = labels[:, None]
        if t_last is not None:
            t_table, t_bias = _head(teacher)
            if self.topk is None:  # the teacher is frozen: one search structure for the whole run
                self.topk = TOPK_SEARCH[topk_search(self.search, len(t_table) - self.ns)](
                    t_table, t_bias, self.k, self.ns)
            exact = torch.cat([exact, self.topk(t_last)], 1)
        log_w = sample_log_weights(exact.shape[1], negs, self.log_q)
        s_table, s_bias = _head(student)
        s = candidate_scores(s_last, s_table, exact, negs, s_bias)
        # the target is each row's first candidate (never masked: its first occurrence)
        task = F.cross_entropy((s + log_w).float(), torch.zeros(len(exact), dtype=torch.long, device=dev))
        if t_last is None:
            return Scores(task)
        with torch.no_grad():
            t = candidate_scores(t_last, t_table, exact, negs, t_bias)
        return Scores(task, kd=partial(candidate_kd_loss, s, t, log_w))


OUTPUTS = {"full": FullSoftmax, "candidates": CandidateSoftmax}


def make_output(cfg, loss, n_special: int, proposal: Proposal | None = None):
    """`OUTPUTS[cfg.output]` for `loss` (a DistillLoss), refusing a method that needs the full logits."""
    if cfg.output not in OUTPUTS:
        raise CompressorError(f"unknown distill.output {cfg.output!r}; choose one of {', '.join(OUTPUTS)}")
    if cfg.output != "full" and loss.full_logits:
        raise CompressorError(f"distill.method={cfg.method} reads the full-catalogue logits: it needs distill.output=full")
    return OUTPUTS[cfg.output](cfg, n_special, proposal)
