"""Dense (image-to-image) tasks made from an image dataset: ``task: denoise``.

Each image becomes a pair: the input is the image with additive white Gaussian noise of
standard deviation ``noise`` (pixels in [0, 1], not clipped), normalised like the
classification inputs; the target is the clean image, float pixels in [0, 1], of the same
shape. The noise is drawn once per split and sample from a fixed stream, so the pairs are
data like any other: the same on every read, cached by the teacher-output cache by
sample, rebuilt exactly by ``kdkit eval``. The test split's noise never depends on the
run's seed (its images do not either); train and val follow the seed like their images.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kdkit.data.arrays import ArrayDataset, DatasetSplits
from kdkit.data.loader import derive_seed
from kdkit.errors import DataError

DEFAULT_NOISE = 0.3  # σ on [0, 1] pixels (76.5 of 255): heavy, so that denoising is learnt
_NOISE_STREAM = 11  # derive_seed tag of the noise draws
_TEST_NOISE_SEED = 20260101  # fixed: the test pairs are the same for every run seed
_SPLIT_TAGS = {"train": 0, "val": 1, "test": 2}


def _pairs(split: ArrayDataset, mean: float, std: float, noise: float,
           seed: int) -> ArrayDataset:
    clean = (split.x * std + mean).clamp_(0.0, 1.0)  # back to [0, 1] pixels
    gen = torch.Generator().manual_seed(seed)
    noisy = clean + noise * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
    return ArrayDataset((noisy - mean) / std, clean, split.name)


def to_denoise(data: DatasetSplits, noise: float, seed: int) -> DatasetSplits:
    """``data`` (in-memory images) as a denoising task: noisy inputs, clean targets."""
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise > 0:
        raise DataError(f"task denoise: noise must be a number > 0 (the σ of the Gaussian "
                        f"noise on [0, 1] pixels, e.g. {DEFAULT_NOISE}), got {noise!r}")
    if len(data.input_shape) != 3:
        raise DataError(f"task denoise needs images, but '{data.name}' gives inputs of shape "
                        f"{data.input_shape}")
    splits: dict[str, ArrayDataset] = {}
    for name, tag in _SPLIT_TAGS.items():
        split = getattr(data, name)
        if not isinstance(split, ArrayDataset):
            raise DataError(f"task denoise: '{data.name}' is streamed from disk; dense tasks "
                            "are made in memory (set stream: false)")
        draw = (derive_seed(_TEST_NOISE_SEED, _NOISE_STREAM) if name == "test"
                else derive_seed(seed, _NOISE_STREAM, tag))
        splits[name] = _pairs(split, data.mean, data.std, float(noise), draw)
    return replace(data, train=splits["train"], val=splits["val"], test=splits["test"],
                   num_classes=int(data.input_shape[0]), task="denoise",
                   source={**data.source, "task": "denoise", "noise": float(noise)})

