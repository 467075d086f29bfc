"""Methods with state (METHODS.md §8): CTKD's adversarial temperature, CRD's memory banks.

Each: the math by hand, the contract (gradients, resume exact, cached = live), and what
the loop logs."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.distill import Distiller, build_method
from kdkit.distill.term import StepInfo
from kdkit.errors import KdkitError
from kdkit.losses.crd import CRDLoss, crd_loss, draw_negatives, momentum_update, nce_loss
from kdkit.losses.ctkd import (
    LearnableTemperature,
    cosine_curriculum,
    dkd_loss_t,
    grad_reverse,
    kd_loss_t,
)
from kdkit.losses.kd import kd_loss
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, TrainingInterrupted, fit
from kdkit.train.teacher_cache import CacheSettings, TeacherCache
from methods_reference import Z_S, Z_T, Y
from methods_reference import metric_rows as _rows
from methods_reference import shift_loader as _loader


def _teacher(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", hidden=[48], input_size=8).eval()


def _distiller(method, teacher, seed=1, epochs=None, **kw):
    torch.manual_seed(seed)
    s = create_model("mlp", hidden=[16], input_size=8)
    terms = build_method(method, s, {"teacher": teacher}, example_input=torch.zeros(2, 1, 8, 8),
                         epochs=epochs, **kw)
    return Distiller(s, {"teacher": teacher}, terms)




# ------------------------------------------------------------------------------ CTKD


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.3, -0.6, -0.9]))


def test_lambda_follows_the_cosine_curriculum():
    lams = [cosine_curriculum(e, 10) for e in range(12)]
    # the official CosineDecay(0, -1, 10) read at epochs 1, 2, ... (negated)
    assert lams[0] == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
    assert lams[4] == pytest.approx(0.5)
    assert lams[9] == lams[10] == lams[11] == 1.0
    assert all(a < b for a, b in zip(lams[:10], lams[1:10], strict=False))
    loss = build_method("ctkd", create_model("mlp", hidden=[8], input_size=8),
                        {"t": _teacher()}, epochs=20)[1].loss
    # epoch = floor(progress · epochs): progress 0.25 of 20 epochs is epoch 5
    assert loss.lambda_at(0.25) == pytest.approx(cosine_curriculum(5, 10))
    loss.begin_step(StepInfo(progress=0.999))
    assert loss.lam == 1.0


def test_temperature_stays_in_1_to_21():
    glob = LearnableTemperature("global")
    assert glob(Z_S.float(), Z_T.float(), 1.0).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    for theta in (-1e4, 1e4):
        glob.theta.data.fill_(theta)
        t = glob(Z_S.float(), Z_T.float(), 1.0)
        assert 1.0 <= t.item() <= 21.0
    inst = LearnableTemperature("instance", num_classes=4)
    t = inst(1e4 * torch.randn(6, 4), 1e4 * torch.randn(6, 4), 1.0)
    assert t.shape == (6, 1) and bool(((t >= 1) & (t <= 21)).all())


def test_base_losses_at_a_constant_temperature_are_kd_and_dkd():
    t = torch.full((1, 1), 4.0, dtype=torch.float64)
    assert kd_loss_t(Z_S, Z_T, t).item() == pytest.approx(kd_loss(Z_S, Z_T, 4.0).item(),
                                                          abs=1e-12)
    assert kd_loss_t(Z_S, Z_T, t).item() == pytest.approx(0.269704, abs=1e-6)  # METHODS §8
    # DKD α=1, β=8, T=4: 1.594586 (METHODS §8), per-sample T of (B, 1) as well
    assert dkd_loss_t(1.0, 8.0)(Z_S, Z_T, t, Y).item() == pytest.approx(1.594586, abs=1e-6)
    per = torch.full((4, 1), 4.0, dtype=torch.float64)
    assert dkd_loss_t(1.0, 8.0)(Z_S, Z_T, per, Y).item() == pytest.approx(1.594586, abs=1e-6)


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_temperature_ascends_the_loss_the_student_descends(mode, monkeypatch):
    teacher = _teacher()
    d = _distiller("ctkd", teacher, epochs=10, mode=mode)
    loss = d.losses["ctkd"]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    out = d(x, y, progress=0.35)  # epoch 3: λ = cosine_curriculum(3, 10)
    lam = cosine_curriculum(3, 10)
    assert loss.lam == pytest.approx(lam)
    out["loss"].backward()
    temp_params = list(loss.temperature.parameters())
    got = [p.grad.clone() for p in temp_params]
    # the same loss without the reversal: the temperature's gradient is −λ times it
    for p in d.parameters():
        p.grad = None
    monkeypatch.setattr(loss, "lambda_at", lambda p: -1.0)  # λ = −1: identity backward
    d(x, y, progress=0.35)["loss"].backward()
    for g, p in zip(got, temp_params, strict=True):
        torch.testing.assert_close(g, -lam * p.grad)
    assert "ctkd/temperature" in out and 1 <= out["ctkd/temperature"].item() <= 21


def test_ctkd_training_moves_the_temperature_and_logs_it(digits, tmp_path):
    teacher = _teacher()
    d = _distiller("ctkd", teacher, epochs=3, curriculum_epochs=2)
    t0 = d.losses["ctkd"].temperature.theta.item()
    res = fit(d, _loader(digits), LoopSettings(epochs=3, lr=0.1, seed=2), run_dir=tmp_path,
              progress=False)
    assert d.losses["ctkd"].temperature.theta.item() != t0
    temps = [r["train/ctkd/temperature"] for r in _rows(tmp_path / "metrics.jsonl")]
    assert len(temps) == 3 and len(set(temps)) == 3 and all(1 <= t <= 21 for t in temps)
    assert [r["train/ctkd/temperature"] for r in res.history] == temps


def _resume_case(digits, tmp_path, make, stop_at, views=None, cache=None):
    settings = LoopSettings(epochs=2, lr=0.1, seed=5)
    full = make()
    fit(full, _loader(digits, views=views), settings, run_dir=tmp_path / "a", progress=False,
        teacher_cache=cache)
    part = make()
    with pytest.raises(TrainingInterrupted):
        fit(part, _loader(digits, views=views), settings, run_dir=tmp_path / "b",
            progress=False, stop_after=stop_at, teacher_cache=cache)
    again = make(seed=77)  # a fresh process: other init, everything from the checkpoint
    fit(again, _loader(digits, views=views), settings, run_dir=tmp_path / "b", resume=True,
        progress=False, teacher_cache=cache)
    sa, sb = full.state_dict(), again.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _rows(tmp_path / "a" / "metrics.jsonl") == _rows(tmp_path / "b" / "metrics.jsonl")
    return full


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_ctkd_resume_is_exact(digits, tmp_path, mode):
    teacher = _teacher()
    full = _resume_case(digits, tmp_path, lambda seed=1: _distiller(
        "ctkd", teacher, seed=seed, epochs=2, mode=mode, curriculum_epochs=2), stop_at=22)
    assert any(k.startswith("losses.ctkd.temperature.") for k in full.state_dict())


def test_ctkd_on_dkd_trains(digits):
    teacher = _teacher()
    d = _distiller("ctkd", teacher, epochs=1, base="dkd", warmup_epochs=1.0,
                   logit_standardization=True)
    res = fit(d, _loader(digits), LoopSettings(epochs=1, lr=0.1), progress=False)
    assert math.isfinite(res.history[-1]["train/ctkd"])
    assert 1 <= res.history[-1]["train/ctkd/temperature"] <= 21


def test_ctkd_arguments_are_checked():
    s, t = create_model("mlp", hidden=[8], input_size=8), {"t": _teacher()}
    with pytest.raises(KdkitError, match="mode"):
        build_method("ctkd", s, t, mode="local")
    with pytest.raises(KdkitError, match="alpha"):
        build_method("ctkd", s, t, alpha=1.5)
    with pytest.warns(UserWarning, match="curriculum is off"):
        build_method("ctkd", s, t)


# ------------------------------------------------------------------------------- CRD


def test_nce_loss_by_hand():
    torch.manual_seed(0)
    n_data, tau = 5, 0.07
    v_s = F.normalize(torch.randn(2, 3, dtype=torch.float64), dim=1)
    v_t = F.normalize(torch.randn(2, 3, dtype=torch.float64), dim=1)
    m_s = F.normalize(torch.randn(n_data, 3, dtype=torch.float64), dim=1)
    m_t = F.normalize(torch.randn(n_data, 3, dtype=torch.float64), dim=1)
    rows = torch.tensor([[1, 0, 4], [3, 2, 2]])  # positive, then N = 2 negatives
    z0 = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    got, z = crd_loss(v_s, v_t, m_s, m_t, rows, z0, tau, n_data)

    def by_hand(v, bank):
        e = [[math.exp(float(bank[j] @ v[i]) / tau) for j in rows[i].tolist()] for i in range(2)]
        zc = sum(sum(r) for r in e) / 6 * n_data  # first batch: mean · n_data
        npn, total = 2 / n_data, 0.0
        for r in e:
            p = [x / zc for x in r]
            total += math.log(p[0] / (p[0] + npn + 1e-7))
            total += sum(math.log(npn / (q + npn + 1e-7)) for q in p[1:])
        return -total / 2, zc

    ls, zs = by_hand(v_s, m_t)  # the student's embedding against the teacher's bank
    lt, zt = by_hand(v_t, m_s)
    assert got.item() == pytest.approx(ls + lt, rel=1e-10)
    assert z.tolist() == pytest.approx([zs, zt], rel=1e-12)
    # once set, Z stays
    again, z2 = crd_loss(v_s, v_t, m_s, m_t, rows, torch.tensor([2.0, 3.0],
                                                                dtype=torch.float64), tau, n_data)
    assert z2.tolist() == [2.0, 3.0]
    p = torch.exp(torch.einsum("bkd,bd->bk", m_t[rows], v_s) / tau) / 2.0
    assert nce_loss(p, n_data).item() < again.item()  # (the student half is part of it)


def test_bank_momentum_update_touches_the_batch_rows_only():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(6, 4), dim=1)
    before = bank.clone()
    v = F.normalize(torch.randn(2, 4), dim=1)
    index = torch.tensor([4, 1])
    momentum_update(bank, index, v, 0.5)
    for row, i in enumerate(index.tolist()):
        want = 0.5 * before[i] + 0.5 * v[row]
        torch.testing.assert_close(bank[i], want / want.norm())
    for i in (0, 2, 3, 5):
        assert torch.equal(bank[i], before[i])


def test_negatives_avoid_the_own_sample_and_are_clipped():
    index = torch.arange(5)
    neg = draw_negatives(index, 5, 200, torch.Generator().manual_seed(0))
    assert neg.shape == (5, 200) and bool((neg != index[:, None]).all())
    assert set(neg.flatten().tolist()) == set(range(5))
    loss = CRDLoss(3, 3, feat_dim=4, negatives=16384)
    loss.begin_fit(5)
    loss.begin_step(StepInfo(index=torch.tensor([0, 1]), seed=1))
    loss(torch.randn(2, 3), torch.randn(2, 3))  # N clipped to n_data − 1 = 4
    assert loss.memory_s.shape == (5, 4)


def test_crd_step_updates_the_banks_and_only_student_and_heads_get_gradients(digits):
    teacher = _teacher()
    d = _distiller("crd", teacher)
    d.begin_fit(num_samples=len(digits.train))
    crd = d.losses["crd"]
    assert crd.n_data == len(digits.train)
    bank = crd.memory_s.clone()
    x, y = digits.train.x[:16], digits.train.y[:16]
    index = torch.arange(16) * 3
    out = d(x, y, index=index, seed=0)
    out["loss"].backward()
    changed = (crd.memory_s != bank).any(1)
    assert set(changed.nonzero().flatten().tolist()) == set(index.tolist())
    assert bool((crd.z > 0).all())
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert not crd.memory_s.requires_grad and not crd.memory_t.requires_grad
    assert {n.split(".")[2] for n, _ in d.named_parameters() if n.startswith("losses.")} == {
        "embed_s", "embed_t"}


def test_crd_needs_indices_and_a_sized_bank(digits, monkeypatch):
    d = _distiller("crd", _teacher())
    x, y = digits.train.x[:4], digits.train.y[:4]
    with pytest.raises(KdkitError, match="not sized"):
        d(x, y, index=torch.arange(4))
    d.begin_fit(num_samples=len(digits.train))
    with pytest.raises(KdkitError, match="sample indices"):
        d(x, y)
    with pytest.raises(KdkitError, match="holds"):
        d.begin_fit(num_samples=10)
    from kdkit import dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(KdkitError, match="global_batch_terms"):
        d(x, y, index=torch.arange(4))


def test_crd_resume_is_exact(digits, tmp_path):
    teacher = _teacher()
    full = _resume_case(digits, tmp_path, lambda seed=1: _distiller(
        "crd", teacher, seed=seed, negatives=64, kd_alpha=0.5), stop_at=7)
    state = full.state_dict()
    assert state["losses.crd.memory_s"].shape == (len(digits.train), 128)


def test_crd_cached_run_gives_the_live_losses(digits, tmp_path):
    teacher = _teacher()
    settings = LoopSettings(epochs=2, lr=0.05, seed=3, log_every=1)
    loader = _loader(digits, seed=3, views=2)
    live = _distiller("crd", teacher, negatives=64)
    res_live = fit(live, loader, settings, run_dir=tmp_path / "live", progress=False)
    cached_d = _distiller("crd", teacher, negatives=64)
    cache = TeacherCache.open_or_build(tmp_path / "cache", cached_d, digits.train,
                                       loader.augment, CacheSettings(views=2, dtype="float32"))
    res_cached = fit(cached_d, loader, settings, run_dir=tmp_path / "cached", progress=False,
                     teacher_cache=cache)
    for a, b in zip(_rows(tmp_path / "live" / "metrics.jsonl"),
                    _rows(tmp_path / "cached" / "metrics.jsonl"), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4, abs=1e-6)
    assert res_cached.history[-1]["train/crd"] == pytest.approx(
        res_live.history[-1]["train/crd"], rel=1e-4)
    torch.testing.assert_close(live.losses["crd"].memory_t, cached_d.losses["crd"].memory_t,
                               rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # torchrun processes (10-20 s): make test-slow; keeps the main suite under 5 min
def test_crd_under_torchrun_keeps_one_bank_and_gives_one_process_weights(tmp_path):
    """2 processes with global_batch_terms: every rank updates its banks with the gathered
    global batch and draws the same negatives, so the student reaches one process's
    weights; without the global batch CRD refuses, saying what to set."""
    from test_ddp import _max_diff, _ok, _worker

    spec = {"kind": "mlp", "method": "crd", "batch": 64, "epochs": 1,
            "method_kwargs": {"negatives": 256}}
    _ok(_worker(spec, tmp_path / "one.st"))
    _ok(_worker({**spec, "global_batch_terms": True}, tmp_path / "two.st", nproc=2))
    assert _max_diff(tmp_path / "one.st", tmp_path / "two.st") < 1e-5
    refused = _worker(spec, tmp_path / "shard.st", nproc=2)
    assert refused.returncode != 0 and "global_batch_terms" in refused.stderr


def test_ctkd_refuses_alpha_with_a_dkd_base_and_probes_the_class_count():
    """``alpha`` weighs KD against CE (base kd) and is refused with base dkd, where it would
    be ignored; the instance MLP's width is the probed logits' (not the last Linear's)."""
    torch.manual_seed(0)
    teacher = create_model("mlp", hidden=[24], num_classes=4, input_size=8)
    student = create_model("mlp", hidden=[16], num_classes=4, input_size=8)
    with pytest.raises(KdkitError, match="with base: dkd set dkd_alpha and dkd_beta"):
        build_method("ctkd", student, {"teacher": teacher}, base="dkd", alpha=0.5, epochs=2)

    class WithAnAuxHead(torch.nn.Module):  # the last-registered Linear is not the classifier
        def __init__(self):
            super().__init__()
            self.body = student
            self.aux = torch.nn.Linear(3, 7)  # never called

        def forward(self, x):
            return self.body(x)

    terms = build_method("ctkd", WithAnAuxHead(), {"teacher": teacher}, mode="instance",
                         epochs=2,
                         example_input=torch.zeros(2, 1, 8, 8))
    out = terms[-1].loss.temperature(torch.zeros(2, 4), torch.zeros(2, 4), 1.0)
    assert out.shape[0] == 2
