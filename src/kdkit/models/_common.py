"""Helpers shared by the model families: argument checks and weight initialisation."""

from __future__ import annotations

from torch import nn

from kdkit.errors import KdkitError


def check_geometry(
    model: str, num_classes: int, in_channels: int, input_size: int, minimum: int = 1
) -> None:
    """Raise :class:`KdkitError` if the classes/channels/input size cannot build ``model``.

    ``minimum`` is the smallest square input size whose feature maps do not collapse to 0.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KdkitError(f"model '{model}': {arg} must be a positive integer, got {value!r}")
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise KdkitError(f"model '{model}': input_size must be an integer, got {input_size!r}")
    if input_size < minimum:
        raise KdkitError(
            f"model '{model}' needs input_size >= {minimum} (its feature maps shrink to 0 "
            f"below that), got input_size={input_size}; resize the inputs or pick another model"
        )


def init_kaiming(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, unit-scale zero-shift batch norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
