"""The periodic engine line, like vLLM's: every `interval_s` while there is work,
one log line with the running and waiting requests, the KV cache's use and the prompt
and generation throughput since the last line; silent while idle."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("engine.stats")


class StatsLogger:
    """A daemon thread sampling a Scheduler (`running_count`, `queue_depth`, `kv_usage`,
    `totals`); `close()` stops it."""

    def __init__(self, worker: Any, interval_s: float = 10.0) -> None:
        self.scheduler = worker
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._last = (time.monotonic(), *worker.totals())
        self._thread = threading.Thread(target=self._loop, name="engine-stats", daemon=True)
        if interval_s > 0:
            self._thread.start()

    def line(self) -> str | None:
        """The line for the time since the last call, or None when nothing happened."""
        now, done, prompt, generated = time.monotonic(), *self.scheduler.totals()
        then, done0, prompt0, generated0 = self._last
        self._last = (now, done, prompt, generated)
        running, waiting = self.scheduler.running_count(), self.scheduler.queue_depth()
        if not (running or waiting or done > done0):
            return None
        span = max(1e-9, now - then)
        return (f"engine: running={running} waiting={waiting} "
                f"kv_cache={100 * self.scheduler.kv_usage():.1f}% {self._caches()}"
                f"prompt_tokens/s={(prompt - prompt0) / span:.1f} "
                f"generation_tokens/s={(generated - generated0) / span:.1f} "
                f"finished={done - done0} in {span:.1f}s")

    def _caches(self) -> str:
        """Prefix cache hit rate and encoder cache hits since start, as vLLM reports them."""
        c = self.scheduler.cache_figures()
        text = ""
        if "prefix_cache_queries" in c:
            rate = c["prefix_cache_hits"] / c["prefix_cache_queries"] if c[
                "prefix_cache_queries"] else 0.0
            text = (f"prefix_cache_hit_rate={100 * rate:.1f}% "
                    f"prefix_cache={c['prefix_cache_bytes'] / 2 ** 20:.1f}MiB ")
        return text + f"encoder_cache_hits={c['encoder_cache_hits']} "

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
