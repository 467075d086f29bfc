"""Token-level LM distillation losses (METHODS.md §9, kdkit.losses.lm)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit.errors import KdkitError
from kdkit.losses.lm import (
    SkewKL,
    TokenJSD,
    TokenKL,
    TokenTV,
    TopKKL,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    teacher_topk,
    token_mask,
    topk_kl,
    total_variation,
)
from methods_reference import Z_S, Z_T

# name -> (function of (student, teacher, target, temperature), METHODS.md §9 value)
LOSSES = {
    "fkl": (lambda s, t, y=None, T=1.0: forward_kl(s, t, y, temperature=T), 0.167894),
    "rkl": (lambda s, t, y=None, T=1.0: reverse_kl(s, t, y, temperature=T), 0.216917),
    "jsd0.5": (lambda s, t, y=None, T=1.0: generalized_jsd(s, t, y, beta=0.5, temperature=T),
               0.045830),
    "jsd0.1": (lambda s, t, y=None, T=1.0: generalized_jsd(s, t, y, beta=0.1, temperature=T),
               0.015319),
    "tv": (lambda s, t, y=None, T=1.0: total_variation(s, t, y, temperature=T), 0.251726),
    "skl0.1": (lambda s, t, y=None, T=1.0: skew_kl(s, t, y, alpha=0.1, temperature=T),
               0.139874),
    "srkl0.1": (lambda s, t, y=None, T=1.0: skew_kl(s, t, y, alpha=0.1, reverse=True,
                                                    temperature=T), 0.161025),
    "topk2-uniform": (lambda s, t, y=None, T=1.0: topk_kl(s, *teacher_topk(t, 2), y,
                                                           temperature=T), 0.162817),
    "topk2-renorm": (lambda s, t, y=None, T=1.0: topk_kl(s, *teacher_topk(t, 2), y,
                                                          tail="renormalize", temperature=T),
                     0.367251),
}
DIVERGENCES = [n for n in LOSSES if not n.startswith("topk")]
MODULES = {
    "fkl": TokenKL(), "rkl": TokenKL("reverse"), "jsd0.5": TokenJSD(0.5),
    "jsd0.1": TokenJSD(beta=0.1), "tv": TokenTV(), "skl0.1": SkewKL(0.1),
    "srkl0.1": SkewKL(alpha=0.1, reverse=True),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("form", ["BLV", "NV"])
def test_reference_values(name, form):
    fn, ref = LOSSES[name]
    s, t = (Z_S, Z_T) if form == "NV" else (Z_S[None], Z_T[None])
    assert fn(s, t).item() == pytest.approx(ref, abs=1e-6)
    y = torch.tensor([0, 3, 2, 1]).reshape(s.shape[:-1])  # real tokens: same value
    assert fn(s, t, y).item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_match_reference(name):
    ref = LOSSES[name][1]
    assert MODULES[name](Z_S[None], Z_T[None]).item() == pytest.approx(ref, abs=1e-6)
    out = MODULES[name](Z_S.float(), Z_T.float(), target=torch.zeros(4, dtype=torch.long))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref, abs=1e-5)


def test_topk_module_and_full_kl():
    top2 = teacher_topk(Z_T, 2)
    assert TopKKL()(Z_S, top2).item() == pytest.approx(0.162817, abs=1e-6)
    assert TopKKL(tail="renormalize")(Z_S, top2).item() == pytest.approx(0.367251, abs=1e-6)
    # int32 ids and fp16 values, as a cache would store them
    small = (top2[0].half(), top2[1].int())
    assert TopKKL()(Z_S.float(), small).item() == pytest.approx(0.162817, abs=1e-3)
    full = forward_kl(Z_S, Z_T).item()
    assert full == pytest.approx(0.167894, abs=1e-6)
    for T in (1.0, 0.5, 3.0):  # k = V: both tails are the full forward KL, at every T
        top4 = teacher_topk(Z_T, 4)
        want = forward_kl(Z_S, Z_T, temperature=T).item()
        for tail in ("uniform", "renormalize"):
            got = topk_kl(Z_S, *top4, tail=tail, temperature=T).item()
            assert got == pytest.approx(want, abs=1e-10)
    # the ids may come in any order
    v, i = teacher_topk(Z_T, 3)
    perm = torch.tensor([2, 0, 1])
    assert topk_kl(Z_S, v[:, perm], i[:, perm]).item() == pytest.approx(
        topk_kl(Z_S, v, i).item(), abs=1e-12)


def test_topk_renormalize_temperature_is_exact():
    """'renormalize' at T equals softmax(z_t / T) renormalised over the top-k."""
    T, k = 2.0, 2
    v, i = teacher_topk(Z_T, k)
    p = torch.softmax(Z_T / T, -1).gather(-1, i)
    p = p / p.sum(-1, keepdim=True)
    log_q = torch.log_softmax(Z_S / T, -1).gather(-1, i)
    want = T**2 * (p * (p.log() - log_q)).sum(-1).mean()
    assert topk_kl(Z_S, v, i, tail="renormalize", temperature=T).item() == pytest.approx(
        want.item(), abs=1e-10)


def test_topk_fp16_storage():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 300, generator=g) * 3, torch.randn(2, 5, 300, generator=g) * 3
    v32, ids = teacher_topk(t, 16)
    v16, ids16 = teacher_topk(t, 16, dtype=torch.float16)
    assert v16.dtype == torch.float16 and torch.equal(ids, ids16)
    for tail in ("uniform", "renormalize"):
        a, b = topk_kl(s, v32, ids, tail=tail), topk_kl(s, v16, ids, tail=tail)
        assert b.dtype == torch.float32 and abs(a.item() - b.item()) < 1e-3
    # k = V stored in fp16 (sums off 1 by rounding) still matches the full KL closely
    v16, ids = teacher_topk(t[..., :20], 20, dtype=torch.float16)
    assert topk_kl(s[..., :20], v16, ids).item() == pytest.approx(
        forward_kl(s[..., :20], t[..., :20]).item(), abs=1e-3)


def test_topk_num_classes_ignores_padded_vocabulary():
    v, i = teacher_topk(Z_T, 2)
    padded = torch.cat([Z_S, torch.full((4, 3), 7.0, dtype=Z_S.dtype)], -1)
    got = topk_kl(padded, v, i, num_classes=4).item()
    assert got == pytest.approx(0.162817, abs=1e-6)
    assert TopKKL(num_classes=4)(padded, (v, i)).item() == pytest.approx(got, abs=1e-12)


def _with_padding(s, t, extra=3, seed=1):
    """(1, 4, V) logits with ``extra`` padded positions of arbitrary logits appended."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 1, extra, s.shape[-1], generator=g, dtype=s.dtype) * 10
    s2 = torch.cat([s[None], noise[0]], 1)
    t2 = torch.cat([t[None], noise[1]], 1)
    y = torch.cat([torch.tensor([0, 3, 2, 1]), torch.full((extra,), -100)])[None]
    return s2, t2, y


@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_leaves_the_loss_unchanged(name):
    fn, ref = LOSSES[name]
    s2, t2, y = _with_padding(Z_S, Z_T)
    assert fn(s2, t2, y).item() == pytest.approx(ref, abs=1e-6)
    # interleaved padding, and a second row all padding, in (B, L, V) and (N, V) form
    s3 = torch.stack([s2[0, [4, 0, 1, 5, 2, 3, 6]], s2[0]])
    t3 = torch.stack([t2[0, [4, 0, 1, 5, 2, 3, 6]], t2[0]])
    y3 = torch.tensor([[-100, 0, 3, -100, 2, 1, -100], [-100] * 7])
    assert fn(s3, t3, y3).item() == pytest.approx(ref, abs=1e-6)
    assert fn(s3.flatten(0, 1), t3.flatten(0, 1), y3.flatten()).item() == pytest.approx(
        ref, abs=1e-6)
    # the padded positions get no gradient
    s2 = s2.clone().requires_grad_(True)
    fn(s2, t2, y).backward()
    assert torch.all(s2.grad[0, 4:] == 0) and s2.grad[0, :4].abs().sum() > 0


def test_topk_padding_may_hold_garbage():
    s2, t2, y = _with_padding(Z_S, Z_T)
    v, i = teacher_topk(t2, 2)
    v[0, 4:], i[0, 4:] = float("nan"), -1  # a cache may leave anything at padding
    assert topk_kl(s2, v, i, y).item() == pytest.approx(0.162817, abs=1e-6)
    assert topk_kl(s2, v, i, y, tail="renormalize").item() == pytest.approx(0.367251, abs=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_all_padding_gives_zero(name):
    fn, _ = LOSSES[name]
    s = Z_S[None].clone().requires_grad_(True)
    out = fn(s, Z_T[None], torch.full((1, 4), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.all(s.grad == 0)
    # an empty batch too
    assert fn(Z_S[:0], Z_T[:0], torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_the_student_only(name):
    fn, _ = LOSSES[name]
    s = Z_S.clone().requires_grad_(True)
    t = Z_T.clone().requires_grad_(True)
    if name.startswith("topk"):  # the stored teacher is detached too
        v, i = teacher_topk(t, 2)
        t_lp = torch.log_softmax(t, -1).gather(-1, i)
        kw = {"tail": "renormalize"} if "renorm" in name else {}
        out = topk_kl(s, t_lp, i, **kw)
    else:
        out = fn(s, t)
    out.backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_iff_equal(name):
    fn, _ = LOSSES[name]
    assert abs(fn(Z_T, Z_T).item()) < 1e-12
    assert abs(fn(Z_T, Z_T + 5.0).item()) < 1e-12  # a shift of the logits: same distribution
    assert fn(Z_S, Z_T).item() > 1e-3
    assert fn(Z_T, Z_S).item() > 1e-3


def test_jsd_symmetric_at_half():
    a, b = generalized_jsd(Z_S, Z_T, beta=0.5), generalized_jsd(Z_T, Z_S, beta=0.5)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    # and JSD_β(p, q) = JSD_{1-β}(q, p) in general
    assert generalized_jsd(Z_S, Z_T, beta=0.1).item() == pytest.approx(
        generalized_jsd(Z_T, Z_S, beta=0.9).item(), abs=1e-12)
    # α = 0 skew KL is the plain KL
    assert skew_kl(Z_S, Z_T, alpha=0.0).item() == pytest.approx(0.167894, abs=1e-6)
    assert skew_kl(Z_S, Z_T, alpha=0.0, reverse=True).item() == pytest.approx(0.216917, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "topk2-uniform"])
def test_temperature_squared(name):
    fn, _ = LOSSES[name]
    T = 3.0
    # z / T at T = 1, times T², is the loss at temperature T
    want = T**2 * fn(Z_S / T, Z_T / T).item()
    assert fn(Z_S, Z_T, None, T).item() == pytest.approx(want, rel=1e-9)
    assert fn(Z_S, Z_T, None, 1.0).item() == pytest.approx(LOSSES[name][1], abs=1e-6)


def test_topk_uniform_temperature_tempers_the_modelled_teacher():
    """'uniform' at T is T²·KL(p̃^T ‖ q^T), p̃ the stored top-k + uniform tail (at T = 1)."""
    k, V = 2, Z_T.shape[-1]
    v, i = teacher_topk(Z_T, k)
    rest = (1 - v.exp().sum(-1, keepdim=True)) / (V - k)
    p_model = rest.expand(-1, V).scatter(-1, i, v.exp())
    for T in (1.0, 0.5, 3.0):
        # softmax(log p̃ / T) = p̃^T: forward_kl of those "logits" at T (with its T²)
        want = forward_kl(Z_S, p_model.log(), temperature=T).item()
        assert topk_kl(Z_S, v, i, temperature=T).item() == pytest.approx(want, abs=1e-10)


def test_temperature_squared_modules():
    assert TokenKL(temperature=2.0)(Z_S, Z_T).item() == pytest.approx(
        4 * forward_kl(Z_S / 2, Z_T / 2).item(), rel=1e-9)
    assert TokenTV(temperature=2.0)(Z_S, Z_T).item() == pytest.approx(
        4 * total_variation(Z_S / 2, Z_T / 2).item(), rel=1e-9)


def test_half_precision_inputs_compute_in_float32():
    out = forward_kl(Z_S.bfloat16(), Z_T.half())
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.167894, abs=2e-2)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 2, -100], [0, -100, 4]])
    v, i = teacher_topk(t, 2)
    checks = {
        "fkl": lambda x: forward_kl(x, t, y, temperature=1.5),
        "rkl": lambda x: reverse_kl(x, t, y),
        "jsd": lambda x: generalized_jsd(x, t, y, beta=0.3, temperature=2.0),
        "skl": lambda x: skew_kl(x, t, y, alpha=0.2),
        "srkl": lambda x: skew_kl(x, t, y, alpha=0.2, reverse=True),
        "topk-uniform": lambda x: topk_kl(x, v, i, y, temperature=1.5),
        "topk-renorm": lambda x: topk_kl(x, v, i, y, tail="renormalize"),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6), name


def test_token_mask():
    y = torch.tensor([[5, -100], [0, 1]])
    assert torch.equal(token_mask(y, (2, 2, 7)), torch.tensor([[True, False], [True, True]]))
    assert token_mask(None, (3, 7)).tolist() == [True] * 3
    with pytest.raises(KdkitError, match=r"target must be integer token ids of shape \(2, 3\)"):
        token_mask(y, (2, 3, 7))
    with pytest.raises(KdkitError, match="integer token ids"):
        token_mask(y.float(), (2, 2, 7))
    with pytest.raises(KdkitError, match=r"\(B, L, V\) or \(N, V\)"):
        token_mask(None, (7,))


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_argument_errors():
    for bad in (-0.1, 1.5, 0.0, 1.0):
        with pytest.raises(KdkitError, match="beta must be in") as e:
            TokenJSD(beta=bad)
        _one_line(e)
    with pytest.raises(KdkitError, match="TokenKL"):
        generalized_jsd(Z_S, Z_T, beta=0.0)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(KdkitError, match="alpha must be in"):
            SkewKL(alpha=bad)
    with pytest.raises(KdkitError, match="alpha must be in"):
        skew_kl(Z_S, Z_T, alpha=1.0)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(KdkitError, match="temperature"):
            TokenKL(temperature=bad)
        with pytest.raises(KdkitError, match="temperature"):
            forward_kl(Z_S, Z_T, temperature=bad)
    with pytest.raises(KdkitError, match="unknown KL direction 'sideways'"):
        TokenKL("sideways")
    with pytest.raises(KdkitError, match="unknown top-k tail 'zipf'") as e:
        TopKKL(tail="zipf")
    _one_line(e)
    with pytest.raises(KdkitError, match="unknown top-k tail"):
        topk_kl(Z_S, *teacher_topk(Z_T, 2), tail="zipf")
    # shape mismatches name both shapes
    with pytest.raises(KdkitError, match=r"student \(4, 4\) and teacher \(4, 5\)") as e:
        TokenTV()(Z_S, torch.zeros(4, 5))
    _one_line(e)
    with pytest.raises(KdkitError, match=r"student \(1, 4, 4\) and teacher \(4, 4\)"):
        forward_kl(Z_S[None], Z_T)
    with pytest.raises(KdkitError, match=r"\(B, L, V\) or \(N, V\)"):
        reverse_kl(Z_S[0], Z_T[0])
    with pytest.raises(KdkitError, match=r"target must be .* shape \(4,\)"):
        SkewKL()(Z_S, Z_T, target=torch.zeros(3, dtype=torch.long))
    v, i = teacher_topk(Z_T, 2)
    with pytest.raises(KdkitError, match=r"log-probs \(4, 2\) and ids \(4, 3\)"):
        topk_kl(Z_S, v, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(KdkitError, match=r"must both be \(1, 4, 'k'\)"):
        topk_kl(Z_S[None], v, i)
    with pytest.raises(KdkitError, match="ids integers"):
        topk_kl(Z_S, v, i.double())
    # a top-k id out of range
    for bad in (4, -1):
        j = i.clone()
        j[2, 1] = bad
        with pytest.raises(KdkitError, match=r"ids must be in \[0, 4\)") as e:
            topk_kl(Z_S, v, j)
        _one_line(e)
    with pytest.raises(KdkitError, match=r"ids must be in \[0, 3\)"):
        topk_kl(Z_S, v, i, num_classes=3)
    with pytest.raises(KdkitError, match=r"num_classes \(5\)"):
        topk_kl(Z_S, v, i, num_classes=5)
    with pytest.raises(KdkitError, match="pair"):
        TopKKL()(Z_S, Z_T)
    with pytest.raises(KdkitError, match="1 <= k"):
        teacher_topk(Z_T, 5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 30.0),
       beta=st.floats(0.01, 0.99), alpha=st.floats(0.0, 0.99), k=st.integers(1, 6))
def test_every_divergence_is_nonnegative(seed, scale, beta, alpha, k):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 6, generator=g) * scale
    t = torch.randn(3, 6, generator=g) * scale
    v, i = teacher_topk(t, k)
    values = [
        forward_kl(s, t), reverse_kl(s, t), generalized_jsd(s, t, beta=beta),
        total_variation(s, t), skew_kl(s, t, alpha=alpha),
        skew_kl(s, t, alpha=alpha, reverse=True), topk_kl(s, v, i),
        topk_kl(s, v.half(), i), topk_kl(s, v, i, tail="renormalize"),
    ]
    for x in values:
        assert torch.isfinite(x) and x.item() >= -1e-5
    assert total_variation(s, t).item() <= 1.0 + 1e-6
