"""Model sources: a model name is kdkit's zoo name, or ``SOURCE:NAME`` for another library.

- ``resnet20``, ``mlp``, ...: kdkit's zoo (``kdkit models``);
- ``torchvision:resnet18``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``,
  ``num_classes`` from the data unless given;
- ``timm:efficientnet_b0``: ``timm.create_model(NAME, pretrained=False, **kwargs)``,
  ``num_classes`` and ``in_chans`` from the data unless given;
- ``py:package.module:factory``: the user's own ``factory(**kwargs)``; of ``num_classes``,
  ``in_channels`` and ``input_size`` it receives those its signature takes;
- ``hf:PATH`` / ``hf:ARCH``: a Hugging Face causal language model (token ids ``(B, L)`` to
  logits ``(B, L, V)``; ``pip install 'kdkit[hf]'``; no hub access, ever). ``hf:PATH`` loads
  a local folder written by ``save_pretrained`` (safetensors weights only); ``hf:ARCH`` with
  ``config: {...}`` builds a randomly initialised model from
  ``AutoConfig.for_model(ARCH, **config)``, its ``vocab_size`` and position count filled
  from ``num_classes`` and ``input_size`` unless given. See :func:`hf_causal_lm` for the
  logits, the hidden-state and attention-map taps, and ``attn_implementation``.

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

SOURCES = ("torchvision", "timm", "py", "hf")
SPECIAL_KEYS = ("weights", "output")  # handled here, never passed to a factory
_INSTALL = {
    "torchvision": "pip install torchvision (make setup-vision on kdkit's own machines)",
    "timm": "pip install timm (make setup-vision on kdkit's own machines)",
    "hf": "pip install 'kdkit[hf]'",
}
_MODULES = {"hf": "transformers"}  # the package a source imports, where it is not its name


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
    package = _MODULES.get(source, source)
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise KdkitError(f"model source '{source}:' needs the {package} package, which is not "
                         f"installed ({str(e)[:80]}); {_INSTALL[source]}") from None


def create_from_source(source: str, target: str, *, num_classes: int | None,
                       in_channels: int | None, input_size: int | None,
                       **kwargs: Any) -> nn.Module:
    """The model ``source:target`` for data of this geometry (see the module doc). Only
    ``hf:`` takes ``None`` for a size the caller does not know (the model's own is kept)."""
    full = f"{source}:{target}"
    classes = 10 if num_classes is None else num_classes
    channels = 3 if in_channels is None else in_channels
    size = 32 if input_size is None else input_size
    try:
        if source == "hf":
            model = hf_causal_lm(target, full, num_classes, input_size, kwargs)
        elif source == "torchvision":
            tv = _library("torchvision")
            if target not in tv.models.list_models():
                raise KdkitError(f"model '{full}': torchvision has no model '{target}' (see "
                                 "torchvision.models.list_models())")
            kwargs.setdefault("num_classes", classes)
            model = tv.models.get_model(target, weights=None, **kwargs)
            _check_first_conv(model, channels, full)
        elif source == "timm":
            timm = _library("timm")
            if not timm.is_model(target):
                raise KdkitError(f"model '{full}': timm has no model '{target}' (see "
                                 "timm.list_models())")
            kwargs.setdefault("num_classes", classes)
            kwargs.setdefault("in_chans", channels)
            model = timm.create_model(target, pretrained=False, **kwargs)
        else:
            model = _py_factory(target, full)(**_py_kwargs(target, full, kwargs, {
                "num_classes": classes, "in_channels": channels,
                "input_size": size}))
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


# --------------------------------------------------------------------------- hf: causal LMs

_HF_ARGS = {
    "config": "a dict of config fields: builds a random model of architecture ARCH",
    "attn_implementation": "sdpa (default) or eager",
}
_HF_ATTN = ("sdpa", "eager")


def hf_causal_lm(target: str, full: str, num_classes: int | None, input_size: int | None,
                 kwargs: dict[str, Any]) -> nn.Module:
    """A Hugging Face causal LM that kdkit sees as a plain module: ``model(ids)`` with ids
    ``(B, L)`` returns the logits tensor ``(B, L, V)`` (the output object's ``.logits``,
    picked by a forward hook, so parameter and module names stay Hugging Face's).

    ``hf:PATH`` loads the folder ``PATH`` (``AutoModelForCausalLM.from_pretrained(PATH,
    local_files_only=True, use_safetensors=True)``); a folder with only pickled ``.bin``
    weights is refused. ``hf:ARCH`` with ``config: {...}`` builds a random model from
    ``AutoConfig.for_model(ARCH, **config)``; ``vocab_size`` and the number of positions
    are the data's (``num_classes``, ``input_size``) unless the config sets them, and a
    vocabulary (or, for a folder, too few positions) that does not fit the data is refused.

    Taps: a decoder block by its path (``transformer.h.0`` for GPT-2, ``model.layers.0``
    for Llama-style models) gives the hidden state ``(B, L, D)`` (a block that returns a
    tuple is read at its first element, as every tap does). Each attention module (a module
    whose class name ends in ``Attention``) gets a parameter-free child ``probs``:
    ``transformer.h.0.attn.probs`` is the attention map ``(B, heads, L, L)``. While such a
    tap is registered the model runs eager attention (the only implementation that
    computes the weights), otherwise ``attn_implementation`` (default ``sdpa``); a model
    that cannot switch at run time needs ``attn_implementation: eager``.
    """
    tr = _library("hf")
    unknown = [k for k in kwargs if k not in _HF_ARGS]
    if unknown:
        raise KdkitError(f"model '{full}' has no argument {', '.join(repr(k) for k in unknown)};"
                         f" it takes: {'; '.join(f'{k} ({v})' for k, v in _HF_ARGS.items())}")
    attn = kwargs.get("attn_implementation", "sdpa")
    if attn not in _HF_ATTN:
        raise KdkitError(f"model '{full}': attn_implementation must be one of "
                         f"{', '.join(_HF_ATTN)}, got {attn!r:.60}")
    config = kwargs.get("config")
    if config is not None:
        if not isinstance(config, dict):
            raise KdkitError(f"model '{full}': config must be a mapping of config fields (e.g. "
                             f"{{n_layer: 2, n_head: 2, n_embd: 64}}), got {config!r:.60}")
        cfg = _hf_config(tr, target, full, dict(config), num_classes, input_size)
        model = tr.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    else:
        folder = _hf_folder(target, full)
        model = tr.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, attn_implementation=attn)
        _hf_check_fit(model.config, full, num_classes, input_size, "the model in " + target)
    model.config.use_cache = False  # training and distillation: no key/value cache
    _hf_tappable_attention(model, attn, full)
    return attach_output(model, "logits", full)


def _hf_std(cfg: Any, name: str) -> str:
    """The field a config class uses for the standard attribute ``name``."""
    return str(getattr(cfg, "attribute_map", {}).get(name, name))


def _hf_config(tr: Any, arch: str, full: str, config: dict[str, Any], num_classes: int | None,
               input_size: int | None) -> Any:
    try:
        probe = tr.AutoConfig.for_model(arch, **config)
    except ValueError as e:
        if "Unrecognized model" in str(e) or arch not in tr.CONFIG_MAPPING:
            raise KdkitError(f"model '{full}': transformers has no architecture '{arch}' (a "
                             "model_type such as gpt2 or llama; for a local folder write "
                             "hf:PATH without config)") from None
        raise
    vocab_key = _hf_std(probe, "vocab_size")
    pos_key = _hf_std(probe, "max_position_embeddings")
    fill: dict[str, Any] = {}
    if num_classes is not None and vocab_key not in config and "vocab_size" not in config:
        fill[vocab_key] = num_classes
    if (input_size is not None and hasattr(probe, "max_position_embeddings")
            and pos_key not in config and "max_position_embeddings" not in config):
        fill[pos_key] = input_size
    vocab = fill.get(vocab_key)
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT-2's 50256 et al.
        tid = getattr(probe, token, None)  # beyond the data's vocabulary: no such token
        if token not in config and isinstance(tid, int) and isinstance(vocab, int) and (
                tid >= vocab):
            fill[token] = None
    cfg = tr.AutoConfig.for_model(arch, **config, **fill) if fill else probe
    _hf_check_fit(cfg, full, num_classes, input_size, "config")
    return cfg


def _hf_check_fit(cfg: Any, full: str, num_classes: int | None, input_size: int | None,
                  what: str) -> None:
    vocab = getattr(cfg, "vocab_size", None)
    if num_classes is not None and isinstance(vocab, int) and vocab != num_classes:
        raise KdkitError(f"model '{full}': {what} has vocab_size {vocab} but the data's "
                         f"vocabulary has {num_classes} tokens (num_classes); they must be the "
                         "same (leave vocab_size out of config: it is filled from the data)")
    positions = getattr(cfg, "max_position_embeddings", None)
    if input_size is not None and isinstance(positions, int) and positions < input_size:
        raise KdkitError(f"model '{full}': {what} has {positions} positions "
                         f"(max_position_embeddings) but the data's context (input_size) is "
                         f"{input_size} tokens; use a context of at most {positions} or a "
                         "model with more positions")


def _hf_folder(target: str, full: str) -> Path:
    folder = Path(target).expanduser()
    if not folder.is_dir():
        raise KdkitError(f"model '{full}': no folder {target}; hf:PATH loads a local folder "
                         "written by save_pretrained, hf:ARCH with config: {...} builds a "
                         "random model (models are never downloaded)")
    if not (folder / "config.json").is_file():
        raise KdkitError(f"model '{full}': {target} has no config.json; is it a folder "
                         "written by save_pretrained?")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir()
                         if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise KdkitError(f"model '{full}': {target} holds only pickled weights "
                             f"({', '.join(pickled[:3])}), which kdkit never loads; convert "
                             "them to safetensors where you trust the file (model."
                             "save_pretrained(folder, safe_serialization=True))")
        raise KdkitError(f"model '{full}': {target} holds no .safetensors weights")
    return folder


def _hf_tappable_attention(model: nn.Module, attn: str, full: str) -> None:
    """Give every attention module a ``probs`` child that serves its weights to taps, and
    run eager attention while one is tapped (see :func:`hf_causal_lm`)."""
    from kdkit.models.gpt import AttentionProbs

    probes: list[AttentionProbs] = []
    for name, m in list(model.named_modules()):
        if (not type(m).__name__.endswith("Attention") or hasattr(m, "probs")
                or any(isinstance(c, AttentionProbs) for c in m.children())):
            continue
        probs = AttentionProbs()
        m.add_module("probs", probs)
        probes.append(probs)

        def serve(_m: nn.Module, _a: tuple[Any, ...], out: Any, probs: AttentionProbs = probs,
                  name: str = name) -> None:
            if not probs.tapped:
                return
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if not isinstance(weights, Tensor):
                raise KdkitError(f"model '{full}': {name} returned no attention weights for "
                                 f"the tap on {name}.probs; set attn_implementation: eager")
            probs(weights)

        m.register_forward_hook(serve)
    if not probes:
        return

    def choose(m: nn.Module, _args: tuple[Any, ...]) -> None:
        want = "eager" if any(p.tapped for p in probes) else attn
        config = getattr(m, "config", None)
        if config is not None and config._attn_implementation != want:
            m.set_attn_implementation(want)  # type: ignore[operator]

    model.register_forward_pre_hook(choose)


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
