"""Curriculum temperature (CTKD) of Li et al., AAAI 2023, "Curriculum Temperature for
Knowledge Distillation", arXiv:2211.16231 (official code: github.com/zhengli97/CTKD).

The distillation temperature is learnt *adversarially*: a temperature module (one global
parameter, or a small MLP of each sample's teacher and student logits) is trained with the
student's optimiser through a gradient-reversal layer (GRL: identity forward, −λ·grad
backward), so it *maximises* the distillation loss the student minimises. The temperature
is ``T = 1 + 20·sigmoid(θ)`` (the official ``t_start + t_end·sigmoid``), so T ∈ [1, 21].
The reversal strength λ follows the paper's cosine curriculum over the first E epochs
(official ``CosineDecay(0, −1, E)`` read at the 1-based epoch number e):

    λ(e) = (1 − cos(π·min(e, E)/E)) / 2,    E = 10

The base losses take the temperature as a tensor, one T per sample (B, 1) or one for the
batch (1, 1): KD ``mean_i T_i²·KL(p_t^{T_i} ‖ p_s^{T_i})`` (Hinton's, per sample) and DKD
``mean_i T_i²·(α·TCKD_i + β·NCKD_i)`` (Zhao et al. 2022). With a constant T they equal
:func:`kdkit.losses.kd.kd_loss` and :class:`kdkit.losses.logit.DKDLoss`.

The instance MLP reads the logits *detached*: the student is trained by the distillation
loss only, never through the temperature's (reversed) path. Its initial temperature, as the
global one's, is 1 + 20·sigmoid(1) ≈ 15.6 (the official ``Global_T`` starts at θ = 1).

Precision: float32 (the Term casts half-precision inputs and turns autocast off).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.kd import check_same_logits

T_MIN, T_RANGE = 1.0, 20.0  # T = T_MIN + T_RANGE·sigmoid(θ): the official t_start, t_end


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.lam, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """Gradient-reversal layer (Ganin & Lempitsky 2015): ``x`` forward, ``−lam·grad`` back."""
    return _GradReverse.apply(x, lam)


def cosine_curriculum(epoch: int, epochs: int) -> float:
    """λ at 0-based ``epoch``: (1 − cos(π·min(epoch + 1, E)/E))/2, E = ``epochs`` (the
    official schedule, which numbers epochs from 1): rises from ≈0 to 1 at epoch E − 1."""
    if epochs <= 0:
        return 1.0
    e = min(max(epoch + 1, 0), epochs)
    return (1.0 - math.cos(math.pi * e / epochs)) / 2.0


class LearnableTemperature(nn.Module):
    """T = 1 + 20·sigmoid(GRL_λ(θ)): ``mode="global"``: θ one parameter (shape (1, 1));
    ``"instance"``: θ = MLP([z_t, z_s]) per sample, (B, 1), from the detached logits.

    Args:
        num_classes: C, the logits' width (the instance MLP reads 2C numbers).
        hidden: the instance MLP's hidden width.
    """

    def __init__(self, mode: str = "global", num_classes: int | None = None,
                 hidden: int = 256) -> None:
        super().__init__()
        if mode not in ("global", "instance"):
            raise KdkitError(f"ctkd: mode must be 'global' or 'instance', got {mode!r}")
        self.mode = mode
        if mode == "global":
            self.theta = nn.Parameter(torch.ones(1, 1))
        else:
            if not num_classes:
                raise KdkitError("ctkd: the instance temperature needs the number of classes")
            out = nn.Linear(hidden, 1)
            with torch.no_grad():  # start where the global temperature starts (θ = 1)
                out.weight.mul_(0.01)
                out.bias.fill_(1.0)
            self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), out)

    def forward(self, student: Tensor, teacher: Tensor, lam: float) -> Tensor:
        """The temperature, (B, 1) in instance mode, (1, 1) in global mode."""
        if self.mode == "global":
            theta = self.theta
        else:
            theta = self.mlp(torch.cat([teacher.detach(), student.detach()], dim=1).float())
        return T_MIN + T_RANGE * torch.sigmoid(grad_reverse(theta, lam))


def kd_loss_t(student: Tensor, teacher: Tensor, temperature: Tensor,
              target: Tensor | None = None) -> Tensor:
    """Hinton's T²·KL(p_t^T ‖ p_s^T) with a temperature tensor (B, 1) or (1, 1): per-sample
    T_i²·KL_i, mean over the batch."""
    t = temperature.reshape(-1, 1)
    check_same_logits(student, teacher)
    log_ps = F.log_softmax(student / t, dim=-1)
    log_pt = F.log_softmax(teacher / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (t.reshape(-1) ** 2 * kl).mean()


def dkd_loss_t(alpha: float, beta: float) -> Callable[[Tensor, Tensor, Tensor, Tensor | None],
                                                      Tensor]:
    """DKD's α·TCKD + β·NCKD with a temperature tensor: per-sample T_i²·(α·TCKD_i +
    β·NCKD_i) at T_i, mean over the batch (TCKD/NCKD of :func:`kdkit.losses.logit.dkd_parts`
    on logits divided by T_i, at T = 1)."""
    from kdkit.losses.logit import _check_target, dkd_parts

    def loss(student: Tensor, teacher: Tensor, temperature: Tensor,
             target: Tensor | None = None) -> Tensor:
        target = _check_target(target, student, "DKD")
        t = temperature.reshape(-1, 1)
        tckd, nckd = dkd_parts(student / t, teacher / t, target, 1.0)
        return (t.reshape(-1) ** 2 * (alpha * tckd + beta * nckd)).mean()

    return loss


class CTKDLoss(nn.Module):
    """A logit loss at a learnt, adversarial temperature (Li et al. 2023).

    ``forward(student_logits, teacher_logits, *, target)``: ``base(s, t, T, target)`` with
    T from ``temperature`` (:class:`LearnableTemperature`) behind a GRL of strength λ.
    λ comes from :meth:`begin_step` (training progress; the distiller calls it before each
    step): ``cosine_curriculum(epoch, curriculum_epochs)`` with epoch = ⌊progress·epochs⌋;
    ``epochs=None`` (the run's length unknown): λ = 1 throughout.
    ``logit_standardization``: each sample's logits standardized first, teacher and
    student separately (Sun et al., CVPR 2024), as the temperature module's input too.

    Reports ``temperature`` (the batch's mean T) through :meth:`metrics`, which the
    distiller adds to its output as ``<term>/temperature`` (and the loop to metrics.jsonl).
    """

    metric_names = ("temperature",)

    def __init__(self, base: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
                 temperature: LearnableTemperature, *, curriculum_epochs: int = 10,
                 epochs: int | None = None, logit_standardization: bool = False) -> None:
        super().__init__()
        if curriculum_epochs < 0:
            raise KdkitError(f"ctkd: curriculum_epochs must be >= 0, got {curriculum_epochs}")
        self.base = base
        self.temperature = temperature
        self.curriculum_epochs = curriculum_epochs
        self.epochs = epochs
        self.logit_standardization = logit_standardization
        self.lam = self.lambda_at(0.0)
        self._last: Tensor | None = None

    def lambda_at(self, progress: float) -> float:
        if self.epochs is None:
            return 1.0
        epoch = int(progress * self.epochs + 1e-9)
        return cosine_curriculum(epoch, self.curriculum_epochs)

    def begin_step(self, step: Any) -> None:
        self.lam = self.lambda_at(step.progress)

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        if self.logit_standardization:
            from kdkit.losses.logit import standardize_logits

            student, teacher = standardize_logits(student), standardize_logits(teacher)
        t = self.temperature(student, teacher, self.lam)
        self._last = t.detach().mean()
        return self.base(student, teacher, t, target)

    def metrics(self) -> dict[str, Tensor]:
        if self._last is None:
            raise KdkitError("ctkd: no temperature yet (metrics() before a forward)")
        return {"temperature": self._last}

    def extra_repr(self) -> str:
        return (f"curriculum_epochs={self.curriculum_epochs}, epochs={self.epochs}, "
                f"logit_standardization={self.logit_standardization}")
