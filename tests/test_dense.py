"""A dense task on kdkit's core (``task: denoise``): the data, PSNR, the denoiser, the
methods mse and dense_kd, the loop's metrics, resume, the teacher cache, tables and CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from kdkit.cli import main
from kdkit.data import load_dataset
from kdkit.distill import Distiller, build_method, build_stages
from kdkit.errors import DataError, KdkitError
from kdkit.models import create_model
from kdkit.pipelines.runs import train_one
from kdkit.tasks import headline, psnr_per_sample
from kdkit.train.artifacts import load_model
from kdkit.train.loop import LoopSettings
from kdkit.train.metrics import evaluate
from lm_reference import resumed_equals_uninterrupted

SETTINGS = LoopSettings(epochs=4, optimizer="adam", lr=3e-3)
NOISE = 0.3


@pytest.fixture(scope="module")
def pairs():
    return load_dataset("digits", task="denoise", noise=NOISE, seed=0)


@pytest.fixture(scope="module")
def teacher(pairs, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    train_one(run_dir=run, label="t", data=pairs, model_name="denoiser", model_kwargs={"width": 16},
              method="mse", method_kwargs={}, teachers={},
              settings=LoopSettings(epochs=10, optimizer="adam", lr=3e-3), batch_size=32,
              augment=None, progress=False)
    return run


def _noisy_psnr(split, data):
    """PSNR of the noisy input itself (the identity 'denoiser')."""
    return psnr_per_sample(split.x * data.std + data.mean, split.y).mean().item()


def test_denoise_pairs_are_noisy_inputs_and_clean_targets(pairs):
    assert pairs.task == "denoise" and pairs.num_classes == 1
    assert pairs.source["task"] == "denoise" and pairs.source["noise"] == NOISE
    for split in (pairs.train, pairs.val, pairs.test):
        assert split.y.dtype == torch.float32 and split.y.shape == split.x.shape
        assert split.y.min() >= 0.0 and split.y.max() <= 1.0
        noise = split.x * pairs.std + pairs.mean - split.y
        assert noise.std().item() == pytest.approx(NOISE, rel=0.05)
        assert abs(noise.mean().item()) < 0.02
    plain = load_dataset("digits", seed=0)
    clean = (plain.train.x * plain.std + plain.mean).clamp(0, 1)
    assert torch.allclose(pairs.train.y, clean)  # the same images, as [0, 1] pixels
    again = load_dataset("digits", task="denoise", noise=NOISE, seed=0)
    assert torch.equal(again.train.x, pairs.train.x)  # fixed pairs: the cache can key them
    other = load_dataset("digits", task="denoise", noise=NOISE, seed=1)
    assert torch.equal(other.test.x, pairs.test.x) and torch.equal(other.test.y, pairs.test.y)
    assert not torch.equal(other.train.x[:10], pairs.train.x[:10])


def test_task_and_noise_mistakes_are_named():
    with pytest.raises(DataError, match="task 'language_model' does not fit 'digits'"):
        load_dataset("digits", task="language_model")
    with pytest.raises(DataError, match="noise applies to task denoise only"):
        load_dataset("digits", noise=0.2)
    with pytest.raises(DataError, match="noise must be a number > 0"):
        load_dataset("digits", task="denoise", noise=-1.0)
    with pytest.raises(DataError, match="is not one of"):
        load_dataset("digits", task="segment")


def test_psnr_is_ten_log10_of_one_over_the_mse_per_image():
    target = torch.full((2, 1, 4, 4), 0.5)
    pred = target + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)  # MSE 1e-2 and 1e-4
    assert psnr_per_sample(pred, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    # the prediction is clipped to [0, 1] (an image as shown); an exact one stays finite
    assert psnr_per_sample(torch.full((1, 1, 2, 2), 1.7), torch.ones(1, 1, 2, 2)).item() == \
        pytest.approx(100.0)

    class Shift(torch.nn.Module):
        def forward(self, x):
            return x + 0.1

    x = torch.rand(10, 1, 4, 4) * 0.8
    ev = evaluate(Shift(), x, x, batch_size=3)
    assert set(ev) == {"loss", "psnr"}  # no accuracy for a dense task
    assert ev["loss"] == pytest.approx(0.01, rel=1e-4) and ev["psnr"] == pytest.approx(20.0, abs=1e-3)


def test_the_denoiser_sizes_and_stages():
    t, s = create_model("denoiser_teacher"), create_model("denoiser_student")
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (t, s))
    assert (n_t, n_s) == (425_537, 60_217) and 4 < n_t / n_s < 10
    x = torch.randn(2, 1, 28, 28)
    assert t(x).shape == s(x).shape == x.shape
    with pytest.raises(KdkitError, match="divisible by 4"):
        create_model("denoiser", input_size=30)
    terms = build_method("dense_kd", s, {"t": t}, example_input=x, feature_weight=0.5,
                         task="denoise")
    assert [tm.name for tm in terms] == ["mse", "output"] + [f"feat{k}" for k in range(1, 6)]
    assert [tm.weight for tm in terms[:3]] == [0.5, 0.5, 0.5]
    assert [str(tm.student) for tm in terms[2:]] == [f"layer{k}:output" for k in range(1, 6)]


def test_dense_kd_computes_its_formula():
    torch.manual_seed(0)
    s = create_model("denoiser", input_size=8, width=4)
    t = create_model("denoiser", input_size=8, width=8).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    d = Distiller(s, {"t": t}, build_method("dense_kd", s, {"t": t}, example_input=x,
                                            alpha=0.3, task="denoise"))
    out = d(x, y)
    with torch.no_grad():
        ys, yt = s(x), t(x)
    assert out["mse"].item() == pytest.approx(F.mse_loss(ys, y).item(), rel=1e-5)
    assert out["output"].item() == pytest.approx(F.mse_loss(ys, yt).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.7 * out["mse"].item() + 0.3 * out["output"].item(),
                                               rel=1e-5)


def test_methods_of_another_task_are_refused_by_name():
    s, t = create_model("denoiser", input_size=8), create_model("denoiser", input_size=8)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(KdkitError, match=r"method 'kd' trains classifiers.*use dense_kd, mse"):
        build_stages("kd", s, {"t": t}, example_input=x, task="denoise")
    with pytest.raises(KdkitError, match=r"method 'mse' trains a dense task.*for classify"):
        build_stages("mse", s, {}, example_input=x, task="classify")
    with pytest.raises(KdkitError, match=r"'alpha' must be in \[0, 1\]"):
        build_stages("dense_kd", s, {"t": t}, example_input=x, task="denoise", alpha=2.0)


def test_a_denoiser_learns_and_reports_psnr(pairs, teacher):
    summary = json.loads((teacher / "summary.json").read_text())
    assert summary["test_acc"] is None and summary["val_acc"] is None
    noisy = _noisy_psnr(pairs.test, pairs)
    assert summary["test_psnr"] > noisy + 3.5  # it denoises: well above the noisy input
    model, meta = load_model(teacher)
    assert meta["data"]["task"] == "denoise"
    ev = evaluate(model, pairs.test.x, pairs.test.y)
    assert ev["psnr"] == pytest.approx(summary["test_psnr"], rel=1e-6)
    assert summary["test_loss"] == pytest.approx(ev["loss"], rel=1e-6)
    records = [json.loads(ln) for ln in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert all("train/psnr" in r and "val/psnr" in r and "train/acc" not in r
               and "val/acc" not in r for r in records)
    assert records[-1]["val/psnr"] > records[0]["val/psnr"]
    assert records[-1]["val/psnr"] == pytest.approx(summary["val_psnr"])
    assert headline(summary).startswith(f"test {summary['test_psnr']:.2f} dB, val ")


def test_augmentation_and_a_classifier_teacher_are_refused(pairs, tmp_path):
    with pytest.raises(KdkitError, match="augmentation moves the inputs of a dense task"):
        train_one(run_dir=tmp_path / "a", label="a", data=pairs, model_name="denoiser",
                  model_kwargs={"width": 4}, method="mse", method_kwargs={}, teachers={},
                  settings=SETTINGS, batch_size=32, augment={"flip": True}, progress=False)
    plain = load_dataset("digits", seed=0)
    train_one(run_dir=tmp_path / "clf", label="c", data=plain, model_name="mlp",
              model_kwargs={}, method="ce", method_kwargs={}, teachers={},
              settings=LoopSettings(epochs=1), batch_size=64, augment=None, progress=False)
    from kdkit.pipelines.runs import load_teacher

    with pytest.raises(KdkitError, match="trained for the task classify"):
        load_teacher(str(tmp_path / "clf"), pairs)


def test_dense_kd_resumes_exactly_and_the_fp32_cache_is_the_live_teacher(pairs, teacher,
                                                                          tmp_path):
    t, _ = load_model(teacher)
    common = dict(label="s", data=pairs, model_name="denoiser", model_kwargs={"width": 4},
                  method="dense_kd", method_kwargs={"feature_weight": 0.1}, teachers={"t": t},
                  settings=LoopSettings(epochs=2, optimizer="adam", lr=3e-3), batch_size=64,
                  augment=None, progress=False)
    resumed_equals_uninterrupted(tmp_path / "resume", **common)
    train_one(run_dir=tmp_path / "cached", teacher_cache={"views": 1, "dtype": "float32"},
              cache_root=tmp_path / "cache", **common)
    a = load_file(tmp_path / "resume" / "a" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_an_experiment_table_eval_and_validate(tmp_path, capsys):
    cfg = {
        "name": "dense-tiny", "seeds": [0, 1],
        "data": {"name": "digits", "task": "denoise", "noise": NOISE},
        "teacher": {"label": "teacher", "model": {"name": "denoiser", "width": 8},
                    "train": {"epochs": 2, "optimizer": "adam", "lr": 3e-3}},
        "student": {"name": "denoiser", "width": 4},
        "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 3e-3},
        "eval": {"latency_repeats": 2},
        "students": [{"label": "scratch", "method": {"name": "mse"}},
                     {"label": "feat", "method": {"name": "dense_kd", "feature_weight": 0.1}}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-report"]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| test PSNR (dB) |" in table and "Δ PSNR vs teacher" in table
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["teacher", "scratch", "feat"]
    assert rows[0]["method"] == "mse"  # the task's own training for the teacher
    assert all(r["test_psnr_mean"] > 5 and r["test_acc_mean"] is None for r in rows)
    from kdkit.report import write_report
    from test_report import _png_has_data

    md = write_report(tmp_path / "out", log=lambda _m: None).read_text()
    for stem in ("learning_curves", "acc_vs_size", "denoised"):
        assert f"({stem}.png)" in md
        _png_has_data(tmp_path / "out" / "report" / f"{stem}.png")
    assert "Validation PSNR per epoch" in md and "PSNR against size" in md
    capsys.readouterr()
    run = tmp_path / "out" / "seed1" / "feat"
    assert main(["eval", str(run), "--latency-repeats", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert report["psnr"] == pytest.approx(summary["test_psnr"], abs=1e-3)  # rebuilt pairs
    assert "top1" not in report
    # a classifier on dense data, and a classification method, are named before any training
    path.write_text(yaml.safe_dump({**cfg, "student": {"name": "resnet8"}}))
    assert main(["validate", str(path)]) != 0
    assert "it returns (2, 1), not (2, 1, 8, 8) images" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**cfg, "students": [{"label": "kd", "method": {"name": "kd"}}]}))
    assert main(["validate", str(path)]) != 0
    assert "method 'kd' trains classifiers" in capsys.readouterr().err


def test_train_defaults_to_mse_on_a_dense_task(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data", "digits", "--task", "denoise", "--model", "denoiser",
                 "--model-arg", "width=4", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mse" and summary["test_psnr"] > 0
    assert "dB" in capsys.readouterr().out
    assert math.isfinite(summary["test_loss"])


@pytest.mark.parametrize("change, message", [
    ({"data": {"name": "digits", "noise": 0.2}}, "data.noise: noise belongs to task denoise"),
    ({"data": {"name": "digits", "task": "language_model"}}, "data.task: 'digits' holds images"),
    ({"train": {"epochs": 1, "augment": {"flip": True}}},
     "train.augment: augmentation moves the inputs of a dense task"),
    ({"students": [{"label": "s", "method": {"name": "dense_kd"},
                    "via": [{"name": "denoiser", "width": 6}]}]},
     "students[0].via: teacher-assistant chains and data-free transfer sets"),
    ({"train": {"epochs": 1, "teacher_cache": {"topk": 2}}},
     "train.teacher_cache.topk: a dense task's teacher outputs are images"),
])
def test_validate_names_what_a_dense_task_cannot_take(tmp_path, capsys, change, message):
    cfg = {"name": "v", "data": {"name": "digits", "task": "denoise"},
           "teacher": {"label": "teacher", "model": {"name": "denoiser"}},
           "student": {"name": "denoiser", "width": 4},
           "students": [{"label": "s", "method": {"name": "mse"}}], **change}
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) != 0
    assert message in capsys.readouterr().err


def test_export_and_int8_report_psnr_for_a_dense_model(teacher, tmp_path, capsys,
                                                      monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's shape inference fails on the Upsample: it must not
    out = tmp_path / "dn.onnx"  # leave sym_shape_infer_temp.onnx and a .data file here
    assert main(["export", str(teacher), "--format", "onnx", "--quantize", "int8",
                 "--dynamic-batch", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test PSNR (digits" in printed and " dB" in printed
    figures = json.loads((tmp_path / "dn.export.json").read_text())
    assert "accuracy" not in figures
    psnr = figures["psnr"]
    summary = json.loads((teacher / "summary.json").read_text())
    assert psnr["torch_float"] == pytest.approx(summary["test_psnr"], abs=1e-3)
    assert psnr["ort_float"] == pytest.approx(psnr["torch_float"], abs=1e-2)
    assert abs(psnr["ort_int8"] - psnr["torch_float"]) < 1.0  # int8 costs little PSNR
    assert list(cwd.iterdir()) == []
