"""Flow-of-solution-procedure (FSP) distillation of Yim, Joo, Bae & Kim (2017), "A Gift
from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017 (METHODS.md §5).

The FSP matrix of two feature maps F¹ (B, C1, H, W) and F² (B, C2, H, W) taken at the
start and the end of a section of the network is their Gram matrix over space,

    G_ij = Σ_{h,w} F¹_{h,w,i} · F²_{h,w,j} / (H·W)          (B, C1, C2),

and the loss is ``mean over the batch of ‖G_s − G_t‖²_F`` (sum over the C1·C2 entries).
The per-section weights λ_i (equal in the paper) are term weights, applied outside.

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


def fsp_matrix(a: Tensor, b: Tensor) -> Tensor:
    """FSP matrix (1/(H·W)) Σ_hw a·b of a (B, C1, H, W) and b (B, C2, H', W') → (B, C1, C2).

    If the spatial sizes differ, each map is adaptive-average-pooled to the smaller size
    (min(H, H'), min(W, W')) first, i.e. the larger one is pooled down to the smaller.
    """
    if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0]:
        raise KdkitError(
            f"FSP needs two features (B, C, H, W) of one batch; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if a.shape[2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    hw = size[0] * size[1]
    return a.flatten(2) @ b.flatten(2).transpose(1, 2) / hw


def _as_pair(x: Sequence[Tensor], who: str) -> tuple[Tensor, Tensor]:
    if isinstance(x, Tensor) or len(x) != 2:
        raise KdkitError(
            f"FSP: the {who} must be a pair (start feature, end feature) of a section, "
            f"got {type(x).__name__}" + ("" if isinstance(x, Tensor) else f" of length {len(x)}")
        )
    return x[0], x[1]


def fsp_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Mean over batch of ‖G_s − G_t‖²_F, G = :func:`fsp_matrix` of each pair.

    Args: student (s1 (B, C1, H, W), s2 (B, C2, H', W')), teacher (t1, t2) with the same
    channel counts C1, C2 (spatial sizes may differ from the student's); no teacher gradient
    needed. Returns a scalar.
    """
    s1, s2 = _as_pair(student, "student")
    t1, t2 = _as_pair(teacher, "teacher")
    gs, gt = fsp_matrix(s1, s2), fsp_matrix(t1, t2)
    if gs.shape != gt.shape:
        raise KdkitError(
            f"FSP: student pair {tuple(s1.shape)}, {tuple(s2.shape)} and teacher pair "
            f"{tuple(t1.shape)}, {tuple(t2.shape)} give FSP matrices {tuple(gs.shape)} and "
            f"{tuple(gt.shape)}; the channel counts (and batch sizes) must match — add "
            "connectors to the student features"
        )
    return (gs - gt).pow(2).sum((1, 2)).mean()


class FSPLoss(nn.Module):
    """Module form of :func:`fsp_loss`: student and teacher are each a pair (start, end)."""

    def forward(
        self,
        student: Sequence[Tensor],
        teacher: Sequence[Tensor],
        *,
        target: Tensor | None = None,
    ) -> Tensor:
        return fsp_loss(student, teacher)
