"""The contracts every method of issue 13 keeps, one parametrised test each (the issue's
"usual contract tests"):

* a step sends gradients to the student and the method's trainable parts (adapters, the
  losses' own modules: CTKD's temperature, CRD's heads) and never to the teacher, whose
  weights and BatchNorm statistics stay as they were;
* a run interrupted mid-epoch and resumed in a fresh process ends on bit-for-bit the
  weights (and the metrics) of the uninterrupted run;
* a run reading the teacher-output cache gives the live teacher's losses (every method here
  reads only teacher taps in eval mode, so each can be cached: the cache's one refusal, a
  teacher in train mode, is checked too).

Logit methods run on MLPs, feature methods on a resnet14 → thin resnet8 pair, all on a
256-sample slice of digits (8 steps an epoch)."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, build_method
from kdkit.errors import KdkitError
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, TrainingInterrupted, fit
from kdkit.train.teacher_cache import CacheSettings, TeacherCache

EPOCHS = 2
# case -> (method, its arguments, "logit" (MLP pair) or "feature" (CNN pair)). Warm-ups and
# curricula span the run, so resume and the cache are checked while the weights move.
CASES: dict[str, tuple[str, dict, str]] = {
    "dkd": ("dkd", {"warmup_epochs": 1.0}, "logit"),
    "dkd_ls": ("dkd", {"warmup_epochs": 1.0, "logit_standardization": True}, "logit"),
    "kd_ls": ("kd", {"logit_standardization": True}, "logit"),
    "dist": ("dist", {}, "logit"),
    "nkd": ("nkd", {}, "logit"),
    "cc": ("cc", {}, "logit"),
    "ctkd": ("ctkd", {"curriculum_epochs": 2}, "logit"),
    "ctkd_instance_dkd_ls": ("ctkd", {"mode": "instance", "base": "dkd", "warmup_epochs": 1.0,
                                      "curriculum_epochs": 2, "logit_standardization": True},
                             "logit"),
    "crd": ("crd", {"negatives": 32}, "logit"),
    "crd_kd": ("crd", {"negatives": 32, "kd_alpha": 0.5}, "logit"),
    "vid": ("vid", {}, "feature"),
    "reviewkd": ("reviewkd", {"warmup_epochs": 1.0}, "feature"),
    "simkd": ("simkd", {}, "feature"),
}
# Trained without the student's own classifier (SimKD deploys the teacher's).
NO_OWN_HEAD = {"simkd"}


def _teacher(kind):
    torch.manual_seed(0)
    if kind == "logit":
        return create_model("mlp", hidden=[48], input_size=8).eval()
    return create_model("resnet14", input_size=8).eval()


def _student(kind):
    if kind == "logit":
        return create_model("mlp", hidden=[16], input_size=8)
    return create_model("resnet", depth=8, width=8, input_size=8)


def _make(case, teacher, seed=1, teacher_mode="eval"):
    method, kw, kind = CASES[case]
    torch.manual_seed(seed)
    s = _student(kind)
    terms = build_method(method, s, {"teacher": teacher}, example_input=torch.zeros(2, 1, 8, 8),
                         epochs=EPOCHS, **kw)
    return Distiller(s, {"teacher": teacher}, terms, teacher_mode=teacher_mode)


@pytest.fixture(scope="module")
def small(digits):
    """256 training samples: 8 batches of 32 an epoch."""
    return digits.train.subset(torch.arange(256))


def _loader(data, black, views=None):
    return BatchLoader(data, 32, shuffle=True, seed=4, views=views,
                       augment=build_augment({"shift": 1}, fill=black))


def _rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("epoch_s", None)
    return rows


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_student_and_method_parts_only(case, small):
    kind = CASES[case][2]
    teacher = _teacher(kind)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = _make(case, teacher)
    x, y = small.x[:16], small.y[:16]
    d.train()
    d.begin_fit(num_samples=len(small))  # as the loop does (CRD's bank)
    out = d(x, y, progress=1.0, index=torch.arange(16) * 3, seed=0)  # after any warm-up
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    out["loss"].backward()
    skip = ("fc.",) if case in NO_OWN_HEAD else ()
    for n, p in d.student.named_parameters():
        if not n.startswith(skip):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    parts = [*d.adapters.named_parameters(prefix="adapters"),
             *d.losses.named_parameters(prefix="losses")]
    if kind == "feature" or case == "cc" or case.startswith(("ctkd", "crd")):
        assert parts, "the method has trainable parts"
    for n, p in parts:
        assert p.grad is not None, n
    # what is trained is the student and those parts; nothing of the teacher
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for p in d.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    torch.optim.SGD(d.parameters(), lr=0.1).step()
    for _ in range(2):  # more train-mode steps: the teacher's BN statistics stay
        d(x, y, progress=1.0, index=torch.arange(16), seed=1)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k


# ------------------------------------------------------------------------- resume


@pytest.mark.parametrize("case", CASES)
def test_resume_is_exact(case, small, digits, tmp_path):
    teacher = _teacher(CASES[case][2])
    settings = LoopSettings(epochs=EPOCHS, lr=0.05, seed=5)
    full = _make(case, teacher)
    fit(full, _loader(small, digits.black), settings, run_dir=tmp_path / "a", progress=False)
    part = _make(case, teacher)
    with pytest.raises(TrainingInterrupted):  # mid-epoch 2 (8 steps an epoch)
        fit(part, _loader(small, digits.black), settings, run_dir=tmp_path / "b",
            progress=False, stop_after=11)
    again = _make(case, teacher, seed=77)  # a fresh process: other init, all from disk
    res = fit(again, _loader(small, digits.black), settings, run_dir=tmp_path / "b",
              resume=True, progress=False)
    assert res.resumed_from is not None
    sa, sb = full.state_dict(), again.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _rows(tmp_path / "a" / "metrics.jsonl") == _rows(tmp_path / "b" / "metrics.jsonl")


# -------------------------------------------------------------------------- cache


@pytest.mark.parametrize("case", CASES)
def test_cached_run_gives_the_live_losses(case, small, digits, tmp_path):
    teacher = _teacher(CASES[case][2])
    settings = LoopSettings(epochs=EPOCHS, lr=0.05, seed=3, log_every=2)
    loader = _loader(small, digits.black, views=2)
    live = _make(case, teacher)
    res_live = fit(live, loader, settings, run_dir=tmp_path / "live", progress=False)
    cached = _make(case, teacher)
    assert cached.teacher_taps  # reads the teacher: a cache has something to store
    cache = TeacherCache.open_or_build(tmp_path / "cache", cached, small, loader.augment,
                                       CacheSettings(views=2, dtype="float32"))
    res_cached = fit(cached, loader, settings, run_dir=tmp_path / "cached", progress=False,
                     teacher_cache=cache)
    rows_live = _rows(tmp_path / "live" / "metrics.jsonl")
    rows_cached = _rows(tmp_path / "cached" / "metrics.jsonl")
    assert len(rows_live) == len(rows_cached) >= 8
    for a, b in zip(rows_live, rows_cached, strict=True):
        assert ("train/loss" in a) == ("train/loss" in b)
        if "train/loss" in a:
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4, abs=1e-6)
    keys = [k for k in res_live.history[-1] if k.startswith("train/")]
    assert any(k != "train/loss" and k != "train/ce" for k in keys)
    for k in keys:
        assert res_cached.history[-1][k] == pytest.approx(res_live.history[-1][k], rel=1e-4,
                                                          abs=1e-6), k
    for (n, p), q in zip(live.state_dict().items(), cached.state_dict().values(), strict=True):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=n)
        else:
            assert torch.equal(p, q), n


@pytest.mark.parametrize("case", ["dkd", "simkd"])
def test_cache_refuses_a_teacher_in_train_mode(case, small, digits, tmp_path):
    d = _make(case, _teacher(CASES[case][2]), teacher_mode="train")
    with pytest.raises(KdkitError, match="teacher_mode 'eval'"):
        TeacherCache.open_or_build(tmp_path / "cache", d, small, None, CacheSettings(views=1))
