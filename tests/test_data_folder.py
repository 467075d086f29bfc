"""Datasets as image folders: `kdkit data export --format imagefolder` and `folder:PATH`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.cli import main
from kdkit.data import RawData, content_sha256, load_dataset, load_raw
from kdkit.data.folder import (
    HOLDOUT_FRACTION,
    export_image_folder,
    folder_geometry,
    load_folder,
    to_uint8,
)
from kdkit.errors import DataError


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "digits"
    assert main(["data", "export", "digits", "--format", "imagefolder", "--out", str(out)]) == 0
    return out


def _by_class(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A split in a folder's order: by class, then by original index."""
    order = torch.argsort(y, stable=True)
    return x[order], y[order]


def test_export_writes_one_png_per_sample_in_class_folders(digits_folder):
    raw = load_raw("digits")
    for split, y in (("train", raw.y_train), ("test", raw.y_test)):
        counts = {d.name: len(list(d.glob("*.png"))) for d in (digits_folder / split).iterdir()}
        assert counts == {str(c): int((y == c).sum()) for c in range(10)}
    first = sorted((digits_folder / "train" / "0").iterdir())[0]
    index = int(torch.nonzero(raw.y_train == 0)[0])
    assert first.name == f"{index:04d}.png"  # zero-padded index: name order is sample order
    with Image.open(first) as im:
        assert (im.mode, im.size) == ("L", (8, 8))
    assert not [p for p in digits_folder.parent.iterdir() if p.name.endswith(".tmp")]


def test_folder_reads_back_exactly_the_rescaled_pixels(digits_folder):
    raw = load_raw("digits")
    back = load_raw(f"folder:{digits_folder}")
    assert (back.num_classes, back.scale) == (10, 255.0)
    assert back.x_train.dtype == torch.uint8 and back.y_train.dtype == torch.int64
    x_train, x_test = to_uint8(raw)
    assert int(x_train.max()) == 255 and int(raw.x_train.max()) == 16  # 0..16 -> 0..255
    for (x, y), (bx, by) in (((x_train, raw.y_train), (back.x_train, back.y_train)),
                             ((x_test, raw.y_test), (back.x_test, back.y_test))):
        ex, ey = _by_class(x, y)
        assert torch.equal(bx, ex) and torch.equal(by, ey)


def test_load_dataset_of_a_folder(digits_folder, monkeypatch):
    monkeypatch.chdir(digits_folder.parent)
    data = load_dataset("folder:digits", val_fraction=0.1, seed=0)  # relative to the cwd
    assert data.name == f"folder:{digits_folder}"  # recorded absolute
    assert (data.num_classes, data.input_shape) == (10, (1, 8, 8))
    assert len(data.train) + len(data.val) == 1198 and len(data.test) == 599
    raw, mean, _, digest = load_folder(data.name)
    assert data.source["sha256"] == digest == content_sha256(raw)
    assert data.mean == pytest.approx(mean)
    assert folder_geometry(data.name) == (10, (1, 8, 8))


def test_colour_round_trip_and_held_out_test_set(tmp_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (60, 3, 5, 4), generator=gen, dtype=torch.uint8)
    y = torch.arange(60) % 3
    raw = RawData(x[:48], y[:48], x[48:], y[48:], num_classes=3, scale=255.0)
    assert export_image_folder(raw, tmp_path / "rgb", log=lambda _: None) == 60
    with Image.open(tmp_path / "rgb" / "test" / "1" / "01.png") as im:
        assert (im.mode, im.size) == ("RGB", (4, 5))
    back = load_raw(f"folder:{tmp_path / 'rgb'}")
    assert torch.equal(back.x_train, _by_class(x[:48], y[:48])[0])
    assert torch.equal(back.x_test, _by_class(x[48:], y[48:])[0])

    for f in (tmp_path / "rgb" / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "rgb" / "test").iterdir()):
        d.rmdir()
    (tmp_path / "rgb" / "test").rmdir()
    lines: list[str] = []
    held = load_raw(f"folder:{tmp_path / 'rgb'}", log=lines.append)  # the cache sees the change
    assert any("no test/ folder" in line for line in lines)
    assert len(held.y_test) == round(HOLDOUT_FRACTION * 48) == 8
    assert sorted(torch.bincount(held.y_test).tolist()) == [2, 3, 3]  # stratified
    assert len(held.y_train) == 40
    again = load_folder(f"folder:{tmp_path / 'rgb'}")[0]
    assert torch.equal(again.y_test, held.y_test)  # fixed seed: the same every time


def test_train_through_the_cli_on_a_folder(digits_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[32]",
                 "--data", f"folder:{digits_folder}", "--epochs", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert "test" in capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())
    text = json.dumps(meta)
    assert f"folder:{digits_folder}" in text
    assert load_folder(f"folder:{digits_folder}")[3] in text  # the content SHA-256


def test_missing_folder_is_one_error(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    assert main(["train", "--model", "mlp", "--data", f"folder:{tmp_path / 'nope'}",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit: error:") and "nope" in err[0]


def test_mixed_sizes_name_the_odd_file(tmp_path):
    for cls, size in (("a", (8, 8)), ("b", (9, 8))):
        (tmp_path / "imgs" / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros(size[::-1], dtype=np.uint8)).save(
            tmp_path / "imgs" / "train" / cls / "x.png")
    with pytest.raises(DataError, match=r"b/x\.png is 9x8 L but .*a/x\.png is 8x8 L"):
        load_raw(f"folder:{tmp_path / 'imgs'}")


def test_empty_class_folder_and_unknown_test_class(tmp_path):
    (tmp_path / "f" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_raw(f"folder:{tmp_path / 'f'}")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "f" / "train" / "a" / "1.png")
    (tmp_path / "f" / "test" / "z").mkdir(parents=True)
    with pytest.raises(DataError, match="'z' is not one of train"):
        load_raw(f"folder:{tmp_path / 'f'}")


def test_export_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["data", "export", "digits", "--format", "imagefolder", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit: error:") and "not an empty folder" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    raw = RawData(*(torch.zeros((2, 1, 2, 2), dtype=torch.uint8), torch.tensor([0, 1])) * 2,
                  num_classes=2, scale=255.0)
    assert export_image_folder(raw, empty, log=lambda _: None) == 4
    assert sorted(p.name for p in (empty / "train").iterdir()) == ["0", "1"]


def test_a_folder_dataset_in_a_config_validates_and_runs(tmp_path, monkeypatch, capsys):
    from kdkit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["data", "export", "digits", "--format", "imagefolder", "--out", "imgs"]) == 0
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"name: fold\nseeds: [0]\ndata: {{name: 'folder:{tmp_path / 'imgs'}', val_fraction: 0.2}}\n"
        "teacher: {model: {name: mlp, hidden: [32]}, train: {epochs: 2}}\n"
        "student: {name: mlp, hidden: [16]}\ntrain: {epochs: 2}\n"
        "students:\n  - {label: kd, method: {name: kd}}\n")
    assert main(["validate", str(config)]) == 0
    assert main(["run", str(config), "--out", "e", "--no-cache", "--no-progress"]) == 0
    assert "| kd | mlp | kd |" in capsys.readouterr().out
    config.write_text(config.read_text().replace(str(tmp_path / "imgs"), str(tmp_path / "no")))
    assert main(["validate", str(config)]) == 2
    assert "no" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--data", f"folder:{tmp_path / 'imgs'}",
                 "--epochs", "1", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "train-mlp-imgs-s0" / "model.safetensors").exists()
