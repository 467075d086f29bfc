"""Method registry: a method is a builder that returns the list of Terms of a paper.

Builders take a :class:`MethodContext` (the student and teachers, for shape-dependent
adapters) and the method's own keyword arguments, whose defaults are the paper's.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from kdkit.distill.term import Term
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy, KDLoss
from kdkit.losses.logit import maybe_standardized
from kdkit.registry import Registry
from kdkit.taps import LOGITS, Tap, penultimate


@dataclass
class MethodContext:
    """What a builder may look at: the models and an example input (never data or files).

    ``example_input`` (a small batch shaped like the data) lets builders size adapters.
    ``epochs``: how many epochs the run trains (None when unknown, e.g. a bare
    ``build_method``), for a schedule given in epochs (a warm-up): a Term's weight is a
    function of progress in [0, 1], and epoch = progress · epochs.
    """

    student: nn.Module
    teachers: Mapping[str, nn.Module] = field(default_factory=dict)
    example_input: Tensor | None = None
    epochs: int | None = None


@dataclass
class Stage:
    """One stage of a staged method (FitNets: hint pre-training, then KD).

    ``epochs``, ``lr`` and ``optimizer`` override the run's settings for this stage
    (None: the run's). The student carries over from stage to stage; each stage has its
    own terms and adapters.
    """

    name: str
    terms: list[Term]
    epochs: int | None = None
    lr: float | None = None
    optimizer: str | None = None


Builder = Callable[..., "list[Term] | list[Stage]"]
Teachers = Literal["none", "one", "many"]
METHODS: Registry[list[Term] | list[Stage]] = Registry("method")
# How many teachers a method reads: none (plain training), exactly one, or one or more.
_TEACHERS: dict[str, Teachers] = {}


# Methods whose teachers cannot be served by the teacher-output cache (MLKD's strong view is
# drawn afresh every step): configs with train.teacher_cache are refused before any training.
_NO_TEACHER_CACHE: set[str] = set()


def register_method(
    name: str, *, teachers: Teachers, summary: str | None = None, teacher_cache: bool = True,
    tokens: bool = False, dense: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator registering a method builder ``fn(ctx, **kwargs) -> list[Term]``.

    ``teacher_cache=False``: the method's teacher outputs cannot be cached. ``tokens``:
    it works on language-model data (token ids in, (B, L, V) logits out); the others are
    refused there by name. ``dense``: it trains a dense task (images in, images out, float
    targets: ``task: denoise``), and only that; the others are refused on dense data."""

    def deco(fn: Builder) -> Builder:
        METHODS.register(name, summary)(fn)
        _TEACHERS[name] = teachers
        if not teacher_cache:
            _NO_TEACHER_CACHE.add(name)
        if tokens:
            _TOKEN_METHODS.add(name)
        if dense:
            _DENSE_METHODS.add(name)
        return fn

    return deco


_TOKEN_METHODS: set[str] = set()
_DENSE_METHODS: set[str] = set()


def token_methods() -> list[str]:
    """The methods that distil language models (take token windows)."""
    return sorted(_TOKEN_METHODS)


def dense_methods() -> list[str]:
    """The methods that train a dense task (``task: denoise``)."""
    return sorted(_DENSE_METHODS)


def check_task(name: str, task: str | None) -> None:
    """Refuse method ``name`` on data of another task, naming the methods that fit."""
    from kdkit.tasks import DENSE_TASKS

    METHODS.get(name)
    if task in DENSE_TASKS and name not in _DENSE_METHODS:
        raise KdkitError(f"method '{name}' trains classifiers (logits against labels); this "
                         f"data is a dense task ({task}: images in, images out): use "
                         f"{', '.join(dense_methods())}")
    if task is not None and task not in DENSE_TASKS and name in _DENSE_METHODS:
        raise KdkitError(f"method '{name}' trains a dense task (images in, images out), but "
                         f"this data is for {task}; set data task: denoise, or use another "
                         "method (see `kdkit methods`)")


def method_takes_teacher_cache(name: str) -> bool:
    """Whether method ``name``'s teacher outputs can come from the teacher-output cache."""
    METHODS.get(name)
    return name not in _NO_TEACHER_CACHE


# A method whose deployed model is not the student alone (SimKD: student backbone +
# projector + the teacher's classifier) registers how to build it after training:
# fn(student, terms, teachers, *, model_name, model_kwargs) -> (model, name, kwargs), where
# (name, kwargs) is the model.json recipe (a model source create_model rebuilds).
Deployment = Callable[..., "tuple[nn.Module, str, dict[str, Any]]"]
_DEPLOYMENTS: dict[str, Deployment] = {}


def register_deployment(name: str) -> Callable[[Deployment], Deployment]:
    """Decorator registering the deployed-model builder of method ``name``."""

    def deco(fn: Deployment) -> Deployment:
        _DEPLOYMENTS[name] = fn
        return fn

    return deco


def method_deployment(name: str) -> Deployment | None:
    """The deployed-model builder of method ``name`` (None: the student is deployed)."""
    return _DEPLOYMENTS.get(name)


EvalView = Callable[..., nn.Module]
_EVAL_VIEWS: dict[str, EvalView] = {}


def register_eval_view(name: str) -> Callable[[EvalView], EvalView]:
    """Decorator registering, for a method whose deployed model is not the bare student,
    a builder of that model *sharing* the training modules, called as
    ``fn(student, terms, teachers)``: the loop's per-epoch validation evaluates it, so
    ``val/acc`` in metrics.jsonl is the deployed model's as it trains."""

    def deco(fn: EvalView) -> EvalView:
        _EVAL_VIEWS[name] = fn
        return fn

    return deco


def method_eval_view(name: str) -> EvalView | None:
    """The per-epoch evaluation view of method ``name`` (None: the student is evaluated)."""
    return _EVAL_VIEWS.get(name)


def method_teachers(name: str) -> Teachers:
    """'none', 'one' or 'many': how many teachers method ``name`` distils from."""
    METHODS.get(name)
    return _TEACHERS[name]


def method_needs_teacher(name: str) -> bool:
    return method_teachers(name) != "none"


def method_arguments(name: str) -> dict[str, Any]:
    """The method's keyword arguments and their defaults (the paper's)."""
    params = list(inspect.signature(METHODS.get(name)).parameters.values())[1:]
    return {p.name: p.default for p in params}


# Ranges shared by every method that takes an argument of this name.
_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "temperature": (0.0, None, "> 0"),
    "alpha": (0.0, 1.0, "in [0, 1]"),
    "kd_alpha": (0.0, 1.0, "in [0, 1]"),
    "margin": (0.0, None, ">= 0"),
    "beta": (0.0, None, ">= 0"),
    "weight": (0.0, None, ">= 0"),
}


def _in_range(key: str, value: Any) -> bool:
    lo, hi, _ = _RANGES[key]
    if key == "temperature":
        return bool(value > 0)
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def check_method_kwargs(name: str, kwargs: Mapping[str, Any]) -> list[str]:
    """Problems with ``kwargs`` for method ``name`` (empty when fine): unknown names,
    values of the wrong type (checked against the builder's annotations), values out of
    range. Run before any training, so a typo never costs a trained teacher."""
    return coerce_method_kwargs(name, kwargs)[1]


def coerce_method_kwargs(
    name: str, kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """(kwargs converted to the builder's annotated types, problems found)."""
    clean: dict[str, Any] = {}
    if name not in METHODS:
        try:
            METHODS.get(name)
        except KdkitError as e:
            return clean, [str(e)]
    allowed = method_arguments(name)
    hints = typing.get_type_hints(METHODS.get(name))
    problems = []
    for key, value in kwargs.items():
        if key not in allowed:
            problems.append(
                f"method '{name}' has no argument '{key}'; it takes: "
                f"{', '.join(allowed) or 'nothing'}"
            )
            continue
        if key in hints:
            try:
                value = TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as e:
                msg = e.errors()[0]["msg"]
                problems.append(f"method '{name}' argument '{key}': {msg} (got {value!r})")
                continue
        if key in _RANGES and isinstance(value, (int, float)) and not _in_range(key, value):
            problems.append(
                f"method '{name}' argument '{key}' must be {_RANGES[key][2]}, got {value}"
            )
        clean[key] = value
    return clean, problems


def build_method(
    name: str,
    student: nn.Module,
    teachers: Mapping[str, nn.Module] | None = None,
    *,
    example_input: Tensor | None = None,
    epochs: int | None = None,
    task: str | None = None,
    **kwargs: Any,
) -> list[Term]:
    """Build the Terms of single-stage method ``name`` for this student/teacher pair.

    ``example_input``: a small batch shaped like the data, for methods whose adapters
    depend on layer shapes. Staged methods (FitNets) are built with :func:`build_stages`.
    """
    stages = build_stages(name, student, teachers, example_input=example_input, epochs=epochs,
                          task=task, **kwargs)
    if len(stages) != 1:
        raise KdkitError(
            f"method '{name}' has {len(stages)} stages ({', '.join(s.name for s in stages)}); "
            "build it with build_stages() and train the stages in order"
        )
    return stages[0].terms


def build_stages(
    name: str,
    student: nn.Module,
    teachers: Mapping[str, nn.Module] | None = None,
    *,
    example_input: Tensor | None = None,
    epochs: int | None = None,
    task: str | None = None,
    **kwargs: Any,
) -> list[Stage]:
    """Build method ``name`` as a list of stages (one stage for most methods).

    ``epochs``: the run's epoch count, for methods with a warm-up in epochs (None: unknown).
    ``task``: the data's (:mod:`kdkit.tasks`); a method made for another is refused
    (None: not checked).
    """
    kwargs, problems = coerce_method_kwargs(name, kwargs)
    if problems:
        raise KdkitError("; ".join(problems))
    check_task(name, task)
    teachers = dict(teachers or {})
    count = method_teachers(name)
    if count != "none" and not teachers:
        raise KdkitError(f"method '{name}' distils from a teacher, but no teacher was given")
    if count == "one" and len(teachers) != 1:
        raise KdkitError(
            f"method '{name}' takes exactly one teacher, got {len(teachers)} "
            f"({', '.join(teachers)}); choose one, or use an ensemble method"
        )
    x = example_input
    if (x is not None and x.dim() == 2 and not x.is_floating_point() and not x.is_complex()
            and name not in _TOKEN_METHODS):
        raise KdkitError(f"method '{name}' distils image classifiers; this data is token "
                         f"windows (a language model): use {', '.join(token_methods())}")
    built = METHODS.get(name)(MethodContext(student, teachers, example_input, epochs), **kwargs)
    if built and all(isinstance(b, Stage) for b in built):
        return list(built)  # type: ignore[arg-type]
    return [Stage("main", list(built))]  # type: ignore[arg-type]


@register_method("ce", teachers="none", tokens=True)
def ce(ctx: MethodContext, *, label_smoothing: float = 0.0) -> list[Term]:
    """Plain training with cross-entropy on the labels (a teacher, or a scratch baseline)."""
    return [Term("ce", CrossEntropy(label_smoothing), 1.0)]


@register_method("kd", teachers="one", tokens=True)
def kd(ctx: MethodContext, *, temperature: float = 4.0, alpha: float = 0.9,
       logit_standardization: bool = False, ce_weight: float | None = None,
       kd_weight: float | None = None) -> list[Term]:
    """Hinton et al. 2015: α·T²·KL(p_t^T‖p_s^T) + (1−α)·CE on the teacher's logits.

    ``logit_standardization``: each sample's logits standardized first, teacher and
    student separately, then KD at ``temperature`` (Sun et al., CVPR 2024; its CIFAR recipe
    is ``ce_weight: 0.1, kd_weight: 9, temperature: 2``). ``ce_weight``/``kd_weight`` set
    the two weights directly instead of α and 1 − α (both or neither).
    """
    if not 0.0 <= alpha <= 1.0:
        raise KdkitError(f"kd: alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise KdkitError(f"kd: temperature must be > 0, got {temperature}")
    if (ce_weight is None) != (kd_weight is None):
        raise KdkitError("kd: give ce_weight and kd_weight together (or use alpha)")
    w_ce, w_kd = (1.0 - alpha, alpha) if ce_weight is None else (ce_weight, kd_weight)
    assert w_kd is not None
    if w_ce < 0 or w_kd < 0:
        raise KdkitError(f"kd: ce_weight and kd_weight must be >= 0, got {w_ce}, {w_kd}")
    teacher = next(iter(ctx.teachers))
    return [
        Term("ce", CrossEntropy(), w_ce),
        Term("kd", maybe_standardized(KDLoss(temperature), logit_standardization), w_kd,
             LOGITS, LOGITS, teacher_name=teacher),
    ]


def warmup_weight(weight: float, warmup_epochs: float, ctx: MethodContext,
                  method: str) -> float | Callable[[float], float]:
    """``weight · min(epoch / warmup_epochs, 1)``, epoch = progress · ``ctx.epochs`` (the
    linear warm-up of DKD and ReviewKD). Without the run's epoch count (a bare
    ``build_method`` without ``epochs=``) the warm-up cannot be placed: a warning says so
    and the weight is constant."""
    if warmup_epochs < 0:
        raise KdkitError(f"{method}: warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return weight
    if ctx.epochs is None:
        warnings.warn(f"{method}: the run's epoch count is unknown (pass epochs= to "
                      f"build_method / build_stages), so its {warmup_epochs:g}-epoch warm-up "
                      "is off", stacklevel=3)
        return weight
    epochs = ctx.epochs

    def warm(progress: float) -> float:
        return weight * min(progress * epochs / warmup_epochs, 1.0)

    return warm


def layer_tap(model: nn.Module, layer: str | None) -> Tap:
    """A named layer's output, or the model's penultimate embedding when ``layer`` is None."""
    return Tap(layer, "output") if layer else penultimate(model)


def ce_and_kd(ctx: MethodContext, kd_alpha: float, temperature: float) -> list[Term]:
    """``(1 − kd_alpha)·CE``, plus Hinton KD with weight ``kd_alpha`` when it is > 0.

    The '+KD' variants of relational and feature methods add these to their own terms.
    """
    if not 0.0 <= kd_alpha <= 1.0:
        raise KdkitError(f"kd_alpha must be in [0, 1], got {kd_alpha}")
    terms = [Term("ce", CrossEntropy(), 1.0 - kd_alpha)]
    if kd_alpha > 0:
        terms.append(Term("kd", KDLoss(temperature), kd_alpha, LOGITS, LOGITS,
                          teacher_name=next(iter(ctx.teachers))))
    return terms
