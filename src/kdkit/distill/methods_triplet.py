"""Triplet and relational methods (METHODS.md §3): Oki et al., Yu et al., Park et al. (RKD).

The embedding methods apply to any tapped layer; by default the penultimate embedding (the
input of the classifier's last ``nn.Linear``), found without editing the model.
"""

from __future__ import annotations

from torch import nn

from kdkit.distill.methods import MethodContext, ce_and_kd, layer_tap, register_method
from kdkit.distill.term import Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy, KDLoss
from kdkit.losses.metric import AbsoluteTeacherLoss, RelativeTeacherLoss
from kdkit.losses.rkd import RKDAngleLoss, RKDDistanceLoss
from kdkit.losses.triplet import BatchHardTripletLoss, TripletKDLoss
from kdkit.taps import LOGITS, probe_shape


@register_method("triplet_kd", teachers="one")
def triplet_kd(
    ctx: MethodContext, *, margin: float = 5.0, kl_weight: float = 1.0, ce_weight: float = 1.0,
    triplet_weight: float = 2.0,
) -> list[Term]:
    """Oki et al. 2020: KL(T=1) + CE + 2·triplet(anchor z_t, positive z_s, negative z_s(x−))."""
    teacher = next(iter(ctx.teachers))
    return [
        Term("ce", CrossEntropy(), ce_weight),
        # T = 1: KL(softmax z_t ‖ softmax z_s), batchmean; T² = 1 so no rescaling.
        Term("kl", KDLoss(1.0), kl_weight, LOGITS, LOGITS, teacher_name=teacher),
        Term("triplet", TripletKDLoss(margin), triplet_weight, LOGITS, LOGITS,
             teacher_name=teacher),
    ]


@register_method("rkd", teachers="one")
def rkd(
    ctx: MethodContext, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
    kd_alpha: float = 0.0, temperature: float = 4.0, student_layer: str | None = None,
    teacher_layer: str | None = None,
) -> list[Term]:
    """Park et al. 2019 RKD: CE + 25·distance + 50·angle relations (+ KD with kd_alpha > 0)."""
    teacher = next(iter(ctx.teachers))
    s_tap = layer_tap(ctx.student, student_layer)
    t_tap = layer_tap(ctx.teachers[teacher], teacher_layer)
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("rkd_distance", RKDDistanceLoss(), distance_weight, s_tap, t_tap,
             teacher_name=teacher),
        Term("rkd_angle", RKDAngleLoss(), angle_weight, s_tap, t_tap, teacher_name=teacher),
    ]


def _metric(ctx: MethodContext, loss: nn.Module, name: str, weight: float,
            triplet_weight: float, margin: float, kd_alpha: float, temperature: float,
            student_layer: str | None, teacher_layer: str | None,
            adapter: nn.Module | None = None) -> list[Term]:
    teacher = next(iter(ctx.teachers))
    s_tap = layer_tap(ctx.student, student_layer)
    t_tap = layer_tap(ctx.teachers[teacher], teacher_layer)
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("triplet", BatchHardTripletLoss(margin), triplet_weight, s_tap),
        Term(name, loss, weight, s_tap, t_tap, teacher_name=teacher, adapter=adapter),
    ]


@register_method("metric_absolute", teachers="one")
def metric_absolute(
    ctx: MethodContext, *, weight: float = 1.0, triplet_weight: float = 1.0,
    margin: float = 0.2, kd_alpha: float = 0.0, temperature: float = 4.0,
    student_layer: str | None = None, teacher_layer: str | None = None,
) -> list[Term]:
    """Yu et al. 2019 absolute teacher: mean ‖f_s − f_t‖₂ + batch-hard triplet (+ CE)."""
    teacher = next(iter(ctx.teachers))
    x = ctx.example_input
    s_dim = probe_shape(ctx.student, layer_tap(ctx.student, student_layer), x)
    t_dim = probe_shape(ctx.teachers[teacher], layer_tap(ctx.teachers[teacher], teacher_layer), x)
    if len(s_dim) != 2 or len(t_dim) != 2:
        raise KdkitError(
            f"metric_absolute compares flat embeddings; the tapped layers give {s_dim} "
            f"(student) and {t_dim} (teacher); tap a (B, D) layer"
        )
    # Embeddings of different width are compared through a trained linear projection.
    adapter = nn.Linear(s_dim[1], t_dim[1], bias=False) if s_dim[1] != t_dim[1] else None
    return _metric(ctx, AbsoluteTeacherLoss(), "absolute", weight, triplet_weight, margin,
                   kd_alpha, temperature, student_layer, teacher_layer, adapter)


@register_method("metric_relative", teachers="one")
def metric_relative(
    ctx: MethodContext, *, weight: float = 1.0, triplet_weight: float = 1.0,
    margin: float = 0.2, kd_alpha: float = 0.0, temperature: float = 4.0,
    student_layer: str | None = None, teacher_layer: str | None = None,
) -> list[Term]:
    """Yu et al. 2019 relative teacher: ‖D_s − D_t‖_F + batch-hard triplet (+ CE)."""
    return _metric(ctx, RelativeTeacherLoss(), "relative", weight, triplet_weight, margin,
                   kd_alpha, temperature, student_layer, teacher_layer)
