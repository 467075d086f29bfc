"""Many processes (torchrun, gloo on the CPU): the same samples and the same weights as one
process, exact resume, SyncBatchNorm, global-batch terms, whole experiments, clean failure.

Each test launches real processes (``python -m torch.distributed.run``, or ``kdkit
--nproc 2``), 2 ranks with one thread each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit import dist
from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", KDKIT_THREADS="1", KDKIT_DIST_TIMEOUT="60")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _worker(spec: dict, out: Path, nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    spec = {**spec, "out": str(out)}
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *cmd[1:]]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------- in-process pieces


def test_shards_cover_each_global_batch_exactly_once(digits):
    """Two ranks' shards, put together, are the one-process batch: same samples, same
    order, same augmentation (drawn for the global batch, then cut)."""
    aug = build_augment({"shift": 1}, fill=digits.black)
    one = BatchLoader(digits.train, 64, shuffle=True, seed=3, augment=aug)
    for epoch in (0, 1):
        whole = list(one.epoch_batches(epoch))
        parts = [list(one.epoch_batches(epoch, shard=(r, 2))) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == len(whole)
        for step, (x, y, index) in enumerate(whole):
            (x0, y0, i0), (x1, y1, i1) = parts[0][step], parts[1][step]
            assert torch.equal(torch.cat([x0, x1]), x)
            assert torch.equal(torch.cat([y0, y1]), y)
            assert torch.equal(torch.cat([i0, i1]), index)
            assert abs(len(y0) - len(y1)) <= 1
    # resuming at a step inside an epoch gives the same shards as the uninterrupted epoch
    late = list(one.epoch_batches(1, 5, shard=(1, 2)))
    assert torch.equal(late[0][0], list(one.epoch_batches(1, shard=(1, 2)))[5][0])


def test_shard_bounds_split_evenly():
    assert [dist.shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert dist.shard_sizes(5, 2) == [3, 2]
    assert dist.shard_sizes(1, 2) == [1, 0]


# ----------------------------------------------------------------- real processes


def test_ddp_reaches_the_weights_of_one_process(tmp_path):
    """KD on an MLP: 2 processes x B/2 (the last batch split unevenly) reach the weights of
    one process with batch B; the metrics, all-reduced, agree too."""
    spec = {"kind": "mlp", "method": "kd", "batch": 64, "epochs": 2, "augment": {"shift": 1}}
    _ok(_worker(spec, tmp_path / "one.st"))
    _ok(_worker(spec, tmp_path / "two.st", nproc=2))
    assert _max_diff(tmp_path / "one.st", tmp_path / "two.st") < 1e-6
    h1 = json.loads((tmp_path / "one.st.json").read_text())
    h2 = json.loads((tmp_path / "two.st.json").read_text())
    assert h2["world"] == 2 and h1["world"] == 1
    last1, last2 = h1["history"][-1], h2["history"][-1]
    assert last1["val/acc"] == last2["val/acc"]
    assert last1["train/acc"] == last2["train/acc"]
    assert abs(last1["train/loss"] - last2["train/loss"]) < 1e-6


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_sync_bn_matches_one_process_and_per_rank_bn_does_not(tmp_path):
    spec = {"kind": "cnn", "method": "kd", "batch": 64, "epochs": 1}
    _ok(_worker(spec, tmp_path / "one.st"))
    _ok(_worker({**spec, "sync_bn": True}, tmp_path / "sync.st", nproc=2))
    _ok(_worker(spec, tmp_path / "local.st", nproc=2))
    assert _max_diff(tmp_path / "one.st", tmp_path / "sync.st") < 1e-4  # BN running stats too
    assert _max_diff(tmp_path / "one.st", tmp_path / "local.st") > 1e-3  # per-rank statistics


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_global_batch_terms_see_the_whole_batch(tmp_path):
    """RKD relates the samples of a batch: with global_batch_terms its gathered input (with
    gradient) gives one process's weights; without, each rank sees only its shard."""
    spec = {"kind": "mlp", "method": "rkd", "batch": 64, "epochs": 1}
    _ok(_worker(spec, tmp_path / "one.st"))
    _ok(_worker({**spec, "global_batch_terms": True}, tmp_path / "global.st", nproc=2))
    _ok(_worker(spec, tmp_path / "shard.st", nproc=2))
    assert _max_diff(tmp_path / "one.st", tmp_path / "global.st") < 1e-6
    assert _max_diff(tmp_path / "one.st", tmp_path / "shard.st") > 1e-3


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_ddp_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    spec = {"kind": "cnn", "method": "kd", "batch": 64, "epochs": 2, "augment": {"shift": 1}}
    _ok(_worker({**spec, "run_dir": str(tmp_path / "full")}, tmp_path / "full.st", nproc=2))
    stopped = _worker({**spec, "run_dir": str(tmp_path / "cut"), "stop_after": 30},
                      tmp_path / "cut.st", nproc=2)
    assert stopped.returncode != 0 and not (tmp_path / "cut.st").exists()
    assert (tmp_path / "cut" / "stage0" / "checkpoint" / "state.safetensors").exists()
    _ok(_worker({**spec, "run_dir": str(tmp_path / "cut"), "resume": True}, tmp_path / "cut.st",
                nproc=2))
    assert _max_diff(tmp_path / "full.st", tmp_path / "cut.st") == 0.0
    full = (tmp_path / "full" / "stage0" / "metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "stage0" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "epoch_s"} for line in full]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "epoch_s"}
                     for line in cut]


def test_a_crashed_rank_ends_the_job_quickly(tmp_path):
    """Rank 1 fails at its 4th step of a long run: every process is gone well within the
    collective timeout, and the job's status says it failed."""
    spec = {"kind": "mlp", "method": "kd", "batch": 64, "epochs": 200, "crash_rank": 1,
            "crash_after": 3}
    t0 = time.perf_counter()
    proc = _worker(spec, tmp_path / "never.st", nproc=2, timeout=90)
    assert proc.returncode != 0
    assert time.perf_counter() - t0 < 45
    assert "injected failure on this rank" in proc.stderr
    assert not (tmp_path / "never.st").exists()


def _table_rows(out: Path) -> list[dict]:
    rows = json.loads((out / "summary.json").read_text())["rows"]
    keep = ("label", "params", "size_bytes", "test_acc_mean", "val_acc_mean")
    return [{k: r[k] for k in keep} for r in rows]


EXPERIMENT = ["--set", "seeds=[0]", "--set", "train.epochs=4", "--set", "teacher.train.epochs=3",
              "--set", "teacher.model.dropout=0", "--no-cache", "--no-progress"]


def _kdkit(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdkit", *args], env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> list[dict]:
    """The small experiment's table from one process, run once for the tests below."""
    where = tmp_path_factory.mktemp("sequential")
    _ok(_kdkit("run", *EXPERIMENT, "--out", "seq", cwd=where))
    return _table_rows(where / "seq")


def test_an_experiment_under_torchrun_gives_the_one_process_table(tmp_path, sequential):
    """Without dropout (whose masks are drawn per rank) the table is the one process's."""
    proc = _kdkit("--nproc", "2", "run", *EXPERIMENT, "--out", "two", cwd=tmp_path)
    _ok(proc)
    assert _table_rows(tmp_path / "two") == sequential
    assert proc.stdout.count("kdkit run: experiment") == 1  # one copy of the output


def test_nproc_failure_is_one_line_per_rank_and_one_summary(tmp_path):
    proc = _kdkit("--nproc", "2", "train", "--model", "mlp", "--data", "digits",
                  "--model-arg", "hidden=[8]", "--method-arg", "nope=1", "--out", "x",
                  cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any("rank 0" in ln and "exited with status 2" in ln for ln in lines), lines
    assert any(ln.startswith("kdkit: error (rank 1 of 2): ") for ln in lines), lines
    assert all("Traceback" not in ln for ln in lines), proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # four experiment runs (about 35 s): keeps the main suite under 5 minutes
def test_jobs_and_only_give_the_same_table(tmp_path, sequential):
    """--jobs 2 runs sub-runs in parallel processes; --only runs one sub-run (its teacher
    must be finished); --resume assembles the table. All give the sequential table."""
    _ok(_kdkit("run", *EXPERIMENT, "--out", "par", "--jobs", "2", cwd=tmp_path))
    assert _table_rows(tmp_path / "par") == sequential
    assert (tmp_path / "par" / "logs" / "seed0-kd.log").exists()

    early = _kdkit("run", *EXPERIMENT, "--out", "fan", "--only", "kd", cwd=tmp_path)
    assert early.returncode == 2
    assert "teacher seed0/teacher is not finished; run it first (--only seed0/teacher)" in (
        early.stderr)
    for only in ("seed0/teacher", "kd", "scratch"):
        _ok(_kdkit("run", *EXPERIMENT, "--out", "fan", "--only", only, cwd=tmp_path))
    assert not (tmp_path / "fan" / "summary.json").exists()
    _ok(_kdkit("run", *EXPERIMENT, "--out", "fan", "--resume", cwd=tmp_path))
    assert _table_rows(tmp_path / "fan") == sequential


@pytest.mark.parametrize("argv, problem", [
    (["--nproc", "0", "run"], "expected a whole number >= 1"),
    (["run", "--jobs", "0"], "expected a whole number >= 1"),
    (["run", "--only", "seed7/kd"], "'seed7' is not one of this experiment's seeds (seed0, "
                                    "seed1, seed2)"),
    (["run", "--only", "nobody"], "no sub-run is labelled 'nobody'; the labels are kd, "
                                  "scratch, teacher"),
    (["run", "--device", "tpu"], "expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["train", "--model", "mlp", "--device", "cuda"], "device 'cuda': this torch is a CPU "
                                                      "build; use --device cpu (or auto)"),
])
def test_bad_process_and_device_options_are_one_line(argv, problem, tmp_path, monkeypatch,
                                                     capsys):
    from kdkit.cli import main

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", "o"] if argv[0] != "--nproc" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdkit: error: ") and "\n" not in err
    assert problem in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_teacher_cache_under_torchrun_is_built_once_and_gives_one_process_weights(tmp_path):
    """Rank 0 builds the teacher-output cache while the other waits; both map it; the
    student's weights are those of one process using the same cache."""
    _ok(_kdkit("train", "--model", "mlp", "--data", "digits", "--epochs", "2", "--out", "t",
               "--no-progress", cwd=tmp_path))
    common = ["distill", "--teacher", "t", "--student", "mlp", "--model-arg", "hidden=[16]",
              "--data", "digits", "--epochs", "2", "--teacher-cache", "--cache-dir", "cache",
              "--augment", "shift=1", "--cache-views", "2"]
    two = _kdkit("--nproc", "2", *common, "--out", "two", cwd=tmp_path)
    _ok(two)
    assert two.stdout.count("building 2 view(s)") == 1  # rank 0 built it, once
    one = _kdkit(*common, "--out", "one", cwd=tmp_path)
    _ok(one)
    assert "building" not in one.stdout  # the cache the DDP run built is reused
    assert _max_diff(tmp_path / "one" / "model.safetensors",
                     tmp_path / "two" / "model.safetensors") < 1e-6


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_a_staged_method_whose_first_stage_skips_layers_trains_under_ddp(tmp_path):
    """FitNets' hint stage reads an inner layer only, so the student's later layers get no
    gradient there: DDP must be told (else it fails at the second step), and the result is
    still one process's."""
    spec = {"kind": "cnn", "method": "fitnets", "batch": 64, "epochs": 1, "lr": 0.01}
    _ok(_worker(spec, tmp_path / "one.st"))
    _ok(_worker({**spec, "sync_bn": True}, tmp_path / "two.st", nproc=2))
    assert _max_diff(tmp_path / "one.st", tmp_path / "two.st") < 1e-3  # BN variances ~170


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_a_streamed_folder_under_torchrun_gives_one_process_weights(tmp_path):
    """Images streamed from disk (each rank reads only its share of each global batch, with
    a DataLoader worker) train the weights of one process streaming them, per-sample
    augmentation included."""
    _ok(_kdkit("data", "export", "digits", "--format", "imagefolder", "--out", "imgs",
               cwd=tmp_path))
    common = ["train", "--model", "mlp", "--model-arg", "hidden=[16]", "--data", "folder:imgs",
              "--data-root", "root", "--stream", "--workers", "1", "--epochs", "2",
              "--augment", "shift=1", "--no-progress"]
    _ok(_kdkit("--nproc", "2", *common, "--out", "two", cwd=tmp_path))
    _ok(_kdkit(*common, "--out", "one", cwd=tmp_path))
    assert _max_diff(tmp_path / "one" / "model.safetensors",
                     tmp_path / "two" / "model.safetensors") < 1e-6
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["test_acc"] == two["test_acc"]


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_keep_going_runs_the_rest_past_a_failed_sub_run(tmp_path):
    """A sub-run that diverges does not stop the others under --keep-going: they finish, the
    error names the failure (and its log), and nothing assembles a table with a hole."""
    (tmp_path / "exp.yaml").write_text(
        "name: kg\nseeds: [0]\ndata: {name: digits, val_fraction: 0.2, train_subset: 100}\n"
        "teacher: {model: {name: mlp, hidden: [32]}, train: {epochs: 2}}\n"
        "student: {name: mlp, hidden: [8]}\ntrain: {epochs: 2, batch_size: 32}\n"
        "students:\n"
        "  - {label: blowup, method: {name: kd}, train: {lr: 1.0e+30}}\n"
        "  - {label: fine, method: {name: kd}}\n")
    proc = _kdkit("run", "exp.yaml", "--out", "o", "--keep-going", "--no-cache",
                  "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("kdkit: error: 1 sub-run(s) failed: seed0/blowup failed (exit 2; "
                          "log "), err
    assert "became nan" in err or "became inf" in err, err
    assert "continue with --resume" in err
    assert (tmp_path / "o" / "seed0" / "fine" / "summary.json").exists()
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_a_language_model_under_torchrun_gives_one_process_weights(tmp_path):
    """Token windows shard over ranks like images: two processes distilling a gpt with a
    token-level divergence reach one process's weights."""
    (tmp_path / "c.txt").write_text("to be or not to be, that is the question. " * 80)
    common = ["--model-arg", "layers=1", "--model-arg", "heads=2", "--data", "text:c.txt",
              "--context", "16", "--epochs", "1", "--batch-size", "16", "--optimizer", "adamw",
              "--lr", "0.003", "--no-progress"]
    _ok(_kdkit("train", "--model", "gpt", "--model-arg", "width=16", *common, "--out", "t",
               cwd=tmp_path))
    distil = ["distill", "--teacher", "t", "--student", "gpt", "--model-arg", "width=8",
              "--method", "lm_kd", "--method-arg", "divergence=jsd", *common]
    _ok(_kdkit("--nproc", "2", *distil, "--out", "two", cwd=tmp_path))
    _ok(_kdkit(*distil, "--out", "one", cwd=tmp_path))
    assert _max_diff(tmp_path / "one" / "model.safetensors",
                     tmp_path / "two" / "model.safetensors") < 1e-5
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["test_bpc"] == pytest.approx(two["test_bpc"], abs=1e-4)
