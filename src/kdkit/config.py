"""Experiment configuration: a YAML file validated with pydantic, then built into objects.

Every problem is reported at once with its key path (``students[1].method.temperture``):
unknown keys, wrong types, unknown models/methods/datasets and arguments a model or
method does not take. This module is the only place that reads configuration; the
classes it builds receive plain arguments.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from kdkit.errors import ConfigError
from kdkit.train.loop import LoopSettings

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
MAX_CONFIG_BYTES = 1024**2  # a config larger than this is not a config
MAX_CONFIG_VALUES = 100_000  # YAML aliases can expand a small file without bound
MAX_CONFIG_DEPTH = 64  # sections nested deeper than this are not a config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_dir_name(value: str, what: str = "name") -> str:
    """A name that becomes a folder: not empty, no path separator, not '.'/'..' or hidden."""
    problem = None
    if not value.strip():
        problem = "is empty"
    elif any(c in value for c in "/\\\0"):
        problem = "contains a path separator"
    elif value.startswith("."):
        problem = "starts with '.' (it would be a hidden folder, or '.'/'..')"
    elif len(value) > 200:
        problem = "is longer than 200 characters"
    if problem:
        raise ValueError(f"{what} {value[:60]!r} {problem}; it names a folder under the run "
                         "directory, so use letters, digits, '-' and '_' (e.g. 'my-run')")
    return value


class _Named(BaseModel):
    """A registered name plus the keyword arguments of its factory, side by side."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelSpec(_Named):
    """``{name: resnet20, <architecture arguments>...}``; geometry comes from the data."""


class MethodSpec(_Named):
    """``{name: kd, temperature: 4, alpha: 0.9}``: a registered method and its arguments."""


class DataSpec(_Strict):
    name: str = "digits"
    root: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    train_subset: int | None = Field(
        None, ge=1, description="class-balanced subset of the train split used by students"
    )
    download: bool = True
    channels: int | None = Field(
        None, ge=1, description="repeat grey images into this many channels (3 for ImageNet "
        "models), or 1 to turn colour into grey")
    resize: int | None = Field(None, ge=1, description="resize images to resize x resize")
    stream: bool = Field(
        False, description="read an image folder or listing from disk batch by batch through "
        "DataLoader workers instead of decoding it into memory first")
    workers: int = Field(
        0, ge=0, description="DataLoader worker processes that decode streamed images "
        "(stream: true); 0 decodes in the training process")
    synthetic: str | None = Field(
        None, description="train students on this transfer set (a folder from `kdkit datafree`); "
        "'{seed}' in the path is replaced by the run's seed"
    )
    context: int | None = Field(
        None, ge=2, description="text datasets (shakespeare, text:PATH): tokens per window, "
        "the models' context (default 128)")
    vocab: Literal["char", "byte"] | None = Field(
        None, description="text datasets: a character vocabulary (the corpus's symbols, the "
        "default) or bytes (256)")
    task: Literal["classify", "language_model", "denoise"] | None = Field(
        None, description="what the data is for (default: what it holds: classify images, "
        "language_model for text); denoise: noisy images in, clean images out (MSE, PSNR)")
    noise: float | None = Field(
        None, gt=0.0, description="task denoise: σ of the Gaussian noise on [0, 1] pixels "
        "(default 0.3)")


class TeacherCacheSpec(_Strict):
    """``teacher_cache:``: teacher outputs computed once per (sample, view), memory-mapped.

    ``views``: augmented views kept per sample (1 without augmentation); ``dtype``: storage
    precision; ``topk``: keep only the k largest logits (approximate; for many classes).
    ``teacher_cache: true`` takes the defaults.
    """

    views: int = Field(1, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    topk: int | None = Field(None, ge=1)


class TrainSpec(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = [0.5, 0.75]
    gamma: float = 0.1
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    augment: dict[str, Any] | None = None
    log_every: int = Field(0, ge=0)
    teacher_cache: TeacherCacheSpec | None = None
    # NHWC memory format for the student, adapters and (for the run) teachers: CPU
    # convolutions ran 1.65x faster (docs/RESULTS.md); no effect on MLPs
    channels_last: bool = True
    # where and how it computes (docs/DESIGN.md "Devices and processes"); the device is not
    # part of what a run is: a run may resume on another device
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    sync_bn: bool = False
    global_batch_terms: bool = False

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        text = v.strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v[:30]!r}")
        return text

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _cache_shorthand(cls, v: Any) -> Any:
        if v is True:
            return {}
        return None if v is False else v

    def loop_settings(self, seed: int) -> LoopSettings:
        d = self.model_dump(exclude={"batch_size", "augment", "teacher_cache", "channels_last"})
        d["milestones"] = tuple(d["milestones"])
        return LoopSettings(seed=seed, **d)


class TeacherSpec(_Strict):
    label: str = "teacher"

    @field_validator("label")
    @classmethod
    def _label_is_a_folder_name(cls, v: str) -> str:
        return check_dir_name(v, "label")

    model: ModelSpec
    train: TrainSpec = TrainSpec()
    train_subset: int | None = Field(
        None, ge=1, description="teachers train on the full train split unless this is set"
    )


# Options of each data-free transfer source, beside the common ones (see TransferSpec).
_TRANSFER_OPTIONS: dict[str, set[str]] = {
    "record": {"kind", "temperature", "fraction", "dropout", "layers", "init_mean", "init_std"},
    "deepinversion": {"init_mean", "init_std", "ce_weight", "bn_weight", "tv_weight",
                      "l2_weight"},
    "dafl": {"latent_dim", "width", "oh_weight", "a_weight", "ie_weight", "steps_per_epoch"},
    "noise": set(),
}
_TRANSFER_COMMON = {"source", "samples", "batch_size", "steps", "lr"}


class TransferSpec(_Strict):
    """Where a data-free student's training inputs come from (``students[i].transfer``).

    ``source``: ``record`` (Lopes et al. metadata of ``kind``, then input reconstruction),
    ``deepinversion``, ``dafl`` (a generator; the student sees fresh samples every step) or
    ``noise``. ``steps``/``lr`` default per source: record 1000 / 0.07, deepinversion
    2000 / 0.05, dafl 1500 generator steps / 0.2. Options that do not belong to the source
    are refused.
    """

    source: Literal["record", "deepinversion", "dafl", "noise"]
    samples: int = Field(10000, ge=1)
    batch_size: int = Field(256, ge=2)
    steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    kind: Literal["top_layer", "all_layers", "all_layers_dropout", "spectral_all",
                  "spectral_pairs"] | None = None
    temperature: float = Field(8.0, gt=0)
    fraction: float = Field(0.1, gt=0, le=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    layers: list[str] | None = None
    init_mean: float = 0.15
    init_std: float = Field(0.1, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    bn_weight: float = Field(10.0, ge=0)
    tv_weight: float = Field(1e-3, ge=0)
    l2_weight: float = Field(1e-4, ge=0)
    latent_dim: int = Field(100, ge=1)
    width: int = Field(128, ge=2)
    oh_weight: float = Field(1.0, ge=0)
    a_weight: float = Field(0.1, ge=0)
    ie_weight: float = Field(5.0, ge=0)
    steps_per_epoch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _options_of_source(self) -> TransferSpec:
        own = _TRANSFER_OPTIONS[self.source]
        stray = sorted(self.model_fields_set - own - _TRANSFER_COMMON)
        if stray:
            owners = [f"{k} ({', '.join(s for s, o in _TRANSFER_OPTIONS.items() if k in o)})"
                      for k in stray]
            raise ValueError(f"options {', '.join(owners)} do not apply to source "
                             f"'{self.source}'; it takes: {', '.join(sorted(own)) or 'none'}")
        if self.source == "record" and self.kind is None:
            raise ValueError("source 'record' needs a kind: top_layer, all_layers, "
                             "all_layers_dropout, spectral_all or spectral_pairs")
        return self

    @model_serializer(mode="wrap")
    def _own_options_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The options of the other sources are refused on input, so they are not written
        # out either: a dumped config (run/config.yaml) must load again.
        keep = _TRANSFER_COMMON | _TRANSFER_OPTIONS[self.source]
        return {k: v for k, v in handler(self).items() if k in keep}

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`kdkit.pipelines.datafree.build_transfer`."""
        keys = (_TRANSFER_COMMON - {"source"}) | _TRANSFER_OPTIONS[self.source]
        return {k: getattr(self, k) for k in sorted(keys)}


class StudentRunSpec(_Strict):
    """One student run: a method, and optionally its own model, training and teachers.

    ``teachers``: labels of the teachers this run distils from (default: all of them), or
    ``best`` for the single teacher with the highest validation accuracy (per seed).
    ``via``: a teacher-assistant path; each model is distilled from the previous one, and
    the student from the last. ``via_search``: several candidate paths, of which the one
    whose student has the best *validation* accuracy is kept.
    """

    label: str
    method: MethodSpec
    model: ModelSpec | None = None

    @field_validator("label")
    @classmethod
    def _label_is_a_folder_name(cls, v: str) -> str:
        return check_dir_name(v, "label")

    train: dict[str, Any] = {}
    teacher_mode: Literal["eval", "train"] = "eval"
    teachers: list[str] | Literal["best"] | None = None
    via: list[ModelSpec] | None = None
    via_search: list[list[ModelSpec]] | None = Field(None, min_length=1)
    transfer: TransferSpec | None = None

    @model_validator(mode="after")
    def _one_path_option(self) -> StudentRunSpec:
        if self.via is not None and self.via_search is not None:
            raise ValueError("give either 'via' (one path) or 'via_search' (candidates), not both")
        if self.transfer is not None and (self.via is not None or self.via_search is not None):
            raise ValueError("a data-free run ('transfer') cannot also take an assistant path")
        return self


class EvalSpec(_Strict):
    batch_size: int = Field(1024, ge=1)
    latency_repeats: int = Field(50, ge=1)
    # export every model to ONNX (verified), quantize it to int8 and measure onnxruntime
    # for the table (needs kdkit[deploy]; skipped with a note without it)
    deploy: bool = True


class ExperimentConfig(_Strict):
    """A whole experiment: teacher → scratch baseline → distilled students → table."""

    name: str
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    data: DataSpec = DataSpec()
    teacher: TeacherSpec | None = None
    teachers: list[TeacherSpec] = []
    student: ModelSpec | None = None
    train: TrainSpec = TrainSpec()
    students: list[StudentRunSpec] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return check_dir_name(v, "name")

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, v: list[int]) -> list[int]:
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"seeds must be distinct; repeated: {dup} (a repeated seed is the "
                             "same run again and would make the ± over seeds a lie)")
        return v

    @model_validator(mode="after")
    def _one_kind_of_synthetic_data(self) -> ExperimentConfig:
        both = [s.label for s in self.students if s.transfer is not None]
        if self.data.synthetic and both:
            raise ValueError(
                f"data.synthetic trains every student on one transfer set, but runs {both} "
                "make their own ('transfer'); use one or the other"
            )
        return self

    @model_validator(mode="after")
    def _labels_unique(self) -> ExperimentConfig:
        labels = [s.label for s in self.students] + [t.label for t in self.all_teachers()]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"run labels must be unique; repeated: {dup}")
        return self

    def all_teachers(self) -> list[TeacherSpec]:
        """``teacher`` (if given) then ``teachers``, in config order."""
        return ([self.teacher] if self.teacher else []) + list(self.teachers)

    def student_train(self, run: StudentRunSpec) -> TrainSpec:
        return TrainSpec(**{**self.train.model_dump(), **run.train})

    def with_train(self, **fields: Any) -> ExperimentConfig:
        """This experiment with ``fields`` set in every training section (teachers', the
        students' default and each student run's own), e.g. ``precision="bf16"``."""
        def teacher(t: TeacherSpec) -> TeacherSpec:
            return t.model_copy(update={"train": t.train.model_copy(update=fields)})

        return self.model_copy(update={
            "teacher": teacher(self.teacher) if self.teacher else None,
            "teachers": [teacher(t) for t in self.teachers],
            "train": self.train.model_copy(update=fields),
            "students": [r.model_copy(update={"train": {**r.train, **fields}})
                         if set(fields) & set(r.train) else r for r in self.students],
        })

    def student_model(self, run: StudentRunSpec) -> ModelSpec:
        spec = run.model or self.student
        assert spec is not None  # checked by validate_semantics
        return spec


# --------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fields_at(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """Field names valid at the parent of ``loc`` (for 'did you mean')."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            inner = getattr(cand, "__args__", None)
            if inner:
                cand = inner[0]
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def _pydantic_problems(
    err: ValidationError, root: type[BaseModel] = ExperimentConfig, prefix: str = ""
) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = f"{prefix}.{_loc(loc)}" if prefix else _loc(loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc, root)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(
                f"{where}: unknown key{hint}"
                + (f" (valid keys: {', '.join(valid)})" if valid and not close else "")
            )
        elif e["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        else:
            got = e.get("input")
            shown = f" (got {_clip(repr(got))})" if not isinstance(got, (dict, list)) else ""
            problems.append(f"{where}: {e['msg']}{shown}")
    return problems


def _clip(text: str, n: int = 80) -> str:
    """A value as shown in an error: at most ``n`` characters."""
    return text if len(text) <= n else text[: n - 3] + "..."


def _unknown(kind: str, name: object, names: list[str], where: str, listing: str) -> str:
    close = difflib.get_close_matches(str(name)[:200], names, n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{where}: unknown {kind} '{_clip(str(name))}'{hint} (see `kdkit {listing}`)"


def validate_semantics(raw: dict[str, Any]) -> list[str]:
    """Problems pydantic cannot see: registry names and model/method arguments.

    Works on the raw dict, defensively, so that it can run even when the schema check
    failed: ``kdkit validate`` then reports both kinds of problem in one go.
    """
    from kdkit.data import DATASETS
    from kdkit.data.augment import build_augment
    from kdkit.data.text import is_text_name
    from kdkit.distill.methods import METHODS, check_method_kwargs
    from kdkit.models import MODELS, model_problems

    problems: list[str] = []

    def section(node: Any, key: str) -> dict[str, Any] | None:
        value = node.get(key) if isinstance(node, dict) else None
        return value if isinstance(value, dict) else None

    def check_model(spec: dict[str, Any] | None, where: str) -> None:
        if spec is None or not isinstance(spec.get("name"), str):
            return
        name = spec["name"]
        if ":" not in name and name not in MODELS:
            problems.append(_unknown("model", name, MODELS.names(), f"{where}.name", "models"))
            return
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        problems.extend(model_problems(name, kwargs, where))

    def check_augment(train: dict[str, Any] | None, where: str) -> None:
        aug = train.get("augment") if train else None
        if aug and dense:
            problems.append(f"{where}.augment: augmentation moves the inputs of a dense task "
                            "(denoise) but not its targets: remove it")
            return
        if dense and train and isinstance(train.get("teacher_cache"), dict) and \
                train["teacher_cache"].get("topk") is not None:
            problems.append(f"{where}.teacher_cache.topk: a dense task's teacher outputs are "
                            "images, not logits: remove topk")
        if isinstance(aug, dict):
            try:
                build_augment(aug)
            except Exception as e:  # noqa: BLE001 - reported as a config problem
                problems.append(f"{where}.augment: {e}")

    data = section(raw, "data")
    dname = data.get("name", "digits") if data else "digits"
    val_fraction = data.get("val_fraction", 0.1) if data else 0.1
    files = isinstance(dname, str) and dname.startswith(("folder:", "csv:"))
    text = isinstance(dname, str) and is_text_name(dname)
    if isinstance(dname, str) and dname not in DATASETS and not files and not text:
        problems.append(_unknown("dataset", dname, DATASETS.names(), "data.name", "data list"))
    if data and not text and isinstance(dname, str):
        for key in ("context", "vocab"):
            if data.get(key) is not None:
                problems.append(f"data.{key}: '{dname}' holds images; {key} belongs to text "
                                "datasets (shakespeare, text:PATH): remove it")
    if data and text:
        for key in ("channels", "resize"):
            if data.get(key) is not None:
                problems.append(f"data.{key}: '{dname}' is text; {key} belongs to images: "
                                "remove it")
    streams = bool(data.get("stream")) if data else False
    task = data.get("task") if data else None
    dense = task == "denoise"
    if data and data.get("noise") is not None and not dense:
        problems.append("data.noise: noise belongs to task denoise; set data.task: denoise "
                        "or remove noise")
    if task is not None and isinstance(dname, str) and (task == "language_model") != text:
        problems.append(f"data.task: '{dname}' holds {'text' if text else 'images'}, not data "
                        f"for {task}: use {'language_model' if text else 'classify or denoise'} "
                        "(or leave task out)")
    if dense and streams:
        problems.append("data.stream: a dense task (denoise) is made in memory: remove stream")
    if dense and data and data.get("synthetic"):
        problems.append("data.synthetic: transfer sets hold images labelled by class; a dense "
                        "task (denoise) trains on its own pairs: remove synthetic")
    if streams and not files and isinstance(dname, str):
        problems.append(f"data.stream: '{dname}' is decoded into memory; only image folders "
                        "and listings stream from disk (folder:PATH, csv:PATH): remove stream")
    teacher_specs: list[tuple[str, dict[str, Any]]] = []
    if section(raw, "teacher") is not None:
        teacher_specs.append(("teacher", section(raw, "teacher") or {}))
    many = raw.get("teachers")
    for i, t in enumerate(many if isinstance(many, list) else []):
        if isinstance(t, dict):
            teacher_specs.append((f"teachers[{i}]", t))
    labels = [str(t.get("label", "teacher")) for _, t in teacher_specs]
    for where, t in teacher_specs:
        check_model(section(t, "model"), f"{where}.model")
        check_augment(section(t, "train"), f"{where}.train")
    check_model(section(raw, "student"), "student")
    check_augment(section(raw, "train"), "train")
    students = raw.get("students")
    for i, run in enumerate(students if isinstance(students, list) else []):
        if not isinstance(run, dict):
            continue
        where = f"students[{i}]"
        if run.get("model") is None and raw.get("student") is None:
            problems.append(f"{where}.model: no model given and no top-level 'student' default")
        check_model(section(run, "model"), f"{where}.model")
        override = section(run, "train")
        if override:
            try:
                TrainSpec(**override)
            except ValidationError as e:
                problems += _pydantic_problems(e, TrainSpec, f"{where}.train")
            check_augment(override, f"{where}.train")
        problems.extend(_check_teacher_cache(section(raw, "train") or {}, override or {}, run,
                                             where))
        method = section(run, "method")
        if method is None or not isinstance(method.get("name"), str):
            continue
        mname = method["name"]
        if mname not in METHODS:
            problems.append(
                _unknown("method", mname, METHODS.names(), f"{where}.method.name", "methods")
            )
            continue
        kwargs = {k: v for k, v in method.items() if k != "name"}
        problems.extend(f"{where}.method: {p}" for p in check_method_kwargs(mname, kwargs))
        problems.extend(_check_run_teachers(run, where, mname, labels, val_fraction))
        if dense and (run.get("via") or run.get("via_search") or run.get("transfer")):
            key = next(k for k in ("via", "via_search", "transfer") if run.get(k))
            problems.append(f"{where}.{key}: teacher-assistant chains and data-free transfer "
                            "sets are built for classifiers; a dense task (denoise) distils "
                            f"directly: remove {key}")
        for j, m in enumerate(run.get("via") or [] if isinstance(run.get("via"), list) else []):
            check_model(m if isinstance(m, dict) else None, f"{where}.via[{j}]")
        search = run.get("via_search")
        for j, path in enumerate(search if isinstance(search, list) else []):
            for k, m in enumerate(path if isinstance(path, list) else []):
                check_model(m if isinstance(m, dict) else None, f"{where}.via_search[{j}][{k}]")
    return problems


def _check_teacher_cache(
    train: dict[str, Any], override: dict[str, Any], run: dict[str, Any], where: str
) -> list[str]:
    """A teacher cache needs an eval-mode teacher, and several views need an augmentation."""
    merged = {**train, **override}
    spec = merged.get("teacher_cache")
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        return []
    key = f"{where}.train.teacher_cache" if "teacher_cache" in override else "train.teacher_cache"
    problems = []
    problem = teacher_cache_views_problem(merged.get("augment"), spec, str(run.get("label")))
    if problem:
        problems.append(f"{key}.views: {problem}")
    method = run.get("method")
    mname = method.get("name") if isinstance(method, dict) else None
    if isinstance(mname, str):
        from kdkit.distill.methods import METHODS, method_takes_teacher_cache

        if mname in METHODS and not method_takes_teacher_cache(mname):
            problems.append(f"{key}: method '{mname}' runs the teacher on a view of each batch "
                            "drawn afresh every step, which a teacher-output cache cannot hold; "
                            "remove teacher_cache from this run")
    if run.get("teacher_mode") == "train":
        problems.append(f"{where}.teacher_mode: 'train' (BN batch statistics) cannot use "
                        f"{key}: a sample's teacher output depends on its batch; use "
                        "teacher_mode: eval or remove teacher_cache")
    return problems


def teacher_cache_views_problem(augment: Any, cache: dict[str, Any], label: str) -> str | None:
    """``views`` must suit the augmentation: given explicitly with it, 1 without it."""
    views = cache.get("views")
    if augment and views is None:
        return (f"run '{label}' augments its data, so say how many augmented views per sample "
                "the cache keeps (views: K): the student then sees only those K views instead "
                "of a fresh one every epoch, and building costs K teacher passes over the data "
                "and K times the space. views: 1 freezes one view per sample (the default "
                "experiment lost 5.5 points of KD accuracy that way); about as many views as "
                "epochs keeps most of the augmentation's benefit. Or remove teacher_cache")
    if isinstance(views, int) and views > 1 and not augment:
        return (f"{views} views but run '{label}' has no augment, so every view is the same; "
                "set views to 1")
    return None


def _check_run_teachers(
    run: dict[str, Any], where: str, method: str, labels: list[str], val_fraction: Any
) -> list[str]:
    """A run's teachers must exist and suit its method ('one' teacher or 'many')."""
    from kdkit.distill.methods import method_teachers

    count = method_teachers(method)
    chosen = run.get("teachers")
    problems = []
    if (run.get("via") or run.get("via_search")) and count != "one":
        problems.append(f"{where}.via: assistant chains need a one-teacher method, not '{method}'")
    if run.get("transfer") is not None and count != "one":
        problems.append(f"{where}.transfer: data-free runs distil from one teacher; use a "
                        f"one-teacher method such as kd, not '{method}'")
    if (chosen == "best" or run.get("via_search")) and not val_fraction:
        problems.append(
            f"{where}: 'teachers: best' and 'via_search' choose on the validation split, but "
            "data.val_fraction is 0; set data.val_fraction (e.g. 0.1)"
        )
    if count == "none":
        if chosen:
            problems.append(f"{where}.teachers: method '{method}' uses no teacher")
        return problems
    if not labels:
        return problems + [f"{where}.method: '{method}' needs a teacher; add a 'teacher' section"]
    if isinstance(chosen, list):
        problems += [
            f"{where}.teachers: no teacher labelled '{c}' (teachers: {', '.join(labels)})"
            for c in chosen if c not in labels
        ]
        n = len(chosen)
    else:
        n = 1 if chosen == "best" else len(labels)
    if count == "one" and n != 1:
        problems.append(
            f"{where}.teachers: method '{method}' distils from one teacher but {n} are "
            "selected; set teachers: [LABEL] or teachers: best"
        )
    return problems


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one ``--set a.b[1].c=value`` override to a raw config dict."""
    node: Any = tree
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if part.isdecimal() else part  # not isdigit: int('²') fails
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise ConfigError(f"--set {dotted}: index {part} is not in a list of {len(node)}")
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is below a value, not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def parse_key_value(item: str, flag: str) -> tuple[str, Any]:
    """One ``KEY=VALUE`` of a command-line flag. VALUE is read as YAML (``5``, ``[32]``,
    ``true``), or kept as the plain string when it is not YAML at all; YAML that is
    malformed in other ways (duplicate keys, alias bombs, deep nesting) is refused."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} expects KEY=VALUE (e.g. train.epochs=5), got '{_clip(item)}'")
    try:
        value = parse_yaml(raw, f"{flag} {key.strip()}")
    except _NotYaml:
        value = raw
    return key.strip(), value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    return [parse_key_value(item, "--set") for item in items]


class _NotYaml(ConfigError):
    """Text that does not parse as YAML at all."""


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML keeps the last)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise _DuplicateKey(
                None, None, f"key {_clip(repr(key), 60)} is given twice in one mapping",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: 'problem (line L, column C), context (line, column)'."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return _clip(" ".join(str(e).split()), 300)

    def at(m: Any) -> str:
        return f" (line {m.line + 1}, column {m.column + 1})" if m is not None else ""

    text = f"{problem}{at(mark)}"
    context = getattr(e, "context", None)
    if context:
        text += f", {context}{at(getattr(e, 'context_mark', None))}"
    return _clip(text, 300)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text: duplicate keys refused, alias expansion and nesting bounded; one
    ConfigError."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise _NotYaml(f"{source} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source} nests more than {MAX_CONFIG_DEPTH} levels deep; a config "
                          "is not that deep") from None
    count, depth = _count_values(value, MAX_CONFIG_VALUES)
    if count > MAX_CONFIG_VALUES:
        raise ConfigError(f"{source} expands to more than {MAX_CONFIG_VALUES:,} values "
                          "(YAML aliases nested in aliases?); a config is not that large")
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{source} nests more than {MAX_CONFIG_DEPTH} levels deep; a config "
                          "is not that deep")
    return value


def _count_values(value: Any, limit: int) -> tuple[int, int]:
    """(values, depth) of a parsed YAML tree, counting shared (aliased) nodes each time;
    stops at ``limit`` values."""
    count, depth, stack = 0, 0, [(value, 1)]
    while stack and count <= limit:
        v, d = stack.pop()
        count += 1
        depth = max(depth, d)
        if isinstance(v, dict):
            stack.extend((k, d + 1) for k in v)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, set)):
            stack.extend((x, d + 1) for x in v)
    return count, depth


def load_raw(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """Read a YAML config (the built-in default when ``path`` is None)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        if p.is_dir():
            raise ConfigError(f"config {p} is a directory; give a YAML file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {p} is {p.stat().st_size:,} bytes; a config is a small "
                              f"YAML file (at most {MAX_CONFIG_BYTES:,} bytes)")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {p} is not UTF-8 text (byte {e.start}); give a YAML "
                          "file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    raw = parse_yaml(text, str(p))
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of keys (name, data, teacher, students, ...)")
    return raw, str(p)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a raw dict; raise one :class:`ConfigError` that lists every problem."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        problems += _pydantic_problems(e)
    problems += validate_semantics(raw)
    if problems or cfg is None:
        raise ConfigError(problems, source)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    raw, source = load_raw(path)
    for key, value in parse_overrides(overrides or []):
        _set_path(raw, key, value)
    return config_from_dict(raw, source)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
