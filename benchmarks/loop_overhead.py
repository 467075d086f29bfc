"""kdkit's fixed cost per training step, against the hand-written floor, where it shows most:
a tiny MLP on digits (a step is a fraction of a millisecond).

    python benchmarks/loop_overhead.py [--epochs 30] [--repeats 5]

Prints ms/step of the floor (kdkit.pipelines.bench.floor_fit) and of kdkit's fit on the same
batches, interleaved, with the median difference. One thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdkit.data import load_dataset
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, build_method
from kdkit.models import create_model
from kdkit.pipelines.bench import floor_fit
from kdkit.train.loop import LoopSettings, fit


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits", val_fraction=0.2, seed=0)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model("mlp", hidden=[32], input_size=8)

    steps = args.epochs * len(BatchLoader(data.train, 64, shuffle=True))
    floor, kdkit = [], []
    for _ in range(args.repeats):
        m = model()
        t0 = time.perf_counter()
        floor_fit(m, BatchLoader(data.train, 64, shuffle=True), epochs=args.epochs, lr=0.05,
                  momentum=0.9, weight_decay=5e-4, device=torch.device("cpu"))
        floor.append((time.perf_counter() - t0) / steps * 1e3)
        m = model()
        d = Distiller(m, {}, build_method("ce", m))
        t0 = time.perf_counter()
        fit(d, BatchLoader(data.train, 64, shuffle=True),
            LoopSettings(epochs=args.epochs, lr=0.05, device="cpu"), progress=False)
        kdkit.append((time.perf_counter() - t0) / steps * 1e3)
    f, k = statistics.median(floor), statistics.median(kdkit)
    print(f"{steps} steps a run, median of {args.repeats}: floor {f:.3f} ms/step, kdkit "
          f"{k:.3f} ms/step, kdkit's own cost {k - f:.3f} ms/step ({k / f:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
