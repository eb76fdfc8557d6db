"""The web page's login at every Gradio route, plus a back-off after failed logins.

Gradio checks its login cookie on the routes that run events or serve files, but not
on all of them (the heartbeat, `cancel`, `reset`, stream and run-history routes answer
anyone, so a known session hash lets a stranger cancel another user's answer). This
ASGI middleware sits in front of the whole app: with `--auth`, a request to the page's
routes needs Gradio's own session cookie unless it is one of the few the login page
itself loads. The API's routes (`/v1/*`, `/version`, `/metrics`) check credentials
themselves, and `/health` is open for probes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

ASGIApp = Callable[..., Awaitable[None]]

API_PATHS = ("/v1/", "/health", "/version", "/metrics")
# What the login page loads before anyone is logged in.
PUBLIC_EXACT = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css",
                "/robots.txt", "/manifest.json", "/gradio_api/theme.css",
                "/gradio_api/login_check", "/gradio_api/login_check/", "/config", "/config/"}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")

FREE_FAILURES = 5          # failed logins from one address before the back-off starts
MAX_BACKOFF_S = 300.0
FORGET_S = 900.0           # failures older than this are forgotten
MAX_TRACKED = 10_000       # addresses remembered at once (the oldest are forgotten first)


class LoginBackoff:
    """Per-address count of failed logins: after FREE_FAILURES, each new attempt must wait
    2, 4, 8, ... seconds (at most MAX_BACKOFF_S) after the last failure."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    def wait_s(self, client: str) -> float:
        count, last = self._failures.get(client, (0, 0.0))
        if count < FREE_FAILURES:
            return 0.0
        now = self.clock()
        if now - last > FORGET_S:
            self._failures.pop(client, None)
            return 0.0
        return max(0.0, last + min(MAX_BACKOFF_S, 2.0 ** (count - FREE_FAILURES + 1)) - now)

    def failed(self, client: str) -> None:
        count, _ = self._failures.pop(client, (0, 0.0))
        self._failures[client] = (count + 1, self.clock())   # newest last
        while len(self._failures) > MAX_TRACKED:
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


async def _json(send: Callable, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class LoginGate:
    """ASGI middleware: `logged_in(scope)` says whether the request carries a valid
    session (Gradio's cookie); `enabled` is False without `--auth`."""

    def __init__(self, app: ASGIApp, logged_in: Callable[[dict], bool], enabled: bool,
                 backoff: LoginBackoff | None = None) -> None:
        self.app = app
        self.logged_in = logged_in
        self.enabled = enabled
        self.backoff = backoff or LoginBackoff()

    @staticmethod
    def is_public(path: str) -> bool:
        return (path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)
                or path.startswith(API_PATHS))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not self.enabled or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in ("/login", "/login/") and scope.get("method") == "POST":
            return await self._login(scope, receive, send)
        if self.is_public(path) or self.logged_in(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _json(send, 401, {"detail": "Not authenticated: log in first."})

    async def _login(self, scope: dict, receive: Callable, send: Callable) -> None:
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.backoff.wait_s(client)
        if wait > 0:
            await _json(send, 429, {"detail": f"Too many failed logins: try again in "
                                              f"{wait:.0f} s."},
                        [(b"retry-after", str(max(1, round(wait))).encode())])
            return
        status: dict[str, int] = {}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.backoff.succeeded(client)
        elif status.get("code") in (400, 401):
            self.backoff.failed(client)


def gradio_session_check(gradio_app: Any) -> Callable[[dict], bool]:
    """Whether a request's cookies hold a session Gradio's login created."""
    from http.cookies import SimpleCookie

    def logged_in(scope: dict) -> bool:
        raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie")
        if not raw:
            return False
        cookies = SimpleCookie()
        try:
            cookies.load(raw.decode("latin-1"))
        except Exception:
            return False
        cid = gradio_app.cookie_id
        for name in (f"access-token-{cid}", f"access-token-unsecure-{cid}"):
            morsel = cookies.get(name)
            if morsel is not None and morsel.value in gradio_app.tokens:
                return True
        return False

    return logged_in
