"""Devices and precision: clear refusals, float32 losses under autocast, bf16/fp16 on the
CPU (fp16 with a GradScaler whose state resumes exactly), and non-finite checks that read
the device only at check points."""

from __future__ import annotations

import pytest
import torch

from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, Term, build_method
from kdkit.errors import KdkitError, NonFiniteLossError
from kdkit.losses import CrossEntropy, KDLoss
from kdkit.models import create_model
from kdkit.taps import LOGITS
from kdkit.train import loop
from kdkit.train.checkpoint import read_state
from kdkit.train.device import Precision, check_precision, resolve_device
from kdkit.train.loop import CHECKPOINT, LoopSettings, TrainingInterrupted, fit
from test_loop import NaNAt  # (tests/ is on the path, as for conftest)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))


@no_gpu
@pytest.mark.parametrize("spec, problem", [
    ("cuda", "device 'cuda': "),
    ("cuda:1", "device 'cuda:1': "),
    ("tpu", "device 'tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "device 'cuda:x' is not a device"),
])
def test_unusable_devices_are_refused_by_name(spec, problem):
    with pytest.raises(KdkitError) as e:
        resolve_device(spec)
    assert str(e.value).startswith(problem)
    if spec.startswith("cuda:") and spec[5:].isdigit():
        assert "use --device cpu (or auto)" in str(e.value)


def test_precision_names_are_checked():
    with pytest.raises(KdkitError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        check_precision("fp8", torch.device("cpu"))
    assert Precision("fp16", torch.device("cpu")).scaler.is_enabled()
    assert not Precision("bf16", torch.device("cpu")).scaler.is_enabled()


def test_losses_compute_in_float32_under_autocast():
    """Under bf16 autocast the KD term takes bf16 logits but computes its softmax and KL in
    float32: the value equals the float32 loss of the same (rounded) logits."""
    torch.manual_seed(0)
    s = torch.randn(16, 10) * 3
    t = torch.randn(16, 10) * 3
    term = Term("kd", KDLoss(temperature=4.0), teacher=LOGITS)
    s16, t16 = s.bfloat16(), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term.compute(s16, t16, None)
    assert value.dtype == torch.float32
    want = KDLoss(temperature=4.0)(s16.float(), t16.float())
    assert torch.equal(value, want)
    # without the cast, the CPU's autocast leaves log-softmax in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.log_softmax(s16, 1).dtype == torch.bfloat16


def _kd(digits, seed=0, dropout=0.1):
    torch.manual_seed(11)
    teacher = create_model("mlp", hidden=[64], input_size=8)
    torch.manual_seed(seed)
    student = create_model("mlp", hidden=[32], input_size=8, dropout=dropout)
    return Distiller(student, {"teacher": teacher}, build_method("kd", student, {"teacher": teacher}))


def _loader(digits):
    return BatchLoader(digits.train, 64, shuffle=True, seed=2,
                       augment=build_augment({"shift": 1}, fill=digits.black))


def test_bf16_on_the_cpu_learns_and_keeps_float32_weights(digits):
    d = Distiller(create_model("mlp", hidden=[32], input_size=8), {},
                  [Term("ce", CrossEntropy())])
    res = fit(d, _loader(digits), LoopSettings(epochs=6, lr=0.1, precision="bf16", device="cpu"),
              val=(digits.val.x, digits.val.y), progress=False)
    assert res.history[-1]["val/acc"] > 80.0
    assert all(p.dtype == torch.float32 for p in d.parameters())


def test_fp16_resume_is_exact_with_the_scaler_state(digits, tmp_path):
    settings = LoopSettings(epochs=2, lr=0.1, precision="fp16", device="cpu", seed=4)
    full = _kd(digits)
    fit(full, _loader(digits), settings, progress=False)
    with pytest.raises(TrainingInterrupted):
        fit(_kd(digits), _loader(digits), settings, run_dir=tmp_path, progress=False,
            stop_after=30)
    _, meta = read_state(tmp_path / CHECKPOINT)
    assert meta["scaler"]["scale"] > 0 and "_growth_tracker" in meta["scaler"]
    resumed = _kd(digits, seed=5)
    fit(resumed, _loader(digits), settings, run_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_precision_is_part_of_a_run_device_is_not(digits, tmp_path):
    settings = LoopSettings(epochs=2, lr=0.1, device="cpu")
    with pytest.raises(TrainingInterrupted):
        fit(_kd(digits), _loader(digits), settings, run_dir=tmp_path, progress=False,
            stop_after=5)
    with pytest.raises(KdkitError, match='loop.precision \\("<absent>" -> "bf16"\\)'):
        fit(_kd(digits), _loader(digits), LoopSettings(epochs=2, lr=0.1, precision="bf16"),
            run_dir=tmp_path, resume=True, progress=False)
    fit(_kd(digits), _loader(digits), LoopSettings(epochs=2, lr=0.1, device="auto"),
        run_dir=tmp_path, resume=True, progress=False)  # another device spec: resumes


def test_deferred_check_names_the_first_bad_step_and_keeps_the_good_checkpoint(
        digits, tmp_path, monkeypatch):
    """Off one CPU the flags are read every CHECK_EVERY steps: a NaN at step 25 is found at
    the read after it, named by term and step, and no checkpoint is written after it."""
    monkeypatch.setattr(loop, "check_interval", lambda device, world: 4)
    reads = []
    real_check = loop._Meter.check

    def counting(self, *a, **k):
        reads.append(1)
        return real_check(self, *a, **k)

    monkeypatch.setattr(loop._Meter, "check", counting)
    torch.manual_seed(0)
    student = create_model("mlp", hidden=[16], input_size=8)
    d = Distiller(student, {}, [Term("ce", CrossEntropy()), Term("bad", NaNAt(25), 0.1)])
    with pytest.raises(NonFiniteLossError, match="'bad' became nan at step 25 \\(epoch 1\\)"):
        fit(d, _loader(digits), LoopSettings(epochs=3, lr=0.1), run_dir=tmp_path,
            progress=False)
    _, meta = read_state(tmp_path / CHECKPOINT)
    assert (meta["epoch"], meta["step"]) == (1, 0)
    # 23 steps an epoch; reads after steps 3, 7, 11, 15, 19, the epoch's end (22), then
    # epoch 2's step 3 (global 26) finds the NaN of global step 25: 7 reads for 27 steps
    assert len(reads) == 7


# ----------------------------------------------------------- on the device under test
# (`pytest --device cuda tests/test_device.py` on a GPU machine: scripts/gpu_check.sh)


def test_training_on_the_device_matches_the_cpu(digits, device):
    """KD on an MLP computes on the device (data placed there once) and reaches the CPU's
    weights to float tolerance. No dropout: a GPU draws its masks from its own generator, so
    only the data order and augmentation (drawn on the CPU) are the same on both."""
    settings = LoopSettings(epochs=2, lr=0.1, seed=1, device="cpu")  # not "auto": a GPU is seen
    on_cpu, there = _kd(digits, dropout=0.0), _kd(digits, dropout=0.0)
    fit(on_cpu, _loader(digits), settings, progress=False)
    loader = _loader(digits)
    fit(there, loader, LoopSettings(epochs=2, lr=0.1, seed=1, device=str(device)),
        val=(digits.val.x, digits.val.y), progress=False)
    assert loader._x.device.type == device.type  # the dataset moved there once
    assert next(there.parameters()).device.type == device.type
    for (k, a), b in zip(on_cpu.state_dict().items(), there.state_dict().values(), strict=True):
        gap = (a - b.cpu()).abs().max().item()
        print(f"{k}: max |cpu - {device.type}| = {gap:.2e} (max |w| {a.abs().max().item():.2e})")
        assert torch.allclose(a, b.cpu(), atol=1e-4), f"{k}: {gap:.2e}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_on_the_device_is_exact(digits, device, precision, tmp_path):
    settings = LoopSettings(epochs=2, lr=0.1, seed=4, device=str(device), precision=precision)
    full = _kd(digits)
    fit(full, _loader(digits), settings, progress=False)
    with pytest.raises(TrainingInterrupted):
        fit(_kd(digits), _loader(digits), settings, run_dir=tmp_path, progress=False,
            stop_after=30)
    resumed = _kd(digits, seed=5)
    fit(resumed, _loader(digits), settings, run_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_teacher_cache_on_the_device_equals_the_live_teacher(digits, device, tmp_path):
    from kdkit.train.teacher_cache import CacheSettings, TeacherCache

    settings = LoopSettings(epochs=1, lr=0.1, seed=2, device=str(device))
    aug = build_augment({"shift": 1}, fill=digits.black)
    live, cached = _kd(digits), _kd(digits)
    fit(live, BatchLoader(digits.train, 64, shuffle=True, seed=2, augment=aug, views=2),
        settings, progress=False)
    cached.to(device)
    cache = TeacherCache.open_or_build(tmp_path, cached, digits.train, aug,
                                       CacheSettings(views=2, dtype="float32"))
    fit(cached, BatchLoader(digits.train, 64, shuffle=True, seed=2, augment=aug, views=2),
        settings, progress=False, teacher_cache=cache)
    for a, b in zip(live.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_run_precision_sets_every_training_section_and_is_part_of_the_config(
        tmp_path, monkeypatch, capsys):
    from kdkit.cli import main

    monkeypatch.chdir(tmp_path)
    small = ["--set", "seeds=[0]", "--set", "train.epochs=2", "--set", "teacher.train.epochs=1",
             "--no-cache", "--no-progress", "--out", "x"]
    assert main(["run", "--precision", "bf16", *small]) == 0
    text = (tmp_path / "x" / "config.yaml").read_text()
    assert text.count("precision: bf16") == 2  # the teacher's and the students' training
    capsys.readouterr()
    assert main(["run", *small, "--resume"]) == 2  # fp32 now: another experiment
    assert "differs from the config given now" in capsys.readouterr().err
    assert main(["run", "--precision", "bf16", *small, "--resume"]) == 0


def test_a_streamed_dataset_trains_on_the_device_as_in_memory(digits, device):
    """DatasetLoader (DataLoader workers, pinned memory on a GPU) delivers the in-memory
    loader's batches to the device: the same training, to float tolerance."""
    from torch.utils.data import TensorDataset

    from kdkit.data.stream import DatasetLoader

    settings = LoopSettings(epochs=2, lr=0.1, seed=1, device=str(device))
    a, b = _kd(digits, dropout=0.0), _kd(digits, dropout=0.0)
    fit(a, BatchLoader(digits.train, 64, shuffle=True, seed=2), settings, progress=False)
    fit(b, DatasetLoader(TensorDataset(digits.train.x, digits.train.y), 64, seed=2,
                         num_workers=1), settings, progress=False)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert x.device.type == device.type
        assert torch.allclose(x, y, atol=1e-6)
