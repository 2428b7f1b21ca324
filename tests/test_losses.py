"""The output terms of rkd, dkd and ranking_kd: hand-worked values on tiny tensors (computed here
with plain formulas, independently of the implementation), their minima, invariances and which
side gets gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compressor.distill.losses import kd_loss
from compressor.distill.output_terms import (
    dkd_terms,
    last_positions,
    logsumexp_without,
    rkd_angle,
    rkd_distance,
    topk_listnet,
)


def huber(a: float, b: float) -> float:
    """Huber loss with δ = 1 (what the RKD paper uses)."""
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


T3 = [(0.0, 0.0), (3.0, 0.0), (0.0, 4.0)]  # a 3-4-5 right triangle
S3 = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]  # an isosceles right triangle


def _t(points) -> torch.Tensor:
    return torch.tensor(points, dtype=torch.float32)


# ---------------------------------------------------------------- RKD

def test_rkd_distance_by_hand():
    def normalised(pts):
        d = [math.dist(pts[i], pts[j]) for i, j in itertools.permutations(range(len(pts)), 2)]
        mu = sum(d) / len(d)
        return [x / mu for x in d]

    expected = sum(huber(s, t) for s, t in zip(normalised(S3), normalised(T3), strict=True)) / 6
    # teacher distances 3, 4, 5 (mean 4); student 1, 1, √2 (mean (2 + √2)/3)
    assert rkd_distance(_t(T3), _t(S3)).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


def test_rkd_angle_by_hand():
    def cosines(pts):
        out = []
        for i, j, k in itertools.permutations(range(len(pts)), 3):  # angle at vertex j
            a = [pts[i][d] - pts[j][d] for d in range(2)]
            b = [pts[k][d] - pts[j][d] for d in range(2)]
            out.append(sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b)))
        return out

    ct, cs = cosines(T3), cosines(S3)
    assert sorted(set(round(c, 6) for c in ct)) == [0.0, 0.6, 0.8]  # the 3-4-5 triangle's angles
    expected = sum(huber(s, t) for s, t in zip(cs, ct, strict=True)) / len(ct)
    assert rkd_angle(_t(T3), _t(S3)).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


def test_rkd_is_zero_for_the_same_relations_in_any_width_scale_rotation_and_place():
    torch.manual_seed(0)
    t = torch.randn(12, 6)
    assert rkd_distance(t, t.clone()).item() == 0 and rkd_angle(t, t.clone()).item() == 0
    q, _ = torch.linalg.qr(torch.randn(9, 9))
    s = 3.0 * t @ q[:6] + 5.0  # rows of q orthonormal: an isometric embedding into 9-D, scaled, moved
    assert rkd_distance(t, s).item() < 1e-6 and rkd_angle(t, s).item() < 1e-6
    other = torch.randn(12, 9)
    assert rkd_distance(t, other).item() > 1e-3 and rkd_angle(t, other).item() > 1e-3


def test_rkd_small_batches_and_duplicate_rows_stay_finite():
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4)
    assert rkd_angle(t, s).item() == 0  # two points have no angle
    assert rkd_distance(t[:1], s[:1]).item() == 0  # one point has no distance
    (rkd_distance(t, s) + rkd_angle(t, s)).backward()
    assert torch.isfinite(s.grad).all()
    dup = torch.randn(5, 4)
    dup[3] = dup[1]  # two users with the same history get the same query vector
    s = (dup * 2).requires_grad_(True)
    loss = rkd_distance(dup, s) + rkd_angle(dup, s)
    loss.backward()
    assert loss.item() < 1e-6 and torch.isfinite(s.grad).all()


def test_last_positions_reads_each_historys_last_real_state():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[False, False, True, True], [True, True, True, False]])  # left / right padded
    assert last_positions(x, mask).squeeze(1).tolist() == [3.0, 6.0]
    empty = torch.tensor([[False] * 4, [True] * 4])
    assert last_positions(x, empty).squeeze(1).tolist() == [7.0]  # a row without positions is dropped


# ---------------------------------------------------------------- DKD

def test_dkd_by_hand():
    zs, zt, target, tau = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 0, 2.0
    ps, pt = softmax([v / tau for v in zs]), softmax([v / tau for v in zt])
    tckd = kl([pt[target], 1 - pt[target]], [ps[target], 1 - ps[target]]) * tau**2
    nckd = kl(softmax([zt[1] / tau, zt[2] / tau]), softmax([zs[1] / tau, zs[2] / tau])) * tau**2
    got = dkd_terms(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([target]), tau)
    assert got[0].item() == pytest.approx(tckd, rel=1e-5) and got[1].item() == pytest.approx(nckd, rel=1e-5)
    assert tckd > 0.01 and nckd > 0.01


def test_dkd_decomposes_kd_and_vanishes_for_identical_logits():
    """The paper's identity, per row: T²·KL = TCKD + (1 − p_t^T)·NCKD; identical logits give 0."""
    torch.manual_seed(1)
    s, t, tau = torch.randn(5, 30) * 3, torch.randn(5, 30) * 3, 4.0
    target = torch.randint(0, 30, (5,))
    for r in range(5):
        tckd, nckd = dkd_terms(s[r : r + 1], t[r : r + 1], target[r : r + 1], tau)
        p_t = torch.softmax(t[r] / tau, -1)[target[r]]
        assert (tckd + (1 - p_t) * nckd).item() == pytest.approx(kd_loss(s[r : r + 1], t[r : r + 1], tau).item(), rel=1e-4)
    same = dkd_terms(t, t.clone(), target, tau)
    assert same[0].item() == pytest.approx(0, abs=1e-7) and same[1].item() == pytest.approx(0, abs=1e-7)
    # a confident teacher (p_t ≈ 1) stays finite: 1 − p_t is computed in log space
    sure = torch.zeros(1, 30)
    sure[0, 3] = 200.0
    student = torch.randn(1, 30)
    tckd, nckd = dkd_terms(student, sure, torch.tensor([3]), 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    assert tckd.item() == pytest.approx(-torch.log_softmax(student[0], -1)[3].item(), rel=1e-4)  # KL([1, 0] ‖ b^S)


# ---------------------------------------------------------------- ranking

ZT = [3.0, 1.0, 2.0, 0.0, -1.0]  # teacher top-2: items 0, 2; the rest 1, 3, 4


def _listnet_by_hand(zs: list[float], zt: list[float], top: list[int], tau: float) -> float:
    def classes(z):
        p = softmax([v / tau for v in z])
        return [p[i] for i in top] + [sum(p[i] for i in range(len(z)) if i not in top)]

    return kl(classes(zt), classes(zs)) * tau**2


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_listnet_by_hand(tau):
    zs = [0.0, 1.0, 2.0, 0.0, 0.0]
    expected = _listnet_by_hand(zs, ZT, [0, 2], tau)
    got = topk_listnet(torch.tensor([zs]), torch.tensor([ZT]), 2, tau).item()
    assert got == pytest.approx(expected, rel=1e-5) and expected > 0.05


def test_topk_listnet_minimum_is_the_teachers_top_k_scores():
    t = torch.tensor([ZT])
    assert topk_listnet(t.clone(), t, 2, 1.0).item() == pytest.approx(0, abs=1e-7)
    assert topk_listnet(t + 7.0, t, 2, 1.0).item() == pytest.approx(0, abs=1e-6)  # a shift changes no rank
    # the order inside the tail is not taught: same top-2 logits, same tail mass, tail permuted
    assert topk_listnet(torch.tensor([[3.0, 0.0, 2.0, -1.0, 1.0]]), t, 2, 1.0).item() == pytest.approx(0, abs=1e-6)
    swapped = topk_listnet(torch.tensor([[2.0, 1.0, 3.0, 0.0, -1.0]]), t, 2, 1.0).item()  # top-2 order reversed
    flatter = topk_listnet(torch.tensor([[2.5, 1.0, 2.0, 0.0, -1.0]]), t, 2, 1.0).item()  # same order, smaller margin
    sunk = topk_listnet(torch.tensor([[3.0, 5.0, 2.0, 5.0, 5.0]]), t, 2, 1.0).item()  # top-2 kept, tail above it
    assert swapped > flatter > 0 and sunk > 0.5  # plain top-k ListNet would give `sunk` 0
    torch.manual_seed(2)
    for _ in range(20):  # every other student scores worse than the teacher's own logits
        assert topk_listnet(t + torch.randn(1, 5), t, 2, 1.0).item() > 0


def test_topk_listnet_with_k_as_large_as_the_catalogue():
    t = torch.tensor([ZT])
    s = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0]])
    full = topk_listnet(s, t, 50, 1.0)  # k capped at 5: no rest class, plain ListNet over all items
    assert full.item() == pytest.approx(kl(softmax(ZT), softmax(s[0].tolist())), rel=1e-5)


def test_topk_listnet_for_a_student_whose_top_k_hold_nearly_all_the_mass():
    sharp = torch.tensor([[60.0, 0.0, 59.0, 0.0, 0.0]], requires_grad=True)  # rest share ~e^-59
    t = torch.tensor([ZT])
    loss = topk_listnet(sharp, t, 2, 1.0)
    assert loss.item() == pytest.approx(_listnet_by_hand(sharp[0].tolist(), ZT, [0, 2], 1.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(sharp.grad).all() and loss.item() > 1


def test_logsumexp_without_is_exact_when_the_removed_items_hold_most_of_the_mass():
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0], [40.0, 0.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    cols = torch.tensor([[1], [0], [2]])  # row 1 removes an item holding all but e^-39 of the mass
    got = logsumexp_without(z, cols, z.logsumexp(1), z.gather(1, cols).logsumexp(1))
    rows = z.detach().tolist()
    keep = [[j for j in range(4) if j != c] for c in cols[:, 0].tolist()]
    expected = [math.log(sum(math.exp(r[j]) for j in js)) for r, js in zip(rows, keep, strict=True)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    got.sum().backward()  # d/dz_j = softmax over the kept items, 0 for the removed one
    for r, js, c, g in zip(rows, keep, cols[:, 0].tolist(), z.grad.tolist(), strict=True):
        sm = softmax([r[j] for j in js])
        assert [g[j] for j in js] == pytest.approx(sm, abs=1e-6) and abs(g[c]) < 1e-6


# ---------------------------------------------------------------- gradients

def test_gradients_reach_the_student_only():
    torch.manual_seed(3)
    t_vec = torch.randn(8, 6, requires_grad=True)
    s_vec = torch.randn(8, 4, requires_grad=True)
    t_log = torch.randn(8, 40, requires_grad=True)
    s_log = torch.randn(8, 40, requires_grad=True)
    target = torch.randint(0, 40, (8,))
    total = rkd_distance(t_vec, s_vec) + rkd_angle(t_vec, s_vec) + sum(dkd_terms(s_log, t_log, target, 4.0)) \
        + topk_listnet(s_log, t_log, 10, 1.0)
    total.backward()
    assert t_vec.grad is None and t_log.grad is None
    for g in (s_vec.grad, s_log.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
