"""The report: aggregate a protocol's runs into the paper's Tables I-VII (ours beside the
paper's), a complexity table, a reproduction audit, figures, and a compiled PDF.

    omniad report --protocol demo [--no-pdf]

Modules: ``aggregate`` (runs -> cells, CSV / JSON products), ``tables`` (LaTeX tables),
``audit`` (paper vs released code, as data), ``figures`` (matplotlib), ``costs`` (params /
FLOPs, cached), ``latex`` (escaping, templates, pdflatex), ``build`` (the command),
``dvc_summary`` (the summary DVC reads). The names below load on first use, so that a light
submodule (``costs``' cache key in the Snakefile, ``dvc_summary``) does not import matplotlib
and scipy with the package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ReportResult": "omniad.report.build", "build_report": "omniad.report.build",
         "cli": "omniad.report.build", "ReportError": "omniad.report.latex",
         "reports_root": "omniad.grid"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omniad.report' has no attribute {name!r}")
