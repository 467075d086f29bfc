"""Datasets behind a registry, loaded into memory as normalised tensors with train/val/test splits.

``load_dataset("mnist")`` returns :class:`DatasetSplits`; :class:`BatchLoader` iterates one
split as whole-tensor batches, reproducibly and resumably. Text (``shakespeare``,
``text:PATH``) becomes windows of token ids: :mod:`kdkit.data.text`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdkit.data import fetch as _fetch_module  # not the function: it would shadow the module
from kdkit.data.arrays import (
    ArrayDataset,
    DatasetSplits,
    split_train_val,
    stratified_indices,
    take_subset,
)
from kdkit.data.augment import (
    Augment,
    Compose,
    HorizontalFlip,
    RandomCrop,
    RandomShift,
    build_augment,
)
from kdkit.data.cifar import load_cifar10, load_cifar100
from kdkit.data.fetch import EXPECTED_SHA256, verify
from kdkit.data.idx import read_idx_images, read_idx_labels, sha256_file
from kdkit.data.loader import BatchLoader, derive_seed
from kdkit.data.text import Vocab, is_text_name, load_text
from kdkit.errors import DataError
from kdkit.registry import Registry

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "Augment",
    "BatchLoader",
    "Compose",
    "DatasetSplits",
    "HorizontalFlip",
    "RandomCrop",
    "RandomShift",
    "RawData",
    "Vocab",
    "build_augment",
    "default_root",
    "derive_seed",
    "load_dataset",
    "load_text",
    "sha256_file",
    "split_train_val",
    "take_subset",
]

DIGITS_TEST_SEED = 20150309  # fixed, so digits' test set is the same for every run seed
DIGITS_TEST_FRACTION = 1 / 3
_VAL_STREAM = 1  # derive_seed tags: the val split and the subset use independent draws
_SUBSET_STREAM = 2


@dataclass(frozen=True)
class RawData:
    """A dataset as decoded from disk: integer pixels (N, C, H, W) and int64 labels (N,).

    ``pixel / scale`` is in [0, 1].
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    scale: float


DATASETS: Registry[RawData] = Registry("dataset")


def default_root() -> Path:
    """``$KDKIT_DATA`` if set, else ``~/.cache/kdkit/data``."""
    return Path(os.environ.get("KDKIT_DATA") or "~/.cache/kdkit/data").expanduser()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.array(a)).to(dtype)  # np.array: a writable copy


@DATASETS.register("digits", summary="scikit-learn digits: 1,797 8x8 grey images, 10 classes")
def _digits(root: Path) -> RawData:
    """scikit-learn digits (shipped in the wheel); a fixed stratified 1/3 is the test set."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.uint8))[:, None]  # (1797, 1, 8, 8), 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    test = stratified_indices(
        y, round(DIGITS_TEST_FRACTION * len(y)), DIGITS_TEST_SEED, balanced=False
    )
    is_train = torch.ones(len(y), dtype=torch.bool)
    is_train[test] = False
    return RawData(x[is_train], y[is_train], x[test], y[test], num_classes=10, scale=16.0)


def _idx_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train" or "t10k")."""
    images = read_idx_images(folder / f"{split}-images-idx3-ubyte")
    labels = read_idx_labels(folder / f"{split}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return _tensor(images, torch.uint8)[:, None], _tensor(labels, torch.int64)


def _idx_raw(name: str, root: Path) -> RawData:
    folder = Path(root) / name
    x_train, y_train = _idx_split(folder, "train")
    x_test, y_test = _idx_split(folder, "t10k")
    return RawData(x_train, y_train, x_test, y_test, num_classes=10, scale=255.0)


@DATASETS.register("mnist", summary="MNIST handwritten digits: 60k/10k 28x28 grey, 10 classes")
def _mnist(root: Path) -> RawData:
    """MNIST from verified IDX files in ``<root>/mnist``."""
    return _idx_raw("mnist", root)


@DATASETS.register(
    "fashion_mnist", summary="Fashion-MNIST clothing: 60k/10k 28x28 grey, 10 classes"
)
def _fashion_mnist(root: Path) -> RawData:
    """Fashion-MNIST from verified IDX files in ``<root>/fashion_mnist``."""
    return _idx_raw("fashion_mnist", root)


def _cifar_raw(arrays: tuple[np.ndarray, ...], num_classes: int) -> RawData:
    xtr, ytr, xte, yte = arrays
    return RawData(
        torch.from_numpy(xtr),
        torch.from_numpy(ytr),
        torch.from_numpy(xte),
        torch.from_numpy(yte),
        num_classes=num_classes,
        scale=255.0,
    )


@DATASETS.register("cifar10", summary="CIFAR-10 (binary version, user-supplied): 50k/10k 3x32x32")
def _cifar10(root: Path) -> RawData:
    """CIFAR-10 from ``<root>/cifar-10-batches-bin``."""
    return _cifar_raw(load_cifar10(root), 10)


@DATASETS.register(
    "cifar100", summary="CIFAR-100 (binary version, user-supplied): 50k/10k 3x32x32, fine labels"
)
def _cifar100(root: Path) -> RawData:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-binary``."""
    return _cifar_raw(load_cifar100(root), 100)


@DATASETS.register(
    "shakespeare", summary="Shakespeare's 42 works (37 plays, 5 poems; 5.1 MB text, 5.4 MB "
    "download), char (84) or byte tokens, split by work; code MIT; packaged texts CC-BY 2.5 "
    "(Open Knowledge Foundation); the works are public domain")
def _shakespeare(root: Path) -> RawData:
    """Text, not images: :func:`load_dataset` routes it to :func:`kdkit.data.text.load_text`."""
    raise DataError("'shakespeare' is a text dataset (windows of token ids, not images): "
                    "load it with load_dataset('shakespeare', context=..., vocab=...)")


FAKE_CIFAR_SIZES = (10_000, 2_000)  # train, test


@DATASETS.register(
    "fake_cifar10", summary="random 3x32x32 pixels and labels (10k/2k, 10 classes): for speed "
    "measurements only, nothing to learn")
def _fake_cifar10(root: Path) -> RawData:
    """CIFAR-shaped random data from a fixed seed: no files, no content (like torchvision's
    FakeData). Use it to time a pipeline where the real data is not at hand."""
    gen = torch.Generator().manual_seed(0)
    n_train, n_test = FAKE_CIFAR_SIZES
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    return RawData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=10,
                   scale=255.0)


def _pixel_stats(x: Tensor, scale: float) -> tuple[float, float]:
    """Exact scalar mean and std of ``x / scale`` for integer pixels, via a histogram."""
    counts = torch.bincount(x.flatten(), minlength=256).to(torch.float64).numpy()
    values = np.arange(len(counts), dtype=np.float64) / scale
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / n)
    return mean, var**0.5


def content_sha256(raw: RawData) -> str:
    """SHA-256 of a decoded dataset (pixels and labels of both splits, shapes, scale)."""
    h = hashlib.sha256(f"{raw.num_classes}:{raw.scale}".encode())
    for t in (raw.x_train, raw.y_train, raw.x_test, raw.y_test):
        t = t.contiguous()
        h.update(f";{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _load_raw(name: str, root: str) -> tuple[RawData, float, float, str]:
    """Decode ``name`` once per process; also its train-set pixel mean and std and its hash."""
    raw = DATASETS.create(name, root=Path(root))
    mean, std = _pixel_stats(raw.x_train, raw.scale)
    return raw, mean, std, content_sha256(raw)


_VERIFIED: set[tuple[str, str]] = set()  # (name, root) whose files passed SHA-256 this process


def _ensure_files(name: str, root: Path, download: bool, log: Callable[[str], None]) -> None:
    if name not in EXPECTED_SHA256 or (name, str(root)) in _VERIFIED:
        return
    if download:
        _fetch_module.fetch(name, root, log=log)
    else:
        problems = verify(name, root)
        if problems:
            raise DataError(
                f"{name} is not ready: {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                f"run `kdkit data fetch {name}` (files: {', '.join(EXPECTED_SHA256[name])})"
            )
    _VERIFIED.add((name, str(root)))


def _is_files(name: str) -> bool:
    from kdkit.data.folder import is_files_name

    return is_files_name(name)


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    train_subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    log: Callable[[str], None] = print,
    channels: int | None = None,
    resize: int | None = None,
    stream: bool = False,
    workers: int = 0,
    context: int = 128,
    vocab: str | Vocab = "char",
    task: str | None = None,
    noise: float | None = None,
) -> DatasetSplits:
    """Load ``name`` as normalised train/val/test tensors (``root`` defaults to default_root()).

    The val split is a stratified ``val_fraction`` of the train set; ``train_subset``
    then keeps a class-balanced subset of the rest. Both are deterministic under ``seed``;
    the test set never depends on it. Normalisation: scalar mean/std of the full train set.

    ``stream``: an image folder or listing stays on disk; the splits are
    :class:`~kdkit.data.stream.StreamDataset` (the same samples, labels and normalisation as
    in memory; images decoded when read, by ``workers`` DataLoader workers). The data's
    identity is then a hash of the listing and each file's size and mtime, not of pixels.

    Text (``shakespeare``, ``text:PATH``): :func:`~kdkit.data.text.load_text` with ``context``
    tokens per window and ``vocab`` ("char", "byte" or a :class:`Vocab`); its splits are fixed
    (by work, or 90/5/5 by position), so ``val_fraction`` does not apply; ``train_subset``
    keeps that many train windows.

    ``task``: what the data is for (None: what it holds, classification or language
    modelling). ``"denoise"`` turns images into noisy inputs and clean targets (Gaussian
    noise of σ ``noise`` on [0, 1] pixels, default 0.3; :mod:`kdkit.data.dense`).
    """
    from kdkit.tasks import TASKS

    if task is not None and task not in TASKS:
        raise DataError(f"task '{task}' is not one of {', '.join(TASKS)}")
    text = is_text_name(name)
    if task is not None and (task == "language_model") != text:
        raise DataError(f"task '{task}' does not fit '{name}', which holds "
                        f"{'text' if text else 'images'}: use "
                        f"{'language_model' if text else 'classify or denoise'} (or leave task out)")
    if noise is not None and task != "denoise":
        raise DataError(f"noise applies to task denoise only (the task here is "
                        f"{task or ('language_model' if text else 'classify')}); remove it")
    if task == "denoise":
        from kdkit.data.dense import DEFAULT_NOISE, to_denoise

        if stream:
            raise DataError("task denoise: dense tasks are made in memory; set stream to false")
        images = load_dataset(name, root=root, val_fraction=val_fraction,
                              train_subset=train_subset, seed=seed, download=download,
                              log=log, channels=channels, resize=resize)
        return to_denoise(images, DEFAULT_NOISE if noise is None else noise, seed)
    if text and not stream:
        if channels is not None or resize is not None:
            raise DataError(f"dataset '{name}' is text: channels and resize apply to images only")
        return load_text(name, root=root, context=context, vocab=vocab, seed=seed,
                         train_subset=train_subset, download=download, log=log)
    if stream:
        return _load_streamed(name, val_fraction=val_fraction,
                              train_subset=train_subset, seed=seed, log=log, channels=channels,
                              resize=resize, workers=workers)
    if _is_files(name):  # images on disk (folder:/csv:, kdkit.data.folder), not the registry
        from kdkit.data.folder import canonical_name, folder_path, load_folder

        name = canonical_name(name)  # absolute: the recorded name works from anywhere
        root_path = folder_path(name)
        raw, mean, std, digest = load_folder(name, log)
    else:
        DATASETS.get(name)  # unknown name -> KdkitError with suggestions
        root_path = Path(root if root is not None else default_root()).expanduser().resolve()
        _ensure_files(name, root_path, download, log)
        raw, mean, std, digest = _load_raw(name, str(root_path))

    x_tr, y_tr, x_val, y_val = split_train_val(
        raw.x_train, raw.y_train, val_fraction, derive_seed(seed, _VAL_STREAM)
    )
    if train_subset is not None:
        if not 0 < train_subset <= len(y_tr):
            raise DataError(
                f"train_subset={train_subset} but {name} has {len(y_tr)} training samples "
                f"after the validation split"
            )
        x_tr, y_tr = take_subset(x_tr, y_tr, train_subset, derive_seed(seed, _SUBSET_STREAM))

    def normalise(x: Tensor) -> Tensor:
        x = x.to(torch.float32, copy=True).div_(raw.scale).sub_(mean).div_(std)
        return reshape_images(x, channels, resize, name)

    shape = tuple(raw.x_train.shape[1:])
    shape = (channels or shape[0], resize or shape[1], resize or shape[2])
    adapted = {k: v for k, v in (("channels", channels), ("resize", resize)) if v is not None}
    return DatasetSplits(
        train=ArrayDataset(normalise(x_tr), y_tr, f"{name}/train"),
        val=ArrayDataset(normalise(x_val), y_val, f"{name}/val"),
        test=ArrayDataset(normalise(raw.x_test), raw.y_test.clone(), f"{name}/test"),
        num_classes=raw.num_classes,
        input_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        mean=mean,
        std=std,
        name=name,
        source={"name": name, "root": str(root_path), "seed": seed,
                "val_fraction": val_fraction, "train_subset": train_subset, "sha256": digest,
                **adapted},
    )


def _load_streamed(name: str, *, val_fraction: float,
                   train_subset: int | None, seed: int, log: Callable[[str], None],
                   channels: int | None, resize: int | None, workers: int) -> DatasetSplits:
    from kdkit.data.arrays import split_indices, subset_indices
    from kdkit.data.folder import (
        FolderDataset,
        canonical_name,
        files_identity,
        files_splits,
        folder_geometry,
        folder_path,
        is_files_name,
    )
    from kdkit.data.stream import StreamDataset, pixel_stats

    if not is_files_name(name):
        raise DataError(f"dataset '{name}' is decoded into memory; only image folders and "
                        "listings stream from disk (folder:PATH, csv:PATH): set stream to false")
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    name = canonical_name(name)
    classes, train_files, test_files = files_splits(name)
    identity = files_identity(name)
    # kept beside the registered datasets, never inside the user's folder (``root`` names
    # where registered datasets live; it means nothing to a folder: or csv: name)
    mean, std = pixel_stats(train_files, identity, workers=workers,
                            cache_dir=default_root() / "stats", log=log)
    y_all = torch.tensor([label for _, label in train_files], dtype=torch.long)
    train_idx, val_idx = split_indices(y_all, val_fraction, derive_seed(seed, _VAL_STREAM))
    if train_subset is not None:
        if not 0 < train_subset <= len(train_idx):
            raise DataError(f"train_subset={train_subset} but {name} has {len(train_idx)} "
                            "training samples after the validation split")
        train_idx = train_idx[subset_indices(y_all[train_idx], train_subset,
                                             derive_seed(seed, _SUBSET_STREAM))]
    base_train = FolderDataset.from_files(train_files, classes, mean=mean, std=std)
    base_test = FolderDataset.from_files(test_files, classes, mean=mean, std=std)
    y_test = torch.tensor([label for _, label in test_files], dtype=torch.long)
    common: dict[str, Any] = {"identity": identity, "channels": channels, "resize": resize,
                              "workers": workers}
    num_classes, shape = folder_geometry(name)
    shape = (channels or shape[0], resize or shape[1], resize or shape[2])
    adapted = {k: v for k, v in (("channels", channels), ("resize", resize)) if v is not None}
    return DatasetSplits(
        train=StreamDataset(base_train, train_idx, y_all[train_idx], f"{name}/train", **common),
        val=StreamDataset(base_train, val_idx, y_all[val_idx], f"{name}/val", **common),
        test=StreamDataset(base_test, torch.arange(len(test_files)), y_test, f"{name}/test",
                           **common),
        num_classes=num_classes,
        input_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        mean=mean, std=std, name=name,
        source={"name": name, "root": str(folder_path(name)), "seed": seed,
                "val_fraction": val_fraction, "train_subset": train_subset, "sha256": identity,
                "stream": True, **adapted},
    )


_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: colour to grey
_RESIZE_CHUNK = 2048


def reshape_images(x: Tensor, channels: int | None, resize: int | None, name: str) -> Tensor:
    """Images (N, C, H, W) with ``channels`` channels (grey repeated into 3, or colour
    averaged to grey with BT.601 weights) and ``resize`` x ``resize`` pixels (bilinear,
    antialiased), so the data fits a model instead of the model being edited."""
    c = x.shape[1]
    if channels is not None and channels != c:
        if c == 1:
            x = x.expand(-1, channels, -1, -1).contiguous()
        elif c == 3 and channels == 1:
            x = (x * torch.tensor(_LUMA).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataError(f"dataset '{name}': cannot turn {c} channels into {channels} "
                            "(grey -> any number, or colour -> 1)")
    if resize is not None and tuple(x.shape[2:]) != (resize, resize):
        import torch.nn.functional as F

        x = torch.cat([F.interpolate(x[i : i + _RESIZE_CHUNK], size=(resize, resize),
                                     mode="bilinear", align_corners=False, antialias=True)
                       for i in range(0, len(x), _RESIZE_CHUNK)]) if len(x) else x.new_empty(
            (0, x.shape[1], resize, resize))
    return x


def load_raw(name: str, *, root: str | Path | None = None, download: bool = True,
             log: Callable[[str], None] = print) -> RawData:
    """The integer pixels of ``name`` (registered, ``folder:PATH`` or ``csv:PATH``) as decoded, before any
    split or normalisation: what ``kdkit data export`` writes."""
    if is_text_name(name):
        raise DataError(f"'{name}' is a text dataset (windows of token ids): it has no images "
                        "to export; train on it with --data / data.name")
    if _is_files(name):
        from kdkit.data.folder import load_folder

        return load_folder(name, log)[0]
    DATASETS.get(name)  # unknown name -> KdkitError with suggestions
    root_path = Path(root if root is not None else default_root()).expanduser().resolve()
    _ensure_files(name, root_path, download, log)
    return _load_raw(name, str(root_path))[0]
