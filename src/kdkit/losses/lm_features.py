"""Intermediate-layer distillation for language models: hidden states and attention maps.

* Hidden-state transfer (TinyBERT, Jiao et al., Findings of EMNLP 2020, "TinyBERT:
  Distilling BERT for Natural Language Understanding", eq. 8): MSE(H_s W_h, H_t), the
  student's hidden state through a learnt projection W_h (the Term's adapter, applied
  before the loss) against the teacher's: :func:`hidden_mse`.
* Attention transfer as a divergence of attention *distributions* (MiniLM, Wang et al.,
  NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
  Pre-Trained Transformers", eq. 3): KL(teacher row ‖ student row) per head and query
  position, averaged: :func:`attention_kl`. (TinyBERT instead takes the MSE of the
  unnormalised attention *scores*; kdkit taps the probabilities, so it follows MiniLM.)

Shapes: hidden states (B, L, D) on both sides (the student's already projected to the
teacher's D); attention maps (B, H, L, L), each row a distribution over the keys, causal:
row t is zero after column t. When the head counts differ, both sides are averaged over
their heads first (the mean of distributions is a distribution with the same causal
zeros), so the loss compares one (B, 1, L, L) map per side. ``target`` (B, L): next-token
labels whose -100 marks padding; padded query positions are left out of the averages
(None: every position is real). A batch without a real position gives 0, never NaN.

Precision: float32 at least (half-precision inputs are cast; float64 stays float64). The
attention KL is taken over the causal lower triangle only: the zeros above the diagonal
are excluded exactly (no log(0) is taken, no 0·∞ gradient), and a teacher probability
that underflowed to 0 below it contributes 0 (``xlogy``). The teacher is detached:
gradients reach the student (and its projection) only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.lm import IGNORE_INDEX


def _dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _query_mask(target: Tensor | None, b: int, n: int, device: torch.device, loss: str
                ) -> Tensor | None:
    """(B, L) bool, True at real positions; None when every position is real."""
    if target is None:
        return None
    if tuple(target.shape) != (b, n) or target.is_floating_point() or target.is_complex():
        raise KdkitError(f"{loss}: target must be the next-token ids (B, L) = {(b, n)}, -100 "
                         f"marking padding; got {tuple(target.shape)} {target.dtype}")
    return target.to(device) != IGNORE_INDEX


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` (B, L) over the real positions; 0 when there is none."""
    if mask is None:
        return per_position.mean()
    kept = torch.where(mask, per_position, per_position.new_zeros(()))
    return kept.sum() / mask.sum().clamp_min(1).to(per_position.dtype)


def hidden_mse(student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
    """TinyBERT's hidden-state loss: the mean squared difference of two hidden states.

    Args:
        student: the student's hidden state through its projection, (B, L, D).
        teacher: the teacher's hidden state, (B, L, D) (detached here).
        target: (B, L) next-token labels (-100: padding, left out), or None.

    Returns:
        A scalar: the squared difference averaged over the D features of each position,
        then over the real positions of the batch (without padding this is
        ``F.mse_loss(student, teacher)``, the mean over every element, as TinyBERT's code).
    """
    if student.dim() != 3 or student.shape != teacher.shape:
        raise KdkitError(
            f"hidden-state loss: the student's hidden state {tuple(student.shape)} and the "
            f"teacher's {tuple(teacher.shape)} must both be (B, L, D) of the same shape "
            "(the same sequence length, and a projection to the teacher's width D); tap "
            "decoder blocks of both models on the same token ids")
    dtype = _dtype(student, teacher)
    diff = student.to(dtype) - teacher.detach().to(dtype)
    per_position = diff.pow(2).mean(-1)
    mask = _query_mask(target, student.shape[0], student.shape[1], student.device,
                       "hidden-state loss")
    return _masked_mean(per_position, mask)


def attention_kl(student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
    """MiniLM's attention loss: KL(teacher ‖ student) of causal attention rows.

    Args:
        student: attention probabilities (B, H_s, L, L), rows summing to 1, zero above the
            diagonal.
        teacher: the same for the teacher, (B, H_t, L, L) (detached here). When
            H_s != H_t both sides are averaged over their heads first.
        target: (B, L) next-token labels (-100: padding; those query rows are left out),
            or None.

    Returns:
        A scalar: Σ_{k ≤ q} t[q, k] · (log t[q, k] − log s[q, k]) per head and query q,
        averaged over heads and real query positions (and the batch).
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise KdkitError(f"attention loss: attention maps are (B, heads, L, L); got the "
                         f"student's {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)}; tap the attention maps (blocks.K.attn.probs)")
    b, _, n, m = student.shape
    if (teacher.shape[0], teacher.shape[2], teacher.shape[3]) != (b, n, m) or n != m:
        raise KdkitError(
            f"attention loss: the student's attention map {tuple(student.shape)} and the "
            f"teacher's {tuple(teacher.shape)} must be (B, heads, L, L) with the same batch "
            "and sequence length (heads may differ); run both models on the same token ids")
    dtype = _dtype(student, teacher)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    if s.shape[1] != t.shape[1]:  # different head counts: one averaged map per side
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    tiny = torch.finfo(dtype).tiny
    # log s only where the row may be non-zero; 1 (log 0) elsewhere, whose gradient is 0
    log_s = torch.where(causal, s, torch.ones((), dtype=dtype, device=s.device)
                        ).clamp_min(tiny).log()
    t_in = torch.where(causal, t, torch.zeros((), dtype=dtype, device=t.device))
    per_row = (torch.xlogy(t_in, t_in) - t_in * log_s).sum(-1)  # (B, H, L)
    mask = _query_mask(target, b, n, s.device, "attention loss")
    return _masked_mean(per_row.mean(1), mask)


class HiddenMSE(nn.Module):
    """:func:`hidden_mse` as a Term's loss: ``forward(student, teacher, *, target)``."""

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None
                ) -> Tensor:
        return hidden_mse(student, teacher, target)


class AttentionKL(nn.Module):
    """:func:`attention_kl` as a Term's loss: ``forward(student, teacher, *, target)``."""

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None
                ) -> Tensor:
        return attention_kl(student, teacher, target)
