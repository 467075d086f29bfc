"""Transfer sets, and the batched input optimiser that reconstructs them.

A *transfer set* is what a student is distilled on when the original data is gone:
``transfer.safetensors`` (``x`` (N, C, H, W) normalised like the teacher's inputs, ``y``
(N,) the class each input was made for) + ``transfer.json`` (source, teacher fingerprint,
data geometry and normalisation, settings). ``data: {synthetic: PATH}`` in a config or
``kdkit distill --synthetic PATH`` trains on one.

:func:`optimise_inputs` makes one from any per-batch objective (a metadata record,
DeepInversion): each batch's inputs start from N(init_mean, init_std) in pixel space and
are optimised with Adam. Every draw of batch ``b`` comes from a generator seeded by
(seed, b), so the set is deterministic under its seed; each finished batch is saved at
once, so a killed synthesis resumes at the first unfinished batch. The inputs are optimised
on the objective's device (the teacher's); the draws are made on the CPU and moved there,
so they do not depend on it. Transfer sets are kept and saved on the CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.data.loader import derive_seed
from kdkit.datafree.common import LossWatch, StageProgress, cpu_tensors, replace_artifact
from kdkit.errors import CheckpointError, KdkitError
from kdkit.files import clean_stale_temps
from kdkit.train.checkpoint import atomic_write_json, load_checkpoint, read_json, save_checkpoint
from kdkit.train.device import module_device

TRANSFER_STEM = "transfer"
TRANSFER_FORMAT = "kdkit-transfer-set-1"
_BATCH_STREAM = 11
_NOISE_STREAM = 12

BatchLoss = Callable[[Tensor], Tensor]
BatchObjective = Callable[[Tensor, torch.Generator], BatchLoss]  # (labels, generator) -> loss


@dataclass
class TransferSet:
    """Synthetic inputs ``x`` (N, C, H, W), labels ``y`` (N,), and where they came from
    (on the CPU)."""

    x: Tensor
    y: Tensor
    meta: dict[str, Any]


def save_transfer(folder: Path, x: Tensor, y: Tensor, meta: dict[str, Any]) -> TransferSet:
    """Write ``folder/transfer.*``; an older set there is replaced safely (JSON removed first).

    ``x`` and ``y`` may be on any device; the set returned holds them on the CPU.
    """
    x, y = x.detach().cpu(), y.detach().cpu()
    replace_artifact(folder / TRANSFER_STEM, {"x": x.float(), "y": y.long()},
                    {"kind": "transfer-set", "transfer_format": TRANSFER_FORMAT,
                     "samples": len(y), **meta})
    return TransferSet(x, y, meta)


def load_transfer(path: str | Path) -> TransferSet:
    """Load a transfer set folder (or its ``transfer.json``); verify its SHA-256."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p / TRANSFER_STEM
    if not stem.with_suffix(".json").exists():
        raise CheckpointError(
            f"no transfer set at {stem}.json; make one with `kdkit datafree synthesize`, "
            "`deepinversion`, `dafl` or `noise`"
        )
    tensors, meta = load_checkpoint(stem)
    if meta.get("kind") != "transfer-set":
        raise CheckpointError(f"{stem}.json is not a kdkit transfer set ({TRANSFER_FORMAT})")
    return TransferSet(tensors["x"], tensors["y"], meta)


def balanced_labels(samples: int, num_classes: int) -> Tensor:
    """0, 1, ..., K−1, 0, 1, ...: every batch of K or more samples covers every class."""
    return torch.arange(samples) % num_classes


def objective_device(objective: Any) -> torch.device | None:
    """The device an objective computes on: its ``device`` attribute, or that of the object
    a bound method (``RecordObjective(...).batch_loss``) belongs to; None if it has none."""
    for owner in (objective, getattr(objective, "__self__", None)):
        device = getattr(owner, "device", None)
        if isinstance(device, (torch.device, str)):
            return torch.device(device)
    return None


def optimise_inputs(
    objective: BatchObjective,
    *,
    out_dir: Path,
    samples: int,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: float,
    std: float,
    meta: dict[str, Any],
    batch_size: int = 256,
    steps: int = 1000,
    lr: float = 0.07,
    betas: tuple[float, float] = (0.9, 0.999),
    init_mean: float = 0.15,
    init_std: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    label: str = "synthesize",
    device: torch.device | str | None = None,
) -> TransferSet:
    """Optimise ``samples`` inputs, ``batch_size`` at a time, for ``steps`` Adam steps each.

    The optimised variable is the pixel-space image p (so ``lr`` and the initialisation
    N(init_mean, init_std) mean the same whatever the normalisation); the objective sees
    the normalised input (p − mean) / std. Finished batches are kept in
    ``out_dir/batches``; a call on a folder holding some of them continues (the settings
    must match); the complete set is written to ``out_dir/transfer.*``.

    ``device``: where the inputs are optimised, and where the labels handed to
    ``objective`` are (default: the objective's ``device``, see :func:`objective_device`,
    else the CPU); it must be the teacher's. The initial inputs are drawn on the CPU and
    moved there, so they are the same on every device; NaN/inf is checked without reading
    the device at every step (see :class:`~kdkit.datafree.common.LossWatch`).
    """
    for name, v in (("samples", samples), ("batch_size", batch_size), ("steps", steps)):
        if v < 1:
            raise KdkitError(f"{label}: {name} must be >= 1, got {v}")
    if lr <= 0 or init_std < 0:
        raise KdkitError(f"{label}: lr must be > 0 and init_std >= 0 (got {lr}, {init_std})")
    settings = {
        "samples": samples, "num_classes": num_classes, "input_shape": list(input_shape),
        "mean": mean, "std": std, "batch_size": batch_size, "steps": steps, "lr": lr,
        "betas": list(betas), "init_mean": init_mean, "init_std": init_std, "seed": seed,
        **meta,
    }
    settings = json.loads(json.dumps(settings))
    dev = torch.device(device) if device is not None else objective_device(objective)
    dev = dev or torch.device("cpu")
    state_path = out_dir / "synthesis.json"
    if state_path.exists() and read_json(state_path, "synthesis settings") != settings:
        raise KdkitError(
            f"{out_dir} holds a synthesis with other settings ({state_path}); continue it "
            "with the same settings, or start over with --force"
        )
    if state_path.exists() and (out_dir / f"{TRANSFER_STEM}.json").exists():
        return load_transfer(out_dir)  # finished, with these very settings
    atomic_write_json(state_path, settings)
    for folder in (out_dir, out_dir / "batches"):  # temporaries of a killed synthesis
        clean_stale_temps(folder)
    y_all = balanced_labels(samples, num_classes)
    n_batches = math.ceil(samples / batch_size)
    done = [b for b in range(n_batches) if (out_dir / "batches" / f"b{b:05d}.json").exists()]
    bar = StageProgress(label, n_batches * steps, enabled=progress, initial=len(done) * steps)
    with bar:
        for b in range(n_batches):
            stem = out_dir / "batches" / f"b{b:05d}"
            if b in done:
                continue
            y = y_all[b * batch_size : (b + 1) * batch_size]
            gen = torch.Generator().manual_seed(derive_seed(seed, b, _BATCH_STREAM))
            pixels = init_mean + init_std * torch.randn((len(y), *input_shape), generator=gen)
            pixels = pixels.to(dev).requires_grad_(True)
            loss_fn = objective(y.to(dev), gen)
            opt = torch.optim.Adam([pixels], lr=lr, betas=betas)
            watch = LossWatch(dev)

            def finite(bad: tuple[int, float] | None, b: int = b) -> None:
                if bad is not None:
                    raise KdkitError(
                        f"{label}: the objective became {bad[1]} at batch {b} step {bad[0]}; "
                        "lower the learning rate (lr) or the prior weights"
                    )

            t0 = time.perf_counter()
            for step in range(steps):
                loss = loss_fn((pixels - mean) / std)
                finite(watch.see(loss, step))  # off the CPU: read at the check points
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                if step % 25 == 0:
                    finite(watch.first_bad())
                    bar.set_postfix(batch=f"{b + 1}/{n_batches}", loss=f"{watch.last():.4g}")
            finite(watch.first_bad())
            x = ((pixels.detach() - mean) / std).float()
            save_checkpoint(stem, cpu_tensors({"x": x, "y": y}),
                            {"final_loss": watch.last(), "batch": b,
                             "wall_s": time.perf_counter() - t0})
    xs, ys, losses, wall = [], [], [], 0.0
    for b in range(n_batches):
        tensors, m = load_checkpoint(out_dir / "batches" / f"b{b:05d}")
        xs.append(tensors["x"])
        ys.append(tensors["y"])
        losses.append(m["final_loss"])
        wall += m.get("wall_s", 0.0)
    final = {**settings, "final_loss_mean": sum(losses) / len(losses),
             "synthesis_s": round(wall, 2)}
    return save_transfer(out_dir, torch.cat(xs), torch.cat(ys), final)


def noise_set(
    teacher: nn.Module, *, samples: int, input_shape: tuple[int, int, int], seed: int,
    batch_size: int = 1000,
) -> tuple[Tensor, Tensor]:
    """The floor: standard Gaussian noise in normalised input space, labelled by the
    teacher's argmax (on the teacher's device). Returns x (N, C, H, W), y (N,), on the CPU."""
    if samples < 1:
        raise KdkitError(f"noise: samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(derive_seed(seed, _NOISE_STREAM))
    x = torch.randn((samples, *input_shape), generator=gen)
    teacher.eval()
    device = module_device(teacher)
    with torch.no_grad():
        y = torch.cat([teacher(x[i : i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, samples, batch_size)])
    return x, y
