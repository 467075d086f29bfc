"""`kdkit generate`: continue a prompt with a trained language model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError


def load_language_model(path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, vocabulary, model.json) of a language-model run or model file."""
    from kdkit.data.text import Vocab
    from kdkit.train.artifacts import load_model

    model, meta = load_model(path)
    vocab = (meta.get("data") or {}).get("vocab")
    if not isinstance(vocab, dict):
        raise KdkitError(f"{path}: not a language model (its model.json records no vocabulary; "
                         "train one on a text dataset, e.g. --data shakespeare)")
    return model, Vocab.from_dict(vocab), meta


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from kdkit.distill.sampling import sample
    from kdkit.train.device import resolve_device

    model, vocab, meta = load_language_model(args.run)
    context = int(meta["data"]["input_shape"][0])
    try:
        ids = vocab.encode(args.prompt)
    except KdkitError as e:
        raise KdkitError(f"--prompt: {e}") from None
    if len(ids) == 0:
        raise KdkitError("--prompt is empty; give at least one character")
    device = resolve_device(args.device)
    model.to(device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    out = sample(model, ids.reshape(1, -1).to(device), args.tokens,
                 temperature=args.temperature, top_k=args.top_k, context=context, generator=g)
    took = time.perf_counter() - t0
    sys.stdout.write(vocab.decode(out[0].cpu()) + "\n")
    print(f"{args.tokens} tokens in {took:.2f} s ({1000 * took / max(1, args.tokens):.2f} "
          f"ms/token, {device}, T = {args.temperature}, top-k {args.top_k or 'all'}, "
          f"seed {args.seed})", file=sys.stderr)
    return 0


def add_parser(sub: Any, positive_int: Any, add_device_flag: Any) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained language model",
                       description="Samples a continuation of PROMPT from a language-model run "
                       "(a run directory or model file trained on a text dataset), token by "
                       "token, and prints the text.")
    p.add_argument("run", metavar="RUN", help="run directory or model.safetensors")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=positive_int, default=200,
                   help="how many tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 takes the most likely token (default 1.0)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the K most likely tokens only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    add_device_flag(p)
    p.set_defaults(fn=cmd_generate)
