"""Logit-based losses after the overhaul (METHODS.md §8): DKD, DIST, NKD, logit
standardization, and the correlation congruence (CC) of embeddings.

- DKD, Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation": with b = [p^gt, 1 − p^gt]
  and p̂ the softmax over the non-target classes only, at temperature T,
  TCKD = T²·KL(b_t ‖ b_s), NCKD = T²·KL(p̂_t ‖ p̂_s) (batch means). Per sample,
  KD = TCKD + (1 − p_t^gt)·NCKD.
- DIST, Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher":
  Y = softmax(z/τ); inter = 1 − mean_i ρ(Y_s[i,:], Y_t[i,:]), intra = 1 − mean_c
  ρ(Y_s[:,c], Y_t[:,c]), ρ the Pearson correlation (1e-8 added to its denominator, as in
  the official code); loss τ²(β·inter + γ·intra).
- NKD, Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge
  Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels":
  −mean(p_t^gt · log p_s^gt) (T = 1) + γ·T²·KL(p̂_t ‖ p̂_s). The official code uses the
  cross-entropy −Σ p̂_t log p̂_s for the second part; it differs from the KL by the
  teacher's entropy, a constant with no gradient (we follow the paper: KL).
- Logit standardization, Sun et al., CVPR 2024, "Logit Standardization in Knowledge
  Distillation": a pre-process of each sample's logits, (z − mean z)/(std z + 1e-7)
  (unbiased std), for teacher and student separately (:func:`standardize_logits`,
  :class:`Standardized`).
- CC, Peng et al., ICCV 2019, "Correlation Congruence for Knowledge Distillation": a
  Gaussian RBF kernel of L2-normalised embeddings, approximated by its Taylor expansion
  k(x, y) = Σ_{p=0..P} e^{−2γ}(2γ)^p/p!·(xᵀy)^p; loss ‖K_s − K_t‖²_F / B².

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and correlation here is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.kd import soft_kl


def _check_logits(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise KdkitError(
            f"{what} compares logits (B, C) of one shape; got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)} (do the models have the same number of "
            "classes?)"
        )


def _check_target(target: Tensor | None, logits: Tensor, what: str) -> Tensor:
    if target is None:
        raise KdkitError(f"{what} needs the labels (its target/non-target split is by class)")
    if target.dim() != 1 or target.shape[0] != logits.shape[0] or target.is_floating_point():
        raise KdkitError(f"{what} needs integer labels (B,) = ({logits.shape[0]},); got "
                         f"{tuple(target.shape)} {target.dtype}")
    if logits.shape[1] < 2:
        raise KdkitError(f"{what} needs at least 2 classes, got {logits.shape[1]}")
    return target


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Each sample's logits → (z − mean(z)) / (std(z) + eps), unbiased std (Sun et al. 2024).

    Shape (B, C); a row whose logits are all equal maps to zeros.
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


class Standardized(nn.Module):
    """A logit loss applied to standardized logits (teacher and student separately):
    ``forward(s, t, *, target) = loss(standardize(s), standardize(t), target=target)``.

    The shared form of the ``logit_standardization`` option of KD, DKD (and any logit
    method); the wrapped loss keeps its own (base) temperature.
    """

    def __init__(self, loss: nn.Module, eps: float = 1e-7) -> None:
        super().__init__()
        if eps <= 0:
            raise KdkitError(f"logit standardization eps must be > 0, got {eps}")
        self.loss = loss
        self.eps = eps
        self.relates_samples = bool(getattr(loss, "relates_samples", False))

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return self.loss(standardize_logits(student, self.eps),
                         standardize_logits(teacher, self.eps), target=target)


def maybe_standardized(loss: nn.Module, logit_standardization: bool) -> nn.Module:
    """``loss``, wrapped in :class:`Standardized` when ``logit_standardization`` is set."""
    return Standardized(loss) if logit_standardization else loss


# ------------------------------------------------------------------------------- DKD


def _split(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log p^gt, log(1 − p^gt), non-target logits (B, C − 1)) of ``logits``, computed
    stably (log-sum-exps, never 1 − p)."""
    lse = torch.logsumexp(logits, dim=1)
    z_gt = logits.gather(1, target[:, None]).squeeze(1)
    # the C - 1 other classes in order, gathered (a boolean mask would wait for the GPU)
    j = torch.arange(logits.shape[1] - 1, device=logits.device)[None, :]
    others = logits.gather(1, j + (j >= target[:, None]).long())
    return z_gt - lse, torch.logsumexp(others, dim=1) - lse, others


def dkd_parts(student: Tensor, teacher: Tensor, target: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD), each (B,) and with the T² factor (Zhao et al. 2022)."""
    _check_logits(student, teacher, "DKD")
    _check_target(target, student, "DKD")
    t2 = temperature**2
    s_gt, s_rest, s_other = _split(student / temperature, target)
    t_gt, t_rest, t_other = _split(teacher.to(student.dtype) / temperature, target)
    # KL between the binary distributions [p^gt, 1 − p^gt]
    tckd = t_gt.exp() * (t_gt - s_gt) + t_rest.exp() * (t_rest - s_rest)
    log_ps = F.log_softmax(s_other, dim=1)
    log_pt = F.log_softmax(t_other, dim=1)
    nckd = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    return t2 * tckd, t2 * nckd


class DKDLoss(nn.Module):
    """α·TCKD + β·NCKD (batch means, with T²); the warm-up and CE are other Terms' work."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdkitError(f"temperature must be > 0, got {temperature}")
        if alpha < 0 or beta < 0:
            raise KdkitError(f"DKD alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        target = _check_target(target, student, "DKD")
        tckd, nckd = dkd_parts(student, teacher, target, self.temperature)
        return self.alpha * tckd.mean() + self.beta * nckd.mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


# ------------------------------------------------------------------------------ DIST


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (B,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(student: Tensor, teacher: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """(inter, intra) relation losses of DIST (Huang et al. 2022), without τ²."""
    _check_logits(student, teacher, "DIST")
    ys = F.softmax(student / tau, dim=1)
    yt = F.softmax(teacher.to(student.dtype) / tau, dim=1)
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.T, yt.T).mean()
    return inter, intra


class DISTLoss(nn.Module):
    """τ²·(β·inter + γ·intra). The intra-class relation correlates each class's
    probabilities across the batch, so the loss relates the samples of a batch."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        if tau <= 0:
            raise KdkitError(f"DIST tau must be > 0, got {tau}")
        if beta < 0 or gamma < 0:
            raise KdkitError(f"DIST beta and gamma must be >= 0, got {beta}, {gamma}")
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        inter, intra = dist_parts(student, teacher, self.tau)
        return self.tau**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}"


# ------------------------------------------------------------------------------- NKD


def nkd_parts(student: Tensor, teacher: Tensor, target: Tensor,
              temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(target part −mean(p_t^gt·log p_s^gt) at T = 1, non-target part T²·KL(p̂_t ‖ p̂_s))
    of NKD (Yang et al. 2023), both batch means, without γ."""
    _check_logits(student, teacher, "NKD")
    _check_target(target, student, "NKD")
    teacher = teacher.to(student.dtype)
    s_gt, _, s_other = _split(student, target)
    t_gt, _, t_other = _split(teacher, target)
    target_part = -(t_gt.exp() * s_gt).mean()
    non_target = temperature**2 * soft_kl(s_other, t_other, temperature)
    return target_part, non_target


class NKDLoss(nn.Module):
    """−mean(p_t^gt·log p_s^gt) + γ·T²·KL(p̂_t ‖ p̂_s) (the CE on the labels is a Term)."""

    def __init__(self, gamma: float = 1.5, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdkitError(f"temperature must be > 0, got {temperature}")
        if gamma < 0:
            raise KdkitError(f"NKD gamma must be >= 0, got {gamma}")
        self.gamma, self.temperature = gamma, temperature

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        target = _check_target(target, student, "NKD")
        target_part, non_target = nkd_parts(student, teacher, target, self.temperature)
        return target_part + self.gamma * non_target

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, temperature={self.temperature}"


# -------------------------------------------------------------------------------- CC


def cc_kernel(x: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """(B, B) Taylor-approximated Gaussian kernel of the L2-normalised rows of ``x``:
    Σ_{p=0..order} e^{−2γ}(2γ)^p/p!·(xᵢᵀxⱼ)^p. ``x`` (B, ...) is flattened."""
    q = F.normalize(x.flatten(1), p=2.0, dim=1)
    sim = q @ q.T
    k = torch.zeros_like(sim)
    for p in range(order + 1):
        k = k + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim**p
    return k


def cc_loss(student: Tensor, teacher: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """‖K_s − K_t‖²_F / B² of correlation congruence (Peng et al. 2019). Embeddings of one
    width (B, D) (an adapter maps the student's width to the teacher's)."""
    if student.dim() < 2 or student.shape[0] != teacher.shape[0] or (
            student.flatten(1).shape[1] != teacher.flatten(1).shape[1]):
        raise KdkitError(
            f"CC compares embeddings (B, D) of one batch size and width; got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    b = student.shape[0]
    ks = cc_kernel(student, gamma, order)
    kt = cc_kernel(teacher.to(student.dtype), gamma, order)
    return ((ks - kt) ** 2).sum() / b**2


class CCLoss(nn.Module):
    """Module form of :func:`cc_loss`."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def __init__(self, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if gamma <= 0:
            raise KdkitError(f"CC gamma must be > 0, got {gamma}")
        if order < 0:
            raise KdkitError(f"CC order (P) must be >= 0, got {order}")
        self.gamma, self.order = gamma, order

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return cc_loss(student, teacher, self.gamma, self.order)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"
