"""Dry build of a config (kdkit.pipelines.check) and the dataset geometry table it uses."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.config import config_from_dict, load_config, load_raw
from kdkit.data import DATASETS
from kdkit.data.cifar import CIFAR10_DIR, CIFAR10_TEST, CIFAR10_TRAIN, CIFAR100_DIR
from kdkit.data.geometry import GEOMETRY, dataset_geometry
from kdkit.data.idx import write_idx
from kdkit.errors import KdkitError
from kdkit.models import MODELS
from kdkit.pipelines.check import DryBuild, dry_build

ALL_EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
# configs of torchvision/timm models on files an earlier command writes: the vision lane's
VISION_EXAMPLES = [p for p in ALL_EXAMPLES if "torchvision:" in p.read_text()]
# configs whose teacher is a weights file an earlier command writes (their header says which)
NEEDS_RUN = [p for p in ALL_EXAMPLES if "weights: runs/" in p.read_text()]
EXAMPLES = [p for p in ALL_EXAMPLES if p not in VISION_EXAMPLES and p not in NEEDS_RUN]


def default_raw() -> dict[str, Any]:
    """The built-in default config (digits; mlp teacher, mlp student; scratch and kd)."""
    raw, _ = load_raw(None)
    return copy.deepcopy(raw)


def problems_of(raw: dict[str, Any], **kwargs: Any) -> list[str]:
    return dry_build(config_from_dict(raw), **kwargs)


# ----------------------------------------------------------------------------- geometry


def test_geometry_matches_the_digits_loader(digits) -> None:
    assert dataset_geometry("digits") == (digits.num_classes, digits.input_shape)


def test_geometry_covers_every_registered_dataset() -> None:
    assert sorted(GEOMETRY) == DATASETS.names()


def _fake_idx(folder: Path) -> None:
    folder.mkdir(parents=True)
    for split, n in (("train", 3), ("t10k", 2)):
        write_idx(folder / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))


def _fake_cifar(folder: Path, names: list[str], label_bytes: int) -> None:
    folder.mkdir(parents=True)
    record = bytes(label_bytes) + bytes(3 * 32 * 32)  # label(s) 0, black image
    for name in names:
        (folder / name).write_bytes(record * 2)


def test_geometry_matches_every_raw_loader(tmp_path: Path) -> None:
    """Each registered loader, run on tiny files of its format, gives the table's geometry."""
    _fake_idx(tmp_path / "mnist")
    _fake_idx(tmp_path / "fashion_mnist")
    _fake_cifar(tmp_path / CIFAR10_DIR, CIFAR10_TRAIN + CIFAR10_TEST, 1)
    _fake_cifar(tmp_path / CIFAR100_DIR, ["train.bin", "test.bin"], 2)
    from kdkit.data.text import is_text_name

    for name in DATASETS.names():
        if is_text_name(name):  # token windows: tests/test_data_text.py
            continue
        raw = DATASETS.create(name, root=tmp_path)
        assert dataset_geometry(name) == (raw.num_classes, tuple(raw.x_train.shape[1:])), name


def test_geometry_of_an_unknown_dataset() -> None:
    with pytest.raises(KdkitError, match="'mnsit'.*did you mean 'mnist'"):
        dataset_geometry("mnsit")


# ----------------------------------------------------------------------------- clean configs


@pytest.mark.parametrize("path", [None, *EXAMPLES], ids=lambda p: p.name if p else "default")
def test_shipped_configs_have_no_problems(path: Path | None) -> None:
    assert dry_build(load_config(path)) == []


@pytest.mark.vision
@pytest.mark.parametrize("path", VISION_EXAMPLES, ids=lambda p: p.name)
def test_shipped_vision_configs_have_no_problems(path: Path, tmp_path, monkeypatch) -> None:
    """With the files its header's commands write (here: digits as the image folder, and
    random weights as the teacher's), the config passes every check; without them, the
    missing files are named."""
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    from kdkit.cli import main
    from kdkit.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    weights = load_raw(path)[0]["teacher"]["model"]["weights"]
    with pytest.raises(ConfigError, match=f"weights: no such file {weights}"):
        load_config(path)
    Path(weights).parent.mkdir(parents=True)
    save_file(resnet18(num_classes=10).state_dict(), weights)
    problems = dry_build(load_config(path))
    assert problems and any("runs/data/fashion-mnist-png" in p for p in problems)
    assert main(["data", "export", "digits", "--format", "imagefolder", "--out",
                 "runs/data/fashion-mnist-png"]) == 0
    assert dry_build(load_config(path)) == []


# The methods of issue 13, each with a typo of one of its arguments (the right name second).
NEW_METHODS: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
    ("dkd", {}, ("warmup_epoch", "warmup_epochs")),
    ("dkd", {"logit_standardization": True}, ("betta", "beta")),
    ("kd", {"logit_standardization": True}, ("logit_standardisation", "logit_standardization")),
    ("dist", {}, ("gama", "gamma")),
    ("nkd", {}, ("temprature", "temperature")),
    ("cc", {}, ("oder", "order")),
    ("ctkd", {}, ("curriculum_epoch", "curriculum_epochs")),
    ("ctkd", {"base": "dkd", "mode": "instance", "logit_standardization": True},
     ("dkd_beat", "dkd_beta")),
    ("crd", {"negatives": 64}, ("feat_dims", "feat_dim")),
    ("vid", {}, ("init_varaince", "init_variance")),
    ("reviewkd", {}, ("mid_channel", "mid_channels")),
    ("simkd", {}, ("facter", "factor")),
]


def _new_methods_raw(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    raw = default_raw()
    raw["teacher"]["model"] = teacher
    raw["student"] = student
    raw["students"] = [{"label": f"m{i}", "method": {"name": name, **kw}}
                       for i, (name, kw, _typo) in enumerate(NEW_METHODS)]
    return raw


def test_every_new_method_validates_on_a_cnn_pair() -> None:
    """Each method of issue 13 builds and takes a step on a ResNet pair on digits (the pair
    of examples/fashion_feature.yaml)."""
    raw = _new_methods_raw({"name": "resnet14"}, {"name": "resnet", "depth": 8, "width": 8})
    assert problems_of(raw) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_new_methods_on_the_example_pairs(path: Path) -> None:
    """On each example's pair every method of issue 13 builds, except where the pair cannot
    have it, said clearly: a feature method on an MLP, SimKD on a teacher whose classifier
    does not follow global average pooling (a flattening head: PlainCNN, LeNet-5)."""
    raw = copy.deepcopy(load_raw(path)[0])
    raw.pop("datafree", None)
    labels = [t["label"] for t in raw.get("teachers", [])]
    raw["students"] = [
        {"label": f"m{i}", "method": {"name": name, **kw},
         **({"teachers": [labels[0]]} if len(labels) > 1 else {})}
        for i, (name, kw, _typo) in enumerate(NEW_METHODS)]
    expected = ("cannot find the stages of MLP", "outputs no feature map",
                "reuses a classifier that follows global average pooling")
    if raw["data"]["name"] == "shakespeare":  # image methods on token windows: refused
        found = problems_of(raw)
        assert len(found) == sum(name != "kd" for name, _kw, _t in NEW_METHODS)  # kd+LS works
        assert all("distils image classifiers; this data is token windows" in p for p in found)
        return
    if raw["data"].get("task") == "denoise":  # classification methods on a dense task
        found = problems_of(raw)
        assert len(found) == len(NEW_METHODS)
        assert all("trains classifiers (logits against labels); this data is a dense task"
                   in p for p in found)
        return
    for p in problems_of(raw):
        method = NEW_METHODS[int(p.split("label 'm")[1].split("'")[0])][0]
        assert method in ("vid", "reviewkd", "simkd") and any(e in p for e in expected), p
        assert "Error:" not in p, p  # a sentence, not a raw exception


def test_a_typo_in_a_new_methods_argument_is_named() -> None:
    from kdkit.errors import ConfigError

    raw = _new_methods_raw({"name": "resnet14"}, {"name": "resnet", "depth": 8, "width": 8})
    for run, (_name, _kw, (typo, _right)) in zip(raw["students"], NEW_METHODS, strict=True):
        run["method"][typo] = 1
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    for i, (name, _kw, (typo, right)) in enumerate(NEW_METHODS):
        assert (f"students[{i}].method: method '{name}' has no argument '{typo}'; "
                f"it takes: ") in msg
        line = next(ln for ln in msg.splitlines() if f"students[{i}].method" in ln)
        assert right in line.split("it takes: ")[1]


def test_default_config_is_fast_and_leaves_the_rng_alone() -> None:
    cfg = load_config()
    dry_build(cfg)  # first call: lazy imports
    state = torch.get_rng_state()
    t0 = time.perf_counter()
    assert dry_build(cfg) == []
    assert time.perf_counter() - t0 < 2.0  # about 10 ms on one core
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- problems


def test_model_argument_of_the_wrong_type_names_the_run() -> None:
    raw = default_raw()
    raw["students"].append(
        {"label": "tiny", "model": {"name": "mlp", "hidden": "sixteen"}, "method": {"name": "kd"}}
    )
    problems = problems_of(raw)
    assert len(problems) == 1
    assert problems[0].startswith("students[2] (label 'tiny').model: ")
    assert "hidden" in problems[0] and "sixteen" in problems[0]


def test_shared_student_model_is_reported_once_with_its_runs() -> None:
    raw = default_raw()
    raw["student"] = {"name": "mlp", "hidden": "sixteen"}
    problems = problems_of(raw)
    assert len(problems) == 1
    assert problems[0].startswith("student: ")
    assert "'scratch', 'kd'" in problems[0]


def test_lenet5_teacher_on_8x8_digits() -> None:
    raw = default_raw()
    raw["teacher"]["model"] = {"name": "lenet5"}
    problems = problems_of(raw)
    # once, at the teacher: the kd run that would use it is not reported again
    assert len(problems) == 1
    assert problems[0].startswith("teacher.model: ")
    assert "lenet5" in problems[0] and "input_size=8" in problems[0]


def test_feature_method_on_a_model_without_stages() -> None:
    raw = default_raw()
    raw["students"].append({"label": "overhaul", "method": {"name": "overhaul"}})
    problems = problems_of(raw)
    assert problems == [
        "students[2] (label 'overhaul'): method 'overhaul' (student mlp, teacher 'teacher'): "
        "cannot find the stages of MLP (no module returns a feature map (B, C, H, W)); name "
        "the layers explicitly, e.g. student_layers: ['block2:preact']"
    ]


def test_every_problem_is_reported_together() -> None:
    raw = default_raw()
    raw["teachers"] = [{"label": "wide", "model": {"name": "mlp", "hidden": [64]}}]
    raw["students"][1]["teachers"] = ["teacher"]
    raw["students"] += [
        {"label": "fitnets", "method": {"name": "fitnets"}, "teachers": ["teacher"]},
        # a KdkitError of the method builder: one weight per teacher
        {"label": "weighted", "method": {"name": "ensemble_weighted", "weights": [1.0]}},
    ]
    problems = problems_of(raw)
    assert len(problems) == 2
    assert problems[0].startswith("students[2] (label 'fitnets'): method 'fitnets' ")
    assert "cannot find the stages of MLP" in problems[0]
    assert problems[1].startswith("students[3] (label 'weighted'): method 'ensemble_weighted' "
                                  "(student mlp, teachers 'teacher', 'wide'): ")
    assert "one per teacher (2" in problems[1]


def test_a_tap_that_fails_only_in_the_training_step() -> None:
    raw = default_raw()
    raw["students"].append(
        {"label": "rkd", "method": {"name": "rkd", "student_layer": "fc9"}})
    problems = problems_of(raw)
    assert len(problems) == 1
    assert problems[0].startswith("students[2] (label 'rkd'): method 'rkd' ")
    assert "training step on a zero batch of shape (2, 1, 8, 8)" in problems[0]
    assert "no module 'fc9'" in problems[0]


def test_assistant_chains_and_candidate_paths() -> None:
    raw = default_raw()
    raw["data"]["name"] = "mnist"  # never loaded
    raw["teacher"]["model"] = {"name": "resnet8"}
    raw["students"] = [
        # the first stage (resnet8 -> mlp) cannot find the assistant's stages
        {"label": "chain", "model": {"name": "resnet8"}, "method": {"name": "at"},
         "via": [{"name": "mlp", "hidden": [16]}]},
        {"label": "search", "method": {"name": "kd"},
         "via_search": [[{"name": "plain_cnn2"}], [{"name": "mlp", "hidden": "x"}], []]},
    ]
    problems = problems_of(raw)
    assert len(problems) == 2
    assert problems[0].startswith(
        "students[0] (label 'chain'): method 'at' (via[0] mlp, from teacher 'teacher'): ")
    assert problems[1].startswith("students[1] (label 'search').via_search[1][0]: ")


def test_best_teacher_checks_every_candidate() -> None:
    raw = default_raw()
    raw["data"]["name"] = "mnist"
    raw["teachers"] = [{"label": "cnn", "model": {"name": "resnet8"}}]
    raw["students"] = [{"label": "at", "model": {"name": "resnet8"}, "method": {"name": "at"},
                        "teachers": "best"}]
    problems = problems_of(raw)
    assert len(problems) == 1  # from the mlp teacher; the resnet8 teacher is fine
    assert problems[0].startswith(
        "students[0] (label 'at'): method 'at' (student resnet8, teacher 'teacher'): ")


@pytest.fixture
def broken_models(monkeypatch):
    """Two models that build but fail on the data: a shape error and wrong logits."""

    class Broken(nn.Module):
        def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
            super().__init__()
            self.fc = nn.Linear(in_channels * input_size * input_size + 1, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    def broken(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
        return Broken(num_classes, in_channels, input_size)

    def flat(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, 3))

    monkeypatch.setitem(MODELS._items, "broken_test", broken)
    monkeypatch.setitem(MODELS._items, "flat_test", flat)


def test_forward_failures_become_problems(broken_models) -> None:
    raw = default_raw()
    raw["teacher"]["model"] = {"name": "broken_test"}
    raw["students"][0]["model"] = {"name": "flat_test"}
    problems = problems_of(raw)
    assert len(problems) == 2
    assert problems[0].startswith(
        "teacher.model: model broken_test fails on a (2, 1, 8, 8) input (the data's geometry): "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert problems[1] == (
        "students[0] (label 'scratch').model: model flat_test fails on a (2, 1, 8, 8) input "
        "(the data's geometry): it returns (2, 3), not (2, 10) logits")


def test_meta_device_path_finds_the_same_problems() -> None:
    """With every model on the meta device (as for large ones), the same lines come out;
    what meta cannot run (aten::equal in the overhaul's taps) is redone on the CPU (RKD,
    which no longer indexes with a mask, runs on meta)."""
    raw = default_raw()
    raw["data"]["name"] = "mnist"
    raw["teacher"]["model"] = {"name": "resnet8"}
    raw["student"] = {"name": "resnet", "depth": 8, "width": 4}
    raw["students"] = [
        {"label": "kd", "method": {"name": "kd"}},
        {"label": "overhaul", "method": {"name": "overhaul"}},
        {"label": "rkd", "method": {"name": "rkd"}},
        {"label": "bad", "model": {"name": "mlp"}, "method": {"name": "at"}},
        {"label": "worse", "model": {"name": "mlp", "hidden": "x"}, "method": {"name": "kd"}},
    ]
    cfg = config_from_dict(raw)
    on_cpu = dry_build(cfg)
    meta = DryBuild(cfg, real_limit=0).run()
    assert meta.problems == on_cpu
    assert [p.split(":")[0] for p in on_cpu] == [
        "students[3] (label 'bad')", "students[4] (label 'worse').model"]
    redone = sorted(f.split(" (")[0] for f in meta.fallbacks)
    assert redone == ["method overhaul"]


def test_a_dataset_registered_by_the_user_is_not_refused(monkeypatch):
    """Its geometry is not in the table; the dry build steps aside instead of failing."""
    from kdkit.data import DATASETS
    from kdkit.pipelines.check import DryBuild

    monkeypatch.setitem(DATASETS._items, "my_data", DATASETS.get("digits"))
    monkeypatch.setitem(DATASETS._summaries, "my_data", "a user's dataset")
    cfg = load_config(None, ["data.name=my_data"])
    build = DryBuild(cfg).run()
    assert build.problems == []
    assert "checked when it loads" in build.fallbacks[0]
