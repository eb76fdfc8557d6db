"""The HTTP server's hygiene: what keeps slow, many or oversized connections from
holding the server, and the headers that keep the page from being framed or made to
load things on its own. Both launchers (app.py and `python -m server`) build their
uvicorn Config here, so they serve the same way.

- Header timeout: a connection whose request line and headers have not all arrived
  `--header-timeout` seconds after it opened (or after its last answer, for a kept-alive
  one) is closed. uvicorn 0.54 has no such timeout (its keep-alive timer stops at the
  first byte), so GuardedH11Protocol adds it.
- Body timeout: a request body whose next piece takes more than `--body-timeout` seconds
  ends with a 408 and the connection closes (BodyGuard).
- Body bounds: the page's uploads are bounded per request (`--max-upload-mb`, all files
  together) and its other events like API bodies (`--max-body-mb`), by Content-Length
  before anything is read and by counting the bytes of a chunked body (BodyGuard); the API
  (/v1/) bounds its own bodies with vLLM's 413.
- Connection cap: beyond `--max-connections` open connections, a new one closes the oldest
  that is only waiting for its request head; when none is, requests get a one-line 503
  (uvicorn's `limit_concurrency`, with a clear body). The descriptor limit is raised to the
  hard limit at start.
- Client address: the socket's peer unless `--forwarded-allow-ips` names trusted proxies
  (uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; here that is off).
- Security headers on every answer: Content-Security-Policy, X-Frame-Options,
  X-Content-Type-Options, Referrer-Policy (SecurityHeaders).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
from typing import Any, Awaitable, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.errors import error_dict

from .settings import ServerSettings

log = logging.getLogger("server.hygiene")

ASGIApp = Callable[..., Awaitable[None]]

API_PREFIXES = ("/v1/",)   # the API bounds its own bodies (vLLM's 413 shape, its metrics)
UPLOAD_PATHS = ("/gradio_api/upload", "/gradio_api/process_recording")
LINGER_S = 2.0             # after an early answer, read (and drop) the rest this long, so the
                           # client sees the 413/408 instead of a reset
SPACE_FRAME_ANCESTORS = "https://huggingface.co"   # a Space's page frames the app

CSP = ("img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; "
       "base-uri 'self'; form-action 'self'")


def security_headers(frame_ancestors: str | None = None) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries. `frame_ancestors` None: no page may frame this one
    (X-Frame-Options DENY too); a value (a Hugging Face Space) lets that site frame it."""
    ancestors = f"'self' {frame_ancestors}" if frame_ancestors else "'none'"
    headers = [(b"content-security-policy", f"{CSP}; frame-ancestors {ancestors}".encode()),
               (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer")]
    if not frame_ancestors:
        headers.append((b"x-frame-options", b"DENY"))
    return headers


def app_path(scope: dict) -> str:
    """The path inside the app (without a root_path prefix)."""
    path = scope.get("path", "")
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def error_bytes(status: int, message: str, type_: str) -> bytes:
    """vLLM's one-line JSON error shape, for answers given before the app ran."""
    return json.dumps(error_dict(message, type_, status)).encode()


async def send_error(send: Callable, status: int, message: str, type_: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer `status` with a one-line JSON error and close the connection after it."""
    body = error_bytes(status, message, type_)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- middlewares
class SecurityHeaders:
    """ASGI middleware: add the security headers to every HTTP answer that lacks them."""

    def __init__(self, app: ASGIApp, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.app = app
        self.headers = headers if headers is not None else security_headers()
        self.names = {name for name, _ in self.headers}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyGuard:
    """ASGI middleware: a request body is bounded in size (`limit_for`) and in the wait for
    each of its pieces (`chunk_timeout_s`). Over either, the client gets a one-line 413 or
    408 and the connection closes; the app sees a disconnect, and whatever it answers after
    that goes nowhere."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, upload_bytes: int | None = None,
                 chunk_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_bytes = upload_bytes if upload_bytes is not None else max_body_bytes
        self.chunk_timeout_s = chunk_timeout_s

    def limit_for(self, scope: dict) -> tuple[int | None, str]:
        """(bound in bytes or None, the flag that sets it) for this request's path."""
        path = app_path(scope)
        if path.startswith(API_PREFIXES):
            return None, ""
        if path.rstrip("/") in UPLOAD_PATHS:
            return self.upload_bytes, "--max-upload-mb"
        return self.max_body_bytes, "--max-body-mb"

    @staticmethod
    def too_large(limit: int, flag: str) -> str:
        return (f"The request body is larger than the limit of {limit / 2**20:g} MB "
                f"(see {flag}).")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, flag = self.limit_for(scope)
        declared = content_length(scope)
        if limit is not None and declared is not None and declared > limit:
            return await send_error(send, 413, self.too_large(limit, flag),
                                    "RequestEntityTooLarge")
        state = {"started": False, "refused": False, "done": False, "received": 0}

        async def refuse(status: int, message: str, type_: str) -> dict:
            if not state["started"]:
                await send_error(send, status, message, type_)
            state["refused"] = state["done"] = True
            return {"type": "http.disconnect"}

        async def guarded_receive() -> dict:
            if state["refused"]:
                return {"type": "http.disconnect"}
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.chunk_timeout_s)
            except asyncio.TimeoutError:
                return await refuse(408, f"The request body stopped arriving: no data for "
                                         f"{self.chunk_timeout_s:g} s (see --body-timeout).",
                                    "RequestTimeout")
            if message["type"] != "http.request":
                state["done"] = True
                return message
            state["received"] += len(message.get("body", b""))
            if limit is not None and state["received"] > limit:
                return await refuse(413, self.too_large(limit, flag), "RequestEntityTooLarge")
            state["done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message: dict) -> None:
            if state["refused"]:
                return   # the client already has our answer
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise
            log.debug("the app failed after its request was refused", exc_info=True)


# --------------------------------------------------------------------------- the protocol
class _LingeringTransport:
    """The connection's transport, except that closing it while the client is still sending
    a body first sends our answer and a FIN, then drops what still arrives for LINGER_S
    (as nginx's lingering close): closing at once would reset the connection and the
    client would lose the 413 or 408 it was sent."""

    def __init__(self, transport: Any, protocol: "GuardedH11Protocol") -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        t = self._transport
        if (t.is_closing() or self._protocol.conn.their_state is not h11.SEND_BODY
                or not t.can_write_eof()):
            t.close()
            return
        self._protocol.linger()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout, a lingering close and the connection cap
    (Config.limit_concurrency). Past the cap, a new connection first closes the oldest one
    still waiting for its request head (half-sent headers, an idle keep-alive): a flood of
    them cannot keep real requests out. Only when every connection has a request running do
    requests get a clear 503. `protocol_class` makes one subclass per server."""

    header_timeout_s: float = 10.0
    waiting: dict["GuardedH11Protocol", None] = {}   # waiting for a head, oldest first

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None          # uvicorn's own check answers a bare text 503
        self.app = self._capped(self.app)
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    # -- connection cap
    def _over_cap(self) -> bool:
        cap = self.max_connections
        return bool(cap) and (len(self.connections) > cap or len(self.tasks) > cap)

    def _capped(self, app: ASGIApp) -> ASGIApp:
        async def capped(scope: dict, receive: Callable, send: Callable) -> None:
            if self._over_cap():
                log.warning("%d connections open: answering 503 (--max-connections %d)",
                            len(self.connections), self.max_connections)
                return await send_error(
                    send, 503, f"The server has too many open connections (the limit is "
                               f"{self.max_connections}, see --max-connections): try again "
                               "shortly.", "ServiceUnavailableError",
                    [(b"retry-after", b"1")])
            await app(scope, receive, send)
        return capped

    def _make_room(self) -> None:
        """Past the cap, close the oldest connections that are only waiting for a head."""
        cap = self.max_connections
        while cap and len(self.connections) > cap and self.waiting:
            oldest = next(iter(self.waiting))
            oldest._disarm_header_timer()
            self.connections.discard(oldest)       # counted out now, not when the loop
            oldest.transport._transport.close()    # gets to its connection_lost
            log.debug("connection cap %d: closed a connection waiting for its headers", cap)

    # -- header timeout
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))
        self._make_room()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)
        self.waiting[self] = None

    def _disarm_header_timer(self) -> None:
        self.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:   # a whole request head has arrived
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before its body was read (a 401, 429, 413): uvicorn would keep the
            # connection to drain the rest, and each dribbled byte restarts its keep-alive
            # timer, so a client could hold it forever. Close it (lingering) instead.
            self.transport.close()
        elif self.conn.their_state is h11.IDLE:
            self._arm_header_timer()               # the next request's head has its own time

    def _header_timeout(self) -> None:
        self._header_timer = None
        self._disarm_header_timer()
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:             # part of a request came: say why we close
            body = (f"The request headers did not arrive within {self.header_timeout_s:g} s "
                    "(see --header-timeout).\n").encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; "
                                 b"charset=utf-8\r\nconnection: close\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport._transport.close()

    # -- lingering close
    def linger(self) -> None:
        """Answer sent: half-close, drop the rest of the body for LINGER_S, then close."""
        self._lingering = True
        self._unset_keepalive_if_required()
        raw = self.transport._transport
        raw.write_eof()
        raw.resume_reading()
        self.loop.call_later(LINGER_S, raw.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm_header_timer()
        self.transport = self.transport._transport   # the WebSocket closes its own way
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def protocol_class(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol with this server's header timeout (uvicorn builds the protocol
    from its class, so the setting travels as a class attribute)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": float(header_timeout_s), "waiting": {}})


# --------------------------------------------------------------------------- startup
def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (each connection is a descriptor;
    Linux's default soft limit of 1024 would stop the server accepting long before
    --max-connections). Returns (before, after)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return -1, -1
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft, soft
    log.info("open-files limit raised from %d to %d", soft, target)
    return soft, target


FD_RESERVE = 128     # descriptors kept for everything but connections (model files, logs,
                     # uploads being written, the remote backend's own connections)


def connection_cap(wanted: int | None, fd_limit: int) -> int | None:
    """--max-connections, lowered to what the open-files limit leaves room for: past the
    limit, accept() fails and the server stops answering anyone (even /health)."""
    if fd_limit <= 0 or fd_limit == resource.RLIM_INFINITY:
        return wanted or None
    room = max(16, fd_limit - FD_RESERVE)
    if wanted and wanted <= room:
        return wanted
    log.warning("--max-connections %s lowered to %d: the open-files limit is %d",
                wanted or "(none)", room, fd_limit)
    return room


def uvicorn_config(app: Any, host: str, port: int, settings: ServerSettings,
                   **overrides: Any) -> Any:
    """The uvicorn Config both launchers (and BackgroundServer) serve with: the guarded
    protocol, the connection cap, and the client address from the socket unless trusted
    proxies were named. `overrides` are more uvicorn Config arguments."""
    import uvicorn

    _, fd_limit = raise_fd_limit()
    proxies = settings.forwarded_allow_ips
    options: dict[str, Any] = dict(
        host=host, port=port, http=protocol_class(settings.header_timeout_s),
        limit_concurrency=connection_cap(settings.max_connections, fd_limit),
        proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)
    options.update(overrides)
    return uvicorn.Config(app, **options)


def protect(app: Any, settings: ServerSettings, upload_bytes: int | None = None) -> None:
    """Add the body guard and the security headers to a Starlette/FastAPI app (call last:
    the headers then reach every answer, the login gate's included)."""
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes,
                       upload_bytes=upload_bytes, chunk_timeout_s=settings.body_timeout_s)
    space = os.environ.get("SPACE_ID")
    app.add_middleware(SecurityHeaders,
                       headers=security_headers(SPACE_FRAME_ANCESTORS if space else None))


__all__ = ["BodyGuard", "GuardedH11Protocol", "SecurityHeaders", "protect", "protocol_class",
           "raise_fd_limit", "security_headers", "uvicorn_config"]
