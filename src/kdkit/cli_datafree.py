"""'kdkit datafree': record a teacher's metadata, and make transfer sets without data.

    kdkit datafree record     --teacher RUN --data mnist --kind spectral_pairs --out REC
    kdkit datafree synthesize --teacher RUN --record REC --samples 10000 --out SET
    kdkit datafree deepinversion --teacher RUN --samples 10000 --out SET
    kdkit datafree dafl       --teacher RUN --samples 10000 --out SET
    kdkit datafree noise      --teacher RUN --samples 10000 --out SET
    kdkit distill --teacher RUN --student S --data mnist --synthetic SET

Only 'record' reads the training data; the others need just the teacher (its model.json
gives the input geometry and normalisation). Each runs the teacher on --device (default
auto: a GPU when there is one); what it saves is the same whatever the device, up to
floating-point rounding.
"""

# This docstring is the help text of 'kdkit datafree --help': plain text, no reST markup.

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError


def _device_arg(text: str) -> Any:
    """An argparse type: the torch device ``text`` names, checked to exist here."""
    from kdkit.train.device import resolve_device

    try:
        return resolve_device(text)
    except KdkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _teacher(path: str, device: Any = None) -> tuple[Any, dict[str, Any]]:
    """The model at ``path`` (on ``device`` if given) and its metadata."""
    from kdkit.train.artifacts import load_model, model_stem

    model, meta = load_model(path)
    meta["weights_bytes"] = model_stem(path).with_suffix(".safetensors").stat().st_size
    if device is not None:
        model.to(device)
    return model, meta


def _geometry(meta: dict[str, Any]) -> dict[str, Any]:
    d = meta["data"]
    return {"input_shape": tuple(d["input_shape"]), "mean": d["mean"], "std": d["std"],
            "num_classes": d["num_classes"]}


def _prepare(args: argparse.Namespace) -> Path:
    from kdkit.pipelines.runs import prepare_run_dir

    if not args.out:
        raise KdkitError("--out is required: the folder to write to")
    out = Path(args.out)
    prepare_run_dir(out, resume=args.resume, force=args.force)
    return out


def _finish(out: Path, x_len: int, t0: float, source: str) -> int:
    print(f"{source}: {x_len} samples in {time.perf_counter() - t0:.1f} s -> {out}/transfer.safetensors")
    print(f"distil from it: kdkit distill --teacher RUN --student MODEL --data DATA "
          f"--synthetic {out}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from kdkit.data import load_dataset
    from kdkit.data.arrays import in_memory
    from kdkit.datafree.records import compute_record, save_record
    from kdkit.pipelines.runs import check_teacher_fits

    teacher, meta = _teacher(args.teacher, args.device)
    data = load_dataset(args.data, root=args.data_root, val_fraction=args.val_fraction,
                        seed=args.seed)
    check_teacher_fits(meta, data, args.teacher)
    out = _prepare(args)
    layers = [s for s in args.layers.split(",") if s] if args.layers else None
    t0 = time.perf_counter()
    train = in_memory(data.train, "kdkit datafree record")
    rec = compute_record(teacher, train.x, train.y, kind=args.kind,
                         num_classes=data.num_classes, temperature=args.temperature,
                         layers=layers, fraction=args.fraction, dropout=args.dropout,
                         progress=not args.no_progress)
    save_record(rec, out)
    groups = ", ".join(
        f"{g['dim']} units" + (f" -> {g['coefficients']} coefficients" if g["coefficients"] else "")
        for g in rec.groups)
    print(f"record {args.kind}: layers {[p or '<logits>' for p in rec.layers]}; {groups}")
    print(f"record size {rec.size_bytes:,} bytes; teacher weights {meta['weights_bytes']:,} "
          f"bytes ({rec.size_bytes / meta['weights_bytes']:.2%} of the teacher); "
          f"{time.perf_counter() - t0:.1f} s -> {out}/record.safetensors")
    return 0


def _synth_common(args: argparse.Namespace) -> dict[str, Any]:
    return {"samples": args.samples, "batch_size": args.batch_size, "steps": args.steps,
            "seed": args.seed, "progress": not args.no_progress}


def cmd_synthesize(args: argparse.Namespace) -> int:
    from kdkit.datafree.records import RecordObjective, load_record, record_digest
    from kdkit.datafree.synthesis import optimise_inputs

    teacher, meta = _teacher(args.teacher, args.device)
    rec = load_record(args.record)
    objective = RecordObjective(teacher, rec, f"record {args.record}")
    g = _geometry(meta)
    out = _prepare(args)
    t0 = time.perf_counter()
    ts = optimise_inputs(
        objective.batch_loss, out_dir=out, num_classes=g["num_classes"],
        input_shape=g["input_shape"], mean=g["mean"], std=g["std"],
        meta={"source": "record", "record": rec.kind, "data": meta["data"],
              "record_sha256": record_digest(args.record), "teacher": rec.teacher},
        lr=args.lr, init_mean=args.init_mean, init_std=args.init_std, device=args.device,
        **_synth_common(args),
    )
    return _finish(out, len(ts.y), t0, f"synthesize ({rec.kind})")


def cmd_deepinversion(args: argparse.Namespace) -> int:
    from kdkit.datafree.deepinversion import DI_BETAS, DeepInversionObjective
    from kdkit.datafree.synthesis import optimise_inputs
    from kdkit.train.checkpoint import module_fingerprint as teacher_fingerprint

    teacher, meta = _teacher(args.teacher, args.device)
    student = _teacher(args.student, args.device)[0] if args.student else None
    weights = {"ce_weight": args.ce_weight, "bn_weight": args.bn_weight,
               "tv_weight": args.tv_weight, "l2_weight": args.l2_weight,
               "competition_weight": args.competition_weight}
    objective = DeepInversionObjective(teacher, student=student, **weights)
    g = _geometry(meta)
    out = _prepare(args)
    t0 = time.perf_counter()
    ts = optimise_inputs(
        objective, out_dir=out, num_classes=g["num_classes"], input_shape=g["input_shape"],
        mean=g["mean"], std=g["std"],
        meta={"source": "deepinversion", "weights": weights, "data": meta["data"],
              "teacher": teacher_fingerprint(teacher)},
        lr=args.lr, betas=DI_BETAS, init_mean=args.init_mean, init_std=args.init_std,
        device=args.device, **_synth_common(args),
    )
    return _finish(out, len(ts.y), t0, "deepinversion")


def cmd_dafl(args: argparse.Namespace) -> int:
    from kdkit.datafree.dafl import dafl_generator, sample_generator
    from kdkit.datafree.synthesis import save_transfer
    from kdkit.train.checkpoint import module_fingerprint as teacher_fingerprint

    teacher, meta = _teacher(args.teacher, args.device)
    g = _geometry(meta)
    out = _prepare(args)
    t0 = time.perf_counter()
    generator = dafl_generator(
        teacher, out, input_shape=g["input_shape"], seed=args.seed, latent_dim=args.latent_dim,
        width=args.width, progress=not args.no_progress, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, oh_weight=args.oh_weight,
        a_weight=args.a_weight, ie_weight=args.ie_weight,
    )
    x, y = sample_generator(generator, teacher, samples=args.samples,
                            latent_dim=args.latent_dim, seed=args.seed)
    save_transfer(out, x, y, {"source": "dafl", "data": meta["data"], "seed": args.seed,
                              "teacher": teacher_fingerprint(teacher)})
    print(f"generator: {sum(p.numel() for p in generator.parameters()):,} parameters "
          f"-> {out}/generator.safetensors")
    return _finish(out, len(y), t0, "dafl")


def cmd_noise(args: argparse.Namespace) -> int:
    from kdkit.datafree.synthesis import noise_set, save_transfer
    from kdkit.train.checkpoint import module_fingerprint as teacher_fingerprint

    teacher, meta = _teacher(args.teacher, args.device)
    g = _geometry(meta)
    out = _prepare(args)
    t0 = time.perf_counter()
    x, y = noise_set(teacher, samples=args.samples, input_shape=g["input_shape"], seed=args.seed)
    save_transfer(out, x, y, {"source": "noise", "data": meta["data"], "seed": args.seed,
                              "teacher": teacher_fingerprint(teacher)})
    return _finish(out, len(y), t0, "noise")


def plain(text: str) -> str:
    """Help text without reST/Markdown code markup: ``x`` and `x` become 'x'."""
    return re.sub(r"`{1,2}([^`]+?)`{1,2}", r"'\1'", text)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; ends each option's help with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None
                or default is False or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub: Any, add_out_flags: Any) -> None:
    """Register ``kdkit datafree ACTION`` on the main parser's subcommands."""
    from kdkit.datafree.common import DEFAULT_LR, DEFAULT_STEPS
    from kdkit.datafree.records import KINDS

    p = sub.add_parser("datafree", help="data-free KD: metadata records and transfer sets",
                       description=plain(__doc__ or ""), formatter_class=_HelpFormatter)
    dsub = p.add_subparsers(dest="datafree_cmd", metavar="ACTION", required=True)

    def action(name: str, fn: Any, help_: str, *, samples: bool = True,
               optimiser: str | None = None) -> argparse.ArgumentParser:
        """A subcommand; ``optimiser``: the source whose --batch-size/--steps/--lr it takes."""
        a = dsub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                            formatter_class=_HelpFormatter)
        a.add_argument("--teacher", required=True, help="teacher run directory or model file")
        a.add_argument("--seed", type=int, default=0, help="random seed of everything drawn")
        a.add_argument("--device", type=_device_arg, default="auto",
                       help="where the teacher runs: auto (a GPU when there is one), cpu, "
                       "cuda, cuda:N or mps; the draws are the same on every device")
        if samples:
            a.add_argument("--samples", type=int, default=10000, help="transfer set size")
        if optimiser is not None:  # a generator (DAFL) or the inputs themselves are trained
            gen = optimiser == "dafl"
            a.add_argument("--batch-size", type=int, default=256,
                           help="generator samples per training step" if gen
                           else "inputs optimised together")
            a.add_argument("--steps", type=int, default=DEFAULT_STEPS[optimiser],
                           help="generator training steps" if gen
                           else "Adam steps per batch of inputs")
            a.add_argument("--lr", type=float, default=DEFAULT_LR[optimiser],
                           help="the generator's Adam learning rate" if gen
                           else "Adam learning rate (on pixel values)")
        if optimiser in ("record", "deepinversion"):
            a.add_argument("--init-mean", type=float, default=0.15,
                           help="inputs start as N(init-mean, init-std) pixels")
            a.add_argument("--init-std", type=float, default=0.1,
                           help="see --init-mean")
        add_out_flags(a)
        a.set_defaults(fn=fn)
        return a

    a = action("record", cmd_record, "record a teacher's metadata on its training data",
               samples=False)
    a.add_argument("--data", required=True, help="the teacher's training dataset")
    a.add_argument("--data-root", default=None, help="dataset folder (default $KDKIT_DATA)")
    a.add_argument("--val-fraction", type=float, default=0.1,
                   help="held out as when the teacher was trained")
    a.add_argument("--kind", choices=KINDS, default="spectral_pairs", help="what to record")
    a.add_argument("--temperature", type=float, default=8.0,
                   help="the logits are recorded divided by it")
    a.add_argument("--fraction", type=float, default=0.1,
                   help="spectral kinds: fraction of graph Fourier coefficients kept")
    a.add_argument("--dropout", type=float, default=None,
                   help="all_layers_dropout: filter rate (default: each dropout layer's own)")
    a.add_argument("--layers", help="comma-separated module paths (default: every activation)")

    a = action("synthesize", cmd_synthesize, "reconstruct a transfer set from a record",
               optimiser="record")
    a.add_argument("--record", required=True, help="record folder from 'kdkit datafree record'")

    a = action("deepinversion", cmd_deepinversion, "DeepInversion transfer set (BN teachers)",
               optimiser="deepinversion")
    for flag, default, what in (("ce-weight", 1.0, "cross-entropy to the wanted class"),
                                ("bn-weight", 10.0, "BN statistics (0: priors only)"),
                                ("tv-weight", 1e-3, "total variation prior"),
                                ("l2-weight", 1e-4, "L2 prior"),
                                ("competition-weight", 0.0,
                                 "Adaptive DI's competition term; needs --student")):
        a.add_argument(f"--{flag}", type=float, default=default, help=f"weight of the {what}")
    a.add_argument("--student", help="student run for Adaptive DeepInversion's competition term")

    a = action("dafl", cmd_dafl, "train a DAFL generator and sample a transfer set from it",
               optimiser="dafl")
    a.add_argument("--latent-dim", type=int, default=100, help="size of the generator's input z")
    a.add_argument("--width", type=int, default=128,
                   help="generator channels (the paper uses 128)")
    for flag, default, what in (("oh-weight", 1.0, "one-hot loss"),
                                ("a-weight", 0.1, "activation loss"),
                                ("ie-weight", 5.0, "information entropy loss")):
        a.add_argument(f"--{flag}", type=float, default=default, help=f"weight of the {what}")

    action("noise", cmd_noise, "Gaussian-noise transfer set labelled by the teacher (the floor)")
