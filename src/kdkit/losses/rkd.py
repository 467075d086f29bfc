"""Relational Knowledge Distillation of Park, Kim, Lu & Cho (2019), CVPR 2019
(METHODS.md §3): the student matches *relations* between the batch's embeddings rather
than the embeddings themselves, so student (B, D) and teacher (B, D') may differ in D.

* distance-wise: ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ``, μ the mean of ‖t_i − t_j‖₂ over the
  pairs i ≠ j of the batch, computed separately for teacher and student;
* angle-wise: ``ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩``, e_ij = (t_i − t_j)/‖t_i − t_j‖₂,
  the cosine of the angle at t_j.

Both are compared with smooth-L1 (Huber, β = 1) and **averaged** over the ordered pairs
i ≠ j (distance) and ordered triples of distinct i, j, k (angle). The paper writes a sum
over these sets; the official code averages over all B² (B³) entries including the
degenerate ones, which contribute 0, i.e. its values are ours times (B−1)/B (distance) and
(B−1)(B−2)/B² (angle). The weights λ_D = 25, λ_A = 50 belong to the Term, not here.
Features of any shape (B, ...) are flattened.

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
from kdkit.losses.metric import pairwise_distances


def _pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() < 2 or teacher.dim() < 2:
        raise KdkitError(
            f"RKD needs features (B, D); got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise KdkitError(
            f"student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ"
        )
    return student.flatten(1), teacher.flatten(1)


def _masked_mean(x: Tensor, mask: Tensor, count: int) -> Tensor:
    """Mean of ``x`` where ``mask`` holds (``count`` such places); no boolean indexing, so
    on a GPU nothing waits for the device to count the places."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / count


def _normalised_distances(x: Tensor, off_diag: Tensor) -> Tensor:
    d = pairwise_distances(x)
    b = x.shape[0]
    mu = _masked_mean(d, off_diag, b * (b - 1)).clamp(min=1e-12)  # all points equal -> μ = 0
    return d / mu


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD: mean over pairs i ≠ j of smooth-L1(ψ_D(s_i, s_j), ψ_D(t_i, t_j)).

    Args: student (B, D), teacher (B, D'). Returns a scalar; 0 (keeping the graph) if B < 2.
    Invariant to translating, rotating or scaling either set of features.
    """
    s, t = _pair(student, teacher)
    b = s.shape[0]
    if b < 2:
        return student.sum() * 0.0
    off_diag = ~torch.eye(b, dtype=torch.bool, device=s.device)
    psi_s = _normalised_distances(s, off_diag)
    psi_t = _normalised_distances(t, off_diag)
    return _masked_mean(F.smooth_l1_loss(psi_s, psi_t, reduction="none"), off_diag, b * (b - 1))


def _angles(x: Tensor) -> Tensor:
    """(B, B, B) tensor A[j, i, k] = cos of the angle at x_j between x_i − x_j and x_k − x_j."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # e[j, i] = unit(x_i − x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD: mean over ordered triples of distinct (i, j, k) of
    smooth-L1(ψ_A(s_i, s_j, s_k), ψ_A(t_i, t_j, t_k)).

    Args: student (B, D), teacher (B, D'). Returns a scalar; 0 (keeping the graph) if B < 3.
    Invariant to translating, rotating or scaling either set of features.
    Memory: O(B² · D + B³).
    """
    s, t = _pair(student, teacher)
    b = s.shape[0]
    if b < 3:
        return student.sum() * 0.0
    idx = torch.arange(b, device=s.device)
    j, i, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    distinct = (i != j) & (k != j) & (i != k)
    pointwise = F.smooth_l1_loss(_angles(s), _angles(t), reduction="none")
    return _masked_mean(pointwise, distinct, b * (b - 1) * (b - 2))


class RKDDistanceLoss(nn.Module):
    """Module form of :func:`rkd_distance`: student (B, D), teacher (B, D')."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return rkd_distance(student, teacher)


class RKDAngleLoss(nn.Module):
    """Module form of :func:`rkd_angle`: student (B, D), teacher (B, D')."""

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return rkd_angle(student, teacher)
