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


def check_rate(model: str, arg: str, p: object) -> None:
    """Raise :class:`KdkitError` unless ``p`` is a number in [0, 1) (a dropout rate)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise KdkitError(f"model '{model}': {arg} must be a number in [0, 1), got {p!r:.60}")


# Deepest nets built: ResNet-1202 (He et al. 2016) and WRN-1001 (He et al. 2016b); a depth
# far beyond these would take minutes (or forever) just to construct its modules.
MAX_DEPTH = 2000


def check_depth(model: str, depth: object, rule: str, ok: bool) -> None:
    """Raise :class:`KdkitError` unless ``depth`` is an int that satisfies ``ok`` (``rule``
    says which) and is at most :data:`MAX_DEPTH`."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not ok:
        raise KdkitError(f"model '{model}': depth must be {rule}, got {depth!r}")
    if depth > MAX_DEPTH:
        raise KdkitError(f"model '{model}': depth {depth} is beyond the {MAX_DEPTH} layers "
                         "kdkit builds (the deepest CIFAR ResNet has 1202)")


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
