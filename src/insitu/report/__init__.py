"""A finished run as one self-contained HTML file (``insitu report RUN_DIR``), and the run summary
(per-round rows, per-client table, fairness, privacy) that the dashboard shares."""

from insitu.report.html import render_report, write_report
from insitu.report.summary import load_run, run_view

__all__ = ["load_run", "render_report", "run_view", "write_report"]
