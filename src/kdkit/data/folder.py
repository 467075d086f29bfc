"""Datasets as image files: ``folder:PATH`` reads a folder of class sub-folders, ``csv:PATH``
a listing file (:mod:`kdkit.data.listing`); ``kdkit data export`` writes a folder.

The folder layout is torchvision's ImageFolder, once per split::

    PATH/train/<class>/<anything>.png|jpg|jpeg
    PATH/test/<class>/...            (optional)

Classes are the folder names of ``train/``, sorted; their position is the label. Samples are
ordered by class, then by file name. Every image must have the same size and mode ("L" is
1 channel, "RGB" 3; palette and 1-bit PNGs are read as RGB and L). Without ``test/`` (for a
listing: without test rows), a fixed stratified 1/6 of the train samples (seed
:data:`HOLDOUT_SEED`, the same for every run seed) is held out as the test set.

Both kinds are decoded into memory once per process (as :class:`~kdkit.data.RawData`,
uint8, scale 255; again when a file changes), so everything downstream (splits,
normalisation, the content SHA-256 in model.json and cache keys) works as for the registered
datasets. For streaming without decoding everything first: :func:`files_splits` gives the
same train and test samples (the held-out set already cut), :class:`FolderDataset` reads them
image by image (bitwise the same normalised tensors as the in-memory path), and
:func:`files_identity` is a cheap identity of the data (listing, sizes, mtimes) for cache
keys and model.json.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdkit.data.listing import PREFIX as LISTING_PREFIX
from kdkit.data.listing import read_listing
from kdkit.errors import DataError

if TYPE_CHECKING:
    from kdkit.data import RawData

PREFIX = "folder:"
SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
HOLDOUT_FRACTION = 1 / 6
HOLDOUT_SEED = 20240229  # fixed: the held-out test set never depends on the run's seed
PROGRESS_S = 5.0  # at most one progress line per this many seconds
LISTING_FILE = "listing.csv"  # what export_image_folder(listing=True) writes beside train/
_MODES = {"L": 1, "RGB": 3}
_CONVERT = {"P": "RGB", "1": "L"}  # lossless conversions to a mode above

Sample = tuple[Path, int]


def is_folder_name(name: object) -> bool:
    """Whether dataset name ``name`` is an image folder (``folder:PATH``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def is_listing_name(name: object) -> bool:
    """Whether dataset name ``name`` is a listing file (``csv:PATH``)."""
    return isinstance(name, str) and name.startswith(LISTING_PREFIX)


def is_files_name(name: object) -> bool:
    """Whether dataset name ``name`` is images on disk: ``folder:PATH`` or ``csv:PATH``."""
    return is_folder_name(name) or is_listing_name(name)


def folder_path(name: str) -> Path:
    """The folder of ``folder:PATH`` or the file of ``csv:PATH`` (``~`` expanded, made
    absolute); a name without a prefix is a folder's path."""
    prefix = LISTING_PREFIX if is_listing_name(name) else PREFIX
    text = name[len(prefix):] if is_files_name(name) else name
    if not text.strip():
        what = "CSV file" if prefix == LISTING_PREFIX else "folder"
        raise DataError(f"dataset '{name}': no {what} after '{prefix}' ({prefix}PATH)")
    return Path(text).expanduser().resolve()


def canonical_name(name: str) -> str:
    """``folder:`` or ``csv:`` + the absolute path, so a run records a name that works from
    anywhere (a name without a prefix is a folder)."""
    return (LISTING_PREFIX if is_listing_name(name) else PREFIX) + str(folder_path(name))


def files_label(name: str) -> str:
    """A short label of ``folder:PATH`` / ``csv:PATH`` for output folder names: the folder's
    name (``folder:data/fmnist`` -> ``fmnist``) or the CSV file's stem (``csv:x/list.csv`` ->
    ``list``)."""
    if is_listing_name(name):
        return Path(name[len(LISTING_PREFIX):]).stem or "listing"
    return Path(name[len(PREFIX):] if is_folder_name(name) else name).name or "folder"


def _split_files(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Sample]]:
    """The class names and ``(file, label)`` of one split folder, sorted (class, file name).

    ``classes`` (the train split's) maps the test split's folders to labels."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: not a folder (expected <class>/*.png|jpg|jpeg inside)")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.png)")
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(f"{split_dir}: class folder '{unknown[0]}' is not one of train/'s "
                            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    label_of = {c: i for i, c in enumerate(classes)}
    files: list[Sample] = []
    for c in found:
        images = sorted(f for f in (split_dir / c).iterdir()
                        if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")
                        and f.is_file())
        if not images and split_dir.name == "train":
            raise DataError(f"{split_dir / c}: no images (.png, .jpg, .jpeg)")
        files.extend((f, label_of[c]) for f in images)
    if not files:
        raise DataError(f"{split_dir}: no images (.png, .jpg, .jpeg) in its class folders")
    return classes, files


def _open(path: Path) -> tuple[np.ndarray, str]:
    """Pixels (C, H, W) uint8 and the mode of one image file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = _CONVERT.get(im.mode, im.mode)
            if mode not in _MODES:
                raise DataError(f"{path}: image mode {im.mode} is not supported (L or RGB, i.e. "
                                "8-bit grey or colour without alpha)")
            a = np.asarray(im.convert(mode) if mode != im.mode else im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return a, mode


def _describe(a: np.ndarray, mode: str) -> str:
    return f"{a.shape[2]}x{a.shape[1]} {mode}"


def _decode(files: list[Sample], first: tuple[Path, np.ndarray, str],
            log: Callable[[str], None], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref_path, ref, ref_mode = first
    x = np.empty((len(files), *ref.shape), dtype=np.uint8)
    last = time.monotonic()
    for i, (f, _) in enumerate(files):
        a, mode = _open(f)
        if a.shape != ref.shape or mode != ref_mode:
            raise DataError(f"{f} is {_describe(a, mode)} but {ref_path} is "
                            f"{_describe(ref, ref_mode)}: all images of a folder or listing "
                            "dataset must share one size and mode")
        x[i] = a
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            log(f"{what}: decoded {i + 1:,}/{len(files):,} images")
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return torch.from_numpy(x), y


@dataclass(frozen=True)
class _Files:
    """The samples of a ``folder:``/``csv:`` dataset as listed, before the held-out cut."""

    listing: bool  # csv: (else folder:)
    path: Path  # the folder, or the CSV file
    classes: list[str]
    train: list[Sample]
    test: list[Sample] | None  # None: no test/ folder or test rows, a test set is held out

    @property
    def base(self) -> Path:
        """What the files' recorded paths are relative to."""
        return self.path.parent if self.listing else self.path


def _folder_files(path: Path) -> tuple[list[str], list[Sample], list[Sample] | None]:
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected {path}/train/<class>/"
                        "*.png; `kdkit data export` writes one)")
    classes, train = _split_files(path / "train", None)
    test = _split_files(path / "test", classes)[1] if (path / "test").exists() else None
    return classes, train, test


def _files(name: str) -> _Files:
    path = folder_path(name)
    listing = is_listing_name(name)
    classes, train, test = read_listing(path) if listing else _folder_files(path)
    return _Files(listing, path, classes, train, test)


def _holdout(train: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """``train`` without and with its fixed stratified held-out test samples (each in
    ``train``'s order)."""
    from kdkit.data.arrays import stratified_indices

    y = torch.tensor([label for _, label in train], dtype=torch.int64)
    held = stratified_indices(y, round(HOLDOUT_FRACTION * len(y)), HOLDOUT_SEED, balanced=False)
    chosen = set(held.tolist())
    return ([s for i, s in enumerate(train) if i not in chosen],
            [train[i] for i in held.tolist()])


def _cut(files: _Files) -> tuple[list[Sample], list[Sample]]:
    return (files.train, files.test) if files.test is not None else _holdout(files.train)


def files_splits(name: str) -> tuple[list[str], list[Sample], list[Sample]]:
    """``(classes, train, test)`` of ``folder:PATH`` / ``csv:PATH`` (a plain path is a folder):
    the ``(file, label)`` samples :func:`load_folder` decodes, in its order, the held-out test
    set already cut when there is no test/ folder or test rows. Nothing is decoded."""
    files = _files(name)
    return (files.classes, *_cut(files))


def _stat(f: Path) -> os.stat_result:
    try:
        return f.stat()
    except OSError as e:
        raise DataError(f"{f}: cannot read it ({e.strerror or e}); was it moved or deleted "
                        "while the dataset was being read?") from None


def _identity(files: _Files) -> str:
    h = hashlib.sha256(json.dumps({"kind": "csv" if files.listing else "folder",
                                   "classes": files.classes}).encode())
    for split, samples in (("train", files.train), ("test", files.test)):
        h.update(f"\n{split}:{'none' if samples is None else len(samples)}\n".encode())
        for f, label in samples or ():
            try:
                rel = str(f.relative_to(files.base))
            except ValueError:
                rel = str(f)
            st = _stat(f)
            h.update(json.dumps([rel, label, st.st_size, st.st_mtime_ns]).encode() + b"\n")
    return h.hexdigest()


def files_identity(name: str) -> str:
    """A SHA-256 of ``folder:PATH`` / ``csv:PATH`` as listed, without decoding: the kind, the
    classes, each split's files (relative to the folder, or to the CSV's folder) and labels,
    and each file's size and mtime_ns. It changes when a file is replaced or touched, or the
    listing (the class folders, a listing's rows, labels or splits) changes; the row order of
    a listing does not matter. For cache keys and model.json of streamed data (in memory,
    :func:`load_folder`'s content SHA-256 covers the decoded pixels)."""
    return _identity(_files(name))


_Loaded = tuple["RawData", float, float, str]
_CACHE: dict[str, tuple[str, _Loaded]] = {}  # canonical name -> (files_identity, what it gave)


def load_folder(name: str, log: Callable[[str], None] = print) -> _Loaded:
    """Decode ``folder:PATH`` or ``csv:PATH`` once per process (again if any file or the
    listing changed): its RawData, train-set pixel mean and std, and content SHA-256,
    computed as for registered datasets."""
    from kdkit.data import _pixel_stats, content_sha256

    files = _files(name)
    key, cache_name = _identity(files), canonical_name(name)
    hit = _CACHE.get(cache_name)
    if hit is not None and hit[0] == key:
        return hit[1]
    train, test = _cut(files)
    if files.test is None:
        log(f"{files.path}: no test/ folder; a fixed stratified 1/6 of train/ is the test set"
            if not files.listing else
            f"{files.path}: no test rows; a fixed stratified 1/6 of the rows is the test set")
    raw = _read(str(files.path), len(files.classes), train, test, log)
    mean, std = _pixel_stats(raw.x_train, raw.scale)
    loaded = (raw, mean, std, content_sha256(raw))
    if len(_CACHE) >= 2:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[cache_name] = (key, loaded)
    return loaded


def read_image_folder(name: str, log: Callable[[str], None] = print) -> RawData:
    """Decode ``folder:PATH`` or ``csv:PATH`` into a :class:`~kdkit.data.RawData` (uint8,
    scale 255)."""
    return load_folder(name, log)[0]


def _read(what: str, num_classes: int, train: list[Sample], test: list[Sample],
          log: Callable[[str], None]) -> RawData:
    from kdkit.data import RawData

    first_path = train[0][0]
    ref, ref_mode = _open(first_path)
    first = (first_path, ref, ref_mode)
    x_train, y_train = _decode(train, first, log, f"{what} train")
    x_test, y_test = _decode(test, first, log, f"{what} test")
    return RawData(x_train, y_train, x_test, y_test, num_classes=num_classes, scale=255.0)


def folder_geometry(name: str) -> tuple[int, tuple[int, int, int]]:
    """``(num_classes, (C, H, W))`` of ``folder:PATH`` / ``csv:PATH`` from its listing and
    first image (cheap: nothing else is decoded, so a later odd image is only found when it
    loads)."""
    files = _files(name)
    a, _mode = _open(files.train[0][0])
    c, h, w = a.shape
    return len(files.classes), (int(c), int(h), int(w))


# ---------------------------------------------------------------------------- export


def to_uint8(raw: RawData) -> tuple[torch.Tensor, torch.Tensor]:
    """``raw``'s train and test pixels as 0..255 uint8: unchanged when ``raw.scale`` is 255,
    else ``round(pixel * 255 / scale)`` (digits: 0..16 -> 0..255, so a digits folder is read
    back with the same pixel values up to that scaling)."""
    if raw.scale == 255.0:
        return raw.x_train.to(torch.uint8), raw.x_test.to(torch.uint8)

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) * (255.0 / raw.scale)).round().clamp_(0, 255).to(torch.uint8)

    return scaled(raw.x_train), scaled(raw.x_test)


def _png(pixels: np.ndarray) -> bytes:
    """PNG bytes of (C, H, W) uint8 pixels: mode L for 1 channel, RGB for 3."""
    from PIL import Image

    c = pixels.shape[0]
    if c not in (1, 3):
        raise DataError(f"cannot write {c}-channel images as PNG (1 or 3 channels)")
    a = pixels[0] if c == 1 else pixels.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def export_image_folder(raw: RawData, out: Path, *, classes: list[str] | None = None,
                        listing: bool = False, log: Callable[[str], None] = print) -> int:
    """Write ``raw`` as ``out/{train,test}/<class>/<index>.png`` (index: the sample's position
    in its split, zero-padded so that name order is index order); returns the image count.

    Pixels are :func:`to_uint8`'s. Written into a temporary folder beside ``out`` and
    renamed into place when complete, so ``out`` is never half-written. An existing,
    non-empty ``out`` is refused. ``listing``: also write ``out/listing.csv``
    (:data:`LISTING_FILE`; columns path,label,split, the label as the class number that
    ``folder:out`` reads), so ``csv:out/listing.csv`` is the same dataset as ``folder:out``.
    """
    from kdkit.files import fsync_dir, publish_dir, temp_dir

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder; choose another --out "
                        "or remove it")
    width = len(str(max(raw.num_classes - 1, 0)))  # zero-padded: name order is label order
    names = classes or [f"{k:0{width}d}" for k in range(raw.num_classes)]
    if len(names) != raw.num_classes:
        raise DataError(f"{len(names)} class names for {raw.num_classes} classes")
    xs = dict(zip(SPLITS, to_uint8(raw), strict=True))
    ys = {"train": raw.y_train, "test": raw.y_test}
    total = sum(len(y) for y in ys.values())
    tmp = temp_dir(out)
    done, last = 0, time.monotonic()
    try:
        for split in SPLITS:
            x, y = xs[split].numpy(), ys[split].tolist()
            width = len(str(max(len(y) - 1, 0)))
            folders = [tmp / split / n for n in names]
            for f in folders:
                f.mkdir(parents=True)
            for i, label in enumerate(y):
                target = folders[label] / f"{i:0{width}d}.png"
                with open(target, "wb") as fh:
                    fh.write(_png(x[i]))
                    fh.flush()
                    os.fsync(fh.fileno())
                done += 1
                if time.monotonic() - last > PROGRESS_S:
                    last = time.monotonic()
                    log(f"exported {done:,}/{total:,} images")
            for f in folders:
                fsync_dir(f)
            fsync_dir(tmp / split)
        if listing:
            _write_listing(tmp / LISTING_FILE, names, ys)
            fsync_dir(tmp)
        if not publish_dir(tmp, out):
            raise DataError(f"{out} appeared while exporting; nothing was written to it")
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def _write_listing(target: Path, names: list[str], ys: dict[str, torch.Tensor]) -> None:
    """The listing of an exported folder: ``split/<class>/<index>.png,<label>,split`` rows,
    the label being the class's position in sorted ``names`` (what ``folder:`` reads)."""
    number = {n: k for k, n in enumerate(sorted(names))}
    with open(target, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        for split, y in ys.items():
            width = len(str(max(len(y) - 1, 0)))  # as the images' names
            for i, label in enumerate(y.tolist()):
                writer.writerow([f"{split}/{names[label]}/{i:0{width}d}.png",
                                 number[names[label]], split])
        fh.flush()
        os.fsync(fh.fileno())


class FolderDataset(torch.utils.data.Dataset):
    """One split of a ``folder:`` or ``csv:`` dataset, decoded image by image when read (a
    ``Dataset`` for :class:`~kdkit.data.stream.DatasetLoader`: the images stay on disk).

    ``FolderDataset(name, split)``: ``name`` is ``folder:PATH``, ``csv:PATH`` or a folder's
    path; the splits are :func:`files_splits`' (without test/ or test rows, "train" excludes
    the held-out test samples and "test" is them, as in memory). :meth:`from_files` takes a
    sample list instead. Items are ``(x, y)``: ``x`` float32 (C, H, W),
    ``(pixels / 255 - mean) / std``, bitwise what :func:`kdkit.data.load_dataset` computes;
    ``y`` the class index. Images must share one size and mode, as in memory; a different one
    is refused when it is read.
    """

    files: list[Sample]
    classes: list[str]

    def __init__(self, path: str | Path, split: str = "train", *, mean: float = 0.0,
                 std: float = 1.0) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        name = str(path) if is_files_name(str(path)) else PREFIX + str(path)
        classes, train, test = files_splits(name)
        self._setup(train if split == "train" else test, classes, mean, std)

    @classmethod
    def from_files(cls, files: Sequence[tuple[str | Path, int]], classes: Sequence[str], *,
                   mean: float = 0.0, std: float = 1.0) -> FolderDataset:
        """A dataset over ``(file, label)`` samples (e.g. one split of :func:`files_splits`)."""
        self = cls.__new__(cls)
        self._setup([(Path(f), int(y)) for f, y in files], list(classes), mean, std)
        return self

    def _setup(self, files: list[Sample], classes: list[str], mean: float, std: float) -> None:
        if not files:
            raise DataError("no images in this split: a FolderDataset needs at least one")
        bad = [y for _, y in files if not 0 <= y < len(classes)]
        if bad:
            raise DataError(f"label {bad[0]} is not a class index 0..{len(classes) - 1}")
        self.files, self.classes = files, classes
        self.mean, self.std = float(mean), float(std)
        first, self._mode = _open(self.files[0][0])
        self.shape = tuple(first.shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        a, mode = _open(path)
        if tuple(a.shape) != self.shape or mode != self._mode:
            raise DataError(f"{path} is {_describe(a, mode)}, not {self.shape[2]}x{self.shape[1]} "
                            f"{self._mode} like the first image")
        x = torch.tensor(a, dtype=torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x, label
