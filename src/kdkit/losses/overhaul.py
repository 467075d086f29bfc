"""Feature distillation of Heo, Kim, Yun, Park, Kwak & Choi (2019), "A Comprehensive
Overhaul of Feature Distillation", ICCV 2019 (METHODS.md §6).

Features are taken *before* the ReLU at the end of each stage.

* Teacher transform, margin ReLU ``σ_m(t) = max(t, m_c)``, one margin per channel from the
  BN layer that precedes that ReLU (s = |γ_c|, μ = β_c, t ~ N(μ, s²)):
  ``m_c = E[t | t < 0] = μ − s·φ(μ/s)/Φ(−μ/s)``, and −3s when Φ(−μ/s) ≤ 0.001 (the
  official code's fallback for channels that are almost never negative).
* Student transform: a connector (1×1 conv + BN) applied by the caller, not here.
* Partial L2: ``d_p(T, S) = Σ_i 0 if S_i ≤ T_i ≤ 0 else (T_i − S_i)²`` with T = σ_m(F_t):
  where the teacher is "off" (T ≤ 0) a student response that is at least as negative is
  not penalised.

:func:`partial_l2` returns the sum over all elements divided by the batch size B (the /B
of the paper's total loss ``CE + β · Σ_i d_p,i / 2^(n−i−1) / B``); the per-stage weights
1/2^(n−i−1) and β (1e-3 CIFAR, 1e-4 ImageNet) are term weights, applied outside.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.feature import check_same_shape

_FALLBACK_CDF = 0.001


def margin_from_bn(gamma: Tensor, beta: Tensor) -> Tensor:
    """Per-channel margins m_c = E[t | t < 0] for t ~ N(β_c, γ_c²).

    Args: gamma, beta (C,): the scale and shift of the BN layer before the ReLU.
    Returns: (C,) in gamma's dtype and device, without gradient. Computed in float64:
    ``m = μ − s·φ(μ/s)/Φ(−μ/s)``, or −3s where Φ(−μ/s) ≤ 0.001.

    γ_c = 0 (a channel whose BN output is the constant β_c) takes the limit s → 0, which
    is continuous: m_c = β_c if β_c < 0 (t is always β_c), else 0 (= −3s at s = 0; for
    β_c = 0 the conditional mean is undefined and 0 keeps σ_m the plain ReLU). No NaN.
    """
    if gamma.dim() != 1 or gamma.shape != beta.shape:
        raise KdkitError(
            f"BN gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must both be (C,)"
        )
    s = gamma.detach().to(torch.float64).abs()
    mu = beta.detach().to(torch.float64)
    z = mu / s.clamp(min=torch.finfo(torch.float64).tiny)  # s = 0 -> z = ±inf or 0, no NaN
    cdf = 0.5 * torch.special.erfc(z / math.sqrt(2.0))  # Φ(−z), accurate in the tail
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # φ(z)
    # s·φ(z)/Φ(−z) is 0 where s = 0 and β < 0 (φ(−inf) = 0); clamp keeps the masked branch finite.
    exact = mu - s * pdf / cdf.clamp(min=_FALLBACK_CDF)
    margin = torch.where(cdf > _FALLBACK_CDF, exact, -3.0 * s)
    return margin.to(dtype=gamma.dtype, device=gamma.device)


def margin_relu(t: Tensor, margin: Tensor) -> Tensor:
    """Margin ReLU σ_m(t) = max(t, m_c), per channel.

    Args: t (B, C, H, W) (any trailing dims), margin (C,). Returns t's shape.
    """
    if t.dim() < 2 or margin.dim() != 1 or t.shape[1] != margin.shape[0]:
        raise KdkitError(
            f"margin ReLU: feature {tuple(t.shape)} needs one margin per channel (dim 1), "
            f"got margins {tuple(margin.shape)}"
        )
    m = margin.to(dtype=t.dtype, device=t.device).view(1, -1, *([1] * (t.dim() - 2)))
    return torch.maximum(t, m)


def partial_l2(student: Tensor, teacher_transformed: Tensor) -> Tensor:
    """Partial L2 distance Σ_i [not (S_i ≤ T_i ≤ 0)] · (T_i − S_i)², divided by the batch size.

    Args: student S (B, C, H, W), the connector's output; teacher_transformed T = σ_m(F_t),
    same shape, no gradient needed. Returns a scalar (sum over elements / B).
    """
    check_same_shape(student, teacher_transformed, "overhaul partial L2")
    t = teacher_transformed
    keep = (student > t) | (t > 0)  # the complement of S ≤ T ≤ 0
    sq = (t - student).pow(2) * keep.to(student.dtype)
    return sq.sum() / student.shape[0]


class OverhaulLoss(nn.Module):
    """Overhaul distillation for one stage: ``partial_l2(student, σ_m(teacher))``.

    Args: margin (C,), e.g. from :func:`margin_from_bn`; kept as a buffer, so it follows
    ``.to()`` and is saved in the state dict.
    forward: student (B, C, H, W) = connector(student pre-ReLU feature), teacher (B, C, H, W)
    = teacher pre-ReLU feature. Returns the unweighted scalar (sum / B).
    """

    margin: Tensor

    def __init__(self, margin: Tensor) -> None:
        super().__init__()
        if margin.dim() != 1:
            raise KdkitError(f"overhaul margin must be (C,), got shape {tuple(margin.shape)}")
        self.register_buffer("margin", margin.detach().clone())

    @classmethod
    def from_bn(cls, gamma: Tensor, beta: Tensor) -> OverhaulLoss:
        """Build from the teacher BN's scale and shift (C,), via :func:`margin_from_bn`."""
        return cls(margin_from_bn(gamma, beta))

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        c = self.margin.shape[0]
        for who, x in (("student", student), ("teacher", teacher)):
            if x.dim() < 2 or x.shape[1] != c:
                raise KdkitError(
                    f"overhaul: {who} feature {tuple(x.shape)} must have {c} channels (dim 1), "
                    f"one per margin (student {tuple(student.shape)}, teacher "
                    f"{tuple(teacher.shape)}); compute the margins from the BN before the "
                    "teacher's tapped ReLU"
                )
        return partial_l2(student, margin_relu(teacher, self.margin))

    def extra_repr(self) -> str:
        return f"channels={self.margin.shape[0]}"
