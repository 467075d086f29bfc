"""Whole-tensor batches over an in-memory dataset, reproducible and resumable mid-epoch.

The order of epoch ``e`` is a pure function of ``(seed, e)``, and the augmentation of
batch ``step`` a pure function of ``(seed, e, step)``; so a run resumed at ``start_step``
sees exactly the batches an uninterrupted run would have seen.

With ``views=K`` the loader is in *view mode* (:mod:`kdkit.data.views`): sample ``i`` shows
view ``pick_views(seed, e, i) mod K``, and each view is a pure function of (augmentation,
the sample's content, view), whatever the batch; this is what the teacher-output cache
needs.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from kdkit.data.arrays import ArrayDataset
from kdkit.data.augment import Augment
from kdkit.data.views import make_views, pick_views, sample_keys
from kdkit.errors import KdkitError

_ORDER_STREAM = 0  # sub-stream tags, so order and augmentation seeds never coincide
_AUGMENT_STREAM = 1
_VIEW_STREAM = 3


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The order of ``n`` samples in ``epoch``: a permutation drawn from ``(seed, epoch)``
    (0..n-1 without shuffling). Every loader draws its batches from this."""
    if not shuffle:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, _ORDER_STREAM))
    return torch.randperm(n, generator=gen)


def _take(src: Tensor, rows: Tensor, device: torch.device) -> Tensor:
    """``src[rows]`` on ``device``: cut there if ``src`` lives there, else cut into pinned
    host memory and copied without waiting."""
    if src.device == device:
        return src[rows]
    if not src.is_pinned():
        return src[rows].to(device)
    out = torch.empty((len(rows), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
    torch.index_select(src, 0, rows, out=out)
    return out.to(device, non_blocking=True)


def derive_seed(*ints: int) -> int:
    """Mix integers into a seed in [0, 2**63) that is stable across runs and platforms."""
    packed = b"".join(struct.pack("<q", int(i)) for i in ints)
    digest = hashlib.blake2b(packed, digest_size=8, person=b"kdkit-seed").digest()
    return int.from_bytes(digest, "little") >> 1


class Batches:
    """What both loaders share: batching of ``n`` samples, the (seed, epoch) order, view
    picks and the settings. :class:`BatchLoader` cuts in-memory tensors;
    :class:`~kdkit.data.stream.DatasetLoader` reads any ``Dataset``."""

    def _setup(self, dataset: Any, n: int, batch_size: int, *, shuffle: bool, seed: int,
               augment: Augment | None, drop_last: bool, views: int | None) -> None:
        if batch_size < 1:
            raise KdkitError(f"batch_size must be >= 1, got {batch_size}")
        if views is not None and views < 1:
            raise KdkitError(f"views must be >= 1 (or None for batch augmentation), got {views}")
        self.dataset = dataset
        self._n = n
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = drop_last
        self.views = views
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        n = self._n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch_rows(self, step: int) -> int:
        """How many samples global batch ``step`` holds (the last one may be short)."""
        return max(0, min(self.batch_size, self._n - step * self.batch_size))

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch`` (a permutation if shuffling, else 0..N-1)."""
        return epoch_order(self._n, self.seed, epoch, self.shuffle)

    def view_ids(self, epoch: int, index: Tensor) -> Tensor:
        """In view mode, the view (B,) each sample of ``index`` shows in ``epoch``."""
        if self.views is None:
            raise KdkitError("view_ids needs a loader in view mode (views=K)")
        return pick_views(derive_seed(self.seed, epoch, _VIEW_STREAM), index, self.views)

    def epoch_batches(self, epoch: int, start_step: int = 0, *,
                      shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.epoch_batches(0)


class BatchLoader(Batches):
    """Iterate an :class:`ArrayDataset` as ``(x, y, index)`` batches; no per-sample Python.

    ``x`` (B, C, H, W), ``y`` (B,), ``index`` (B,) LongTensor of positions in the dataset.
    ``views``: None for batch-level augmentation; K >= 1 for view mode (see module doc).
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        views: int | None = None,
    ) -> None:
        self._setup(dataset, len(dataset), batch_size, shuffle=shuffle, seed=seed,
                    augment=augment, drop_last=drop_last, views=views)
        self._keys: Tensor | None = None
        self._x, self._y = dataset.x, dataset.y  # where batches are cut from

    def place(self, device: torch.device) -> BatchLoader:
        """Cut batches on ``device``: the whole dataset moves there once if it fits (then
        batching and augmentation run there, with no per-step copy of data); otherwise it
        stays in (pinned) host memory and each batch is copied without waiting."""
        from kdkit.train.device import fits_on_device, nbytes

        device = torch.device(device)
        if device == self.device:
            return self
        x, y = self.dataset.x, self.dataset.y
        if device.type == "cpu":
            self._x, self._y = x.cpu(), y.cpu()
        elif fits_on_device(nbytes(x, y), device):
            self._x, self._y = x.to(device), y.to(device)
        else:
            self._x, self._y = x.cpu().pin_memory(), y.cpu().pin_memory()
        self.device = device
        return self

    def epoch_batches(
        self, epoch: int, start_step: int = 0, *, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield the batches of ``epoch`` from batch number ``start_step`` on.

        ``shard=(rank, world)``: only rank ``rank``'s contiguous share of each global batch
        (:func:`kdkit.dist.shard_bounds`); the global batches are those of one process, with
        the same order and augmentation. ``x`` and ``y`` are on the loader's device
        (:meth:`place`); ``index`` stays on the CPU.
        """
        from kdkit.dist import shard_bounds

        if start_step < 0:
            raise KdkitError(f"start_step must be >= 0, got {start_step}")
        part, parts = shard
        order = self.order(epoch)
        x_all, y_all = self._x, self._y
        order_dev = order.to(x_all.device)
        dev = self.device
        for step in range(start_step, len(self)):
            lo, hi = step * self.batch_size, (step + 1) * self.batch_size
            hi = min(hi, len(order))
            a, b = shard_bounds(hi - lo, part, parts) if parts > 1 else (0, hi - lo)
            batch_aug = self.views is None and self.augment is not None
            if batch_aug and parts > 1:
                a_x, b_x = 0, hi - lo  # the global batch's augmentation, then this shard
            else:
                a_x, b_x = a, b
            index = order[lo + a : lo + b]
            rows = order_dev[lo + a_x : lo + b_x]
            x = _take(x_all, rows, dev)
            y = _take(y_all, order_dev[lo + a : lo + b], dev)
            if self.views is not None:
                x = make_views(self.augment, x, self.sample_keys()[index],
                               self.view_ids(epoch, index))
            elif self.augment is not None:
                seed = derive_seed(self.seed, epoch, step, _AUGMENT_STREAM)
                x = self.augment(x, torch.Generator().manual_seed(seed))
                if parts > 1:
                    x = x[a:b]
            yield x, y, index

    def sample_keys(self) -> Tensor:
        """Content keys (N,) of the dataset's samples, computed once (view mode)."""
        if self._keys is None:
            self._keys = sample_keys(self.dataset.x)
        return self._keys

