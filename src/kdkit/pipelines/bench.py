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
markdown table and the target ratios).
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
from typing import Any

import torch

from kdkit.errors import KdkitError

# Target ratios of issue 6: cached KD within 10 % of plain training; live KD no slower than
# plain training plus one teacher forward pass.
CACHE_TARGET = 1.10
LIVE_TARGET = 1.00


@dataclass
class BenchSpec:
    """One benchmark: a model pair, a dataset, a training budget."""

    data: str
    teacher: str
    student: str
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_method: str = "overhaul"
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


def bench_rows(spec: BenchSpec) -> list[Row]:
    rows = [Row("plain", "ce"), Row("teacher_forward", "teacher_forward"),
            Row("kd_live", "kd"), Row("kd_cache", "kd", cached=True),
            Row(f"{spec.feature_method}_live", spec.feature_method),
            Row(f"{spec.feature_method}_cache", spec.feature_method, cached=True)]
    if spec.compile:
        rows.append(Row("plain_compile", "ce", compile=True))
    if spec.channels_last:
        rows.append(Row("plain_channels_last", "ce", channels_last=True))
        rows.append(Row("kd_cache_channels_last", "kd", cached=True, channels_last=True))
    return rows


def run_bench(spec: BenchSpec, out: Path, *, log: Any = print) -> dict[str, Any]:
    """Train (or reuse) the teacher, measure every row in its own process, write the report."""
    from kdkit.data import load_dataset
    from kdkit.pipelines.runs import train_one
    from kdkit.train.loop import LoopSettings

    out.mkdir(parents=True, exist_ok=True)
    if spec.teacher_run is None:
        data = load_dataset(spec.data, root=spec.data_root, val_fraction=spec.val_fraction,
                            train_subset=spec.train_subset, seed=spec.seed, log=log)
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
    for rep in range(spec.repeats):
        for row in bench_rows(spec):
            res = _in_subprocess(spec, row, out)
            runs.setdefault(row.name, []).append(res)
            log(f"bench: {row.name} (repeat {rep + 1}/{spec.repeats}): {res['epoch_s']:.2f} "
                f"s/epoch, {res['images_per_s']:.0f} img/s, peak {res['peak_rss_mib']:.0f} MiB")
    results = []
    for reps in runs.values():
        best = dict(min(reps, key=lambda r: r["epoch_s"]))
        best["repeats_epoch_s"] = [r["epoch_s"] for r in reps]
        results.append(best)
    report = _report(spec, results)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(format_bench(report))
    return report


def _in_subprocess(spec: BenchSpec, row: Row, out: Path) -> dict[str, Any]:
    job = json.dumps({"spec": asdict(spec), "row": asdict(row), "out": str(out)})
    proc = subprocess.run([sys.executable, "-m", "kdkit.pipelines.bench", job],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise KdkitError(f"bench row {row.name} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def measure(spec: BenchSpec, row: Row, out: Path) -> dict[str, Any]:
    """Train one row for ``spec.epochs`` epochs (in this process) and return its figures."""
    from kdkit.data import load_dataset
    from kdkit.data.augment import build_augment
    from kdkit.data.loader import BatchLoader
    from kdkit.distill import Distiller, build_method
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
    example = data.train.x[:2]
    if row.channels_last:  # as train_one does: the student only
        student = student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    method = "kd" if row.method == "teacher_forward" else row.method
    kwargs = spec.feature_kwargs if method == spec.feature_method else {}
    teachers = {} if method == "ce" else {"teacher": teacher}
    terms = build_method(method, student, teachers, example_input=example, **kwargs)
    distiller = Distiller(student, teachers, terms)
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


def _report(spec: BenchSpec, results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["row"]: r for r in results}
    plain = by["plain"]["epoch_s"]
    for r in results:
        r["x_plain"] = round(r["epoch_s"] / plain, 3)
    fwd = by["teacher_forward"]["epoch_s"]
    feat = spec.feature_method
    ratios = {
        "kd_cache / plain": round(by["kd_cache"]["epoch_s"] / plain, 3),
        **({"kd_cache_channels_last / plain_channels_last": round(
            by["kd_cache_channels_last"]["epoch_s"] / by["plain_channels_last"]["epoch_s"], 3)}
           if "kd_cache_channels_last" in by else {}),
        "kd_live / (plain + teacher_forward)": round(by["kd_live"]["epoch_s"] / (plain + fwd), 3),
        f"{feat}_cache / plain": round(by[f"{feat}_cache"]["epoch_s"] / plain, 3),
        f"{feat}_live / (plain + teacher_forward)": round(
            by[f"{feat}_live"]["epoch_s"] / (plain + fwd), 3),
    }
    return {
        "spec": asdict(spec), "torch": torch.__version__, "threads": spec.threads,
        "rows": results, "ratios": ratios,
        "targets": {"kd_cache / plain": CACHE_TARGET,
                    "kd_cache_channels_last / plain_channels_last": CACHE_TARGET,
                    "kd_live / (plain + teacher_forward)": LIVE_TARGET},
    }


def format_bench(report: dict[str, Any]) -> str:
    """The report as a markdown table plus the target ratios."""
    s = report["spec"]
    target = s.get("target")
    lines = [
        f"{s['student']} from {s['teacher']} on {s['data']} "
        f"({report['rows'][0]['train_samples']:,} training images, batch {s['batch_size']}, "
        f"{s['epochs']} epochs, {report['threads']} thread(s), views {report['rows'][0]['views']}, "
        f"cache {s['dtype']}, fastest of {s.get('repeats', 1)} repeat(s))",
        "",
        "| row | s/epoch | images/s | × plain | first epoch (s) | peak RSS (MiB) | "
        f"val acc by epoch (%) | epochs to {target if target is not None else '-'}% | "
        "cache build (s) | cache (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        accs = ", ".join(f"{a:.2f}" for a in r["val_acc"]) or "-"
        to_target = r.get("epochs_to_target")
        lines.append(
            f"| {r['row']} | {r['epoch_s']:.2f} | {r['images_per_s']:,.0f} | {r['x_plain']:.2f} | "
            f"{r['first_epoch_s']:.2f} | {r['peak_rss_mib']:,.0f} | {accs} | "
            f"{'-' if to_target is None else to_target} | "
            f"{r.get('cache_build_s', '-')} | {r.get('cache_mib', '-')} |"
        )
    lines.append("")
    for name, value in report["ratios"].items():
        goal = report["targets"].get(name)
        verdict = "" if goal is None else (
            f" (target ≤ {goal:.2f}: {'met' if value <= goal else 'missed'})")
        lines.append(f"- {name} = {value:.3f}{verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    figures = measure(BenchSpec(**job["spec"]), Row(**job["row"]), Path(job["out"]))
    print(json.dumps(figures))
