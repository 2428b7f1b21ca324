"""The distillation objectives, one class per method, all sharing one trainer.

Every method is a weighted sum of named terms; a method says which terms it has and what the
forward passes must capture for them. The coefficients come from `DistillConfig` and mean the
same thing everywhere, so methods differ only in the knowledge they transfer:

    finetune            CE                                   (no teacher)
    logit_kd            α·CE + β·KD                          (Hinton et al. 2015)
    uniform_ld          α·CE + β·KD + γ·Σ_i (1/K)·MSE_i + λ·L2   (the paper's "Uniform KD")
    fisher_ld           α·CE + β·KD + γ·Σ_i w_i·MSE_i + λ·L2     (w = Fisher weights, EMA-updated)
    fisher_ld_static    fisher_ld with the initial Fisher weights frozen (ablation of the EMA)
    fitnets             α·CE + β·KD + γ·MSE at the student's middle layer (hint, Romero et al.)
    attention_transfer  α·CE + β·KD + γ·AT on head-averaged attention maps of mapped layers
    minilm              α·CE + β·KD + γ·(attention KL + value-relation KL), last layers only
    pkd                 α·CE + β·KD + γ·‖h/‖h‖ − h'/‖h'‖‖² over mapped layers but the last
    tinybert            α·CE + β·KD + γ·(embedding MSE + hidden MSE + attention MSE)
    rkd                 α·CE + λ_D·RKD-D + λ_A·RKD-A on the query vectors  (Park et al. 2019)
    dkd                 α·CE + β·(a·TCKD + b·NCKD)                         (Zhao et al. 2022)
    ranking_kd          α·CE + β·τ²·KL of top-k ListNet probabilities      (after Tang & Wang 2018)

CE is the full-softmax next-item cross-entropy at every real position; KD = T²·KL(teacher ‖
student) of the item distributions at temperature T at the same positions (with
`distill.output=candidates`, both over each position's candidate items instead: `outputs.py`); MSE_i is the mean
over real positions and hidden units of (h^T_{map[i]} − Adapt_i(h^S_i))², hidden states being
the raw layer outputs (before the final norm); L2 is set by `DistillConfig.l2` and, by
default, applied decoupled from Adam (`DistillConfig.l2_mode`). The query vector is each
history's final hidden state (after the final norm) at its last position: what the item head
scores and what serving searches with. The terms of the last three methods are in
`output_terms.py`; DKD and ranking_kd rewrite the logit term, so they take KD's weight β.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compressor.distill.features import Features, Request
from compressor.distill.mapping import Adapters
from compressor.distill.output_terms import (
    dkd_terms,
    last_positions,
    rkd_angle,
    rkd_distance,
    topk_listnet,
)
from compressor.errors import CompressorError


@dataclass
class Batch:
    """What a loss reads from one step: masks, CE, item logits and captured features."""

    mask: torch.Tensor  # (B, T) bool, real positions (= label positions)
    task: torch.Tensor  # CE, scalar
    s_logits: torch.Tensor | None  # (N, items) student logits at the label positions (None: distill.output=candidates)
    t_logits: torch.Tensor | None  # (N, items) teacher logits, same rows
    s: Features
    t: Features | None
    target: torch.Tensor | None = None  # (N,) the true next item of each row, an index into the logits
    kd_fn: Callable[[float], torch.Tensor] | None = None  # T -> the KD term where the logits are not full

    def kd(self, temperature: float) -> torch.Tensor:
        """T²·KL(teacher ‖ student): over the catalogue (`kd_loss` of the logits) or over the
        candidates the step scored (`outputs.CandidateSoftmax`)."""
        if self.kd_fn is not None:
            return self.kd_fn(temperature)
        return kd_loss(self.s_logits, self.t_logits, temperature)


@dataclass
class Context:
    """Per-run facts a loss needs."""

    cfg: object  # DistillConfig (not imported: config imports this module)
    layer_map: list[int]
    n_teacher: int
    n_student: int
    adapters: Adapters
    weights: torch.Tensor  # (K,) layer weights, Σ = 1
    l2: object  # callable returning the L2 term


# ---------------------------------------------------------------- building blocks

def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over rows (Hinton's T² keeps gradients in scale)."""
    t = temperature
    return F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions and features of (a − b)²; a, b (B, T, H)."""
    return (a - b).pow(2).mean(-1)[mask].mean()


def relative_mse(t: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖t − s‖² / ‖t‖² per real position, averaged: the teacher state's own scale divides out, so a
    layer whose hidden states carry outlier dimensions in the hundreds (pretrained LLMs) weighs
    like any other, and the term is ~1 for a student that outputs zeros."""
    err = (t - s).pow(2).sum(-1)
    return (err / t.detach().pow(2).sum(-1).clamp_min(1e-12))[mask].mean()


# how a student layer's hidden state is compared with its teacher layer's (distill.layer_loss)
LAYER_LOSSES = {"mse": masked_mse, "relative": relative_mse}


def _same_heads(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention maps (B, h, T, T); average over heads when the counts differ."""
    if a.shape[1] != b.shape[1]:
        return a.mean(1, keepdim=True), b.mean(1, keepdim=True)
    return a, b


def row_kl(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of distributions along the last axis, (B, h, T, T), averaged over heads and real
    query rows (padding rows are skipped; padded keys have p = 0 and contribute nothing)."""
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-12).log()), 0.0).sum(-1)
    return kl.mean(1)[mask].mean()


def attention_mse(t: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    t, s = _same_heads(t, s)
    return (t - s).pow(2).sum(-1).mean(1)[mask].mean()


def attention_transfer(t: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis: ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖² of each sequence's head-averaged attention
    map, flattened (padding rows zeroed)."""
    m = mask[:, :, None].float()
    qt, qs = (F.normalize((x.mean(1) * m).flatten(1), dim=1) for x in (t, s))
    return (qt - qs).pow(2).sum(1).mean()


def value_relation(v: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM: softmax(V·Vᵀ/√d) per relation head, padded keys masked; v (B, T, W) -> (B, h, T, T)."""
    b, t, w = v.shape
    if w % heads:
        raise CompressorError(f"minilm: value width {w} is not divisible by {heads} relation heads")
    v = v.view(b, t, heads, w // heads).transpose(1, 2)
    scores = v @ v.transpose(-1, -2) / (w // heads) ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.where(mask[:, None, :, None], scores.softmax(-1).nan_to_num(0.0), 0.0)


def normalised_mse(t: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PKD: squared distance of L2-normalised hidden vectors, mean over real positions."""
    return (F.normalize(t, dim=-1) - F.normalize(s, dim=-1)).pow(2).sum(-1)[mask].mean()


# ---------------------------------------------------------------- methods

class DistillLoss:
    """A distillation method: which features it needs and its weighted terms."""

    uses_teacher = True
    attentions = False  # needs eager attention in both models
    fisher = False  # layer weights start from Fisher scores
    dynamic = False  # layer weights follow the EMA of eq. 9 (when cfg.ema)
    l2 = False  # has the λ·L2 term
    item_kd = True  # reads the teacher's distribution over items (the KD term or a variant of it)
    full_logits = False  # reads both models' logits over the whole catalogue (distill.output=full only)

    def request(self, ctx: Context) -> tuple[Request, Request]:
        """(student request, teacher request)."""
        return Request(), Request()

    def terms(self, b: Batch, ctx: Context) -> dict[str, tuple[float, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, b: Batch, ctx: Context) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.terms(b, ctx)
        total = sum(c * v for c, v in terms.values())
        return total, {k: float(v.detach()) for k, (_, v) in terms.items()}

    def base(self, b: Batch, ctx: Context) -> dict[str, tuple[float, torch.Tensor]]:
        return {"task": (ctx.cfg.alpha, b.task), "kd": (ctx.cfg.beta, b.kd(ctx.cfg.temperature))}


class Finetune(DistillLoss):
    uses_teacher = False
    item_kd = False

    def terms(self, b, ctx):
        return {"task": (1.0, b.task)}


class LogitKD(DistillLoss):
    def terms(self, b, ctx):
        return self.base(b, ctx)


class LayerwiseLD(DistillLoss):
    """The FISHER-LD objective; with uniform weights it is the paper's Uniform KD."""

    l2 = True

    def request(self, ctx):
        return Request(layers=frozenset(range(ctx.n_student))), Request(layers=frozenset(ctx.layer_map))

    def terms(self, b, ctx):
        compare = LAYER_LOSSES[ctx.cfg.layer_loss]
        mse = torch.stack([compare(b.t.hidden[t], ctx.adapters(i, b.s.hidden[i]), b.mask)
                           for i, t in enumerate(ctx.layer_map)])
        terms = {**self.base(b, ctx), "layers": (ctx.cfg.gamma, (ctx.weights * mse).sum())}
        if ctx.cfg.l2 != "none" and ctx.cfg.l2_mode == "loss":  # else the Distiller applies it decoupled
            terms["l2"] = (ctx.cfg.lam, ctx.l2())
        return terms


class FisherLD(LayerwiseLD):
    fisher = True
    dynamic = True


class FisherLDStatic(LayerwiseLD):
    fisher = True


class FitNets(DistillLoss):
    def request(self, ctx):
        i = (ctx.n_student - 1) // 2
        return Request(layers=frozenset([i])), Request(layers=frozenset([ctx.layer_map[i]]))

    def terms(self, b, ctx):
        i = (ctx.n_student - 1) // 2
        hint = masked_mse(b.t.hidden[ctx.layer_map[i]], ctx.adapters(i, b.s.hidden[i]), b.mask)
        return {**self.base(b, ctx), "hint": (ctx.cfg.gamma, hint)}


class AttentionTransfer(DistillLoss):
    attentions = True

    def request(self, ctx):
        return Request(attentions=frozenset(range(ctx.n_student))), Request(attentions=frozenset(ctx.layer_map))

    def terms(self, b, ctx):
        at = torch.stack([attention_transfer(b.t.attentions[t], b.s.attentions[i], b.mask)
                          for i, t in enumerate(ctx.layer_map)]).mean()
        return {**self.base(b, ctx), "attention": (ctx.cfg.gamma, at)}


class MiniLM(DistillLoss):
    """Self-attention distributions and value relations of the teacher's last layer into the
    student's last layer (Wang et al. 2020); relation heads = the student's key/value heads."""

    attentions = True

    def request(self, ctx):
        s, t = frozenset([ctx.n_student - 1]), frozenset([ctx.n_teacher - 1])
        return Request(attentions=s, values=s), Request(attentions=t, values=t)

    def terms(self, b, ctx):
        s_i, t_i = ctx.n_student - 1, ctx.n_teacher - 1
        pt, ps = _same_heads(b.t.attentions[t_i], b.s.attentions[s_i])
        heads = relation_heads(b.s.values[s_i].shape[-1], b.t.values[t_i].shape[-1], ps.shape[1])
        vr = row_kl(value_relation(b.t.values[t_i], heads, b.mask), value_relation(b.s.values[s_i], heads, b.mask), b.mask)
        return {**self.base(b, ctx), "attention": (ctx.cfg.gamma, row_kl(pt, ps, b.mask) + vr)}


def relation_heads(w_student: int, w_teacher: int, preferred: int) -> int:
    """The largest head count ≤ `preferred` dividing both value widths."""
    for h in range(max(1, preferred), 0, -1):
        if w_student % h == 0 and w_teacher % h == 0:
            return h
    return 1


class PKD(DistillLoss):
    """Patient KD (Sun et al. 2019), PKD-skip over the mapped layers; the last layer is left to KD
    as in the paper (kept when the student has a single layer)."""

    def _layers(self, ctx):
        return list(range(ctx.n_student - 1)) or [0]

    def request(self, ctx):
        ids = self._layers(ctx)
        return Request(layers=frozenset(ids)), Request(layers=frozenset(ctx.layer_map[i] for i in ids))

    def terms(self, b, ctx):
        pt = torch.stack([normalised_mse(b.t.hidden[ctx.layer_map[i]], ctx.adapters(i, b.s.hidden[i]), b.mask)
                          for i in self._layers(ctx)]).mean()
        return {**self.base(b, ctx), "patient": (ctx.cfg.gamma, pt)}


class TinyBERT(DistillLoss):
    """Embedding + hidden + attention matching over the mapped layers, plus KD (Jiao et al. 2020;
    attention probabilities rather than pre-softmax scores, which Hugging Face does not expose)."""

    attentions = True

    def request(self, ctx):
        s, t = frozenset(range(ctx.n_student)), frozenset(ctx.layer_map)
        return (Request(layers=s, attentions=s, embeddings=True), Request(layers=t, attentions=t, embeddings=True))

    def terms(self, b, ctx):
        pairs = list(enumerate(ctx.layer_map))
        emb = masked_mse(b.t.embeddings, ctx.adapters.embed(b.s.embeddings), b.mask)
        hid = torch.stack([masked_mse(b.t.hidden[t], ctx.adapters(i, b.s.hidden[i]), b.mask) for i, t in pairs]).mean()
        att = torch.stack([attention_mse(b.t.attentions[t], b.s.attentions[i], b.mask) for i, t in pairs]).mean()
        return {**self.base(b, ctx), "embed": (ctx.cfg.gamma, emb), "hidden": (ctx.cfg.gamma, hid),
                "attention": (ctx.cfg.gamma, att)}


class RKD(DistillLoss):
    """Relational KD (Park et al., CVPR 2019), RKD-DA: the student's query vectors of the histories
    in a batch keep the teacher's pairwise distances (normalised by their mean) and triplet angles;
    no KD term, as the paper's RKD-DA. Relations, not coordinates, are matched, so a narrower
    student needs no Adapt projection."""

    item_kd = False

    def terms(self, b, ctx):
        t, s = last_positions(b.t.last, b.mask), last_positions(b.s.last, b.mask)
        return {"task": (ctx.cfg.alpha, b.task), "rkd_distance": (ctx.cfg.rkd_distance, rkd_distance(t, s)),
                "rkd_angle": (ctx.cfg.rkd_angle, rkd_angle(t, s))}


class DKD(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022) over the catalogue softmax at every label position,
    target = the true next item: KD split into its target-vs-rest part (TCKD) and its
    distribution over the other items (NCKD), weighted separately (`dkd_alpha`, `dkd_beta`)."""

    full_logits = True

    def terms(self, b, ctx):
        if b.target is None:
            raise CompressorError("dkd needs the true next item of each row (Batch.target)")
        tckd, nckd = dkd_terms(b.s_logits, b.t_logits, b.target, ctx.cfg.temperature)
        c = ctx.cfg
        return {"task": (c.alpha, b.task), "tckd": (c.beta * c.dkd_alpha, tckd), "nckd": (c.beta * c.dkd_beta, nckd)}


class RankingKD(DistillLoss):
    """Listwise ranking distillation: at every label position the student learns the teacher's
    top-k items, their order and margins, and their total against the rest of the catalogue
    (ListNet top-one probabilities over those k items plus one "rest" class; `topk_listnet`).

    Why this variant. Tang & Wang (KDD 2018) treat the teacher's top-k as extra, rank-weighted
    positives; listwise successors (e.g. DE-RRD's Plackett-Luce, Kang et al. 2020) keep the order.
    A Plackett-Luce (ListMLE) likelihood of the teacher's order has no minimum at the teacher: it
    keeps rewarding a student that is ever more confident in the order of a teacher whose own top
    10 is mostly wrong (test NDCG@10 ≈ 0.05 here). ListNet's KL has its minimum exactly at the
    teacher's scores, so the student copies the teacher's confidence, not more. Plain ListNet over
    the k items alone is shift-invariant, so all k could sink below the rest of the catalogue at
    no cost; the "rest" class is what makes the k items positives, as in Tang & Wang."""

    full_logits = True

    def terms(self, b, ctx):
        c = ctx.cfg
        rank = topk_listnet(b.s_logits, b.t_logits, c.rank_k, c.rank_temperature)
        return {"task": (c.alpha, b.task), "ranking": (c.beta, rank)}


LOSSES: dict[str, DistillLoss] = {
    "fisher_ld": FisherLD(),
    "fisher_ld_static": FisherLDStatic(),
    "uniform_ld": LayerwiseLD(),
    "finetune": Finetune(),
    "logit_kd": LogitKD(),
    "fitnets": FitNets(),
    "attention_transfer": AttentionTransfer(),
    "minilm": MiniLM(),
    "pkd": PKD(),
    "tinybert": TinyBERT(),
    "rkd": RKD(),
    "dkd": DKD(),
    "ranking_kd": RankingKD(),
}


def get_loss(name: str) -> DistillLoss:
    if name not in LOSSES:
        raise CompressorError(f"unknown distillation method {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
