"""The house's shape: engine/ in sub-packages of at most 12 modules with no import cycle
among them, and the tiny model's research (tinylab/) importing the engine, never imported by
the engine, the API or the page."""

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

    from engine.model.loader import tiny_warning
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


def engine_import_graph() -> dict[str, set[str]]:
    """Every engine module and the engine modules it imports (at the top or inside a function)."""
    files = {}
    for path in (ROOT / "engine").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        files[".".join(parts).removesuffix(".__init__")] = (path, package)

    def targets(node: ast.AST, package: str) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if not isinstance(node, ast.ImportFrom):
            return []
        base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level \
            else []
        module = ".".join(base + ([node.module] if node.module else []))
        return [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module
                for a in node.names]

    return {name: {t for node in ast.walk(ast.parse(path.read_text()))
                   for t in targets(node, package) if t in files and t != name}
            for name, (path, package) in files.items()}


def test_the_engine_has_no_import_cycle():
    graph = engine_import_graph()
    assert len(graph) > 20
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            if not (name.startswith(dep + ".")):       # a package's own __init__ runs first
                visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_no_engine_folder_holds_more_than_twelve_modules():
    folders = {p.parent for p in (ROOT / "engine").rglob("*.py")}
    crowded = {str(f.relative_to(ROOT)): n for f in folders
               if (n := len(list(f.glob("*.py")))) > 12}
    assert crowded == {}
