"""Many processes (torchrun): ranks, collectives, and the few tools DDP training needs.

kdkit follows torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` or a rendezvous). :func:`init_from_env` joins the process
group; a library user who initialised ``torch.distributed`` already is used as is. Rank 0
alone writes (checkpoints, logs, summaries, models); every rank reads. No loss or method
knows about ranks: the loop shards batches and reduces metrics, and the distiller gathers
the global batch for the terms that relate samples when asked (``global_batch_terms``).

A rank that fails ends the job: under torchrun its exit makes the agent stop the others;
every collective has a timeout (``KDKIT_DIST_TIMEOUT`` seconds, default 3600), so a rank left
waiting for a dead peer raises rather than hangs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdkit.errors import KdkitError

DEFAULT_TIMEOUT_S = 3600.0  # also bounds rank-0-only work (a data-free synthesis) the others wait for


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True in a single process and on rank 0: the one process that writes files."""
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise KdkitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number; "
                         "launch with torchrun (or kdkit --nproc N)") from None


def timeout_s() -> float:
    text = os.environ.get("KDKIT_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise KdkitError(f"KDKIT_DIST_TIMEOUT={text!r} must be a positive number of seconds")
    return value


def init_from_env() -> bool:
    """Join torchrun's process group (gloo on CPUs, NCCL for CUDA tensors); True if joined.

    Does nothing in a single process or when ``torch.distributed`` is initialised already.
    """
    if is_initialized() or env_world_size() <= 1:
        return is_initialized()
    if not dist.is_available():
        raise KdkitError("this torch build has no torch.distributed; run one process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise KdkitError(f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with "
                         "torchrun --nproc-per-node N -m kdkit ... (or kdkit --nproc N ...)")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():  # else resolve_device says what is wrong
            torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return True


def shutdown(*, graceful: bool = True) -> None:
    """Leave the process group. ``graceful`` (every rank got here): wait for the others
    first, so that no rank closes its connections while a peer still uses them."""
    if is_initialized():
        if graceful and world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard_bounds(n: int, part: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part ``part`` of ``n`` items cut into ``parts`` contiguous pieces
    whose sizes differ by at most one (the first ``n % parts`` get one more)."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def shard_sizes(n: int, parts: int) -> list[int]:
    return [b - a for a, b in (shard_bounds(n, p, parts) for p in range(parts))]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (in place; ``t`` itself in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_state(module: nn.Module, *, buffers_only: bool = False) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics) and, unless
    ``buffers_only``, parameters."""
    if world_size() <= 1:
        return
    params = [] if buffers_only else list(module.parameters())
    for t in [*params, *module.buffers()]:
        dist.broadcast(t.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value made by kdkit itself)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (it may write), the others after it (they read).

    Yields whether this rank is rank 0. If rank 0's block fails, the other ranks raise
    too (they would otherwise go on to do rank 0's work, or wait for it).
    """
    if world_size() <= 1:
        yield True
        return
    flag = torch.zeros(1, dtype=torch.int32)
    if is_main():
        try:
            yield True
            flag.fill_(1)
        finally:
            dist.broadcast(flag, src=0)  # pairs with the others' wait below
        return
    dist.broadcast(flag, src=0)
    if int(flag.item()) != 1:
        raise KdkitError("rank 0 failed at a step the other processes wait for (its message "
                         "says why); stopping this one too")
    yield False


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: every rank uses the sum, so the gradient of each
    rank's input is the sum of every rank's gradient of the output."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(t: Tensor) -> Tensor:
    return _AllReduceSum.apply(t) if world_size() > 1 else t


class _Gather(torch.autograd.Function):
    """Concatenate every rank's shard (sizes may differ by rank), differentiable.

    Every rank computes the same function of the gathered batch, so the gradient of a
    rank's shard is the sum over ranks of the gradient of its rows.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, sizes: tuple[int, ...]) -> Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        longest = max(sizes)
        padded = t.contiguous()
        if t.shape[0] < longest:
            padded = torch.cat([padded, padded.new_zeros(longest - t.shape[0], *t.shape[1:])])
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded)
        return torch.cat([p[:n] for p, n in zip(pieces, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_batch(t: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """The global batch from every rank's shard ``t`` (rank order); ``sizes``: each shard's
    number of rows. Gradients flow back to each rank's own rows."""
    if world_size() <= 1:
        return t
    if t.requires_grad:
        return _Gather.apply(t, sizes)
    with torch.no_grad():
        return _Gather.forward(_NoCtx(), t, sizes)


class _NoCtx:
    """Stands in for autograd's ctx when gathering tensors that need no gradient."""


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (every rank's
    shard), on any device and backend (gloo included): two differentiable all-reduces, one
    for the mean and one for the variance. In eval mode, or in one process, it is BatchNorm.

    It shares the parameters and buffers of the layer it replaces (see
    :func:`sync_batchnorm`), so optimisers, checkpoints and ``state_dict`` keys are unchanged.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise KdkitError(f"SyncBatchNorm expects (N, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or world_size() <= 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / max(1, x.shape[1])], device=x.device,
                             dtype=torch.float32)
        first = all_reduce_with_grad(torch.cat([xf.sum(dims), count]))
        n = first[-1]
        mean = first[:-1] / n
        centred = xf - mean.reshape(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                tracked = self.num_batches_tracked
                assert tracked is not None
                tracked.add_(1)
                m = 1.0 / float(tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)  # type: ignore[union-attr]
        return out.to(x.dtype)


def _sync_layer(bn: nn.modules.batchnorm._BatchNorm, on_cuda: bool) -> nn.Module:
    cls: type[nn.modules.batchnorm._BatchNorm] = nn.SyncBatchNorm if on_cuda else SyncBatchNorm
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(new, attr, getattr(bn, attr))
    if cls is nn.SyncBatchNorm:
        new.process_group = None  # type: ignore[assignment]
    # the very same Parameter and buffer objects: nothing to copy back afterwards
    new._parameters = bn._parameters
    new._buffers = bn._buffers
    new.training = bn.training
    return new


@contextmanager
def sync_batchnorm(module: nn.Module, *, on_cuda: bool = False) -> Iterator[nn.Module]:
    """Within the block, every BatchNorm layer of ``module`` computes global-batch statistics
    (``torch.nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm` elsewhere); the original
    layers are put back afterwards. Parameters and buffers are shared, not copied."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                    child, (SyncBatchNorm, nn.SyncBatchNorm)):
                setattr(parent, name, _sync_layer(child, on_cuda))
                swapped.append((parent, name, child))
    try:
        yield module
    finally:
        for parent, name, child in reversed(swapped):
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)

