"""Run, evaluate and time ONNX models with onnxruntime on the CPU.

:class:`OrtModel` wraps an ``InferenceSession`` (one intra-op thread by default, one
inter-op thread); :func:`deploy_profile` exports a model (verified), quantizes it to int8
and returns the figures of both, for tables of compressed models.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdkit.deploy import require_deploy
from kdkit.errors import KdkitError
from kdkit.tasks import is_dense, psnr_sum


def make_session(model: str | Path | bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session for a file or serialized model: ``threads`` intra-op
    threads, one inter-op thread, warnings off."""
    _onnx, ort = require_deploy("running an ONNX model")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    src = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        where = "the model" if isinstance(model, bytes) else str(model)
        raise KdkitError(f"onnxruntime cannot load {where}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().float().contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class OrtModel:
    """An ONNX classifier under onnxruntime: ``model(x)`` takes a torch or numpy batch and
    returns a torch tensor of its first output. A model exported for a fixed batch size
    is run in chunks of that size (the last one padded)."""

    def __init__(self, path: str | Path | bytes, threads: int = 1) -> None:
        self.session = make_session(path, threads)
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise KdkitError(f"the ONNX model takes {len(inp)} inputs; kdkit runs models "
                             "with one input tensor")
        self.input_name: str = inp[0].name
        self.input_shape: list[Any] = list(inp[0].shape)
        first = self.input_shape[0] if self.input_shape else None
        #: the fixed batch size the model was exported for, or None (dynamic batch)
        self.batch: int | None = first if isinstance(first, int) and first > 0 else None

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output for a float32 batch, run in chunks of the model's fixed batch."""
        if self.batch is None or len(x) == self.batch:
            return [np.asarray(o) for o in self.session.run(None, {self.input_name: x})]
        pieces: list[list[np.ndarray]] = []
        for i in range(0, len(x), self.batch):
            chunk = x[i:i + self.batch]
            n = len(chunk)
            if n < self.batch:  # pad the last chunk with copies of its last sample
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs = self.session.run(None, {self.input_name: chunk})
            if not pieces:
                pieces = [[] for _ in outs]
            for k, o in enumerate(outs):
                pieces[k].append(np.asarray(o)[:n])
        return [np.concatenate(p) for p in pieces]

    def run(self, x: np.ndarray) -> np.ndarray:
        """The first output for a float32 batch."""
        return self.run_all(x)[0]

    def __call__(self, x: Any) -> Tensor:
        return torch.from_numpy(self.run(_numpy(x)))

    def evaluate(self, x: Any, y: Any, batch_size: int = 256) -> float:
        """Top-1 accuracy (%) on ``(x, y)``; for a dense task's float targets, the mean
        PSNR (dB) over the images (:func:`kdkit.tasks.psnr_per_sample`)."""
        y = torch.as_tensor(y)
        return split_score(self, ((x[i:i + batch_size], y[i:i + batch_size])
                                  for i in range(0, len(y), batch_size)))

    def latency_ms(self, input_shape: tuple[int, ...] | list[int], batch: int, *,
                   repeats: int = 50, warmup: int = 10) -> float:
        """Median latency (ms) of one call on a batch of ``batch`` random inputs."""
        if self.batch is not None and batch != self.batch:
            raise KdkitError(f"the ONNX model was exported for batch size {self.batch}; time "
                             "it at that size, or export it with --dynamic-batch")
        x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
        feed = {self.input_name: x}
        for _ in range(warmup):
            self.session.run(None, feed)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.session.run(None, feed)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)


def split_score(model: Callable[[Any], Tensor],
                batches: Iterable[tuple[Any, Tensor]]) -> float:
    """``model``'s top-1 accuracy (%) over ``(x, y)`` batches; for a dense task's float
    targets, the mean PSNR (dB) over the images."""
    total, n, dense = 0.0, 0, False
    for xb, yb in batches:
        out, dense, n = model(xb), is_dense(yb), n + len(yb)
        total += float(psnr_sum(out, yb) if dense else (out.argmax(1) == yb).sum())
    return total / max(1, n) * (1.0 if dense else 100.0)


def split_batches(split: Any, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches, in order, of an in-memory split (``.x``/``.y``) or a dataset of
    ``(x, y)`` items (a streamed split)."""
    if hasattr(split, "x"):
        for i in range(0, len(split), batch_size):
            yield split.x[i:i + batch_size], split.y[i:i + batch_size]
        return
    from torch.utils.data import DataLoader

    from kdkit.data.stream import _collate

    yield from DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=_collate,
                          num_workers=getattr(split, "workers", 0))


def split_arrays(split: Any) -> tuple[Tensor, Tensor]:
    """All of a split's inputs and labels as two tensors (read through, if streamed)."""
    if hasattr(split, "x"):
        return split.x, split.y
    xs, ys = zip(*split_batches(split), strict=True) if len(split) else ((), ())
    return torch.cat(xs), torch.cat(ys)


def calibration_inputs(split: Any, n: int = 256, seed: int = 0) -> Tensor:
    """``n`` inputs of a (training) split drawn at random with ``seed``: what int8
    calibration reads."""
    n = min(n, len(split))
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    if hasattr(split, "x"):
        return split.x[idx]
    return split_arrays(split.subset(idx) if hasattr(split, "subset")
                        else torch.utils.data.Subset(split, idx.tolist()))[0]


def deploy_profile(
    model: nn.Module, input_shape: tuple[int, ...] | list[int], test_x: Any, test_y: Any,
    calib_x: Any, workdir: str | Path, *, threads: int = 1, repeats: int = 50,
    opset: int | None = None, atol: float = 1e-4, rtol: float = 1e-3, latency: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (dynamic batch, verified on the first 64 test inputs), quantize it
    to int8 (calibrated on ``calib_x``) and measure both under onnxruntime.

    Writes ``workdir/model.onnx`` and ``workdir/model.int8.onnx``. Returns
    ``ort_latency_ms`` (int8, batch 1), ``ort_latency_b64_ms`` (int8, batch 64),
    ``float_ort_latency_ms`` / ``float_ort_latency_b64_ms``, ``onnx_size_bytes``,
    ``size_int8_bytes``, ``float_ort_acc``, ``int8_acc`` (test top-1, %; for a dense task
    the test PSNR, dB), ``quant_mode``
    and ``max_abs_diff`` (the export check). ``latency=False``: the four latencies are
    None (accuracy and sizes only, e.g. for every seed but the first). ``test_x``/``test_y``
    and ``calib_x`` are tensors: :func:`split_arrays` and :func:`calibration_inputs` make
    them from a run's splits.
    """
    from kdkit.deploy.export import export_onnx
    from kdkit.deploy.quantize import quantize_int8

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    float_path, int8_path = work / "model.onnx", work / "model.int8.onnx"
    exp = export_onnx(model, input_shape, float_path, opset=opset, dynamic_batch=True,
                      check_x=test_x[:64], atol=atol, rtol=rtol, log=log)
    q = quantize_int8(float_path, int8_path, calib_x, log=log)
    fm, qm = OrtModel(float_path, threads), OrtModel(int8_path, threads)
    shape = tuple(input_shape)

    def ms(m: OrtModel, batch: int) -> float | None:
        if not latency:
            return None
        return m.latency_ms(shape, batch, repeats=repeats if batch == 1 else max(5, repeats // 5))

    return {
        "ort_latency_ms": ms(qm, 1),
        "ort_latency_b64_ms": ms(qm, 64),
        "float_ort_latency_ms": ms(fm, 1),
        "float_ort_latency_b64_ms": ms(fm, 64),
        "onnx_size_bytes": exp["size_bytes"],
        "size_int8_bytes": q["size_bytes"],
        "float_ort_acc": fm.evaluate(test_x, test_y),
        "int8_acc": qm.evaluate(test_x, test_y),
        "quant_mode": q["mode"],
        "max_abs_diff": exp["max_abs_diff"],
        "exporter": exp["exporter"],
        "threads": threads,
    }
