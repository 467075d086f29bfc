"""Sampling continuations from a language model: generation, on-policy distillation and
sequence-level KD.

A language model maps token ids (B, L) to next-token logits (B, L, V). :func:`sample`
continues prompts token by token (no gradient), keeping at most ``context`` tokens as the
model's input, from softmax(logits / temperature) restricted to the ``top_k`` most likely
tokens; every draw comes from ``generator``, so a seed gives the same text (on a given
device and torch build).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError


@torch.no_grad()
def sample(model: nn.Module, prompt: Tensor, new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, context: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """``prompt`` (B, P) int64 followed by ``new_tokens`` sampled tokens: (B, P + new).

    ``temperature`` 0 takes the most likely token (greedy). The model runs in eval mode
    (its mode is restored); ``context`` (default: the prompt's length + new tokens) is
    the longest input the model is given: the last ``context`` tokens. A model with a
    key/value cache (a ``step`` method, as kdkit's ``gpt``) runs the prompt once and then
    one position per token while the text fits its context; past it, and for other
    models, every token runs the whole window.
    """
    if prompt.dim() != 2 or prompt.dtype != torch.long:
        raise KdkitError(f"sample: the prompt must be token ids (B, P) int64, got "
                         f"{tuple(prompt.shape)} {prompt.dtype}")
    if prompt.shape[1] == 0:
        raise KdkitError("sample: the prompt is empty; give at least one token")
    if temperature < 0:
        raise KdkitError(f"sample: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise KdkitError(f"sample: top_k must be >= 1, got {top_k}")
    was = model.training
    model.eval()
    out = prompt
    stepper = getattr(model, "step", None)  # a key/value cache (kdkit's gpt)
    limit = context or getattr(model, "context", None)
    past: Any = None
    try:
        for _ in range(new_tokens):
            if stepper is not None and limit is not None and out.shape[1] <= limit:
                if past is None:  # the prompt, once
                    logits, past = stepper(out)
                else:  # only the newest token
                    logits, past = stepper(out[:, -1:], past)
                logits = logits[:, -1, :].float()
            else:  # the whole window so far (no cache, or past the context)
                window = out if context is None else out[:, -context:]
                logits = model(window)[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                if generator is not None and generator.device != probs.device:
                    probs = probs.to(generator.device)
                nxt = torch.multinomial(probs, 1, generator=generator).to(out.device)
            out = torch.cat([out, nxt], dim=1)
    finally:
        model.train(was)
    return out


def step_generator(seed: int | None) -> torch.Generator:
    """A generator for one step's draws (CPU: the draws are the same on every device)."""
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed) % 2**63)
    return g


def generation_latency_ms(model: nn.Module, vocab_size: int, context: int, *, tokens: int = 32,
                          prompt: int = 16, seed: int = 0) -> float:
    """Milliseconds per generated token (batch 1, sampling at T = 1, no cache of past
    keys/values: each token runs the model on the whole window so far), on the model's
    device."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = torch.randint(0, vocab_size, (1, min(prompt, context - 1)), generator=g).to(device)
    sample(model, x, 2, context=context, generator=g)  # warm-up
    t0 = time.perf_counter()
    sample(model, x, tokens, context=context, generator=g)
    return 1000.0 * (time.perf_counter() - t0) / tokens
