"""Deployment: ONNX export with a numerical check, int8 post-training quantization, and
onnxruntime inference (``kdkit export``).

onnx, onnxruntime and onnxscript are an optional extra (``pip install 'kdkit[deploy]'``):
nothing here imports them until a function needs them (:func:`require_deploy`).

- :func:`kdkit.deploy.export.export_onnx`: torch model -> ``.onnx``, verified against torch.
- :func:`kdkit.deploy.quantize.quantize_int8`: float ``.onnx`` -> int8 ``.onnx`` (static QDQ,
  calibrated; dynamic where static does not apply).
- :class:`kdkit.deploy.ort.OrtModel` and :func:`kdkit.deploy.ort.deploy_profile`: run,
  evaluate and time an ONNX model on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from kdkit.errors import KdkitError

INSTALL_HINT = "pip install 'kdkit[deploy]' (onnx, onnxruntime, onnxscript)"


def require_deploy(what: str = "exporting to ONNX") -> tuple[Any, Any]:
    """Import and return ``(onnx, onnxruntime)``; onnxscript is checked too (torch's ONNX
    exporter needs it). Raises a :class:`KdkitError` with the install hint when one is
    missing."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter imports it)
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise KdkitError(f"{what} needs the deploy extra ({missing} is not installed): "
                         f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and the quantizer's chatter (warnings and log records below
    ERROR: "torchvision is not installed", "consider pre-processing", ...) while inside."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "onnxscript",
                                              "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
