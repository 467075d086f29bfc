"""Triplet losses for distillation (METHODS.md §3).

* :class:`TripletKDLoss` — Oki, Abe, Miyao & Kobayashi (2020), "Triplet Loss for Knowledge
  Distillation", IJCNN 2020: anchor = teacher logits z_t(x), positive = student logits
  z_s(x), negative = student logits z_s(x⁻) for a sample x⁻ of the batch with a different
  label. Only the triplet part is here; the paper's full objective
  ``KL(T = 1) + 1.0 · CE + 2.0 · triplet`` is assembled from Terms.
* :class:`BatchHardTripletLoss` — Hermans, Beyer & Leibe (2017), "In Defense of the
  Triplet Loss for Person Re-Identification", arXiv:1703.07737; the metric-learning loss
  that Yu et al. (CVPR 2019) add their teacher losses to.

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


def _check_target(target: Tensor | None, batch: int, loss: str) -> Tensor:
    if target is None:
        raise KdkitError(f"{loss} needs the class labels (target) to choose negatives")
    if target.shape != (batch,):
        raise KdkitError(
            f"{loss}: target must have shape ({batch},) (class indices), got {tuple(target.shape)}"
        )
    return target


def sample_negatives(target: Tensor) -> tuple[Tensor, Tensor]:
    """For each sample i, a random index j of the batch with ``target[j] != target[i]``.

    Uniform among those j, drawn with one ``torch.multinomial`` call on torch's global RNG.
    Args: target (B,) class indices.
    Returns: ``(negative, keep)``, both (B,): ``keep[i]`` is False when every label in the
    batch equals ``target[i]`` (no negative exists; ``negative[i]`` is then arbitrary).
    """
    different = target[:, None] != target[None, :]  # (B, B)
    keep = different.any(dim=1)
    weights = torch.where(keep[:, None], different, torch.ones_like(different)).to(torch.float)
    negative = torch.multinomial(weights, 1).squeeze(1)
    return negative, keep


def triplet_kd_loss(
    student: Tensor, teacher: Tensor, target: Tensor, margin: float = 5.0, p: float = 2.0
) -> Tensor:
    """Oki et al.'s triplet term: mean over kept anchors of
    ``max(0, ‖a − pos‖_p − ‖a − neg‖_p + margin)`` with a = z_t(x_i), pos = z_s(x_i),
    neg = z_s(x_j), j from :func:`sample_negatives`.

    Distances are ``F.pairwise_distance`` (eps = 1e-6 added to the difference), exactly as
    ``F.triplet_margin_loss``. Anchors without a negative are dropped; 0 (keeping the
    graph) if none is left. Shapes: student, teacher (B, C); target (B,).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise KdkitError(
            f"triplet KD compares logits: student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)} must both be (B, C) with the same C"
        )
    _check_target(target, student.shape[0], "TripletKDLoss")
    negative, keep = sample_negatives(target)
    d_pos = F.pairwise_distance(teacher, student, p=p, eps=1e-6)
    d_neg = F.pairwise_distance(teacher, student[negative], p=p, eps=1e-6)
    hinge = (d_pos - d_neg + margin).clamp(min=0.0)
    kept = keep.to(hinge.dtype)
    return (hinge * kept).sum() / kept.sum().clamp(min=1.0)


def batch_hard_triplet_loss(embeddings: Tensor, target: Tensor, margin: float = 0.2) -> Tensor:
    """Batch-hard triplet loss on embeddings (B, D) with labels (B,).

    For each anchor i: hardest positive = max_j ‖x_i − x_j‖₂ over j ≠ i with the same label,
    hardest negative = min_j ‖x_i − x_j‖₂ over j with a different label; loss = mean over the
    anchors that have both of ``max(0, d_pos − d_neg + margin)``; 0 (keeping the graph) if
    none has. Distances: :func:`kdkit.losses.metric.pairwise_distances` (not squared).
    """
    if embeddings.dim() < 2:
        raise KdkitError(
            f"batch-hard triplet loss needs embeddings (B, D), got {tuple(embeddings.shape)}"
        )
    b = embeddings.shape[0]
    _check_target(target, b, "BatchHardTripletLoss")
    d = pairwise_distances(embeddings.flatten(1))
    same = target[:, None] == target[None, :]
    eye = torch.eye(b, dtype=torch.bool, device=embeddings.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    hardest_pos = d.masked_fill(~pos_mask, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(~neg_mask, float("inf")).amin(1)
    zero = torch.zeros_like(hardest_pos)
    gap = torch.where(valid, hardest_pos, zero) - torch.where(valid, hardest_neg, zero)
    hinge = torch.where(valid, (gap + margin).clamp(min=0.0), zero)
    return hinge.sum() / valid.sum().clamp(min=1).to(hinge.dtype)


class TripletKDLoss(nn.Module):
    """Module form of :func:`triplet_kd_loss` (paper defaults margin = 5, p = 2).

    ``forward(student, teacher, *, target)``: logits (B, C) each, labels (B,) required.
    """

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def __init__(self, margin: float = 5.0, p: float = 2.0) -> None:
        super().__init__()
        if margin < 0:
            raise KdkitError(f"margin must be >= 0, got {margin}")
        if p <= 0:
            raise KdkitError(f"p must be > 0, got {p}")
        self.margin = margin
        self.p = p

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        y = _check_target(target, student.shape[0], "TripletKDLoss")
        return triplet_kd_loss(student, teacher, y, self.margin, self.p)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, p={self.p}"


class BatchHardTripletLoss(nn.Module):
    """Module form of :func:`batch_hard_triplet_loss` on the student's embeddings (B, D).

    ``teacher`` is ignored (may be None); ``target`` (B,) is required.
    """

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if margin < 0:
            raise KdkitError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def forward(
        self, student: Tensor, teacher: Tensor | None = None, *, target: Tensor | None = None
    ) -> Tensor:
        y = _check_target(target, student.shape[0], "BatchHardTripletLoss")
        return batch_hard_triplet_loss(student, y, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
