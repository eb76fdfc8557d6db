"""API server flags (each with an environment-variable default) and the
settings object the routes read, so the standalone launcher and the web app
configure the API the same way."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import env
from engine.media import MediaPolicy

from .auth import Credentials, parse_auth

DEFAULT_MAX_BODY_MB = 64.0


@dataclass
class ServerSettings:
    """What the OpenAI-compatible routes need besides the engine."""

    api_key: str | None = None
    users: tuple[tuple[str, str], ...] = ()      # --auth: the web page's users, also on /v1
    served_model_name: list[str] = field(default_factory=list)  # empty: the engine's model name
    allowed_local_media_path: list[str] = field(default_factory=list)
    max_body_mb: float = DEFAULT_MAX_BODY_MB

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "ServerSettings":
        return cls(api_key=ns.api_key or None,
                   users=tuple(parse_auth(getattr(ns, "auth", None)) or ()),
                   served_model_name=list(ns.served_model_name or []),
                   allowed_local_media_path=list(ns.allowed_local_media_path or []),
                   max_body_mb=ns.max_body_mb)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def media_policy(self) -> MediaPolicy:
        """API requests never read local files unless a folder was allowed explicitly."""
        return MediaPolicy(local_roots=tuple(Path(p).expanduser().resolve()
                                             for p in self.allowed_local_media_path))

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.users, self.api_key)


def _split_env(name: str) -> list[str]:
    value = env(name)
    return [v for v in value.split(",") if v] if value else []


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the OpenAI-compatible API (shared by `python -m server` and app.py)."""
    g = parser.add_argument_group("OpenAI-compatible API")
    g.add_argument("--auth", action="append", metavar="USER:PASS|FILE",
                   default=[a for a in [env("QWENVL_AUTH")] if a],
                   help="require a login: USER:PASS, or a file with one USER:PASS per line; "
                        "repeatable. The web page asks for it; the API takes it as HTTP Basic or "
                        "as 'Authorization: Bearer USER:PASS' [env QWENVL_AUTH]")
    g.add_argument("--api-key", default=env("QWENVL_API_KEY"),
                   help="also accept 'Authorization: Bearer KEY' on the API (alone: the only "
                        "way in) [env QWENVL_API_KEY]")
    g.add_argument("--served-model-name", nargs="+", default=_split_env("QWENVL_SERVED_MODEL_NAME"),
                   metavar="NAME",
                   help="name(s) the model answers to in the API (default: the model's name; the "
                        "tiny model also answers to Qwen/Qwen2.5-VL-7B-Instruct) "
                        "[env QWENVL_SERVED_MODEL_NAME, comma-separated]")
    g.add_argument("--allowed-local-media-path", action="append",
                   default=_split_env("QWENVL_ALLOWED_LOCAL_MEDIA_PATH"), metavar="DIR",
                   help="let API requests read images and videos under DIR via file:// URLs or "
                        "paths (default: none) [env QWENVL_ALLOWED_LOCAL_MEDIA_PATH]")
    g.add_argument("--max-body-mb", type=float,
                   default=float(env("QWENVL_MAX_BODY_MB", str(DEFAULT_MAX_BODY_MB))),
                   help="largest accepted request body in MB [env QWENVL_MAX_BODY_MB]")
