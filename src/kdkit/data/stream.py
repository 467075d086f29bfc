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
  whatever batch or rank it lands in and whatever the number of workers;
- in view mode (``views=K``, for the teacher-output cache) each sample shows one of its K
  views per epoch, the view being a function of (sample key, view number), exactly as
  :class:`~kdkit.data.loader.BatchLoader` draws them, so a cache built over a streamed pool
  serves these batches.

Augmentations inside the dataset itself (torchvision transforms drawing from global random
state) make a run irreproducible; give them to the loader instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdkit.data.augment import Augment
from kdkit.data.loader import Batches, derive_seed
from kdkit.data.views import hash_uniforms, make_views
from kdkit.errors import KdkitError
from kdkit.train.device import to_device

_STREAM_AUGMENT = 5  # derive_seed tag of the per-sample augmentation key


class DatasetLoader(Batches):
    """Iterate a ``Dataset`` of ``(x, y)`` items as ``(x, y, index)`` batches (see module doc).

    Same interface as :class:`~kdkit.data.loader.BatchLoader` (``fit`` takes either):
    ``epoch_batches(epoch, start_step, shard=(rank, world))``, ``place(device)``, ``len``.
    """

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
        views: int | None = None,
    ) -> None:
        if views is not None and (views < 1 or not hasattr(dataset, "sample_keys")):
            raise KdkitError(f"views={views}: view mode needs views >= 1 and a dataset whose "
                             "samples have keys (sample_keys(), as kdkit's streamed splits do)")
        if num_workers < 0:
            raise KdkitError(f"num_workers must be >= 0, got {num_workers}")
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise KdkitError(f"{type(dataset).__name__} has no len(): kdkit needs a map-style "
                             "dataset (items by index), not an iterable one") from None
        self._setup(dataset, n, batch_size, shuffle=shuffle, seed=seed, augment=augment,
                    drop_last=drop_last, views=views)
        self.num_workers = int(num_workers)

    def place(self, device: torch.device) -> DatasetLoader:
        """Deliver batches on ``device`` (from pinned memory, without waiting, on a GPU)."""
        self.device = torch.device(device)
        return self

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
        keys = self.dataset.sample_keys() if self.views is not None else None
        for rows, (x, y) in zip(index_lists, loader, strict=True):
            index = torch.tensor(rows, dtype=torch.long)
            if keys is not None:  # view mode: the view of (sample, view number), as cached
                x = make_views(self.augment, x, keys[index], self.view_ids(epoch, index))
            elif self.augment is not None and len(rows):
                u = hash_uniforms(key, index, torch.zeros_like(index), self.augment.n_draws)
                x = self.augment.apply(x, u)
            yield to_device(x, self.device), to_device(y, self.device), index


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


class StreamDataset(Dataset):
    """One split of a dataset whose inputs stay on disk (``load_dataset(..., stream=True)``).

    The labels ``y`` (N,) are in memory (they come from the listing, with nothing decoded);
    item ``i`` decodes sample ``indices[i]`` of ``base`` (a map-style dataset of normalised
    ``(x, label)``), then repeats its channels or resizes it if the data asks for that.
    ``identity`` names the files (a hash of the listing and each file's size and mtime):
    with ``indices`` it identifies the samples, as the content hash does for in-memory data.
    ``workers``: the DataLoader worker processes loaders of this split use.
    """

    def __init__(self, base: Dataset[Any], indices: Tensor, y: Tensor, name: str, *,
                 identity: str, channels: int | None = None, resize: int | None = None,
                 workers: int = 0) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.y = torch.as_tensor(y, dtype=torch.long)
        if self.indices.shape != self.y.shape:
            raise KdkitError(f"dataset '{name}': {len(self.indices)} samples but "
                             f"{len(self.y)} labels")
        self.name = name
        self.identity = identity
        self.channels, self.resize = channels, resize
        self.workers = int(workers)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, _ = self.base[int(self.indices[i])]
        if self.channels is not None or self.resize is not None:
            from kdkit.data import reshape_images

            x = reshape_images(x[None], self.channels, self.resize, self.name)[0]
        return x, int(self.y[i])

    def subset(self, indices: Tensor) -> StreamDataset:
        """The samples at ``indices`` (positions in this split), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return StreamDataset(self.base, self.indices[idx], self.y[idx], self.name,
                             identity=self.identity, channels=self.channels,
                             resize=self.resize, workers=self.workers)

    def head(self, n: int) -> Tensor:
        """The first ``n`` inputs, stacked (an example batch for building adapters)."""
        return torch.stack([self[i][0] for i in range(min(n, len(self)))])

    def sample_keys(self) -> Tensor:
        """(N,) int64 key of each sample, from its file's path (and label) and the data's
        channels/resize, not its pixels (which are not in memory): the teacher-output cache
        and view mode name samples by it, as they name in-memory samples by content."""
        keys = getattr(self.base, "_kdkit_keys", None)
        if keys is None:
            import hashlib

            import numpy as np

            files = getattr(self.base, "files", None)
            if files is None:
                raise KdkitError(f"dataset '{self.name}': its samples have no names (file "
                                 "paths) to key the teacher-output cache by")
            words = [int.from_bytes(hashlib.blake2b(
                f"{path}\0{label}".encode(), digest_size=8).digest(), "little", signed=True)
                for path, label in files]
            keys = torch.from_numpy(np.asarray(words, dtype=np.int64))
            self.base._kdkit_keys = keys  # type: ignore[attr-defined]  # once per base
        adapt = hash((self.channels, self.resize)) if (self.channels or self.resize) else 0
        return keys[self.indices] ^ adapt


def example_inputs(dataset: Any, n: int = 2) -> Tensor:
    """The first ``n`` inputs of an in-memory or streamed split."""
    return dataset.x[:n] if hasattr(dataset, "x") else dataset.head(n)


def make_loader(dataset: Any, batch_size: int, *, shuffle: bool, seed: int = 0,
                augment: Augment | None = None, views: int | None = None,
                drop_last: bool = False) -> Any:
    """The loader for ``dataset``: :class:`~kdkit.data.loader.BatchLoader` for in-memory
    data, :class:`DatasetLoader` (with the split's ``workers``) for anything else."""
    from kdkit.data.loader import BatchLoader

    if hasattr(dataset, "x"):
        return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, augment=augment,
                           drop_last=drop_last, views=views)
    return DatasetLoader(dataset, batch_size, shuffle=shuffle, seed=seed, augment=augment,
                         drop_last=drop_last, num_workers=getattr(dataset, "workers", 0),
                         views=views)


def eval_args(dataset: Any) -> tuple[Any, Tensor | None]:
    """``evaluate``'s data arguments for a split: ``(x, y)`` in memory, else the dataset."""
    return (dataset.x, dataset.y) if hasattr(dataset, "x") else (dataset, None)


class _Histograms(Dataset):
    """The 256-bin pixel histogram of each image file (for exact normalisation statistics)."""

    def __init__(self, files: list[tuple[Any, int]]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        import numpy as np

        from kdkit.data.folder import _open

        a, _mode = _open(self.files[i][0])
        return torch.from_numpy(np.bincount(a.reshape(-1), minlength=256))


def _sum_histograms(hs: list[Tensor]) -> Tensor:
    return torch.stack(hs).sum(0)


def pixel_stats(files: list[tuple[Any, int]], identity: str, *, workers: int = 0,
                cache_dir: Any = None, log: Any = print) -> tuple[float, float]:
    """Scalar mean and std of the pixels of ``files`` (scale 255), exactly as the in-memory
    path computes them (from the histogram of every pixel), in one streaming pass through
    ``workers`` DataLoader workers. The result is kept as JSON in ``cache_dir`` under the
    files' ``identity``, so a later run over the same files reads it instead."""
    import json
    import time
    from pathlib import Path

    import numpy as np

    from kdkit.train.checkpoint import atomic_write_json

    path = Path(cache_dir) / f"{identity[:32]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            found = json.loads(path.read_text())
            if found.get("identity") == identity:
                return float(found["mean"]), float(found["std"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: computed again below
    total = torch.zeros(256, dtype=torch.float64)
    t0 = last = time.monotonic()
    done = 0
    batches = DataLoader(_Histograms(files), batch_size=256, num_workers=workers,
                         collate_fn=_sum_histograms)
    for h in batches:
        total += h.double()
        done = min(done + 256, len(files))
        if log is not None and time.monotonic() - last > 5.0:
            last = time.monotonic()
            log(f"pixel statistics: {done:,}/{len(files):,} images ({done / (last - t0):.0f}/s)")
    counts = total.numpy()
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    if n == 0:
        raise KdkitError("no pixels to compute normalisation statistics from (empty train split)")
    mean = float((counts * values).sum() / n)
    std = float((counts * (values - mean) ** 2).sum() / n) ** 0.5
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"identity": identity, "mean": mean, "std": std,
                                     "images": len(files)})
        except OSError as e:  # a read-only cache only costs the pass next time
            if log is not None:
                log(f"pixel statistics: not kept ({e})")
    return mean, std
