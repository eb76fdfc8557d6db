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


def test_what_the_tiny_model_knows_is_stated_once_in_its_marker(tiny_engine, tiny_model_dir,
                                                                tmp_path):
    """The page's banner, the API's model card and the log's warning all read the folder's
    marker, so they cannot disagree (they quoted three different accuracies before)."""
    import html
    import json
    import shutil

    from fastapi.testclient import TestClient

    from engine.loader import tiny_warning
    from engine.tiny import MARKER, describe
    from server.routes import create_api_app
    from ui.layout import header_html

    knows = describe(tiny_model_dir)["knows"]
    assert "88 times in 100" in knows and tiny_engine.tiny_knows == knows
    assert html.escape(knows) in header_html(tiny_engine)
    with TestClient(create_api_app(tiny_engine)) as client:
        cards = client.get("/v1/models").json()["data"]
    assert all(knows in card["description"] for card in cards)
    assert knows in tiny_warning(tiny_model_dir)
    other = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, other)
    marker = json.loads((other / MARKER).read_text())
    (other / MARKER).write_text(json.dumps({**marker, "knows": "it knows only squares"}))
    assert "it knows only squares" in tiny_warning(other)
