"""Model sources: ``py:`` (the user's own factory), ``torchvision:`` and ``timm:`` (vision
lane), ``weights:`` files, ``output:`` selectors, pretrained teachers used as is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.models import create_model, model_problems

sys.path.insert(0, str(Path(__file__).parent))  # tests/user_models.py, the "user's" code

PY = "py:user_models:tiny_net"


def test_py_source_gets_the_geometry_it_asks_for():
    m = create_model(PY, num_classes=7, in_channels=1, input_size=8, width=4)
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
    assert m.conv.out_channels == 4


@pytest.mark.parametrize("returns, key", [("dict", "logits"), ("tuple", 1), ("object", "logits")])
def test_output_selects_the_logits_and_keeps_parameter_names(returns, key):
    plain = create_model(PY, num_classes=5, in_channels=1, returns="tensor")
    m = create_model(PY, num_classes=5, in_channels=1, returns=returns, output=key)
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    assert list(m.state_dict()) == list(plain.state_dict())


def test_a_missing_output_key_is_named():
    m = create_model(PY, num_classes=5, in_channels=1, returns="dict", output="scores")
    with pytest.raises(KdkitError, match=r"output: 'scores' is not in the model's output "
                                         r"\(\['features', 'logits'\]\)"):
        m(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("name, problem", [
    ("py:user_models:nope", "'user_models' has no callable 'nope'"),
    ("py:no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("py:user_models", "write py:package.module:factory"),
    ("keras:resnet", "unknown source 'keras'; use a kdkit model name"),
    ("py:user_models:not_a_model", "returned int, not an nn.Module"),
])
def test_bad_sources_are_one_clear_error(name, problem):
    with pytest.raises(KdkitError) as e:
        create_model(name, num_classes=3, in_channels=1)
    assert problem in str(e.value)


def test_unknown_py_arguments_are_named():
    with pytest.raises(KdkitError, match="has no argument 'depth'; it takes: num_classes, "
                                         "in_channels, width, returns"):
        create_model(PY, num_classes=3, in_channels=1, depth=3)


def test_weights_safetensors_and_pt_load_and_mismatches_are_listed(tmp_path):
    torch.manual_seed(0)
    src = create_model(PY, num_classes=4, in_channels=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "wrapped.pth")
    for f in ("w.safetensors", "w.pt", "wrapped.pth"):
        m = create_model(PY, num_classes=4, in_channels=1, weights=str(tmp_path / f))
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                     m.state_dict().values(), strict=True))
    with pytest.raises(KdkitError) as e:
        create_model(PY, num_classes=6, in_channels=1, width=8,
                     weights=str(tmp_path / "w.safetensors"))
    assert "shape mismatch (file vs model) ['head.bias [4] vs [6]', 'head.weight" in str(e.value)
    part = {k: v for k, v in src.state_dict().items() if not k.startswith("bn.")}
    part["extra.weight"] = torch.zeros(1)
    save_file(part, tmp_path / "part.safetensors")
    with pytest.raises(KdkitError, match=r"missing \['bn.bias', .*unexpected \['extra.weight'\]"):
        create_model(PY, num_classes=4, in_channels=1, weights=str(tmp_path / "part.safetensors"))


def test_a_pickled_object_is_refused_never_unpickled(tmp_path):
    torch.save(create_model(PY, num_classes=4, in_channels=1), tmp_path / "model.pt")  # a module
    with pytest.raises(KdkitError, match="is not a plain state dict of tensors"):
        create_model(PY, num_classes=4, in_channels=1, weights=str(tmp_path / "model.pt"))


def test_model_problems_before_anything_is_built(tmp_path):
    assert model_problems("mlp", {"num_classes": 3}) == [
        "num_classes: set from the dataset; remove it"]
    assert model_problems(PY, {"weights": str(tmp_path / "none.pt")}) == [
        f"weights: no such file {tmp_path / 'none.pt'}"]
    assert model_problems("mlp", {"output": [1]}) == [
        "output: a key, attribute name or index, got [1]"]


def test_cli_trains_a_users_model_and_eval_rebuilds_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", PY, "--model-arg", "width=6", "--model-arg",
                 "returns=dict", "--model-arg", "output=logits", "--data", "digits",
                 "--epochs", "2", "--out", "u", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "u" / "model.json").read_text())
    assert meta["model"] == {"name": PY, "kwargs": {"width": 6, "returns": "dict",
                                                    "output": "logits"}}
    capsys.readouterr()
    assert main(["eval", "u"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 10


def test_a_pretrained_teacher_is_used_as_is(tmp_path, monkeypatch, capsys):
    """A teacher with weights: is not trained: it is evaluated, reported, and distilled."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[64]", "--data", "digits",
                 "--epochs", "5", "--out", "t", "--no-progress", "--val-fraction", "0.2"]) == 0
    trained = json.loads((tmp_path / "t" / "summary.json").read_text())
    config = tmp_path / "exp.yaml"
    config.write_text(
        "name: pre\nseeds: [0]\ndata: {name: digits, val_fraction: 0.2}\n"
        "teacher: {model: {name: mlp, hidden: [64], weights: t/model.safetensors}}\n"
        "student: {name: mlp, hidden: [16]}\ntrain: {epochs: 3}\n"
        "students:\n  - {label: kd, method: {name: kd}}\n")
    assert main(["run", str(config), "--out", "e", "--no-progress", "--no-cache"]) == 0
    teacher = json.loads((tmp_path / "e" / "seed0" / "teacher" / "summary.json").read_text())
    assert teacher["method"] == "pretrained" and teacher["epochs"] == 0
    assert teacher["test_acc"] == pytest.approx(trained["test_acc"])  # the same weights
    assert not (tmp_path / "e" / "seed0" / "teacher" / "checkpoint").exists()  # no training
    assert "| teacher | mlp | pretrained |" in capsys.readouterr().out


def test_validate_reports_a_missing_weights_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(
        "name: pre\nseeds: [0]\ndata: {name: digits}\n"
        "teacher: {model: {name: mlp, weights: gone.safetensors}}\n"
        "student: {name: mlp, hidden: [16]}\nstudents:\n  - {label: kd, method: {name: kd}}\n")
    assert main(["validate", str(config)]) == 2
    assert "teacher.model: weights: no such file gone.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------ the vision lane


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is not None,
                    reason="torchvision is installed here")
def test_a_missing_library_names_the_install_command():
    with pytest.raises(KdkitError, match="needs the torchvision package, which is not "
                                         "installed .*; pip install torchvision"):
        create_model("torchvision:resnet18", num_classes=10, in_channels=3)


@pytest.mark.vision
def test_torchvision_and_timm_models_from_their_names():
    tv = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    assert tv and timm
    m = create_model("torchvision:resnet18", num_classes=7, in_channels=3)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    t = create_model("timm:resnet18", num_classes=5, in_channels=1)
    assert t(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(KdkitError, match="takes 3-channel images but the data has 1"):
        create_model("torchvision:resnet18", num_classes=7, in_channels=1)
    with pytest.raises(KdkitError, match="torchvision has no model 'resnet1800'"):
        create_model("torchvision:resnet1800", num_classes=7, in_channels=3)
    with pytest.raises(KdkitError, match="timm has no model 'no_such_net'"):
        create_model("timm:no_such_net", num_classes=7, in_channels=3)


@pytest.mark.vision
def test_kd_from_a_torchvision_teacher_into_a_timm_student(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "torchvision:resnet18", "--data", "fake_cifar10",
                 "--train-subset", "256", "--epochs", "1", "--batch-size", "64", "--out", "t",
                 "--no-progress"]) == 0
    assert main(["distill", "--teacher", "t", "--student", "timm:resnet10t", "--data",
                 "fake_cifar10", "--train-subset", "256", "--epochs", "1", "--batch-size",
                 "64", "--out", "s", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    assert meta["model"]["name"] == "timm:resnet10t"


def test_data_channels_and_resize_fit_the_data_to_the_model(tmp_path, monkeypatch, capsys):
    """Grey digits into a 3-channel model at 16x16, without editing the model; eval rebuilds
    the same adapted splits from model.json."""
    from kdkit.data import load_dataset

    d = load_dataset("digits", val_fraction=0.2, seed=0, channels=3, resize=16)
    assert d.input_shape == (3, 16, 16) and d.train.x.shape[1:] == (3, 16, 16)
    assert torch.equal(d.train.x[:, 0], d.train.x[:, 2])  # the grey channel, repeated
    assert d.source["channels"] == 3 and d.source["resize"] == 16
    grey = load_dataset("digits", val_fraction=0.2, seed=0, channels=1, resize=8)
    assert grey.input_shape == (1, 8, 8) and "resize" in grey.source
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", PY, "--data", "digits", "--channels", "3", "--resize",
                 "16", "--epochs", "1", "--out", "r", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "r" / "model.json").read_text())
    assert meta["data"]["input_shape"] == [3, 16, 16]
    capsys.readouterr()
    assert main(["eval", "r", "--split", "val"]) == 0
    cli_val = load_dataset("digits", val_fraction=0.1, seed=0, channels=3, resize=16).val
    assert json.loads(capsys.readouterr().out)["samples"] == len(cli_val)


FEATURE_METHODS = ["fitnets", "at", "hint", "nst", "sp", "pkt", "rkd", "overhaul", "ab", "fsp"]
REFUSED = {  # where a method cannot apply, one clear refusal (never a wrong tensor)
    "overhaul": "not a ReLU, so it has no pre-activation to read (a linear bottleneck)",
    "ab": "not a ReLU, so it has no pre-activation to read (a linear bottleneck)",
    "fsp": "FSP matrices compare equal widths",
}


@pytest.mark.vision
@pytest.mark.parametrize("student", ["torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                     "torchvision:efficientnet_b0", "timm:resnet18",
                                     "timm:efficientnet_b0"])
def test_feature_methods_find_the_stages_of_library_models(student):
    """Every feature method on a torchvision ResNet-18 teacher and a student whose stages
    are found by probing (no layer names): builds, steps, and its gradients reach the
    student and the adapters only; or is refused by name where it cannot apply."""
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    from kdkit.distill import Distiller, build_stages

    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    for method in FEATURE_METHODS:
        torch.manual_seed(0)
        t = create_model("torchvision:resnet18", num_classes=10, in_channels=3)
        s = create_model(student, num_classes=10, in_channels=3)
        try:
            stages = build_stages(method, s, {"teacher": t}, example_input=x[:2])
        except KdkitError as e:
            assert method in REFUSED and REFUSED[method] in str(e), (method, str(e))
            continue
        if "resnet" not in student:  # the others' stages are linear bottlenecks
            assert method not in REFUSED, method
        for stage in stages:
            d = Distiller(s, {"teacher": t}, stage.terms)
            d.zero_grad()
            d(x, y)["loss"].backward()
            assert all(p.grad is None for p in t.parameters()), method
            assert any(p.grad is not None and p.grad.abs().sum() > 0
                       for p in s.parameters()), method
            for adapter in d.adapters.values():
                assert any(p.grad is not None for p in adapter.parameters()), method


def test_models_layers_shows_the_stage_ends_found(capsys):
    assert main(["models", "--layers", "resnet8", "--input", "1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "stage ends (feature methods): layer1:output, layer2:output, layer3:output" in out
    assert "pre-activations (overhaul, AB): layer1:preact, layer2:preact, layer3:preact" in out
    assert main(["models", "--layers", "mlp", "--input", "1,8,8"]) == 0
    assert "stage ends: not found (cannot find the stages of MLP (no module returns a " \
           "feature map" in capsys.readouterr().out


@pytest.mark.vision
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_overhaul_preact_taps_equal_a_manual_recomputation_of_the_block(name):
    """The pre-ReLU feature the overhaul reads at each stage end of a library ResNet (in-place
    ReLU used twice, functional residual) is the block's own sum before its last ReLU,
    recomputed here by hand from the block's input."""
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    from kdkit.distill.features import stage_points
    from kdkit.taps import run_with_taps

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3).eval()
    for m in model.modules():  # timm zero-initialises each block's last BN: undo it
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 3, 64, 64)
    points = stage_points(model, x, "preact")
    assert [str(p.tap) for p in points] == [f"layer{k}:preact" for k in range(1, 5)]
    inputs = {}
    hooks = [getattr(model, f"layer{k}")[-1].register_forward_pre_hook(
        lambda m, a, k=k: inputs.__setitem__(k, a[0].clone())) for k in range(1, 5)]
    with torch.no_grad():
        _, feats = run_with_taps(model, x, {str(p.tap): p.tap for p in points})
    for h in hooks:
        h.remove()
    for k in range(1, 5):
        block = getattr(model, f"layer{k}")[-1]
        xin = inputs[k]
        with torch.no_grad():
            a = block.bn1(block.conv1(xin))
            a = torch.relu(getattr(block, "drop_block", torch.nn.Identity())(a))
            a = block.bn2(block.conv2(a))
            short = block.downsample(xin) if block.downsample is not None else xin
            want = a + short
        assert torch.allclose(feats[f"layer{k}:preact"], want, atol=1e-5), k
        assert (want < 0).any()  # a real pre-activation: the ReLU would change it


@pytest.mark.vision
def test_a_vision_transformers_tokens_are_read_as_maps_never_as_its_patch_embedding():
    """ViT's features are tokens (B, N, D): its stage ends are transformer blocks (never the
    patch embedding read as if it were the network's stages), read as their patch map; the
    CNN stage at the same grid pairs with its last block (every method and pair:
    tests/test_tokens.py); methods on the penultimate embedding (PKT) or logits work too."""
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    from kdkit.distill import Distiller, build_stages

    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    vit = create_model("timm:vit_tiny_patch16_224", num_classes=10, in_channels=3, img_size=64)
    teacher = create_model("torchvision:resnet18", num_classes=10, in_channels=3)
    (at,) = build_stages("at", vit, {"teacher": teacher}, example_input=x)
    assert [(str(t.student), str(t.teacher)) for t in at.terms[1:]] == [
        ("blocks.11:output", "layer3:output")]  # the 4x4 grid of 64 / 16
    for stage in [at, *build_stages("pkt", vit, {"teacher": teacher}, example_input=x),
                  *build_stages("kd", vit, {"teacher": teacher}, example_input=x)]:
        Distiller(vit, {"teacher": teacher}, stage.terms)(x, y)["loss"].backward()
