"""An experiment's table: accuracy over seeds, and what each model costs to ship and run.

One row per run label. Accuracy (test, val and int8) is the mean ± std over seeds at the
last epoch; the compression columns are measured on the first seed's model (the seeds
share an architecture): parameters, MACs per sample (torch's FLOP counter), size on disk
in fp32 / fp16 / int8, latency at batch 1 and 64 in torch eager and in onnxruntime on the
CPU (median of N after warm-up, with the thread count stated), and ratios against the
teacher (×smaller, ×faster, Δ accuracy). The onnxruntime and int8 columns need
``kdkit[deploy]`` and ``eval.deploy`` (default on); without them they show "–".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.data import DatasetSplits
from kdkit.train.artifacts import load_model
from kdkit.train.compression import ratios, torch_profile

# Row fields that measure time (they differ from run to run; everything else is exact).
TIMING_KEYS = frozenset({
    "latency_ms", "latency_b64_ms", "ort_latency_ms", "ort_latency_b64_ms",
    "float_ort_latency_ms", "float_ort_latency_b64_ms", "x_faster", "x_faster_ort",
    "wall_s_mean",
})
DEPLOY_DIR = "deploy"  # inside each measured run: model.onnx, model.int8.onnx, export.json


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    labels: list[str] = []
    for r in runs:
        lab = r["label"].split("/", 1)[-1]
        if lab not in labels:
            labels.append(lab)
    return labels


def deploy_available() -> bool:
    """Whether onnx, onnxruntime and onnxscript import (the ``deploy`` extra)."""
    from kdkit.deploy import require_deploy
    from kdkit.errors import KdkitError

    try:
        require_deploy()
    except KdkitError:
        return False
    return True


def aggregate(
    runs: list[dict[str, Any]], out_dir: Path, first_seed: int, *, latency_repeats: int = 50,
    deploy: bool = False, data_for: Callable[[int], DatasetSplits] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per run label: accuracy mean ± std over its seeds; the compression columns
    of seed ``first_seed``'s model; with ``deploy`` (and ``data_for(seed)`` giving the
    seed's splits) each seed's model exported, verified and quantized to int8, its int8
    test accuracy averaged like the float one, and the first seed's onnxruntime latency."""
    rows = []
    labels = _labels(runs)
    arrays: dict[int, tuple[Any, Any, Any]] = {}  # per seed: test x, test y, calibration x

    def seed_arrays(seed: int) -> tuple[Any, Any, Any]:
        """The seed's test split and calibration inputs as tensors, read once (a streamed
        split is decoded once, not once per model)."""
        from kdkit.deploy.ort import calibration_inputs, split_arrays

        if seed not in arrays:
            assert data_for is not None
            data = data_for(seed)
            arrays[seed] = (*split_arrays(data.test), calibration_inputs(data.train))
        return arrays[seed]

    for i, lab in enumerate(labels):
        rs = [r for r in runs if r["label"].split("/", 1)[-1] == lab]
        run_dir = out_dir / f"seed{first_seed}" / lab
        model, meta = load_model(run_dir)
        shape = tuple(meta["data"]["input_shape"])
        vocab = int(meta["data"]["num_classes"])
        log(f"[table] {lab} ({i + 1}/{len(labels)}): measuring size, MACs and latency")
        prof = torch_profile(model, shape, repeats=latency_repeats, num_classes=vocab)
        dense = rs[0].get("test_psnr") is not None  # a dense task: PSNR, no accuracy
        acc_m, acc_s = (None, None) if dense else _mean_std([r["test_acc"] for r in rs])
        vals = [r["val_acc"] for r in rs if r.get("val_acc") is not None]
        val_m, val_s = _mean_std(vals) if vals else (None, None)
        row: dict[str, Any] = {
            "label": lab, "model": rs[0]["model"], "method": rs[0]["method"],
            "role": rs[0].get("role", "student"), "context": shape[0] if len(shape) == 1 else None,
            "size_bytes": rs[0]["size_bytes"], **prof,
            "test_acc_mean": acc_m, "test_acc_std": acc_s, "val_acc_mean": val_m,
            "val_acc_std": val_s, "n_seeds": len(rs),
            "wall_s_mean": statistics.fmean(r["wall_s"] + r.get("transfer_s", 0.0) for r in rs),
        }
        if len(shape) == 1:  # language models (a summary without bpc: its loss in bits)
            for r in rs:
                if r.get("test_bpc") is None and r.get("test_loss") is not None:
                    r.setdefault("test_bpc", r["test_loss"] / math.log(2.0))
            from kdkit.distill.sampling import generation_latency_ms

            row["test_bpc_mean"], row["test_bpc_std"] = _mean_std([r["test_bpc"] for r in rs])
            vb = [r["val_bpc"] for r in rs if r.get("val_bpc") is not None]
            row["val_bpc_mean"], row["val_bpc_std"] = _mean_std(vb) if vb else (None, None)
            row["tokens_per_s_mean"] = statistics.fmean(
                r.get("train_tokens_per_s", 0.0) for r in rs)
            row["gen_ms_per_token"] = round(generation_latency_ms(model, vocab, shape[0]), 3)
        else:
            if dense:
                row["test_psnr_mean"], row["test_psnr_std"] = _mean_std(
                    [r["test_psnr"] for r in rs])
                row["test_mse_mean"], row["test_mse_std"] = _mean_std(
                    [r["test_loss"] for r in rs])
                vp = [r["val_psnr"] for r in rs if r.get("val_psnr") is not None]
                row["val_psnr_mean"], row["val_psnr_std"] = _mean_std(vp) if vp else (None, None)
            if deploy and data_for is not None:  # (ONNX export takes image inputs)
                cols = _deploy_columns(lab, rs, out_dir, first_seed, shape, seed_arrays,
                                       latency_repeats, log)
                if dense:  # its "accuracy" is the int8 model's PSNR
                    cols["int8_psnr_mean"] = cols.pop("int8_acc_mean")
                    cols["int8_psnr_std"] = cols.pop("int8_acc_std")
                row.update(cols)
        rows.append(row)
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    for row in rows:
        if teacher is not None:
            row.update(ratios(row, teacher), vs=teacher["label"])
    return rows


def _deploy_columns(lab: str, rs: list[dict[str, Any]], out_dir: Path, first_seed: int,
                    shape: tuple[int, ...], seed_arrays: Callable[[int], tuple[Any, Any, Any]],
                    repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Every seed's model exported (verified) and quantized; int8 accuracy over the seeds;
    the first seed's file sizes and onnxruntime latency."""
    from kdkit.deploy.ort import deploy_profile

    out: dict[str, Any] = {}
    int8: list[float] = []
    for r in rs:
        seed = int(r["label"].split("/", 1)[0].removeprefix("seed"))
        run_dir = out_dir / f"seed{seed}" / lab
        model, _ = load_model(run_dir)
        test_x, test_y, calib_x = seed_arrays(seed)
        log(f"[table] {lab} seed {seed}: ONNX export, int8 calibration and evaluation")
        prof = deploy_profile(model, shape, test_x, test_y, calib_x, run_dir / DEPLOY_DIR,
                              latency=seed == first_seed, repeats=repeats,
                              threads=torch.get_num_threads())
        int8.append(prof["int8_acc"])
        if seed == first_seed:
            out.update({k: v for k, v in prof.items() if k != "int8_acc"})
    out["int8_acc_mean"], out["int8_acc_std"] = _mean_std(int8)
    return out


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _macs(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _pm(m: float | None, s: float | None) -> str:
    return "–" if m is None else f"{m:.2f} ± {(s or 0.0):.2f}"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _format_lm(rows: list[dict[str, Any]], cfg: Any) -> str:
    """A language-model experiment's table: bits per character, size and speed."""
    lines = ["| run | model | method | test bpc | val bpc | params | MACs / token | fp32 "
             "| ×smaller | train tokens/s | generation (ms/token) | wall per seed (s) |",
             "|" + "---|" * 12]
    for r in rows:
        macs = r.get("macs")
        per_token = macs // max(1, int(r.get("context", 1))) if macs else None
        lines.append(
            f"| {r['label']} | {r['model']} | {r['method']} | "
            f"{_pm(r['test_bpc_mean'], r['test_bpc_std'])} | "
            f"{_pm(r.get('val_bpc_mean'), r.get('val_bpc_std'))} | {r['params']:,} | "
            f"{_macs(per_token)} | {_size(r.get('size_fp32_bytes'))} | "
            f"{_x(r.get('x_smaller'))} | {r.get('tokens_per_s_mean', 0.0):,.0f} | "
            f"{_ms(r.get('gen_ms_per_token'))} | {r.get('wall_s_mean', 0.0):.1f} |")
    lines.append("")
    note = ("bits per character (per byte for a byte vocabulary) on the test split at the "
            "last epoch, mean ± std over seeds; sizes, MACs and generation latency (batch 1, "
            "sampling, with the model's key/value cache where it has one) of the first seed's "
            "model on this machine's CPU")
    if cfg is not None:
        note = f"{cfg.name}: {len(cfg.seeds)} seeds {cfg.seeds}, dataset {cfg.data.name}; " + note
    lines.append(note + ".")
    return "\n".join(lines) + "\n"


def _compression_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The compression report: parameters, MACs, sizes, latencies, ratios (and a blank)."""
    lines = ["| run | params | MACs | fp32 | fp16 | int8 | ×smaller | eager b1 (ms) "
             "| eager b64 (ms) | ORT b1 fp32 / int8 (ms) | ORT b64 fp32 / int8 (ms) "
             "| ×faster eager / ORT int8 |", "|" + "---|" * 12]
    for r in rows:
        fast = f"{_x(r.get('x_faster'))} / {_x(r.get('x_faster_ort'))}"
        ort1 = f"{_ms(r.get('float_ort_latency_ms'))} / {_ms(r.get('ort_latency_ms'))}"
        ort64 = f"{_ms(r.get('float_ort_latency_b64_ms'))} / {_ms(r.get('ort_latency_b64_ms'))}"
        lines.append(
            f"| {r['label']} | {r['params']:,} | {_macs(r.get('macs'))} | "
            f"{_size(r.get('size_fp32_bytes', r.get('size_bytes')))} | "
            f"{_size(r.get('size_fp16_bytes'))} | {_size(r.get('size_int8_bytes'))} | "
            f"{_x(r.get('x_smaller'))} | {_ms(r.get('latency_ms'))} | "
            f"{_ms(r.get('latency_b64_ms'))} | {ort1} | {ort64} | {fast} |")
    return lines + [""]


def _format_dense(rows: list[dict[str, Any]], cfg: Any) -> str:
    """A dense task's table: PSNR and MSE on the test split, size and speed."""
    lines = ["| run | model | method | test PSNR (dB) | val PSNR (dB) | int8 test PSNR (dB) "
             "| test MSE (×10⁻³) | Δ PSNR vs teacher | wall per seed (s) |", "|" + "---|" * 9]
    for r in rows:
        d = r.get("d_psnr")
        mse = (r["test_mse_mean"] * 1e3, (r.get("test_mse_std") or 0.0) * 1e3)
        lines.append(
            f"| {r['label']} | {r['model']} | {r['method']} | "
            f"{_pm(r['test_psnr_mean'], r['test_psnr_std'])} | "
            f"{_pm(r.get('val_psnr_mean'), r.get('val_psnr_std'))} | "
            f"{_pm(r.get('int8_psnr_mean'), r.get('int8_psnr_std'))} | {_pm(*mse)} | "
            f"{'–' if d is None or r.get('role') == 'teacher' else f'{d:+.2f}'} | "
            f"{r.get('wall_s_mean', 0.0):.1f} |")
    lines += ["", *_compression_lines(rows)]
    threads = rows[0].get("threads") if rows else None
    vs = rows[0].get("vs") if rows else None
    note = ("PSNR (dB, peak 1, each image's prediction clipped to [0, 1], averaged over "
            "images) and MSE per pixel on the test split at the last epoch, mean ± std over "
            "seeds; sizes, MACs (per image) and latencies of the first seed's model on this "
            "machine's CPU" + (f", {threads} thread(s)" if threads else "")
            + (f"; ratios against {vs}" if vs else "")
            + ("" if any("int8_psnr_mean" in r for r in rows) else
               "; onnxruntime and int8 columns: `pip install 'kdkit[deploy]'` with "
               "eval.deploy on"))
    if cfg is not None:
        note = f"{cfg.name}: {len(cfg.seeds)} seeds {cfg.seeds}, dataset {cfg.data.name}; " + note
    lines.append(note + ".")
    return "\n".join(lines) + "\n"


def format_table(rows: list[dict[str, Any]], cfg: Any = None) -> str:
    """Two markdown tables: accuracy (test, val, int8; Δ against the teacher) and the
    compression report (parameters, MACs, sizes, latencies; ratios against the teacher).
    Language models get one table of bits per character, size and speed; a dense task one
    of PSNR, size and speed."""
    if rows and all(r.get("test_bpc_mean") is not None for r in rows):
        return _format_lm(rows, cfg)
    if rows and all(r.get("test_psnr_mean") is not None for r in rows):
        return _format_dense(rows, cfg)
    lines = ["| run | model | method | top-1 test (%) | top-1 val (%) | int8 test (%) "
             "| Δ test vs teacher | wall per seed (s) |", "|" + "---|" * 8]
    for r in rows:
        d = r.get("d_acc")
        lines.append(
            f"| {r['label']} | {r['model']} | {r['method']} | "
            f"{_pm(r['test_acc_mean'], r['test_acc_std'])} | "
            f"{_pm(r.get('val_acc_mean'), r.get('val_acc_std'))} | "
            f"{_pm(r.get('int8_acc_mean'), r.get('int8_acc_std'))} | "
            f"{'–' if d is None or r.get('role') == 'teacher' else f'{d:+.2f}'} | "
            f"{r.get('wall_s_mean', 0.0):.1f} |")
    lines += ["", *_compression_lines(rows)]
    notes = []
    if cfg is not None:
        notes.append(f"{cfg.name}: {len(cfg.seeds)} seeds {cfg.seeds}, dataset "
                     f"{cfg.data.name}; accuracy at the last epoch, mean ± std over seeds")
    threads = rows[0].get("threads") if rows else None
    vs = rows[0].get("vs") if rows else None
    notes.append("sizes, MACs (torch's FLOP counter / 2, per sample) and latencies of the first "
                 "seed's model on this machine's CPU"
                 + (f", {threads} thread(s)" if threads else "")
                 + (f"; ratios against {vs}" if vs else "")
                 + ("" if any("int8_acc_mean" in r for r in rows) else
                    "; onnxruntime and int8 columns: `pip install 'kdkit[deploy]'` with "
                    "eval.deploy on"))
    lines.append("; ".join(notes) + ".")
    return "\n".join(lines) + "\n"


def remeasure_latency(rows: list[dict[str, Any]], out_dir: Path, first_seed: int, *,
                      repeats: int = 50) -> list[dict[str, Any]]:
    """The table's rows with every latency measured again on this machine (the first
    seed's models; onnxruntime from the ONNX files the table was made with, when present),
    and the ratios recomputed. Nothing in ``out_dir`` is changed."""
    from kdkit.train.compression import eager_latency_ms

    ort = deploy_available()
    new = []
    for row in rows:
        run_dir = out_dir / f"seed{first_seed}" / row["label"]
        model, meta = load_model(run_dir)
        shape = tuple(meta["data"]["input_shape"])
        row = dict(row, latency_ms=round(eager_latency_ms(model, shape, repeats=repeats), 4),
                   latency_b64_ms=round(eager_latency_ms(model, shape, batch=64,
                                                         repeats=max(1, repeats // 5)), 4))
        for name, key in (("model.onnx", "float_ort_latency"), ("model.int8.onnx", "ort_latency")):
            onnx = run_dir / DEPLOY_DIR / name
            if ort and onnx.exists():
                from kdkit.deploy.ort import OrtModel

                sess = OrtModel(onnx, threads=torch.get_num_threads())
                row[f"{key}_ms"] = round(sess.latency_ms(shape, 1, repeats=repeats), 4)
                row[f"{key}_b64_ms"] = round(sess.latency_ms(shape, 64,
                                                            repeats=max(1, repeats // 5)), 4)
            else:
                row.pop(f"{key}_ms", None)
                row.pop(f"{key}_b64_ms", None)
        row["threads"] = torch.get_num_threads()
        new.append(row)
    teacher = next((r for r in new if r.get("role") == "teacher"), None)
    for row in new:
        if teacher is not None:
            row.update(ratios(row, teacher))
    return new
