"""Plain (non-residual) CNNs of the teacher-assistant KD paper (Mirzadeh et al. 2020)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models._common import check_geometry, init_kaiming
from kdkit.models._registry import MODELS

# Per size: the feature layers ("P" = 2x2 max-pool, int = conv3x3-BN-ReLU with that many
# filters) and the hidden fully connected widths before the classifier.
PLAIN_CNN_CONFIGS: dict[int, tuple[list[int | str], list[int]]] = {
    2: ([16, "P", 16, "P"], []),
    4: ([16, 16, "P", 32, 32, "P"], []),
    6: ([16, 16, "P", 32, 32, "P", 64, 64, "P"], []),
    8: ([16, 16, "P", 32, 32, "P", 64, 64, "P", 128, 128, "P"], [64]),
    10: ([32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P"], [128]),
}

# Parameter counts at 3x32x32 inputs and 10 classes (checked by tests/test_models.py).
_SUMMARIES: dict[int, str] = {
    2: "Plain CNN-2 (TAKD): C16 P C16 P FC (13.1K params at 3x32x32)",
    4: "Plain CNN-4 (TAKD): C16 C16 P C32 C32 P FC (37.2K params at 3x32x32)",
    6: "Plain CNN-6 (TAKD): C16x2 P C32x2 P C64x2 P FC (82.6K params at 3x32x32)",
    8: "Plain CNN-8 (TAKD): C16x2 P C32x2 P C64x2 P C128x2 P FC64 FC (0.33M params at 3x32x32)",
    10: "Plain CNN-10 (TAKD): C32x2 P C64x2 P C128x2 P C256x4 P FC128 FC (2.49M params at 3x32x32)",
}


class PlainCNN(nn.Module):
    """Stack of conv3x3(pad 1)-BN-ReLU blocks and 2x2 max-pools, then an MLP classifier.

    Input ``(B, in_channels, S, S)``, output logits ``(B, num_classes)``. Modules:
    ``features.{i}`` (Conv2d, BatchNorm2d, ReLU, MaxPool2d in order) and ``classifier.{j}``
    (Linear, ReLU, ..., Linear). Mirzadeh et al., "Improved Knowledge Distillation via
    Teacher Assistant" (AAAI 2020).
    """

    def __init__(
        self,
        layers: Sequence[int | str],
        fc_hidden: Sequence[int],
        num_classes: int,
        in_channels: int,
        input_size: int,
    ) -> None:
        super().__init__()
        feats: list[nn.Module] = []
        channels, side = in_channels, input_size
        for layer in layers:
            if layer == "P":
                feats.append(nn.MaxPool2d(2))
                side //= 2
            else:
                assert isinstance(layer, int)
                feats += [
                    nn.Conv2d(channels, layer, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(layer),
                    nn.ReLU(),
                ]
                channels = layer
        self.features = nn.Sequential(*feats)
        head: list[nn.Module] = []
        width = channels * side * side
        for units in fc_hidden:
            head += [nn.Linear(width, units), nn.ReLU()]
            width = units
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        return self.classifier(torch.flatten(self.features(x), 1))


def _build(name: str, size: int, num_classes: int, in_channels: int, input_size: int) -> PlainCNN:
    if size not in PLAIN_CNN_CONFIGS:
        raise KdkitError(
            f"model '{name}': size must be one of {sorted(PLAIN_CNN_CONFIGS)}, got {size!r}"
        )
    layers, fc_hidden = PLAIN_CNN_CONFIGS[size]
    minimum = 2 ** sum(1 for layer in layers if layer == "P")
    check_geometry(name, num_classes, in_channels, input_size, minimum=minimum)
    return PlainCNN(layers, fc_hidden, num_classes, in_channels, input_size)


@MODELS.register("plain_cnn")
def plain_cnn(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, size: int = 2
) -> nn.Module:
    """Plain CNN of the teacher-assistant paper with ``size`` in {2, 4, 6, 8, 10} conv layers.

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``; the
    input must survive every 2x2 pool (size 2/4: >= 4, 6: >= 8, 8/10: >= 16).
    Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant" (AAAI 2020).
    """
    return _build("plain_cnn", size, num_classes, in_channels, input_size)


def _make_factory(size: int) -> Callable[..., nn.Module]:
    name = f"plain_cnn{size}"

    def factory(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
        return _build(name, size, num_classes, in_channels, input_size)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"{_SUMMARIES[size]}.\n\n"
        "Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.\n"
        "Mirzadeh et al., AAAI 2020; see ``plain_cnn``.\n"
    )
    return factory


for _size in PLAIN_CNN_CONFIGS:
    MODELS.add(f"plain_cnn{_size}", _make_factory(_size), _SUMMARIES[_size])
