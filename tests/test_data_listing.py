"""Datasets as listing files (`csv:PATH`, kdkit.data.listing) and what they share with
image folders: held-out test set, identity, streaming."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import RawData, content_sha256
from kdkit.data.folder import (
    HOLDOUT_FRACTION,
    LISTING_FILE,
    FolderDataset,
    canonical_name,
    export_image_folder,
    files_identity,
    files_label,
    files_splits,
    folder_geometry,
    folder_path,
    is_files_name,
    is_folder_name,
    load_folder,
)
from kdkit.errors import DataError

COUNTS = {"cat": 7, "dog": 5, "eel": 6}  # 18 images: 3 held out without a test split


def _quiet(_: str) -> None:
    pass


def _png(path: Path, seed: int, *, size: tuple[int, int] = (4, 3), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _tree(root: Path, mode: str = "L") -> list[tuple[Path, str]]:
    """``root/train/<class>/NN.png`` with distinct pixels; ``(file, class)`` in folder order."""
    files = []
    for k, (cls, n) in enumerate(COUNTS.items()):
        for i in range(n):
            files.append((_png(root / "train" / cls / f"{i:02d}.png", 100 * k + i, mode=mode), cls))
    return files


def _write(path: Path, rows: list[list[object]], header: tuple[str, ...] = ("path", "label")) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _same(a: RawData, b: RawData) -> bool:
    return a.num_classes == b.num_classes and all(
        torch.equal(x, y) for x, y in ((a.x_train, b.x_train), (a.y_train, b.y_train),
                                       (a.x_test, b.x_test), (a.y_test, b.y_test)))


def _normalised(x: torch.Tensor, scale: float, mean: float, std: float) -> torch.Tensor:
    """As kdkit.data.load_dataset normalises."""
    return x.to(torch.float32, copy=True).div_(scale).sub_(mean).div_(std)


def test_names_give_the_folders_dataset_and_held_out_test_set(tmp_path):
    files = _tree(tmp_path / "imgs")
    rows = [[str(f.relative_to(tmp_path)), cls] for f, cls in files]
    listing = _write(tmp_path / "list.csv", rows[::-1])  # row order does not matter
    lines: list[str] = []
    raw, mean, std, digest = load_folder(f"csv:{listing}", log=lines.append)
    folder = load_folder(f"folder:{tmp_path / 'imgs'}", log=_quiet)
    assert _same(raw, folder[0]) and digest == folder[3] == content_sha256(raw)
    assert (mean, std) == folder[1:3]
    assert raw.num_classes == 3 and len(raw.y_test) == round(HOLDOUT_FRACTION * 18) == 3
    assert sorted(raw.y_test.tolist()) == [0, 1, 2]  # stratified
    assert any("no test rows" in line for line in lines)
    assert files_splits(f"csv:{listing}") == files_splits(f"folder:{tmp_path / 'imgs'}")
    classes, train, test = files_splits(f"csv:{listing}")
    assert classes == ["cat", "dog", "eel"] and len(train) == 15 and len(test) == 3
    assert folder_geometry(f"csv:{listing}") == (3, (1, 3, 4))


def test_integer_labels_are_the_class_numbers(tmp_path):
    files = _tree(tmp_path / "imgs")
    number = {"cat": 2, "dog": 0, "eel": 1}
    listing = _write(tmp_path / "list.csv", [[str(f), f" {number[c]} "] for f, c in files])
    classes, train, test = files_splits(f"csv:{listing}")
    assert classes == ["0", "1", "2"]
    every = {f: y for f, y in train + test}
    assert every == {f: number[c] for f, c in files}  # no renumbering: absolute paths, spaces
    assert [y for _, y in train] == sorted(y for _, y in train)  # ordered by label
    raw = load_folder(f"csv:{listing}", log=_quiet)[0]
    assert raw.num_classes == 3 and int(raw.y_train[0]) == 0


def test_split_column_gives_the_test_set(tmp_path):
    files = _tree(tmp_path / "imgs", mode="RGB")
    rows = [[str(f.relative_to(tmp_path)), "TEST" if i % 4 == 0 else "train", c]
            for i, (f, c) in enumerate(files)]  # columns in any order, split any case
    listing = _write(tmp_path / "list.csv", rows, ("Path", "split", "label"))
    lines: list[str] = []
    raw = load_folder(f"csv:{listing}", log=lines.append)[0]
    assert not any("no test rows" in line for line in lines)
    tested = {tmp_path / r[0] for r in rows if r[1] == "TEST"}
    classes, train, test = files_splits(f"csv:{listing}")
    assert {f for f, _ in test} == tested and len(train) == 18 - len(tested)
    assert tuple(raw.x_test.shape) == (len(tested), 3, 3, 4)


def test_an_exported_listing_is_the_exported_folder(tmp_path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (40, 1, 3, 3), generator=gen, dtype=torch.uint8)
    y = torch.arange(40) % 3
    raw = RawData(x[:30], y[:30], x[30:], y[30:], num_classes=3, scale=255.0)
    out = tmp_path / "out"
    # class names out of order: folder: reads them sorted, and so must the listing's numbers
    assert export_image_folder(raw, out, classes=["zeta", "alpha", "mid"], listing=True,
                               log=_quiet) == 40
    text = (out / LISTING_FILE).read_text().splitlines()
    assert text[0] == "path,label,split" and text[1] == "train/zeta/00.png,2,train"
    from_csv = load_folder(f"csv:{out / LISTING_FILE}", log=_quiet)
    from_folder = load_folder(f"folder:{out}", log=_quiet)
    assert _same(from_csv[0], from_folder[0]) and from_csv[3] == from_folder[3]
    assert not (tmp_path / "plain").exists()
    export_image_folder(raw, tmp_path / "plain", log=_quiet)
    assert not (tmp_path / "plain" / LISTING_FILE).exists()  # only when asked


def _error_cases(tmp_path: Path) -> list[tuple[str, str]]:
    """(listing file, the error it must give) for every malformed listing."""
    a = _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    _png(tmp_path / "big.png", 3, size=(5, 3))
    (tmp_path / "sub").mkdir()

    def listing(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    return [
        (str(tmp_path / "nope.csv"), r"listing .*nope\.csv does not exist .*header row naming "
                                     "path,label"),
        (str(tmp_path / "sub"), r"listing .*sub is a folder, not a CSV file .*use folder:"),
        (listing("empty.csv", "\n\n"), r"empty\.csv is empty; the first line must be a header"),
        (listing("cols.csv", "file,Label\na.png,x\n"),
         r"cols\.csv: no 'path' column in the header row \(columns found: file, label\)"),
        (listing("nocols.csv", "x\n1\n"), r"no 'path' or 'label' column .*columns found: x\)"),
        (listing("header.csv", "path,label\n"), r"header\.csv has a header row but no rows"),
        (listing("cells.csv", "path,label\na.png,x,y\n"),
         r"cells\.csv line 2: 3 cells but the header has 2 \(path,label\)"),
        (listing("twice.csv", "path,label,path\na.png,x,b.png\n"),
         r"names the column 'path' twice"),
        (listing("missing.csv", "path,label\na.png,x\n\nc.png,y\n"),
         r"missing\.csv line 4: image c\.png does not exist \(.*c\.png\); fix the path "
         r"\(relative paths are from the listing's folder"),
        (listing("dir.csv", "path,label\nsub,x\n"), r"dir\.csv line 2: image sub is not a file"),
        (listing("nopath.csv", "path,label\n ,x\n"), r"nopath\.csv line 2: empty path"),
        (listing("nolabel.csv", "path,label\na.png,\n"), r"line 2: empty label for a\.png"),
        (listing("split.csv", "path,label,split\na.png,x,train\nb.png,x,val\n"),
         r"split\.csv line 3: split 'val' is not train or test"),
        (listing("onlytest.csv", "path,label,split\na.png,x,test\n"),
         r"onlytest\.csv: no train rows"),
        (listing("unseen.csv", "path,label,split\na.png,x,train\nb.png,y,test\n"),
         r"unseen\.csv line 3: test label 'y' is not a class of the train rows \(x\)"),
        (listing("unseen_int.csv", "path,label,split\na.png,0,train\nb.png,1,test\n"),
         r"line 3: test label '1' is not a class of the train rows \(0\)"),
        (listing("mixed.csv", "path,label\na.png,0\nb.png,cat\n"),
         r"mixed\.csv: line 2 has the class number '0' but line 3 the class name 'cat'; labels "
         r"must be all class numbers \(0..K-1\) or all class names"),
        (listing("gap.csv", "path,label\na.png,0\nb.png,2\n"),
         r"gap\.csv: class numbers must be 0..K-1 with train rows for each, but no train row "
         r"has label 1 \(labels seen: 0, 2\)"),
        (listing("negative.csv", "path,label\na.png,-1\nb.png,0\n"),
         r"negative\.csv line 2: label -1 is negative"),
        (listing("dup.csv", "path,label\na.png,x\nb.png,y\n./sub/../a.png,x\n"),
         r"dup\.csv lines 2 and 4 both list .*a\.png; list each image once"),
        (listing("dup_abs.csv", f"path,label\na.png,x\n{a},y\n"), r"lines 2 and 3 both list"),
        (listing("size.csv", "path,label\na.png,x\nbig.png,y\n"),
         r"big\.png is 5x3 L but .*a\.png is 4x3 L"),
    ]


def test_every_malformed_listing_is_one_clear_error(tmp_path):
    for path, message in _error_cases(tmp_path):
        with pytest.raises(DataError, match=message):
            load_folder(f"csv:{path}", log=_quiet)
        if "is 5x3" not in message:  # only decoding finds a different size
            with pytest.raises(DataError, match=message):
                files_identity(f"csv:{path}")
    with pytest.raises(DataError, match="no CSV file after 'csv:'"):
        load_folder("csv:")


def test_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_files_name("csv:x.csv") and is_files_name("folder:x")
    assert not is_files_name("digits") and not is_files_name(None)
    assert is_folder_name("folder:x") and not is_folder_name("csv:x.csv")
    assert canonical_name("csv:d/list.csv") == f"csv:{tmp_path / 'd' / 'list.csv'}"
    assert canonical_name("folder:d") == canonical_name("d") == f"folder:{tmp_path / 'd'}"
    assert folder_path("csv:~/l.csv") == Path.home() / "l.csv"
    assert files_label("csv:d/list.csv") == "list" and files_label("folder:d/fm") == "fm"
    assert files_label("folder:.") == "folder"


def test_files_identity_follows_files_and_listing(tmp_path):
    files = _tree(tmp_path / "imgs")
    rows = [[str(f.relative_to(tmp_path)), c] for f, c in files]
    listing = _write(tmp_path / "list.csv", rows)
    for name in (f"csv:{listing}", f"folder:{tmp_path / 'imgs'}"):
        before = files_identity(name)
        assert len(before) == 64 and files_identity(name) == before
        load_folder(name, log=_quiet)  # reading changes nothing
        assert files_identity(name) == before
        f = files[4][0]
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
        touched = files_identity(name)
        assert touched != before
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert files_identity(name) == before
        Image.fromarray(np.zeros((3, 4), dtype=np.uint8)).save(f)  # another size, same mtime
        assert f.stat().st_size != st.st_size
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert files_identity(name) != before
        _png(f, 100 * 0 + 4)  # put the original pixels back, with the original mtime
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert files_identity(name) == before
    csv_name = f"csv:{listing}"
    before = files_identity(csv_name)
    _write(listing, rows[::-1])  # the same rows in another order: the same dataset
    assert files_identity(csv_name) == before
    _write(listing, [[p, "other" if i == 0 else c] for i, (p, c) in enumerate(rows)])
    relabelled = files_identity(csv_name)
    assert relabelled != before
    _write(listing, rows[1:])
    assert files_identity(csv_name) not in (before, relabelled)
    _write(listing, [[p, c, "test" if i == 0 else "train"] for i, (p, c) in enumerate(rows)],
           ("path", "label", "split"))
    assert files_identity(csv_name) != before
    assert files_identity(f"folder:{tmp_path / 'imgs'}") != before  # the kinds differ


def test_the_cache_reloads_when_the_listing_changes(tmp_path):
    files = _tree(tmp_path / "imgs")
    rows = [[str(f), c] for f, c in files]
    listing = _write(tmp_path / "list.csv", rows)
    first = load_folder(f"csv:{listing}", log=_quiet)
    assert load_folder(f"csv:{listing}", log=_quiet) is first  # decoded once
    _write(listing, [[p, "cat"] for p, _ in rows])
    again = load_folder(f"csv:{listing}", log=_quiet)
    assert again is not first and again[0].num_classes == 1


@pytest.mark.parametrize("kind", ["csv", "folder"])
def test_streamed_items_are_bitwise_the_in_memory_ones(tmp_path, kind):
    files = _tree(tmp_path / "imgs", mode="RGB" if kind == "csv" else "L")
    listing = _write(tmp_path / "list.csv", [[str(f), c] for f, c in files])
    name = f"csv:{listing}" if kind == "csv" else f"folder:{tmp_path / 'imgs'}"
    raw, mean, std, _ = load_folder(name, log=_quiet)
    classes, train, test = files_splits(name)
    for split, x, y, samples in (("train", raw.x_train, raw.y_train, train),
                                 ("test", raw.x_test, raw.y_test, test)):
        memory = _normalised(x, raw.scale, mean, std)
        disk = FolderDataset(name, split, mean=mean, std=std)
        listed = FolderDataset.from_files(samples, classes, mean=mean, std=std)
        assert len(disk) == len(listed) == len(y) and disk.classes == classes
        for i in range(len(y)):
            for ds in (disk, listed):
                xi, yi = ds[i]
                assert torch.equal(xi, memory[i]) and yi == int(y[i])


def test_a_streamed_folder_is_bitwise_load_dataset(tmp_path):
    from kdkit.data import load_dataset

    _tree(tmp_path / "imgs")
    memory = load_dataset(f"folder:{tmp_path / 'imgs'}", val_fraction=0.0, seed=0, log=_quiet)
    for split, part in (("train", memory.train), ("test", memory.test)):
        disk = FolderDataset(tmp_path / "imgs", split, mean=memory.mean, std=memory.std)
        assert torch.equal(torch.stack([disk[i][0] for i in range(len(disk))]), part.x)
        assert [disk[i][1] for i in range(len(disk))] == part.y.tolist()


def test_folder_dataset_refuses_bad_arguments(tmp_path):
    files = _tree(tmp_path / "imgs")
    with pytest.raises(DataError, match="split must be 'train' or 'test', got 'val'"):
        FolderDataset(tmp_path / "imgs", "val")
    with pytest.raises(DataError, match="no images in this split"):
        FolderDataset.from_files([], ["a"])
    with pytest.raises(DataError, match=r"label 3 is not a class index 0..1"):
        FolderDataset.from_files([(files[0][0], 3)], ["a", "b"])


def test_load_dataset_of_a_listing(tmp_path, monkeypatch):
    from kdkit.data import load_dataset

    files = _tree(tmp_path / "imgs")
    _write(tmp_path / "list.csv", [[str(f.relative_to(tmp_path)), c] for f, c in files])
    monkeypatch.chdir(tmp_path)
    data = load_dataset("csv:list.csv", val_fraction=0.2, seed=0, log=_quiet)
    assert data.name == f"csv:{tmp_path / 'list.csv'}"  # recorded absolute
    assert (data.num_classes, data.input_shape) == (3, (1, 3, 4))
    assert len(data.train) + len(data.val) == 15 and len(data.test) == 3
    raw, mean, std, digest = load_folder(data.name, log=_quiet)
    assert data.source["sha256"] == digest
    disk = FolderDataset(data.name, "test", mean=mean, std=std)
    assert torch.equal(torch.stack([disk[i][0] for i in range(3)]), data.test.x)
