"""Data-free KD: records (every kind), graphs, reconstruction, DeepInversion, DAFL, pipelines."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.cli import main
from kdkit.config import config_from_dict
from kdkit.datafree import (
    KINDS,
    DeepInversionObjective,
    Generator,
    GeneratorLoader,
    RecordObjective,
    compute_record,
    load_record,
    load_transfer,
    optimise_inputs,
    save_record,
    teacher_fingerprint,
    train_generator,
)
from kdkit.datafree.graph import (
    default_layers,
    fourier_basis,
    graph_laplacian,
    layer_adjacency,
    leaf_chain,
)
from kdkit.datafree.records import layer_activations
from kdkit.errors import ConfigError, KdkitError
from kdkit.losses.datafree import (
    activation_loss,
    bn_statistics_loss,
    competition_loss,
    information_entropy_loss,
    jensen_shannon,
    l2_prior,
    matching_loss,
    one_hot_loss,
    total_variation,
)
from kdkit.models import create_model
from kdkit.pipelines.datafree import build_transfer
from kdkit.pipelines.experiment import run_experiment


def _train(model: nn.Module, data, epochs: int = 60) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        loss = F.cross_entropy(model(data.train.x), data.train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def mlp_teacher(digits):
    torch.manual_seed(0)
    return _train(create_model("mlp", num_classes=10, in_channels=1, input_size=8,
                               hidden=[32, 32], dropout=0.2), digits)


@pytest.fixture(scope="module")
def lenet_teacher(digits):
    torch.manual_seed(0)
    return _train(create_model("lenet5", num_classes=10, in_channels=1, input_size=8,
                               padding=4), digits, epochs=40)


def _synth(objective, digits, tmp, *, samples=40, steps=60, seed=0, **kw):
    return optimise_inputs(objective, out_dir=tmp, samples=samples, num_classes=10,
                           input_shape=(1, 8, 8), mean=digits.mean, std=digits.std, meta={},
                           batch_size=20, steps=steps, seed=seed, progress=False, **kw)


# ----------------------------------------------------------------------------- losses


def test_loss_reference_values():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert matching_loss(v, t).item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert matching_loss(v, t, mask).item() == 0.0  # only matched units count
    with pytest.raises(KdkitError, match="record targets"):
        matching_loss(v, t[:, :1])
    # BN statistics of x = [[0], [2]] (mean 1, var 1) against running (0, 4): 1 + 3.
    x = torch.tensor([[0.0], [2.0]])
    assert bn_statistics_loss(x, torch.zeros(1), torch.full((1,), 4.0)).item() == pytest.approx(4.0)
    img = torch.zeros(1, 1, 2, 2)
    img[0, 0, 0, 0] = 3.0  # differences: 3 down, 3 right -> sqrt(18)
    assert total_variation(img).item() == pytest.approx(math.sqrt(18.0), rel=1e-5)
    assert l2_prior(torch.tensor([[3.0, 4.0]])).item() == pytest.approx(5.0)
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    assert jensen_shannon(p, q).item() == pytest.approx(math.log(2.0), rel=1e-4)
    assert jensen_shannon(p, p).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.tensor([[2.0, -1.0, 0.5]])
    assert competition_loss(same, same).item() == pytest.approx(1.0, abs=1e-5)
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert one_hot_loss(logits).item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1])).item())
    assert activation_loss(torch.tensor([[-2.0, 4.0]])).item() == -3.0
    # Balanced batch mean prediction (0.5, 0.5): Σ p log p = −ln 2, the minimum for 2 classes.
    assert information_entropy_loss(logits).item() == pytest.approx(-math.log(2.0), rel=1e-4)
    assert information_entropy_loss(torch.tensor([[5.0, 0.0], [5.0, 0.0]])).item() > -0.1


# ----------------------------------------------------------------------------- graphs


def test_graph_of_an_mlp_is_its_absolute_weights(mlp_teacher, digits):
    chain = leaf_chain(mlp_teacher, digits.train.x[:2])
    assert chain == ["flatten", "fc1", "relu1", "drop1", "fc2", "relu2", "drop2", "fc_out"]
    assert default_layers(mlp_teacher, chain) == ["relu1", "relu2", "fc_out"]
    adj = layer_adjacency(mlp_teacher, chain, "relu1", "relu2", [32])
    assert torch.allclose(adj, mlp_teacher.fc2.weight.abs().T)
    lap = graph_laplacian([adj, layer_adjacency(mlp_teacher, chain, "relu2", "fc_out", [32])])
    assert lap.shape == (74, 74)
    assert torch.allclose(lap.sum(1), torch.zeros(74, dtype=torch.float64), atol=1e-9)
    evals, basis = fourier_basis(lap)
    assert evals[0].abs() < 1e-8 and bool((evals[1:] >= -1e-9).all())
    assert torch.allclose(basis.T @ basis, torch.eye(74, dtype=torch.float64), atol=1e-8)


def test_graph_of_conv_and_pool_layers(lenet_teacher, digits):
    chain = leaf_chain(lenet_teacher, digits.train.x[:2])
    assert default_layers(lenet_teacher, chain)[:2] == ["pool1", "pool2"]
    # pool1 (6, 6, 6) -> conv2 -> relu2 -> pool2 (16, 1, 1): each pooled output sums the
    # |weights| reaching its 2x2 window, i.e. every input neuron in conv2's field.
    adj = layer_adjacency(lenet_teacher, chain, "pool1", "pool2", [6, 6, 6])
    w = lenet_teacher.conv2.weight.abs()  # (16, 6, 5, 5)
    expected = torch.zeros(6, 6, 6, 16)
    for oy in range(2):
        for ox in range(2):
            expected[:, oy : oy + 5, ox : ox + 5, :] += w.permute(1, 2, 3, 0)
    assert torch.allclose(adj, expected.reshape(216, 16), atol=1e-5)


def test_residual_models_are_refused_for_spectral_records(digits):
    resnet = create_model("resnet8", num_classes=10, in_channels=1, input_size=8).eval()
    with pytest.raises(KdkitError, match="feed-forward chain"):
        compute_record(resnet, digits.train.x[:50], digits.train.y[:50].remainder(10),
                       kind="spectral_pairs", num_classes=10, progress=False)


# ----------------------------------------------------------------------------- records


def test_top_layer_record_is_the_class_statistics_of_logits_over_t(mlp_teacher, digits):
    rec = compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="top_layer",
                         num_classes=10, temperature=8.0, progress=False)
    with torch.no_grad():
        z = mlp_teacher(digits.train.x).double() / 8.0
    for c in (0, 7):
        zc = z[digits.train.y == c]
        assert torch.allclose(rec.tensors["group0/mean"][c].double(), zc.mean(0), atol=1e-5)
        cov = torch.cov(zc.T, correction=0)
        chol = rec.tensors["group0/chol"][c].double()
        assert torch.allclose(chol @ chol.T, cov, atol=1e-4)
    # Targets sampled from the record have the recorded class mean and covariance.
    obj = RecordObjective(mlp_teacher, rec)
    y = torch.full((20000,), 3)
    t = obj.sample_targets(y, torch.Generator().manual_seed(0))[0].double()
    chol = rec.tensors["group0/chol"][3].double()
    assert torch.allclose(t.mean(0), rec.tensors["group0/mean"][3].double(), atol=0.02)
    assert torch.allclose(torch.cov(t.T), chol @ chol.T, atol=0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_records_saves_loads_and_reconstructs(kind, mlp_teacher, lenet_teacher,
                                                         digits, tmp_path):
    for teacher in (mlp_teacher, lenet_teacher):
        if kind == "all_layers_dropout" and teacher is lenet_teacher:
            with pytest.raises(KdkitError, match="has none; use all_layers"):
                compute_record(teacher, digits.train.x, digits.train.y, kind=kind,
                               num_classes=10, progress=False)
            continue
        rec = compute_record(teacher, digits.train.x, digits.train.y, kind=kind,
                             num_classes=10, progress=False)
        folder = save_record(rec, tmp_path / f"rec-{id(teacher)}")
        loaded = load_record(folder)
        assert loaded.kind == kind and loaded.layers == rec.layers
        assert loaded.meta() == rec.meta()
        assert all(torch.equal(loaded.tensors[k], v) for k, v in rec.tensors.items())
        if kind.startswith("spectral"):
            for g in rec.groups:
                assert g["coefficients"] == math.ceil(0.1 * g["dim"])
        obj = RecordObjective(teacher, loaded)
        y = torch.arange(20) % 10
        loss = obj.batch_loss(y, torch.Generator().manual_seed(1))
        start = loss((0.15 + 0.1 * torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(2)) - digits.mean) / digits.std)
        ts = _synth(obj.batch_loss, digits, tmp_path / f"set-{kind}-{id(teacher)}", samples=20)
        # The optimised inputs reach a lower objective than where they started ...
        assert ts.meta["final_loss_mean"] < 0.5 * float(start.detach())
        # ... and the teacher mostly recognises the class each input was made for.
        with torch.no_grad():
            agree = (teacher(ts.x).argmax(1) == ts.y).float().mean().item()
        assert agree >= 0.7, (kind, agree)


def test_spectral_objectives_use_the_graph_coefficients(mlp_teacher, digits):
    x = digits.train.x[:10]
    y = digits.train.y[:10]
    recs = {k: compute_record(mlp_teacher, digits.train.x, digits.train.y, kind=k,
                              num_classes=10, progress=False)
            for k in ("all_layers", "spectral_all", "spectral_pairs")}
    losses = {}
    for k, rec in recs.items():
        gen = torch.Generator().manual_seed(0)
        obj = RecordObjective(mlp_teacher, rec)
        targets = obj.sample_targets(y, torch.Generator().manual_seed(0))
        losses[k] = obj.batch_loss(y, gen)(x).item()
        if k == "spectral_all":
            # By hand: project the concatenated activations on the kept basis columns.
            acts = torch.cat(layer_activations(mlp_teacher, x, rec.layers, 8.0), 1)
            coeff = acts @ rec.tensors["group0/basis"]
            assert losses[k] == pytest.approx(((coeff - targets[0]) ** 2).mean().item(), rel=1e-5)
            # Another basis gives another objective: the coefficients are really used.
            rec.tensors["group0/basis"] = rec.tensors["group0/basis"].flip(1)
            other = RecordObjective(mlp_teacher, rec).batch_loss(y, torch.Generator().manual_seed(0))
            assert abs(other(x).item() - losses[k]) > 1e-3
    assert len(recs["spectral_all"].groups) == 1 and len(recs["spectral_pairs"].groups) == 2
    assert len(recs["all_layers"].groups) == 3
    assert losses["spectral_all"] != pytest.approx(losses["all_layers"], rel=1e-3)
    assert losses["spectral_pairs"] != pytest.approx(losses["all_layers"], rel=1e-3)


def test_dropout_filters_are_fixed_per_batch_inside_the_teacher(mlp_teacher, digits):
    kw = dict(num_classes=10, progress=False)
    plain = compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="all_layers", **kw)
    drop = compute_record(mlp_teacher, digits.train.x, digits.train.y,
                          kind="all_layers_dropout", dropout=0.5, **kw)
    assert drop.meta()["dropout"] == 0.5
    x, y = digits.train.x[:40], digits.train.y[:40] % 10
    a = RecordObjective(mlp_teacher, plain).batch_loss(y, torch.Generator().manual_seed(0))
    loss = RecordObjective(mlp_teacher, drop).batch_loss(y, torch.Generator().manual_seed(0))
    first = loss(x).item()
    assert loss(x).item() == first  # the same filters at every step of the batch
    assert first != pytest.approx(a(x).item(), rel=1e-4)
    # The filters act inside the teacher: relu2 sees relu1 thinned by drop1's mask (p = 0.5,
    # kept units scaled by 2), and the teacher is left as it was (eval, no hooks).
    from kdkit.datafree.records import fixed_dropout

    masks: dict[int, torch.Tensor] = {}
    with fixed_dropout(mlp_teacher, masks, torch.Generator().manual_seed(3), 0.5):
        acts = layer_activations(mlp_teacher, x, ["relu1", "relu2"], 8.0)
    m1 = masks[id(mlp_teacher.drop1)]
    assert 0.35 < m1.mean().item() < 0.65
    h2 = torch.relu(mlp_teacher.fc2(acts[0] * m1 * 2.0))
    assert torch.allclose(acts[1], h2, atol=1e-5)
    assert not mlp_teacher.training and not mlp_teacher.drop1._forward_hooks
    with torch.no_grad():
        assert torch.equal(mlp_teacher(x), mlp_teacher(x))


def test_record_errors(mlp_teacher, lenet_teacher, digits, tmp_path):
    rec = compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="top_layer",
                         num_classes=10, progress=False)
    with pytest.raises(KdkitError, match="made from another teacher.*datafree record"):
        RecordObjective(lenet_teacher, rec)
    with pytest.raises(KdkitError, match="unknown record kind"):
        compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="spectral",
                       num_classes=10, progress=False)
    with pytest.raises(KdkitError, match="every one of 10 classes"):
        compute_record(mlp_teacher, digits.train.x[:5], digits.train.y[:5] * 0,
                       kind="top_layer", num_classes=10, progress=False)
    with pytest.raises(KdkitError, match="no module 'fc9'"):
        compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="all_layers",
                       layers=["fc9"], num_classes=10, progress=False)
    with pytest.raises(KdkitError, match="in forward order"):
        compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="spectral_all",
                       layers=["relu2", "relu1"], num_classes=10, progress=False)
    with pytest.raises(KdkitError, match="not leaf modules"):
        compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="spectral_all",
                       layers=["fc1", "relu9"], num_classes=10, progress=False)
    with pytest.raises(KdkitError, match="no metadata record"):
        load_record(tmp_path / "nothing")
    folder = save_record(rec, tmp_path / "rec")
    (folder / "record.safetensors").write_bytes(b"torn")
    with pytest.raises(KdkitError, match="corrupt"):
        load_record(folder)
    assert teacher_fingerprint(mlp_teacher) == rec.teacher


# ----------------------------------------------------------------------------- synthesis


def test_synthesis_is_deterministic_and_resumes_after_a_kill(mlp_teacher, digits, tmp_path):
    rec = compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="spectral_pairs",
                         num_classes=10, progress=False)
    obj = RecordObjective(mlp_teacher, rec).batch_loss
    full = _synth(obj, digits, tmp_path / "a", samples=60, steps=20)
    calls = {"n": 0}

    def dying(y, gen):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return obj(y, gen)

    with pytest.raises(KeyboardInterrupt):
        _synth(dying, digits, tmp_path / "b", samples=60, steps=20)
    assert sorted(p.name for p in (tmp_path / "b" / "batches").glob("*.json")) == ["b00000.json"]
    resumed = _synth(obj, digits, tmp_path / "b", samples=60, steps=20)
    assert torch.equal(resumed.x, full.x) and torch.equal(resumed.y, full.y)
    assert resumed.y.tolist() == [i % 10 for i in range(60)]
    other_seed = _synth(obj, digits, tmp_path / "c", samples=60, steps=20, seed=1)
    assert not torch.equal(other_seed.x, full.x)
    with pytest.raises(KdkitError, match="other settings"):  # finished, but not like this
        _synth(obj, digits, tmp_path / "b", samples=60, steps=21)
    assert torch.equal(load_transfer(tmp_path / "a").x, full.x)


# ----------------------------------------------------------------------------- DeepInversion


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


def test_deepinversion_matches_bn_statistics(digits, tmp_path, mlp_teacher):
    torch.manual_seed(0)
    net = _train(_BNNet(), digits, epochs=80)
    obj = DeepInversionObjective(net, tv_weight=1e-3, l2_weight=1e-4)
    x0 = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    terms = obj.terms(x0, y)
    feats = net.conv(x0)
    assert terms["bn"].item() == pytest.approx(
        bn_statistics_loss(feats, net.bn.running_mean, net.bn.running_var).item(), rel=1e-5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ts = _synth(obj, digits, tmp_path / "di", samples=20, steps=150, lr=0.05)
    after = obj.terms(ts.x, ts.y)
    # The teacher is untouched: no BN statistics updated, no gradients, no hooks left.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert not net.bn._forward_pre_hooks
    assert after["bn"] < 0.5 * terms["bn"]
    assert after["ce"] < 0.5 * terms["ce"]
    assert (net(ts.x).argmax(1) == ts.y).float().mean() >= 0.6
    assert net.bn.running_mean.requires_grad is False
    with pytest.raises(KdkitError, match="no BatchNorm layer.*bn_weight=0"):
        DeepInversionObjective(mlp_teacher)
    with pytest.raises(KdkitError, match="needs a student"):
        DeepInversionObjective(net, competition_weight=1.0)
    student = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[8])
    adi = DeepInversionObjective(net, competition_weight=1.0, student=student)
    assert 0.0 <= adi.terms(x0, y)["competition"].item() <= 1.0
    agree = competition_loss(torch.tensor([[4.0, 0.0]]), torch.tensor([[4.0, 0.0]]))
    disagree = competition_loss(torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]]))
    assert disagree.item() < 0.2 < 0.99 < agree.item()  # minimised where the two disagree


class _Reordered(nn.Module):
    """BN layers defined in the opposite order to their use, with different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_late = nn.BatchNorm2d(4)
        self.bn_early = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.bn_late(self.conv(self.bn_early(x))).mean((2, 3)))


def test_deepinversion_pairs_each_bn_with_its_own_input():
    net = _Reordered().eval()
    with torch.no_grad():
        net.bn_late.running_mean.fill_(1.0)
    x = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    terms = DeepInversionObjective(net).terms(x, torch.zeros(6, dtype=torch.long))
    early = bn_statistics_loss(x, net.bn_early.running_mean, net.bn_early.running_var)
    late = bn_statistics_loss(net.conv(net.bn_early(x)), net.bn_late.running_mean,
                              net.bn_late.running_var)
    assert terms["bn"].item() == pytest.approx((early + late).item(), rel=1e-5)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1)
            self.fc = nn.Linear(25, 10)

        def forward(self, x):
            return self.fc(self.bn(self.bn(x)).flatten(1))

    with pytest.raises(KdkitError, match="ran 2 times"):
        DeepInversionObjective(Twice().eval()).terms(x, torch.zeros(6, dtype=torch.long))


# ----------------------------------------------------------------------------- DAFL


def test_dafl_generator_learns_balanced_confident_samples(mlp_teacher):
    torch.manual_seed(0)
    g = Generator(latent_dim=16, channels=1, size=8, width=16)
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))

    def terms():
        g.eval()
        with torch.no_grad():
            logits = mlp_teacher(g(z))
        return one_hot_loss(logits).item(), information_entropy_loss(logits).item()

    oh0, _ = terms()
    hist = train_generator(mlp_teacher, g, latent_dim=16, steps=150, batch_size=64, lr=0.01,
                           seed=0, progress=False)
    oh1, ie1 = terms()
    assert oh1 < 0.5 * oh0  # confident outputs
    assert ie1 < -0.8 * math.log(10)  # close to balanced over the 10 classes
    assert hist[-1]["step"] == 149
    loader = GeneratorLoader(g, mlp_teacher, latent_dim=16, batch_size=8, steps_per_epoch=3,
                             seed=0)
    a = list(loader.epoch_batches(1))
    b = list(loader.epoch_batches(1, start_step=2))
    assert len(a) == 3 and torch.equal(a[2][0], b[0][0])  # resumable mid-epoch
    assert not torch.equal(a[0][0], list(loader.epoch_batches(0))[0][0])
    assert torch.equal(a[0][1], mlp_teacher(a[0][0]).argmax(1))
    with pytest.raises(KdkitError, match="multiple of 4"):
        Generator(size=10)


# ----------------------------------------------------------------------------- configs, runs


BASE = {
    "name": "df", "seeds": [0],
    "data": {"name": "digits", "val_fraction": 0.2},
    "teacher": {"model": {"name": "mlp", "hidden": [64, 64]},
                "train": {"epochs": 20, "batch_size": 64, "lr": 0.05}},
    "student": {"name": "mlp", "hidden": [32]},
    "train": {"epochs": 25, "batch_size": 64, "lr": 0.05},
}
KD8 = {"name": "kd", "temperature": 8.0, "alpha": 1.0}


def test_transfer_spec_errors():
    bad = [{"label": "a", "method": KD8, "transfer": {"source": "record"}},
           {"label": "b", "method": KD8, "transfer": {"source": "noise", "bn_weight": 1.0}},
           {"label": "c", "method": {"name": "ensemble_mean"},
            "transfer": {"source": "noise"}},
           {"label": "d", "method": KD8, "transfer": {"source": "record", "kind": "spectra"}}]
    with pytest.raises(ConfigError, match="data.synthetic trains every student"):
        config_from_dict({**BASE, "data": {**BASE["data"], "synthetic": "sets/s{seed}"},
                          "students": [{"label": "n", "method": KD8,
                                        "transfer": {"source": "noise"}}]})
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "students": bad})
    msg = str(e.value)
    assert "students[0].transfer: Value error, source 'record' needs a kind" in msg
    assert "bn_weight (deepinversion) do not apply to source 'noise'" in msg
    assert "students[2].transfer: data-free runs distil from one teacher" in msg
    assert "students[3].transfer.kind" in msg


def test_datafree_experiment_resumes_and_learns(tmp_path, monkeypatch):
    from conftest import kill_fit_call

    students = [
        {"label": "noise", "method": KD8, "transfer": {"source": "noise", "samples": 300}},
        {"label": "spectral", "method": KD8,
         "transfer": {"source": "record", "kind": "spectral_all", "samples": 300,
                      "steps": 100, "batch_size": 150}},
        {"label": "dafl", "method": {**KD8, "temperature": 1.0},
         "transfer": {"source": "dafl", "samples": 256, "steps": 30, "batch_size": 64,
                      "width": 8, "lr": 0.01}},
    ]
    cfg = config_from_dict({**BASE, "students": students})
    restore = kill_fit_call(monkeypatch, call=3, steps=3)  # dies in the spectral student
    from kdkit.train.loop import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        run_experiment(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    restore()
    res = run_experiment(cfg, tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    rows = {r["label"]: r for r in res["rows"]}
    runs = {r["label"].split("/")[1]: r for r in res["runs"]}
    assert runs["spectral"]["transfer"] == "record" and runs["spectral"]["record"] == "spectral_all"
    assert runs["spectral"]["train_samples"] == 300 and runs["spectral"]["record_bytes"] > 0
    assert runs["dafl"]["train_samples"] == 256  # 4 generator batches of 64 per epoch
    assert (tmp_path / "run/seed0/spectral/transfer/record/record.json").exists()
    assert (tmp_path / "run/seed0/dafl/transfer/generator.json").exists()
    # Distilled on 300 reconstructed inputs only, the student still learns the task.
    assert rows["spectral"]["test_acc_mean"] > 80.0
    assert rows["dafl"]["test_acc_mean"] > 30.0


def test_cli_record_synthesize_distill(tmp_path, capsys):
    t = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[32]", "--data", "digits",
                 "--epochs", "10", "--out", str(t), "--no-progress"]) == 0
    assert main(["datafree", "record", "--teacher", str(t), "--data", "digits", "--kind",
                 "top_layer", "--out", str(tmp_path / "rec"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "record size 4,400 bytes; teacher weights" in out
    assert main(["datafree", "synthesize", "--teacher", str(t), "--record",
                 str(tmp_path / "rec"), "--samples", "50", "--steps", "30", "--batch-size", "25",
                 "--out", str(tmp_path / "set"), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "set" / "transfer.json").read_text())
    assert meta["samples"] == 50 and meta["record"] == "top_layer"
    assert main(["distill", "--teacher", str(t), "--student", "mlp", "--model-arg",
                 "hidden=[16]", "--data", "digits", "--synthetic", str(tmp_path / "set"),
                 "--epochs", "2", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["train_samples"] == 50
    # Errors are one line: a record of another teacher, a missing record, a BN-less DI.
    t2 = tmp_path / "t2"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[8]", "--data", "digits",
                 "--epochs", "1", "--out", str(t2), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["datafree", "synthesize", "--teacher", str(t2), "--record", str(tmp_path / "rec"),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "made from another teacher" in capsys.readouterr().err
    assert main(["datafree", "synthesize", "--teacher", str(t), "--record", str(tmp_path / "no"),
                 "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "no metadata record" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(t2), "--student", "mlp", "--data", "digits",
                 "--synthetic", str(tmp_path / "set"), "--out", str(tmp_path / "s2"),
                 "--no-progress"]) == 2
    assert "made from another teacher" in capsys.readouterr().err
    assert main(["datafree", "deepinversion", "--teacher", str(t), "--out",
                 str(tmp_path / "z"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bn_weight=0" in err


def test_config_trains_students_on_a_synthetic_set_per_seed(tmp_path, mlp_teacher, digits):
    from kdkit.datafree import noise_set, save_transfer
    from kdkit.pipelines.runs import data_meta

    x, y = noise_set(mlp_teacher, samples=70, input_shape=(1, 8, 8), seed=0)
    save_transfer(tmp_path / "sets" / "seed0", x, y, {"source": "noise", "data": data_meta(digits)})
    cfg = config_from_dict({
        **BASE, "data": {**BASE["data"], "synthetic": str(tmp_path / "sets" / "seed{seed}")},
        "students": [{"label": "kd", "method": KD8, "train": {"epochs": 2}}],
    })
    res = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    student = [r for r in res["runs"] if r["label"] == "seed0/kd"][0]
    assert student["train_samples"] == 70
    cfg.seeds = [1]  # no set was made for seed 1
    with pytest.raises(KdkitError, match="no transfer set at .*seed1"):
        run_experiment(cfg, tmp_path / "run1", progress=False, log=lambda s: None)


def test_default_layers_skip_dropout_and_take_the_pool():
    mlp = create_model("mlp_hinton_1200", num_classes=10, in_channels=1, input_size=8)
    chain = leaf_chain(mlp, torch.zeros(2, 1, 8, 8))
    assert default_layers(mlp, chain) == ["relu1", "relu2", "fc_out"]
    lenet = create_model("lenet5", num_classes=10, in_channels=1, input_size=8, padding=4)
    chain = leaf_chain(lenet, torch.zeros(2, 1, 8, 8))
    assert default_layers(lenet, chain) == ["pool1", "pool2", "relu3", "relu4", "fc3"]


def test_lenet_with_batch_norm_graph_and_deepinversion(digits):
    net = create_model("lenet5", num_classes=10, in_channels=1, input_size=8, padding=4,
                       batch_norm=True)
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn2, nn.BatchNorm2d)
    with torch.no_grad():
        net.bn2.running_var.fill_(4.0)
        net.bn2.weight.fill_(-3.0)  # |γ| / sqrt(var + eps) = 1.5
    net.eval()
    chain = leaf_chain(net, digits.train.x[:2])
    with_bn = layer_adjacency(net, chain, "pool1", "pool2", [6, 6, 6])
    plain = create_model("lenet5", num_classes=10, in_channels=1, input_size=8, padding=4)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "bn" not in k})
    plain.eval()
    without = layer_adjacency(plain, leaf_chain(plain, digits.train.x[:2]), "pool1", "pool2",
                              [6, 6, 6])
    assert torch.allclose(with_bn, without * 3.0 / math.sqrt(4.0 + 1e-5), rtol=1e-5)
    assert len(DeepInversionObjective(net).bns) == 2
    with pytest.raises(KdkitError, match="batch_norm must be true or false"):
        create_model("lenet5", batch_norm="yes")


DAFL_KW = dict(input_shape=(1, 8, 8), seed=0, latent_dim=8, width=8, progress=False,
               steps=20, batch_size=16, lr=0.01)


def _killed_dafl(teacher, folder, monkeypatch, at_call=15):
    """Train a DAFL generator in ``folder`` and kill it in step ``at_call - 1``."""
    from kdkit.datafree import dafl as dafl_module

    real, calls = dafl_module.one_hot_loss, {"n": 0}

    def dying(logits):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(logits)

    monkeypatch.setattr(dafl_module, "one_hot_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        dafl_module.dafl_generator(teacher, folder, **DAFL_KW)
    monkeypatch.setattr(dafl_module, "one_hot_loss", real)


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


@pytest.fixture(scope="module")
def dafl_reference(mlp_teacher, tmp_path_factory):
    """An uninterrupted run of the tiny DAFL settings."""
    from kdkit.datafree.dafl import dafl_generator

    return dafl_generator(mlp_teacher, tmp_path_factory.mktemp("dafl") / "a", **DAFL_KW)


def test_dafl_generator_training_resumes_to_the_same_weights(mlp_teacher, dafl_reference,
                                                             tmp_path, monkeypatch):
    from kdkit.datafree.dafl import dafl_generator
    from kdkit.train.checkpoint import read_state

    folder = tmp_path / "b"
    _killed_dafl(mlp_teacher, folder, monkeypatch)  # the state after step 13 is kept
    # One file per checkpoint (weights, optimiser and JSON state together), the one
    # before it kept; no two-file checkpoint that a kill could tear.
    assert read_state(folder / "generator-partial.safetensors")[1]["step"] == 14
    assert read_state(folder / "generator-partial.prev.safetensors")[1]["step"] == 12
    assert not (folder / "generator-partial.json").exists()
    resumed = dafl_generator(mlp_teacher, folder, **DAFL_KW)
    _same_weights(dafl_reference, resumed)
    assert not list(folder.glob("generator-partial*"))  # the finished generator supersedes it
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["corrupt", "missing", "both"])
def test_dafl_unreadable_partial_falls_back_to_the_previous(damage, mlp_teacher, dafl_reference,
                                                           tmp_path, monkeypatch, capsys):
    """A damaged newest state (or a kill between save_state's two renames) resumes from the
    previous one, saying so; with neither readable, training starts over. Either way the
    generator is bit for bit the uninterrupted one."""
    from kdkit.datafree.dafl import dafl_generator

    folder = tmp_path / "g"
    _killed_dafl(mlp_teacher, folder, monkeypatch)
    newest = folder / "generator-partial.safetensors"
    prev = folder / "generator-partial.prev.safetensors"
    if damage == "missing":
        newest.unlink()
    else:
        data = bytearray(newest.read_bytes())
        data[-5] ^= 0xFF  # a flipped bit in the tensors: the SHA-256 no longer matches
        newest.write_bytes(bytes(data))
    if damage == "both":
        prev.write_bytes(b"torn")
    capsys.readouterr()
    resumed = dafl_generator(mlp_teacher, folder, **DAFL_KW)
    err = capsys.readouterr().err
    _same_weights(dafl_reference, resumed)
    if damage == "both":
        assert "training starts over" in err and "--force" not in err, err
    else:
        assert "resuming from the previous" in err and "generator-partial.prev" in err
        assert ("corrupt" in err and "step 12" in err) == (damage == "corrupt")
    assert not list(folder.glob("generator-partial*"))


def test_dafl_resumes_from_a_kdkit_0_1_partial(mlp_teacher, dafl_reference, tmp_path,
                                              monkeypatch):
    """kdkit 0.1 kept the partial generator as generator-partial.safetensors + .json."""
    from kdkit.datafree.dafl import dafl_generator
    from kdkit.train.checkpoint import read_state, save_checkpoint

    folder = tmp_path / "old"
    _killed_dafl(mlp_teacher, folder, monkeypatch)
    tensors, meta = read_state(folder / "generator-partial.safetensors")
    for p in folder.glob("generator-partial*"):
        p.unlink()
    meta.pop("epoch")
    save_checkpoint(folder / "generator-partial", tensors, meta)  # the old layout
    resumed = dafl_generator(mlp_teacher, folder, **DAFL_KW)
    _same_weights(dafl_reference, resumed)
    assert not list(folder.glob("generator-partial*"))


# ----------------------------------------------------------------------------- artifacts


def test_a_kill_while_an_artifact_is_replaced_never_pairs_new_weights_with_old_json(
        mlp_teacher, digits, tmp_path, monkeypatch):
    from kdkit.datafree import common, save_transfer
    from kdkit.pipelines.datafree import build_transfer

    folder = tmp_path / "t"
    x, y = torch.zeros(4, 1, 8, 8), torch.arange(4)
    save_transfer(folder, x, y, {"source": "test"})
    real = common.save_checkpoint

    def killed(stem, tensors, meta):  # new weights written, killed before the JSON
        (stem.with_suffix(".safetensors")).write_bytes(b"new weights")
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        save_transfer(folder, x + 1, y, {"source": "test"})
    monkeypatch.setattr(common, "save_checkpoint", real)
    # Incomplete (no JSON), not corrupt: readers make it again instead of failing forever.
    with pytest.raises(KdkitError, match="no transfer set"):
        load_transfer(folder)
    # The pipeline's noise set: made again when absent, or made with other settings.
    kw = dict(teacher=mlp_teacher, teacher_data=digits, data=digits, folder=folder, seed=0,
              log=lambda s: None)
    data, _, _ = build_transfer("noise", samples=30, **kw)
    assert len(data.train.y) == 30
    data, _, _ = build_transfer("noise", samples=40, **kw)
    assert len(data.train.y) == 40 and len(load_transfer(folder).y) == 40
    # A record replaced by one of another kind, killed half-way, is absent, not torn.
    rec = compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="top_layer",
                         num_classes=10, progress=False)
    save_record(rec, tmp_path / "rec")
    monkeypatch.setattr(common, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        save_record(rec, tmp_path / "rec")
    with pytest.raises(KdkitError, match="no metadata record"):
        load_record(tmp_path / "rec")


# ----------------------------------------------------------------------------- devices


def test_an_explicit_cpu_device_gives_what_the_default_gives(mlp_teacher, digits, tmp_path):
    """device="cpu" (where the teacher already is) changes nothing: the same draws, the
    same inputs, the same generator."""
    obj = RecordObjective(mlp_teacher, compute_record(
        mlp_teacher, digits.train.x, digits.train.y, kind="all_layers_dropout",
        num_classes=10, progress=False)).batch_loss
    assert obj.__self__.device == torch.device("cpu")
    a = _synth(obj, digits, tmp_path / "a", samples=20, steps=5)
    b = _synth(obj, digits, tmp_path / "b", samples=20, steps=5, device="cpu")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.meta["final_loss_mean"] == b.meta["final_loss_mean"]
    kw = dict(teacher=mlp_teacher, teacher_data=digits, data=digits, seed=0, progress=False,
              log=lambda s: None, samples=32, batch_size=16, steps=3, width=8, latent_dim=8)
    _, la, _ = build_transfer("dafl", folder=tmp_path / "da", **kw)
    _, lb, _ = build_transfer("dafl", folder=tmp_path / "db", device="cpu", **kw)
    _same_weights(la.generator, lb.generator)
    xa, ya, _ = next(la.epoch_batches(0))
    xb, yb, _ = next(lb.epoch_batches(0))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_build_transfer_on_a_device_saves_cpu_artifacts(mlp_teacher, digits, tmp_path):
    import copy

    teacher = copy.deepcopy(mlp_teacher)
    kw = dict(teacher=teacher, teacher_data=digits, data=digits, seed=0, progress=False,
              log=lambda s: None, samples=20, batch_size=10, steps=3, device="cpu")
    data, loader, info = build_transfer("record", folder=tmp_path / "r", kind="spectral_pairs",
                                        **kw)
    assert loader is None and info["record"] == "spectral_pairs"
    assert data.train.x.device.type == "cpu" and data.train.y.device.type == "cpu"
    rec = load_record(tmp_path / "r" / "record")
    assert rec.tensors and all(t.device.type == "cpu" for t in rec.tensors.values())
    ts = load_transfer(tmp_path / "r")
    assert ts.x.device.type == "cpu" and torch.equal(ts.x, data.train.x)
    assert ts.y.tolist() == [i % 10 for i in range(20)]
    data, _, _ = build_transfer("noise", folder=tmp_path / "n", **kw)
    assert data.train.y.device.type == "cpu" and len(load_transfer(tmp_path / "n").y) == 20
    with pytest.raises(KdkitError, match="not a device"):
        build_transfer("noise", folder=tmp_path / "x", **{**kw, "device": "gpu!"})


def test_loss_watch_off_the_cpu_names_the_first_bad_step_at_a_check_point():
    from kdkit.datafree.common import LossWatch

    watch = LossWatch(torch.device("cpu"), eager=False)  # an accelerator's bookkeeping
    for step, v in enumerate([1.0, 0.5, float("nan"), 2.0, float("inf")]):
        assert watch.see(torch.tensor(v), step) is None  # nothing read per step
    bad = watch.first_bad()
    assert bad is not None and bad[0] == 2 and math.isnan(bad[1])
    assert watch.last() == float("inf")
    fine = LossWatch(torch.device("cpu"), eager=False)
    fine.see(torch.tensor(3.0), 0)
    assert fine.first_bad() is None and fine.last() == 3.0
    eager = LossWatch(torch.device("cpu"))  # on the CPU each value is read at once
    assert eager.see(torch.tensor(1.0), 0) is None
    assert eager.see(torch.tensor(float("nan")), 1)[0] == 1


def test_a_deferred_nan_check_still_names_its_step(mlp_teacher, digits, tmp_path, monkeypatch):
    from kdkit.datafree import common, synthesis

    class Deferred(common.LossWatch):
        def __init__(self, device):
            super().__init__(device, eager=False)

    monkeypatch.setattr(synthesis, "LossWatch", Deferred)
    calls = {"n": 0}

    def objective(y, gen):
        def loss(x):
            calls["n"] += 1
            bad = float("nan") if calls["n"] >= 8 else 0.0
            return (x**2).mean() + bad
        return loss

    with pytest.raises(KdkitError, match="became nan at batch 0 step 7"):
        _synth(objective, digits, tmp_path / "s", samples=10, steps=20)
    assert calls["n"] == 20  # read at the end of the batch (off the CPU), not per step
    assert not list((tmp_path / "s" / "batches").glob("*.json"))  # nothing NaN was kept


@pytest.fixture
def meta_device(monkeypatch):
    """The 'meta' device as a stand-in accelerator: a module there has shapes but no data.
    An op that mixes a meta tensor with a CPU one raises, as on a GPU; reads back to the
    host (cpu(), float(), a boolean mask, ...) are faked as zeros here."""
    from kdkit.datafree import common

    T = torch.Tensor

    def zeros(t):
        return torch.zeros(t.shape, dtype=t.dtype)

    def faked(name, read):
        real = getattr(T, name)
        monkeypatch.setattr(T, name, lambda self, *a, **k: read(self, *a, **k)
                            if self.is_meta else real(self, *a, **k))

    real_to, real_getitem = T.to, T.__getitem__

    def to(self, *a, **k):
        try:
            return real_to(self, *a, **k)
        except NotImplementedError:  # out of meta
            return real_to(zeros(self), *a, **k)

    def getitem(self, idx):
        if isinstance(idx, torch.Tensor) and idx.is_meta and idx.dtype == torch.bool:
            assert self.device == idx.device
            return real_getitem(self, slice(0, 1))
        return real_getitem(self, idx)

    monkeypatch.setattr(T, "to", to)
    monkeypatch.setattr(T, "__getitem__", getitem)
    faked("cpu", lambda t: zeros(t))
    faked("item", lambda t: zeros(t).item())
    faked("tolist", lambda t: zeros(t).tolist())
    for name in ("__float__", "__int__", "__bool__", "__index__"):
        faked(name, lambda t, name=name: getattr(zeros(t), name)())
    unique, equal, first_bad = torch.unique, torch.equal, common.LossWatch.first_bad
    monkeypatch.setattr(torch, "unique", lambda t, *a, **k: (
        unique(zeros(t), *a, **k).to(t.device) if t.is_meta else unique(t, *a, **k)))

    def meta_equal(a, b):
        assert a.device == b.device
        return True if a.is_meta else equal(a, b)

    monkeypatch.setattr(torch, "equal", meta_equal)
    monkeypatch.setattr(common.LossWatch, "first_bad", lambda self: (
        None if not self.eager and self._bad_step.is_meta else first_bad(self)))
    return torch.device("meta")


def test_datafree_work_runs_where_the_teacher_is(meta_device, mlp_teacher, digits, tmp_path):
    """With the teacher on another device, every tensor the data-free code makes for it
    (inputs, targets, dropout filters, statistics, latents, optimiser state) is made there,
    and what it saves or returns is on the CPU. The fixture makes any mix an error."""
    import copy

    from kdkit.datafree import noise_set
    from kdkit.datafree.dafl import dafl_generator, sample_generator

    teacher = copy.deepcopy(mlp_teacher).to(meta_device)
    x, y = digits.train.x[:200], digits.train.y[:200]
    for kind in ("all_layers_dropout", "spectral_pairs"):
        rec = compute_record(teacher, x, y, kind=kind, num_classes=10, progress=False)
        assert all(t.device.type == "cpu" for t in rec.tensors.values())
        ts = _synth(RecordObjective(teacher, rec).batch_loss, digits, tmp_path / kind,
                    samples=10, steps=2)
        assert ts.x.device.type == "cpu" and ts.y.device.type == "cpu"
    bn_teacher = _BNNet().eval().to(meta_device)
    student = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[8])
    di = DeepInversionObjective(bn_teacher, competition_weight=1.0, student=student)
    assert next(student.parameters()).device == meta_device  # moved beside the teacher
    assert _synth(di, digits, tmp_path / "di", samples=10, steps=2).x.device.type == "cpu"
    g = dafl_generator(teacher, tmp_path / "dafl", **{**DAFL_KW, "steps": 3})
    assert next(g.parameters()).device == meta_device
    gx, gy = sample_generator(g, teacher, samples=20, latent_dim=8, seed=0)
    assert gx.device.type == "cpu" and gy.device.type == "cpu"
    loader = GeneratorLoader(g, teacher, latent_dim=8, batch_size=4, steps_per_epoch=1, seed=0)
    bx, by, index = next(loader.epoch_batches(0))
    assert bx.device == by.device == meta_device and index.device.type == "cpu"
    nx, ny = noise_set(teacher, samples=20, input_shape=(1, 8, 8), seed=0)
    assert nx.device.type == "cpu" and ny.device.type == "cpu"


# ----------------------------------------------------------------------------- progress


def test_progress_without_a_terminal_is_plain_lines(mlp_teacher, digits, tmp_path, monkeypatch,
                                                    capsys):
    """Logs get no carriage-return bar updates: a long stage prints a plain line now and
    then (here: every 0 s), a short one nothing; a terminal gets the bar."""
    import sys

    from kdkit import progress as common

    hist_kw = dict(latent_dim=8, steps=20, batch_size=16, lr=0.01, seed=0, progress=True)
    assert not sys.stderr.isatty()
    train_generator(mlp_teacher, Generator(8, 1, 8, 8), **hist_kw)  # short: quiet
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(common, "PLAIN_EVERY_S", 0.0)
    train_generator(mlp_teacher, Generator(8, 1, 8, 8), **hist_kw)
    compute_record(mlp_teacher, digits.train.x, digits.train.y, kind="spectral_all",
                   num_classes=10, batch_size=500)
    obj = RecordObjective(mlp_teacher, compute_record(
        mlp_teacher, digits.train.x, digits.train.y, kind="top_layer", num_classes=10,
        progress=False)).batch_loss
    optimise_inputs(obj, out_dir=tmp_path / "s", samples=20, num_classes=10,
                    input_shape=(1, 8, 8), mean=digits.mean, std=digits.std, meta={},
                    batch_size=10, steps=5, label="record synthesis")
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert sum(line.startswith("dafl generator: 20/20 steps (100%)") for line in lines) == 1
    assert any(line.startswith("dafl generator: 1/20 steps (5%)") for line in lines)
    assert any(line.startswith("record: energy: ") for line in lines)
    assert any(line.startswith("record: spectral_all: 2/2 batches") for line in lines)
    assert any(line.startswith("record synthesis: 10/10 steps") for line in lines)
    # --no-progress: nothing at all.
    train_generator(mlp_teacher, Generator(8, 1, 8, 8), **{**hist_kw, "progress": False})
    assert capsys.readouterr().err == ""
    # On a terminal: the tqdm bar, no plain lines.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = common.StageProgress("x", 10)
    assert not bar.plain and not bar.bar.disable
    bar.close()


# ----------------------------------------------------------------------------- CLI help


def test_datafree_help_is_plain_and_shows_defaults(capsys):
    from kdkit.cli_datafree import plain

    assert plain("``record`` and `x`") == "'record' and 'x'"
    helps = {}
    for argv in (["datafree"], ["datafree", "record"], ["datafree", "synthesize"],
                 ["datafree", "deepinversion"], ["datafree", "dafl"], ["datafree", "noise"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "`" not in text, argv
        helps[argv[-1]] = " ".join(text.split())
    assert "Only 'record' reads the training data" in helps["datafree"]
    assert "--steps STEPS Adam steps per batch of inputs (default: 1000)" in helps["synthesize"]
    assert "(default: 0.07)" in helps["synthesize"] and "(default: 0.15)" in helps["synthesize"]
    assert "(default: 2000)" in helps["deepinversion"] and "(default: 0.05)" in helps["deepinversion"]
    assert "--steps STEPS generator training steps (default: 1500)" in helps["dafl"]
    assert "(default: 0.2)" in helps["dafl"] and "--ie-weight IE_WEIGHT" in helps["dafl"]
    assert "--kind {top_layer," in helps["record"] and "(default: spectral_pairs)" in helps["record"]
    assert "--samples SAMPLES transfer set size (default: 10000)" in helps["noise"]
    assert "(default: None)" not in " ".join(helps.values())
    assert "(default: False)" not in " ".join(helps.values())
    # noise optimises nothing: no --steps, --lr or --batch-size, and they are refused.
    for flag in ("--steps", "--lr", "--batch-size", "--init-mean"):
        assert flag not in helps["noise"]
        assert main(["datafree", "noise", "--teacher", "t", "--out", "o", flag, "3"]) == 2
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {flag} 3" in err and err.startswith("kdkit: error:")


def test_datafree_commands_take_a_device(tmp_path, capsys):
    for action in ("record", "synthesize", "deepinversion", "dafl", "noise"):
        with pytest.raises(SystemExit):
            main(["datafree", action, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--device DEVICE where the teacher runs: auto (a GPU when there is one)" in text
        assert "mps; the draws are the same on every device (default: auto)" in text
    for bad in ("tpu", "cuda:99"):  # not a device; not on this machine (CPU build or GPUs)
        assert main(["datafree", "noise", "--teacher", "t", "--out", "o", "--device", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kdkit: error: kdkit datafree noise: argument --device: device")
        assert err.count("\n") == 1
    t = tmp_path / "t"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[8]", "--data", "digits",
                 "--epochs", "1", "--out", str(t), "--no-progress"]) == 0
    assert main(["datafree", "dafl", "--teacher", str(t), "--device", "cpu", "--samples", "12",
                 "--steps", "2", "--batch-size", "4", "--width", "8", "--latent-dim", "8",
                 "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    ts = load_transfer(tmp_path / "d")
    assert len(ts.y) == 12 and ts.x.device.type == "cpu"
