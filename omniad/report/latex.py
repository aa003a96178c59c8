"""LaTeX plumbing: escaping, number formatting, the Jinja environment, atomic writes, pdflatex.

Templates use LaTeX-friendly delimiters (``((* block *))``, ``((( variable )))``,
``((= comment =))``) and every plain string that reaches a template is escaped on output;
only values wrapped in :class:`TeX` (markup built by this package) pass through verbatim.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2

from omniad.atomic import write_bytes_atomic

TEMPLATES = Path(__file__).resolve().parent / "templates"


class ReportError(RuntimeError):
    """The report cannot be made (bad inputs, LaTeX failure); the message says why."""


class TeX(str):
    """A string that is already LaTeX: templates print it as it is."""

    __slots__ = ()


_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}


def escape(value: Any) -> TeX:
    """Plain text -> LaTeX (a :class:`TeX` passes through unchanged)."""
    if isinstance(value, TeX):
        return value
    return TeX("".join(_ESCAPES.get(c, c) for c in str(value)))


def join(parts: list[Any], sep: str = ", ") -> TeX:
    """Join escaped parts (TeX parts verbatim) with a plain separator."""
    return TeX(escape(sep).join(escape(p) for p in parts))


# --------------------------------------------------------------------------------------------
# Numbers.
# --------------------------------------------------------------------------------------------
def num(x: float | None, digits: int = 1) -> str | None:
    """Fixed-point text of a number, None for a missing one; never '-0.0'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    s = f"{x:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def signed(x: float, digits: int = 1, suffix: str = "") -> TeX:
    """'+1.7' / '$-$1.7' / '0.0' as LaTeX (a true minus sign)."""
    s = num(x, digits)
    if float(s) == 0:
        return TeX(s + suffix)
    if s.startswith("-"):
        return TeX(r"$-$" + s[1:] + suffix)
    return TeX("+" + s + suffix)


DASH = TeX("--")


# --------------------------------------------------------------------------------------------
# Templates.
# --------------------------------------------------------------------------------------------
def _finalize(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, TeX):
        return value
    return escape(value)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        block_start_string="((*", block_end_string="*))",
        variable_start_string="(((", variable_end_string=")))",
        comment_start_string="((=", comment_end_string="=))",
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False, finalize=_finalize,
    )
    env.filters["tex"] = escape
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write a file through a temporary sibling and a rename (readers never see half a file)."""
    return write_bytes_atomic(path, data)  # the package's one helper (mode from the umask)


# --------------------------------------------------------------------------------------------
# pdflatex.
# --------------------------------------------------------------------------------------------
#: Debian packages that provide everything the report's LaTeX uses (see README of the report).
APT_PACKAGES = ("texlive-latex-base", "texlive-latex-recommended", "lmodern")
BUILD_DIR = "latex-build"  # pdflatex refuses to write into dot-directories


def pdflatex() -> str | None:
    return shutil.which("pdflatex")


def compile_pdf(tex: Path, runs: int = 2, timeout: int = 600) -> Path:
    """Compile ``tex`` in its own folder (twice, for references); return the PDF path.

    Auxiliary files go to ``latex-build/`` beside it; the PDF replaces ``<name>.pdf``
    atomically. ``SOURCE_DATE_EPOCH`` makes the PDF itself reproducible.
    """
    exe = pdflatex()
    if exe is None:
        raise ReportError("pdflatex is not on PATH (apt-get install " + " ".join(APT_PACKAGES) + ")")
    tex = Path(tex)
    build = tex.parent / BUILD_DIR
    build.mkdir(exist_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}
    cmd = [exe, "-interaction=nonstopmode", "-halt-on-error", f"-output-directory={BUILD_DIR}",
           tex.name]
    log = build / tex.with_suffix(".log").name
    for _ in range(runs):
        try:
            proc = subprocess.run(cmd, cwd=tex.parent, env=env, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ReportError(f"pdflatex ran over {timeout}s on {tex}") from exc
        if proc.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else \
                proc.stdout.decode(errors="replace")
            tail = "\n".join(text.splitlines()[-40:])
            raise ReportError(f"pdflatex failed on {tex} (exit {proc.returncode}); "
                              f"end of {log}:\n{tail}")
    pdf = build / tex.with_suffix(".pdf").name
    if not pdf.exists():
        raise ReportError(f"pdflatex wrote no PDF for {tex}; see {log}")
    out = tex.with_suffix(".pdf")
    os.replace(pdf, out)
    # what it was compiled from: Snakemake touches report.tex (a declared output) after the
    # job, so "is the PDF stale?" (omniad where) compares contents, not times
    source_digest_file(tex).write_text(source_digest(tex) + "\n")
    return out


def source_digest(tex: Path) -> str:
    """sha256 of a .tex file's bytes."""
    return hashlib.sha256(Path(tex).read_bytes()).hexdigest()


def source_digest_file(tex: Path) -> Path:
    """Where compile_pdf records the digest of the .tex it compiled."""
    return Path(tex).parent / BUILD_DIR / f"{Path(tex).stem}.source.sha256"
