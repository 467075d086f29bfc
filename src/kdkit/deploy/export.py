"""Export a model to ONNX and check that onnxruntime computes what torch computes.

The exporter is torch's own: the ``torch.export``-based one (``dynamo``, torch's default
since 2.9) for opset 18 and later, falling back to the TorchScript tracer when
``torch.export`` cannot capture the model, and the TorchScript tracer for opsets before 18
(the dynamo exporter cannot write those: asked for opset 13 it silently writes 18). Both
give the same graph and speed for kdkit's models (docs in the README, "Export and
quantize").

The check runs onnxruntime on a batch (the run's test inputs from ``kdkit export``) and
compares with torch: every output within ``atol + rtol * |torch|``, else a
:class:`KdkitError` with the largest difference, and nothing written at ``path``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdkit.deploy import quiet, require_deploy
from kdkit.errors import KdkitError
from kdkit.files import atomic_write_bytes

DYNAMO_MIN_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORTERS = ("auto", "dynamo", "torchscript")


def _outputs(out: Any) -> list[Tensor]:
    """A model's output(s) as a flat list of tensors (logits, or a tuple/list of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    raise KdkitError(f"the model returns {type(out).__name__}; ONNX export needs tensors")


def _torch_export(model: nn.Module, example: Tensor, file: Path, *, dynamo: bool,
                  opset: int | None, dynamic_batch: bool) -> None:
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
                              "dynamo": dynamo, "verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamo:
        kwargs["external_data"] = False
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (example,), str(file), **kwargs)


def _check(session_out: list[np.ndarray], ref: list[Tensor], atol: float, rtol: float
           ) -> tuple[float, float]:
    """(max |ort - torch|, max of |ort - torch| - rtol*|torch|, which must be <= atol)."""
    if len(session_out) != len(ref):
        raise KdkitError(f"the ONNX model has {len(session_out)} outputs, torch's {len(ref)}")
    worst_abs, worst_excess = 0.0, -np.inf
    for o, r in zip(session_out, ref, strict=True):
        rn = r.detach().float().cpu().numpy()
        if o.shape != rn.shape:
            raise KdkitError(f"export check failed: onnxruntime's output has shape "
                             f"{list(o.shape)}, torch's {list(rn.shape)}")
        diff = np.abs(o.astype(np.float64) - rn)
        if not np.all(np.isfinite(diff)):
            return float("inf"), float("inf")
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_excess = max(worst_excess, float((diff - rtol * np.abs(rn)).max(initial=-np.inf)))
    return worst_abs, worst_excess


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...] | list[int], path: str | Path, *,
    opset: int | None = None, dynamic_batch: bool = False, check_x: Tensor | None = None,
    atol: float = 1e-4, rtol: float = 1e-3, batch_size: int = 1, exporter: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (one input of shape ``(B, *input_shape)``) to ONNX at ``path`` and
    verify it under onnxruntime.

    ``dynamic_batch``: the batch dimension is symbolic (any size runs), else fixed at
    ``batch_size``. ``check_x``: the inputs to verify on (default: 16 seeded normal
    samples); with a dynamic batch the first sample is also run alone. ``exporter``:
    ``auto`` (dynamo from opset 18, TorchScript below or when ``torch.export`` fails),
    ``dynamo`` or ``torchscript``. The file is written atomically, and only once verified.

    Returns ``path``, ``opset``, ``exporter``, ``dynamic_batch``, ``batch_size`` (None when
    dynamic), ``max_abs_diff``, ``tolerance`` (``{"atol", "rtol"}``), ``check_samples``,
    ``size_bytes`` and ``export_s``.
    """
    onnx, _ort = require_deploy()
    from kdkit.deploy.ort import OrtModel

    if exporter not in EXPORTERS:
        raise KdkitError(f"exporter '{exporter}' is unknown; use one of {', '.join(EXPORTERS)}")
    if opset is not None and not 7 <= opset <= 30:
        raise KdkitError(f"--opset {opset} is not an ONNX opset torch can write; use 13..23 "
                         "(or leave it out for torch's default)")
    if exporter == "dynamo" and opset is not None and opset < DYNAMO_MIN_OPSET:
        raise KdkitError(f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later, not "
                         f"{opset}; use exporter 'torchscript' (or 'auto')")
    if batch_size < 1:
        raise KdkitError(f"batch_size must be at least 1, got {batch_size}")
    if atol < 0 or rtol < 0:
        raise KdkitError(f"the tolerance must be >= 0 (atol {atol}, rtol {rtol})")
    path = Path(path)
    say = log or (lambda _msg: None)
    shape = tuple(int(v) for v in input_shape)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    if check_x is None:
        check_x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    check_x = check_x.detach().cpu().float().contiguous()
    if len(check_x) == 0 or tuple(check_x.shape[1:]) != shape:
        raise KdkitError(f"the check inputs have shape {list(check_x.shape)}; expected "
                         f"[N>0, {', '.join(map(str, shape))}]")
    example_n = 2 if dynamic_batch else batch_size  # torch.export specialises a size of 1
    example = check_x[:example_n]
    if len(example) < example_n:
        example = torch.cat([example, example[:1].expand(example_n - len(example), *shape)])
    order = (["torchscript"] if exporter == "torchscript"
             or (exporter == "auto" and opset is not None and opset < DYNAMO_MIN_OPSET)
             else ["dynamo", "torchscript"] if exporter == "auto" else ["dynamo"])
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="kdkit-onnx-") as tmp:
            file = Path(tmp) / "model.onnx"
            failures: list[str] = []
            used = order[0]
            for used in order:
                say(f"exporting to ONNX with torch's {used} exporter"
                    f"{f' (opset {opset})' if opset else ''} ...")
                try:
                    _torch_export(model, example, file, dynamo=used == "dynamo", opset=opset,
                                  dynamic_batch=dynamic_batch)
                    break
                except KdkitError:
                    raise
                except Exception as e:  # the exporters raise many types; the message names it
                    failures.append(f"{used}: {type(e).__name__}: {str(e).strip()[:300]}")
                    file.unlink(missing_ok=True)
            else:
                raise KdkitError("torch cannot export this model to ONNX ("
                                 + "; ".join(failures) + ")")
            proto = onnx.load(str(file))  # external tensors (if any) are folded in below
            written_opset = next((o.version for o in proto.opset_import
                                  if o.domain in ("", "ai.onnx")), None)
            if opset is not None and written_opset != opset:
                raise KdkitError(f"asked for opset {opset}, torch's {used} exporter wrote "
                                 f"{written_opset}; choose another --opset")
            try:
                data = proto.SerializeToString()
            except ValueError as e:  # protobuf's 2 GiB limit
                raise KdkitError(f"the model is too large for one ONNX file ({e})") from None
    finally:
        model.train(was_training)
    export_s = time.perf_counter() - t0
    say(f"checking onnxruntime against torch on {len(check_x)} samples ...")
    with torch.no_grad():
        ref = _outputs(model.eval()(check_x))
    model.train(was_training)
    runner = OrtModel(data)
    worst_abs, worst_excess = _check(runner.run_all(check_x.numpy()), ref, atol, rtol)
    if dynamic_batch and worst_excess <= atol:  # another batch size runs, and agrees
        one_abs, one_excess = _check(runner.run_all(check_x[:1].numpy()),
                                     [r[:1] for r in ref], atol, rtol)
        worst_abs, worst_excess = max(worst_abs, one_abs), max(worst_excess, one_excess)
    if not worst_excess <= atol:
        raise KdkitError(
            f"export check failed: onnxruntime's outputs differ from torch's by up to "
            f"{worst_abs:.3g} on {len(check_x)} samples, beyond the tolerance |diff| <= "
            f"{atol:g} + {rtol:g}*|torch| ({used} exporter, opset {written_opset}); nothing "
            f"was written to {path}. Try another --opset, or a larger --atol if the "
            "difference is acceptable")
    atomic_write_bytes(path, data)
    say(f"verified: max |onnxruntime - torch| = {worst_abs:.2g} (tolerance {atol:g} + "
        f"{rtol:g}*|torch|) -> {path}")
    return {"path": str(path), "format": "onnx", "opset": written_opset, "exporter": used,
            "dynamic_batch": dynamic_batch, "batch_size": None if dynamic_batch else batch_size,
            "input_name": INPUT_NAME, "max_abs_diff": worst_abs,
            "tolerance": {"atol": atol, "rtol": rtol}, "check_samples": len(check_x),
            "size_bytes": len(data), "export_s": round(export_s, 3)}

