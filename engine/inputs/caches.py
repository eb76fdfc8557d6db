"""Small bounded caches for what a follow-up turn would otherwise compute again: decoded,
resized pictures (caller threads) and vision-encoder outputs (the device thread). Each is
an LRU map bounded in bytes, with its hit and miss counts for /metrics."""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


def content_key(*parts: bytes | str) -> bytes:
    """A 16-byte key over bytes and strings (blake2b: fast, and collisions are not a worry
    at this size)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


class BoundedCache(Generic[V]):
    """key -> value, least recently used dropped first once the sizes pass `max_bytes`
    (0: caches nothing). Thread-safe."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.size_of = size_of
        self._items: collections.OrderedDict[bytes, tuple[V, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: bytes, value: V) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
