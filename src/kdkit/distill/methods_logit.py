"""Logit methods after the overhaul (METHODS.md §8): DKD, DIST, NKD, and CC (a relation of
embeddings, kept here as the logit-era baseline of CRD's table).

Every method adds its loss to CE on the labels (weight 1), as the papers do. Logit
standardization (Sun et al., CVPR 2024) is the ``logit_standardization`` option of ``kd``
and ``dkd`` (:func:`kdkit.losses.logit.maybe_standardized`, shared by every logit method).
"""

from __future__ import annotations

from torch import nn

from kdkit.distill.methods import (
    MethodContext,
    ce_and_kd,
    layer_tap,
    register_method,
    warmup_weight,
)
from kdkit.distill.term import Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.logit import CCLoss, DISTLoss, DKDLoss, NKDLoss, maybe_standardized
from kdkit.taps import LOGITS, probe_shape


def _teacher(ctx: MethodContext) -> str:
    return next(iter(ctx.teachers))


def _check(method: str, **values: float) -> None:
    """Each of ``values`` must be >= 0 (``temperature``/``tau`` > 0): a clear error."""
    for key, value in values.items():
        if key in ("temperature", "tau"):
            if not value > 0:
                raise KdkitError(f"{method}: {key} must be > 0, got {value}")
        elif not value >= 0:
            raise KdkitError(f"{method}: {key} must be >= 0, got {value}")


@register_method("dkd", teachers="one",
                 summary="DKD (Zhao et al., CVPR 2022, Decoupled KD): CE + warm-up·(α·TCKD + "
                         "β·NCKD); α=1, β=8, T=4, 20 warm-up epochs.")
def dkd(ctx: MethodContext, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        warmup_epochs: float = 20.0, logit_standardization: bool = False) -> list[Term]:
    """Decoupled KD (Zhao et al., CVPR 2022): CE + min(epoch/warm-up, 1)·(α·TCKD + β·NCKD).

    TCKD = T²·KL([p_t^gt, 1 − p_t^gt] ‖ [p_s^gt, 1 − p_s^gt]); NCKD = T²·KL(p̂_t ‖ p̂_s) over
    the non-target classes. Defaults are the paper's CIFAR-100 ones (ImageNet: β = 0.5,
    T = 1). The warm-up is in epochs: epoch = progress · the run's epochs (``epochs=`` of
    :func:`build_method`, passed by the pipelines), a linear ramp from 0 at the start
    (mdistiller steps it once per epoch, from 1/warm-up in the first epoch).
    ``logit_standardization``: standardize both sides' logits first (Sun et al. 2024).
    """
    _check("dkd", alpha=alpha, beta=beta, temperature=temperature)
    loss = maybe_standardized(DKDLoss(alpha, beta, temperature), logit_standardization)
    return [
        Term("ce", CrossEntropy(), 1.0),
        Term("dkd", loss, warmup_weight(1.0, warmup_epochs, ctx, "dkd"), LOGITS, LOGITS,
             teacher_name=_teacher(ctx)),
    ]


@register_method("dist", teachers="one",
                 summary="DIST (Huang et al., NeurIPS 2022, KD from a stronger teacher): CE + "
                         "τ²(β·inter + γ·intra) Pearson relations; β=γ=τ=1 (ImageNet).")
def dist(ctx: MethodContext, *, beta: float = 1.0, gamma: float = 1.0,
         tau: float = 1.0) -> list[Term]:
    """DIST (Huang et al., NeurIPS 2022): CE + τ²·(β·inter + γ·intra), where inter/intra are
    1 − the mean Pearson correlation of the softened predictions per sample / per class.

    Defaults are the paper's ImageNet ones; its CIFAR-100 setting is β = γ = 2, τ = 4.
    The intra-class relation spans the batch (a term that relates samples under DDP).
    """
    _check("dist", beta=beta, gamma=gamma, tau=tau)
    return [
        Term("ce", CrossEntropy(), 1.0),
        Term("dist", DISTLoss(beta, gamma, tau), 1.0, LOGITS, LOGITS,
             teacher_name=_teacher(ctx)),
    ]


@register_method("nkd", teachers="one",
                 summary="NKD (Yang et al., ICCV 2023, normalized KD): CE − p_t^gt·log p_s^gt "
                         "+ γ·T²·KL of normalised non-target parts; γ=1.5, T=1.")
def nkd(ctx: MethodContext, *, gamma: float = 1.5, temperature: float = 1.0) -> list[Term]:
    """Normalized KD (Yang et al., ICCV 2023): CE − mean(p_t^gt·log p_s^gt) (T = 1) +
    γ·T²·KL(p̂_t ‖ p̂_s) over the normalised non-target distributions. Defaults: ImageNet.

    The official code's non-target part is a cross-entropy; it differs from the paper's KL
    used here by the teacher's entropy, a constant (same gradients).
    """
    _check("nkd", gamma=gamma, temperature=temperature)
    return [
        Term("ce", CrossEntropy(), 1.0),
        Term("nkd", NKDLoss(gamma, temperature), 1.0, LOGITS, LOGITS,
             teacher_name=_teacher(ctx)),
    ]


@register_method("cc", teachers="one",
                 summary="CC (Peng et al., ICCV 2019, correlation congruence): CE + 100·‖K_s − "
                         "K_t‖²/B², Taylor Gaussian kernel (γ=0.4, P=2) of embeddings.")
def cc(ctx: MethodContext, *, weight: float = 100.0, gamma: float = 0.4, order: int = 2,
       kd_alpha: float = 0.0, temperature: float = 4.0, student_layer: str | None = None,
       teacher_layer: str | None = None) -> list[Term]:
    """Correlation congruence (Peng et al., ICCV 2019): CE + weight·‖K_s − K_t‖²_F / B².

    K is the Taylor expansion (order P) of a Gaussian kernel of the L2-normalised
    penultimate embeddings (or ``student_layer`` / ``teacher_layer``); a student of another
    width goes through a trained linear projection first. ``weight`` 100 is that of the
    kernel form's public reproduction (Knowledge-Distillation-Zoo, λ = 100 with γ = 0.4,
    P = 2, the loss an MSE over the B² entries as here); CRD's table used 0.02 for a
    different form of the loss (products of neighbouring samples' feature differences).
    """
    _check("cc", weight=weight, gamma=gamma)
    if gamma == 0:
        raise KdkitError("cc: gamma must be > 0, got 0")
    if order < 0:
        raise KdkitError(f"cc: order must be >= 0, got {order}")
    name = _teacher(ctx)
    teacher = ctx.teachers[name]
    s_tap, t_tap = layer_tap(ctx.student, student_layer), layer_tap(teacher, teacher_layer)
    s_dim = probe_shape(ctx.student, s_tap, ctx.example_input)
    t_dim = probe_shape(teacher, t_tap, ctx.example_input)
    if len(s_dim) != 2 or len(t_dim) != 2:
        raise KdkitError(f"cc relates flat embeddings; the tapped layers give {s_dim} "
                         f"(student) and {t_dim} (teacher); tap a (B, D) layer")
    adapter = nn.Linear(s_dim[1], t_dim[1], bias=False) if s_dim[1] != t_dim[1] else None
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("cc", CCLoss(gamma, order), weight, s_tap, t_tap, teacher_name=name,
             adapter=adapter),
    ]
