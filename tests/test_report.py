"""kdkit report: every figure drawn from a small real experiment is a real image with data
in it; report.md links them all and report.html embeds them with nothing external."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from kdkit.cli import main  # noqa: E402
from kdkit.config import config_from_dict  # noqa: E402
from kdkit.errors import KdkitError  # noqa: E402
from kdkit.pipelines.experiment import run_experiment  # noqa: E402
from kdkit.report import write_report  # noqa: E402
from kdkit.report.figures import pareto_front  # noqa: E402
from kdkit.report.report import figure_files, table  # noqa: E402

KD = {"name": "kd", "temperature": 4.0, "alpha": 0.9}
CONFIG = {
    "name": "tiny-report", "seeds": [0, 1],
    "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 200},
    "teacher": {"model": {"name": "mlp", "hidden": [64]},
                "train": {"epochs": 3, "batch_size": 64, "lr": 0.05}},
    "student": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.05},
    "students": [
        {"label": "scratch", "method": {"name": "ce"}},
        {"label": "kd", "method": KD},
        {"label": "ctkd", "method": {"name": "ctkd", "curriculum_epochs": 1,
                                     "warmup_epochs": 1.0}},
        {"label": "takd", "method": KD, "via": [{"name": "mlp", "hidden": [32]}]},
        {"label": "noise", "method": KD, "transfer": {"source": "noise", "samples": 120}},
        {"label": "dafl", "method": {**KD, "temperature": 1.0},
         "transfer": {"source": "dafl", "samples": 64, "steps": 4, "batch_size": 32,
                      "width": 8}},
    ],
}
try:  # no ONNX export in the table (slow; the deploy extra has its own tests)
    from kdkit.config import EvalSpec

    if "deploy" in EvalSpec.model_fields:
        CONFIG["eval"] = {"deploy": False, "latency_repeats": 5}
except ImportError:
    pass
FIGURES = {"learning_curves", "loss_terms", "acc_vs_latency", "acc_vs_size", "temperature",
           "chain_paths", "datafree_noise", "datafree_dafl"}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A real experiment (2 seeds, teacher, scratch, KD, CTKD, a TA chain, two data-free
    students) and its report, made once for the module."""
    out = tmp_path_factory.mktemp("report") / "exp"
    cfg = config_from_dict(CONFIG)
    run_experiment(cfg, out, cache_dir=tmp_path_factory.mktemp("cache"), progress=False,
                   log=lambda s: None)
    logs: list[str] = []
    md = write_report(out, log=logs.append)
    return out, md, logs


def _png_has_data(path: Path) -> None:
    img = Image.open(path)
    img.verify()  # a valid PNG ...
    img = Image.open(path).convert("RGB")
    w, h = img.size
    assert 300 <= w <= 4000 and 200 <= h <= 5000, (path.name, img.size)
    a = np.asarray(img).reshape(-1, 3)
    background = np.array([255, 255, 255])
    drawn = np.any(a != background, axis=1).mean()
    assert drawn > 0.03, f"{path.name}: only {drawn:.1%} of the pixels are drawn"
    colours = len(np.unique(a[:: max(1, len(a) // 50000)], axis=0))
    assert colours >= 8, f"{path.name}: {colours} colours: a blank or flat canvas"


def _svg_has_data(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    paths = [e for e in root.iter() if e.tag.endswith("path") and e.get("d")]
    images = [e for e in root.iter() if e.tag.endswith("image")]
    assert len(paths) + len(images) > 10, f"{path.name}: nothing drawn"


def test_every_figure_is_drawn_with_data(experiment):
    out, md, logs = experiment
    assert md == out / "report" / "report.md"
    stems = {p.stem for p in (out / "report").glob("*.png")}
    assert stems == FIGURES
    for stem in FIGURES:
        _png_has_data(out / "report" / f"{stem}.png")
        _svg_has_data(out / "report" / f"{stem}.svg")
    assert logs and "8 figures" in logs[-1]


def test_report_md_links_every_figure_and_the_table(experiment):
    out, md, _ = experiment
    text = md.read_text()
    linked = figure_files(md)
    assert {p.name for p in linked} == {f"{s}.{e}" for s in FIGURES for e in ("png", "svg")}
    assert all(p.exists() for p in linked)
    rows = json.loads((out / "summary.json").read_text())["rows"]
    for r in rows:
        assert f"| {r['label']} | " in text
    assert "Pareto front" in text and "takd" in text


def test_report_html_is_self_contained(experiment):
    out, _, _ = experiment
    page = (out / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert "<script" not in page and "http" not in page and "<link" not in page
    assert "<table>" in page and "Pareto" in page


def test_single_run_and_transfer_set_reports(experiment, tmp_path):
    out, _, _ = experiment
    md = write_report(out / "seed0" / "ctkd", out_dir=tmp_path / "one", log=lambda s: None)
    assert {p.stem for p in figure_files(md)} == {"learning_curves", "loss_terms",
                                                  "temperature"}
    md = write_report(out / "seed0" / "noise" / "transfer", out_dir=tmp_path / "set",
                      log=lambda s: None)
    assert [p.name for p in figure_files(md)] == ["transfer_set.png", "transfer_set.svg"]
    _png_has_data(tmp_path / "set" / "transfer_set.png")


def test_cli_report_and_its_errors(experiment, tmp_path, capsys):
    out, _, _ = experiment
    assert main(["--threads", "1", "report", str(out / "seed1" / "kd"),
                 "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").exists()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory to report on" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.json" in err and "metrics.jsonl" in err


def test_missing_matplotlib_is_one_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(KdkitError, match=r"pip install 'kdkit\[report\]'"):
        write_report(tmp_path)


def test_pareto_front_on_hand_made_points():
    # (cost, accuracy): lower cost and higher accuracy are better
    pts = [(1.0, 80.0), (2.0, 85.0), (1.5, 79.0), (3.0, 85.0), (4.0, 90.0), (0.5, 60.0),
           (2.0, 84.0), (4.0, 90.0)]
    assert pareto_front(pts) == [5, 0, 1, 4]  # by cost; ties keep the first
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def test_table_shows_extra_columns_only_when_present():
    base = {"label": "kd", "model": "mlp", "method": "kd", "params": 10, "size_bytes": 2048,
            "latency_ms": 0.1, "test_acc_mean": 90.0, "test_acc_std": 1.0, "n_seeds": 2}
    head, _ = table([base])
    assert "size int8" not in head and "MACs" not in head
    head, cells = table([base, {**base, "label": "q", "size_int8_bytes": 512, "macs": 1234,
                                "int8_acc_mean": 89.5, "int8_acc_std": 0.5}])
    assert {"size int8", "MACs", "int8 top-1 test (%)"} <= set(head)
    assert cells[0][head.index("size int8")] == "–"
    assert cells[1][head.index("MACs")] == "1,234"


def test_figures_take_plain_data_and_labels_as_written(tmp_path):
    from kdkit.report.figures import Point, accuracy_vs_cost, image_grid

    pts = [Point("teacher", 2.0, 95.0, [94.0, 96.0], "teacher"),
           Point("scratch", 0.5, 80.0, [79.0, 81.0], "scratch"),
           Point("kd $x", 0.5, 88.0, [87.5, 88.5])]  # '$' is not math mode
    png, svg = accuracy_vs_cost(pts, tmp_path / "acc", xlabel="ms", title="t")
    _png_has_data(png)
    _svg_has_data(svg)
    rng = np.random.default_rng(0)
    png, svg = image_grid(rng.normal(size=(60, 3, 8, 8)), np.arange(60) % 30,
                          tmp_path / "grid", per_class=2)  # colour; 30 classes, 20 shown
    _png_has_data(png)
    assert Image.open(png).size[1] < 2000


def test_chain_paths_line_every_student_up_in_the_last_column(tmp_path, monkeypatch):
    from kdkit.report import figures as F

    drawn = {}

    def keep(fig, stem):
        drawn["fig"] = fig
        return Path(stem).with_suffix(".png"), Path(stem).with_suffix(".svg")

    monkeypatch.setattr(F, "save", keep)
    F.chain_paths([F.Chain("ta", ["t", "a4", "s"], [90.0, 86.0, 85.0], [0.1, 0.2, 0.3]),
                   F.Chain("full", ["t", "a8", "a6", "a4", "s"], [90.0, 88.0, 88.0, 85.0, 84.0],
                           [0.1] * 5)], tmp_path / "chains")
    ax = drawn["fig"].axes[0]
    xs = [list(c.lines[0].get_xdata()) for c in ax.containers]
    assert xs == [[0, 1, 4], [0, 1, 2, 3, 4]]  # the one-assistant path's student at x = 4
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["teacher", "assistant 1", "assistant 2", "assistant 3", "student"]


def test_input_grid_titles_name_the_run_only_when_it_is_not_its_source(experiment, tmp_path):
    from kdkit.report.report import _grid

    text = experiment[1].read_text()  # runs labelled after their source: the name once
    assert "### Data-free inputs: dafl (generator samples, labelled by the teacher)" in text
    assert "### Data-free inputs: noise\n" in text and "Data-free inputs, " not in text
    images = (np.zeros((4, 1, 8, 8)), np.arange(4) % 2, "record", " (spectral_all)")
    assert _grid(images, tmp_path, "a", "Data-free inputs", "seed0/spec", "spec").title == \
        "Data-free inputs, spec: record (spectral_all)"
    assert _grid(images, tmp_path, "b", "Transfer set", "runs/t").title == \
        "Transfer set: record (spectral_all)"
