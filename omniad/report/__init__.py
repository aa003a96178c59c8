"""The report: aggregate a protocol's runs into the paper's Tables I-VII (ours beside the
paper's), a complexity table, a reproduction audit, figures, and a compiled PDF.

    omniad report --protocol demo [--no-pdf]

Modules: ``aggregate`` (runs -> cells, CSV / JSON products), ``tables`` (LaTeX tables),
``audit`` (paper vs released code, as data), ``figures`` (matplotlib), ``costs`` (params /
FLOPs, cached), ``latex`` (escaping, templates, pdflatex), ``build`` (the command).
"""

from __future__ import annotations

from omniad.grid import reports_root
from omniad.report.build import ReportResult, build_report, cli
from omniad.report.latex import ReportError

__all__ = ["ReportError", "ReportResult", "build_report", "cli", "reports_root"]
