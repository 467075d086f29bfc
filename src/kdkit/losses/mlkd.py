"""Multi-level logit distillation (MLKD; Jin, Wang, Lin, CVPR 2023, "Multi-Level Logit
Distillation"; official code github.com/Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/distillers/KD_ours.py``).

Each batch comes in two views, weak (w) and strong (s); at each temperature T of a set
(2, 3, 4, 5, 6), with P = softmax(z / T):

- instance level: T²·KL(p_t ‖ p_s) per sample, on both views;
- batch level: ‖G_t − G_s‖²_F / B with G = P Pᵀ (B × B), on the weak view;
- class level: ‖H_t − H_s‖²_F / C with H = Pᵀ P (C × C), on the weak view.

Confidence masking (the paper's, from the teacher's weak-view prediction at T = 1): a sample
whose confidence max_c p_t[c] is below the batch's median (50th percentile, linear
interpolation as ``numpy.percentile``) is masked out of the weak instance term and its row
of the batch Gram; a class whose summed teacher probability over the batch is below the
classes' median is masked out of its row of the class Gram. Kept entries keep the
normalisation of the unmasked losses (÷B, ÷B, ÷C), so a masked-out sample contributes zero.

Where the official code differs (and what we do):

- Its masks keep the samples (classes) *at or below* the median (``confidence.le``); the paper
  masks out low-confidence ones. We follow the paper: keep those at or above the median.
- It multiplies each already batch-reduced loss by the mask and averages (``reduce=True``;
  the ``reduce=False`` it meant is commented out), so the masks only scale the weak terms by
  the kept fraction. We select samples per row as the commented-out code intended (a Gram's
  mask on one index: the Grams are symmetric, rows or columns alike).
- Its strong-view instance terms at T = 2 and 6 read the weak view (a copy-paste slip); we
  use the strong view at every T.
- It computes the strong-view batch and class terms but leaves them out of the total; so do
  we (they are not computed). Its total is 0.1·(CE_w + CE_s) + 0.9·(every term above), each
  temperature's term summed, not averaged: the method's Terms carry those weights.
- Logit standardization (Sun et al., CVPR 2024, whose MLKD code this follows) standardizes
  the logits of the instance terms only; the Grams and the masks use the raw logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.logit import standardize_logits

MLKD_TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)


def _check(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise KdkitError(f"MLKD compares logits (B, C) of one shape; got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")


def median_mask(values: Tensor) -> Tensor:
    """``values >= median(values)`` (B,) bool; the median is the 50th percentile with linear
    interpolation (``numpy.percentile``'s default), so with B even and no ties half are kept."""
    v = values.detach()
    work = v if v.dtype == torch.float64 else v.float()
    return work >= torch.quantile(work, 0.5)


def confidence_mask(teacher_weak: Tensor) -> Tensor:
    """Samples kept by MLKD's confidence masking: the teacher's top softmax probability (T = 1)
    at or above the batch's median. (B,) bool."""
    return median_mask(F.softmax(teacher_weak.detach(), dim=1).amax(dim=1))


def class_confidence_mask(teacher_weak: Tensor) -> Tensor:
    """Classes kept by the class-level masking: the teacher's softmax probability summed over
    the batch at or above the classes' median. (C,) bool."""
    return median_mask(F.softmax(teacher_weak.detach(), dim=1).sum(dim=0))


def instance_kd(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per-sample T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), (B,)."""
    _check(student, teacher)
    log_ps = F.log_softmax(student / temperature, dim=1)
    log_pt = F.log_softmax(teacher.to(student.dtype) / temperature, dim=1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)


def batch_gram_loss(student: Tensor, teacher: Tensor, temperature: float,
                    keep: Tensor | None = None) -> Tensor:
    """Σ_ij keep_i·(G_t − G_s)²_ij / B, G = P Pᵀ (B × B) of the softened predictions."""
    _check(student, teacher)
    ps = F.softmax(student / temperature, dim=1)
    pt = F.softmax(teacher.to(student.dtype) / temperature, dim=1)
    diff = (pt @ pt.T - ps @ ps.T) ** 2
    if keep is not None:
        diff = diff * keep.to(diff.dtype)[:, None]
    return diff.sum() / student.shape[0]


def class_gram_loss(student: Tensor, teacher: Tensor, temperature: float,
                    keep: Tensor | None = None) -> Tensor:
    """Σ_kl keep_k·(H_t − H_s)²_kl / C, H = Pᵀ P (C × C) of the softened predictions."""
    _check(student, teacher)
    ps = F.softmax(student / temperature, dim=1)
    pt = F.softmax(teacher.to(student.dtype) / temperature, dim=1)
    diff = (pt.T @ pt - ps.T @ ps) ** 2
    if keep is not None:
        diff = diff * keep.to(diff.dtype)[:, None]
    return diff.sum() / student.shape[1]


def mlkd_parts(
    student_weak: Tensor, student_strong: Tensor, teacher_weak: Tensor, teacher_strong: Tensor,
    temperatures: Sequence[float] = MLKD_TEMPERATURES, *, logit_standardization: bool = False,
) -> dict[str, Tensor]:
    """MLKD's levels, each summed over ``temperatures``: ``instance`` (masked weak + strong),
    ``batch`` (masked weak), ``class`` (class-masked weak), and ``kept`` (the fraction of
    samples the confidence mask keeps)."""
    _check(student_weak, teacher_weak)
    _check(student_strong, teacher_strong)
    if student_weak.shape != student_strong.shape:
        raise KdkitError(f"MLKD's views must have one shape; got {tuple(student_weak.shape)} "
                         f"(weak) and {tuple(student_strong.shape)} (strong)")
    keep = confidence_mask(teacher_weak)
    keep_cls = class_confidence_mask(teacher_weak)
    sw, ss, tw, ts = student_weak, student_strong, teacher_weak, teacher_strong
    if logit_standardization:
        sw, ss = standardize_logits(sw), standardize_logits(ss)
        tw, ts = standardize_logits(tw), standardize_logits(ts)
    w = keep.to(student_weak.dtype)
    zero = student_weak.new_zeros(())
    inst, batch, cls = zero, zero, zero
    for t in temperatures:
        inst = inst + (instance_kd(sw, tw, t) * w).mean() + instance_kd(ss, ts, t).mean()
        batch = batch + batch_gram_loss(student_weak, teacher_weak, t, keep)
        cls = cls + class_gram_loss(student_weak, teacher_weak, t, keep_cls)
    return {"instance": inst, "batch": batch, "class": cls, "kept": w.mean()}


class MLKDLoss(nn.Module):
    """instance + batch + class levels of MLKD (:func:`mlkd_parts`), unweighted.

    Takes both views: ``forward([s_weak, s_strong], [t_weak, t_strong])`` (``views = 2``:
    the distiller passes each side as a list of the two views' logits). ``view(x, step)``
    makes the strong view of a batch (``second_view``, called by the distiller each step).
    Reports each level and the kept fraction as metrics.
    """

    views = 2
    # the batch Gram, the class Gram and the median mask relate the samples of a batch
    relates_samples = True
    metric_names = ("instance", "batch", "class", "kept")

    def __init__(self, temperatures: Sequence[float] = MLKD_TEMPERATURES, *,
                 logit_standardization: bool = False,
                 view: Callable[[Tensor, Any], Tensor] | None = None) -> None:
        super().__init__()
        # the distiller calls second_view(x, StepInfo) for the strong view of each batch
        self.second_view = view
        temps = tuple(float(t) for t in temperatures)
        if not temps or any(not t > 0 for t in temps):
            raise KdkitError(f"MLKD temperatures must be a non-empty list of numbers > 0, got "
                             f"{list(temperatures)}")
        self.temperatures = temps
        self.logit_standardization = bool(logit_standardization)
        self._last: dict[str, Tensor] | None = None

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], *,
                target: Tensor | None = None) -> Tensor:
        if not isinstance(student, list | tuple) or not isinstance(teacher, list | tuple) or (
                len(student) != 2 or len(teacher) != 2):
            raise KdkitError("MLKD takes the weak and the strong view of each side "
                             "([weak, strong] logits); the distiller passes them to a loss "
                             "with views = 2")
        parts = mlkd_parts(student[0], student[1], teacher[0], teacher[1], self.temperatures,
                           logit_standardization=self.logit_standardization)
        self._last = {k: v.detach() for k, v in parts.items()}
        return parts["instance"] + parts["batch"] + parts["class"]

    def metrics(self) -> dict[str, Tensor]:
        if self._last is None:
            raise KdkitError("mlkd: no values yet (metrics() before a forward)")
        return dict(self._last)

    def extra_repr(self) -> str:
        return (f"temperatures={list(self.temperatures)}, "
                f"logit_standardization={self.logit_standardization}")


class BothViews(nn.Module):
    """``loss`` on each view, summed: ``loss(s_w, t_w) + loss(s_s, t_s)`` (``views = 2``;
    MLKD's cross-entropy on the weak and the strong view)."""

    views = 2

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor] | None, *,
                target: Tensor | None = None) -> Tensor:
        t = teacher if teacher is not None else (None, None)
        return (self.loss(student[0], t[0], target=target)
                + self.loss(student[1], t[1], target=target))
