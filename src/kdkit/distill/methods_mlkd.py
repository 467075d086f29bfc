"""MLKD (METHODS.md §8): multi-level logit distillation on a weak and a strong view of each
batch (Jin et al., CVPR 2023; the math and where it follows the official code are in
:mod:`kdkit.losses.mlkd`).

The loader's batch is the weak view (the run's own augmentation). The strong view is made
from that batch tensor inside the step: the MLKD loss carries a :class:`StrongView`, and the
distiller, seeing a loss with ``second_view``, runs the student and the teachers (no grad, in
the teacher's mode) on it as well and hands every ``views = 2`` loss both views' logits. The
view is a pure function of the step's seed and the samples' indices, so a resumed run sees
the same strong views; it is drawn afresh every step, so the teacher-output cache cannot
serve it and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdkit.data.augment import Augment, build_augment
from kdkit.data.views import hash_uniforms
from kdkit.distill.methods import MethodContext, register_method
from kdkit.distill.term import StepInfo, Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.mlkd import MLKD_TEMPERATURES, BothViews, MLKDLoss
from kdkit.taps import LOGITS

# The strong view's default: an Inception-style crop of 20-100 % of the (weak) image, resized
# back, and a flip. (The official CIFAR recipe's strong view is RandAugment(2, 10) + Cutout on
# PIL images; ``strong_augment: {torchvision: [[RandAugment, {...}]]}`` runs such a pipeline
# on image tensors a torchvision transform accepts.)
DEFAULT_STRONG_AUGMENT: dict[str, Any] = {"resized_crop": {"scale": [0.2, 1.0]}, "hflip": True}


def _check_images(x: Tensor, where: str) -> None:
    if x.dim() != 4:
        raise KdkitError(f"mlkd distils on a strong augmentation of each image; {where} is "
                         f"{tuple(x.shape)}, not an image batch (N, C, H, W): mlkd works on "
                         "images only")


class StrongView:
    """MLKD's strong view of a batch: ``augment`` applied to the (weak) batch tensor, on its
    device. With the step's seed and the samples' indices (the training loop passes both),
    sample j's draws are a hash of (seed, index[j]): the view depends on the step and the
    sample only, not on the batch's order or how it is sharded across processes. With a
    seed alone the whole batch draws from a generator seeded with it; without a seed (a bare
    ``distiller(x, y)``), from torch's global generator."""

    def __init__(self, augment: Augment) -> None:
        self.augment = augment

    def __call__(self, x: Tensor, step: StepInfo) -> Tensor:
        _check_images(x, "the batch")
        if step.seed is not None and step.index is not None:
            index = step.index.detach().to("cpu", torch.int64).reshape(-1)
            if index.shape[0] != x.shape[0]:
                raise KdkitError(f"mlkd: {index.shape[0]} sample indices for a batch of "
                                 f"{x.shape[0]}")
            u = hash_uniforms(step.seed, index, torch.zeros_like(index), self.augment.n_draws)
            return self.augment.apply(x, u)
        if step.seed is not None:
            return self.augment(x, torch.Generator().manual_seed(step.seed))
        return self.augment(x, torch.default_generator)

    def __repr__(self) -> str:
        return f"StrongView({self.augment!r})"


@register_method("mlkd", teachers="one", teacher_cache=False,
                 summary="MLKD (Jin et al., CVPR 2023, multi-level logit distillation): "
                         "0.1·CE on a weak and a strong view + 0.9·Σ_T instance, batch (B×B) "
                         "and class (C×C) alignment, T in 2..6, teacher-confidence masking; "
                         "images only, no teacher cache.")
def mlkd(ctx: MethodContext, *, temperatures: tuple[float, ...] = MLKD_TEMPERATURES,
         ce_weight: float = 0.1, kd_weight: float = 0.9,
         strong_augment: dict[str, Any] | None = None,
         logit_standardization: bool = False) -> list[Term]:
    """Multi-level logit distillation (Jin et al. 2023), the official recipe's objective:
    ``ce_weight``·(CE_weak + CE_strong) + ``kd_weight``·Σ_T (instance + batch + class
    levels) (:mod:`kdkit.losses.mlkd`: the levels, the confidence masks, and where the
    official code and the paper differ).

    The weak view is the loader's batch; the strong view is ``strong_augment`` (a kdkit
    augmentation spec, as ``train.augment``; default ``{resized_crop: {scale: [0.2, 1.0]},
    hflip: true}``) of it, drawn per step from the step's seed (:class:`StrongView`). The
    student and the teacher run on both views (each view its own forward, as the official
    code; the teacher under no_grad, in its mode). Images only; the teacher-output cache is
    refused (the strong view changes every step). ``logit_standardization``: the instance
    terms on standardized logits (Sun et al., CVPR 2024, as their MLKD code).
    """
    for key, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not value >= 0:
            raise KdkitError(f"mlkd: {key} must be >= 0, got {value}")
    if ctx.example_input is not None:
        _check_images(ctx.example_input, "the example input")
    spec = DEFAULT_STRONG_AUGMENT if strong_augment is None else strong_augment
    augment = build_augment(spec)
    if augment is None:
        raise KdkitError(f"mlkd: strong_augment {spec!r} augments nothing; give an augmentation "
                         f"(default {DEFAULT_STRONG_AUGMENT})")
    loss = MLKDLoss(temperatures, logit_standardization=logit_standardization,
                    view=StrongView(augment))
    return [
        Term("ce", BothViews(CrossEntropy()), ce_weight),
        Term("mlkd", loss, kd_weight, LOGITS, LOGITS, teacher_name=next(iter(ctx.teachers))),
    ]
