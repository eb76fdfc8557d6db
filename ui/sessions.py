"""Which engine requests belong to which browser session, so Stop (and a
closed tab) can cancel them on the engine itself, not only the UI stream."""

from __future__ import annotations

import threading
from collections import defaultdict

from engine.stream import RequestHandle


class ActiveRequests:
    """Thread-safe map: session hash -> running handles, plus Stops that came
    before their request reached the engine (still waiting in Gradio's queue)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[str, set[RequestHandle]] = defaultdict(set)
        self._early_stop: set[str] = set()

    def add(self, session: str, handle: RequestHandle) -> None:
        with self._lock:
            self._handles[session].add(handle)

    def remove(self, session: str, handle: RequestHandle) -> None:
        with self._lock:
            handles = self._handles.get(session)
            if handles is not None:
                handles.discard(handle)
                if not handles:
                    del self._handles[session]

    def stop(self, session: str, remember: bool = True) -> int:
        """Cancel the session's requests; with none running, remember the Stop
        for the request that is about to start. Returns how many were cancelled."""
        with self._lock:
            handles = list(self._handles.get(session, ()))
            if not handles and remember:
                self._early_stop.add(session)
        for handle in handles:
            handle.cancel()
        return len(handles)

    def take_early_stop(self, session: str) -> bool:
        with self._lock:
            if session in self._early_stop:
                self._early_stop.discard(session)
                return True
            return False

    def forget_stop(self, session: str) -> None:
        """A new message was sent: an old, unused Stop must not cancel it."""
        with self._lock:
            self._early_stop.discard(session)

    def count(self) -> int:
        with self._lock:
            return sum(len(h) for h in self._handles.values())
