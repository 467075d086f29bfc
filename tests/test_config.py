"""Config validation: every problem at once, each with its key path and a fix."""

import pytest
import yaml

from kdkit.config import DEFAULT_CONFIG, config_from_dict, dump_config, load_config
from kdkit.errors import ConfigError


def _raw():
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def test_default_config_is_valid_and_round_trips():
    cfg = load_config()
    assert cfg.name == "digits-kd" and cfg.seeds == [0, 1, 2]
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_unknown_key_names_path_and_suggests():
    raw = _raw()
    raw["train"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key; did you mean 'epochs'"):
        config_from_dict(raw)


def test_all_problems_reported_at_once():
    raw = _raw()
    raw["train"]["epochs"] = "ten"
    raw["data"]["nmae"] = "digits"
    raw["students"][1]["method"]["temperture"] = 3
    raw["students"][0]["train"] = {"lr": -1}
    raw["student"]["name"] = "mpl"
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "x.yaml")
    msg = str(e.value)
    assert msg.startswith("invalid config x.yaml:")
    assert "train.epochs: Input should be a valid integer" in msg and "'ten'" in msg
    assert "data.nmae: unknown key" in msg
    problems = e.value.problems  # schema and registry problems, all in one report
    assert any("students[1].method: method 'kd' has no argument 'temperture'" in p
               for p in problems)
    assert any(p.startswith("students[0].train.lr: Input should be greater than 0")
               for p in problems)
    assert any("student.name: unknown model 'mpl'; did you mean 'mlp'" in p for p in problems)
    assert len(problems) == 5, problems


def test_model_argument_and_geometry_errors():
    raw = _raw()
    raw["student"] = {"name": "mlp", "hiden": [3], "num_classes": 5}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    assert "student: model 'mlp' has no argument 'hiden' (did you mean 'hidden'?)" in msg
    assert "student.num_classes: set from the dataset; remove it" in msg


def test_method_needing_teacher_and_unknown_dataset():
    raw = _raw()
    del raw["teacher"]
    raw["data"]["name"] = "mnits"
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    assert "students[1].method: 'kd' needs a teacher" in msg
    assert "data.name: unknown dataset 'mnits'; did you mean 'mnist'" in msg


def test_duplicate_labels_and_bad_augment():
    raw = _raw()
    raw["students"][1]["label"] = "scratch"
    with pytest.raises(ConfigError, match="labels must be unique"):
        config_from_dict(raw)
    raw = _raw()
    raw["train"]["augment"] = {"shfit": 2}
    with pytest.raises(ConfigError, match=r"train\.augment: .*shfit"):
        config_from_dict(raw)


def test_overrides_and_file_errors(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "students[1].method.temperature=2.5",
                             "seeds=[4]"])
    assert cfg.train.epochs == 7 and cfg.seeds == [4]
    assert cfg.students[1].method.kwargs == {"temperature": 2.5, "alpha": 0.9}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        # (torchvision/timm configs need files their header's commands write: checked in
        # the vision lane, tests/test_check.py)
        text = path.read_text()  # (a teacher from runs/: written by its header's command)
        if "torchvision:" not in text and "weights: runs/" not in text:
            load_config(path)
