"""Relative dissimilarity of You, Xu, Xu & Tao (2017), "Learning from Multiple Teacher
Networks", KDD 2017 (METHODS.md §2).

For a triplet (q, a, b) of samples of the batch, every teacher votes on its own
intermediate features which of a, b is closer to q; the majority decides q⁺ (the closer)
and q⁻, and the student pays ``max(0, d_s(q, q⁺) − d_s(q, q⁻) + δ)`` on its own features.
d is the **squared** Euclidean distance (as in the paper), for the teachers' votes and for
the student. The averaged soft targets of the paper's full objective are
:class:`kdkit.losses.ensemble.EnsembleKDLoss` (a separate Term).

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.ensemble import as_teacher_list


def sample_triplet_indices(
    batch: int, per_anchor: int = 1, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Random triplets ``(q, a, b)``: every anchor q = 0..B−1 appears ``per_anchor`` times,
    with a, b two distinct indices other than q, drawn uniformly on torch's global RNG.

    Returns three int64 tensors of shape (B · per_anchor,). Needs B >= 3.
    """
    if batch < 3:
        raise KdkitError(f"triplets need a batch of at least 3 samples, got {batch}")
    q = torch.arange(batch, device=device).repeat(per_anchor)
    n = q.shape[0]
    # a: uniform over the B − 1 indices other than q.
    a = (q + 1 + torch.randint(batch - 1, (n,), device=device)) % batch
    # b: uniform over the B − 2 indices other than q and a: draw r in [0, B − 2) and step
    # over the two excluded indices in increasing order.
    lo, hi = torch.minimum(q, a), torch.maximum(q, a)
    b = torch.randint(batch - 2, (n,), device=device)
    b = b + (b >= lo).long()
    b = b + (b >= hi).long()
    return q, a, b


def _sq_dist(x: Tensor, i: Tensor, j: Tensor) -> Tensor:
    return (x[i] - x[j]).pow(2).sum(1)


class RelativeDissimilarityLoss(nn.Module):
    """You et al.'s relative-dissimilarity hinge, teachers voting by majority.

    ``forward(student, teacher)``: student features (B, D) (or (B, ...), flattened),
    ``teacher`` a list of M feature tensors (B, D_m), dims free per teacher.
    For each anchor, ``triplets_per_anchor`` triplets (q, a, b) are drawn on torch's global
    RNG. Teacher m votes +1 if d_m(q, a) < d_m(q, b), −1 if greater, 0 on a tie; if the
    votes sum to 0 the triplet is skipped. Returns the mean hinge over the kept triplets —
    0 (keeping the graph) if B < 3 or none is kept. Votes carry no gradient.
    """

    # relates the samples of a batch: under DDP it sees the rank's shard unless
    # global_batch_terms gathers the global batch for it (kdkit.distill.term.Term)
    relates_samples = True

    def __init__(self, margin: float = 1.0, triplets_per_anchor: int = 1) -> None:
        super().__init__()
        if margin < 0:
            raise KdkitError(f"margin must be >= 0, got {margin}")
        if triplets_per_anchor < 1:
            raise KdkitError(f"triplets_per_anchor must be >= 1, got {triplets_per_anchor}")
        self.margin = margin
        self.triplets_per_anchor = int(triplets_per_anchor)

    def forward(
        self, student: Tensor, teacher: Sequence[Tensor], *, target: Tensor | None = None
    ) -> Tensor:
        ts = as_teacher_list(teacher, "RelativeDissimilarityLoss")
        if student.dim() < 2:
            raise KdkitError(f"student features must be (B, D), got {tuple(student.shape)}")
        batch = student.shape[0]
        for m, t in enumerate(ts):
            if t.dim() < 2 or t.shape[0] != batch:
                raise KdkitError(
                    f"RelativeDissimilarityLoss: teacher {m} features {tuple(t.shape)} must be "
                    f"(B, ...) with the student's batch size {batch}"
                )
        if batch < 3:
            return student.sum() * 0.0
        q, a, b = sample_triplet_indices(batch, self.triplets_per_anchor, student.device)
        with torch.no_grad():
            votes = torch.zeros(q.shape[0], device=student.device)
            for t in ts:
                t = t.flatten(1)
                votes += torch.sign(_sq_dist(t, q, b) - _sq_dist(t, q, a)).to(votes.dtype)
        direction = torch.sign(votes)  # +1: a is q⁺; −1: b is q⁺; 0: tie, skipped
        s = student.flatten(1)
        gap = direction.to(s.dtype) * (_sq_dist(s, q, a) - _sq_dist(s, q, b))  # d(q,q⁺) − d(q,q⁻)
        kept = (direction != 0).to(s.dtype)
        hinge = (gap + self.margin).clamp(min=0.0) * kept
        return hinge.sum() / kept.sum().clamp(min=1.0)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, triplets_per_anchor={self.triplets_per_anchor}"
