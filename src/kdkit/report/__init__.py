"""``kdkit report``: figures (PNG + SVG) and a report (Markdown + self-contained HTML) of a
run directory. matplotlib is imported only when a figure is drawn (``pip install
'kdkit[report]'``)."""

from kdkit.report.report import inspect, write_report

__all__ = ["inspect", "write_report"]
