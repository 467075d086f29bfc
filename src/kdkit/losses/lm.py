"""Token-level distillation objectives for language models (METHODS.md §9).

Per position, p = the teacher's next-token distribution and q = the student's, both at
temperature T: p = softmax(z_t / T), q = softmax(z_s / T). Every loss here is a
divergence D(p, q) per token, averaged over the *real* tokens only, times T²:

    L = T² · Σ_{real tokens} D(p, q) / #real tokens

The T² factor is Hinton KD's (Hinton, Vinyals & Dean 2015, arXiv:1503.02531): it keeps the
gradient's magnitude independent of T; at T = 1 nothing changes. Every objective here,
total variation included, carries it, so changing T never rescales one against another.

- Forward KL KL(p ‖ q) (mode-covering; Hinton KD per token): :func:`forward_kl`.
- Reverse KL KL(q ‖ p) (mode-seeking; MiniLLM, Gu et al., ICLR 2024): :func:`reverse_kl`.
- Generalised JSD (GKD, Agarwal et al., ICLR 2024, "On-Policy Distillation of Language
  Models"): m = βp + (1 − β)q, JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m):
  :func:`generalized_jsd`.
- Total variation ½Σ|p − q| (Wen et al., ACL 2023, "f-Divergence Minimization for
  Sequence-Level Knowledge Distillation"): :func:`total_variation`.
- Skew KL (DistiLLM, Ko et al., ICML 2024): SKL_α = KL(p ‖ αp + (1 − α)q) and skew reverse
  SRKL_α = KL(q ‖ αq + (1 − α)p): :func:`skew_kl`.
- Offline top-k teacher (the DistillKit storage format: the teacher's k largest
  log-probabilities and their token ids per position): :func:`topk_kl`.

Shapes: logits (B, L, V) or (N, V); ``target`` (B, L) / (N,) integer token ids whose
value -100 marks padding (the Hugging Face ``ignore_index`` convention), or None when
every position is real. Padded positions may hold any *finite* logits: they change
neither the value nor the gradient. A batch with no real token gives 0 (and a zero
gradient), never NaN, and needs no read of the device.

Precision: float32 at least (half-precision inputs are cast; float64 stays float64), with
log-softmax and log-space mixtures (``torch.logaddexp``), so no log(0) is ever taken. The
teacher is detached: gradients reach the student only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError

IGNORE_INDEX = -100
"""The ``target`` value that marks a padded position (Hugging Face's ``ignore_index``)."""

_TAILS = ("uniform", "renormalize")


# ------------------------------------------------------------------------------ helpers


def token_mask(target: Tensor | None, shape: Sequence[int], *,
               device: torch.device | str | None = None) -> Tensor:
    """Which positions of logits of ``shape`` ((B, L, V) or (N, V)) are real tokens.

    Returns a bool tensor of shape ``shape[:-1]``: ``target != -100``, or all True when
    ``target`` is None (on ``device``, else on the target's device).
    """
    shape = tuple(shape)
    if len(shape) not in (2, 3):
        raise KdkitError(f"token losses take logits (B, L, V) or (N, V); got shape {shape}")
    if target is None:
        return torch.ones(shape[:-1], dtype=torch.bool, device=device)
    if tuple(target.shape) != shape[:-1] or target.is_floating_point() or target.is_complex():
        raise KdkitError(
            f"target must be integer token ids of shape {shape[:-1]} (the logits' {shape} "
            f"without the vocabulary), -100 marking padding; got {tuple(target.shape)} "
            f"{target.dtype}"
        )
    return target.to(device) != IGNORE_INDEX if device is not None else target != IGNORE_INDEX


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_token`` over the positions where ``mask`` is True; 0 when none is."""
    kept = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype,
                                                    device=per_token.device))
    return kept.sum() / mask.sum().clamp_min(1).to(per_token.dtype)


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise KdkitError(f"temperature must be a finite number > 0, got {temperature!r}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _log_probs(student: Tensor, teacher: Tensor, target: Tensor | None, temperature: float,
               what: str) -> tuple[Tensor, Tensor, Tensor]:
    """(log p, log q, mask): the teacher's and the student's log-softmax at T, in float32
    (or float64), the teacher detached; shapes checked with one clear error."""
    _check_temperature(temperature)
    if student.dim() not in (2, 3) or student.shape != teacher.shape:
        raise KdkitError(
            f"{what} compares token logits (B, L, V) or (N, V) of one shape; got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)} (do the models "
            "share a vocabulary?)"
        )
    mask = token_mask(target, student.shape, device=student.device)
    dtype = _compute_dtype(student, teacher)
    log_q = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    return log_p, log_q, mask


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per position (summed over the last dim), from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(weight: float, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(w·a + (1 − w)·b), in log space (w in [0, 1])."""
    if weight <= 0.0:
        return log_b
    if weight >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


# ------------------------------------------------------------------ full-vocabulary losses


def forward_kl(student: Tensor, teacher: Tensor, target: Tensor | None = None, *,
               temperature: float = 1.0) -> Tensor:
    """T² · mean over real tokens of KL(p ‖ q) (mode-covering; Hinton KD per token).

    Args:
        student, teacher: logits (B, L, V) or (N, V). target: (B, L) / (N,) ids, -100 =
        padding, or None.
    Returns: scalar.
    """
    log_p, log_q, mask = _log_probs(student, teacher, target, temperature, "forward KL")
    return temperature**2 * _masked_mean(_kl(log_p, log_q), mask)


def reverse_kl(student: Tensor, teacher: Tensor, target: Tensor | None = None, *,
               temperature: float = 1.0) -> Tensor:
    """T² · mean over real tokens of KL(q ‖ p) (mode-seeking; MiniLLM, Gu et al. 2024).

    Shapes as :func:`forward_kl`.
    """
    log_p, log_q, mask = _log_probs(student, teacher, target, temperature, "reverse KL")
    return temperature**2 * _masked_mean(_kl(log_q, log_p), mask)


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise KdkitError(
            f"JSD beta must be in (0, 1), got {beta!r}; JSD_beta is identically 0 at beta = "
            "0 and 1 (for TRL's beta=0 / beta=1, its limits after dividing by beta or "
            "1 - beta, use TokenKL(direction='forward') / TokenKL(direction='reverse'))"
        )


def generalized_jsd(student: Tensor, teacher: Tensor, target: Tensor | None = None, *,
                    beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """T² · mean over real tokens of JSD_β(p, q) (GKD, Agarwal et al., ICLR 2024).

    m = βp + (1 − β)q,  JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m); symmetric at β = 0.5.
    β must lie in the open interval (0, 1): at β = 0 or 1 the formula is identically 0
    (m equals q or p), so those are refused rather than silently training on nothing;
    JSD_β/β → KL(p ‖ q) as β → 0 and JSD_β/(1 − β) → KL(q ‖ p) as β → 1 (the
    meaning Hugging Face TRL's GKDTrainer gives β = 0 and 1): use :func:`forward_kl` /
    :func:`reverse_kl` for those. Shapes as :func:`forward_kl`.
    """
    _check_beta(beta)
    log_p, log_q, mask = _log_probs(student, teacher, target, temperature, "JSD")
    log_m = _log_mix(beta, log_p, log_q)
    per_token = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return temperature**2 * _masked_mean(per_token, mask)


def total_variation(student: Tensor, teacher: Tensor, target: Tensor | None = None, *,
                    temperature: float = 1.0) -> Tensor:
    """T² · mean over real tokens of ½Σ|p − q| (Wen et al., ACL 2023). In [0, T²].

    Shapes as :func:`forward_kl`.
    """
    log_p, log_q, mask = _log_probs(student, teacher, target, temperature, "total variation")
    per_token = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return temperature**2 * _masked_mean(per_token, mask)


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha < 1.0):
        raise KdkitError(
            f"skew KL alpha must be in [0, 1), got {alpha!r} (alpha = 0 is the plain KL; at "
            "alpha = 1 the divergence is identically 0)"
        )


def skew_kl(student: Tensor, teacher: Tensor, target: Tensor | None = None, *,
            alpha: float = 0.1, reverse: bool = False, temperature: float = 1.0) -> Tensor:
    """T² · mean over real tokens of the skew KL of DistiLLM (Ko et al., ICML 2024).

    ``reverse=False``: SKL_α = KL(p ‖ αp + (1 − α)q); ``reverse=True``: SRKL_α =
    KL(q ‖ αq + (1 − α)p). α in [0, 1); α = 0 gives the forward (reverse) KL. The mixture
    contains the student, and the gradient flows through it too (as in DistiLLM).
    Shapes as :func:`forward_kl`.
    """
    _check_alpha(alpha)
    what = "skew reverse KL" if reverse else "skew KL"
    log_p, log_q, mask = _log_probs(student, teacher, target, temperature, what)
    if reverse:
        per_token = _kl(log_q, _log_mix(alpha, log_q, log_p))
    else:
        per_token = _kl(log_p, _log_mix(alpha, log_p, log_q))
    return temperature**2 * _masked_mean(per_token, mask)


# ------------------------------------------------------------------ offline top-k teacher


def teacher_topk(teacher_logits: Tensor, k: int, *,
                 dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(top-k log-probabilities, their token ids), each (..., k): what an offline teacher
    stores per position (log-softmax over the full vocabulary at T = 1, then the k
    largest). ``dtype`` (e.g. ``torch.float16``) is the storage precision of the values."""
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise KdkitError(f"top-k needs 1 <= k <= vocabulary size {teacher_logits.shape[-1]}, "
                         f"got k = {k}")
    log_p = F.log_softmax(teacher_logits.detach().to(_compute_dtype(teacher_logits)), dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    return (values.to(dtype) if dtype is not None else values), ids


def pack_topk(logprobs: Tensor, ids: Tensor) -> Tensor:
    """A top-k teacher as one tensor (..., 2k): the k log-probabilities, then the k token
    ids as floats (exact below 2^24): what a teacher-output cache returns for a language
    model's logits at ``topk: k``. :func:`unpack_topk` inverts it."""
    return torch.cat([logprobs.float(), ids.float()], dim=-1)


def unpack_topk(packed: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(log-probabilities, ids) of a :func:`pack_topk` tensor."""
    return packed[..., :k], packed[..., k:].round().long()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x <= 0, stable at both ends (Mächler 2012); -inf at x = 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def topk_kl(student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor,
            target: Tensor | None = None, *, tail: str = "uniform", temperature: float = 1.0,
            num_classes: int | None = None) -> Tensor:
    """T² · mean over real tokens of KL(p̃ ‖ q), the teacher known by its top-k only.

    Args:
        student_logits: (B, L, V') or (N, V'), V' >= V.
        topk_logprobs: (B, L, k) / (N, k), the teacher's log-softmax over the full
            vocabulary at T = 1 at its k most likely tokens (float16 storage is fine).
        topk_ids: (B, L, k) / (N, k) integer token ids in [0, V), distinct per position.
        target: (B, L) / (N,) ids, -100 = padding (whose top-k entries may hold anything),
            or None.
        tail: how the teacher's missing mass r = 1 − Σ_topk p is modelled:
            ``"uniform"``: spread evenly over the other V − k tokens (p̃_j = r/(V − k)),
            and the KL is taken over the whole vocabulary against q = softmax(z_s/T).
            ``"renormalize"``: p̃ = the top-k probabilities renormalised to sum 1, and the
            sum runs over the k tokens only, Σ_topk p̃_i (log p̃_i − log q_i), with q the
            student's softmax over the *full* vocabulary (not renormalised over the top-k:
            DistillKit's convention, which reproduces METHODS.md §9). It is >= 0 and is 0
            only when the student puts exactly p̃ on the top-k and nothing elsewhere.
        temperature: the stored values are at T = 1, so T re-tempers the *modelled*
            teacher: p̃^T ∝ p̃^(1/T) (i.e. its log-probs divided by T, renormalised), while
            q = softmax(z_s / T); the loss carries T². For ``"renormalize"`` this is exactly
            softmax(z_t / T) renormalised over the top-k; for ``"uniform"`` it tempers the
            top-k + uniform-tail model (the true tail at T is not stored). With k = V both
            equal :func:`forward_kl` at any T.
        num_classes: the vocabulary size V; default the student's last dim. Student logits
            beyond it (a vocabulary padded to a multiple of 64) are ignored.
    Returns: scalar.

    Stored values that sum to slightly more than 1 (float16 rounding) are renormalised
    (the tail is then empty).
    """
    _check_temperature(temperature)
    if tail not in _TAILS:
        raise KdkitError(f"unknown top-k tail {tail!r}; choose 'uniform' or 'renormalize'")
    if student_logits.dim() not in (2, 3):
        raise KdkitError("top-k KL takes student logits (B, L, V) or (N, V); got shape "
                         f"{tuple(student_logits.shape)}")
    lead = tuple(student_logits.shape[:-1])
    if (topk_logprobs.shape != topk_ids.shape or tuple(topk_ids.shape[:-1]) != lead
            or topk_ids.dim() != student_logits.dim()):
        raise KdkitError(
            f"top-k teacher log-probs {tuple(topk_logprobs.shape)} and ids "
            f"{tuple(topk_ids.shape)} must both be {lead + ('k',)} for student logits "
            f"{tuple(student_logits.shape)}"
        )
    if not topk_logprobs.is_floating_point() or topk_ids.is_floating_point():
        raise KdkitError(f"top-k teacher: log-probs must be floating point and ids integers; "
                         f"got {topk_logprobs.dtype} and {topk_ids.dtype}")
    width = student_logits.shape[-1]
    vocab = width if num_classes is None else num_classes
    k = topk_ids.shape[-1]
    if not (isinstance(vocab, int) and 1 <= k <= vocab <= width):
        raise KdkitError(f"top-k KL needs 1 <= k ({k}) <= num_classes ({vocab!r}) <= the "
                         f"student's vocabulary dim ({width})")
    mask = token_mask(target, student_logits.shape, device=student_logits.device)
    ids = torch.where(mask[..., None], topk_ids, torch.zeros_like(topk_ids))  # padding: any
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):  # one read of the device
        lo, hi = int(ids.min()), int(ids.max())
        raise KdkitError(f"top-k token ids must be in [0, {vocab}) (the vocabulary); got ids "
                         f"from {lo} to {hi}: do the teacher and student share a tokenizer?")
    dtype = _compute_dtype(student_logits, topk_logprobs)
    logits = student_logits[..., :vocab] if vocab < width else student_logits
    log_q = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_q_k = log_q.gather(-1, ids.long())

    stored = topk_logprobs.detach().to(dtype)
    stored = torch.where(mask[..., None], stored, torch.zeros_like(stored))
    a = stored / temperature  # the tempered, unnormalised top-k log-probs
    if tail == "renormalize" or k == vocab:
        log_p_k = a - torch.logsumexp(a, dim=-1, keepdim=True)
        p_k = log_p_k.exp()
        per_token = (torch.xlogy(p_k, p_k) - p_k * log_q_k).sum(-1)
    else:
        n = vocab - k
        log_n = math.log(n)
        log_rest = _log1mexp(torch.logsumexp(stored, dim=-1))  # log r, -inf when r = 0
        b = (log_rest - log_n) / temperature  # each tail token, tempered, unnormalised
        lse = torch.logsumexp(torch.cat([a, (b + log_n)[..., None]], dim=-1), dim=-1)
        log_p_k = a - lse[..., None]
        p_k = log_p_k.exp()
        rest = (b + log_n - lse).exp()  # the tail's total mass at T
        # Σ_tail (rest/n)(log(rest/n) − log q_j), with Σ_tail log q_j = Σ_all − Σ_topk
        sum_log_q_tail = log_q.sum(-1) - log_q_k.sum(-1)
        tail_part = torch.xlogy(rest, rest) - rest * log_n - rest / n * sum_log_q_tail
        per_token = (torch.xlogy(p_k, p_k) - p_k * log_q_k).sum(-1) + tail_part
    return temperature**2 * _masked_mean(per_token, mask)


# ------------------------------------------------------------------------------ modules


class _TokenLoss(nn.Module):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)


class TokenKL(_TokenLoss):
    """Token-level KL: ``direction="forward"`` KL(p ‖ q) (:func:`forward_kl`) or
    ``"reverse"`` KL(q ‖ p) (:func:`reverse_kl`), T² · mean over real tokens.

    ``forward(student (B, L, V), teacher (B, L, V), *, target (B, L) or None) -> scalar``.
    """

    def __init__(self, direction: str = "forward", temperature: float = 1.0) -> None:
        super().__init__(temperature)
        if direction not in ("forward", "reverse"):
            raise KdkitError(f"unknown KL direction {direction!r}; choose 'forward' or 'reverse'")
        self.direction = direction

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        fn = forward_kl if self.direction == "forward" else reverse_kl
        return fn(student, teacher, target, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, temperature={self.temperature}"


class TokenJSD(_TokenLoss):
    """Generalised JSD_β of GKD (:func:`generalized_jsd`), β in (0, 1).

    ``forward(student (B, L, V), teacher (B, L, V), *, target (B, L) or None) -> scalar``.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        _check_beta(beta)
        self.beta = float(beta)

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return generalized_jsd(student, teacher, target, beta=self.beta,
                               temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}"


class TokenTV(_TokenLoss):
    """Total variation ½Σ|p − q| per token (:func:`total_variation`).

    ``forward(student (B, L, V), teacher (B, L, V), *, target (B, L) or None) -> scalar``.
    """

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return total_variation(student, teacher, target, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SkewKL(_TokenLoss):
    """DistiLLM's skew KL (``reverse=False``) or skew reverse KL (``reverse=True``),
    α in [0, 1) (:func:`skew_kl`).

    ``forward(student (B, L, V), teacher (B, L, V), *, target (B, L) or None) -> scalar``.
    """

    def __init__(self, alpha: float = 0.1, reverse: bool = False,
                 temperature: float = 1.0) -> None:
        super().__init__(temperature)
        _check_alpha(alpha)
        self.alpha = float(alpha)
        self.reverse = bool(reverse)

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        return skew_kl(student, teacher, target, alpha=self.alpha, reverse=self.reverse,
                       temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reverse={self.reverse}, temperature={self.temperature}"


class TopKKL(_TokenLoss):
    """KL from an offline teacher stored as its top-k (:func:`topk_kl`).

    ``forward(student (B, L, V), teacher, *, target (B, L) or None) -> scalar`` where
    ``teacher`` is the pair ``(topk_logprobs (B, L, k), topk_ids (B, L, k))``, e.g. from
    :func:`teacher_topk`.
    """

    def __init__(self, tail: str = "uniform", temperature: float = 1.0,
                 num_classes: int | None = None) -> None:
        super().__init__(temperature)
        if tail not in _TAILS:
            raise KdkitError(f"unknown top-k tail {tail!r}; choose 'uniform' or 'renormalize'")
        if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
            raise KdkitError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.tail = tail
        self.num_classes = num_classes

    def forward(self, student: Tensor, teacher: Sequence[Tensor], *,
                target: Tensor | None = None) -> Tensor:
        if isinstance(teacher, Tensor) or len(teacher) != 2:
            raise KdkitError("TopKKL's teacher is the pair (topk_logprobs, topk_ids), each "
                             "(B, L, k); got "
                             + (f"a tensor {tuple(teacher.shape)}" if isinstance(teacher, Tensor)
                                else f"{len(teacher)} items"))
        logprobs, ids = teacher
        return topk_kl(student, logprobs, ids, target, tail=self.tail,
                       temperature=self.temperature, num_classes=self.num_classes)

    def extra_repr(self) -> str:
        return (f"tail={self.tail!r}, temperature={self.temperature}, "
                f"num_classes={self.num_classes}")
