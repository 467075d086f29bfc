"""What a model is trained to do, as the data says it: its metric, and how a result reads.

The task follows from the data (docs/DESIGN.md, "Tasks"), never from a switch in the loop:

* ``classify``: images (B, C, H, W) → logits (B, C); integer labels (B,); top-1 accuracy.
* ``language_model``: token ids (B, L) → logits (B, L, V); next tokens (B, L); bits per
  character (``bpc``) and token accuracy.
* ``denoise`` (a dense task): noisy images (B, C, H, W) → images (B, C, H, W); the clean
  images as float targets with pixels in [0, 1]; mean squared error and PSNR (dB, peak 1).

Float targets are what marks a dense task (:func:`is_dense`); the loss is a Term
(``mse``/``dense_kd``) and the evaluator scores PSNR (:func:`psnr_sum`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

TASKS = ("classify", "language_model", "denoise")
DENSE_TASKS = ("denoise",)
# PSNR of an image predicted exactly is infinite: per-image MSEs are floored here
# (1e-10 → 100 dB), so a mean over images stays finite.
MSE_FLOOR = 1e-10


def is_dense(y: Tensor) -> bool:
    """Targets of a dense task are float images; class labels and tokens are integers."""
    return bool(y.is_floating_point())


def psnr_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR (dB) of each prediction against its target, with pixels in [0, 1] (peak 1):
    ``10·log10(1 / MSE_i)``, the prediction clipped to [0, 1] first (as an image shown or
    saved would be). Shapes (B, ...); returns (B,) in float32."""
    pred = pred.detach().float().clamp(0.0, 1.0)
    mse = (pred - target.float()).pow(2).reshape(len(pred), -1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(MSE_FLOOR))


def psnr_sum(pred: Tensor, target: Tensor) -> Tensor:
    """Summed per-image PSNR of a batch (the loop's and evaluator's running sums)."""
    return psnr_per_sample(pred, target).sum()


def plain_method(task: str | None) -> str:
    """The method that trains a model on the task's own targets (a teacher, a baseline)."""
    return "mse" if task in DENSE_TASKS else "ce"


def metric_of(summary: dict[str, Any]) -> tuple[str, str]:
    """A run summary's headline metric: (key, unit), e.g. ("test_acc", "%")."""
    if summary.get("test_psnr") is not None:
        return "test_psnr", " dB"
    if summary.get("test_bpc") is not None:
        return "test_bpc", " bpc"
    return "test_acc", "%"


def headline(summary: dict[str, Any]) -> str:
    """``test 95.77%, val 95.10%`` / ``test 27.31 dB, val 27.20 dB`` / ``test 2.59 bpc``."""
    key, unit = metric_of(summary)
    val_key = key.replace("test_", "val_")
    text = f"test {summary[key]:.2f}{unit}"
    if summary.get(val_key) is not None:
        text += f", val {summary[val_key]:.2f}{unit}"
    return text
