"""Language models on kdkit's core: token data, lm_kd (divergences, top-k, on-policy),
seqkd, the loop's bits per character, resume, the teacher-output cache, eval, generate."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kdkit.cli import main
from kdkit.distill import Distiller, build_method
from kdkit.distill.methods_lm import OnPolicy, cached_topk
from kdkit.distill.sampling import sample
from kdkit.distill.term import StepInfo
from kdkit.errors import KdkitError
from kdkit.losses.lm import forward_kl, topk_kl
from kdkit.models import create_model
from kdkit.pipelines.runs import train_one
from kdkit.train.artifacts import load_model
from kdkit.train.loop import LoopSettings
from kdkit.train.metrics import evaluate
from lm_reference import TEXT, resumed_equals_uninterrupted, text_dataset, train_teacher

SETTINGS = LoopSettings(epochs=2, optimizer="adamw", lr=3e-3, weight_decay=0.0)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return text_dataset(tmp_path_factory.mktemp("text"), 16)


@pytest.fixture(scope="module")
def teacher(text, tmp_path_factory):
    return train_teacher(tmp_path_factory.mktemp("teacher"), text, layers=2, heads=2, width=32,
                         epochs=8)


def _student(text, seed=1):
    torch.manual_seed(seed)
    return create_model("gpt", num_classes=text.num_classes, input_size=16, layers=1, heads=2,
                        width=16)


def test_text_windows_feed_a_gpt_and_bpc_is_the_cross_entropy_in_bits(text, teacher):
    assert text.input_shape == (16,) and text.train.x.dtype == torch.long
    assert torch.equal(text.train.y[:, :-1], text.train.x[:, 1:])
    model, meta = load_model(teacher)
    assert meta["data"]["vocab"]["kind"] == "char"  # saved for `kdkit generate`
    ev = evaluate(model, text.test.x, text.test.y)
    assert ev["bpc"] == pytest.approx(ev["loss"] / math.log(2))
    summary = json.loads((teacher / "summary.json").read_text())
    assert summary["test_bpc"] == pytest.approx(ev["bpc"])
    # the teacher learnt the (very repetitive) text: far below a uniform guess
    assert summary["test_bpc"] < 0.6 * math.log2(text.num_classes)
    records = [json.loads(ln) for ln in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert all("val/bpc" in r for r in records) and records[-1]["val/bpc"] < records[0]["val/bpc"]


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
def test_lm_kd_distils_every_divergence_and_trains_the_student_only(text, teacher, divergence):
    t, _ = load_model(teacher)
    s = _student(text)
    terms = build_method("lm_kd", s, {"t": t}, example_input=text.train.x[:2],
                         divergence=divergence, ce_weight=0.5)
    assert [x.name for x in terms] == ["ce", divergence]
    d = Distiller(s, {"t": t}, terms)
    out = d(text.train.x[:8], text.train.y[:8])
    assert torch.isfinite(out["loss"]) and out[divergence] > 0
    out["loss"].backward()
    assert all(p.grad is None for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())


def test_the_top_k_teacher_live_and_packed_give_the_same_loss(text, teacher):
    t, _ = load_model(teacher)
    s = _student(text)
    x, y = text.train.x[:8], text.train.y[:8]
    live = Distiller(s, {"t": t}, build_method("lm_kd", s, {"t": t}, topk=8,
                                               example_input=x))(x, y)
    with torch.no_grad():
        packed = {"t": {"<model>:output": cached_topk(t(x), 8)}}
    cached = Distiller(s, {"t": t}, build_method("lm_kd", s, {"t": t}, topk=8,
                                                 example_input=x))(x, y, teacher_outputs=packed)
    assert cached["top8_uniform"].item() == pytest.approx(live["top8_uniform"].item(), abs=1e-6)
    # k = V is the full forward KL
    with torch.no_grad():
        zt, zs = t(x), s(x)
        full = forward_kl(zs, zt)
        lp, ids = torch.log_softmax(zt, -1).topk(zt.shape[-1], dim=-1)
        assert topk_kl(zs, lp, ids).item() == pytest.approx(full.item(), abs=1e-5)


def test_on_policy_samples_the_students_continuations_in_a_fraction_of_steps(text):
    s = _student(text)
    x = text.train.x[:4]
    inner = torch.nn.Identity()
    always = OnPolicy(inner, 1.0, 0.5, 1.0)
    x2 = always.second_view(x, StepInfo(seed=3, student=s))
    assert x2.shape == x.shape and torch.equal(x2[:, :8], x[:, :8])
    assert not torch.equal(x2, x)
    again = always.second_view(x, StepInfo(seed=3, student=s))
    assert torch.equal(x2, again)  # drawn from the step's seed: a resume draws the same
    never = OnPolicy(inner, 0.0, 0.5, 1.0)
    assert never.second_view(x, StepInfo(seed=3, student=s)) is x
    half = OnPolicy(inner, 0.5, 0.5, 1.0)
    on = sum(half.second_view(x, StepInfo(seed=k, student=s)) is not x for k in range(200))
    assert 70 < on < 130
    with pytest.raises(KdkitError, match=r"on_policy \(λ\) must be in \[0, 1\]"):
        OnPolicy(inner, 1.5, 0.5, 1.0)


def test_the_key_value_cache_decodes_as_the_full_forward(text):
    s = _student(text).eval()
    x = text.test.x[:3]
    logits, past = s.step(x[:, :5])
    steps = [logits]
    for i in range(5, 16):
        out, past = s.step(x[:, i:i + 1], past)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), s(x), atol=1e-5, rtol=1e-5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)

    class Plain(torch.nn.Module):  # the same model without its cache
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            return self.m(z)

    a = sample(s, x[:, :4], 12, context=16, generator=g1)
    b = sample(Plain(s), x[:, :4], 12, context=16, generator=g2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method, kwargs", [
    ("lm_kd", {"divergence": "jsd", "on_policy": 0.5}),
    ("seqkd", {}),
])
def test_sampling_methods_resume_to_the_same_weights(text, teacher, tmp_path, method, kwargs):
    """Their second views are drawn from (seed, epoch, step): a run stopped and resumed
    reaches the uninterrupted run's weights."""
    t, _ = load_model(teacher)
    common = dict(label="s", data=text, model_name="gpt",
                  model_kwargs={"layers": 1, "heads": 2, "width": 16}, method=method,
                  method_kwargs=kwargs, teachers={"t": t}, settings=SETTINGS, batch_size=16,
                  augment=None, progress=False)
    resumed_equals_uninterrupted(tmp_path, **common)
    if method == "lm_kd":
        last = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0.0 <= last["train/jsd/on_policy"] <= 1.0


def test_the_fp32_teacher_cache_trains_the_live_teachers_weights(text, teacher, tmp_path):
    t, _ = load_model(teacher)
    common = dict(label="s", data=text, model_name="gpt",
                  model_kwargs={"layers": 1, "heads": 2, "width": 16}, method="lm_kd",
                  method_kwargs={"divergence": "rkl"}, teachers={"t": t}, settings=SETTINGS,
                  batch_size=16, augment=None, progress=False)
    train_one(run_dir=tmp_path / "live", **common)
    train_one(run_dir=tmp_path / "cached", teacher_cache={"views": 1, "dtype": "float32"},
              cache_root=tmp_path / "cache", **common)
    a = load_file(tmp_path / "live" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_eval_and_generate_through_the_cli(teacher, capsys):
    assert main(["eval", str(teacher), "--latency-repeats", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bpc"] == pytest.approx(report["loss"] / math.log(2), rel=1e-4)
    assert report["macs"] > 0
    assert main(["generate", str(teacher), "--prompt", "the quick", "--tokens", "30",
                 "--seed", "1"]) == 0
    first = capsys.readouterr()
    assert first.out.startswith("the quick") and len(first.out.rstrip("\n")) == 9 + 30
    assert "ms/token" in first.err
    assert main(["generate", str(teacher), "--prompt", "the quick", "--tokens", "30",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out == first.out  # the same seed, the same text
    assert main(["generate", str(teacher), "--prompt", "Zebra!", "--tokens", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdkit: error: --prompt: ") and "\n" not in err


def test_a_language_model_experiment_validates_and_refuses_image_options(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    cfg = tmp_path / "lm.yaml"
    base = (f"name: lm\nseeds: [0]\ndata: {{name: 'text:{corpus}', context: 16}}\n"
            "teacher: {model: {name: gpt, layers: 1, heads: 2, width: 16}}\n"
            "student: {name: gpt, layers: 1, heads: 2, width: 8}\n"
            "students:\n  - {label: fkl, method: {name: lm_kd}}\n")
    cfg.write_text(base)
    assert main(["validate", str(cfg)]) == 0
    cfg.write_text(base.replace("context: 16}", "context: 16, resize: 32}"))
    assert main(["validate", str(cfg)]) == 2
    assert "data.resize: " in capsys.readouterr().err
    cfg.write_text(base.replace(f"'text:{corpus}', context: 16", "digits, context: 16"))
    assert main(["validate", str(cfg)]) == 2
    assert "data.context: 'digits' holds images" in capsys.readouterr().err


def test_export_refuses_a_language_model_in_one_line(teacher, capsys):
    assert main(["export", str(teacher), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a language model (token ids in); kdkit export writes image models" in err
    assert "\n" not in err and not (teacher / "model.onnx").exists()


def test_a_pretrained_language_model_teacher_reports_bits_per_character(text, teacher, tmp_path):
    """A teacher used as is (weights:) in an experiment gets its bits per character in its
    summary, and the table is the language-model one."""
    from kdkit.config import load_config
    from kdkit.pipelines.experiment import run_experiment

    path = tmp_path / "c.txt"
    path.write_text(TEXT * 3)
    cfg = load_config(None, [
        "seeds=[0]", f"data={{name: 'text:{path}', context: 16, val_fraction: 0.1}}",
        f"teacher={{model: {{name: gpt, layers: 2, heads: 2, width: 32, "
        f"weights: '{teacher / 'model.safetensors'}'}}}}",
        "student={name: gpt, layers: 1, heads: 2, width: 16}",
        "train={epochs: 1, batch_size: 16, optimizer: adamw, lr: 0.003}",
        "students=[{label: fkl, method: {name: lm_kd}}]", "eval={latency_repeats: 2}"])
    result = run_experiment(cfg, tmp_path / "e", progress=False, log=lambda s: None)
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["teacher"]["test_bpc_mean"] == pytest.approx(
        json.loads((teacher / "summary.json").read_text())["test_bpc"], abs=1e-6)
    assert "test bpc" in (tmp_path / "e" / "table.md").read_text()
