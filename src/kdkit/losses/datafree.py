"""Objectives of data-free distillation: tensors in, unweighted scalar out.

* Lopes, Fenu & Starner 2017, "Data-Free Knowledge Distillation for Deep Neural Networks"
  (arXiv:1710.07535): :func:`matching_loss` between the teacher's activations on a
  synthetic input and a target sampled from the metadata record.
* Yin et al. 2020, "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion"
  (CVPR): :func:`bn_statistics_loss`, :func:`total_variation`, :func:`l2_prior`, and
  Adaptive DeepInversion's :func:`competition_loss`.
* Chen et al. 2019, "DAFL: Data-Free Learning of Student Networks" (ICCV):
  :func:`one_hot_loss`, :func:`activation_loss`, :func:`information_entropy_loss`.

Precision: float32: the data-free stages (records, synthesis, DAFL) call these without
autocast, on float32 tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.errors import KdkitError


def matching_loss(value: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error averaged over units (so every layer counts once), mean over the batch.

    Args:
        value: activations (B, D). target: sampled targets (B, D).
        mask: optional 0/1 filter (B, D): only kept units count (Lopes' dropout filters).
    """
    if value.shape != target.shape:
        raise KdkitError(
            f"activations {tuple(value.shape)} and record targets {tuple(target.shape)} differ; "
            "was the record made from this teacher?"
        )
    err = (value - target) ** 2
    if mask is None:
        return err.mean()
    kept = mask.sum(dim=1).clamp_min(1.0)
    return ((err * mask).sum(dim=1) / kept).mean()


def bn_statistics_loss(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature term for one BN layer: ‖μ(x) − μ_BN‖₂ + ‖σ²(x) − σ²_BN‖₂.

    Args:
        x: the BN layer's input, (B, C, H, W) or (B, C). running_mean/var: (C,).
    The batch statistics are per channel over batch and space (biased variance, as BN).
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(
        var - running_var
    )


def total_variation(x: Tensor) -> Tensor:
    """Smoothness prior: batch mean of each image's L2 norm of neighbour differences.

    ``x`` (B, C, H, W); differences along H and W (DeepInversion's R_TV, L2 form).
    """
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).flatten(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).flatten(1)
    return torch.sqrt((dh**2).sum(1) + (dw**2).sum(1) + 1e-12).mean()


def l2_prior(x: Tensor) -> Tensor:
    """Batch mean of each input's L2 norm ‖x̂‖₂; ``x`` (B, ...)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).mean()


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """JS divergence (natural log, in [0, ln 2]) between rows of probabilities (B, C); batch mean."""
    m = 0.5 * (p + q)
    log_m = torch.log(m.clamp_min(1e-12))
    kl_pm = (p * (torch.log(p.clamp_min(1e-12)) - log_m)).sum(1)
    kl_qm = (q * (torch.log(q.clamp_min(1e-12)) - log_m)).sum(1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def competition_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Adaptive DeepInversion: 1 − JS(p_t, p_s), JS normalised to [0, 1] (divided by ln 2).

    Minimising it over the inputs seeks images on which teacher and student disagree.
    Shapes (B, C).
    """
    js = jensen_shannon(F.softmax(teacher_logits, 1), F.softmax(student_logits, 1))
    return 1.0 - js / math.log(2.0)


def one_hot_loss(logits: Tensor) -> Tensor:
    """DAFL L_oh: cross-entropy of the teacher's logits (B, C) to their own argmax."""
    return F.cross_entropy(logits, logits.argmax(1))


def activation_loss(features: Tensor) -> Tensor:
    """DAFL L_a: −mean |f_t| of the teacher's features (B, ...) before the classifier."""
    return -features.abs().mean()


def information_entropy_loss(logits: Tensor) -> Tensor:
    """DAFL L_ie: Σ_c p̄_c log p̄_c, p̄ the batch-mean prediction (B, C) → minus its entropy.

    Minimising it balances the classes the generator produces.
    """
    mean_p = F.softmax(logits, 1).mean(0)
    return (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
