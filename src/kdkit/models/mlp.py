"""Multi-layer perceptrons, including the MNIST teacher/student pair of Hinton et al. (2015)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from kdkit.errors import KdkitError
from kdkit.models._common import MAX_DEPTH, check_geometry, check_rate
from kdkit.models._registry import MODELS


class MLP(nn.Sequential):
    """Flatten, then fully connected ReLU layers, then a linear classifier.

    Input ``(B, C, H, W)`` (any shape whose trailing dims multiply to ``in_features``),
    output logits ``(B, num_classes)``. Modules: ``flatten``, ``drop_in`` (if input dropout),
    ``fc{i}``/``relu{i}``/``drop{i}`` (dropout only if > 0) per hidden layer, ``fc_out``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["flatten"] = nn.Flatten(1)
        if input_dropout > 0:
            layers["drop_in"] = nn.Dropout(input_dropout)
        width = in_features
        for i, units in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, units)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = units
        layers["fc_out"] = nn.Linear(width, num_classes)
        super().__init__(layers)


def _build(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    hidden: Sequence[int],
    dropout: float,
    input_dropout: float,
) -> MLP:
    check_geometry(name, num_classes, in_channels, input_size)
    if not isinstance(hidden, (list, tuple)):
        raise KdkitError(f"model '{name}': hidden must be a list of positive integers "
                         f"(e.g. [256, 256]), got {str(hidden)[:40]!r}")
    hidden = list(hidden)
    if len(hidden) > MAX_DEPTH:
        raise KdkitError(f"model '{name}': {len(hidden):,} hidden layers is beyond the "
                         f"{MAX_DEPTH} layers kdkit builds")
    if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
        raise KdkitError(
            f"model '{name}': hidden must be a list of positive integers, got {hidden}"
        )
    for arg, p in (("dropout", dropout), ("input_dropout", input_dropout)):
        check_rate(name, arg, p)
    return MLP(in_channels * input_size * input_size, hidden, num_classes, dropout, input_dropout)


@MODELS.register("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
) -> nn.Module:
    """Generic MLP: flatten, ReLU hidden layers of the given widths, linear classifier.

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``.
    ``dropout`` follows every hidden layer, ``input_dropout`` the flattened input.
    """
    return _build("mlp", num_classes, in_channels, input_size, hidden, dropout, input_dropout)


@MODELS.register("mlp_hinton_1200")
def mlp_hinton_1200(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """Hinton 2015 teacher: MLP 784-1200-1200-10, dropout 0.5 (input 0.2), 2.40M params at 1x28x28.

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``;
    the input layer width is ``in_channels * input_size**2``. Hinton, Vinyals & Dean,
    "Distilling the Knowledge in a Neural Network" (2015), §3.
    """
    return _build("mlp_hinton_1200", num_classes, in_channels, input_size, [1200, 1200], 0.5, 0.2)


@MODELS.register("mlp_hinton_800")
def mlp_hinton_800(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """Hinton 2015 student: MLP 784-800-800-10, no dropout, 1.28M params at 1x28x28.

    Input ``(B, in_channels, input_size, input_size)``, output ``(B, num_classes)``;
    the input layer width is ``in_channels * input_size**2``. Hinton, Vinyals & Dean,
    "Distilling the Knowledge in a Neural Network" (2015), §3.
    """
    return _build("mlp_hinton_800", num_classes, in_channels, input_size, [800, 800], 0.0, 0.0)
