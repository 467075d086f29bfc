"""Multi-teacher methods (METHODS.md §2): ensembles of teachers, switching, streams, You et al.

Every method reads all the teachers it is given, in the given order, and adds the task
cross-entropy: ``(1 − α)·CE + α·(ensemble soft-target term)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdkit.distill.methods import MethodContext, layer_tap, register_method
from kdkit.distill.term import Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.ensemble import EnsembleKDLoss, MultiStreamKDLoss, RandomTeacherKDLoss
from kdkit.losses.relative import RelativeDissimilarityLoss
from kdkit.taps import LOGITS


def _check(alpha: float, temperature: float, method: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise KdkitError(f"{method}: alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise KdkitError(f"{method}: temperature must be > 0, got {temperature}")


def _terms(ctx: MethodContext, loss: nn.Module, alpha: float) -> list[Term]:
    names = tuple(ctx.teachers)
    return [
        Term("ce", CrossEntropy(), 1.0 - alpha),
        Term("kd", loss, alpha, LOGITS, LOGITS, teacher_name=names),
    ]


def _mode_builder(mode: str, method: str) -> Callable[..., list[Term]]:
    def build(ctx: MethodContext, *, temperature: float = 4.0, alpha: float = 0.9) -> list[Term]:
        _check(alpha, temperature, method)
        return _terms(ctx, EnsembleKDLoss(temperature, mode), alpha)

    return build


for _name, _mode, _summary in [
    ("ensemble_mean", "mean",
     "Ensemble KD: arithmetic mean of the teachers' softened probabilities (Hinton 2015)."),
    ("ensemble_geometric", "geometric",
     "Ensemble KD: geometric mean, i.e. softmax of the teachers' mean logits / T."),
    ("ensemble_confidence", "confidence",
     "Ensemble KD: per-sample teacher weights ∝ softmax(−CE(y, p_m)) (trust the right one)."),
]:
    register_method(_name, teachers="many", summary=_summary)(_mode_builder(_mode, _name))


@register_method("ensemble_weighted", teachers="many")
def ensemble_weighted(
    ctx: MethodContext, *, weights: list[float] | None = None, temperature: float = 4.0,
    alpha: float = 0.9,
) -> list[Term]:
    """Ensemble KD: fixed per-teacher weights on the softened probabilities."""
    _check(alpha, temperature, "ensemble_weighted")
    if weights is None or len(weights) != len(ctx.teachers):
        raise KdkitError(
            f"ensemble_weighted needs weights: one per teacher ({len(ctx.teachers)}: "
            f"{', '.join(ctx.teachers)}), got {weights}"
        )
    return _terms(ctx, EnsembleKDLoss(temperature, "weighted", weights), alpha)


@register_method("ensemble_random", teachers="many")
def ensemble_random(ctx: MethodContext, *, temperature: float = 4.0, alpha: float = 0.9
                    ) -> list[Term]:
    """Teacher switching (Fukuda et al. 2017): each mini-batch learns from one random teacher."""
    _check(alpha, temperature, "ensemble_random")
    return _terms(ctx, RandomTeacherKDLoss(temperature), alpha)


@register_method("ensemble_streams", teachers="many")
def ensemble_streams(ctx: MethodContext, *, temperature: float = 4.0, alpha: float = 0.9
                     ) -> list[Term]:
    """Multiple streams (Fukuda et al. 2017): each sample once per teacher, its soft labels."""
    _check(alpha, temperature, "ensemble_streams")
    return _terms(ctx, MultiStreamKDLoss(temperature), alpha)


@register_method("ensemble_relative", teachers="many")
def ensemble_relative(
    ctx: MethodContext, *, temperature: float = 4.0, alpha: float = 0.9,
    relative_weight: float = 1.0, margin: float = 1.0, student_layer: str | None = None,
    teacher_layers: list[str] | None = None,
) -> list[Term]:
    """You et al. 2017: mean soft targets + teachers vote on triplet order, student hinge."""
    _check(alpha, temperature, "ensemble_relative")
    names = tuple(ctx.teachers)
    if teacher_layers is not None and len(teacher_layers) != len(names):
        raise KdkitError(
            f"ensemble_relative: teacher_layers needs one layer per teacher ({len(names)})"
        )
    t_taps = tuple(
        layer_tap(ctx.teachers[n], teacher_layers[i] if teacher_layers else None)
        for i, n in enumerate(names)
    )
    return _terms(ctx, EnsembleKDLoss(temperature, "mean"), alpha) + [
        Term("relative", RelativeDissimilarityLoss(margin), relative_weight,
             layer_tap(ctx.student, student_layer), t_taps, teacher_name=names),
    ]
