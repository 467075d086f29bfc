"""The compression report's columns, `kdkit eval --latency`, TensorBoard logging and the
teacher cache's progress lines."""

import json

import pytest
import torch
from torch import nn

from kdkit.models import create_model
from kdkit.train.compression import (
    count_macs,
    eager_latency_ms,
    ratios,
    torch_profile,
    weights_bytes,
)


def test_macs_are_torchs_flop_count_halved_on_known_layers():
    """A linear layer of 10 → 5 is 50 MACs; a 3×3 conv of 2 → 4 channels on a 6×6 map with
    padding is 4·2·9·36 = 2592; element-wise layers add nothing."""
    lin = nn.Sequential(nn.Flatten(), nn.Linear(10, 5), nn.ReLU())
    assert count_macs(lin, (1, 1, 10)) == 50  # ((L,) would mean token ids)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    assert count_macs(conv, (2, 6, 6)) == 4 * 2 * 9 * 36
    # a real zoo model: ResNet-20 on 28×28 is the CIFAR figure (~41M MACs at 32×32) scaled
    r20 = create_model("resnet20", num_classes=10, in_channels=1, input_size=28)
    assert 30e6 < count_macs(r20, (1, 28, 28)) < 32e6
    assert r20.training  # its mode is left as it was


def test_fp16_size_is_about_half_and_integer_buffers_stay():
    model = create_model("resnet8", num_classes=10, in_channels=1, input_size=8)
    fp32, fp16 = weights_bytes(model, torch.float32), weights_bytes(model, torch.float16)
    payload = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert payload <= fp32 < payload + 20_000  # the safetensors header only
    assert 0.45 * fp32 < fp16 < 0.6 * fp32
    ints = sum(v.numel() * 8 for v in model.state_dict().values() if not v.is_floating_point())
    assert ints > 0  # BN's num_batches_tracked: kept as int64 in both


def test_profile_fields_and_ratios():
    model = create_model("mlp", hidden=[16], num_classes=4, in_channels=1, input_size=4)
    prof = torch_profile(model, (1, 4, 4), repeats=3)
    assert prof["params"] == sum(p.numel() for p in model.parameters())
    assert prof["macs"] == 16 * 16 + 16 * 4
    assert prof["latency_ms"] > 0 and prof["latency_b64_ms"] > 0
    assert prof["threads"] == torch.get_num_threads()
    assert eager_latency_ms(model, (1, 4, 4), batch=2, repeats=2, warmup=1) > 0
    teacher = {"size_bytes": 1000, "macs": 800, "latency_ms": 2.0, "ort_latency_ms": None,
               "test_acc_mean": 90.0}
    row = {"size_bytes": 250, "macs": 100, "latency_ms": 0.5, "ort_latency_ms": 0.1,
           "test_acc_mean": 87.5}
    assert ratios(row, teacher) == {"x_smaller": 4.0, "x_fewer_macs": 8.0, "x_faster": 4.0,
                                    "x_faster_ort": None, "d_acc": -2.5}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A small digits experiment with the deploy columns and TensorBoard on (2 seeds)."""
    import os

    from kdkit.cli import main
    from kdkit.train import tensorboard

    where = tmp_path_factory.mktemp("exp")
    os.environ["KDKIT_TABLE_DEPLOY"] = "1"  # (the suite turns the ONNX columns off)
    try:
        code = main(["--threads", "1", "run", "--set", "seeds=[0,1]", "--set",
                     "train.epochs=3", "--set", "teacher.train.epochs=3", "--set",
                     "eval.latency_repeats=3", "--no-cache", "--no-progress", "--no-report",
                     "--tensorboard", "--out", str(where / "e")])
    finally:
        os.environ["KDKIT_TABLE_DEPLOY"] = "0"
        tensorboard.enable(False)
    assert code == 0
    return where / "e"


def test_experiment_table_has_every_compression_column(experiment):
    rows = {r["label"]: r for r in json.loads((experiment / "summary.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "scratch", "kd"}
    t, kd = rows["teacher"], rows["kd"]
    for key in ("macs", "size_fp32_bytes", "size_fp16_bytes", "size_int8_bytes", "latency_ms",
                "latency_b64_ms", "ort_latency_ms", "ort_latency_b64_ms",
                "float_ort_latency_ms", "int8_acc_mean", "int8_acc_std", "threads"):
        assert kd[key] is not None, key
    assert t["macs"] == 64 * 256 + 256 * 256 + 256 * 10  # digits 8×8 → 256 → 256 → 10
    assert kd["size_int8_bytes"] < kd["size_fp32_bytes"]
    assert t["size_int8_bytes"] < 0.4 * t["size_fp32_bytes"]  # weight-heavy: ~4× smaller
    # int8 keeps the float accuracy within a few points, seed for seed on average
    assert abs(t["int8_acc_mean"] - t["test_acc_mean"]) < 3.0
    assert kd["x_smaller"] == pytest.approx(t["size_bytes"] / kd["size_bytes"], rel=0.01)
    assert kd["d_acc"] == pytest.approx(kd["test_acc_mean"] - t["test_acc_mean"], abs=0.01)
    assert kd["vs"] == "teacher"
    for seed in (0, 1):  # every seed's model exported and quantized beside it
        assert (experiment / f"seed{seed}" / "kd" / "deploy" / "model.int8.onnx").exists()
    table = (experiment / "table.md").read_text()
    assert "| int8 test (%) |" in table and "| MACs |" in table and "×smaller" in table
    assert "1 thread(s); ratios against teacher" in table


def test_eval_latency_remeasures_and_changes_nothing(experiment, capsys):
    from kdkit.cli import main

    before = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file()}
    assert main(["eval", str(experiment), "--latency", "--latency-repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| MACs |" in out
    after = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file()}
    assert before == after


def test_eval_of_one_run_reports_the_compression_figures(experiment, capsys):
    from kdkit.cli import main

    assert main(["eval", str(experiment / "seed0" / "kd"), "--latency-repeats", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("macs", "size_fp16_bytes", "latency_b64_ms", "size_int8_bytes", "int8_top1",
                "ort_latency_ms", "float_ort_acc"):
        assert key in report, key
    assert report["float_ort_acc"] == pytest.approx(report["top1"], abs=0.01)


def test_tensorboard_logs_every_epoch_record(experiment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = experiment / "seed1" / "kd"
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kd", "train/loss", "lr", "val/acc", "val/loss"} <= tags
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in acc.Scalars("val/acc")]
    assert logged == [(r["epoch"], pytest.approx(r["val/acc"])) for r in records]


def test_tensorboard_without_the_package_is_one_clear_error(monkeypatch, tmp_path, capsys):
    import builtins

    from kdkit.cli import main

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    assert main(["train", "--model", "mlp", "--epochs", "1", "--tensorboard",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kdkit: error: --tensorboard needs the tensorboard package: pip install "
                   "'kdkit[tensorboard]'")
    assert not (tmp_path / "r").exists()


def test_teacher_cache_build_prints_progress_lines_in_a_log(monkeypatch, tmp_path, capsys):
    """stderr is no terminal here: the build prints plain lines (every 0 s when told)."""
    from kdkit import progress
    from kdkit.cli import main

    assert main(["train", "--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    capsys.readouterr()
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--student", "mlp",
                 "--model-arg", "hidden=[8]", "--epochs", "1", "--teacher-cache",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "teacher cache: " in err and " rows (" in err, err[-1500:]
