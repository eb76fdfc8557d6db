"""The house's shape: the tiny model's research (tinylab/) imports the engine and is never
imported by the engine, the API or the page."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["engine", "server", "ui"])
def test_nothing_that_serves_imports_the_research(folder):
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).rglob("*.py"))
                 if any(m == "tinylab" or m.startswith("tinylab.") for m in imported_modules(p))]
    offenders += ["app.py"] if folder == "engine" and any(
        m.startswith("tinylab") for m in imported_modules(ROOT / "app.py")) else []
    assert offenders == []


def test_no_training_or_probe_module_inside_the_engine():
    names = {p.stem for p in (ROOT / "engine").rglob("*.py")}
    assert not names & {"train_tiny", "tiny_probe", "shapes"}
