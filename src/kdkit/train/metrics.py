"""Evaluation and model statistics: accuracy, parameter count, size on disk, latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on in-memory (x, y)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(1, len(x))
    return {"acc": 100.0 * correct / n, "loss": loss_sum / n}


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
