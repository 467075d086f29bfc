"""The data-free recipe: record → synthesize → distil, or a generator, or noise.

:func:`build_transfer` turns a teacher into the training data of a data-free student run:

* ``record``: the teacher's metadata is recorded on its training data (in the data
  centre), then a transfer set is reconstructed from the record alone;
* ``deepinversion``: a transfer set optimised against the teacher's BN statistics;
* ``dafl``: a DAFL generator is trained against the teacher; the student then sees fresh
  generator samples every step;
* ``noise``: Gaussian-noise inputs labelled by the teacher (the floor).

Every product (record, batches, transfer set, generator) is saved in the run's
``transfer/`` folder, so a killed run resumes without redoing finished work. The
student's validation and test splits stay the real ones (for reporting only: nothing
is chosen on them). The work runs on the teacher's device (``build_transfer(device=...)``
moves the teacher there first); what is saved, and the transfer set returned, is on the CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.data import ArrayDataset, DatasetSplits
from kdkit.data.arrays import in_memory
from kdkit.datafree.common import DEFAULT_LR, DEFAULT_STEPS
from kdkit.datafree.dafl import GENERATOR_STEM, GeneratorLoader, dafl_generator
from kdkit.datafree.deepinversion import DI_BETAS, DeepInversionObjective
from kdkit.datafree.records import (
    MetadataRecord,
    RecordObjective,
    check_record_fits,
    compute_record,
    load_record,
    record_digest,
    record_stem,
    save_record,
    teacher_fingerprint,
)
from kdkit.datafree.synthesis import (
    TransferSet,
    load_transfer,
    noise_set,
    optimise_inputs,
    save_transfer,
)
from kdkit.errors import KdkitError
from kdkit.pipelines.runs import data_meta
from kdkit.train.device import module_device, resolve_device

SOURCES = ("record", "deepinversion", "dafl", "noise")


def make_record(
    teacher: nn.Module, train: ArrayDataset, num_classes: int, folder: Path, *, kind: str,
    temperature: float = 8.0, fraction: float = 0.1, dropout: float | None = None,
    layers: Sequence[str] | None = None, progress: bool = True,
) -> MetadataRecord:
    """Record ``teacher``'s metadata on ``train`` into ``folder`` (reused if already there
    with the same settings and teacher), on the teacher's device."""
    settings = {"record": kind, "temperature": temperature, "fraction": fraction,
                "dropout": dropout, "requested_layers": list(layers) if layers else None}
    if record_stem(folder).with_suffix(".json").exists():
        rec = load_record(folder)
        if all(rec.meta().get(k) == v for k, v in settings.items()):
            check_record_fits(rec, teacher, str(folder))
            return rec
    rec = compute_record(teacher, train.x, train.y, kind=kind, num_classes=num_classes,
                         temperature=temperature, layers=layers, fraction=fraction,
                         dropout=dropout, progress=progress)
    rec.extra["requested_layers"] = settings["requested_layers"]
    save_record(rec, folder)
    return rec


def check_transfer_fits(ts: TransferSet, data: DatasetSplits, source: str) -> None:
    """A transfer set must have the data's geometry, classes and normalisation."""
    want = data_meta(data)
    got = ts.meta.get("data", {})
    for key in ("input_shape", "num_classes"):
        if got.get(key) != want[key]:
            raise KdkitError(
                f"transfer set {source} was made for {key}={got.get(key)}, but '{data.name}' "
                f"has {key}={want[key]}; synthesize it again for this teacher and dataset"
            )
    for key in ("mean", "std"):
        if abs(float(got.get(key, float("nan"))) - want[key]) > 1e-6:
            raise KdkitError(
                f"transfer set {source} is normalised with {key}={got.get(key)}, but "
                f"'{data.name}' uses {want[key]:.6f}; synthesize it again for this dataset"
            )


def with_transfer(data: DatasetSplits, ts: TransferSet) -> DatasetSplits:
    """``data`` with its train split replaced by the transfer set (val and test kept).

    The source says so: ``kdkit eval --split train`` then refuses (the real train split is
    not what the student trained on), while the val and test splits stay rebuildable.
    """
    source = {**data.source, "train": "transfer set"} if data.source else {}
    return replace(data, train=ArrayDataset(ts.x, ts.y, f"{data.name}/transfer"), source=source)


def load_synthetic(
    path: str | Path, data: DatasetSplits, teacher: nn.Module | None = None
) -> DatasetSplits:
    """``data`` trained on the transfer set at ``path`` (``data: {synthetic: PATH}``).

    With ``teacher``, a set made from another teacher is refused.
    """
    ts = load_transfer(path)
    check_transfer_fits(ts, data, str(path))
    made_from = ts.meta.get("teacher")
    if teacher is not None and made_from and made_from != teacher_fingerprint(teacher):
        raise KdkitError(
            f"transfer set {path} was made from another teacher (fingerprint "
            f"{made_from[:12]}…); distil from that teacher, or make a set from this one"
        )
    return with_transfer(data, ts)


def build_transfer(
    source: str,
    *,
    teacher: nn.Module,
    teacher_data: DatasetSplits,
    data: DatasetSplits,
    folder: Path,
    seed: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
    samples: int = 10000,
    batch_size: int = 256,
    steps: int | None = None,
    lr: float | None = None,
    device: torch.device | str | None = None,
    **opts: Any,
) -> tuple[DatasetSplits, GeneratorLoader | None, dict[str, Any]]:
    """The student's data for a data-free run: (data with the transfer set as its train
    split, a generator loader for DAFL or None, facts for the run summary).

    ``opts`` are the source's own options (record: kind, temperature, fraction, dropout,
    layers, init_mean, init_std; deepinversion: the term weights and init; dafl: latent_dim,
    width, oh_weight, a_weight, ie_weight, steps_per_epoch).

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a :class:`torch.device`):
    the teacher is moved there first (it stays there), so the record, the synthesis and
    the generator's training run there; None: where the teacher already is. The device is
    not part of the settings: a set started on one device is continued on another.
    """
    if source not in SOURCES:
        raise KdkitError(f"unknown transfer source '{source}'; choose one of {', '.join(SOURCES)}")
    if device is not None:
        teacher.to(resolve_device(device))
    t0 = time.perf_counter()
    steps = steps or DEFAULT_STEPS.get(source, 0)
    lr = lr or DEFAULT_LR.get(source, 0.0)
    c, h, w = data.input_shape
    base = {"source": source, "data": data_meta(data), "seed": seed,
            "teacher": teacher_fingerprint(teacher)}
    info: dict[str, Any] = {"transfer": source}
    init: dict[str, Any] = {k: opts.pop(k) for k in ("init_mean", "init_std") if k in opts}
    if source == "noise":
        ts = load_transfer(folder) if (folder / "transfer.json").exists() else None
        want = json.loads(json.dumps(base))
        if ts is None or len(ts.y) != samples or any(ts.meta.get(k) != v
                                                     for k, v in want.items()):
            x, y = noise_set(teacher, samples=samples, input_shape=(c, h, w), seed=seed)
            ts = save_transfer(folder, x, y, base)  # replaces a set made otherwise
    elif source == "dafl":
        spe = opts.pop("steps_per_epoch", None) or max(1, samples // batch_size)
        generator = dafl_generator(
            teacher, folder, input_shape=(c, h, w), seed=seed, progress=progress,
            latent_dim=opts.get("latent_dim", 100), width=opts.get("width", 128),
            steps=steps, batch_size=batch_size, lr=lr,
            **{k: v for k, v in opts.items() if k.endswith("_weight")},
        )
        loader = GeneratorLoader(generator, teacher, latent_dim=opts.get("latent_dim", 100),
                                 batch_size=batch_size, steps_per_epoch=spe, seed=seed)
        gen_meta = json.loads((folder / f"{GENERATOR_STEM}.json").read_text())
        info.update(transfer_s=gen_meta.get("wall_s", 0.0),
                    generator_params=sum(p.numel() for p in generator.parameters()))
        return data, loader, info
    else:
        if source == "record":
            kind = opts.pop("kind")
            rec = make_record(teacher, in_memory(teacher_data.train, "a metadata record"),
                              data.num_classes, folder / "record",
                              kind=kind, progress=progress,
                              **{k: opts.pop(k) for k in ("temperature", "fraction", "dropout",
                                                          "layers") if k in opts})
            objective = RecordObjective(teacher, rec, str(folder / "record")).batch_loss
            info.update(record=kind, record_bytes=rec.size_bytes,
                        record_s=rec.extra.get("wall_s", 0.0))
            base.update(record=kind, record_sha256=record_digest(folder / "record"))
        else:
            objective = DeepInversionObjective(teacher, **opts)
            base["weights"] = opts
            init["betas"] = DI_BETAS
        ts = optimise_inputs(
            objective, out_dir=folder, samples=samples, num_classes=data.num_classes,
            input_shape=(c, h, w), mean=data.mean, std=data.std, meta=base,
            batch_size=batch_size, steps=steps, lr=lr, seed=seed, progress=progress,
            label=f"{source} synthesis", device=module_device(teacher), **init,
        )
        info["final_objective"] = ts.meta.get("final_loss_mean")
    # The time spent making the set, as recorded when it was made (a resumed run reuses it).
    made_s = ts.meta.get("synthesis_s", time.perf_counter() - t0)
    info.update(transfer_s=round(made_s + info.get("record_s", 0.0), 2),
                transfer_samples=len(ts.y))
    check_transfer_fits(ts, data, str(folder))
    log(f"  transfer set: {source}, {len(ts.y)} samples ({info['transfer_s']:.1f} s)")
    return with_transfer(data, ts), None, info
