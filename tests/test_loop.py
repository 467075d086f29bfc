"""The loop: learns, resumes to the identical result, stops cleanly on NaN and Ctrl-C."""

import json
import os
import signal

import pytest
import torch
from torch import nn

from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, Term, build_method
from kdkit.errors import CheckpointError, NonFiniteLossError
from kdkit.losses import CrossEntropy
from kdkit.models import create_model
from kdkit.train.checkpoint import prev_path, read_state
from kdkit.train.loop import CHECKPOINT, LoopSettings, TrainingInterrupted, fit


def _distiller(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    student = create_model("mlp", hidden=[32], dropout=dropout, input_size=8)
    return Distiller(student, {}, build_method("ce", student))


def _loader(digits, seed=0):
    return BatchLoader(digits.train, 64, shuffle=True, seed=seed,
                       augment=build_augment({"shift": 1}, fill=digits.black))


SETTINGS = LoopSettings(epochs=3, lr=0.1, seed=5)


def test_learns_digits(digits):
    d = _distiller()
    res = fit(d, _loader(digits), LoopSettings(epochs=8, lr=0.1), val=(digits.val.x, digits.val.y),
              progress=False)
    assert res.history[-1]["val/acc"] > 85.0
    assert res.history[-1]["train/loss"] < res.history[0]["train/loss"]


def _metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("epoch_s", None)
    return rows


@pytest.mark.parametrize("stop_at", [7, 15, 22])  # mid-epoch 1, at an epoch's end, mid-epoch 2
def test_resume_reaches_identical_weights(digits, tmp_path, stop_at):
    assert len(_loader(digits)) == 15
    full = _distiller()
    fit(full, _loader(digits), SETTINGS, val=(digits.val.x, digits.val.y), run_dir=tmp_path / "a",
        progress=False)

    first = _distiller()
    with pytest.raises(TrainingInterrupted, match="continue with --resume"):
        fit(first, _loader(digits), SETTINGS, val=(digits.val.x, digits.val.y),
            run_dir=tmp_path / "b", progress=False, stop_after=stop_at)
    resumed = _distiller(seed=123)  # a fresh process: different init, all state from disk
    res = fit(resumed, _loader(digits), SETTINGS, val=(digits.val.x, digits.val.y),
              run_dir=tmp_path / "b", resume=True, progress=False)
    assert res.resumed_from is not None
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == _metrics(tmp_path / "b" / "metrics.jsonl")


class NaNAt(nn.Module):
    def __init__(self, step):
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, student, teacher, *, target=None):
        self.calls += 1
        v = student.sum() * 0.0
        return v + float("nan") if self.calls > self.step else v


def test_nan_stops_with_term_and_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    torch.manual_seed(0)
    student = create_model("mlp", hidden=[16], input_size=8)
    d = Distiller(student, {}, [Term("ce", CrossEntropy()), Term("bad", NaNAt(25), 0.1)])
    with pytest.raises(NonFiniteLossError, match="'bad' became nan at step 25 \\(epoch 1\\)"):
        fit(d, _loader(digits), SETTINGS, run_dir=tmp_path, progress=False)
    _, meta = read_state(tmp_path / CHECKPOINT)
    assert (meta["epoch"], meta["step"]) == (1, 0)  # the end of epoch 1, before the NaN


def test_nan_before_any_checkpoint_does_not_claim_one(digits, tmp_path):
    torch.manual_seed(0)
    student = create_model("mlp", hidden=[16], input_size=8)
    d = Distiller(student, {}, [Term("ce", CrossEntropy()), Term("bad", NaNAt(2), 0.1)])
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        fit(d, _loader(digits), SETTINGS, run_dir=tmp_path, progress=False)


def test_ctrl_c_checkpoints_and_resume_completes(digits, tmp_path):
    d = _distiller()

    def interrupt(rec):
        if rec["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    from kdkit.train import loop

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    with pytest.raises(TrainingInterrupted, match="interrupted \\(Ctrl-C\\) at epoch 1 step 1"):
        loop.fit(d, _loader(digits), SETTINGS, run_dir=tmp_path, progress=False,
                 on_epoch=interrupt)
    assert signal.getsignal(signal.SIGINT) is before  # whatever was installed is restored
    full = _distiller()
    fit(full, _loader(digits), SETTINGS, progress=False)
    resumed = _distiller(seed=9)
    fit(resumed, _loader(digits), SETTINGS, run_dir=tmp_path, resume=True, progress=False)
    assert all(torch.equal(a, b) for a, b in
               zip(full.state_dict().values(), resumed.state_dict().values(), strict=True))


def _damage(path, where):
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(digits, tmp_path, capsys):
    full = _distiller()
    fit(full, _loader(digits), SETTINGS, progress=False)
    with pytest.raises(TrainingInterrupted):
        fit(_distiller(), _loader(digits), SETTINGS, run_dir=tmp_path, progress=False,
            stop_after=20)  # checkpoints at the end of epoch 1 (15), then at step 20
    ckpt = tmp_path / CHECKPOINT
    assert read_state(prev_path(ckpt))[1]["epoch"] == 1
    _damage(ckpt, -10)  # a flipped byte in the tensors
    with pytest.raises(CheckpointError, match="corrupt"):
        read_state(ckpt)
    resumed = _distiller(seed=3)
    res = fit(resumed, _loader(digits), SETTINGS, run_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from == (1, 0)
    assert "resuming from the previous checkpoint" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in
               zip(full.state_dict().values(), resumed.state_dict().values(), strict=True))


def test_torn_checkpoint_between_renames_resumes_from_previous(digits, tmp_path):
    """A kill between 'state -> state.prev' and 'tmp -> state' leaves only state.prev."""
    full = _distiller()
    fit(full, _loader(digits), SETTINGS, progress=False)
    with pytest.raises(TrainingInterrupted):
        fit(_distiller(), _loader(digits), SETTINGS, run_dir=tmp_path, progress=False,
            stop_after=20)
    (tmp_path / CHECKPOINT).unlink()
    resumed = _distiller(seed=4)
    res = fit(resumed, _loader(digits), SETTINGS, run_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from == (1, 0)
    assert all(torch.equal(a, b) for a, b in
               zip(full.state_dict().values(), resumed.state_dict().values(), strict=True))


def test_no_readable_checkpoint_is_refused(digits, tmp_path):
    with pytest.raises(TrainingInterrupted):
        fit(_distiller(), _loader(digits), SETTINGS, run_dir=tmp_path, progress=False,
            stop_after=5)
    ckpt = tmp_path / CHECKPOINT
    assert not prev_path(ckpt).exists()
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="no readable checkpoint.*unreadable"):
        fit(_distiller(), _loader(digits), SETTINGS, run_dir=tmp_path, resume=True,
            progress=False)


def test_mismatched_checkpoint_is_refused(digits, tmp_path):
    with pytest.raises(TrainingInterrupted):
        fit(_distiller(), _loader(digits), SETTINGS, run_dir=tmp_path, progress=False,
            stop_after=5)
    torch.manual_seed(0)
    other = create_model("mlp", hidden=[48], input_size=8)
    with pytest.raises(CheckpointError, match="does not match the model.*shape mismatch"):
        fit(Distiller(other, {}, build_method("ce", other)), _loader(digits), SETTINGS,
            run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"another run; loop.lr \(0.1 -> 0.5\)"):
        fit(_distiller(), _loader(digits), LoopSettings(epochs=3, lr=0.5, seed=5),
            run_dir=tmp_path, resume=True, progress=False)


def test_a_kdkit_01_checkpoint_still_resumes(digits, tmp_path):
    """Runs checkpointed by kdkit 0.1 (last.safetensors + last.json) continue after an upgrade."""
    from kdkit.train.checkpoint import save_checkpoint

    full = _distiller()
    fit(full, _loader(digits), SETTINGS, progress=False)
    with pytest.raises(TrainingInterrupted):
        fit(_distiller(), _loader(digits), SETTINGS, run_dir=tmp_path, progress=False,
            stop_after=20)
    tensors, meta = read_state(tmp_path / CHECKPOINT)
    ident = meta.pop("identity")
    meta.update(settings=ident["loop"], steps_per_epoch=ident["steps_per_epoch"])
    save_checkpoint(tmp_path / "checkpoint" / "last", tensors, meta)
    for p in (tmp_path / CHECKPOINT, prev_path(tmp_path / CHECKPOINT)):
        p.unlink()
    resumed = _distiller(seed=7)
    res = fit(resumed, _loader(digits), SETTINGS, run_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from == (1, 5)
    assert all(torch.equal(a, b) for a, b in
               zip(full.state_dict().values(), resumed.state_dict().values(), strict=True))
