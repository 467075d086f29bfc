"""Per-sample augmented views: view ``k`` of a sample is a pure function of (augmentation, sample, k).

The batch-level augmentation of :class:`~kdkit.data.loader.BatchLoader` draws from one
generator per batch, so a sample's augmentation depends on the batch it lands in, and a
teacher output computed once could never be looked up again. In *view mode* each sample
instead has ``K`` fixed views; an epoch picks one per sample (a pure function of the run's
seed, the epoch and the sample). The random numbers come from a counter-based hash
(splitmix64 over ``(augmentation, sample, view, draw)``), vectorised with numpy, so no
per-sample Python runs and the views are the same for every run seed, student and batch
size: the teacher-output cache stores exactly the views a live run would see.

A sample is named by a 64-bit hash of its *content* (:func:`sample_keys`), not by its
position: the validation split depends on the run's seed, so a sample's position in the
training split changes from seed to seed while its content, hence its views and its
cached teacher outputs, do not.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from kdkit.data.augment import Augment

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_VIEW_SALT = np.uint64(0x632BE59BD9B4E019)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _u64(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.int64).view(np.uint64)


def hash_ints(key: int, index: Tensor, view: Tensor | None = None) -> np.ndarray:
    """One uint64 per element: a hash of ``(key, index[j], view[j])``; index/view (N,) ints."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.uint64(key) ^ _splitmix64(_u64(index)))
        if view is not None:
            h = _splitmix64(h ^ _splitmix64(_u64(view) + _VIEW_SALT))
    return h


def hash_uniforms(key: int, index: Tensor, view: Tensor, n: int) -> Tensor:
    """(N, n) float64 uniforms in [0, 1): ``u[j, d]`` depends only on (key, index[j], view[j], d)."""
    with np.errstate(over="ignore"):
        h = hash_ints(key, index, view)
        draws = np.arange(n, dtype=np.uint64) * _GOLDEN
        z = _splitmix64(h[:, None] + draws[None, :])
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


_KEY_CHUNK = 4096  # rows hashed at a time (bounds the uint64 temporary)


def sample_keys(x: Tensor) -> Tensor:
    """(N,) int64 content hash of each sample of ``x`` (N, ...): equal iff the bytes are equal.

    A multiply-add hash of the sample's 32-bit words with fixed odd weights, finalised by
    splitmix64; vectorised in chunks. 64 bits: a collision among 10^5 samples has odds
    of about 10^-9.
    """
    flat = x.detach().cpu().contiguous().reshape(x.shape[0], -1)
    if flat.element_size() != 4:
        flat = flat.float()
    words = flat.numpy().view(np.uint32)
    with np.errstate(over="ignore"):
        weights = _splitmix64(np.arange(words.shape[1], dtype=np.uint64)) | np.uint64(1)
        keys = np.empty(words.shape[0], dtype=np.uint64)
        for start in range(0, words.shape[0], _KEY_CHUNK):
            chunk = words[start : start + _KEY_CHUNK].astype(np.uint64)
            keys[start : start + _KEY_CHUNK] = _splitmix64((chunk * weights).sum(axis=1))
    return torch.from_numpy(keys.view(np.int64))


def augment_fingerprint(augment: Augment | None) -> str:
    """A stable text naming the augmentation and all its parameters ('none' without one)."""
    return "none" if augment is None else repr(augment)


def augment_key(augment: Augment | None) -> int:
    """A 63-bit integer key of the augmentation, so different augmentations draw differently."""
    digest = hashlib.sha256(augment_fingerprint(augment).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pick_views(seed: int, index: Tensor, views: int) -> Tensor:
    """Which of ``views`` views each sample of ``index`` (N,) shows; ``seed`` is per epoch."""
    if views == 1:
        return torch.zeros(index.shape[0], dtype=torch.long)
    return torch.from_numpy((hash_ints(seed, index) % np.uint64(views)).astype(np.int64))


def make_views(augment: Augment | None, x: Tensor, keys: Tensor, view: Tensor) -> Tensor:
    """View ``view[j]`` of the sample with key ``keys[j]`` (:func:`sample_keys`), for a batch
    ``x`` (N, C, H, W) of those samples."""
    if augment is None or x.shape[0] == 0:
        return x
    u = hash_uniforms(augment_key(augment), keys, view, augment.n_draws)
    return augment.apply(x, u)
