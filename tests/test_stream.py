"""Any torch Dataset through DatasetLoader: the in-memory loader's batches, exact resume
that reads nothing before the resume point, workers, shards, per-sample augmentation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader
from kdkit.data.stream import DatasetLoader
from kdkit.distill import Distiller, build_method
from kdkit.errors import KdkitError
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, TrainingInterrupted, fit


class Decoding(Dataset):
    """A dataset that 'decodes' each item on access, and counts the accesses."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i].clone(), int(self.y[i])


def _student():
    torch.manual_seed(0)
    return create_model("mlp", hidden=[32], input_size=8)


def test_a_dataset_trains_to_the_in_memory_loaders_weights(digits):
    settings = LoopSettings(epochs=2, lr=0.1, seed=3, device="cpu")
    a, b = _student(), _student()
    fit(Distiller(a, {}, build_method("ce", a)),
        BatchLoader(digits.train, 64, shuffle=True, seed=1), settings, progress=False)
    fit(Distiller(b, {}, build_method("ce", b)),
        DatasetLoader(Decoding(digits.train.x, digits.train.y), 64, seed=1), settings,
        progress=False)
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_resume_reads_nothing_before_the_resume_point_and_is_exact(digits, tmp_path):
    aug = build_augment({"shift": 1}, fill=digits.black)
    settings = LoopSettings(epochs=2, lr=0.1, seed=3, device="cpu")
    full = _student()
    fit(Distiller(full, {}, build_method("ce", full)),
        DatasetLoader(Decoding(digits.train.x, digits.train.y), 64, augment=aug), settings,
        progress=False)
    first = _student()
    with pytest.raises(TrainingInterrupted):
        fit(Distiller(first, {}, build_method("ce", first)),
            DatasetLoader(Decoding(digits.train.x, digits.train.y), 64, augment=aug), settings,
            run_dir=tmp_path, progress=False, stop_after=20)
    data = Decoding(digits.train.x, digits.train.y)
    loader = DatasetLoader(data, 64, augment=aug)
    resumed = _student()
    fit(Distiller(resumed, {}, build_method("ce", resumed)), loader, settings,
        run_dir=tmp_path, resume=True, progress=False)
    assert len(loader) == 15  # 20 steps = the whole first epoch and 5 steps of the second
    assert data.reads == len(data) - 5 * 64  # the second epoch from its step 5 on, nothing more
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_workers_shards_and_augmentation_are_per_sample(digits):
    aug = build_augment({"shift": 1}, fill=digits.black)
    data = Decoding(digits.train.x, digits.train.y)
    serial = list(DatasetLoader(data, 64, augment=aug).epoch_batches(1))
    workers = list(DatasetLoader(data, 64, augment=aug, num_workers=2).epoch_batches(1))
    for (x0, y0, i0), (x1, y1, i1) in zip(serial, workers, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)
    parts = [list(DatasetLoader(data, 64, augment=aug).epoch_batches(1, shard=(r, 2)))
             for r in range(2)]
    for step, (x, y, i) in enumerate(serial):
        assert torch.equal(torch.cat([parts[0][step][0], parts[1][step][0]]), x)
        assert torch.equal(torch.cat([parts[0][step][1], parts[1][step][1]]), y)
        assert torch.equal(torch.cat([parts[0][step][2], parts[1][step][2]]), i)
    # the in-memory loader draws the same order
    memory = list(BatchLoader(digits.train, 64, shuffle=True, seed=0).epoch_batches(1))
    assert all(torch.equal(m[2], s[2]) for m, s in zip(memory, serial, strict=True))


def test_bad_datasets_are_one_clear_error(digits):
    class Triples(Decoding):
        def __getitem__(self, i):
            return self.x[i], 1, 2

    with pytest.raises(KdkitError, match=r"a dataset item must be a pair \(x, y\)"):
        next(iter(DatasetLoader(Triples(digits.train.x, digits.train.y), 8)))

    class Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(KdkitError, match="needs a map-style dataset"):
        DatasetLoader(Iterable(), 8)


def test_an_image_folder_streams_from_disk(digits, tmp_path):
    """Images read one by one from an exported folder are the in-memory dataset's pixels,
    and train through DatasetLoader with workers."""
    from kdkit.cli import main
    from kdkit.data import load_dataset
    from kdkit.data.folder import FolderDataset

    assert main(["data", "export", "digits", "--format", "imagefolder", "--out",
                 str(tmp_path / "imgs")]) == 0
    memory = load_dataset(f"folder:{tmp_path / 'imgs'}", val_fraction=0.0, seed=0)
    disk = FolderDataset(tmp_path / "imgs", mean=memory.mean, std=memory.std)
    assert len(disk) == len(memory.train) and disk.classes[:2] == ["0", "1"]
    x, y = disk[5]
    assert torch.allclose(x, memory.train.x[5], atol=1e-6) and y == int(memory.train.y[5])
    m = _student()
    res = fit(Distiller(m, {}, build_method("ce", m)), DatasetLoader(disk, 64, num_workers=2),
              LoopSettings(epochs=3, lr=0.1, device="cpu"), progress=False)
    assert res.history[-1]["train/acc"] > 50
