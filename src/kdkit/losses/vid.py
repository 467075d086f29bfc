"""Variational information distillation (VID) of Ahn, Hu, Damianou, Lawrence & Dai (2019),
"Variational Information Distillation for Knowledge Transfer", CVPR 2019 (METHODS.md §8).

VID maximises a variational lower bound on the mutual information between a teacher
feature t and the student feature s: −log q(t | s) with q a Gaussian whose mean μ(s) is a
small conv regressor of the student feature (trained with the student: the Term's adapter)
and whose variance is one learnt value per channel, σ²_c = softplus(α_c) + ε:

    L = mean over (batch, positions) of Σ_c [ log σ_c + (t_c − μ_c(s))² / (2 σ²_c) ]

(the constant ½·log 2π per channel is left out). α is initialised so that σ²_c = 5 (the
authors' code: ``init_pred_var = 5``, ε = 1e-5). CRD's reproduction, which the paper tables
of METHODS.md quote, averages over the channels as well; kdkit's default stage weight
``1/C_t`` of the method ``vid`` gives exactly that objective.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.feature import check_same_shape

INIT_VARIANCE = 5.0  # the authors' initial σ² (init_pred_var)
EPS = 1e-5


def vid_loss(mean: Tensor, teacher: Tensor, variance: Tensor) -> Tensor:
    """Σ_c [log σ_c + (t_c − μ_c)² / (2σ²_c)], averaged over batch and positions.

    Args:
        mean: μ(s), (B, C, H, W) (or (B, C)). teacher: t, the same shape.
        variance: σ², (C,), positive.
    Returns: scalar.
    """
    check_same_shape(mean, teacher, "VID")
    if variance.dim() != 1 or variance.shape[0] != mean.shape[1]:
        raise KdkitError(f"VID: the variance must have one value per channel ({mean.shape[1]}), "
                         f"got shape {tuple(variance.shape)}")
    var = variance.view(1, -1, *([1] * (mean.dim() - 2)))
    nll = 0.5 * torch.log(var) + (teacher - mean).pow(2) / (2 * var)
    return nll.sum(1).mean()


def softplus_inverse(y: float) -> float:
    """α with softplus(α) = y (y > 0)."""
    return math.log(math.expm1(y))


class VIDRegressor(nn.Module):
    """The student side of VID: the mean μ(s) (1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv,
    convs without bias, middle width = the teacher's channels, as in the authors' code) and
    the per-channel variance parameter α (σ²_c = softplus(α_c) + ε, initially 5).

    Maps a student map (B, Cs, Hs, Ws) to ``(μ, σ²)``; a larger student map is first
    average-pooled to the teacher's size ``size`` (the authors pool the larger of the two).
    """

    def __init__(self, s_channels: int, t_channels: int, size: tuple[int, int] | None = None,
                 mid_channels: int | None = None, init_variance: float = INIT_VARIANCE,
                 eps: float = EPS) -> None:
        super().__init__()
        if not init_variance > eps:
            raise KdkitError(f"VID: the initial variance must be > {eps}, got {init_variance}")
        mid = mid_channels or t_channels
        self.size = size
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, t_channels, 1, bias=False),
        )
        self.alpha = nn.Parameter(torch.full((t_channels,),
                                             softplus_inverse(init_variance - eps)))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.alpha) + self.eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.regressor(x), self.variance()


class VIDLoss(nn.Module):
    """Module form of :func:`vid_loss`: the student side is ``(μ(s), σ²)`` from
    :class:`VIDRegressor`; the teacher is t (B, C, H, W)."""

    def forward(self, student: tuple[Tensor, Tensor], teacher: Tensor, *,
                target: Tensor | None = None) -> Tensor:
        mean, variance = student
        return vid_loss(mean, teacher, variance)
