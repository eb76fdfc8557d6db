"""Who may use the server: the `--auth` users (the web page's login) and the
`--api-key`, checked the same way at every door. With `--auth`, the API takes
the same users as HTTP Basic credentials or as a bearer token `USER:PASS`
(so the `openai` client works with `api_key="alice:secret"`); `--api-key` adds
one more bearer key, or is the only one."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from pathlib import Path


def parse_auth(values: list[str] | None) -> list[tuple[str, str]] | None:
    """USER:PASS entries, given directly or as files of them (blank lines and # comments skipped)."""
    pairs: list[tuple[str, str]] = []
    for value in values or []:
        path = Path(value).expanduser()
        if path.is_file():
            lines = [(f"{path}:{n}", line.strip()) for n, line in
                     enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
            lines = [(where, line) for where, line in lines if line and not line.startswith("#")]
        else:
            lines = [("--auth", value)]
        for where, line in lines:
            user, sep, password = line.partition(":")
            if not sep or not user.strip() or not password:
                raise ValueError(f"{where}: expected USER:PASS (or the path of a file of them)")
            pairs.append((user.strip(), password))
    return pairs or None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Credentials:
    """The users and the API key; empty means the door is open."""

    users: tuple[tuple[str, str], ...] = ()
    api_key: str | None = None

    @property
    def required(self) -> bool:
        return bool(self.users or self.api_key)

    def user_ok(self, user: str, password: str) -> bool:
        # every pair is compared, so timing does not tell which user exists
        ok = False
        for u, p in self.users:
            ok |= _same(user, u) & _same(password, p)
        return ok

    def allows(self, authorization: str | None) -> bool:
        """An `Authorization` header: `Bearer KEY`, `Bearer USER:PASS` or `Basic base64(USER:PASS)`."""
        return not self.required or self.identify(authorization) is not None

    def identify(self, authorization: str | None) -> tuple[str | None, bool] | None:
        """Who a valid `Authorization` header names: (user, False) for a login, (None, True)
        for the API key; None when it is missing or wrong (the per-client cap's key)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == "basic":
            try:
                token = base64.b64decode(token, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return None
        elif scheme != "bearer":
            return None
        if bool(self.api_key) and scheme == "bearer" and _same(token, self.api_key or ""):
            return None, True
        user, sep, password = token.partition(":")
        if sep and self.user_ok(user, password):
            return user, False
        return None

    def challenge(self) -> str:
        """The WWW-Authenticate header for a 401."""
        return 'Basic realm="Qwen2.5-VL", charset="UTF-8"' if self.users else "Bearer"
