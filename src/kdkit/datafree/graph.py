"""The neuron graph of a feed-forward network, for Lopes et al.'s spectral metadata.

Neurons of the recorded layers are the vertices; the edge between neuron ``i`` of one
recorded layer and neuron ``j`` of the next carries the absolute weight by which ``i``
feeds ``j``. Between two recorded layers there may be several modules (conv → ReLU →
max-pool); the weight of the composite connection is found by pushing the identity basis
of the first layer through the modules with every weight replaced by its absolute value,
biases dropped, element-wise activations and dropout as the identity, and max-pooling as
sum-pooling (a pooled neuron is connected to each input of its window). For an MLP this
is exactly ``|W|``.

The graph Fourier basis is the eigenvector matrix of the combinatorial Laplacian
``L = D − W`` (Shuman et al. 2013). Only feed-forward chains are supported: each leaf
module must consume the previous one's output (:func:`leaf_chain` checks this by
running the model), which holds for MLPs, LeNets and plain CNNs, not for residual nets.

Devices: the model runs where its parameters are (the identity basis pushed through it is
made there); :func:`layer_adjacency` returns its block on the CPU, so the float64
Laplacian and its eigendecomposition are CPU work, the same whatever device the model is
on (and MPS has no float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.train.device import module_device

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
                nn.Sigmoid, nn.Dropout, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
MAX_VERTICES = 12_000  # a dense eigendecomposition above this takes minutes and GBs


def leaf_chain(model: nn.Module, example: Tensor) -> list[str]:
    """Paths of ``model``'s leaf modules in call order, checked to form a feed-forward chain.

    Raises a :class:`KdkitError` naming the first module that breaks the chain (a module
    called twice, or one whose input is not the previous module's output, as in a
    residual block). ``example`` is moved to the model's device.
    """
    example = example.to(module_device(model))
    leaves = {n: m for n, m in model.named_modules() if n and not any(m.children())}
    calls: list[tuple[str, Tensor, Tensor]] = []
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, mod in leaves.items():
        def pre(_m: nn.Module, args: tuple[object, ...], name: str = name) -> None:
            if isinstance(args[0], Tensor):
                inputs[name] = args[0].detach().clone()

        def post(_m: nn.Module, _a: tuple[object, ...], out: object, name: str = name) -> None:
            if isinstance(out, Tensor) and name in inputs:
                calls.append((name, inputs.pop(name), out.detach().clone()))

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    names = [c[0] for c in calls]
    if not calls:
        raise KdkitError("the model has no leaf modules that take a tensor; cannot build its graph")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise KdkitError(
            f"module(s) {repeated} are called more than once in forward(); the spectral "
            "records need a feed-forward chain (MLP, LeNet, plain CNN); use top_layer or "
            "all_layers metadata, or DeepInversion, for this model"
        )
    previous = example
    for name, inp, outp in calls:
        if inp.shape[0] != previous.shape[0] or not torch.equal(inp.flatten(1), previous.flatten(1)):
            raise KdkitError(
                f"module '{name}' does not consume the previous module's output (a residual "
                "or branching model?); the spectral records need a feed-forward chain; use "
                "top_layer or all_layers metadata, or DeepInversion, for this model"
            )
        previous = outp
    if not torch.equal(previous.flatten(1), out.flatten(1)):
        raise KdkitError("the model's output is not its last module's output; cannot build its graph")
    return names


def default_layers(model: nn.Module, chain: Sequence[str]) -> list[str]:
    """Recorded layers: after each activation (and the pooling that directly follows it),
    then the last module (the logits). Dropout between them is skipped."""
    mods = dict(model.named_modules())
    layers: list[str] = []
    i = 0
    while i < len(chain):
        if isinstance(mods[chain[i]], _ACTIVATIONS):
            j = i
            while j + 1 < len(chain) and isinstance(mods[chain[j + 1]], nn.Dropout):
                j += 1
            if j + 1 < len(chain) and isinstance(mods[chain[j + 1]], _POOLS):
                layers.append(chain[j + 1])
            else:
                layers.append(chain[i])  # the activation itself (dropout is off in eval)
            i = j + 1
        else:
            i += 1
    if not layers or layers[-1] != chain[-1]:
        layers.append(chain[-1])
    return layers


def _abs_apply(mod: nn.Module, x: Tensor, name: str) -> Tensor:
    """``mod`` with |weights|, no bias, identity activations, max-pool as sum-pool."""
    if isinstance(mod, nn.Linear):
        return F.linear(x.flatten(1), mod.weight.abs())
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise KdkitError(f"conv '{name}': padding_mode {mod.padding_mode!r} is not supported")
        return F.conv2d(x, mod.weight.abs(), None, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        var = (mod.running_var if mod.running_var is not None
               else torch.ones(x.shape[1], device=x.device))
        scale = (mod.weight.abs() if mod.weight is not None else torch.ones_like(var))
        scale = scale / torch.sqrt(var + mod.eps)
        return x * scale.view(1, -1, *([1] * (x.dim() - 2)))
    if isinstance(mod, nn.MaxPool2d):
        k = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * 2
        if mod.dilation not in (1, (1, 1)):
            raise KdkitError(f"pool '{name}': dilated max-pooling is not supported")
        return F.avg_pool2d(x, k, mod.stride, mod.padding, mod.ceil_mode, True) * (k[0] * k[1])
    if isinstance(mod, nn.AvgPool2d):
        return F.avg_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                            mod.count_include_pad)
    if isinstance(mod, nn.Flatten):
        return x.flatten(mod.start_dim, mod.end_dim)
    if isinstance(mod, _ELEMENTWISE):
        return x
    raise KdkitError(
        f"module '{name}' ({type(mod).__name__}) has no graph rule (supported: Linear, Conv2d, "
        "BatchNorm, max/avg pooling, Flatten, element-wise activations, Dropout)"
    )


def layer_adjacency(
    model: nn.Module, chain: Sequence[str], src: str, dst: str, src_shape: Sequence[int]
) -> Tensor:
    """Absolute connection weights (n_src, n_dst) from layer ``src`` to the later ``dst``.

    Computed on the model's device; returned on the CPU.
    """
    mods = dict(model.named_modules())
    i, j = chain.index(src), chain.index(dst)
    n = math.prod(src_shape)
    if n > MAX_VERTICES:
        raise KdkitError(
            f"layer '{src}' has {n} neurons (> {MAX_VERTICES}); its graph is too large for a "
            "dense eigendecomposition: record later/smaller layers (layers=[...]), or use "
            "all_layers or DeepInversion"
        )
    x = torch.eye(n, dtype=torch.float32, device=module_device(model)).view(n, *src_shape)
    with torch.no_grad():
        for name in chain[i + 1 : j + 1]:
            x = _abs_apply(mods[name], x, name)
    return x.flatten(1).cpu()


def graph_laplacian(blocks: Sequence[Tensor]) -> Tensor:
    """Laplacian (float64) of the layered graph whose consecutive layers are joined by
    ``blocks[l]`` (n_l, n_{l+1}); vertices are the layers' neurons, in order. On the
    device of ``blocks[0]`` (the CPU for :func:`layer_adjacency`'s blocks)."""
    sizes = [blocks[0].shape[0]] + [b.shape[1] for b in blocks]
    n = sum(sizes)
    if n > MAX_VERTICES:
        raise KdkitError(
            f"the graph has {n} neurons (> {MAX_VERTICES}); its eigendecomposition is too "
            "large: use spectral_pairs, or record fewer/smaller layers (layers=[...])"
        )
    w = torch.zeros(n, n, dtype=torch.float64, device=blocks[0].device)
    off = 0
    for b, (n0, n1) in zip(blocks, zip(sizes, sizes[1:], strict=False), strict=True):
        w[off : off + n0, off + n0 : off + n0 + n1] = b.double()
        off += n0
    w = w + w.T
    return torch.diag(w.sum(1)) - w


def fourier_basis(laplacian: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a graph Laplacian.

    Each eigenvector's sign is fixed (its largest-magnitude entry positive), so the basis
    is reproducible.
    """
    evals, evecs = torch.linalg.eigh(laplacian)
    idx = evecs.abs().argmax(0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1], device=evecs.device)])
    signs[signs == 0] = 1.0
    return evals, evecs * signs
