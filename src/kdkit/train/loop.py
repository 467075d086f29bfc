"""The training loop: method-agnostic, explicit, resumable.

Read it top to bottom: for each batch, ``out = distiller(x, y, progress=...)``,
``out["loss"].backward()``, step, log. Every random draw of a step (order, augmentation,
dropout) is a pure function of (seed, epoch, step), so a run resumed from its checkpoint
reaches bit-for-bit the same weights as one that was never stopped.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from kdkit.data.loader import BatchLoader, derive_seed
from kdkit.distill.distiller import Distiller
from kdkit.errors import CheckpointError, KdkitError, NonFiniteLossError
from kdkit.files import atomic_write_bytes, clean_stale_temps
from kdkit.progress import progress_bar
from kdkit.train.checkpoint import (
    load_checkpoint,
    load_state,
    load_state_strict,
    optimizer_tensors,
    prev_path,
    restore_optimizer,
    save_state,
)
from kdkit.train.metrics import evaluate
from kdkit.train.optim import build_optimizer, lr_at, set_lr
from kdkit.train.teacher_cache import TeacherCache

_DROPOUT_STREAM = 2  # keeps per-step torch seeds apart from the loader's streams


class TrainingInterrupted(KdkitError):
    """Training stopped early (Ctrl-C or a step budget); a checkpoint was written."""


@dataclass
class LoopSettings:
    """Plain hyperparameters of one training run."""

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 0  # also log every N steps (0: only at epoch ends)


CHECKPOINT = Path("checkpoint") / "state.safetensors"  # inside the run directory
_LEGACY_CHECKPOINT = Path("checkpoint") / "last"  # kdkit <= 0.1: last.safetensors + last.json


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0  # summed over every process that worked on the run (resumes included)
    resumed_from: tuple[int, int] | None = None


def identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two run identities (JSON-like dicts)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({_short(a)} -> {_short(b)})")
    return out


def _short(v: Any, n: int = 40) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


@contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
    """First Ctrl-C sets a flag (the loop checkpoints at the next step); a second one aborts."""
    flag = {"stop": False}
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not in the main thread
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines (those the checkpoint had seen); atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != keep:
        atomic_write_bytes(path, "".join(lines[:keep]).encode())


def fit(
    distiller: Distiller,
    loader: BatchLoader,
    settings: LoopSettings,
    *,
    val: tuple[Tensor, Tensor] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    label: str = "train",
    stop_after: int | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    teacher_cache: TeacherCache | None = None,
    identity: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``distiller``'s trainable part on ``loader`` for ``settings.epochs`` epochs.

    Args:
        val: validation (x, y), evaluated at the end of every epoch.
        run_dir: where ``metrics.jsonl`` and ``checkpoint/`` go (None: keep nothing).
        resume: continue from ``run_dir/checkpoint/last`` if it exists.
        stop_after: stop, checkpoint and raise :class:`TrainingInterrupted` after this many
            global steps (a step budget; also how tests simulate a crash).
        teacher_cache: precomputed teacher outputs, looked up by (sample, view) instead of
            running the teachers; needs a loader in view mode with the cache's K views.
        identity: what the run is (model, method, teachers, data, ...): stored in every
            checkpoint, and a resume whose identity differs is refused naming what differs.
        log: where one line per epoch goes when there is no progress bar (stderr is not a
            terminal); None: nowhere.
    Raises:
        NonFiniteLossError: a term became NaN/inf; the last good checkpoint is kept.
        TrainingInterrupted: Ctrl-C or ``stop_after``; a checkpoint is written first.
    """
    s = settings
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise KdkitError(
            f"{label}: no training batches (dataset of {len(loader.dataset)} samples, "
            f"batch size {loader.batch_size}, drop_last={loader.drop_last})"
        )
    if teacher_cache is not None and loader.views != teacher_cache.views:
        raise KdkitError(
            f"{label}: the teacher cache holds {teacher_cache.views} view(s) per sample but the "
            f"loader draws views={loader.views}; build the loader with views={teacher_cache.views}"
        )
    total_steps = s.epochs * steps_per_epoch
    opt = build_optimizer(
        distiller.parameters(), s.optimizer, s.lr,
        momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov,
    )
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, (run_dir / CHECKPOINT).parent):  # left by a killed process
            clean_stale_temps(folder)
    metrics_path = run_dir / "metrics.jsonl" if run_dir else None
    ckpt_path = run_dir / CHECKPOINT if run_dir else None
    result = FitResult()
    ident = json.loads(json.dumps({**(identity or {}), "loop": _jsonable(s),
                                   "steps_per_epoch": steps_per_epoch}, default=str))

    epoch, start_step, partial, wall_before = 0, 0, {}, 0.0
    found = _load_resume_state(run_dir) if resume and run_dir is not None else None
    saved = found is not None
    if found is not None:
        tensors, meta, where = found
        _check_state(meta, where)
        if where.suffix == ".safetensors" and "identity" not in meta:
            raise CheckpointError(f"checkpoint {where} is malformed (no identity); start over "
                                  "with --force")
        if "identity" in meta:
            problems = identity_diff(meta["identity"], ident)
        else:  # kdkit 0.1 recorded only the loop settings: check what it can tell
            legacy = _legacy_identity(meta)
            problems = identity_diff(legacy, {k: ident[k] for k in legacy})
        if problems:
            raise CheckpointError(
                f"{label}: cannot resume from {where}: it belongs to another run; "
                f"{', '.join(problems[:6])}{' ...' if len(problems) > 6 else ''} differ. "
                "Resume with the same settings, or start over with --force (or another --out)"
            )
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        load_state_strict(distiller, model_state, str(where))
        try:
            restore_optimizer(opt, tensors, meta["optimizer"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{where}: its optimiser state does not fit this optimiser "
                                  f"({type(e).__name__}: {str(e)[:80]}); start over with "
                                  "--force") from None
        epoch, start_step, partial = meta["epoch"], meta["step"], meta["partial"]
        result.history = meta["history"]
        wall_before = float(meta.get("wall_s", 0.0))
        if metrics_path is not None:
            _truncate_lines(metrics_path, meta["metrics_lines"])
        result.resumed_from = (epoch, start_step)
    elif run_dir is not None and metrics_path is not None:
        # A fresh start: what an earlier run left here is not this run's (its checkpoints
        # would otherwise be rotated into this one's 'previous').
        metrics_path.unlink(missing_ok=True)
        for old in (run_dir / CHECKPOINT, prev_path(run_dir / CHECKPOINT)):
            old.unlink(missing_ok=True)

    t_start = time.perf_counter()

    def checkpoint(ep: int, st: int, part: dict[str, float]) -> None:
        nonlocal saved
        if ckpt_path is None:
            return
        opt_t, opt_meta = optimizer_tensors(opt)
        tensors = {f"model/{k}": v for k, v in distiller.state_dict().items()}
        tensors.update(opt_t)
        lines = len(metrics_path.read_text().splitlines()) if metrics_path and metrics_path.exists() else 0
        save_state(ckpt_path, tensors, {
            "epoch": ep, "step": st, "partial": part, "history": result.history,
            "optimizer": opt_meta, "identity": ident, "metrics_lines": lines, "label": label,
            "wall_s": wall_before + time.perf_counter() - t_start,
        })
        saved = True

    bar = progress_bar(
        total=total_steps, initial=epoch * steps_per_epoch + start_step, desc=label,
        disable=not progress, leave=False, dynamic_ncols=True, unit="step", mininterval=0.5,
    )
    epoch_log = log if progress and bar.disable else None
    distiller.train()
    with _sigint_flag() as sig, bar:
        while epoch < s.epochs:
            sums: dict[str, float] = dict(partial) or {"n": 0.0, "correct": 0.0}
            t_epoch = time.perf_counter()
            for step, (x, y, index) in enumerate(
                loader.epoch_batches(epoch, start_step), start=start_step
            ):
                gstep = epoch * steps_per_epoch + step
                torch.manual_seed(derive_seed(s.seed, epoch, step, _DROPOUT_STREAM))
                prog = gstep / total_steps
                lr = lr_at(prog, s.lr, s.schedule, milestones=tuple(s.milestones),
                           gamma=s.gamma, warmup=s.warmup_epochs / s.epochs)
                set_lr(opt, lr)

                cached = None
                if teacher_cache is not None:
                    cached = teacher_cache.lookup(index, loader.view_ids(epoch, index))
                out = distiller(x, y, progress=prog, teacher_outputs=cached)
                _check_finite(out, distiller, gstep, epoch, saved)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if s.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(distiller.parameters(), s.grad_clip)
                opt.step()

                b = float(len(y))
                sums["n"] += b
                sums["correct"] += float((out["logits"].detach().argmax(1) == y).sum())
                for k in ["loss", *(t.name for t in distiller.terms)]:
                    sums[k] = sums.get(k, 0.0) + float(out[k].detach()) * b
                bar.update(1)
                if s.log_every and (gstep + 1) % s.log_every == 0 and metrics_path:
                    _append_jsonl(metrics_path, {"epoch": epoch, "step": step + 1, "lr": lr,
                                                 "train/loss": float(out["loss"].detach())})
                done = gstep + 1
                if sig["stop"] or (stop_after is not None and done >= stop_after):
                    nxt_epoch, nxt_step = (epoch, step + 1)
                    if nxt_step == steps_per_epoch:  # epoch finished: log it first
                        _end_epoch(result, sums, epoch, lr, val, distiller, metrics_path,
                                   t_epoch, on_epoch, bar, epoch_log, label, s.epochs)
                        nxt_epoch, nxt_step, sums = epoch + 1, 0, {}
                    checkpoint(nxt_epoch, nxt_step, sums)
                    why = "interrupted (Ctrl-C)" if sig["stop"] else f"stopped after {done} steps"
                    raise TrainingInterrupted(
                        f"{label}: {why} at epoch {nxt_epoch} step {nxt_step}; checkpoint saved "
                        f"in {ckpt_path.parent if ckpt_path else '(nowhere: no run dir)'}; "
                        "continue with --resume"
                    )
            _end_epoch(result, sums, epoch, lr, val, distiller, metrics_path, t_epoch, on_epoch,
                       bar, epoch_log, label, s.epochs)
            epoch, start_step, partial = epoch + 1, 0, {}
            checkpoint(epoch, 0, {})
    result.wall_s = wall_before + time.perf_counter() - t_start
    return result


def _load_resume_state(
    run_dir: Path,
) -> tuple[dict[str, Tensor], dict[str, Any], Path] | None:
    """The run's newest readable checkpoint (or a kdkit 0.1 one), with where it came from."""
    path = run_dir / CHECKPOINT
    found = load_state(path, log=lambda m: print(m, file=sys.stderr))
    if found is not None:
        tensors, meta = found
        return tensors, meta, path
    legacy = run_dir / _LEGACY_CHECKPOINT
    if legacy.with_suffix(".json").exists():
        tensors, meta = load_checkpoint(legacy)
        return tensors, meta, legacy.with_suffix(".json")
    return None


def _check_state(meta: dict[str, Any], where: Path) -> None:
    """The JSON state of a checkpoint has the fields the loop reads, of the right types."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    problems = [k for k in ("epoch", "step", "metrics_lines") if not whole(meta.get(k))]
    partial = meta.get("partial")
    if not isinstance(partial, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in partial.values()):
        problems.append("partial")
    history = meta.get("history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        problems.append("history")
    optimizer = meta.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
            and isinstance(optimizer.get("scalars"), dict)):
        problems.append("optimizer")
    if "identity" in meta and not isinstance(meta["identity"], dict):
        problems.append("identity")
    if not isinstance(meta.get("wall_s", 0.0), (int, float)):
        problems.append("wall_s")
    if problems:
        raise CheckpointError(f"checkpoint {where} is malformed ({', '.join(problems)}); start "
                              "over with --force")


def _legacy_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """kdkit 0.1 checkpoints recorded only the loop settings and the steps per epoch."""
    return {"loop": meta.get("settings"), "steps_per_epoch": meta.get("steps_per_epoch")}


def _end_epoch(
    result: FitResult,
    sums: dict[str, float],
    epoch: int,
    lr: float,
    val: tuple[Tensor, Tensor] | None,
    distiller: Distiller,
    metrics_path: Path | None,
    t_epoch: float,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    bar: tqdm,
    epoch_log: Callable[[str], None] | None,
    label: str,
    epochs: int,
) -> None:
    n = max(1.0, sums.get("n", 0.0))
    rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
    for k, v in sums.items():
        if k not in ("n", "correct"):
            rec[f"train/{k}"] = v / n
    rec["train/acc"] = 100.0 * sums.get("correct", 0.0) / n
    if val is not None:
        ev = evaluate(distiller.student, *val)
        rec["val/acc"], rec["val/loss"] = ev["acc"], ev["loss"]
        distiller.train()
    rec["epoch_s"] = round(time.perf_counter() - t_epoch, 3)
    result.history.append(rec)
    if metrics_path is not None:
        _append_jsonl(metrics_path, rec)
    bar.set_postfix(loss=f"{rec['train/loss']:.3f}",
                    val=f"{rec['val/acc']:.1f}" if "val/acc" in rec else "-")
    if epoch_log is not None:
        val_text = f", val {rec['val/acc']:.2f}%" if "val/acc" in rec else ""
        epoch_log(f"{label}: epoch {epoch + 1}/{epochs}, loss {rec['train/loss']:.4f}"
                  f"{val_text} ({rec['epoch_s']:.1f} s)")
    if on_epoch is not None:
        on_epoch(rec)


def _check_finite(
    out: dict[str, Tensor], distiller: Distiller, gstep: int, epoch: int, saved: bool
) -> None:
    names = [t.name for t in distiller.terms]
    vals = torch.stack([out[n].detach().float() for n in names] + [out["loss"].detach().float()])
    if bool(torch.isfinite(vals).all()):
        return
    for name, v in zip([*names, "loss"], vals.tolist(), strict=True):
        if not math.isfinite(v):
            raise NonFiniteLossError(name, gstep, epoch, v, checkpoint_kept=saved)


def _jsonable(s: LoopSettings) -> dict[str, Any]:
    d = asdict(s)
    d["milestones"] = list(d["milestones"])
    return d
