"""Building models on the meta device: shapes and parameter counts without memory.

Used to check a config or a saved model's recipe before anything real is allocated
(``kdkit validate``, ``kdkit eval``): a model of a billion parameters is built on meta
in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# In-place random fills of weight initialisation. On meta tensors some of them (normal_)
# go through torch._refs, whose first call imports torch._dynamo (over a second); a meta
# tensor holds no values, so they are skipped there.
_INIT_FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_,
                         torch.Tensor.exponential_, torch.Tensor.log_normal_,
                         torch.Tensor.cauchy_, torch.Tensor.geometric_})


class _SkipInitFills(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func in _INIT_FILLS and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def on_device(device: str) -> Iterator[None]:
    """New tensors on ``device``: on meta without init fills; on the CPU as usual."""
    if device == "cpu":
        yield
        return
    with torch.device(device), _SkipInitFills():
        yield
