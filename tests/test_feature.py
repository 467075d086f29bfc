"""Feature distillation on unmodified models: positions, connectors, FitNets, AT, overhaul."""

import pytest
import torch

from kdkit.distill import Distiller, build_method, build_stages
from kdkit.distill.features import Connector, stage_points
from kdkit.errors import KdkitError
from kdkit.losses.overhaul import margin_from_bn
from kdkit.models import create_model
from kdkit.taps import run_with_taps
from tv_resnet import TVResNet

X = torch.randn(6, 1, 16, 16)
Y = torch.tensor([0, 1, 2, 3, 0, 1])


def _pair():
    torch.manual_seed(0)
    teacher = TVResNet(widths=(16, 32, 64), blocks=2).eval()
    for m in teacher.modules():  # non-trivial BN affine parameters -> distinct margins
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    student = TVResNet(widths=(8, 16, 32), blocks=1)
    return student, teacher


def test_stage_points_of_torchvision_style_resnet_are_true_preactivations():
    _, teacher = _pair()
    points = stage_points(teacher, X)
    assert [str(p.tap) for p in points] == ["layer1:preact", "layer2:preact", "layer3:preact"]
    assert [p.bn for p in points] == ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2"]
    _, feats = run_with_taps(teacher, X, {str(p.tap): p.tap for p in points})
    for p in points:
        assert (feats[str(p.tap)] < 0).any(), "pre-ReLU features keep negative values"


def test_overhaul_margins_weights_and_connectors():
    student, teacher = _pair()
    terms = build_method("overhaul", student, {"t": teacher}, example_input=X[:2])
    feat = [t for t in terms if t.name.startswith("overhaul")]
    assert [t.weight for t in feat] == pytest.approx([1e-3 / 4, 1e-3 / 2, 1e-3])
    bn = teacher.layer3[1].bn2
    torch.testing.assert_close(feat[2].loss.margin, margin_from_bn(bn.weight, bn.bias))
    conn = feat[0].adapter
    assert isinstance(conn, Connector) and conn.conv.bias is None
    assert conn.conv.weight.shape == (16, 8, 1, 1)
    assert torch.equal(conn.bn.weight, torch.ones(16)) and torch.equal(conn.bn.bias,
                                                                       torch.zeros(16))
    d = Distiller(student, {"t": teacher}, terms)
    assert "losses.overhaul3.margin" in d.state_dict()
    d.train()
    assert not teacher.training  # eval by default
    out = d(X, Y)
    out["loss"].backward()
    assert all(p.grad is not None for p in conn.parameters())
    d2 = Distiller(student, {"t": teacher}, terms, teacher_mode="train")
    d2.train()
    assert teacher.training


def test_overhaul_is_zero_when_student_reproduces_the_transformed_teacher():
    _, teacher = _pair()
    terms = build_method("overhaul", teacher, {"t": teacher}, example_input=X[:2],
                         connector="none")
    d = Distiller(teacher, {"t": teacher}, terms)
    d.eval()
    out = d(X, Y)
    # S = T: every element is either equal or in the S <= T <= 0 region -> partial L2 is 0
    for k in ("overhaul1", "overhaul2", "overhaul3"):
        assert out[k].item() == pytest.approx(0.0, abs=1e-6)


def test_fitnets_stages_hint_trains_lower_part_then_kd_with_decaying_lambda():
    student, teacher = _pair()
    hint, kd = build_stages("fitnets", student, {"t": teacher}, example_input=X[:2],
                            hint_epochs=3)
    assert (hint.name, hint.epochs, kd.name) == ("hint", 3, "kd")
    d = Distiller(student, {"t": teacher}, hint.terms)
    d(X, Y)["loss"].backward()
    assert student.layer1[0].conv1.weight.grad is not None  # below the guided layer (layer2)
    assert student.layer3[0].conv1.weight.grad is None  # above it: untouched in stage 1
    assert student.fc.weight.grad is None
    lam = kd.terms[1].weight
    assert (lam(0.0), lam(0.5), lam(1.0)) == (4.0, 2.5, 1.0)
    assert kd.terms[1].loss.temperature == 3.0
    with pytest.raises(KdkitError, match="has 2 stages"):
        build_method("fitnets", student, {"t": teacher}, example_input=X[:2])


def test_at_uses_every_stage_with_beta_1000():
    student, teacher = _pair()
    terms = build_method("at", student, {"t": teacher}, example_input=X[:2])
    assert [(t.name, t.weight) for t in terms] == [
        ("ce", 1.0), ("at1", 1000.0), ("at2", 1000.0), ("at3", 1000.0)]
    out = Distiller(student, {"t": teacher}, terms)(X, Y)
    assert all(torch.isfinite(out[k]) for k in ("at1", "at2", "at3"))


def test_unconnectable_taps_fail_early_naming_both_shapes():
    student, teacher = _pair()
    with pytest.raises(KdkitError, match=r"student feature \(1, 32\).*teacher feature "
                                         r"\(2, 64, 4, 4\)"):
        build_method("hint", student, {"t": teacher}, example_input=X[:2],
                     student_layers=["fc:input"], teacher_layers=["layer3"])
    mlp = create_model("mlp", hidden=[8], num_classes=4, input_size=16)
    with pytest.raises(KdkitError, match="cannot find the stages of MLP"):
        build_method("overhaul", mlp, {"t": teacher}, example_input=X[:2])
    # 2 stages against 3: each student stage paired with the teacher stage of its map size
    from kdkit.taps import probe_shape

    cnn = create_model("plain_cnn4", num_classes=4, input_size=16)
    terms = [t for t in build_method("at", cnn, {"t": teacher}, example_input=X[:2])
             if t.teacher is not None]
    assert len(terms) == 2
    for t in terms:
        assert (probe_shape(cnn, t.student, X[:2])[2:]
                == probe_shape(teacher, t.teacher, X[:2])[2:])


def test_overhaul_needs_bn_before_relu():
    lenet_t = create_model("lenet5", num_classes=4, input_size=16)
    lenet_s = create_model("lenet5_half", num_classes=4, input_size=16)
    with pytest.raises(KdkitError, match="no BatchNorm known before the ReLU.*teacher_bns"):
        build_method("overhaul", lenet_s, {"t": lenet_t}, example_input=X[:2],
                     student_layers=["relu2:preact"], teacher_layers=["relu2:preact"])


def test_connector_spatial_rule():
    big = Connector((1, 4, 8, 8), (1, 6, 4, 4))
    small = Connector((1, 4, 2, 2), (1, 6, 4, 4))
    assert big(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)
    assert small(torch.randn(2, 4, 2, 2)).shape == (2, 6, 4, 4)


def test_wrn_and_plain_cnn_points():
    wrn = create_model("wrn16_2", in_channels=1, input_size=16)
    pts = stage_points(wrn, X[:2])
    assert [str(p.tap) for p in pts] == ["layer2.0.relu1:preact", "layer3.0.relu1:preact",
                                         "relu:preact"]
    assert pts[-1].bn == "bn"
    cnn = create_model("plain_cnn4", input_size=16)
    assert [(str(p.tap), p.bn) for p in stage_points(cnn, X[:2])] == [
        ("features.5:preact", "features.4"), ("features.12:preact", "features.11")]


def test_position_losses_check_shapes_at_build_time():
    student, teacher = _pair()
    with pytest.raises(KdkitError, match=r"at: student layer1:output gives \(1, 8, 16, 16\) "
                                         r"and teacher layer2:output gives \(1, 32, 8, 8\); "
                                         r"the spatial sizes must match"):
        build_method("at", student, {"t": teacher}, example_input=X[:1],
                     student_layers=["layer1"], teacher_layers=["layer2"])
    with pytest.raises(KdkitError, match="fsp: student layer1:output has 8 channels and "
                                         "teacher layer1:output 16"):
        build_method("fsp", student, {"t": teacher}, example_input=X[:1])
