"""API server flags (each with an environment-variable default) and the
settings object the routes read, so the standalone launcher and the web app
configure the API the same way."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.config import EngineConfig, add_flags, namespace_values, setting
from engine.inputs.media import MediaPolicy

from .auth import Credentials, parse_auth

API = "OpenAI-compatible API"
HTTP = "HTTP server"


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type that refuses zero and negatives (a timeout of 0 would close everything)."""
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its error
    return parse


@dataclass
class ServerSettings:
    """What the OpenAI-compatible routes need besides the engine; each field is also a flag
    of `python -m server` and app.py (add_server_args)."""

    users: tuple[tuple[str, str], ...] = setting(
        (), "--auth", dest="auth", env="QWENVL_AUTH", group=API, action="append",
        metavar="USER:PASS|FILE",
        help="require a login: USER:PASS, or a file with one USER:PASS per line; repeatable. "
             "The web page asks for it; the API takes it as HTTP Basic or as 'Authorization: "
             "Bearer USER:PASS'")
    api_key: str | None = setting(
        None, env="QWENVL_API_KEY", group=API,
        help="also accept 'Authorization: Bearer KEY' on the API (alone: the only way in)")
    served_model_name: list[str] = setting(
        factory=list, env="QWENVL_SERVED_MODEL_NAME", env_list=True, group=API, nargs="+",
        metavar="NAME",
        help="name(s) the model answers to in the API (default: the model's name; the tiny "
             "model also answers to Qwen/Qwen2.5-VL-7B-Instruct)")
    allowed_local_media_path: list[str] = setting(
        factory=list, env="QWENVL_ALLOWED_LOCAL_MEDIA_PATH", env_list=True, group=API,
        action="append", metavar="DIR",
        help="let API requests read images and videos under DIR via file:// URLs or paths "
             "(default: none)")
    allowed_media_domains: list[str] = setting(
        factory=list, env="QWENVL_ALLOWED_MEDIA_DOMAINS", env_list=True, group=API, nargs="+",
        metavar="HOST",
        help="fetch image and video URLs only from these hosts (HOST[,HOST] or several "
             "values, vLLM's flag), which may then be on loopback or a private network; "
             "default: any public host")
    enable_tokenizer_info_endpoint: bool = setting(
        False, env="QWENVL_ENABLE_TOKENIZER_INFO_ENDPOINT", group=API, action="store_true",
        help="serve GET /tokenizer_info (vLLM's flag): the tokenizer's configuration, its chat "
             "template and the model folder's path included")
    enable_server_load_tracking: bool = setting(
        False, env="QWENVL_ENABLE_SERVER_LOAD_TRACKING", group=API, action="store_true",
        help="count the chat and completion requests in flight for GET /load (vLLM's flag; "
             "without it /load says 0)")
    enable_prompt_tokens_details: bool = setting(
        False, env="QWENVL_ENABLE_PROMPT_TOKENS_DETAILS", group=API, action="store_true",
        help="report usage.prompt_tokens_details (vLLM's flag): the prompt tokens whose KV "
             "came from the prefix cache, as cached_tokens")
    max_body_mb: float = setting(
        64.0, env="QWENVL_MAX_BODY_MB", group=API,
        help="largest accepted request body in MB (the page's events too)")
    header_timeout_s: float = setting(
        10.0, "--header-timeout", dest="header_timeout", env="QWENVL_HEADER_TIMEOUT", group=HTTP,
        parse=_positive(float), metavar="S",
        help="close a connection whose request line and headers have not arrived S seconds "
             "after it opened or finished its last answer")
    body_timeout_s: float = setting(
        30.0, "--body-timeout", dest="body_timeout", env="QWENVL_BODY_TIMEOUT", group=HTTP,
        parse=_positive(float), metavar="S",
        help="answer 408 and close when the next piece of a request body takes longer than "
             "S seconds")
    max_connections: int = setting(
        1000, env="QWENVL_MAX_CONNECTIONS", group=HTTP, parse=_positive(int), metavar="N",
        help="open connections at once; requests beyond get a 503")
    forwarded_allow_ips: str | None = setting(
        None, env="FORWARDED_ALLOW_IPS", group=HTTP, metavar="IPS",
        help="comma-separated proxy addresses (or *) whose X-Forwarded-For and "
             "X-Forwarded-Proto are believed; off by default, so the client's address is the "
             "connection's (uvicorn's own setting)")
    max_client_requests: int | None = setting(
        None, env="QWENVL_MAX_CLIENT_REQUESTS", group=HTTP, metavar="N",
        help="generations one client (its login, API key or address) may run at once, page "
             "and API together; more get a 429 (default: --max-batch; 0: no cap)")
    enable_auto_tool_choice: bool = setting(
        False, env="QWENVL_ENABLE_AUTO_TOOL_CHOICE", group=API, action="store_true",
        help="let the model call tools on its own (tool_choice \"auto\", vLLM's flag; needs "
             "--tool-call-parser). Without both, only tool_choice \"none\" is served")
    tool_call_parser: str | None = setting(
        None, env="QWENVL_TOOL_CALL_PARSER", group=API, choices=("hermes",), metavar="NAME",
        help="how tool calls are read from the answer (vLLM's flag): hermes, Qwen2.5's "
             "<tool_call> blocks")

    @property
    def tools_enabled(self) -> bool:
        """Whether tool calls are served: vLLM has a tool parser only with both flags."""
        return self.enable_auto_tool_choice and self.tool_call_parser is not None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "ServerSettings":
        """The settings a parser built by add_server_args produced; --auth's entries are read
        (files too), and the per-client cap defaults to the engine's --max-batch."""
        values = namespace_values(ns, cls)
        cap = values.get("max_client_requests")
        return cls(**{**values,
                      "users": tuple(parse_auth(values.get("users")) or ()),
                      "api_key": values.get("api_key") or None,
                      "served_model_name": list(values.get("served_model_name") or []),
                      "allowed_local_media_path": list(values.get("allowed_local_media_path")
                                                       or []),
                      "allowed_media_domains": [d.strip() for v in values.get(
                          "allowed_media_domains") or [] for d in v.split(",") if d.strip()],
                      "forwarded_allow_ips": values.get("forwarded_allow_ips") or None,
                      "max_client_requests": cap if cap is not None
                      else getattr(ns, "max_batch", None)})

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def media_policy(self) -> MediaPolicy:
        """API requests never read local files unless a folder was allowed explicitly, and
        fetch only from the allowed media domains when some are named."""
        return MediaPolicy(local_roots=tuple(Path(p).expanduser().resolve()
                                             for p in self.allowed_local_media_path),
                           allowed_domains=tuple(self.allowed_media_domains) or None)

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


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the OpenAI-compatible API and its HTTP server (shared by `python -m server`
    and app.py)."""
    add_flags(parser, ServerSettings)
