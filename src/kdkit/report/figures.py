"""The report's figures: one function per figure, plain data in, ``STEM.png`` + ``STEM.svg`` out.

matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas only: the
global backend (and pyplot's state) of the caller's session is never touched. Every write
is atomic. Each function returns the stem's two paths.

Data shapes:

- a *series* is a list of ``(epoch, value)`` pairs, one run (seed);
- a *curve set* maps a label to its seeds' series (mean drawn, min-max band around it).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.errors import KdkitError
from kdkit.train.checkpoint import atomic_write_bytes

Series = list[tuple[float, float]]
CurveSet = dict[str, list[Series]]

MATPLOTLIB_MISSING = "kdkit report needs matplotlib: pip install 'kdkit[report]'"
DPI = 110
TEACHER_COLOUR = "#222222"
SCRATCH_COLOUR = "#8c8c8c"


def _t(text: str) -> str:
    """A label drawn as written: a ``$`` would start matplotlib's math mode."""
    return text.replace("$", r"\$")


def _mpl() -> Any:
    """matplotlib's Figure and Agg canvas (imported here only: the rest of kdkit never needs
    matplotlib); a missing matplotlib is one KdkitError."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise KdkitError(MATPLOTLIB_MISSING) from e
    return matplotlib, Figure, FigureCanvasAgg


def new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend)."""
    _, figure_cls, canvas_cls = _mpl()
    fig = figure_cls(figsize=(width, height), dpi=DPI, layout="constrained")
    canvas_cls(fig)
    return fig


def save(fig: Any, stem: Path) -> tuple[Path, Path]:
    """Write ``stem.png`` and ``stem.svg`` (atomically); return their paths."""
    matplotlib, _, _ = _mpl()
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    # A fixed hash salt makes the SVG's ids, so the file, the same from one run to the next.
    with matplotlib.rc_context({"svg.hashsalt": "kdkit", "svg.fonttype": "path"}):
        for fmt in ("png", "svg"):
            buf = io.BytesIO()
            meta = {"Software": None} if fmt == "png" else {"Date": None}
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
            path = stem.with_name(f"{stem.name}.{fmt}")
            atomic_write_bytes(path, buf.getvalue())
            out.append(path)
    return out[0], out[1]


def colours(labels: Sequence[str], kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """One colour per label, the same in every figure: teacher(s) dark, scratch grey,
    the others from a qualitative palette."""
    matplotlib, _, _ = _mpl()
    kinds = kinds or {}
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    out: dict[str, Any] = {}
    i = 0
    for lab in labels:
        kind = kinds.get(lab)
        if kind == "teacher":
            out[lab] = TEACHER_COLOUR
        elif kind == "scratch":
            out[lab] = SCRATCH_COLOUR
        else:
            out[lab] = cmap(i % cmap.N)
            i += 1
    return out


def mean_band(seeds: list[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, low, high) over the seeds at every x any seed has (min-max band)."""
    by_x: dict[float, list[float]] = {}
    for series in seeds:
        for x, v in series:
            if v is not None and math.isfinite(v):
                by_x.setdefault(float(x), []).append(float(v))
    xs = sorted(by_x)
    vals = [by_x[x] for x in xs]
    return (np.array(xs), np.array([float(np.mean(v)) for v in vals]),
            np.array([min(v) for v in vals]), np.array([max(v) for v in vals]))


def _curves_on(ax: Any, curves: CurveSet, colour: dict[str, Any]) -> None:
    for label, seeds in curves.items():
        x, mean, lo, hi = mean_band(seeds)
        if not len(x):
            continue
        c = colour.get(label)
        n = len(seeds)
        ax.plot(x, mean, color=c, lw=1.6, marker="o" if len(x) < 12 else None, ms=3,
                label=_t(label) if n == 1 else f"{_t(label)} (mean of {n})")
        if n > 1:
            ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)


def _legend(ax: Any, n: int) -> None:
    """In the axes for a few entries; beside them, outside the data, for many."""
    if n > 6:
        ax.legend(fontsize=7, ncol=2 if n > 18 else 1, frameon=False, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif n:
        ax.legend(fontsize=8, frameon=False, loc="best")


def learning_curves(curves: CurveSet, stem: Path, *, ylabel: str = "validation accuracy (%)",
                    title: str = "Validation accuracy per epoch",
                    colour: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Each label's metric per epoch: the mean over seeds, the seeds' min-max as a band."""
    fig = new_figure(7.5 + (1.6 if len(curves) > 6 else 0) + (1.6 if len(curves) > 18 else 0),
                     4.8)
    ax = fig.add_subplot()
    _curves_on(ax, curves, colour or colours(list(curves)))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(_t(title))
    ax.grid(alpha=0.3)
    _legend(ax, len(curves))
    return save(fig, stem)


def loss_terms(terms: dict[str, dict[str, list[Series]]], stem: Path) -> tuple[Path, Path]:
    """Training loss by term, one panel per label: each term's unweighted value per epoch
    (mean over seeds, min-max band) and the weighted total (``loss``, dashed)."""
    n = len(terms)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = new_figure(3.4 * cols + 0.6, 2.7 * rows + 0.6)
    all_terms = sorted({t for per in terms.values() for t in per if t != "loss"})
    palette = colours(all_terms)
    for i, (label, per) in enumerate(terms.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for term, seeds in per.items():
            x, mean, lo, hi = mean_band(seeds)
            if not len(x):
                continue
            if term == "loss":
                ax.plot(x, mean, color="black", ls="--", lw=1.2, label="total")
                continue
            ax.plot(x, mean, color=palette[term], lw=1.4, label=_t(term))
            if len(seeds) > 1:
                ax.fill_between(x, lo, hi, color=palette[term], alpha=0.2, lw=0)
        positive = all(v > 0 for seeds in per.values() for s in seeds for _, v in s
                       if v is not None and math.isfinite(v))
        if positive:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.set_title(_t(label), fontsize=9)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle("Training loss by term (unweighted terms; total weighted)", fontsize=11)
    fig.supxlabel("epoch", fontsize=9)
    return save(fig, stem)


def _plain_log_ticks(axis: Any) -> None:
    """A log axis labelled 0.03, 0.05, 1, 2 ... rather than 3×10⁻²."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in "25"
                                           else ""))


@dataclass
class Point:
    """One model on an accuracy-cost plot: ``x`` its cost (latency, size), ``y`` its mean
    accuracy, ``seeds`` the per-seed accuracies (drawn faint), ``kind`` teacher / scratch /
    student."""

    label: str
    x: float
    y: float
    seeds: list[float] = field(default_factory=list)
    kind: str = "student"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (lower cost x, higher accuracy y), by cost.

    A point is dominated when another costs no more and is at least as accurate, and is
    strictly better in one of the two. Ties (same x and y) keep the first.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_vs_cost(points: list[Point], stem: Path, *, xlabel: str, title: str,
                     ylabel: str = "top-1 test accuracy (%)", log_x: bool = True,
                     colour: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Every model a labelled point (mean over seeds; each seed a faint dot), and the
    Pareto front (more accurate and cheaper) as a step line."""
    fig = new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    colour = colour or colours([p.label for p in points], {p.label: p.kind for p in points})
    markers = {"teacher": "s", "scratch": "D"}
    for p in points:
        c = colour.get(p.label)
        if p.seeds:
            ax.scatter([p.x] * len(p.seeds), p.seeds, color=c, alpha=0.25, s=14, lw=0)
        ax.scatter([p.x], [p.y], color=c, s=46, marker=markers.get(p.kind, "o"),
                   edgecolors="black", linewidths=0.6, zorder=3)
    front = [points[i] for i in pareto_front([(p.x, p.y) for p in points])]
    if front:
        xs = [p.x for p in front]
        ys = [p.y for p in front]
        ax.step(xs, ys, where="post", color="#d62728", lw=1.2, alpha=0.8, zorder=2,
                label="Pareto front")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    if log_x and all(p.x > 0 for p in points):
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    _label_points(ax, points)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_t(title))
    ax.grid(alpha=0.3, which="both")
    return save(fig, stem)


def _label_points(ax: Any, points: list[Point]) -> None:
    """Each point's label to its right; labels of points at (nearly) the same cost are
    spread vertically (a thin line to the point) so they do not overwrite each other."""
    lo, hi = ax.get_ylim()
    gap = 0.03 * (hi - lo)
    log_x = ax.get_xscale() == "log"

    def key(p: Point) -> float:
        return math.log(p.x) if log_x else p.x

    span = (max(map(key, points)) - min(map(key, points))) or 1.0
    groups: list[list[Point]] = []
    for p in sorted(points, key=key):
        if groups and key(p) - key(groups[-1][-1]) < 0.03 * span:
            groups[-1].append(p)
        else:
            groups.append([p])
    per_unit = ax.transData.transform((0, 1))[1] - ax.transData.transform((0, 0))[1]
    to_points = 72.0 / ax.figure.dpi
    for group in groups:
        placed: list[float] = []
        for p in sorted(group, key=lambda p: p.y):
            y = max(p.y, placed[-1] + gap) if placed else p.y
            placed.append(y)
            dy = (y - p.y) * per_unit * to_points
            ax.annotate(_t(p.label), (p.x, p.y), xytext=(7, dy), textcoords="offset points",
                        fontsize=7, va="center",
                        arrowprops=None if dy < 3 else
                        {"arrowstyle": "-", "lw": 0.4, "color": "#999999",
                         "shrinkA": 0, "shrinkB": 3})


@dataclass
class Chain:
    """A teacher-assistant path: model names from the teacher to the student, and the mean
    (and std over seeds) test accuracy of each."""

    label: str
    names: list[str]
    acc: list[float]
    std: list[float]


def chain_paths(chains: list[Chain], stem: Path) -> tuple[Path, Path]:
    """Accuracy along each teacher-assistant path: teacher → assistants → student."""
    fig = new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    palette = colours([c.label for c in chains])
    longest = max(len(c.names) for c in chains)
    for c in chains:
        # assistants at 1, 2, ...; the student always in the last column, so that every
        # path's student lines up under "student" whatever the path's length
        x = np.array([*range(len(c.names) - 1), longest - 1])
        ax.errorbar(x, c.acc, yerr=c.std, color=palette[c.label], marker="o", ms=5, lw=1.5,
                    capsize=3, label=_t(f"{c.label}: {' → '.join(c.names)}"))
        for xi, name, a in zip(x, c.names, c.acc, strict=True):
            ax.annotate(_t(name), (xi, a), xytext=(4, -11), textcoords="offset points",
                        fontsize=7, color=palette[c.label])
    ticks = ["teacher"] + [f"assistant {k}" for k in range(1, longest - 1)] + ["student"]
    ax.set_xticks(range(longest), ticks[:longest] if longest > 1 else ["teacher"])
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.set_title("Accuracy along teacher-assistant paths")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return save(fig, stem)


def image_grid(images: np.ndarray, labels: np.ndarray, stem: Path, *, per_class: int = 8,
               title: str = "", class_names: Sequence[str] | None = None,
               max_classes: int = 20,
               value_range: tuple[float, float] | None = None) -> tuple[Path, Path]:
    """A grid of inputs, one row per class (``per_class`` each; the first ``max_classes``
    classes): ``images`` (N, C, H, W) in display scale (any range: stretched to the
    1st-99th percentile of what is shown, or shown on ``value_range``)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise KdkitError(f"image grid: expected images of shape (N, 1|3, H, W), got "
                         f"{tuple(images.shape)}")
    classes = sorted({int(c) for c in labels})[:max_classes]
    picks = {c: np.flatnonzero(labels == c)[:per_class] for c in classes}
    shown = np.concatenate([images[i] for i in picks.values() if len(i)])
    lo, hi = value_range or (np.percentile(shown, 1), np.percentile(shown, 99))
    scale = hi - lo if hi > lo else 1.0
    n_cols = max(len(i) for i in picks.values())
    n_rows = len(classes)
    fig = new_figure(max(4.0, 0.75 * n_cols + 1.0), 0.75 * n_rows + 0.8)
    for r, c in enumerate(classes):
        for k, i in enumerate(picks[c]):
            ax = fig.add_subplot(n_rows, n_cols, r * n_cols + k + 1)
            img = np.clip((images[i] - lo) / scale, 0.0, 1.0)
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(np.transpose(img, (1, 2, 0)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                name = class_names[c] if class_names and c < len(class_names) else str(c)
                ax.set_ylabel(_t(name), fontsize=8, rotation=0, labelpad=12, va="center",
                              ha="right")
    if title:
        fig.suptitle(_t(title), fontsize=10)
    return save(fig, stem)
