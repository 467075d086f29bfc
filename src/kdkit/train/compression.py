"""What a model costs to ship and to run: the compression report's torch-side columns.

- **MACs per sample**: multiply-accumulates of one forward pass at batch 1, counted by
  torch's own :class:`torch.utils.flop_counter.FlopCounterMode` (its FLOPs / 2). It counts
  the matrix products (convolutions, linear layers, matmul, attention); element-wise work
  (BatchNorm, activations, pooling, adds) is not counted, as in the papers' MAC figures.
- **Size on disk** in fp32 and fp16: the bytes of the weights serialised with safetensors,
  every floating-point tensor in that precision (buffers such as BatchNorm statistics
  included; integer buffers kept as they are). The int8 size is the quantized ONNX file's
  (:mod:`kdkit.deploy`).
- **Latency** in torch eager on the CPU at batch 1 and batch 64: median of ``repeats``
  timed forward passes after ``warmup`` untimed ones, in eval mode under
  ``torch.inference_mode``, on random input of the model's shape, with torch's current
  intra-op thread count (recorded beside the figures, since latency belongs to the
  machine and its threads).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

LATENCY_BATCHES = (1, 64)


def example_input(input_shape: tuple[int, ...], batch: int, device: torch.device,
                  num_classes: int | None = None) -> torch.Tensor:
    """A batch shaped like the data: random images (B, C, H, W), or for a token context
    (L,) random token ids (B, L) below ``num_classes`` (the vocabulary)."""
    if len(input_shape) == 1:
        return torch.randint(0, num_classes or 2, (batch, *input_shape), device=device)
    return torch.randn(batch, *input_shape, device=device)


def count_macs(model: nn.Module, input_shape: tuple[int, ...],
               num_classes: int | None = None) -> int:
    """Multiply-accumulates of one sample's forward pass (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example_input(input_shape, 1, device, num_classes)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def weights_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the model's state serialised with safetensors, its floating-point tensors
    in ``dtype`` (what a file of the weights in that precision takes on disk)."""
    from safetensors.torch import save

    state = {}
    seen: set[tuple[int, int]] = set()
    for k, v in model.state_dict().items():
        where = (v.untyped_storage().data_ptr(), v.storage_offset())
        if where in seen:  # a tied weight (a language model's embedding and head): once
            continue
        seen.add(where)
        v = v.detach().cpu()
        state[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return len(save(state))


@torch.inference_mode()
def eager_latency_ms(model: nn.Module, input_shape: tuple[int, ...], *, batch: int = 1,
                     repeats: int = 50, warmup: int = 10,
                     num_classes: int | None = None) -> float:
    """Median latency (ms) of one forward pass at ``batch`` in torch eager mode, on the
    model's device (synchronised when that is a GPU)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example_input(input_shape, batch, device, num_classes)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
    model.train(was_training)
    return 1000.0 * statistics.median(times)


def torch_profile(model: nn.Module, input_shape: tuple[int, ...], *,
                  repeats: int = 50, num_classes: int | None = None) -> dict[str, Any]:
    """The torch-side columns for ``model`` (on the CPU): parameters, MACs, fp32/fp16 bytes
    and eager latency at batch 1 and 64, with the thread count they were measured with."""
    warmup = max(1, min(10, repeats))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, input_shape, num_classes),
        "size_fp32_bytes": weights_bytes(model, torch.float32),
        "size_fp16_bytes": weights_bytes(model, torch.float16),
        "latency_ms": round(eager_latency_ms(model, input_shape, batch=1, repeats=repeats,
                                             warmup=warmup, num_classes=num_classes), 4),
        # a batch of 64 costs 64 samples per pass: fewer repeats keep the time bounded
        "latency_b64_ms": round(eager_latency_ms(model, input_shape, batch=64,
                                                 repeats=max(1, repeats // 5),
                                                 warmup=max(1, warmup // 5),
                                                 num_classes=num_classes), 4),
        "threads": torch.get_num_threads(),
    }


def ratios(row: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    """×smaller (fp32 bytes), ×fewer MACs, ×faster (eager batch 1; ORT batch 1 when both
    have it) and Δ accuracy (points) of ``row`` against the ``teacher`` row."""

    def div(a: Any, b: Any) -> float | None:
        return round(a / b, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and b > 0 else None

    return {
        "x_smaller": div(teacher.get("size_bytes"), row.get("size_bytes")),
        "x_fewer_macs": div(teacher.get("macs"), row.get("macs")),
        "x_faster": div(teacher.get("latency_ms"), row.get("latency_ms")),
        "x_faster_ort": div(teacher.get("ort_latency_ms"), row.get("ort_latency_ms")),
        "d_acc": (round(row["test_acc_mean"] - teacher["test_acc_mean"], 2)
                  if row.get("test_acc_mean") is not None
                  and teacher.get("test_acc_mean") is not None else None),
        **({"d_psnr": round(row["test_psnr_mean"] - teacher["test_psnr_mean"], 2)}
           if row.get("test_psnr_mean") is not None
           and teacher.get("test_psnr_mean") is not None else {}),
    }
