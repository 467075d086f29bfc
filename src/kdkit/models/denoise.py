"""A small encoder–decoder for image-to-image tasks (denoising): kdkit's dense-task model.

The shape of a U-Net (Ronneberger et al., MICCAI 2015) at the size of these datasets: two
downsamplings and two upsamplings, with additive skips from the encoder to the decoder.
Its stages are the children ``layer1`` … ``layer5`` (28², 14², 7², 14², 28² for a 28×28
input), so feature methods find them by name (:mod:`kdkit.distill.features`) like a
ResNet's; ``head`` is a 1×1 convolution to the output channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models._common import check_geometry, init_kaiming
from kdkit.models._registry import MODELS


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def _block(cin: int, cout: int, *, down: bool = False, up: bool = False) -> nn.Sequential:
    """Two conv3x3-BN-ReLU; ``down``: a 2×2 max-pool first; ``up``: ×2 nearest first."""
    first: list[nn.Module] = []
    if down:
        first.append(nn.MaxPool2d(2))
    if up:
        first.append(nn.Upsample(scale_factor=2, mode="nearest"))
    return nn.Sequential(*first, *_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


class Denoiser(nn.Module):
    """Encoder–decoder with additive skips: ``(B, C, S, S)`` in, ``(B, num_classes, S, S)`` out.

    ``width`` w: channels w, 2w, 4w, 2w, w at the five stages. The output is the clean
    image itself (a linear 1×1 head), read against the target by the task's MSE. ``S``
    must be divisible by 4 (two poolings there and back).
    """

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        w = width
        self.layer1 = _block(in_channels, w)
        self.layer2 = _block(w, 2 * w, down=True)
        self.layer3 = _block(2 * w, 4 * w, down=True)
        self.layer4 = _block(4 * w, 2 * w, up=True)
        self.layer5 = _block(2 * w, w, up=True)
        self.head = nn.Conv2d(w, num_classes, 1)
        init_kaiming(self)
        # A linear head at Kaiming's scale would start from images of std ≈ √(2w): begin
        # from a flat output instead, and let the first steps find the scale of the pixels.
        nn.init.normal_(self.head.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.layer1(x)
        e2 = self.layer2(e1)
        d2 = self.layer4(self.layer3(e2)) + e2  # skips add: the stage outputs stay taps
        d1 = self.layer5(d2) + e1
        return self.head(d1)


def _build(name: str, width: int, num_classes: int, in_channels: int,
           input_size: int) -> Denoiser:
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise KdkitError(f"model '{name}': width must be a positive integer, got {width!r}")
    check_geometry(name, num_classes, in_channels, input_size, minimum=4)
    if input_size % 4:
        raise KdkitError(f"model '{name}' pools twice and upsamples back, so input_size must "
                         f"be divisible by 4, got {input_size}; resize the inputs (data: "
                         "resize) to a multiple of 4")
    return Denoiser(num_classes, in_channels, width)


@MODELS.register("denoiser")
def denoiser(num_classes: int = 1, in_channels: int = 1, input_size: int = 28,
             width: int = 16) -> nn.Module:
    """Encoder–decoder for a dense task (``task: denoise``): stages of width w, 2w, 4w, 2w, w
    with additive skips, a 1×1 head to ``num_classes`` output channels (for a dense task the
    data fills it with the target's channels).

    Input ``(B, in_channels, S, S)`` with S divisible by 4, output ``(B, num_classes, S, S)``.
    """
    return _build("denoiser", width, num_classes, in_channels, input_size)


def _sized(width: int, summary: str) -> Callable[..., nn.Module]:
    name = f"denoiser{width}"

    def factory(num_classes: int = 1, in_channels: int = 1, input_size: int = 28) -> nn.Module:
        return _build(name, width, num_classes, in_channels, input_size)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{summary}.\n\nSee ``denoiser``; output ``(B, num_classes, S, S)``.\n"
    return factory


# Parameter counts at 1x28x28 (checked by tests/test_dense.py).
MODELS.register("denoiser_teacher", summary="encoder-decoder, width 32 (0.43M params at "
                "1x28x28): the dense task's teacher")(
    _sized(32, "Encoder–decoder of width 32: the dense task's teacher"))
MODELS.register("denoiser_student", summary="encoder-decoder, width 12 (60K params at "
                "1x28x28; 7x smaller than the teacher)")(
    _sized(12, "Encoder–decoder of width 12: the dense task's student"))
