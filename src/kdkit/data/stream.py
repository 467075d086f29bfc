"""Batches of any ``torch.utils.data.Dataset``, with the in-memory loader's contracts.

:class:`DatasetLoader` serves ``(x, y, index)`` batches of a map-style dataset whose items
are ``(x, y)`` (a tensor image and an integer label), through ``torch.utils.data.DataLoader``
workers, so data that does not fit in memory, or needs decoding, streams from its source:

- the order of epoch ``e`` is a pure function of ``(seed, e)``, the very permutation
  :class:`~kdkit.data.loader.BatchLoader` draws, so the same dataset in memory or streamed
  gives the same batches;
- resuming at ``start_step`` loads only the batches from there on (nothing before it is read
  or decoded);
- under DDP each rank loads only its contiguous share of each global batch;
- augmentation (kdkit's :mod:`~kdkit.data.augment`) is drawn per sample from
  ``(seed, epoch, sample index)``, not per batch, so a sample's augmentation is the same
  whatever batch or rank it lands in and whatever the number of workers.

Augmentations inside the dataset itself (torchvision transforms drawing from global random
state) make a run irreproducible; give them to the loader instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdkit.data.augment import Augment
from kdkit.data.loader import derive_seed, epoch_order
from kdkit.data.views import hash_uniforms
from kdkit.errors import KdkitError
from kdkit.train.device import to_device

_STREAM_AUGMENT = 5  # derive_seed tag of the per-sample augmentation key


class DatasetLoader:
    """Iterate a ``Dataset`` of ``(x, y)`` items as ``(x, y, index)`` batches (see module doc).

    Same interface as :class:`~kdkit.data.loader.BatchLoader` (``fit`` takes either):
    ``epoch_batches(epoch, start_step, shard=(rank, world))``, ``place(device)``, ``len``.
    """

    views = None  # no view mode: the teacher-output cache needs in-memory data

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise KdkitError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise KdkitError(f"num_workers must be >= 0, got {num_workers}")
        try:
            self._n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise KdkitError(f"{type(dataset).__name__} has no len(): kdkit needs a map-style "
                             "dataset (items by index), not an iterable one") from None
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = drop_last
        self.num_workers = int(num_workers)
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self._n // self.batch_size if self.drop_last else math.ceil(self._n / self.batch_size)

    def place(self, device: torch.device) -> DatasetLoader:
        """Deliver batches on ``device`` (from pinned memory, without waiting, on a GPU)."""
        self.device = torch.device(device)
        return self

    def batch_rows(self, step: int) -> int:
        return max(0, min(self.batch_size, self._n - step * self.batch_size))

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch``: :class:`BatchLoader`'s permutation for (seed, epoch)."""
        return epoch_order(self._n, self.seed, epoch, self.shuffle)

    def epoch_batches(
        self, epoch: int, start_step: int = 0, *, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        from kdkit.dist import shard_bounds

        if start_step < 0:
            raise KdkitError(f"start_step must be >= 0, got {start_step}")
        part, parts = shard
        order = self.order(epoch)
        index_lists = []
        for step in range(start_step, len(self)):
            lo = step * self.batch_size
            hi = min(lo + self.batch_size, self._n)
            a, b = shard_bounds(hi - lo, part, parts) if parts > 1 else (0, hi - lo)
            index_lists.append(order[lo + a : lo + b].tolist())
        if not index_lists:
            return
        loader = DataLoader(
            self.dataset, batch_sampler=index_lists, num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        key = derive_seed(self.seed, epoch, _STREAM_AUGMENT)
        for rows, (x, y) in zip(index_lists, loader, strict=True):
            index = torch.tensor(rows, dtype=torch.long)
            if self.augment is not None and len(rows):
                u = hash_uniforms(key, index, torch.zeros_like(index), self.augment.n_draws)
                x = self.augment.apply(x, u)
            yield to_device(x, self.device), to_device(y, self.device), index

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.epoch_batches(0)


def _collate(items: list[Any]) -> tuple[Tensor, Tensor]:
    """Stack ``(x, y)`` items into ``(x (B, ...), y (B,))``; anything else is one clear error."""
    try:
        xs, ys = zip(*items, strict=True)
    except (TypeError, ValueError):
        raise KdkitError("a dataset item must be a pair (x, y): an image tensor and a label"
                         ) from None
    if not all(isinstance(x, Tensor) for x in xs):
        raise KdkitError(f"dataset items' x must be tensors, got {type(xs[0]).__name__} (add "
                         "a transform that returns a tensor, e.g. torchvision's ToImage + "
                         "ToDtype)")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise KdkitError(f"dataset items have different shapes {sorted(shapes)[:3]}; resize "
                         "them to one size in the dataset")
    return torch.stack([x.float() for x in xs]), torch.as_tensor(
        [int(y) for y in ys], dtype=torch.long)
