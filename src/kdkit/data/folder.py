"""Datasets as folders of images: ``kdkit data export`` writes one, ``folder:PATH`` reads one.

The layout is torchvision's ImageFolder, once per split::

    PATH/train/<class>/<anything>.png|jpg|jpeg
    PATH/test/<class>/...            (optional)

Classes are the folder names of ``train/``, sorted; their position is the label. Samples are
ordered by class, then by file name. Every image must have the same size and mode ("L" is
1 channel, "RGB" 3; palette and 1-bit PNGs are read as RGB and L). Without ``test/``, a
fixed stratified 1/6 of ``train/`` (seed :data:`HOLDOUT_SEED`, the same for every run seed)
is held out as the test set.

Folders are decoded into memory once per process (as :class:`~kdkit.data.RawData`, uint8,
scale 255), so everything downstream (splits, normalisation, the content SHA-256 in
model.json and cache keys) works as for the registered datasets.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdkit.errors import DataError

if TYPE_CHECKING:
    from kdkit.data import RawData

PREFIX = "folder:"
SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
HOLDOUT_FRACTION = 1 / 6
HOLDOUT_SEED = 20240229  # fixed: the held-out test set never depends on the run's seed
PROGRESS_S = 5.0  # at most one progress line per this many seconds
_MODES = {"L": 1, "RGB": 3}
_CONVERT = {"P": "RGB", "1": "L"}  # lossless conversions to a mode above


def is_folder_name(name: object) -> bool:
    """Whether dataset name ``name`` is an image folder (``folder:PATH``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def folder_path(name: str) -> Path:
    """The folder of ``folder:PATH`` (``~`` expanded, made absolute)."""
    text = name[len(PREFIX):] if is_folder_name(name) else name
    if not text.strip():
        raise DataError(f"dataset '{name}': no folder after '{PREFIX}' (folder:PATH)")
    return Path(text).expanduser().resolve()


def canonical_name(name: str) -> str:
    """``folder:`` + the absolute path, so a run records a name that works from anywhere."""
    return PREFIX + str(folder_path(name))


def _split_files(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
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
    files: list[tuple[Path, int]] = []
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


def _decode(files: list[tuple[Path, int]], first: tuple[Path, np.ndarray, str],
            log: Callable[[str], None], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref_path, ref, ref_mode = first
    x = np.empty((len(files), *ref.shape), dtype=np.uint8)
    last = time.monotonic()
    for i, (f, _) in enumerate(files):
        a, mode = _open(f)
        if a.shape != ref.shape or mode != ref_mode:
            raise DataError(f"{f} is {_describe(a, mode)} but {ref_path} is "
                            f"{_describe(ref, ref_mode)}: all images of a folder dataset must "
                            "share one size and mode")
        x[i] = a
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            log(f"{what}: decoded {i + 1:,}/{len(files):,} images")
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return torch.from_numpy(x), y


def _listing(path: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]] | None]:
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (expected {path}/train/<class>/"
                        "*.png; `kdkit data export` writes one)")
    classes, train = _split_files(path / "train", None)
    test = _split_files(path / "test", classes)[1] if (path / "test").exists() else None
    return classes, train, test


def _signature(files: list[tuple[Path, int]]) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for f, label in files:
        st = f.stat()
        out.append((str(f), label, st.st_size, st.st_mtime_ns))
    return tuple(out)


_Loaded = tuple["RawData", float, float, str]
_CACHE: dict[str, tuple[object, _Loaded]] = {}  # path -> (listing signature, what it gave)


def load_folder(name: str, log: Callable[[str], None] = print) -> _Loaded:
    """Decode ``folder:PATH`` once per process (again if any file changed): its RawData,
    train-set pixel mean and std, and content SHA-256, computed as for registered datasets."""
    from kdkit.data import _pixel_stats, content_sha256

    path = folder_path(name)
    classes, train, test = _listing(path)
    key = (len(classes), _signature(train), _signature(test) if test is not None else None)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    raw = _read(path, len(classes), train, test, log)
    mean, std = _pixel_stats(raw.x_train, raw.scale)
    loaded = (raw, mean, std, content_sha256(raw))
    if len(_CACHE) >= 2:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[str(path)] = (key, loaded)
    return loaded


def read_image_folder(name: str, log: Callable[[str], None] = print) -> RawData:
    """Decode ``folder:PATH`` into a :class:`~kdkit.data.RawData` (uint8, scale 255)."""
    return load_folder(name, log)[0]


def _read(path: Path, num_classes: int, train: list[tuple[Path, int]],
          test: list[tuple[Path, int]] | None, log: Callable[[str], None]) -> RawData:
    from kdkit.data import RawData
    from kdkit.data.arrays import stratified_indices

    first_path = train[0][0]
    ref, ref_mode = _open(first_path)
    first = (first_path, ref, ref_mode)
    x_train, y_train = _decode(train, first, log, f"{path}/train")
    if test is not None:
        x_test, y_test = _decode(test, first, log, f"{path}/test")
    else:
        log(f"{path}: no test/ folder; a fixed stratified 1/6 of train/ is the test set")
        held = stratified_indices(y_train, round(HOLDOUT_FRACTION * len(y_train)), HOLDOUT_SEED,
                                  balanced=False)
        keep = torch.ones(len(y_train), dtype=torch.bool)
        keep[held] = False
        x_train, y_train, x_test, y_test = (x_train[keep], y_train[keep], x_train[held],
                                            y_train[held])
    return RawData(x_train, y_train, x_test, y_test, num_classes=num_classes, scale=255.0)


def folder_geometry(name: str) -> tuple[int, tuple[int, int, int]]:
    """``(num_classes, (C, H, W))`` of ``folder:PATH`` from its class folders and first image
    (cheap: nothing else is decoded, so a later odd image is only found when it loads)."""
    classes, train, _ = _listing(folder_path(name))
    a, _mode = _open(train[0][0])
    c, h, w = a.shape
    return len(classes), (int(c), int(h), int(w))


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
                        log: Callable[[str], None] = print) -> int:
    """Write ``raw`` as ``out/{train,test}/<class>/<index>.png`` (index: the sample's position
    in its split, zero-padded so that name order is index order); returns the image count.

    Pixels are :func:`to_uint8`'s. Written into a temporary folder beside ``out`` and
    renamed into place when complete, so ``out`` is never half-written. An existing,
    non-empty ``out`` is refused.
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
        if not publish_dir(tmp, out):
            raise DataError(f"{out} appeared while exporting; nothing was written to it")
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


class FolderDataset(torch.utils.data.Dataset):
    """One split of an image folder, decoded image by image when read (a ``Dataset`` for
    :class:`~kdkit.data.stream.DatasetLoader`: the images stay on disk).

    Items are ``(x, y)``: ``x`` float32 (C, H, W), ``(pixels / 255 - mean) / std``; ``y`` the
    class index (classes are train/'s sorted folder names). Images must share one size and
    mode, as for ``folder:`` datasets; a different one is refused when it is read.
    """

    def __init__(self, path: str | Path, split: str = "train", *, mean: float = 0.0,
                 std: float = 1.0) -> None:
        root = folder_path(str(path) if str(path).startswith(PREFIX) else PREFIX + str(path))
        classes, train = _split_files(root / "train", None)
        if split == "train":
            self.files = train
        elif split == "test":
            self.files = _split_files(root / "test", classes)[1]
        else:
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        self.classes = classes
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
