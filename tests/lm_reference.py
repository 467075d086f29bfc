"""Shared by the language-model tests: a small, very repetitive corpus as a text dataset,
and a tiny gpt teacher trained on it."""

from pathlib import Path

from kdkit.data import load_dataset
from kdkit.pipelines.runs import train_one
from kdkit.train.loop import LoopSettings

TEXT = ("the quick brown fox jumps over the lazy dog. " * 40
        + "a stitch in time saves nine; look before you leap. " * 40)


def text_dataset(folder: Path, context: int = 16):
    path = folder / "corpus.txt"
    path.write_text(TEXT * 3)
    return load_dataset(f"text:{path}", context=context, log=lambda s: None)


def train_teacher(run: Path, data, *, layers: int, heads: int, width: int, epochs: int) -> Path:
    train_one(run_dir=run, label="t", data=data, model_name="gpt",
              model_kwargs={"layers": layers, "heads": heads, "width": width}, method="ce",
              method_kwargs={}, teachers={},
              settings=LoopSettings(epochs=epochs, optimizer="adamw", lr=1e-2, weight_decay=0.0),
              batch_size=32, augment=None, progress=False)
    return run


def resumed_equals_uninterrupted(folder: Path, stop_after: int = 5, **run) -> Path:
    """Train ``run`` (train_one's arguments) once straight through into ``folder/a`` and
    once stopped after ``stop_after`` steps and resumed into ``folder/b``; assert both
    saved models are bit-identical; return ``folder/b``."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from kdkit.train.loop import TrainingInterrupted

    train_one(run_dir=folder / "a", **run)
    with pytest.raises(TrainingInterrupted):
        train_one(run_dir=folder / "b", stop_after=stop_after, **run)
    train_one(run_dir=folder / "b", resume=True, **run)
    a = load_file(folder / "a" / "model.safetensors")
    b = load_file(folder / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return folder / "b"
