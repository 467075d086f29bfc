"""Experiments with several teachers, teacher-assistant chains and assistant search."""

import json

import pytest

from conftest import kill_fit_call
from kdkit.config import config_from_dict
from kdkit.errors import ConfigError
from kdkit.pipelines.experiment import run_experiment

BASE = {
    "name": "multi",
    "seeds": [0],
    "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 200},
    "teachers": [
        {"label": "t_mlp", "model": {"name": "mlp", "hidden": [64]}, "train": {"epochs": 6}},
        {"label": "t_cnn", "model": {"name": "plain_cnn4"}, "train": {"epochs": 3}},
    ],
    "student": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 4, "batch_size": 32},
}


def _cfg(students, **over):
    return config_from_dict({**BASE, "students": students, **over})


def test_ensemble_best_teacher_and_chain(tmp_path):
    cfg = _cfg([
        {"label": "ens", "method": {"name": "ensemble_mean"}},
        {"label": "kd_best", "method": {"name": "kd"}, "teachers": "best"},
        {"label": "kd_cnn", "method": {"name": "kd"}, "teachers": ["t_cnn"]},
        {"label": "takd", "method": {"name": "kd"}, "teachers": ["t_mlp"],
         "via": [{"name": "mlp", "hidden": [32]}]},
        {"label": "search", "method": {"name": "kd"}, "teachers": ["t_mlp"],
         "via_search": [[{"name": "mlp", "hidden": [48]}], [{"name": "mlp", "hidden": [24]}]]},
    ])
    logs = []
    res = run_experiment(cfg, tmp_path / "run", progress=False, log=logs.append)
    runs = {r["label"].split("/", 1)[1]: r for r in res["runs"]}
    assert runs["ens"]["teachers"] == ["t_cnn", "t_mlp"]
    best = max(["t_mlp", "t_cnn"], key=lambda k: runs[k]["val_acc"])
    assert runs["kd_best"]["teachers"] == [best]
    assert runs["kd_cnn"]["teachers"] == ["t_cnn"]
    # the chain keeps every stage's run and records the path
    seed = tmp_path / "run" / "seed0"
    assert runs["takd"]["path"] == ["t_mlp", "mlp", "mlp"]
    assert (seed / "takd" / "stage1-mlp" / "summary.json").exists()
    assert (seed / "takd" / "model.safetensors").exists()
    # the search keeps the candidate with the best validation accuracy, not test accuracy
    search = runs["search"]["search"]
    assert len(search) == 2
    # same model name, other arguments: two separate candidate runs, not one reused
    assert [c["via_kwargs"] for c in search] == [[{"hidden": [48]}], [{"hidden": [24]}]]
    # (besides deploy/, where a table with the ONNX columns exports the chosen model)
    assert {p.name for p in (seed / "search").iterdir() if p.is_dir()} - {"deploy"} == {
        "via1-mlp", "via2-mlp"}
    best_val = max(search, key=lambda c: c["val_acc"])
    assert runs["search"]["val_acc"] == best_val["val_acc"]
    assert (seed / "search" / "model.safetensors").exists()
    assert any("chose via" in line for line in logs)
    assert {r["label"] for r in res["rows"]} == {"t_mlp", "t_cnn", "ens", "kd_best", "kd_cnn",
                                                 "takd", "search"}


def test_chain_resumes_per_stage(tmp_path, monkeypatch):
    cfg = _cfg([{"label": "takd", "method": {"name": "kd"}, "teachers": ["t_mlp"],
                 "via": [{"name": "mlp", "hidden": [32]}, {"name": "mlp", "hidden": [24]}]}])
    ref = run_experiment(cfg, tmp_path / "ref", progress=False, log=lambda s: None)

    from kdkit.train.loop import TrainingInterrupted

    restore = kill_fit_call(monkeypatch, 4, 5)  # teachers are runs 1-2; stage 1 is run 3; kill stage 2
    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, tmp_path / "b", progress=False, log=lambda s: None)
    restore()
    res = run_experiment(cfg, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    assert [r["test_acc"] for r in res["runs"]] == [r["test_acc"] for r in ref["runs"]]
    stage2 = json.loads((tmp_path / "b" / "seed0" / "takd" / "stage2-mlp" / "summary.json")
                        .read_text())
    assert stage2["resumed_from"] is not None


def test_teacher_selection_errors():
    with pytest.raises(ConfigError) as e:
        _cfg([
            {"label": "a", "method": {"name": "kd"}},
            {"label": "b", "method": {"name": "kd"}, "teachers": ["t_nope"]},
            {"label": "c", "method": {"name": "ensemble_mean"}, "via": [{"name": "mlp"}]},
            {"label": "d", "method": {"name": "ce"}, "teachers": ["t_mlp"]},
            {"label": "e", "method": {"name": "kd"}, "teachers": "best",
             "via": [{"name": "mpl"}]},
        ])
    msg = str(e.value)
    assert "students[0].teachers: method 'kd' distils from one teacher but 2 are selected" in msg
    assert "students[1].teachers: no teacher labelled 't_nope'" in msg
    assert "students[2].via: assistant chains need a one-teacher method" in msg
    assert "students[3].teachers: method 'ce' uses no teacher" in msg
    assert "students[4].via[0].name: unknown model 'mpl'" in msg
    with pytest.raises(ConfigError) as e:
        _cfg([{"label": "f", "method": {"name": "ce"}, "via": [{"name": "mlp"}]},
              {"label": "g", "method": {"name": "kd"}, "teachers": "best"},
              {"label": "h", "method": {"name": "kd", "temperature": "hot", "alpha": 2}}],
             data={"name": "digits", "val_fraction": 0.0})
    msg = str(e.value)
    assert "students[0].via: assistant chains need a one-teacher method, not 'ce'" in msg
    assert "students[1]: 'teachers: best' and 'via_search' choose on the validation split" in msg
    assert "argument 'temperature': Input should be a valid number" in msg
    assert "argument 'alpha' must be in [0, 1], got 2" in msg
    with pytest.raises(ConfigError, match="either 'via' .* or 'via_search'"):
        _cfg([{"label": "x", "method": {"name": "kd"}, "teachers": "best",
               "via": [{"name": "mlp"}], "via_search": [[{"name": "mlp"}]]}])


def test_staged_method_keeps_stage_runs_and_resumes(tmp_path, monkeypatch):
    cfg = config_from_dict({
        "name": "fit", "seeds": [0],
        "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 200},
        "teacher": {"model": {"name": "resnet8"}, "train": {"epochs": 2}},
        "student": {"name": "resnet", "depth": 8, "width": 8},
        "train": {"epochs": 3, "batch_size": 32},
        "students": [{"label": "fitnets", "method": {"name": "fitnets", "hint_epochs": 2}}],
    })
    ref = run_experiment(cfg, tmp_path / "ref", progress=False, log=lambda s: None)
    stage = tmp_path / "ref" / "seed0" / "fitnets" / "stage1-hint"
    assert (stage / "model.safetensors").exists()
    assert len((stage / "metrics.jsonl").read_text().splitlines()) == 2
    final = tmp_path / "ref" / "seed0" / "fitnets" / "metrics.jsonl"
    assert len(final.read_text().splitlines()) == 3

    from kdkit.train.loop import TrainingInterrupted

    restore = kill_fit_call(monkeypatch, 3, 4)  # teacher, hint stage, then kill the KD stage
    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, tmp_path / "b", progress=False, log=lambda s: None)
    restore()
    res = run_experiment(cfg, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    assert [r["test_acc"] for r in res["runs"]] == [r["test_acc"] for r in ref["runs"]]


def test_cached_teacher_reused_under_another_label(tmp_path):
    students = [{"label": "kd", "method": {"name": "kd"}}]
    one = {**BASE, "teachers": [BASE["teachers"][0]], "students": students}
    run_experiment(config_from_dict(one), tmp_path / "a", cache_dir=tmp_path / "c",
                   progress=False, log=lambda s: None)
    relabelled = {**one, "teachers": [{**BASE["teachers"][0], "label": "renamed"}]}
    logs = []
    res = run_experiment(config_from_dict(relabelled), tmp_path / "b", cache_dir=tmp_path / "c",
                         progress=False, log=logs.append)
    assert any("renamed: reused from cache" in line for line in logs)
    assert [r["label"] for r in res["rows"]] == ["renamed", "kd"]


def test_channels_last_converts_the_teachers_for_the_run_only(tmp_path, monkeypatch, digits):
    """With channels_last the teachers' conv weights are NHWC while the run trains (CPU
    convolutions are faster so), and contiguous again afterwards: runs share teachers."""
    import torch

    from kdkit.models import create_model
    from kdkit.pipelines import runs
    from kdkit.train.loop import LoopSettings

    teacher = create_model("resnet", depth=8, width=4, in_channels=1, input_size=8)
    seen = []
    real_fit = runs.fit

    def spying_fit(distiller, *args, **kwargs):
        w = distiller.teachers["teacher"].layer1[0].conv1.weight
        seen.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())
        return real_fit(distiller, *args, **kwargs)

    monkeypatch.setattr(runs, "fit", spying_fit)
    for cl in (True, False):
        runs.train_one(run_dir=tmp_path / str(cl), label="s", data=digits,
                       model_name="resnet", model_kwargs={"depth": 8, "width": 2},
                       method="kd", method_kwargs={}, teachers={"teacher": teacher},
                       settings=LoopSettings(epochs=1), batch_size=128, augment=None,
                       progress=False, channels_last=cl)
        assert teacher.layer1[0].conv1.weight.is_contiguous()
    assert seen == [True, False]
