"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models._common import check_depth, check_geometry, check_rate, init_kaiming
from kdkit.models._registry import MODELS


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3 [-dropout] -BN-ReLU-conv3x3, plus shortcut.

    Input ``(B, in_planes, H, W)``, output ``(B, planes, ceil(H/stride), ceil(W/stride))``.
    When the shape changes the shortcut is a 1x1 conv applied to the pre-activated input,
    otherwise the identity on the raw input. Modules: ``bn1``, ``relu1``, ``conv1``,
    ``dropout``, ``bn2``, ``relu2``, ``conv2``, ``shortcut``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.project = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            if self.project
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` to ``(B, planes, H', W')``."""
        pre = self.relu1(self.bn1(x))
        out = self.dropout(self.conv1(pre))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + self.shortcut(pre if self.project else x)


class WideResNet(nn.Module):
    """conv3x3(16), three stages of ``n`` WideBlocks (16k/32k/64k, stride 1/2/2), BN-ReLU, pool, fc.

    Input ``(B, in_channels, S, S)``, output logits ``(B, num_classes)``; depth = 6n + 4.
    Modules: ``conv1``, ``layer1``-``layer3`` (blocks ``layerK.i``), ``bn``, ``relu``,
    ``avgpool``, ``fc``. Zagoruyko & Komodakis 2016.
    """

    def __init__(
        self, depth: int, widen: int, dropout: float, num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBlock(in_planes, planes, stride, dropout)]
        blocks += [WideBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(
    name: str,
    depth: int,
    widen: int,
    dropout: float,
    num_classes: int,
    in_channels: int,
    input_size: int,
) -> WideResNet:
    check_depth(name, depth, "6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)",
                isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0)
    if not isinstance(widen, int) or isinstance(widen, bool) or widen < 1:
        raise KdkitError(f"model '{name}': widen must be a positive integer, got {widen!r}")
    check_rate(name, "dropout", dropout)
    # Stride-2 3x3 convs with padding 1 map S to ceil(S/2): any S >= 1 works.
    check_geometry(name, num_classes, in_channels, input_size)
    return WideResNet(depth, widen, dropout, num_classes, in_channels)


@MODELS.register("wrn")
def wrn(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    depth: int = 16,
    widen: int = 1,
    dropout: float = 0.0,
) -> nn.Module:
    """Wide ResNet WRN-depth-widen (depth 6n+4, pre-activation blocks, optional dropout).

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.
    Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).
    """
    return _build("wrn", depth, widen, dropout, num_classes, in_channels, input_size)


# Parameter counts at 3x32x32 inputs and 10 classes (checked by tests/test_models.py).
_PARAMS: dict[tuple[int, int], str] = {
    (16, 1): "0.18M",
    (16, 2): "0.69M",
    (16, 4): "2.75M",
    (28, 2): "1.47M",
    (28, 4): "5.85M",
    (40, 1): "0.56M",
    (40, 2): "2.24M",
}


def _make_factory(depth: int, widen: int) -> tuple[Callable[..., nn.Module], str]:
    name = f"wrn{depth}_{widen}"
    summary = (
        f"Wide ResNet WRN-{depth}-{widen} (16/{16 * widen}/{32 * widen}/{64 * widen} channels; "
        f"{_PARAMS[(depth, widen)]} params at 3x32x32)"
    )

    def factory(
        num_classes: int = 10, in_channels: int = 1, input_size: int = 28, dropout: float = 0.0
    ) -> nn.Module:
        return _build(name, depth, widen, dropout, num_classes, in_channels, input_size)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"{summary}.\n\n"
        "Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.\n"
        "Zagoruyko & Komodakis 2016; see ``wrn``.\n"
    )
    return factory, summary


for _depth, _widen in _PARAMS:
    MODELS.add(f"wrn{_depth}_{_widen}", *_make_factory(_depth, _widen))
