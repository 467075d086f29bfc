"""kdkit export: ONNX export verified against torch, int8 quantization, the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kdkit import BatchLoader, Distiller, LoopSettings, build_method, create_model, fit  # noqa: E402
from kdkit.cli import main  # noqa: E402
from kdkit.deploy import require_deploy  # noqa: E402
from kdkit.deploy.export import export_onnx  # noqa: E402
from kdkit.deploy.ort import (  # noqa: E402
    OrtModel,
    calibration_inputs,
    deploy_profile,
    split_arrays,
)
from kdkit.deploy.quantize import quantize_int8  # noqa: E402
from kdkit.errors import KdkitError  # noqa: E402


def _torch(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name,kwargs,shape,exporter,channels_last", [
    ("mlp", {"hidden": [32]}, (1, 8, 8), "torchscript", False),
    ("plain_cnn4", {}, (3, 16, 16), "torchscript", True),
    ("resnet8", {}, (3, 16, 16), "auto", False),  # BN; torch's default (dynamo) exporter
])
def test_export_matches_torch_and_dynamic_batch_runs(tmp_path, name, kwargs, shape, exporter,
                                                     channels_last):
    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[0], input_size=shape[1], **kwargs).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    path = tmp_path / "m.onnx"
    res = export_onnx(model, shape, path, dynamic_batch=True, exporter=exporter)
    assert path.is_file() and res["max_abs_diff"] <= 1e-4 and res["batch_size"] is None
    assert res["exporter"] == ("dynamo" if exporter == "auto" else "torchscript")
    ort = OrtModel(path)
    for b in (1, 7):
        x = torch.randn(b, *shape)
        torch.testing.assert_close(ort(x), _torch(model, x), atol=1e-4, rtol=1e-3)
    assert ort.latency_ms(shape, 2, repeats=3, warmup=1) > 0


def test_static_batch_and_old_opset(tmp_path):
    model = create_model("mlp", hidden=[16], in_channels=1, input_size=8)
    res = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx", opset=13)
    assert (res["opset"], res["exporter"], res["batch_size"]) == (13, "torchscript", 1)
    ort = OrtModel(tmp_path / "m.onnx")
    assert ort.batch == 1
    x = torch.randn(5, 1, 8, 8)  # run one sample at a time
    torch.testing.assert_close(ort(x), _torch(model, x), atol=1e-4, rtol=1e-3)
    with pytest.raises(KdkitError, match="exported for batch size 1"):
        ort.latency_ms((1, 8, 8), 4)


def test_failed_check_names_the_difference_and_writes_nothing(tmp_path, monkeypatch):
    from kdkit.deploy import ort

    real = ort.OrtModel.run_all
    monkeypatch.setattr(ort.OrtModel, "run_all", lambda self, x: [o + 0.05 for o in real(self, x)])
    model = create_model("mlp", hidden=[16], in_channels=1, input_size=8)
    with pytest.raises(KdkitError) as e:
        export_onnx(model, (1, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    msg = str(e.value)
    assert "export check failed" in msg and "0.05" in msg and "\n" not in msg
    assert "tolerance" in msg and "nothing was written" in msg
    assert list(tmp_path.iterdir()) == []  # no file, no temporary


@pytest.fixture(scope="module")
def trained_cnn():
    from kdkit.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    model = create_model("plain_cnn4", in_channels=1, input_size=8)
    fit(Distiller(model, {}, build_method("ce", model)), BatchLoader(data.train, 64, shuffle=True),
        LoopSettings(epochs=8, lr=0.05), progress=False)
    return model.eval(), data


def test_static_int8_keeps_accuracy(tmp_path, trained_cnn):
    model, data = trained_cnn
    export_onnx(model, (1, 8, 8), tmp_path / "f.onnx", dynamic_batch=True,
                check_x=data.test.x[:64], exporter="torchscript")
    q = quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", data.train.x[:256])
    assert (q["mode"], q["format"], q["fallback_reason"], q["calib_samples"]) == (
        "static", "QDQ", None, 256)
    assert q["size_bytes"] < q["float_size_bytes"]
    f_acc = OrtModel(tmp_path / "f.onnx").evaluate(data.test.x, data.test.y)
    q_acc = OrtModel(tmp_path / "q.onnx").evaluate(data.test.x, data.test.y)
    assert f_acc > 90 and abs(f_acc - q_acc) < 3, (f_acc, q_acc)


def test_int8_weights_are_a_quarter_and_dynamic_fallback(tmp_path, monkeypatch):
    from onnxruntime import quantization

    model = create_model("mlp", hidden=[256, 256], in_channels=1, input_size=8)  # weights
    export_onnx(model, (1, 8, 8), tmp_path / "f.onnx", dynamic_batch=True, exporter="torchscript")
    q = quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", torch.randn(64, 1, 8, 8))
    assert q["mode"] == "static" and q["size_bytes"] < 0.3 * q["float_size_bytes"]
    d = quantize_int8(tmp_path / "f.onnx", tmp_path / "d.onnx", None)
    assert d["mode"] == "dynamic" and d["fallback_reason"] == "no calibration inputs"
    with pytest.raises(KdkitError, match="not possible: no calibration inputs"):
        quantize_int8(tmp_path / "f.onnx", tmp_path / "s.onnx", None, mode="static")

    def broken(*args, **kwargs):
        raise ValueError("unsupported op")

    monkeypatch.setattr(quantization, "quantize_static", broken)
    d = quantize_int8(tmp_path / "f.onnx", tmp_path / "d2.onnx", torch.randn(64, 1, 8, 8))
    assert d["mode"] == "dynamic" and "unsupported op" in d["fallback_reason"]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(OrtModel(tmp_path / "d2.onnx")(x), _torch(model, x),
                               atol=0.1, rtol=0.1)


def test_deploy_profile_of_a_digits_mlp(tmp_path, trained_cnn):
    _model, data = trained_cnn
    mlp = create_model("mlp", hidden=[32], in_channels=1, input_size=8)
    calib = calibration_inputs(data.train, 256)
    assert calib.shape == (256, 1, 8, 8)
    p = deploy_profile(mlp, (1, 8, 8), *split_arrays(data.test), calib, tmp_path, repeats=5)
    assert p["quant_mode"] == "static" and p["size_int8_bytes"] > 0 and p["onnx_size_bytes"] > 0
    assert p["ort_latency_ms"] > 0 and p["ort_latency_b64_ms"] > 0
    assert 0 <= p["int8_acc"] <= 100 and 0 <= p["float_ort_acc"] <= 100
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.int8.onnx").is_file()
    q = deploy_profile(mlp, (1, 8, 8), *split_arrays(data.test), calib, tmp_path / "b",
                       latency=False)
    assert q["ort_latency_ms"] is None and q["int8_acc"] == p["int8_acc"]


def _train(out, *extra):
    assert main(["--threads", "1", "train", "--model", "plain_cnn2", "--data", "digits",
                 "--epochs", "3", "--out", str(out), "--no-progress", *extra]) == 0


def test_cli_export_and_quantize(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run)
    capsys.readouterr()
    assert main(["--threads", "1", "export", str(run), "--format", "onnx", "--quantize", "int8",
                 "--dynamic-batch", "--calib-samples", "128"]) == 0
    out = capsys.readouterr()
    assert "torch float" in out.out and "onnxruntime int8" in out.out
    assert "calibrating" in out.err and "verified" in out.err
    for name in ("model.onnx", "model.int8.onnx", "export.json"):
        assert (run / name).is_file()
    fig = json.loads((run / "export.json").read_text())
    assert fig["int8"]["mode"] == "static" and fig["int8"]["calib_samples"] == 128
    assert fig["onnx"]["dynamic_batch"] and fig["onnx"]["max_abs_diff"] <= 1e-4
    acc = fig["accuracy"]
    assert abs(acc["torch_float"] - acc["ort_float"]) < 0.5
    assert abs(acc["ort_int8"] - acc["ort_float"]) < 5
    before = (run / "model.onnx").read_bytes()
    assert main(["export", str(run), "--format", "onnx"]) == 2  # no overwrite without --force
    assert "exists" in capsys.readouterr().err and (run / "model.onnx").read_bytes() == before
    assert main(["--threads", "1", "export", str(run), "--format", "onnx", "--force", "--quiet",
                 "--out", str(tmp_path / "other" / "m.onnx")]) == 0
    assert (tmp_path / "other" / "m.export.json").is_file()
    assert main(["export", str(run), "--format", "onnx", "--out", str(run / "model.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_simkd_export_is_the_deployed_model(tmp_path):
    from kdkit.train.artifacts import load_model

    teacher, student = tmp_path / "t", tmp_path / "s"
    assert main(["--threads", "1", "train", "--model", "resnet8", "--data", "digits",
                 "--epochs", "1", "--out", str(teacher), "--no-progress"]) == 0
    assert main(["--threads", "1", "distill", "--teacher", str(teacher), "--student", "resnet8",
                 "--method", "simkd", "--data", "digits",
                 "--epochs", "1", "--out", str(student), "--no-progress"]) == 0
    assert main(["--threads", "1", "export", str(student), "--format", "onnx",
                 "--dynamic-batch", "--quiet"]) == 0
    model, _meta = load_model(student)
    x = torch.randn(9, 1, 8, 8)
    torch.testing.assert_close(OrtModel(student / "model.onnx")(x), _torch(model, x),
                               atol=1e-4, rtol=1e-3)


def test_missing_extra_gives_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(KdkitError, match=r"pip install 'kdkit\[deploy\]'"):
        require_deploy()
    assert main(["export", "nowhere", "--format", "onnx"]) == 2
    assert "kdkit[deploy]" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "onnx"]) == 2
    assert "holds no finished model" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "tflite"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []
