"""The engine's figures: each request's final record and its log line, the cache figures
(the engine's snapshot), and the periodic engine line, like vLLM's: every `interval_s`
while there is work, one log line with the running and waiting requests, the KV cache's
use and the prompt and generation throughput since the last line; silent while idle."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..base import EngineSnapshot
from ..errors import EngineError
from ..inputs.caches import BoundedCache
from ..types import FinishReason, RequestStats
from .prefix import PrefixCache
from .scheduler import WorkItem

log = logging.getLogger("engine.stats")
requests_log = logging.getLogger("engine.requests")


def request_stats(item: WorkItem, first_token_at: float | None, tokens: int, start: float,
                  cached: int = 0) -> RequestStats:
    """A request's final record: its prompt, its times from arrival, what it generated
    (and how much of it after a cancel), the prompt tokens the prefix cache gave."""
    now = time.monotonic()
    arrival = item.request.arrival_time
    at_cancel = item.handle.tokens_at_cancel
    return RequestStats(prompt_tokens=item.prompt.prompt_tokens, images=item.prompt.images,
                        videos=item.prompt.videos, output_tokens=tokens,
                        queue_s=max(0.0, start - arrival),
                        ttft_s=None if first_token_at is None else first_token_at - arrival,
                        total_s=now - arrival,
                        tokens_after_cancel=None if at_cancel is None
                        else max(0, tokens - at_cancel), cached_tokens=cached)


def log_request(request_id: str, reason: FinishReason, stats: RequestStats,
                error: EngineError | None = None) -> None:
    """The one line per finished request (logger engine.requests)."""
    requests_log.info(
        "request %s: prompt_tokens=%d cached_tokens=%d images=%d videos=%d queue=%.3fs "
        "ttft=%s output_tokens=%d tokens/s=%.1f finish=%s%s%s", request_id,
        stats.prompt_tokens, stats.cached_tokens, stats.images, stats.videos, stats.queue_s,
        "-" if stats.ttft_s is None else f"{stats.ttft_s:.3f}s", stats.output_tokens,
        stats.decode_tps, reason,
        "" if stats.tokens_after_cancel is None or reason != "cancelled"
        else f" tokens_after_cancel={stats.tokens_after_cancel}",
        f" error={error.message!r}" if error else "")


def bounded_cache_figures(name: str, cache: BoundedCache[Any] | None) -> dict[str, int]:
    """A bounded cache's hits, misses and bytes as `name`_hits, `name`_misses, `name`_bytes
    (the engine snapshot's fields); nothing for a cache that does not exist."""
    if cache is None:
        return {}
    return {f"{name}_hits": cache.hits, f"{name}_misses": cache.misses,
            f"{name}_bytes": cache.bytes}


def cache_figures(encoder: BoundedCache[Any], prefix: PrefixCache | None) -> dict[str, int]:
    """The device side's cache figures: the encoder cache's, and the prefix cache's where it
    is on (the engine snapshot's fields)."""
    out = bounded_cache_figures("encoder_cache", encoder)
    if prefix is not None:
        out.update(prefix_cache_queries=prefix.stats.queries,
                   prefix_cache_hits=prefix.stats.hits,
                   prefix_cache_bytes=prefix.cached_bytes,
                   prefix_cache_allocated_bytes=prefix.allocated_bytes)
    return out


def _totals(snapshot: EngineSnapshot) -> tuple[int, int, int]:
    return (snapshot.requests_finished or 0, snapshot.prompt_tokens or 0,
            snapshot.generation_tokens or 0)


class StatsLogger:
    """A daemon thread reading the engine's snapshots; `close()` stops it."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], interval_s: float = 10.0) -> None:
        self.snapshot = snapshot
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._last = (time.monotonic(), *_totals(snapshot()))
        self._thread = threading.Thread(target=self._loop, name="engine-stats", daemon=True)
        if interval_s > 0:
            self._thread.start()

    def line(self) -> str | None:
        """The line for the time since the last call, or None when nothing happened."""
        now, snap = time.monotonic(), self.snapshot()
        done, prompt, generated = _totals(snap)
        then, done0, prompt0, generated0 = self._last
        self._last = (now, done, prompt, generated)
        running, waiting = snap.running or 0, snap.waiting
        if not (running or waiting or done > done0):
            return None
        span = max(1e-9, now - then)
        return (f"engine: running={running} waiting={waiting} "
                f"kv_cache={100 * (snap.kv_usage or 0.0):.1f}% {_caches(snap)}"
                f"prompt_tokens/s={(prompt - prompt0) / span:.1f} "
                f"generation_tokens/s={(generated - generated0) / span:.1f} "
                f"finished={done - done0} in {span:.1f}s")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                text = self.line()
            except Exception:   # never let the stats thread take anything down
                log.exception("stats line failed")
                continue
            if text:
                log.info(text)

    def close(self) -> None:
        self._stop.set()


def _caches(snap: EngineSnapshot) -> str:
    """Prefix cache hit rate and encoder cache hits since start, as vLLM reports them."""
    text = ""
    if snap.prefix_cache_queries is not None:
        rate = (snap.prefix_cache_hits or 0) / snap.prefix_cache_queries \
            if snap.prefix_cache_queries else 0.0
        text = (f"prefix_cache_hit_rate={100 * rate:.1f}% "
                f"prefix_cache={(snap.prefix_cache_bytes or 0) / 2 ** 20:.1f}MiB ")
    return text + f"encoder_cache_hits={snap.encoder_cache_hits or 0} "
