"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models._common import check_depth, check_geometry, init_kaiming
from kdkit.models._registry import MODELS


class BasicBlock(nn.Module):
    """Residual block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    Input ``(B, in_planes, H, W)``, output ``(B, planes, ceil(H/stride), ceil(W/stride))``.
    The shortcut is the identity, or a 1x1 conv + BN projection when the shape changes
    (He et al. 2016, option B). Modules: ``conv1``, ``bn1``, ``relu1``, ``conv2``, ``bn2``,
    ``shortcut``, ``relu2``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` to ``(B, planes, H', W')``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv3x3-BN-ReLU, three stages of ``n`` BasicBlocks (stride 1/2/2), global pool, fc.

    Input ``(B, in_channels, S, S)``, output logits ``(B, num_classes)``; depth = 6n + 2.
    Modules: ``conv1``, ``bn1``, ``relu``, ``layer1``-``layer3`` (blocks ``layerK.i``),
    ``avgpool``, ``fc``. He et al. 2016, §4.2.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int = 16) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(width, width, n, stride=1)
        self.layer2 = self._stage(width, 2 * width, n, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_kaiming(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(
    name: str, depth: int, width: int, num_classes: int, in_channels: int, input_size: int
) -> CifarResNet:
    check_depth(name, depth, "6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...)",
                isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise KdkitError(f"model '{name}': width must be a positive integer, got {width!r}")
    # Stride-2 3x3 convs with padding 1 map S to ceil(S/2): any S >= 1 works.
    check_geometry(name, num_classes, in_channels, input_size)
    return CifarResNet(depth, num_classes, in_channels, width)


@MODELS.register("resnet")
def resnet(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    depth: int = 20,
    width: int = 16,
) -> nn.Module:
    """CIFAR-style ResNet of any depth 6n+2, stages of width/2*width/4*width channels.

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.
    He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), §4.2.
    """
    return _build("resnet", depth, width, num_classes, in_channels, input_size)


# Parameter counts at 3x32x32 inputs and 10 classes (checked by tests/test_models.py).
_PARAMS: dict[int, str] = {
    8: "78.0K",
    14: "0.18M",
    20: "0.27M",
    32: "0.47M",
    56: "0.86M",
    110: "1.73M",
}


def _make_factory(depth: int) -> tuple[Callable[..., nn.Module], str]:
    name = f"resnet{depth}"
    summary = (
        f"CIFAR-style ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage, 16/32/64 channels; "
        f"{_PARAMS[depth]} params at 3x32x32)"
    )

    def factory(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
        return _build(name, depth, 16, num_classes, in_channels, input_size)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"{summary}.\n\n"
        "Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.\n"
        "He et al. 2016, §4.2; see ``resnet``.\n"
    )
    return factory, summary


for _depth in _PARAMS:
    MODELS.add(f"resnet{_depth}", *_make_factory(_depth))
