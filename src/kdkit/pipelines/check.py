"""Dry build: every model and method of a config, built without data or training.

``kdkit validate`` checks a config's keys and names; :func:`dry_build` goes one step
further and does, for the dataset's geometry (known without loading it), what
``kdkit run`` does before each training run: it builds every model (teachers, students,
the assistants of ``via`` / ``via_search``) and passes a 2-sample batch of zeros through
it, then builds each student run's method (:func:`kdkit.distill.build_stages`, with the
teachers the run will get) and its Distiller, and runs one step of the objective. So a
model argument of the wrong type, a model too large or too small for the images, or a
feature method that cannot find a model's stages is reported before any teacher trains.

Devices: models up to ``real_limit`` parameters are built for real on the CPU (at batch
2 that takes milliseconds; the meta device would cost about a second of one-off set-up
and is slower per operation for models this small). Larger ones are built on the meta
device (shapes only, no memory, no arithmetic); a check that fails there is redone on
the CPU, because some operations (``torch.equal`` in the pre-activation taps of the
``ab``/``overhaul`` methods, ``.item()`` in ``ensemble_random``, ``nonzero`` in RKD)
have no meta implementation. Models above ``MAX_CPU_PARAMS`` are never allocated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from kdkit.config import ExperimentConfig, ModelSpec, StudentRunSpec
from kdkit.data.geometry import dataset_geometry
from kdkit.distill import Distiller, build_stages, method_teachers
from kdkit.errors import KdkitError
from kdkit.models import create_model, geometry
from kdkit.models.meta import on_device
from kdkit.tasks import DENSE_TASKS

REAL_PARAM_LIMIT = 5_000_000  # models up to this size are checked for real, on the CPU
MAX_CPU_PARAMS = 100_000_000  # never allocated (400 MB in float32): checked on meta only
BATCH = 2  # samples in the zero batch (BN in train mode needs more than one)
_MAX_CHARS = 400  # an exception's text is cut here in a problem line

T = TypeVar("T")


def dry_build(cfg: ExperimentConfig, *, real_limit: int = REAL_PARAM_LIMIT) -> list[str]:
    """Every problem found by building ``cfg``'s models and methods, one line each.

    Nothing is loaded, trained or written; each line names its place in the config
    (``teacher.model: ...``, ``students[2] (label 'fitnets'): ...``). ``real_limit``:
    models with more parameters are built on the meta device (0: all of them).
    """
    return DryBuild(cfg, real_limit=real_limit).run().problems


def _text(e: BaseException) -> str:
    """An exception as one line: KdkitError's own message, else 'Type: message'."""
    msg = " ".join(str(e).split())
    if len(msg) > _MAX_CHARS:
        msg = msg[: _MAX_CHARS - 3] + "..."
    if isinstance(e, KdkitError):
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


_META_WORD = re.compile(r"\bmeta\b", re.IGNORECASE)  # "Meta tensors", "device meta"


def _meta_artefact(e: BaseException | None) -> bool:
    """An error (or its cause) that only says an operation has no meta implementation."""
    while e is not None:
        if isinstance(e, NotImplementedError) or _META_WORD.search(str(e)):
            return True
        e = e.__cause__
    return False


def _key(spec: ModelSpec) -> str:
    return json.dumps([spec.name, spec.kwargs], sort_keys=True, default=repr)


@dataclass
class _Model:
    """One distinct model spec: its build problem, or its size and the device it runs on."""

    spec: ModelSpec
    problem: str | None = None
    params: int = 0
    device: str = "cpu"
    instances: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class DryBuild:
    """The checks of :func:`dry_build`; ``fallbacks`` records meta checks redone on the CPU
    (or skipped, for models above ``MAX_CPU_PARAMS``)."""

    cfg: ExperimentConfig
    real_limit: int = REAL_PARAM_LIMIT
    problems: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    _models: dict[str, _Model] = field(default_factory=dict, init=False, repr=False)
    _geometry: tuple[int, tuple[int, ...]] = field(default=(0, (0, 0, 0)), init=False)

    # ------------------------------------------------------------------ the config

    def run(self) -> DryBuild:
        try:
            d = self.cfg.data
            n, shape = dataset_geometry(d.name, context=d.context, vocab=d.vocab or "char",
                                        root=d.root)
            if len(shape) == 3:
                c, h, w = shape
                shape = (d.channels or c, d.resize or h, d.resize or w)
                if d.task == "denoise":  # images out: the target's channels
                    n = shape[0]
            self._geometry = (n, shape)
        except KdkitError as e:
            from kdkit.data import DATASETS

            if self.cfg.data.name in DATASETS:  # registered by the user: checked at run time
                self.fallbacks.append(f"data.name: {e}; models are checked when it loads")
            else:
                self.problems.append(f"data.name: {e}")
            return self
        # Building on the CPU draws initial weights: leave the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            try:
                self._config()
            except Exception as e:  # noqa: BLE001 - a bug here must not hide the problems found
                self.problems.append(f"(the dry build stopped early) {_text(e)}")
        return self

    def _config(self) -> None:
        cfg = self.cfg
        # label -> model spec, None where it does not build (reported once, here)
        teachers: dict[str, ModelSpec | None] = {}
        places = (["teacher"] if cfg.teacher is not None else []) + [
            f"teachers[{k}] (label '{t.label}')" for k, t in enumerate(cfg.teachers)]
        for where, spec in zip(places, cfg.all_teachers(), strict=True):
            teachers[spec.label] = spec.model if self._usable(spec.model, f"{where}.model") else None
        default_ok = True
        if cfg.student is not None:
            users = [r.label for r in cfg.students if r.model is None]
            used = f" (the model of runs {', '.join(repr(u) for u in users)})" if users else ""
            default_ok = self._usable(cfg.student, "student", suffix=used)
        for i, run in enumerate(cfg.students):
            self._run(f"students[{i}] (label '{run.label}')", run, teachers, default_ok)

    def _run(self, where: str, run: StudentRunSpec, teachers: Mapping[str, ModelSpec | None],
             default_ok: bool) -> None:
        student: ModelSpec | None = run.model or self.cfg.student
        student_ok = self._usable(run.model, f"{where}.model") if run.model else default_ok
        # Assistant paths (teacher -> path[0] -> ... -> student); [] is direct distillation.
        paths: list[tuple[str, list[ModelSpec]]] = [("", [])]
        if run.via is not None:
            paths = [("via", list(run.via))]
        elif run.via_search is not None:
            paths = [(f"via_search[{j}]", list(p)) for j, p in enumerate(run.via_search)]
        built = [(name, path) for name, path in paths
                 if all([self._usable(m, f"{where}.{name}[{k}]") for k, m in enumerate(path)])]
        if not student_ok or student is None:
            return  # reported already (a build problem, or no model: the config check)
        try:
            count = method_teachers(run.method.name)
        except KdkitError as e:
            self.problems.append(f"{where}.method: {e}")
            return
        for chosen in self._teacher_sets(where, run, count, teachers):
            given = {label: spec for label, spec in chosen.items() if spec is not None}
            if len(given) < len(chosen):
                continue  # a teacher that does not build: reported at the teacher
            if run.via is None and run.via_search is None:
                self._method(where, run, student, given)
                continue
            if len(given) != 1:
                self.problems.append(f"{where}: an assistant chain distils from one teacher, "
                                     f"but {len(given)} are selected")
                continue
            (label, teacher), = given.items()
            for name, path in built:
                prev, prev_name = teacher, f"teacher '{label}'"
                for k, model in enumerate([*path, student]):
                    who = f"{name}[{k}] {model.name}" if k < len(path) else f"student {model.name}"
                    if not self._method(where, run, model, {"teacher": prev},
                                        describe=f"{who}, from {prev_name}"):
                        break  # the later stages need this one
                    prev, prev_name = model, who

    def _teacher_sets(self, where: str, run: StudentRunSpec, count: str,
                      teachers: Mapping[str, ModelSpec | None]
                      ) -> list[dict[str, ModelSpec | None]]:
        """The teacher sets the run may be given (``_select_teachers`` of the pipeline);
        ``best`` may pick any teacher, so each is a candidate."""
        if count == "none":
            return [{}]
        if run.teachers == "best":
            return [{label: spec} for label, spec in teachers.items()]
        if isinstance(run.teachers, list):
            missing = [t for t in run.teachers if t not in teachers]
            if missing:
                self.problems.append(
                    f"{where}.teachers: no teacher labelled {', '.join(map(repr, missing))} "
                    f"(teachers: {', '.join(teachers) or 'none'})")
                return []
            return [{label: teachers[label] for label in run.teachers}]
        return [dict(teachers)]

    # ------------------------------------------------------------------ models

    def _usable(self, spec: ModelSpec, where: str, suffix: str = "") -> bool:
        """Build ``spec`` once (cached by name and arguments); report its problem here."""
        model = self._model(spec)
        if model.problem is not None:
            self.problems.append(f"{where}: {model.problem}{suffix}")
        return model.problem is None

    def _model(self, spec: ModelSpec) -> _Model:
        key = _key(spec)
        if key not in self._models:
            self._models[key] = self._check_model(spec)
        return self._models[key]

    def _build(self, spec: ModelSpec, device: str) -> nn.Module:
        num_classes, shape = self._geometry
        with on_device(device):
            return create_model(spec.name, **geometry(shape, num_classes), **spec.kwargs)

    def _check_model(self, spec: ModelSpec) -> _Model:
        out = _Model(spec)
        try:
            sized: nn.Module | None = self._build(spec, "meta")  # the size, without memory
        except Exception as e:  # noqa: BLE001 - every failure is a config problem
            if not _meta_artefact(e):
                out.problem = _text(e)
                return out
            sized = None  # only the meta device cannot build it: build it for real
            self.fallbacks.append(f"model {spec.name}: built on the CPU (meta: {_text(e)})")
        if sized is not None and sum(p.numel() for p in sized.parameters()) > self.real_limit:
            out.device, out.instances["meta"] = "meta", sized
        else:
            try:
                out.instances["cpu"] = self._build(spec, "cpu")
            except Exception as e:  # noqa: BLE001
                out.problem = _text(e)
                return out
        out.params = sum(p.numel() for p in out.instances[out.device].parameters())
        try:
            self._on(out.device, f"model {spec.name}", [out],
                     lambda dev: self._forward(self._instance(out, dev), dev))
        except Exception as e:  # noqa: BLE001
            dims = ", ".join(str(v) for v in self._geometry[1])
            out.problem = (f"model {spec.name} fails on a ({BATCH}, {dims}) input "
                           f"(the data's geometry): {_text(e)}")
        return out

    def _instance(self, model: _Model, device: str) -> nn.Module:
        if device not in model.instances:
            model.instances[device] = self._build(model.spec, device)
        return model.instances[device]

    def _input(self, device: str) -> tuple[Tensor, Tensor]:
        num_classes, shape = self._geometry
        if len(shape) == 1:  # token windows (B, L) and their next tokens
            x = torch.arange(BATCH * shape[0], device=device).reshape(BATCH, -1) % num_classes
            return x, (x + 1) % num_classes
        x = torch.zeros(BATCH, *shape, device=device)
        if self._dense:  # a dense task: clean images as float targets
            return x, torch.zeros(BATCH, *shape, device=device)
        y = torch.arange(BATCH, device=device) % num_classes
        return x, y

    @property
    def _task(self) -> str:
        d = self.cfg.data
        return d.task or ("language_model" if len(self._geometry[1]) == 1 else "classify")

    @property
    def _dense(self) -> bool:
        return self.cfg.data.task in DENSE_TASKS

    def _forward(self, model: nn.Module, device: str) -> None:
        num_classes = self._geometry[0]
        x, _ = self._input(device)
        out = model.eval()(x)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            out = out[0]  # as the Distiller reads it
        shape = self._geometry[1]
        want: tuple[int, ...] = ((BATCH, shape[0], num_classes) if len(shape) == 1
                                 else (BATCH, num_classes))
        what = "logits"
        if self._dense:
            want, what = (BATCH, *shape), "images (a dense task: the output is the image)"
        if not isinstance(out, Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise KdkitError(f"it returns {got}, not {want} {what}")

    def _on(self, device: str, what: str, models: list[_Model],
            check: Callable[[str], T]) -> T | None:
        """``check(device)``; a failure on meta is redone on the CPU (or, for a model too
        large to allocate, skipped when it is only a missing meta kernel)."""
        if device == "cpu":
            return check("cpu")
        try:
            return check("meta")
        except Exception as e:  # noqa: BLE001
            if max(m.params for m in models) > MAX_CPU_PARAMS:
                if _meta_artefact(e):
                    self.fallbacks.append(f"{what}: not checked (meta: {_text(e)})")
                    return None
                raise
            result = check("cpu")  # raises on a real problem
            self.fallbacks.append(f"{what}: checked on the CPU (meta: {_text(e)})")
            return result

    # ------------------------------------------------------------------ methods

    def _method(self, where: str, run: StudentRunSpec, student: ModelSpec,
                teachers: Mapping[str, ModelSpec], describe: str | None = None) -> bool:
        """Build ``run``'s method for this student and teachers and take one step of its
        objective on a zero batch; report a failure. True when it worked."""
        method = run.method.name
        if describe is None:
            names = ", ".join(f"'{t}'" for t in teachers)
            describe = f"student {student.name}" + (
                f", teacher{'s' if len(teachers) > 1 else ''} {names}" if teachers else "")
        models = [self._model(student)] + [self._model(s) for s in teachers.values()]
        device = "meta" if any(m.device == "meta" for m in models) else "cpu"

        def check(dev: str) -> None:
            # A fresh student, as each run builds its own; teachers are shared, as in a run.
            s = self._build(student, dev)
            ts = {label: self._instance(self._model(spec), dev) for label, spec in teachers.items()}
            x, y = self._input(dev)
            with on_device(dev):  # adapters and loss buffers on the models' device
                stages = build_stages(method, s, ts, example_input=x,
                                      epochs=self.cfg.student_train(run).epochs,
                                      task=self._task, **run.method.kwargs)
                for stage in stages:
                    try:
                        distiller = Distiller(s, ts, stage.terms, teacher_mode=run.teacher_mode)
                        distiller.train()
                        # as fit does: per-sample state sized, the batch's sample indices
                        distiller.begin_fit(num_samples=max(len(x), 2))
                        distiller(x, y, index=torch.arange(len(x)))
                    except Exception as e:  # noqa: BLE001
                        which = f" (stage '{stage.name}')" if len(stages) > 1 else ""
                        raise _StepError(f"a training step{which} on a zero batch of shape "
                                         f"{tuple(x.shape)} fails: {_text(e)}") from e

        try:
            self._on(device, f"method {method} ({describe})", models, check)
        except Exception as e:  # noqa: BLE001
            text = str(e) if isinstance(e, _StepError) else _text(e)
            self.problems.append(f"{where}: method '{method}' ({describe}): {text}")
            return False
        return True


class _StepError(Exception):
    """A failure of the Distiller's step (its message already says where)."""
