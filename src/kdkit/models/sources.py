"""Model sources: a model name is kdkit's zoo name, or ``SOURCE:NAME`` for another library.

- ``resnet20``, ``mlp``, ...: kdkit's zoo (``kdkit models``);
- ``torchvision:resnet18``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``,
  ``num_classes`` from the data unless given;
- ``timm:efficientnet_b0``: ``timm.create_model(NAME, pretrained=False, **kwargs)``,
  ``num_classes`` and ``in_chans`` from the data unless given;
- ``py:package.module:factory``: the user's own ``factory(**kwargs)``; of ``num_classes``,
  ``in_channels`` and ``input_size`` it receives those its signature takes.

Two keys work with every source: ``weights: PATH`` loads a state dict (safetensors, or a
``.pt``/``.pth`` file read with ``torch.load(weights_only=True)``: tensors only, never
pickled objects), every missing, unexpected or misshapen key named in one message; and
``output: KEY`` picks the logits from a forward that returns a dict (a key), an output
object (an attribute) or a tuple (an index), through a forward hook, so the model's
parameter names do not change. torchvision and timm are optional, imported only when named.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError

SOURCES = ("torchvision", "timm", "py")
SPECIAL_KEYS = ("weights", "output")  # handled here, never passed to a factory
_INSTALL = {
    "torchvision": "pip install torchvision (make setup-vision on kdkit's own machines)",
    "timm": "pip install timm (make setup-vision on kdkit's own machines)",
}


def split_source(name: str) -> tuple[str | None, str]:
    """``("torchvision", "resnet18")`` for ``torchvision:resnet18``; ``(None, name)`` for
    a zoo name. An unknown source prefix is an error naming the known ones."""
    if ":" not in name:
        return None, name
    source, _, target = name.partition(":")
    if source not in SOURCES:
        raise KdkitError(f"model '{name}': unknown source '{source}'; use a kdkit model name "
                         f"(see `kdkit models`) or {', '.join(s + ':NAME' for s in SOURCES)}")
    if not target:
        raise KdkitError(f"model '{name}': name the model after '{source}:'")
    return source, target


def _library(source: str) -> Any:
    try:
        return importlib.import_module(source)
    except ImportError as e:
        raise KdkitError(f"model source '{source}:' needs the {source} package, which is not "
                         f"installed ({str(e)[:80]}); {_INSTALL[source]}") from None


def create_from_source(source: str, target: str, *, num_classes: int, in_channels: int,
                       input_size: int, **kwargs: Any) -> nn.Module:
    """The model ``source:target`` for data of this geometry (see the module doc)."""
    full = f"{source}:{target}"
    try:
        if source == "torchvision":
            tv = _library("torchvision")
            if target not in tv.models.list_models():
                raise KdkitError(f"model '{full}': torchvision has no model '{target}' (see "
                                 "torchvision.models.list_models())")
            kwargs.setdefault("num_classes", num_classes)
            model = tv.models.get_model(target, weights=None, **kwargs)
            _check_first_conv(model, in_channels, full)
        elif source == "timm":
            timm = _library("timm")
            if not timm.is_model(target):
                raise KdkitError(f"model '{full}': timm has no model '{target}' (see "
                                 "timm.list_models())")
            kwargs.setdefault("num_classes", num_classes)
            kwargs.setdefault("in_chans", in_channels)
            model = timm.create_model(target, pretrained=False, **kwargs)
        else:
            model = _py_factory(target, full)(**_py_kwargs(target, full, kwargs, {
                "num_classes": num_classes, "in_channels": in_channels,
                "input_size": input_size}))
    except KdkitError:
        raise
    except (TypeError, ValueError) as e:  # a bad argument, as the library words it
        raise KdkitError(f"model '{full}' with {_show(kwargs)}: {type(e).__name__}: "
                         f"{str(e)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise KdkitError(f"model '{full}' returned {type(model).__name__}, not an nn.Module")
    return model


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())[:200] or "no arguments"


def _check_first_conv(model: nn.Module, in_channels: int, full: str) -> None:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != in_channels:
        raise KdkitError(f"model '{full}' takes {first.in_channels}-channel images but the data "
                         f"has {in_channels} channel(s); convert the data (data.channels: "
                         f"{first.in_channels}) or use a model for {in_channels} channel(s)")


def _py_factory(target: str, full: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise KdkitError(f"model '{full}': write py:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KdkitError(f"model '{full}': cannot import '{module_name}' ({str(e)[:120]}); is "
                         "it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise KdkitError(f"model '{full}': '{module_name}' has no callable '{attr}'")
    return fn


def _py_kwargs(target: str, full: str, kwargs: dict[str, Any], data: dict[str, Any]
               ) -> dict[str, Any]:
    """The user's arguments plus the data's geometry, for the names the factory takes."""
    try:
        params = inspect.signature(_py_factory(target, full)).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {k: v for k, v in data.items() if k in params and k not in kwargs}
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        raise KdkitError(f"model '{full}' has no argument {', '.join(repr(k) for k in unknown)}; "
                         f"it takes: {', '.join(params) or 'nothing'}")
    return {**out, **kwargs}


# --------------------------------------------------------------------------- output: KEY


def select_output(out: Any, key: str | int, where: str) -> Tensor:
    """The logits inside a model's output: ``out[key]`` for a dict (or a tuple/list with an
    integer key), else ``getattr(out, key)``."""
    try:
        if isinstance(out, dict):
            value = out[key]
        elif isinstance(out, (tuple, list)):
            value = out[int(key)]
        else:
            value = getattr(out, str(key))
    except (KeyError, IndexError, AttributeError, ValueError):
        have = (sorted(map(str, out)) if isinstance(out, dict) else
                f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__)
        raise KdkitError(f"{where}: output: {key!r} is not in the model's output ({have})"
                         ) from None
    if not isinstance(value, Tensor):
        raise KdkitError(f"{where}: output {key!r} is a {type(value).__name__}, not a tensor")
    return value


def attach_output(model: nn.Module, key: str | int, where: str) -> nn.Module:
    """Make ``model(x)`` return ``select_output(model's output, key)`` (a forward hook:
    the parameter names stay the model's own)."""
    def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> Tensor:
        return select_output(out, key, where)

    model.register_forward_hook(hook)
    model.kdkit_output = key  # type: ignore[assignment]
    return model


# --------------------------------------------------------------------------- weights: PATH


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a file: safetensors, or a ``.pt``/``.pth`` file with tensors only
    (``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KdkitError(f"weights: no such file {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise KdkitError(f"weights: cannot read {p} as safetensors ({str(e)[:120]})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of all kinds: refused, never unpickled freely
        raise KdkitError(f"weights: {p} is not a plain state dict of tensors (loaded with "
                         f"weights_only=True: {type(e).__name__}: {str(e)[:160]}); save it "
                         "with torch.save(model.state_dict(), ...) or as safetensors") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise KdkitError(f"weights: {p} holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path, where: str) -> None:
    """Load ``path`` into ``model``; every mismatch named in one message."""
    from kdkit.train.checkpoint import state_mismatch

    state = read_weights(path)
    own = model.state_dict()
    parts = state_mismatch(own, state, "shape mismatch (file vs model)",
                           lambda k, f, m: f"{k} {f} vs {m}")
    if parts:
        raise KdkitError(f"{where}: weights {path} do not fit the model: {'; '.join(parts)}")
    if any(t.is_meta for t in own.values()):
        return  # a shapes-only model (kdkit validate): checked, nothing to load into
    model.load_state_dict(state)
