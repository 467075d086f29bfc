"""Distilling language models (METHODS.md §9): token-level divergences, the offline top-k
teacher and on-policy distillation, as Terms like any other.

A language model maps token ids (B, L) to next-token logits (B, L, V); the labels are the
next tokens (B, L), -100 marking padding. ``lm_kd`` is

    ce_weight · CE(student, next tokens) + kd_weight · D(teacher ‖ student)

with D one of ``fkl`` (forward KL, Hinton KD per token), ``rkl`` (reverse KL, MiniLLM),
``jsd`` (generalised JSD_β, GKD), ``tvd`` (total variation), ``skl`` / ``srkl`` (skew KL and
skew reverse KL of DistiLLM, α), at ``temperature`` (T² scaling). Options:

- ``topk: k`` distils from the teacher's top-k log-probabilities and token ids per
  position only (``tail: uniform`` spreads the missing mass evenly over the other tokens;
  ``renormalize`` renormalises over the k): what an offline teacher cache of
  ``teacher_cache: {topk: k}`` stores for a language model. With a live teacher the top-k
  are taken from its logits, so live and cached give the same loss.
- ``on_policy: λ`` (GKD, Agarwal et al. 2024): in a fraction λ of the steps (drawn from
  the step's seed) the batch's windows are cut after ``prompt`` of their length and
  continued by the student's own samples (at ``sample_temperature``, no gradient through
  the sampling); the divergence is then taken on the continuation's positions, with
  teacher and student both reading the sampled text. The other steps use the data. CE
  stays on the data. The fraction of on-policy steps per epoch is logged as
  ``train/<term>/on_policy``.

``lm_features`` distils intermediate layers (TinyBERT's hidden states through a learnt
projection, MiniLM's KL of attention maps) per pair of decoder blocks, paired evenly
along the depths; see :func:`lm_features`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdkit.distill.methods import MethodContext, register_method
from kdkit.distill.sampling import sample, step_generator
from kdkit.distill.term import StepInfo, Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy
from kdkit.losses.lm import (
    IGNORE_INDEX,
    SkewKL,
    TokenJSD,
    TokenKL,
    TokenTV,
    TopKKL,
    pack_topk,
    teacher_topk,
    unpack_topk,
)
from kdkit.losses.lm_features import AttentionKL, HiddenMSE
from kdkit.taps import LOGITS, Tap, resolve_module, run_with_taps

Divergence = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")


def divergence_loss(divergence: str, *, temperature: float, beta: float, alpha: float
                    ) -> nn.Module:
    """The loss module of one named divergence."""
    if divergence == "fkl":
        return TokenKL("forward", temperature)
    if divergence == "rkl":
        return TokenKL("reverse", temperature)
    if divergence == "jsd":
        return TokenJSD(beta, temperature)
    if divergence == "tvd":
        return TokenTV(temperature)
    if divergence in ("skl", "srkl"):
        return SkewKL(alpha, reverse=divergence == "srkl", temperature=temperature)
    raise KdkitError(f"lm_kd: unknown divergence '{divergence}'; choose one of "
                     f"{', '.join(DIVERGENCES)}")


class TopKTeacher(nn.Module):
    """Forward KL against the teacher's top-k only. The teacher arrives as full logits
    (B, L, V) from a live teacher (its top-k taken here), or packed (B, L, 2k) from a
    teacher-output cache built with ``topk: k`` (the k log-probabilities, then the k ids
    as floats)."""

    def __init__(self, k: int, tail: str, temperature: float) -> None:
        super().__init__()
        if k < 1:
            raise KdkitError(f"lm_kd: topk must be >= 1, got {k}")
        self.k = k
        self.inner = TopKKL(tail, temperature)

    def forward(self, student: Tensor, teacher: Any, *, target: Tensor | None = None) -> Tensor:
        v = student.shape[-1]
        if isinstance(teacher, tuple):
            logprobs, ids = teacher
        elif teacher.shape[-1] == v:
            logprobs, ids = teacher_topk(teacher, self.k)
        elif teacher.shape[-1] == 2 * self.k:
            logprobs, ids = unpack_topk(teacher, self.k)
        else:
            raise KdkitError(
                f"lm_kd topk={self.k}: the teacher gives {tuple(teacher.shape)}, neither logits "
                f"over the student's {v} tokens nor a top-{self.k} cache entry "
                f"(last dimension {2 * self.k}); build the cache with topk: {self.k}")
        return self.inner(student, (logprobs, ids), target=target)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def cached_topk(logits: Tensor, k: int) -> Tensor:
    """What a teacher-output cache with ``topk: k`` holds for a language model's logits
    (B, L, V): its top-k log-probabilities and ids, packed (B, L, 2k)."""
    return pack_topk(*teacher_topk(logits, k))


class OnPolicy(nn.Module):
    """A divergence taken, in a fraction ``lam`` of the steps, on the student's own
    continuations of the batch's prompts (GKD); otherwise on the data. Makes the second
    view of each batch (``views = 2``: it receives [data view, second view] of each side
    and reads the second)."""

    views = 2
    metric_names = ("on_policy",)

    def __init__(self, inner: nn.Module, lam: float, prompt: float,
                 temperature: float) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise KdkitError(f"lm_kd: on_policy (λ) must be in [0, 1], got {lam}")
        if not 0.0 < prompt < 1.0:
            raise KdkitError(f"lm_kd: prompt (the fraction of each window kept as the prompt) "
                             f"must be in (0, 1), got {prompt}")
        if temperature < 0:
            raise KdkitError(f"lm_kd: sample_temperature must be >= 0, got {temperature}")
        self.inner, self.lam, self.prompt, self.temperature = inner, lam, prompt, temperature
        self._cut: int | None = None  # this step's prompt length (None: the data)

    def second_view(self, x: Tensor, info: StepInfo) -> Tensor:
        if x.dim() != 2 or x.dtype != torch.long:
            raise KdkitError("lm_kd on_policy: the inputs must be token ids (B, L); "
                             f"got {tuple(x.shape)} {x.dtype}")
        g = step_generator(info.seed)
        draw = float(torch.rand((), generator=g))
        if draw >= self.lam or info.student is None:
            self._cut = None
            return x
        length = x.shape[1]
        cut = max(1, min(length - 1, round(self.prompt * length)))
        self._cut = cut
        return sample(info.student, x[:, :cut], length - cut, temperature=self.temperature,
                      context=length, generator=g)

    def forward(self, student: Any, teacher: Any, *, target: Tensor | None = None) -> Tensor:
        s, t = student[1], teacher[1]
        if self._cut is not None:  # the continuation's positions (those predicting samples)
            mask = torch.zeros(s.shape[:2], dtype=torch.long, device=s.device)
            mask[:, : self._cut - 1] = IGNORE_INDEX
            target = mask
        return self.inner(s, t, target=target)

    def metrics(self) -> dict[str, Tensor]:
        """1 when this step was on-policy, else 0: the loop's epoch mean is the fraction."""
        return {"on_policy": torch.tensor(0.0 if self._cut is None else 1.0)}

    def extra_repr(self) -> str:
        return f"lam={self.lam}, prompt={self.prompt}, temperature={self.temperature}"


def _lm_checks(ctx: MethodContext, method: str, ce_weight: float, kd_weight: float) -> str:
    """One teacher, weights >= 0, token inputs; returns the teacher's name."""
    if len(ctx.teachers) != 1:
        raise KdkitError(f"{method} distils from one teacher, got {len(ctx.teachers)}")
    if ce_weight < 0 or kd_weight < 0:
        raise KdkitError(f"{method}: ce_weight and kd_weight must be >= 0, got {ce_weight}, "
                         f"{kd_weight}")
    x = ctx.example_input
    if x is not None and (x.dim() != 2 or x.is_floating_point()):
        raise KdkitError(f"{method} distils language models: its inputs are token ids (B, L), "
                         f"but this data gives {tuple(x.shape)} {x.dtype} (use kd for images)")
    return next(iter(ctx.teachers))


@register_method("lm_kd", teachers="one", tokens=True, summary=(
    "Token-level KD for language models (METHODS.md §9): CE + a divergence per token — fkl, "
    "rkl (MiniLLM), jsd (GKD), tvd, skl/srkl (DistiLLM); top-k teacher; on-policy (GKD)."))
def lm_kd(ctx: MethodContext, *, divergence: Divergence = "fkl", temperature: float = 1.0,
          beta: float = 0.5, alpha: float = 0.1, ce_weight: float = 0.0,
          kd_weight: float = 1.0, topk: int | None = None,
          tail: Literal["uniform", "renormalize"] = "uniform", on_policy: float = 0.0,
          prompt: float = 0.5, sample_temperature: float = 1.0) -> list[Term]:
    """CE (``ce_weight``) + ``kd_weight`` · the ``divergence`` of the teacher's and the
    student's next-token distributions, averaged over real tokens. See the module."""
    name = _lm_checks(ctx, "lm_kd", ce_weight, kd_weight)
    if topk is not None:
        if divergence != "fkl":
            raise KdkitError(f"lm_kd: topk distils the forward KL against the teacher's top-k "
                             f"(divergence: fkl), not '{divergence}'")
        loss: nn.Module = TopKTeacher(topk, tail, temperature)
    else:
        loss = divergence_loss(divergence, temperature=temperature, beta=beta, alpha=alpha)
    if on_policy > 0:
        loss = OnPolicy(loss, on_policy, prompt, sample_temperature)
    terms = [Term(divergence if topk is None else f"top{topk}_{tail}", loss, kd_weight,
                  LOGITS, LOGITS, teacher_name=name)]
    if ce_weight > 0:
        terms.insert(0, Term("ce", CrossEntropy(), ce_weight))
    return terms


class SequenceKD(nn.Module):
    """Sequence-level KD (Kim & Rush 2016): cross-entropy of the student on text the
    teacher wrote. Each step the batch's windows are cut after ``prompt`` of their length
    and the teacher continues them (sampling at ``temperature``, with the step's seed, so a
    resumed run draws the same text); the student learns to predict the continuation. Makes
    the second view (``views = 2``) and reads it."""

    views = 2

    def __init__(self, teacher_name: str, prompt: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 < prompt < 1.0:
            raise KdkitError(f"seqkd: prompt (the fraction of each window kept as the prompt) "
                             f"must be in (0, 1), got {prompt}")
        if temperature < 0:
            raise KdkitError(f"seqkd: sample_temperature must be >= 0, got {temperature}")
        self.teacher_name, self.prompt, self.temperature = teacher_name, prompt, temperature
        self._text: Tensor | None = None
        self._cut = 1

    def second_view(self, x: Tensor, info: StepInfo) -> Tensor:
        if x.dim() != 2 or x.dtype != torch.long:
            raise KdkitError(f"seqkd: the inputs must be token ids (B, L); got "
                             f"{tuple(x.shape)} {x.dtype}")
        teachers = info.teachers or {}
        if self.teacher_name not in teachers:
            raise KdkitError(f"seqkd: teacher '{self.teacher_name}' is not given")
        length = x.shape[1]
        self._cut = max(1, min(length - 1, round(self.prompt * length)))
        self._text = sample(teachers[self.teacher_name], x[:, : self._cut], length - self._cut,
                            temperature=self.temperature, context=length,
                            generator=step_generator(info.seed))
        return self._text

    def forward(self, student: Any, teacher: Any, *, target: Tensor | None = None) -> Tensor:
        s = student[1]
        if self._text is None:
            raise KdkitError("seqkd: no teacher text for this step (second_view not called)")
        cut = self._cut
        logits = s[:, cut - 1 : -1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self._text[:, cut:].reshape(-1))

    def extra_repr(self) -> str:
        return f"prompt={self.prompt}, temperature={self.temperature}"


@register_method("seqkd", teachers="one", tokens=True, summary=(
    "Sequence-level KD (Kim & Rush 2016): the student's CE on continuations the teacher "
    "samples from each window's prompt (+ CE on the data with ce_weight)."))
def seqkd(ctx: MethodContext, *, prompt: float = 0.5, sample_temperature: float = 1.0,
          ce_weight: float = 0.0, kd_weight: float = 1.0) -> list[Term]:
    """CE on teacher-written continuations (weight ``kd_weight``), + CE on the data."""
    name = _lm_checks(ctx, "seqkd", ce_weight, kd_weight)
    terms = [Term("seqkd", SequenceKD(name, prompt, sample_temperature),
                  kd_weight)]
    if ce_weight > 0:
        terms.insert(0, Term("ce", CrossEntropy(), ce_weight))
    return terms


# --------------------------------------------------------------------------- lm_features


def decoder_blocks(model: nn.Module) -> list[str]:
    """The module paths of a language model's decoder blocks, in order (empty: none found).

    kdkit's ``gpt``: its ``blocks`` (``blocks.0`` ...). Any other model (``hf:`` GPT-2's
    ``transformer.h.K``, Llama's ``model.layers.K``): the largest ``nn.ModuleList`` whose
    children are all of one class (the first such list on a tie).
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0 and len(
            {type(b) for b in blocks}) == 1:
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        return [f"{prefix}.{i}" for i in range(len(blocks))]
    best: tuple[str, int] | None = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
                and (best is None or len(m) > best[1])):
            best = (name, len(m))
    if best is None:
        return []
    return [f"{best[0]}.{i}" if best[0] else str(i) for i in range(best[1])]


def uniform_pairing(n: int, m: int) -> list[int]:
    """TinyBERT's "uniform" layer mapping: block i of n (0-based) reads block
    round((i + 1) · m / n) − 1 of m (halves rounded up, at least 0), so the last block
    of one side meets the last of the other and the rest are spread evenly along the
    depth (2 of 4: blocks 1, 3; 4 of 12: 2, 5, 8, 11)."""
    return [max(0, (2 * (i + 1) * m + n) // (2 * n) - 1) for i in range(n)]


def _attention_map(model: nn.Module, block: str, side: str) -> str:
    """The path of the attention-map tap point inside ``block`` (a ``probs`` child: the
    zoo's gpt and every ``hf:`` attention module have one)."""
    from kdkit.models.gpt import AttentionProbs

    for name, m in resolve_module(model, block).named_modules():
        if isinstance(m, AttentionProbs):
            return f"{block}.{name}" if name else block
    raise KdkitError(
        f"lm_features: the {side}'s '{block}' holds no attention map to tap (an attention "
        "module's 'probs' child, as in kdkit's gpt and hf: models); name decoder blocks in "
        f"{side}_layers, or set attention_weight: 0")


def _pair_layers(ctx: MethodContext, teacher: nn.Module, student_layers: list[str] | None,
                 teacher_layers: list[str] | None) -> list[tuple[str, str]]:
    """(student block, teacher block) pairs: as given, or the missing side's blocks
    spread evenly along its depth (:func:`uniform_pairing`)."""
    for side, layers in (("student", student_layers), ("teacher", teacher_layers)):
        if layers is not None and not layers:
            raise KdkitError(f"lm_features: {side}_layers is empty; name at least one block "
                             f"(e.g. ['blocks.0']) or leave it out to pair the blocks evenly")
    if student_layers is not None and teacher_layers is not None:
        if len(student_layers) != len(teacher_layers):
            raise KdkitError(
                f"lm_features: student_layers {student_layers} and teacher_layers "
                f"{teacher_layers} pair blocks one to one, so give both the same length (or "
                "give one of them: the other side's blocks are then spread along its depth)")
        return list(zip(student_layers, teacher_layers, strict=True))

    def found(model: nn.Module, side: str) -> list[str]:
        blocks = decoder_blocks(model)
        if not blocks:
            raise KdkitError(
                f"lm_features: no decoder blocks found in the {side} "
                f"({type(model).__name__}: no 'blocks' and no nn.ModuleList of identical "
                f"blocks); name them with {side}_layers (e.g. ['blocks.0', 'blocks.1']); "
                "`kdkit models --layers NAME` lists a model's modules")
        return blocks

    if student_layers is None:
        student_layers = found(ctx.student, "student")
        if teacher_layers is not None:
            student_layers = [student_layers[j] for j in
                              uniform_pairing(len(teacher_layers), len(student_layers))]
    if teacher_layers is None:
        blocks = found(teacher, "teacher")
        teacher_layers = [blocks[j] for j in uniform_pairing(len(student_layers), len(blocks))]
    return list(zip(student_layers, teacher_layers, strict=True))


def _probe_hidden(model: nn.Module, paths: list[str], x: Tensor) -> dict[str, tuple[int, ...]]:
    """The output shape of each path for one forward of ``x`` (eval, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feats = run_with_taps(model, x, {p: Tap(p) for p in paths})
    finally:
        model.train(was_training)
    return {p: tuple(v.shape) for p, v in feats.items()}


@register_method("lm_features", teachers="one", tokens=True, summary=(
    "Hidden-state (TinyBERT, with a learnt projection where widths differ) and attention-"
    "map (MiniLM's KL) distillation for language models, per paired block; + CE (+ a token "
    "divergence as in lm_kd)."))
def lm_features(ctx: MethodContext, *, hidden_weight: float = 1.0,
                attention_weight: float = 0.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                divergence: Divergence = "fkl", temperature: float = 1.0, beta: float = 0.5,
                alpha: float = 0.1, student_layers: list[str] | None = None,
                teacher_layers: list[str] | None = None) -> list[Term]:
    """Intermediate-layer distillation of language models, as Terms.

    ``ce_weight`` · CE(student, next tokens) + ``kd_weight`` · D(teacher ‖ student) (the
    ``divergence`` at ``temperature`` of :func:`lm_kd`; 0: off) + for each of the n pairs of
    (student block, teacher block):

    - ``hidden_weight``/n · MSE(W·h_s, h_t) (terms ``hidden1`` ... ``hiddenN``): the blocks'
      hidden states (B, L, D), the student's through a learnt ``nn.Linear(D_s, D_t)``
      projection W (the term's adapter, trained with the student; none when D_s = D_t),
      averaged over positions and features (TinyBERT, Jiao et al. 2020);
    - ``attention_weight``/n · KL(teacher ‖ student) of the blocks' attention maps
      (B, heads, L, L) per query row, over the causal triangle, averaged over heads and
      positions (terms ``attn1`` ...; MiniLM, Wang et al. 2020). Where the head counts
      differ, both sides are averaged over their heads first.

    Pairs: ``student_layers`` with ``teacher_layers`` (block paths, one to one); by default
    all the student's decoder blocks (a gpt's ``blocks``; an hf: model's largest
    ModuleList of identical blocks) with the teacher's blocks spread evenly along its
    depth, TinyBERT's "uniform" mapping (:func:`uniform_pairing`; given one side only, the
    other side's blocks are spread the same way). Padding (label -100) is left out.
    """
    name = _lm_checks(ctx, "lm_features", ce_weight, kd_weight)
    if hidden_weight < 0 or attention_weight < 0:
        raise KdkitError(f"lm_features: hidden_weight and attention_weight must be >= 0, got "
                         f"{hidden_weight}, {attention_weight}")
    if hidden_weight == 0 and attention_weight == 0 and kd_weight == 0:
        raise KdkitError("lm_features: hidden_weight, attention_weight and kd_weight are all "
                         "0, so nothing is distilled; set hidden_weight > 0 (hidden states), "
                         "attention_weight > 0 (attention maps) or use ce for plain training")
    teacher = ctx.teachers[name]
    terms: list[Term] = []
    if ce_weight > 0:
        terms.append(Term("ce", CrossEntropy(), ce_weight))
    if kd_weight > 0:
        terms.append(Term(divergence, divergence_loss(
            divergence, temperature=temperature, beta=beta, alpha=alpha), kd_weight, LOGITS,
            LOGITS, teacher_name=name))
    if hidden_weight == 0 and attention_weight == 0:
        return terms
    pairs = _pair_layers(ctx, teacher, student_layers, teacher_layers)
    n = len(pairs)
    if hidden_weight > 0:
        x = ctx.example_input
        if x is None:
            raise KdkitError("lm_features: the hidden-state terms need the widths of both "
                             "models' blocks; pass example_input (a batch of token ids) to "
                             "build_method")
        s_shapes = _probe_hidden(ctx.student, [s for s, _ in pairs], x)
        t_shapes = _probe_hidden(teacher, [t for _, t in pairs], x)
        for i, (s_path, t_path) in enumerate(pairs, start=1):
            s_shape, t_shape = s_shapes[s_path], t_shapes[t_path]
            if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[:2] != t_shape[:2]:
                raise KdkitError(
                    f"lm_features: the student's '{s_path}' gives {s_shape} and the "
                    f"teacher's '{t_path}' gives {t_shape}; hidden states must be (B, L, D) "
                    "with the same batch and sequence length on both sides: pair decoder "
                    "blocks (student_layers / teacher_layers) of models that read the same "
                    "token ids")
            adapter = None if s_shape[2] == t_shape[2] else nn.Linear(s_shape[2], t_shape[2])
            terms.append(Term(f"hidden{i}", HiddenMSE(), hidden_weight / n, Tap(s_path),
                              Tap(t_path), teacher_name=name, adapter=adapter))
    if attention_weight > 0:
        for i, (s_path, t_path) in enumerate(pairs, start=1):
            terms.append(Term(f"attn{i}", AttentionKL(), attention_weight / n,
                              Tap(_attention_map(ctx.student, s_path, "student")),
                              Tap(_attention_map(teacher, t_path, "teacher")),
                              teacher_name=name))
    return terms
