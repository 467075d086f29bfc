"""Similarity-preserving distillation of Tung & Mori (2019), "Similarity-Preserving
Knowledge Distillation", ICCV 2019 (METHODS.md §5).

With Q (B, D) the flattened features of a batch, G = Q Qᵀ (B, B) and G̃ = G with each row
L2-normalised, the loss is ``‖G̃_t − G̃_s‖²_F / B²``. Only the within-batch similarity
pattern is transferred, so D_s and D_t may differ. The sum over layer pairs and the weight
γ are applied outside.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-normalised batch similarity G̃ of f (B, ...) flattened to (B, D): (B, B)."""
    q = f.flatten(1)
    return F.normalize(q @ q.T, p=2.0, dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """‖G̃_t − G̃_s‖²_F / B². Args: student (B, ...), teacher (B, ...), dims may differ."""
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise KdkitError(
            f"SP needs features (B, ...) with one batch size; got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    b = student.shape[0]
    return (similarity_matrix(teacher) - similarity_matrix(student)).pow(2).sum() / (b * b)


class SPLoss(nn.Module):
    """Module form of :func:`sp_loss`: student (B, ...), teacher (B, ...)."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return sp_loss(student, teacher)
