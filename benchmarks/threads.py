"""Wall time of `make run`'s job alone and beside another CPU-bound process, per thread policy.

    .venv/bin/python benchmarks/threads.py [--repeats 2] [--out runs/bench-threads]

Runs the built-in default experiment (`kdkit run --no-cache --no-progress`, teachers trained
every time) under each policy, first alone and then with one busy-looping process on the
machine, and writes threads.json and threads.md. The figure that matters is a ratio measured
in one run: the default policy beside a load, over `--threads 1` beside the same load.
Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {
    # name: (extra argv before the command, environment overrides). GOMP_SPINCOUNT, when
    # set, decides how long libgomp's idle threads spin before they sleep, whatever
    # OMP_WAIT_POLICY says; 300,000 spins (about 3 ms) is libgomp's own default, what
    # kdkit <= 0.1 ran with.
    "default": ([], {}),
    "threads 1": (["--threads", "1"], {}),
    "spin 3 ms (libgomp default, kdkit <= 0.1)": ([], {"GOMP_SPINCOUNT": "300000"}),
    "spin 0.1 ms": ([], {"GOMP_SPINCOUNT": "10000"}),
    "spin 10 us": ([], {"GOMP_SPINCOUNT": "1000"}),
}
HOG = "while True: pass"


def _run(argv: list[str], env: dict[str, str], out: Path) -> float:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                             "KDKIT_THREADS")}
    full_env.update(env)
    cmd = [sys.executable, "-m", "kdkit.cli", *argv, "run", "--out", str(out), "--force",
           "--no-cache", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=full_env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-threads")
    ap.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list[float]]] = {p: {"alone": [], "loaded": []} for p in args.policies}
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("alone", "loaded"):
            hog = subprocess.Popen([sys.executable, "-c", HOG]) if load == "loaded" else None
            try:
                for r in range(args.repeats):
                    for name in args.policies:  # round-robin: drifts hit every policy alike
                        argv, env = POLICIES[name]
                        secs = _run(argv, env, Path(tmp) / "run")
                        rows[name][load].append(secs)
                        print(f"{load:<6} {name:<36} repeat {r + 1}: {secs:6.1f} s", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    report = {
        "command": "kdkit run --no-cache --no-progress (built-in default experiment)",
        "cores": os.cpu_count(), "repeats": args.repeats, "load": f"python -c '{HOG}'",
        "seconds": rows,
        "median": {n: {k: statistics.median(v) for k, v in d.items()} for n, d in rows.items()},
    }
    base = report["median"].get("threads 1")
    lines = ["| policy | alone (s) | beside a CPU-bound process (s) | loaded / `--threads 1` loaded |",
             "|---|---|---|---|"]
    for name, med in report["median"].items():
        ratio = f"{med['loaded'] / base['loaded']:.2f}" if base else "-"
        lines.append(f"| {name} | {med['alone']:.1f} | {med['loaded']:.1f} | {ratio} |")
    lines.append("")
    lines.append(f"Median of {args.repeats} runs each, {report['cores']} cores; "
                 f"`python benchmarks/threads.py --repeats {args.repeats}`.")
    (out / "threads.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
