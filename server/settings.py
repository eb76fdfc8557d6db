"""API server flags (each with an environment-variable default) and the
settings object the routes read, so the standalone launcher and the web app
configure the API the same way."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.config import EngineConfig, env
from engine.media import MediaPolicy

from .auth import Credentials, parse_auth

DEFAULT_MAX_BODY_MB = 64.0
DEFAULT_HEADER_TIMEOUT_S = 10.0      # request line and headers must arrive within this
DEFAULT_BODY_TIMEOUT_S = 30.0        # longest wait for the next chunk of a request body
DEFAULT_MAX_CONNECTIONS = 1000       # open connections before requests get a 503


@dataclass
class ServerSettings:
    """What the OpenAI-compatible routes need besides the engine."""

    api_key: str | None = None
    users: tuple[tuple[str, str], ...] = ()      # --auth: the web page's users, also on /v1
    served_model_name: list[str] = field(default_factory=list)  # empty: the engine's model name
    allowed_local_media_path: list[str] = field(default_factory=list)
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    forwarded_allow_ips: str | None = None   # None: the address is the socket's peer
    max_client_requests: int | None = None   # None: the engine's max_batch; 0: no cap

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "ServerSettings":
        return cls(api_key=ns.api_key or None,
                   users=tuple(parse_auth(getattr(ns, "auth", None)) or ()),
                   served_model_name=list(ns.served_model_name or []),
                   allowed_local_media_path=list(ns.allowed_local_media_path or []),
                   max_body_mb=ns.max_body_mb,
                   header_timeout_s=ns.header_timeout, body_timeout_s=ns.body_timeout,
                   max_connections=ns.max_connections,
                   forwarded_allow_ips=ns.forwarded_allow_ips or None,
                   max_client_requests=ns.max_client_requests
                   if ns.max_client_requests is not None else getattr(ns, "max_batch", None))

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

    def client_limit(self, engine: object) -> int:
        """Generations one client may run at once (0: no cap). The default is the engine's
        batch: one client may fill a batch, never the queue behind it."""
        if self.max_client_requests is not None:
            return max(0, self.max_client_requests)
        return getattr(getattr(engine, "config", None), "max_batch", None) or \
            EngineConfig.max_batch


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
                   help="largest accepted request body in MB (the page's events too) "
                        "[env QWENVL_MAX_BODY_MB]")
    add_http_args(parser)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text else None


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type that refuses zero and negatives (a timeout of 0 would close everything)."""
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its error
    return parse


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the HTTP server itself: slow or many connections, proxies, one client's share."""
    g = parser.add_argument_group("HTTP server")
    g.add_argument("--header-timeout", type=_positive(float),
                   default=float(env("QWENVL_HEADER_TIMEOUT", str(DEFAULT_HEADER_TIMEOUT_S))),
                   metavar="S",
                   help="close a connection whose request line and headers have not arrived "
                        "S seconds after it opened or finished its last answer "
                        "[env QWENVL_HEADER_TIMEOUT]")
    g.add_argument("--body-timeout", type=_positive(float),
                   default=float(env("QWENVL_BODY_TIMEOUT", str(DEFAULT_BODY_TIMEOUT_S))),
                   metavar="S",
                   help="answer 408 and close when the next piece of a request body takes "
                        "longer than S seconds [env QWENVL_BODY_TIMEOUT]")
    g.add_argument("--max-connections", type=_positive(int), metavar="N",
                   default=int(env("QWENVL_MAX_CONNECTIONS", str(DEFAULT_MAX_CONNECTIONS))),
                   help="open connections at once; requests beyond get a 503 "
                        "[env QWENVL_MAX_CONNECTIONS]")
    g.add_argument("--forwarded-allow-ips", default=env("FORWARDED_ALLOW_IPS"),
                   metavar="IPS",
                   help="comma-separated proxy addresses (or *) whose X-Forwarded-For and "
                        "X-Forwarded-Proto are believed; off by default, so the client's "
                        "address is the connection's (uvicorn's own setting) "
                        "[env FORWARDED_ALLOW_IPS]")
    g.add_argument("--max-client-requests", type=int,
                   default=_int_or_none(env("QWENVL_MAX_CLIENT_REQUESTS")),
                   metavar="N",
                   help="generations one client (its login, API key or address) may run at "
                        "once, page and API together; more get a 429 (default: --max-batch; "
                        "0: no cap) [env QWENVL_MAX_CLIENT_REQUESTS]")
