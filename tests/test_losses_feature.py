"""Feature-distillation losses (METHODS.md §5, §6): FitNets hint, MSE, attention transfer,
overhaul (margins, margin ReLU, partial L2), FSP, NST, SP, PKT, AB. Reference values by
hand or by independent loops, zero at student = teacher, gradients (student only), errors."""

import math

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.losses.ab import ABLoss, ab_loss
from kdkit.losses.attention import ATLoss, at_loss, attention_map
from kdkit.losses.feature import HintLoss, MSEFeatureLoss, hint_loss, mse_feature_loss
from kdkit.losses.fsp import FSPLoss, fsp_loss, fsp_matrix
from kdkit.losses.nst import NSTLoss, nst_loss
from kdkit.losses.overhaul import (
    OverhaulLoss,
    margin_from_bn,
    margin_relu,
    partial_l2,
)
from kdkit.losses.pkt import PKTLoss, pkt_loss
from kdkit.losses.sp import SPLoss, sp_loss

# ---------------------------------------------------------------- FitNets hint / MSE


def test_hint_reference_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    t = torch.zeros(2, 3)
    # ½·(1 + 4 + 4) = 4.5 and ½·9 = 4.5 per sample -> batch mean 4.5
    assert hint_loss(s, t).item() == pytest.approx(4.5)
    assert HintLoss()(s, t).item() == pytest.approx(4.5)
    # plain MSE: 18 / 6 elements
    assert mse_feature_loss(s, t).item() == pytest.approx(3.0)
    assert MSEFeatureLoss()(s, t).item() == pytest.approx(3.0)


def test_hint_sums_features_and_averages_batch():
    torch.manual_seed(0)
    s = torch.randn(3, 2, 2, 2, requires_grad=True)
    t = torch.randn(3, 2, 2, 2)
    per_sample = [0.5 * (s[i] - t[i]).pow(2).sum().item() for i in range(3)]
    loss = hint_loss(s, t)
    assert loss.item() == pytest.approx(sum(per_sample) / 3, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(s.grad, (s.detach() - t) / 3)


def test_hint_shape_mismatch_names_both_shapes_and_connector():
    with pytest.raises(KdkitError, match="connector") as e:
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    assert "(2, 3, 4, 4)" in str(e.value) and "(2, 5, 4, 4)" in str(e.value)


# ---------------------------------------------------------------- attention transfer


def test_attention_map_by_hand_uses_squares_and_unit_norm():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    # p = 2: mean over channels of squares -> (5, 2), normalised by √29
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    torch.testing.assert_close(attention_map(f), expected)
    torch.testing.assert_close(attention_map(-f), expected)  # squares: the sign is irrelevant
    # p = 1: mean of |A| -> (2, 1) / √5
    torch.testing.assert_close(attention_map(f, p=1.0), torch.tensor([[2.0, 1.0]]) / math.sqrt(5))
    torch.manual_seed(0)
    q = attention_map(torch.randn(4, 3, 5, 5))
    assert q.shape == (4, 25)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(4))


def test_at_loss_by_hand_mean_over_batch_and_positions():
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # map (5, 2)/√29
    t = torch.tensor([[[[1.0, 0.0]]]])  # one channel, map (1, 0)
    a, b = 5 / math.sqrt(29), 2 / math.sqrt(29)
    expected = ((a - 1) ** 2 + b**2) / 2
    assert at_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert ATLoss()(s, t).item() == pytest.approx(0.0715233, abs=1e-6)


def test_at_spatial_mismatch_is_an_error():
    with pytest.raises(KdkitError, match="spatial") as e:
        at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))
    assert "(2, 3, 4, 4)" in str(e.value) and "(2, 3, 8, 8)" in str(e.value)


# ---------------------------------------------------------------- overhaul


@pytest.mark.parametrize(
    ("gamma", "beta", "m"),
    [
        (1.0, 0.0, -0.79788),
        (1.0, 1.0, -0.52514),
        (1.0, -1.0, -1.28760),
        (2.0, 0.0, -1.59577),
        (0.5, 2.0, -1.5),  # Φ(−4) ≈ 3e-5 ≤ 0.001: the −3s fallback
        (-1.0, 0.0, -0.79788),  # s = |γ|
    ],
)
def test_margin_reference_values(gamma, beta, m):
    got = margin_from_bn(torch.tensor([gamma]), torch.tensor([beta]))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(m, abs=1e-4)


def test_margin_vectorised_and_zero_gamma_is_finite():
    gamma = torch.tensor([1.0, 0.0, 0.0, 0.0, 1e-6], requires_grad=True)
    beta = torch.tensor([0.0, 0.0, -1.0, 1.0, -1.0])
    m = margin_from_bn(gamma, beta)
    assert not m.requires_grad and torch.isfinite(m).all()
    # s -> 0: t is the constant β; m = β if β < 0, else 0
    torch.testing.assert_close(m, torch.tensor([-0.797885, 0.0, -1.0, 0.0, -1.0]))


def test_margin_relu_per_channel():
    t = torch.tensor([[[[-3.0, 1.0]], [[-0.1, -5.0]]]])  # (1, 2, 1, 2)
    out = margin_relu(t, torch.tensor([-1.0, -0.5]))
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0]], [[-0.1, -0.5]]]]))


def test_partial_l2_enumerated_cases():
    s = torch.tensor([-2.0, -1.0, 0.0, -3.0, -1.0, 3.0])
    t = torch.tensor([-1.0, -1.0, -1.0, 0.0, 2.0, 1.0])
    # S≤T≤0 -> 0 | S=T≤0 -> 0 | S>T -> 1 | S≤T=0 -> 0 | T>0 -> 9 | T>0 -> 4   total 14
    s4, t4 = s.view(1, 1, 2, 3), t.view(1, 1, 2, 3)
    assert partial_l2(s4, t4).item() == pytest.approx(14.0)
    # sum over elements / B: two copies of the sample give the same value
    s2 = torch.cat([s4, s4]).requires_grad_(True)
    loss = partial_l2(s2, torch.cat([t4, t4]))
    assert loss.item() == pytest.approx(14.0)
    loss.backward()
    grad = s2.grad[0].flatten()
    assert (grad[[0, 1, 3]] == 0).all() and (grad[[2, 4, 5]] != 0).all()


def test_overhaul_zero_cases_and_buffer():
    torch.manual_seed(0)
    margin = torch.tensor([-0.5, -1.0, -0.2])
    loss = OverhaulLoss(margin)
    teacher = torch.randn(2, 3, 2, 2)
    # student equal to σ_m(T)
    assert loss(margin_relu(teacher, margin), teacher).item() == 0.0
    # student below a non-positive teacher target: S ≤ σ_m(T) ≤ 0
    neg = -teacher.abs()
    s = margin_relu(neg, margin) - torch.rand(2, 3, 2, 2)
    assert loss(s, neg).item() == 0.0
    assert "margin" in loss.state_dict()
    assert loss.to(torch.float64).margin.dtype == torch.float64
    assert OverhaulLoss.from_bn(torch.ones(3), torch.zeros(3)).margin.shape == (3,)


def test_overhaul_channel_mismatch_is_an_error():
    loss = OverhaulLoss(torch.full((4,), -0.5))
    with pytest.raises(KdkitError, match="4 channels") as e:
        loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))
    assert "(2, 3, 2, 2)" in str(e.value)
    with pytest.raises(KdkitError) as e:
        partial_l2(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2))
    assert "(2, 3, 2, 2)" in str(e.value) and "(2, 4, 2, 2)" in str(e.value)


# ---------------------------------------------------------------- FSP


def test_fsp_matrix_by_hand():
    a = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    b = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(fsp_matrix(a, b), torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]))
    # divided by H·W: (1·2 + 3·4) / 2
    g = fsp_matrix(torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[[2.0, 4.0]]]]))
    assert g.item() == pytest.approx(7.0)
    # larger map average-pooled to the smaller: mean(1, 3, 5, 7) · 2
    g = fsp_matrix(torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]]), torch.tensor([[[[2.0]]]]))
    assert g.item() == pytest.approx(8.0)


def test_fsp_loss_by_hand():
    a = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    b = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    one = torch.ones(1, 2, 1, 1)
    # G_s = [[3, 4], [6, 8]], G_t = ones -> 2² + 3² + 5² + 7²
    assert fsp_loss((a, b), [one, one]).item() == pytest.approx(87.0)
    # mean over batch
    a2, b2, o2 = torch.cat([a, one]), torch.cat([b, one]), torch.cat([one, one])
    assert FSPLoss()((a2, b2), (o2, o2)).item() == pytest.approx(87.0 / 2)


def test_fsp_errors():
    s = (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    t = (torch.randn(2, 3, 8, 8), torch.randn(2, 6, 8, 8))
    with pytest.raises(KdkitError, match="channel") as e:
        fsp_loss(s, t)
    assert "(2, 5, 4, 4)" in str(e.value) and "(2, 6, 8, 8)" in str(e.value)
    with pytest.raises(KdkitError, match="pair"):
        fsp_loss(torch.randn(2, 3, 4, 4), t)  # type: ignore[arg-type]


# ---------------------------------------------------------------- NST


def _nst_by_loops(s, t, d=2, c=0.0):
    def vecs(x):  # per sample: list of normalised channel vectors
        out = []
        for sample in x.tolist():
            chans = [sum(row, []) for row in sample]
            out.append([[v / math.sqrt(sum(u * u for u in ch)) for v in ch] for ch in chans])
        return out

    def k(x, y):
        return (sum(p * q for p, q in zip(x, y, strict=True)) + c) ** d

    total = 0.0
    for vs, vt in zip(vecs(s), vecs(t), strict=True):
        kk = lambda u, v: sum(k(x, y) for x in u for y in v) / (len(u) * len(v))  # noqa: E731
        total += kk(vt, vt) + kk(vs, vs) - 2 * kk(vs, vt)
    return total / len(s.tolist())


def test_nst_reference_values():
    # one orthogonal unit channel each: k(s,s) = k(t,t) = 1, k(s,t) = 0 -> MMD² = 2
    s = torch.tensor([[[[3.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.5]]]])
    assert nst_loss(s, t).item() == pytest.approx(2.0)
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
    assert NSTLoss()(s, t).item() == pytest.approx(_nst_by_loops(s, t), rel=1e-5)
    got = NSTLoss(degree=3, c=1.0)(s, t).item()
    assert got == pytest.approx(_nst_by_loops(s, t, 3, 1.0), rel=1e-5)


def test_nst_spatial_mismatch_is_an_error():
    with pytest.raises(KdkitError, match="spatial") as e:
        nst_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    assert "(2, 3, 4, 4)" in str(e.value) and "(2, 3, 2, 2)" in str(e.value)


# ---------------------------------------------------------------- SP


def test_sp_two_samples_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # G = ones -> rows (1, 1)/√2
    # (2·(1/√2 − 1)² + 2·½) / 2² = 1 − √2/2
    assert sp_loss(s, t).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)
    assert SPLoss()(s.view(2, 2, 1, 1), t).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_sp_batch_mismatch_is_an_error():
    with pytest.raises(KdkitError) as e:
        sp_loss(torch.randn(2, 3), torch.randn(3, 3))
    assert "(2, 3)" in str(e.value) and "(3, 3)" in str(e.value)


# ---------------------------------------------------------------- PKT


def _pkt_by_loops(s, t):
    def cond(x):
        rows = [r.flatten().tolist() for r in x]
        n = [math.sqrt(sum(v * v for v in r)) for r in rows]
        kern = [
            [
                (sum(a * b for a, b in zip(ri, rj, strict=True)) / (n[i] * n[j]) + 1) / 2
                for j, rj in enumerate(rows)
            ]
            for i, ri in enumerate(rows)
        ]
        b = len(rows)
        return [
            [kern[i][j] / sum(kern[i][k] for k in range(b) if k != i) for j in range(b)]
            for i in range(b)
        ]

    ps, pt = cond(s), cond(t)
    b = len(ps)
    return sum(
        pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(b) for j in range(b) if i != j
    )


def test_pkt_reference_value_and_scale_invariance():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 2, 2, 2)
    b = s.shape[0]  # batch mean over anchors
    assert pkt_loss(s, t).item() == pytest.approx(_pkt_by_loops(s, t) / b, rel=1e-4)
    assert PKTLoss()(3.0 * s, t).item() == pytest.approx(_pkt_by_loops(s, t) / b, rel=1e-4)
    one = torch.randn(1, 3, requires_grad=True)
    out = pkt_loss(one, torch.randn(1, 5))
    assert out.item() == 0.0 and out.requires_grad


def test_pkt_batch_mismatch_is_an_error():
    with pytest.raises(KdkitError) as e:
        pkt_loss(torch.randn(2, 3), torch.randn(4, 3))
    assert "(2, 3)" in str(e.value) and "(4, 3)" in str(e.value)


# ---------------------------------------------------------------- AB


def test_ab_reference_value_by_hand():
    t = torch.tensor([[2.0, -1.0, 0.0, 3.0], [1.0, 1.0, -1.0, -1.0]])
    s = torch.tensor([[0.5, -0.5, -2.0, 1.5], [0.0, 2.0, 0.0, -3.0]])
    # row 0: 0.5² + 0.5² + 0 + 0 = 0.5; row 1: 1 + 0 + 1 + 0 = 2; batch mean 1.25
    assert ab_loss(s, t).item() == pytest.approx(1.25)
    assert ABLoss(margin=1.0)(s, t).item() == pytest.approx(1.25)
    # margin 0: only wrong-sided responses cost: row 0 none; row 1: S = 0 at T = 1 -> 0
    assert ABLoss(margin=0.0)(s, t).item() == pytest.approx(0.0)


def test_ab_zero_beyond_the_margin():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 2, 2)
    s = torch.where(t > 0, 1.0 + torch.rand_like(t), -1.0 - torch.rand_like(t))
    assert ab_loss(s, t).item() == 0.0
    with pytest.raises(KdkitError) as e:
        ab_loss(torch.randn(2, 3), torch.randn(2, 4))
    assert "(2, 3)" in str(e.value) and "(2, 4)" in str(e.value)


# ---------------------------------------------------------------- shared properties

_CASES = {
    "hint": (HintLoss(), (3, 4, 3, 3), (3, 4, 3, 3)),
    "mse": (MSEFeatureLoss(), (3, 4, 3, 3), (3, 4, 3, 3)),
    "at": (ATLoss(), (3, 2, 3, 3), (3, 5, 3, 3)),
    "overhaul": (OverhaulLoss(torch.full((4,), -0.3)), (3, 4, 3, 3), (3, 4, 3, 3)),
    "nst": (NSTLoss(), (3, 2, 3, 3), (3, 5, 3, 3)),
    "sp": (SPLoss(), (3, 2, 3, 3), (3, 7)),
    "pkt": (PKTLoss(), (3, 2, 3, 3), (3, 7)),
    "ab": (ABLoss(), (3, 4, 3, 3), (3, 4, 3, 3)),
}
_ZERO_AT_EQUAL = ["hint", "mse", "at", "overhaul", "nst", "sp", "pkt"]


@pytest.mark.parametrize("name", _ZERO_AT_EQUAL)
def test_zero_when_student_equals_teacher(name):
    loss, shape, _ = _CASES[name]
    torch.manual_seed(1)
    f = torch.randn(*shape)
    assert loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-5)


def test_fsp_zero_when_student_equals_teacher():
    torch.manual_seed(1)
    pair = (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2))
    assert FSPLoss()(pair, tuple(x.clone() for x in pair)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_gradient_reaches_student_only(name):
    loss, shape_s, shape_t = _CASES[name]
    torch.manual_seed(2)
    s = torch.randn(*shape_s, requires_grad=True)
    t = torch.randn(*shape_t)
    out = loss(s, t)
    assert out.dim() == 0
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_fsp_gradient_reaches_student_pair():
    torch.manual_seed(3)
    s = (torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4, requires_grad=True))
    t = (torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2))
    FSPLoss()(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


def test_bad_hyperparameters_are_errors():
    for make in (
        lambda: ATLoss(p=0.0),
        lambda: NSTLoss(degree=0),
        lambda: NSTLoss(c=-1.0),
        lambda: PKTLoss(eps=0.0),
        lambda: ABLoss(margin=-1.0),
    ):
        with pytest.raises(KdkitError):
            make()
