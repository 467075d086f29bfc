"""Prove that no host synchronisation remains in kdkit's hot loop on a CUDA GPU.

Runs KD (ResNet-56 -> ResNet-20, CIFAR-sized random data) for one epoch under
``torch.cuda.set_sync_debug_mode("warn")``, after a warm-up epoch, and records every
synchronising CUDA call with the kdkit line that made it. Expected: only the loop's check
points (every CHECK_EVERY steps), the epoch end (metrics, validation) and nothing per step.

    python scripts/sync_check.py --out gpu-check/sync.json [--precision bf16]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    import torch

    from kdkit.data import load_dataset
    from kdkit.data.loader import BatchLoader
    from kdkit.distill import Distiller, build_method
    from kdkit.models import create_model
    from kdkit.train import loop
    from kdkit.train.loop import LoopSettings, fit

    data = load_dataset("fake_cifar10", val_fraction=0.1, seed=0)
    torch.manual_seed(0)
    teacher = create_model("resnet56", num_classes=10, in_channels=3, input_size=32)
    student = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    d = Distiller(student, {"teacher": teacher}, build_method("kd", student, {"teacher": teacher}))
    loader = BatchLoader(data.train, args.batch_size, shuffle=True, seed=0,
                         augment=None)
    settings = LoopSettings(epochs=1, lr=0.05, device="cuda", precision=args.precision)
    fit(d, loader, settings, progress=False)  # warm-up: allocations, cuDNN autotuning

    events: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "/kdkit/" in f.filename]
        where = (f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}"
                 if frames else f"{Path(filename).name}:{lineno}")
        events[where] += 1

    steps = len(loader)
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        fit(d, loader, settings, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    report = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "precision": args.precision, "steps": steps, "check_every": loop.CHECK_EVERY,
        "syncs_total": sum(events.values()),
        "syncs_per_step": round(sum(events.values()) / steps, 3),
        "images_per_s": round(steps * args.batch_size / wall, 1),
        "where": dict(events.most_common()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
