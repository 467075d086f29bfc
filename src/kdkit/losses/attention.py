"""Attention transfer of Zagoruyko & Komodakis (2017), "Paying More Attention to
Attention: Improving the Performance of Convolutional Neural Networks via Attention
Transfer", ICLR 2017 (METHODS.md §5).

Activation-based spatial attention map of a feature A (B, C, H, W):

    Q = vec(mean_c |A_c|^p) / ‖vec(mean_c |A_c|^p)‖₂        (B, H·W), p = 2 by default

and the loss is the **mean over batch and positions** of (Q_s − Q_t)², as METHODS.md
specifies and the official code computes (``(at(x) - at(y)).pow(2).mean()``). The paper's
Eq. 2 writes ``β/2 · ‖Q_s − Q_t‖_p`` but sets β = 10³ "divided by the number of elements
in the attention map and batch size", i.e. it too trains on the mean of squares; we follow
that (and METHODS.md) rather than the literal unsquared norm. β = 1000 and the sum over
the chosen stages are term weights, applied by the distiller, not here.

Channels may differ between student and teacher (mean over channels); the spatial sizes
must match.

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


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map: vec(mean_c |f_c|^p), L2-normalised per sample.

    Args: f (B, C, H, W) (any number ≥ 1 of spatial dims works). Returns (B, H·W).
    A map that is all zero stays zero (normalisation eps 1e-12).
    """
    if f.dim() < 3:
        raise KdkitError(f"attention map needs a feature (B, C, H, W), got shape {tuple(f.shape)}")
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), p=2.0, dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Mean over batch and positions of (Q_s − Q_t)², Q = :func:`attention_map`.

    Args: student (B, C_s, H, W), teacher (B, C_t, H, W) (no gradient needed); C_s may
    differ from C_t. Returns a scalar.
    """
    check_same_positions(student, teacher, "attention transfer")
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class ATLoss(nn.Module):
    """Module form of :func:`at_loss`: student (B, C_s, H, W), teacher (B, C_t, H, W)."""

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p <= 0:
            raise KdkitError(f"attention map exponent p must be > 0, got {p}")
        self.p = p

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return at_loss(student, teacher, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
