"""Teacher-assistant chains (Mirzadeh et al., AAAI 2020): teacher → TA → ... → student.

Each stage is an ordinary distillation run whose finished model is the next stage's
teacher; every stage keeps its own run directory (checkpoints, metrics, summary), so a
killed chain resumes at the stage it was in. ``search_paths`` tries several paths and
keeps the one whose student has the best *validation* accuracy (never test accuracy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kdkit import dist
from kdkit.files import atomic_copy, mark_run_dir
from kdkit.pipelines.runs import SUMMARY, train_one
from kdkit.train.artifacts import MODEL_STEM, load_model
from kdkit.train.checkpoint import atomic_write_json, read_json

ModelRef = tuple[str, dict[str, Any]]  # (registered name, its arguments)


def _path_name(path: list[ModelRef]) -> str:
    return "-".join(name for name, _ in path)


def distill_chain(
    *,
    run_dir: Path,
    label: str,
    teacher: nn.Module,
    teacher_label: str,
    assistants: list[ModelRef],
    student: ModelRef,
    log: Callable[[str], None] = print,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """Distil ``teacher`` → assistants[0] → ... → ``student``; return the student's summary.

    ``run_kwargs`` go to every stage's :func:`train_one` (data, method, settings, ...).
    Assistant stages live in ``run_dir/stage<k>-<model>``; the student in ``run_dir``.
    """
    if dist.is_main():
        mark_run_dir(run_dir)  # before the assistants' stage folders are made inside it
    current, stages = teacher, []
    for k, (name, kwargs) in enumerate(assistants, start=1):
        stage_dir = run_dir / f"stage{k}-{name}"
        s = train_one(run_dir=stage_dir, label=f"{label}/stage{k}-{name}", model_name=name,
                      model_kwargs=kwargs, teachers={"teacher": current}, **run_kwargs)
        log(f"  {label}: assistant {name} (stage {k}) test {s['test_acc']:.2f}%"
            + (f", val {s['val_acc']:.2f}%" if s.get("val_acc") is not None else ""))
        stages.append({"model": name, "test_acc": s["test_acc"], "val_acc": s["val_acc"]})
        current, _ = load_model(stage_dir)
    path = [teacher_label] + [n for n, _ in assistants] + [student[0]]
    return train_one(run_dir=run_dir, label=label, model_name=student[0],
                     model_kwargs=student[1], teachers={"teacher": current},
                     extra={"path": path, "stages": stages, "role": "student"}, **run_kwargs)


def search_paths(
    *,
    run_dir: Path,
    label: str,
    candidates: list[list[ModelRef]],
    log: Callable[[str], None] = print,
    **chain_kwargs: Any,
) -> dict[str, Any]:
    """Run :func:`distill_chain` for each candidate assistant path; keep the best by val acc.

    The chosen candidate's model is copied into ``run_dir`` and its summary records every
    candidate's validation and test accuracy.
    """
    if (run_dir / SUMMARY).exists():
        return dict(read_json(run_dir / SUMMARY, "run summary"))
    if dist.is_main():
        mark_run_dir(run_dir)  # also removes temporaries a killed process left here
    results = []
    for j, assistants in enumerate(candidates, start=1):
        # Indexed: two candidates may use the same models with other arguments.
        name = f"via{j}-{_path_name(assistants) or 'none'}"
        s = distill_chain(run_dir=run_dir / name, label=f"{label}/{name}",
                          assistants=assistants, log=log, **chain_kwargs)
        cdir = run_dir / name
        results.append((s, cdir, assistants))
    best, best_dir, best_path = max(results, key=lambda r: r[0]["val_acc"])
    main = dist.is_main()  # under torchrun rank 0 alone writes
    for suffix in (".safetensors", ".json"):  # the JSON, which marks the model complete, last
        if main:
            atomic_copy(best_dir / f"{MODEL_STEM}{suffix}", run_dir / f"{MODEL_STEM}{suffix}")
    summary = dict(best, label=label, chosen=[n for n, _ in best_path], search=[
        {"via": [n for n, _ in a], "via_kwargs": [kw for _, kw in a], "val_acc": s["val_acc"],
         "test_acc": s["test_acc"]}
        for s, _, a in results
    ])
    log(f"  {label}: chose via {summary['chosen']} by validation accuracy "
        f"({best['val_acc']:.2f}%)")
    with dist.main_first():
        if main:
            atomic_write_json(run_dir / SUMMARY, summary)
    return summary
