"""The hierarchical context loss (HCL) of ReviewKD: Chen, Liu, Zhao & Jia (2021),
"Distilling Knowledge via Knowledge Review", CVPR 2021 (METHODS.md §8).

For one stage, with the student's fused feature F_s and the teacher's F_t (B, C, H, W):

    HCL(F_s, F_t) = Σ_k w_k · MSE(P_k(F_s), P_k(F_t)) / Σ_k w_k,    w_k = 1 / 2^k,

over the levels k = 0, 1, 2, ... of the pyramid (full size, then adaptive average pools to
4×4, 2×2, 1×1; a level is skipped where its size is not below the map's height, as in the
authors' code), MSE the mean over all elements. The loss of several stages is the sum of
their HCLs.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.feature import check_same_shape

PYRAMID = (4, 2, 1)  # the pooled sizes after the full map


def hcl_stage(student: Tensor, teacher: Tensor, pyramid: Sequence[int] = PYRAMID) -> Tensor:
    """HCL of one stage: student and teacher (B, C, H, W) of the same shape; a scalar."""
    check_same_shape(student, teacher, "HCL")
    if student.dim() != 4:
        raise KdkitError(f"HCL needs feature maps (B, C, H, W), got {tuple(student.shape)}")
    h = student.shape[2]
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for size in pyramid:
        if size >= h:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size),
                                          F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Σ over stages of :func:`hcl_stage`; ``student`` and ``teacher`` are lists of maps,
    one per stage, pairwise of the same shape."""
    if isinstance(student, Tensor) or isinstance(teacher, Tensor) or \
            len(student) != len(teacher) or not student:
        raise KdkitError("HCL takes one student and one teacher feature per stage (two lists "
                         "of equal length)")
    total = hcl_stage(student[0], teacher[0])
    for s, t in zip(student[1:], teacher[1:], strict=True):
        total = total + hcl_stage(s, t)
    return total


class HCLLoss(nn.Module):
    """Module form of :func:`hcl_loss`: lists of (fused) student and teacher stage maps."""

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], *,
                target: Tensor | None = None) -> Tensor:
        return hcl_loss(student, teacher)
