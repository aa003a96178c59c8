"""Fingerprints of the code a run executes, so that a change to it reruns exactly those runs.

Snakemake reruns a job when its rule's shell text or params change, not when a Python module it
calls changes, and ``dvc repro`` only hands the work to Snakemake. Each run's training config
therefore carries the hash of the source files it imports (the method's module and, through
the static imports, everything of ``omniad`` it reaches), and the evaluate rule carries its own.
Editing ``mambaad.py`` reruns MambaAD's runs only; editing ``metrics.py`` re-evaluates every
run without retraining; a checkpoint written by other code is refused, not resumed.

What is hashed is the *normalised* source (:func:`normalised_source`): the token stream
without comments, blank lines and docstrings, so a comment or docstring edit reruns nothing.
``omniad.grid`` (:data:`CONFIG_MODULES`) is not hashed: a run sees it only through the resolved
config it produces, whose hash is already a rule param, and the paths it makes, which name the
outputs; hashing its source would retrain the whole grid for any edit of it.
"""

from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from functools import cache
from pathlib import Path

PACKAGE = "omniad"
ROOT = Path(__file__).resolve().parent
#: What every training run executes besides its method's module (the loop and the data).
TRAIN_ENTRY = ("omniad.engine.train", "omniad.data.cache")
#: What every evaluation executes besides its method's module.
EVALUATE_ENTRY = ("omniad.engine.evaluate", "omniad.metrics", "omniad.anomaly_map",
                  "omniad.data.cache")
#: Modules a run sees only through its resolved config and paths (both already part of what
#: Snakemake compares): neither hashed nor followed.
CONFIG_MODULES = frozenset({"omniad.grid"})


@cache
def _source(module: str) -> Path | None:
    """The file of an omniad module, found on disk (nothing is imported)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py") if parts[1:] else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def _resolve(name: str, level: int, current: str, is_package: bool) -> str:
    """Absolute module name of an import statement's module part."""
    if level == 0:
        return name
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


@cache
def _imports(module: str) -> frozenset[str]:
    """The omniad modules ``module`` imports (module level or inside functions)."""
    path = _source(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, module, is_package)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # submodules named in the list
    out = set()
    for name in found:
        if name.split(".")[0] != PACKAGE:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            candidate = ".".join(parts[:i])
            if _source(candidate) is not None:
                out.add(candidate)
    return frozenset(out)


def closure(*modules: str) -> list[str]:
    """Every omniad module reachable from ``modules`` through static imports, sorted."""
    seen: set[str] = set()
    parents = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 2)}
    todo = [m for m in parents if _source(m) is not None]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(m) - seen - CONFIG_MODULES)
    return sorted(seen)


#: Tokens whose text is layout only (indent width, line endings): their kind is the code.
_LAYOUT = frozenset({tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.ENDMARKER})


def _docstring_spans(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every module, class and function docstring."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                v = first.value
                spans.append(((v.lineno, v.col_offset), (v.end_lineno, v.end_col_offset)))
    return spans


def normalised_source(text: str) -> str:
    """The code of a module without what does not run: comments, blank lines, docstrings.

    Tokens, not ``ast.dump``: the token stream of unchanged code is the same on every Python
    version, so an interpreter upgrade does not retrain the grid. Layout within a line
    (spaces) does not count either; indentation does (INDENT/DEDENT tokens).
    """
    spans = _docstring_spans(ast.parse(text))
    out: list[str] = []
    after_docstring = False
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING):
            continue
        if tok.type == tokenize.STRING and any(a <= tok.start and tok.end <= b for a, b in spans):
            after_docstring = True
            continue
        if after_docstring and tok.type == tokenize.NEWLINE:  # the docstring's own line end
            after_docstring = False
            continue
        after_docstring = False
        name = tokenize.tok_name[tok.type]
        out.append(name if tok.type in _LAYOUT else f"{name} {tok.string}")
    return "\n".join(out)


@cache
def _normalised(module: str) -> str:
    return normalised_source(_source(module).read_text())  # type: ignore[union-attr]


def source_hash(*texts: str) -> str:
    """SHA-256 (16 hex digits) of sources as normalised: for code found outside the closures."""
    h = hashlib.sha256()
    for t in texts:
        h.update(normalised_source(t).encode() + b"\0")
    return h.hexdigest()[:16]


@cache
def fingerprint(*modules: str) -> str:
    """SHA-256 (16 hex digits) over the names and normalised sources of the closure's files."""
    h = hashlib.sha256()
    for m in closure(*modules):
        h.update(m.encode() + b"\0" + _normalised(m).encode() + b"\0")
    return h.hexdigest()[:16]


def builder_module(builder: str) -> str:
    return builder.partition(":")[0]


def train_code(builder: str) -> str:
    return fingerprint(builder_module(builder), *TRAIN_ENTRY)


def evaluate_code(builder: str) -> str:
    return fingerprint(builder_module(builder), *EVALUATE_ENTRY)
