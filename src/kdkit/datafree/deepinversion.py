"""DeepInversion (Yin et al., CVPR 2020): inputs from a teacher's BatchNorm statistics.

For a batch of wanted labels y, the inputs x̂ minimise

    ce·CE(T(x̂), y) + tv·TV(x̂) + l2·‖x̂‖₂ + bn·Σ_l (‖μ_l(x̂) − μ_l^BN‖₂ + ‖σ²_l(x̂) − σ²_l^BN‖₂)
    [+ competition·(1 − JS(p_t, p_s))   (Adaptive DeepInversion, with a given student)]

where μ_l, σ²_l are the per-channel batch statistics of the input of the l-th BN layer
and μ^BN, σ²^BN its running statistics. No metadata is needed beyond the teacher. The
optimiser is :func:`kdkit.datafree.synthesis.optimise_inputs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.datafree.synthesis import BatchLoss
from kdkit.errors import KdkitError
from kdkit.losses.datafree import bn_statistics_loss, competition_loss, l2_prior, total_variation
from kdkit.train.device import module_device

DI_BETAS = (0.5, 0.9)  # Adam betas of the DeepInversion reference implementation


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BN layers with running statistics, in registration order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


class DeepInversionObjective:
    """Per-batch DeepInversion loss for ``teacher`` (held in eval mode, frozen).

    Args:
        ce_weight, bn_weight, tv_weight, l2_weight: the weights of the terms above.
        competition_weight: Adaptive DeepInversion's term; needs ``student``.
        student: the current student (frozen here, and moved to the teacher's device) for
            the competition term.

    The loss is computed on the teacher's device (:attr:`device`); labels and inputs given
    on another device are moved there.

    Raises:
        KdkitError: the teacher has no BN layer while ``bn_weight > 0`` (set it to 0 for
        the priors-only variant), or the competition term has no student.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        ce_weight: float = 1.0,
        bn_weight: float = 10.0,
        tv_weight: float = 1e-3,
        l2_weight: float = 1e-4,
        competition_weight: float = 0.0,
        student: nn.Module | None = None,
    ) -> None:
        for name, w in (("ce_weight", ce_weight), ("bn_weight", bn_weight),
                        ("tv_weight", tv_weight), ("l2_weight", l2_weight),
                        ("competition_weight", competition_weight)):
            if w < 0:
                raise KdkitError(f"deepinversion: {name} must be >= 0, got {w}")
        self.bns = batchnorm_layers(teacher)
        if bn_weight > 0 and not self.bns:
            raise KdkitError(
                "deepinversion: the teacher has no BatchNorm layer with running statistics, "
                "so the feature-statistics term is undefined; use a teacher with BN, or set "
                "bn_weight=0 for the priors-only variant (CE + TV + L2)"
            )
        if competition_weight > 0 and student is None:
            raise KdkitError("deepinversion: competition_weight > 0 (Adaptive DeepInversion) "
                             "needs a student (--student RUN)")
        self.teacher = teacher.eval().requires_grad_(False)
        if student is not None:
            student = student.to(module_device(teacher)).eval().requires_grad_(False)
        self.student = student
        self.w = {"ce": ce_weight, "bn": bn_weight, "tv": tv_weight, "l2": l2_weight,
                  "competition": competition_weight}

    def terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Each unweighted term on inputs ``x`` (B, C, H, W) for labels ``y`` (B,)."""
        x, y = x.to(self.device), y.to(self.device)
        inputs: dict[str, list[Tensor]] = {name: [] for name, _ in self.bns}
        handles = [m.register_forward_pre_hook(
            lambda _m, a, name=name: inputs[name].append(a[0])) for name, m in self.bns]
        try:
            logits = self.teacher(x)
        finally:
            for h in handles:
                h.remove()
        out = {"ce": F.cross_entropy(logits, y), "tv": total_variation(x), "l2": l2_prior(x)}
        out["bn"] = x.new_zeros(())
        for name, bn in self.bns:  # each BN layer with its own input, whatever the call order
            assert bn.running_mean is not None and bn.running_var is not None
            if len(inputs[name]) != 1:
                raise KdkitError(
                    f"deepinversion: BN layer '{name}' ran {len(inputs[name])} times in one "
                    "forward pass; its statistics term needs exactly one call (set "
                    "bn_weight=0 for the priors-only variant)"
                )
            out["bn"] = out["bn"] + bn_statistics_loss(inputs[name][0], bn.running_mean,
                                                       bn.running_var)
        if self.student is not None and self.w["competition"] > 0:
            out["competition"] = competition_loss(logits, self.student(x))
        return out

    @property
    def device(self) -> torch.device:
        """Where the loss is computed: the teacher's device."""
        return module_device(self.teacher)

    def __call__(self, y: Tensor, gen: torch.Generator) -> BatchLoss:
        y = y.to(self.device)

        def loss(x: Tensor) -> Tensor:
            terms = self.terms(x, y)
            return sum((self.w[k] * v for k, v in terms.items() if self.w[k] > 0),
                       x.new_zeros(()))

        return loss
