"""``write_report``: what a run directory holds, drawn and written as report.md + report.html.

The directory may be an experiment (``kdkit run``: ``summary.json`` with rows and runs, or
one still running: ``config.yaml`` and ``seedK/LABEL/summary.json``), a single run
(``kdkit train`` / ``distill``: ``metrics.jsonl`` + ``summary.json``) or a transfer set
(``kdkit datafree ...``: ``transfer.json``). Every figure that applies is drawn into
``RUN_DIR/report/`` (PNG and SVG); ``report.md`` links them, ``report.html`` embeds them
(base64 PNG: no external file, script or style).
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.errors import KdkitError
from kdkit.report import figures as F
from kdkit.train.checkpoint import atomic_write_bytes, read_json

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
TRANSFER_JSON = "transfer.json"
REPORT_DIR = "report"
PER_CLASS = 8  # images per class in a data-free grid


@dataclass
class Run:
    """One seed of one label: its folder, summary and per-epoch metrics."""

    label: str
    seed: int | None
    folder: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Figure:
    """A drawn figure: its stem (file name without suffix), title and one sentence."""

    stem: str
    title: str
    text: str


@dataclass
class Contents:
    kind: str  # experiment, run or transfer set
    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # label -> teacher / scratch / student
    seeds: list[int] = field(default_factory=list)
    synthetic: str | None = None  # data.synthetic of an experiment
    notes: list[str] = field(default_factory=list)


# --- reading -----------------------------------------------------------------------------

def _metrics(folder: Path) -> list[dict[str, Any]]:
    """The per-epoch lines of ``folder/metrics.jsonl`` (per-step lines and a torn last line
    skipped)."""
    path = folder / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "epoch" in rec and "step" not in rec:
            out.append(rec)
    return out


def _seed_of(label: str) -> tuple[int | None, str]:
    head, _, rest = label.partition("/")
    if rest and head.startswith("seed") and head[4:].lstrip("-").isdigit():
        return int(head[4:]), rest
    return None, label


def _read_summary(path: Path) -> dict[str, Any]:
    data = read_json(path, "summary")
    if not isinstance(data, dict):
        raise KdkitError(f"{path} is not a kdkit summary (a JSON object was expected)")
    return data


def _experiment(run_dir: Path, summary: dict[str, Any] | None) -> Contents:
    """An experiment: from its summary, or (still running) from its runs' summaries."""
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        try:
            loaded = yaml.safe_load((run_dir / "config.yaml").read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            config = {}
    name = str((summary or {}).get("name") or config.get("name") or run_dir.name)
    c = Contents("experiment", name)
    data = config.get("data")
    if isinstance(data, dict) and data.get("synthetic"):
        c.synthetic = str(data["synthetic"])
    if summary is not None:
        run_summaries = [r for r in summary.get("runs", []) if isinstance(r, dict)]
        c.rows = [r for r in summary.get("rows", []) if isinstance(r, dict)]
        c.seeds = [int(s) for s in summary.get("seeds", [])]
    else:  # unfinished: every finished run's own summary
        run_summaries = []
        seed_dirs = [(seed, p) for p in run_dir.glob("seed*")
                     if p.is_dir() and (seed := _seed_of(p.name + "/x")[0]) is not None]
        for _, seed_dir in sorted(seed_dirs):
            for sub in sorted(seed_dir.iterdir()):
                if (sub / SUMMARY).is_file():
                    run_summaries.append(_read_summary(sub / SUMMARY))
        c.notes.append("The experiment has no summary.json yet (unfinished): the table and "
                       "figures show the runs finished so far, without latency.")
    for s in run_summaries:
        seed, label = _seed_of(str(s.get("label", "")))
        if seed is None:
            continue
        if seed not in c.seeds:
            c.seeds.append(seed)
        folder = run_dir / f"seed{seed}" / label
        c.runs.append(Run(label, seed, folder, s, _metrics(folder)))
        if label not in c.labels:
            c.labels.append(label)
    if not c.rows:
        c.rows = _rows_from_runs(c.runs, c.labels)
    if summary is None:  # teachers first, then the students in the config's order
        order = [s.get("label") for s in config.get("students") or [] if isinstance(s, dict)]
        teachers = {r.label for r in c.runs if r.summary.get("role") == "teacher"}
        c.rows.sort(key=lambda r: (r["label"] not in teachers,
                                   order.index(r["label"]) if r["label"] in order
                                   else len(order)))
    c.labels = [r["label"] for r in c.rows] + [lab for lab in c.labels
                                               if lab not in {r["label"] for r in c.rows}]
    for lab in c.labels:
        mine = [r.summary for r in c.runs if r.label == lab]
        if any(s.get("role") == "teacher" for s in mine):
            c.kinds[lab] = "teacher"
        elif mine and all(s.get("method") in ("ce", "mse") and not s.get("transfer")
                          for s in mine):  # trained on the task's own targets alone
            c.kinds[lab] = "scratch"
        else:
            c.kinds[lab] = "student"
    return c


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _rows_from_runs(runs: list[Run], labels: list[str]) -> list[dict[str, Any]]:
    """Table rows (as the experiment's summary has them, without latency) from runs."""
    rows = []
    for lab in labels:
        rs = [r.summary for r in runs if r.label == lab]
        accs = [float(r["test_acc"]) for r in rs if isinstance(r.get("test_acc"), (int, float))]
        psnr = [float(r["test_psnr"]) for r in rs if isinstance(r.get("test_psnr"), (int, float))]
        if psnr:  # a dense task
            p_m, p_s = _mean_std(psnr)
            vp = [float(r["val_psnr"]) for r in rs
                  if isinstance(r.get("val_psnr"), (int, float))]
            v_m, v_s = _mean_std(vp) if vp else (None, None)
            rows.append({"label": lab, "model": rs[0].get("model"),
                         "method": rs[0].get("method"), "params": rs[0].get("params"),
                         "size_bytes": rs[0].get("size_bytes"), "test_psnr_mean": p_m,
                         "test_psnr_std": p_s, "val_psnr_mean": v_m, "val_psnr_std": v_s,
                         "role": rs[0].get("role", "student"), "n_seeds": len(psnr),
                         "wall_s_mean": statistics.fmean(float(r.get("wall_s", 0.0))
                                                         for r in rs)})
            continue
        if not accs:
            continue
        vals = [float(r["val_acc"]) for r in rs if isinstance(r.get("val_acc"), (int, float))]
        acc_m, acc_s = _mean_std(accs)
        val_m, val_s = _mean_std(vals) if vals else (None, None)
        rows.append({"label": lab, "model": rs[0].get("model"), "method": rs[0].get("method"),
                     "params": rs[0].get("params"), "size_bytes": rs[0].get("size_bytes"),
                     "test_acc_mean": acc_m, "test_acc_std": acc_s, "val_acc_mean": val_m,
                     "val_acc_std": val_s, "n_seeds": len(accs),
                     "wall_s_mean": statistics.fmean(float(r.get("wall_s", 0.0)) for r in rs)})
    return rows


def _single_run(run_dir: Path) -> Contents:
    summary = _read_summary(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    seed, label = _seed_of(str(summary.get("label") or run_dir.name))
    label = label.rsplit("/", 1)[-1] or run_dir.name
    c = Contents("run", label, labels=[label], kinds={label: "student"})
    if summary.get("role") == "teacher":
        c.kinds[label] = "teacher"
    c.runs.append(Run(label, seed if seed is not None else summary.get("seed"), run_dir,
                      summary, _metrics(run_dir)))
    if summary:
        c.rows = _rows_from_runs(c.runs, [label])
    return c


def inspect(run_dir: Path) -> Contents:
    """What ``run_dir`` holds (experiment, run or transfer set); an error names what was
    expected when it holds none of them."""
    if not run_dir.exists():
        raise KdkitError(f"no such directory to report on: {run_dir}; give an experiment "
                         "directory (kdkit run --out), a run directory (kdkit train/distill "
                         "--out) or a transfer set (kdkit datafree ... --out)")
    if not run_dir.is_dir():
        raise KdkitError(f"{run_dir} is not a directory to report on; give the folder a "
                         "kdkit run, train, distill or datafree command wrote")
    summary = None
    if (run_dir / SUMMARY).is_file():
        summary = _read_summary(run_dir / SUMMARY)
        if "rows" in summary or "runs" in summary:
            return _experiment(run_dir, summary)
    if summary is not None or (run_dir / METRICS).is_file():
        return _single_run(run_dir)
    if (run_dir / "config.yaml").is_file() and any(run_dir.glob(f"seed*/*/{SUMMARY}")):
        return _experiment(run_dir, None)
    if (run_dir / TRANSFER_JSON).is_file():
        return Contents("transfer set", run_dir.name)
    raise KdkitError(
        f"nothing to report in {run_dir}: it holds neither {SUMMARY} (an experiment from kdkit run, or a "
        f"run from kdkit train/distill) nor {METRICS} (a run's metrics) nor {TRANSFER_JSON} "
        "(a transfer set from kdkit datafree); give the folder such a command wrote with --out"
    )


# --- figures -----------------------------------------------------------------------------

def _series(runs: list[Run], key: str) -> list[F.Series]:
    out = []
    for r in runs:
        s = [(float(m["epoch"]), float(m[key])) for m in r.metrics
             if isinstance(m.get(key), (int, float)) and isinstance(m.get("epoch"), (int, float))]
        if s:
            out.append(s)
    return out


def _by_label(c: Contents) -> dict[str, list[Run]]:
    return {lab: [r for r in c.runs if r.label == lab] for lab in c.labels}


def _fig_curves(c: Contents, out: Path, colour: dict[str, Any]) -> list[Figure]:
    keys = {k for r in c.runs for m in r.metrics for k in m}
    if "val/acc" in keys:
        key, ylabel, what = "val/acc", "validation accuracy (%)", "Validation accuracy"
    elif "val/bpc" in keys:
        key, ylabel, what = "val/bpc", "validation bits per character", "Validation bits per character"
    elif "val/psnr" in keys:  # a dense task
        key, ylabel, what = "val/psnr", "validation PSNR (dB)", "Validation PSNR"
    else:
        return []
    curves = {lab: s for lab, rs in _by_label(c).items() if (s := _series(rs, key))}
    if not curves:
        return []
    F.learning_curves(curves, out / "learning_curves", ylabel=ylabel,
                      title=f"{what} per epoch", colour=colour)
    n = max(len(s) for s in curves.values())
    band = (f" the line is the mean over the seeds ({n} at most), the band the range from "
            "the lowest to the highest seed." if n > 1 else "")
    return [Figure("learning_curves", f"{what} per epoch",
                   f"{what} of each run at the end of every epoch ({key} in metrics.jsonl);"
                   + (band or " one seed."))]


def _fig_losses(c: Contents, out: Path) -> list[Figure]:
    terms: dict[str, dict[str, list[F.Series]]] = {}
    for lab, rs in _by_label(c).items():
        keys = sorted({k for r in rs for m in r.metrics for k in m
                       if k.startswith("train/") and k.count("/") == 1
                       and k not in ("train/acc", "train/psnr")})  # metrics, not terms
        per = {k.split("/", 1)[1]: s for k in keys if (s := _series(rs, k))}
        if per:
            terms[lab] = per
    if not terms:
        return []
    F.loss_terms(terms, out / "loss_terms")
    return [Figure("loss_terms", "Training loss by term",
                   "Each loss term's unweighted value per epoch (mean over seeds, range as a "
                   "band), with the weighted total the optimiser minimised dashed; one panel "
                   "per run.")]


def _fig_temperature(c: Contents, out: Path, colour: dict[str, Any]) -> list[Figure]:
    curves: dict[str, list[F.Series]] = {}
    for lab, rs in _by_label(c).items():
        keys = sorted({k for r in rs for m in r.metrics for k in m
                       if k.startswith("train/") and k.endswith("/temperature")})
        for k in keys:
            name = lab if len(keys) == 1 else f"{lab} ({k.split('/')[1]})"
            if s := _series(rs, k):
                curves[name] = s
    if not curves:
        return []
    F.learning_curves(curves, out / "temperature", ylabel="temperature T",
                      title="Learnt distillation temperature (CTKD) per epoch",
                      colour={**F.colours(list(curves)), **colour})
    return [Figure("temperature", "CTKD temperature",
                   "The temperature CTKD learns adversarially (train/<term>/temperature, its "
                   "mean over each epoch's steps), per epoch: " + ", ".join(curves) + ".")]


def _metric_name(c: Contents) -> str:
    if any(r.get("test_psnr_mean") is not None for r in c.rows):
        return "PSNR is"
    if any(r.get("test_bpc_mean") is not None for r in c.rows):
        return "Bits per character are"
    return "Accuracy is"


def _quality(c: Contents) -> tuple[str, str, str]:
    """The metric the cost figures plot (higher is better): (summary key, axis label,
    name) — top-1 accuracy, or a dense task's PSNR."""
    if any(row.get("test_psnr_mean") is not None for row in c.rows):
        return "test_psnr", "test PSNR (dB)", "PSNR"
    return "test_acc", "top-1 test accuracy (%)", "Accuracy"


def _points(c: Contents, key: str, scale: float) -> list[F.Point]:
    out = []
    metric = _quality(c)[0]
    for row in c.rows:
        x, y = row.get(key), row.get(f"{metric}_mean")
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or x <= 0:
            continue
        seeds = [float(r.summary[metric]) for r in c.runs
                 if r.label == row["label"] and isinstance(r.summary.get(metric),
                                                           (int, float))]
        out.append(F.Point(row["label"], float(x) * scale, float(y), seeds,
                           c.kinds.get(row["label"], "student")))
    return out


def _fig_costs(c: Contents, out: Path, colour: dict[str, Any]) -> list[Figure]:
    figs = []
    for key, scale, stem, xlabel, what in (
        ("latency_ms", 1.0, "acc_vs_latency",
         "CPU latency (ms per sample, torch eager, batch 1; log scale)", "latency"),
        ("size_bytes", 1 / 1024, "acc_vs_size", "size on disk (KiB, fp32; log scale)", "size"),
    ):
        points = _points(c, key, scale)
        if len(points) < 2:
            continue
        _metric, ylabel, name = _quality(c)
        F.accuracy_vs_cost(points, out / stem, xlabel=xlabel, colour=colour, ylabel=ylabel,
                           title=f"{name} against {what}")
        front = [points[i].label for i in F.pareto_front([(p.x, p.y) for p in points])]
        seeds = max(len(p.seeds) for p in points)
        figs.append(Figure(
            stem, f"{name} against {what}",
            f"Every model's mean test {name if name == 'PSNR' else 'accuracy'} against its "
            f"{what}" + (" (faint dots: each seed)" if seeds > 1 else "")
            + "; the red step line is the Pareto front, the models no other model beats on "
            f"both {name if name == 'PSNR' else 'accuracy'} and {what}: {', '.join(front)}."))
    return figs


def _fig_chains(c: Contents, out: Path) -> list[Figure]:
    acc = {(r.seed, r.label): r.summary.get("test_acc") for r in c.runs}
    chains = []
    for lab in c.labels:
        rs = [r for r in c.runs if r.label == lab and isinstance(r.summary.get("path"), list)
              and isinstance(r.summary.get("stages"), list)]
        if not rs:
            continue
        names = [str(n) for n in rs[0].summary["path"]]
        per_pos: list[list[float]] = [[] for _ in names]
        for r in rs:
            s = r.summary
            if [str(n) for n in s["path"]] != names:
                continue
            vals = [acc.get((r.seed, names[0]))] + [st.get("test_acc") for st in s["stages"]]
            vals.append(s.get("test_acc"))
            for k, v in enumerate(vals[:len(names)]):
                if isinstance(v, (int, float)):
                    per_pos[k].append(float(v))
        if all(per_pos[1:]):
            keep = [k for k, v in enumerate(per_pos) if v]
            chains.append(F.Chain(lab, [names[k] for k in keep],
                                  [_mean_std(per_pos[k])[0] for k in keep],
                                  [_mean_std(per_pos[k])[1] for k in keep]))
    if not chains:
        return []
    F.chain_paths(chains, out / "chain_paths")
    return [Figure("chain_paths", "Accuracy along teacher-assistant paths",
                   "Test accuracy of every model on each teacher-assistant path, from the "
                   "teacher through the assistants to the student (mean over seeds, error "
                   "bars one standard deviation).")]


def _denormalised(x: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    data = meta.get("data")
    if not isinstance(data, dict):
        data = {}
    mean, std = data.get("mean", 0.0), data.get("std", 1.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1) if np.ndim(mean) else mean
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1) if np.ndim(std) else std
    return np.asarray(x * s + m, dtype=np.float32)


def _transfer_images(folder: Path, teacher_dir: Path | None
                     ) -> tuple[np.ndarray, np.ndarray, str, str] | None:
    """(images, labels, source, detail) of a transfer set folder (a fixed set, or a DAFL
    generator's fresh samples labelled by the teacher); None if it holds neither."""
    from kdkit.datafree.synthesis import load_transfer

    if (folder / TRANSFER_JSON).is_file():
        ts = load_transfer(folder)
        src = ts.meta.get("source", "transfer set")
        kind = f" ({ts.meta['record']})" if ts.meta.get("record") else ""
        return _denormalised(ts.x.numpy(), ts.meta), ts.y.numpy(), src, kind
    if (folder / "generator.json").is_file() and teacher_dir is not None:
        from kdkit.datafree.dafl import load_generator, sample_generator
        from kdkit.train.artifacts import load_model

        generator, meta = load_generator(folder)
        teacher, tmeta = load_model(teacher_dir)
        x, y = sample_generator(generator, teacher.eval(), samples=64 * PER_CLASS,
                                latent_dim=int(meta["latent_dim"]), seed=int(meta.get("seed", 0)))
        return (_denormalised(x.numpy(), tmeta), y.numpy(), "dafl",
                " (generator samples, labelled by the teacher)")
    return None


def _grid(images: tuple[np.ndarray, np.ndarray, str, str], out: Path, stem: str, title: str,
          where: str, label: str | None = None) -> Figure:
    x, y, source, detail = images
    what = source + detail
    # the run's label only when it is not its source's name ("Data-free inputs: dafl (...)")
    full = f"{title}: {what}" if label in (None, source) else f"{title}, {label}: {what}"
    F.image_grid(x, y, out / stem, per_class=PER_CLASS, title=full)
    return Figure(stem, full,
                  f"Inputs of the {what} transfer set from {where}, {PER_CLASS} per class at "
                  "most (one row per class: the class it was made for, or the teacher's "
                  "label), stretched to the 1st-99th percentile of what is shown.")


def _fig_datafree(c: Contents, run_dir: Path, out: Path) -> list[Figure]:
    figs = []
    if c.kind == "transfer set":
        images = _transfer_images(run_dir, None)
        if images is not None:
            figs.append(_grid(images, out, "transfer_set", "Transfer set", str(run_dir)))
        return figs
    done: set[str] = set()
    for r in sorted(c.runs, key=lambda r: (r.seed is None, r.seed or 0)):
        if r.label in done or not r.summary.get("transfer"):
            continue
        folder = r.folder / "transfer"
        teachers = r.summary.get("teachers") or []
        teacher_dir = (r.folder.parent / str(teachers[0])
                       if teachers and r.seed is not None else None)
        try:
            images = _transfer_images(folder, teacher_dir)
        except KdkitError as e:
            c.notes.append(f"No input grid for {r.label}: {e}")
            continue
        if images is None:
            continue
        done.add(r.label)
        stem = "datafree_" + re.sub(r"[^A-Za-z0-9_.-]", "_", r.label)
        where = f"seed{r.seed}/{r.label}" if r.seed is not None else r.label
        figs.append(_grid(images, out, stem, "Data-free inputs", where, r.label))
    if c.synthetic:
        seed = c.seeds[0] if c.seeds else 0
        path = Path(c.synthetic.replace("{seed}", str(seed)))
        found = next((p for p in (path, run_dir / path) if (p / TRANSFER_JSON).is_file()
                      or p.suffix == ".json" and p.is_file()), None)
        if found is None:
            c.notes.append(f"No input grid for data.synthetic: {path} is not found from here.")
        else:
            folder = found.parent if found.suffix == ".json" else found
            images = _transfer_images(folder, None)
            if images is not None:
                figs.append(_grid(images, out, "synthetic", "Synthetic training set",
                                  str(path)))
    return figs


def _fig_dense(c: Contents, out: Path) -> list[Figure]:
    """A dense task's pictures: the first test images noisy, clean, and as each model of
    the first seed restores them (the pairs rebuilt from what the models recorded)."""
    seeds = sorted({r.seed for r in c.runs if r.seed is not None})
    first = seeds[0] if seeds else None
    runs = {r.label: r for r in c.runs if r.seed == first
            and r.summary.get("test_psnr") is not None and (r.folder / "model.json").is_file()}
    if not runs:
        return []
    import torch

    from kdkit.data import ArrayDataset, load_dataset
    from kdkit.train.artifacts import load_model

    n = PER_CLASS
    rows: list[np.ndarray] = []
    names: list[str] = []
    for lab in [lab for lab in c.labels if lab in runs]:
        model, meta = load_model(runs[lab].folder)
        if not rows:
            d, src = meta["data"], meta["data"].get("source") or {}
            try:
                data = load_dataset(d["name"], root=src.get("root"), seed=src.get("seed", 0),
                                    val_fraction=src.get("val_fraction", 0.1),
                                    train_subset=src.get("train_subset"), task="denoise",
                                    noise=src.get("noise"), channels=src.get("channels"),
                                    resize=src.get("resize"), log=lambda _m: None)
            except KdkitError as e:
                c.notes.append(f"No denoising pictures: the test pairs cannot be rebuilt ({e}).")
                return []
            test = data.test
            assert isinstance(test, ArrayDataset)  # (a dense task is made in memory)
            x, y = test.x[:n], test.y[:n]
            rows += [_denormalised(x.numpy(), meta), y.numpy()]
            names += ["noisy input", "clean target"]
        with torch.no_grad():
            rows.append(model.eval()(x).clamp(0.0, 1.0).numpy())
        names.append(lab)
    images = np.concatenate(rows)
    labels = np.repeat(np.arange(len(rows)), n)
    F.image_grid(images, labels, out / "denoised", per_class=n, class_names=names,
                 max_classes=len(rows), value_range=(0.0, 1.0),
                 title="Test images: noisy, clean, and as each model restores them")
    return [Figure("denoised", "Denoised test images",
                   f"The first {n} test images with their noise, clean, and as each model "
                   f"of seed {first} restores them (one row each; pixels on [0, 1], the "
                   "noisy ones clipped for display).")]


# --- the table ---------------------------------------------------------------------------

def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: fmt.format(v) if isinstance(v, (int, float)) else "–"


def _pm(key: str) -> Callable[[dict[str, Any]], str]:
    def cell(r: dict[str, Any]) -> str:
        m, s = r.get(f"{key}_mean"), r.get(f"{key}_std")
        if not isinstance(m, (int, float)):
            return "–"
        return f"{m:.2f} ± {s:.2f}" if isinstance(s, (int, float)) else f"{m:.2f}"
    return cell


# (header, key that must be in some row for the column to show, cell)
COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("run", "label", lambda r: str(r.get("label", ""))),
    ("model", "model", lambda r: str(r.get("model") or "–")),
    ("method", "method", lambda r: str(r.get("method") or "–")),
    ("params", "params", lambda r: _num("{:,}")(r.get("params"))),
    ("MACs", "macs", lambda r: _num("{:,}")(r.get("macs"))),
    ("size fp32", "size_bytes", lambda r: _size(r.get("size_bytes"))),
    ("size fp16", "size_fp16_bytes", lambda r: _size(r.get("size_fp16_bytes"))),
    ("size int8", "size_int8_bytes", lambda r: _size(r.get("size_int8_bytes"))),
    ("latency (ms, b1)", "latency_ms", lambda r: _num("{:.3f}")(r.get("latency_ms"))),
    ("latency (ms, b64)", "latency_b64_ms", lambda r: _num("{:.3f}")(r.get("latency_b64_ms"))),
    ("ORT latency (ms, b1)", "ort_latency_ms",
     lambda r: _num("{:.3f}")(r.get("ort_latency_ms"))),
    ("ORT latency (ms, b64)", "ort_latency_b64_ms",
     lambda r: _num("{:.3f}")(r.get("ort_latency_b64_ms"))),
    ("top-1 test (%)", "test_acc_mean", _pm("test_acc")),
    ("test PSNR (dB)", "test_psnr_mean", _pm("test_psnr")),
    ("val PSNR (dB)", "val_psnr_mean", _pm("val_psnr")),
    ("top-1 val (%)", "val_acc_mean", _pm("val_acc")),
    ("int8 top-1 test (%)", "int8_acc_mean", _pm("int8_acc")),
    ("seeds", "n_seeds", lambda r: _num("{}")(r.get("n_seeds"))),
    ("wall per seed (s)", "wall_s_mean", lambda r: _num("{:.1f}")(r.get("wall_s_mean"))),
]


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table: the base columns and every extra column
    (compression, ONNX Runtime, int8) that some row carries."""
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    return [h for h, _, _ in cols], [[cell(r) for _, _, cell in cols] for r in rows]


def _md_table(rows: list[dict[str, Any]]) -> str:
    head, cells = table(rows)
    esc = [[v.replace("|", "\\|") for v in row] for row in cells]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)


def _html_table(rows: list[dict[str, Any]]) -> str:
    head, cells = table(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                   for row in cells)
    return f"<table>\n<thead><tr>{th}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


# --- writing -----------------------------------------------------------------------------

def _intro(c: Contents, run_dir: Path) -> str:
    if c.kind == "experiment":
        seeds = ", ".join(map(str, sorted(c.seeds)))
        return (f"Experiment `{c.name}` in `{run_dir}`: {len(c.labels)} runs over seeds "
                f"{seeds or '–'}. {_metric_name(c)} at the last epoch, mean ± std over "
                "seeds.")
    if c.kind == "run":
        return f"Run `{c.name}` in `{run_dir}`."
    return f"Transfer set in `{run_dir}` (from `kdkit datafree`)."


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
       "color:#222}table{border-collapse:collapse;font-size:0.85em}"
       "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}"
       "th:first-child,td:first-child{text-align:left}img{max-width:100%}"
       "figure{margin:1.5em 0}figcaption{font-size:0.9em;color:#444}")


def write_report(run_dir: str | Path, *, out_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Draw every figure that applies to ``run_dir`` and write ``report.md`` and a
    self-contained ``report.html`` into ``out_dir`` (default ``RUN_DIR/report``).

    Returns the path of ``report.md``. Figures: learning curves (validation accuracy, or
    bits per character, per epoch), training loss by term, accuracy against latency and
    against size with the Pareto front, CTKD's temperature, accuracy along teacher-assistant
    paths, a grid of data-free inputs per class, and for a dense task the test images as
    each model restores them, each as PNG and SVG.
    """
    F._mpl()  # a missing matplotlib is one error, before anything is read or written
    run_dir = Path(run_dir)
    c = inspect(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    if out.exists() and not out.is_dir():
        raise KdkitError(f"{out} exists and is not a folder; give --out a "
                         "folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    colour = F.colours(c.labels, c.kinds)
    figs: list[Figure] = []
    figs += _fig_curves(c, out, colour)
    figs += _fig_losses(c, out)
    figs += _fig_costs(c, out, colour)
    figs += _fig_temperature(c, out, colour)
    figs += _fig_chains(c, out)
    figs += _fig_datafree(c, run_dir, out)
    figs += _fig_dense(c, out)

    md = [f"# Report: {c.name}", "", _intro(c, run_dir), ""]
    if c.rows:
        md += ["## Results", "", _md_table(c.rows), ""]
    md += [f"> {n}" for n in c.notes] + ([""] if c.notes else [])
    md += ["## Figures", ""]
    for f in figs:
        md += [f"### {f.title}", "", f"![{f.title}]({f.stem}.png)", "",
               f"{f.text} ([SVG]({f.stem}.svg))", ""]
    if not figs:
        md += ["Nothing to draw: no metrics, models or transfer sets were found.", ""]
    report_md = out / "report.md"
    atomic_write_bytes(report_md, "\n".join(md).encode())

    parts = [f"<h1>Report: {html.escape(c.name)}</h1>",
             f"<p>{_inline(_intro(c, run_dir))}</p>"]
    if c.rows:
        parts += ["<h2>Results</h2>", _html_table(c.rows)]
    parts += [f"<blockquote>{html.escape(n)}</blockquote>" for n in c.notes]
    parts.append("<h2>Figures</h2>")
    for f in figs:
        data = base64.b64encode((out / f"{f.stem}.png").read_bytes()).decode()
        parts.append(f"<figure><h3>{html.escape(f.title)}</h3>"
                     f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(f.text)}</figcaption></figure>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Report: {html.escape(c.name)}</title><style>{CSS}</style></head>"
            "<body>\n" + "\n".join(parts) + "\n</body></html>\n")
    atomic_write_bytes(out / "report.html", page.encode())
    log(f"report: {len(figs)} figure{'s' if len(figs) != 1 else ''} -> {report_md} "
        f"(and report.html)")
    return report_md


def _inline(text: str) -> str:
    """Markdown's `code` as <code>, the rest escaped."""
    pieces = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(pieces))


def figure_files(report_md: Path) -> list[Path]:
    """The figure files (PNG and SVG) ``report.md`` links, in order."""
    names = re.findall(r"\]\(([^)]+\.(?:png|svg))\)", report_md.read_text())
    return [report_md.parent / n for n in names]


__all__ = ["Contents", "inspect", "figure_files", "table", "write_report"]
