"""Multi-teacher, triplet, metric and relational losses (METHODS.md §2, §3):
reference values by hand, invariances, RNG discipline, and gradients (student only)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.losses.ensemble import (
    EnsembleKDLoss,
    MultiStreamKDLoss,
    RandomTeacherKDLoss,
    ensemble_targets,
)
from kdkit.losses.kd import kd_loss
from kdkit.losses.metric import (
    AbsoluteTeacherLoss,
    RelativeTeacherLoss,
    pairwise_distances,
)
from kdkit.losses.relative import RelativeDissimilarityLoss, sample_triplet_indices
from kdkit.losses.rkd import RKDAngleLoss, RKDDistanceLoss, rkd_angle, rkd_distance
from kdkit.losses.triplet import (
    BatchHardTripletLoss,
    TripletKDLoss,
    sample_negatives,
)


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _logits(b=5, c=4, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g), [torch.randn(b, c, generator=g) * 2 for _ in range(m)]


# ----------------------------------------------------------------------------- ensembles

Z1, Z2, T = [1.0, 2.0, 3.0], [3.0, 0.0, 1.0], 2.0


def test_ensemble_mean_by_hand():
    p1, p2 = _softmax(Z1, T), _softmax(Z2, T)
    got = ensemble_targets([torch.tensor([Z1]), torch.tensor([Z2])], T, "mean")
    expected = [(a + b) / 2 for a, b in zip(p1, p2, strict=True)]
    torch.testing.assert_close(got, torch.tensor([expected]))


def test_ensemble_geometric_by_hand():
    got = ensemble_targets([torch.tensor([Z1]), torch.tensor([Z2])], T, "geometric")
    expected = _softmax([(a + b) / 2 for a, b in zip(Z1, Z2, strict=True)], T)  # (2, 1, 2)/T
    torch.testing.assert_close(got, torch.tensor([expected]))


def test_ensemble_weighted_normalises_weights():
    p1, p2 = _softmax(Z1, T), _softmax(Z2, T)
    got = ensemble_targets(
        [torch.tensor([Z1]), torch.tensor([Z2])], T, "weighted", weights=[1.0, 3.0]
    )
    expected = [0.25 * a + 0.75 * b for a, b in zip(p1, p2, strict=True)]
    torch.testing.assert_close(got, torch.tensor([expected]))
    # A zero weight removes that teacher.
    only2 = ensemble_targets(
        [torch.tensor([Z1]), torch.tensor([Z2])], T, "weighted", weights=[0, 5]
    )
    torch.testing.assert_close(only2, torch.tensor([p2]))


def test_ensemble_confidence_by_hand():
    # softmax_m(−CE_m) ∝ exp(−CE_m) = p_m(y): each teacher weighs by its T=1 probability of y.
    zs = [[Z1, Z2], [Z2, Z1]]  # sample 0 and sample 1 swap the teachers
    teachers = [torch.tensor([zs[0][0], zs[1][0]]), torch.tensor([zs[0][1], zs[1][1]])]
    y = torch.tensor([2, 2])
    got = ensemble_targets(teachers, T, "confidence", target=y)
    for i in range(2):
        c1, c2 = _softmax(zs[i][0])[2], _softmax(zs[i][1])[2]
        w1, w2 = c1 / (c1 + c2), c2 / (c1 + c2)
        p1, p2 = _softmax(zs[i][0], T), _softmax(zs[i][1], T)
        expected = [w1 * a + w2 * b for a, b in zip(p1, p2, strict=True)]
        torch.testing.assert_close(got[i], torch.tensor(expected))
    # z1 = (1, 2, 3) is the confident one for y = 2: its distribution dominates.
    assert got[0, 2] > 0.5 * (_softmax(Z1, T)[2] + _softmax(Z2, T)[2])


@pytest.mark.parametrize("mode", ["mean", "geometric", "weighted", "confidence"])
def test_ensemble_targets_are_distributions(mode):
    _, ts = _logits()
    y = torch.tensor([0, 1, 2, 3, 0])
    w = [1.0, 2.0, 0.5] if mode == "weighted" else None
    p = ensemble_targets(ts, 3.0, mode, weights=w, target=y)
    assert p.shape == (5, 4) and bool((p > 0).all())
    torch.testing.assert_close(p.sum(1), torch.ones(5))


def test_ensemble_argument_errors():
    _, ts = _logits()
    with pytest.raises(KdkitError, match="needs weights"):
        ensemble_targets(ts, 2.0, "weighted")
    with pytest.raises(KdkitError, match="3 teachers"):
        ensemble_targets(ts, 2.0, "weighted", weights=[1.0, 1.0])
    with pytest.raises(KdkitError, match=">= 0"):
        ensemble_targets(ts, 2.0, "weighted", weights=[1.0, -1.0, 1.0])
    with pytest.raises(KdkitError, match="pass target"):
        ensemble_targets(ts, 2.0, "confidence")
    with pytest.raises(KdkitError, match="unknown ensemble mode"):
        ensemble_targets(ts, 2.0, "median")
    with pytest.raises(KdkitError, match="as a list"):
        EnsembleKDLoss()(torch.randn(5, 4), ts[0])
    with pytest.raises(KdkitError, match="empty"):
        EnsembleKDLoss()(torch.randn(5, 4), [])
    with pytest.raises(KdkitError, match="same batch and number of classes"):
        MultiStreamKDLoss()(torch.randn(5, 4), [ts[0], torch.randn(5, 3)])
    with pytest.raises(KdkitError, match="only used with mode 'weighted'"):
        EnsembleKDLoss(mode="mean", weights=[1.0])
    with pytest.raises(KdkitError):
        EnsembleKDLoss(temperature=0.0)


@pytest.mark.parametrize("mode", ["mean", "geometric", "weighted", "confidence"])
def test_ensemble_kd_with_one_teacher_is_kd_exactly(mode):
    zs, ts = _logits(m=1)
    y = torch.tensor([0, 1, 2, 3, 0])
    w = [2.0] if mode == "weighted" else None
    got = EnsembleKDLoss(3.0, mode, w)(zs, ts, target=y)
    assert torch.equal(got, kd_loss(zs, ts[0], 3.0))


@pytest.mark.parametrize("mode", ["mean", "geometric", "weighted", "confidence"])
def test_ensemble_kd_is_t2_kl_to_the_targets(mode):
    zs, ts = _logits()
    y = torch.tensor([0, 1, 2, 3, 0])
    w = [1.0, 2.0, 0.5] if mode == "weighted" else None
    Tk = 3.0
    pbar = ensemble_targets(ts, Tk, mode, weights=w, target=y)
    ps = torch.softmax(zs / Tk, 1)
    expected = Tk**2 * (pbar * (pbar.log() - ps.log())).sum(1).mean()
    got = EnsembleKDLoss(Tk, mode, w)(zs, ts, target=y)
    torch.testing.assert_close(got, expected)
    # Identical teachers: the ensemble is that teacher (up to rounding), in every mode.
    same = EnsembleKDLoss(Tk, mode, w)(zs, [ts[0]] * 3, target=y)
    torch.testing.assert_close(same, kd_loss(zs, ts[0], Tk))


def test_multistream_equals_duplicated_batch():
    zs, ts = _logits()
    got = MultiStreamKDLoss(2.0)(zs, ts)
    # Every sample appears once per teacher, with that teacher's soft labels; batchmean over M·B.
    dup = kd_loss(zs.repeat(len(ts), 1), torch.cat(ts), 2.0)
    torch.testing.assert_close(got, dup)
    torch.testing.assert_close(got, sum(kd_loss(zs, t, 2.0) for t in ts) / 3)


def test_random_teacher_uses_global_rng():
    zs, ts = _logits()
    loss = RandomTeacherKDLoss(2.0)
    per_teacher = [kd_loss(zs, t, 2.0).item() for t in ts]
    torch.manual_seed(123)
    first = [loss(zs, ts).item() for _ in range(30)]
    torch.manual_seed(123)
    second = [loss(zs, ts).item() for _ in range(30)]
    assert first == second
    picked = {min(range(3), key=lambda m, v=v: abs(per_teacher[m] - v)) for v in first}
    assert picked == {0, 1, 2}
    for v in first:
        assert min(abs(v - p) for p in per_teacher) == 0.0
    # It draws exactly one torch.randint(M, ()) per call.
    torch.manual_seed(7)
    m = int(torch.randint(3, ()).item())
    torch.manual_seed(7)
    assert loss(zs, ts).item() == per_teacher[m]


# ------------------------------------------------------------------ relative dissimilarity


def test_triplet_indices_are_distinct_and_cover():
    torch.manual_seed(0)
    q, a, b = sample_triplet_indices(5, per_anchor=200)
    assert q.shape == (1000,)
    assert bool((q != a).all() and (q != b).all() and (a != b).all())
    assert torch.equal(torch.bincount(q), torch.full((5,), 200))
    for anchor in range(5):
        others = set(range(5)) - {anchor}
        assert set(a[q == anchor].tolist()) == others
        assert set(b[q == anchor].tolist()) == others
    torch.manual_seed(0)
    again = sample_triplet_indices(5, per_anchor=200)
    assert all(torch.equal(x, y) for x, y in zip((q, a, b), again, strict=True))


# Teacher points on a line at 0, 1, 10; the "swapped" layout 0, 10, 1 orders every triplet
# the other way. Squared student distances (swapped): d01 = 100, d02 = 1, d12 = 81.
LINE = torch.tensor([[0.0], [1.0], [10.0]])
SWAPPED = torch.tensor([[0.0], [10.0], [1.0]])


def test_relative_dissimilarity_by_hand():
    # Teachers (one in 1-D, one rotated into 2-D and scaled) both say: q+ of 0 is 1, of 1 is 0,
    # of 2 is 1. The swapped student pays (100 − 1), (100 − 81), (81 − 1), each + margin 1.
    t2 = torch.cat([LINE, LINE], 1) * 3.0
    student = SWAPPED.clone().requires_grad_(True)
    loss = RelativeDissimilarityLoss(margin=1.0, triplets_per_anchor=4)
    got = loss(student, [LINE, t2])
    assert got.item() == pytest.approx((99 + 19 + 80) / 3 + 1.0)
    got.backward()
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())
    assert float(student.grad.abs().sum()) > 0


def test_relative_dissimilarity_majority_and_ties():
    loss = RelativeDissimilarityLoss(margin=1.0, triplets_per_anchor=2)
    student = SWAPPED.clone().requires_grad_(True)
    # Two teachers that disagree on every triplet: all skipped, a zero that keeps the graph.
    tie = loss(student, [LINE, SWAPPED])
    assert tie.item() == 0.0
    tie.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) == 0.0
    # A third teacher breaks the tie: the majority (LINE) decides.
    assert loss(SWAPPED, [LINE, SWAPPED, LINE]).item() == pytest.approx(67.0)
    # The student that agrees with the majority, spread out, pays nothing.
    assert loss(LINE * 10, [LINE, SWAPPED, LINE]).item() == 0.0


def test_relative_dissimilarity_zero_cases():
    torch.manual_seed(1)
    feats = torch.randn(8, 6)
    # Student = teacher, margin 0: hinge max(0, −|gap|) = 0.
    assert RelativeDissimilarityLoss(0.0, 3)(feats, [feats, feats * 2]).item() == 0.0
    # Points 2^i − 1 on a line: all pairwise gaps are distinct integers, so squared-distance
    # gaps are >= 1 and, scaled by 10, exceed the margin 1 on every triplet.
    line = (2.0 ** torch.arange(6.0) - 1)[:, None]
    assert (
        RelativeDissimilarityLoss(1.0, 5)(line * 10, [line, torch.cat([line, -line], 1)]).item()
        == 0.0
    )
    # Without scaling the margin is not met everywhere.
    assert RelativeDissimilarityLoss(1.0, 5)(line * 0.1, [line]).item() > 0
    # B < 3: no triplet, a zero that keeps the graph.
    s = torch.randn(2, 3, requires_grad=True)
    z = RelativeDissimilarityLoss()(s, [torch.randn(2, 4)])
    assert z.item() == 0.0 and z.requires_grad


def test_relative_dissimilarity_deterministic_under_seed():
    torch.manual_seed(3)
    s, t = torch.randn(10, 4), [torch.randn(10, 7), torch.randn(10, 3), torch.randn(10, 5)]
    loss = RelativeDissimilarityLoss(0.5, 2)
    torch.manual_seed(11)
    v1 = loss(s, t)
    torch.manual_seed(11)
    assert torch.equal(v1, loss(s, t))


# ------------------------------------------------------------------------------ triplets


def test_sample_negatives_have_other_labels_and_are_uniform():
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    torch.manual_seed(0)
    seen: dict[int, set[int]] = {i: set() for i in range(6)}
    for _ in range(60):
        neg, keep = sample_negatives(y)
        assert bool(keep.all())
        assert bool((y[neg] != y).all())
        for i, j in enumerate(neg.tolist()):
            seen[i].add(j)
    assert seen[0] == {2, 3, 4} and seen[2] == {0, 1, 4, 5} and seen[4] == {0, 1, 2, 3, 5}
    _, keep = sample_negatives(torch.tensor([3, 3, 3]))
    assert not bool(keep.any())


def test_triplet_kd_matches_torch_triplet_margin_loss():
    torch.manual_seed(0)
    zs, zt = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.manual_seed(42)
    neg, _ = sample_negatives(y)
    torch.manual_seed(42)
    got = TripletKDLoss()(zs, zt, target=y)
    ref = F.triplet_margin_loss(zt, zs, zs[neg], margin=5.0, p=2.0)
    torch.testing.assert_close(got, ref)
    torch.manual_seed(42)
    got1 = TripletKDLoss(margin=1.0, p=1.0)(zs, zt, target=y)
    torch.testing.assert_close(got1, F.triplet_margin_loss(zt, zs, zs[neg], margin=1.0, p=1.0))


def test_triplet_kd_drops_anchors_without_negative():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 0, 0, 0, 1])  # every anchor has a negative: 0s use 4, 4 uses a 0
    torch.manual_seed(1)
    neg, keep = sample_negatives(y)
    assert bool(keep.all()) and bool((neg[:4] == 4).all())
    single = torch.tensor([1, 1, 1, 1, 1])
    zsg = zs.clone().requires_grad_(True)
    z = TripletKDLoss()(zsg, zt, target=single)
    assert z.item() == 0.0 and z.requires_grad
    # By hand, with identical logits for positive and anchor: hinge = margin − ‖a − n‖ (+ eps).
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    got = TripletKDLoss(margin=10.0)(a.clone(), a, target=torch.tensor([0, 1]))
    assert got.item() == pytest.approx(10.0 - 5.0, abs=1e-4)
    with pytest.raises(KdkitError, match="needs the class labels"):
        TripletKDLoss()(zs, zt)


def test_batch_hard_by_hand():
    # 1-D embeddings: class 0 at 0, 1, 4; class 1 at 5, 9.
    x = torch.tensor([[0.0], [1.0], [4.0], [5.0], [9.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    # anchor: (hardest pos, hardest neg): 0: (4, 5), 1: (3, 4), 4: (4, 1), 5: (4, 1), 9: (4, 5)
    hinges = [max(0.0, p - n + 0.2) for p, n in [(4, 5), (3, 4), (4, 1), (4, 1), (4, 5)]]
    got = BatchHardTripletLoss()(x, None, target=y)
    assert got.item() == pytest.approx(sum(hinges) / 5)
    # An anchor alone in its class has no positive and is not counted.
    y2 = torch.tensor([0, 0, 0, 1, 2])
    hinges2 = [max(0.0, p - n + 0.2) for p, n in [(4, 5), (3, 4), (4, 1)]]
    assert BatchHardTripletLoss()(x, None, target=y2).item() == pytest.approx(sum(hinges2) / 3)


# ---------------------------------------------------------------------- metric (Yu et al.)


def test_pairwise_distances_and_safe_gradient():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]], requires_grad=True)
    d = pairwise_distances(x)
    torch.testing.assert_close(d, torch.tensor([[0.0, 5, 5], [5, 0, 0], [5, 0, 0]]))
    d.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_absolute_teacher_by_hand():
    s = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert AbsoluteTeacherLoss()(s, t).item() == pytest.approx((5.0 + 0.0) / 2)
    with pytest.raises(KdkitError, match="adapter"):
        AbsoluteTeacherLoss()(torch.randn(2, 3), torch.randn(2, 4))


def test_relative_teacher_by_hand():
    # Student: 3-4-5 triangle; teacher in 1-D at 0, 3, 8: distance matrices differ only
    # at (0,2)/(2,0) 4 vs 8, and (1,2)/(2,1) 5 vs 5  ->  sqrt(2 · 4²) = 4·√2, no division by B.
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    t = torch.tensor([[0.0], [3.0], [8.0]])
    assert RelativeTeacherLoss()(s, t).item() == pytest.approx(4 * math.sqrt(2), rel=1e-5)
    # Rigid motions of the student do not change D_s.
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert RelativeTeacherLoss()(s @ rot + 7, t).item() == pytest.approx(4 * math.sqrt(2), rel=1e-5)


@pytest.mark.parametrize("loss", [AbsoluteTeacherLoss(), RelativeTeacherLoss()])
def test_metric_losses_zero_with_finite_gradient_at_the_teacher(loss):
    t = torch.randn(4, 3)
    s = t.clone().requires_grad_(True)
    out = loss(s, t)
    assert out.item() == pytest.approx(0.0, abs=1e-5)
    out.backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())


# ------------------------------------------------------------------------------------ RKD

TRI_T = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right angle at point 0
TRI_S = torch.tensor([[0.0], [1.0], [3.0]])  # collinear, 1-D: dims may differ


def test_rkd_distance_by_hand():
    mu_t = (1 + 1 + math.sqrt(2)) / 3
    psi_t = [1 / mu_t, 1 / mu_t, math.sqrt(2) / mu_t]  # pairs 01, 02, 12
    psi_s = [1 / 2, 3 / 2, 2 / 2]  # distances 1, 3, 2; mean 2
    expected = sum(_smooth_l1(a - b) for a, b in zip(psi_s, psi_t, strict=True)) / 3
    got = rkd_distance(TRI_S, TRI_T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(0.098052, abs=1e-6)


def test_rkd_angle_by_hand():
    # Teacher cosines at j = 0, 1, 2: 0, √2/2, √2/2. Student (collinear 0, 1, 3): 1, −1, 1.
    # Each j has two ordered (i, k): mean = (sl(1) + sl(−1 − √2/2) + sl(1 − √2/2)) / 3 = 7/12.
    h = math.sqrt(2) / 2
    expected = (_smooth_l1(1.0) + _smooth_l1(-1 - h) + _smooth_l1(1 - h)) / 3
    got = rkd_angle(TRI_S, TRI_T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(7 / 12, rel=1e-5)


def test_rkd_zero_and_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 5)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    for fn in (rkd_distance, rkd_angle):
        assert fn(t, t).item() == pytest.approx(0.0, abs=1e-6)
        base = fn(s, t)
        torch.testing.assert_close(fn(s * 3.7, t), base, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fn(s @ q, t), base, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fn(s * 0.5 + 2.0, t), base, rtol=1e-4, atol=1e-6)
        assert base.item() > 0
    # Tiny batches: no pair / no triple, zero with graph.
    x = torch.randn(2, 3, requires_grad=True)
    assert rkd_angle(x, torch.randn(2, 2)).item() == 0.0
    assert rkd_distance(x[:1], torch.randn(1, 2)).requires_grad


# ------------------------------------------------------- every loss: gradients, finiteness


def _cases():
    zs, ts = _logits(b=6, c=4, m=3, seed=5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    feats_t = [torch.randn(6, 7), torch.randn(6, 3)]
    emb_t = torch.randn(6, 5)
    return [
        ("ensemble-mean", EnsembleKDLoss(), zs, ts),
        ("ensemble-geometric", EnsembleKDLoss(2.0, "geometric"), zs, ts),
        ("ensemble-weighted", EnsembleKDLoss(2.0, "weighted", [1, 2, 3]), zs, ts),
        ("ensemble-confidence", EnsembleKDLoss(2.0, "confidence"), zs, ts),
        ("multistream", MultiStreamKDLoss(), zs, ts),
        ("random-teacher", RandomTeacherKDLoss(), zs, ts),
        ("relative", RelativeDissimilarityLoss(1.0, 2), torch.randn(6, 4) * 0.1, feats_t),
        ("triplet-kd", TripletKDLoss(), zs, ts[0]),
        ("batch-hard", BatchHardTripletLoss(), torch.randn(6, 5), None),
        ("absolute", AbsoluteTeacherLoss(), torch.randn(6, 5), emb_t),
        ("relative-teacher", RelativeTeacherLoss(), torch.randn(6, 4), emb_t),
        ("rkd-distance", RKDDistanceLoss(), torch.randn(6, 4), emb_t),
        ("rkd-angle", RKDAngleLoss(), torch.randn(6, 4), emb_t),
    ], y


def test_every_loss_gives_the_student_a_finite_gradient():
    torch.manual_seed(9)
    cases, y = _cases()
    for name, loss, student, teacher in cases:
        teachers = teacher if isinstance(teacher, list) else [teacher]
        assert all(not t.requires_grad for t in teachers if t is not None)
        s = student.clone().requires_grad_(True)
        out = loss(s, teacher, target=y)
        assert out.dim() == 0, name
        assert bool(torch.isfinite(out)), name
        out.backward()
        assert s.grad is not None, name
        assert bool(torch.isfinite(s.grad).all()), name
        assert float(s.grad.abs().sum()) > 0, name
