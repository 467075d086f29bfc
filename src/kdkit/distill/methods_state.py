"""Methods with state beyond the student's weights (METHODS.md §8): CTKD's learnt,
adversarial temperature and CRD's memory banks.

Both states are modules inside their loss, so the distiller trains them with the student's
optimiser (CTKD's temperature, CRD's embedding heads) and checkpoints them (the banks and
CRD's normalisation constants are buffers): a resumed run is bit-for-bit the uninterrupted
one. They see the training loop through the loss hooks of :class:`kdkit.distill.Distiller`:
``begin_step`` (progress, the batch's sample indices, a per-step seed), ``begin_fit`` (the
training set's size) and ``metrics`` (CTKD's mean temperature, logged per epoch as
``train/ctkd/temperature``).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

from torch import nn

from kdkit.distill.methods import (
    MethodContext,
    ce_and_kd,
    layer_tap,
    register_method,
    warmup_weight,
)
from kdkit.distill.term import Term, Weight
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.crd import CRDLoss
from kdkit.losses.ctkd import CTKDLoss, LearnableTemperature, dkd_loss_t, kd_loss_t
from kdkit.taps import LOGITS, probe_shape


def _num_classes(ctx: MethodContext) -> int:
    """The width of the student's logits: probed on the example input when there is one
    (the last-registered linear layer need not be the classifier), else that layer's."""
    if ctx.example_input is not None:
        return int(probe_shape(ctx.student, LOGITS, ctx.example_input)[-1])
    last = [m for m in ctx.student.modules() if isinstance(m, nn.Linear)]
    if last:
        return int(last[-1].out_features)
    raise KdkitError("ctkd (mode: instance): cannot tell the number of classes without an "
                     "example input; build the method with example_input=")


@register_method("ctkd", teachers="one",
                 summary="CTKD (Li et al., AAAI 2023, curriculum temperature): KD (or DKD) at a "
                         "temperature learnt adversarially through gradient reversal, λ on a "
                         "cosine curriculum over 10 epochs; T in [1, 21].")
def ctkd(ctx: MethodContext, *, base: Literal["kd", "dkd"] = "kd",
         mode: Literal["global", "instance"] = "global", alpha: float | None = None,
         curriculum_epochs: int = 10, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
         warmup_epochs: float = 20.0, logit_standardization: bool = False) -> list[Term]:
    """CTKD (Li et al. 2023) on top of KD or DKD: the distillation temperature
    T = 1 + 20·sigmoid(θ) is learnt with the student's optimiser through a gradient-reversal
    layer, so it maximises the loss the student minimises; the reversal strength λ rises
    from 0 to 1 on the paper's cosine curriculum over ``curriculum_epochs`` epochs (epoch =
    progress · the run's epochs, ``epochs=`` of :func:`build_method`; unknown: λ = 1 and a
    warning).

    ``mode``: ``global`` (one T) or ``instance`` (an MLP of each sample's teacher and
    student logits gives its own T). ``base="kd"``: (1 − α)·CE + α·T²·KL (the official
    recipe: CE 0.1, KD 0.9; ``alpha`` defaults to 0.9); ``base="dkd"``: CE +
    min(epoch/``warmup_epochs``, 1)·(``dkd_alpha``·TCKD + ``dkd_beta``·NCKD) at the learnt T
    (``alpha`` is refused there: DKD's weights are ``dkd_alpha``/``dkd_beta``).
    ``logit_standardization``: both sides' logits standardized first (Sun et al. 2024).
    The term is named ``ctkd``; its mean temperature goes to metrics.jsonl per epoch
    (``train/ctkd/temperature``).
    """
    if base == "dkd" and alpha is not None:
        raise KdkitError("ctkd: alpha weighs KD against CE for base: kd; with base: dkd set "
                         "dkd_alpha and dkd_beta instead")
    alpha = 0.9 if alpha is None else alpha
    if not 0.0 <= alpha <= 1.0:
        raise KdkitError(f"ctkd: alpha must be in [0, 1], got {alpha}")
    if curriculum_epochs < 0:
        raise KdkitError(f"ctkd: curriculum_epochs must be >= 0, got {curriculum_epochs}")
    if dkd_alpha < 0 or dkd_beta < 0:
        raise KdkitError(f"ctkd: dkd_alpha and dkd_beta must be >= 0, got {dkd_alpha}, "
                         f"{dkd_beta}")
    if ctx.epochs is None and curriculum_epochs > 0:
        warnings.warn("ctkd: the run's epoch count is unknown (pass epochs= to build_method / "
                      "build_stages), so the curriculum is off: λ = 1 from the start",
                      stacklevel=3)
    teacher = next(iter(ctx.teachers))
    temp = LearnableTemperature(mode, _num_classes(ctx) if mode == "instance" else None)
    w: Weight
    if base == "kd":
        loss = CTKDLoss(kd_loss_t, temp, curriculum_epochs=curriculum_epochs,
                        epochs=ctx.epochs, logit_standardization=logit_standardization)
        ce_w, w = 1.0 - alpha, alpha
    else:
        loss = CTKDLoss(dkd_loss_t(dkd_alpha, dkd_beta), temp,
                        curriculum_epochs=curriculum_epochs, epochs=ctx.epochs,
                        logit_standardization=logit_standardization)
        ce_w, w = 1.0, warmup_weight(1.0, warmup_epochs, ctx, "ctkd")
    return [
        Term("ce", CrossEntropy(), ce_w),
        Term("ctkd", loss, w, LOGITS, LOGITS, teacher_name=teacher),
    ]


@register_method("crd", teachers="one",
                 summary="CRD (Tian et al., ICLR 2020, contrastive representation distillation):"
                         " CE + 0.8·NCE of 128-d embeddings against memory banks of every "
                         "training sample, 16384 negatives, τ=0.07.")
def crd(ctx: MethodContext, *, weight: float = 0.8, kd_alpha: float = 0.0,
        temperature: float = 4.0, feat_dim: int = 128, negatives: int = 16384,
        tau: float = 0.07, momentum: float = 0.5, student_layer: str | None = None,
        teacher_layer: str | None = None) -> list[Term]:
    """CRD (Tian et al. 2020): CE + ``weight``·NCE between the student's and the teacher's
    embeddings (linear heads to ``feat_dim``, L2-normalised) and memory banks of every
    training sample's embeddings (momentum ``momentum``), with ``negatives`` negatives
    (clipped to the training set's size − 1) at NCE temperature ``tau``
    (:mod:`kdkit.losses.crd`: the paper's NCE with the memory-bank normalisation constant,
    as the official code, torchdistill and mdistiller). CRD+KD: ``kd_alpha`` > 0 gives
    (1 − kd_alpha)·CE + kd_alpha·KD at ``temperature``.

    The banks are sized to the training set by the loop, which also passes each batch's
    sample indices; they are checkpointed (resume stays exact) and the teacher's embedding
    is a tap like any other (the teacher-output cache stores it). Under torchrun CRD needs
    ``global_batch_terms`` (every process then updates its banks with the global batch).
    """
    if feat_dim < 1 or negatives < 1:
        raise KdkitError(f"crd: feat_dim and negatives must be >= 1, got {feat_dim}, "
                         f"{negatives}")
    if not tau > 0:
        raise KdkitError(f"crd: tau must be > 0, got {tau}")
    if not 0.0 <= momentum < 1.0:
        raise KdkitError(f"crd: momentum must be in [0, 1), got {momentum}")
    name = next(iter(ctx.teachers))
    s_tap = layer_tap(ctx.student, student_layer)
    t_tap = layer_tap(ctx.teachers[name], teacher_layer)
    s_dim = math.prod(probe_shape(ctx.student, s_tap, ctx.example_input)[1:])
    t_dim = math.prod(probe_shape(ctx.teachers[name], t_tap, ctx.example_input)[1:])
    loss = CRDLoss(s_dim, t_dim, feat_dim=feat_dim, negatives=negatives, tau=tau,
                   momentum=momentum)
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("crd", loss, weight, s_tap, t_tap, teacher_name=name)]
