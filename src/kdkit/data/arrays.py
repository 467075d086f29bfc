"""In-memory datasets as whole tensors, and deterministic splits/subsets of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdkit.errors import DataError

if TYPE_CHECKING:
    from kdkit.data.stream import StreamDataset
    from kdkit.data.text import Vocab


@dataclass
class ArrayDataset:
    """A dataset held as two tensors: ``x`` (N, C, H, W) float32 normalised, ``y`` (N,) int64;
    or, for text (:mod:`kdkit.data.text`), ``x`` and ``y`` (N, L) int64 token ids."""

    x: Tensor
    y: Tensor
    name: str

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"dataset '{self.name}': {self.x.shape[0]} inputs but {self.y.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: Tensor) -> ArrayDataset:
        """The samples at ``indices`` (a LongTensor), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)], self.name)


@dataclass
class DatasetSplits:
    """Train/val/test splits of one dataset, plus what a model and an augmentation need."""

    train: ArrayDataset | StreamDataset
    val: ArrayDataset | StreamDataset
    test: ArrayDataset | StreamDataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W); (L,) for text
    mean: float
    std: float
    name: str
    # What rebuilds these exact splits: dataset name, root, seed, val_fraction, train_subset
    # and the SHA-256 of the decoded data (see load_dataset); empty for hand-made splits.
    source: dict[str, Any] = field(default_factory=dict)
    # Text datasets: the vocabulary that maps token ids to text (None for images).
    vocab: Vocab | None = None
    # What the data asks a model to do (kdkit.tasks): "classify", "language_model", or a
    # dense task ("denoise": float targets shaped like the inputs; num_classes is then the
    # target's channels, the width of the model's output).
    task: str = "classify"

    @property
    def black(self) -> float:
        """The normalised value of a 0 pixel (the fill an augmentation should pad with)."""
        return (0.0 - self.mean) / self.std


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _per_class_shuffled(y: Tensor, gen: torch.Generator) -> list[Tensor]:
    """Indices of each class (classes in sorted order), each list randomly permuted."""
    y = y.cpu()
    out = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c, as_tuple=False).flatten()
        out.append(idx[torch.randperm(idx.numel(), generator=gen)])
    return out


def _proportional_quotas(counts: list[int], n: int) -> list[int]:
    """Split ``n`` over classes in proportion to ``counts`` (largest-remainder rounding)."""
    total = sum(counts)
    exact = [n * c / total for c in counts]
    quotas = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (quotas[i] - exact[i], i))
    for i in order[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _balanced_quotas(counts: list[int], n: int, gen: torch.Generator) -> list[int]:
    """Split ``n`` as evenly as possible over classes, capped by each class's size."""
    quotas = [0] * len(counts)
    remaining = n
    open_ = [i for i, c in enumerate(counts) if c > 0]
    while remaining > 0 and open_:
        share, extra = divmod(remaining, len(open_))
        # which classes get the one extra sample is random, not always the low labels
        lucky = set(torch.randperm(len(open_), generator=gen)[:extra].tolist())
        for j, i in enumerate(open_):
            add = min(share + (1 if j in lucky else 0), counts[i] - quotas[i])
            quotas[i] += add
            remaining -= add
        open_ = [i for i in open_ if quotas[i] < counts[i]]
    return quotas


def stratified_indices(y: Tensor, n: int, seed: int, *, balanced: bool) -> Tensor:
    """Pick ``n`` indices of ``y`` (sorted), deterministic under ``seed``.

    ``balanced=True``: as equal a count per class as the classes allow; ``False``: each
    class in proportion to its frequency.
    """
    if not 0 <= n <= len(y):
        raise DataError(f"cannot pick {n} samples out of {len(y)}")
    gen = _generator(seed)
    groups = _per_class_shuffled(y, gen)
    counts = [g.numel() for g in groups]
    quotas = _balanced_quotas(counts, n, gen) if balanced else _proportional_quotas(counts, n)
    picked = [g[:q] for g, q in zip(groups, quotas, strict=True)]
    return torch.sort(torch.cat(picked)).values if picked else torch.empty(0, dtype=torch.long)


def split_indices(y: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Positions ``(train, val)`` of :func:`split_train_val`'s split of labels ``y``."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(y)))
    val_idx = stratified_indices(y, n_val, seed, balanced=False)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask, as_tuple=False).flatten(), val_idx


def split_train_val(
    x: Tensor, y: Tensor, val_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stratified split into ``(x_train, y_train, x_val, y_val)``, deterministic under ``seed``.

    ``round(val_fraction * N)`` samples go to validation, each class in proportion.
    """
    train_idx, val_idx = split_indices(y, val_fraction, seed)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def take_subset(
    x: Tensor, y: Tensor, n: int, seed: int, stratified: bool = True
) -> tuple[Tensor, Tensor]:
    """``n`` samples of ``(x, y)``: class-balanced if ``stratified`` else uniform; deterministic."""
    idx = subset_indices(y, n, seed, stratified)
    return x[idx], y[idx]


def subset_indices(y: Tensor, n: int, seed: int, stratified: bool = True) -> Tensor:
    """Positions of :func:`take_subset`'s ``n`` samples of labels ``y``."""
    if not 0 < n <= len(y):
        raise DataError(f"subset size must be in 1..{len(y)}, got {n}")
    if stratified:
        return stratified_indices(y, n, seed, balanced=True)
    return torch.sort(torch.randperm(len(y), generator=_generator(seed))[:n]).values


def in_memory(dataset: ArrayDataset | StreamDataset, what: str) -> ArrayDataset:
    """``dataset`` if it is held in memory; else one error saying ``what`` needs that."""
    if isinstance(dataset, ArrayDataset):
        return dataset
    raise DataError(f"{what} needs the data in memory, but '{dataset.name}' streams from disk "
                    "(data.stream / --stream); load it without streaming")
