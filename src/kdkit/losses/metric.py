"""Embedding distillation of Yu, Liu, Wang, Wang, Rehg & Zhang (2019), "Learning Metrics
from Teachers: Compact Networks for Image Embedding", CVPR 2019 (METHODS.md §3).

* absolute teacher: ``mean_i ‖f_s(x_i) − f_t(x_i)‖₂`` — the student's embedding must equal
  the teacher's, so the shapes must match (add an adapter to the student otherwise);
* relative teacher: ``‖D_s − D_t‖_F`` on the B×B matrices of pairwise Euclidean distances
  within the batch — only the geometry is transferred, so the dimensions may differ.

The paper adds these to a batch-hard triplet loss (:mod:`kdkit.losses.triplet`); the sum
and its weights are built by the distiller, not here. Features of any shape (B, ...) are
flattened to (B, D).

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError


def _flat(x: Tensor, who: str) -> Tensor:
    if x.dim() < 2:
        raise KdkitError(f"{who} features must be (B, D) or (B, ...), got shape {tuple(x.shape)}")
    return x.flatten(1)


def pairwise_distances(x: Tensor, *, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Euclidean distances ‖x_i − x_j‖₂ between the rows of ``x`` (B, D): a (B, B) matrix.

    Computed from the Gram matrix, ``d² = ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩`` clamped at 0 with
    an exactly-zero diagonal. The square root is taken only where d² > ``eps`` and entries
    below are 0 with gradient 0, so the gradient is finite on the diagonal and for
    duplicated rows (a plain sqrt has an infinite derivative at 0).
    """
    x = x.flatten(1)
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp(min=0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d2 = d2.masked_fill(eye, 0.0)
    if squared:
        return d2
    positive = d2 > eps
    safe = torch.where(positive, d2, torch.ones_like(d2))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(d2))


def absolute_teacher_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_i ‖f_s(x_i) − f_t(x_i)‖₂`` (plain, not squared, L2 norm). Shapes (B, D) equal."""
    if student.shape != teacher.shape:
        raise KdkitError(
            f"absolute teacher loss compares embeddings directly, but the student's "
            f"{tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ; add an "
            "adapter (e.g. a linear layer) that maps the student embedding to the teacher's size"
        )
    s, t = _flat(student, "student"), _flat(teacher, "teacher")
    diff2 = (s - t).pow(2).sum(1)
    # sqrt with a finite (zero) gradient where student and teacher coincide.
    positive = diff2 > 0
    norm = torch.where(positive, torch.where(positive, diff2, torch.ones_like(diff2)).sqrt(), 0.0)
    return norm.mean()


def relative_teacher_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``‖D_s − D_t‖_F``, D the (B, B) pairwise Euclidean distance matrices of the batch.

    Frobenius norm over all B² entries (the zero diagonals contribute nothing), **not**
    divided by B or B², as written in the paper and METHODS.md; its scale therefore grows
    with B. Student (B, D) and teacher (B, D') may differ in D.
    """
    s, t = _flat(student, "student"), _flat(teacher, "teacher")
    if s.shape[0] != t.shape[0]:
        raise KdkitError(f"student batch {s.shape[0]} and teacher batch {t.shape[0]} differ")
    diff2 = (pairwise_distances(s) - pairwise_distances(t)).pow(2).sum()
    positive = diff2 > 0
    return torch.where(positive, torch.where(positive, diff2, torch.ones_like(diff2)).sqrt(), 0.0)


class AbsoluteTeacherLoss(nn.Module):
    """Module form of :func:`absolute_teacher_loss`: student and teacher (B, D), same shape."""

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return absolute_teacher_loss(student, teacher)


class RelativeTeacherLoss(nn.Module):
    """Module form of :func:`relative_teacher_loss`: student (B, D), teacher (B, D')."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return relative_teacher_loss(student, teacher)
