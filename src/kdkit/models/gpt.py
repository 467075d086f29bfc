"""A small decoder-only transformer (GPT-2 style) for next-token prediction.

Input token ids ``(B, L)`` (an integer dtype, ``L <= input_size``, the context), output
next-token logits ``(B, L, num_classes)``: ``num_classes`` is the vocabulary size and
``input_size`` the context length (the number of learned positions); ``in_channels`` is
accepted and ignored, so the factory takes the arguments every zoo model takes.

Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019):
pre-LayerNorm blocks, learned positional embeddings, a 4x-wide GELU MLP, weights drawn from
N(0, 0.02) with the residual projections scaled by 1/sqrt(2 * layers), the head tied to the
token embedding. Causal self-attention runs through
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.

Module paths (for taps): ``tok_emb``, ``pos_emb``, ``drop``, ``blocks.0`` ... ``blocks.N-1``
(each block's output is the hidden state ``(B, L, width)``), inside a block ``ln1``,
``attn`` (``attn.qkv``, ``attn.probs``, ``attn.proj``), ``ln2``, ``mlp`` (``mlp.fc``,
``mlp.act``, ``mlp.proj``), then ``ln_f`` and ``head``. ``blocks.K.attn.probs`` is there to
be tapped: its output is the attention map ``(B, heads, L, L)``, softmax(QKᵀ/√d + causal
mask), computed explicitly only while a hook is registered on it; the block's output still
comes from the fused SDPA kernel, so a tap never changes what the model computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.models._common import MAX_DEPTH, check_rate
from kdkit.models._registry import MODELS

# Largest sizes built: well beyond a CPU experiment, small enough to refuse a typo early.
_MAX_WIDTH = 1 << 16
_MAX_CONTEXT = 1 << 20


class AttentionProbs(nn.Module):
    """A tap point for an attention map: the identity on ``(B, heads, L, L)`` probabilities.

    The attention module calls it only while a hook is registered on it (:attr:`tapped`),
    so an untapped model never materialises the ``L x L`` map.
    """

    @property
    def tapped(self) -> bool:
        """True while a forward hook or pre-hook is registered on this module."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def forward(self, probs: Tensor) -> Tensor:
        """``(B, heads, L, L)`` attention probabilities, passed through unchanged."""
        return probs


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(B, L, width)`` to ``(B, L, width)``.

    Modules: ``qkv`` (width -> 3 * width), ``probs`` (:class:`AttentionProbs`, a tap point),
    ``proj`` (width -> width, a residual projection), ``drop`` (residual dropout).
    """

    def __init__(self, width: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.probs = AttentionProbs()
        self.proj = nn.Linear(width, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, width)`` to ``(B, L, width)``; position t attends to positions <= t."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        if self.probs.tapped:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            self.probs(scores.float().masked_fill(mask, float("-inf")).softmax(-1))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, n, w)))

    def step(self, x: Tensor, past: tuple[Tensor, Tensor] | None
             ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Generation with a key/value cache: ``x`` is the prompt (``past`` None, causal)
        or one new position (B, 1, width) attending to every cached one. Returns the
        output and the cache extended by ``x``'s keys and values. Eval only (no dropout)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        if past is not None:
            if n != 1:
                raise KdkitError("CausalSelfAttention.step: one new position at a time")
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        return self.proj(y.transpose(1, 2).reshape(b, n, w)), (k, v)


class MLPBlock(nn.Module):
    """``fc`` (width -> 4 * width), ``act`` (GELU), ``proj`` (back to width), ``drop``."""

    def __init__(self, width: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, width)`` to ``(B, L, width)``."""
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=bias)
        self.attn = CausalSelfAttention(width, heads, dropout, bias)
        self.ln2 = nn.LayerNorm(width, bias=bias)
        self.mlp = MLPBlock(width, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, width)`` hidden state to the next one."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x: Tensor, past: tuple[Tensor, Tensor] | None
             ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """:meth:`forward` with the attention's key/value cache (generation)."""
        a, cache = self.attn.step(self.ln1(x), past)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class GPT(nn.Module):
    """Decoder-only transformer: token ids ``(B, L)`` to next-token logits ``(B, L, vocab)``.

    See the module doc for the layout. ``context`` is the number of learned positions: a
    longer input is refused, and so is one that is not integer token ids.
    """

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int,
                 dropout: float = 0.0, bias: bool = True, tie_weights: bool = True,
                 name: str = "gpt") -> None:
        super().__init__()
        self.vocab, self.context, self.name = vocab, context, name
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, dropout, bias) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        self.apply(self._init)
        for pname, p in self.named_parameters():  # GPT-2: residual projections scaled down
            if pname.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """``(B, L)`` integer token ids to ``(B, L, vocab)`` logits (position t predicts t+1)."""
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise KdkitError(f"model '{self.name}' takes integer token ids (B, L), got a {idx.dtype} "
                             f"tensor of shape {tuple(idx.shape)}; is the data a token dataset?")
        if idx.dim() != 2:
            raise KdkitError(f"model '{self.name}' takes token ids of shape (B, L), got shape "
                             f"{tuple(idx.shape)}")
        n = idx.shape[1]
        if n > self.context:
            raise KdkitError(f"model '{self.name}': the input has {n} tokens but the model's context "
                             f"(input_size) is {self.context}; cut the sequences to at most "
                             f"{self.context} tokens or build the model with input_size={n}")
        pos = torch.arange(n, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.head(self.ln_f(self.blocks(x)))

    @torch.no_grad()
    def step(self, idx: Tensor, past: list[tuple[Tensor, Tensor]] | None = None
             ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Incremental decoding: the prompt ``idx`` (B, P) when ``past`` is None, else one
        new token (B, 1) after the cached positions. Returns the logits of ``idx``'s
        positions (B, n, vocab) and the key/value cache for the next call (what
        :func:`kdkit.distill.sampling.sample` uses: each token then costs one position,
        not the whole window). The cached positions plus ``idx`` must fit the context."""
        start = 0 if past is None else past[0][0].shape[2]
        n = idx.shape[1]
        if start + n > self.context:
            raise KdkitError(f"model '{self.name}': {start + n} positions exceed the context "
                             f"({self.context}); start again from the last {self.context - 1}")
        pos = torch.arange(start, start + n, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        cache: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(self.blocks):
            assert isinstance(block, Block)
            x, kv = block.step(x, None if past is None else past[i])
            cache.append(kv)
        return self.head(self.ln_f(x)), cache


def _positive(name: str, arg: str, value: object, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KdkitError(f"model '{name}': {arg} must be a positive integer, got {value!r:.60}")
    if value > limit:
        raise KdkitError(f"model '{name}': {arg}={value:,} is beyond the {limit:,} kdkit builds")
    return value


def build_gpt(name: str, num_classes: int, input_size: int, layers: int, heads: int,
              width: int, dropout: float = 0.0, bias: bool = True,
              tie_weights: bool = True) -> GPT:
    """Check the sizes, then build :class:`GPT` (``name`` is the model's name in errors)."""
    vocab = _positive(name, "num_classes (the vocabulary size)", num_classes, 1 << 24)
    context = _positive(name, "input_size (the context length)", input_size, _MAX_CONTEXT)
    _positive(name, "layers", layers, MAX_DEPTH)
    _positive(name, "heads", heads, _MAX_WIDTH)
    _positive(name, "width", width, _MAX_WIDTH)
    if width % heads:
        raise KdkitError(f"model '{name}': width {width} is not divisible by heads {heads}; "
                         f"use a width that is a multiple of {heads} (e.g. "
                         f"{max(heads, width - width % heads)}) or other heads")
    check_rate(name, "dropout", dropout)
    for arg, flag in (("bias", bias), ("tie_weights", tie_weights)):
        if not isinstance(flag, bool):
            raise KdkitError(f"model '{name}': {arg} must be true or false, got {flag!r:.60}")
    return GPT(vocab, context, layers, heads, width, float(dropout), bias, tie_weights, name)


@MODELS.register("gpt")
def gpt(
    num_classes: int = 84,
    in_channels: int = 1,
    input_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    width: int = 256,
    dropout: float = 0.0,
    bias: bool = True,
    tie_weights: bool = True,
) -> nn.Module:
    """Decoder-only transformer (GPT-2 style): token ids (B, L) to next-token logits (B, L, V).

    ``num_classes`` is the vocabulary size V, ``input_size`` the context (learned positions),
    ``in_channels`` is ignored. ``layers`` pre-LayerNorm blocks of ``heads``-head causal
    attention (SDPA) and a 4x GELU MLP at ``width``; ``dropout`` on embeddings, attention
    and residuals; ``bias`` in linear layers and LayerNorms; ``tie_weights`` shares the
    head with the token embedding.
    """
    del in_channels  # token models have no channels
    return build_gpt("gpt", num_classes, input_size, layers, heads, width, dropout, bias,
                     tie_weights)


@MODELS.register("gpt_teacher")
def gpt_teacher(num_classes: int = 84, in_channels: int = 1, input_size: int = 128) -> nn.Module:
    """GPT teacher: 4 layers, 4 heads, width 256 (3.2M params at V=84, context 128).

    Token ids ``(B, L)`` to logits ``(B, L, num_classes)``; see ``gpt``.
    """
    del in_channels
    return build_gpt("gpt_teacher", num_classes, input_size, 4, 4, 256)


@MODELS.register("gpt_student")
def gpt_student(num_classes: int = 84, in_channels: int = 1, input_size: int = 128) -> nn.Module:
    """GPT student: 2 layers, 4 heads, width 128 (0.42M params, 7.6x fewer than gpt_teacher).

    Token ids ``(B, L)`` to logits ``(B, L, num_classes)``; see ``gpt``.
    """
    del in_channels
    return build_gpt("gpt_student", num_classes, input_size, 2, 4, 128)
