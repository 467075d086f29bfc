"""Language models as teachers and students: the zoo's GPT and the ``hf:`` source (issue 15)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.models import count_parameters, create_model
from kdkit.models.gpt import GPT
from kdkit.taps import Tap, run_with_taps

V, CTX = 84, 32
HAS_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="transformers is not installed "
                              "(pip install 'kdkit[hf]')")
TINY_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 32}


def _tiny(**kw: object) -> GPT:
    torch.manual_seed(0)
    args = {"num_classes": V, "input_size": CTX, "layers": 2, "heads": 2, "width": 32, **kw}
    model = create_model("gpt", **args)
    assert isinstance(model, GPT)
    return model


def _ids(b: int = 2, n: int = CTX, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the zoo's GPT


@pytest.mark.parametrize("n", [1, 7, CTX])
def test_shapes(n: int) -> None:
    out = _tiny().eval()(_ids(3, n))
    assert out.shape == (3, n, V) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_in_channels_is_ignored_and_int32_ids_work() -> None:
    model = create_model("gpt_student", num_classes=V, in_channels=3, input_size=CTX).eval()
    ids = _ids()
    assert torch.equal(model(ids), model(ids.int()))


def test_causal() -> None:
    model = _tiny().eval()
    ids = _ids(1)
    t = 20
    changed = ids.clone()
    changed[0, t] = (changed[0, t] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gpt2_init_and_tied_head() -> None:
    model = create_model("gpt", num_classes=V, input_size=CTX, layers=8, heads=4, width=256)
    assert model.head.weight is model.tok_emb.weight
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    untied = create_model("gpt", num_classes=V, input_size=CTX, tie_weights=False, bias=False)
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.blocks[0].attn.qkv.bias is None and untied.ln_f.bias is None


def test_registered_sizes_ratio() -> None:
    teacher = count_parameters(create_model("gpt_teacher", num_classes=V, input_size=128))
    student = count_parameters(create_model("gpt_student", num_classes=V, input_size=128))
    assert (teacher, student) == (3_213_824, 423_936)  # as the summaries say
    assert 4 <= teacher / student <= 10


def test_learns_a_repeated_string() -> None:
    torch.manual_seed(0)
    text = "to be or not to be, that is the question. " * 4
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    x = torch.stack([ids[i:i + CTX] for i in range(0, 96, 8)])
    y = torch.stack([ids[i + 1:i + CTX + 1] for i in range(0, 96, 8)])
    model = _tiny(num_classes=len(chars))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.5  # about log(len(chars)) at the start
    assert losses[-1] < 0.5 * losses[0]


def test_block_and_attention_taps() -> None:
    model = _tiny().eval()
    ids = _ids()
    plain = model(ids)
    assert not model.blocks[0].attn.probs.tapped
    taps = {"h": Tap("blocks.1"), "a": Tap("blocks.0.attn.probs")}
    out, feats = run_with_taps(model, ids, taps)
    assert not model.blocks[0].attn.probs.tapped  # hooks removed with the capture
    assert torch.equal(out, plain)  # the tap does not change what the model computes
    assert feats["h"].shape == (2, CTX, 32)
    probs = feats["a"]
    assert probs.shape == (2, 2, CTX, CTX)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, CTX))
    lower = torch.ones(CTX, CTX, dtype=torch.bool).tril()
    assert (probs[..., ~lower] == 0).all() and (probs[..., lower] > 0).all()


def test_attention_tap_matches_the_sdpa_output() -> None:
    model = _tiny().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    _, feats = run_with_taps(attn, x, {"a": Tap("probs")})
    b, n, w = x.shape
    _q, _k, v = attn.qkv(x).view(b, n, 3, 2, w // 2).permute(2, 0, 3, 1, 4).unbind(0)
    y = (feats["a"] @ v).transpose(1, 2).reshape(b, n, w)
    torch.testing.assert_close(attn.proj(y), attn(x))


def test_attention_tap_gets_gradients() -> None:
    model = _tiny()
    _, feats = run_with_taps(model, _ids(), {"a": Tap("blocks.1.attn.probs")})
    feats["a"].pow(2).sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("kw", "match"), [
    ({"width": 30, "heads": 4}, "width 30 is not divisible by heads 4"),
    ({"layers": 0}, "layers must be a positive integer"),
    ({"heads": 2.0}, "heads must be a positive integer"),
    ({"dropout": 1.0}, "dropout must be a number in"),
    ({"bias": "yes"}, "bias must be true or false"),
    ({"input_size": 0}, "input_size .* must be a positive integer"),
    ({"num_classes": -1}, "num_classes .* must be a positive integer"),
])
def test_bad_sizes(kw: dict[str, object], match: str) -> None:
    with pytest.raises(KdkitError, match=match):
        _tiny(**kw)


def test_bad_inputs() -> None:
    model = _tiny()
    with pytest.raises(KdkitError, match=rf"input has {CTX + 1} tokens.*context \(input_size\) "
                                         rf"is {CTX}"):
        model(_ids(1, CTX + 1))
    with pytest.raises(KdkitError, match="integer token ids.*float32"):
        model(torch.randn(2, CTX))
    with pytest.raises(KdkitError, match=r"shape \(B, L\)"):
        model(_ids(2, 4).unsqueeze(0))
    with pytest.raises(KdkitError, match="'gpt_student'.*integer token ids"):
        create_model("gpt_student", input_size=CTX)(torch.randn(1, 1, 28, 28))


def test_listed_with_layers(capsys: pytest.CaptureFixture[str]) -> None:
    from kdkit.cli import main

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "gpt_teacher" in listing and "gpt_student" in listing
    assert main(["models", "--layers", "gpt_student", "--input", "16"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1 " in out and "(1, 16, 128)" in out
    assert "blocks.0.attn.probs" in out and "(1, 4, 16, 16)" in out
    assert "head" in out and "(1, 16, 84)" in out


# --------------------------------------------------------------------------- hf: source


def _hf_gpt2(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("hf:gpt2", config=dict(TINY_GPT2), num_classes=V, input_size=CTX,
                        **kw)


@needs_hf
def test_hf_config_model_returns_logits() -> None:
    model = _hf_gpt2().eval()
    assert type(model).__name__ == "GPT2LMHeadModel"  # Hugging Face's own names and paths
    assert model.config.vocab_size == V and model.config.n_positions == CTX
    assert model.config.bos_token_id is None  # GPT-2's 50256 is not in an 84-token vocabulary
    ids = _ids()
    out = model(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (2, CTX, V)
    hooks = list(model._forward_hooks.values())
    model._forward_hooks.clear()  # the model's own output object, without kdkit's hook
    try:
        torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=0)
    finally:
        for h in hooks:
            model.register_forward_hook(h)


@needs_hf
def test_hf_local_folder(tmp_path: Path) -> None:
    model = _hf_gpt2().eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = create_model(f"hf:{tmp_path}", num_classes=V, input_size=CTX).eval()
    ids = _ids()
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    # no data sizes given: the folder's own are kept
    assert create_model(f"hf:{tmp_path}").config.vocab_size == V
    with pytest.raises(KdkitError, match="vocab_size 84 but the data's vocabulary has 65"):
        create_model(f"hf:{tmp_path}", num_classes=65)
    with pytest.raises(KdkitError, match=f"{CTX} positions.*input_size\\) is 64"):
        create_model(f"hf:{tmp_path}", num_classes=V, input_size=64)


@needs_hf
def test_hf_refuses_pickled_weights_and_bad_folders(tmp_path: Path) -> None:
    model = _hf_gpt2()
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(KdkitError, match="only pickled weights.*pytorch_model.bin"):
        create_model(f"hf:{tmp_path}")
    with pytest.raises(KdkitError, match="no folder .*never downloaded"):
        create_model(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "config.json").unlink()
    with pytest.raises(KdkitError, match="no config.json"):
        create_model(f"hf:{tmp_path}")


@needs_hf
def test_hf_taps_hidden_states_and_attention() -> None:
    model = _hf_gpt2().eval()
    ids = _ids()
    plain = model(ids)
    assert model.config._attn_implementation == "sdpa"
    taps = {"h": Tap("transformer.h.1"), "a": Tap("transformer.h.0.attn.probs")}
    out, feats = run_with_taps(model, ids, taps)
    assert model.config._attn_implementation == "eager"  # while the attention map is tapped
    torch.testing.assert_close(out, plain)
    assert feats["h"].shape == (2, CTX, 32)
    probs = feats["a"]
    assert probs.shape == (2, 2, CTX, CTX)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, CTX))
    assert (probs.triu(1) == 0).all()
    model(ids)
    assert model.config._attn_implementation == "sdpa"  # back to the fast path
    _, feats = run_with_taps(model, ids, {"h": Tap("transformer.h.1")})
    assert model.config._attn_implementation == "sdpa"


@needs_hf
def test_hf_argument_errors() -> None:
    with pytest.raises(KdkitError, match="vocab_size 100 but the data's vocabulary has 84"):
        _hf_gpt2_config(vocab_size=100)
    with pytest.raises(KdkitError, match="no architecture 'nonesuch'"):
        create_model("hf:nonesuch", config={})
    with pytest.raises(KdkitError, match="no argument 'layers'.*config"):
        create_model("hf:gpt2", config={}, layers=2)
    with pytest.raises(KdkitError, match="attn_implementation must be one of"):
        _hf_gpt2(attn_implementation="flash")
    with pytest.raises(KdkitError, match="already return their logits"):
        _hf_gpt2(output="logits")
    with pytest.raises(KdkitError, match="config must be a mapping"):
        create_model("hf:gpt2", config=[1])


def _hf_gpt2_config(**extra: object) -> torch.nn.Module:
    return create_model("hf:gpt2", config={**TINY_GPT2, **extra}, num_classes=V,
                        input_size=CTX)


def test_hf_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(KdkitError, match=r"needs the transformers package.*kdkit\[hf\]"):
        create_model("hf:gpt2", config={})
