"""Where feature methods read: stage ends of unmodified models, and connectors between them.

Selectors name positions without editing a model:

* ResNet-like models (children ``layer1``, ``layer2``, ...; kdkit's CIFAR ResNets and
  torchvision's ResNets, whose blocks use an in-place ReLU and a functional ``+=``): the
  end of each stage is ``layerK``; its pre-activation is read through the block's last ReLU.
* Pre-activation wide ResNets (stages that do not end with a ReLU): the pre-ReLU feature of
  stage k is the BN output that feeds the next stage's first ReLU, and for the last stage
  the final BN (Heo et al. 2019, §3.3).
* Plain CNNs (a ``Sequential`` with max-pools): the ReLU right before each pool.
* Any other CNN: probed (the outermost module to finish at each resolution).
* Transformers (blocks giving (B, N, D) tokens): the blocks that end each quarter of the
  depth, read as tokens with their layout (prefix tokens, patch grid), which feature
  methods turn into (B, D, h, w) maps (:mod:`kdkit.distill.tokens`). They have no
  pre-activation: a block ends in a residual add.

Each point also names the BatchNorm that precedes its ReLU (for the overhaul's margins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distill.tokens import TokenLayout, infer_layout
from kdkit.errors import KdkitError
from kdkit.taps import Read, Tap, resolve_module

_RELUS = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class FeaturePoint:
    """A stage end: where to read it, the BN module before its ReLU (None if none), and for
    a transformer block the layout of its tokens (None for a map)."""

    tap: Tap
    bn: str | None
    tokens: TokenLayout | None = None


def parse_layer(spec: str, default_read: Read = "output") -> Tap:
    """``"layer2"`` → output of layer2; ``"layer2:preact"`` → its pre-activation."""
    path, _, read = spec.partition(":")
    return Tap(path, read or default_read)  # type: ignore[arg-type]


def _last_bn(module: nn.Module, prefix: str) -> str | None:
    """The last BatchNorm of the main branch inside ``module`` (shortcuts excluded)."""
    found = None
    for name, m in module.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not any(
            part in ("shortcut", "downsample") for part in name.split(".")
        ):
            found = f"{prefix}.{name}" if name else prefix
    return found


def stage_points(model: nn.Module, example_input: Tensor | None = None,
                 read: Read = "preact") -> list[FeaturePoint]:
    """The end of each stage of ``model``, read as ``read`` ('preact' or 'output')."""
    names = dict(model.named_children())
    stages = [f"layer{k}" for k in range(1, 10) if f"layer{k}" in names]
    if stages:
        return _resnet_points(model, stages, example_input, read)
    seq = next(((n, m) for n, m in model.named_modules()
                if isinstance(m, nn.Sequential) and any(isinstance(c, nn.MaxPool2d)
                                                        for c in m.children())), None)
    if seq is not None:
        return _pooled_points(*seq, read=read)
    if example_input is None:
        raise KdkitError(
            f"cannot find the stages of {type(model).__name__} (no layer1.. children, no "
            "pooled Sequential, and no example input to probe it with); name the layers "
            "explicitly, e.g. student_layers: ['block2:preact']")
    return probed_points(model, example_input, read)


def _feature_info(model: nn.Module) -> list[str]:
    """The stage-end module names a timm model declares (``feature_info``), if any."""
    info = getattr(model, "feature_info", None)
    try:
        names = [str(d["module"]) for d in info] if info is not None else []
    except (TypeError, KeyError):
        return []
    modules = dict(model.named_modules())
    return [n for n in names if n in modules]


def probed_points(model: nn.Module, x: Tensor, read: Read = "preact") -> list[FeaturePoint]:
    """Stage ends of any CNN, found by running it once: the last module to finish at each
    spatial resolution (in execution order) before the resolution falls. That is the
    outermost block ending there (``features.3``, ``blocks.2``, ...). Outputs of 1x1
    (squeeze-excitation, global pooling) are not stages.

    ``read="preact"`` needs the stage to end in a ReLU (the pre-activation is read through
    it); a stage that ends otherwise (MobileNet's linear bottlenecks) is refused by name
    rather than read at the wrong tensor.

    A transformer (a run of ≥ 2 sibling blocks of one type giving (B, N, D) tokens) has
    transformer blocks as its stage ends instead (:func:`_token_points`).
    """
    events, leaves = _trace(model, x)
    blocks = _token_blocks(events)
    if blocks:
        return _token_points(model, x, events, blocks, read)
    finished = [(name, shape) for name, _m, shape in events if len(shape) == 4]
    groups: list[list[str]] = []  # modules finishing at each resolution, in order
    current: int | None = None
    for name, shape in finished:
        hw = shape[2] * shape[3]
        if hw <= 1 or (current is not None and hw > current):
            continue  # squeeze-excitation / pooled outputs; nothing grows back in a classifier
        if current is None or hw < current:
            groups.append([])
            current = hw
        groups[-1].append(name)
    # Of the modules finishing at a resolution, the outermost (fewest dots) last one: the
    # whole block or stage, not the first layers of the next block that run before its
    # downsampling (an inverted residual's expansion).
    ends = []
    for names in groups:
        depth = min(n.count(".") for n in names)
        ends.append([n for n in names if n.count(".") == depth][-1])
    named = _feature_info(model)  # timm says where its stages end: trusted over the probe
    if named:
        ends = [n for n in named if any(n == f for f, _s in finished)] or ends
    if not ends:
        raise KdkitError(f"cannot find the stages of {type(model).__name__} (no module "
                         "returns a feature map (B, C, H, W)); name the layers explicitly, e.g. "
                         "student_layers: ['block2:preact']")
    points = []
    for path in ends:
        inside = [(n, m) for n, m in leaves if n == path or n.startswith(path + ".")]
        bns = [n for n, m in inside if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        last = inside[-1][1] if inside else None
        if read == "preact":
            if not isinstance(last, nn.ReLU):
                raise KdkitError(
                    f"{type(model).__name__}: stage '{path}' ends in "
                    f"{type(last).__name__ if last is not None else 'nothing'}, not a ReLU, so "
                    "it has no pre-activation to read (a linear bottleneck); use a method that "
                    "reads stage outputs, or name the layers explicitly")
            points.append(FeaturePoint(Tap(path, "preact"), bns[-1] if bns else None))
        else:
            points.append(FeaturePoint(Tap(path, "output"), bns[-1] if bns else None))
    return points


Event = tuple[str, nn.Module, tuple[int, ...]]


def _trace(model: nn.Module, x: Tensor) -> tuple[list[Event], list[tuple[str, nn.Module]]]:
    """One probing pass: every (module path, module, output shape) of a tensor output in the
    order the modules finish, and every leaf module called, in order."""
    events: list[Event] = []
    leaves: list[tuple[str, nn.Module]] = []

    def record(name: str, module: nn.Module) -> Any:
        def hook(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
            if not list(module.children()):
                leaves.append((name, module))
            if isinstance(out, Tensor):
                events.append((name, module, tuple(out.shape)))
        return hook

    handles = [m.register_forward_hook(record(n, m)) for n, m in model.named_modules() if n]
    try:
        _probe(model, x)
    finally:
        for h in handles:
            h.remove()
    return events, leaves


def _token_blocks(events: list[Event]) -> list[str]:
    """The transformer blocks of a probed model, in order: the largest run of sibling
    modules of one type, each made of submodules, that give 3-D (token) outputs, not nested
    inside another such run (so the layers inside a block are not mistaken for the blocks).
    Empty for a CNN."""
    groups: dict[tuple[str, type], list[str]] = {}
    for name, module, shape in events:
        if len(shape) == 3 and any(True for _ in module.children()):
            members = groups.setdefault((name.rpartition(".")[0], type(module)), [])
            if name not in members:
                members.append(name)
    runs = {key: names for key, names in groups.items() if len(names) >= 2}
    inside = {n for names in runs.values() for n in names}
    outer = [(parent, names) for (parent, _t), names in runs.items()
             if not any(parent == m or parent.startswith(m + ".") for m in inside)]
    if not outer:
        return []
    most = max(len(names) for _p, names in outer)
    return min(((p, n) for p, n in outer if len(n) == most), key=lambda pn: pn[0].count("."))[1]


TOKEN_STAGES = 4  # stage ends taken from a transformer's blocks: the end of each quarter


def _evenly(items: list[Any], k: int) -> list[Any]:
    """``k`` of ``items`` at the ends of k equal parts (the last item always included)."""
    n = len(items)
    return [items[-(-(i + 1) * n // k) - 1] for i in range(k)]


def _token_points(model: nn.Module, x: Tensor, events: list[Event], blocks: list[str],
                  read: Read) -> list[FeaturePoint]:
    """Stage ends of a transformer: the blocks ending each quarter of its depth (of timm's
    ``feature_info`` blocks where it names them), read as tokens (B, N, D) with their
    layout (prefix tokens, patch grid); no pre-activation (a block ends in a residual add)."""
    model_name = type(model).__name__
    shapes = {name: shape for name, _m, shape in reversed(events)}  # first call's shape
    batch = x.shape[0]
    first = shapes[blocks[0]]
    if first[0] != batch and first[1] == batch:
        raise KdkitError(
            f"{model_name}: its transformer blocks ({blocks[0]}, ...) give sequence-first "
            f"tokens {first} (N, B, D) for a batch of {batch}; build them batch-first (e.g. "
            "nn.TransformerEncoderLayer(..., batch_first=True)), or name layers that give "
            "(B, C, H, W) maps (student_layers / teacher_layers)")
    named = [n for n in _feature_info(model) if n in blocks]
    candidates = named if len(named) >= 2 else blocks
    ends = _evenly(candidates, min(TOKEN_STAGES, len(candidates)))
    if read == "preact":
        raise KdkitError(
            f"{model_name}: its stage ends are transformer blocks ({', '.join(ends)}) giving "
            f"tokens {shapes[ends[-1]]}; a block ends in a residual add, not a ReLU, so it "
            "has no pre-activation to read; use a method that reads stage outputs (hint, "
            "fitnets, at, nst, sp, fsp read tokens as maps)")
    grid = _patch_grid(events)
    return [FeaturePoint(Tap(e, "output"), None,
                         infer_layout(model, shapes[e], grid, f"stage end '{e}'"))
            for e in ends]


def _patch_grid(events: list[Event]) -> tuple[int, int] | None:
    """The spatial size of the last map (B, C, h, w) finished before the first token output
    (the patch embedding's), if any."""
    grid = None
    for _name, _m, shape in events:
        if len(shape) == 3:
            return grid
        if len(shape) == 4:
            grid = (shape[2], shape[3])
    return grid


def token_layout(model: nn.Module, x: Tensor, shape: tuple[int, ...], where: str
                 ) -> TokenLayout:
    """The layout of a (B, N, D) tensor read from ``model`` at a named layer."""
    events, _ = _trace(model, x)
    return infer_layout(model, shape, _patch_grid(events), where)


def _resnet_points(model: nn.Module, stages: list[str], x: Tensor | None,
                   read: Read) -> list[FeaturePoint]:
    if read == "output":
        return [FeaturePoint(Tap(s, "output"), _last_bn(resolve_module(model, s), s))
                for s in stages]
    last_block = resolve_module(model, stages[-1])
    blocks = list(last_block.children()) or [last_block]
    if _block_ends_with_relu(model, blocks[-1], x):
        return [FeaturePoint(Tap(s, "preact"), _last_bn(resolve_module(model, s), s))
                for s in stages]
    # Pre-activation network: read the BN output that feeds the next ReLU.
    points = []
    for i in range(len(stages)):
        if i + 1 < len(stages):
            nxt = stages[i + 1]
            first = next(iter(resolve_module(model, nxt).named_children()))[0]
            block = f"{nxt}.{first}"
            relu = next(n for n, m in resolve_module(model, block).named_children()
                        if isinstance(m, _RELUS))
            bn = _first_bn(resolve_module(model, block), block)
            points.append(FeaturePoint(Tap(f"{block}.{relu}", "preact"), bn))
        else:
            top = [(n, m) for n, m in model.named_children() if isinstance(m, _RELUS)]
            bns = [n for n, m in model.named_children() if isinstance(m, nn.BatchNorm2d)]
            if not top:
                raise KdkitError(
                    f"{type(model).__name__}: the last stage has no final ReLU to read the "
                    "pre-activation before; name the layers explicitly"
                )
            points.append(FeaturePoint(Tap(top[-1][0], "preact"), bns[-1] if bns else None))
    return points


def _probe(model: nn.Module, x: Tensor) -> None:
    """One forward pass in eval mode without gradients (for hooks to watch); the model's
    mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)


def _first_bn(module: nn.Module, prefix: str) -> str | None:
    for name, m in module.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            return f"{prefix}.{name}"
    return None


def _block_ends_with_relu(model: nn.Module, block: nn.Module, x: Tensor | None) -> bool:
    """Whether the block's last operation is a ReLU module (checked by running the model)."""
    order: list[nn.Module] = []
    leaves = [m for m in block.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda mod, a, o: order.append(mod)) for m in leaves]
    try:
        if x is None:
            children = list(block.children())
            return bool(children) and isinstance(children[-1], _RELUS)
        _probe(model, x)
    finally:
        for h in hooks:
            h.remove()
    return bool(order) and isinstance(order[-1], _RELUS)


def _pooled_points(prefix: str, seq: nn.Module, read: Read) -> list[FeaturePoint]:
    children = list(seq.named_children())
    points = []
    for i, (_name, m) in enumerate(children):
        if not isinstance(m, nn.MaxPool2d) or i == 0:
            continue
        relu_name, relu = children[i - 1]
        if not isinstance(relu, _RELUS):
            continue
        bn = children[i - 2] if i >= 2 and isinstance(children[i - 2][1], nn.BatchNorm2d) else None
        path = f"{prefix}.{relu_name}" if prefix else relu_name
        bn_path = (f"{prefix}.{bn[0]}" if prefix else bn[0]) if bn else None
        points.append(FeaturePoint(Tap(path, read if read == "preact" else "output"), bn_path))
    if not points:
        raise KdkitError("no ReLU directly before a max-pool; name the layers explicitly")
    return points


# ---------------------------------------------------------------------------- connectors


class Connector(nn.Module):
    """Maps a student feature (B, Cs, Hs, Ws) to the teacher's (B, Ct, Ht, Wt).

    ``conv_bn`` (default, Heo et al. 2019): 1×1 conv without bias, He-normal with
    std √(2/(k²·C_out)), then BN with γ = 1, β = 0. ``conv``: the 1×1 conv alone (FitNets'
    regressor). Spatial mismatch rule: a larger student map is average-pooled to the
    teacher's size, a smaller one is upsampled bilinearly, before the conv.
    """

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...],
                 kind: str = "conv_bn") -> None:
        super().__init__()
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise KdkitError(
                f"a conv connector joins (B, C, H, W) maps; got student {tuple(s_shape)} "
                f"and teacher {tuple(t_shape)}"
            )
        if kind not in ("conv_bn", "conv"):
            raise KdkitError(f"unknown connector kind '{kind}'; use conv_bn or conv")
        cs, ct = s_shape[1], t_shape[1]
        self.size = (int(t_shape[2]), int(t_shape[3]))
        self.conv = nn.Conv2d(cs, ct, 1, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, (2.0 / (1 * 1 * ct)) ** 0.5)
        self.bn = nn.BatchNorm2d(ct) if kind == "conv_bn" else None
        if self.bn is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if (h, w) != self.size:
            if h >= self.size[0] and w >= self.size[1]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


def check_connectable(s_shape: tuple[int, ...], t_shape: tuple[int, ...], where: str) -> None:
    """Fail early, naming both shapes, when two taps cannot be joined by a connector."""
    if len(s_shape) != len(t_shape):
        raise KdkitError(
            f"{where}: student feature {tuple(s_shape)} and teacher feature {tuple(t_shape)} "
            "have different ranks; choose layers of the same kind (both conv maps)"
        )


def paired_points(student: nn.Module, teacher: nn.Module, x: Tensor | None,
                  student_layers: list[str] | None, teacher_layers: list[str] | None,
                  read: Read) -> list[tuple[FeaturePoint, FeaturePoint]]:
    """(student point, teacher point) per stage, matched stage by stage.

    CNNs whose stages have the same sizes pair in order; otherwise where their maps have the
    same size (a MobileNet's 16, 8, 4, 2 against a ResNet-18's 8, 4, 2, 1 at 32x32 input:
    three pairs), or in order when no size is shared and the counts are equal. A transformer's stages all share one grid, so its depth decides: two
    transformers pair their stage ends evenly along depth, and a transformer with a CNN
    pairs where the CNN's map has the transformer's patch grid. Named layers pair in the
    order given (their token layouts are found when the method probes their shapes).
    """
    if student_layers is not None or teacher_layers is not None:
        if student_layers is None or teacher_layers is None or \
                len(student_layers) != len(teacher_layers):
            raise KdkitError("give student_layers and teacher_layers together, equally long")
        return [(FeaturePoint(parse_layer(s, read), None), FeaturePoint(parse_layer(t, read), None))
                for s, t in zip(student_layers, teacher_layers, strict=True)]
    sp, tp = stage_points(student, x, read), stage_points(teacher, x, read)
    s_tokens, t_tokens = sp[0].tokens is not None, tp[0].tokens is not None
    if s_tokens and t_tokens:
        k = min(len(sp), len(tp))
        return list(zip(_evenly(sp, k), _evenly(tp, k), strict=True))
    if s_tokens or t_tokens:
        return _pair_with_transformer(student, teacher, x, sp, tp)
    if len(sp) == len(tp) and (x is None or _grids(student, x, sp) == _grids(teacher, x, tp)):
        return list(zip(sp, tp, strict=True))
    pairs = _pair_by_resolution(student, teacher, x, sp, tp)
    if pairs:
        return pairs
    if len(sp) == len(tp):  # as many stages, none at the same size: in order (connectors resize)
        return list(zip(sp, tp, strict=True))
    raise KdkitError(
        f"the student has {len(sp)} stages and the teacher {len(tp)}, and none at the "
        "same resolution; name the layers to match explicitly (student_layers / "
        "teacher_layers)")


def _grids(model: nn.Module, x: Tensor | None, points: list[FeaturePoint]
           ) -> list[tuple[int, ...]]:
    """The spatial size of each point: a map's (H, W), a token stage's patch grid."""
    from kdkit.taps import probe_shape

    return [p.tokens.grid if p.tokens is not None else
            tuple(probe_shape(model, p.tap, x)[2:]) for p in points]


def _pair_by_resolution(student: nn.Module, teacher: nn.Module, x: Tensor | None,
                        sp: list[FeaturePoint], tp: list[FeaturePoint]
                        ) -> list[tuple[FeaturePoint, FeaturePoint]]:
    """Stages of networks with different numbers of stages, paired where their feature
    maps have the same spatial size (a MobileNet's 5 against a ResNet's 4); the others
    are left out."""
    if x is None:
        return []
    s_sizes, t_sizes = _grids(student, x, sp), _grids(teacher, x, tp)
    pairs = []
    for t, t_size in zip(tp, t_sizes, strict=True):
        same = [s for s, s_size in zip(sp, s_sizes, strict=True) if s_size == t_size]
        if same:
            pairs.append((same[-1], t))
    return pairs


def _pair_with_transformer(student: nn.Module, teacher: nn.Module, x: Tensor | None,
                           sp: list[FeaturePoint], tp: list[FeaturePoint]
                           ) -> list[tuple[FeaturePoint, FeaturePoint]]:
    """A CNN and a transformer: the CNN's stage whose map has the transformer's patch grid,
    with the transformer's last stage end (its deepest block at that grid)."""
    s_sizes, t_sizes = _grids(student, x, sp), _grids(teacher, x, tp)
    pairs = []
    for size in dict.fromkeys(t_sizes):
        ss = [p for p, z in zip(sp, s_sizes, strict=True) if z == size]
        ts = [p for p, z in zip(tp, t_sizes, strict=True) if z == size]
        k = min(len(ss), len(ts))
        if k:
            pairs += list(zip(_evenly(ss, k), _evenly(ts, k), strict=True))
    if not pairs:
        def show(points: list[FeaturePoint], sizes: list[tuple[int, ...]]) -> str:
            return ", ".join(f"{p.tap.path} {'×'.join(map(str, z))}"
                             for p, z in zip(points, sizes, strict=True))

        who = "student" if sp[0].tokens is not None else "teacher"
        raise KdkitError(
            f"the {who} is a transformer (tokens on a patch grid) and the other a CNN, and no "
            f"CNN stage has the transformer's grid (student stage ends: {show(sp, s_sizes)}; "
            f"teacher: {show(tp, t_sizes)}); name the layers to pair (student_layers / "
            "teacher_layers), or choose an input or patch size at which a CNN stage has the "
            "transformer's grid")
    return pairs
