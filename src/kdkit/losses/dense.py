"""Losses of a dense (image-to-image) task: the task's MSE and matching the teacher's output.

Both are means of squares over every element (batch, channels, pixels), in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PixelMSE(nn.Module):
    """The task loss of a dense task: ``mean((ŷ − y)²)`` of the output against the clean
    target (pixels in [0, 1]); ignores the teacher."""

    def forward(self, student: Tensor, teacher: Tensor | None = None, *,
                target: Tensor | None = None) -> Tensor:
        if target is None:
            raise ValueError("PixelMSE needs the target images")
        if student.shape != target.shape:
            raise ValueError(f"the output {tuple(student.shape)} and the target "
                             f"{tuple(target.shape)} differ in shape")
        return F.mse_loss(student.float(), target.float())


class OutputMSE(nn.Module):
    """Output matching: ``mean((ŷ_s − ŷ_t)²)``, the student's output against the teacher's
    (no gradient to the teacher)."""

    def forward(self, student: Tensor, teacher: Tensor, *,
                target: Tensor | None = None) -> Tensor:
        return F.mse_loss(student.float(), teacher.detach().float())
