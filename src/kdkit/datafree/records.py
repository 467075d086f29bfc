"""Teacher metadata records of Lopes, Fenu & Starner 2017 and the objectives built on them.

A record is made once, where the training data is (``compute_record``), and shipped with
the teacher; later, without the data, :class:`RecordObjective` turns it into the loss an
input optimiser minimises (see :mod:`kdkit.datafree.synthesis`). Kinds:

* ``top_layer`` — per class, the mean and Cholesky factor of the covariance of the
  teacher's logits / T. Reconstruction samples a target from the class's Gaussian and
  matches the teacher's logits / T to it. (Above ``FULL_COV_MAX`` classes the factor
  would not be small: per-unit standard deviations are kept instead, and the manifest's
  ``groups[i].covariance`` says ``diagonal``.)
* ``all_layers`` — per class, statistics of every recorded layer (the output of each
  activation, after the pooling that follows it, and logits / T). A layer of at most
  ``FULL_COV_MAX`` units keeps its full covariance (Cholesky factor); a wider one keeps
  per-unit standard deviations (a full 1200×1200 covariance per class would make the
  record larger than the teacher). The objective sums per-layer mean squared errors, so
  every layer counts once whatever its width.
* ``all_layers_dropout`` — the same record, for a teacher trained with dropout; during
  reconstruction the teacher's own dropout layers are switched on with filters (Bernoulli
  masks, scaled by 1/(1 − p)) drawn once per batch and fixed for all its optimisation
  steps, so each batch is reconstructed through one thinned sub-network of the teacher
  (why the paper has no such row for LeNet-5, which has no dropout). ``dropout`` overrides
  the layers' own rates.
* ``spectral_all`` — neurons of all recorded layers form one graph weighted by the
  network's absolute weights (:mod:`kdkit.datafree.graph`); the activations are projected
  on its graph Fourier basis and the ``fraction`` of coefficients with the most energy on
  the training data is kept: per class, their mean and Cholesky factor, plus the basis
  columns. Reconstruction matches the coefficients of a sampled target.
* ``spectral_pairs`` — the same on the small graph of each pair of adjacent recorded
  layers (one coefficient set per pair).

Records are saved as ``record.safetensors`` + ``record.json`` (kind, layers, shapes,
teacher fingerprint, size) and refuse to load against another teacher.

Devices: a record is computed where the teacher is (data batches are moved there; the
float64 statistics are kept there too, except on MPS, which has no float64: there they are
kept on the CPU). A :class:`MetadataRecord`'s tensors are on the CPU; a
:class:`RecordObjective` keeps a copy of them on the teacher's device and draws its targets
and dropout filters on the CPU (seeded), then moves them there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from kdkit.datafree.common import StageProgress, replace_artifact
from kdkit.datafree.graph import (
    default_layers,
    fourier_basis,
    graph_laplacian,
    layer_adjacency,
    leaf_chain,
)
from kdkit.errors import CheckpointError, KdkitError
from kdkit.losses.datafree import matching_loss
from kdkit.taps import LOGITS, Tap, run_with_taps
from kdkit.train.checkpoint import load_checkpoint, module_fingerprint
from kdkit.train.device import module_device

RecordKind = Literal["top_layer", "all_layers", "all_layers_dropout", "spectral_all",
                     "spectral_pairs"]
KINDS: tuple[str, ...] = get_args(RecordKind)
FULL_COV_MAX = 256  # widest layer whose full covariance is recorded
RECORD_STEM = "record"
RECORD_FORMAT = "kdkit-datafree-record-1"


# Which teacher a record (or a transfer set) was made from: the same fingerprint as the
# teacher-output cache's (class, names, dtypes, shapes and bytes of the state).
teacher_fingerprint = module_fingerprint


@dataclass
class MetadataRecord:
    """A teacher's activation statistics. ``layers``: recorded module paths (logits last,
    as ``""``); ``groups``: which layers each statistic covers (one per layer, one graph, or
    one per adjacent pair) and its tensors ``group{g}/mean|chol|std|basis`` (on the CPU)."""

    kind: str
    layers: list[str]
    shapes: list[list[int]]
    temperature: float
    num_classes: int
    groups: list[dict[str, Any]]
    tensors: dict[str, Tensor]
    teacher: str
    input_shape: list[int]
    class_counts: list[int]
    fraction: float = 0.1
    dropout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def meta(self) -> dict[str, Any]:
        return {
            "kind": "datafree-record", "record_format": RECORD_FORMAT, "record": self.kind,
            "layers": self.layers, "shapes": self.shapes, "temperature": self.temperature,
            "num_classes": self.num_classes, "groups": self.groups, "teacher": self.teacher,
            "input_shape": self.input_shape, "class_counts": self.class_counts,
            "fraction": self.fraction, "dropout": self.dropout, "size_bytes": self.size_bytes,
            **self.extra,
        }


# ----------------------------------------------------------------------------- layers


def _taps(layers: Sequence[str]) -> dict[str, Tap]:
    return {f"l{i}": (Tap(p, "output") if p else LOGITS) for i, p in enumerate(layers)}


def layer_activations(
    teacher: nn.Module, x: Tensor, layers: Sequence[str], temperature: float
) -> list[Tensor]:
    """The recorded layers' activations on ``x``, each flattened to (B, D_l); the logits
    (path ``""``) divided by ``temperature``. Differentiable with respect to ``x``."""
    _, feats = run_with_taps(teacher, x, _taps(layers))
    out = []
    for i, p in enumerate(layers):
        a = feats[f"l{i}"].flatten(1)
        out.append(a / temperature if p == "" else a)
    return out


def _record_layers(
    teacher: nn.Module, kind: str, example: Tensor, layers: Sequence[str] | None
) -> tuple[list[str], list[str] | None]:
    """(recorded layers with logits last as "", the leaf chain when a graph is needed)."""
    if kind == "top_layer":
        if layers:
            raise KdkitError("top_layer records only the logits; drop 'layers'")
        return [""], None
    chain: list[str] | None = None
    if kind.startswith("spectral") or not layers:
        try:
            chain = leaf_chain(teacher, example)
        except KdkitError as e:
            if kind.startswith("spectral"):
                raise
            raise KdkitError(f"{e}. Or name the layers to record (layers=[...])") from None
    hidden = list(layers) if layers else default_layers(teacher, chain or [])[:-1]
    if chain is not None:
        bad = [p for p in hidden if p not in chain]
        if bad:
            raise KdkitError(
                f"layers {bad} are not leaf modules of the teacher's chain; valid: {chain}"
            )
        order = [chain.index(p) for p in hidden]
        if order != sorted(order) or len(set(order)) != len(order):
            raise KdkitError(f"layers {hidden} must be distinct and in forward order")
        if chain[-1] in hidden:
            hidden.remove(chain[-1])  # the logits are always recorded last
    return [*hidden, ""], chain


def _graph_groups(
    teacher: nn.Module, kind: str, layers: list[str], shapes: list[list[int]], chain: list[str]
) -> list[tuple[list[int], Tensor]]:
    """(layer indices, Fourier basis (n, n)) of each graph: one over all layers, or pairs."""
    paths = [p if p else chain[-1] for p in layers]
    blocks = [layer_adjacency(teacher, chain, a, b, shapes[i])
              for i, (a, b) in enumerate(zip(paths, paths[1:], strict=False))]
    if len(blocks) == 0:
        raise KdkitError(f"{kind} needs at least two recorded layers; the teacher has one")
    if kind == "spectral_all":
        return [(list(range(len(layers))), fourier_basis(graph_laplacian(blocks))[1])]
    return [([i, i + 1], fourier_basis(graph_laplacian([b]))[1]) for i, b in enumerate(blocks)]


# ----------------------------------------------------------------------------- statistics


class _ClassMoments:
    """Per-class sums of x and x xᵀ (or x², when ``full`` is False), in float64, on
    ``device`` (where :meth:`add`'s values and labels must be)."""

    def __init__(self, num_classes: int, dim: int, full: bool,
                 device: torch.device | None = None) -> None:
        self.full = full
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.n = torch.zeros(num_classes, **kw)
        self.s1 = torch.zeros(num_classes, dim, **kw)
        shape = (num_classes, dim, dim) if full else (num_classes, dim)
        self.s2 = torch.zeros(shape, **kw)

    def add(self, a: Tensor, y: Tensor) -> None:
        a = a.double()
        self.n.index_add_(0, y, torch.ones(len(y), dtype=torch.float64, device=y.device))
        self.s1.index_add_(0, y, a)
        if not self.full:
            self.s2.index_add_(0, y, a * a)
            return
        for c in torch.unique(y).tolist():
            ac = a[y == c]
            self.s2[c] += ac.T @ ac

    def finish(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1.0)
        mean = self.s1 / n[:, None]
        if not self.full:
            var = (self.s2 / n[:, None] - mean**2).clamp_min(0.0)
            return {"mean": mean.float(), "std": var.sqrt().float()}
        cov = self.s2 / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
        return {"mean": mean.float(), "chol": _cholesky(cov).float()}


def _cholesky(cov: Tensor) -> Tensor:
    """Cholesky factors of (K, D, D) covariances, with the smallest jitter that works."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    for power in range(-9, 1):
        chol, info = torch.linalg.cholesky_ex(cov + (10.0**power) * scale * eye)
        if int(info.max()) == 0:
            return chol
    raise KdkitError("a class covariance of the record is not positive definite even with jitter")


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def stats_device(device: torch.device) -> torch.device:
    """Where float64 statistics of activations on ``device`` are kept: there, except on MPS
    (no float64), where they go to the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def compute_record(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    kind: str,
    num_classes: int,
    temperature: float = 8.0,
    layers: Sequence[str] | None = None,
    fraction: float = 0.1,
    dropout: float | None = None,
    batch_size: int = 1000,
    progress: bool = True,
) -> MetadataRecord:
    """Record ``teacher``'s activation statistics on its training data ``x`` (N, C, H, W), ``y`` (N,).

    Args:
        kind: one of :data:`KINDS`. temperature: logits are recorded as logits / T (T = 8).
        layers: module paths to record (default: after every activation/pooling).
        fraction: spectral kinds keep this fraction of each graph's Fourier coefficients.
        dropout: ``all_layers_dropout``: the rate of the fixed dropout filters (default: each
            dropout layer's own rate).

    The teacher runs on its own device (``x`` may stay on the CPU: each batch is moved);
    the record's tensors are returned on the CPU.
    """
    t_start = time.perf_counter()
    if kind not in KINDS:
        raise KdkitError(f"unknown record kind '{kind}'; choose one of {', '.join(KINDS)}")
    if temperature <= 0:
        raise KdkitError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < fraction <= 1.0:
        raise KdkitError(f"fraction must be in (0, 1], got {fraction}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise KdkitError(f"dropout must be in [0, 1), got {dropout}")
    if kind == "all_layers_dropout" and not dropout_layers(teacher):
        raise KdkitError(
            "all_layers_dropout reconstructs through the teacher's own dropout layers, and "
            "this teacher has none; use all_layers"
        )
    counts = torch.bincount(y, minlength=num_classes)
    if len(counts) > num_classes or bool((counts == 0).any()):
        raise KdkitError(
            f"the record needs training samples of every one of {num_classes} classes; "
            f"got counts {counts.tolist()}"
        )
    teacher.eval()
    device = module_device(teacher)
    stats = stats_device(device)
    example = x[:2].to(device)
    names, chain = _record_layers(teacher, kind, example, layers)
    with torch.no_grad():
        probe = run_with_taps(teacher, example, _taps(names))[1]
    shapes = [list(probe[f"l{i}"].shape[1:]) for i in range(len(names))]
    dims = [math.prod(s) for s in shapes]

    groups: list[tuple[list[int], Tensor | None]]
    if kind.startswith("spectral"):
        assert chain is not None
        groups = [(idx, basis.to(stats))
                  for idx, basis in _graph_groups(teacher, kind, names, shapes, chain)]
    else:
        groups = [([i], None) for i in range(len(names))]  # one statistic per layer
    data = _batches(x, y, batch_size)

    def signals(xb: Tensor) -> list[Tensor]:
        with torch.no_grad():
            a = layer_activations(teacher, xb.to(device), names, temperature)
        return [torch.cat([a[i] for i in idx], 1).to(stats).double() for idx, _ in groups]

    # Spectral: keep the coefficients with the most energy on the training data.
    bases: list[Tensor | None] = []
    if kind.startswith("spectral"):
        energy = [torch.zeros(b.shape[1], dtype=torch.float64, device=stats)
                  for _, b in groups if b is not None]
        with StageProgress("record: energy", len(data), enabled=progress, unit="batch") as bar:
            for xb, _ in data:
                for g, s in enumerate(signals(xb)):
                    basis = groups[g][1]
                    assert basis is not None
                    energy[g] += ((s @ basis) ** 2).sum(0)
                bar.update()
        for (_, basis), e in zip(groups, energy, strict=True):
            assert basis is not None
            keep = max(1, math.ceil(fraction * basis.shape[1]))
            top = torch.argsort(e, descending=True)[:keep].sort().values
            bases.append(basis[:, top])
    else:
        bases = [None] * len(groups)
    moments = []
    for (idx, _), basis in zip(groups, bases, strict=True):
        dim = basis.shape[1] if basis is not None else sum(dims[i] for i in idx)
        moments.append(_ClassMoments(num_classes, dim, full=dim <= FULL_COV_MAX, device=stats))
    with StageProgress(f"record: {kind}", len(data), enabled=progress, unit="batch") as bar:
        for xb, yb in data:
            for g, s in enumerate(signals(xb)):
                basis = bases[g]
                moments[g].add(s @ basis if basis is not None else s, yb.to(stats))
            bar.update()

    tensors: dict[str, Tensor] = {}
    meta_groups = []
    for g, ((idx, _), basis, mom) in enumerate(zip(groups, bases, moments, strict=True)):
        for key, t in mom.finish().items():
            tensors[f"group{g}/{key}"] = t.cpu().contiguous()
        if basis is not None:
            tensors[f"group{g}/basis"] = basis.float().cpu().contiguous()
        meta_groups.append({
            "layers": idx, "dim": sum(dims[i] for i in idx),
            "coefficients": int(basis.shape[1]) if basis is not None else None,
            "covariance": "full" if mom.full else "diagonal",
        })
    return MetadataRecord(
        kind=kind, layers=names, shapes=shapes, temperature=float(temperature),
        num_classes=num_classes, groups=meta_groups, tensors=tensors,
        teacher=teacher_fingerprint(teacher), input_shape=list(x.shape[1:]),
        class_counts=counts.tolist(), fraction=float(fraction), dropout=dropout,
        extra={"wall_s": round(time.perf_counter() - t_start, 2)},
    )


# ----------------------------------------------------------------------------- files


def record_stem(path: str | Path) -> Path:
    """A record folder, ``record.json`` or ``record.safetensors`` → the file stem."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    return p / RECORD_STEM


def save_record(record: MetadataRecord, path: str | Path) -> Path:
    """Write ``record.safetensors`` + ``record.json`` into folder ``path``; return the folder.

    A record already there is replaced safely: its JSON is removed first, so a kill while
    the new one is written leaves no record (made again), never new tensors beside old JSON.
    """
    stem = record_stem(path)
    replace_artifact(stem, record.tensors, record.meta())
    return stem.parent


def record_digest(path: str | Path) -> str:
    """The SHA-256 of a saved record's tensors (what a synthesis from it depends on)."""
    meta = json.loads(record_stem(path).with_suffix(".json").read_text())
    return str(meta["sha256"])


def load_record(path: str | Path) -> MetadataRecord:
    """Load and verify a record (SHA-256 of its tensors); a clear error if it is not one."""
    stem = record_stem(path)
    if not stem.with_suffix(".json").exists():
        raise CheckpointError(
            f"no metadata record at {stem}.json; make one with `kdkit datafree record`"
        )
    tensors, meta = load_checkpoint(stem)
    if meta.get("kind") != "datafree-record" or meta.get("record_format") != RECORD_FORMAT:
        raise CheckpointError(f"{stem}.json is not a kdkit metadata record ({RECORD_FORMAT})")
    return MetadataRecord(
        kind=meta["record"], layers=meta["layers"], shapes=meta["shapes"],
        temperature=meta["temperature"], num_classes=meta["num_classes"], groups=meta["groups"],
        tensors=tensors, teacher=meta["teacher"], input_shape=meta["input_shape"],
        class_counts=meta["class_counts"], fraction=meta["fraction"], dropout=meta["dropout"],
        extra={k: meta[k] for k in ("wall_s", "requested_layers") if k in meta},
    )


def check_record_fits(record: MetadataRecord, teacher: nn.Module, source: str = "record") -> None:
    """Refuse a record made from another teacher (by fingerprint), naming the fix."""
    fp = teacher_fingerprint(teacher)
    if fp != record.teacher:
        raise KdkitError(
            f"{source} was made from another teacher (fingerprint {record.teacher[:12]}…, "
            f"this teacher {fp[:12]}…); record this teacher's metadata with "
            "`kdkit datafree record --teacher RUN`"
        )


# ----------------------------------------------------------------------------- objective


BatchLoss = Callable[[Tensor], Tensor]


def dropout_layers(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@contextmanager
def fixed_dropout(
    model: nn.Module, masks: dict[int, Tensor], gen: torch.Generator, rate: float | None
) -> Iterator[None]:
    """Apply dropout filters to ``model``'s dropout layers (in eval mode): each layer's mask
    is drawn from ``gen`` on its first call and kept in ``masks``, so every later call
    of the same batch reuses it."""

    def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        p = float(rate if rate is not None else mod.p)  # type: ignore[arg-type]
        key = id(mod)
        if key not in masks:  # drawn on the CPU (device-independent), used where args[0] is
            keep = torch.rand(args[0].shape, generator=gen) >= p
            masks[key] = keep.to(device=args[0].device, dtype=args[0].dtype)
        return args[0] * masks[key] / (1.0 - p)

    handles = [m.register_forward_hook(hook) for m in dropout_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class RecordObjective:
    """The reconstruction loss of a record: match the teacher's activations on x̂ to targets
    sampled, per batch, from the record's class-conditional Gaussians.

    Computed on the teacher's device (:attr:`device`): the record's tensors are copied there
    once (again if the teacher moves).
    """

    def __init__(self, teacher: nn.Module, record: MetadataRecord, source: str = "record") -> None:
        check_record_fits(record, teacher, source)
        self.teacher = teacher.eval().requires_grad_(False)
        self.record = record
        self._on: tuple[torch.device, dict[str, Tensor]] | None = None

    @property
    def device(self) -> torch.device:
        """Where the objective computes: the teacher's device."""
        return module_device(self.teacher)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The record's tensors on :attr:`device` (copied once per device)."""
        device = self.device
        if self._on is None or self._on[0] != device:
            self._on = (device, {k: v.to(device) for k, v in self.record.tensors.items()})
        return self._on[1]

    def sample_targets(self, y: Tensor, gen: torch.Generator) -> list[Tensor]:
        """One target per group for each label in ``y`` (B,): mean_y + L_y z, on
        :attr:`device` (z is drawn from ``gen`` on the CPU)."""
        out = []
        t = self.tensors
        y = y.to(self.device)
        for g in range(len(self.record.groups)):
            mean = t[f"group{g}/mean"][y]
            z = torch.randn(mean.shape, generator=gen).to(self.device)
            if f"group{g}/chol" in t:
                out.append(mean + (t[f"group{g}/chol"][y] @ z[:, :, None]).squeeze(-1))
            else:
                out.append(mean + t[f"group{g}/std"][y] * z)
        return out

    def batch_loss(self, y: Tensor, gen: torch.Generator) -> BatchLoss:
        """The loss of one batch (targets and dropout filters fixed for all its steps)."""
        rec = self.record
        targets = self.sample_targets(y, gen)
        tensors, device = self.tensors, self.device
        filters: dict[int, Tensor] = {}  # this batch's dropout masks, drawn on first use
        mask_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))

        def loss(x: Tensor) -> Tensor:
            x = x.to(device)
            if rec.kind == "all_layers_dropout":
                with fixed_dropout(self.teacher, filters, mask_gen, rec.dropout):
                    acts = layer_activations(self.teacher, x, rec.layers, rec.temperature)
            else:
                acts = layer_activations(self.teacher, x, rec.layers, rec.temperature)
            total = x.new_zeros(())
            for g, group in enumerate(rec.groups):
                s = torch.cat([acts[i] for i in group["layers"]], 1)
                basis = tensors.get(f"group{g}/basis")
                if basis is not None:
                    s = s @ basis
                total = total + matching_loss(s, targets[g])
            return total

        return loss
