"""The teacher-output cache: teacher logits and tapped features computed once, memory-mapped.

Distillation otherwise pays a teacher forward pass in every step of every epoch. The cache
runs each teacher once over ``K`` augmented *views* of every training sample and stores
what the distiller reads from it (the tensors of :meth:`Distiller.teacher_outputs`), keyed
by (sample, view); a sample is named by a hash of its content
(:func:`kdkit.data.views.sample_keys`), so the cache does not depend on where a sample
sits in a split. The training loader then runs in view mode
(``BatchLoader(views=K)``), which draws exactly those views, so a cached run computes the
same losses as a run with the live teacher (tests/test_teacher_cache.py checks it).

Why K stored views rather than replaying the augmentation: a replayed batch-level
augmentation depends on the batch a sample lands in (the seed, the batch size), so its
outputs could not be reused by another student or seed. A view here depends only on
(augmentation, sample, view number), so one cache serves every student and every seed;
the price is that a student sees K distinct views of each sample instead of a fresh one
every epoch (K = 1 without augmentation, where nothing is lost). The run seed also picks
the validation split, so the training split differs from seed to seed; built over a
*pool* (the train and validation splits together, which every seed splits differently but
which is the same set of samples), one cache serves all seeds.

On disk, one folder per key (a hash of everything the outputs depend on)::

    <root>/<key>/manifest.json            what was stored, and the hashes it was built from
    <root>/<key>/<teacher>.<n>.full.npy   (K, N, *shape) float16/float32, one per tap, rows
                                          in the order of the samples' content keys
    <root>/<key>/<teacher>.<n>.values.npy top-k mode, with .indices.npy and .rest.npy (the
                                          mean of the other logits)

The folder is written under a temporary name and renamed when complete, so a crash never
leaves a torn cache; a folder whose manifest does not match what is asked (another teacher,
other data, another augmentation, K, dtype or taps) is rebuilt, never used. Top-k mode
keeps only the k largest logits of each view and fills the others with the mean of the rest:
it is an approximation (exact when k is the number of classes), for many-class datasets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdkit.data.arrays import ArrayDataset
from kdkit.data.augment import Augment
from kdkit.data.views import augment_fingerprint, make_views, sample_keys
from kdkit.distill.distiller import Distiller
from kdkit.errors import KdkitError
from kdkit.taps import LOGITS
from kdkit.train.checkpoint import atomic_write_json, module_fingerprint

FORMAT = "kdkit-teacher-cache-1"  # bump when views, keys or the row layout change
MANIFEST = "manifest.json"
CacheDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class CacheSettings:
    """How to cache: ``views`` per sample, storage ``dtype``, optional ``topk`` logits."""

    views: int = 1
    dtype: CacheDtype = "float16"
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.views < 1:
            raise KdkitError(f"teacher cache: views must be >= 1, got {self.views}")
        if self.dtype not in ("float16", "float32"):
            raise KdkitError(f"teacher cache: dtype must be float16 or float32, got {self.dtype!r}")
        if self.topk is not None and self.topk < 1:
            raise KdkitError(f"teacher cache: topk must be >= 1 (or unset), got {self.topk}")


def tensor_fingerprint(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes, dtype and shape."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{list(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pool(parts: list[ArrayDataset]) -> tuple[Tensor, Tensor]:
    """The distinct samples of ``parts`` in the order of their content keys: (keys, x)."""
    x = torch.cat([d.x for d in parts]) if len(parts) > 1 else parts[0].x
    keys, order = torch.sort(sample_keys(x))
    distinct = torch.ones_like(keys, dtype=torch.bool)
    distinct[1:] = keys[1:] != keys[:-1]  # identical images: one row serves them all
    return keys[distinct], x[order[distinct]]


def cache_identity(
    distiller: Distiller, x: Tensor, augment: Augment | None, settings: CacheSettings
) -> dict[str, Any]:
    """Everything the cached outputs depend on; its hash names the cache folder."""
    if distiller.teacher_mode != "eval":
        raise KdkitError(
            "the teacher cache needs teacher_mode 'eval': in 'train' mode BatchNorm uses each "
            "batch's statistics, so a sample's output depends on its batch; use a live teacher"
        )
    taps = distiller.teacher_taps
    if not taps:
        raise KdkitError("the teacher cache has nothing to store: this method reads no teacher")
    if augment is None and settings.views > 1:
        raise KdkitError(
            f"teacher cache: views={settings.views} but there is no augmentation, so every "
            "view would be the same; set views to 1"
        )
    return {
        "format": FORMAT,
        "teachers": {name: module_fingerprint(distiller.teachers[name]) for name in sorted(taps)},
        "taps": {name: sorted(keys) for name, keys in sorted(taps.items())},
        "data": tensor_fingerprint(x),
        "samples": int(x.shape[0]),
        "augment": augment_fingerprint(augment),
        **asdict(settings),
    }


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class TeacherCache:
    """Read-only view of a built cache, bound to one training set: ``lookup(index, view)``.

    Build or reuse one with :meth:`open_or_build`. ``rows[i]`` is the cache row of sample
    ``i`` of the bound dataset.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], rows: Tensor) -> None:
        self.folder = folder
        self.manifest = manifest
        self.rows = rows
        # (teacher, tap key) -> memory-mapped arrays, opened read-only
        self._arrays: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for entry in manifest["entries"]:
            self._arrays[(entry["teacher"], entry["tap"])] = {
                part: np.load(folder / fname, mmap_mode="r")
                for part, fname in entry["files"].items()
            }

    @property
    def views(self) -> int:
        return int(self.manifest["identity"]["views"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for parts in self._arrays.values() for a in parts.values())

    @classmethod
    def open_or_build(
        cls,
        root: Path,
        distiller: Distiller,
        dataset: ArrayDataset,
        augment: Augment | None,
        settings: CacheSettings,
        *,
        pool: list[ArrayDataset] | None = None,
        batch_size: int = 512,
        log: Callable[[str], None] | None = None,
    ) -> TeacherCache:
        """The cache for this distiller's teachers and taps, bound to ``dataset``; built if needed.

        ``pool``: the datasets whose samples the cache covers (default: ``dataset``); pass
        the train and validation splits so that every seed's training split is covered by
        one cache. A folder whose manifest does not match (or is missing, or unreadable) is
        rebuilt.
        """
        keys, x = _pool(pool or [dataset])
        identity = cache_identity(distiller, x, augment, settings)
        folder = root / _key(identity)
        manifest = _read_manifest(folder)
        if manifest is None or manifest.get("identity") != identity:
            if log is not None:
                why = "does not match (rebuilding)" if folder.exists() else "is new"
                log(f"teacher cache {folder} {why}: {settings.views} view(s) of "
                    f"{len(keys)} samples")
            _build(folder, identity, distiller, keys, x, augment, settings, batch_size)
            manifest = _read_manifest(folder)
            assert manifest is not None
        return cls(folder, manifest, _rows_of(keys, dataset))

    def lookup(self, index: Tensor, view: Tensor) -> dict[str, dict[str, Tensor]]:
        """Teacher outputs of samples ``index`` (B,) in views ``view`` (B,), as float32.

        Same layout as :meth:`Distiller.teacher_outputs`: teacher name -> tap key -> (B, ...).
        """
        i, v = self.rows[index.cpu()].numpy(), view.cpu().numpy()
        out: dict[str, dict[str, Tensor]] = {}
        for (teacher, tap), parts in self._arrays.items():
            if "values" in parts:
                values, indices, rest = (
                    torch.from_numpy(parts[p][v, i]) for p in ("values", "indices", "rest"))
                out.setdefault(teacher, {})[tap] = _from_topk(
                    values, indices, rest, int(self.manifest["num_classes"]))
            else:
                out.setdefault(teacher, {})[tap] = torch.from_numpy(parts["full"][v, i]).float()
        return out


def _rows_of(keys: Tensor, dataset: ArrayDataset) -> Tensor:
    """Cache row (N,) of each sample of ``dataset``, found by content key."""
    want = sample_keys(dataset.x)
    rows = torch.searchsorted(keys, want).clamp_(max=max(0, len(keys) - 1))
    missing = int((keys[rows] != want).sum()) if len(keys) else len(want)
    if missing:
        raise KdkitError(
            f"{missing} of the {len(want)} training samples are not in the teacher cache's "
            "pool; build the cache over data that includes the training set"
        )
    return rows


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    for entry in manifest.get("entries", []):
        if not all((folder / f).is_file() for f in entry.get("files", {}).values()):
            return None
    return manifest


def _topk(t: Tensor, k: int) -> dict[str, Tensor]:
    """Top-k values and indices of logits (B, C) and the mean of the other C - k."""
    values, indices = t.topk(k, dim=1)
    rest = (t.sum(1) - values.sum(1)) / max(1, t.shape[1] - k)
    return {"values": values, "indices": indices, "rest": rest}


def _from_topk(values: Tensor, indices: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    full = rest.float()[:, None].expand(-1, num_classes).clone()
    return full.scatter_(1, indices.long(), values.float())


def _build(
    folder: Path,
    identity: dict[str, Any],
    distiller: Distiller,
    keys: Tensor,
    x_pool: Tensor,
    augment: Augment | None,
    settings: CacheSettings,
    batch_size: int,
) -> None:
    """Run the teachers over every view of every pool sample; write to a temporary folder,
    then rename it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-", suffix=".tmp"))
    t0 = time.perf_counter()
    n, k_views = len(keys), settings.views
    dtype = np.dtype(settings.dtype)
    was_training = distiller.training
    distiller.eval()
    try:
        arrays: dict[tuple[str, str], dict[str, np.memmap[Any, Any]]] = {}
        entries: list[dict[str, Any]] = []
        num_classes = 0
        for view in range(k_views):
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(n, start + batch_size))
                x = make_views(augment, x_pool[index], keys[index], torch.full_like(index, view))
                outs = distiller.teacher_outputs(x)
                for teacher, taps in outs.items():
                    for tap, t in taps.items():
                        parts = {"full": t}
                        if settings.topk is not None and tap == str(LOGITS) and (
                            settings.topk < t.shape[1]
                        ):
                            parts = _topk(t, settings.topk)
                            num_classes = t.shape[1]
                        if (teacher, tap) not in arrays:
                            stem = f"{teacher}.{len(arrays)}"
                            files = {p: f"{stem}.{p}.npy" for p in parts}
                            arrays[(teacher, tap)] = {
                                p: np.lib.format.open_memmap(
                                    tmp / files[p], mode="w+", shape=(k_views, n, *v.shape[1:]),
                                    dtype=np.int32 if p == "indices" else dtype)
                                for p, v in parts.items()
                            }
                            entries.append({"teacher": teacher, "tap": tap, "files": files,
                                            "shape": list(t.shape[1:])})
                        for p, v in parts.items():
                            arrays[(teacher, tap)][p][view, start : start + len(index)] = (
                                v.cpu().numpy())
        for memmaps in arrays.values():
            for a in memmaps.values():
                a.flush()
        del arrays
        atomic_write_json(tmp / MANIFEST, {
            "format": FORMAT, "identity": identity, "entries": entries,
            "num_classes": num_classes, "build_s": round(time.perf_counter() - t0, 2),
        })
        if folder.exists():
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same cache first: keep theirs
            if _read_manifest(folder) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        distiller.train(was_training)
