"""'kdkit report': figures and a report (Markdown + self-contained HTML) of a run directory.

    kdkit report RUN_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    from kdkit.report import write_report

    write_report(Path(args.run_dir), out_dir=Path(args.out) if args.out else None)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``kdkit report RUN_DIR [--out DIR]`` on the main parser's subcommands."""
    p = sub.add_parser(
        "report", help="figures and a report (report.md, report.html) of a run directory",
        description="Draws every figure that applies to RUN_DIR (PNG and SVG): validation "
        "accuracy per epoch (mean over seeds, band for the spread), training loss by term, "
        "accuracy against latency and against size with the Pareto front, CTKD's "
        "temperature, accuracy along teacher-assistant paths, and a grid of data-free inputs "
        "per class; writes report.md (the table, the figures linked) and a self-contained "
        "report.html. Needs matplotlib (pip install 'kdkit[report]').")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="an experiment directory (kdkit run --out), a run directory (kdkit "
                   "train/distill --out) or a transfer set (kdkit datafree ... --out)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for the report and figures (default: RUN_DIR/report)")
    p.set_defaults(fn=cmd_report)
