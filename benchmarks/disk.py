"""What reading images from disk costs: images/s of one training epoch from an image folder
(PNG files decoded by Pillow in DataLoader workers) against the same data in memory.

    python benchmarks/disk.py --data mnist --subset 10000 --out runs/bench-disk

Exports the dataset once as an image folder (``kdkit data export``), then trains the same
small CNN (plain_cnn2, batch 128, one thread for training) for one epoch per row: in memory
(BatchLoader), and from disk (DatasetLoader over FolderDataset) with 0, 1 and 2 workers.
Writes bench-disk.json and bench-disk.md; rows alternate over --repeats, the fastest kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdkit.cli import main as kdkit_main
from kdkit.data import load_dataset
from kdkit.data.folder import FolderDataset
from kdkit.data.loader import BatchLoader
from kdkit.data.stream import DatasetLoader
from kdkit.distill import Distiller, build_method
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, fit


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--subset", type=int, default=10000, help="training images timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-disk")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"{args.data}-images"
    if not folder.exists():
        t0 = time.perf_counter()
        assert kdkit_main(["data", "export", args.data, "--format", "imagefolder", "--out",
                           str(folder)]) == 0
        print(f"exported in {time.perf_counter() - t0:.1f} s")
    memory = load_dataset(f"folder:{folder}", val_fraction=0.0, seed=0)
    keep = torch.arange(args.subset)  # the first images of the (class-sorted) folder
    disk_all = FolderDataset(folder, mean=memory.mean, std=memory.std)
    disk = torch.utils.data.Subset(disk_all, keep.tolist())
    from kdkit.data.arrays import ArrayDataset

    in_memory = ArrayDataset(memory.train.x[keep], memory.train.y[keep], "memory")
    c, h, _ = memory.input_shape

    def epoch(loader: object) -> float:
        torch.manual_seed(0)
        m = create_model("plain_cnn2", num_classes=memory.num_classes, in_channels=c,
                         input_size=h)
        t0 = time.perf_counter()
        fit(Distiller(m, {}, build_method("ce", m)), loader,  # type: ignore[arg-type]
            LoopSettings(epochs=1, lr=0.05, device="cpu"), progress=False)
        return time.perf_counter() - t0

    rows = {"memory": lambda: BatchLoader(in_memory, 128, shuffle=True)}
    for w in (0, 1, 2):
        rows[f"disk, {w} worker(s)"] = lambda w=w: DatasetLoader(disk, 128, num_workers=w)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, make in rows.items():
            s = epoch(make())
            best[name] = min(best.get(name, s), s)
            print(f"{name}: {s:.2f} s")
    report = {"data": args.data, "images": args.subset, "repeats": args.repeats,
              "seconds": best,
              "images_per_s": {k: round(args.subset / v, 1) for k, v in best.items()}}
    (out / "bench-disk.json").write_text(json.dumps(report, indent=2))
    lines = [f"plain_cnn2 on {args.subset:,} {args.data} images (1x28x28 PNG files), batch 128, "
             f"1 training thread, one epoch, fastest of {args.repeats}", "",
             "| data path | s/epoch | images/s | × memory |", "|---|---|---|---|"]
    for k, v in best.items():
        lines.append(f"| {k} | {v:.2f} | {args.subset / v:,.0f} | {v / best['memory']:.2f} |")
    (out / "bench-disk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
