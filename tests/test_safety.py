"""Nothing lost, nothing wrong: regression tests for the audit of issue 10.

Each test here failed on the code before the fix it names: torn checkpoints and teacher
copies, --force deleting any path, eval on the wrong split, resumes of another run, stale
teacher caches, and tracebacks where one line was due.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from kdkit import files
from kdkit.cli import main
from kdkit.config import config_from_dict, load_config
from kdkit.data import load_dataset
from kdkit.errors import CheckpointError, ConfigError, KdkitError
from kdkit.pipelines import experiment as experiment_mod
from kdkit.pipelines.experiment import run_experiment, teacher_cache_key
from kdkit.pipelines.runs import prepare_run_dir, train_one
from kdkit.train.checkpoint import read_state
from kdkit.train.loop import CHECKPOINT, LoopSettings, TrainingInterrupted


def tiny_raw(**over):
    raw = {
        "name": "tiny", "seeds": [1],
        "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 100},
        "teacher": {"model": {"name": "mlp", "hidden": [32]},
                    "train": {"epochs": 2, "batch_size": 64}},
        "student": {"name": "mlp", "hidden": [16]},
        "train": {"epochs": 2, "batch_size": 32},
        "students": [{"label": "kd", "method": {"name": "kd"}}],
        "eval": {"latency_repeats": 1},
    }
    raw.update(over)
    return raw


def quiet(_line: str) -> None:
    pass


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("kdkit: error:"), err
    assert "Traceback" not in err, err
    return lines[-1]


# ------------------------------------------------------------------ 1-2: atomic writes


def test_teacher_copy_killed_midway_resumes(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_raw())
    cache = tmp_path / "cache"
    run_experiment(cfg, tmp_path / "first", cache_dir=cache, progress=False, log=quiet)
    real, calls = files.atomic_copy, {"n": 0}

    def dying_copy(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after the weights, before the rest: the process "dies"
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(experiment_mod, "atomic_copy", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "second", cache_dir=cache, progress=False, log=quiet)
    monkeypatch.setattr(experiment_mod, "atomic_copy", real)
    logs: list[str] = []
    result = run_experiment(cfg, tmp_path / "second", cache_dir=cache, resume=True,
                            progress=False, log=logs.append)
    assert any("reused from cache" in line for line in logs)
    first = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert [r["test_acc"] for r in first["runs"]] == [r["test_acc"] for r in result["runs"]]


def test_checkpoint_and_run_files_follow_the_umask(digits, tmp_path):
    old = os.umask(0o022)
    files._umask = None
    try:
        out = tmp_path / "run"
        prepare_run_dir(out, resume=False, force=False)
        with pytest.raises(TrainingInterrupted):
            _train(out, digits, stop_after=3)
        for path in (out / CHECKPOINT, out / files.RUN_MARKER):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        assert stat.S_IMODE((out / CHECKPOINT).parent.stat().st_mode) == 0o755
    finally:
        os.umask(old)
        files._umask = None


def test_stale_temporaries_are_cleaned_on_the_next_run(digits, tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, resume=False, force=False)
    (out / "checkpoint").mkdir()
    dead = out / "checkpoint" / f".state.safetensors.{files._HOST}-999999999.abc.tmp"
    mine = out / "checkpoint" / f".state.safetensors.{files._HOST}-{os.getpid()}.abc.tmp"
    dead.write_bytes(b"x" * 1000)
    mine.write_bytes(b"x")
    with pytest.raises(TrainingInterrupted):
        _train(out, digits, stop_after=2)
    assert not dead.exists() and mine.exists()


# ------------------------------------------------------------------------ 3: --force


def test_force_deletes_only_what_kdkit_created(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(KdkitError, match="not created by kdkit"):
        prepare_run_dir(user, resume=False, force=True)
    assert (user / "thesis.tex").read_text() == "precious"
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, force=False)
    (run / "old.txt").write_text("old")
    prepare_run_dir(run, resume=False, force=True)
    assert not (run / "old.txt").exists() and (run / files.RUN_MARKER).exists()


def test_force_never_deletes_the_current_directory(tmp_path, monkeypatch, capsys):
    prepare_run_dir(tmp_path / "here", resume=False, force=False)
    (tmp_path / "here" / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "here")
    assert main(["run", "--out", ".", "--force", "--no-progress"]) == 2
    assert "current directory" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "here" / "keep.txt").exists()


@pytest.mark.parametrize("name", ["..", "", ".", "a/b", "..\\x", ".hidden", " "])
def test_names_that_are_not_folder_names_are_refused(name):
    with pytest.raises(ConfigError, match="name"):
        config_from_dict(tiny_raw(name=name))
    bad_label = tiny_raw(students=[{"label": name, "method": {"name": "kd"}}])
    with pytest.raises(ConfigError, match="label"):
        config_from_dict(bad_label)


def test_validate_refuses_a_dotdot_name(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(tiny_raw(name="..")))
    assert main(["validate", str(path)]) == 2
    assert "name '..'" in capsys.readouterr().err


def test_resume_and_force_together_are_refused(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "x"), "--resume", "--force"]) == 2
    assert "give one of them" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- 4 and 8: honest eval


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "exp"
    cfg = config_from_dict(tiny_raw(seeds=[1, 2]))
    result = run_experiment(cfg, out, cache_dir=None, progress=False, log=quiet)
    return out, result


@pytest.mark.parametrize("seed", [1, 2])
def test_eval_val_split_is_the_runs_own(tiny_experiment, seed, capsys):
    out, result = tiny_experiment
    run = out / f"seed{seed}" / "kd"
    assert main(["eval", str(run), "--split", "val"]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert printed["top1"] == pytest.approx(summary["val_acc"], abs=1e-3)
    meta = json.loads((run / "model.json").read_text())
    assert meta["data"]["source"]["seed"] == seed
    assert meta["data"]["source"]["train_subset"] == 100


def test_eval_train_split_has_the_runs_train_subset(tiny_experiment, capsys):
    out, _ = tiny_experiment
    assert main(["eval", str(out / "seed1" / "kd"), "--split", "train"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 100


def test_eval_refuses_a_split_it_cannot_rebuild(tiny_experiment, tmp_path, capsys):
    out, _ = tiny_experiment
    run = tmp_path / "old"
    run.mkdir()
    for name in ("model.safetensors", "model.json"):
        (run / name).write_bytes((out / "seed1" / "kd" / name).read_bytes())
    meta = json.loads((run / "model.json").read_text())
    del meta["data"]["source"]  # as written by kdkit 0.1
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["eval", str(run), "--split", "val"]) == 2
    assert "older kdkit" in one_error_line(capsys.readouterr().err)
    assert main(["eval", str(run)]) == 0  # the test split needs no split definition


def test_eval_checks_the_class_count_and_renormalises():
    from argparse import Namespace

    from kdkit.cli import _eval_data

    digits = load_dataset("digits", seed=0)
    trained = {"name": "other", "num_classes": 100, "input_shape": [1, 8, 8],
               "mean": digits.mean, "std": digits.std}
    args = Namespace(data="digits", data_root=None, split="test")
    with pytest.raises(KdkitError, match="predicts 100 classes.*has 10"):
        _eval_data(args, trained)
    trained = dict(trained, num_classes=10, mean=0.0, std=1.0)
    data, notes = _eval_data(args, trained)
    assert notes["renormalised"]["to"] == [0.0, 1.0]
    raw = digits.test.x * digits.std + digits.mean  # back in [0, 1] pixel units
    assert torch.allclose(data.test.x, raw, atol=1e-5)


# --------------------------------------------------------------- 6: resume identity


def _train(out, data, *, method="kd", teacher_seed=0, stop_after=None, resume=False,
           method_kwargs=None):
    from kdkit.pipelines.runs import build_model

    teacher = build_model("mlp", {"hidden": [32]}, data, teacher_seed).eval()
    return train_one(
        run_dir=out, label="t", data=data, model_name="mlp", model_kwargs={"hidden": [16]},
        method=method, method_kwargs=method_kwargs or {}, teachers={"teacher": teacher},
        settings=LoopSettings(epochs=2, seed=0), batch_size=32, augment=None,
        resume=resume, progress=False, stop_after=stop_after,
    )


@pytest.mark.parametrize("change, named", [
    (dict(method="rkd"), "method.name"),
    (dict(method_kwargs={"temperature": 2.0}), "method.kwargs.temperature"),
    (dict(teacher_seed=1), "teachers.teacher"),
    (dict(subset=60), "data.train_subset"),
])
def test_resume_of_another_run_is_refused_naming_what_differs(tmp_path, change, named):
    data = load_dataset("digits", val_fraction=0.2, train_subset=100, seed=0)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, data, stop_after=3)
    subset = change.pop("subset", None)
    if subset is not None:
        data = load_dataset("digits", val_fraction=0.2, train_subset=subset, seed=0)
    with pytest.raises(CheckpointError, match=f"another run; .*{named}"):
        _train(out, data, resume=True, **change)
    assert read_state(out / CHECKPOINT)[1]["step"] == 3  # the refused resume changed nothing


def test_resumed_run_reports_the_wall_time_of_every_process(digits, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, digits, stop_after=10)
    first = read_state(out / CHECKPOINT)[1]["wall_s"]
    assert first > 0
    summary = _train(out, digits, resume=True)
    assert summary["wall_s"] >= round(first, 2)
    assert summary["resumed_from"] == [0, 10] or summary["resumed_from"] == (0, 10)


# ------------------------------------------------------------ 7: teacher cache key


def test_teacher_cache_key_follows_the_data_content():
    from dataclasses import replace

    cfg = config_from_dict(tiny_raw())
    data = load_dataset("digits", val_fraction=0.2, seed=1)
    assert data.source["sha256"] and len(data.source["sha256"]) == 64
    other = replace(data, source=dict(data.source, sha256="0" * 64, root="/elsewhere"))
    same_elsewhere = replace(data, source=dict(data.source, root="/elsewhere"))
    key = teacher_cache_key(cfg.teacher, cfg, 1, data)
    assert key != teacher_cache_key(cfg.teacher, cfg, 1, other)
    assert key == teacher_cache_key(cfg.teacher, cfg, 1, same_elsewhere)


# ------------------------------------------------------- 10-13: one line, not a traceback


@pytest.mark.parametrize("content", ["dir", "latin1", "random", "huge"])
def test_unreadable_configs_are_one_line(tmp_path, capsys, content):
    path = tmp_path / "cfg.yaml"
    if content == "dir":
        path.mkdir()
    elif content == "latin1":
        path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    elif content == "random":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_bytes(b"# " + b"x" * (2 * 1024**2))
    assert main(["validate", str(path)]) == 2
    one_error_line(capsys.readouterr().err)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nseeds: [0]\nname: b\nstudents: [{label: s, method: {name: ce}}]\n"
                    "student: {name: mlp}\n")
    with pytest.raises(ConfigError, match="'name' is given twice"):
        load_config(path)


def test_yaml_alias_bomb_gives_a_short_error(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nname: b\n")
    assert main(["validate", str(path)]) == 2
    assert len(capsys.readouterr().err) < 2000


def test_alias_bomb_in_a_method_argument_is_cut_short(tmp_path, capsys):
    raw = tiny_raw()
    raw["students"][0]["method"]["temperature"] = "x" * 100_000
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw))
    assert main(["validate", str(path)]) == 2
    assert len(capsys.readouterr().err) < 3000


def test_duplicate_seeds_are_refused():
    with pytest.raises(ConfigError, match="seeds must be distinct; repeated: \\[0\\]"):
        config_from_dict(tiny_raw(seeds=[0, 0]))


def test_teacher_cache_with_augmentation_needs_explicit_views():
    raw = tiny_raw(train={"epochs": 2, "augment": {"shift": 1}, "teacher_cache": True})
    with pytest.raises(ConfigError, match="say how many augmented views"):
        config_from_dict(raw)
    raw["train"]["teacher_cache"] = {"views": 4}
    assert config_from_dict(raw).train.teacher_cache.views == 4


@pytest.mark.parametrize("argv, expect", [
    (["--model-arg", "num_classes=5"], "set from the dataset"),
    (["--augment", "shift=abc"], "'shift' must be a whole number"),
    (["--augment", "hflip=7"], "probability"),
    (["--model-arg", "hidden=sixteen"], None),
])
def test_bad_train_arguments_are_one_line(tmp_path, capsys, argv, expect):
    code = main(["train", "--model", "mlp", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "r"), *argv])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    if expect:
        assert expect in line


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_threads_must_be_positive(capsys, value):
    assert main(["--threads", value, "models"]) == 2
    assert "whole number >= 1" in one_error_line(capsys.readouterr().err)


def test_out_naming_a_file_or_an_impossible_place(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile, afile / "below"):
        assert main(["train", "--model", "mlp", "--epochs", "1", "--no-progress",
                     "--out", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "--out" in line and str(out) in line
    assert afile.read_text() == "keep"


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "run"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[8]", "--epochs", "1",
                 "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("mutate", [
    lambda m: m.pop("weights"), lambda m: m.pop("sha256"), lambda m: m.pop("data"),
    lambda m: m.pop("model"), lambda m: m["model"].__setitem__("kwargs", [1, 2]),
    lambda m: m["data"].__setitem__("input_shape", [8, 8]),
    lambda m: m.__setitem__("weights", "../../etc/passwd"),
    lambda m: m.__setitem__("weights", "."),
    lambda m: m["model"]["kwargs"].__setitem__("num_classes", 3),
    lambda m: m["model"].__setitem__("name", "no-such-model"),
])
def test_malformed_model_json_is_one_line(trained_model, tmp_path, capsys, mutate):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("model.safetensors", "model.json"):
        (run / name).write_bytes((trained_model / name).read_bytes())
    meta = json.loads((run / "model.json").read_text())
    mutate(meta)
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["eval", str(run)]) == 2
    one_error_line(capsys.readouterr().err)


def test_non_utf8_model_json_is_one_line(trained_model, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "model.safetensors").write_bytes((trained_model / "model.safetensors").read_bytes())
    (run / "model.json").write_bytes(b"\xff\xfe{" + os.urandom(200))
    assert main(["eval", str(run)]) == 2
    assert "not valid UTF-8 JSON" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------- polish


def test_progress_without_a_terminal_is_one_line_per_epoch(digits, tmp_path, capsys):
    from kdkit.distill import Distiller, build_method
    from kdkit.models import create_model
    from kdkit.train.loop import fit

    torch.manual_seed(0)
    student = create_model("mlp", hidden=[8], input_size=8)
    from kdkit.data.loader import BatchLoader

    fit(Distiller(student, {}, build_method("ce", student)),
        BatchLoader(digits.train, 64, shuffle=True, seed=0), LoopSettings(epochs=3),
        run_dir=tmp_path, progress=True, log=print)
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    assert [ln for ln in captured.out.splitlines() if "epoch" in ln][-1].startswith(
        "train: epoch 3/3")


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--epochs EPOCHS default: 10", "--batch-size BATCH_SIZE default: 64",
                   "learning rate (default: 0.05)", "(default: 0.1)"):
        assert needle in text, needle


def test_config_path_must_exist_and_be_a_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    assert Path(tmp_path).exists()


def test_eval_train_split_of_a_data_free_student_is_refused():
    from argparse import Namespace

    from kdkit.cli import _eval_data
    from kdkit.datafree.synthesis import TransferSet
    from kdkit.pipelines.datafree import with_transfer
    from kdkit.pipelines.runs import data_meta

    data = load_dataset("digits", val_fraction=0.2, seed=3)
    ts = TransferSet(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), {})
    trained = data_meta(with_transfer(data, ts))
    with pytest.raises(KdkitError, match="synthetic transfer set"):
        _eval_data(Namespace(data=None, data_root=None, split="train"), trained)
    val, _ = _eval_data(Namespace(data=None, data_root=None, split="val"), trained)
    assert torch.equal(val.val.x, data.val.x)  # seed 3's own validation split


def test_resume_accepts_the_same_data_under_another_folder(tmp_path):
    from dataclasses import replace

    data = load_dataset("digits", val_fraction=0.2, train_subset=100, seed=0)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, data, stop_after=3)
    moved = replace(data, source=dict(data.source, root="/data/moved"))
    assert _train(out, moved, resume=True)["resumed_from"] in ([0, 3], (0, 3))


def test_resume_refuses_a_folder_kdkit_did_not_create(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "summary.json").write_text("{}")
    assert main(["train", "--model", "mlp", "--epochs", "1", "--no-progress", "--resume",
                 "--out", str(user)]) == 2
    assert "not a kdkit run directory" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in user.iterdir()) == ["summary.json"]  # no marker written


def test_after_a_fallback_the_good_previous_checkpoint_survives_the_next_save(digits, tmp_path):
    from kdkit.train.checkpoint import load_state, prev_path, unreadable_path

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, digits, stop_after=40)  # checkpoints at the end of epoch 1 (30), then 40
    ckpt = out / CHECKPOINT
    good = read_state(prev_path(ckpt))[1]["step"]
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # the newest is damaged
    assert load_state(ckpt, log=None)[1]["step"] == good
    # set aside: the next save must not rotate it over the good one
    assert not ckpt.exists() and unreadable_path(ckpt).exists()
    assert read_state(prev_path(ckpt))[1]["step"] == good


def test_a_finished_run_is_not_reused_under_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--model-arg", "hidden=[8]", "--epochs", "1",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0  # the same run: its summary is the answer
    capsys.readouterr()
    assert main([*argv, "--resume", "--lr", "0.5"]) == 2
    assert "loop.lr (0.05 -> 0.5)" in one_error_line(capsys.readouterr().err)


def test_force_refuses_a_symbolic_link(tmp_path, capsys):
    real = tmp_path / "real"
    prepare_run_dir(real, resume=False, force=False)
    (real / "keep.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["run", "--out", str(link), "--force", "--no-progress"]) == 2
    assert "symbolic link" in one_error_line(capsys.readouterr().err)
    assert (real / "keep.txt").exists()


def test_kdkit_never_adopts_a_non_empty_folder_it_did_not_create(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2")
    with pytest.raises(KdkitError, match="not created by kdkit"):
        files.mark_run_dir(theirs)
    assert not (theirs / files.RUN_MARKER).exists()


def test_a_fresh_start_drops_checkpoints_an_earlier_run_left(digits, tmp_path):
    from kdkit.train.checkpoint import prev_path

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, digits, stop_after=40)
    assert prev_path(out / CHECKPOINT).exists()
    from kdkit.data.loader import BatchLoader
    from kdkit.distill import Distiller, build_method
    from kdkit.models import create_model
    from kdkit.train.loop import fit

    student = create_model("mlp", hidden=[8], input_size=8)
    with pytest.raises(TrainingInterrupted):
        fit(Distiller(student, {}, build_method("ce", student)),
            BatchLoader(digits.train, 64, shuffle=True, seed=0), LoopSettings(epochs=2),
            run_dir=out, progress=False, stop_after=2)  # resume=False: a new run here
    assert not prev_path(out / CHECKPOINT).exists()
    assert read_state(out / CHECKPOINT)[1]["step"] == 2


def test_a_resumed_experiment_reports_the_time_of_every_process(tmp_path, monkeypatch):
    from conftest import kill_fit_call

    cfg = config_from_dict(tiny_raw())
    out = tmp_path / "exp"
    restore = kill_fit_call(monkeypatch, call=2, steps=3)  # the student's run dies
    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, out, cache_dir=None, progress=False, log=quiet)
    restore()
    before = json.loads((out / "elapsed.json").read_text())["wall_s"]
    assert before > 0
    result = run_experiment(cfg, out, resume=True, cache_dir=None, progress=False, log=quiet)
    assert result["wall_s"] >= round(before, 1)
    assert json.loads((out / "elapsed.json").read_text())["wall_s"] >= before
