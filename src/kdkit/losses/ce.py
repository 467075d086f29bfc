"""Task cross-entropy as a loss module with the kdkit signature.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def cross_entropy(student: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of logits ``student`` (B, C) against labels ``target`` (B,)."""
    if student.dim() > 2:  # token logits (B, L, V) and labels (B, L); -100 marks padding
        student, target = student.reshape(-1, student.shape[-1]), target.reshape(-1)
    return F.cross_entropy(student, target, label_smoothing=label_smoothing)


class CrossEntropy(nn.Module):
    """Cross-entropy with the hard labels; ignores the teacher."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, student: Tensor, teacher: Tensor | None = None, *, target: Tensor | None = None
    ) -> Tensor:
        if target is None:
            raise ValueError("CrossEntropy needs target labels")
        return cross_entropy(student, target, self.label_smoothing)


