"""Feature distillation (METHODS.md §5–6) on unmodified models.

Positions come from :mod:`kdkit.distill.features` (stage ends found by structure, or
``student_layers`` / ``teacher_layers`` given as ``"path"`` or ``"path:preact"``);
connectors are built from the probed shapes and trained with the student. A transformer's
tokens (B, N, D) are read as their patch map (B, D, h, w) on either side (the student's
through its adapter, the teacher's through the term's fixed ``teacher_view``); a method
that needs what tokens cannot give (a pre-ReLU feature) refuses, naming both shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from torch import Tensor, nn

from kdkit.distill.features import (
    Connector,
    FeaturePoint,
    check_connectable,
    paired_points,
    stage_points,
    token_layout,
)
from kdkit.distill.methods import (
    MethodContext,
    Stage,
    ce_and_kd,
    layer_tap,
    register_method,
)
from kdkit.distill.term import Term
from kdkit.distill.tokens import EachTensor, TokensToMap
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


class Pair(NamedTuple):
    """A matched student/teacher position. ``ss``/``ts`` are the shapes the loss sees (a
    transformer's tokens as their map); ``s_view``/``t_view`` turn tokens into that map."""

    s: Tap
    t: Tap
    bn: str | None
    ss: tuple[int, ...]
    ts: tuple[int, ...]
    s_view: TokensToMap | None = None
    t_view: TokensToMap | None = None
    s_raw: tuple[int, ...] = ()
    t_raw: tuple[int, ...] = ()

    def shown(self, side: str) -> str:
        """The shape of one side, as read and (for tokens) as the map the loss sees."""
        raw, seen = (self.s_raw, self.ss) if side == "student" else (self.t_raw, self.ts)
        return f"{seen}" if raw == seen or not raw else f"tokens {raw} (the map {seen})"


def _points(ctx: MethodContext, student_layers: Layers, teacher_layers: Layers, read: Read,
            method: str) -> list[Pair]:
    """Matched positions, with token views where a side is a transformer's tokens."""
    _, teacher = _teacher(ctx)
    x = ctx.example_input
    try:
        pairs = paired_points(ctx.student, teacher, x, student_layers, teacher_layers, read)
    except KdkitError:
        if read == "preact" and student_layers is None and teacher_layers is None:
            _refuse_preact_of_tokens(ctx, method)
        raise
    out = []
    for sp, tp in pairs:
        s_raw, t_raw = probe_shape(ctx.student, sp.tap, x), probe_shape(teacher, tp.tap, x)
        s_view = _token_view(ctx.student, sp, s_raw, x, f"{method}: student {sp.tap}")
        t_view = _token_view(teacher, tp, t_raw, x, f"{method}: teacher {tp.tap}")
        ss = s_view.layout.map_shape(s_raw) if s_view is not None else s_raw
        ts = t_view.layout.map_shape(t_raw) if t_view is not None else t_raw
        pair = Pair(sp.tap, tp.tap, tp.bn, ss, ts, s_view, t_view, s_raw, t_raw)
        check_connectable(ss, ts, f"{method}: student {sp.tap} → teacher {tp.tap} "
                                  f"({pair.shown('student')} and {pair.shown('teacher')})")
        out.append(pair)
    return out


def _token_view(model: nn.Module, point: FeaturePoint, shape: tuple[int, ...],
                x: Tensor | None, where: str) -> TokensToMap | None:
    if len(shape) != 3:
        return None
    if x is None:
        raise KdkitError(f"{where}: the shape of tokens {shape} is needed; pass example_input")
    layout = point.tokens or token_layout(model, x, shape, where)
    return TokensToMap(layout)


def _refuse_preact_of_tokens(ctx: MethodContext, method: str) -> None:
    """If a side is a transformer, say so for ``method`` (which reads pre-ReLU features),
    with both sides' shapes and what would work; otherwise return (the caller re-raises)."""
    x = ctx.example_input
    if x is None:
        return
    sides = []
    for role, model in (("student", ctx.student), ("teacher", _teacher(ctx)[1])):
        try:
            points = stage_points(model, x, "output")
        except KdkitError:
            return
        last = points[-1]
        sides.append((role, model, last, probe_shape(model, last.tap, x)))
    tokens = [f"the {role} ({type(m).__name__})" for role, m, p, _ in sides if p.tokens]
    if not tokens:
        return
    shapes = " and ".join(f"the {role} gives {'tokens ' if p.tokens else ''}{shape} at {p.tap}"
                          for role, _m, p, shape in sides)
    raise KdkitError(
        f"{method} reads the pre-ReLU feature at each stage end, but {' and '.join(tokens)} "
        f"{'is a transformer' if len(tokens) == 1 else 'are transformers'} whose blocks end "
        f"in a residual add, not a ReLU: there is no pre-activation to read ({shapes}); what "
        "works with tokens: hint, fitnets, at, nst, "
        "sp, fsp (tokens read as maps), pkt, rkd (the embedding), kd (the logits); or name "
        "pre-ReLU layers of two CNNs (student_layers / teacher_layers)")


def _same_spatial(points: list[Pair], method: str) -> None:
    """Losses that compare positions (AT, NST) need equal H×W: fail at build time."""
    for p in points:
        if len(p.ss) != 4 or len(p.ts) != 4 or p.ss[2:] != p.ts[2:]:
            raise KdkitError(
                f"{method}: student {p.s} gives {p.shown('student')} and teacher {p.t} gives "
                f"{p.shown('teacher')}; the spatial sizes must match (choose layers with equal "
                "H×W via student_layers / teacher_layers)"
            )


def _connector(s_shape: tuple[int, ...], t_shape: tuple[int, ...], kind: str) -> nn.Module | None:
    if s_shape[1:] == t_shape[1:] and kind == "none":
        return None
    if len(s_shape) != 4:
        if s_shape[1:] == t_shape[1:]:
            return None
        return nn.Linear(s_shape[1], t_shape[1], bias=False)
    return Connector(s_shape, t_shape, kind)


def _adapter(p: Pair, kind: str | None) -> nn.Module | None:
    """The student's adapter: its token view (if any), then a connector (kind None: none)."""
    conn = _connector(p.ss, p.ts, kind) if kind is not None else None
    if p.s_view is not None and conn is not None:
        return nn.Sequential(p.s_view, conn)
    return p.s_view if p.s_view is not None else conn


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
    points = _points(ctx, student_layers, teacher_layers, "output", "hint")
    p = points[_check_stage(stage, len(points))]
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("hint", MSEFeatureLoss(), weight, p.s, p.t, teacher_name=_teacher(ctx)[0],
             adapter=_adapter(p, connector), teacher_view=p.t_view),
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
    points = _points(ctx, student_layers, teacher_layers, "output", "fitnets")
    p = points[_check_stage(stage, len(points))]
    name = _teacher(ctx)[0]
    regressor = _adapter(p, "conv")

    def lam(progress: float) -> float:
        return lambda_start + (lambda_end - lambda_start) * progress

    return [
        Stage("hint", [Term("hint", HintLoss(), 1.0, p.s, p.t, teacher_name=name,
                            adapter=regressor, teacher_view=p.t_view)],
              hint_epochs, hint_lr, hint_optimizer),
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
    points = _points(ctx, student_layers, teacher_layers, "output", "at")
    _same_spatial(points, "at")
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term(f"at{i + 1}", ATLoss(p), beta, q.s, q.t, teacher_name=name, adapter=q.s_view,
             teacher_view=q.t_view)
        for i, q in enumerate(points)
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
    points = _points(ctx, student_layers, teacher_layers, "preact", "overhaul")
    if teacher_bns is not None and len(teacher_bns) != len(points):
        raise KdkitError(f"overhaul: teacher_bns needs one BN path per stage ({len(points)})")
    n = len(points)
    terms = ce_and_kd(ctx, kd_alpha, temperature)
    for i, p in enumerate(points):
        margin = _margin(teacher, teacher_bns[i] if teacher_bns else p.bn, p.t)
        if margin.numel() != p.ts[1]:
            raise KdkitError(f"overhaul: BN of {p.t} has {margin.numel()} channels, "
                             f"the feature has {p.ts[1]}")
        terms.append(Term(f"overhaul{i + 1}", OverhaulLoss(margin), beta / 2 ** (n - i - 1),
                          p.s, p.t, teacher_name=name, adapter=_adapter(p, connector),
                          teacher_view=p.t_view))
    return terms


def _last_stage_term(ctx: MethodContext, name: str, loss: nn.Module, weight: float,
                     kd_alpha: float, temperature: float, student_layers: Layers,
                     teacher_layers: Layers, same_spatial: bool) -> list[Term]:
    points = _points(ctx, student_layers, teacher_layers, "output", name)
    if same_spatial:
        _same_spatial(points[-1:], name)
    p = points[-1]
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term(name, loss, weight, p.s, p.t, teacher_name=_teacher(ctx)[0], adapter=p.s_view,
             teacher_view=p.t_view)]


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
    points = _points(ctx, student_layers, teacher_layers, "output", "fsp")
    if len(points) < 2:
        found = "; ".join(f"student {p.s} {p.shown('student')} with teacher {p.t} "
                          f"{p.shown('teacher')}" for p in points)
        raise KdkitError(
            f"fsp needs at least two paired stage ends (a pair per section), found {found}; "
            "a transformer and a CNN pair only where the CNN's map has the transformer's "
            "grid: name two or more layers of each, of equal widths (student_layers / "
            "teacher_layers), or use hint, fitnets, at, nst or sp")
    for p in points:
        if p.ss[1] != p.ts[1]:
            raise KdkitError(
                f"fsp: student {p.s} has {p.ss[1]} channels and teacher {p.t} {p.ts[1]} "
                f"({p.shown('student')} and {p.shown('teacher')}); FSP matrices compare equal "
                "widths (the paper's students are shallower, not thinner)"
            )
    name = _teacher(ctx)[0]
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term(f"fsp{i + 1}", FSPLoss(), weight, (a.s, b.s), (a.t, b.t), teacher_name=name,
             adapter=EachTensor([a.s_view, b.s_view]) if a.s_view or b.s_view else None,
             teacher_view=EachTensor([a.t_view, b.t_view]) if a.t_view or b.t_view else None)
        for i, (a, b) in enumerate(zip(points[:-1], points[1:], strict=True))
    ]


AB_SCALE = 3.0 / 1000.0  # the reference code's "/ 1000 * 3"


@register_method("ab", teachers="one")
def ab(ctx: MethodContext, *, init_epochs: int | None = None, margin: float = 1.0,
       kd_alpha: float = 0.0, temperature: float = 4.0, connector: ConnectorKind = "conv_bn",
       student_layers: Layers = None, teacher_layers: Layers = None) -> list[Stage]:
    """Activation boundaries (Heo et al. 2019): initialise by AB transfer, then CE (+KD).

    Stage weights are the reference code's scale (AB_distillation, and CRD's
    reproduction): the deepest stage 3/1000, each shallower one half the next deeper one,
    on the loss summed over elements and averaged over the batch. (At weight 1/n the
    summed loss is thousands of times larger and SGD at lr 0.05 diverges within an epoch.)
    """
    name = _teacher(ctx)[0]
    points = _points(ctx, student_layers, teacher_layers, "preact", "ab")
    n = len(points)
    init = [Term(f"ab{i + 1}", ABLoss(margin), AB_SCALE * 2.0 ** (i - n + 1), p.s, p.t,
                 teacher_name=name, adapter=_adapter(p, connector), teacher_view=p.t_view)
            for i, p in enumerate(points)]
    return [Stage("init", init, init_epochs),
            Stage("train", ce_and_kd(ctx, kd_alpha, temperature))]
