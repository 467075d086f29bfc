"""DKD, DIST, NKD, logit standardization and CC: METHODS.md §8's reference values (float64,
to 1e-6), DKD's per-sample identity, LS's invariance, and the method contracts."""

import json
import warnings

import pytest
import torch

from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, build_method
from kdkit.errors import KdkitError
from kdkit.losses.kd import KDLoss, kd_loss
from kdkit.losses.logit import (
    CCLoss,
    DISTLoss,
    DKDLoss,
    NKDLoss,
    Standardized,
    cc_loss,
    dist_parts,
    dkd_parts,
    nkd_parts,
    standardize_logits,
)
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, fit
from kdkit.train.teacher_cache import CacheSettings, TeacherCache
from methods_reference import Z_S, Z_T
from methods_reference import Y as Y_REF

D = torch.float64
ZS, ZT, YR = Z_S, Z_T, Y_REF
NEW = ["dkd", "dist", "nkd", "cc"]


def _ref(value, want):
    assert value.item() == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------ reference values


def test_dkd_reference_values():
    tckd, nckd = dkd_parts(ZS, ZT, YR, 4.0)
    _ref(tckd.mean(), 0.148373)
    _ref(nckd.mean(), 0.180777)
    _ref(DKDLoss(1.0, 8.0, 4.0)(ZS, ZT, target=YR), 1.594586)
    _ref(kd_loss(ZS, ZT, 4.0), 0.269704)
    tckd, nckd = dkd_parts(ZS, ZT, YR, 1.0)
    _ref(tckd.mean(), 0.113204)
    _ref(nckd.mean(), 0.128075)


def _kd_per_sample(zs, zt, t):
    log_ps, log_pt = (zs / t).log_softmax(1), (zt / t).log_softmax(1)
    return t * t * (log_pt.exp() * (log_pt - log_ps)).sum(1)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_is_tckd_plus_weighted_nckd_per_sample(temperature):
    """KD = TCKD + (1 − p_t^gt)·NCKD, sample by sample (Zhao et al. 2022, eq. 3)."""
    g = torch.Generator().manual_seed(0)
    cases = [(ZS, ZT, YR)] + [
        (3 * torch.randn(16, c, generator=g, dtype=D), 3 * torch.randn(16, c, generator=g, dtype=D),
         torch.randint(0, c, (16,), generator=g)) for c in (2, 5, 100)]
    for zs, zt, y in cases:
        tckd, nckd = dkd_parts(zs, zt, y, temperature)
        pt_gt = (zt / temperature).softmax(1).gather(1, y[:, None]).squeeze(1)
        torch.testing.assert_close(tckd + (1 - pt_gt) * nckd,
                                   _kd_per_sample(zs, zt, temperature), rtol=1e-10, atol=1e-12)


def test_dist_reference_values():
    inter, intra = dist_parts(ZS, ZT, 1.0)
    _ref(inter, 0.053164)
    _ref(intra, 0.324226)
    _ref(DISTLoss(beta=2.0, gamma=2.0, tau=4.0)(ZS, ZT), 10.374179)


def test_logit_standardization_reference_values():
    _ref(Standardized(KDLoss(2.0))(ZS, ZT), 0.062434)
    _ref(Standardized(KDLoss(1.0))(ZS, ZT), 0.045229)
    z = standardize_logits(ZS)
    torch.testing.assert_close(z.mean(1), torch.zeros(4, dtype=D))
    torch.testing.assert_close(z.std(1), torch.ones(4, dtype=D))


def test_kd_with_standardization_is_invariant_to_affine_student_logits():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(32, 10, generator=g, dtype=D), torch.randn(32, 10, generator=g, dtype=D)
    loss = Standardized(KDLoss(2.0))
    base = loss(zs, zt)
    for a, b in [(3.0, 0.0), (0.2, -5.0), (7.5, 11.0)]:
        torch.testing.assert_close(loss(a * zs + b, zt), base, rtol=1e-6, atol=1e-9)
    assert not torch.isclose(KDLoss(2.0)(3.0 * zs, zt), KDLoss(2.0)(zs, zt))  # (plain KD is not)


def test_nkd_reference_values():
    target_part, non_target = nkd_parts(ZS, ZT, YR, 1.0)
    _ref(target_part, 0.372261)
    _ref(1.5 * non_target, 0.192112)
    _ref(NKDLoss(1.5, 1.0)(ZS, ZT, target=YR), 0.372261 + 0.192112)


def test_cc_reference_value():
    _ref(cc_loss(ZS, ZT, gamma=0.4, order=2), 0.006460)
    _ref(CCLoss()(ZS, ZT), 0.006460)
    assert cc_loss(ZS, 5 * ZS).item() == pytest.approx(0.0, abs=1e-12)  # normalised first


# ------------------------------------------------------------------ methods


X = torch.randn(12, 1, 8, 8)
Y = torch.arange(12) % 4


def _pair():
    torch.manual_seed(0)
    teacher = create_model("mlp", hidden=[24], num_classes=4, input_size=8)
    torch.manual_seed(1)
    return create_model("mlp", hidden=[16], num_classes=4, input_size=8), teacher


@pytest.mark.parametrize("name", NEW + ["kd_ls", "dkd_ls"])
def test_method_step_trains_student_and_adapters_only(name):
    student, teacher = _pair()
    method, kw = (name[:-3], {"logit_standardization": True}) if name.endswith("_ls") else (
        name, {})
    terms = build_method(method, student, {"t": teacher}, example_input=X[:2], epochs=10, **kw)
    assert terms[0].name == "ce" and len(terms) == 2
    own = [t for t in terms if t.name != "ce"]
    frozen = [p.clone() for p in teacher.parameters()]
    # the method's own term alone (after DKD's warm-up) reaches the student and adapters
    d = Distiller(student, {"t": teacher}, own)
    d.train()
    out = d(X, Y, progress=1.0)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    out["loss"].backward()
    grads = [p.grad for p in student.parameters()]
    if name == "cc":  # CC reads the embedding: the head (its weight, bias) is after it
        grads = grads[:-2]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    for adapter in d.adapters.values():
        assert all(p.grad is not None for p in adapter.parameters())
    # a step of the whole method changes the student, never the teacher
    d = Distiller(student, {"t": teacher}, terms)
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    before = [p.clone() for p in student.parameters()]
    opt.zero_grad()
    d(X, Y, progress=1.0)["loss"].backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters(), strict=True))


def test_cc_projects_other_widths_and_relates_samples():
    student, _ = _pair()
    torch.manual_seed(0)
    teacher = create_model("mlp", hidden=[40], num_classes=4, input_size=8)
    terms = build_method("cc", student, {"t": teacher})  # widths read from the heads
    d = Distiller(student, {"t": teacher}, terms)
    assert d.adapters["cc"].weight.shape == (40, 16)
    kinds = {t.name: t.relates_samples for t in terms}
    assert kinds == {"ce": False, "cc": True}
    same = build_method("cc", student, {"t": _pair()[0]})
    assert same[-1].adapter is None
    assert build_method("cc", student, {"t": teacher}, kd_alpha=0.5)[1].name == "kd"


def test_which_terms_relate_samples():
    student, teacher = _pair()
    related = {name: [t.name for t in build_method(name, student, {"t": teacher}, epochs=1)
                      if t.relates_samples] for name in NEW}
    assert related == {"dkd": [], "dist": ["dist"], "nkd": [], "cc": ["cc"]}


def test_dkd_warmup_in_epochs():
    student, teacher = _pair()
    term = build_method("dkd", student, {"t": teacher}, epochs=40)[1]
    assert [term.weight_at(p) for p in (0.0, 0.125, 0.25, 0.5, 1.0)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    term = build_method("dkd", student, {"t": teacher}, epochs=10, warmup_epochs=0)[1]
    assert term.weight_at(0.0) == 1.0
    with pytest.warns(UserWarning, match="epoch count is unknown"):
        term = build_method("dkd", student, {"t": teacher})[1]
    assert term.weight_at(0.0) == 1.0
    d = Distiller(student, {"t": teacher}, build_method("dkd", student, {"t": teacher},
                                                        epochs=40, temperature=1.0))
    out = d(X, Y, progress=0.125)  # epoch 5 of 40: a quarter of α·TCKD + β·NCKD
    torch.testing.assert_close(out["loss"], out["ce"] + 0.25 * out["dkd"])


def test_standardization_option_wraps_the_loss():
    student, teacher = _pair()
    for name in ("kd", "dkd"):
        plain = build_method(name, student, {"t": teacher}, epochs=1)[1].loss
        ls = build_method(name, student, {"t": teacher}, epochs=1,
                          logit_standardization=True)[1].loss
        assert not isinstance(plain, Standardized)
        assert isinstance(ls, Standardized) and type(ls.loss) is type(plain)
    d = Distiller(student, {"t": teacher}, build_method(
        "kd", student, {"t": teacher}, temperature=2.0, logit_standardization=True))
    out = d(X, Y)
    zs, zt = student(X), teacher(X)
    torch.testing.assert_close(out["kd"], KDLoss(2.0)(standardize_logits(zs),
                                                      standardize_logits(zt)))


def test_losses_compute_in_float32_under_autocast():
    student, teacher = _pair()
    for name in NEW + ["kd"]:
        kw = {"logit_standardization": True} if name in ("kd", "dkd") else {}
        d = Distiller(student, {"t": teacher},
                      build_method(name, student, {"t": teacher}, epochs=1, **kw))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = d(X, Y, progress=1.0)
        for t in d.terms:
            assert out[t.name].dtype == torch.float32, (name, t.name)


def test_argument_errors():
    student, teacher = _pair()
    t = {"t": teacher}
    with pytest.raises(KdkitError, match="method 'dkd' has no argument 'betta'"):
        build_method("dkd", student, t, betta=1.0)
    with pytest.raises(KdkitError, match="method 'dkd' argument 'beta' must be >= 0"):
        build_method("dkd", student, t, beta=-1.0)
    with pytest.raises(KdkitError, match="method 'dist' argument 'tau'"):
        build_method("dist", student, t, tau="hot")
    with pytest.raises(KdkitError, match="dist: tau must be > 0"):
        build_method("dist", student, t, tau=0.0)
    with pytest.raises(KdkitError, match="nkd: gamma must be >= 0"):
        build_method("nkd", student, t, gamma=-0.5)
    with pytest.raises(KdkitError, match="cc: gamma must be > 0"):
        build_method("cc", student, t, gamma=0.0)
    with pytest.raises(KdkitError, match="dkd: warmup_epochs must be >= 0"):
        build_method("dkd", student, t, warmup_epochs=-1, epochs=5)
    with pytest.raises(KdkitError, match="method 'kd' argument 'logit_standardization'"):
        build_method("kd", student, t, logit_standardization="maybe")
    with pytest.raises(KdkitError, match="needs the labels"):
        DKDLoss()(ZS, ZT)
    with pytest.raises(KdkitError, match="same number of classes"):
        NKDLoss()(ZS, ZT[:, :3], target=YR)


# ------------------------------------------------------------------ teacher-output cache


@pytest.mark.parametrize("method", NEW)
def test_cached_run_gives_the_live_losses(digits, tmp_path, method):
    """One epoch with the teacher-output cache = the same epoch with the live teacher."""
    torch.manual_seed(0)
    teacher = create_model("mlp", input_size=8, hidden=[32]).eval()

    def make():
        torch.manual_seed(1)
        s = create_model("mlp", input_size=8, hidden=[16])
        kw = {"warmup_epochs": 0.5} if method == "dkd" else {}
        terms = build_method(method, s, {"teacher": teacher}, epochs=1, **kw)
        return Distiller(s, {"teacher": teacher}, terms)

    aug = build_augment({"shift": 1, "hflip": True}, fill=digits.black)
    settings = LoopSettings(epochs=1, lr=0.05, seed=3, log_every=1)
    loader = BatchLoader(digits.train, 64, shuffle=True, seed=3, augment=aug, views=2)
    live = make()
    res_live = fit(live, loader, settings, run_dir=tmp_path / "live", progress=False)
    cached_d = make()
    cache = TeacherCache.open_or_build(tmp_path / "cache", cached_d, digits.train, aug,
                                       CacheSettings(views=2, dtype="float32"))
    res_cached = fit(cached_d, loader, settings, run_dir=tmp_path / "cached", progress=False,
                     teacher_cache=cache)
    steps_live = (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()
    steps_cached = (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()
    assert len(steps_live) >= 3
    for a, b in zip(steps_live, steps_cached, strict=True):
        la, lb = json.loads(a).get("train/loss"), json.loads(b).get("train/loss")
        assert (la is None) == (lb is None)
        if la is not None:
            assert lb == pytest.approx(la, rel=1e-4, abs=1e-6)
    keys = [k for k in res_live.history[-1] if k.startswith("train/")]
    assert f"train/{method}" in keys
    for k in keys:
        assert res_cached.history[-1][k] == pytest.approx(res_live.history[-1][k], rel=1e-4)
    for p, q in zip(live.parameters(), cached_d.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_no_warning_when_epochs_given():
    student, teacher = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method("dkd", student, {"t": teacher}, epochs=3)


def test_kd_takes_the_ls_papers_weights_directly():
    """KD+LS's CIFAR recipe is 0.1·CE + 9·KD at T = 2: weights kd's α cannot express."""
    s, teacher = _pair()
    t = {"teacher": teacher}
    terms = build_method("kd", s, t, ce_weight=0.1, kd_weight=9.0, temperature=2.0,
                         logit_standardization=True)
    assert [(term.name, term.weight) for term in terms] == [("ce", 0.1), ("kd", 9.0)]
    with pytest.raises(KdkitError, match="give ce_weight and kd_weight together"):
        build_method("kd", s, t, kd_weight=9.0)


def test_dkd_split_gathers_the_other_classes_without_a_mask():
    """The non-target logits, in class order, for every target (no boolean indexing, which
    would synchronise with a GPU each step)."""
    from kdkit.losses.logit import _split

    z = torch.arange(12.0).reshape(3, 4)
    _, _, others = _split(z, torch.tensor([0, 2, 3]))
    assert torch.equal(others, torch.tensor([[1.0, 2, 3], [4, 5, 7], [8, 9, 10]]))
