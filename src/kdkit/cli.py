"""The ``kdkit`` command line: whole experiments, single runs, evaluation, catalogues.

Every user error is printed as one line ``kdkit: error: ...`` (exit 2); a run stopped
by Ctrl-C leaves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdkit import __version__
from kdkit._malloc import tune_allocator
from kdkit.errors import ConfigError, KdkitError

if TYPE_CHECKING:
    from kdkit.config import TrainSpec

EPILOG = """\
examples:
  kdkit run                                  the built-in default (digits, 3 seeds, < 2 min)
  kdkit run examples/mnist_hinton.yaml       Hinton's MNIST recipe
  kdkit run CONFIG --set train.epochs=5      override any key
  kdkit validate CONFIG                      list every problem in a config
  kdkit train --model resnet8 --data digits  train a teacher (or any plain model)
  kdkit distill --teacher runs/train-resnet8-digits-s0 --student mlp --method kd --data digits
  kdkit distill ... --teacher-cache          reuse teacher outputs computed once (see README)
  kdkit bench --data mnist --teacher mlp_hinton_1200 --student mlp_hinton_800
                                             time plain vs live vs cached distillation
  kdkit eval runs/digits-kd                  print an experiment's table, or evaluate a model
  kdkit models | kdkit methods | kdkit data list
"""


def _cache_dir(arg: str | None, disabled: bool) -> Path | None:
    if disabled:
        return None
    if arg:
        return Path(arg)
    return Path(os.environ.get("KDKIT_CACHE") or "~/.cache/kdkit").expanduser()


def _kv_pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    from kdkit.config import parse_key_value

    out: dict[str, Any] = {}
    for item in items or []:
        key, value = parse_key_value(item, flag)
        if key in out:
            raise ConfigError(f"{flag} {key} is given twice")
        out[key] = value
    return out


class _UsageError(Exception):
    """argparse found a bad command line; main prints it as one ``kdkit: error:`` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print the usage and exit
        raise _UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _bounded(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else "expected ``what``"."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


_positive_int = _bounded(int, "a whole number >= 1", lambda v: v >= 1)
_positive_float = _bounded(float, "a finite number > 0", lambda v: 0 < v < float("inf"))
_percent = _bounded(float, "a percentage in [0, 100]", lambda v: 0 <= v <= 100)


def _device(text: str) -> str:
    """An argparse type: a device name (auto, cpu, cuda, cuda:N, mps), lower-cased."""
    import re

    value = text.strip().lower()
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got '{text}'")
    return value


# ----------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from kdkit.config import load_config
    from kdkit.pipelines.experiment import format_table, run_experiment

    cfg = load_config(args.config, args.set)
    if args.precision:  # every run of it; part of the config (a resume must say the same)
        cfg = cfg.with_train(precision=args.precision)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    print(f"kdkit run: experiment '{cfg.name}', seeds {cfg.seeds}, output {out}", flush=True)
    result = run_experiment(
        cfg, out, resume=args.resume, force=args.force,
        cache_dir=_cache_dir(args.cache_dir, args.no_cache), progress=not args.no_progress,
        device=args.device, only=args.only, jobs=args.jobs, keep_going=args.keep_going,
    )
    if args.only:
        print(f"ran {', '.join(result['only'])} in {out}/; when every sub-run is finished, "
              f"`kdkit run {args.config or ''} --out {out} --resume` assembles the table"
              .replace("  ", " "))
        return 0
    print()
    print(format_table(result["rows"], cfg))
    print(f"wall time {result['wall_s']:.1f} s; results in {out}/ (summary.json, table.md)")
    if not args.no_report:
        _experiment_report(out)
    return 0


def _experiment_report(out: Path) -> None:
    """``kdkit report`` at the end of ``kdkit run`` (rank 0 alone; skipped, saying how to get
    it, when matplotlib is missing); its figures also go to TensorBoard when that is on."""
    from kdkit import dist

    if not dist.is_main():
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report skipped: figures need matplotlib (pip install 'kdkit[report]'; then "
              f"`kdkit report {out}`)")
        return
    from kdkit.report import write_report
    from kdkit.train import tensorboard

    report = write_report(out, log=print)
    if tensorboard.enabled():
        figures = sorted(report.parent.glob("*.png"))
        tensorboard.add_images(out, {f"report/{p.stem}": p for p in figures})


def cmd_validate(args: argparse.Namespace) -> int:
    from kdkit.config import load_config
    from kdkit.pipelines.check import dry_build

    cfg = load_config(args.config, args.set)
    problems = dry_build(cfg)  # every model and method built on the data's geometry
    if problems:
        raise ConfigError(problems, args.config or "(built-in default)")
    n_runs = len(cfg.students) + len(cfg.all_teachers())
    print(f"{args.config or 'default config'}: OK ('{cfg.name}', {n_runs} runs x "
          f"{len(cfg.seeds)} seeds on {cfg.data.name})")
    return 0


def _train_spec(args: argparse.Namespace) -> TrainSpec:
    from pydantic import ValidationError

    from kdkit.config import _pydantic_problems, teacher_cache_views_problem
    from kdkit.data.augment import build_augment

    augment = _kv_pairs(args.augment, "--augment") or None
    build_augment(augment)  # a bad value is one clear error now, not a traceback in training
    cache = _teacher_cache_flags(args)
    problem = teacher_cache_views_problem(augment, cache or {}, "this run") if cache else None
    if problem:
        raise ConfigError(f"--teacher-cache: {problem} (--cache-views K)")
    fields = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "optimizer": args.optimizer, "weight_decay": args.weight_decay,
        "schedule": args.schedule, "augment": augment,
        "teacher_cache": cache,
        "channels_last": args.channels_last,
        "device": args.device, "precision": args.precision,
        "compile": args.compile or None, "sync_bn": args.sync_bn or None,
        "global_batch_terms": args.global_batch_terms or None,
    }
    from kdkit.config import TrainSpec

    try:
        return TrainSpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(_pydantic_problems(e, TrainSpec, "train")) from None


def _single_run(args: argparse.Namespace, *, method: str, method_kwargs: dict[str, Any],
                model: str, model_kwargs: dict[str, Any], teacher: str | None) -> int:
    from kdkit import dist
    from kdkit.data import load_dataset
    from kdkit.distill.methods import check_method_kwargs
    from kdkit.models import model_problems
    from kdkit.pipelines.runs import load_teacher, prepare_run_dir, train_one
    from kdkit.train.device import check_precision, resolve_device

    problems = model_problems(model, model_kwargs, "--model-arg")
    problems += check_method_kwargs(method, method_kwargs)
    if problems:
        raise ConfigError(problems)
    train = _train_spec(args)
    resolve_device(train.device)  # an unusable device is refused before anything is made
    check_precision(train.precision, resolve_device(train.device))
    with dist.main_first():  # rank 0 fetches first (if it must), then the others read
        data = load_dataset(args.data, root=args.data_root, val_fraction=args.val_fraction,
                            train_subset=args.train_subset, seed=args.seed,
                            channels=args.channels, resize=args.resize, stream=args.stream,
                            workers=args.workers, task=args.task, noise=args.noise,
                            **_text_args(args))
    teachers = {}
    if teacher is not None:
        # The teacher's own train split is irrelevant here: only its weights are used.
        teachers = {"teacher": load_teacher(teacher, data)}
    if getattr(args, "synthetic", None):
        from kdkit.pipelines.datafree import load_synthetic

        data = load_synthetic(args.synthetic, data, teachers.get("teacher"))
    out = Path(args.out)
    with dist.main_first() as main:
        if main:
            prepare_run_dir(out, resume=args.resume, force=args.force)
    summary = train_one(
        run_dir=out, label=out.name, data=data, model_name=model, model_kwargs=model_kwargs,
        method=method, method_kwargs=method_kwargs, teachers=teachers,
        settings=train.loop_settings(args.seed), batch_size=train.batch_size,
        augment=train.augment, resume=args.resume, progress=not args.no_progress,
        extra={"teacher": teacher} if teacher else None, channels_last=train.channels_last,
        teacher_cache=train.teacher_cache.model_dump() if train.teacher_cache else None,
        cache_root=_teacher_outputs_dir(args),
    )
    from kdkit.tasks import headline

    print(f"{summary['label']}: {headline(summary)}, "
          f"{summary['params']:,} params, {summary['wall_s']:.1f} s -> {out}/model.safetensors")
    return 0


def _out_name(name: str) -> str:
    """A model or dataset name as part of a folder name: ``torchvision:resnet18`` becomes
    ``torchvision-resnet18``, ``folder:data/fmnist`` becomes ``fmnist``."""
    from kdkit.data.folder import files_label, is_files_name

    if is_files_name(name):
        name = files_label(name)
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def _disk_workers(text: str | None, data: str) -> list[int]:
    """``--disk-workers 0,1,2`` as a list, for image files only (others are in memory)."""
    if not text:
        return []
    from kdkit.data.folder import is_files_name

    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise KdkitError(f"--disk-workers {text!r}: give worker counts such as 0,1,2") from None
    if not counts or min(counts) < 0:
        raise KdkitError(f"--disk-workers {text!r}: give worker counts >= 0, such as 0,1,2")
    if not is_files_name(data):
        raise KdkitError(f"--disk-workers: '{data}' is held in memory; export it (`kdkit data "
                         f"export {data} --format imagefolder --out DIR`) and bench "
                         "--data folder:DIR")
    return counts


def cmd_train(args: argparse.Namespace) -> int:
    args.out = args.out or f"runs/train-{_out_name(args.model)}-{_out_name(args.data)}-s{args.seed}"
    from kdkit.tasks import plain_method

    return _single_run(args, method=args.method or plain_method(args.task),
                       method_kwargs=_kv_pairs(args.method_arg, "--method-arg"),
                       model=args.model, model_kwargs=_kv_pairs(args.model_arg, "--model-arg"),
                       teacher=None)


def cmd_distill(args: argparse.Namespace) -> int:
    from kdkit.distill.methods import method_needs_teacher

    if not method_needs_teacher(args.method):
        raise KdkitError(f"method '{args.method}' uses no teacher; use `kdkit train` for it")
    args.out = args.out or (f"runs/distill-{args.method}-{_out_name(args.student)}-"
                            f"{_out_name(args.data)}-s{args.seed}")
    return _single_run(args, method=args.method,
                       method_kwargs=_kv_pairs(args.method_arg, "--method-arg"),
                       model=args.student, model_kwargs=_kv_pairs(args.model_arg, "--model-arg"),
                       teacher=args.teacher)


def cmd_eval(args: argparse.Namespace) -> int:
    from kdkit.data.stream import eval_args
    from kdkit.pipelines.table import format_table, remeasure_latency
    from kdkit.train.artifacts import load_model, model_stem
    from kdkit.train.checkpoint import read_json
    from kdkit.train.compression import torch_profile
    from kdkit.train.metrics import evaluate

    path = Path(args.path)
    summary = path / "summary.json"
    if path.is_dir() and summary.exists():
        table = read_json(summary, "summary")
        if isinstance(table, dict) and "rows" in table:
            rows = table["rows"]
            if args.latency:  # latency belongs to the machine: measured here, now
                rows = remeasure_latency(rows, path, int(table["seeds"][0]),
                                         repeats=args.latency_repeats)
            print(format_table(rows))
            return 0
    model, meta = load_model(path)
    data, notes = _eval_data(args, meta["data"])
    split = getattr(data, args.split)
    if len(split) == 0:
        raise KdkitError(f"--split {args.split}: the run's {args.split} split is empty (it was "
                         "trained with val_fraction 0?); evaluate another split")
    from kdkit.train.device import resolve_device

    model.to(resolve_device(args.device))
    res = evaluate(model, *eval_args(split))
    model.cpu()  # the latencies below are CPU figures
    weights = model_stem(path).with_suffix(".safetensors")
    shape = tuple(data.input_shape)
    report: dict[str, Any] = {
        "model": meta["model"]["name"], "data": data.name, "split": args.split,
        "samples": len(split), **({"top1": round(res["acc"], 3)} if "acc" in res else {}),
        "loss": round(res["loss"], 5), "size_bytes": weights.stat().st_size,
        **({"bpc": round(res["bpc"], 5)} if "bpc" in res else {}),
        **({"psnr": round(res["psnr"], 4)} if "psnr" in res else {}),
        **torch_profile(model, shape, repeats=args.latency_repeats,
                        num_classes=data.num_classes), **notes,
    }
    if not args.no_deploy and len(shape) == 3:  # (ONNX export takes image inputs)
        from kdkit.deploy.ort import calibration_inputs, deploy_profile, split_arrays
        from kdkit.pipelines.table import deploy_available

        if deploy_available():
            import torch

            with tempfile.TemporaryDirectory() as tmp:
                prof = deploy_profile(model, shape, *split_arrays(split),
                                      calibration_inputs(data.train), Path(tmp),
                                      repeats=args.latency_repeats,
                                      threads=torch.get_num_threads())
            key = "int8_psnr" if "psnr" in res else "int8_top1"  # a dense task: PSNR
            report.update(prof, **{key: round(prof.pop("int8_acc"), 3)})
        else:
            report["deploy"] = ("onnxruntime latency and int8 accuracy need the deploy "
                                "extra: pip install 'kdkit[deploy]'")
    print(json.dumps(report, indent=2))
    return 0


def _text_eval_data(args: argparse.Namespace, trained: dict[str, Any]) -> Any:
    """A language model's own splits: the same text, window and vocabulary (the saved one),
    and for ``--split train`` the same subset of windows."""
    from kdkit.data import load_dataset
    from kdkit.data.text import Vocab

    recorded = trained.get("source")
    source: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    vocab = trained.get("vocab")
    if not isinstance(vocab, dict):
        raise KdkitError("this language model's model.json records no vocabulary; retrain it")
    data = load_dataset(trained["name"], root=args.data_root or source.get("root"),
                        context=int(trained["input_shape"][0]), vocab=Vocab.from_dict(vocab),
                        seed=int(source.get("seed", 0)), train_subset=source.get("train_subset"))
    if source.get("sha256") and data.source.get("sha256") != source.get("sha256"):
        raise KdkitError(f"the text of {trained['name']} differs from the one the model was "
                         "trained on (content hash); point --data-root at the original")
    return data


def _text_args(args: argparse.Namespace) -> dict[str, Any]:
    """--context / --vocab for a text dataset (refused for images)."""
    from kdkit.data.text import is_text_name

    given = {k: v for k, v in (("context", args.context), ("vocab", args.vocab)) if v is not None}
    if not is_text_name(args.data):
        if given:
            raise KdkitError(f"--{next(iter(given))}: '{args.data}' holds images; --context and "
                             "--vocab belong to text datasets (shakespeare, text:PATH)")
        return {}
    return {"context": given.get("context", 128), "vocab": given.get("vocab", "char")}


def _task_of(source: dict[str, Any]) -> dict[str, Any]:
    """The dense task a model's data recorded (its noise too), to rebuild the same pairs."""
    if source.get("task") != "denoise":
        return {}
    return {"task": "denoise", "noise": source.get("noise")}


def _valid_source(source: Any) -> bool:
    """A split definition as load_dataset records it (anything else counts as absent)."""
    if not isinstance(source, dict):
        return False
    seed, frac, subset = source.get("seed"), source.get("val_fraction"), source.get("train_subset")
    return ("train_subset" in source and isinstance(seed, int) and not isinstance(seed, bool)
            and isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 <= frac < 1
            and (subset is None or (isinstance(subset, int) and not isinstance(subset, bool)
                                    and subset > 0))
            and isinstance(source.get("sha256"), str)
            and isinstance(source.get("root", ""), (str, type(None))))


def _eval_data(args: argparse.Namespace, trained: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The data to evaluate on: the run's own splits, rebuilt exactly, or ``--data``'s test set.

    The val and train splits depend on the run's seed, val_fraction and train_subset (and
    the data's content): they are rebuilt from what ``model.json`` recorded, or refused.
    """
    from dataclasses import replace

    from kdkit.data import ArrayDataset, load_dataset
    from kdkit.data.text import is_text_name

    if is_text_name(trained["name"]) and (args.data is None or args.data == trained["name"]):
        return _text_eval_data(args, trained), {}
    recorded: Any = trained.get("source")
    source: dict[str, Any] = dict(recorded) if _valid_source(recorded) else {}
    own = args.data is None or args.data == trained["name"]
    name = trained["name"] if args.data is None else args.data
    if args.split == "train" and own and source.get("train") == "transfer set":
        raise KdkitError("--split train: this model was trained on a synthetic transfer set, "
                         "not on the dataset's train split; use --split val or test")
    if args.split != "test" and not (own and source):
        why = ("another dataset's" if not own else
               "this model's (its model.json does not record how its splits were made: "
               "it was saved by an older kdkit)")
        raise KdkitError(f"--split {args.split}: cannot rebuild {why} {args.split} split; "
                         "use --split test")
    if own and source:
        root = args.data_root or source.get("root")
        data = load_dataset(name, root=root, val_fraction=source["val_fraction"],
                            train_subset=source["train_subset"], seed=source["seed"],
                            channels=source.get("channels"), resize=source.get("resize"),
                            stream=bool(source.get("stream", False)), **_task_of(source))
        if data.source.get("sha256") != source.get("sha256"):
            problem = (f"the {name} files under {root} differ from those the model was "
                       "trained on (content hash)")
            if args.split != "test":
                raise KdkitError(f"--split {args.split}: {problem}, so its {args.split} split "
                                 "cannot be rebuilt; point --data-root at the original files")
            print(f"kdkit: warning: {problem}; evaluating on these files' test set",
                  file=sys.stderr)
    else:  # (a dense task's model is scored on the same task: noise as recorded)
        data = load_dataset(name, root=args.data_root, seed=0,
                            **_task_of(recorded if isinstance(recorded, dict) else {}))
    if list(data.input_shape) != trained["input_shape"]:
        raise KdkitError(f"the model takes inputs {trained['input_shape']}, but '{name}' has "
                         f"{list(data.input_shape)}; evaluate it on data of its own geometry")
    if data.num_classes != trained["num_classes"]:
        raise KdkitError(f"the model predicts {trained['num_classes']} classes, but '{name}' "
                         f"has {data.num_classes}; its accuracy there would mean nothing")
    notes: dict[str, Any] = {}
    if (data.mean, data.std) != (trained["mean"], trained["std"]):
        # Undo this dataset's normalisation and apply the one the model was trained with.
        a = data.std / trained["std"]
        b = (data.mean - trained["mean"]) / trained["std"]
        split = getattr(data, args.split)
        fields: dict[str, Any] = {args.split: ArrayDataset(split.x * a + b, split.y, split.name)}
        data = replace(data, **fields)
        notes["renormalised"] = {"from": [data.mean, data.std],
                                 "to": [trained["mean"], trained["std"]]}
    return data, notes


def cmd_models(args: argparse.Namespace) -> int:
    from kdkit.models import MODELS, create_model

    if args.layers:
        import torch

        try:
            dims = [int(v) for v in args.input.split(",")]
            if len(dims) not in (1, 3):
                raise ValueError
        except ValueError:
            raise ConfigError(f"--input expects C,H,W (e.g. 1,28,28) or L, a context of L "
                              f"tokens for a language model, got '{args.input}'") from None
        from kdkit.distill.features import stage_points

        if len(dims) == 1:  # token ids (1, L) for a language model
            model = create_model(args.layers, input_size=dims[0])
            x = torch.zeros(1, dims[0], dtype=torch.long)
        else:
            c, h = dims[0], dims[1]
            model = create_model(args.layers, in_channels=c, input_size=h)
            x = torch.zeros(1, c, h, h)
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [m.register_forward_hook(  # a tuple output: its first tensor, as taps read it
            lambda mod, a, o, n=n: shapes.__setitem__(n, tuple(o.shape))
            if isinstance(o, torch.Tensor) else shapes.__setitem__(n, tuple(o[0].shape))
            if isinstance(o, tuple) and o and isinstance(o[0], torch.Tensor) else None)
            for n, m in model.named_modules() if n]
        model.eval()
        with torch.no_grad():
            try:
                model(x)
            except (RuntimeError, TypeError, IndexError, ValueError) as e:
                if len(dims) != 1:
                    raise
                raise KdkitError(f"model '{args.layers}' does not take token ids (1, {dims[0]}) "
                                 f"({type(e).__name__}: {str(e)[:100]}); for an image model "
                                 "give --input C,H,W") from None
        for hk in hooks:
            hk.remove()
        for n, m in model.named_modules():
            if n:
                print(f"{n:<28} {type(m).__name__:<18} {shapes.get(n, '')}")
        # what feature methods will read, found without names (or why they cannot)
        try:
            found = [str(p.tap) for p in stage_points(model, x, "output")]
            print(f"\nstage ends (feature methods): {', '.join(found)}")
        except KdkitError as e:
            print(f"\nstage ends: not found ({e})")
        try:
            pre = [str(p.tap) for p in stage_points(model, x, "preact")]
            print(f"pre-activations (overhaul, AB): {', '.join(pre)}")
        except KdkitError as e:
            print(f"pre-activations (overhaul, AB): none ({e})")
        return 0
    for name in MODELS.names():
        print(f"{name:<18} {MODELS.summary(name)}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from kdkit.distill.methods import METHODS, method_arguments, method_teachers

    for name in METHODS.names():
        kw = ", ".join(f"{k}={v}" for k, v in method_arguments(name).items())
        who = {"none": "no teacher", "one": "one teacher", "many": "one or more teachers"}[method_teachers(name)]
        print(f"{name:<20} {METHODS.summary(name)}\n{'':<20} [{who}] args: {kw or '-'}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from kdkit.data import DATASETS, default_root

    if args.data_cmd == "list":
        for name in DATASETS.names():
            print(f"{name:<14} {DATASETS.summary(name)}")
        return 0
    root = Path(args.root) if args.root else default_root()
    if args.data_cmd == "export":
        import time

        from kdkit.data import load_raw
        from kdkit.data.folder import export_image_folder

        start = time.monotonic()
        raw = load_raw(args.name, root=root)
        n = export_image_folder(raw, Path(args.out), listing=args.listing, log=print)
        also = f" or csv:{Path(args.out) / 'listing.csv'}" if args.listing else ""
        print(f"{args.name}: {n:,} images ({len(raw.y_train):,} train, {len(raw.y_test):,} "
              f"test, {raw.num_classes} classes) in {args.out}/ in "
              f"{time.monotonic() - start:.1f} s; train on it with --data folder:{args.out}{also}")
        return 0
    from kdkit.data.fetch import fetch

    folder = fetch(args.name, root)
    print(f"{args.name}: verified files in {folder}")
    return 0


def _teacher_cache_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--teacher-cache`` and its options as a ``train.teacher_cache`` section (or None)."""
    if not getattr(args, "teacher_cache", False):
        return None
    spec: dict[str, Any] = {"dtype": args.cache_dtype}
    if args.cache_views is not None:
        spec["views"] = args.cache_views
    if args.cache_topk is not None:
        spec["topk"] = args.cache_topk
    return spec


def _teacher_outputs_dir(args: argparse.Namespace) -> Path | None:
    if not getattr(args, "teacher_cache", False):
        return None
    root = _cache_dir(getattr(args, "cache_dir", None), False)
    return root / "teacher-outputs" if root else None


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from kdkit.pipelines.bench import BenchSpec, format_bench, run_bench
    from kdkit.train.device import PRECISIONS

    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        raise KdkitError("kdkit bench starts the processes of its rows itself; run it in one "
                         "process and add DDP rows with --ddp N")
    precisions: list[str] = []
    for item in args.precision or ["fp32"]:  # repeatable, each a comma list
        for name in (p.strip().lower() for p in item.split(",")):
            if name not in PRECISIONS:
                raise KdkitError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
            if name not in precisions:
                precisions.append(name)
    spec = BenchSpec(
        data=args.data, data_root=args.data_root, train_subset=args.train_subset,
        val_fraction=args.val_fraction, teacher=args.teacher,
        teacher_kwargs=_kv_pairs(args.teacher_arg, "--teacher-arg"), student=args.student,
        student_kwargs=_kv_pairs(args.student_arg, "--student-arg"),
        feature_method=args.feature_method,
        feature_kwargs=_kv_pairs(args.feature_arg, "--feature-arg"), epochs=args.epochs,
        teacher_epochs=args.teacher_epochs, teacher_run=args.teacher_run,
        batch_size=args.batch_size, lr=args.lr,
        augment=_kv_pairs(args.augment, "--augment") or None, views=args.views,
        dtype=args.cache_dtype, target=args.target, compile=args.compile,
        channels_last=args.channels_last, threads=torch.get_num_threads(), seed=args.seed,
        repeats=args.repeats, device=args.device, precisions=precisions, ddp=args.ddp or 1,
        disk_workers=_disk_workers(args.disk_workers, args.data),
    )
    out = Path(args.out or f"runs/bench-{args.data}-{args.student}")
    report = run_bench(spec, out)
    print()
    print(format_bench(report))
    print(f"-> {out}/bench.json, {out}/bench.md")
    return 0


def _add_teacher_cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-cache", action="store_true",
                   help="compute the teacher's outputs once per (sample, view) and reuse them")
    p.add_argument("--cache-views", type=_positive_int, default=None, metavar="K",
                   help="augmented views kept per sample (1 without --augment; required with "
                   "--augment, since the student then sees only these K views)")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="storage precision of the cached outputs (default: %(default)s)")
    p.add_argument("--cache-topk", type=_positive_int, metavar="K",
                   help="keep only the top-K logits (default: all)")
    p.add_argument("--cache-dir", help="where caches live (default $KDKIT_CACHE or ~/.cache/kdkit)")


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure plain vs distilled training speed (live teacher, cache)",
        description="Times plain student training, KD with a live teacher and with the "
        "teacher-output cache, a feature method live and cached, one teacher forward, and "
        "the floor: a hand-written PyTorch loop on the same job (with and without the "
        "teacher), per device and precision; writes bench.json and bench.md. Run it on a "
        "quiet machine.")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help="class-balanced subset of the train split (default: all)")
    p.add_argument("--teacher", required=True, help="teacher model (trained first, untimed)")
    p.add_argument("--teacher-arg", action="append", metavar="K=V")
    p.add_argument("--teacher-run", help="use this trained teacher instead of training one")
    p.add_argument("--teacher-epochs", type=_positive_int, default=5,
                   help="epochs of the untimed teacher (default: %(default)s)")
    p.add_argument("--student", required=True)
    p.add_argument("--student-arg", action="append", metavar="K=V")
    p.add_argument("--feature-method", default=None,
                   help="the feature method timed (default: overhaul, or one that fits the "
                   "models when overhaul does not)")
    p.add_argument("--feature-arg", action="append", metavar="K=V")
    p.add_argument("--epochs", type=_positive_int, default=3,
                   help="timed epochs per row (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=1,
                   help="run the rows round-robin this often; each keeps its fastest repeat")
    p.add_argument("--batch-size", type=_positive_int, default=128,
                   help="default: %(default)s")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="default: %(default)s")
    p.add_argument("--augment", action="append", metavar="K=V")
    p.add_argument("--views", type=_positive_int, default=1,
                   help="views per sample (view mode; default: %(default)s)")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--target", type=_percent,
                   help="val accuracy (%%) for 'epochs to target' (default: none)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row")
    p.add_argument("--channels-last", action="store_true", help="add a channels-last row")
    p.add_argument("--disk-workers", metavar="N[,N...]",
                   help="add plain rows that stream --data (folder:PATH or csv:PATH) from disk "
                   "with N DataLoader workers each, e.g. 0,1,2")
    p.add_argument("--device", default="auto",
                   help="where every row runs: auto (a GPU if any), cpu, cuda, cuda:N, mps "
                   "(default: %(default)s)")
    p.add_argument("--precision", action="append", metavar="P[,P...]",
                   help="fp32, bf16 or fp16 (autocast); repeatable or a comma list, e.g. "
                   "fp32,bf16: every row is made for each (default: fp32)")
    p.add_argument("--ddp", type=_bounded(int, "a whole number >= 2", lambda v: v >= 2),
                   metavar="N", help="add the plain and live-KD rows under N processes (DDP "
                   "via torchrun; gloo on CPUs, each process with --threads threads) and "
                   "their scaling efficiency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/bench-DATA-STUDENT)")
    p.set_defaults(fn=cmd_bench)


# ----------------------------------------------------------------------------- parser


def _add_run_flags(p: argparse.ArgumentParser, *, default_method: str | None) -> None:
    from kdkit.config import TrainSpec

    d = {k: f.default for k, f in TrainSpec.model_fields.items()}
    p.add_argument("--data", default="digits",
                   help="dataset name (see `kdkit data list`; default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: $KDKIT_DATA, else ~/.cache/kdkit/data)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the train split held out for validation (default: "
                   "%(default)s)")
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help="class-balanced subset size (default: the whole train split)")
    p.add_argument("--channels", type=_positive_int, default=None,
                   help="repeat grey images into N channels (3 for ImageNet models), or 1 to "
                   "turn colour into grey (default: as stored)")
    p.add_argument("--resize", type=_positive_int, default=None, metavar="SIZE",
                   help="resize images to SIZE x SIZE (default: as stored)")
    p.add_argument("--stream", action="store_true",
                   help="read a folder:/csv: dataset from disk batch by batch instead of "
                   "decoding it into memory first")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes decoding streamed images (default: 0)")
    p.add_argument("--context", type=_positive_int, default=None, metavar="L",
                   help="text datasets: tokens per window, the models' context (default 128)")
    p.add_argument("--vocab", choices=["char", "byte"], default=None,
                   help="text datasets: characters of the corpus (default) or bytes")
    p.add_argument("--task", choices=["classify", "language_model", "denoise"], default=None,
                   help="what the data is for (default: what it holds); denoise: noisy "
                   "images in, clean images out, scored by PSNR")
    p.add_argument("--noise", type=float, default=None, metavar="SIGMA",
                   help="--task denoise: σ of the Gaussian noise on [0, 1] pixels (default 0.3)")
    p.add_argument("--model-arg", action="append", metavar="K=V", help="model argument")
    if default_method is not None:
        p.add_argument("--method", default=default_method,
                       help="method (see `kdkit methods`; default: %(default)s)")
    p.add_argument("--method-arg", action="append", metavar="K=V", help="method argument")
    p.add_argument("--epochs", type=_positive_int, help=f"default: {d['epochs']}")
    p.add_argument("--batch-size", type=_positive_int, help=f"default: {d['batch_size']}")
    p.add_argument("--lr", type=float, help=f"learning rate (default: {d['lr']})")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                   help=f"default: {d['optimizer']}")
    p.add_argument("--weight-decay", type=float, help=f"default: {d['weight_decay']}")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"],
                   help=f"learning-rate schedule (default: {d['schedule']})")
    p.add_argument("--augment", action="append", metavar="K=V",
                   help="e.g. shift=2, hflip=true (default: none)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for the student, adapters and teachers (faster "
                   "convolutions; default: on)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    _add_device_flag(p)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="forward passes under autocast; losses stay float32 (default: "
                   f"{d['precision']}; bf16 works on CPUs too)")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teachers")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics of the global batch")
    p.add_argument("--global-batch-terms", action="store_true",
                   help="under torchrun: terms relating samples (RKD, SP, PKT, triplets) see "
                   "the global batch, not each rank's shard")
    _add_out_flags(p)


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device,
                   help="auto, cpu, cuda, cuda:N or mps (default: the config's, else auto: a "
                   "GPU when there is one); under torchrun each rank takes cuda:LOCAL_RANK")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")


def _add_out_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log every term, the learning rate and validation metrics (and "
                   "figures) as TensorBoard events in each run's tensorboard/ folder (needs "
                   "pip install 'kdkit[tensorboard]')")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="kdkit", description="Knowledge distillation: train small students from teachers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"kdkit {__version__}")
    ap.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                    help="run the command in N processes on this machine (torchrun, DDP: gloo "
                    "on CPUs, NCCL on GPUs); across machines launch `torchrun ... -m kdkit`")
    ap.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help="CPU threads for torch (default: $KDKIT_THREADS, else torch's default, "
                    "one per core). Idle threads sleep rather than spin (OMP_WAIT_POLICY="
                    "PASSIVE unless set), so other jobs on the machine do not stall them")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("run", help="run a whole experiment (default: built-in digits KD)",
                       description="Teacher -> scratch baseline -> distilled students -> table, "
                       "over several seeds. With no CONFIG, runs the built-in default.")
    _add_config_args(p)
    p.add_argument("--cache-dir", help="teacher cache (default $KDKIT_CACHE or ~/.cache/kdkit)")
    p.add_argument("--no-cache", action="store_true", help="always retrain teachers")
    _add_device_flag(p)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="every run's precision (sets train.precision in every training "
                   "section; default: the config's, fp32)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="run up to N ready sub-runs at once, each a process with a fair share "
                   "of the threads (or its own GPU); the table is the same (default: 1)")
    p.add_argument("--keep-going", action="store_true",
                   help="when a sub-run fails, run every other one that does not need it "
                   "(each in its own process), then name every failure; fix and --resume")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the report with figures at the end (`kdkit report` "
                   "writes it later)")
    p.add_argument("--only", action="append", metavar="[seedK/]LABEL",
                   help="run just this sub-run (repeatable; its teachers must be finished), "
                   "e.g. from a SLURM array; `--resume` afterwards assembles the table")
    _add_out_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="check a config and list every problem",
                       description="Checks a config's keys and values, and builds every model "
                       "and method on the data's geometry (nothing is trained or loaded).")
    _add_config_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("train", help="train one plain model (e.g. a teacher) with cross-entropy")
    p.add_argument("--model", required=True, help="registered model (see `kdkit models`)")
    _add_run_flags(p, default_method=None)
    p.add_argument("--method", default=None,
                   help="method (see `kdkit methods`; default: ce, or mse for --task denoise)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("distill", help="distil one student from a trained teacher")
    p.add_argument("--teacher", required=True, help="teacher run directory or model.safetensors")
    p.add_argument("--student", required=True, help="registered student model")
    p.add_argument("--synthetic", metavar="SET",
                   help="train on this transfer set (from `kdkit datafree`) instead of --data's "
                   "train split; --data still gives the test set")
    _add_run_flags(p, default_method="kd")
    _add_teacher_cache_flags(p)
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("eval", help="evaluate a run, a model file, or print an experiment table")
    p.add_argument("path", help="experiment dir, run dir, or model.safetensors")
    p.add_argument("--data", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the one the model was trained from)")
    _add_device_flag(p)
    p.add_argument("--split", choices=["test", "val", "train"], default="test",
                   help="which split (default: %(default)s); val and train are the run's own, "
                   "rebuilt from its seed, val_fraction and train_subset")
    p.add_argument("--latency", action="store_true",
                   help="for an experiment's table: re-measure every model's latency on this "
                   "machine (a table's latencies are those of the machine that ran it)")
    p.add_argument("--latency-repeats", type=_positive_int, default=50, metavar="N",
                   help="timed forward passes per latency figure, median taken (default 50)")
    p.add_argument("--no-deploy", action="store_true",
                   help="skip the ONNX export, int8 quantization and onnxruntime latency")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("--layers", metavar="NAME", help="print NAME's module paths and shapes")
    p.add_argument("--input", default="1,28,28",
                   help="C,H,W for --layers, or L: L tokens for a language model "
                        "(default 1,28,28)")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("methods", help="list distillation methods and their arguments")
    p.set_defaults(fn=cmd_methods)

    from kdkit.cli_datafree import add_parser as add_datafree_parser

    add_datafree_parser(sub, _add_out_flags)

    from kdkit.cli_deploy import add_parser as add_deploy_parser

    add_deploy_parser(sub)  # kdkit export (onnx, int8); needs the deploy extra

    from kdkit.cli_report import add_parser as add_report_parser

    add_report_parser(sub)
    from kdkit.cli_lm import add_parser as add_generate_parser

    add_generate_parser(sub, _positive_int, _add_device_flag)

    p = sub.add_parser("data", help="datasets: list, fetch, export")
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    dl = dsub.add_parser("list", help="list registered datasets")
    dl.set_defaults(fn=cmd_data)
    df = dsub.add_parser("fetch", help="download and verify a dataset (mnist, fashion_mnist, "
                         "shakespeare)")
    df.add_argument("name", choices=["mnist", "fashion_mnist", "shakespeare"])
    df.add_argument("--root", help="data folder (default $KDKIT_DATA or ~/.cache/kdkit/data)")
    df.set_defaults(fn=cmd_data)
    de = dsub.add_parser("export", help="write a dataset as image files (train/<class>/N.png)",
                         description="Writes a dataset's integer pixels as PNG files, "
                         "OUT/{train,test}/<class>/<index>.png (grey: mode L, colour: RGB; "
                         "digits' 0..16 scaled to 0..255), for `--data folder:OUT`; "
                         "--listing also writes OUT/listing.csv (path,label,split), for "
                         "`--data csv:OUT/listing.csv`.")
    de.add_argument("name", help="registered dataset (see `kdkit data list`), folder:PATH or "
                    "csv:PATH")
    de.add_argument("--listing", action="store_true",
                    help="also write OUT/listing.csv (path,label,split)")
    de.add_argument("--format", choices=["imagefolder"], required=True,
                    help="imagefolder: one folder per class, as torchvision's ImageFolder")
    de.add_argument("--out", required=True, help="new (or empty) folder to write")
    de.add_argument("--root", help="data folder (default $KDKIT_DATA or ~/.cache/kdkit/data)")
    de.set_defaults(fn=cmd_data)
    _add_bench_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while they wait for work collapse as soon as another job uses
    # a core (a 2-core machine ran the default experiment 20x slower); sleeping threads do
    # not. libgomp reads this when torch loads, so it is set before anything imports torch
    # (kdkit.cli itself does not). An explicit OMP_WAIT_POLICY is respected.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # glibc's default thresholds hand freed activations back to the OS and fault them in
    # again every step (1.25 M minor faults, 91 ms/step on a CNN; 9.4 k and 55 ms tuned):
    # see kdkit/_malloc.py and docs/RESULTS.md#allocator. KDKIT_MALLOC=default turns it off.
    tune_allocator()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from kdkit.launch import launch

        return launch(args.nproc, _without_nproc(argv))
    env_threads = os.environ.get("KDKIT_THREADS", "")
    threads = args.threads
    if threads is None and env_threads.strip():
        try:
            threads = _positive_int(env_threads)
        except argparse.ArgumentTypeError as e:
            print(f"kdkit: error: KDKIT_THREADS: {e}", file=sys.stderr)
            return 2
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["KDKIT_THREADS"] = str(threads)  # what `run --jobs` gives each sub-run
    code = _run_command(args)
    if _LEFT_PROCESS_GROUP:
        # gloo's threads can abort the process while the interpreter shuts down ("terminate
        # called without an active exception", about one run in 15): a process that was
        # part of a torchrun job leaves at once, its output flushed, with its own status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


_LEFT_PROCESS_GROUP = False


def _ddp_commands() -> set[Callable[[argparse.Namespace], int]]:
    return {cmd_run, cmd_train, cmd_distill}


def _left_process_group() -> None:
    global _LEFT_PROCESS_GROUP
    _LEFT_PROCESS_GROUP = True


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` (what each process of the launch runs)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; every failure is one line (naming the rank under torchrun)."""
    from kdkit.train.loop import TrainingInterrupted

    where, ok = "", False
    try:
        if "WORLD_SIZE" in os.environ:
            from kdkit import dist

            if dist.init_from_env():
                where = f" (rank {dist.rank()} of {dist.world_size()})"
                dist_rank = dist.rank()
                if not dist.is_main():  # one copy of the output: rank 0's
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
                    args.no_progress = True
                if args.fn not in _ddp_commands():  # nothing to share: rank 0 does it alone
                    where = ""  # (and leaves without waiting for the others, who are done)
                    dist.shutdown(graceful=False)
                    _left_process_group()
                    return int(args.fn(args)) if dist_rank == 0 else 0
        if getattr(args, "tensorboard", False):
            from kdkit.train import tensorboard

            tensorboard.enable()
        code = int(args.fn(args))
        ok = True
        return code
    except TrainingInterrupted as e:
        print(f"kdkit: {e}", file=sys.stderr)
        return 130
    except KdkitError as e:
        _error_line(f"kdkit: error{where}: {e}")
        return 2
    except OSError as e:  # the file system said no (permissions, disk full, ...)
        where_file = f" ({e.filename})" if e.filename else ""
        _error_line(f"kdkit: error{where}: {e.strerror or e}{where_file}")
        return 2
    except KeyboardInterrupt:
        print("kdkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if where and type(e).__module__.startswith("torch.distributed"):
            _error_line(f"kdkit: error{where}: lost contact with the other processes (one of "
                        "them failed or stopped): "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
            return 1
        raise
    finally:
        if where:
            from kdkit import dist

            dist.shutdown(graceful=ok)
            _left_process_group()


def _error_line(line: str) -> None:
    """Write one whole line to stderr in a single write: the ranks of a torchrun job share
    the stream, and a line written in pieces can interleave with another rank's."""
    sys.stderr.flush()
    data = (line + "\n").encode(errors="replace")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests)
        sys.stderr.write(line + "\n")
        return
    while data:
        data = data[os.write(fd, data):]


if __name__ == "__main__":
    sys.exit(main())
