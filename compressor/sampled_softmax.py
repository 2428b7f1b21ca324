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
- `candidate_scores` + `candidate_kd_loss`: distillation over a candidate set per row: items
  scored exactly (the target and the teacher's top-k, `teacher_topk`) plus the batch's shared
  sampled negatives, logQ-corrected the same way (`sample_log_weights`) in both models:
  T²·KL(teacher ‖ student) on the candidates only, so the full-catalogue distribution is never
  formed. The cross-entropy of the target over the same candidates is the sampled softmax above
  with the teacher's top-k as extra, exactly scored negatives (`compressor/distill/outputs.py`).

Pure functions of tensors (hidden states, item tables, ids); the caller picks the rows (positions
with a label) and the proposal. With every item as a negative and a uniform proposal both reduce to
their full-catalogue versions exactly (tests/test_sampled_softmax.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from compressor.errors import CompressorError
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


def _repeats(ids: torch.Tensor) -> torch.Tensor:
    """(N, E) bool: True where an id repeats one earlier in its row (only the first occurrence counts)."""
    sorted_ids, order = ids.sort(dim=1, stable=True)
    again = torch.zeros_like(ids, dtype=torch.bool)
    again[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return torch.zeros_like(again).scatter(1, order, again)


def _hits(exact: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: negative k is one of row n's exact ids. A search in each row's sorted ids, so the
    memory is N x K, not N x E x K."""
    sorted_ids = exact.sort(dim=1).values
    where = torch.searchsorted(sorted_ids, negatives.expand(len(exact), -1).contiguous())
    return sorted_ids.gather(1, where.clamp(max=exact.shape[1] - 1)) == negatives[None, :]


def candidate_scores(hidden: torch.Tensor, table: torch.Tensor, exact: torch.Tensor, negatives: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, E + K) raw logits of each row's exact candidates and then the shared negatives, -inf where
    a candidate is not counted: an exact id repeated in its row (after its first occurrence) and a
    negative equal to one of the row's exact ids (that item is already scored exactly).

    hidden (N, H); table (V, H); exact (N, E) token ids scored exactly (the target first, then e.g.
    the teacher's top-k); negatives (K,) token ids drawn from Q, shared by the rows. Only the
    candidates' rows of `table` are read: N x E x H for the exact ones (a gather), N x K for the
    negatives (one product), never N x V."""
    ex = torch.einsum("nh,neh->ne", hidden, table[exact])
    neg = hidden @ table[negatives].T
    if bias is not None:
        ex, neg = ex + bias[exact], neg + bias[negatives][None, :]
    ex = ex.masked_fill(_repeats(exact), float("-inf"))
    neg = neg.masked_fill(_hits(exact, negatives), float("-inf"))
    return torch.cat([ex, neg], dim=1)


def sample_log_weights(n_exact: int, negatives: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(E + K,) the logQ correction added to `candidate_scores` (after any temperature): 0 for the
    exact candidates, -log(K·Q(i)) for each sampled negative i. softmax(z_exact, z_neg - log(K·Q))
    puts exp(z_i)/(K·Q(i)) per draw, an importance-sampling estimate of the non-exact items' share
    of the full softmax's partition function; a duplicate draw counts each time, as it should."""
    corr = -(log_q[negatives] + math.log(negatives.numel()))
    return torch.cat([torch.zeros(n_exact, dtype=corr.dtype, device=corr.device), corr])


def sampled_logits(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                   log_q: torch.Tensor, bias: torch.Tensor | None = None, correct: bool = True) -> torch.Tensor:
    """(N, 1 + K) logits of [target, negatives]: the negatives' minus log(K·Q) (when `correct`),
    accidental hits (a negative equal to the row's target) at -inf. `candidate_scores` with the
    target as the only exact candidate."""
    scores = candidate_scores(hidden, table, targets[:, None], negatives, bias)
    return scores + sample_log_weights(1, negatives, log_q) if correct else scores


def sampled_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                         log_q: torch.Tensor, bias: torch.Tensor | None = None, correct: bool = True) -> torch.Tensor:
    """Mean cross-entropy of each row's target against the shared `negatives`.

    hidden (N, H): the rows to predict from (positions with a label); table (V, H): the output item
    embeddings; targets (N,); negatives (K,) sampled from Q; log_q (V,) = log Q. `correct=False`
    drops the logQ correction (for comparison only: it biases towards Q's unpopular items)."""
    logits = sampled_logits(hidden, table, targets, negatives, log_q, bias, correct)
    return F.cross_entropy(logits.float(), torch.zeros(len(targets), dtype=torch.long, device=logits.device))


def candidate_kd_loss(s_scores: torch.Tensor, t_scores: torch.Tensor, log_weights: torch.Tensor,
                      temperature: float = 2.0) -> torch.Tensor:
    """T²·KL(teacher ‖ student) over each row's candidates, averaged over rows.

    s_scores, t_scores (N, C): `candidate_scores` of the student and the teacher on the same
    candidates (-inf where not counted, in both alike); log_weights (C,): `sample_log_weights`,
    added after the temperature, so each model's tempered softmax over the candidates estimates
    its tempered softmax over the catalogue. The teacher side is a constant (detached). With every
    item an exact candidate (or each item drawn once under a uniform Q, where the weights are 0)
    it is the full-catalogue KD exactly."""
    t = temperature
    w = log_weights.float()
    log_ps = F.log_softmax(s_scores.float() / t + w, -1)
    log_pt = F.log_softmax(t_scores.detach().float() / t + w, -1)
    kl = torch.where(log_pt > float("-inf"), log_pt.exp() * (log_pt - log_ps), 0.0)
    return kl.sum(-1).mean() * t * t


# the teacher's scores held at once by `teacher_topk`: rows x chunk floats (64 MiB)
TOPK_CHUNK_FLOATS = 2**24


def teacher_topk(hidden: torch.Tensor, table: torch.Tensor, k: int, num_special: int = 1,
                 bias: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """(N, k) each row's k highest-scoring item tokens (specials excluded), without gradients.
    The scores are computed a catalogue chunk at a time, keeping only a running top-k, so memory is
    N x (k + chunk), not N x V; `chunk` defaults to TOPK_CHUNK_FLOATS / N items."""
    n, v = hidden.shape[0], table.shape[0]
    k = min(k, v - num_special)
    chunk = chunk or max(1, TOPK_CHUNK_FLOATS // max(1, n))
    best_v = torch.full((n, 0), float("-inf"), device=hidden.device)
    best_i = torch.zeros((n, 0), dtype=torch.long, device=hidden.device)
    with torch.no_grad():
        for a in range(num_special, v, chunk):
            b = min(v, a + chunk)
            scores = (hidden @ table[a:b].T).float()
            if bias is not None:
                scores = scores + bias[a:b].float()
            vals = torch.cat([best_v, scores], 1)
            ids = torch.cat([best_i, torch.arange(a, b, device=scores.device).expand(n, -1)], 1)
            top = vals.topk(min(k, vals.shape[1]), dim=1)
            best_v, best_i = top.values, ids.gather(1, top.indices)
    return best_i


class ExactTopK:
    """`teacher_topk` over the whole table: exact, N x V x H work per call (seconds a step at 10^5
    items and more: benchmarks/results/scaling/topk_search.json)."""

    def __init__(self, table: torch.Tensor, bias: torch.Tensor | None, k: int, num_special: int = 1) -> None:
        self.table, self.bias, self.k, self.ns = table, bias, k, num_special

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return teacher_topk(hidden, self.table, self.k, self.ns, self.bias)


class HnswTopK:
    """An approximate top-k over a frozen item table: a Faiss HNSW inner-product graph built once
    (items as [e_i, b_i], queries as [q, 1], so a head bias is exact), searched with efSearch =
    max(2k, 128). Per call ~N x log(V) work instead of N x V; the graph costs ~V x H x 4 bytes plus
    M = 32 links per item. For distillation's candidates an item the graph misses is simply not
    scored exactly that step (both models see the same candidate set, so the KD stays consistent)."""

    M, EF_CONSTRUCTION = 32, 40

    def __init__(self, table: torch.Tensor, bias: torch.Tensor | None, k: int, num_special: int = 1) -> None:
        try:
            import faiss
        except ImportError as e:  # the cpu/gpu extra carries Faiss
            raise CompressorError("distill.candidates_search=hnsw needs Faiss: pip install "
                                  "'recsys-compressor[cpu]'") from e
        vectors = table[num_special:].detach().float().cpu().numpy()
        self.has_bias = bias is not None
        if self.has_bias:
            vectors = np.hstack([vectors, bias[num_special:, None].detach().float().cpu().numpy()])
        self.k, self.ns = min(k, len(vectors)), num_special
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], self.M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.EF_CONSTRUCTION
        self.index.add(np.ascontiguousarray(vectors))
        self.index.hnsw.efSearch = max(2 * self.k, 128)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        q = hidden.detach().float().cpu().numpy()
        if self.has_bias:
            q = np.hstack([q, np.ones((len(q), 1), dtype=np.float32)])
        _, ids = self.index.search(np.ascontiguousarray(q), self.k)
        # a row the graph could not fill (-1) repeats its best item: repeats are not counted
        ids = np.where(ids < 0, ids[:, :1], ids)
        return torch.from_numpy(ids + self.ns).to(hidden.device)


# how the teacher's top-k is found: `distill.candidates_search`; auto = exact below HNSW_TOPK_ITEMS
TOPK_SEARCH = {"exact": ExactTopK, "hnsw": HnswTopK}
HNSW_TOPK_ITEMS = 100_000  # exact vs graph measured at 10^5 and 10^6 items: benchmarks/results/scaling/topk_search.json


def topk_search(mode: str, num_items: int) -> str:
    """The `TOPK_SEARCH` key `mode` means for a catalogue of `num_items`."""
    if mode == "auto":
        return "hnsw" if num_items >= HNSW_TOPK_ITEMS else "exact"
    if mode not in TOPK_SEARCH:
        raise CompressorError(f"unknown candidates search {mode!r}; choose auto or one of {', '.join(TOPK_SEARCH)}")
    return mode


class SampledNextItemLoss(torch.nn.Module):
    """The teacher's training forward with a sampled softmax: the decoder body, then the loss over
    each labelled position's target and `negatives` items shared by the batch, drawn from
    `proposal`. A module, like the full-softmax one, so DDP sees the whole forward. The item head's
    weight is read directly (tied or not), so the (N, V) logits are never formed; under FSDP that
    weight is sharded, hence DDP (or one process) only."""

    def __init__(self, model, proposal: Proposal, negatives: int) -> None:
        super().__init__()
        self.model, self.proposal, self.negatives = model, proposal, negatives

    @staticmethod
    def as_function(proposal: Proposal, negatives: int):
        """The loss as `fn(model, ids, mask, labels)`, the form `estimate_layer_fisher` takes."""
        return lambda model, ids, mask, labels: SampledNextItemLoss(model, proposal, negatives)(ids, mask, labels)

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
