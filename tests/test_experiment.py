"""The default experiment end to end: KD beats scratch, teachers are cached, runs resume."""

import json

import pytest

from conftest import kill_fit_call
from kdkit.config import load_config
from kdkit.errors import KdkitError
from kdkit.pipelines.experiment import run_experiment
from kdkit.train.loop import TrainingInterrupted


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "default"
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config()
    result = run_experiment(cfg, out, cache_dir=cache, progress=False, log=lambda s: None)
    return cfg, out, cache, result


def test_default_kd_beats_scratch(default_run):
    _, _, _, result = default_run
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", "scratch", "kd"}
    assert all(r["n_seeds"] == 3 for r in rows.values())
    # Seed by seed, not only on average: the distilled student is better every time.
    by_seed = {(r["label"], r["seed"]): r["test_acc"] for r in result["runs"]}
    for seed in (0, 1, 2):
        assert by_seed[(f"seed{seed}/kd", seed)] > by_seed[(f"seed{seed}/scratch", seed)] + 3.0
    assert rows["kd"]["test_acc_mean"] > rows["scratch"]["test_acc_mean"] + 5.0
    assert rows["teacher"]["test_acc_mean"] > 94.0
    assert rows["kd"]["params"] < rows["teacher"]["params"] / 10


def test_run_directory_layout_and_table(default_run):
    _, out, _, result = default_run
    assert (out / "config.yaml").exists() and (out / "summary.json").exists()
    table = (out / "table.md").read_text()
    assert "| kd | mlp | kd |" in table and "±" in table
    for seed in (0, 1, 2):
        for label in ("teacher", "scratch", "kd"):
            run = out / f"seed{seed}" / label
            assert (run / "model.safetensors").exists() and (run / "model.json").exists()
            lines = (run / "metrics.jsonl").read_text().splitlines()
            summary = json.loads((run / "summary.json").read_text())
            assert len(lines) == summary["epochs"]
    assert json.loads((out / "summary.json").read_text())["rows"] == result["rows"]


def test_second_run_reuses_cached_teacher(default_run, tmp_path):
    cfg, _, cache, first = default_run
    logs = []
    second = run_experiment(cfg, tmp_path / "again", cache_dir=cache, progress=False,
                            log=logs.append)
    assert sum("reused from cache" in line for line in logs) == 3
    t1 = [r for r in first["runs"] if r["label"].endswith("teacher")]
    t2 = [r for r in second["runs"] if r["label"].endswith("teacher")]
    assert [r["test_acc"] for r in t1] == [r["test_acc"] for r in t2]
    # Deterministic: the students reach the same accuracy as the first time.
    from kdkit.pipelines.table import TIMING_KEYS as timing

    assert first["rows"][1:] == [
        {**r, **{k: first["rows"][i + 1][k] for k in timing if k in r}}
        for i, r in enumerate(second["rows"][1:])
    ]


def test_existing_run_dir_needs_force_or_resume(default_run):
    cfg, out, cache, _ = default_run
    with pytest.raises(KdkitError, match="already exists; use --resume .* --force"):
        run_experiment(cfg, out, cache_dir=cache, progress=False, log=lambda s: None)
    changed = load_config(None, ["train.epochs=3"])
    with pytest.raises(KdkitError, match="differs from the config given now"):
        run_experiment(changed, out, resume=True, cache_dir=cache, progress=False,
                       log=lambda s: None)


def test_killed_experiment_resumes_to_same_result(tmp_path, monkeypatch):
    cfg = load_config(None, ["seeds=[0]", "train.epochs=6", "teacher.train.epochs=4"])
    ref = run_experiment(cfg, tmp_path / "ref", cache_dir=None, progress=False,
                         log=lambda s: None)

    restore = kill_fit_call(monkeypatch, 3, 10)  # the KD student, killed after 10 steps
    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, tmp_path / "b", cache_dir=None, progress=False, log=lambda s: None)
    restore()
    res = run_experiment(cfg, tmp_path / "b", resume=True, cache_dir=None, progress=False,
                         log=lambda s: None)
    assert [r["test_acc"] for r in res["runs"]] == [r["test_acc"] for r in ref["runs"]]
    kd = json.loads((tmp_path / "b" / "seed0" / "kd" / "summary.json").read_text())
    assert kd["resumed_from"] == [2, 2]


def test_an_experiment_saved_before_a_new_setting_still_resumes(tmp_path):
    """config.yaml is compared as this kdkit reads it: a key a newer kdkit added (here
    eval.deploy) is absent from an older experiment's file, which must still resume; a
    changed value is still refused."""
    from kdkit.config import dump_config
    from kdkit.pipelines.experiment import _same_config

    cfg = load_config(None, ["seeds=[0]"])
    resolved = dump_config(cfg)
    older = tmp_path / "config.yaml"
    assert "  deploy: true\n" in resolved
    older.write_text(resolved.replace("  deploy: true\n", ""))
    assert _same_config(older, resolved)
    older.write_text(resolved.replace("  deploy: true\n", "").replace("epochs: 100", "epochs: 9"))
    assert not _same_config(older, resolved)


@pytest.mark.parametrize("env, jobs, want", [("1", 1, 1), ("3", 2, 3), ("", 2, None)])
def test_jobs_give_each_sub_run_the_threads_asked_for(tmp_path, monkeypatch, env, jobs, want):
    """`kdkit --threads N run --jobs J` gives every sub-run N threads (KDKIT_THREADS carries
    it); without it, a fair share of the cores."""
    import os

    from kdkit.pipelines import jobs as jobs_module

    monkeypatch.setenv("KDKIT_THREADS", env)
    monkeypatch.setattr(jobs_module, "_finished", lambda *_a: True)  # nothing left to run
    lines: list[str] = []
    jobs_module.run_parallel(load_config(None), tmp_path / "c.yaml", tmp_path, jobs=jobs,
                             selected=None, cache_dir=None, device=None, log=lines.append)
    threads = want or max(1, (os.cpu_count() or 1) // jobs)
    assert f"0 sub-run(s) to run, {threads} thread(s) each" in lines[0]
