"""Shared fixtures: tiny digits data and small models, so tests stay fast on 2 cores."""

from __future__ import annotations

import pytest
import torch

from kdkit.data import load_dataset


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the tests that take one (tests/test_device.py): cpu, "
                     "cuda, cuda:N, mps; scripts/gpu_check.sh runs them with cuda")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    from kdkit.train.device import resolve_device

    return resolve_device(request.config.getoption("--device"))


@pytest.fixture(autouse=True, scope="session")
def _no_onnx_columns():
    """Experiments in tests skip the ONNX export and int8 columns of their tables (about a
    second a model); the tests of those columns turn them on (tests/test_compression.py)."""
    import os

    before = os.environ.get("KDKIT_TABLE_DEPLOY")
    os.environ["KDKIT_TABLE_DEPLOY"] = "0"
    yield
    if before is None:
        os.environ.pop("KDKIT_TABLE_DEPLOY", None)
    else:
        os.environ["KDKIT_TABLE_DEPLOY"] = before


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the user's cache or data folders; one intra-op thread: tiny models gain nothing from more, and oversubscribed cores stall."""
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "kdkit-cache"))
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0)


def kill_fit_call(monkeypatch, call: int, steps: int):
    """Make the ``call``-th training run of the pipelines stop after ``steps`` steps, as if
    the process had been killed there (it checkpoints and raises TrainingInterrupted).
    Returns a function that puts the real ``fit`` back."""
    from kdkit.pipelines import runs

    real_fit, calls = runs.fit, {"n": 0}

    def dying_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            kwargs["stop_after"] = steps
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runs, "fit", dying_fit)
    return lambda: monkeypatch.setattr(runs, "fit", real_fit)
