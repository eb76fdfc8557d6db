"""A fair share of the engine: a cap on the generations one client runs at once.

Without it one client with 48 long streams fills the batch and the queue, and everyone
else's requests are refused as "busy". With it, each client (its login, its API key, or
else the address the server sees) may run at most `limit` generations at once; one more
is refused at once with a 429 and Retry-After, while other clients still get in. The
whole server being full is still the engine's 503 "busy".

One `ClientSlots` serves the API and the web page together (app.py makes one and hands
it to both), so a user cannot double their share by using both doors:

    slot = slots.acquire(client_id(user=..., address=...))   # ClientBusyError when full
    try:
        ... generate, stream ...
    finally:
        slot.release()                                         # idempotent

or `with slots.acquire(key): ...`. It is thread-safe: the API calls it on the event loop,
Gradio's callbacks from worker threads.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.errors import EngineError

RETRY_AFTER_S = 1   # a polite client's wait before trying again (the Retry-After header)


class ClientBusyError(EngineError):
    """This client already runs as many generations as it may: a 429, not the server's 503."""

    code = 429
    type = "RateLimitError"   # the openai client's name for a 429 (vLLM's types follow it)


def client_id(user: str | None = None, api_key: bool = False, address: str | None = None) -> str:
    """The one spelling of "who is asking", shared by the API and the page: the login user
    when there is one, else the API key, else the address the server sees."""
    if user:
        return f"user:{user}"
    if api_key:
        return "api-key"
    return f"addr:{address or '?'}"


class Slot:
    """One generation's place in its client's share; `release()` may be called any number of
    times (a stream's end and its disconnect may both try)."""

    def __init__(self, owner: "ClientSlots | None", client: str) -> None:
        self._owner = owner
        self.client = client

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self.client)

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class ClientSlots:
    """Counts each client's running generations against `limit` (0: no cap, slots are free)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}   # only clients with at least one running

    def acquire(self, client: str) -> Slot:
        """A slot for `client`, or ClientBusyError when it already holds `limit` of them."""
        if not self.limit:
            return Slot(None, client)
        with self._lock:
            held = self._running.get(client, 0)
            if held >= self.limit:
                raise ClientBusyError(
                    f"Too many requests at once from this client: {held} generations are "
                    f"already running (the limit per client is {self.limit}, see "
                    "--max-client-requests); wait for one to finish.")
            self._running[client] = held + 1
        return Slot(self, client)

    def _release(self, client: str) -> None:
        with self._lock:
            held = self._running.get(client, 0) - 1
            if held > 0:
                self._running[client] = held
            else:
                self._running.pop(client, None)

    def running(self, client: str) -> int:
        """How many generations `client` runs now (for tests and metrics)."""
        with self._lock:
            return self._running.get(client, 0)


__all__ = ["RETRY_AFTER_S", "ClientBusyError", "ClientSlots", "Slot", "client_id"]
