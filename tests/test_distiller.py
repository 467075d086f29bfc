"""Distiller contract: trainable = student + adapters; teachers frozen; loss = Σ w·term."""

import pytest
import torch
from torch import nn

from kdkit.distill import Distiller, Term, build_method
from kdkit.errors import KdkitError
from kdkit.losses import CrossEntropy, KDLoss
from kdkit.taps import LOGITS, Tap


class MSE(nn.Module):
    """Plain L2 in the kdkit loss signature."""

    def forward(self, student, teacher, *, target=None):
        return ((student - teacher) ** 2).mean()


def _models():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5),
                            nn.Linear(32, 3))
    return student, teacher


def test_only_student_and_adapters_are_trainable():
    student, teacher = _models()
    adapter = nn.Linear(8, 32)
    terms = build_method("kd", student, {"teacher": teacher}) + [
        Term("hint", MSE(), 0.5, Tap("2"), Tap("2"), adapter=adapter)
    ]
    d = Distiller(student, {"teacher": teacher}, terms)
    names = {n for n, _ in d.named_parameters()}
    assert names == {f"student.{n}" for n, _ in student.named_parameters()} | {
        f"adapters.hint.{n}" for n, _ in adapter.named_parameters()
    }
    assert not any(k.startswith("_teachers") for k in d.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_step_updates_student_and_adapter_never_teacher():
    student, teacher = _models()
    adapter = nn.Linear(8, 32)
    terms = build_method("kd", student, {"teacher": teacher}) + [
        Term("hint", MSE(), 0.5, Tap("2"), Tap("2"), adapter=adapter)
    ]
    d = Distiller(student, {"teacher": teacher}, terms)
    before_t = [p.clone() for p in teacher.parameters()]
    before_a = adapter.weight.clone()
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    d.train()
    assert not teacher.training  # teacher stays in eval mode (no dropout)
    out = d(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters(), strict=True))
    assert not torch.equal(before_a, adapter.weight)


def test_loss_is_weighted_sum_and_values_are_unweighted():
    student, teacher = _models()
    d = Distiller(student, {"teacher": teacher}, build_method(
        "kd", student, {"teacher": teacher}, temperature=3.0, alpha=0.7))
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    out = d(x, y)
    assert set(out) == {"loss", "logits", "ce", "kd"}
    zs, zt = student(x), teacher(x)
    kd = KDLoss(3.0)(zs, zt)
    ce = CrossEntropy()(zs, None, target=y)
    torch.testing.assert_close(out["kd"], kd.detach())
    torch.testing.assert_close(out["loss"], 0.7 * kd + 0.3 * ce)


def test_scheduled_weight_uses_explicit_progress():
    student, _ = _models()
    term = Term("ce", CrossEntropy(), weight=lambda p: 4.0 - 3.0 * p)
    d = Distiller(student, {}, [term])
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    a = d(x, y, progress=0.0)
    b = d(x, y, progress=1.0)
    torch.testing.assert_close(a["loss"], 4.0 * a["ce"])
    torch.testing.assert_close(b["loss"], 1.0 * b["ce"])


def test_to_moves_teachers_too():
    student, teacher = _models()
    d = Distiller(student, {"teacher": teacher}, build_method("kd", student, {"teacher": teacher}))
    d.double()
    assert next(teacher.parameters()).dtype == torch.float64
    out = d(torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1]))
    assert out["loss"].dtype == torch.float64


def test_teacher_train_mode_is_available():
    student, teacher = _models()
    d = Distiller(student, {"teacher": teacher}, build_method("kd", student, {"teacher": teacher}),
                  teacher_mode="train")
    d.train()
    assert teacher.training
    d.eval()
    assert not teacher.training


def test_errors_are_clear():
    student, teacher = _models()
    with pytest.raises(KdkitError, match="needs a teacher|distils from a teacher"):
        build_method("kd", student, {})
    with pytest.raises(KdkitError, match="no argument 'temp'"):
        build_method("kd", student, {"teacher": teacher}, temp=3)
    with pytest.raises(KdkitError, match="unknown method 'kdd'.*'kd'"):
        build_method("kdd", student, {"teacher": teacher})
    with pytest.raises(KdkitError, match="duplicate term names"):
        Distiller(student, {}, [Term("ce", CrossEntropy()), Term("ce", CrossEntropy())])
    with pytest.raises(KdkitError, match="reads teacher 'teacher'"):
        Distiller(student, {}, [Term("kd", KDLoss(), 1.0, LOGITS, LOGITS)])
    with pytest.raises(KdkitError, match="alpha"):
        build_method("kd", student, {"teacher": teacher}, alpha=1.5)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    d = Distiller(student, {"teacher": wide}, build_method("kd", student, {"teacher": wide}))
    with pytest.raises(KdkitError, match="same number of classes"):
        d(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))


def test_teacher_train_mode_never_changes_the_teacher():
    """Batch statistics in train mode, but running statistics (and weights) untouched."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 2 * 2, 3))
    student, _ = _models()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(student, {"teacher": teacher}, build_method("kd", student,
                                                              {"teacher": teacher}),
                  teacher_mode="train")
    d.train()
    x = torch.randn(8, 1, 4, 4) * 3 + 1
    out = d(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    out["loss"].backward()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # and the teacher really used batch statistics (differs from eval-mode outputs)
    with torch.no_grad():
        train_logits = d.teacher_outputs(x)["teacher"]["<model>:output"]
        teacher.eval()
        eval_logits = teacher(x)
    assert not torch.allclose(train_logits, eval_logits)
