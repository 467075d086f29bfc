"""Methods of a dense task (``task: denoise``): plain training and distillation.

Logits are a classification notion; knowledge in a dense task lives in the teacher's
output image and in its features. ``dense_kd`` distils both: the student's output is
pulled towards the target and the teacher's output, and (``feature_weight`` > 0) each
stage end the student and teacher share, found by structure like every feature method's
(:mod:`kdkit.distill.features`: an encoder-decoder's ``layer1`` … ``layerK``, or probed),
through a 1×1 conv + BN connector when the widths differ (FitNets' regressor, Romero et
al. 2015, at every stage as in Heo et al. 2019's overhaul).
"""

from __future__ import annotations

from typing import Literal

from kdkit.distill.methods import MethodContext, register_method
from kdkit.distill.methods_feature import Layers, _adapter, _points, _teacher
from kdkit.distill.term import Term
from kdkit.errors import KdkitError
from kdkit.losses.dense import OutputMSE, PixelMSE
from kdkit.losses.feature import MSEFeatureLoss
from kdkit.taps import LOGITS


@register_method("mse", teachers="none", dense=True)
def mse(ctx: MethodContext) -> list[Term]:
    """Plain training of a dense task: the mean squared error against the target images
    (a teacher, or a scratch baseline)."""
    return [Term("mse", PixelMSE(), 1.0)]


@register_method("dense_kd", teachers="one", dense=True, summary=(
    "dense task: (1-α)·MSE(target) + α·MSE(teacher's output) [+ feature MSE at every shared "
    "stage through 1x1 conv connectors]"))
def dense_kd(ctx: MethodContext, *, alpha: float = 0.5, feature_weight: float = 0.0,
             connector: Literal["conv_bn", "conv"] = "conv_bn",
             student_layers: Layers = None, teacher_layers: Layers = None) -> list[Term]:
    """Distillation of a dense task: ``(1 − α)·mean((ŷ_s − y)²) + α·mean((ŷ_s − ŷ_t)²)``,
    plus ``feature_weight · mean((r_k(f_s^k) − f_t^k)²)`` for every stage k the two models
    share (found by structure, or named through ``student_layers``/``teacher_layers``);
    ``r_k`` a 1×1 conv + BN (``connector``) trained with the student.
    """
    if not 0.0 <= alpha <= 1.0:
        raise KdkitError(f"dense_kd: alpha must be in [0, 1], got {alpha}")
    if feature_weight < 0:
        raise KdkitError(f"dense_kd: feature_weight must be >= 0, got {feature_weight}")
    name, _ = _teacher(ctx)
    terms = [Term("mse", PixelMSE(), 1.0 - alpha),
             Term("output", OutputMSE(), alpha, LOGITS, LOGITS, teacher_name=name)]
    if feature_weight > 0:
        points = _points(ctx, student_layers, teacher_layers, "output", "dense_kd")
        for k, p in enumerate(points, start=1):
            terms.append(Term(f"feat{k}", MSEFeatureLoss(), feature_weight, p.s, p.t,
                              teacher_name=name, adapter=_adapter(p, connector),
                              teacher_view=p.t_view))
    return terms
