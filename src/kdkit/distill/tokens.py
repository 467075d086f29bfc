"""Transformer token features (B, N, D) read as feature maps (B, D, h, w), and back.

A vision transformer's blocks give tokens: ``N = prefix + h·w``, the *prefix* being its
class, distillation or register tokens, followed by the patch tokens of an h×w grid in
row-major order (timm, torchvision and DeiT all put the prefix first). Feature methods
compare maps, so a token stage is read as its patch grid: the prefix is dropped and the
patch tokens are laid out on the grid (:class:`TokensToMap`); :class:`MapToTokens` is the
inverse (a map flattened to one token per position, no prefix).

The layout of a model's tokens is known, never guessed silently
(:func:`infer_layout`): the prefix count from the model where it says (timm's
``num_prefix_tokens``), the grid from the patch embedding's map seen in the probing pass;
failing those, N or N − 1 must be a perfect square (no prefix, or one class token);
anything else is refused with the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from kdkit.errors import KdkitError


@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` leading tokens (class, distillation, register), then an h×w ``grid`` of
    patch tokens in row-major order: N = prefix + h·w."""

    prefix: int
    grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def map_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The map (B, D, h, w) that tokens of ``shape`` (B, N, D) become."""
        return (int(shape[0]), int(shape[2]), *self.grid)

    def __str__(self) -> str:
        return f"{self.prefix} prefix + {self.grid[0]}×{self.grid[1]} patch tokens"


def tokens_to_map(x: Tensor, layout: TokenLayout) -> Tensor:
    """(B, N, D) tokens → (B, D, h, w): the prefix dropped, the patch tokens on the grid."""
    if x.dim() != 3 or x.shape[1] != layout.tokens:
        raise KdkitError(
            f"tokens {tuple(x.shape)} do not fit the layout {layout} "
            f"(expected (B, {layout.tokens}, D))")
    b, _, d = x.shape
    return x[:, layout.prefix:].transpose(1, 2).reshape(b, d, *layout.grid)


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map → (B, H·W, C) tokens, one per position in row-major order."""
    if x.dim() != 4:
        raise KdkitError(f"map_to_tokens takes a map (B, C, H, W), got {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


class TokensToMap(nn.Module):
    """Fixed view (no parameters): (B, N, D) tokens → (B, D, h, w) patch map."""

    def __init__(self, layout: TokenLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return tokens_to_map(x, self.layout)

    def extra_repr(self) -> str:
        return str(self.layout)


class MapToTokens(nn.Module):
    """Fixed view (no parameters): (B, C, H, W) map → (B, H·W, C) tokens."""

    def forward(self, x: Tensor) -> Tensor:
        return map_to_tokens(x)


class EachTensor(nn.Module):
    """Applies one view per tensor of a list (a term reading several taps, e.g. FSP's
    pair); ``None`` leaves that tensor as it is."""

    def __init__(self, views: Sequence[nn.Module | None]) -> None:
        super().__init__()
        self.views = nn.ModuleList([v if v is not None else nn.Identity() for v in views])

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != len(self.views):
            raise KdkitError(f"expected {len(self.views)} tensors, got {len(xs)}")
        return [v(x) for v, x in zip(self.views, xs, strict=True)]


def _square(n: int) -> int | None:
    r = math.isqrt(n) if n > 0 else 0
    return r if r > 0 and r * r == n else None


def model_prefix_tokens(model: nn.Module) -> int | None:
    """The number of prefix tokens the model declares (timm's ``num_prefix_tokens``)."""
    value = getattr(model, "num_prefix_tokens", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def infer_layout(model: nn.Module, shape: Sequence[int], patch_grid: tuple[int, int] | None,
                 where: str) -> TokenLayout:
    """The layout of tokens of ``shape`` (B, N, D) read from ``model``.

    ``patch_grid``: the spatial size of the patch embedding's map (the last (B, C, h, w)
    output before the first token output of the probing pass), if there was one.
    """
    n = int(shape[1])
    prefix = model_prefix_tokens(model)
    if prefix is not None and prefix < n:
        rest = n - prefix
        if patch_grid is not None and patch_grid[0] * patch_grid[1] == rest:
            return TokenLayout(prefix, patch_grid)
        side = _square(rest)
        if side is not None:
            return TokenLayout(prefix, (side, side))
    elif prefix is None:
        if patch_grid is not None and 0 <= n - patch_grid[0] * patch_grid[1] < n:
            return TokenLayout(n - patch_grid[0] * patch_grid[1], patch_grid)
        for guess in (0, 1):
            side = _square(n - guess)
            if side is not None:
                return TokenLayout(guess, (side, side))
    said = f"the model declares num_prefix_tokens = {prefix}" if prefix is not None else \
        "the model does not declare num_prefix_tokens, and N is neither a square nor one more"
    grid = f", its patch embedding gives a {patch_grid[0]}×{patch_grid[1]} grid" \
        if patch_grid is not None else ""
    raise KdkitError(
        f"{where}: {type(model).__name__} gives tokens {tuple(shape)} (B, N, D), and which of "
        f"the N = {n} tokens are patches cannot be told ({said}{grid}); set "
        "model.num_prefix_tokens (class + distillation + register tokens), or name layers "
        "that give (B, C, H, W) maps (student_layers / teacher_layers)")
