"""MLKD (METHODS.md §8): the levels by hand, the confidence masks, the strong view drawn in
the step, the contract (only the student trains, resume is exact), and the refusals (the
teacher cache, non-image inputs)."""

import math

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.config import validate_semantics
from kdkit.data.augment import build_augment
from kdkit.data.loader import derive_seed
from kdkit.distill import Distiller, build_method
from kdkit.distill.methods_mlkd import DEFAULT_STRONG_AUGMENT, StrongView
from kdkit.distill.term import StepInfo
from kdkit.errors import KdkitError
from kdkit.losses.logit import standardize_logits
from kdkit.losses.mlkd import (
    MLKDLoss,
    batch_gram_loss,
    class_confidence_mask,
    class_gram_loss,
    confidence_mask,
    instance_kd,
    mlkd_parts,
)
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, TrainingInterrupted, fit
from kdkit.train.teacher_cache import CacheSettings, TeacherCache
from methods_reference import Z_S, Z_T
from methods_reference import metric_rows as _rows
from methods_reference import shift_loader as _loader

# a "strong view" pair: the same rows, perturbed
Z_S2 = Z_S.flip(1) * 0.7 + 0.1
Z_T2 = Z_T * 0.5 - 0.2
TEMPS = (2.0, 3.0, 4.0, 5.0, 6.0)


def _softmax(z, t=1.0):
    e = np.exp(np.asarray(z) / t)
    return e / e.sum(axis=1, keepdims=True)


def _kl_rows(s, t, temp):
    """T²·KL(p_t ‖ p_s) per sample, written out."""
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    return [temp**2 * sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(ps.shape[1]))
            for i in range(ps.shape[0])]


def _gram_by_hand(s, t, temp, keep, classes):
    """Σ keep_row·(G_t − G_s)² / n, G over samples (classes=False) or classes (True)."""
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    if classes:
        ps, pt = ps.T, pt.T  # rows are classes
    n = ps.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            gs = sum(ps[i, k] * ps[j, k] for k in range(ps.shape[1]))
            gt = sum(pt[i, k] * pt[j, k] for k in range(pt.shape[1]))
            total += keep[i] * (gt - gs) ** 2
    return total / n


def _median_keep(values):
    return [bool(v >= np.percentile(values, 50)) for v in values]


# --------------------------------------------------------------------------- the levels


def test_instance_level_by_hand():
    for temp in TEMPS:
        torch.testing.assert_close(instance_kd(Z_S, Z_T, temp),
                                   torch.tensor(_kl_rows(Z_S, Z_T, temp), dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_batch_and_class_levels_by_hand():
    keep = [True, False, True, True]
    for temp in (2.0, 4.0):
        assert batch_gram_loss(Z_S, Z_T, temp).item() == pytest.approx(
            _gram_by_hand(Z_S, Z_T, temp, [1] * 4, classes=False), abs=1e-12)
        assert batch_gram_loss(Z_S, Z_T, temp, torch.tensor(keep)).item() == pytest.approx(
            _gram_by_hand(Z_S, Z_T, temp, keep, classes=False), abs=1e-12)
        assert class_gram_loss(Z_S, Z_T, temp).item() == pytest.approx(
            _gram_by_hand(Z_S, Z_T, temp, [1] * 4, classes=True), abs=1e-12)
        assert class_gram_loss(Z_S, Z_T, temp, torch.tensor(keep)).item() == pytest.approx(
            _gram_by_hand(Z_S, Z_T, temp, keep, classes=True), abs=1e-12)


def test_mlkd_total_by_hand():
    conf = _softmax(Z_T).max(axis=1)
    keep = _median_keep(conf)
    keep_cls = _median_keep(_softmax(Z_T).sum(axis=0))
    inst = batch = cls = 0.0
    for temp in TEMPS:
        weak = _kl_rows(Z_S, Z_T, temp)
        inst += sum(k * v for k, v in zip(keep, weak, strict=True)) / 4
        inst += sum(_kl_rows(Z_S2, Z_T2, temp)) / 4  # the strong view: every sample
        batch += _gram_by_hand(Z_S, Z_T, temp, keep, classes=False)
        cls += _gram_by_hand(Z_S, Z_T, temp, keep_cls, classes=True)
    parts = mlkd_parts(Z_S, Z_S2, Z_T, Z_T2, TEMPS)
    assert parts["instance"].item() == pytest.approx(inst, abs=1e-10)
    assert parts["batch"].item() == pytest.approx(batch, abs=1e-10)
    assert parts["class"].item() == pytest.approx(cls, abs=1e-10)
    assert parts["kept"].item() == 0.5
    loss = MLKDLoss(TEMPS)
    value = loss([Z_S, Z_S2], [Z_T, Z_T2])
    assert value.item() == pytest.approx(inst + batch + cls, abs=1e-10)
    assert set(loss.metrics()) == {"instance", "batch", "class", "kept"}


def test_logit_standardization_applies_to_the_instance_level_only():
    with_ls = mlkd_parts(Z_S, Z_S2, Z_T, Z_T2, logit_standardization=True)
    plain = mlkd_parts(Z_S, Z_S2, Z_T, Z_T2)
    # the mask comes from the raw teacher logits (standardizing changes the confidences)
    keep = confidence_mask(Z_T).double()
    assert not torch.equal(confidence_mask(standardize_logits(Z_T)).double(), keep)
    sw, ss, tw, ts = (standardize_logits(z) for z in (Z_S, Z_S2, Z_T, Z_T2))
    by_hand = sum((instance_kd(sw, tw, t) * keep).mean() + instance_kd(ss, ts, t).mean()
                  for t in TEMPS)
    torch.testing.assert_close(with_ls["instance"], by_hand)
    torch.testing.assert_close(with_ls["batch"], plain["batch"])
    torch.testing.assert_close(with_ls["class"], plain["class"])
    # invariant to an affine change of the student's logits (a > 0)
    moved = mlkd_parts(3.0 * Z_S + 1.0, 2.0 * Z_S2 - 4.0, Z_T, Z_T2, logit_standardization=True)
    torch.testing.assert_close(moved["instance"], with_ls["instance"])


def test_confidence_mask_keeps_exactly_the_samples_at_or_above_the_median():
    torch.manual_seed(0)
    for b in (4, 5, 8, 9):
        z = torch.randn(b, 6, dtype=torch.float64) * 2
        conf = torch.softmax(z, 1).amax(1).numpy()
        expected = conf >= np.percentile(conf, 50)
        assert confidence_mask(z).tolist() == expected.tolist()
        assert int(expected.sum()) == math.ceil(b / 2)  # no ties: the upper half (+ the median)
    # ties at the median are kept
    z = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    assert confidence_mask(z).tolist() == [True, True, True, False]
    # the fixed logits: confidences 0.898, 0.708, 0.741, 0.831 -> rows 0 and 3 are kept
    assert confidence_mask(Z_T).tolist() == [True, False, False, True]
    mass = torch.softmax(Z_T, 1).sum(0).numpy()
    assert class_confidence_mask(Z_T).tolist() == (mass >= np.percentile(mass, 50)).tolist()


# ------------------------------------------------------------------------ the strong view


def test_strong_view_is_a_function_of_the_step_seed_and_the_samples():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    index = torch.tensor([4, 9, 0, 17, 3, 8])
    view = StrongView(build_augment(DEFAULT_STRONG_AUGMENT))
    seed = derive_seed(5, 0, 3, 3)  # (run seed, epoch, step, the terms' stream) as the loop
    a = view(x, StepInfo(index=index, seed=seed))
    assert a.shape == x.shape
    assert torch.equal(a, view(x, StepInfo(index=index, seed=seed)))
    assert not torch.equal(a, x)
    assert not torch.equal(a, view(x, StepInfo(index=index, seed=derive_seed(5, 0, 4, 3))))
    # a sample's view depends on the sample, not on where it sits in the batch
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    torch.testing.assert_close(view(x[perm], StepInfo(index=index[perm], seed=seed)), a[perm])
    # without indices: one generator for the batch, seeded by the step
    b = view(x, StepInfo(seed=seed))
    assert torch.equal(b, view(x, StepInfo(seed=seed))) and not torch.equal(b, x)


def _pair(seed=1, teacher_seed=0, teacher_mode="eval", **kw):
    torch.manual_seed(teacher_seed)
    teacher = create_model("plain_cnn4", input_size=8).eval()
    torch.manual_seed(seed)
    student = create_model("plain_cnn2", input_size=8)
    terms = build_method("mlkd", student, {"teacher": teacher},
                         example_input=torch.zeros(2, 1, 8, 8), **kw)
    return Distiller(student, {"teacher": teacher}, terms, teacher_mode=teacher_mode)


def test_student_and_teacher_see_the_weak_and_the_strong_view():
    d = _pair()
    seen = {"student": [], "teacher": []}
    d.student.register_forward_hook(lambda m, i, o: seen["student"].append(i[0].clone()))
    d.teachers["teacher"].register_forward_hook(
        lambda m, i, o: seen["teacher"].append(i[0].clone()))
    torch.manual_seed(3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    index = torch.arange(8)
    out = d(x, y, index=index, seed=11)
    assert [len(v) for v in seen.values()] == [2, 2]
    weak, strong = seen["student"]
    assert torch.equal(weak, x) and not torch.equal(strong, x)
    assert torch.equal(seen["teacher"][0], x) and torch.equal(seen["teacher"][1], strong)
    expected = StrongView(build_augment(DEFAULT_STRONG_AUGMENT))(x, StepInfo(index=index,
                                                                             seed=11))
    assert torch.equal(strong, expected)
    d(x, y, index=index, seed=11)
    assert torch.equal(seen["student"][3], strong)  # the same step: the same view
    assert out["logits"].shape == (8, 10)
    assert {"ce", "mlkd", "mlkd/instance", "mlkd/batch", "mlkd/class", "mlkd/kept"} <= set(out)


@pytest.mark.parametrize("teacher_mode", ["eval", "train"])
def test_a_step_changes_the_student_only(teacher_mode):
    d = _pair(teacher_mode=teacher_mode)
    teacher = d.teachers["teacher"]
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = {k: v.clone() for k, v in d.student.state_dict().items()}
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    torch.manual_seed(4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    d.train()
    out = d(x, y, index=torch.arange(16), seed=7)
    opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.training == (teacher_mode == "train")
    opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k  # weights and BN statistics alike
    assert any(not torch.equal(v, s_state[k]) for k, v in d.student.state_dict().items())
    # the objective: 0.1·(CE weak + CE strong) + 0.9·MLKD
    assert out["loss"].item() == pytest.approx(0.1 * out["ce"].item() + 0.9 * out["mlkd"].item(),
                                               rel=1e-6)




def test_mlkd_resume_is_exact(digits, tmp_path):
    settings = LoopSettings(epochs=2, lr=0.05, seed=5)
    full = _pair()
    fit(full, _loader(digits), settings, run_dir=tmp_path / "a", progress=False)
    part = _pair()
    with pytest.raises(TrainingInterrupted):
        fit(part, _loader(digits), settings, run_dir=tmp_path / "b", progress=False,
            stop_after=22)
    again = _pair(seed=77)  # a fresh process: other init, everything from the checkpoint
    fit(again, _loader(digits), settings, run_dir=tmp_path / "b", resume=True, progress=False)
    sa, sb = full.state_dict(), again.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    rows = _rows(tmp_path / "a" / "metrics.jsonl")
    assert rows == _rows(tmp_path / "b" / "metrics.jsonl")
    kept = [r["train/mlkd/kept"] for r in rows if "train/mlkd/kept" in r]
    assert len(kept) == 2 and all(0.4 < k <= 0.6 for k in kept), rows


# ---------------------------------------------------------------------------- refusals


def test_the_teacher_cache_is_refused_clearly(digits, tmp_path):
    d = _pair()
    with pytest.raises(KdkitError, match="teacher-output cache cannot hold"):
        TeacherCache.open_or_build(tmp_path / "cache", d, digits.train, None, CacheSettings())
    with pytest.raises(KdkitError, match="teacher-output cache cannot hold"):
        fit(d, _loader(digits), LoopSettings(epochs=1), progress=False,
            teacher_cache=object())  # refused before the cache is touched
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(KdkitError, match="teacher-output cache cannot hold"):
        d(x, y, teacher_outputs={"teacher": {"": torch.zeros(4, 10)}})
    # a config is refused before anything trains
    raw = {"data": {"name": "digits"}, "teacher": {"model": {"name": "plain_cnn4"}},
           "train": {"teacher_cache": True},
           "students": [{"label": "m", "model": {"name": "plain_cnn2"},
                         "method": {"name": "mlkd"}}]}
    problems = validate_semantics(raw)
    assert any("mlkd" in p and "teacher_cache" in p for p in problems), problems


def test_non_images_and_bad_arguments_are_refused():
    torch.manual_seed(0)
    teacher, student = create_model("mlp", hidden=[8], input_size=8), create_model(
        "mlp", hidden=[4], input_size=8)
    with pytest.raises(KdkitError, match="images only"):
        build_method("mlkd", student, {"teacher": teacher}, example_input=torch.zeros(2, 64))
    with pytest.raises(KdkitError, match="images only"):
        StrongView(build_augment(DEFAULT_STRONG_AUGMENT))(torch.zeros(2, 64), StepInfo(seed=1))
    with pytest.raises(KdkitError, match="temperatures"):
        build_method("mlkd", student, {"teacher": teacher}, temperatures=[2.0, 0.0])
    with pytest.raises(KdkitError, match="augments nothing"):
        build_method("mlkd", student, {"teacher": teacher}, strong_augment={"hflip": False})
    with pytest.raises(KdkitError, match="unknown augmentation"):
        build_method("mlkd", student, {"teacher": teacher}, strong_augment={"blur": 3})


def test_kdkit_methods_lists_mlkd_with_its_paper(capsys):
    assert main(["methods"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "mlkd" in ln)
    assert "Jin et al., CVPR 2023" in line
