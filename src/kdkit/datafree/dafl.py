"""DAFL (Chen et al., ICCV 2019): a generator trained against the teacher alone.

The generator G maps z ~ N(0, I) to inputs; it is trained (module 1 of the paper's
algorithm) to minimise

    L_G = oh·L_oh + a·L_a + ie·L_ie
    L_oh = CE(T(G(z)), argmax T(G(z)))      (confident, one-hot-like outputs)
    L_a  = −mean |f_T(G(z))|                (large features before the classifier)
    L_ie = Σ_c p̄_c log p̄_c                  (balanced classes over the batch)

and the student is then distilled (module 2) on fresh samples G(z) every step with KL at
T = 1 (:class:`GeneratorLoader` feeds them to the normal training loop). The generator
follows the paper's MNIST/CIFAR design (fc → 2× (upsample, conv3, BN, LeakyReLU) → conv3,
tanh, BN without affine); ``width`` scales its channels (the paper uses 128).

The generator trains and samples on the teacher's device; its latents z are drawn on the
CPU (seeded) and then moved, so they are the same on every device.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.data.loader import derive_seed
from kdkit.datafree.common import (
    LossWatch,
    StageProgress,
    cpu_tensors,
    draw_to,
    replace_artifact,
    stderr_line,
)
from kdkit.dist import shard_bounds
from kdkit.errors import CheckpointError, KdkitError
from kdkit.files import clean_stale_temps
from kdkit.losses.datafree import activation_loss, information_entropy_loss, one_hot_loss
from kdkit.taps import Tap, penultimate, run_with_taps
from kdkit.train.checkpoint import (
    NoReadableCheckpoint,
    load_checkpoint,
    load_state,
    load_state_strict,
    optimizer_tensors,
    prev_path,
    restore_optimizer,
    save_state,
    unreadable_path,
)
from kdkit.train.device import module_device

GENERATOR_STEM = "generator"
# The state of an unfinished generator training: one file (weights, optimiser and JSON
# state in its header), rewritten every 10 % of the steps; the one before is kept as
# generator-partial.prev.safetensors. kdkit <= 0.1 kept it as two files (stem + .json).
PARTIAL = "generator-partial.safetensors"
_TRAIN_STREAM = 21
_SAMPLE_STREAM = 22
_INIT_STREAM = 23


class Generator(nn.Module):
    """DAFL's generator: z (B, latent_dim) → images (B, channels, size, size), size % 4 == 0."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, size: int = 28,
                 width: int = 128) -> None:
        super().__init__()
        if size % 4 or size < 4:
            raise KdkitError(f"DAFL generator: image size must be a multiple of 4, got {size}")
        if latent_dim < 1 or width < 2:
            raise KdkitError(f"DAFL generator: latent_dim >= 1 and width >= 2 needed "
                             f"(got {latent_dim}, {width})")
        self.init_size = size // 4
        self.width = width
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width)
        self.up1 = nn.Upsample(scale_factor=2)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.LeakyReLU(0.2)
        self.up2 = nn.Upsample(scale_factor=2)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(width // 2, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        h = self.bn0(h)
        h = self.act1(self.bn1(self.conv1(self.up1(h))))
        h = self.act2(self.bn2(self.conv2(self.up2(h))))
        return self.out_bn(torch.tanh(self.conv3(h)))


def train_generator(
    teacher: nn.Module,
    generator: nn.Module,
    *,
    latent_dim: int,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 0.2,
    oh_weight: float = 1.0,
    a_weight: float = 0.1,
    ie_weight: float = 5.0,
    feature_tap: Tap | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Module 1 of DAFL: train ``generator`` with Adam against the frozen ``teacher``.

    The generator is moved to the teacher's device and trains there (it stays there).

    ``feature_tap``: the teacher features of L_a (default: the input of its last Linear).
    ``checkpoint``: a state file (e.g. ``folder/generator-partial.safetensors``; a path
    without that suffix gets it): the generator and optimiser are saved there every 10 % of
    the steps, as one atomic file (:func:`kdkit.train.checkpoint.save_state`, the previous
    one kept), and training continues from it, to the same result (step ``s`` draws its z
    from (seed, s)). A newest checkpoint that cannot be read falls back to the previous one;
    if neither can, training starts over (the result is the same, only slower). ``log``
    receives those warnings (default: stderr). Returns a short history (every 10 % of the
    steps) of the three terms.
    """
    if steps < 1 or batch_size < 2:
        raise KdkitError(f"dafl: steps >= 1 and batch_size >= 2 needed (got {steps}, {batch_size})")
    say = log or stderr_line
    teacher.eval().requires_grad_(False)
    device = module_device(teacher)
    generator.to(device)  # before the optimiser: its state lives beside the parameters
    tap = feature_tap or penultimate(teacher)
    opt = torch.optim.Adam(generator.parameters(), lr=lr)
    generator.train()
    history: list[dict[str, float]] = []
    start = 0
    every = max(1, steps // 10)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "oh_weight": oh_weight,
                "a_weight": a_weight, "ie_weight": ie_weight, "seed": seed,
                "latent_dim": latent_dim, "tap": str(tap)}
    path = state_file(checkpoint) if checkpoint is not None else None
    found = _load_partial(path, say) if path is not None else None
    if found is not None and found[1].get("settings") == settings:
        tensors, meta = found
        load_state_strict(generator, {k[4:]: v for k, v in tensors.items()
                                      if k.startswith("gen/")}, str(path))
        restore_optimizer(opt, tensors, meta["optimizer"])
        start, history = meta["step"], meta["history"]
    watch = LossWatch(device)

    def finite(bad: tuple[int, float] | None) -> None:
        if bad is not None:
            raise KdkitError(f"dafl: the generator loss became {bad[1]} at step {bad[0]}; "
                             "lower the generator learning rate")

    with StageProgress("dafl generator", steps, enabled=progress, initial=start) as bar:
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(derive_seed(seed, step, _TRAIN_STREAM))
            z = draw_to(torch.randn((batch_size, latent_dim), generator=gen), device)
            logits, feats = run_with_taps(teacher, generator(z), {"f": tap})
            terms = {"oh": one_hot_loss(logits), "a": activation_loss(feats["f"]),
                     "ie": information_entropy_loss(logits)}
            loss = oh_weight * terms["oh"] + a_weight * terms["a"] + ie_weight * terms["ie"]
            finite(watch.see(loss, step))  # off the CPU: read at the check points below
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % every == 0 or step == steps - 1:
                finite(watch.first_bad())
                history.append({"step": step, **{k: float(v.detach()) for k, v in terms.items()}})
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
            bar.update()
            if path is not None and (step + 1) % every == 0 and step + 1 < steps:
                finite(watch.first_bad())  # never checkpoint a generator gone NaN
                opt_t, opt_meta = optimizer_tensors(opt)
                state = {f"gen/{k}": v for k, v in generator.state_dict().items()}
                save_state(path, cpu_tensors({**state, **opt_t}),
                           {"kind": "dafl-generator-partial", "epoch": 0, "step": step + 1,
                            "settings": settings, "history": history, "optimizer": opt_meta})
                _legacy_json(path).unlink(missing_ok=True)  # superseded by the new state
    finite(watch.first_bad())
    generator.eval()
    return history


def state_file(checkpoint: Path) -> Path:
    """The state file of ``checkpoint``: itself if it ends in .safetensors, else + that suffix."""
    if checkpoint.suffix == ".safetensors":
        return checkpoint
    return checkpoint.with_name(checkpoint.name + ".safetensors")


def _legacy_json(path: Path) -> Path:
    """kdkit <= 0.1's partial checkpoint: ``stem.safetensors`` + ``stem.json``."""
    return path.with_suffix(".json")


def _load_partial(
    path: Path, say: Callable[[str], None]
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest readable partial generator state (or the one before it); None if none."""
    try:
        found = load_state(path, log=say)
    except NoReadableCheckpoint as e:  # its advice (--force) does not apply: we start over
        found, problem = None, "no readable checkpoint: " + "; ".join(e.reasons)
    else:
        problem = ""
    legacy = _legacy_json(path)
    if found is None and legacy.exists():  # written by kdkit <= 0.1
        try:
            return load_checkpoint(legacy.with_suffix(""))
        except CheckpointError as e:
            problem = problem or str(e)
    if problem:
        say(f"kdkit: warning: {problem}; the generator's training starts over (to the same "
            "result)")
    return found


def remove_partial(checkpoint: Path) -> None:
    """Delete a partial generator state (newest, previous, one set aside as unreadable, and
    kdkit 0.1's JSON)."""
    path = state_file(checkpoint)
    for p in (_legacy_json(path), path, prev_path(path), unreadable_path(path)):
        p.unlink(missing_ok=True)


def save_generator(folder: Path, generator: Generator, meta: dict[str, Any]) -> None:
    replace_artifact(folder / GENERATOR_STEM, dict(generator.state_dict()),
                     {"kind": "dafl-generator", **meta})


def load_generator(folder: Path) -> tuple[Generator, dict[str, Any]]:
    tensors, meta = load_checkpoint(folder / GENERATOR_STEM)
    if meta.get("kind") != "dafl-generator":
        raise KdkitError(f"{folder / GENERATOR_STEM}.json is not a DAFL generator")
    g = Generator(meta["latent_dim"], meta["channels"], meta["size"], meta["width"])
    load_state_strict(g, tensors, str(folder / GENERATOR_STEM))
    return g.eval(), meta


def dafl_generator(
    teacher: nn.Module, folder: Path, *, input_shape: tuple[int, int, int], seed: int,
    latent_dim: int = 100, width: int = 128, progress: bool = True, **train_kwargs: Any,
) -> Generator:
    """Train (or reload, if ``folder`` holds a finished one with these settings) a generator,
    returned on the teacher's device.

    While it trains, its state is kept in ``folder/generator-partial.safetensors`` (see
    :func:`train_generator`), so a killed training continues; the finished generator is
    ``folder/generator.safetensors`` + ``generator.json``, and the partial state is removed.
    """
    c, h, _ = input_shape
    meta = json.loads(json.dumps({"latent_dim": latent_dim, "channels": c, "size": h,
                                  "width": width, "seed": seed, "train": train_kwargs}))
    clean_stale_temps(folder)
    if (folder / f"{GENERATOR_STEM}.json").exists():
        g, old = load_generator(folder)
        if {k: old.get(k) for k in meta} == meta:
            remove_partial(folder / PARTIAL)  # left if a kill came before it was removed
            return g.to(module_device(teacher))
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
        torch.manual_seed(derive_seed(seed, _INIT_STREAM))
        g = Generator(latent_dim, c, h, width)
    t0 = time.perf_counter()
    history = train_generator(teacher, g, latent_dim=latent_dim, seed=seed, progress=progress,
                              checkpoint=folder / PARTIAL, **train_kwargs)
    save_generator(folder, g, {**meta, "history": history,
                               "wall_s": round(time.perf_counter() - t0, 2)})
    remove_partial(folder / PARTIAL)  # the finished generator supersedes it
    return g

class GeneratorLoader:
    """Fresh generator samples for the training loop: ``(x, teacher argmax, index)`` batches.

    Batch ``step`` of ``epoch`` is drawn from z seeded by (seed, epoch, step), so a resumed
    run sees the same samples. Same interface as :class:`kdkit.data.BatchLoader`.
    """

    drop_last = False

    def __init__(self, generator: nn.Module, teacher: nn.Module, *, latent_dim: int,
                 batch_size: int, steps_per_epoch: int, seed: int) -> None:
        if steps_per_epoch < 1 or batch_size < 1:
            raise KdkitError("dafl: steps_per_epoch and batch_size must be >= 1")
        self.generator = generator.eval()
        self.teacher = teacher
        self.latent_dim = latent_dim
        self.batch_size = batch_size
        self.steps = steps_per_epoch
        self.seed = seed
        self.dataset = range(batch_size * steps_per_epoch)  # only its length is read

    def __len__(self) -> int:
        return self.steps

    def place(self, device: torch.device) -> GeneratorLoader:
        """Generate on ``device`` (the latent draws stay on the CPU, so they do not depend
        on it)."""
        self.generator.to(device)
        self.teacher.to(device)
        return self

    def batch_rows(self, step: int) -> int:
        return self.batch_size

    def epoch_batches(self, epoch: int, start_step: int = 0, *, shard: tuple[int, int] = (0, 1)
                      ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Batches from ``start_step`` on; ``shard=(rank, world)``: that rank's share of
        each global batch (the global batch's latents are drawn, then cut)."""
        part, parts = shard
        a, b = shard_bounds(self.batch_size, part, parts)
        device = module_device(self.generator)
        t_device = module_device(self.teacher)  # the same once placed (:meth:`place`)
        for step in range(start_step, self.steps):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, step, _SAMPLE_STREAM))
            z = torch.randn((self.batch_size, self.latent_dim), generator=gen)[a:b]
            with torch.no_grad():
                x = self.generator(draw_to(z, device))
                y = self.teacher(x.to(t_device)).argmax(1).to(device)
            first = step * self.batch_size
            yield x, y, torch.arange(first + a, first + b)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.epoch_batches(0)


def sample_generator(generator: nn.Module, teacher: nn.Module, *, samples: int,
                     latent_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed transfer set of ``samples`` generator outputs, labelled by the teacher.

    Generated on the generator's device, labelled on the teacher's; returned on the CPU.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, _SAMPLE_STREAM, -1))
    z = torch.randn((samples, latent_dim), generator=gen)
    generator.eval()
    g_device, t_device = module_device(generator), module_device(teacher)
    xs, ys = [], []
    with torch.no_grad():
        for i in range(0, samples, 1000):
            x = generator(z[i : i + 1000].to(g_device))
            ys.append(teacher(x.to(t_device)).argmax(1).cpu())
            xs.append(x.cpu())
    return torch.cat(xs), torch.cat(ys)
