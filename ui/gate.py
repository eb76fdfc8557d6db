"""The web page's login at every Gradio route, plus a back-off after failed logins.

Gradio checks its login cookie on the routes that run events or serve files, but not
on all of them (the heartbeat, `cancel`, `reset`, stream and run-history routes answer
anyone, so a known session hash lets a stranger cancel another user's answer). This
ASGI middleware sits in front of the whole app: with `--auth`, a request to the page's
routes needs Gradio's own session cookie unless it is one of the few the login page
itself loads. The API's routes (`/v1/*`, `/version`, `/metrics`) check credentials
themselves, and `/health` is open for probes.

Failed logins back off per (address, user name): a stranger's guesses at one name never
hold up another user behind the same proxy. The address is the socket's peer unless
`--forwarded-allow-ips` names trusted proxies, so a made-up X-Forwarded-For does not reset
the count. A browser that logged in gets a signed device cookie (OWASP's scheme) and its
logins as that user are counted per cookie, so guesses at a user's name from elsewhere
never lock that user out of their own browser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable, Hashable

ASGIApp = Callable[..., Awaitable[None]]

API_PATHS = ("/v1/", "/health", "/ping", "/version", "/metrics", "/tokenize", "/detokenize",
             "/tokenizer_info", "/load", "/invocations")
# What the login page loads before anyone is logged in.
PUBLIC_EXACT = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css",
                "/robots.txt", "/manifest.json", "/gradio_api/theme.css",
                "/gradio_api/login_check", "/gradio_api/login_check/", "/config", "/config/"}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")

FREE_FAILURES = 5          # failed logins per (address, user) before the back-off starts
MAX_BACKOFF_S = 300.0
FORGET_S = 900.0           # failures older than this are forgotten
MAX_TRACKED = 10_000       # keys remembered at once, in each of the two tiers below
LOGIN_BODY_MAX = 64 * 1024  # a login form is a user name and a password
DEVICE_COOKIE = "qwenvl-device"
DEVICE_COOKIE_MAX_AGE_S = 30 * 24 * 3600


class LoginBackoff:
    """Count of failed logins per key: after FREE_FAILURES, each new attempt must wait
    2, 4, 8, ... seconds (at most MAX_BACKOFF_S) after the last failure.

    Keys still below FREE_FAILURES and keys past it are kept apart, so flooding the first
    tier with made-up user names cannot push out (and so reset) a key being backed off."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._counting: dict[Hashable, tuple[int, float]] = {}
        self._backing_off: dict[Hashable, tuple[int, float]] = {}

    def wait_s(self, key: Hashable) -> float:
        count, last = self._backing_off.get(key, (0, 0.0))
        if count < FREE_FAILURES:
            return 0.0
        now = self.clock()
        if now - last > FORGET_S:
            self._backing_off.pop(key, None)
            return 0.0
        return max(0.0, last + min(MAX_BACKOFF_S, 2.0 ** (count - FREE_FAILURES + 1)) - now)

    def failed(self, key: Hashable) -> None:
        count, _ = self._counting.pop(key, None) or self._backing_off.pop(key, (0, 0.0))
        count += 1
        tier = self._backing_off if count >= FREE_FAILURES else self._counting
        tier[key] = (count, self.clock())   # newest last
        while len(tier) > MAX_TRACKED:
            tier.pop(next(iter(tier)))

    def succeeded(self, key: Hashable) -> None:
        self._counting.pop(key, None)
        self._backing_off.pop(key, None)


def login_key(address: str, user: str) -> tuple[str, str]:
    """The back-off's key for a login attempt: per address AND user name, so a stranger's
    failures on one name never hold up another user behind the same address (a proxy, a
    NAT). The name is hashed: it is the client's text, of any length."""
    return address, hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class DeviceCookies:
    """OWASP's device cookies: a browser that logged in as a user gets a cookie
    `user.nonce.signature` (HMAC-SHA256 with a secret made at start), and that user's logins
    from that browser are counted per cookie instead of per address, so a stranger's
    failures on the same name and address never lock the user out of their own browser."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, user_b64: str, nonce: str) -> str:
        return hmac.new(self._secret, f"{user_b64}.{nonce}".encode(), hashlib.sha256).hexdigest()

    def issue(self, user: str) -> str:
        user_b64 = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        nonce = secrets.token_hex(12)
        return f"{user_b64}.{nonce}.{self._sign(user_b64, nonce)}"

    def nonce_for(self, value: str | None, user: str) -> str | None:
        """The cookie's nonce when it is valid and was issued to `user`; else None."""
        user_b64, _, rest = (value or "").partition(".")
        nonce, _, signature = rest.partition(".")
        if not (user_b64 and nonce and signature):
            return None
        if not hmac.compare_digest(signature.encode(), self._sign(user_b64, nonce).encode()):
            return None
        expected = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        return nonce if hmac.compare_digest(user_b64.encode(), expected.encode()) else None


async def _json(send: Callable, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def request_cookies(scope: dict) -> SimpleCookie:
    """The request's cookies (empty when there are none or they do not parse)."""
    cookies: SimpleCookie = SimpleCookie()
    raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie")
    try:
        cookies.load(raw.decode("latin-1"))
    except Exception:
        cookies.clear()
    return cookies


async def read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit` or the client left."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


def replay(body: bytes, receive: Callable) -> Callable:
    """A receive channel that hands `body` over once, then the real channel (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict:
        return pending.pop() if pending else await receive()
    return receive_again


async def form_user(scope: dict, body: bytes) -> str:
    """The login form's user name, as Gradio reads it (stripped); "" when there is none."""
    from starlette.requests import Request

    try:
        form = await Request(scope, replay(body, _no_more)).form()
    except Exception:
        return ""
    user = form.get("username")
    return user.strip() if isinstance(user, str) else ""


async def _no_more() -> dict:
    return {"type": "http.disconnect"}


class LoginGate:
    """ASGI middleware: `logged_in(scope)` says whether the request carries a valid
    session (Gradio's cookie); `enabled` is False without `--auth`. Failed logins back off
    per (address, user), and per device cookie for a browser that logged in before."""

    def __init__(self, app: ASGIApp, logged_in: Callable[[dict], bool], enabled: bool,
                 backoff: LoginBackoff | None = None,
                 devices: DeviceCookies | None = None) -> None:
        self.app = app
        self.logged_in = logged_in
        self.enabled = enabled
        self.backoff = backoff or LoginBackoff()
        self.devices = devices or DeviceCookies()

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

    def _key(self, scope: dict, user: str) -> Hashable:
        """The back-off's key: this browser's device cookie for `user` if it has one,
        else the address the server sees (the socket's peer, or a trusted proxy's
        X-Forwarded-For with --forwarded-allow-ips) with the user name."""
        morsel = request_cookies(scope).get(DEVICE_COOKIE)
        nonce = self.devices.nonce_for(morsel.value if morsel else None, user)
        if nonce is not None:
            return "device", nonce
        return login_key((scope.get("client") or ("?", 0))[0], user)

    def _device_cookie(self, scope: dict, user: str) -> bytes:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        return (f"{DEVICE_COOKIE}={self.devices.issue(user)}; Max-Age={DEVICE_COOKIE_MAX_AGE_S}; "
                f"Path=/; HttpOnly; SameSite=Strict{secure}").encode()

    async def _login(self, scope: dict, receive: Callable, send: Callable) -> None:
        body = await read_body(receive, LOGIN_BODY_MAX)
        if body is None:
            await _json(send, 413, {"detail": f"The login form is larger than "
                                              f"{LOGIN_BODY_MAX // 1024} KB."})
            return
        user = await form_user(scope, body)
        key = self._key(scope, user)
        wait = self.backoff.wait_s(key)
        if wait > 0:
            await _json(send, 429, {"detail": f"Too many failed logins: try again in "
                                              f"{wait:.0f} s."},
                        [(b"retry-after", str(max(1, round(wait))).encode())])
            return
        status: dict[str, int] = {}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if message["status"] == 200 and user:   # a new device cookie at each login
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"set-cookie",
                                                       self._device_cookie(scope, user))]}
            await send(message)

        await self.app(scope, replay(body, receive), watch)
        if status.get("code") == 200:
            self.backoff.succeeded(key)
        elif status.get("code") in (400, 401):
            self.backoff.failed(key)


def gradio_session_check(gradio_app: Any) -> Callable[[dict], bool]:
    """Whether a request's cookies hold a session Gradio's login created."""

    def logged_in(scope: dict) -> bool:
        cookies = request_cookies(scope)
        cid = gradio_app.cookie_id
        for name in (f"access-token-{cid}", f"access-token-unsecure-{cid}"):
            morsel = cookies.get(name)
            if morsel is not None and morsel.value in gradio_app.tokens:
                return True
        return False

    return logged_in
