"""Batch-level, vectorised image augmentations driven by an explicit ``torch.Generator``.

Each augmentation maps ``x`` (N, C, H, W) to a tensor of the same shape (a crop may change
H, W if asked). Random draws are made on the CPU generator, so the result depends only on
the generator's seed, whatever device ``x`` is on.

Two ways to draw: ``aug(x, generator)`` draws for a whole batch from one generator (the
batch's view depends on the batch's seed), and ``aug.apply(x, u)`` takes ``n_draws``
uniforms per sample (N, n_draws) in [0, 1): with per-sample uniforms from a counter-based
hash (:mod:`kdkit.data.views`) a sample's view depends only on (sample, view number), never
on the batch it lands in, which is what makes a teacher-output cache exact.
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
}


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


def build_augment(spec: dict[str, Any] | None, *, fill: float = 0.0) -> Augment | None:
    """Build an augmentation from ``{"shift": 2, "hflip": true, "crop_padding": 4}``.

    Order: crop, shift, flip. ``fill`` is the pad value unless the spec gives one; pass
    ``DatasetSplits.black`` so padding looks like a black border. Unknown keys raise.
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
