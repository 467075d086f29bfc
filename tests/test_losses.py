"""Baseline KD loss (METHODS.md §1): reference values, gradient identity, limits."""

import math

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy, KDLoss, kd_loss, soft_kl


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    s = sum(e)
    return [v / s for v in e]


def test_kd_reference_value_by_hand():
    zs, zt, T = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0
    ps, pt = _softmax(zs, T), _softmax(zt, T)
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    got = kd_loss(torch.tensor([zs]), torch.tensor([zt]), T)
    assert got.item() == pytest.approx(T * T * kl, rel=1e-6)
    # By hand: p_t = (0.506, 0.307, 0.186) = reversed p_s, so KL = 0.3201 and T²·KL = 1.2806.
    assert got.item() == pytest.approx(1.2806, abs=1e-4)


def test_batchmean_sums_classes_and_averages_batch():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    per_sample = [soft_kl(zs[i : i + 1], zt[i : i + 1], 3.0).item() for i in range(4)]
    assert soft_kl(zs, zt, 3.0).item() == pytest.approx(sum(per_sample) / 4, rel=1e-6)


def test_zero_when_student_equals_teacher():
    z = torch.randn(8, 10)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_gradient_identity(T):
    torch.manual_seed(1)
    B, N = 6, 10
    zs = torch.randn(B, N, requires_grad=True)
    zt = torch.randn(B, N)
    soft_kl(zs, zt, T).backward()
    expected = (torch.softmax(zs.detach() / T, 1) - torch.softmax(zt / T, 1)) / (T * B)
    torch.testing.assert_close(zs.grad, expected, rtol=1e-5, atol=1e-7)


def test_high_temperature_approaches_logit_matching():
    torch.manual_seed(2)
    N, T = 10, 200.0
    zs = torch.randn(1, N)
    zt = torch.randn(1, N)
    zs, zt = zs - zs.mean(), zt - zt.mean()  # zero-mean logits
    zs.requires_grad_(True)
    soft_kl(zs, zt, T).backward()
    approx = (zs.detach() - zt) / (N * T * T)
    rel = (zs.grad - approx).norm() / approx.norm()
    assert rel.item() < 1e-2


def test_t_squared_keeps_gradient_scale():
    """With T² the soft-term gradient tends to (z_s − z_t)/(N·B), independent of T."""
    torch.manual_seed(3)
    zs, zt = torch.randn(16, 10), torch.randn(16, 10)
    norms = []
    for T in (50.0, 100.0, 200.0):
        z = zs.clone().requires_grad_(True)
        kd_loss(z, zt, T).backward()
        norms.append(z.grad.norm().item())
    assert norms[0] == pytest.approx(norms[2], rel=2e-2)
    assert norms[1] == pytest.approx(norms[2], rel=1e-2)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(KdkitError, match="same number of classes"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 100))


def test_module_forms():
    zs, zt = torch.randn(3, 4), torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    assert KDLoss(3.0)(zs, zt).item() == pytest.approx(kd_loss(zs, zt, 3.0).item())
    ce = CrossEntropy()(zs, None, target=y)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(zs, y).item())
    with pytest.raises(KdkitError):
        KDLoss(0.0)
