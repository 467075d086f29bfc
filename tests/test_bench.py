"""`kdkit bench` and the teacher cache wired into runs: correctness only, never timings."""

import json

import pytest
import torch
import yaml

from kdkit.cli import main
from kdkit.config import DEFAULT_CONFIG, config_from_dict
from kdkit.errors import ConfigError
from kdkit.pipelines.bench import (
    BenchSpec,
    Row,
    _measure,
    _report,
    bench_rows,
    format_bench,
    measure,
)

FAST = ["--epochs", "2", "--no-progress"]


def _teacher(tmp_path):
    teacher = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[64]", "--data", "digits",
                 "--out", str(teacher), "--lr", "0.1", *FAST]) == 0
    return teacher


def test_distill_with_teacher_cache_is_reused_across_students_and_seeds(tmp_path, capsys):
    teacher = _teacher(tmp_path)
    common = ["distill", "--teacher", str(teacher), "--student", "mlp", "--model-arg",
              "hidden=[8]", "--data", "digits", "--augment", "shift=1", *FAST]
    cache = ["--teacher-cache", "--cache-views", "2", "--cache-dtype", "float32",
             "--cache-dir", str(tmp_path / "c")]
    assert main([*common, "--out", str(tmp_path / "a"), *cache]) == 0
    folders = list((tmp_path / "c" / "teacher-outputs").iterdir())
    assert len(folders) == 1 and (folders[0] / "manifest.json").exists()
    stamp = (folders[0] / "manifest.json").stat().st_mtime_ns
    # another student reuses the same cache
    other = [c if c != "hidden=[8]" else "hidden=[12]" for c in common]
    assert main([*other, "--out", str(tmp_path / "b"), *cache]) == 0
    assert list((tmp_path / "c" / "teacher-outputs").iterdir()) == folders
    assert (folders[0] / "manifest.json").stat().st_mtime_ns == stamp
    # another seed draws another validation split, but from the same pool: the same cache
    assert main([*common, "--out", str(tmp_path / "e"), "--seed", "1", *cache]) == 0
    assert list((tmp_path / "c" / "teacher-outputs").iterdir()) == folders
    assert (folders[0] / "manifest.json").stat().st_mtime_ns == stamp
    # --cache-views without an augmentation is refused with the fix
    no_aug = [c for c in common if c not in ("--augment", "shift=1")]
    assert main([*no_aug, "--out", str(tmp_path / "d"), *cache]) == 2
    assert "set views to 1" in capsys.readouterr().err


def _raw():
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def test_config_teacher_cache_is_strict():
    raw = _raw()
    raw["train"]["teacher_cache"] = True  # with augment: views must be given (issue 10, 13)
    with pytest.raises(ConfigError, match="say how many augmented views"):
        config_from_dict(raw)
    raw["train"]["teacher_cache"] = {"views": 1}
    cfg = config_from_dict(raw)
    assert cfg.train.teacher_cache is not None and cfg.train.teacher_cache.views == 1
    assert "teacher_cache" not in vars(cfg.train.loop_settings(0))
    raw["train"]["teacher_cache"] = {"views": 4, "dtype": "float8", "topk": 0, "veiws": 2}
    raw["students"][1]["teacher_mode"] = "train"
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    assert "train.teacher_cache.dtype: Input should be 'float16' or 'float32'" in msg
    assert "train.teacher_cache.topk: Input should be greater than or equal to 1" in msg
    assert "train.teacher_cache.veiws: unknown key; did you mean 'views'" in msg
    assert "students[1].teacher_mode: 'train'" in msg and "remove teacher_cache" in msg
    raw = _raw()
    del raw["train"]["augment"]
    raw["students"][1]["train"] = {"teacher_cache": {"views": 3}}
    with pytest.raises(ConfigError, match=r"students\[1\]\.train\.teacher_cache\.views: 3 "
                                          r"views but run 'kd' has no augment"):
        config_from_dict(raw)


def test_bench_rows_and_report(digits, tmp_path):
    teacher = _teacher(tmp_path)
    spec = BenchSpec(data="digits", teacher="mlp", student="mlp", student_kwargs={"hidden": [8]},
                     feature_method="pkt", epochs=2, teacher_run=str(teacher),
                     augment={"shift": 1}, views=2, target=10.0)
    names = [r.name for r in bench_rows(spec)]
    assert names == ["plain", "floor", "teacher_forward", "kd_live", "floor_kd", "kd_cache",
                     "pkt_live", "pkt_cache"]
    live = measure(spec, Row("kd_live", "kd"), tmp_path)
    cached = measure(spec, Row("kd_cache", "kd", cached=True), tmp_path)
    # the same training, so the same accuracies; only the timings differ
    assert cached["val_acc"] == live["val_acc"] and len(live["val_acc"]) == 2
    assert cached["cache_build_s"] is not None and cached["epochs_to_target"] == 1
    fake = [dict(live, row=r, epoch_s=t) for r, t in (
        ("plain", 1.0), ("floor", 0.97), ("teacher_forward", 0.5), ("kd_live", 1.4),
        ("floor_kd", 1.3), ("kd_cache", 1.05), ("pkt_live", 2.0), ("pkt_cache", 1.2))]
    report = _report(spec, fake)
    assert report["ratios"]["kd_cache / plain"] == 1.05
    assert report["ratios"]["kd_live / (plain + teacher_forward)"] == pytest.approx(0.933, abs=1e-3)
    assert report["ratios"]["plain / floor"] == pytest.approx(1.031, abs=1e-3)
    assert report["ratios"]["kd_live / floor_kd"] == pytest.approx(1.077, abs=1e-3)
    md = format_bench(report)
    assert "kd_cache / plain = 1.050 (target ≤ 1.05: met)" in md
    assert "plain / floor = 1.031 (target ≤ 1.02: missed)" in md
    assert "kd_live / floor_kd = 1.077 (target ≤ 1.02: missed)" in md
    assert md.count("\n| ") == 9  # header + 8 rows
    assert "| floor_kd | cpu | fp32 | 1 | 1.300 |" in md


def test_channels_last_training_runs_and_saves(tmp_path, capsys):
    out = tmp_path / "cl"
    assert main(["train", "--model", "plain_cnn2", "--data", "digits", "--channels-last",
                 "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["test_acc"], abs=1e-3)


def test_experiment_with_teacher_cache(tmp_path):
    from kdkit.config import load_config
    from kdkit.pipelines.experiment import run_experiment

    cfg = load_config(None, ["seeds=[0]", "teacher.train.epochs=3", "train.epochs=3",
                             "train.teacher_cache={views: 2}"])
    result = run_experiment(cfg, tmp_path / "x", cache_dir=tmp_path / "c", progress=False,
                            log=lambda s: None)
    caches = list((tmp_path / "c" / "teacher-outputs").iterdir())
    assert len(caches) == 1  # the kd run's; scratch reads no teacher
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert manifest["identity"]["views"] == 2 and "shift" in manifest["identity"]["augment"].lower()
    assert {r["label"] for r in result["rows"]} == {"teacher", "scratch", "kd"}


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--repeats" in out and "--channels-last" in out and "--feature-method" in out
    assert "--precision" in out and "--device" in out and "--ddp" in out


# ---------------------------------------------------------------- rows checked, kept, skipped

MLP_PAIR = ["--teacher", "mlp_hinton_1200", "--student", "mlp_hinton_800"]


def _in_process(monkeypatch, fail_at=None, error=None):
    """Run the rows in this process (fast); the ``fail_at``-th row raises ``error``."""
    from kdkit.pipelines import bench

    calls = []

    def runner(spec, row, out):
        calls.append(row.name)
        if len(calls) == fail_at:
            raise error
        return measure(spec, row, out)

    monkeypatch.setattr(bench, "_in_subprocess", runner)
    return calls


def test_bench_mlp_pair_falls_back_to_a_feature_method_that_fits(tmp_path, monkeypatch):
    from kdkit.pipelines.bench import run_bench

    _in_process(monkeypatch)
    spec = BenchSpec(data="digits", teacher="mlp_hinton_1200", student="mlp_hinton_800",
                     train_subset=200, epochs=1, teacher_epochs=1, batch_size=64)
    logs = []
    report = run_bench(spec, tmp_path / "b", log=logs.append)
    # the default (overhaul) needs stages, which an MLP lacks: the first fallback that fits
    assert report["feature_method"] == "pkt" and report["complete"]
    assert [r["row"] for r in report["rows"]] == [
        "plain", "floor", "teacher_forward", "kd_live", "floor_kd", "kd_cache", "pkt_live",
        "pkt_cache"]
    assert all("epoch_s" in r for r in report["rows"])
    assert "default, overhaul, does not fit" in report["feature_note"]
    assert any("feature method pkt" in line for line in logs)
    on_disk = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert on_disk["feature_method"] == "pkt" and len(on_disk["rows"]) == 8
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "feature method pkt: the default, overhaul, does not fit" in md
    assert "pkt_cache / plain" in md


def test_bench_explicit_feature_method_that_does_not_fit_is_skipped(tmp_path, monkeypatch,
                                                                    capsys):
    calls = _in_process(monkeypatch)
    out = tmp_path / "b"
    assert main(["bench", *MLP_PAIR, "--feature-method", "overhaul", "--train-subset", "200",
                 "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "64",
                 "--out", str(out)]) == 0
    assert calls == ["plain", "floor", "teacher_forward", "kd_live", "floor_kd", "kd_cache"]
    report = json.loads((out / "bench.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["plain", "floor", "teacher_forward", "kd_live", "floor_kd", "kd_cache",
                          "overhaul_live", "overhaul_cache"]
    assert "cannot find the stages of MLP" in rows["overhaul_live"]["skipped"]
    assert "epoch_s" not in rows["overhaul_cache"] and report["complete"]
    assert "overhaul_cache / plain" not in report["ratios"]
    md = (out / "bench.md").read_text()
    assert "| overhaul_live | skipped: cannot find the stages of MLP" in md
    assert "chosen with --feature-method" in capsys.readouterr().out


def test_bench_crd_rows_get_sample_indices_and_run(tmp_path, monkeypatch):
    """CRD's memory bank is sized by begin_fit and read by sample index: the bench checks
    its rows as the loop runs them (not as unfit), and live and cached train alike."""
    calls = _in_process(monkeypatch)
    out = tmp_path / "b"
    assert main(["bench", *MLP_PAIR, "--feature-method", "crd", "--feature-arg",
                 "negatives=64", "--train-subset", "200", "--epochs", "1",
                 "--teacher-epochs", "1", "--batch-size", "64", "--out", str(out)]) == 0
    assert calls[-2:] == ["crd_live", "crd_cache"]
    report = json.loads((out / "bench.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert report["feature_method"] == "crd" and report["complete"]
    assert "feature_note" not in report or not report["feature_note"]
    assert not any("skipped" in r for r in rows.values())
    assert rows["crd_cache"]["val_acc"] == rows["crd_live"]["val_acc"]
    assert "crd_cache / plain" in report["ratios"]


def test_bench_checks_every_row_before_training_the_teacher(tmp_path):
    from kdkit.errors import KdkitError
    from kdkit.pipelines.bench import run_bench

    spec = BenchSpec(data="digits", teacher="mlp_hinton_1200", student="mlp_hinton_800",
                     dtype="bfloat16", epochs=1, teacher_epochs=1)  # not a cache dtype
    with pytest.raises(KdkitError, match="bench row kd_cache cannot run: .*bfloat16"):
        run_bench(spec, tmp_path / "b", log=lambda s: None)
    assert not (tmp_path / "b" / "teacher").exists()


def test_bench_keeps_the_finished_rows_when_a_row_fails(tmp_path, monkeypatch):
    from kdkit.errors import KdkitError
    from kdkit.pipelines.bench import run_bench

    teacher = _teacher(tmp_path)

    def spec():
        return BenchSpec(data="digits", teacher="mlp", student="mlp",
                         student_kwargs={"hidden": [8]}, epochs=1, teacher_run=str(teacher))

    # Ctrl-C during the second row: the first is on disk
    _in_process(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_bench(spec(), tmp_path / "a", log=lambda s: None)
    report = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["plain"] and not report["complete"]
    assert "epoch_s" in report["rows"][0]
    assert "| plain |" in (tmp_path / "a" / "bench.md").read_text()
    # a row that fails (a KdkitError): one line naming it; the rows before it are kept
    _in_process(monkeypatch, fail_at=4, error=KdkitError("loss became NaN"))
    with pytest.raises(KdkitError) as e:
        run_bench(spec(), tmp_path / "b", log=lambda s: None)
    assert str(e.value).startswith("bench row kd_live failed: loss became NaN; the rows")
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["plain", "floor", "teacher_forward", "kd_live"]
    assert report["rows"][3]["failed"] == "loss became NaN" and not report["complete"]
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| kd_live | failed: loss became NaN |" in md and "- incomplete" in md


def test_bench_row_errors_are_one_line(tmp_path, monkeypatch):
    import subprocess

    from kdkit.errors import KdkitError
    from kdkit.pipelines import bench

    spec = BenchSpec(data="digits", teacher="mlp", student="mlp",
                     teacher_run=str(tmp_path / "no-such-run"), epochs=1)
    # a KdkitError in the row's process: its message, no traceback
    with pytest.raises(KdkitError) as e:
        bench._in_subprocess(spec, Row("plain", "ce"), tmp_path)
    assert "no-such-run" in str(e.value) and "Traceback" not in str(e.value)
    # anything else (a bug, a crash): the last line, and the full output kept in a log
    fake = subprocess.CompletedProcess([], 1, stdout="", stderr=(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n"))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: fake)
    with pytest.raises(KdkitError) as e:
        bench._in_subprocess(spec, Row("plain", "ce"), tmp_path)
    log = tmp_path / "bench-plain.log"
    assert str(e.value) == f"RuntimeError: boom (full output in {log})"
    assert "Traceback" in log.read_text()


# ------------------------------------------------ the floor, precisions, DDP, the allocator


def _same_weights(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return all(torch.allclose(sa[k].cpu(), sb[k].cpu(), rtol=0, atol=atol) for k in sa)


def test_floor_trains_what_kdkit_trains_in_each_precision(tmp_path, device):
    """The floor rows are the same job as kdkit's rows: the same weights from the same
    initialisation and batches (augmented views included), KD and bf16 autocast included.
    (``pytest --device cuda`` checks it on a GPU.)"""
    from kdkit.pipelines.bench import device_name

    teacher = _teacher(tmp_path)
    spec = BenchSpec(data="digits", teacher="mlp", student="mlp", student_kwargs={"hidden": [8]},
                     epochs=2, teacher_run=str(teacher), augment={"shift": 1}, views=2,
                     precisions=["fp32", "bf16"], device=str(device))
    trained = {}
    for row in bench_rows(spec):
        if row.name.split("_bf16")[0] in ("plain", "floor", "kd_live", "floor_kd"):
            figures, trained[row.name] = _measure(spec, row, tmp_path)
            assert figures["device"] == device_name(device)
            assert figures["precision"] == row.precision
            assert figures["floor"] == row.floor and len(figures["val_acc"]) == 2
    atol = 1e-6 if device.type == "cpu" else 1e-4  # GPU kernels may sum in another order
    for s in ("", "_bf16"):
        assert _same_weights(trained[f"plain{s}"], trained[f"floor{s}"], atol)
        assert _same_weights(trained[f"kd_live{s}"], trained[f"floor_kd{s}"], atol)
        assert not _same_weights(trained[f"plain{s}"], trained[f"kd_live{s}"], atol)
    # bf16 really ran under autocast: close to fp32, not the same
    assert not _same_weights(trained["plain"], trained["plain_bf16"], atol)


def test_bench_ratios_per_precision_and_ddp_scaling():
    spec = BenchSpec(data="digits", teacher="mlp", student="mlp", feature_method="pkt",
                     precisions=["fp32", "bf16"], ddp=2)
    names = [r.name for r in bench_rows(spec)]
    assert names[8:10] == ["plain_ddp2", "kd_live_ddp2"]
    assert names[10:] == [n if "ddp" in n else f"{n}_bf16" for n in names[:8]] + [
        "plain_ddp2_bf16", "kd_live_ddp2_bf16"]
    assert {r.precision for r in bench_rows(spec)[10:]} == {"bf16"}
    assert {r.processes for r in bench_rows(spec) if "ddp" in r.name} == {2}
    secs = {"plain": 1.0, "floor": 1.0, "plain_ddp2": 0.8, "plain_bf16": 2.0,
            "floor_bf16": 1.6, "kd_cache_bf16": 2.2}
    rows = [{"row": n, "precision": "bf16" if n.endswith("bf16") else "fp32", "epoch_s": t,
             "images_per_s": 1000 / t, "first_epoch_s": t, "peak_rss_mib": 1.0, "val_acc": []}
            for n, t in secs.items()]
    report = _report(spec, rows)
    assert report["ratios"] == {"plain / floor": 1.0, "plain_bf16 / floor_bf16": 1.25,
                                "kd_cache_bf16 / plain_bf16": 1.1}
    assert report["scaling"] == {"plain_ddp2 / (2 × plain)": 0.625}
    by = {r["row"]: r for r in report["rows"]}
    assert by["plain_ddp2"]["scaling_efficiency"] == 0.625
    assert by["kd_cache_bf16"]["x_plain"] == 1.1  # against the plain row of its precision
    md = format_bench(report)
    assert "- plain_bf16 / floor_bf16 = 1.250 (target ≤ 1.02: missed)" in md
    assert "- scaling efficiency plain_ddp2 / (2 × plain) = 0.625" in md


def test_bench_cli_precisions_device_and_ddp(tmp_path, monkeypatch, capsys):
    from kdkit.pipelines import bench

    teacher = _teacher(tmp_path)
    seen = []

    def fake(spec, row, out):  # what each row is asked to do; no training
        seen.append((row.name, row.precision, row.processes, row.floor, spec.device))
        return {"row": row.name, "precision": row.precision, "epoch_s": 1.0,
                "images_per_s": 100.0 / row.processes, "first_epoch_s": 1.0,
                "peak_rss_mib": 1.0, "val_acc": [], "processes": row.processes}

    monkeypatch.setattr(bench, "_in_subprocess", fake)
    base = ["bench", "--teacher", "mlp", "--teacher-run", str(teacher), "--student", "mlp",
            "--student-arg", "hidden=[8]", "--feature-method", "pkt", "--out",
            str(tmp_path / "b")]
    assert main([*base, "--precision", "fp32,bf16", "--precision", "bf16", "--ddp", "2",
                 "--device", "cpu"]) == 0
    assert len(seen) == 20 and {s[4] for s in seen} == {"cpu"}
    assert [s[:3] for s in seen if s[2] == 2] == [
        ("plain_ddp2", "fp32", 2), ("kd_live_ddp2", "fp32", 2),
        ("plain_ddp2_bf16", "bf16", 2), ("kd_live_ddp2_bf16", "bf16", 2)]
    assert ("floor_kd_bf16", "bf16", 1, True, "cpu") in seen
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["spec"]["precisions"] == ["fp32", "bf16"]
    assert report["scaling"]["plain_ddp2_bf16 / (2 × plain_bf16)"] == 0.25
    capsys.readouterr()
    assert main([*base, "--precision", "fp64"]) == 2
    assert "'fp64' is not one of fp32, bf16, fp16" in capsys.readouterr().err
    assert main([*base, "--ddp", "1"]) == 2
    assert "expected a whole number >= 2" in capsys.readouterr().err
    if not torch.cuda.is_available():  # refused before anything runs
        seen.clear()
        assert main([*base, "--device", "cuda"]) == 2
        assert "device 'cuda'" in capsys.readouterr().err and not seen


def test_ddp_row_runs_under_torchrun_and_scales(tmp_path):
    from kdkit.pipelines.bench import _in_subprocess

    teacher = _teacher(tmp_path)
    spec = BenchSpec(data="digits", teacher="mlp", student="mlp", student_kwargs={"hidden": [8]},
                     epochs=2, teacher_run=str(teacher), ddp=2, device="cpu")
    rows = {r.name: r for r in bench_rows(spec)}
    single = measure(spec, rows["plain"], tmp_path)
    ddp = _in_subprocess(spec, rows["plain_ddp2"], tmp_path)
    assert ddp["processes"] == 2 and ddp["threads"] == 1 and ddp["device"] == "cpu"
    # the same job split over two processes: the same model, within float rounding
    assert ddp["val_acc"] == pytest.approx(single["val_acc"], abs=2.0)
    report = _report(spec, [single, ddp])
    eff = report["scaling"]["plain_ddp2 / (2 × plain)"]
    assert 0 < eff <= 1.5 and report["rows"][1]["scaling_efficiency"] == eff


def test_tune_allocator(monkeypatch):
    import sys

    from kdkit import _malloc

    glibc = sys.platform.startswith("linux") and "glibc" in __import__("os").confstr(
        "CS_GNU_LIBC_VERSION")
    assert _malloc.tune_allocator() is glibc
    monkeypatch.setenv("KDKIT_MALLOC", "default")
    assert _malloc.tune_allocator() is False
    monkeypatch.delenv("KDKIT_MALLOC")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert _malloc.tune_allocator() is False
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(_malloc.sys, "platform", "darwin")
    assert _malloc.tune_allocator() is False
    monkeypatch.undo()

    def broken():
        raise RuntimeError("no libc")

    monkeypatch.setattr(_malloc, "_glibc_mallopt", broken)
    assert _malloc.tune_allocator() is False  # never raises


def test_disk_rows_stream_the_same_batches(tmp_path, monkeypatch, capsys):
    """`--disk-workers`: plain rows reading an image folder from disk train what the
    in-memory plain row trains (no augmentation: the same batches), with 0 or 1 workers."""
    monkeypatch.setenv("KDKIT_DATA", str(tmp_path / "data"))
    folder = tmp_path / "imgs"
    assert main(["data", "export", "digits", "--format", "imagefolder", "--out",
                 str(folder)]) == 0
    teacher = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[16]", "--data",
                 f"folder:{folder}", "--out", str(teacher), *FAST]) == 0
    spec = BenchSpec(data=f"folder:{folder}", teacher="mlp", student="mlp",
                     student_kwargs={"hidden": [8]}, epochs=2, teacher_run=str(teacher),
                     disk_workers=[0, 1])
    names = [r.name for r in bench_rows(spec)]
    assert names[-2:] == ["plain_disk_w0", "plain_disk_w1"]
    plain = measure(spec, Row("plain", "ce"), tmp_path)
    for w in (0, 1):
        disk = measure(spec, Row(f"plain_disk_w{w}", "ce", stream_workers=w), tmp_path)
        assert disk["val_acc"] == plain["val_acc"]
    fake = [dict(plain, row=r, epoch_s=t) for r, t in (("plain", 1.0), ("plain_disk_w1", 1.25))]
    assert _report(spec, fake)["ratios"]["plain_disk_w1 / plain"] == 1.25
    capsys.readouterr()
    assert main(["bench", "--data", "digits", "--teacher", "mlp", "--student", "mlp",
                 "--disk-workers", "0,1", "--out", str(tmp_path / "b")]) == 2
    assert "'digits' is held in memory; export it" in capsys.readouterr().err
