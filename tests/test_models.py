"""Tests for kdkit.models: every registered model builds, runs and reports honest sizes."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models import MODELS, count_parameters, create_model, list_models

ALL = list_models()
# Language models (token ids in, (B, L, V) out) have their own tests: test_models_gpt.py.
TOKEN_MODELS = {"gpt", "gpt_student", "gpt_teacher"}
# Dense-task models (images in, images out): tests/test_dense.py, and the test below.
DENSE_MODELS = {"denoiser", "denoiser_student", "denoiser_teacher"}
IMAGE = [n for n in ALL if n not in TOKEN_MODELS | DENSE_MODELS]
# Models whose feature maps collapse at 8x8 inputs: they must refuse with a KdkitError.
TOO_SMALL_AT_8 = {"lenet5", "lenet5_half", "plain_cnn8", "plain_cnn10"}


def _forward(name: str, c: int, s: int, num_classes: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=c, input_size=s).eval()
    with torch.no_grad():
        return model(torch.randn(2, c, s, s))


@pytest.mark.parametrize("name", IMAGE)
@pytest.mark.parametrize(("c", "s", "k"), [(1, 28, 10), (3, 32, 10), (3, 32, 100), (1, 8, 10)])
def test_forward_shape_and_finite(name: str, c: int, s: int, k: int) -> None:
    if s == 8 and name in TOO_SMALL_AT_8:
        with pytest.raises(KdkitError, match=rf"'{name}'.*>= \d+.*input_size=8"):
            create_model(name, in_channels=c, input_size=s)
        return
    out = _forward(name, c, s, k)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(DENSE_MODELS))
@pytest.mark.parametrize(("c", "s"), [(1, 28), (3, 32), (1, 8)])
def test_dense_models_return_images_of_the_input_size(name: str, c: int, s: int) -> None:
    out = _forward(name, c, s, num_classes=c)
    assert out.shape == (2, c, s, s) and torch.isfinite(out).all()


def test_registry_names() -> None:
    expected = {
        "mlp", "mlp_hinton_1200", "mlp_hinton_800", "lenet5", "lenet5_half", "plain_cnn",
        "plain_cnn2", "plain_cnn4", "plain_cnn6", "plain_cnn8", "plain_cnn10", "resnet",
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet110", "wrn",
        "wrn16_1", "wrn16_2", "wrn16_4", "wrn28_2", "wrn28_4", "wrn40_1", "wrn40_2",
        "gpt", "gpt_student", "gpt_teacher", "denoiser", "denoiser_student", "denoiser_teacher",
    }  # fmt: skip
    assert set(ALL) == expected
    assert ALL == MODELS.names()


@pytest.mark.parametrize("name", ALL)
def test_summary_is_one_honest_line(name: str) -> None:
    summary = MODELS.summary(name)
    assert summary and "\n" not in summary
    m = re.search(r"([\d.]+)([KM]) params at (\d+)x(\d+)x(\d+)", summary)
    if m is None:
        return
    value, unit, c, h, w = m.groups()
    assert h == w
    model = create_model(name, in_channels=int(c), input_size=int(h))
    count = count_parameters(model) / (1e3 if unit == "K" else 1e6)
    decimals = len(value.split(".")[1]) if "." in value else 0
    assert round(count, decimals) == pytest.approx(float(value)), (name, count)


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet56", 0.84e6, 0.87e6),
        ("resnet110", 1.7e6, 1.75e6),
        ("wrn16_2", 0.68e6, 0.71e6),  # WRN-16-2: ~0.7M on CIFAR (Zagoruyko & Komodakis 2016)
        ("wrn40_2", 2.2e6, 2.3e6),  # WRN-40-2: 2.2M in the paper
    ],
)
def test_known_param_counts(name: str, lo: float, hi: float) -> None:
    assert lo <= count_parameters(create_model(name, in_channels=3, input_size=32)) <= hi


def test_hinton_mlp_param_counts_exact() -> None:
    big = 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    small = 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert count_parameters(create_model("mlp_hinton_1200")) == big
    assert count_parameters(create_model("mlp_hinton_800")) == small
    assert not any(isinstance(m, nn.Dropout) for m in create_model("mlp_hinton_800").modules())


def test_count_parameters_trainable_only() -> None:
    model = create_model("lenet5_half")
    total = count_parameters(model)
    model.conv1.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 3 * 25 - 3


def test_typo_suggests_name() -> None:
    with pytest.raises(KdkitError, match="resnet20"):
        create_model("resnet2O")


def test_unknown_kwarg_named() -> None:
    with pytest.raises(KdkitError, match="widht"):
        create_model("resnet20", widht=32)
    with pytest.raises(KdkitError, match="depth"):
        create_model("resnet20", depth=32)  # fixed-depth presets do not take a depth


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet", {"depth": 21}),
        ("resnet", {"width": 0}),
        ("wrn", {"depth": 15}),
        ("wrn", {"dropout": 1.5}),
        ("plain_cnn", {"size": 3}),
        ("mlp", {"hidden": [0]}),
        ("mlp", {"num_classes": 0}),
        ("lenet5", {"padding": -1}),
        ("plain_cnn10", {"input_size": 15}),
    ],
)
def test_bad_architecture_args(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(KdkitError, match=name):
        create_model(name, **kwargs)


def test_generic_factories_match_presets() -> None:
    pairs = [
        (create_model("resnet", depth=32), create_model("resnet32")),
        (create_model("wrn", depth=40, widen=2), create_model("wrn40_2")),
        (create_model("plain_cnn", size=8), create_model("plain_cnn8")),
        (create_model("mlp", hidden=[800, 800]), create_model("mlp_hinton_800")),
    ]
    for generic, preset in pairs:
        assert count_parameters(generic) == count_parameters(preset)
    wide = create_model("resnet", depth=8, width=32, in_channels=3, input_size=32)
    assert wide.fc.in_features == 128


def test_lenet_geometry() -> None:
    # 28x28 is padded by 2 so conv2 ends at the classic 16 x 5 x 5 = 400 features.
    assert create_model("lenet5").fc1.in_features == 400
    assert create_model("lenet5", in_channels=3, input_size=32).fc1.in_features == 400
    assert create_model("lenet5_half").fc1.in_features == 8 * 5 * 5
    assert create_model("lenet5", input_size=8, padding=4).fc1.in_features == 16


def test_module_names() -> None:
    names = dict(create_model("resnet20").named_modules())
    for key in ["conv1", "bn1", "relu", "layer3.2.bn2", "layer2.0.shortcut", "layer1.0.relu2"]:
        assert key in names
    assert isinstance(names["layer2.0.shortcut"], nn.Sequential)  # 1x1 conv + BN projection
    assert isinstance(names["layer1.0.shortcut"], nn.Identity)
    names = dict(create_model("wrn16_1").named_modules())
    for key in ["conv1", "layer1.0.conv2", "layer3.1.relu2", "bn", "relu", "avgpool", "fc"]:
        assert key in names
    names = dict(create_model("mlp_hinton_1200").named_modules())
    for key in ["drop_in", "fc1", "relu1", "drop1", "fc2", "relu2", "drop2", "fc_out"]:
        assert key in names
    assert isinstance(dict(create_model("plain_cnn2").named_modules())["features.2"], nn.ReLU)


@pytest.mark.parametrize("name", IMAGE)
def test_each_relu_module_runs_once(name: str) -> None:
    """Activations are separate non-inplace nn.ReLU modules, so hooks see every one."""
    s = 16 if name in TOO_SMALL_AT_8 else 8
    model = create_model(name, in_channels=1, input_size=s).eval()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    calls: Counter[int] = Counter()

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        calls[id(module)] += 1

    for m in relus:
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 1, s, s))
    assert sorted(calls) == sorted(id(m) for m in relus)
    assert set(calls.values()) == {1}


def test_hinton_teacher_dropout_train_vs_eval() -> None:
    torch.manual_seed(0)
    model = create_model("mlp_hinton_1200")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("name", "c", "s"),
    [("resnet8", 1, 8), ("wrn16_1", 1, 8), ("plain_cnn4", 1, 8), ("lenet5_half", 1, 16),
     ("mlp", 1, 8)],
)  # fmt: skip
def test_gradients_reach_every_parameter(name: str, c: int, s: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=c, input_size=s).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, c, s, s)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
