"""Distillation from several teachers at once (METHODS.md §2).

* Averaged soft targets — Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a
  Neural Network", arXiv:1503.02531: the student matches the ensemble's mean softened
  distribution ``p̄ = (1/M) Σ_m softmax(z_m / T)``. Variants here: geometric mean
  (softmax of the mean logits), fixed weights, and per-sample confidence weights.
* Teacher switching and "multiple streams" — Fukuda, Suzuki, Kurata, Thomas, Cui &
  Ramabhadran (2017), "Efficient Knowledge Distillation from an Ensemble of Teachers",
  Interspeech 2017: each mini-batch is distilled from one teacher chosen at random
  (:class:`RandomTeacherKDLoss`), or every sample appears once per teacher with that
  teacher's soft labels (:class:`MultiStreamKDLoss`).

For every loss here ``teacher`` is a sequence of logits tensors, one per teacher, in a
fixed order, each (B, C) like the student's. Randomness uses torch's global RNG, which the
training loop reseeds at every step, so runs stay resumable.

Precision: float32. Under autocast (``precision: bf16|fp16``) the Term that calls these
losses casts half-precision inputs to float32 and turns autocast off first
(:meth:`kdkit.distill.term.Term.compute`), so every softmax, log-softmax, KL divergence,
norm and distance here is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.kd import kd_loss

ENSEMBLE_MODES = ("mean", "geometric", "weighted", "confidence")


def as_teacher_list(teacher: object, loss: str) -> list[Tensor]:
    """Check that ``teacher`` is a non-empty list/tuple of tensors and return it as a list."""
    if isinstance(teacher, Tensor) or not isinstance(teacher, (list, tuple)):
        raise KdkitError(
            f"{loss} takes one tensor per teacher as a list, got {type(teacher).__name__}; "
            "give the term several teachers (or use the single-teacher loss)"
        )
    if not teacher:
        raise KdkitError(f"{loss} got an empty list of teachers")
    for m, t in enumerate(teacher):
        if not isinstance(t, Tensor):
            raise KdkitError(f"{loss}: teacher {m} is a {type(t).__name__}, not a tensor")
    return list(teacher)


def _check_logits(student: Tensor | None, teachers: list[Tensor], loss: str) -> None:
    ref = teachers[0].shape if student is None else student.shape
    for m, t in enumerate(teachers):
        if t.dim() != 2 or t.shape != ref:
            who = "teacher 0" if student is None else "the student's"
            raise KdkitError(
                f"{loss}: teacher {m} logits have shape {tuple(t.shape)}, {who} "
                f"{tuple(ref)}; all must be (B, C) with the same batch and number of classes"
            )


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise KdkitError(f"temperature must be > 0, got {temperature}")


def _check_weights(weights: Sequence[float] | None, n_teachers: int) -> list[float]:
    if weights is None:
        raise KdkitError("ensemble mode 'weighted' needs weights, one per teacher")
    w = [float(x) for x in weights]
    if len(w) != n_teachers:
        raise KdkitError(
            f"got {len(w)} ensemble weights for {n_teachers} teachers; give one per teacher"
        )
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise KdkitError(f"ensemble weights must be finite, >= 0 and not all 0, got {w}")
    return w


def ensemble_log_targets(
    teachers: Sequence[Tensor],
    temperature: float,
    mode: str = "mean",
    weights: Sequence[float] | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Log of :func:`ensemble_targets`, computed in log space (no log of a 0 probability).

    With a single teacher every mode returns exactly ``log_softmax(z / T)``.
    """
    ts = as_teacher_list(teachers, "ensemble_targets")
    _check_logits(None, ts, "ensemble_targets")
    _check_temperature(temperature)
    if mode not in ENSEMBLE_MODES:
        raise KdkitError(
            f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}"
        )
    if mode == "geometric":
        mean_logits = torch.stack(ts).mean(0)
        return F.log_softmax(mean_logits / temperature, dim=-1)

    log_p = torch.stack([F.log_softmax(t / temperature, dim=-1) for t in ts])  # (M, B, C)
    n = len(ts)
    if mode == "mean":
        return torch.logsumexp(log_p, dim=0) - math.log(n)
    if mode == "weighted":
        w = torch.tensor(_check_weights(weights, n), dtype=log_p.dtype, device=log_p.device)
        log_w = torch.log(w / w.sum())  # (M,); a weight of 0 gives -inf: that teacher drops out
        return torch.logsumexp(log_p + log_w[:, None, None], dim=0)
    # confidence: per-sample weights ∝ softmax over teachers of −CE(y, softmax(z_m)), T = 1.
    if target is None:
        raise KdkitError(
            "ensemble mode 'confidence' weights teachers by their CE on the labels; pass target"
        )
    batch = ts[0].shape[0]
    if target.shape != (batch,):
        raise KdkitError(
            f"target must have shape ({batch},) (class indices), got {tuple(target.shape)}"
        )
    ce = torch.stack([F.cross_entropy(t, target, reduction="none") for t in ts])  # (M, B)
    log_w = F.log_softmax(-ce, dim=0)
    return torch.logsumexp(log_p + log_w[:, :, None], dim=0)


def ensemble_targets(
    teachers: Sequence[Tensor],
    temperature: float,
    mode: str = "mean",
    weights: Sequence[float] | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Soft targets p̄ (B, C) of an ensemble of M teachers; each row sums to 1.

    Args:
        teachers: M logits tensors, each (B, C).
        temperature: T > 0.
        mode: ``"mean"``: (1/M) Σ_m softmax(z_m/T) (Hinton 2015);
            ``"geometric"``: softmax((1/M) Σ_m z_m / T);
            ``"weighted"``: Σ_m w_m softmax(z_m/T), ``weights`` (M values >= 0) normalised
            to sum 1; ``"confidence"``: Σ_m w_{m,i} softmax(z_m/T) with per-sample weights
            w_{·,i} = softmax_m(−CE(y_i, softmax(z_m,i))) (CE at T = 1; needs ``target``).
        weights: only for ``"weighted"``.
        target: class indices (B,), only for ``"confidence"``.
    """
    return ensemble_log_targets(teachers, temperature, mode, weights, target).exp()


class EnsembleKDLoss(nn.Module):
    """KD against the ensemble's soft targets: ``T² · KL(p̄ ‖ softmax(z_s/T))``.

    KL summed over classes, mean over the batch, as :func:`kdkit.losses.kd.kd_loss`; with a
    single teacher it equals ``kd_loss`` exactly, whatever the mode. ``student`` (B, C),
    ``teacher`` a list of M tensors (B, C); ``target`` (B,) only for mode ``"confidence"``.
    """

    def __init__(
        self, temperature: float = 4.0, mode: str = "mean", weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if mode not in ENSEMBLE_MODES:
            raise KdkitError(
                f"unknown ensemble mode {mode!r}; choose one of {', '.join(ENSEMBLE_MODES)}"
            )
        if mode == "weighted":
            _check_weights(weights, len(weights) if weights is not None else 0)
        elif weights is not None:
            raise KdkitError(f"ensemble weights are only used with mode 'weighted', not {mode!r}")
        self.temperature = temperature
        self.mode = mode
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(
        self, student: Tensor, teacher: Sequence[Tensor], *, target: Tensor | None = None
    ) -> Tensor:
        ts = as_teacher_list(teacher, "EnsembleKDLoss")
        _check_logits(student, ts, "EnsembleKDLoss")
        log_pbar = ensemble_log_targets(ts, self.temperature, self.mode, self.weights, target)
        log_ps = F.log_softmax(student / self.temperature, dim=-1)
        kl = F.kl_div(log_ps, log_pbar, reduction="batchmean", log_target=True)
        return self.temperature**2 * kl

    def extra_repr(self) -> str:
        extra = f", weights={self.weights}" if self.weights is not None else ""
        return f"temperature={self.temperature}, mode={self.mode!r}{extra}"


class MultiStreamKDLoss(nn.Module):
    """Fukuda et al.'s "multiple streams": ``(1/M) Σ_m kd_loss(z_s, z_m, T)``.

    This equals the KD loss (batchmean over M·B rows) of a batch in which every sample
    appears once per teacher, labelled with that teacher's soft targets — the student's
    output for a sample does not depend on which copy it is — so the streams are
    implemented without copying the data or running the student M times.
    ``student`` (B, C), ``teacher`` a list of M tensors (B, C).
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(
        self, student: Tensor, teacher: Sequence[Tensor], *, target: Tensor | None = None
    ) -> Tensor:
        ts = as_teacher_list(teacher, "MultiStreamKDLoss")
        _check_logits(student, ts, "MultiStreamKDLoss")
        total = kd_loss(student, ts[0], self.temperature)
        for t in ts[1:]:
            total = total + kd_loss(student, t, self.temperature)
        return total / len(ts)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class RandomTeacherKDLoss(nn.Module):
    """Fukuda et al.'s teacher switching: each call distils from one teacher drawn uniformly.

    The index comes from ``torch.randint(M, ())`` on torch's global RNG (reseeded by the
    training loop every step, so a resumed run draws the same teachers). Returns
    ``kd_loss(z_s, z_m, T)`` for the drawn m. ``student`` (B, C), ``teacher`` a list of M
    tensors (B, C). All teachers are still run by the caller; only one is used.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(
        self, student: Tensor, teacher: Sequence[Tensor], *, target: Tensor | None = None
    ) -> Tensor:
        ts = as_teacher_list(teacher, "RandomTeacherKDLoss")
        _check_logits(student, ts, "RandomTeacherKDLoss")
        m = int(torch.randint(len(ts), ()).item())
        return kd_loss(student, ts[m], self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
