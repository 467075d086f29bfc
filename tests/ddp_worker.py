"""One training run from a JSON spec, as a process of its own: launched by the DDP tests
under torchrun (``python -m torch.distributed.run --standalone --nproc-per-node 2``), or as
a plain single process for the reference. Writes the student's final weights (rank 0).

    python tests/ddp_worker.py SPEC_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdkit import dist
from kdkit.data import load_dataset
from kdkit.data.augment import build_augment
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, build_stages
from kdkit.models import create_model
from kdkit.train.loop import LoopSettings, TrainingInterrupted, fit


def _model(spec: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if spec["kind"] == "mlp":
        return create_model("mlp", hidden=spec.get("hidden", [32]), input_size=8, dropout=0.0)
    return create_model("resnet", depth=8, width=spec.get("width", 4), in_channels=1,
                        input_size=8)


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_from_env()
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    if spec.get("crash_rank") is not None and dist.rank() == spec["crash_rank"]:
        import kdkit.train.loop as loop

        real = loop.derive_seed
        calls = {"n": 0}

        def crashing(*ints: int) -> int:
            calls["n"] += 1
            if calls["n"] > spec.get("crash_after", 3):
                raise RuntimeError("injected failure on this rank")
            return real(*ints)

        loop.derive_seed = crashing  # type: ignore[assignment]
    teacher = _model({**spec, "hidden": [64]} if spec["kind"] == "mlp" else spec, 123)
    student = _model(spec, 7)
    method_kwargs = spec.get("method_kwargs", {})
    teachers = {} if spec["method"] == "ce" else {"teacher": teacher}
    stages = build_stages(spec["method"], student, teachers, example_input=data.train.x[:2],
                          **method_kwargs)
    aug = build_augment(spec.get("augment"), fill=data.black)
    loader = BatchLoader(data.train, spec["batch"], shuffle=True, seed=3, augment=aug)
    settings = LoopSettings(epochs=spec.get("epochs", 2), lr=spec.get("lr", 0.1), seed=5,
                            sync_bn=spec.get("sync_bn", False),
                            global_batch_terms=spec.get("global_batch_terms", False),
                            device="cpu")
    run_dir = spec.get("run_dir")
    try:
        for k, stage in enumerate(stages):  # staged methods (FitNets): one fit per stage
            d = Distiller(student, teachers, stage.terms)
            folder = None if run_dir is None else Path(run_dir) / f"stage{k}"
            res = fit(d, loader, settings, val=(data.val.x, data.val.y), progress=False,
                      run_dir=folder, resume=spec.get("resume", False),
                      stop_after=spec.get("stop_after"))
    except TrainingInterrupted:
        return 3
    if dist.is_main():
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        save_file(state, spec["out"])
        with open(spec["out"] + ".json", "w") as f:
            json.dump({"history": res.history, "world": dist.world_size(),
                       "pid": os.getpid()}, f)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    # as kdkit's command line does: leave at once (gloo's threads can abort the interpreter's
    # shutdown), output flushed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
