"""lm_features (issue 15): hidden-state (TinyBERT, with a learnt projection) and attention-map
(MiniLM's KL) terms for language models, paired along the depths; gpt and hf: models."""

import copy
import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdkit.cli import main
from kdkit.distill import Distiller, build_method
from kdkit.distill.methods_lm import decoder_blocks, uniform_pairing
from kdkit.errors import KdkitError
from kdkit.losses.lm_features import attention_kl, hidden_mse
from kdkit.models import create_model
from kdkit.pipelines.runs import train_one
from kdkit.train.artifacts import load_model
from kdkit.train.loop import LoopSettings
from lm_reference import resumed_equals_uninterrupted, text_dataset, train_teacher

CTX = 16
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                              reason="transformers is not installed (pip install 'kdkit[hf]')")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return text_dataset(tmp_path_factory.mktemp("text"), CTX)


@pytest.fixture(scope="module")
def teacher(text, tmp_path_factory):
    """A trained 4-block teacher: width 32, 4 heads."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), text, layers=4, heads=4, width=32,
                         epochs=3)


def _gpt(text, *, layers=2, heads=2, width=16, seed=1):
    torch.manual_seed(seed)
    return create_model("gpt", num_classes=text.num_classes, input_size=CTX, layers=layers,
                        heads=heads, width=width)


def test_terms_are_named_paired_evenly_and_train_the_student_and_projections_only(
        text, teacher):
    t, _ = load_model(teacher)
    s = _gpt(text)  # 2 blocks of width 16, 2 heads; the teacher: 4 of width 32, 4 heads
    x, y = text.train.x[:8], text.train.y[:8]
    terms = build_method("lm_features", s, {"t": t}, example_input=x, attention_weight=0.5)
    assert [term.name for term in terms] == ["ce", "hidden1", "hidden2", "attn1", "attn2"]
    pairs = [(term.student.path, term.teacher.path) for term in terms[1:]]  # type: ignore
    assert pairs == [("blocks.0", "blocks.1"), ("blocks.1", "blocks.3"),
                     ("blocks.0.attn.probs", "blocks.1.attn.probs"),
                     ("blocks.1.attn.probs", "blocks.3.attn.probs")]
    assert [term.weight for term in terms] == [1.0, 0.5, 0.5, 0.25, 0.25]  # weight / n
    for term in terms[1:3]:
        assert isinstance(term.adapter, nn.Linear)
        assert (term.adapter.in_features, term.adapter.out_features) == (16, 32)
    d = Distiller(s, {"t": t}, terms)
    out = d(x, y)
    assert all(torch.isfinite(out[k]) and out[k] > 0 for k in ("hidden1", "attn1", "attn2"))
    out["loss"].backward()
    assert all(p.grad is None for p in t.parameters())  # never the teacher
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.adapters.parameters())
    assert all(torch.isfinite(p.grad).all() for p in s.parameters() if p.grad is not None)
    # the attention terms' gradient reaches the student's queries and keys
    s.zero_grad()
    d.adapters.zero_grad()
    attn_only = Distiller(s, {"t": t}, build_method(
        "lm_features", s, {"t": t}, example_input=x, hidden_weight=0.0, ce_weight=0.0,
        attention_weight=1.0))
    attn_only(x, y)["loss"].backward()
    qkv = s.blocks[0].attn.qkv.weight.grad
    assert qkv is not None and qkv.abs().sum() > 0 and torch.isfinite(qkv).all()


def test_uniform_pairing_is_tinyberts_and_one_side_given_spreads_the_other(text):
    assert uniform_pairing(2, 4) == [1, 3]
    assert uniform_pairing(4, 12) == [2, 5, 8, 11]  # TinyBERT: layer m of 4 reads 3m of 12
    assert uniform_pairing(3, 3) == [0, 1, 2]
    assert uniform_pairing(3, 4) == [0, 2, 3]
    assert uniform_pairing(4, 2) == [0, 0, 1, 1]  # a deeper student shares teacher blocks
    assert uniform_pairing(5, 1) == [0] * 5
    s, t = _gpt(text, layers=3), _gpt(text, layers=6, width=32, heads=4)
    x = text.train.x[:2]
    terms = build_method("lm_features", s, {"t": t}, example_input=x, ce_weight=0.0,
                         student_layers=["blocks.2"])
    assert [(term.student.path, term.teacher.path) for term in terms] == [  # type: ignore
        ("blocks.2", "blocks.5")]
    terms = build_method("lm_features", s, {"t": t}, example_input=x, ce_weight=0.0,
                         teacher_layers=["blocks.1", "blocks.4"])
    assert [(term.student.path, term.teacher.path) for term in terms] == [  # type: ignore
        ("blocks.1", "blocks.1"), ("blocks.2", "blocks.4")]
    terms = build_method("lm_features", s, {"t": t}, example_input=x, ce_weight=0.0,
                         student_layers=["blocks.0", "blocks.0"],
                         teacher_layers=["blocks.0", "blocks.5"])
    assert [term.name for term in terms] == ["hidden1", "hidden2"]
    assert decoder_blocks(t) == [f"blocks.{i}" for i in range(6)]


def test_a_copy_of_the_teacher_has_zero_loss_and_another_student_does_not(text, teacher):
    t, _ = load_model(teacher)
    x, y = text.train.x[:8], text.train.y[:8]
    twin = copy.deepcopy(t).requires_grad_(True)
    terms = build_method("lm_features", twin, {"t": t}, example_input=x, attention_weight=1.0,
                         student_layers=["blocks.0", "blocks.2"],
                         teacher_layers=["blocks.0", "blocks.2"])
    assert all(term.adapter is None for term in terms)  # equal widths: no projection
    out = Distiller(twin, {"t": t}, terms)(x, y)
    for k in ("hidden1", "hidden2", "attn1", "attn2"):
        assert out[k].item() == pytest.approx(0.0, abs=1e-6)
    other = _gpt(text, layers=4, heads=4, width=32, seed=7)  # same shape, other weights
    terms = build_method("lm_features", other, {"t": t}, example_input=x, attention_weight=1.0)
    assert all(term.adapter is None for term in terms)
    out = Distiller(other, {"t": t}, terms)(x, y)
    assert all(out[f"hidden{i}"] > 1e-3 and out[f"attn{i}"] > 1e-3 for i in range(1, 5))


def test_attention_kl_is_exact_on_the_causal_triangle_without_nans():
    g = torch.Generator().manual_seed(0)
    b, h, n = 2, 3, 6
    future = torch.ones(n, n, dtype=torch.bool).triu(1)

    def maps(heads, scale=1.0):
        scores = torch.randn(b, heads, n, n, generator=g) * scale
        return scores.masked_fill(future, float("-inf")).softmax(-1)

    t = maps(h)
    s = maps(h, 3.0).requires_grad_(True)
    assert (s[..., future] == 0).all()  # the causal zeros are exactly zero
    assert attention_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    loss = attention_kl(s, t)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(s.grad).all()
    assert (s.grad[..., future] == 0).all()
    # the reference: Σ_{k ≤ q} t log(t / s) per row, averaged over heads, rows and batch
    low = ~future
    ref = (t * (t.log() - s.detach().log()))[..., low].sum() / (b * h * n)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # different head counts: both sides averaged over heads first
    t4 = maps(4)
    mixed = attention_kl(s.detach(), t4)
    assert mixed.item() == pytest.approx(
        attention_kl(s.detach().mean(1, keepdim=True), t4.mean(1, keepdim=True)).item())
    # a teacher probability that underflowed to 0 below the diagonal contributes 0
    t0 = t.clone()
    t0[0, 0, 3, :2] = 0.0
    t0[0, 0, 3] /= t0[0, 0, 3].sum()
    assert torch.isfinite(attention_kl(s.detach(), t0))
    # padded query rows (label -100) are left out
    target = torch.zeros(b, n, dtype=torch.long)
    target[:, 4:] = -100
    per_row = (t * (t.log() - s.detach().log())).masked_fill(future, 0).sum(-1).mean(1)
    assert attention_kl(s.detach(), t, target).item() == pytest.approx(
        per_row[:, :4].mean().item(), rel=1e-5)
    assert attention_kl(s.detach(), t, torch.full((b, n), -100)).item() == 0.0


def test_hidden_mse_averages_real_positions_and_refuses_other_shapes():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    assert hidden_mse(s, t).item() == pytest.approx(nn.functional.mse_loss(s, t).item())
    target = torch.zeros(2, 5, dtype=torch.long)
    target[1, 2:] = -100
    keep = target != -100
    assert hidden_mse(s, t, target).item() == pytest.approx(
        ((s - t) ** 2)[keep].mean().item(), rel=1e-6)
    with pytest.raises(KdkitError, match=r"\(2, 5, 4\) and the teacher's \(2, 3, 4\)"):
        hidden_mse(s, t[:, :3])
    with pytest.raises(KdkitError, match=r"student's attention map \(2, 1, 5, 5\) and the "
                                         r"teacher's \(2, 1, 4, 4\)"):
        attention_kl(torch.rand(2, 1, 5, 5), torch.rand(2, 1, 4, 4))


def test_training_on_the_hidden_states_brings_them_closer_to_the_teachers(text, teacher):
    t, _ = load_model(teacher)
    s = _gpt(text, seed=3)
    terms = build_method("lm_features", s, {"t": t}, example_input=text.train.x[:4],
                         ce_weight=0.0)
    d = Distiller(s, {"t": t}, terms)
    xt, yt = text.test.x, text.test.y

    def held_out() -> float:
        d.eval()
        with torch.no_grad():
            out = d(xt, yt)
        d.train()
        return float(out["hidden1"] + out["hidden2"])

    before = held_out()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(text.train.x), (32,), generator=g)
        loss = d(text.train.x[idx], text.train.y[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.3 * before, (before, after)


def test_a_resumed_run_reaches_the_uninterrupted_runs_weights(text, teacher, tmp_path):
    t, _ = load_model(teacher)
    common = dict(label="s", data=text, model_name="gpt",
                  model_kwargs={"layers": 2, "heads": 2, "width": 16}, method="lm_features",
                  method_kwargs={"attention_weight": 0.5, "kd_weight": 0.5}, teachers={"t": t},
                  settings=LoopSettings(epochs=2, optimizer="adamw", lr=3e-3,
                                        weight_decay=0.0),
                  batch_size=32, augment=None, progress=False)
    resumed = resumed_equals_uninterrupted(tmp_path, **common)
    ck = load_file(resumed / "checkpoint" / "state.safetensors")
    assert any("adapters.hidden1" in k for k in ck)  # the projections are checkpointed
    # the teacher-output cache stores hidden states and attention maps: the same training
    train_one(run_dir=tmp_path / "c", teacher_cache={"views": 1, "dtype": "float32"},
              cache_root=tmp_path / "cache", **common)
    a = load_file(tmp_path / "a" / "model.safetensors")
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-5


@needs_hf
def test_an_hf_gpt2_teacher_pairs_with_a_gpt_student(text):
    torch.manual_seed(0)
    t = create_model("hf:gpt2", config={"n_layer": 4, "n_head": 2, "n_embd": 24},
                     num_classes=text.num_classes, input_size=CTX)
    assert decoder_blocks(t) == [f"transformer.h.{i}" for i in range(4)]
    s = _gpt(text)  # 2 heads of width 16
    x, y = text.train.x[:4], text.train.y[:4]
    terms = build_method("lm_features", s, {"t": t}, example_input=x, attention_weight=1.0)
    assert [(term.student.path, term.teacher.path) for term in terms[1:]] == [  # type: ignore
        ("blocks.0", "transformer.h.1"), ("blocks.1", "transformer.h.3"),
        ("blocks.0.attn.probs", "transformer.h.1.attn.probs"),
        ("blocks.1.attn.probs", "transformer.h.3.attn.probs")]
    assert terms[1].adapter is not None and terms[1].adapter.out_features == 24
    d = Distiller(s, {"t": t}, terms)
    out = d(x, y)
    assert all(torch.isfinite(out[k]) and out[k] > 0 for k in ("hidden1", "hidden2", "attn1"))
    out["loss"].backward()
    assert all(p.grad is None for p in t.parameters())
    # an hf: student the other way round: its blocks and attention maps are found too
    terms = build_method("lm_features", t, {"s": s}, example_input=x, attention_weight=1.0)
    assert [term.student.path for term in terms[1:]] == [  # type: ignore
        f"transformer.h.{i}" for i in range(4)] + [
        f"transformer.h.{i}.attn.probs" for i in range(4)]


class _NoBlocks(nn.Module):
    """A bigram language model: no decoder blocks."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


class _FirstHalf(nn.Module):
    """A gpt that reads only the first half of each window."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x[:, : x.shape[1] // 2])


def test_the_errors_name_the_problem_and_the_fix(text, teacher):
    t, _ = load_model(teacher)
    s = _gpt(text)
    x = text.train.x[:2]

    def build(student=s, teachers=None, **kw):
        return build_method("lm_features", student, teachers or {"t": t}, example_input=x, **kw)

    with pytest.raises(KdkitError, match=r"no decoder blocks found in the teacher "
                                         r"\(_NoBlocks.*name them with teacher_layers"):
        build(teachers={"t": _NoBlocks(text.num_classes)})
    with pytest.raises(KdkitError, match="no decoder blocks found in the student.*student_layers"):
        build(student=_NoBlocks(text.num_classes))
    with pytest.raises(KdkitError, match=r"student_layers \['blocks.0'\] and teacher_layers "
                                         r"\['blocks.0', 'blocks.1'\].*same length"):
        build(student_layers=["blocks.0"], teacher_layers=["blocks.0", "blocks.1"])
    with pytest.raises(KdkitError, match="teacher_layers is empty"):
        build(teacher_layers=[])
    with pytest.raises(KdkitError, match="has no module 'blocks.9'"):
        build(student_layers=["blocks.9"])
    with pytest.raises(KdkitError, match=r"student's 'blocks.0.mlp' holds no attention map.*"
                                         r"attention_weight: 0"):
        build(student_layers=["blocks.0.mlp"], attention_weight=1.0)
    with pytest.raises(KdkitError, match=r"student's 'blocks.0' gives \(2, 16, 16\) and the "
                                         r"teacher's 'm.blocks.1' gives \(2, 8, 32\)"):
        build(teachers={"t": _FirstHalf(t)}, teacher_layers=["m.blocks.1", "m.blocks.3"])
    with pytest.raises(KdkitError, match="all 0, so nothing is distilled"):
        build(hidden_weight=0.0)
    with pytest.raises(KdkitError, match="hidden_weight and attention_weight must be >= 0"):
        build(attention_weight=-1.0)
    with pytest.raises(KdkitError, match="pass example_input"):
        build_method("lm_features", s, {"t": t})
    with pytest.raises(KdkitError, match="exactly one teacher"):
        build(teachers={"a": t, "b": t})
    with pytest.raises(KdkitError, match="inputs are token ids"):
        build_method("lm_features", s, {"t": t}, example_input=torch.rand(2, 3, 8, 8))
    with pytest.raises(KdkitError, match="has no argument 'hidden_wieght'"):
        build(hidden_wieght=1.0)
    # attention alone needs no example input; kd alone needs no blocks
    assert [term.name for term in build_method(
        "lm_features", s, {"t": t}, hidden_weight=0.0, attention_weight=1.0)][-1] == "attn2"
    assert [term.name for term in build(teachers={"t": _NoBlocks(text.num_classes)},
                                        hidden_weight=0.0, kd_weight=1.0,
                                        divergence="rkl")] == ["ce", "rkl"]


def test_kdkit_methods_lists_lm_features(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lm_features" in out and "TinyBERT" in out and "hidden_weight" in out
