"""Activation-boundary distillation of Heo, Lee, Yun & Choi (2019), "Knowledge Transfer
via Distillation of Activation Boundaries Formed by Hidden Neurons", AAAI 2019
(METHODS.md §5).

The student learns where the teacher's neurons switch on, from pre-ReLU responses T
(teacher) and S (student, after its connector), with the paper's alternative (hinge-like,
differentiable) loss

    ‖ρ(T) ⊙ σ(μ·1 − S)² + (1 − ρ(T)) ⊙ σ(μ·1 + S)²‖₁,   ρ(T) = 1[T > 0], σ = ReLU,

i.e. S is pushed above μ where the teacher neuron is active and below −μ where it is
not. Summed over the elements, averaged over the batch; margin μ = 1 by default. The
official code's scale (its /1000 and stage weights) belongs to the term weights.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.feature import check_same_shape


def ab_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary alternative loss: sum over elements, mean over batch.

    Args: student S (B, ...) pre-ReLU after the connector, teacher T (B, ...) pre-ReLU,
    same shape, no teacher gradient needed. Returns a scalar.
    """
    check_same_shape(student, teacher, "activation-boundary loss")
    on = (teacher > 0).to(student.dtype)
    per_elem = on * F.relu(margin - student).pow(2) + (1.0 - on) * F.relu(margin + student).pow(2)
    return per_elem.sum() / student.shape[0]


class ABLoss(nn.Module):
    """Module form of :func:`ab_loss`: student and teacher pre-ReLU (B, ...), same shape."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if margin < 0:
            raise KdkitError(f"activation-boundary margin must be >= 0, got {margin}")
        self.margin = margin

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return ab_loss(student, teacher, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
