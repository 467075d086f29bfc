"""Optimisers and learning-rate schedules; a schedule is a pure function of progress."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from kdkit.errors import KdkitError


def build_optimizer(
    params: Iterable[nn.Parameter],
    kind: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``params``."""
    makers: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, nesterov=nesterov),
        "adam": lambda p: torch.optim.Adam(p, lr=lr, weight_decay=weight_decay),
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay),
    }
    if kind not in makers:
        raise KdkitError(f"unknown optimizer '{kind}'; use sgd, adam or adamw")
    return makers[kind](list(params))


def lr_at(
    progress: float,
    base_lr: float,
    schedule: str,
    *,
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup: float = 0.0,
) -> float:
    """Learning rate at ``progress`` in [0, 1] (fraction of all steps done).

    ``cosine`` anneals to 0; ``step`` multiplies by ``gamma`` at each milestone fraction;
    ``constant`` keeps ``base_lr``. ``warmup`` is a fraction of training with linear warm-up.
    """
    if warmup > 0 and progress < warmup:
        return base_lr * (progress + 1e-8) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        p = (progress - warmup) / max(1e-8, 1 - warmup)
        return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, max(0.0, p))))
    if schedule == "step":
        return base_lr * gamma ** sum(progress >= m for m in milestones)
    raise KdkitError(f"unknown schedule '{schedule}'; use cosine, step or constant")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
