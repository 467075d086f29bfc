"""Every registered method: builds, trains its student (and adapters), never its teachers."""

import copy

import pytest
import torch

from kdkit.distill import METHODS, Distiller, build_method, build_stages, method_teachers
from kdkit.errors import KdkitError
from kdkit.models import create_model

X = torch.randn(12, 1, 8, 8)
Y = torch.arange(12) % 4


def _teachers():
    torch.manual_seed(0)
    return {
        "mlp": create_model("mlp", hidden=[24], num_classes=4, input_size=8),
        "cnn": create_model("plain_cnn2", num_classes=4, input_size=8),
        "res": create_model("resnet8", num_classes=4, input_size=8),
    }


def _student():
    torch.manual_seed(1)
    return create_model("mlp", hidden=[16], num_classes=4, input_size=8)


FEATURE = {"hint", "fitnets", "at", "overhaul", "fsp", "nst", "sp", "ab", "vid", "reviewkd", "simkd"}
# Trained without the student's own classifier (SimKD deploys the teacher's): every other
# student parameter must get a gradient.
NO_OWN_HEAD = {"simkd"}


def _kwargs(name):
    return {"weights": [0.5, 0.3, 0.2]} if name == "ensemble_weighted" else {}


def _pair_for(name):
    """Feature methods need a student with stages; the others take a small MLP."""
    teachers = _teachers()
    if name in FEATURE:
        torch.manual_seed(1)
        width = 16 if name == "fsp" else 8  # FSP compares Gram matrices: same widths
        return create_model("resnet", depth=8, width=width, num_classes=4,
                            input_size=8), teachers
    return _student(), teachers


DENSE = ("mse", "dense_kd")


@pytest.mark.parametrize("name", [m for m in METHODS.names()
                                  if m not in ("lm_kd", "seqkd", "lm_features", *DENSE)])
def test_method_trains_student_and_adapters_only(name):
    """(The language-model methods: tests/test_lm.py and test_lm_features.py; the dense
    ones below.)"""
    student, teachers = _pair_for(name)
    count = method_teachers(name)
    chosen = {} if count == "none" else (
        {"res": teachers["res"]} if count == "one" else teachers)
    stages = build_stages(name, student, chosen, example_input=X[:2], **_kwargs(name))
    for i, stage in enumerate(stages):
        _check_one_step(student, chosen, stage.terms, whole=i == len(stages) - 1,
                        skip=("fc.",) if name in NO_OWN_HEAD else ())


@pytest.mark.parametrize("name", DENSE)
def test_dense_method_trains_student_and_adapters_only(name):
    torch.manual_seed(0)
    teacher = create_model("denoiser", input_size=8, width=8)
    student = create_model("denoiser", input_size=8, width=4)
    chosen = {} if name == "mse" else {"t": teacher}
    terms = build_method(name, student, chosen, example_input=X[:2], task="denoise",
                         **({"feature_weight": 0.1} if name == "dense_kd" else {}))
    assert name == "mse" or len(terms) == 7  # mse, output and five stages with connectors
    _check_one_step(student, chosen, terms, whole=True, x=X, y=torch.rand(12, 1, 8, 8))


def _check_one_step(student, chosen, terms, whole, skip=(), x=X, y=Y):
    d = Distiller(student, chosen, terms)
    frozen = {k: [p.clone() for p in t.parameters()] for k, t in chosen.items()}
    opt = torch.optim.SGD(d.parameters(), lr=0.05)
    d.train()
    for p in student.parameters():
        p.grad = None
    d.begin_fit(num_samples=len(X))  # as the loop does (sizes CRD's memory bank)
    out = d(x, y, index=torch.arange(len(x)))  # the batch's sample indices, as the loop's
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    for t in terms:
        assert torch.isfinite(out[t.name]), t.name
    opt.zero_grad()
    out["loss"].backward()
    grads = [p.grad for n, p in student.named_parameters() if not n.startswith(skip)]
    # An initialisation stage (FitNets' hint, AB) trains only the layers below its taps.
    assert not whole or all(g is not None for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for adapter in d.adapters.values():
        assert all(p.grad is not None for p in adapter.parameters())
    opt.step()
    for k, t in chosen.items():
        assert all(p.grad is None for p in t.parameters())
        assert all(torch.equal(a, b) for a, b in zip(frozen[k], t.parameters(), strict=True))


@pytest.mark.parametrize("name", ["ensemble_mean", "ensemble_geometric", "ensemble_confidence",
                                  "ensemble_random", "ensemble_streams"])
def test_ensembles_of_one_teacher_equal_kd(name):
    teacher = _teachers()["cnn"]
    student = _student()
    a = Distiller(student, {"t": teacher}, build_method(name, student, {"t": teacher}))(X, Y)
    b = Distiller(student, {"t": teacher}, build_method("kd", student, {"t": teacher}))(X, Y)
    torch.testing.assert_close(a["loss"], b["loss"])


def test_relational_terms_vanish_when_student_is_the_teacher():
    teacher = _teachers()["res"]
    student = copy.deepcopy(teacher)
    for name, keys in [("rkd", ["rkd_distance", "rkd_angle"]),
                       ("metric_absolute", ["absolute"]), ("metric_relative", ["relative"])]:
        d = Distiller(student, {"t": teacher}, build_method(name, student, {"t": teacher}))
        d.eval()  # same BN statistics on both sides
        out = d(X, Y)
        for k in keys:
            assert out[k].item() == pytest.approx(0.0, abs=1e-5), (name, k)


def test_metric_absolute_adds_projection_for_other_widths():
    teacher = _teachers()["res"]  # 64-d embedding
    student = _student()  # 16-d embedding
    terms = build_method("metric_absolute", student, {"t": teacher})
    d = Distiller(student, {"t": teacher}, terms)
    assert list(d.adapters) == ["absolute"]
    assert d.adapters["absolute"].weight.shape == (64, 16)


def test_method_argument_errors():
    teachers = _teachers()
    student = _student()
    with pytest.raises(KdkitError, match="needs weights: one per teacher \\(3"):
        build_method("ensemble_weighted", student, teachers)
    with pytest.raises(KdkitError, match="exactly one teacher, got 3"):
        build_method("kd", student, teachers)
    with pytest.raises(KdkitError, match="teacher_layers needs one layer per teacher"):
        build_method("ensemble_relative", student, teachers, teacher_layers=["fc"])
    with pytest.raises(KdkitError, match="kd_alpha"):
        build_method("rkd", student, {"res": teachers["res"]}, kd_alpha=2.0)


def test_triplet_kd_terms_and_weights():
    teacher = _teachers()["res"]
    student = _student()
    terms = build_method("triplet_kd", student, {"t": teacher})
    assert [(t.name, t.weight) for t in terms] == [("ce", 1.0), ("kl", 1.0), ("triplet", 2.0)]
    assert terms[1].loss.temperature == 1.0
    assert terms[2].loss.margin == 5.0


def test_rkd_with_kd_has_kd_term():
    teacher = _teachers()["res"]
    student = _student()
    names = [t.name for t in build_method("rkd", student, {"t": teacher}, kd_alpha=0.9)]
    assert names == ["ce", "kd", "rkd_distance", "rkd_angle"]
    weights = {t.name: t.weight for t in build_method("rkd", student, {"t": teacher})}
    assert weights == {"ce": 1.0, "rkd_distance": 25.0, "rkd_angle": 50.0}


def test_ab_stage_weights_are_the_reference_codes_scale():
    """AB's initialisation weights are AB_distillation's (and CRD's): the deepest stage
    3/1000, each shallower one half the next, on the loss summed over elements and averaged
    over the batch. The init stage then learns the teacher's boundaries at lr 0.05 without
    diverging (at weight 1/n the comparison's AB run became NaN at step 14)."""
    student, teachers = _pair_for("ab")
    stages = build_stages("ab", student, {"t": teachers["res"]}, example_input=X[:2])
    init = stages[0].terms
    n = len(init)
    assert n >= 2
    assert [t.weight for t in init] == pytest.approx([3e-3 * 2.0 ** (i - n + 1) for i in range(n)])
    d = Distiller(student, {"t": teachers["res"]}, init)
    opt = torch.optim.SGD(d.parameters(), lr=0.05, momentum=0.9)
    d.train()
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = torch.arange(64) % 4
    losses = []
    for _ in range(60):
        out = d(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
