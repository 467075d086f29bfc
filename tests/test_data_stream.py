"""Streaming an image folder from disk (`stream: true`, `--stream`): the in-memory path's
samples, labels and normalisation, read batch by batch; training, evaluation and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from kdkit.cli import main
from kdkit.data import load_dataset
from kdkit.data.augment import build_augment
from kdkit.data.stream import DatasetLoader, StreamDataset, make_loader
from kdkit.data.views import make_views
from kdkit.distill import Distiller, build_method
from kdkit.errors import DataError, KdkitError
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, fit
from kdkit.train.metrics import evaluate
from kdkit.train.teacher_cache import CacheSettings, TeacherCache


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "digits"
    assert main(["data", "export", "digits", "--format", "imagefolder", "--out", str(out)]) == 0
    return out


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_DATA", str(tmp_path / "data-root"))
    return tmp_path / "data-root"


@pytest.mark.parametrize("subset", [None, 300])
def test_streamed_splits_are_the_in_memory_splits(digits_folder, data_root, subset):
    name = f"folder:{digits_folder}"
    mem = load_dataset(name, seed=3, val_fraction=0.2, train_subset=subset, log=lambda _: None)
    st = load_dataset(name, seed=3, val_fraction=0.2, train_subset=subset, stream=True,
                      log=lambda _: None)
    assert isinstance(st.train, StreamDataset)
    assert (st.mean, st.std) == (mem.mean, mem.std)  # exact: the same histogram
    assert (st.num_classes, st.input_shape) == (mem.num_classes, mem.input_shape)
    for a, b in ((mem.train, st.train), (mem.val, st.val), (mem.test, st.test)):
        assert torch.equal(a.y, b.y)
        for i in (0, len(a) // 2, len(a) - 1):
            x, y = b[i]
            assert torch.equal(x, a.x[i]) and y == int(a.y[i])
    assert st.source["stream"] is True and st.source["sha256"] != mem.source["sha256"]
    assert list(data_root.glob("stats/*.json"))  # the pixel statistics were kept


def test_pixel_statistics_are_read_back_not_recomputed(digits_folder, data_root, monkeypatch):
    import kdkit.data.stream as stream

    name = f"folder:{digits_folder}"
    first = load_dataset(name, stream=True, log=lambda _: None)

    def no_decoding(*a, **k):
        raise AssertionError("decoded the images again")

    monkeypatch.setattr(stream._Histograms, "__getitem__", no_decoding)
    again = load_dataset(name, stream=True, log=lambda _: None)
    assert (again.mean, again.std) == (first.mean, first.std)


def test_channels_and_resize_apply_to_streamed_items(digits_folder, data_root):
    name = f"folder:{digits_folder}"
    mem = load_dataset(name, channels=3, resize=12, log=lambda _: None)
    st = load_dataset(name, channels=3, resize=12, stream=True, log=lambda _: None)
    assert st.input_shape == mem.input_shape == (3, 12, 12)
    assert torch.equal(st.test[5][0], mem.test.x[5])


def test_train_and_eval_stream_through_the_cli(digits_folder, data_root, tmp_path, capsys):
    before = sorted(p.relative_to(digits_folder) for p in digits_folder.rglob("*"))
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[32]",
                 "--data", f"folder:{digits_folder}", "--stream", "--workers", "1",
                 "--epochs", "3", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] > 70.0  # it learnt from the streamed batches
    meta = json.loads((out / "model.json").read_text())
    assert meta["data"]["source"]["stream"] is True
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val"]) == 0  # the streamed val split, rebuilt
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == len(load_dataset(f"folder:{digits_folder}", stream=True,
                                                 log=lambda _: None).val)
    # the user's folder is read, never written (statistics live under $KDKIT_DATA)
    assert sorted(p.relative_to(digits_folder) for p in digits_folder.rglob("*")) == before


def test_streamed_and_in_memory_training_agree_without_augmentation(digits_folder, data_root):
    """No augmentation: the same batches in the same order, so the same weights."""
    name = f"folder:{digits_folder}"
    mem = load_dataset(name, seed=1, log=lambda _: None)
    st = load_dataset(name, seed=1, stream=True, log=lambda _: None)
    settings = LoopSettings(epochs=1, lr=0.1, seed=2, device="cpu")
    weights = []
    for data in (mem, st):
        torch.manual_seed(0)
        student = create_model("mlp", hidden=[16], input_size=8)
        res = fit(Distiller(student, {}, build_method("ce", student)),
                  make_loader(data.train, 64, shuffle=True, seed=1), settings,
                  val=(data.val.x, data.val.y) if hasattr(data.val, "x") else data.val,
                  progress=False)
        weights.append(student.state_dict())
        assert res.history[-1]["val/acc"] > 50.0
    for a, b in zip(weights[0].values(), weights[1].values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_fit_takes_any_dataset_and_evaluate_a_dataset(digits):
    """The Python API: a plain torch Dataset to fit (kdkit orders and batches it) and to
    evaluate, with the same figures as the tensors."""
    train = TensorDataset(digits.train.x, digits.train.y)
    val = TensorDataset(digits.val.x, digits.val.y)
    torch.manual_seed(0)
    student = create_model("mlp", hidden=[32], input_size=8)
    res = fit(Distiller(student, {}, build_method("ce", student)), train,
              LoopSettings(epochs=3, lr=0.1, device="cpu"), val=val, batch_size=32,
              progress=False)
    assert res.history[-1]["val/acc"] > 85.0
    a = evaluate(student, val, batch_size=50)
    b = evaluate(student, digits.val.x, digits.val.y, batch_size=50)
    assert a["acc"] == pytest.approx(b["acc"]) and a["loss"] == pytest.approx(b["loss"])


def test_only_folders_and_listings_stream(data_root):
    with pytest.raises(DataError, match="only image folders and listings stream from disk"):
        load_dataset("digits", stream=True)


def test_stream_is_only_for_image_files_in_configs(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(
        "name: s\nseeds: [0]\ndata: {name: digits, stream: true}\n"
        "teacher: {model: {name: mlp, hidden: [32]}, train: {epochs: 1}}\n"
        "student: {name: mlp, hidden: [16]}\ntrain: {epochs: 1}\n"
        "students:\n  - {label: kd, method: {name: kd}}\n")
    assert main(["validate", str(config)]) == 2
    assert "data.stream: 'digits' is decoded into memory" in capsys.readouterr().err


def _kd_pair(seed=1):
    torch.manual_seed(0)
    teacher = create_model("mlp", hidden=[48], input_size=8).eval()
    torch.manual_seed(seed)
    student = create_model("mlp", hidden=[16], input_size=8)
    return Distiller(student, {"teacher": teacher},
                     build_method("kd", student, {"teacher": teacher}))


def test_a_cache_over_streamed_data_gives_the_live_teachers_training(digits_folder, data_root,
                                                                      tmp_path):
    """Samples on disk are keyed by their files: the cache built over the streamed pool
    (train + val) serves the view-mode loader exactly what the live teacher computes, and
    serves another seed's split of the same pool without a rebuild."""
    name = f"folder:{digits_folder}"
    st = load_dataset(name, seed=0, stream=True, log=lambda _: None)
    aug = build_augment({"shift": 1}, fill=st.black)
    settings = LoopSettings(epochs=2, lr=0.05, seed=3, device="cpu")
    loader = make_loader(st.train, 64, shuffle=True, seed=3, augment=aug, views=2)
    live, cached = _kd_pair(), _kd_pair()
    fit(live, loader, settings, progress=False)
    logs: list[str] = []
    cache = TeacherCache.open_or_build(tmp_path / "c", cached, st.train, aug,
                                       CacheSettings(views=2, dtype="float32"),
                                       pool=[st.train, st.val], log=logs.append)
    fit(cached, loader, settings, progress=False, teacher_cache=cache)
    for p, q in zip(live.parameters(), cached.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert any("building" in line for line in logs)
    other = load_dataset(name, seed=5, stream=True, log=lambda _: None)  # another split
    logs.clear()
    again = TeacherCache.open_or_build(tmp_path / "c", cached, other.train, aug,
                                       CacheSettings(views=2, dtype="float32"),
                                       pool=[other.train, other.val], log=logs.append)
    assert again.folder == cache.folder and not any("building" in line for line in logs)
    idx, view = torch.tensor([0, 7, 3]), torch.tensor([1, 0, 1])
    x = torch.stack([other.train[int(i)][0] for i in idx])
    want = cached.teacher_outputs(make_views(aug, x, other.train.sample_keys()[idx], view))
    torch.testing.assert_close(again.lookup(idx, view)["teacher"]["<model>:output"],
                               want["teacher"]["<model>:output"])


def test_view_mode_needs_keyed_samples(digits):
    with pytest.raises(KdkitError, match="view mode needs views >= 1 and a dataset whose"):
        DatasetLoader(TensorDataset(digits.train.x, digits.train.y), 32, views=2)


def test_an_experiment_streams_its_folder(digits_folder, data_root, tmp_path, monkeypatch,
                                           capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"name: s\nseeds: [0]\ndata: {{name: 'folder:{digits_folder}', stream: true, "
        "workers: 1}\nteacher: {model: {name: mlp, hidden: [32]}, train: {epochs: 2}}\n"
        "student: {name: mlp, hidden: [16]}\ntrain: {epochs: 2, augment: {shift: 1}}\n"
        "students:\n  - {label: kd, method: {name: kd}}\n"
        "  - {label: kd_cached, method: {name: kd}, train: {teacher_cache: {views: 2}}}\n")
    assert main(["validate", str(config)]) == 0
    assert main(["run", str(config), "--out", "e", "--no-cache", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| kd | mlp | kd |" in table and "| kd_cached | mlp | kd |" in table
    summary = json.loads(next((tmp_path / "e").rglob("kd/summary.json")).read_text())
    assert summary["identity"]["data"]["stream"] is True
    teacher = json.loads(next((tmp_path / "e").rglob("teacher/summary.json")).read_text())
    assert teacher["test_acc"] > 80.0  # trained on streamed batches
    assert summary["test_acc"] > 15.0  # (2 epochs of KD at T=4: above chance, as in memory)
