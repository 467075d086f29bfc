"""Read intermediate tensors out of any model by module path, without editing the model.

A :class:`Tap` names a place (a module path such as ``"layer2.1"``; ``""`` is the model
itself) and what to read there:

* ``"output"`` – the module's output;
* ``"input"`` – the first positional input of the module;
* ``"preact"`` – the pre-activation: the tensor just before the ReLU that ends the module.
  If the path names a ReLU, that is its input; otherwise it is the input of the *last call*
  of the last ``nn.ReLU`` registered inside the module (so a torchvision ``BasicBlock`` that
  reuses one ``relu`` twice is read correctly).

Every captured tensor is cloned at capture time. Without the clone an ``nn.ReLU(inplace=True)``
that runs later would overwrite the stored tensor with post-ReLU values (a bug of several
KD libraries); the clone keeps the autograd graph, so gradients still reach the model.

Use :func:`capture` as a context manager; hooks are always removed on exit::

    with capture(model, {"f": Tap("layer3", "preact")}) as feats:
        logits = model(x)
    feats["f"]  # (B, C, H, W)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError

Read = Literal["output", "input", "preact"]
_READS = ("output", "input", "preact")
_RELUS = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class Tap:
    """A place in a model: module ``path`` ('' = whole model) and what to ``read`` there."""

    path: str = ""
    read: Read = "output"

    def __post_init__(self) -> None:
        if self.read not in _READS:
            raise KdkitError(f"tap read must be one of {_READS}, got {self.read!r}")

    def __str__(self) -> str:
        return f"{self.path or '<model>'}:{self.read}"


LOGITS = Tap("", "output")


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted ``path``; a clear error lists what exists instead."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        near = [n for n in names if n.startswith(parent + ".")] if parent else [
            n for n in names if "." not in n
        ]
        raise KdkitError(
            f"{type(model).__name__} has no module '{path}'. "
            f"Modules there: {', '.join(near[:20]) or '(none)'}"
            f"{' ...' if len(near) > 20 else ''}. Run `kdkit models --layers NAME` to list all."
        ) from None


def penultimate(model: nn.Module) -> Tap:
    """The embedding the classifier reads: the input of the model's last ``nn.Linear``.

    Works for any model whose head is a linear layer (all of kdkit's zoo, torchvision and
    timm classifiers), without editing it.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise KdkitError(
            f"{type(model).__name__} has no nn.Linear head, so there is no default "
            "penultimate embedding; name a layer explicitly (see `kdkit models --layers`)"
        )
    return Tap(last, "input")


def probe_shape(model: nn.Module, tap: Tap, example_input: Tensor | None) -> tuple[int, ...]:
    """Shape of ``tap`` for one forward of ``example_input`` (eval mode, no grad).

    For the penultimate tap of a linear head the width is read from the layer, no forward
    needed: ``(1, in_features)``.
    """
    module = resolve_module(model, tap.path)
    if tap.read == "input" and isinstance(module, nn.Linear):
        return (1, module.in_features)
    if example_input is None:
        raise KdkitError(
            f"the shape at {tap} is needed to build an adapter; pass example_input "
            "(a batch of the model's inputs) to build_method"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feats = run_with_taps(model, example_input, {"probe": tap})
    finally:
        model.train(was_training)
    return tuple(feats["probe"].shape)


def _first_tensor(args: tuple[Any, ...], where: str) -> Tensor:
    if not args or not isinstance(args[0], Tensor):
        raise KdkitError(f"tap {where}: the module's first input is not a tensor")
    return args[0]


def _output_tensor(out: Any, where: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise KdkitError(f"tap {where}: the module's output is not a tensor ({type(out).__name__})")


def last_relu(module: nn.Module) -> nn.Module | None:
    """The last ReLU module registered inside ``module`` (itself if it is one)."""
    if isinstance(module, _RELUS):
        return module
    found = None
    for m in module.modules():
        if isinstance(m, _RELUS):
            found = m
    return found


class _Capture:
    """Holds the hooks of one capture; values are filled during the forward pass."""

    def __init__(self, model: nn.Module, taps: Mapping[str, Tap]) -> None:
        self.values: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, tap in taps.items():
            self._add(model, name, tap)

    def _add(self, model: nn.Module, name: str, tap: Tap) -> None:
        module = resolve_module(model, tap.path)
        where = f"'{name}' ({tap})"
        values = self.values

        if tap.read == "output":

            def out_hook(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
                values[name] = _output_tensor(out, where).clone()

            self._handles.append(module.register_forward_hook(out_hook))
        elif tap.read == "input":

            def in_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                values[name] = _first_tensor(args, where).clone()

            self._handles.append(module.register_forward_pre_hook(in_hook))
        else:
            relu = last_relu(module)
            if relu is None:
                raise KdkitError(
                    f"tap {where}: no nn.ReLU module inside '{tap.path}', so there is no "
                    "pre-activation to read; tap a ReLU module or read 'output' instead"
                )
            pending: dict[str, Tensor] = {}

            def relu_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                # Called for every use of the ReLU; the last call before the module ends wins.
                pending["x"] = _first_tensor(args, where).clone()

            def end_hook(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
                if "x" not in pending:
                    raise KdkitError(f"tap {where}: the ReLU inside '{tap.path}' never ran")
                pre = pending.pop("x")
                out_t = _output_tensor(out, where)
                # The pre-activation is only meaningful if the module really ends with it.
                # (NaN compares equal to NaN here: a diverged run is the loop's to report,
                # naming the term and step, not a wrong tap)
                if relu is not module and (
                    out_t.shape != pre.shape or not torch.allclose(
                        out_t, pre.clamp(min=0), rtol=0.0, atol=0.0, equal_nan=True)
                ):
                    raise KdkitError(
                        f"tap {where}: '{tap.path}' does not end with its last ReLU module "
                        "(its output is not relu of that ReLU's input); tap the ReLU itself"
                    )
                values[name] = pre

            self._handles.append(relu.register_forward_pre_hook(relu_hook))
            self._handles.append(module.register_forward_hook(end_hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def capture(model: nn.Module, taps: Mapping[str, Tap]) -> Iterator[dict[str, Tensor]]:
    """Context manager: register hooks for ``taps`` on ``model``; yield the dict they fill."""
    cap = _Capture(model, taps)
    try:
        yield cap.values
    finally:
        cap.remove()


def run_with_taps(
    model: nn.Module, x: Tensor, taps: Mapping[str, Tap]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward ``x`` through ``model``; return (logits, captured tensors).

    A tap on the whole model's output (:data:`LOGITS`) is served from the return value
    without a hook.
    """
    hooked = {n: t for n, t in taps.items() if t != LOGITS}
    with capture(model, hooked) as values:
        out = _output_tensor(model(x), "model output")
    feats = dict(values)
    for n, t in taps.items():
        if t == LOGITS:
            feats[n] = out
    missing = [n for n in taps if n not in feats]
    if missing:
        raise KdkitError(
            f"taps {missing} captured nothing: their modules were not called in forward()"
        )
    return out, feats
