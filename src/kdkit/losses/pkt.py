"""Probabilistic knowledge transfer (PKT) of Passalis & Tefas (2018), "Learning Deep
Representations with Probabilistic Knowledge Transfer", ECCV 2018 (METHODS.md §5).

Within a batch, the cosine-similarity kernel ``K(a, b) = (cos(a, b) + 1) / 2 ∈ [0, 1]``
defines conditional probabilities ``p_{j|i} = K(x_i, x_j) / Σ_{k≠i} K(x_i, x_k)`` for
j ≠ i, for the teacher (P_t) and for the student (P_s); the loss is

    Σ_i Σ_{j≠i} p^t_{j|i} · log(p^t_{j|i} / p^s_{j|i}),

KL(P_t ‖ P_s) summed over all ordered pairs. Following the paper, self-pairs j = i are
excluded and the KL is summed. The official code keeps the diagonal in both the
normalisation and the KL and takes the *mean* over the B² entries, so its values are
about ours / B² (not exactly, because of the diagonal). ``eps`` guards the norms and the
logarithm (as in the official code). Features are flattened; D_s and D_t may differ.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError


def _conditional(x: Tensor, off_diag: Tensor, eps: float) -> Tensor:
    """(B, B) row-stochastic P, P[i, j] = p_{j|i}, zero on the diagonal."""
    q = F.normalize(x.flatten(1), p=2.0, dim=1, eps=eps)
    k = (q @ q.T + 1.0) / 2.0 * off_diag
    return k / k.sum(1, keepdim=True).clamp(min=eps)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """KL(P_t ‖ P_s): for each anchor i, KL of its conditional distribution over j ≠ i,
    averaged over the B anchors (kdkit's batch-mean contract; the paper sums them).

    Args: student (B, ...), teacher (B, ...) (flattened; dims may differ; no teacher
    gradient needed). Returns a scalar; 0 (keeping the graph) if B < 2.
    """
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise KdkitError(
            f"PKT needs features (B, ...) with one batch size; got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    b = student.shape[0]
    if b < 2:
        return student.sum() * 0.0
    off_diag = 1.0 - torch.eye(b, dtype=student.dtype, device=student.device)
    ps = _conditional(student, off_diag, eps)
    pt = _conditional(teacher.to(student.dtype), off_diag, eps)
    return (pt * (torch.log(pt + eps) - torch.log(ps + eps))).sum() / b


class PKTLoss(nn.Module):
    """Module form of :func:`pkt_loss`: student (B, ...), teacher (B, ...)."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        if eps <= 0:
            raise KdkitError(f"PKT eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return pkt_loss(student, teacher, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
