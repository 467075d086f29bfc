"""Feature-regression losses (METHODS.md §5).

* FitNets hint loss of Romero, Ballas, Kahou, Chassang, Gatta & Bengio (2015), "FitNets:
  Hints for Thin Deep Nets", ICLR 2015: stage 1 trains the student up to its guided layer,
  plus a regressor r, on ``½‖u_t − r(v_s)‖²``, u_t the teacher's hint layer and v_s the
  student's guided layer.
* A plain mean-squared-error baseline between two feature maps.

The regressor / connector r belongs to the student side and has already been applied:
both losses take ``student = r(v_s)`` and ``teacher = u_t`` of the same shape (B, ...).

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


def check_same_shape(student: Tensor, teacher: Tensor, loss: str) -> None:
    """Raise :class:`KdkitError` unless ``student`` and ``teacher`` have the same shape (B, ...)."""
    if student.shape != teacher.shape:
        raise KdkitError(
            f"{loss}: student feature {tuple(student.shape)} and teacher feature "
            f"{tuple(teacher.shape)} differ in shape; add a connector (e.g. a 1×1 conv) that "
            "maps the student feature to the teacher's shape"
        )
    if student.dim() < 1:
        raise KdkitError(f"{loss}: features need a batch dimension, got a 0-d tensor")


def check_same_positions(student: Tensor, teacher: Tensor, loss: str) -> None:
    """Raise unless both are (B, C, H, W) maps with equal B, H, W (channels may differ)."""
    if student.dim() < 3 or teacher.dim() < 3:
        raise KdkitError(
            f"{loss} needs features (B, C, H, W); got student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise KdkitError(
            f"{loss}: student feature {tuple(student.shape)} and teacher feature "
            f"{tuple(teacher.shape)} must have the same batch size and spatial size (channels "
            "may differ); tap layers of equal resolution or resize one of them"
        )


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets hint loss ``½‖u_t − r(v_s)‖²``.

    Reduction: ½ · the sum of squared differences over all feature elements of a sample
    (the paper's per-sample objective), then the mean over the batch.

    Args:
        student: r(v_s), (B, ...). teacher: u_t, same shape, no gradient needed.
    Returns: scalar.
    """
    check_same_shape(student, teacher, "hint loss")
    diff = (student - teacher).reshape(student.shape[0], -1)
    return 0.5 * diff.pow(2).sum(1).mean()


def mse_feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over all elements (batch and feature). Shapes (B, ...), equal."""
    check_same_shape(student, teacher, "feature MSE")
    return F.mse_loss(student, teacher, reduction="mean")


class HintLoss(nn.Module):
    """Module form of :func:`hint_loss`: student r(v_s) and teacher u_t, both (B, ...)."""

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return hint_loss(student, teacher)


class MSEFeatureLoss(nn.Module):
    """Module form of :func:`mse_feature_loss`: mean of squares over all elements."""

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return mse_feature_loss(student, teacher)
