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

import torch
from torch import Tensor

from kdkit.data.arrays import ArrayDataset
from kdkit.data.augment import Augment
from kdkit.data.views import make_views, pick_views, sample_keys
from kdkit.errors import KdkitError

_ORDER_STREAM = 0  # sub-stream tags, so order and augmentation seeds never coincide
_AUGMENT_STREAM = 1
_VIEW_STREAM = 3


def derive_seed(*ints: int) -> int:
    """Mix integers into a seed in [0, 2**63) that is stable across runs and platforms."""
    packed = b"".join(struct.pack("<q", int(i)) for i in ints)
    digest = hashlib.blake2b(packed, digest_size=8, person=b"kdkit-seed").digest()
    return int.from_bytes(digest, "little") >> 1


class BatchLoader:
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
        if batch_size < 1:
            raise KdkitError(f"batch_size must be >= 1, got {batch_size}")
        if views is not None and views < 1:
            raise KdkitError(f"views must be >= 1 (or None for batch augmentation), got {views}")
        self.views = views
        self._keys: Tensor | None = None
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch`` (a permutation if shuffling, else 0..N-1)."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _ORDER_STREAM))
        return torch.randperm(n, generator=gen)

    def epoch_batches(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield the batches of ``epoch`` from batch number ``start_step`` on."""
        if start_step < 0:
            raise KdkitError(f"start_step must be >= 0, got {start_step}")
        order = self.order(epoch)
        x_all, y_all = self.dataset.x, self.dataset.y
        for step in range(start_step, len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            x = x_all[index.to(x_all.device)]
            y = y_all[index.to(y_all.device)]
            if self.views is not None:
                x = make_views(self.augment, x, self.sample_keys()[index],
                               self.view_ids(epoch, index))
            elif self.augment is not None:
                seed = derive_seed(self.seed, epoch, step, _AUGMENT_STREAM)
                x = self.augment(x, torch.Generator().manual_seed(seed))
            yield x, y, index

    def sample_keys(self) -> Tensor:
        """Content keys (N,) of the dataset's samples, computed once (view mode)."""
        if self._keys is None:
            self._keys = sample_keys(self.dataset.x)
        return self._keys

    def view_ids(self, epoch: int, index: Tensor) -> Tensor:
        """In view mode, the view (B,) each sample of ``index`` shows in ``epoch``."""
        if self.views is None:
            raise KdkitError("view_ids needs a loader in view mode (views=K)")
        return pick_views(derive_seed(self.seed, epoch, _VIEW_STREAM), index, self.views)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.epoch_batches(0)
