"""Datasets as listing files: ``csv:PATH`` reads a CSV of image paths and labels.

The format (read with Python's :mod:`csv` module, UTF-8, a leading BOM ignored)::

    path,label,split
    images/cat/001.png,cat,train
    /data/dog/7.jpg,dog,test

- **Header row** (required, the first non-blank line): must name the columns ``path`` and
  ``label``; ``split`` is optional; other columns are ignored; any order; names are
  case-insensitive. Cells are stripped of surrounding spaces; blank lines are skipped; every
  row has as many cells as the header (quote a cell holding a comma).
- **path**: an image file, relative to the CSV file's folder, or absolute (``~`` expanded).
  Anything Pillow reads; as for ``folder:`` datasets every image must have the same size and
  mode (L or RGB; palette and 1-bit images read as RGB and L). Each image is listed once.
- **label**: either all class numbers or all class names, never a mix.

  - numbers (every label is an integer): label ``k`` is class ``k``, kept as written (no
    renumbering: the model's output ``k`` is your class ``k``). The classes are
    ``0..K-1`` with ``K - 1`` the largest train label, and each needs at least one train row.
  - names: the classes are the distinct names of the train rows, sorted (as a folder's class
    folder names are); a label is its name's position.

- **split** (optional): ``train`` or ``test`` (case-insensitive). Test rows must use the
  train rows' classes. Without a split column, or without test rows, a fixed stratified 1/6
  of the rows is held out as the test set, exactly as for a folder without ``test/`` (see
  :mod:`kdkit.data.folder`). The validation split is always cut from train by ``val_fraction``.
- Samples are ordered by label, then path (as a folder's are), so the row order does not
  matter, and a listing of a folder's files gives exactly that folder's dataset.

Errors are :class:`~kdkit.errors.DataError`, naming the file, the line (the header is line 1
when it is the first line) and the fix.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from kdkit.errors import DataError

PREFIX = "csv:"
REQUIRED = ("path", "label")
SPLIT_COLUMN = "split"
SPLITS = ("train", "test")
_INTEGER = re.compile(r"[+-]?\d+")
_HEADER_HINT = "the first line must be a header row naming path,label (and optionally split)"

Sample = tuple[Path, int]


def _classes_text(classes: list[str]) -> str:
    return ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")


def _rows(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (lower-cased names) and the non-blank rows ``(line, cells)`` of a listing."""
    where = f"listing {csv_path}"
    if not csv_path.exists():
        raise DataError(f"{where} does not exist (expected a CSV file: {_HEADER_HINT}; "
                        "see kdkit.data.listing)")
    if csv_path.is_dir():
        raise DataError(f"{where} is a folder, not a CSV file (for class sub-folders of images "
                        f"use folder:{csv_path})")
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for cells in reader:
                cells = [c.strip() for c in cells]
                if not any(cells):
                    continue
                if header is None:
                    header = [c.lower() for c in cells]
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{where} line {reader.line_num}: {len(cells)} cells but the "
                                    f"header has {len(header)} ({','.join(header)}); give every "
                                    "row one cell per column (quote cells holding a comma)")
                rows.append((reader.line_num, cells))
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{where}: not a readable CSV file ({e}); {_HEADER_HINT}") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read it ({e})") from None
    if header is None:
        raise DataError(f"{where} is empty; {_HEADER_HINT}, then one row per image")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"{where}: no {' or '.join(repr(c) for c in missing)} column in the "
                        f"header row (columns found: {', '.join(header) or 'none'}); "
                        f"{_HEADER_HINT}")
    for c in (*REQUIRED, SPLIT_COLUMN):
        if header.count(c) > 1:
            raise DataError(f"{where}: the header row names the column '{c}' twice; name it once")
    if not rows:
        raise DataError(f"{where} has a header row but no rows; add one row per image "
                        "(path,label)")
    return header, rows


def read_listing(csv_path: Path) -> tuple[list[str], list[Sample], list[Sample] | None]:
    """The classes and ``(file, label)`` samples of a listing: ``(classes, train, test)``,
    each split sorted by (label, path); ``test`` is None when no row is a test row (the
    caller holds out a fixed test set then). Files are absolute and exist."""
    where = f"listing {csv_path}"
    header, rows = _rows(csv_path)
    i_path, i_label = header.index("path"), header.index("label")
    i_split = header.index(SPLIT_COLUMN) if SPLIT_COLUMN in header else None
    base = csv_path.parent

    seen: dict[str, int] = {}
    parsed: list[tuple[int, Path, str, str]] = []  # line, file, label text, split
    first_number: tuple[int, str] | None = None
    first_name: tuple[int, str] | None = None
    for line, cells in rows:
        text, label = cells[i_path], cells[i_label]
        at = f"{where} line {line}"
        if not text:
            raise DataError(f"{at}: empty path; give the image file (relative to {base})")
        if not label:
            raise DataError(f"{at}: empty label for {text}; give a class name or number")
        split = cells[i_split].lower() if i_split is not None else "train"
        if split not in SPLITS:
            raise DataError(f"{at}: split '{cells[i_split] if i_split is not None else ''}' is "
                            "not train or test; use one of those (the validation split is cut "
                            "from train by val_fraction)")
        f = Path(text).expanduser()
        f = Path(os.path.normpath(f if f.is_absolute() else base / f))
        if not f.is_file():
            why = "is not a file" if f.exists() else "does not exist"
            raise DataError(f"{at}: image {text} {why} ({f}); fix the path (relative paths are "
                            f"from the listing's folder {base})")
        key = os.path.normcase(str(f))
        if key in seen:
            raise DataError(f"{where} lines {seen[key]} and {line} both list {f}; list each "
                            "image once")
        seen[key] = line
        if _INTEGER.fullmatch(label):
            first_number = first_number or (line, label)
        else:
            first_name = first_name or (line, label)
        parsed.append((line, f, label, split))
    if first_number is not None and first_name is not None:
        raise DataError(f"{where}: line {first_number[0]} has the class number "
                        f"'{first_number[1]}' but line {first_name[0]} the class name "
                        f"'{first_name[1]}'; labels must be all class numbers (0..K-1) or all "
                        "class names")
    train_rows = [r for r in parsed if r[3] == "train"]
    if not train_rows:
        raise DataError(f"{where}: no train rows (every row's split is test); mark the "
                        "training images' split as train")

    numbers = first_number is not None
    if numbers:
        for line, _, label, _ in parsed:
            if int(label) < 0:
                raise DataError(f"{where} line {line}: label {label} is negative; class "
                                "numbers are 0..K-1")
        present = {int(r[2]) for r in train_rows}
        classes = [str(k) for k in range(max(present) + 1)]
        absent = [c for c in classes if int(c) not in present]
        if absent:
            raise DataError(f"{where}: class numbers must be 0..K-1 with train rows for each, "
                            f"but no train row has label {', '.join(absent[:10])} (labels seen: "
                            f"{_classes_text([str(k) for k in sorted(present)])}); renumber the "
                            "classes from 0 without gaps, or use class names")
    else:
        classes = sorted({r[2] for r in train_rows})
    label_of = {c: i for i, c in enumerate(classes)}

    def label_index(line: int, label: str) -> int:
        k = label_of.get(str(int(label)) if numbers else label)
        if k is None:
            raise DataError(f"{where} line {line}: test label '{label}' is not a class of the "
                            f"train rows ({_classes_text(classes)}); every class needs train "
                            "images, so add some or drop the row")
        return k

    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for line, f, label, split in parsed:
        splits[split].append((f, label_index(line, label)))
    for files in splits.values():
        files.sort(key=lambda s: (s[1], s[0]))
    return classes, splits["train"], splits["test"] or None
