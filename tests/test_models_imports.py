"""Models import layers, never the engine, the grid or the data code: an edit there must not
change a model's code hash (retrain it), and a model must be buildable without them."""

from __future__ import annotations

import ast
from pathlib import Path

import omniad

FORBIDDEN = ("omniad.engine", "omniad.grid", "omniad.data", "omniad.methods")
MODELS = Path(omniad.__file__).parent / "models"


def forbidden_imports(source: str) -> list[str]:
    """Every module under FORBIDDEN that ``source`` imports, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    return found


def test_the_checker_catches_each_import_form():
    src = ("import omniad.engine.optim\nfrom omniad.grid import data_root\n"
           "def f():\n    from omniad.data.readers import read_samples\n"
           "from omniad import engine\nfrom omniad.models.layers.neck import FusionNeck\n"
           "import omniad.constants\n")
    assert sorted(forbidden_imports(src)) == [
        "omniad.data.readers", "omniad.data.readers.read_samples", "omniad.engine",
        "omniad.engine.optim", "omniad.grid", "omniad.grid.data_root"]


def test_models_import_no_engine_grid_or_data():
    files = sorted(MODELS.rglob("*.py"))
    assert len(files) >= 15  # base, encoder, omniad, 7 baselines + perlin, layers
    bad = {str(f.relative_to(MODELS)): hits for f in files
           if (hits := forbidden_imports(f.read_text()))}
    assert bad == {}
