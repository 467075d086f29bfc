"""``kdkit bench``: what distillation costs, measured on one model pair and one dataset.

Rows, each trained from the same initialisation on the same batches and views:
plain student training (CE), KD with the live teacher, KD with the teacher-output cache,
a feature method (default: the overhaul) live and cached, and the teacher's forward pass
alone (what live KD adds at most). Two **floor** rows time a minimal hand-written PyTorch
loop on the same job (:func:`floor_fit`: the same student initialisation, the same batches
from the same :class:`~kdkit.data.loader.BatchLoader`, SGD with the same lr, momentum,
weight decay and cosine schedule, cross-entropy; ``floor_kd`` adds one teacher forward under
``no_grad`` and the KD loss): what kdkit's loop costs over plain PyTorch is
``plain / floor`` and ``kd_live / floor_kd``.

The rows are made for each precision asked (fp32, bf16, fp16: autocast, as the loop runs
it) on one device (``auto``: a GPU when there is one); rows of another precision than fp32
carry its name (``plain_bf16``). With ``ddp`` = N the plain and live-KD rows are also run
under N processes (torchrun; gloo on CPUs, each process with ``threads`` threads), and the
report gives their scaling efficiency, images/s with N over N × images/s with one.

Optional rows: the plain student under ``torch.compile`` and in channels-last memory format.
Each row runs in a fresh process, so its peak memory (max RSS) is its own; training time
per epoch excludes the validation pass (timed apart) and is the median over epochs after
the first, whose one-off costs (page faults of a fresh cache, compilation) are reported apart
as ``first_epoch_s``. With ``repeats`` > 1 the rows run round-robin that many times and each
keeps its fastest repeat (the least disturbed by other load). Writes ``bench.json`` and
``bench.md`` (a markdown table and the target ratios), rewritten after every row, so a crash
or Ctrl-C keeps the rows already measured.

Every row is built on the real models (and run on two training images) before anything is
trained or timed. When the default feature method does not fit the models (the overhaul
needs stages; an MLP has none), the first of :data:`FEATURE_FALLBACKS` that fits is timed
instead, and the report says so; a feature method the user chose that does not fit has its
rows skipped, with the reason in the table.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kdkit.data.arrays import in_memory
from kdkit.errors import KdkitError
from kdkit.files import atomic_write_bytes

if TYPE_CHECKING:
    from torch import Tensor, nn

    from kdkit.data import DatasetSplits
    from kdkit.data.loader import BatchLoader
    from kdkit.distill import Distiller

# Target ratios. Issue 6: live KD no slower than plain training plus one teacher forward
# pass. "The fastest loop on each device": kdkit's plain loop and its live KD within 2 % of
# a hand-written PyTorch loop on the same job (the floor rows), cached KD within 5 % of plain.
CACHE_TARGET = 1.05
LIVE_TARGET = 1.00
FLOOR_TARGET = 1.02
# The KD of the kd rows and of the floor_kd row (Hinton's defaults in kdkit's "kd" method).
KD_TEMPERATURE = 4.0
KD_ALPHA = 0.9
# The feature method timed unless the user names one, and those tried in order when it does
# not fit the models: relational losses on the penultimate embedding fit any classifier with
# a linear head (an MLP included).
DEFAULT_FEATURE = "overhaul"
FEATURE_FALLBACKS = ("pkt", "rkd")


@dataclass
class BenchSpec:
    """One benchmark: a model pair, a dataset, a training budget, a device and precisions."""

    data: str
    teacher: str
    student: str
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_method: str | None = None  # None: DEFAULT_FEATURE, or a fallback that fits
    feature_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    val_fraction: float = 0.1
    train_subset: int | None = None
    epochs: int = 3
    teacher_epochs: int = 5
    teacher_run: str | None = None
    batch_size: int = 128
    lr: float = 0.05
    augment: dict[str, Any] | None = None
    views: int = 1
    dtype: str = "float16"
    target: float | None = None
    compile: bool = False
    channels_last: bool = False
    threads: int = 1  # per process (a DDP row's every process included)
    seed: int = 0
    repeats: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    ddp: int = 1  # > 1: the plain and live-KD rows also under this many processes
    # plain rows streaming a folder:/csv: dataset from disk, one per DataLoader worker count
    disk_workers: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # "teacher_forward" for the forward-only row
    cached: bool = False
    compile: bool = False
    channels_last: bool = False
    feature: bool = False  # a feature-method row (built with spec.feature_kwargs)
    precision: str = "fp32"
    floor: bool = False  # the hand-written PyTorch loop (method "ce" or "kd")
    processes: int = 1  # > 1: under DDP (torchrun)
    stream_workers: int | None = None  # streamed from disk with this many DataLoader workers


def _suffix(precision: str) -> str:
    return "" if precision == "fp32" else f"_{precision}"


def bench_rows(spec: BenchSpec, feature: str | None = None) -> list[Row]:
    """The rows, with ``feature`` (default: the spec's, else DEFAULT_FEATURE) as the feature
    method: one set per precision (rows of a precision other than fp32 end in ``_PREC``)."""
    feat = feature or spec.feature_method or DEFAULT_FEATURE
    rows: list[Row] = []
    for prec in spec.precisions:
        sfx = _suffix(prec)

        def row(name: str, method: str, sfx: str = sfx, prec: str = prec, **kw: Any) -> Row:
            return Row(name + sfx, method, precision=prec, **kw)

        rows += [row("plain", "ce"), row("floor", "ce", floor=True),
                 row("teacher_forward", "teacher_forward"),
                 row("kd_live", "kd"), row("floor_kd", "kd", floor=True),
                 row("kd_cache", "kd", cached=True),
                 row(f"{feat}_live", feat, feature=True),
                 row(f"{feat}_cache", feat, cached=True, feature=True)]
        if spec.ddp > 1:
            rows += [row(f"plain_ddp{spec.ddp}", "ce", processes=spec.ddp),
                     row(f"kd_live_ddp{spec.ddp}", "kd", processes=spec.ddp)]
        if spec.compile:
            rows.append(row("plain_compile", "ce", compile=True))
        if spec.channels_last:
            rows.append(row("plain_channels_last", "ce", channels_last=True))
            rows.append(row("kd_live_channels_last", "kd", channels_last=True))
            rows.append(row("kd_cache_channels_last", "kd", cached=True, channels_last=True))
        rows += [row(f"plain_disk_w{w}", "ce", stream_workers=w) for w in spec.disk_workers]
    return rows


@dataclass
class BenchPlan:
    """What will be measured: the rows, the feature method timed, the rows skipped and why."""

    rows: list[Row]
    feature: str
    skipped: dict[str, str] = field(default_factory=dict)  # row name -> why it is not run
    note: str | None = None  # how the feature method was chosen, when not as asked


def _method_kwargs(spec: BenchSpec, row: Row) -> dict[str, Any]:
    if row.feature:
        return spec.feature_kwargs
    if row.method in ("kd", "teacher_forward"):
        return {"temperature": KD_TEMPERATURE, "alpha": KD_ALPHA}
    return {}


def _build_distiller(spec: BenchSpec, row: Row, student: nn.Module, teacher: nn.Module,
                     example: Tensor) -> Distiller:
    """The row's distiller, exactly as :func:`measure` trains it (raises KdkitError if unfit)."""
    from kdkit.distill import Distiller, build_method

    if row.channels_last:  # as train_one does: the student and (live) the teacher
        student = student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        teacher = teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    method = "kd" if row.method == "teacher_forward" else row.method
    teachers = {} if method == "ce" else {"teacher": teacher}
    terms = build_method(method, student, teachers, example_input=example,
                         epochs=spec.epochs, **_method_kwargs(spec, row))
    return Distiller(student, teachers, terms)


def row_problem(spec: BenchSpec, row: Row, data: DatasetSplits, teacher: nn.Module) -> str | None:
    """Why ``row`` cannot run on these models (None when it can), found cheaply: the row's
    distiller is built on a fresh student and run on two training images as the loop runs
    it (``begin_fit`` on the training set, then the batch's sample indices and a step seed:
    CRD's memory bank needs them), and a cached row's cache identity is computed (no
    training, no timing, no files)."""
    from kdkit.data.augment import build_augment
    from kdkit.pipelines.runs import build_model
    from kdkit.train.teacher_cache import CacheSettings, cache_identity

    train = in_memory(data.train, "kdkit bench")
    x, y = train.x[:2], train.y[:2]
    try:
        student = build_model(spec.student, spec.student_kwargs, data, spec.seed)
        distiller = _build_distiller(spec, row, student, teacher, x)
        if row.cached:
            aug = build_augment(spec.augment, fill=data.black)
            views = spec.views if aug is not None else 1
            cache_identity(distiller, x, aug,
                           CacheSettings(views=views, dtype=spec.dtype))  # type: ignore[arg-type]
    except KdkitError as e:
        return str(e)
    try:
        distiller.begin_fit(num_samples=len(train), seed=spec.seed)
        distiller.eval()
        with torch.no_grad():
            distiller(x, y, index=torch.arange(len(x)), seed=spec.seed)
    except (KdkitError, RuntimeError) as e:
        return f"a forward pass on two training images fails: {e}"
    return None


def device_name(device: torch.device) -> str:
    """How a row names its device: ``cpu``, ``mps``, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def check_setup(spec: BenchSpec, train_samples: int) -> torch.device:
    """The device, each precision on it and the DDP rows' processes, checked before anything
    runs (one KdkitError naming the fix); returns the device."""
    from kdkit.train.device import PRECISIONS, check_precision, resolve_device

    device = resolve_device(spec.device)
    if not spec.precisions:
        raise KdkitError(f"bench: no precision to measure; give one or more of "
                         f"{', '.join(PRECISIONS)}")
    for prec in spec.precisions:
        check_precision(prec, device)
    if len(set(spec.precisions)) != len(spec.precisions):
        raise KdkitError(f"bench: precisions {spec.precisions} name one twice")
    n = spec.ddp
    if n > 1:
        if device.type == "mps":
            raise KdkitError("bench --ddp: DDP runs on CPUs (gloo) or CUDA GPUs (NCCL), not MPS; "
                             "use --device cpu")
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and n > gpus:
            fix = f"--ddp {gpus} or --device cpu" if gpus > 1 else "--device cpu"
            raise KdkitError(f"bench --ddp {n}: one process per GPU, and this machine has "
                             f"{gpus}; use {fix}")
        last = train_samples - (math.ceil(train_samples / spec.batch_size) - 1) * spec.batch_size
        if last < n:
            raise KdkitError(f"bench --ddp {n}: the last batch of {train_samples} images holds "
                             f"{last}, fewer than one per process; use another --batch-size")
    return device


def plan_bench(spec: BenchSpec, data: DatasetSplits, teacher: nn.Module, *,
               log: Any = print) -> BenchPlan:
    """Check every row against the models before anything is measured.

    A row without a feature method that cannot run is a configuration error (KdkitError).
    When the feature method does not fit: the default is replaced by the first of
    :data:`FEATURE_FALLBACKS` that fits; one the user chose has its rows skipped, with why.
    """
    device = check_setup(spec, len(data.train))
    cpus = os.cpu_count() or 1
    if spec.ddp > 1 and device.type == "cpu" and spec.ddp * spec.threads > cpus:
        log(f"bench: --ddp {spec.ddp} with {spec.threads} thread(s) per process asks for "
            f"more than the {cpus} cores here, so its scaling will look poor; use "
            f"kdkit --threads {max(1, cpus // spec.ddp)} bench ...")
    asked = spec.feature_method or DEFAULT_FEATURE
    checked: dict[tuple[Any, ...], str | None] = {}

    def problem(row: Row) -> str | None:
        # Rows that differ only in precision, processes or floor build the same distiller.
        key = (row.method, row.cached, row.compile, row.channels_last, row.feature)
        if key not in checked:
            checked[key] = row_problem(spec, row, data, teacher)
        return checked[key]

    for row in bench_rows(spec, asked):
        if not row.feature:
            why = problem(row)
            if why is not None:
                raise KdkitError(f"bench row {row.name} cannot run: {why}")

    def problems(feature: str) -> dict[str, str]:
        found = {}
        for row in bench_rows(spec, feature):
            if row.feature and (why := problem(row)) is not None:
                found[row.name] = why
        return found

    skipped = problems(asked)
    if not skipped:
        return BenchPlan(bench_rows(spec, asked), asked)
    first = next(iter(skipped.values()))
    pair = f"the student {spec.student} and the teacher {spec.teacher}"
    if spec.feature_method is not None:
        note = (f"the feature method {asked} (chosen with --feature-method) does not fit "
                f"{pair}, so its rows are skipped: {first}")
        log(f"bench: {note}")
        return BenchPlan(bench_rows(spec, asked), asked, skipped, note)
    for alt in FEATURE_FALLBACKS:
        if alt != asked and not problems(alt):
            note = (f"feature method {alt}: the default, {asked}, does not fit {pair} ({first}); "
                    "choose another with --feature-method")
            log(f"bench: {note}")
            return BenchPlan(bench_rows(spec, alt), alt, {}, note)
    note = (f"no feature method fits {pair}, so its rows are skipped: the default {asked}: "
            f"{first}; {', '.join(FEATURE_FALLBACKS)} do not fit either")
    log(f"bench: {note}")
    return BenchPlan(bench_rows(spec, asked), asked, skipped, note)


def run_bench(spec: BenchSpec, out: Path, *, log: Any = print) -> dict[str, Any]:
    """Check the rows, train (or reuse) the teacher, measure every row in its own process.

    ``bench.json`` and ``bench.md`` are rewritten (atomically) after every row; a row that
    fails leaves the rows measured before it there and raises a KdkitError.
    """
    from kdkit.data import load_dataset
    from kdkit.pipelines.runs import build_model, load_teacher, train_one
    from kdkit.train.loop import LoopSettings

    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(spec.data, root=spec.data_root, val_fraction=spec.val_fraction,
                        train_subset=spec.train_subset, seed=spec.seed, log=log)
    # The rows are checked on the teacher's architecture before it is trained: a row that
    # cannot run costs no training.
    teacher = (load_teacher(spec.teacher_run, data) if spec.teacher_run is not None
               else build_model(spec.teacher, spec.teacher_kwargs, data, spec.seed))
    plan = plan_bench(spec, data, teacher, log=log)
    if spec.teacher_run is None:
        log(f"bench: training the teacher {spec.teacher} ({spec.teacher_epochs} epochs; "
            "reused if already in the output folder)")
        t = train_one(
            run_dir=out / "teacher", label="teacher", data=data, model_name=spec.teacher,
            model_kwargs=spec.teacher_kwargs, method="ce", method_kwargs={}, teachers={},
            settings=LoopSettings(epochs=spec.teacher_epochs, lr=spec.lr, seed=spec.seed,
                                  device=spec.device),
            batch_size=spec.batch_size, augment=spec.augment, progress=False,
        )
        log(f"bench: teacher test accuracy {t['test_acc']:.2f}%")
        spec.teacher_run = str(out / "teacher")
    # Rows run round-robin, ``repeats`` times; each row keeps its fastest repeat, the one
    # least disturbed by whatever else the machine was doing (as timeit does).
    runs: dict[str, list[dict[str, Any]]] = {}
    todo = [row for row in plan.rows if row.name not in plan.skipped]
    for rep in range(spec.repeats):
        for i, row in enumerate(todo):
            try:
                res = _in_subprocess(spec, row, out)
            except KdkitError as e:
                _write(out, _report(spec, _results(plan, runs, {row.name: str(e)}), plan,
                                    complete=False))
                raise KdkitError(f"bench row {row.name} failed: {e}; the rows measured "
                                 f"before it are in {out / 'bench.json'}") from None
            runs.setdefault(row.name, []).append(res)
            log(f"bench: {row.name} (repeat {rep + 1}/{spec.repeats}): {res['epoch_s']:.2f} "
                f"s/epoch, {res['images_per_s']:.0f} img/s, peak {res['peak_rss_mib']:.0f} MiB")
            done = rep == spec.repeats - 1 and i == len(todo) - 1
            _write(out, _report(spec, _results(plan, runs), plan, complete=done))
    report = _report(spec, _results(plan, runs), plan)
    _write(out, report)
    return report


def _results(plan: BenchPlan, runs: dict[str, list[dict[str, Any]]],
             failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One entry per row so far, in the plan's order: measured (its fastest repeat),
    skipped (with why) or failed (with the error); rows not reached yet are left out."""
    failed = failed or {}
    results = []
    for row in plan.rows:
        reps = runs.get(row.name)
        about = {"row": row.name, "method": row.method, "cached": row.cached,
                 "precision": row.precision}
        if reps:
            best = dict(min(reps, key=lambda r: r["epoch_s"]))
            best["repeats_epoch_s"] = [r["epoch_s"] for r in reps]
            results.append(best)
        elif row.name in plan.skipped:
            results.append({**about, "skipped": plan.skipped[row.name]})
        elif row.name in failed:
            results.append({**about, "failed": failed[row.name]})
    return results


def _write(out: Path, report: dict[str, Any]) -> None:
    atomic_write_bytes(out / "bench.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "bench.md", format_bench(report).encode())


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _row_command(spec: BenchSpec, row: Row, job: str) -> list[str]:
    """The command that measures ``row``: this module in a fresh process, or under torchrun
    with ``row.processes`` processes (one machine, a free port)."""
    if row.processes <= 1:
        return [sys.executable, "-m", "kdkit.pipelines.bench", job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={row.processes}", "-m", "kdkit.pipelines.bench", job]


def _in_subprocess(spec: BenchSpec, row: Row, out: Path) -> dict[str, Any]:
    """Measure ``row`` in a fresh process (or ``row.processes`` of them under torchrun); a
    failure raises a one-line KdkitError (the full output is kept in ``bench-ROW.log``)."""
    job = json.dumps({"spec": asdict(spec), "row": asdict(row), "out": str(out)})
    # A row's processes make their own process group (or none), never the caller's.
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV
           and not k.startswith("TORCHELASTIC_")}
    if row.processes > 1:  # torchrun would set 1 itself, with a warning
        env["OMP_NUM_THREADS"] = str(spec.threads)
    proc = subprocess.run(_row_command(spec, row, job), capture_output=True, text=True,
                          env=env)
    last: Any = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            last = json.loads(line)
        except ValueError:
            continue
        break
    if proc.returncode == 0 and isinstance(last, dict) and "epoch_s" in last:
        return dict(last)
    if isinstance(last, dict) and "error" in last:
        raise KdkitError(str(last["error"]))  # a KdkitError in the row: its own message
    log = out / f"bench-{row.name}.log"
    atomic_write_bytes(log, f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                            f"--- stderr\n{proc.stderr}".encode())
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = err[-1].strip() if err else (
        f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
        else f"exit status {proc.returncode}")
    raise KdkitError(f"{why} (full output in {log})")


def floor_fit(student: nn.Module, loader: BatchLoader, *, epochs: int, lr: float,
              momentum: float, weight_decay: float, device: torch.device,
              precision: str = "fp32", teacher: nn.Module | None = None,
              temperature: float = KD_TEMPERATURE, alpha: float = KD_ALPHA,
              on_epoch: Callable[[], None] | None = None) -> list[float]:
    """The floor: the training loop one would write by hand in plain PyTorch, on kdkit's
    batches. Returns the seconds of each epoch (excluding ``on_epoch``).

    SGD (momentum, weight decay) with the learning rate annealed per step on a cosine from
    ``lr`` to 0, the forward passes under ``precision``'s autocast (fp16 with a GradScaler),
    cross-entropy in float32; with a ``teacher``, one teacher forward under ``no_grad`` and
    Hinton's loss ``(1 - alpha) * CE + alpha * T^2 * KL(p_t^T || p_s^T)``. Nothing else: no
    metrics, no checks, no checkpoints. On fp32 it trains exactly what kdkit's loop trains
    for ``ce`` (or ``kd``) with those settings, from the same initialisation and batches.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    loader.place(device)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    steps = len(loader)
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for step, (x, y, _index) in enumerate(loader.epoch_batches(epoch)):
            done = (epoch * steps + step) / (epochs * steps)
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * done))
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                logits = student(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
            loss = F.cross_entropy(logits.float(), y)
            if teacher is not None:
                kl = F.kl_div(F.log_softmax(logits.float() / temperature, dim=-1),
                              F.log_softmax(t_logits.float() / temperature, dim=-1),
                              reduction="batchmean", log_target=True)
                loss = (1 - alpha) * loss + alpha * (temperature**2 * kl)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch()
    return times


def measure(spec: BenchSpec, row: Row, out: Path) -> dict[str, Any]:
    """Train one row for ``spec.epochs`` epochs (in this process) and return its figures."""
    return _measure(spec, row, out)[0]


def _measure(spec: BenchSpec, row: Row, out: Path) -> tuple[dict[str, Any], nn.Module]:
    """:func:`measure`, also returning the trained student (or the teacher for the
    teacher-forward row)."""
    from kdkit import dist
    from kdkit.data import load_dataset
    from kdkit.data.augment import build_augment
    from kdkit.data.loader import BatchLoader
    from kdkit.pipelines.runs import build_model, load_teacher
    from kdkit.train.device import Precision, resolve_device
    from kdkit.train.loop import LoopSettings, fit
    from kdkit.train.metrics import evaluate
    from kdkit.train.teacher_cache import CacheSettings, TeacherCache

    torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    data = load_dataset(spec.data, root=spec.data_root, val_fraction=spec.val_fraction,
                        train_subset=spec.train_subset, seed=spec.seed, log=lambda _: None)
    train, val = in_memory(data.train, "kdkit bench"), in_memory(data.val, "kdkit bench")
    assert spec.teacher_run is not None
    teacher = load_teacher(spec.teacher_run, data)
    student = build_model(spec.student, spec.student_kwargs, data, spec.seed)
    aug = build_augment(spec.augment, fill=data.black)
    views = spec.views if aug is not None else 1
    loader: Any = BatchLoader(train, spec.batch_size, shuffle=True, seed=spec.seed,
                              augment=aug, views=views)
    if row.stream_workers is not None:  # the same samples and order, read from disk
        from kdkit.data.stream import DatasetLoader, StreamDataset

        streamed = load_dataset(spec.data, root=spec.data_root, val_fraction=spec.val_fraction,
                                train_subset=spec.train_subset, seed=spec.seed,
                                log=lambda _: None, stream=True)
        assert isinstance(streamed.train, StreamDataset)
        loader = DatasetLoader(streamed.train, spec.batch_size, shuffle=True, seed=spec.seed,
                               augment=aug, num_workers=row.stream_workers)
    method = "kd" if row.method == "teacher_forward" else row.method
    result: dict[str, Any] = {
        "row": row.name, "method": method, "cached": row.cached, "floor": row.floor,
        "device": device_name(device), "precision": row.precision,
        "processes": dist.world_size(), "threads": spec.threads,
        "train_samples": len(train), "views": views}
    settings = LoopSettings(epochs=spec.epochs, lr=spec.lr, seed=spec.seed, device=spec.device,
                            precision=row.precision)
    accs: list[float] = []

    def validate() -> None:
        if dist.is_main():
            accs.append(evaluate(student, val.x, val.y)["acc"])

    if row.floor:
        times = floor_fit(student, loader, epochs=settings.epochs, lr=settings.lr,
                          momentum=settings.momentum, weight_decay=settings.weight_decay,
                          device=device, precision=row.precision,
                          teacher=teacher if method == "kd" else None,
                          temperature=KD_TEMPERATURE, alpha=KD_ALPHA, on_epoch=validate)
        return _finish(result, times, len(train), accs, spec.target), student
    distiller = _build_distiller(spec, row, student, teacher, train.x[:2])
    student = distiller.student
    if row.compile:
        distiller.student = torch.compile(student)  # type: ignore[assignment]
    if row.method == "teacher_forward":
        distiller.to(device)
        loader.place(device)
        prec = Precision(row.precision, device)
        times = []
        for epoch in range(spec.epochs):
            t0 = time.perf_counter()
            for x, _y, _i in loader.epoch_batches(epoch):
                with prec.autocast():
                    distiller.teacher_outputs(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return _finish(result, times, len(train), []), teacher
    cache = None
    if row.cached:
        distiller.to(device)  # the cache is built where the teacher is
        t0 = time.perf_counter()
        cache = TeacherCache.open_or_build(
            out / "cache", distiller, train, aug,
            CacheSettings(views=views, dtype=spec.dtype),  # type: ignore[arg-type]
        )
        result["cache_open_s"] = round(time.perf_counter() - t0, 2)
        result["cache_build_s"] = cache.manifest.get("build_s")
        result["cache_mib"] = round(cache.nbytes / 2**20, 1)
    res = fit(distiller, loader, settings, progress=False, teacher_cache=cache,
              on_epoch=lambda rec: validate())
    return (_finish(result, [r["epoch_s"] for r in res.history], len(train), accs,
                    spec.target), student)


def _finish(result: dict[str, Any], times: list[float], n: int, accs: list[float],
            target: float | None = None) -> dict[str, Any]:
    # The first epoch pays one-off costs (page faults of a fresh cache, torch.compile), so
    # the per-epoch figure is the median of the later epochs; the first is reported apart.
    epoch_s = statistics.median(times[1:] if len(times) > 1 else times)
    result.update({
        "epoch_s": round(epoch_s, 3), "first_epoch_s": round(times[0], 3),
        "epoch_times_s": [round(t, 3) for t in times],
        "images_per_s": round(n / epoch_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "val_acc": [round(a, 2) for a in accs],
    })
    if target is not None and accs:
        hit = [i + 1 for i, a in enumerate(accs) if a >= target]
        result["epochs_to_target"] = hit[0] if hit else None
    return result


_DDP_ROW = re.compile(r"(?P<base>.+)_ddp(?P<n>\d+)(?P<sfx>.*)")


def _report(spec: BenchSpec, results: list[dict[str, Any]], plan: BenchPlan | None = None,
            *, complete: bool = True) -> dict[str, Any]:
    """The report: rows so far (measured, skipped or failed), the ratios they allow (each
    within one precision) and the scaling efficiency of the DDP rows."""
    feat = plan.feature if plan is not None else spec.feature_method or DEFAULT_FEATURE
    by = {r["row"]: r for r in results if "epoch_s" in r}
    secs = {name: r["epoch_s"] for name, r in by.items()}
    for r in results:
        plain = secs.get("plain" + _suffix(r.get("precision", "fp32")))
        if "epoch_s" in r and plain:
            r["x_plain"] = round(r["epoch_s"] / plain, 3)
    ratios: dict[str, float] = {}
    targets: dict[str, float] = {}

    def ratio(num: str, den: list[str], goal: float | None = None) -> None:
        name = f"{num} / {den[0]}" if len(den) == 1 else f"{num} / ({' + '.join(den)})"
        if goal is not None:
            targets[name] = goal
        if num in secs and all(secs.get(d) for d in den):
            ratios[name] = round(secs[num] / sum(secs[d] for d in den), 3)

    for prec in spec.precisions:
        s = _suffix(prec)
        ratio(f"plain{s}", [f"floor{s}"], FLOOR_TARGET)
        ratio(f"kd_live{s}", [f"floor_kd{s}"], FLOOR_TARGET)
        ratio(f"kd_cache{s}", [f"plain{s}"], CACHE_TARGET)
        ratio(f"kd_live{s}", [f"plain{s}", f"teacher_forward{s}"], LIVE_TARGET)
        ratio(f"kd_cache_channels_last{s}", [f"plain_channels_last{s}"], CACHE_TARGET)
        ratio(f"plain_channels_last{s}", [f"plain{s}"])
        ratio(f"kd_live_channels_last{s}", [f"kd_live{s}"])
        ratio(f"{feat}_cache{s}", [f"plain{s}"])
        ratio(f"{feat}_live{s}", [f"plain{s}", f"teacher_forward{s}"])
        for w in spec.disk_workers:
            ratio(f"plain_disk_w{w}{s}", [f"plain{s}"])
    # Scaling: images/s with N processes over N times images/s of the same row in one.
    scaling: dict[str, float] = {}
    for name, r in by.items():
        m = _DDP_ROW.fullmatch(name)
        single = by.get(m["base"] + m["sfx"]) if m else None
        if m and single and single["images_per_s"]:
            n = int(m["n"])
            eff = round(r["images_per_s"] / (n * single["images_per_s"]), 3)
            r["scaling_efficiency"] = eff
            scaling[f"{name} / ({n} × {m['base'] + m['sfx']})"] = eff
    return {
        "spec": asdict(spec), "torch": torch.__version__, "threads": spec.threads,
        "feature_method": feat, "feature_note": plan.note if plan is not None else None,
        "complete": complete, "rows": results, "ratios": ratios, "targets": targets,
        "scaling": scaling,
    }


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def format_bench(report: dict[str, Any]) -> str:
    """The report as a markdown table plus the target ratios and the DDP scaling."""
    s = report["spec"]
    target = s.get("target")
    measured = [r for r in report["rows"] if "epoch_s" in r]
    first = measured[0] if measured else {}
    samples = f"{first['train_samples']:,}" if "train_samples" in first else "?"
    alloc = {r.get("allocator") for r in measured} - {None}
    lines = [
        f"{s['student']} from {s['teacher']} on {s['data']} "
        f"({samples} training images, batch {s['batch_size']}, "
        f"{s['epochs']} epochs, {report['threads']} thread(s) per process, "
        f"views {first.get('views', '?')}, cache {s['dtype']}, "
        f"fastest of {s.get('repeats', 1)} repeat(s)"
        f"{', allocator ' + '/'.join(sorted(alloc)) if alloc else ''})",
        "",
        "| row | device | precision | processes | s/epoch | images/s | × plain | "
        "first epoch (s) | peak RSS (MiB) | "
        f"val acc by epoch (%) | epochs to {target if target is not None else '-'}% | "
        "cache build (s) | cache (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "epoch_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('failed')}"
            lines.append(f"| {r['row']} | {_cell(why)} |" + " - |" * 11)
            continue
        accs = ", ".join(f"{a:.2f}" for a in r["val_acc"]) or "-"
        to_target = r.get("epochs_to_target")
        x_plain = f"{r['x_plain']:.2f}" if "x_plain" in r else "-"
        lines.append(
            f"| {r['row']} | {_cell(str(r.get('device', '-')))} | {r.get('precision', '-')} | "
            f"{r.get('processes', 1)} | {r['epoch_s']:.3f} | {r['images_per_s']:,.0f} | "
            f"{x_plain} | {r['first_epoch_s']:.2f} | {r['peak_rss_mib']:,.0f} | {accs} | "
            f"{'-' if to_target is None else to_target} | "
            f"{r.get('cache_build_s', '-')} | {r.get('cache_mib', '-')} |"
        )
    lines.append("")
    if report.get("feature_note"):
        lines.append(f"- {_cell(report['feature_note'])}")
    if not report.get("complete", True):
        lines.append("- incomplete: the rows not listed were not measured")
    for name, value in report["ratios"].items():
        goal = report["targets"].get(name)
        verdict = "" if goal is None else (
            f" (target ≤ {goal:.2f}: {'met' if value <= goal else 'missed'})")
        lines.append(f"- {name} = {value:.3f}{verdict}")
    for name, value in report.get("scaling", {}).items():
        lines.append(f"- scaling efficiency {name} = {value:.3f} (images/s; 1.0 is linear)")
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    """Measure one row (a job from :func:`_in_subprocess`); print its figures as JSON, or a
    KdkitError as ``{"error": message}`` (exit status 2) rather than a traceback. Under
    torchrun every process trains and rank 0 prints."""
    from kdkit import dist
    from kdkit._malloc import tune_allocator

    tuned = tune_allocator()
    job = json.loads(argv[1])
    main = os.environ.get("RANK", "0") == "0"
    ok = False
    try:
        dist.init_from_env()
        figures = measure(BenchSpec(**job["spec"]), Row(**job["row"]), Path(job["out"]))
        figures["allocator"] = "tuned" if tuned else "default"
        ok = True
    except KdkitError as e:
        if main:
            print(json.dumps({"error": str(e)}), flush=True)
        return 2
    finally:
        if dist.is_initialized():
            # Every rank waits for the others before closing its connections: a rank that
            # closes while a peer still holds them can make that peer abort (gloo).
            if ok:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    if main:
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    status = _main(sys.argv)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        # Under DDP the figures are printed and the process group is gone, but the
        # interpreter's own teardown can still abort (gloo's threads against objects freed
        # late: about one run in fifteen, whatever the allocator); nothing is left to do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
