"""LeNet-5 and its half-width student, as used for data-free KD (Lopes et al. 2017, DAFL)."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models._common import check_geometry
from kdkit.models._registry import MODELS


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv5-relu-pool, conv5-relu-pool, fc-relu, fc-relu, fc.

    Input ``(B, in_channels, S, S)``, output logits ``(B, num_classes)``. Modules: ``conv1``,
    (``bn1``), ``relu1``, ``pool1``, ``conv2``, (``bn2``), ``relu2``, ``pool2``, ``fc1``,
    ``relu3``, ``fc2``, ``relu4``, ``fc3``. LeCun et al. 1998, with the ReLU/max-pool variant
    of Lopes et al. 2017 and Chen et al. 2019 (DAFL). ``batch_norm`` adds BN after each conv
    (what DeepInversion needs).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: int,
        widths: tuple[int, int, int, int],
        padding: int,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, f1, f2 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=padding)
        self.bn1: nn.Module = nn.BatchNorm2d(c1) if batch_norm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.bn2: nn.Module = nn.BatchNorm2d(c2) if batch_norm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size + 2 * padding - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = self.relu4(self.fc2(self.relu3(self.fc1(x))))
        return self.fc3(x)


def _build(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    padding: int | None,
    widths: tuple[int, int, int, int],
    batch_norm: bool,
) -> LeNet5:
    if padding is None:
        # 28x28 (MNIST) is padded to the classic 32x32 geometry: 16 maps of 5x5 before fc1.
        padding = 2 if input_size == 28 else 0
    if not isinstance(padding, int) or padding < 0:
        raise KdkitError(f"model '{name}': padding must be a non-negative integer, got {padding}")
    # conv5 -> pool2 -> conv5 -> pool2 leaves >= 1 pixel iff input_size + 2*padding >= 16.
    check_geometry(name, num_classes, in_channels, input_size, minimum=max(1, 16 - 2 * padding))
    if not isinstance(batch_norm, bool):
        raise KdkitError(f"model '{name}': batch_norm must be true or false, got {batch_norm!r}")
    return LeNet5(num_classes, in_channels, input_size, widths, padding, batch_norm)


@MODELS.register("lenet5")
def lenet5(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, padding: int | None = None,
    batch_norm: bool = False,
) -> nn.Module:
    """LeNet-5 (conv 6, 16 @5x5, fc 120, 84), ReLU + max-pool (61.7K params at 1x28x28).

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.
    ``padding`` of the first conv defaults to 2 for 28x28 inputs (classic 32x32 geometry),
    else 0; inputs need ``input_size + 2*padding >= 16``. ``batch_norm`` adds BN after
    each conv. LeCun et al. 1998; teacher in
    Lopes et al. 2017 and DAFL (Chen et al. 2019).
    """
    return _build("lenet5", num_classes, in_channels, input_size, padding, (6, 16, 120, 84),
                  batch_norm)


@MODELS.register("lenet5_half")
def lenet5_half(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, padding: int | None = None,
    batch_norm: bool = False,
) -> nn.Module:
    """LeNet-5-Half (conv 3, 8 @5x5, fc 60, 42), the DAFL/Lopes student (15.7K params at 1x28x28).

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.
    Same geometry rules as ``lenet5``. Lopes et al. 2017; Chen et al. 2019 (DAFL).
    """
    return _build("lenet5_half", num_classes, in_channels, input_size, padding, (3, 8, 60, 42),
                  batch_norm)
