"""VID, ReviewKD and SimKD (METHODS.md §8): losses against hand computations, the ABF
stack's shapes, the warm-up, gradients, and SimKD's deployed student through a run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from kdkit.distill import METHODS, Distiller, build_method
from kdkit.distill.methods_feature2 import (
    ReviewFusion,
    SimKDProjector,
    SimKDStudent,
    deploy_simkd,
)
from kdkit.errors import KdkitError
from kdkit.losses.review import HCLLoss, hcl_loss, hcl_stage
from kdkit.losses.vid import VIDLoss, VIDRegressor, vid_loss
from kdkit.models import count_parameters, create_model

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def _pair():
    """resnet20 (widths 16, 32, 64) teaching a thinner resnet8 (8, 16, 32) on 3x32x32."""
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10, in_channels=3, input_size=32).eval()
    student = create_model("resnet", depth=8, width=8, num_classes=10, in_channels=3,
                           input_size=32)
    return student, {"t": teacher}


# ------------------------------------------------------------------------------- VID


def test_vid_loss_equals_a_hand_computation():
    mean = torch.tensor([[[[0.0, 1.0]], [[2.0, -1.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    teacher = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    var = torch.tensor([2.0, 0.5], dtype=torch.float64)
    # position 1: c0 (1-0)², c1 (0-2)²; position 2: c0 0, c1 (1+1)²
    pos1 = 0.5 * math.log(2.0) + 1 / 4 + 0.5 * math.log(0.5) + 4 / 1
    pos2 = 0.5 * math.log(2.0) + 0 + 0.5 * math.log(0.5) + 4 / 1
    assert vid_loss(mean, teacher, var).item() == pytest.approx((pos1 + pos2) / 2, abs=1e-12)
    assert VIDLoss()((mean, var), teacher).item() == pytest.approx((pos1 + pos2) / 2, abs=1e-12)


def test_vid_regressor_starts_at_the_authors_variance_and_pools_the_larger_map():
    reg = VIDRegressor(8, 16, size=(4, 4))
    assert torch.allclose(reg.variance(), torch.full((16,), 5.0), atol=1e-5)
    mean, var = reg(torch.randn(2, 8, 8, 8))
    assert mean.shape == (2, 16, 4, 4) and var.shape == (16,)
    convs = [m for m in reg.regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (8, 16, (1, 1)), (16, 16, (1, 1)), (16, 16, (1, 1))]
    with pytest.raises(KdkitError, match="initial variance"):
        VIDRegressor(8, 16, init_variance=0.0)


def test_vid_terms_per_stage_weighted_by_one_over_teacher_width():
    student, teachers = _pair()
    terms = build_method("vid", student, teachers, example_input=X[:2])
    vids = [t for t in terms if t.name.startswith("vid")]
    assert [t.weight for t in vids] == [1 / 16, 1 / 32, 1 / 64]
    assert [t.name for t in terms] == ["ce", "vid1", "vid2", "vid3"]
    d = Distiller(student, teachers, terms)
    out = d(X, Y)
    # the term's value is the loss of its regressor's output against the teacher's map
    with torch.no_grad():
        from kdkit.taps import run_with_taps

        _, s = run_with_taps(student, X, {"a": vids[0].student})
        _, t = run_with_taps(teachers["t"], X, {"a": vids[0].teacher})
        assert vids[0].adapter is not None
        mean, var = vids[0].adapter(s["a"])
        assert out["vid1"].item() == pytest.approx(vid_loss(mean, t["a"], var).item(), rel=1e-5)


# -------------------------------------------------------------------------- ReviewKD


def test_hcl_equals_a_hand_computation():
    t = torch.arange(16.0).view(1, 1, 4, 4)
    s = torch.zeros_like(t)
    # h = 4: levels full, 2x2, 1x1 (4x4 is the map itself), weights 1, 1/2, 1/4
    full = sum(k * k for k in range(16)) / 16  # 77.5
    two = (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4  # block means 2.5, 4.5, 10.5, 12.5
    one = 7.5**2
    want = (full + two / 2 + one / 4) / (1 + 1 / 2 + 1 / 4)
    assert hcl_stage(s, t).item() == pytest.approx(want, rel=1e-6)
    # an 8x8 map uses all four levels; stages add up
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mse = torch.nn.functional.mse_loss
    pool = torch.nn.functional.adaptive_avg_pool2d
    want8 = (mse(a, b) + mse(pool(a, 4), pool(b, 4)) / 2 + mse(pool(a, 2), pool(b, 2)) / 4
             + mse(pool(a, 1), pool(b, 1)) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert hcl_stage(a, b).item() == pytest.approx(want8.item(), rel=1e-6)
    assert hcl_loss([s, a], [t, b]).item() == pytest.approx(want + want8.item(), rel=1e-6)
    assert HCLLoss()([a], [b]).item() == pytest.approx(want8.item(), rel=1e-6)
    with pytest.raises(KdkitError, match="shape"):
        hcl_stage(a, b[:, :2])


def test_reviewkd_fusion_gives_the_teachers_stage_shapes():
    student, teachers = _pair()
    terms = build_method("reviewkd", student, teachers, example_input=X[:2], epochs=40)
    term = next(t for t in terms if t.name == "reviewkd")
    assert isinstance(term.adapter, ReviewFusion)
    assert isinstance(term.student, tuple) and len(term.student) == 3
    from kdkit.taps import run_with_taps

    _, s = run_with_taps(student, X, {str(p): p for p in term.student})
    assert isinstance(term.teacher, tuple)
    _, t = run_with_taps(teachers["t"], X, {str(p): p for p in term.teacher})
    fused = term.adapter([s[str(p)] for p in term.student])
    assert [f.shape for f in fused] == [t[str(p)].shape for p in term.teacher]
    assert [tuple(f.shape) for f in fused] == [(4, 16, 32, 32), (4, 32, 16, 16), (4, 64, 8, 8)]
    # mid width: min(512, the student's deepest width); only the shallower levels fuse
    abfs = list(term.adapter.abfs)
    assert [a.conv1[0].out_channels for a in abfs] == [32, 32, 32]
    assert [a.att is not None for a in abfs] == [True, True, False]


def test_reviewkd_warms_up_over_20_epochs():
    student, teachers = _pair()
    terms = build_method("reviewkd", student, teachers, example_input=X[:2], epochs=40)
    term = next(t for t in terms if t.name == "reviewkd")
    # epoch = progress · 40; weight = min(epoch / 20, 1)
    assert [term.weight_at(p) for p in (0.0, 0.125, 0.25, 0.5, 1.0)] == [0, 0.25, 0.5, 1, 1]
    with pytest.warns(UserWarning, match="epoch count is unknown"):
        terms = build_method("reviewkd", student, teachers, example_input=X[:2])
    assert next(t for t in terms if t.name == "reviewkd").weight_at(0.0) == 1.0
    none = build_method("reviewkd", student, teachers, example_input=X[:2], warmup_epochs=0)
    assert next(t for t in none if t.name == "reviewkd").weight_at(0.0) == 1.0
    with pytest.raises(KdkitError, match="warmup_epochs must be >= 0"):
        build_method("reviewkd", student, teachers, example_input=X[:2], warmup_epochs=-1)


@pytest.mark.parametrize("name", ["vid", "reviewkd", "simkd"])
def test_gradients_reach_student_and_adapters_only(name):
    student, teachers = _pair()
    frozen = [p.clone() for p in teachers["t"].parameters()]
    terms = build_method(name, student, teachers, example_input=X[:2], epochs=1)
    d = Distiller(student, teachers, terms)
    d.train()
    out = d(X, Y, progress=1.0)
    out["loss"].backward()
    for n, p in student.named_parameters():
        if not (name == "simkd" and n.startswith("fc.")):  # SimKD never uses its own head
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    adapters = list(d.adapters.values())
    assert adapters and all(p.grad is not None for a in adapters for p in a.parameters())
    if name == "vid":
        assert all(a.alpha.grad is not None for a in adapters)  # the variances learn
    assert all(p.grad is None for p in teachers["t"].parameters())
    torch.optim.SGD(d.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, teachers["t"].parameters(),
                                                  strict=True))


@pytest.mark.parametrize("name", ["vid", "reviewkd", "simkd"])
def test_named_layers_and_summaries(name):
    assert "2019" in METHODS.summary(name) or "2021" in METHODS.summary(name) \
        or "2022" in METHODS.summary(name)
    student, teachers = _pair()
    if name == "simkd":
        terms = build_method(name, student, teachers, example_input=X[:2],
                             student_layer="layer2", teacher_layer="layer3")
        assert terms[0].student.path == "layer2" and terms[0].teacher.path == "layer3"
        return
    terms = build_method(name, student, teachers, example_input=X[:2], epochs=1,
                         student_layers=["layer2", "layer3"], teacher_layers=["layer2", "layer3"])
    taps = [t.student for t in terms if t.name != "ce"]
    flat = [tap for x in taps for tap in (x if isinstance(x, tuple) else (x,))]
    assert [tap.path for tap in flat] == ["layer2", "layer3"]


def test_argument_errors():
    student, teachers = _pair()
    with pytest.raises(KdkitError, match="no argument 'beta'"):
        build_method("vid", student, teachers, example_input=X[:2], beta=1.0)
    with pytest.raises(KdkitError, match="weight"):
        build_method("vid", student, teachers, example_input=X[:2], weight=-1.0)
    with pytest.raises(KdkitError, match="init_variance"):
        build_method("vid", student, teachers, example_input=X[:2], init_variance=0.0)
    with pytest.raises(KdkitError, match="factor"):
        build_method("simkd", student, teachers, example_input=X[:2], factor=0)
    with pytest.raises(KdkitError, match="mid_channels"):
        build_method("reviewkd", student, teachers, example_input=X[:2], mid_channels=0)
    mlp = create_model("mlp", hidden=[16], num_classes=10, in_channels=3, input_size=32)
    with pytest.raises(KdkitError, match="feature map"):
        build_method("simkd", mlp, teachers, example_input=X[:2])


# ----------------------------------------------------------------------------- SimKD


def test_simkd_projector_is_the_authors_bottleneck():
    proj = SimKDProjector(32, 64, factor=2)
    kinds = [type(m).__name__ for m in proj.transfer]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    convs = [m for m in proj.transfer if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (32, 32, 1), (32, 32, 3), (32, 64, 1)]


def test_simkd_deployed_logits_are_the_teacher_head_on_projected_features():
    student, teachers = _pair()
    terms = build_method("simkd", student, teachers, example_input=X[:2])
    assert [t.name for t in terms] == ["simkd"]  # no CE by default (the paper's)
    d = Distiller(student, teachers, terms)
    d.train()
    d(X, Y)["loss"].backward()  # one step's BN statistics, so eval differs from init
    deployed = deploy_simkd(student, terms, teachers)
    assert isinstance(deployed, SimKDStudent)
    from kdkit.taps import run_with_taps

    student.eval()
    projector = terms[0].adapter
    assert projector is not None
    projector.eval()
    with torch.no_grad():
        _, feats = run_with_taps(student, X, {"f": terms[0].student})
        fc = teachers["t"].fc
        want = fc(projector(feats["f"]).mean(dim=(2, 3)))
        got = deployed(X)
    assert torch.allclose(got, want, atol=1e-5)
    # the student's own classifier is gone; the teacher's is a frozen copy
    own_fc = student.fc.weight.numel() + student.fc.bias.numel()
    assert count_parameters(deployed) == (count_parameters(student) - own_fc
                                          + count_parameters(projector)
                                          + count_parameters(teachers["t"].fc))
    assert not any(p.requires_grad for p in deployed.head.parameters())


def test_simkd_run_saves_and_evaluates_the_deployed_model(tmp_path, digits):
    from kdkit.cli import main
    from kdkit.data.stream import eval_args
    from kdkit.pipelines.runs import train_one
    from kdkit.train.artifacts import load_model
    from kdkit.train.loop import LoopSettings
    from kdkit.train.metrics import evaluate

    torch.manual_seed(0)
    train_one(run_dir=tmp_path / "t", label="t", data=digits, model_name="resnet",
              model_kwargs={"depth": 8, "width": 8}, method="ce", method_kwargs={},
              teachers={}, settings=LoopSettings(epochs=3), batch_size=64, augment=None,
              progress=False)
    teacher, _ = load_model(tmp_path / "t")
    run = tmp_path / "simkd"
    summary = train_one(run_dir=run, label="s", data=digits, model_name="resnet",
                        model_kwargs={"depth": 8, "width": 4}, method="simkd", method_kwargs={},
                        teachers={"teacher": teacher}, settings=LoopSettings(epochs=3),
                        batch_size=64, augment=None, progress=False)
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"]["name"] == "py:kdkit.distill.methods_feature2:simkd_student"
    assert summary["deployed_model"] == meta["model"]["name"]
    model, _ = load_model(run)  # what `kdkit eval` does: rebuilt from model.json
    assert isinstance(model, SimKDStudent)
    bare = create_model("resnet", depth=8, width=4, in_channels=1, input_size=8)
    fc_s = bare.fc.weight.numel() + bare.fc.bias.numel()
    projector = SimKDProjector(16, 32, factor=2)
    fc_t = teacher.fc.weight.numel() + teacher.fc.bias.numel()
    assert summary["params"] == count_parameters(model) == (
        count_parameters(bare) - fc_s + count_parameters(projector) + fc_t)
    assert torch.equal(model.head.fc.weight, teacher.fc.weight)
    test = evaluate(model, *eval_args(digits.test))
    assert summary["test_acc"] == pytest.approx(test["acc"])
    # The loop validates the deployed model every epoch (a view on the training modules),
    # not the bare student, whose own classifier SimKD never trains
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val/acc"] == pytest.approx(summary["val_acc"])
    bare_val = evaluate(_bare_student(run, digits), *eval_args(digits.val))["acc"]
    assert summary["val_acc"] > bare_val + 20.0
    assert main(["eval", str(run), "--no-deploy"]) == 0


def _bare_student(run, digits):
    """The student alone (its untrained classifier) from the run's checkpoint."""
    from safetensors.torch import load_file

    student = create_model("resnet", depth=8, width=4, in_channels=1, input_size=8)
    tensors = load_file(run / "checkpoint" / "state.safetensors")
    own = {k.removeprefix("model/student."): v for k, v in tensors.items()
           if k.startswith("model/student.")}
    student.load_state_dict(own)
    return student.eval()
