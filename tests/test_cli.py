"""The command line: every command, one-line errors, Ctrl-C and resume in a real process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdkit.cli import main
from kdkit.train.checkpoint import read_state

FAST = ["--epochs", "3", "--no-progress"]


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("run", "train", "distill", "eval", "validate", "models", "methods", "data"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_catalogues(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "mlp_hinton_1200" in out and "plain_cnn10" in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "kd " in out and "temperature=4.0, alpha=0.9" in out
    assert main(["data", "list"]) == 0
    assert "fashion_mnist" in capsys.readouterr().out
    assert main(["models", "--layers", "resnet8", "--input", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "layer3.0.relu2" in out and "(1, 64, 8, 8)" in out


def test_validate_reports_every_problem_in_one_message(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nstudent: {name: mlp}\nstudents:\n"
                   "  - {label: a, method: {name: kd, temprature: 2}}\n")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdkit: error: invalid config")
    assert "temprature" in err and "needs a teacher" in err
    assert "Traceback" not in err
    assert main(["validate"]) == 0
    assert "OK" in capsys.readouterr().out


def test_train_distill_eval(tmp_path, capsys):
    teacher = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[64]", "--data", "digits",
                 "--out", str(teacher), "--lr", "0.1", *FAST]) == 0
    assert (teacher / "model.safetensors").exists()
    student = tmp_path / "s"
    assert main(["distill", "--teacher", str(teacher), "--student", "mlp",
                 "--model-arg", "hidden=[8]", "--method-arg", "temperature=2",
                 "--data", "digits", "--out", str(student), *FAST]) == 0
    summary = json.loads((student / "summary.json").read_text())
    assert summary["method_kwargs"] == {"temperature": 2}
    assert summary["teacher"] == str(teacher)
    capsys.readouterr()
    assert main(["eval", str(student / "model.safetensors")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["top1"] == pytest.approx(summary["test_acc"], abs=1e-3)
    assert ev["params"] == summary["params"] and ev["samples"] == 599
    # the same output directory again: refused without --force
    assert main(["train", "--model", "mlp", "--data", "digits", "--out", str(teacher), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["train", "--model", "resnet2O", "--data", "digits", "--out", str(tmp_path / "a")],
         "unknown model 'resnet2O'"),
        (["train", "--model", "mlp", "--model-arg", "width=3", "--out", str(tmp_path / "b")],
         "has no argument 'width'"),
        (["train", "--model", "mlp", "--data", "digts", "--out", str(tmp_path / "c")],
         "unknown dataset 'digts'"),
        (["distill", "--teacher", str(tmp_path / "nope"), "--student", "mlp",
          "--out", str(tmp_path / "d")], "no such run directory"),
        (["eval", str(tmp_path)], "holds no finished model"),
        (["distill", "--teacher", "x", "--student", "mlp", "--method", "ce"], "uses no teacher"),
        (["train", "--model", "mlp", "--epochs", "0", "--out", str(tmp_path / "e")],
         "--epochs: expected a whole number >= 1, got 0"),
        (["run", "--set", "train.epochs"], "KEY=VALUE"),
        (["models", "--layers", "mlp", "--input", "1,8"], "--input expects C,H,W"),
        (["train", "--model", "mlp", "--method-arg", "label_smoothing=abc",
          "--out", str(tmp_path / "f")], "argument 'label_smoothing': Input should be"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err


def _tiny_cifar10(root: Path) -> None:
    """A CIFAR-10 binary folder with 20 random images per file (the real format)."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.arange(20, dtype=np.uint8) % 10
        pixels = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], 1).tobytes())


def test_bad_threads_env_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("KDKIT_THREADS", "many")
    assert main(["methods"]) == 2
    assert "KDKIT_THREADS: expected a whole number >= 1" in capsys.readouterr().err


def test_teacher_for_other_data_is_refused(tmp_path, capsys):
    _tiny_cifar10(tmp_path / "data")
    teacher = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--data", "cifar10", "--data-root",
                 str(tmp_path / "data"), "--out", str(teacher), *FAST]) == 0
    assert main(["distill", "--teacher", str(teacher), "--student", "mlp", "--data", "digits",
                 "--out", str(tmp_path / "s"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "input_shape=[3, 32, 32]" in err and "input_shape=[1, 8, 8]" in err
    # A model.json edited by hand no longer matches its weights: refused, not mis-loaded.
    meta = json.loads((teacher / "model.json").read_text())
    meta["data"]["num_classes"] = 100
    (teacher / "model.json").write_text(json.dumps(meta))
    assert main(["eval", str(teacher), "--data-root", str(tmp_path / "data")]) == 2
    assert "does not match the model" in capsys.readouterr().err


def test_ctrl_c_in_a_real_process_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdkit.cli", "--threads", "1", "train", "--model", "mlp",
           "--data", "digits", "--epochs", "100", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    ckpt = out / "checkpoint" / "state.safetensors"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "--resume" in err and "Traceback" not in err
    epoch = read_state(ckpt)[1]["epoch"]
    assert 0 < epoch < 100
    done = subprocess.run([*cmd, "--resume"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"][0] >= epoch
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 101))


def test_default_config_file_ships_with_package():
    from kdkit.config import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.exists() and Path(DEFAULT_CONFIG).suffix == ".yaml"
