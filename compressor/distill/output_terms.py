"""Distillation terms on what the recommender outputs: the query vector (RKD) and the item logits
over the catalogue (DKD, listwise ranking distillation).

Each function takes (teacher, student) tensors, treats the teacher side as a constant (it is
detached here, so a caller that forgot `no_grad` still trains only the student) and returns a
scalar averaged over rows. The methods that use them are in `losses.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Floor of a squared distance before its square root: the gradient of √x is infinite at 0, and
# the diagonal (a point's distance to itself) is exactly 0.
_EPS = 1e-12


def last_positions(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states -> (B', H): each history's state at its last real position, the query
    vector the item head scores. Works for left or right padding; rows with no real position
    are dropped."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, pos, -1).max(1).values
    rows = (last >= 0).nonzero().squeeze(1)
    return x[rows, last[rows]]


def kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p·(log p − log q) along the last axis, averaged over rows; entries with p = 0 (log p =
    −inf, e.g. a class masked out of both distributions) contribute 0 instead of 0·∞."""
    kl = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0)
    return kl.sum(-1).mean()


# ---------------------------------------------------------------- RKD (Park et al., CVPR 2019)

def _differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, H) -> distances (n, n) and unit vectors u (n, n, H) with u[j, i] = (x_i − x_j)/‖x_i − x_j‖.

    Built from the (n, n, H) differences rather than a Gram matrix: exact for nearby points, at
    n²·H floats (64²·576 = 2.4 M for a batch of the LLM student)."""
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = x_i − x_j
    dist = diff.pow(2).sum(-1).clamp_min(_EPS).sqrt()
    return dist, diff / dist[..., None]  # u[j, j] = 0: the diagonal is excluded by the callers


def rkd_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD: Huber(ψ_D^S, ψ_D^T) over ordered pairs i ≠ j, ψ_D = ‖x_i − x_j‖ / μ,
    μ = the mean distance of that model's pairs in the batch. t (n, H_t), s (n, H_s): the widths
    may differ — only distances inside each space are compared, so no projection is needed."""
    n = t.shape[0]
    if n < 2:  # no pair: a batch of one history carries no relation
        return s.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    dt = _differences(t.detach().float())[0][off]
    ds = _differences(s.float())[0][off]
    return F.smooth_l1_loss(ds / ds.mean().clamp_min(_EPS), dt / dt.mean().clamp_min(_EPS))


def rkd_angle(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD: Huber(ψ_A^S, ψ_A^T) over ordered triplets of distinct rows (i, j, k),
    ψ_A = cos∠x_i x_j x_k = ⟨u_ji, u_jk⟩ (the angle at vertex j). Scale-, rotation- and
    translation-invariant, and width-agnostic like `rkd_distance`. Memory n³ (262 k at n = 64)."""
    n = t.shape[0]
    if n < 3:  # no triplet of distinct points, so no angle
        return s.sum() * 0.0
    i = torch.arange(n, device=s.device)
    distinct = (i[:, None, None] != i[None, :, None]) & (i[:, None, None] != i[None, None, :]) \
        & (i[None, :, None] != i[None, None, :])  # [j, i, k]
    ut = _differences(t.detach().float())[1]
    us = _differences(s.float())[1]
    cos_t = (ut @ ut.transpose(1, 2))[distinct]  # (ut @ utᵀ)[j, i, k] = ⟨u_ji, u_jk⟩
    cos_s = (us @ us.transpose(1, 2))[distinct]
    return F.smooth_l1_loss(cos_s, cos_t)


# ---------------------------------------------------------------- shared by DKD and ranking

def logsumexp_without(z: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """log Σ_{j ∉ cols} e^{z_j} per row of z (N, C), given lse = log Σ_j e^{z_j} and part =
    log Σ_{j ∈ cols} e^{z_j}: lse + log(1 − e^{part − lse}), without a masked copy of z (a
    catalogue-wide pass fewer, forward and backward). float32 loses that difference when `cols`
    hold over half the softmax mass, so those rows — rare: one item or the top-k taking half of
    it — are recomputed from their masked logits, and the result is exact on every row."""
    x = part - lse  # log of the share of `cols`, ≤ 0
    # log1p(−e^x) is accurate for x ≤ −ln 2; the clamp keeps the other rows finite (and their
    # gradient 0) before they are replaced.
    out = lse + torch.log1p(-x.clamp(max=-math.log(2)).exp())
    big = (x > -math.log(2)).nonzero().squeeze(1)
    if big.numel():
        exact = z[big].scatter(1, cols[big], float("-inf")).logsumexp(1)
        out = out.index_put((big,), exact)
    return out


# ---------------------------------------------------------------- DKD (Zhao et al., CVPR 2022)

def dkd_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) at temperature T, each × T² as in the authors' code, averaged over rows.

    TCKD = KL(b^T ‖ b^S), b = [p_t, 1 − p_t] the binary target-vs-rest distribution;
    NCKD = KL(p̂^T ‖ p̂^S), p̂ the softmax over the non-target classes.
    (Classical KD = TCKD + (1 − p_t^T)·NCKD: DKD removes the teacher-confidence factor that
    suppresses NCKD exactly where the teacher is sure.) target (N,) item indices into C.

    NCKD is computed as Σ p̂^T log p̂^T − Σ_j p̂^T_j z^S_j + LSE_{j≠t}(z^S), so the student's
    log p̂ is never materialised over the catalogue; every log-probability is taken in log space."""
    tau = temperature
    col = target[:, None]
    with torch.no_grad():
        zt = t_logits.detach().float() / tau
        lse_t, zt_t = zt.logsumexp(1), zt.gather(1, col).squeeze(1)
        lse_nt_t = logsumexp_without(zt, col, lse_t, zt_t)
        p_nt = (zt - lse_nt_t[:, None]).exp_().scatter_(1, col, 0.0)  # p̂^T, 0 at the target
        neg_entropy = torch.einsum("nc,nc->n", p_nt, zt) - lse_nt_t  # Σ p̂^T log p̂^T
        b_t = torch.stack([zt_t - lse_t, lse_nt_t - lse_t], 1)
    zs = s_logits.float() / tau
    lse_s, zs_t = zs.logsumexp(1), zs.gather(1, col).squeeze(1)
    lse_nt_s = logsumexp_without(zs, col, lse_s, zs_t)
    b_s = torch.stack([zs_t - lse_s, lse_nt_s - lse_s], 1)
    nckd = (neg_entropy - torch.einsum("nc,nc->n", p_nt, zs) + lse_nt_s).mean()
    return kl_from_logs(b_t, b_s) * tau * tau, nckd * tau * tau


# ---------------------------------------------------------------- listwise ranking distillation

def _top_classes(z: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (N, k + 1) of [top_1, ..., top_k, rest] under softmax(z); no rest class
    when top covers the catalogue."""
    lse = z.logsumexp(1)
    head = z.gather(1, top)
    if top.shape[1] == z.shape[1]:
        return head - lse[:, None]
    rest = logsumexp_without(z, top, lse, head.logsumexp(1))
    return torch.cat([head, rest[:, None]], 1) - lse[:, None]


def topk_listnet(s_logits: torch.Tensor, t_logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """τ²·KL(P^T ‖ P^S) of ListNet top-one probabilities over the teacher's top-k items plus one
    "rest of the catalogue" class, under each model's full softmax at temperature τ:

        P(top_r) = softmax(z/τ)[top_r],  r = 1..k;   P(rest) = Σ_{j ∉ top-k} softmax(z/τ)_j

    with top-k the teacher's k highest logits of the row. 0 exactly when the student's logits on
    those items equal the teacher's up to a shift shared with the tail's total, i.e. the same
    top-k order with the same margins; the order inside the tail is deliberately not taught.
    s_logits, t_logits (N, C); k ≥ C is plain ListNet over the whole catalogue."""
    tau = temperature
    with torch.no_grad():
        zt = t_logits.detach().float() / tau
        top = zt.topk(min(k, zt.shape[1]), dim=1).indices  # (N, k), the teacher's order
        log_p = _top_classes(zt, top)
    return kl_from_logs(log_p, _top_classes(s_logits.float() / tau, top)) * tau * tau
