"""The API alone, like `vllm serve`:

    python -m server --model tiny --port 8000

then `curl http://localhost:8000/v1/chat/completions ...`. The web app
(app.py) serves the same routes next to its UI on one port; both start through
server.launch.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from engine.config import add_engine_args, add_flags

from .launch import ApiServerFlags, FrontDoor, Site, launch
from .settings import ServerSettings, add_server_args

if TYPE_CHECKING:
    from engine.base import Engine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0])
    add_flags(p, ApiServerFlags)
    add_engine_args(p)
    add_server_args(p)
    return p


def serve_api(engine: Engine, args: argparse.Namespace) -> Site:
    """The API's FastAPI app for an engine and the parsed flags."""
    from .routes import create_api_app

    return Site(create_api_app(engine, ServerSettings.from_namespace(args)))


def main(argv: list[str] | None = None) -> int:
    return launch(FrontDoor(build_parser(), serve_api), argv)


if __name__ == "__main__":
    sys.exit(main())
