"""``kdkit bench``: what distillation costs, measured on one model pair and one dataset.

Rows, each trained from the same initialisation on the same batches and views:
plain student training (CE), KD with the live teacher, KD with the teacher-output cache,
a feature method (default: the overhaul) live and cached, and the teacher's forward pass
alone (what live KD adds at most). Optional rows: the plain student under
``torch.compile`` and in channels-last memory format. Each row runs in a fresh process, so
its peak memory (max RSS) is its own; training time per epoch excludes the validation pass
(timed apart) and is the median over epochs after the first, whose one-off costs (page
faults of a fresh cache, compilation) are reported apart as ``first_epoch_s``.
With ``repeats`` > 1 the rows run round-robin that many times and each keeps its fastest
repeat (the least disturbed by other load). Writes ``bench.json`` and ``bench.md`` (a
markdown table and the target ratios), rewritten after every row, so a crash or Ctrl-C keeps
the rows already measured.

Every row is built on the real models (and run on two training images) before anything is
trained or timed. When the default feature method does not fit the models (the overhaul
needs stages; an MLP has none), the first of :data:`FEATURE_FALLBACKS` that fits is timed
instead, and the report says so; a feature method the user chose that does not fit has its
rows skipped, with the reason in the table.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdkit.errors import KdkitError
from kdkit.files import atomic_write_bytes

if TYPE_CHECKING:
    from torch import Tensor, nn

    from kdkit.data import DatasetSplits
    from kdkit.distill import Distiller

# Target ratios of issue 6: cached KD within 10 % of plain training; live KD no slower than
# plain training plus one teacher forward pass.
CACHE_TARGET = 1.10
LIVE_TARGET = 1.00
# The feature method timed unless the user names one, and those tried in order when it does
# not fit the models: relational losses on the penultimate embedding fit any classifier with
# a linear head (an MLP included).
DEFAULT_FEATURE = "overhaul"
FEATURE_FALLBACKS = ("pkt", "rkd")


@dataclass
class BenchSpec:
    """One benchmark: a model pair, a dataset, a training budget."""

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
    threads: int = 1
    seed: int = 0
    repeats: int = 1


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # "teacher_forward" for the forward-only row
    cached: bool = False
    compile: bool = False
    channels_last: bool = False
    feature: bool = False  # a feature-method row (built with spec.feature_kwargs)


def bench_rows(spec: BenchSpec, feature: str | None = None) -> list[Row]:
    """The rows, with ``feature`` (default: the spec's, else DEFAULT_FEATURE) as the feature method."""
    feat = feature or spec.feature_method or DEFAULT_FEATURE
    rows = [Row("plain", "ce"), Row("teacher_forward", "teacher_forward"),
            Row("kd_live", "kd"), Row("kd_cache", "kd", cached=True),
            Row(f"{feat}_live", feat, feature=True),
            Row(f"{feat}_cache", feat, cached=True, feature=True)]
    if spec.compile:
        rows.append(Row("plain_compile", "ce", compile=True))
    if spec.channels_last:
        rows.append(Row("plain_channels_last", "ce", channels_last=True))
        rows.append(Row("kd_cache_channels_last", "kd", cached=True, channels_last=True))
    return rows


@dataclass
class BenchPlan:
    """What will be measured: the rows, the feature method timed, the rows skipped and why."""

    rows: list[Row]
    feature: str
    skipped: dict[str, str] = field(default_factory=dict)  # row name -> why it is not run
    note: str | None = None  # how the feature method was chosen, when not as asked


def _build_distiller(spec: BenchSpec, row: Row, student: nn.Module, teacher: nn.Module,
                     example: Tensor) -> Distiller:
    """The row's distiller, exactly as :func:`measure` trains it (raises KdkitError if unfit)."""
    from kdkit.distill import Distiller, build_method

    if row.channels_last:  # as train_one does: the student only
        student = student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    method = "kd" if row.method == "teacher_forward" else row.method
    kwargs = spec.feature_kwargs if row.feature else {}
    teachers = {} if method == "ce" else {"teacher": teacher}
    terms = build_method(method, student, teachers, example_input=example, **kwargs)
    return Distiller(student, teachers, terms)


def row_problem(spec: BenchSpec, row: Row, data: DatasetSplits, teacher: nn.Module) -> str | None:
    """Why ``row`` cannot run on these models (None when it can), found cheaply: the row's
    distiller is built on a fresh student and run on two training images, and a cached row's
    cache identity is computed (no training, no timing, no files)."""
    from kdkit.data.augment import build_augment
    from kdkit.pipelines.runs import build_model
    from kdkit.train.teacher_cache import CacheSettings, cache_identity

    x, y = data.train.x[:2], data.train.y[:2]
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
        distiller.eval()
        with torch.no_grad():
            distiller(x, y)
    except (KdkitError, RuntimeError) as e:
        return f"a forward pass on two training images fails: {e}"
    return None


def plan_bench(spec: BenchSpec, data: DatasetSplits, teacher: nn.Module, *,
               log: Any = print) -> BenchPlan:
    """Check every row against the models before anything is measured.

    A row without a feature method that cannot run is a configuration error (KdkitError).
    When the feature method does not fit: the default is replaced by the first of
    :data:`FEATURE_FALLBACKS` that fits; one the user chose has its rows skipped, with why.
    """
    asked = spec.feature_method or DEFAULT_FEATURE
    for row in bench_rows(spec, asked):
        if not row.feature:
            why = row_problem(spec, row, data, teacher)
            if why is not None:
                raise KdkitError(f"bench row {row.name} cannot run: {why}")

    def problems(feature: str) -> dict[str, str]:
        found = {}
        for row in bench_rows(spec, feature):
            if row.feature and (why := row_problem(spec, row, data, teacher)) is not None:
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
            settings=LoopSettings(epochs=spec.teacher_epochs, lr=spec.lr, seed=spec.seed),
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
        if reps:
            best = dict(min(reps, key=lambda r: r["epoch_s"]))
            best["repeats_epoch_s"] = [r["epoch_s"] for r in reps]
            results.append(best)
        elif row.name in plan.skipped:
            results.append({"row": row.name, "method": row.method, "cached": row.cached,
                            "skipped": plan.skipped[row.name]})
        elif row.name in failed:
            results.append({"row": row.name, "method": row.method, "cached": row.cached,
                            "failed": failed[row.name]})
    return results


def _write(out: Path, report: dict[str, Any]) -> None:
    atomic_write_bytes(out / "bench.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "bench.md", format_bench(report).encode())


def _in_subprocess(spec: BenchSpec, row: Row, out: Path) -> dict[str, Any]:
    """Measure ``row`` in a fresh process; a failure raises a one-line KdkitError (the
    process's full output is kept in ``bench-ROW.log``)."""
    job = json.dumps({"spec": asdict(spec), "row": asdict(row), "out": str(out)})
    proc = subprocess.run([sys.executable, "-m", "kdkit.pipelines.bench", job],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    last: Any = None
    if lines:
        try:
            last = json.loads(lines[-1])
        except ValueError:
            last = None
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


def measure(spec: BenchSpec, row: Row, out: Path) -> dict[str, Any]:
    """Train one row for ``spec.epochs`` epochs (in this process) and return its figures."""
    from kdkit.data import load_dataset
    from kdkit.data.augment import build_augment
    from kdkit.data.loader import BatchLoader
    from kdkit.pipelines.runs import build_model, load_teacher
    from kdkit.train.loop import LoopSettings, fit
    from kdkit.train.metrics import evaluate
    from kdkit.train.teacher_cache import CacheSettings, TeacherCache

    torch.set_num_threads(spec.threads)
    data = load_dataset(spec.data, root=spec.data_root, val_fraction=spec.val_fraction,
                        train_subset=spec.train_subset, seed=spec.seed, log=lambda _: None)
    assert spec.teacher_run is not None
    teacher = load_teacher(spec.teacher_run, data)
    student = build_model(spec.student, spec.student_kwargs, data, spec.seed)
    aug = build_augment(spec.augment, fill=data.black)
    views = spec.views if aug is not None else 1
    loader = BatchLoader(data.train, spec.batch_size, shuffle=True, seed=spec.seed,
                         augment=aug, views=views)
    distiller = _build_distiller(spec, row, student, teacher, data.train.x[:2])
    student = distiller.student
    method = "kd" if row.method == "teacher_forward" else row.method
    if row.compile:
        distiller.student = torch.compile(student)  # type: ignore[assignment]
    result: dict[str, Any] = {"row": row.name, "method": method, "cached": row.cached,
                              "train_samples": len(data.train), "views": views}
    if row.method == "teacher_forward":
        times = []
        for epoch in range(spec.epochs):
            t0 = time.perf_counter()
            for x, _y, _i in loader.epoch_batches(epoch):
                distiller.teacher_outputs(x)
            times.append(time.perf_counter() - t0)
        return _finish(result, times, len(data.train), [])
    cache = None
    if row.cached:
        t0 = time.perf_counter()
        cache = TeacherCache.open_or_build(
            out / "cache", distiller, data.train, aug,
            CacheSettings(views=views, dtype=spec.dtype),  # type: ignore[arg-type]
        )
        result["cache_open_s"] = round(time.perf_counter() - t0, 2)
        result["cache_build_s"] = cache.manifest.get("build_s")
        result["cache_mib"] = round(cache.nbytes / 2**20, 1)
    accs: list[float] = []
    res = fit(distiller, loader, LoopSettings(epochs=spec.epochs, lr=spec.lr, seed=spec.seed),
              progress=False, teacher_cache=cache,
              on_epoch=lambda rec: accs.append(evaluate(student, data.val.x, data.val.y)["acc"]))
    return _finish(result, [r["epoch_s"] for r in res.history], len(data.train), accs,
                   spec.target)


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


def _report(spec: BenchSpec, results: list[dict[str, Any]], plan: BenchPlan | None = None,
            *, complete: bool = True) -> dict[str, Any]:
    """The report: rows so far (measured, skipped or failed) and the ratios they allow."""
    feat = plan.feature if plan is not None else spec.feature_method or DEFAULT_FEATURE
    by = {r["row"]: r["epoch_s"] for r in results if "epoch_s" in r}
    plain = by.get("plain")
    for r in results:
        if "epoch_s" in r and plain:
            r["x_plain"] = round(r["epoch_s"] / plain, 3)
    fwd = by.get("teacher_forward")
    ratios: dict[str, float] = {}

    def ratio(name: str, num: str, den: float | None) -> None:
        if num in by and den:
            ratios[name] = round(by[num] / den, 3)

    ratio("kd_cache / plain", "kd_cache", plain)
    ratio("kd_cache_channels_last / plain_channels_last", "kd_cache_channels_last",
          by.get("plain_channels_last"))
    live_den = plain + fwd if plain is not None and fwd is not None else None
    ratio("kd_live / (plain + teacher_forward)", "kd_live", live_den)
    ratio(f"{feat}_cache / plain", f"{feat}_cache", plain)
    ratio(f"{feat}_live / (plain + teacher_forward)", f"{feat}_live", live_den)
    return {
        "spec": asdict(spec), "torch": torch.__version__, "threads": spec.threads,
        "feature_method": feat, "feature_note": plan.note if plan is not None else None,
        "complete": complete, "rows": results, "ratios": ratios,
        "targets": {"kd_cache / plain": CACHE_TARGET,
                    "kd_cache_channels_last / plain_channels_last": CACHE_TARGET,
                    "kd_live / (plain + teacher_forward)": LIVE_TARGET},
    }


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def format_bench(report: dict[str, Any]) -> str:
    """The report as a markdown table plus the target ratios."""
    s = report["spec"]
    target = s.get("target")
    measured = [r for r in report["rows"] if "epoch_s" in r]
    first = measured[0] if measured else {}
    samples = f"{first['train_samples']:,}" if "train_samples" in first else "?"
    lines = [
        f"{s['student']} from {s['teacher']} on {s['data']} "
        f"({samples} training images, batch {s['batch_size']}, "
        f"{s['epochs']} epochs, {report['threads']} thread(s), views {first.get('views', '?')}, "
        f"cache {s['dtype']}, fastest of {s.get('repeats', 1)} repeat(s))",
        "",
        "| row | s/epoch | images/s | × plain | first epoch (s) | peak RSS (MiB) | "
        f"val acc by epoch (%) | epochs to {target if target is not None else '-'}% | "
        "cache build (s) | cache (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "epoch_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('failed')}"
            lines.append(f"| {r['row']} | {_cell(why)} |" + " - |" * 8)
            continue
        accs = ", ".join(f"{a:.2f}" for a in r["val_acc"]) or "-"
        to_target = r.get("epochs_to_target")
        x_plain = f"{r['x_plain']:.2f}" if "x_plain" in r else "-"
        lines.append(
            f"| {r['row']} | {r['epoch_s']:.2f} | {r['images_per_s']:,.0f} | {x_plain} | "
            f"{r['first_epoch_s']:.2f} | {r['peak_rss_mib']:,.0f} | {accs} | "
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
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    """Measure one row (a job from :func:`_in_subprocess`); print its figures as JSON, or a
    KdkitError as ``{"error": message}`` (exit status 2) rather than a traceback."""
    job = json.loads(argv[1])
    try:
        figures = measure(BenchSpec(**job["spec"]), Row(**job["row"]), Path(job["out"]))
    except KdkitError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
