"""Neuron selectivity transfer (NST) of Huang & Wang (2017), "Like What You Like: Knowledge
Distill via Neuron Selectivity Transfer", arXiv:1707.01219 (METHODS.md §5).

Each channel of a feature (B, C, H, W) is one sample f^i ∈ R^{H·W} of the layer's
"neuron selectivity" distribution, L2-normalised. The loss is the squared maximum mean
discrepancy between the student's C_s and the teacher's C_t channel vectors,

    MMD² = 1/C_t² Σ_{i,i'} k(t_i, t_i') + 1/C_s² Σ_{j,j'} k(s_j, s_j') − 2/(C_s C_t) Σ_{i,j} k(s_j, t_i),

with the polynomial kernel k(x, y) = (xᵀy + c)^d (the paper's main choice: d = 2, c = 0),
averaged over the batch. The paper's λ/2 in ``CE + λ/2 · MMD²`` is a term weight, applied
outside. Channels may differ; spatial sizes must match.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.feature import check_same_positions


def _poly_mean(x: Tensor, y: Tensor, degree: int, c: float) -> Tensor:
    """(B,) mean over channel pairs of (x_iᵀ y_j + c)^d, x (B, Cx, N), y (B, Cy, N)."""
    return (x @ y.transpose(1, 2) + c).pow(degree).mean((1, 2))


def nst_loss(student: Tensor, teacher: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    """MMD² with polynomial kernel between channel vectors, mean over the batch.

    Args: student (B, C_s, H, W), teacher (B, C_t, H, W) (no gradient needed).
    Returns a scalar ≥ 0 (up to rounding) for c ≥ 0.
    """
    check_same_positions(student, teacher, "NST")
    s = F.normalize(student.flatten(2), p=2.0, dim=2)
    t = F.normalize(teacher.flatten(2), p=2.0, dim=2)
    mmd2 = (
        _poly_mean(t, t, degree, c)
        + _poly_mean(s, s, degree, c)
        - 2.0 * _poly_mean(s, t, degree, c)
    )
    return mmd2.mean()


class NSTLoss(nn.Module):
    """Module form of :func:`nst_loss`: student (B, C_s, H, W), teacher (B, C_t, H, W)."""

    def __init__(self, degree: int = 2, c: float = 0.0) -> None:
        super().__init__()
        if int(degree) != degree or degree < 1:
            raise KdkitError(f"NST kernel degree must be a positive integer, got {degree}")
        if c < 0:
            raise KdkitError(f"NST kernel offset c must be >= 0 (a valid kernel), got {c}")
        self.degree = int(degree)
        self.c = float(c)

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return nst_loss(student, teacher, self.degree, self.c)

    def extra_repr(self) -> str:
        return f"degree={self.degree}, c={self.c}"
