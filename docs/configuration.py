"""Writes docs/configuration.md, the table of every flag and environment variable, from the
settings dataclasses the parsers are generated from, so the manual cannot disagree with
the code:

    .venv/bin/python docs/configuration.py

tests/test_config.py fails when the committed file differs from what this writes; to
change a flag, edit its field (engine/config.py, server/settings.py, server/launch.py,
app.py) and run this again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import FlagDoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"
if str(ROOT) not in sys.path:   # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

INTRO = """\
# Configuration

Every setting of `python app.py` (the page and the API), `python -m server` (the API
alone) and `python -m engine` (the command line; its request flags such as `--image` and
`--prompt` are in its `--help`), with the environment variable that sets its default: a
flag given on the command line wins over the variable, the variable over the default. A
switch's variable turns it on with `1`, `true`, `yes` or `on`. On a Hugging Face Space, set
the variables in its settings.

This file is generated from the settings' fields by `python docs/configuration.py`;
tests/test_config.py fails when it is stale. Change a flag in its field, not here.
"""


def sections() -> list[tuple[type, str, str]]:
    """(settings dataclass, the commands that read it, the title of its flags outside any
    group), in the manual's order."""
    import app
    from engine.config import EngineConfig
    from server.launch import ApiServerFlags
    from server.settings import ServerSettings

    return [(EngineConfig, "`app.py`, `python -m server` and `python -m engine`", ""),
            (ServerSettings, "`app.py` and `python -m server`", ""),
            (app.WebFlags, "`app.py` only", ""),
            (ApiServerFlags, "`python -m server` only", "API server")]


def cell(text: str) -> str:
    """Table-safe: a `|` would end the cell, even inside a code span."""
    return text.replace("|", "\\|")


def row(doc: FlagDoc) -> str:
    flags = ", ".join(f"`{name}`" for name in doc.names)
    if doc.metavar:
        flags = flags[:-1] + f" {doc.metavar}`" if len(doc.names) == 1 else f"{flags} {doc.metavar}"
    env = ", ".join(f"`{name}`" for name in doc.env) + " (comma-separated)" * doc.env_list
    default = doc.default if doc.default in ("off", "unset") else f"`{doc.default}`"
    what = doc.help + (f"; one of {', '.join(doc.choices)}" if doc.choices else "")
    return "| " + " | ".join(cell(c) for c in (flags, env, default, what)) + " |"


def render() -> str:
    """The whole of docs/configuration.md."""
    from engine.config import flag_docs

    out = [INTRO]
    for cls, where, own in sections():
        groups: dict[str, list[FlagDoc]] = {}
        for doc in flag_docs(cls):
            groups.setdefault(doc.group or own, []).append(doc)
        for group, docs in groups.items():
            out += [f"## {group[0].upper()}{group[1:]}", "", f"Read by {where}.", "",
                    "| Flag | Environment variable | Default | What it does |",
                    "|---|---|---|---|", *map(row, docs), ""]
    return "\n".join(out)


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
