"""Read CIFAR-10 / CIFAR-100 in their *binary* ("-bin") formats.

Each record is the label byte(s) then 3072 pixel bytes: 1024 red, 1024 green, 1024 blue,
each a 32x32 image in row-major order, so a record reshapes directly to (3, 32, 32).
CIFAR-10 has 1 label byte; CIFAR-100 has 2 (coarse, fine) and we use the fine label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdkit.errors import DataError

IMAGE_BYTES = 3 * 32 * 32
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR100_DIR = "cifar-100-binary"
CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch.bin"]
CIFAR100_TRAIN = ["train.bin"]
CIFAR100_TEST = ["test.bin"]
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-binary.tar.gz"


def _missing(path: Path, what: str, archive: str) -> DataError:
    root, folder = path.parent.parent, path.parent.name
    return DataError(
        f"{what} file not found: {path}. CIFAR cannot be downloaded on this machine: "
        f"place the binary version under {root}/{folder}/ (extract {archive} in {root})"
    )


def read_cifar_bin(
    path: str | Path, label_bytes: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch file: uint8 images (N, 3, 32, 32) and int64 labels (N,).

    The label used is the last of the ``label_bytes`` (the fine label for CIFAR-100).
    """
    path = Path(path)
    data = path.read_bytes()
    record = label_bytes + IMAGE_BYTES
    if len(data) == 0 or len(data) % record:
        raise DataError(
            f"{path} is corrupt or truncated: {len(data)} bytes is not a whole number of "
            f"{record}-byte records"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= num_classes:
        raise DataError(f"{path}: label {labels.max()} out of range for {num_classes} classes")
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _read_files(
    folder: Path, names: list[str], label_bytes: int, num_classes: int, what: str, archive: str
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise _missing(path, what, archive)
        x, y = read_cifar_bin(path, label_bytes, num_classes)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from ``<root>/cifar-10-batches-bin``."""
    folder = Path(root) / CIFAR10_DIR
    train = _read_files(folder, CIFAR10_TRAIN, 1, 10, "CIFAR-10", CIFAR10_ARCHIVE)
    test = _read_files(folder, CIFAR10_TEST, 1, 10, "CIFAR-10", CIFAR10_ARCHIVE)
    return train[0], train[1], test[0], test[1]


def load_cifar100(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` (fine labels) from ``<root>/cifar-100-binary``."""
    folder = Path(root) / CIFAR100_DIR
    train = _read_files(folder, CIFAR100_TRAIN, 2, 100, "CIFAR-100", CIFAR100_ARCHIVE)
    test = _read_files(folder, CIFAR100_TEST, 2, 100, "CIFAR-100", CIFAR100_ARCHIVE)
    return train[0], train[1], test[0], test[1]
