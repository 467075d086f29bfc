"""The experiment recipe: teacher → scratch baseline → distilled students → one table.

For each seed: train (or reuse from the cache) the teacher on the full train split, then
train every student run on the (optionally subsetted) train split, evaluate on the test
set at the last epoch, and aggregate mean ± std over seeds. Every sub-run is its own run
directory, so a killed experiment resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from kdkit import dist
from kdkit.config import (
    ExperimentConfig,
    StudentRunSpec,
    TeacherSpec,
    TrainSpec,
    dump_config,
    load_config,
)
from kdkit.data import DatasetSplits, load_dataset
from kdkit.data.stream import eval_args
from kdkit.distill.methods import method_teachers
from kdkit.errors import ConfigError, KdkitError
from kdkit.files import (
    atomic_copy,
    clean_stale_temps,
    discard_dir,
    mark_run_dir,
    publish_dir,
    temp_dir,
)
from kdkit.pipelines.chain import distill_chain, search_paths
from kdkit.pipelines.check import dry_build
from kdkit.pipelines.datafree import build_transfer, load_synthetic
from kdkit.pipelines.runs import (
    SUMMARY,
    build_model,
    data_meta,
    load_teacher,
    prepare_run_dir,
    train_one,
)
from kdkit.pipelines.table import aggregate, deploy_available, format_table
from kdkit.tasks import headline, plain_method
from kdkit.train.artifacts import MODEL_STEM, load_model, save_model
from kdkit.train.checkpoint import atomic_write_bytes, atomic_write_json, read_json
from kdkit.train.device import check_precision, resolve_device
from kdkit.train.loop import LoopSettings
from kdkit.train.metrics import evaluate

ELAPSED = "elapsed.json"  # the experiment's wall time so far, for resumed runs
CACHE_FORMAT = 2  # 2: keyed by the data's content hash (1 knew only the dataset's name)
_TEACHER_FILES = (f"{MODEL_STEM}.safetensors", f"{MODEL_STEM}.json", "metrics.jsonl")


def teacher_cache_key(
    spec: TeacherSpec, cfg: ExperimentConfig, seed: int, data: DatasetSplits
) -> str:
    """Hash of everything that determines a trained teacher (not its label).

    The data enters by the content hash of what was actually loaded (``data.source``), so
    other files under the same dataset name (another root, a re-download that differs)
    never reuse a teacher trained on the old ones.
    """
    # what makes the same files other data: their adaptation, a text's window and
    # vocabulary, a dense task's noise (absent keys leave older keys valid)
    adapted: dict[str, Any] = {k: data.source[k] for k in ("channels", "resize", "stream",
                                                           "context", "vocab", "task", "noise")
                               if k in data.source}
    blob = {
        "format": CACHE_FORMAT,
        "model": spec.model.model_dump(),
        # keys added later are left out at their defaults
        "train": _trained_as(spec.train),
        "train_subset": spec.train_subset,
        "data": {"name": cfg.data.name, "val_fraction": cfg.data.val_fraction,
                 "sha256": data.source.get("sha256"), **adapted},
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def _trained_as(train: TrainSpec) -> dict[str, Any]:
    """The training settings that make a teacher what it is: not the device it ran on, and
    the keys added later only when they differ from their defaults (older keys stay valid)."""
    later = {"precision", "compile", "sync_bn", "global_batch_terms"}
    defaults = TrainSpec().model_dump()
    d = train.model_dump(exclude={"teacher_cache", "device"})
    if not d["channels_last"]:  # as before it existed (it is the default since issue 11)
        del d["channels_last"]
    return {k: v for k, v in d.items() if not (k in later and v == defaults[k])}


def _usable_cached_teacher(cached: Path, log: Callable[[str], None]) -> bool:
    """A cached teacher folder is complete and its weights match their hash."""
    if not (cached / SUMMARY).exists():
        return False
    try:
        load_model(cached)
        read_json(cached / SUMMARY, "cached teacher summary")
    except KdkitError as e:
        log(f"kdkit: warning: ignoring the cached teacher {cached} ({e}); training it again")
        return False
    return True


def _teacher(
    cfg: ExperimentConfig, spec: TeacherSpec, data: DatasetSplits, seed: int, run_dir: Path,
    cache_dir: Path | None, resume: bool, progress: bool, log: Callable[[str], None],
    device: str | None = None,
) -> dict[str, Any]:
    if "weights" in spec.model.kwargs:  # a teacher the user already has: used as is
        return _pretrained_teacher(cfg, spec, data, seed, run_dir)
    cached = (cache_dir / "teachers" / teacher_cache_key(spec, cfg, seed, data)
              if cache_dir else None)
    with dist.main_first() as main:  # rank 0 copies from the cache; the others then read
        copied = _copy_cached_teacher(spec, seed, run_dir, cached, log) if main else None
    if copied is not None:
        return copied
    if not main and (run_dir / SUMMARY).exists():  # what rank 0 copied (or found) there
        return dict(read_json(run_dir / SUMMARY, "run summary"))
    train = spec.train
    summary = train_one(
        run_dir=run_dir, label=f"seed{seed}/{spec.label}", data=data,
        model_name=spec.model.name, model_kwargs=spec.model.kwargs,
        method=plain_method(data.task), method_kwargs={}, teachers={},
        settings=_settings(train, seed, device), batch_size=train.batch_size,
        augment=train.augment, resume=resume, progress=progress,
        eval_batch_size=cfg.eval.batch_size, extra={"role": "teacher"},
        channels_last=train.channels_last,
    )
    if cached is not None and dist.is_main() and not _usable_cached_teacher(cached,
                                                                             lambda _m: None):
        _publish_teacher(run_dir, cached)
    return summary


def _pretrained_teacher(cfg: ExperimentConfig, spec: TeacherSpec, data: DatasetSplits,
                        seed: int, run_dir: Path) -> dict[str, Any]:
    """A teacher from a weights file: not trained, evaluated on this seed's splits and
    saved into its run directory (so students and tables treat it like any teacher)."""
    if (run_dir / SUMMARY).exists():
        return dict(read_json(run_dir / SUMMARY, "run summary"))
    t0 = time.perf_counter()
    model = build_model(spec.model.name, spec.model.kwargs, data, seed)
    test = evaluate(model, *eval_args(data.test), batch_size=cfg.eval.batch_size)
    val_ev = (evaluate(model, *eval_args(data.val), batch_size=cfg.eval.batch_size)
              if len(data.val) else None)
    val = val_ev.get("acc") if val_ev is not None else None
    weights = str(spec.model.kwargs["weights"])
    summary = {
        "label": f"seed{seed}/{spec.label}", "seed": seed, "model": spec.model.name,
        "model_kwargs": spec.model.kwargs, "method": "pretrained", "method_kwargs": {},
        "params": sum(p.numel() for p in model.parameters()), "test_acc": test.get("acc"),
        "test_loss": test["loss"], "val_acc": val, "epochs": 0, "role": "teacher",
        "pretrained": weights,
    }
    for key in ("bpc", "psnr"):  # a language model; a dense task
        if key in test:
            summary.update({f"test_{key}": test[key],
                            f"val_{key}": val_ev.get(key) if val_ev is not None else None})
    with dist.main_first() as main:
        if main:
            mark_run_dir(run_dir)
            path = save_model(run_dir, model, name=spec.model.name, kwargs=spec.model.kwargs,
                              data=data_meta(data), extra={"role": "teacher",
                                                           "pretrained": weights})
            summary["size_bytes"] = path.stat().st_size
            summary["wall_s"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(run_dir / SUMMARY, summary)
    return dict(read_json(run_dir / SUMMARY, "run summary"))


def _copy_cached_teacher(spec: TeacherSpec, seed: int, run_dir: Path, cached: Path | None,
                         log: Callable[[str], None]) -> dict[str, Any] | None:
    """Copy a usable cached teacher into ``run_dir`` (unless it holds one); its summary."""
    if cached is not None:
        clean_stale_temps(cached.parent)
    if not (run_dir / SUMMARY).exists() and cached and _usable_cached_teacher(cached, log):
        # Each file is copied atomically and the summary, which marks the run complete, last:
        # a kill at any point leaves a run that the next --resume copies again.
        mark_run_dir(run_dir)
        for name in _TEACHER_FILES:
            if (cached / name).exists():
                atomic_copy(cached / name, run_dir / name)
        summary = read_json(cached / SUMMARY, "cached teacher summary")
        summary["cached_from"] = str(cached)
        summary["label"] = f"seed{seed}/{spec.label}"  # the cache may hold it under another
        atomic_write_json(run_dir / SUMMARY, summary)
        log(f"[seed {seed}] {spec.label}: reused from cache {cached}")
        return dict(summary)
    return None


def _settings(train: TrainSpec, seed: int, device: str | None) -> LoopSettings:
    """The loop settings of a run; ``device`` (from the command line) overrides the config's."""
    settings = train.loop_settings(seed)
    return settings if device is None else replace(settings, device=device)


def _publish_teacher(run_dir: Path, cached: Path) -> None:
    """Copy a trained teacher into the cache: into a temporary sibling, then renamed.

    The cache never holds half a teacher; a folder another process published first is kept
    (publish_dir never replaces it). A broken folder is first renamed aside, then deleted.
    """
    if _usable_cached_teacher(cached, lambda _m: None):
        return  # another process published it meanwhile: keep theirs (others may copy it)
    discard_dir(cached)  # a broken folder
    tmp = temp_dir(cached)
    try:
        for name in (*_TEACHER_FILES, SUMMARY):
            if (run_dir / name).exists():
                atomic_copy(run_dir / name, tmp / name)
        publish_dir(tmp, cached)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str | None = None,
    only: list[str] | None = None,
    jobs: int = 1,
    keep_going: bool = False,
) -> dict[str, Any]:
    """Run the whole experiment into ``out_dir``; return the aggregated summary.

    Every model and method is first built on the data's geometry (:func:`dry_build`), so a
    problem in any run is reported before anything trains.

    Args:
        device: overrides every run's ``train.device`` (not part of the config: a run may
            resume on another device).
        only: run just these sub-runs (``LABEL`` for every seed, or ``seedK/LABEL``), into
            the same ``out_dir``; their teachers must be finished. The table is not
            assembled: a later run without ``only`` (e.g. ``--resume``) does that. So a
            scheduler (a SLURM array, a job queue) can fan an experiment out over machines.
        jobs: run up to this many ready sub-runs at once, each in its own process with a
            fair share of the CPU threads (or its own GPU); teachers before their students.
        keep_going: a failed sub-run does not stop the others (each sub-run then runs in a
            process of its own, even at ``jobs=1``); the error names every failure.
    """
    problems = dry_build(cfg)
    if problems:
        raise ConfigError(problems, f"'{cfg.name}'")
    _check_devices(cfg, device)
    selected = _selected(cfg, only) if only else None
    if (jobs > 1 or keep_going) and dist.world_size() > 1:
        raise KdkitError("--jobs and --keep-going run sub-runs as processes of their own; "
                         "under torchrun give neither")
    resolved = dump_config(cfg)
    cfg_path = out_dir / "config.yaml"
    continuing = resume or selected is not None  # --only adds to the experiment's folder
    if continuing and cfg_path.exists() and not _same_config(cfg_path, resolved):
        raise KdkitError(
            f"{cfg_path} differs from the config given now; --resume and --only need the same "
            "config (use --force to start over, or --out for a new run directory)"
        )
    with dist.main_first() as main:
        if main:
            prepare_run_dir(out_dir, resume=continuing, force=force)
            atomic_write_bytes(cfg_path, resolved.encode())
    t0 = time.perf_counter()
    # The experiment's wall time sums every process that worked on it (resumes included).
    elapsed_path = out_dir / ELAPSED
    wall_before = _elapsed(elapsed_path) if resume else 0.0

    def wall() -> float:
        return wall_before + time.perf_counter() - t0

    def note_elapsed() -> None:
        if main and selected is None:
            atomic_write_json(elapsed_path, {"wall_s": wall()})

    if jobs > 1 or keep_going:
        from kdkit.pipelines.jobs import run_parallel

        run_parallel(cfg, cfg_path, out_dir, jobs=jobs, selected=selected, cache_dir=cache_dir,
                     device=device, log=log, keep_going=keep_going)
        if selected is not None:
            return {"name": cfg.name, "only": sorted(selected), "runs": []}
        note_elapsed()
        resume = True  # every sub-run is finished: what follows assembles the table
    runs: list[dict[str, Any]] = []
    seed_data: dict[int, DatasetSplits] = {}  # each seed's student data, for the int8 columns
    for seed in cfg.seeds:
        seed_dir = out_dir / f"seed{seed}"
        d = cfg.data
        teachers: dict[str, nn.Module] = {}
        teacher_val: dict[str, float | None] = {}
        teacher_data: dict[str, DatasetSplits] = {}
        wanted = [r for r in cfg.students if selected is None or (seed, r.label) in selected]
        for spec in cfg.all_teachers():
            full = _load(cfg, seed, spec.train_subset, log)
            t_dir = seed_dir / spec.label
            if selected is not None and (seed, spec.label) not in selected:
                if not wanted:
                    continue
                if not (t_dir / SUMMARY).exists():
                    raise KdkitError(
                        f"--only: teacher seed{seed}/{spec.label} is not finished; run it first "
                        f"(--only seed{seed}/{spec.label})")
                summary = dict(read_json(t_dir / SUMMARY, "run summary"))
            else:
                summary = _teacher(cfg, spec, full, seed, t_dir, cache_dir, resume, progress,
                                   log, device)
                runs.append(summary)
                _report(log, seed, summary)
                note_elapsed()
            teachers[spec.label] = load_teacher(t_dir, full)
            # chosen on validation: accuracy, or a dense task's PSNR (higher is better)
            teacher_val[spec.label] = summary.get("val_acc", summary.get("val_psnr")) \
                if summary.get("val_acc") is not None else summary.get("val_psnr")
            teacher_data[spec.label] = full
        if not wanted:
            continue
        data = _load(cfg, seed, d.train_subset, log)
        if d.synthetic:
            data = load_synthetic(d.synthetic.replace("{seed}", str(seed)), data)
        seed_data[seed] = data
        for run in wanted:
            chosen = _select_teachers(run, teachers, teacher_val)
            summary = _student(cfg, run, data, seed, seed_dir / run.label, chosen,
                               resume=resume, progress=progress, log=log,
                               teacher_data={k: teacher_data[k] for k in chosen},
                               cache_dir=cache_dir, device=device)
            runs.append(summary)
            _report(log, seed, summary)
            note_elapsed()
    if selected is not None:
        return {"name": cfg.name, "only": sorted(f"seed{s}/{lab}" for s, lab in selected),
                "runs": runs}
    with dist.main_first():
        if main:  # latency and the table: measured and written once
            want_onnx = cfg.eval.deploy and os.environ.get("KDKIT_TABLE_DEPLOY", "1") != "0"
            deploy = want_onnx and deploy_available()
            if want_onnx and not deploy:
                log("onnxruntime columns and int8 accuracy skipped: the deploy extra is not "
                    "installed (pip install 'kdkit[deploy]')")
            table_rows = aggregate(runs, out_dir, cfg.seeds[0],
                                   latency_repeats=cfg.eval.latency_repeats, deploy=deploy,
                                   data_for=seed_data.__getitem__, log=log)
            result = {
                "name": cfg.name, "seeds": cfg.seeds, "rows": table_rows, "runs": runs,
                "wall_s": round(wall(), 1),
            }
            atomic_write_json(out_dir / SUMMARY, result)
            table = format_table(table_rows, cfg)
            atomic_write_bytes(out_dir / "table.md", table.encode())
    if not main:
        result = dict(read_json(out_dir / SUMMARY, "experiment summary"))
    return result


def _text_options(d: Any) -> dict[str, Any]:
    """A text dataset's window and vocabulary; the task and its noise where given."""
    from kdkit.data.text import is_text_name

    task = {"task": d.task, "noise": d.noise} if d.task is not None or d.noise is not None else {}
    if not is_text_name(d.name):
        return task
    return {"context": d.context or 128, "vocab": d.vocab or "char", **task}


def _same_config(path: Path, resolved: str) -> bool:
    """Whether the experiment config saved at ``path`` is ``resolved``: byte for byte, or
    once read with this kdkit (a setting a newer kdkit added appears in ``resolved`` with
    its default, and an experiment started before it still resumes)."""
    if path.read_bytes() == resolved.encode():
        return True
    try:
        return dump_config(load_config(path)) == resolved
    except KdkitError:
        return False


def _check_devices(cfg: ExperimentConfig, device: str | None) -> None:
    """Every run's device exists and computes in its precision (before anything is made)."""
    specs = [t.train for t in cfg.all_teachers()] + [cfg.student_train(r) for r in cfg.students]
    for train in specs:
        check_precision(train.precision, resolve_device(device or train.device))


def sub_runs(cfg: ExperimentConfig) -> list[tuple[int, str, bool]]:
    """Every sub-run of the experiment as (seed, label, is a teacher), in running order."""
    out = []
    for seed in cfg.seeds:
        out += [(seed, t.label, True) for t in cfg.all_teachers()]
        out += [(seed, r.label, False) for r in cfg.students]
    return out


def _selected(cfg: ExperimentConfig, only: list[str]) -> set[tuple[int, str]]:
    """The (seed, label) pairs ``--only`` names: ``LABEL`` (every seed) or ``seedK/LABEL``."""
    known = sub_runs(cfg)
    labels = sorted({lab for _, lab, _ in known})
    chosen: set[tuple[int, str]] = set()
    for item in only:
        seed_text, _, label = item.rpartition("/")
        seeds = cfg.seeds
        if seed_text:
            if not (seed_text.startswith("seed") and seed_text[4:].lstrip("-").isdigit()
                    and int(seed_text[4:]) in cfg.seeds):
                raise KdkitError(f"--only {item}: '{seed_text}' is not one of this experiment's "
                                 f"seeds ({', '.join(f'seed{s}' for s in cfg.seeds)})")
            seeds = [int(seed_text[4:])]
        if label not in labels:
            raise KdkitError(f"--only {item}: no sub-run is labelled '{label}'; the labels are "
                             f"{', '.join(labels)}")
        chosen |= {(s, label) for s in seeds}
    return chosen


def _load(cfg: ExperimentConfig, seed: int, train_subset: int | None,
          log: Callable[[str], None]) -> DatasetSplits:
    """The seed's splits; under torchrun rank 0 fetches (if it must) before the others read."""
    d = cfg.data
    with dist.main_first():
        return load_dataset(d.name, root=d.root, val_fraction=d.val_fraction,
                            train_subset=train_subset, seed=seed, download=d.download, log=log,
                            channels=d.channels, resize=d.resize, stream=d.stream,
                            workers=d.workers, **_text_options(d))


def _elapsed(path: Path) -> float:
    """Wall time the earlier processes of a resumed experiment recorded (0 if none)."""
    try:
        value = read_json(path, "elapsed time").get("wall_s", 0.0)
    except (KdkitError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) and value >= 0 else 0.0


def _select_teachers(
    run: StudentRunSpec, teachers: dict[str, nn.Module], val: dict[str, float | None]
) -> dict[str, nn.Module]:
    """The teachers a run distils from: none, its chosen labels, the best by val, or all."""
    if method_teachers(run.method.name) == "none":
        return {}
    if run.teachers == "best":
        best = max(teachers, key=lambda k: val[k] or 0.0)  # val split required by config
        return {best: teachers[best]}
    if isinstance(run.teachers, list):
        return {k: teachers[k] for k in run.teachers}
    return dict(teachers)


def _student(
    cfg: ExperimentConfig, run: StudentRunSpec, data: DatasetSplits, seed: int, run_dir: Path,
    teachers: dict[str, nn.Module], *, resume: bool, progress: bool, log: Callable[[str], None],
    teacher_data: dict[str, DatasetSplits] | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """One student run: direct, data-free (``transfer``), along a teacher-assistant path,
    or a search over paths."""
    train = cfg.student_train(run)
    model = cfg.student_model(run)
    extra: dict[str, Any] = {"role": "student", "teachers": sorted(teachers)}
    if (run_dir / SUMMARY).exists():  # finished; config.yaml's check made it this very run
        return dict(read_json(run_dir / SUMMARY, "run summary"))
    loader = None
    if dist.is_main():
        mark_run_dir(run_dir)  # before its transfer set or assistant stages are written into it
    if run.transfer is not None and not (run_dir / SUMMARY).exists():
        (t_label, teacher), = teachers.items()
        t_data = (teacher_data or {}).get(t_label, data)
        # Synthesis (and a DAFL generator) runs on rank 0; the others then read what it made.
        with dist.main_first() as main:
            data, loader, info = build_transfer(
                run.transfer.source, teacher=teacher, teacher_data=t_data, data=data,
                folder=run_dir / "transfer", seed=seed, progress=progress and main, log=log,
                device=device or train.device, **run.transfer.options(),
            )
        extra.update(info)
    common: dict[str, Any] = dict(
        data=data, method=run.method.name, method_kwargs=run.method.kwargs,
        settings=_settings(train, seed, device), batch_size=train.batch_size,
        augment=train.augment, teacher_mode=run.teacher_mode, resume=resume, progress=progress,
        eval_batch_size=cfg.eval.batch_size,
        teacher_cache=train.teacher_cache.model_dump() if train.teacher_cache else None,
        cache_root=cache_dir / "teacher-outputs" if cache_dir else None,
        channels_last=train.channels_last,
    )
    label = f"seed{seed}/{run.label}"
    if run.via is None and run.via_search is None:
        return train_one(run_dir=run_dir, label=label, model_name=model.name,
                         model_kwargs=model.kwargs, teachers=teachers, loader=loader,
                         extra=extra, **common)
    (t_label, teacher), = teachers.items()
    chain: dict[str, Any] = dict(run_dir=run_dir, label=label, teacher=teacher,
                                 teacher_label=t_label, student=(model.name, model.kwargs),
                                 log=log, **common)
    if run.via is not None:
        return distill_chain(assistants=[(m.name, m.kwargs) for m in run.via], **chain)
    assert run.via_search is not None
    return search_paths(
        candidates=[[(m.name, m.kwargs) for m in path] for path in run.via_search], **chain
    )


def _report(log: Callable[[str], None], seed: int, s: dict[str, Any]) -> None:
    log(f"[seed {seed}] {s['label'].split('/')[-1]}: {headline(s)} ({s['wall_s']:.1f} s)")
