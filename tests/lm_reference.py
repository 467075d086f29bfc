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
