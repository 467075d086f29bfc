"""One training run from plain parts: build the distiller, fit, evaluate, save the model.

Used by the experiment pipeline and by ``kdkit train`` / ``kdkit distill``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit import dist
from kdkit.data import DatasetSplits
from kdkit.data.augment import build_augment
from kdkit.data.loader import derive_seed
from kdkit.data.stream import eval_args, example_inputs, make_loader
from kdkit.distill import Distiller, build_stages, method_deployment, method_eval_view
from kdkit.errors import KdkitError
from kdkit.files import RUN_MARKER, clean_stale_temps, mark_run_dir, remove_run_dir
from kdkit.models import DATA_FILLED, create_model, geometry
from kdkit.tasks import DENSE_TASKS
from kdkit.train.artifacts import MODEL_STEM, load_model, save_model
from kdkit.train.checkpoint import (
    atomic_write_json,
    load_checkpoint,
    load_state_strict,
    module_fingerprint,
    read_json,
    tensors_digest,
)
from kdkit.train.device import resolve_device
from kdkit.train.loop import LoopSettings, fit, identity_diff, loop_identity
from kdkit.train.metrics import count_parameters, evaluate
from kdkit.train.teacher_cache import CacheSettings, TeacherCache

SUMMARY = "summary.json"
_INIT_STREAM = 7  # torch seed stream for model initialisation


def data_meta(data: DatasetSplits) -> dict[str, Any]:
    """What a saved model records of its data: geometry, normalisation and (``source``)
    how to rebuild the exact splits it was trained, validated and tested on."""
    vocab = getattr(data, "vocab", None)  # a text dataset's: `kdkit generate` decodes with it
    return {"name": data.name, "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "mean": data.mean, "std": data.std,
            "source": data.source, "task": getattr(data, "task", "classify"),
            **({"vocab": vocab.to_dict()} if vocab is not None else {})}


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_identity(
    *, data: DatasetSplits, model_name: str, model_kwargs: dict[str, Any], method: str,
    method_kwargs: dict[str, Any], teachers: dict[str, nn.Module], batch_size: int,
    augment: dict[str, Any] | None, teacher_mode: str, teacher_cache: dict[str, Any] | None,
    channels_last: bool, settings: LoopSettings, train: Any = None,
) -> dict[str, Any]:
    """Everything that makes a training run what it is (JSON); a resume must match all of it.

    ``train``: the training samples when the data's source does not determine them (a
    transfer set, a generator's loader); their SHA-256 joins the identity.
    """
    digest = tensors_digest({"x": train.x, "y": train.y}) if train is not None else None
    return json.loads(json.dumps({
        "model": {"name": model_name, "kwargs": model_kwargs},
        "method": {"name": method, "kwargs": method_kwargs},
        "teachers": {k: module_fingerprint(t) for k, t in sorted(teachers.items())},
        # where the files lie does not matter, only what they hold (the content hashes)
        "data": {**{k: v for k, v in data.source.items() if k != "root"},
                 "train_sha256": digest},
        "batch_size": batch_size, "augment": augment, "teacher_mode": teacher_mode,
        "teacher_cache": teacher_cache, "channels_last": channels_last,
        "loop": loop_identity(settings),
    }, default=str))


def _check_same_run(found: dict[str, Any], identity: dict[str, Any], where: Path) -> None:
    """A finished run (or stage) is reused only for the same run; else one clear refusal."""
    if "identity" not in found:  # written before runs recorded their identity
        return
    problems = identity_diff(found["identity"], identity)
    if problems:
        raise KdkitError(
            f"{where} holds a finished run of other settings: "
            f"{', '.join(problems[:6])}{' ...' if len(problems) > 6 else ''} differ. Use the "
            "same settings, or start over with --force (or another --out)"
        )


def build_model(name: str, kwargs: dict[str, Any], data: DatasetSplits, seed: int) -> nn.Module:
    """Create a registered model for ``data``'s geometry, initialised under ``seed``."""
    filled = sorted(k for k in kwargs if k in DATA_FILLED)
    if filled and ":" not in name:  # (other sources may take num_classes: given, it wins)
        raise KdkitError(f"model '{name}': {', '.join(filled)} come from the data "
                         f"'{data.name}'; remove {'them' if len(filled) > 1 else 'it'} from the "
                         "model's arguments")
    torch.manual_seed(derive_seed(seed, _INIT_STREAM))
    return create_model(name, **{**geometry(data.input_shape, data.num_classes), **kwargs})


def check_teacher_fits(teacher_meta: dict[str, Any], data: DatasetSplits, source: str) -> None:
    """A teacher trained on other data (classes, geometry, normalisation) cannot be used."""
    t = teacher_meta["data"]
    want = data_meta(data)
    task = t.get("task", "classify")  # (saved before tasks were recorded: a classifier,
    if task != want["task"] and not (task == "classify" and "vocab" in t):  # or an LM)
        raise KdkitError(f"teacher {source} was trained for the task {task}, but the data "
                         f"'{data.name}' is set up for {want['task']}; train a teacher for "
                         f"{want['task']}")
    for key in ("num_classes", "input_shape"):
        if t[key] != want[key]:
            raise KdkitError(
                f"teacher {source} was trained for {key}={t[key]}, but the data "
                f"'{data.name}' has {key}={want[key]}; train a teacher on this dataset"
            )


def prepare_run_dir(path: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite an existing run unless --force; --resume continues it.

    ``--force`` deletes only a folder kdkit created (one holding the ``.kdkit-run`` marker),
    never the current directory or anything above it; the folder is then marked as a run.
    """
    if resume and force:
        raise KdkitError("--resume continues a run and --force deletes it; give one of them")
    if path.exists() and not path.is_dir():
        raise KdkitError(f"--out {path}: a file of that name exists; choose another --out")
    if path == Path("."):  # also what Path("") is
        raise KdkitError("--out names the current directory (or is empty); give a run "
                         "directory of its own (e.g. --out runs/my-run)")
    if path.is_dir():
        clean_stale_temps(path)  # e.g. the marker's own temporary, if a kill came mid-write
    if path.is_dir() and any(path.iterdir()):
        if force:
            remove_run_dir(path)
        elif not resume:
            raise KdkitError(
                f"run directory {path} already exists; use --resume to continue it, "
                "--force to overwrite it, or --out to choose another"
            )
        elif not (path / RUN_MARKER).is_file():
            raise KdkitError(
                f"--resume: {path} is not a kdkit run directory (no {RUN_MARKER} marker), so "
                "kdkit will not write into it; choose another --out (a run made by kdkit 0.1 "
                f"continues after `touch {path / RUN_MARKER}`)"
            )
    mark_run_dir(path)


def train_one(
    *,
    run_dir: Path,
    label: str,
    data: DatasetSplits,
    model_name: str,
    model_kwargs: dict[str, Any],
    method: str,
    method_kwargs: dict[str, Any],
    teachers: dict[str, nn.Module],
    settings: LoopSettings,
    batch_size: int,
    augment: dict[str, Any] | None,
    teacher_mode: str = "eval",
    resume: bool = False,
    progress: bool = True,
    eval_batch_size: int = 1024,
    stop_after: int | None = None,
    extra: dict[str, Any] | None = None,
    teacher_cache: dict[str, Any] | None = None,
    cache_root: Path | None = None,
    channels_last: bool = False,
    loader: Any = None,
) -> dict[str, Any]:
    """Train one model with one method; return its summary (also written to summary.json).

    A run whose summary already exists is complete and is returned as is.
    ``teacher_cache``: :class:`CacheSettings` fields; the loader then runs in view mode
    (for every method, so that runs with and without a teacher see the same views) and the
    teachers' outputs come from a cache under ``cache_root`` (default: the run directory).
    ``channels_last``: the student's, adapters' and teachers' conv weights in NHWC memory
    format (CPU convolutions ran about 1.65x faster in the Fashion-MNIST bench of
    docs/RESULTS.md); the teachers, which runs share, only for this run. ``loader`` replaces the
    batches of ``data.train`` (e.g. a DAFL generator's samples).
    """
    summary_path = run_dir / SUMMARY
    own_train = loader is not None or not data.source or "train" in data.source
    if own_train and loader is not None and not hasattr(loader.dataset, "x"):
        own_train = False  # fresh generator samples: the generator's settings identify them
    identity = run_identity(
        data=data, model_name=model_name, model_kwargs=model_kwargs, method=method,
        method_kwargs=method_kwargs, teachers=teachers, batch_size=batch_size, augment=augment,
        teacher_mode=teacher_mode, teacher_cache=teacher_cache, channels_last=channels_last,
        settings=settings,
        train=(loader.dataset if loader is not None else data.train) if own_train else None,
    )
    if summary_path.exists():
        found = dict(read_json(summary_path, "run summary"))
        _check_same_run(found, identity, summary_path)
        return found
    main = dist.is_main()  # under torchrun every rank runs this; rank 0 alone writes
    if main:
        mark_run_dir(run_dir)
    device = resolve_device(settings.device)
    student = build_model(model_name, model_kwargs, data, settings.seed)
    if channels_last:
        student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    stages = build_stages(method, student, teachers, example_input=example_inputs(data.train),
                          epochs=settings.epochs, task=data.task, **method_kwargs)
    if augment and data.task in DENSE_TASKS:
        raise KdkitError(f"{label}: augmentation moves the inputs of a dense task ({data.task}) "
                         "but not its targets; remove train.augment")
    aug = build_augment(augment, fill=data.black)
    cache_settings = CacheSettings(**teacher_cache) if teacher_cache is not None else None
    if loader is not None and cache_settings is not None:
        raise KdkitError(
            f"{label}: a teacher-output cache cannot serve fresh generator samples (DAFL); "
            "remove train.teacher_cache from this run"
        )
    if loader is None:
        loader = make_loader(
            data.train, batch_size, shuffle=True, seed=settings.seed, augment=aug,
            views=cache_settings.views if cache_settings else None,
        )
    val: Any = None  # (x, y) in memory; the dataset itself when it streams
    if len(data.val):
        val = (data.val.x, data.val.y) if hasattr(data.val, "x") else data.val
    # fit_wall: training time of every stage, summed over every process (resumes too)
    with _memory_format(teachers, channels_last):
        result, stage_settings, fit_wall = _train_stages(
            stages, run_dir=run_dir, label=label, data=data, student=student,
            teachers=teachers, teacher_mode=teacher_mode, device=device,
            channels_last=channels_last, cache_settings=cache_settings, cache_root=cache_root,
            aug=aug, loader=loader, val=val, settings=settings, identity=identity,
            resume=resume, progress=progress, main=main, stop_after=stop_after,
            eval_batch_size=eval_batch_size, model_name=model_name, model_kwargs=model_kwargs,
            method=method)
    t0 = time.perf_counter()
    final = result.history[-1] if result.history else {}
    val_acc = final.get("val/acc")
    # What is deployed: the student, or what the method builds from it (SimKD: backbone +
    # projector + the teacher's classifier); that model is tested, counted and saved.
    deployed, saved_name, saved_kwargs = student, model_name, model_kwargs
    deploy = method_deployment(method)
    if deploy is not None:
        deployed, saved_name, saved_kwargs = deploy(
            student, stages[-1].terms, teachers, model_name=model_name, model_kwargs=model_kwargs)
        if val is not None:  # (the same figure as the loop's last epoch, on the copy)
            val_acc = evaluate(deployed, *eval_args(data.val), batch_size=eval_batch_size,
                               distributed=True).get("acc")
    test = evaluate(deployed, *eval_args(data.test), batch_size=eval_batch_size,
                    distributed=True)
    model_path = run_dir / f"{MODEL_STEM}.safetensors"
    with dist.main_first():
        if main:
            save_model(run_dir, deployed, name=saved_name, kwargs=saved_kwargs,
                       data=data_meta(data), extra={"method": {"name": method,
                                                               "kwargs": method_kwargs},
                                                    "seed": settings.seed})
    summary = {
        "label": label, "seed": settings.seed, "model": model_name, "model_kwargs": model_kwargs,
        "method": method, "method_kwargs": method_kwargs,
        **({"deployed_model": saved_name} if deploy is not None else {}),
        "params": count_parameters(deployed), "size_bytes": model_path.stat().st_size,
        "test_acc": test.get("acc"), "test_loss": test["loss"],
        "val_acc": val_acc, "epochs": stage_settings.epochs,
        "train_samples": len(loader.dataset),
        "wall_s": round(fit_wall + time.perf_counter() - t0, 2),
        "resumed_from": result.resumed_from, **(extra or {}), "identity": identity,
    }
    if "psnr" in test:  # a dense task: PSNR (dB) of the test and the last epoch's val images
        summary.update(test_psnr=test["psnr"], val_psnr=final.get("val/psnr"))
    if "bpc" in test:  # a language model: bits per character (or byte), and its speed
        tokens = stage_settings.epochs * len(loader.dataset) * int(data.input_shape[0])
        summary.update(test_bpc=test["bpc"], val_bpc=final.get("val/bpc"),
                       train_tokens_per_s=round(tokens / max(fit_wall, 1e-9), 1))
    with dist.main_first():
        if main:
            atomic_write_json(summary_path, summary)
    return summary


def _train_stages(
    stages: list[Any], *, run_dir: Path, label: str, data: DatasetSplits, student: nn.Module,
    teachers: dict[str, nn.Module], teacher_mode: str, device: torch.device,
    channels_last: bool, cache_settings: CacheSettings | None, cache_root: Path | None,
    aug: Any, loader: Any, val: Any, settings: LoopSettings, identity: dict[str, Any],
    resume: bool, progress: bool, main: bool, stop_after: int | None, eval_batch_size: int,
    model_name: str, model_kwargs: dict[str, Any], method: str,
) -> tuple[Any, LoopSettings, float]:
    """Fit each stage of a method in turn (earlier stages keep their own run directories);
    returns the last stage's fit result and settings, and the training time of all."""
    fit_wall = 0.0
    result: Any = None
    stage_settings = settings
    for k, stage in enumerate(stages, start=1):
        last = k == len(stages)
        # Earlier stages keep their own run directory; the last one is the run itself.
        stage_dir = run_dir if last else run_dir / f"stage{k}-{stage.name}"
        stage_settings = replace(
            settings,
            epochs=settings.epochs if stage.epochs is None else stage.epochs,
            lr=settings.lr if stage.lr is None else stage.lr,
            optimizer=stage.optimizer or settings.optimizer,
        )
        stage_identity = {**identity, "stage": f"{k}/{len(stages)} {stage.name}"}
        if not last and (stage_dir / SUMMARY).exists():  # (every rank reads it)
            _check_same_run(read_json(stage_dir / SUMMARY, "stage summary"), stage_identity,
                            stage_dir / SUMMARY)
            tensors, _ = load_checkpoint(stage_dir / MODEL_STEM)
            load_state_strict(student, tensors, str(stage_dir / MODEL_STEM))
            fit_wall += float(read_json(stage_dir / SUMMARY, "stage summary").get("wall_s", 0.0))
            continue
        distiller = Distiller(student, teachers, stage.terms, teacher_mode=teacher_mode)
        view = method_eval_view(method) if last else None
        if view is not None:  # validate what is deployed (SimKD), not the bare student
            distiller.set_evaluated(view(student, stage.terms, teachers))
        distiller.to(device)
        if channels_last:  # the teachers are converted for the run alone (_memory_format)
            distiller.adapters.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        cache = None
        if cache_settings is not None and distiller.teacher_taps:
            # over train + val: every seed splits the same pool, so all seeds share it
            # built once, by rank 0, while the others wait; then every rank maps it
            with dist.main_first():
                cache = TeacherCache.open_or_build(
                    cache_root or run_dir / "teacher-outputs", distiller, data.train, aug,
                    cache_settings, pool=[data.train, data.val] if len(data.val) else None,
                    batch_size=eval_batch_size, log=print if progress and main else None)
        result = fit(
            distiller, loader, stage_settings, val=val, run_dir=stage_dir, resume=resume,
            progress=progress, label=label if last else f"{label}/{stage.name}",
            stop_after=stop_after, teacher_cache=cache,
            identity=stage_identity,
            log=_to_stderr if progress else None,
        )
        fit_wall += result.wall_s
        if not last and main:
            save_model(stage_dir, student, name=model_name, kwargs=model_kwargs,
                       data=data_meta(data), extra={"stage": stage.name})
            atomic_write_json(stage_dir / SUMMARY, {"stage": stage.name, "wall_s": result.wall_s,
                                                    "history": result.history[-1:],
                                                    "identity": stage_identity})
    return result, stage_settings, fit_wall


@contextmanager
def _memory_format(teachers: dict[str, nn.Module], channels_last: bool) -> Iterator[None]:
    """The teachers in channels-last memory format for one run, then as they were: runs
    share teacher objects, and a run's numbers must not depend on the runs before it."""
    if not channels_last:
        yield
        return
    for t in teachers.values():
        t.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield
    finally:
        for t in teachers.values():
            t.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]

def load_teacher(path: str | Path, data: DatasetSplits) -> nn.Module:
    model, meta = load_model(path)
    check_teacher_fits(meta, data, str(path))
    return model


