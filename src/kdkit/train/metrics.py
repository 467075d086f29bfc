"""Evaluation and model statistics: accuracy, parameter count, size on disk, latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.tasks import is_dense, psnr_sum


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Any, y: Tensor | None = None, batch_size: int = 1024, *,
    distributed: bool = False
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on in-memory (x, y), or on a
    dataset of ``(x, y)`` items given as ``x`` alone (a streamed split: read through
    DataLoader workers, its ``workers`` many).

    A language model's logits (B, L, V) against labels (B, L) are scored per token: the
    accuracy of next-token prediction and the mean cross-entropy over every real token
    (labels -100 are padding), with ``bpc`` = that cross-entropy in bits (bits per
    character for a character vocabulary, per byte for a byte one).

    A dense task's outputs (B, C, H, W) against float targets of that shape (pixels in
    [0, 1]) are scored per image: ``loss`` the mean squared error per pixel and ``psnr``
    the mean over images of each one's PSNR (:func:`kdkit.tasks.psnr_per_sample`); there
    is no accuracy.

    Batches go to the model's device and are evaluated in float32; the sums stay there
    and are read once. ``distributed``: under DDP each rank evaluates its contiguous share
    and the sums are added over ranks (every rank gets the whole split's figures).
    """
    from kdkit import dist
    from kdkit.train.device import module_device, to_device

    was_training = model.training
    model.eval()
    device = module_device(model)
    lo, hi = 0, len(x)
    if distributed and dist.world_size() > 1:
        lo, hi = dist.shard_bounds(len(x), dist.rank(), dist.world_size())
    dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(3, dtype=dtype, device=device)
    tokens = False
    dense = y is not None and is_dense(y)  # (known on every rank, even one with no rows)
    for xb, yb in _batches(x, y, lo, hi, batch_size):
        xb, yb = to_device(xb, device), to_device(yb, device)
        logits = model(xb).float()
        if is_dense(yb):  # an image-to-image task: squared error and PSNR per image
            dense = True
            sums += torch.stack([(logits - yb).pow(2).mean(tuple(range(1, yb.dim()))).sum(),
                                 psnr_sum(logits, yb),
                                 torch.tensor(float(len(yb)), device=device)]).to(dtype)
            continue
        if logits.dim() > 2:  # tokens: (B, L, V) against (B, L)
            tokens = True
            logits, yb = logits.reshape(-1, logits.shape[-1]), yb.reshape(-1)
        real = yb != -100
        sums += torch.stack([F.cross_entropy(logits, yb, reduction="sum").to(dtype),
                             ((logits.argmax(1) == yb) & real).sum().to(dtype),
                             real.sum().to(dtype)])
    if distributed:
        dist.all_reduce_sum(sums)
    loss_sum, correct, count = sums.tolist()
    model.train(was_training)
    n = max(1.0, count)
    if dense:
        return {"loss": loss_sum / n, "psnr": correct / n}
    out = {"acc": 100.0 * correct / n, "loss": loss_sum / n}
    if tokens:
        out["bpc"] = out["loss"] / math.log(2.0)
    return out


def _batches(x: Any, y: Tensor | None, lo: int, hi: int,
             batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    if y is not None:
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            yield x[i:j], y[i:j]
        return
    from torch.utils.data import DataLoader, Subset

    from kdkit.data.stream import _collate

    yield from DataLoader(Subset(x, range(lo, hi)), batch_size=batch_size, shuffle=False,
                          num_workers=getattr(x, "workers", 0), collate_fn=_collate)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def cpu_latency_ms(
    model: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 50, warmup: int = 10
) -> float:
    """Median CPU latency (ms) of one sample (batch size 1) in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.randn(1, *input_shape)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    model.train(was_training)
    return 1000.0 * statistics.median(times)
