"""Transformer token features (B, N, D) in feature distillation: the token <-> map views,
stage ends of transformers, and every feature method on transformer/CNN pairs, each either
training the student and its adapters only or refused by name (the tables below)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from kdkit.cli import main
from kdkit.distill import Distiller, build_method, build_stages
from kdkit.distill.features import stage_points
from kdkit.distill.tokens import (
    EachTensor,
    MapToTokens,
    TokenLayout,
    TokensToMap,
    infer_layout,
    map_to_tokens,
    tokens_to_map,
)
from kdkit.errors import KdkitError
from kdkit.losses.attention import at_loss
from kdkit.models import create_model
from kdkit.taps import Tap, run_with_taps

sys.path.insert(0, str(Path(__file__).parent))
from tiny_vit import TinyViT  # noqa: E402

X = torch.randn(6, 1, 16, 16)
Y = torch.tensor([0, 1, 2, 3, 0, 1])
FEATURE_METHODS = ["fitnets", "at", "hint", "nst", "sp", "pkt", "rkd", "overhaul", "ab", "fsp"]


# ------------------------------------------------------------------ the views


def test_tokens_to_map_drops_the_prefix_and_lays_patches_row_major():
    b, d, h, w, prefix = 2, 3, 2, 4, 2
    tokens = torch.arange(b * (prefix + h * w) * d, dtype=torch.float32).reshape(b, -1, d)
    m = TokensToMap(TokenLayout(prefix, (h, w)))(tokens)
    assert m.shape == (b, d, h, w)
    for i in range(h):
        for j in range(w):
            assert torch.equal(m[:, :, i, j], tokens[:, prefix + i * w + j, :])
    assert not any(torch.equal(m[0, :, i, j], tokens[0, 0]) for i in range(h) for j in range(w))
    # map -> tokens -> map and tokens (without prefix) -> map -> tokens are identities
    assert torch.equal(MapToTokens()(m), tokens[:, prefix:])
    assert torch.equal(tokens_to_map(map_to_tokens(m), TokenLayout(0, (h, w))), m)
    patches = tokens[:, prefix:]
    assert torch.equal(map_to_tokens(tokens_to_map(patches, TokenLayout(0, (h, w)))), patches)
    with pytest.raises(KdkitError, match=r"tokens \(2, 9, 3\) do not fit the layout 2 prefix "
                                         r"\+ 2×4 patch tokens \(expected \(B, 10, D\)\)"):
        tokens_to_map(tokens[:, 1:], TokenLayout(prefix, (h, w)))
    with pytest.raises(KdkitError, match=r"takes a map \(B, C, H, W\), got \(2, 10, 3\)"):
        map_to_tokens(tokens)
    pair = EachTensor([TokensToMap(TokenLayout(prefix, (h, w))), None])([tokens, m])
    assert torch.equal(pair[0], m) and pair[1] is m


def test_the_layout_is_known_or_refused_never_guessed():
    plain = torch.nn.Module()
    assert infer_layout(plain, (2, 17, 8), None, "x") == TokenLayout(1, (4, 4))
    assert infer_layout(plain, (2, 16, 8), None, "x") == TokenLayout(0, (4, 4))
    # the patch embedding's grid says how many tokens are patches (here 3 register tokens)
    assert infer_layout(plain, (2, 15, 8), (3, 4), "x") == TokenLayout(3, (3, 4))
    declared = torch.nn.Module()
    declared.num_prefix_tokens = 5  # timm's attribute
    assert infer_layout(declared, (2, 21, 8), None, "x") == TokenLayout(5, (4, 4))
    with pytest.raises(KdkitError, match=r"x: Module gives tokens \(2, 20, 8\) \(B, N, D\), "
                                         r"and which of the N = 20 tokens are patches cannot "
                                         r"be told .*set model.num_prefix_tokens"):
        infer_layout(plain, (2, 20, 8), None, "x")
    with pytest.raises(KdkitError, match="declares num_prefix_tokens = 5"):
        infer_layout(declared, (2, 17, 8), None, "x")


# ------------------------------------------------------------------ stage ends


@pytest.mark.parametrize("depth, ends", [(2, [0, 1]), (4, [0, 1, 2, 3]), (6, [1, 2, 4, 5]),
                                         (12, [2, 5, 8, 11])])
def test_stage_ends_of_a_transformer_are_blocks_ending_each_quarter(depth, ends):
    points = stage_points(TinyViT(depth=depth), X[:2], "output")
    assert [str(p.tap) for p in points] == [f"blocks.{i}:output" for i in ends]
    assert all(p.tokens == TokenLayout(1, (4, 4)) and p.bn is None for p in points)


def test_register_tokens_are_prefix_tokens_too():
    found = stage_points(TinyViT(registers=2), X[:2], "output")[0].tokens
    declared = stage_points(TinyViT(registers=2, declare_prefix=True), X[:2], "output")[0].tokens
    assert found == declared == TokenLayout(3, (4, 4))


def test_a_transformer_has_no_preactivation_and_sequence_first_blocks_are_refused():
    with pytest.raises(KdkitError, match=r"TinyViT: its stage ends are transformer blocks "
                                         r"\(blocks.0, blocks.1\) giving tokens \(2, 17, 16\); "
                                         r"a block ends in a residual add, not a ReLU"):
        stage_points(TinyViT(), X[:2], "preact")
    with pytest.raises(KdkitError, match=r"give sequence-first tokens \(17, 2, 16\) \(N, B, D\)"):
        stage_points(TinyViT(batch_first=False), X[:2], "output")


def test_models_layers_prints_the_blocks(capsys):
    assert main(["models", "--layers", "py:tiny_vit:tiny_vit", "--input", "1,16,16"]) == 0
    out = capsys.readouterr().out
    assert "stage ends (feature methods): blocks.0:output, blocks.1:output" in out
    assert "pre-activations (overhaul, AB): none (TinyViT: its stage ends are transformer " \
           "blocks" in out


# ------------------------------------------------------------------ every method, every pair


def _cnn(seed: int):
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=4, input_size=16)  # 16x16, 8x8, 4x4 stages


def _vit(seed: int, depth: int):
    torch.manual_seed(seed)
    return TinyViT(depth=depth)  # a 4x4 grid of 16-wide tokens


PAIRS = {  # name: (student, teacher) builders
    "vit<-vit": (lambda: _vit(1, 2), lambda: _vit(0, 4)),
    "vit<-cnn": (lambda: _vit(1, 2), lambda: _cnn(0)),
    "cnn<-vit": (lambda: _cnn(1), lambda: _vit(0, 4)),
}
PREACT = r"{m} reads the pre-ReLU feature at each stage end, but the {who} \(TinyViT\) {be}"
ONE_PAIR = r"fsp needs at least two paired stage ends \(a pair per section\), found student "
TINY = {  # (pair, method): None where the method applies, else its refusal
    **{(p, m): None for p in PAIRS for m in FEATURE_METHODS},
    **{("vit<-vit", m): PREACT.format(m=m, who="student", be="and the teacher \\(TinyViT\\) "
                                      "are transformers") for m in ("overhaul", "ab")},
    **{("vit<-cnn", m): PREACT.format(m=m, who="student", be="is a transformer")
       for m in ("overhaul", "ab")},
    **{("cnn<-vit", m): PREACT.format(m=m, who="teacher", be="is a transformer")
       for m in ("overhaul", "ab")},
    ("vit<-cnn", "fsp"): ONE_PAIR + r"blocks.1:output tokens \(2, 17, 16\) \(the map "
                                    r"\(2, 16, 4, 4\)\) with teacher layer3:output \(2, 64, 4, 4\)",
    ("cnn<-vit", "fsp"): ONE_PAIR + r"layer3:output \(2, 64, 4, 4\) with teacher "
                                    r"blocks.3:output tokens \(2, 17, 16\)",
}


def _steps(student, teacher, stages, x, y, method):
    """One step of each stage: finite loss; gradients reach the student and every adapter
    parameter, never the teacher; teacher views hold no parameters."""
    for stage in stages:
        d = Distiller(student, {"t": teacher}, stage.terms)
        d.train()
        d.zero_grad(set_to_none=True)
        out = d(x, y)
        assert torch.isfinite(out["loss"]), method
        out["loss"].backward()
        assert all(p.grad is None for p in teacher.parameters()), method
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for p in student.parameters()), method
        for adapter in d.adapters.values():
            assert all(p.grad is not None for p in adapter.parameters()), method
        for term in stage.terms:
            assert term.teacher_view is None or not list(term.teacher_view.parameters())


def _check(student, teacher, method, refusal, x, y):
    if refusal is not None:
        with pytest.raises(KdkitError, match=refusal):
            build_stages(method, student, {"t": teacher}, example_input=x[:2])
        return
    _steps(student, teacher, build_stages(method, student, {"t": teacher}, example_input=x[:2]),
           x, y, method)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_feature_method_on_transformers_trains_or_is_refused_by_name(pair, method):
    student, teacher = PAIRS[pair][0](), PAIRS[pair][1]()
    _check(student, teacher, method, TINY[(pair, method)], X, Y)


def test_pairs_views_and_values():
    """Which stages pair, what each side's view is, and the loss of a term equals the
    loss recomputed by hand from the captured tokens (prefix dropped, patches on the grid)."""
    s, t = _vit(1, 2), _vit(0, 4)
    terms = [tm for tm in build_method("at", s, {"t": t}, example_input=X[:2])
             if tm.teacher is not None]
    assert [(str(tm.student), str(tm.teacher)) for tm in terms] == [
        ("blocks.0:output", "blocks.1:output"), ("blocks.1:output", "blocks.3:output")]
    assert all(isinstance(tm.adapter, TokensToMap) and isinstance(tm.teacher_view, TokensToMap)
               for tm in terms)
    d = Distiller(s, {"t": t}, terms)
    d.eval()
    out = d(X, Y)
    with torch.no_grad():
        _, sf = run_with_taps(s, X, {"s": Tap("blocks.1")})
        _, tf = run_with_taps(t, X, {"t": Tap("blocks.3")})

    def by_hand(tokens):
        return tokens[:, 1:].reshape(6, 4, 4, 16).permute(0, 3, 1, 2)

    torch.testing.assert_close(out["at2"], at_loss(by_hand(sf["s"]), by_hand(tf["t"])))
    # a CNN and a transformer pair where the CNN's map has the grid; the student's connector
    # follows its view
    cnn = _cnn(2)
    hint = build_method("hint", _vit(1, 2), {"t": cnn}, example_input=X[:2])[-1]
    assert (str(hint.student), str(hint.teacher)) == ("blocks.1:output", "layer3:output")
    view, conn = hint.adapter
    assert isinstance(view, TokensToMap) and conn.conv.weight.shape == (64, 16, 1, 1)
    assert hint.teacher_view is None


def test_named_token_layers_are_read_as_maps_and_mismatches_name_the_shapes():
    s, t = _vit(1, 2), _cnn(0)
    (stage,) = build_stages("hint", s, {"t": t}, example_input=X[:2],
                            student_layers=["blocks.0"], teacher_layers=["layer2"])
    assert isinstance(stage.terms[-1].adapter[0], TokensToMap)
    _steps(s, t, [stage], X, Y, "hint")
    with pytest.raises(KdkitError, match=r"at: student blocks.0:output gives tokens "
                                         r"\(1, 17, 16\) \(the map \(1, 16, 4, 4\)\) and teacher "
                                         r"layer2:output gives \(1, 32, 8, 8\); the spatial "
                                         r"sizes must match"):
        build_stages("at", _vit(1, 2), {"t": _cnn(0)}, example_input=X[:1],
                     student_layers=["blocks.0"], teacher_layers=["layer2"])
    thin = TinyViT(dim=8, heads=2)
    with pytest.raises(KdkitError, match=r"fsp: student blocks.0:output has 8 channels and "
                                         r"teacher blocks.1:output 16 \(tokens \(2, 17, 8\)"):
        build_stages("fsp", thin, {"t": _vit(0, 4)}, example_input=X[:2])


def test_no_cnn_stage_at_the_transformers_grid_is_named():
    vit = TinyViT(patch=8)  # a 2x2 grid; resnet8's stages are 16x16, 8x8, 4x4
    with pytest.raises(KdkitError, match=r"the student is a transformer .* no CNN stage has the "
                                         r"transformer's grid \(student stage ends: blocks.0 "
                                         r"2×2, blocks.1 2×2; teacher: layer1 16×16, layer2 "
                                         r"8×8, layer3 4×4\)"):
        build_stages("hint", vit, {"t": _cnn(0)}, example_input=X[:2])


# ------------------------------------------------------------------ the vision lane

LIBRARY_INPUT = (torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
VIT = ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})  # 4x4 grid, 17 tokens
TIMM_PREACT = r"{m} reads the pre-ReLU feature at each stage end, but the {who} " \
              r"\(VisionTransformer\) {be}"
VISION = {  # (pair, method): None where the method applies, else its refusal
    **{(p, m): None for p in ("vit<-vit", "vit<-resnet18", "resnet18<-vit")
       for m in FEATURE_METHODS},
    **{("vit<-vit", m): TIMM_PREACT.format(m=m, who="student", be="and the teacher "
                                           r"\(VisionTransformer\) are transformers")
       for m in ("overhaul", "ab")},
    **{("vit<-resnet18", m): TIMM_PREACT.format(m=m, who="student", be="is a transformer")
       for m in ("overhaul", "ab")},
    **{("resnet18<-vit", m): TIMM_PREACT.format(m=m, who="teacher", be="is a transformer")
       for m in ("overhaul", "ab")},
    ("vit<-resnet18", "fsp"): ONE_PAIR + r"blocks.11:output tokens \(2, 17, 192\) .* with "
                                         r"teacher layer2:output \(2, 128, 4, 4\)",
    ("resnet18<-vit", "fsp"): ONE_PAIR + r"layer2:output \(2, 128, 4, 4\) with teacher "
                                         r"blocks.11:output tokens \(2, 17, 192\)",
}


def _library(name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=3, **kwargs)


@pytest.mark.vision
@pytest.mark.parametrize("pair", ["vit<-vit", "vit<-resnet18", "resnet18<-vit"])
def test_timm_vit_with_itself_and_resnet18_every_feature_method(pair):
    """timm's ViT-Tiny (random weights, 32x32 input, 8x8 patches: a 4x4 grid of 192-wide
    tokens after a class token) as student, teacher or both, with timm's ResNet-18 (whose
    layer2 has the 4x4 grid at this input)."""
    pytest.importorskip("timm")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    models = {"vit": lambda seed: _library(VIT[0], seed, **VIT[1]),
              "resnet18": lambda seed: _library("timm:resnet18", seed)}
    student_name, teacher_name = pair.split("<-")
    vit = models["vit"](0)
    assert [str(p.tap) for p in stage_points(vit, x[:2], "output")] == [
        "blocks.2:output", "blocks.5:output", "blocks.8:output", "blocks.11:output"]
    assert stage_points(vit, x[:2], "output")[0].tokens == TokenLayout(1, (4, 4))
    for method in FEATURE_METHODS:
        student, teacher = models[student_name](1), models[teacher_name](0)
        _check(student, teacher, method, VISION[(pair, method)], x, y)


TEACHER_REFUSED = {  # library teachers whose stages end in linear bottlenecks
    "overhaul": "not a ReLU, so it has no pre-activation to read (a linear bottleneck)",
    "ab": "not a ReLU, so it has no pre-activation to read (a linear bottleneck)",
    "fsp": "FSP matrices compare equal widths",
}


@pytest.mark.vision
@pytest.mark.parametrize("teacher_name", ["torchvision:mobilenet_v3_small",
                                          "torchvision:efficientnet_b0", "timm:resnet18",
                                          "timm:efficientnet_b0"])
def test_feature_methods_with_library_teachers_found_by_probing(teacher_name):
    """The other half of tests/test_sources.py's matrix (there each library model is the
    student of a torchvision ResNet-18): each library model as the teacher of a torchvision
    ResNet-18, every feature method, stages found without names."""
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    x, y = LIBRARY_INPUT
    for method in FEATURE_METHODS:
        teacher = _library(teacher_name, 0)
        student = _library("torchvision:resnet18", 1)
        refusal = None
        if method in TEACHER_REFUSED and teacher_name != "timm:resnet18":
            refusal = TEACHER_REFUSED[method]
        _check(student, teacher, method, refusal and re.escape(refusal), x, y)
