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

    <root>/<key>/manifest.json            what was stored, the hashes it was built from, and
                                          the size and SHA-256 of every array file
    <root>/<key>/<teacher>.<n>.full.npy   (K, N, *shape) float16/float32, one per tap, rows
                                          in the order of the samples' content keys
    <root>/<key>/<teacher>.<n>.values.npy top-k mode, with .indices.npy and .rest.npy (the
                                          mean of the other logits)

Guarantees (the primitives are in :mod:`kdkit.files`):

- The folder is built under a temporary name (``<root>/.<key>.<host>-<pid>.<random>.tmp``)
  and renamed into place when complete, so a crash never leaves a torn cache; temporaries
  left by killed builds are deleted by the next :meth:`TeacherCache.open_or_build` (those of
  another machine after a day).
- Every open verifies the folder: a manifest that does not match what is asked (another
  teacher, other data, another augmentation, K, dtype or taps), or an array file whose size
  differs from the manifest's (truncated, missing), or which was modified since the build
  and whose SHA-256 differs (corrupted), gets the folder rebuilt, never used; the log says
  why. (A file of the build's size and modification time is not re-hashed: that would
  re-read gigabytes of feature maps on every run.)
- A published folder is never deleted while valid: when two processes build the same cache,
  the one that finishes second discards its own copy and uses the published one. An invalid
  folder is first renamed aside (readers holding its files open keep working), then deleted,
  then replaced.
- Files and folders get the permissions of the user's umask, so a shared cache is readable.

Top-k mode keeps only the k largest logits of each view and fills the others with the mean
of the rest: it is an approximation (exact when k is the number of classes), for many-class
datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdkit import files
from kdkit.data.arrays import ArrayDataset
from kdkit.data.augment import Augment
from kdkit.data.stream import StreamDataset
from kdkit.data.views import augment_fingerprint, make_views, sample_keys
from kdkit.distill.distiller import Distiller, no_cache_message
from kdkit.errors import KdkitError
from kdkit.losses.lm import pack_topk, teacher_topk
from kdkit.progress import StageProgress
from kdkit.taps import LOGITS
from kdkit.train.checkpoint import atomic_write_json, module_fingerprint, sha256_file
from kdkit.train.device import fits_on_device, module_device

FORMAT = "kdkit-teacher-cache-2"  # bump when views, keys, the row or the manifest layout change
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
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return h.hexdigest()


class _StreamPool:
    """The distinct samples of streamed splits (one dataset on disk) in key order: indexed
    like a tensor (``pool[index]`` decodes those samples), fingerprinted by what names them."""

    def __init__(self, split: StreamDataset, keys: Tensor) -> None:
        self.split = split
        self.keys = keys

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: Tensor) -> Tensor:
        return torch.stack([self.split[int(i)][0] for i in index])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.split.identity.encode())
        h.update(self.keys.numpy().tobytes())
        return h.hexdigest()


def dataset_keys(dataset: ArrayDataset | StreamDataset) -> Tensor:
    """Keys (N,) naming the samples of a split: content hashes in memory, file names on disk."""
    return sample_keys(dataset.x) if isinstance(dataset, ArrayDataset) else dataset.sample_keys()


def _pool(parts: list[Any]) -> tuple[Tensor, Tensor | _StreamPool]:
    """The distinct samples of ``parts`` in the order of their keys: (keys, x), x a tensor
    in memory or, for streamed splits, a :class:`_StreamPool` that decodes when indexed."""
    streamed = [p for p in parts if not isinstance(p, ArrayDataset)]
    if streamed:
        if len(streamed) != len(parts) or len({id(p.base) for p in streamed}) > 1:
            raise KdkitError("teacher cache: a pool mixes splits of different datasets; "
                             "build it over the splits of one dataset")
        first = streamed[0]
        whole = StreamDataset(first.base, torch.cat([p.indices for p in streamed]),
                              torch.cat([p.y for p in streamed]), first.name,
                              identity=first.identity, channels=first.channels,
                              resize=first.resize, workers=first.workers)
        all_keys = whole.sample_keys()
    else:
        x = torch.cat([d.x for d in parts]) if len(parts) > 1 else parts[0].x
        all_keys = sample_keys(x)
    keys, order = torch.sort(all_keys)
    distinct = torch.ones_like(keys, dtype=torch.bool)
    distinct[1:] = keys[1:] != keys[:-1]  # identical samples: one row serves them all
    keys, picked = keys[distinct], order[distinct]
    if streamed:
        return keys, _StreamPool(whole.subset(picked), keys)
    return keys, x[picked]


def cache_identity(
    distiller: Distiller, x: Tensor | _StreamPool, augment: Augment | None,
    settings: CacheSettings
) -> dict[str, Any]:
    """Everything the cached outputs depend on; its hash names the cache folder."""
    if distiller.teacher_mode != "eval":
        raise KdkitError(
            "the teacher cache needs teacher_mode 'eval': in 'train' mode BatchNorm uses each "
            "batch's statistics, so a sample's output depends on its batch; use a live teacher"
        )
    if distiller.second_view is not None:
        raise KdkitError(no_cache_message(distiller.second_view))
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
        "data": tensor_fingerprint(x) if isinstance(x, Tensor) else x.fingerprint(),
        "samples": len(x),
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
        # the same arrays as tensors on an accelerator, when :meth:`place` moved them there
        self._placed: dict[tuple[str, str], dict[str, Tensor]] | None = None
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
        dataset: ArrayDataset | StreamDataset,
        augment: Augment | None,
        settings: CacheSettings,
        *,
        pool: list[ArrayDataset | StreamDataset] | None = None,
        batch_size: int = 512,
        log: Callable[[str], None] | None = None,
    ) -> TeacherCache:
        """The cache for this distiller's teachers and taps, bound to ``dataset``; built if needed.

        ``pool``: the datasets whose samples the cache covers (default: ``dataset``); pass
        the train and validation splits so that every seed's training split is covered by
        one cache. A folder whose manifest does not match, or whose arrays differ from the
        sizes and SHA-256 the manifest records (or are missing, or unreadable), is rebuilt;
        ``log`` says why, and when a build starts and ends.
        """
        keys, x = _pool(pool or [dataset])
        identity = cache_identity(distiller, x, augment, settings)
        folder = root / _key(identity)
        files.clean_stale_temps(root)  # builds killed midway leave their temporary folders
        manifest, why = _read_manifest(folder, identity)
        if manifest is None:
            if log is not None:
                what = "building" if why == "is new" else "rebuilding"
                log(f"teacher cache {folder} {why}; {what} {settings.views} view(s) of "
                    f"{len(keys)} samples")
            manifest = _build(folder, identity, distiller, keys, x, augment, settings,
                              batch_size, log=log)
        return cls(folder, manifest, _rows_of(keys, dataset))

    def place(self, device: torch.device, *, force: bool = False) -> TeacherCache:
        """Serve lookups from ``device``: on an accelerator, when the arrays fit (the same
        rule as for in-memory data), they move there once and a lookup sends only the (B,)
        row numbers, from pinned memory without waiting, and gathers there. On the CPU the
        arrays stay memory-mapped (``force`` loads them as tensors anyway: for tests)."""
        device = torch.device(device)
        self._placed = None
        if (device.type != "cpu" or force) and (
                force or fits_on_device(self.nbytes, device)):
            # (V, N, ...) arrays flattened to (V * N, ...): one index per sample and view
            self._placed = {key: {part: torch.from_numpy(np.array(a)).to(device)
                                  .flatten(0, 1) for part, a in parts.items()}
                            for key, parts in self._arrays.items()}
        return self

    def lookup(self, index: Tensor, view: Tensor) -> dict[str, dict[str, Tensor]]:
        """Teacher outputs of samples ``index`` (B,) in views ``view`` (B,), as float32.

        Same layout as :meth:`Distiller.teacher_outputs`: teacher name -> tap key -> (B, ...).
        On the device the arrays were placed on, if any (:meth:`place`), else on the CPU.
        """
        if self._placed is not None:
            n = int(self.manifest["identity"]["samples"])  # arrays are (views, samples, ...)
            flat = view.cpu() * n + self.rows[index.cpu()]
            dev = next(iter(next(iter(self._placed.values())).values())).device
            if dev.type == "cuda":
                flat = flat.pin_memory()
            flat = flat.to(dev, non_blocking=True)
            placed: dict[str, dict[str, Tensor]] = {}
            for (teacher, tap), tparts in self._placed.items():
                if "values" in tparts:
                    placed.setdefault(teacher, {})[tap] = _from_topk(
                        tparts["values"][flat], tparts["indices"][flat], tparts["rest"][flat],
                        int(self.manifest["num_classes"]))
                elif "ids" in tparts:
                    placed.setdefault(teacher, {})[tap] = pack_topk(
                        tparts["logprobs"][flat], tparts["ids"][flat])
                else:
                    placed.setdefault(teacher, {})[tap] = tparts["full"][flat].float()
            return placed
        i, v = self.rows[index.cpu()].numpy(), view.cpu().numpy()
        out: dict[str, dict[str, Tensor]] = {}
        for (teacher, tap), parts in self._arrays.items():
            if "values" in parts:
                values, indices, rest = (
                    torch.from_numpy(parts[p][v, i]) for p in ("values", "indices", "rest"))
                out.setdefault(teacher, {})[tap] = _from_topk(
                    values, indices, rest, int(self.manifest["num_classes"]))
            elif "ids" in parts:
                out.setdefault(teacher, {})[tap] = pack_topk(
                    torch.from_numpy(parts["logprobs"][v, i]), torch.from_numpy(parts["ids"][v, i]))
            else:
                out.setdefault(teacher, {})[tap] = torch.from_numpy(parts["full"][v, i]).float()
        return out


def _rows_of(keys: Tensor, dataset: ArrayDataset | StreamDataset) -> Tensor:
    """Cache row (N,) of each sample of ``dataset``, found by its key."""
    want = dataset_keys(dataset)
    rows = torch.searchsorted(keys, want).clamp_(max=max(0, len(keys) - 1))
    missing = int((keys[rows] != want).sum()) if len(keys) else len(want)
    if missing:
        raise KdkitError(
            f"{missing} of the {len(want)} training samples are not in the teacher cache's "
            "pool; build the cache over data that includes the training set"
        )
    return rows


def _read_manifest(folder: Path, identity: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The manifest of ``folder`` if it is a complete, intact cache of ``identity``.

    Otherwise ``(None, why)``: no folder, a manifest that is unreadable or of another
    identity or format, or an array file that is missing or whose size or SHA-256 differs
    from what the manifest records (a truncated or corrupted file).
    """
    try:
        text = (folder / MANIFEST).read_text()
    except FileNotFoundError:
        return None, ("has no manifest" if os.path.lexists(folder) else "is new")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"has an unreadable manifest ({getattr(e, 'strerror', None) or e})"
    try:
        manifest = json.loads(text)
    except ValueError:
        return None, "has a corrupt manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, "was written in another cache format"
    if manifest.get("identity") != identity:
        return None, "has a manifest that does not match"
    try:
        checks: dict[str, dict[str, Any]] = manifest["arrays"]
        listed = {f for entry in manifest["entries"] for f in entry["files"].values()}
        if not listed <= set(checks):
            return None, "has a manifest without the checksums of its arrays"
        for fname, check in checks.items():
            if Path(fname).name != fname or fname.startswith("."):
                return None, f"has a manifest naming a file outside it ({fname!r})"
            path = folder / fname
            try:
                st = path.stat()
            except FileNotFoundError:
                return None, f"has lost {fname}"
            if st.st_size != int(check["bytes"]):
                return None, (f"has {fname} of {st.st_size} bytes, not {int(check['bytes'])} "
                              "(truncated?)")
            # Hashing every array on every open would re-read the whole cache (gigabytes for
            # feature maps) per run: a file untouched since the build (same size and
            # modification time) is trusted, any other is hashed.
            if st.st_mtime_ns != check.get("mtime_ns") and sha256_file(path) != check["sha256"]:
                return None, f"has {fname} with the wrong SHA-256 (corrupted)"
    except (KeyError, TypeError, AttributeError, ValueError):
        return None, "has a malformed manifest"
    except OSError as e:
        return None, f"has an unreadable array ({e.strerror or e})"
    return manifest, ""


def _publish(
    tmp: Path, folder: Path, identity: dict[str, Any], manifest: dict[str, Any],
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Publish the complete cache ``tmp`` as ``folder``; return the manifest of the cache
    now there. A valid published folder is never replaced: ours is discarded instead."""
    if os.path.lexists(folder):  # published while we built, or the invalid one we rebuild
        theirs, why = _read_manifest(folder, identity)
        if theirs is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if log is not None:
                log(f"teacher cache {folder} was built by another process meanwhile; using it")
            return theirs
        files.discard_dir(folder)
    if files.publish_dir(tmp, folder):
        return manifest
    # another process published between our check and our rename (and tmp is gone)
    theirs, why = _read_manifest(folder, identity)
    if theirs is None:
        raise KdkitError(
            f"teacher cache {folder} was replaced by another process with a copy that {why}; "
            "run again to rebuild it"
        )
    if log is not None:
        log(f"teacher cache {folder} was built by another process meanwhile; using it")
    return theirs


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
    x_pool: Tensor | _StreamPool,
    augment: Augment | None,
    settings: CacheSettings,
    batch_size: int,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the teachers over every view of every pool sample; write to a temporary folder,
    then publish it. Returns the manifest of the published cache (ours, or the one another
    process published first)."""

    tmp = files.temp_dir(folder)
    t0 = time.perf_counter()
    n, k_views = len(keys), settings.views
    dtype = np.dtype(settings.dtype)
    was_training = distiller.training
    distiller.eval()
    device = module_device(next(iter(distiller.teachers.values())))
    # a bar on a terminal; in a log, a line every minute (a large cache takes a while)
    bar = StageProgress("teacher cache", n * k_views, enabled=log is not None, unit="row")
    try:
        arrays: dict[tuple[str, str], dict[str, np.memmap[Any, Any]]] = {}
        entries: list[dict[str, Any]] = []
        num_classes = 0
        positions = 0
        for view in range(k_views):
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(n, start + batch_size))
                x = make_views(augment, x_pool[index], keys[index], torch.full_like(index, view))
                outs = distiller.teacher_outputs(x.to(device))
                for teacher, taps in outs.items():
                    for tap, t in taps.items():
                        parts = {"full": t}
                        if tap == str(LOGITS) and t.dim() == 3:
                            positions = t.shape[1]  # a language model: tokens per sample
                        if settings.topk is not None and tap == str(LOGITS) and t.dim() == 3:
                            logprobs, ids = teacher_topk(t, min(settings.topk, t.shape[-1]))
                            parts = {"logprobs": logprobs, "ids": ids}
                            num_classes = t.shape[-1]
                        elif settings.topk is not None and tap == str(LOGITS) and (
                            t.dim() == 2 and settings.topk < t.shape[1]  # logits, not images
                        ):
                            parts = _topk(t, settings.topk)
                            num_classes = t.shape[1]
                        if (teacher, tap) not in arrays:
                            stem = f"{teacher}.{len(arrays)}"
                            names = {p: f"{stem}.{p}.npy" for p in parts}
                            arrays[(teacher, tap)] = {
                                p: np.lib.format.open_memmap(
                                    tmp / names[p], mode="w+", shape=(k_views, n, *v.shape[1:]),
                                    dtype=np.int32 if p in ("indices", "ids") else dtype)
                                for p, v in parts.items()
                            }
                            entries.append({"teacher": teacher, "tap": tap, "files": names,
                                            "shape": list(t.shape[1:])})
                        for p, v in parts.items():
                            arrays[(teacher, tap)][p][view, start : start + len(index)] = (
                                v.cpu().numpy())
                bar.update(len(index))
        for memmaps in arrays.values():
            for a in memmaps.values():
                a.flush()
        del arrays
        bar.close()
        checks = {
            fname: {"bytes": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname),
                    "mtime_ns": (tmp / fname).stat().st_mtime_ns}
            for entry in entries for fname in entry["files"].values()
        }
        build_s = round(time.perf_counter() - t0, 2)
        manifest = {
            "format": FORMAT, "identity": identity, "entries": entries, "arrays": checks,
            "num_classes": num_classes, "build_s": build_s,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        if log is not None:
            total = sum(c["bytes"] for c in checks.values())
            per_token = (f", {total / (n * k_views * positions):.1f} bytes per token"
                         if positions else "")
            log(f"teacher cache {folder}: {n * k_views} rows ({k_views} view(s) of {n} samples, "
                f"{total / 2**20:.1f} MiB{per_token}) built in {build_s:.1f} s")
        return _publish(tmp, folder, identity, manifest, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        distiller.train(was_training)
