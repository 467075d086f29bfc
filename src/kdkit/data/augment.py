"""Batch-level, vectorised image augmentations driven by an explicit ``torch.Generator``.

Each augmentation maps ``x`` (N, C, H, W) to a tensor of the same shape (a crop may change
H, W if asked). Random draws are made on the CPU generator, so the result depends only on
the generator's seed, whatever device ``x`` is on.

Two ways to draw: ``aug(x, generator)`` draws for a whole batch from one generator (the
batch's view depends on the batch's seed), and ``aug.apply(x, u)`` takes ``n_draws``
uniforms per sample (N, n_draws) in [0, 1): with per-sample uniforms from a counter-based
hash (:mod:`kdkit.data.views`) a sample's view depends only on (sample, view number), never
on the batch it lands in, which is what makes a teacher-output cache exact.

:class:`RandomResizedCrop` is the Inception-style crop for real images, vectorised over the
batch; :class:`TorchvisionAugment` runs a ``torchvision.transforms.v2`` pipeline per sample
under a seed taken from the sample's uniform, so it keeps the same contract.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.errors import KdkitError


class Augment:
    """Base class: ``aug(x, generator) -> x'`` on a whole batch (N, C, H, W).

    ``n_draws`` uniforms per sample drive ``apply(x, u)``; ``u`` is (N, n_draws) in [0, 1).
    """

    n_draws: int = 0

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _windows(padded: Tensor, top: Tensor, left: Tensor, h: int, w: int) -> Tensor:
    """Per-sample (h, w) windows of ``padded`` (N, C, Hp, Wp) starting at ``top``/``left`` (N,)."""
    n, c = padded.shape[:2]
    dev = padded.device
    rows = top.to(dev)[:, None] + torch.arange(h, device=dev)[None, :]  # (N, h)
    cols = left.to(dev)[:, None] + torch.arange(w, device=dev)[None, :]  # (N, w)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def _uniform_int(u: Tensor, low: int, high: int) -> Tensor:
    """Map uniforms in [0, 1) to integers in [low, high] (inclusive), elementwise."""
    return (u * (high - low + 1)).floor().long().clamp_(max=high - low) + low


class RandomShift(Augment):
    """Translate each image by integer offsets in [-max_shift, max_shift] per axis.

    Uncovered pixels take ``fill`` (use ``DatasetSplits.black`` for normalised images).
    Hinton et al. (2015) jitter MNIST "by up to two pixels in any direction".
    """

    def __init__(self, max_shift: int, fill: float = 0.0) -> None:
        if max_shift < 0:
            raise KdkitError(f"RandomShift: max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)
        self.fill = float(fill)

    n_draws = 2

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        k = self.max_shift
        if k == 0 or x.shape[0] == 0:
            return x
        dy = torch.randint(-k, k + 1, (x.shape[0],), generator=generator)
        dx = torch.randint(-k, k + 1, (x.shape[0],), generator=generator)
        return self._shift(x, dy, dx)

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        k = self.max_shift
        if k == 0 or x.shape[0] == 0:
            return x
        return self._shift(x, _uniform_int(u[:, 0], -k, k), _uniform_int(u[:, 1], -k, k))

    def _shift(self, x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
        k = self.max_shift
        h, w = x.shape[2:]
        padded = F.pad(x, (k, k, k, k), value=self.fill)
        # out[i, j] = x[i - dy, j - dx]: a pixel at (r, c) moves to (r + dy, c + dx)
        return _windows(padded, k - dy, k - dx, h, w)


class RandomCrop(Augment):
    """Pad by ``padding`` on each side with ``fill``, then crop ``size`` at a random place.

    ``size=None`` crops back to the input size (the usual CIFAR "pad 4, crop 32").
    """

    def __init__(
        self, size: int | tuple[int, int] | None = None, padding: int = 0, fill: float = 0.0
    ) -> None:
        if padding < 0:
            raise KdkitError(f"RandomCrop: padding must be >= 0, got {padding}")
        self.size = (size, size) if isinstance(size, int) else size
        self.padding = int(padding)
        self.fill = float(fill)

    n_draws = 2

    def _geometry(self, x: Tensor) -> tuple[int, int, int, int]:
        """(crop h, crop w, padded h, padded w), checked."""
        h, w = x.shape[2:]
        ch, cw = self.size if self.size is not None else (h, w)
        hp, wp = h + 2 * self.padding, w + 2 * self.padding
        if ch > hp or cw > wp:
            raise KdkitError(
                f"RandomCrop: crop {ch}x{cw} is larger than the padded image {hp}x{wp}"
            )
        return ch, cw, hp, wp

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n = x.shape[0]
        ch, cw, hp, wp = self._geometry(x)
        if n == 0:
            return x.new_empty((0, x.shape[1], ch, cw))
        top = torch.randint(0, hp - ch + 1, (n,), generator=generator)
        left = torch.randint(0, wp - cw + 1, (n,), generator=generator)
        return self._crop(x, top, left, ch, cw)

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        ch, cw, hp, wp = self._geometry(x)
        if x.shape[0] == 0:
            return x.new_empty((0, x.shape[1], ch, cw))
        top, left = _uniform_int(u[:, 0], 0, hp - ch), _uniform_int(u[:, 1], 0, wp - cw)
        return self._crop(x, top, left, ch, cw)

    def _crop(self, x: Tensor, top: Tensor, left: Tensor, ch: int, cw: int) -> Tensor:
        p = self.padding
        padded = F.pad(x, (p, p, p, p), value=self.fill) if p else x
        return _windows(padded, top, left, ch, cw)


class HorizontalFlip(Augment):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise KdkitError(f"HorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)

    n_draws = 1

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self._flip(x, torch.rand(x.shape[0], generator=generator) < self.p)

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        return self._flip(x, u[:, 0] < self.p)

    @staticmethod
    def _flip(x: Tensor, flip: Tensor) -> Tensor:
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def resized_crop_boxes(
    u: Tensor,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """Inception-style crop boxes (N, 4) int64 ``[top, left, h, w]`` from uniforms ``u``.

    ``u`` is (N, 2 * attempts + 2) in [0, 1). Attempt ``t`` uses ``u[:, 2t]`` for the area
    (uniform in ``scale`` times the image's area) and ``u[:, 2t + 1]`` for the aspect w/h
    (log-uniform in ``ratio``); the box's sides are rounded to whole pixels. The first
    attempt whose box fits in the image is kept; when none fits, the box is the whole image
    cut to the nearest allowed aspect, centred. The last two uniforms place the kept box
    (top, left), uniformly over the positions where it fits. All on the CPU in float64, so a
    box depends only on ``u`` and the image size.
    """
    t = attempts
    if u.ndim != 2 or u.shape[1] < 2 * t + 2:
        raise KdkitError(f"resized_crop_boxes: u must be (N, {2 * t + 2}), got {tuple(u.shape)}")
    u = u.detach().to("cpu", torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0 : 2 * t : 2]
    area = area * (height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1 : 2 * t : 2])
    w = torch.sqrt(area * aspect).round().long()  # (N, attempts)
    h = torch.sqrt(area / aspect).round().long()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits
    found = fits.any(dim=1)
    # the fallback: the whole image, cut to the nearest allowed aspect, centred
    fw, fh = width, height
    if width / height < ratio[0]:
        fh = min(height, max(1, round(width / ratio[0])))
    elif width / height > ratio[1]:
        fw = min(width, max(1, round(height * ratio[1])))
    bw = torch.where(found, w.gather(1, first)[:, 0], fw)
    bh = torch.where(found, h.gather(1, first)[:, 0], fh)
    top = ((u[:, 2 * t] * (height - bh + 1)).floor().long()).minimum(height - bh)
    left = ((u[:, 2 * t + 1] * (width - bw + 1)).floor().long()).minimum(width - bw)
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    return torch.stack([top, left, bh, bw], dim=1)


def crop_resize(x: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop box ``boxes[j]`` = ``[top, left, h, w]`` (pixels) of ``x[j]`` and resize it to
    ``size``, bilinearly, all samples in one ``F.grid_sample`` (align_corners=False: output
    pixel centres map onto the box's pixel grid, so a box of the output's size is an exact
    slice). Boxes inside the image read only the image; at a box's edge the interpolation
    uses the neighbouring pixels of the image, not a copy of the edge. No antialiasing:
    a box much larger than ``size`` aliases, as ``F.interpolate(antialias=False)`` would."""
    n, c, height, width = x.shape
    oh, ow = size
    top, left, bh, bw = boxes.detach().to("cpu", torch.float64).unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = bw / width
    theta[:, 0, 2] = (2 * left + bw) / width - 1
    theta[:, 1, 1] = bh / height
    theta[:, 1, 2] = (2 * top + bh) / height - 1
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    grid = F.affine_grid(theta.to(work).to(x.device), [n, c, oh, ow], align_corners=False)
    out = F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    if x.dtype.is_floating_point:
        return out.to(x.dtype)
    info = torch.iinfo(x.dtype)
    return out.round().clamp(info.min, info.max).to(x.dtype)


def _pair(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


class RandomResizedCrop(Augment):
    """Crop a random box of random area and aspect, then resize it to ``size`` (Inception
    style, as torchvision's ``RandomResizedCrop``); ``size=None`` keeps the input's H x W.

    The box's area is uniform in ``scale`` (fractions of the image's area), its aspect w/h
    log-uniform in ``ratio``. torchvision retries up to 10 times until a box fits in the
    image and then falls back to a centre crop; here the retries are fixed: ``attempts``
    candidate boxes per sample, each from its own two uniforms, the first that fits is
    kept, else the whole image cut to the nearest allowed aspect, centred (so ``n_draws``
    is ``2 * attempts + 2``, the last two placing the box). The result is a pure function
    of the uniforms, with torchvision's distribution of boxes. Boxes and resizing are
    vectorised over the batch (:func:`resized_crop_boxes`, :func:`crop_resize`) and run on
    ``x``'s device; the boxes are drawn on the CPU, so they do not depend on the device.
    """

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        attempts: int = 10,
    ) -> None:
        pair = _pair(size)
        if pair is not None and min(pair) < 1:
            raise KdkitError(f"RandomResizedCrop: size must be >= 1, got {size}")
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi <= 1:
            raise KdkitError(f"RandomResizedCrop: scale must be [min, max] with "
                             f"0 < min <= max <= 1, got {list(scale)}")
        rlo, rhi = (float(v) for v in ratio)
        if not 0 < rlo <= rhi or not math.isfinite(rhi):
            raise KdkitError(f"RandomResizedCrop: ratio must be [min, max] with "
                             f"0 < min <= max, got {list(ratio)}")
        if attempts < 1:
            raise KdkitError(f"RandomResizedCrop: attempts must be >= 1, got {attempts}")
        self.size = pair
        self.scale = (lo, hi)
        self.ratio = (rlo, rhi)
        self.attempts = int(attempts)
        self.n_draws = 2 * self.attempts + 2

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        u = torch.rand((x.shape[0], self.n_draws), generator=generator, dtype=torch.float64)
        return self.apply(x, u)

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        n, c, height, width = x.shape
        size = self.size or (height, width)
        if n == 0:
            return x.new_empty((0, c, *size))
        boxes = resized_crop_boxes(u, height, width, self.scale, self.ratio, self.attempts)
        return crop_resize(x, boxes, size)


_V2_DOCS = "https://pytorch.org/vision/stable/transforms.html"


def _torchvision_v2() -> Any:
    try:
        from torchvision.transforms import v2
    except ImportError as e:
        raise KdkitError(f"augmentation 'torchvision' needs the torchvision package, which is "
                         f"not installed ({str(e)[:80]}); pip install torchvision (make "
                         f"setup-vision on kdkit's own machines)") from None
    return v2


class TorchvisionAugment(Augment):
    """A ``torchvision.transforms.v2`` pipeline, ``steps`` = ``[(name, kwargs), ...]``.

    v2 draws its parameters from torch's global RNG, once per call, so the pipeline runs
    per sample, each under its own seed: ``int(u[j, 0] * 2**53)`` seeds the CPU generator
    (and the generator of ``x``'s accelerator, for transforms that draw there) inside
    ``torch.random.fork_rng``, which puts the global RNG state back afterwards. So
    ``apply(x, u)`` is a pure function of (x, u) and the caller's RNG is not disturbed;
    ``aug(x, generator)`` draws the per-sample uniforms from ``generator``. A Python loop
    over the batch: slower than the vectorised augmentations. Photometric v2 transforms
    (``ColorJitter``...) assume float images in [0, 1] and clamp to it, so they suit
    unnormalised data only; the geometric ones work on any values.
    """

    n_draws = 1

    def __init__(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
        v2 = _torchvision_v2()
        import torchvision

        self.steps = [(str(name), dict(kwargs)) for name, kwargs in steps]
        self.version = str(torchvision.__version__)  # part of the fingerprint: v2 may change
        transforms = []
        for name, kwargs in self.steps:
            cls = None if name.startswith("_") else getattr(v2, name, None)
            if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
                raise KdkitError(f"augmentation 'torchvision': torchvision.transforms.v2 has no "
                                 f"transform {name!r}; the names are the classes listed at "
                                 f"{_V2_DOCS} (v2 API)")
            try:
                transforms.append(cls(**kwargs))
            except (TypeError, ValueError) as e:
                raise KdkitError(f"augmentation 'torchvision': {name}(**{kwargs!r}) failed: "
                                 f"{str(e)[:200]}") from None
        self._pipeline = v2.Compose(transforms)

    def __repr__(self) -> str:
        return f"TorchvisionAugment(steps={self.steps!r}, torchvision={self.version!r})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        u = torch.rand((x.shape[0], 1), generator=generator, dtype=torch.float64)
        return self.apply(x, u)

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x
        seeds = (u[:, 0].detach().to("cpu", torch.float64) * 2.0**53).long().tolist()
        dev = x.device
        accel = dev.type != "cpu"
        outs: list[Tensor] = []
        with torch.random.fork_rng(devices=[dev] if accel else [],
                                   device_type=dev.type if accel else None):
            for j, seed in enumerate(seeds):
                _seed_rng(dev, seed)
                outs.append(torch.as_tensor(self._pipeline(x[j])))
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise KdkitError(f"augmentation 'torchvision' gave images of different sizes "
                             f"{sorted(shapes)[:3]}; end the pipeline with a fixed size "
                             f"(e.g. RandomResizedCrop with a size, or Resize)")
        return torch.stack(outs)


def _seed_rng(dev: torch.device, seed: int) -> None:
    """Seed the CPU generator and, for an accelerator, that device's generator only."""
    torch.default_generator.manual_seed(seed)
    if dev.type == "cpu":
        return
    mod = torch.get_device_module(dev.type)
    gens = getattr(mod, "default_generators", None)
    if gens:
        gens[dev.index if dev.index is not None else mod.current_device()].manual_seed(seed)
    else:
        mod.manual_seed(seed)


class Compose(Augment):
    """Apply augmentations in order, all drawing from the same generator."""

    def __init__(self, augments: Sequence[Augment]) -> None:
        self.augments = list(augments)

    @property
    def n_draws(self) -> int:  # type: ignore[override]
        return sum(a.n_draws for a in self.augments)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        for aug in self.augments:
            x = aug(x, generator)
        return x

    def apply(self, x: Tensor, u: Tensor) -> Tensor:
        start = 0
        for aug in self.augments:
            x = aug.apply(x, u[:, start : start + aug.n_draws])
            start += aug.n_draws
        return x


AUGMENT_KEYS: dict[str, str] = {
    "shift": "int: jitter each image by up to this many pixels per axis",
    "crop_padding": "int: pad by this much, then crop at a random place",
    "crop_size": "int: crop size (default: the input size); needs crop_padding",
    "hflip": "bool or float: flip left-right (true = p 0.5, a number = its probability)",
    "fill": "float: value for padded pixels (default: the fill argument)",
    "resized_crop": "true or {scale: [0.08, 1.0], ratio: [0.75, 1.333], size: 32, attempts: 10}:"
                    " Inception-style random resized crop (size: default the input size)",
    "torchvision": "[[NAME, {ARGS}], ...]: a torchvision.transforms.v2 pipeline, run per sample",
}
RESIZED_CROP_KEYS = ("scale", "ratio", "size", "attempts")


def _number(spec: dict[str, Any], key: str, kind: type, minimum: float | None = None) -> Any:
    """``spec[key]`` as an int or a float (>= minimum); a clear error otherwise."""
    value = spec[key]
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        kind is float and isinstance(value, float) and math.isfinite(value))
    if not ok or (minimum is not None and value < minimum):
        what = "a whole number" if kind is int else "a number"
        bound = f" >= {minimum}" if minimum is not None else ""
        raise KdkitError(f"augmentation '{key}' must be {what}{bound}, got {str(value)[:40]!r}")
    return kind(value)


def _number_pair(value: Any, key: str) -> tuple[float, float]:
    if (not isinstance(value, list | tuple) or len(value) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        raise KdkitError(f"augmentation '{key}' must be [min, max] (two numbers), "
                         f"got {str(value)[:40]!r}")
    return float(value[0]), float(value[1])


def _resized_crop(value: Any) -> RandomResizedCrop | None:
    """``resized_crop``: true (torchvision's defaults), false, or a mapping of its settings."""
    if value is False or value is None:
        return None
    if value is True:
        return RandomResizedCrop()
    if not isinstance(value, dict):
        raise KdkitError(f"augmentation 'resized_crop' is true or a mapping with keys "
                         f"{', '.join(RESIZED_CROP_KEYS)} (e.g. {{scale: [0.08, 1.0], size: 32}}),"
                         f" got {str(value)[:40]!r}")
    unknown = sorted(set(value) - set(RESIZED_CROP_KEYS))
    if unknown:
        raise KdkitError(f"unknown 'resized_crop' key(s) {', '.join(repr(k) for k in unknown)}; "
                         f"valid keys: {', '.join(RESIZED_CROP_KEYS)}")
    kwargs: dict[str, Any] = {}
    for key in ("scale", "ratio"):
        if key in value:
            kwargs[key] = _number_pair(value[key], f"resized_crop.{key}")
    size = value.get("size")
    if size is not None:
        whole = isinstance(size, int) and not isinstance(size, bool)
        pair = isinstance(size, list | tuple) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in size)
        if not (whole or pair):
            raise KdkitError(f"augmentation 'resized_crop.size' must be a whole number or "
                             f"[height, width], got {str(size)[:40]!r}")
        kwargs["size"] = size if whole else (size[0], size[1])
    if "attempts" in value:
        key = "resized_crop.attempts"
        kwargs["attempts"] = _number({key: value["attempts"]}, key, int, 1)
    try:
        return RandomResizedCrop(**kwargs)
    except KdkitError as e:
        raise KdkitError(f"augmentation 'resized_crop': {str(e).partition(': ')[2]}") from None


def _torchvision_steps(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """``torchvision``: a list of ``[NAME, {ARGS}]`` pairs (or bare names)."""
    usage = ("augmentation 'torchvision' is a list of [NAME, {ARGS}] pairs naming "
             "torchvision.transforms.v2 classes, e.g. [[RandomResizedCrop, {size: 32}], "
             "[RandomHorizontalFlip, {}]]")
    if not isinstance(value, list | tuple) or not value:
        raise KdkitError(f"{usage}; got {str(value)[:60]!r}")
    steps = []
    for item in value:
        if isinstance(item, str):
            item = [item, {}]
        if (not isinstance(item, list | tuple) or not 1 <= len(item) <= 2
                or not isinstance(item[0], str)
                or (len(item) == 2 and not isinstance(item[1], dict | None))):
            raise KdkitError(f"{usage}; got the item {str(item)[:60]!r}")
        steps.append((item[0], dict(item[1] or {}) if len(item) == 2 else {}))
    return steps


def build_augment(spec: dict[str, Any] | None, *, fill: float = 0.0) -> Augment | None:
    """Build an augmentation from ``{"shift": 2, "hflip": true, "crop_padding": 4}``.

    Order: torchvision, resized_crop, crop, shift, flip. ``fill`` is the pad value unless
    the spec gives one; pass ``DatasetSplits.black`` so padding looks like a black border.
    Unknown keys raise.
    """
    if not spec:
        return None
    unknown = sorted(set(spec) - set(AUGMENT_KEYS))
    if unknown:
        raise KdkitError(
            f"unknown augmentation key(s) {', '.join(repr(k) for k in unknown)}; "
            f"valid keys: {', '.join(AUGMENT_KEYS)}"
        )
    fill = _number(spec, "fill", float) if "fill" in spec else fill
    parts: list[Augment] = []
    if "torchvision" in spec:
        parts.append(TorchvisionAugment(_torchvision_steps(spec["torchvision"])))
    resized = _resized_crop(spec.get("resized_crop"))
    if resized is not None:
        parts.append(resized)
    if "crop_size" in spec and "crop_padding" not in spec:
        raise KdkitError("augmentation 'crop_size' needs 'crop_padding' (0 for a plain crop)")
    if "crop_padding" in spec:
        size = spec.get("crop_size")
        parts.append(RandomCrop(None if size is None else _number(spec, "crop_size", int, 1),
                                _number(spec, "crop_padding", int, 0), fill))
    if spec.get("shift"):
        parts.append(RandomShift(_number(spec, "shift", int, 0), fill))
    hflip = spec.get("hflip", False)
    if hflip is True:
        parts.append(HorizontalFlip(0.5))
    elif hflip is not False:
        p = _number(spec, "hflip", float, 0.0)
        if p > 1:
            raise KdkitError(f"augmentation 'hflip' is a probability in [0, 1] or true/false, "
                             f"got {p}")
        if p > 0:
            parts.append(HorizontalFlip(p))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Compose(parts)
