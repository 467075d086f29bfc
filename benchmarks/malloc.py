"""Minor page faults and CPU time per step of one short training job, per malloc setting.

    .venv/bin/python benchmarks/malloc.py [--repeats 3] [--threads 1] [--out runs/bench-malloc]

The job: live KD from plain_cnn4 (teacher) to plain_cnn2 (student) on synthetic
Fashion-MNIST-sized data (1x28x28, 10 classes; random images: the speed, not the accuracy,
is measured), kdkit's own loop (``fit``) on the CPU. Each variant runs in a fresh process
that applies its malloc setting first thing (before torch is imported, as ``kdkit.cli.main``
would), trains, and reports from ``getrusage(RUSAGE_SELF)``: the minor page faults and the
user + system CPU seconds of the training alone (after one untimed warm-up step). Variants
alternate, ``--repeats`` times; the table gives the median of each. Writes malloc.json and
malloc.md in ``--out``.

Variants: ``default`` (glibc's defaults, ``KDKIT_MALLOC=default``) and ``tuned``
(:func:`kdkit._malloc.tune_allocator`); ``--all`` adds each setting alone, and the two
thresholds without the top pad.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MIB = 2**20
# name -> mallopt pairs (None: kdkit._malloc.tune_allocator(); (): nothing)
VARIANTS: dict[str, Any] = {"default": (), "tuned": None}
# (an mmap threshold above 32 MiB is ignored by glibc on 64-bit, though mallopt says yes)
SINGLE = {
    "mmap threshold 32 MiB only": ((-3, 32 * MIB),),
    "trim threshold 1 GiB only": ((-1, 1024 * MIB),),
    "top pad 64 MiB only": ((-2, 64 * MIB),),
    "mmap 32 MiB + trim 1 GiB (no top pad)": ((-3, 32 * MIB), (-1, 1024 * MIB)),
}


def child(variant: str, settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run the job in this (fresh) process; the malloc setting comes first."""
    from kdkit import _malloc

    if settings is None:
        applied = _malloc.tune_allocator()
    elif settings:
        applied = _malloc.apply_mallopt(tuple(tuple(p) for p in settings))
    else:
        applied = False
    import resource

    import torch

    from kdkit.data.arrays import ArrayDataset
    from kdkit.data.loader import BatchLoader
    from kdkit.distill import Distiller, build_method
    from kdkit.models import create_model
    from kdkit.train.loop import LoopSettings, fit

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    data = ArrayDataset(x, y, "synthetic-fashion")
    torch.manual_seed(1)
    teacher = create_model("plain_cnn4", num_classes=10, in_channels=1, input_size=28)
    student = create_model("plain_cnn2", num_classes=10, in_channels=1, input_size=28)
    terms = build_method("kd", student, {"teacher": teacher}, example_input=x[:2])
    distiller = Distiller(student, {"teacher": teacher}, terms)
    loader = BatchLoader(data, args.batch_size, shuffle=True, seed=0)
    settings_ = LoopSettings(epochs=1, lr=0.05, device="cpu")
    # one untimed step: first-touch costs of the model and optimiser are not the loop's
    warm = BatchLoader(data.subset(torch.arange(args.batch_size)), args.batch_size,
                       shuffle=False)
    fit(distiller, warm, settings_, progress=False)

    def usage() -> tuple[int, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_minflt, ru.ru_utime + ru.ru_stime

    flt0, cpu0 = usage()
    settings_ = LoopSettings(epochs=args.epochs, lr=0.05, device="cpu")
    res = fit(distiller, loader, settings_, progress=False)
    flt1, cpu1 = usage()
    steps = args.epochs * len(loader)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "variant": variant, "applied": applied, "steps": steps,
        "minor_faults": flt1 - flt0, "minor_faults_per_step": (flt1 - flt0) / steps,
        "minor_faults_process": ru.ru_minflt,
        "cpu_s": round(cpu1 - cpu0, 3), "cpu_ms_per_step": round(1000 * (cpu1 - cpu0) / steps, 3),
        "wall_s": round(res.wall_s, 3), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
    }


def run_variant(variant: str, settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
           and k not in ("KDKIT_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    if variant == "default":
        env["KDKIT_MALLOC"] = "default"
    job = json.dumps({"variant": variant, "settings": settings, "args": vars(args)})
    proc = subprocess.run([sys.executable, __file__, "--child", job], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    base = None
    for name, reps in runs.items():
        med = {k: statistics.median(r[k] for r in reps)
               for k in ("minor_faults", "minor_faults_per_step", "cpu_ms_per_step", "wall_s",
                         "peak_rss_mib")}
        med["applied"] = all(r["applied"] for r in reps)
        med["steps"] = reps[0]["steps"]
        if base is None:
            base = med
        med["cpu_per_step_vs_default"] = round(med["cpu_ms_per_step"] / base["cpu_ms_per_step"], 3)
        out[name] = med
    return out


def markdown(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Live KD plain_cnn4 -> plain_cnn2, {args.samples} synthetic 1x28x28 images, batch "
        f"{args.batch_size}, {args.epochs} epoch(s), {args.threads} thread(s), CPU; median of "
        f"{args.repeats} run(s) per variant (variants alternate)",
        "",
        "| malloc | applied | steps | minor faults | faults/step | CPU ms/step | "
        "× default | wall (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {name} | {'yes' if m['applied'] else 'no'} | {m['steps']} | "
            f"{m['minor_faults']:,.0f} | {m['minor_faults_per_step']:,.1f} | "
            f"{m['cpu_ms_per_step']:.2f} | {m['cpu_per_step_vs_default']:.3f} | "
            f"{m['wall_s']:.2f} | {m['peak_rss_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        job = json.loads(sys.argv[2])
        print(json.dumps(child(job["variant"], job["settings"], argparse.Namespace(**job["args"]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--all", action="store_true", help="add each setting alone, and the thresholds without the top pad")
    ap.add_argument("--out", default="runs/bench-malloc", help="output folder")
    args = ap.parse_args()
    variants = dict(VARIANTS, **(SINGLE if args.all else {}))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for rep in range(args.repeats):
        for name, settings in variants.items():
            r = run_variant(name, settings, args)
            runs[name].append(r)
            print(f"{name} (run {rep + 1}/{args.repeats}): {r['minor_faults']:,} faults, "
                  f"{r['cpu_ms_per_step']:.2f} CPU ms/step", flush=True)
    summary = summarise(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "malloc.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary, "runs": runs}, indent=2) + "\n")
    md = markdown(summary, args)
    (out / "malloc.md").write_text(md)
    print()
    print(md)
    print(f"-> {out}/malloc.json, {out}/malloc.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
