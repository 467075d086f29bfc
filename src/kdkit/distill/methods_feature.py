"""Feature distillation (METHODS.md §5–6) on unmodified models.

Positions come from :mod:`kdkit.distill.features` (stage ends found by structure, or
``student_layers`` / ``teacher_layers`` given as ``"path"`` or ``"path:preact"``);
connectors are built from the probed shapes and trained with the student.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from kdkit.distill.features import Connector, check_connectable, paired_points
from kdkit.distill.methods import (
    MethodContext,
    Stage,
    ce_and_kd,
    layer_tap,
    register_method,
)
from kdkit.distill.term import Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.ab import ABLoss
from kdkit.losses.attention import ATLoss
from kdkit.losses.feature import HintLoss, MSEFeatureLoss
from kdkit.losses.fsp import FSPLoss
from kdkit.losses.kd import SoftCrossEntropy
from kdkit.losses.nst import NSTLoss
from kdkit.losses.overhaul import OverhaulLoss, margin_from_bn
from kdkit.losses.pkt import PKTLoss
from kdkit.losses.sp import SPLoss
from kdkit.taps import LOGITS, Read, Tap, probe_shape, resolve_module

Layers = list[str] | None
Optimizer = Literal["sgd", "adam", "adamw"]
ConnectorKind = Literal["conv_bn", "conv", "none"]


def _teacher(ctx: MethodContext) -> tuple[str, nn.Module]:
    name = next(iter(ctx.teachers))
    return name, ctx.teachers[name]


def _points(ctx: MethodContext, student_layers: Layers, teacher_layers: Layers, read: Read
            ) -> list[tuple[Tap, Tap, str | None, tuple[int, ...], tuple[int, ...]]]:
    """Matched (student tap, teacher tap, teacher BN, student shape, teacher shape)."""
    _, teacher = _teacher(ctx)
    x = ctx.example_input
    out = []
    for s, t, bn in paired_points(ctx.student, teacher, x, student_layers, teacher_layers, read):
        s_shape, t_shape = probe_shape(ctx.student, s, x), probe_shape(teacher, t, x)
        check_connectable(s_shape, t_shape, f"student {s} → teacher {t}")
        out.append((s, t, bn, s_shape, t_shape))
    return out


def _same_spatial(points: list[tuple[Tap, Tap, str | None, tuple[int, ...], tuple[int, ...]]],
                  method: str) -> None:
    """Losses that compare positions (AT, NST) need equal H×W: fail at build time."""
    for s, t, _, ss, ts in points:
        if len(ss) != 4 or len(ts) != 4 or ss[2:] != ts[2:]:
            raise KdkitError(
                f"{method}: student {s} gives {ss} and teacher {t} gives {ts}; the spatial "
                "sizes must match (choose layers with equal H×W via student_layers / "
                "teacher_layers)"
            )


def _connector(s_shape: tuple[int, ...], t_shape: tuple[int, ...], kind: str) -> nn.Module | None:
    if s_shape[1:] == t_shape[1:] and kind == "none":
        return None
    if len(s_shape) != 4:
        if s_shape[1:] == t_shape[1:]:
            return None
        return nn.Linear(s_shape[1], t_shape[1], bias=False)
    return Connector(s_shape, t_shape, kind)


def _check_stage(stage: int | None, n: int) -> int:
    idx = n // 2 if stage is None else stage
    if not 0 <= idx < n:
        raise KdkitError(f"stage must be in [0, {n - 1}] (there are {n} stages), got {stage}")
    return idx


@register_method("hint", teachers="one")
def hint(
    ctx: MethodContext, *, weight: float = 1.0, stage: int | None = None,
    connector: ConnectorKind = "conv_bn", kd_alpha: float = 0.0, temperature: float = 4.0,
    student_layers: Layers = None, teacher_layers: Layers = None,
) -> list[Term]:
    """Hint baseline: CE + plain L2 between connector(student) and teacher at one stage end."""
    points = _points(ctx, student_layers, teacher_layers, "output")
    s, t, _, ss, ts = points[_check_stage(stage, len(points))]
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("hint", MSEFeatureLoss(), weight, s, t, teacher_name=_teacher(ctx)[0],
             adapter=_connector(ss, ts, connector)),
    ]


@register_method("fitnets", teachers="one")
def fitnets(
    ctx: MethodContext, *, hint_epochs: int | None = None, hint_optimizer: Optimizer = "adam",
    hint_lr: float = 1e-3, stage: int | None = None,
    temperature: float = 3.0, lambda_start: float = 4.0, lambda_end: float = 1.0,
    student_layers: Layers = None, teacher_layers: Layers = None,
) -> list[Stage]:
    """FitNets (Romero et al. 2015): hint stage ½‖u_t − r(v_s)‖², then CE + λ·H(p_t^τ, p_s^τ).

    Stage 1 trains the student up to the guided layer (later layers get no gradient) and
    the regressor r (a 1×1 conv); stage 2 trains the whole student with KD, τ = 3 and λ
    decaying linearly from 4 to 1 over the stage. ``hint_epochs`` defaults to the run's.
    The hint stage uses Adam (lr 1e-3) by default: the paper's loss sums over every feature
    element, so its gradient is thousands of times a classification loss's and SGD at the
    run's rate diverges; Adam is invariant to that scale. ``hint_optimizer`` / ``hint_lr``
    change it.
    """
    points = _points(ctx, student_layers, teacher_layers, "output")
    s, t, _, ss, ts = points[_check_stage(stage, len(points))]
    name = _teacher(ctx)[0]
    regressor = _connector(ss, ts, "conv")

    def lam(progress: float) -> float:
        return lambda_start + (lambda_end - lambda_start) * progress

    return [
        Stage("hint", [Term("hint", HintLoss(), 1.0, s, t, teacher_name=name,
                            adapter=regressor)], hint_epochs, hint_lr, hint_optimizer),
        Stage("kd", [
            Term("ce", CrossEntropy(), 1.0),
            Term("kd", SoftCrossEntropy(temperature), lam, LOGITS, LOGITS, teacher_name=name),
        ]),
    ]


@register_method("at", teachers="one")
def at(
    ctx: MethodContext, *, beta: float = 1000.0, p: float = 2.0, kd_alpha: float = 0.0,
    temperature: float = 4.0, student_layers: Layers = None, teacher_layers: Layers = None,
) -> list[Term]:
    """Attention transfer (Zagoruyko & Komodakis 2017): CE (+KD) + β·Σ_stages AT, β = 1000."""
    name = _teacher(ctx)[0]
    points = _points(ctx, student_layers, teacher_layers, "output")
    _same_spatial(points, "at")
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term(f"at{i + 1}", ATLoss(p), beta, s, t, teacher_name=name)
        for i, (s, t, _, _, _) in enumerate(points)
    ]


def _margin(teacher: nn.Module, bn_path: str | None, tap: Tap) -> Tensor:
    if bn_path is None:
        raise KdkitError(
            f"overhaul: no BatchNorm known before the ReLU at teacher {tap}, so the margin "
            "cannot be computed; with explicit teacher_layers give teacher_bns too (the BN "
            "before each ReLU); the overhaul needs BN before each tapped ReLU"
        )
    bn = resolve_module(teacher, bn_path)
    if not isinstance(bn, nn.BatchNorm2d) or bn.weight is None or bn.bias is None:
        raise KdkitError(f"overhaul: {bn_path} is not an affine BatchNorm2d")
    return margin_from_bn(bn.weight.detach(), bn.bias.detach())


@register_method("overhaul", teachers="one")
def overhaul(
    ctx: MethodContext, *, beta: float = 1e-3, kd_alpha: float = 0.0, temperature: float = 4.0,
    connector: ConnectorKind = "conv_bn", student_layers: Layers = None, teacher_layers: Layers = None,
    teacher_bns: Layers = None,
) -> list[Term]:
    """Heo et al. 2019: CE + β·Σ_i partial-L2(conn(S_i), σ_m(T_i)) / 2^(n−i−1), pre-ReLU."""
    name, teacher = _teacher(ctx)
    points = _points(ctx, student_layers, teacher_layers, "preact")
    if teacher_bns is not None and len(teacher_bns) != len(points):
        raise KdkitError(f"overhaul: teacher_bns needs one BN path per stage ({len(points)})")
    n = len(points)
    terms = ce_and_kd(ctx, kd_alpha, temperature)
    for i, (s, t, bn, ss, ts) in enumerate(points):
        margin = _margin(teacher, teacher_bns[i] if teacher_bns else bn, t)
        if margin.numel() != ts[1]:
            raise KdkitError(f"overhaul: BN of {t} has {margin.numel()} channels, "
                             f"the feature has {ts[1]}")
        terms.append(Term(f"overhaul{i + 1}", OverhaulLoss(margin), beta / 2 ** (n - i - 1),
                          s, t, teacher_name=name, adapter=_connector(ss, ts, connector)))
    return terms


def _last_stage_term(ctx: MethodContext, name: str, loss: nn.Module, weight: float,
                     kd_alpha: float, temperature: float, student_layers: Layers,
                     teacher_layers: Layers, same_spatial: bool) -> list[Term]:
    points = _points(ctx, student_layers, teacher_layers, "output")
    if same_spatial:
        _same_spatial(points[-1:], name)
    s, t, _, _, _ = points[-1]
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term(name, loss, weight, s, t, teacher_name=_teacher(ctx)[0])]


def _simple(name: str, loss: Callable[[], nn.Module], default_weight: float, summary: str,
            same_spatial: bool) -> None:
    def build(ctx: MethodContext, *, weight: float = default_weight, kd_alpha: float = 0.0,
              temperature: float = 4.0, student_layers: Layers = None,
              teacher_layers: Layers = None) -> list[Term]:
        return _last_stage_term(ctx, name, loss(), weight, kd_alpha, temperature,
                                student_layers, teacher_layers, same_spatial)

    register_method(name, teachers="one", summary=summary)(build)


_simple("nst", NSTLoss, 50.0,
        "NST (Huang & Wang 2017): CE + 50·MMD² (polynomial kernel) of channel distributions.",
        same_spatial=True)
_simple("sp", SPLoss, 3000.0,
        "Similarity-preserving KD (Tung & Mori 2019): CE + 3000·‖G_s − G_t‖²_F / B².",
        same_spatial=False)


@register_method("pkt", teachers="one")
def pkt(ctx: MethodContext, *, weight: float = 1.0, kd_alpha: float = 0.0,
        temperature: float = 4.0, student_layer: str | None = None,
        teacher_layer: str | None = None) -> list[Term]:
    """PKT (Passalis & Tefas 2018): CE + KL of cosine-kernel conditional probabilities."""
    name, teacher = _teacher(ctx)
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("pkt", PKTLoss(), weight, layer_tap(ctx.student, student_layer),
             layer_tap(teacher, teacher_layer), teacher_name=name)]


@register_method("fsp", teachers="one")
def fsp(ctx: MethodContext, *, weight: float = 1.0, kd_alpha: float = 0.0,
        temperature: float = 4.0, student_layers: Layers = None,
        teacher_layers: Layers = None) -> list[Term]:
    """FSP (Yim et al. 2017): CE + ‖G_s − G_t‖² of Gram matrices of consecutive stage ends."""
    points = _points(ctx, student_layers, teacher_layers, "output")
    if len(points) < 2:
        raise KdkitError("fsp needs at least two stage ends (a pair per section)")
    for s, t, _, ss, ts in points:
        if ss[1] != ts[1]:
            raise KdkitError(
                f"fsp: student {s} has {ss[1]} channels and teacher {t} {ts[1]}; FSP matrices "
                "compare equal widths (the paper's students are shallower, not thinner)"
            )
    name = _teacher(ctx)[0]
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term(f"fsp{i + 1}", FSPLoss(), weight, (a[0], b[0]), (a[1], b[1]), teacher_name=name)
        for i, (a, b) in enumerate(zip(points[:-1], points[1:], strict=True))
    ]


@register_method("ab", teachers="one")
def ab(ctx: MethodContext, *, init_epochs: int | None = None, margin: float = 1.0,
       kd_alpha: float = 0.0, temperature: float = 4.0, connector: ConnectorKind = "conv_bn",
       student_layers: Layers = None, teacher_layers: Layers = None) -> list[Stage]:
    """Activation boundaries (Heo et al. 2019): initialise by AB transfer, then CE (+KD)."""
    name = _teacher(ctx)[0]
    points = _points(ctx, student_layers, teacher_layers, "preact")
    init = [Term(f"ab{i + 1}", ABLoss(margin), 1.0 / len(points), s, t, teacher_name=name,
                 adapter=_connector(ss, ts, connector))
            for i, (s, t, _, ss, ts) in enumerate(points)]
    return [Stage("init", init, init_epochs),
            Stage("train", ce_and_kd(ctx, kd_alpha, temperature))]
