"""The training loop: method-agnostic, explicit, resumable.

Read it top to bottom: for each batch, ``out = distiller(x, y, progress=...)``,
``out["loss"].backward()``, step, log. Every random draw of a step (order, augmentation,
dropout) is a pure function of (seed, epoch, step), so a run resumed from its checkpoint
reaches bit-for-bit the same weights as one that was never stopped.
"""

from __future__ import annotations

import contextlib
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
from torch import Tensor, nn
from tqdm import tqdm

from kdkit import dist
from kdkit.data.loader import derive_seed
from kdkit.distill.distiller import Distiller, no_cache_message
from kdkit.errors import CheckpointError, KdkitError, NonFiniteLossError
from kdkit.files import atomic_write_bytes, clean_stale_temps
from kdkit.progress import progress_bar
from kdkit.tasks import is_dense, psnr_sum
from kdkit.train import tensorboard
from kdkit.train.checkpoint import (
    load_checkpoint,
    load_state,
    load_state_strict,
    optimizer_tensors,
    prev_path,
    restore_optimizer,
    save_state,
)
from kdkit.train.device import Precision, fits_on_device, nbytes, resolve_device, tree_to
from kdkit.train.metrics import evaluate
from kdkit.train.optim import build_optimizer, lr_at, set_lr
from kdkit.train.teacher_cache import TeacherCache

_DROPOUT_STREAM = 2  # keeps per-step torch seeds apart from the loader's streams
_TERM_STREAM = 3  # losses' own draws (CRD's negatives): the same seed on every rank


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
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    compile: bool = False  # torch.compile the student and teachers
    sync_bn: bool = False  # under DDP: BatchNorm statistics of the global batch
    global_batch_terms: bool = False  # under DDP: terms relating samples see the global batch


_LATER_SETTINGS = ("precision", "compile", "sync_bn", "global_batch_terms")


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
    loader: Any,
    settings: LoopSettings,
    *,
    val: tuple[Tensor, Tensor] | Any | None = None,
    batch_size: int = 64,
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

    The distiller (teachers included) and every batch go to ``settings.device``; the
    forward passes run under ``settings.precision``'s autocast. Under torchrun
    (``torch.distributed`` initialised), the trainable part is wrapped in DDP, each rank
    takes its share of every global batch, metrics are summed over ranks and rank 0 alone
    writes ``run_dir``.

    Args:
        loader: a :class:`~kdkit.data.loader.BatchLoader`, a
            :class:`~kdkit.data.stream.DatasetLoader`, or any map-style
            ``torch.utils.data.Dataset`` of ``(x, y)`` items (then read in shuffled batches
            of ``batch_size``, in an order drawn from ``settings.seed`` and the epoch).
        val: validation (x, y), or a dataset of ``(x, y)`` items, evaluated at the end of
            every epoch.
        run_dir: where ``metrics.jsonl`` and ``checkpoint/`` go (None: keep nothing).
        resume: continue from ``run_dir``'s checkpoint if it exists.
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
    if not hasattr(loader, "epoch_batches"):  # a plain Dataset: kdkit's order and batching
        from kdkit.data.stream import make_loader

        loader = make_loader(loader, batch_size, shuffle=True, seed=s.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise KdkitError(
            f"{label}: no training batches (dataset of {len(loader.dataset)} samples, "
            f"batch size {loader.batch_size}, drop_last={loader.drop_last})"
        )
    if teacher_cache is not None and distiller.second_view is not None:
        raise KdkitError(f"{label}: {no_cache_message(distiller.second_view)}")
    if teacher_cache is not None and loader.views != teacher_cache.views:
        raise KdkitError(
            f"{label}: the teacher cache holds {teacher_cache.views} view(s) per sample but the "
            f"loader draws views={loader.views}; build the loader with views={teacher_cache.views}"
        )
    world, rank = dist.world_size(), dist.rank()
    main = rank == 0
    if world > 1 and loader.batch_rows(steps_per_epoch - 1) < world:
        raise KdkitError(
            f"{label}: {world} processes share each batch of {loader.batch_size}, but the last "
            f"batch holds {loader.batch_rows(steps_per_epoch - 1)} sample(s); use a batch size "
            "that leaves every rank at least one sample (or fewer processes)")
    device = resolve_device(s.device)
    prec = Precision(s.precision, device)
    distiller.begin_fit(num_samples=len(loader.dataset), seed=derive_seed(s.seed, _TERM_STREAM))
    distiller.to(device)
    compiled = _compile(distiller, log) if s.compile else []
    loader.place(device)
    if teacher_cache is not None:
        teacher_cache.place(device)
    if isinstance(val, tuple) and fits_on_device(nbytes(*val), device):
        val = (val[0].to(device), val[1].to(device))
    total_steps = s.epochs * steps_per_epoch
    opt = build_optimizer(
        distiller.parameters(), s.optimizer, s.lr,
        momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov,
    )
    writes = run_dir is not None and main  # rank 0 alone writes
    if writes:
        assert run_dir is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, (run_dir / CHECKPOINT).parent):  # left by a killed process
            clean_stale_temps(folder)
    metrics_path = run_dir / "metrics.jsonl" if writes and run_dir else None
    ckpt_path = run_dir / CHECKPOINT if writes and run_dir else None
    result = FitResult()
    ident = json.loads(json.dumps({**(identity or {}), "loop": loop_identity(s),
                                   "steps_per_epoch": steps_per_epoch}, default=str))
    keys = ["loss", *distiller.metric_keys]  # terms, then extra scalars (CTKD's temperature)
    epoch, start_step, partial, wall_before = 0, 0, {}, 0.0
    found = None
    if resume and run_dir is not None:
        with dist.main_first():  # rank 0 may set an unreadable file aside; then all read
            found = _load_resume_state(run_dir)
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
            if meta.get("scaler"):
                prec.scaler.load_state_dict(meta["scaler"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{where}: its optimiser state does not fit this optimiser "
                                  f"({type(e).__name__}: {str(e)[:80]}); start over with "
                                  "--force") from None
        made_by = meta.get("processes", 1)
        if made_by != world and main and isinstance(made_by, int):
            print(f"kdkit: warning: {label}: resuming in {world} process(es) a checkpoint made "
                  f"in {made_by}: dropout masks and per-process BatchNorm statistics now differ "
                  "from an uninterrupted run", file=sys.stderr)
        epoch, start_step, partial = meta["epoch"], meta["step"], meta["partial"]
        result.history = meta["history"]
        wall_before = float(meta.get("wall_s", 0.0))
        if metrics_path is not None:
            _truncate_lines(metrics_path, meta["metrics_lines"])
        result.resumed_from = (epoch, start_step)
    elif writes and metrics_path is not None and run_dir is not None:
        # A fresh start: what an earlier run left here is not this run's (its checkpoints
        # would otherwise be rotated into this one's 'previous').
        metrics_path.unlink(missing_ok=True)
        for old in (run_dir / CHECKPOINT, prev_path(run_dir / CHECKPOINT)):
            old.unlink(missing_ok=True)
    dist.barrier()  # nobody starts before rank 0 has cleaned up

    t_start = time.perf_counter()
    dense = _dense_data(loader)
    check_every = check_interval(device, world)
    meter: _Meter | _HostMeter = (_HostMeter(keys, partial) if check_every == 1
                                  else _Meter(keys, device, partial if main else {}))

    def checkpoint(ep: int, st: int, part: dict[str, float]) -> None:
        nonlocal saved
        saved = True
        if ckpt_path is None:
            return
        opt_t, opt_meta = optimizer_tensors(opt)
        tensors = {f"model/{k}": v for k, v in distiller.state_dict().items()}
        tensors.update(opt_t)
        lines = len(metrics_path.read_text().splitlines()) if metrics_path and metrics_path.exists() else 0
        save_state(ckpt_path, tensors, {
            "epoch": ep, "step": st, "partial": part, "history": result.history,
            "optimizer": opt_meta, "identity": ident, "metrics_lines": lines, "label": label,
            "wall_s": wall_before + time.perf_counter() - t_start, "processes": world,
            **({"scaler": prec.scaler.state_dict()} if prec.scaler.is_enabled() else {}),
        })

    progress = progress and main
    bar = progress_bar(
        total=total_steps, initial=epoch * steps_per_epoch + start_step, desc=label,
        disable=not progress, leave=False, dynamic_ncols=True, unit="step", mininterval=0.5,
    )
    epoch_log = log if progress and bar.disable else None
    # Reading a value from the device waits for it; on one CPU process that costs nothing,
    # so the non-finite check and Ctrl-C run every step; elsewhere every CHECK_EVERY steps.
    global_batch = world > 1 and s.global_batch_terms
    tb = tensorboard.writer_for(run_dir) if writes else None
    if tb is not None:
        on_epoch = _also(tb.record, on_epoch)
    with contextlib.ExitStack() as stack:
        sig = stack.enter_context(_sigint_flag())
        stack.enter_context(bar)
        if tb is not None:
            stack.callback(tb.close)
        if s.sync_bn and world > 1:
            stack.enter_context(dist.sync_batchnorm(distiller, on_cuda=device.type == "cuda"))
        model = _wrap(distiller, device, world)
        distiller.train()
        while epoch < s.epochs:
            t_epoch = time.perf_counter()
            for step, (x, y, index) in enumerate(
                loader.epoch_batches(epoch, start_step, shard=(rank, world)), start=start_step
            ):
                gstep = epoch * steps_per_epoch + step
                seed_ints = (s.seed, epoch, step, _DROPOUT_STREAM) + ((rank,) if world > 1 else ())
                _seed_step(derive_seed(*seed_ints), device)
                prog = gstep / total_steps
                lr = lr_at(prog, s.lr, s.schedule, milestones=tuple(s.milestones),
                           gamma=s.gamma, warmup=s.warmup_epochs / s.epochs)
                set_lr(opt, lr)

                cached = None
                if teacher_cache is not None:
                    cached = tree_to(teacher_cache.lookup(index, loader.view_ids(epoch, index)),
                                     device)
                rows = loader.batch_rows(step)
                sizes = tuple(dist.shard_sizes(rows, world)) if global_batch else None
                with prec.autocast():
                    step_info = {"index": index, "seed": derive_seed(
                        s.seed, epoch, step, _TERM_STREAM)} if distiller.uses_step_info else {}
                    out = model(x, y, progress=prog, teacher_outputs=cached, global_batch=sizes,
                                **step_info)
                meter.add(out, y, gstep)
                dense = dense or is_dense(y)  # (a dtype: nothing is read from the device)
                last_of_epoch = step + 1 == steps_per_epoch
                if check_every == 1:
                    meter.check(distiller, epoch, saved)  # before the step: weights stay good
                loss = out["loss"]
                if world > 1 and len(y) * world != rows:  # shards of unequal size: weigh each
                    loss = loss * (len(y) * world / rows)  # so DDP's mean is the batch mean
                opt.zero_grad(set_to_none=True)
                prec.scaler.scale(loss).backward()
                if s.grad_clip is not None:
                    prec.scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(distiller.parameters(), s.grad_clip)
                prec.scaler.step(opt)
                prec.scaler.update()
                bar.update(1)
                done = gstep + 1
                stop = False
                if check_every == 1:
                    stop = sig["stop"]
                elif (step + 1) % check_every == 0 or last_of_epoch or (
                        stop_after is not None and done >= stop_after):
                    stop = meter.check(distiller, epoch, saved, stop=sig["stop"])
                if s.log_every and done % s.log_every == 0:
                    step_loss = meter.step_loss(out)
                    if metrics_path:
                        _append_jsonl(metrics_path, {"epoch": epoch, "step": step + 1, "lr": lr,
                                                     "train/loss": step_loss})
                    if tb is not None:
                        tb.record({"global_step": done, "lr": lr, "train/loss": step_loss})
                if stop or (stop_after is not None and done >= stop_after):
                    nxt_epoch, nxt_step = (epoch, step + 1)
                    sums = meter.totals()
                    if nxt_step == steps_per_epoch:  # epoch finished: log it first
                        _end_epoch(result, sums, epoch, lr, val, distiller, metrics_path,
                                   t_epoch, on_epoch, bar, epoch_log, label, s.epochs, dense)
                        nxt_epoch, nxt_step, sums = epoch + 1, 0, {}
                        meter.reset({})
                    checkpoint(nxt_epoch, nxt_step, sums)
                    dist.barrier()  # nobody exits (and gets rank 0 killed) mid-write
                    kept_in = (str((run_dir / CHECKPOINT).parent) if run_dir
                               else "(nowhere: no run dir)")
                    why = "interrupted (Ctrl-C)" if stop else f"stopped after {done} steps"
                    raise TrainingInterrupted(
                        f"{label}: {why} at epoch {nxt_epoch} step {nxt_step}; checkpoint saved "
                        f"in {kept_in}; continue with --resume"
                    )
            _end_epoch(result, meter.totals(), epoch, lr, val, distiller, metrics_path, t_epoch,
                       on_epoch, bar, epoch_log, label, s.epochs, dense)
            meter.reset({})
            epoch, start_step = epoch + 1, 0
            checkpoint(epoch, 0, {})
    dist.broadcast_state(distiller, buffers_only=True)  # every rank ends with rank 0's model
    for module in compiled:
        module._compiled_call_impl = None  # eager again (what Module.compile set)
    result.wall_s = wall_before + time.perf_counter() - t_start
    return result


def _compile(distiller: Distiller, log: Callable[[str], None] | None) -> list[nn.Module]:
    """torch.compile, in place (parameter names do not change), each network the method
    reads at its output only; a network whose inner layers are tapped stays eager (its
    compiled graph would not run the forward hooks that taps use), and ``log`` says so.
    Returns the compiled modules; :func:`fit` makes them eager again when it returns, so a
    later stage that taps them works."""
    from kdkit.taps import LOGITS

    nets = {"student": (distiller.student, list(distiller._student_taps.values()))}
    for name, teacher in distiller.teachers.items():
        nets[f"teacher '{name}'"] = (teacher, list(distiller._teacher_taps.get(name, {}).values()))
    eager, compiled = [], []
    for name, (module, taps) in nets.items():
        if all(t == LOGITS for t in taps) and getattr(module, "_compiled_call_impl", 1) is None:
            module.compile()
            compiled.append(module)
        else:
            eager.append(name)
    if eager and log is not None:
        log(f"compile: {', '.join(eager)} left uncompiled: the method reads inner layers "
            "(forward hooks), which compiled graphs skip")
    return compiled


def _seed_step(seed: int, device: torch.device) -> None:
    """Seed this step's random draws (dropout): the CPU generator, and the device's own.

    What ``torch.manual_seed`` does for the generators that matter here, without its cost
    (about 0.1 ms a call: it also seeds every accelerator backend lazily)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


CHECK_EVERY = 25  # steps between reads of the device's non-finite flags (off one CPU)


def check_interval(device: torch.device, world: int) -> int:
    """Steps between reads of the device (non-finite flags, Ctrl-C under DDP): every step in
    one CPU process, where a read costs nothing; else every CHECK_EVERY steps and at
    epoch ends, log points and step budgets."""
    return 1 if (device.type == "cpu" and world == 1) else CHECK_EVERY
_NEVER = 2**62  # "no bad step yet"


def _dense_data(loader: Any) -> bool:
    """Whether ``loader`` holds a dense task's float targets (known before the first batch,
    so an epoch resumed at its end still logs the right metric)."""
    y = getattr(getattr(loader, "dataset", None), "y", None)
    return isinstance(y, Tensor) and is_dense(y)


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    """Correct predictions in a batch: per sample, the fraction of its positions predicted
    right (a class label: 0 or 1; a token sequence: its next-token accuracy), summed. A
    dense task's score instead: each image's PSNR, summed (logged as ``train/psnr``)."""
    if is_dense(y):
        return psnr_sum(logits, y)
    hit = logits.detach().argmax(-1) == y
    return hit.reshape(len(y), -1).float().mean(1).sum()


class _Meter:
    """Per-epoch sums of the metrics, kept on the device (no host read per step).

    ``add`` accumulates samples, correct predictions and each term's value times the batch
    size, and remembers the first step at which each term was NaN/inf; ``check`` reads that
    (summed over ranks) and raises :class:`NonFiniteLossError` naming the term and step.
    """

    def __init__(self, keys: list[str], device: torch.device, partial: dict[str, float]
                 ) -> None:
        self.keys = keys
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.bad_at = torch.full((len(keys),), _NEVER, dtype=torch.long, device=device)
        self.bad_val = torch.zeros(len(keys), dtype=torch.float32, device=device)
        self.reset(partial)

    def reset(self, partial: dict[str, float]) -> None:
        names = ["n", "correct", *self.keys]
        self.sums = torch.tensor([float(partial.get(k, 0.0)) for k in names], dtype=self.dtype,
                                 device=self.device)
        self.extra = {k: v for k, v in partial.items() if k not in names}

    def add(self, out: dict[str, Tensor], y: Tensor, gstep: int) -> None:
        vals = torch.stack([out[k].detach().float() for k in self.keys])
        correct = _correct(out["logits"], y)
        b = float(len(y))  # (a Python number: adding it copies nothing to the device)
        self.sums[0] += b
        self.sums[1:] += torch.cat([correct.reshape(1).to(self.dtype), vals.to(self.dtype) * b])
        fresh = ~torch.isfinite(vals) & (self.bad_at == _NEVER)
        self.bad_at = torch.where(fresh, gstep, self.bad_at)
        self.bad_val = torch.where(fresh, vals, self.bad_val)

    def check(self, distiller: Distiller, epoch: int, saved: bool, stop: bool = False) -> bool:
        """Raise if a term went non-finite (on any rank); return whether any rank was
        asked to stop (Ctrl-C). Reads the device: call at check points only."""
        flags = torch.cat([self.bad_at, self.bad_at.new_tensor([_NEVER - int(stop)])])
        if dist.world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        host = flags.tolist()
        first = min(host[:-1])
        if first < _NEVER:
            local, vals = self.bad_at.tolist(), self.bad_val.tolist()
            order = [*range(1, len(self.keys)), 0]  # name a term before the total
            for i in order:
                if host[i] == first:  # the value is known where it happened (this rank?)
                    value = vals[i] if local[i] == first else float("nan")
                    raise NonFiniteLossError(self.keys[i], first, epoch, value,
                                             checkpoint_kept=saved)
        return host[-1] < _NEVER

    def step_loss(self, out: dict[str, Tensor]) -> float:
        """This step's loss, averaged over ranks (a log point: reads the device)."""
        v = out["loss"].detach().float().reshape(1)
        return float(dist.all_reduce_sum(v.clone()).item()) / dist.world_size()

    def totals(self) -> dict[str, float]:
        """The sums so far over every rank, as the checkpoint's ``partial`` holds them."""
        sums = dist.all_reduce_sum(self.sums.clone()).tolist()
        return {**self.extra, **dict(zip(["n", "correct", *self.keys], sums, strict=True))}


class _HostMeter:
    """:class:`_Meter` for one CPU process, where reading a value costs nothing: plain
    Python sums (float64), and the non-finite check on the values just read."""

    def __init__(self, keys: list[str], partial: dict[str, float]) -> None:
        self.keys = keys
        self.reset(partial)
        self._last: list[float] = []
        self._step = 0

    def reset(self, partial: dict[str, float]) -> None:
        self.sums: dict[str, float] = dict(partial) or {"n": 0.0, "correct": 0.0}

    def add(self, out: dict[str, Tensor], y: Tensor, gstep: int) -> None:
        b = float(len(y))
        sums = self.sums
        sums["n"] += b
        sums["correct"] += float(_correct(out["logits"], y))
        last = [float(out[k].detach()) for k in self.keys]
        for k, v in zip(self.keys, last, strict=True):
            sums[k] = sums.get(k, 0.0) + v * b
        self._last, self._step = last, gstep

    def check(self, distiller: Distiller, epoch: int, saved: bool, stop: bool = False) -> bool:
        if not all(map(math.isfinite, self._last)):
            for i in [*range(1, len(self.keys)), 0]:  # name a term before the total
                if not math.isfinite(self._last[i]):
                    raise NonFiniteLossError(self.keys[i], self._step, epoch, self._last[i],
                                             checkpoint_kept=saved)
        return stop

    def step_loss(self, out: dict[str, Tensor]) -> float:
        return float(out["loss"].detach())

    def totals(self) -> dict[str, float]:
        return dict(self.sums)


def _wrap(distiller: Distiller, device: torch.device, world: int) -> nn.Module:
    """The module the loop calls: under DDP the distiller's trainable part in DDP (its
    teachers are not registered, so DDP neither syncs nor sees them), else the distiller."""
    if world <= 1:
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    # DDP must be told when some parameters may get no gradient in a step: a term whose
    # weight can reach 0 skips its adapter, and a stage that reads no student logits (the
    # FitNets hint, AB's initialisation) leaves the student's later layers out.
    from kdkit.taps import LOGITS

    may_skip = any(callable(t.weight) or t.weight == 0 for t in distiller.terms) or not any(
        LOGITS in t.student_taps() for t in distiller.terms)
    # Buffers that every rank keeps identical by construction (CRD's memory banks, updated
    # from the gathered global batch) need not be broadcast from rank 0 at every forward.
    same_everywhere = [f"{name}.{b}" if name else b for name, m in distiller.named_modules()
                       for b in getattr(m, "ddp_identical_buffers", ())]
    if same_everywhere and hasattr(DistributedDataParallel,
                                   "_set_params_and_buffers_to_ignore_for_model"):
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            distiller, same_everywhere)
    return DistributedDataParallel(
        distiller, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=may_skip,
    )


def loop_identity(settings: LoopSettings) -> dict[str, Any]:
    """The loop settings that make a run what it is: not where it ran (``device``), and the
    settings added after kdkit 0.1 only when they differ from their defaults (so that runs
    made before them resume)."""
    d = _jsonable(settings)
    d.pop("device", None)
    defaults = _jsonable(LoopSettings())
    for k in _LATER_SETTINGS:
        if d.get(k) == defaults[k]:
            d.pop(k, None)
    return d


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
    val: tuple[Tensor, Tensor] | Any | None,
    distiller: Distiller,
    metrics_path: Path | None,
    t_epoch: float,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    bar: tqdm,
    epoch_log: Callable[[str], None] | None,
    label: str,
    epochs: int,
    dense: bool = False,
) -> None:
    n = max(1.0, sums.get("n", 0.0))
    rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
    for k, v in sums.items():
        if k not in ("n", "correct"):
            rec[f"train/{k}"] = v / n
    if dense:  # a dense task: the mean PSNR of the epoch's training images
        rec["train/psnr"] = sums.get("correct", 0.0) / n
    else:
        rec["train/acc"] = 100.0 * sums.get("correct", 0.0) / n
    if val is not None:
        # Under DDP each rank's BatchNorm statistics saw its own shard: all take rank 0's
        # (as DDP's next forward would), then each evaluates its share of the split.
        dist.broadcast_state(distiller, buffers_only=True)
        ev = evaluate(distiller.evaluated, *(val if isinstance(val, tuple) else (val,)),
                      distributed=True)
        for key in ("acc", "loss", "bpc", "psnr"):  # bpc: a language model; psnr: dense
            if key in ev:
                rec[f"val/{key}"] = ev[key]
        distiller.train()
    rec["epoch_s"] = round(time.perf_counter() - t_epoch, 3)
    result.history.append(rec)
    if metrics_path is not None:
        _append_jsonl(metrics_path, rec)
    shown, unit = (("val/psnr", " dB") if dense else ("val/bpc", " bpc") if "val/bpc" in rec
                   else ("val/acc", "%"))
    bar.set_postfix(loss=f"{rec['train/loss']:.3f}",
                    val=f"{rec[shown]:.1f}" if shown in rec else "-")
    if epoch_log is not None:
        val_text = f", val {rec[shown]:.2f}{unit}" if shown in rec else ""
        epoch_log(f"{label}: epoch {epoch + 1}/{epochs}, loss {rec['train/loss']:.4f}"
                  f"{val_text} ({rec['epoch_s']:.1f} s)")
    if on_epoch is not None:
        on_epoch(rec)


def _also(first: Callable[[dict[str, Any]], None],
          then: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """An epoch hook calling ``first``, then ``then`` (if any)."""
    def hook(rec: dict[str, Any]) -> None:
        first(rec)
        if then is not None:
            then(rec)
    return hook


def _jsonable(s: LoopSettings) -> dict[str, Any]:
    d = asdict(s)
    d["milestones"] = list(d["milestones"])
    return d
