"""'kdkit export': write a trained model as ONNX, verified, and optionally as int8.

    kdkit export RUN --format onnx [--opset N] [--dynamic-batch] [--quantize int8]

Writes RUN/model.onnx (the deployed model: for SimKD the student's backbone, projector
and the teacher's classifier), checked against torch on the run's own test inputs;
with --quantize int8 also RUN/model.int8.onnx (static, calibrated on the run's training
inputs; dynamic where static does not apply). RUN/export.json records the figures: the
tolerance and the largest difference, the opset, the sizes and the test accuracy of the
torch model, its ONNX copy under onnxruntime and the int8 model. An earlier export is
replaced only with --force. Needs the deploy extra: pip install 'kdkit[deploy]'.
"""

# This docstring is the help text of 'kdkit export --help': plain text, no reST markup.

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError

CHECK_SAMPLES = 64  # test inputs the export is verified on


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _calibration_inputs(args: argparse.Namespace, trained: dict[str, Any]
                        ) -> tuple[Any, str | None]:
    """``--calib-samples`` training inputs of the run, drawn with a fixed seed, or
    (None, why) when the run's training split cannot be rebuilt."""
    from kdkit.cli import _eval_data

    try:
        data, _notes = _eval_data(argparse.Namespace(data=None, data_root=args.data_root,
                                                     split="train"), trained)
    except KdkitError as e:
        return None, f"the run's training split cannot be rebuilt: {e}"
    if len(data.train) == 0:
        return None, "the run's training split is empty"
    from kdkit.deploy.ort import calibration_inputs

    return calibration_inputs(data.train, args.calib_samples), None


def _targets(stem: Path, out_arg: str | None, quantize: bool) -> tuple[Path, Path, Path]:
    out = Path(out_arg) if out_arg else stem.with_suffix(".onnx")
    if out.suffix != ".onnx":
        raise KdkitError(f"--out {out}: the file name must end in .onnx (e.g. --out "
                         f"{out.with_suffix('.onnx')})")
    int8 = out.with_suffix(".int8.onnx")
    summary = out.parent / "export.json" if out.stem == "model" else out.with_suffix(
        ".export.json")
    return out, int8, summary


def cmd_export(args: argparse.Namespace) -> int:
    from kdkit.deploy import require_deploy

    require_deploy()  # the install hint before anything is loaded
    import torch

    from kdkit.cli import _eval_data
    from kdkit.data.stream import eval_args, example_inputs
    from kdkit.deploy.export import export_onnx
    from kdkit.deploy.ort import OrtModel, split_batches, split_score
    from kdkit.deploy.quantize import quantize_int8
    from kdkit.train.artifacts import load_model, model_stem
    from kdkit.train.checkpoint import atomic_write_json
    from kdkit.train.metrics import evaluate

    if args.atol < 0 or args.rtol < 0:
        raise KdkitError(f"--atol {args.atol:g} / --rtol {args.rtol:g}: a tolerance is >= 0")
    stem = model_stem(args.path)  # a missing path or a folder without a model: one line
    out, int8, summary = _targets(stem, args.out, args.quantize is not None)
    wanted = [out, summary] + ([int8] if args.quantize else [])
    existing = [p for p in wanted if p.exists()]
    if existing and not args.force:
        raise KdkitError(f"{existing[0]} exists (an earlier export?); pass --force to replace "
                         "it, or --out to write elsewhere")
    if any(p.resolve() in (stem.with_suffix(".json").resolve(),
                           stem.with_suffix(".safetensors").resolve()) for p in wanted):
        raise KdkitError(f"--out {out} would overwrite the model itself; choose another --out")
    model, meta = load_model(args.path)
    if len(meta["data"]["input_shape"]) == 1:
        raise KdkitError(f"{args.path} is a language model (token ids in); kdkit export writes "
                         "image models for now: use the run's model.safetensors with torch, or "
                         "kdkit generate")
    data, notes = _eval_data(argparse.Namespace(data=None, data_root=args.data_root,
                                                split="test"), meta["data"])
    test = data.test
    shape = tuple(meta["data"]["input_shape"])
    threads = torch.get_num_threads()
    say = (lambda _m: None) if args.quiet else _say
    t0 = time.perf_counter()
    exp = export_onnx(model, shape, out, opset=args.opset, dynamic_batch=args.dynamic_batch,
                      check_x=example_inputs(test, CHECK_SAMPLES), atol=args.atol,
                      rtol=args.rtol, log=say)
    say(f"evaluating on the test split ({len(test)} samples) ...")
    dense = meta["data"].get("task") == "denoise"  # images out: PSNR, not top-1
    metric = "psnr" if dense else "accuracy"
    torch_acc = evaluate(model, *eval_args(test))["psnr" if dense else "acc"]
    float_ort_acc = split_score(OrtModel(out, threads), split_batches(test))
    figures: dict[str, Any] = {
        "model": meta["model"]["name"], "source": str(stem.with_suffix(".safetensors")),
        "data": data.name, "split": "test", "samples": len(test), "onnx": exp,
        metric: {"torch_float": round(torch_acc, 3), "ort_float": round(float_ort_acc, 3)},
        "sizes": {"safetensors_bytes": stem.with_suffix(".safetensors").stat().st_size,
                  "onnx_bytes": exp["size_bytes"]},
        **notes,
    }
    if args.quantize:
        calib_x, why = _calibration_inputs(args, meta["data"])
        if why:
            say(f"kdkit: note: {why}; quantizing dynamically")
        q = quantize_int8(out, int8, calib_x, progress=not args.no_progress, log=say)
        figures["int8"] = q
        figures[metric]["ort_int8"] = round(
            split_score(OrtModel(int8, threads), split_batches(test)), 3)
        figures["sizes"]["int8_onnx_bytes"] = q["size_bytes"]
    figures["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(summary, figures)
    _print_summary(figures, out, int8 if args.quantize else None, summary)
    return 0


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _print_summary(f: dict[str, Any], out: Path, int8: Path | None, summary: Path) -> None:
    e = f["onnx"]
    dense = "psnr" in f
    acc = f["psnr" if dense else "accuracy"]
    batch = "dynamic batch" if e["dynamic_batch"] else f"batch {e['batch_size']}"
    print(f"{f['model']} -> {out} (opset {e['opset']}, {batch}, {_kib(e['size_bytes'])}): "
          f"onnxruntime = torch within {e['max_abs_diff']:.2g} on {e['check_samples']} test "
          f"inputs (tolerance {e['tolerance']['atol']:g} + {e['tolerance']['rtol']:g}*|torch|)")
    if int8 is not None:
        q = f["int8"]
        how = ("static QDQ, calibrated on " f"{q['calib_samples']} training samples"
               if q["mode"] == "static" else f"dynamic: {q['fallback_reason']}")
        print(f"int8 -> {int8} ({how}, {_kib(q['size_bytes'])})")
    row = [("torch float", acc["torch_float"]), ("onnxruntime float", acc["ort_float"])]
    if "ort_int8" in acc:
        row.append(("onnxruntime int8", acc["ort_int8"]))
    what, unit = ("PSNR", "dB") if dense else ("top-1", "%")
    print(f"test {what} ({f['data']}, {f['samples']} samples): "
          + "   ".join(f"{name} {value:.2f} {unit}" for name, value in row))
    print(f"figures: {summary}")


def _opset(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an opset number, got '{text}'") from None
    if not 7 <= v <= 30:
        raise argparse.ArgumentTypeError(f"opset {v} is out of range; use 13..23")
    return v


def _calib_samples(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_parser(sub: Any) -> None:
    """Register ``kdkit export`` on the CLI's subparsers."""
    p = sub.add_parser("export", help="write a trained model as ONNX (verified), optionally int8",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_MODEL", help="run directory or model.safetensors")
    p.add_argument("--format", choices=["onnx"], required=True,
                   help="onnx (the only format so far)")
    p.add_argument("--opset", type=_opset, default=None, metavar="N",
                   help="ONNX opset (default: torch's; below 18 torch's TorchScript exporter "
                   "writes it)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="any batch size (default: the model takes batches of 1)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write an int8 model (static, calibrated; dynamic where static "
                   "does not apply)")
    p.add_argument("--calib-samples", type=_calib_samples, default=256, metavar="N",
                   help="training inputs to calibrate int8 on (default: %(default)s)")
    p.add_argument("--out", metavar="PATH",
                   help="the .onnx file (default: beside the model, RUN/model.onnx; int8: "
                   "PATH with .int8.onnx)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="absolute tolerance of the check (default: %(default)g)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="relative tolerance of the check (default: %(default)g)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the one the model was trained from)")
    p.add_argument("--force", action="store_true", help="replace an earlier export")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress lines, just the summary")
    p.set_defaults(fn=cmd_export)

