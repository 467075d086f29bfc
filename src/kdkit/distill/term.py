"""A Term: one weighted loss between a student tap and a teacher tap.

Terms are where the "where" lives (which layers, which teacher, which adapter), so that
losses stay pure functions of tensors. A method is a list of Terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.taps import LOGITS, Tap

# A weight may depend on training progress (a float in [0, 1]), e.g. FitNets' λ decaying.
Weight = float | Callable[[float], float]


@dataclass(frozen=True)
class StepInfo:
    """Where training is, for a loss that keeps state across steps (CTKD's curriculum, CRD's
    memory bank). The distiller calls ``loss.begin_step(info)`` before each forward on every
    loss that defines ``begin_step``; other losses never see it.

    Attributes:
        progress: fraction of training done, in [0, 1].
        index: the batch rows' sample indices (B,) in the training set (under
            ``global_batch`` the global batch's), or None when the caller gave none.
        seed: a seed for this step's random draws, the same on every process (None outside
            the training loop).
        student, teachers: the models being trained and distilled from, for a loss whose
            second view is sampled from one of them (on-policy distillation samples the
            student's continuations); None where the caller has none.
    """

    progress: float = 0.0
    index: Tensor | None = None
    seed: int | None = None
    student: nn.Module | None = None
    teachers: Any = None


@dataclass
class Term:
    """One summand of the distillation objective.

    Attributes:
        name: key of the term's value in the distiller's output (e.g. ``"kd"``).
        loss: module with ``forward(student, teacher, *, target) -> scalar`` (unweighted).
        weight: a float, or a function of progress in [0, 1] (explicit, never global state).
        student: where to read the student (default: its logits); a tuple of taps passes a
            list of tensors to the loss (e.g. FSP's pair of layers).
        teacher: where to read the teacher; ``None`` for terms that use only labels (CE).
            A multi-teacher term may give one tap per teacher (different architectures).
        teacher_name: which teacher (by name) when several are attached; a tuple of names
            makes a multi-teacher term whose loss receives a list of tensors, one per
            teacher in that order (ensembles).
        adapter: optional trainable module applied to the student tensor first
            (connector, regressor); it is trained with the student.
        teacher_view: optional fixed module without parameters applied to the teacher
            tensor(s) before the loss (a transformer's tokens read as a map); never trained.
    """

    name: str
    loss: nn.Module
    weight: Weight = 1.0
    student: Tap | tuple[Tap, ...] = LOGITS
    teacher: Tap | tuple[Tap, ...] | None = None
    teacher_name: str | tuple[str, ...] = "teacher"
    adapter: nn.Module | None = None
    teacher_view: nn.Module | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name in ("loss", "logits"):
            raise KdkitError(
                f"term name {self.name!r} must be an identifier other than 'loss'/'logits'"
            )
        if isinstance(self.teacher, tuple) and isinstance(self.teacher_name, tuple) and (
            len(self.teacher) != len(self.teacher_name)
        ):
            raise KdkitError(f"term '{self.name}': give one teacher tap per teacher name")
        if self.teacher_view is not None and any(True for _ in self.teacher_view.parameters()):
            raise KdkitError(f"term '{self.name}': a teacher view is a fixed reshaping and has "
                             "no parameters (the teacher side is never trained)")

    @property
    def teacher_is_list(self) -> bool:
        """The loss receives a list: several teachers, or several taps of one teacher."""
        return isinstance(self.teacher_name, tuple) or isinstance(self.teacher, tuple)

    def student_taps(self) -> tuple[Tap, ...]:
        return self.student if isinstance(self.student, tuple) else (self.student,)

    def teacher_reads(self) -> list[tuple[str, Tap]]:
        """(teacher name, tap) pairs this term reads, in order (empty for label terms)."""
        if self.teacher is None:
            return []
        if isinstance(self.teacher_name, tuple):
            names = self.teacher_name
            taps = self.teacher if isinstance(self.teacher, tuple) else (self.teacher,) * len(names)
        else:
            taps = self.teacher if isinstance(self.teacher, tuple) else (self.teacher,)
            names = (self.teacher_name,) * len(taps)
        return list(zip(names, taps, strict=True))

    def weight_at(self, progress: float) -> float:
        return float(self.weight(progress)) if callable(self.weight) else float(self.weight)

    @property
    def relates_samples(self) -> bool:
        """The loss relates the samples of a batch (RKD, SP, PKT, triplets, ...): under DDP
        it sees the rank's shard unless the distiller gathers the global batch for it."""
        return bool(getattr(self.loss, "relates_samples", False))

    def compute(
        self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor] | None,
        target: Tensor | None, *, gather: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Unweighted value of this term on already-captured tensors.

        The adapter runs under the caller's autocast; the loss itself always computes in
        float32 with autocast off (inputs in half precision are cast first), so every
        softmax, log-softmax, KL divergence and norm of every loss is a float32 one.
        ``gather``: maps a rank's shard to the global batch (student tensors keep their
        gradient), for terms that relate samples under ``global_batch_terms``.
        """
        s = self.adapter(student) if self.adapter is not None else student
        if self.teacher_view is not None and teacher is not None:
            teacher = self.teacher_view(teacher)
        if gather is not None:
            s, teacher = _tree(gather, s), _tree(gather, teacher)
            target = gather(target) if target is not None else None
        device_type = _device_type(s)
        if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.loss(_tree(_fp32, s), _tree(_fp32, teacher), target=target)
        return self.loss(s, teacher, target=target)


_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")  # (autocast cannot be asked about "meta")


def _fp32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16) else t


def _tree(fn: Callable[[Tensor], Tensor], v: Any) -> Any:
    if isinstance(v, Tensor):
        return fn(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_tree(fn, t) for t in v)
    return v


def _device_type(v: Any) -> str | None:
    if isinstance(v, Tensor):
        return v.device.type
    if isinstance(v, (list, tuple)) and v:
        return _device_type(v[0])
    return None
