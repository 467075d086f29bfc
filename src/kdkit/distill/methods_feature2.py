"""Feature methods after the overhaul (METHODS.md §8): VID, ReviewKD and SimKD.

Positions come from :func:`kdkit.distill.methods_feature._points` (stage ends found by
structure, or ``student_layers`` / ``teacher_layers``); a transformer's tokens are read as
their patch map. The trainable parts (VID's regressors and variances, ReviewKD's ABF
stack, SimKD's projector) are the Terms' adapters, trained with the student.

SimKD's deployed student is not the student alone: it is the student's backbone, the
projector and the teacher's frozen classifier (:class:`SimKDStudent`). The method
registers a *deployment* (:func:`kdkit.distill.methods.register_deployment`) that builds
it after training; the run pipeline saves, counts and evaluates that model, and
``model.json`` names its factory (:func:`simkd_student`) so ``kdkit eval`` rebuilds it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distill.features import _trace
from kdkit.distill.methods import (
    MethodContext,
    ce_and_kd,
    register_deployment,
    register_eval_view,
    register_method,
    warmup_weight,
)
from kdkit.distill.methods_feature import Layers, Pair, _points, _teacher
from kdkit.distill.term import Term
from kdkit.distill.tokens import EachTensor
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.feature import MSEFeatureLoss
from kdkit.losses.review import HCLLoss
from kdkit.losses.vid import EPS, VIDLoss, VIDRegressor
from kdkit.taps import Tap, penultimate, resolve_module, run_with_taps


def _maps(points: list[Pair], method: str) -> None:
    for p in points:
        if len(p.ss) != 4 or len(p.ts) != 4:
            raise KdkitError(
                f"{method} needs feature maps (B, C, H, W) on both sides; student {p.s} gives "
                f"{p.shown('student')} and teacher {p.t} {p.shown('teacher')} (name conv "
                "layers via student_layers / teacher_layers)")


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    """The spatial size both maps are pooled to: the smaller in each dimension."""
    return min(a[2], b[2]), min(a[3], b[3])


def _then(first: nn.Module | None, second: nn.Module | None) -> nn.Module | None:
    if first is None or second is None:
        return first if second is None else second
    return nn.Sequential(first, second)


# ---------------------------------------------------------------------------------- VID


@register_method("vid", teachers="one", summary=(
    "VID (Ahn et al. 2019, CVPR): CE + per-stage Gaussian −log q(t|s), conv-regressed mean, "
    "learnt per-channel variance."))
def vid(ctx: MethodContext, *, weight: float = 1.0, init_variance: float = 5.0,
        kd_alpha: float = 0.0, temperature: float = 4.0, student_layers: Layers = None,
        teacher_layers: Layers = None) -> list[Term]:
    """VID (Ahn et al. 2019): CE + Σ_stages weight · VID_k / C_k (CRD's reproduction).

    Each stage end gets a regressor μ(s) (1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv) and
    per-channel variances σ² = softplus(α) + 1e-5 starting at ``init_variance`` (5, the
    authors'). The term's value is L = mean over positions of Σ_c [log σ_c + (t−μ)²/(2σ²)];
    its weight ``weight / C_t`` makes the objective CRD's (mean over channels too, β = 1),
    whose numbers METHODS.md quotes. Maps of different sizes: the larger is average-pooled.
    """
    if not init_variance > EPS:
        raise KdkitError(f"vid: init_variance must be > {EPS}, got {init_variance}")
    name = _teacher(ctx)[0]
    points = _points(ctx, student_layers, teacher_layers, "output", "vid")
    _maps(points, "vid")
    terms = ce_and_kd(ctx, kd_alpha, temperature)
    for i, p in enumerate(points):
        size = _common(p.ss, p.ts)
        reg = VIDRegressor(p.ss[1], p.ts[1], size, init_variance=init_variance)
        pool_t = nn.AdaptiveAvgPool2d(size) if tuple(p.ts[2:]) != size else None
        terms.append(Term(f"vid{i + 1}", VIDLoss(), weight / p.ts[1], p.s, p.t,
                          teacher_name=name, adapter=_then(p.s_view, reg),
                          teacher_view=_then(p.t_view, pool_t)))
    return terms


# ----------------------------------------------------------------------------- ReviewKD


class ABF(nn.Module):
    """Attention-based fusion (Chen et al. 2021): the student's stage map through a 1×1
    conv + BN to ``mid`` channels; with the deeper level's fused map (upsampled, nearest)
    two attention maps from their concatenation (1×1 conv → sigmoid) weight the two; the sum
    is resized to the teacher's size and a 3×3 conv + BN gives the teacher's width.
    Returns (output for the loss, fused map passed to the next shallower level)."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool,
                 out_size: tuple[int, int]) -> None:
        super().__init__()
        squeeze = nn.Conv2d(in_channels, mid, 1, bias=False)
        widen = nn.Conv2d(mid, out_channels, 3, padding=1, bias=False)
        nn.init.kaiming_uniform_(squeeze.weight, a=1)  # the authors' initialisation
        nn.init.kaiming_uniform_(widen.weight, a=1)
        self.conv1 = nn.Sequential(squeeze, nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(widen, nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        self.out_size = out_size

    def forward(self, x: Tensor, deeper: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att is not None:
            if deeper is None:
                raise KdkitError("ABF: a fusing level needs the deeper level's map")
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, deeper], dim=1))
            x = x * z[:, 0:1] + deeper * z[:, 1:2]
        if tuple(x.shape[-2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """ReviewKD's student side: one :class:`ABF` per stage, run from the deepest stage to
    the shallowest, each fusing its stage with the deeper fused map. Takes the student's
    stage maps (shallow → deep) and returns one map per stage shaped like the teacher's."""

    def __init__(self, s_shapes: Sequence[tuple[int, ...]], t_shapes: Sequence[tuple[int, ...]],
                 mid: int) -> None:
        super().__init__()
        n = len(s_shapes)
        self.abfs = nn.ModuleList([
            ABF(s[1], mid, t[1], fuse=i < n - 1, out_size=(t[2], t[3]))
            for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True))])

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.abfs):
            raise KdkitError(f"ReviewKD fusion: expected {len(self.abfs)} stage maps, "
                             f"got {len(feats)}")
        out: list[Tensor] = []
        fused: Tensor | None = None
        for x, abf in zip(reversed(feats), reversed(self.abfs), strict=True):
            y, fused = abf(x, fused)
            out.append(y)
        return out[::-1]


@register_method("reviewkd", teachers="one", summary=(
    "ReviewKD (Chen et al. 2021, CVPR): CE + ABF fusion of the student's stages deep to "
    "shallow, hierarchical context loss, 20-epoch warm-up."))
def reviewkd(ctx: MethodContext, *, weight: float = 1.0, warmup_epochs: float = 20.0,
             mid_channels: int | None = None, kd_alpha: float = 0.0, temperature: float = 4.0,
             student_layers: Layers = None, teacher_layers: Layers = None) -> list[Term]:
    """ReviewKD (Chen et al. 2021): CE + weight · min(epoch / warmup_epochs, 1) · Σ_stages HCL.

    Every paired stage end takes part; the ABF stack sees them all at once (one Term reading
    all student stages). ``mid_channels`` defaults to min(512, the student's deepest width)
    (mdistiller's CIFAR setting). Weight 1 and a 20-epoch warm-up are METHODS.md's CIFAR
    defaults; mdistiller's config for ResNet32x4 -> ResNet8x4 uses weight 5. Two parts of
    the official CIFAR code are not here: its deepest level, the pooled embedding fused as a
    1x1 map, and reading the teacher's stages before their last ReLU (this reads outputs).
    """
    if mid_channels is not None and mid_channels < 1:
        raise KdkitError(f"reviewkd: mid_channels must be >= 1, got {mid_channels}")
    name = _teacher(ctx)[0]
    points = _points(ctx, student_layers, teacher_layers, "output", "reviewkd")
    _maps(points, "reviewkd")
    mid = mid_channels or min(512, points[-1].ss[1])
    fusion = ReviewFusion([p.ss for p in points], [p.ts for p in points], mid)
    s_views, t_views = [p.s_view for p in points], [p.t_view for p in points]
    adapter: nn.Module = fusion
    if any(v is not None for v in s_views):
        adapter = nn.Sequential(EachTensor(s_views), fusion)
    return ce_and_kd(ctx, kd_alpha, temperature) + [
        Term("reviewkd", HCLLoss(), warmup_weight(weight, warmup_epochs, ctx, "reviewkd"),
             tuple(p.s for p in points), tuple(p.t for p in points), teacher_name=name,
             adapter=adapter,
             teacher_view=EachTensor(t_views) if any(v is not None for v in t_views) else None)]


# -------------------------------------------------------------------------------- SimKD


class SimKDProjector(nn.Module):
    """SimKD's projector (Chen et al. 2022, the authors' bottleneck): 1×1 conv → BN → ReLU
    → 3×3 conv → BN → ReLU → 1×1 conv → BN → ReLU, widths Cs → Ct/factor → Ct/factor → Ct,
    convs without bias. A student map larger than the teacher's is first average-pooled to
    ``size`` (the teacher's), as the authors do."""

    def __init__(self, s_channels: int, t_channels: int, factor: int = 2,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if factor < 1 or t_channels // factor < 1:
            raise KdkitError(f"simkd: factor must be in [1, {t_channels}] (the teacher's "
                             f"width), got {factor}")
        mid = t_channels // factor
        self.factor = factor
        self.size = size
        self.transfer = nn.Sequential(
            nn.Conv2d(s_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.transfer(x)


class TeacherHead(nn.Module):
    """The teacher's classifier reused: global average pool, then its (frozen) linear layer."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class SimKDStudent(nn.Module):
    """The deployed SimKD student: ``backbone`` (the student, its own classifier removed)
    read at ``feature``, then ``projector``, then ``head`` (the teacher's classifier).
    Input as the student's; output logits (B, num_classes)."""

    def __init__(self, backbone: nn.Module, feature: Tap, projector: nn.Module,
                 head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.head = head
        self.feature = feature

    def features(self, x: Tensor) -> Tensor:
        """The projected student feature map (what SimKD trains to match the teacher's)."""
        _, feats = run_with_taps(self.backbone, x, {"f": self.feature})
        return self.projector(feats["f"])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _pooled_by(module: nn.Module) -> bool:
    return isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d,
                               nn.MaxPool2d, nn.Flatten))


def final_map(model: nn.Module, x: Tensor, layer: str | None, who: str) -> Tap:
    """Where ``model``'s final feature map (before global pooling) is read: ``layer`` if
    given, else the last module to output a map (B, C, H, W) that is not a pooling."""
    if layer is not None:
        return Tap(layer, "output")
    events, _ = _trace(model, x)
    maps = [n for n, m, shape in events if len(shape) == 4 and not _pooled_by(m)]
    if not maps:
        raise KdkitError(f"simkd: the {who} ({type(model).__name__}) outputs no feature map "
                         f"(B, C, H, W); name its final conv layer ({who}_layer)")
    return Tap(maps[-1], "output")


def _classifier(model: nn.Module, who: str) -> tuple[str, nn.Linear]:
    path = penultimate(model).path
    fc = resolve_module(model, path)
    assert isinstance(fc, nn.Linear)
    if not path:
        raise KdkitError(f"simkd: the {who} is a single linear layer; it has no feature map")
    return path, fc


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(resolve_module(model, parent) if parent else model, leaf, module)


def _check_head(teacher: nn.Module, tap: Tap, head: TeacherHead, x: Tensor) -> None:
    """The teacher's logits must be its classifier on the pooled final map, else reusing
    the classifier would deploy something other than the teacher's head."""
    was = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            logits, feats = run_with_taps(teacher, x, {"f": tap})
            if feats["f"].dim() != 4:
                raise KdkitError(f"simkd: teacher {tap} gives {tuple(feats['f'].shape)}, not a "
                                 "feature map (B, C, H, W); name one (teacher_layer)")
            fc = head.fc
            assert isinstance(fc, nn.Linear)
            if fc.in_features != feats["f"].shape[1]:
                # e.g. a flattening head (PlainCNN, LeNet-5): no pooled map feeds the classifier
                raise KdkitError(
                    f"simkd: the teacher's classifier takes {fc.in_features} inputs but the "
                    f"average-pooled map at {tap} has {feats['f'].shape[1]} channels: SimKD "
                    "reuses a classifier that follows global average pooling (a ResNet/WRN "
                    "head); name the map it pools (teacher_layer) or use such a teacher")
            again = head(feats["f"].float())
    finally:
        teacher.train(was)
    if again.shape != logits.shape or not torch.allclose(again, logits.float(), rtol=1e-3,
                                                         atol=1e-4):
        raise KdkitError(
            f"simkd: the teacher's logits are not its last linear layer applied to the "
            f"average-pooled map at {tap}, so its classifier cannot be reused there; name the "
            "map the classifier pools (teacher_layer)")


@register_method("simkd", teachers="one", summary=(
    "SimKD (Chen et al. 2022, CVPR): a projector maps the student's final map to the "
    "teacher's (MSE); deployed with the teacher's classifier."))
def simkd(ctx: MethodContext, *, weight: float = 1.0, factor: int = 2, ce_weight: float = 0.0,
          student_layer: str | None = None, teacher_layer: str | None = None) -> list[Term]:
    """SimKD (Chen et al. 2022): weight · MSE(projector(F_s), F_t) of the final feature maps
    (before pooling), without CE by default (``ce_weight``), the paper's; ``factor`` 2 is
    the projector's bottleneck. The deployed student is backbone + projector + the
    teacher's classifier (:class:`SimKDStudent`): what ``kdkit train``/``distill`` saves,
    counts and tests for this method."""
    if ce_weight < 0:
        raise KdkitError(f"simkd: ce_weight must be >= 0, got {ce_weight}")
    name, teacher = _teacher(ctx)
    x = ctx.example_input
    if x is None:
        raise KdkitError("simkd: the shapes of the final feature maps are needed; pass "
                         "example_input")
    s_tap = final_map(ctx.student, x, student_layer, "student")
    t_tap = final_map(teacher, x, teacher_layer, "teacher")
    _path, fc = _classifier(teacher, "teacher")
    _check_head(teacher, t_tap, TeacherHead(fc), x)
    _classifier(ctx.student, "student")
    ss = _probe_map(ctx.student, s_tap, x, "student")
    ts = _probe_map(teacher, t_tap, x, "teacher")
    size = _common(ss, ts)
    projector = SimKDProjector(ss[1], ts[1], factor, size if tuple(ss[2:]) != size else None)
    pool_t = nn.AdaptiveAvgPool2d(size) if tuple(ts[2:]) != size else None
    terms = [Term("simkd", MSEFeatureLoss(), weight, s_tap, t_tap, teacher_name=name,
                  adapter=projector, teacher_view=pool_t)]
    if ce_weight > 0:
        terms.insert(0, Term("ce", CrossEntropy(), ce_weight))
    return terms


def _probe_map(model: nn.Module, tap: Tap, x: Tensor, who: str) -> tuple[int, ...]:
    from kdkit.taps import probe_shape

    shape = probe_shape(model, tap, x)
    if len(shape) != 4:
        raise KdkitError(f"simkd: the {who} gives {shape} at {tap}, not a feature map "
                         f"(B, C, H, W); name one ({who}_layer)")
    return shape


def _simkd_term(terms: Sequence[Term]) -> Term:
    """The SimKD term (found by its projector)."""
    term = next((t for t in terms if isinstance(t.adapter, SimKDProjector)), None)
    if term is None or not isinstance(term.student, Tap) or isinstance(term.teacher_name, tuple):
        raise KdkitError("deploy_simkd takes the terms of the method 'simkd'")
    return term


def deploy_simkd(student: nn.Module, terms: Sequence[Term], teachers: Mapping[str, nn.Module]
                 ) -> SimKDStudent:
    """The deployed model of a trained SimKD: a copy of the student without its classifier,
    the trained projector, and a frozen copy of the teacher's classifier."""
    term = _simkd_term(terms)
    assert isinstance(term.student, Tap) and isinstance(term.teacher_name, str)
    assert term.adapter is not None
    backbone = copy.deepcopy(student)
    path, _ = _classifier(backbone, "student")
    _set_module(backbone, path, nn.Identity())
    _t_path, fc = _classifier(teachers[term.teacher_name], "teacher")
    head = TeacherHead(copy.deepcopy(fc).requires_grad_(False))
    return SimKDStudent(backbone, term.student, copy.deepcopy(term.adapter), head).eval()


@register_eval_view("simkd")
def simkd_eval_view(student: nn.Module, terms: Sequence[Term],
                    teachers: Mapping[str, nn.Module]) -> SimKDStudent:
    """The deployed model's computation on the training modules themselves (no copies):
    the student read at its final map, the projector being trained, the teacher's
    classifier. What the loop validates every epoch."""
    term = _simkd_term(terms)
    assert isinstance(term.student, Tap) and isinstance(term.teacher_name, str)
    _t_path, fc = _classifier(teachers[term.teacher_name], "teacher")
    assert term.adapter is not None
    return SimKDStudent(student, term.student, term.adapter, TeacherHead(fc))


@register_deployment("simkd")
def _simkd_deployment(student: nn.Module, terms: Sequence[Term],
                      teachers: Mapping[str, nn.Module], *, model_name: str,
                      model_kwargs: dict[str, Any]) -> tuple[nn.Module, str, dict[str, Any]]:
    model = deploy_simkd(student, terms, teachers)
    proj = model.projector
    assert isinstance(proj, SimKDProjector)
    first, last = proj.transfer[0], proj.transfer[6]
    assert isinstance(first, nn.Conv2d) and isinstance(last, nn.Conv2d)
    fc = model.head.fc
    assert isinstance(fc, nn.Linear)
    kwargs = {"student": model_name, "student_kwargs": model_kwargs,
              "feature": model.feature.path, "student_channels": first.in_channels,
              "teacher_channels": last.out_channels,
              "factor": proj.factor,
              "size": list(proj.size) if proj.size is not None else None,
              "head_bias": fc.bias is not None}
    return model, f"py:{__name__}:simkd_student", kwargs


def simkd_student(*, student: str, student_kwargs: dict[str, Any], feature: str,
                  student_channels: int, teacher_channels: int, factor: int,
                  size: list[int] | None, head_bias: bool = True, num_classes: int,
                  in_channels: int, input_size: int) -> SimKDStudent:
    """Rebuild a deployed SimKD student (untrained weights) from what ``model.json``
    records; ``kdkit eval`` then loads its weights."""
    from kdkit.models import create_model

    kw = {k: v for k, v in student_kwargs.items() if k != "weights"}
    backbone = create_model(student, num_classes=num_classes, in_channels=in_channels,
                            input_size=input_size, **kw)
    path, _ = _classifier(backbone, "student")
    _set_module(backbone, path, nn.Identity())
    projector = SimKDProjector(student_channels, teacher_channels, factor,
                               (size[0], size[1]) if size is not None else None)
    head = TeacherHead(nn.Linear(teacher_channels, num_classes, bias=head_bias))
    return SimKDStudent(backbone, Tap(feature, "output"), projector, head)
