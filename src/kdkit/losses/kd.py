"""Soft-target distillation loss of Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network", arXiv:1503.02531.

    L_soft = T² · KL(p_t^T ‖ p_s^T),   p^T = softmax(z / T)

KL is summed over classes and averaged over the batch ("batchmean"). The T² factor keeps
the gradient magnitude of the soft term independent of T: without it,
∂/∂z_s KL = (1/T)(p_s^T − p_t^T)/B.  The full KD objective
``α · L_soft + (1 − α) · CE`` is assembled from Terms by the distiller, not here.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


def check_same_logits(student: Tensor, teacher: Tensor) -> None:
    """One clear error when the student's and teacher's logits differ in shape."""
    if student.shape != teacher.shape:
        raise KdkitError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ; do the models have the same number of classes?"
        )


def soft_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, mean over batch.

    Args:
        student: logits (B, C). teacher: logits (B, C), no gradient needed.
    Returns: scalar, without the T² factor.
    """
    check_same_logits(student, teacher)
    if student.dim() > 2:  # token logits (B, L, V): the mean over every position
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    log_ps = F.log_softmax(student / temperature, dim=-1)
    log_pt = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton's soft-target loss T² · KL(p_t^T ‖ p_s^T) (batchmean). Shapes (B, C)."""
    return temperature**2 * soft_kl(student, teacher, temperature)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: ``forward(student, teacher) -> scalar``."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdkitError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return kd_loss(student, teacher, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """H(p_t^T, p_s^T) = −Σ p_t^T log p_s^T, mean over the batch; no T² (FitNets' KD term).

    Equals :func:`soft_kl` plus the teacher's entropy, a constant with no gradient.
    Shapes (B, C).
    """
    soft_kl(student[:0], teacher[:0], temperature)  # shape check with a clear error
    log_ps = F.log_softmax(student / temperature, dim=-1)
    pt = F.softmax(teacher / temperature, dim=-1)
    return -(pt * log_ps).sum(-1).mean()


class SoftCrossEntropy(nn.Module):
    """Module form of :func:`soft_cross_entropy` (Romero et al. 2015, FitNets stage 2)."""

    def __init__(self, temperature: float = 3.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise KdkitError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return soft_cross_entropy(student, teacher, self.temperature)
