"""Prometheus metrics without a client library: a few counters, gauges and
histograms behind one lock, fed by the engine's finish listener (which runs
on the device thread) and by the API's own refusals, and rendered in the
text exposition format (version 0.0.4) for GET /metrics; and vLLM's GET /load
figure (ServerLoad)."""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable

from engine.base import Engine, EngineSnapshot
from engine.types import Finished, GenerationRequest

from . import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "qwenvl_"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 300, 500)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's names for the same figures (its published Grafana dashboard reads these), each
# with the label set vLLM gives it; our finish reasons by vLLM's (errors are not successes).
VLLM_PREFIX = "vllm:"
VLLM_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}
# The engine's cache figures (EngineSnapshot.caches) as Prometheus metrics, as vLLM names them.
CACHE_METRICS = {
    "prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("counter", "Prompt tokens found in the prefix cache (not prefilled)."),
    "prefix_cache_bytes": ("gauge", "Device memory held by cached KV blocks."),
    "prefix_cache_allocated_bytes": ("gauge", "Device memory the prefix cache has allocated "
                                              "for KV blocks (it grows up to its budget)."),
    "encoder_cache_hits": ("counter", "Pictures and videos whose encoder output was cached."),
    "encoder_cache_misses": ("counter", "Pictures and videos run through the vision encoder."),
    "encoder_cache_bytes": ("gauge", "Device memory held by cached encoder outputs."),
    "picture_cache_hits": ("counter", "Pictures sent again, neither decoded nor resized again."),
    "picture_cache_misses": ("counter", "Pictures decoded and resized."),
    "picture_cache_bytes": ("gauge", "Host memory held by decoded, resized pictures."),
    "pixel_cache_hits": ("counter", "Pictures whose processed pixel values were cached."),
    "pixel_cache_misses": ("counter", "Pictures run through the image processor."),
    "pixel_cache_bytes": ("gauge", "Host memory held by cached pixel values."),
}


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)   # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{_fmt(bound)}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {_fmt(self.total)}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


class ServerLoad:
    """vLLM's `/load` figure: the chat and completion requests in flight, each counted from
    its arrival until its answer's last byte went out (or the client left). With tracking
    off (vLLM's default, --enable-server-load-tracking) it stays 0, as vLLM's does."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def value(self) -> int:
        with self._lock:
            return self._in_flight

    def enter(self) -> Callable[[], None]:
        """Count one request; the returned call uncounts it (only once, however often it
        is called: a stream's end and its client's disconnect may both call it)."""
        if not self.enabled:
            return lambda: None
        with self._lock:
            self._in_flight += 1
        done = threading.Event()

        def leave() -> None:
            if not done.is_set():
                done.set()
                with self._lock:
                    self._in_flight -= 1
        return leave


class MetricsRegistry:
    """Everything GET /metrics reports; all methods are thread-safe."""

    def __init__(self, model_name: str, device: str | None = None) -> None:
        self.model_name = model_name
        self.device = device   # the server_info metric's label (None: no such metric)
        self._lock = threading.Lock()
        self.finished = {reason: 0 for reason in FINISH_REASONS}
        self.refused: dict[int, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.output_tps = Histogram(TPS_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    # ------------------------------------------------------------------ feeding
    def on_finished(self, request: GenerationRequest, event: Finished) -> None:
        """The engine's finish listener: one call per request, UI and API alike."""
        stats = event.stats
        with self._lock:
            self.finished[event.reason] = self.finished.get(event.reason, 0) + 1
            self.prompt_tokens += stats.prompt_tokens
            self.generation_tokens += stats.output_tokens
            if stats.ttft_s is not None:
                self.ttft.observe(stats.ttft_s)
            if event.reason != "error" and stats.total_s > 0:
                self.latency.observe(stats.total_s)
            if stats.output_tokens > 0 and stats.output_tps > 0:
                self.output_tps.observe(stats.output_tps)
            gaps = stats.output_tokens - 1
            if stats.ttft_s is not None and gaps > 0 and stats.total_s > stats.ttft_s:
                # one observation per gap between tokens, at the request's mean gap: the
                # sum and count are exact, the buckets hold each request's mean
                mean = (stats.total_s - stats.ttft_s) / gaps
                for _ in range(gaps):
                    self.itl.observe(mean)

    def on_refused(self, code: int) -> None:
        """A request the API answered with an error before it reached the engine's queue."""
        with self._lock:
            self.refused[code] = self.refused.get(code, 0) + 1

    def attach(self, engine: Engine) -> "MetricsRegistry":
        engine.add_finish_listener(self.on_finished)
        return self

    # ------------------------------------------------------------------ output
    def render(self, engine: EngineSnapshot | None = None, healthy: bool | None = None) -> str:
        """Every metric, the engine's gauges and cache figures read from its snapshot."""
        engine = engine or EngineSnapshot()
        model = f'model_name="{_escape(self.model_name)}"'
        lines: list[str] = []

        def head(name: str, kind: str, help_: str) -> str:
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_}")
            lines.append(f"# TYPE {full} {kind}")
            return full

        with self._lock:
            name = head("requests_total", "counter",
                        "Requests the engine finished, by finish reason (stop, length, "
                        "cancelled, error).")
            for reason, count in self.finished.items():
                lines.append(f'{name}{{{model},finish_reason="{_escape(reason)}"}} {count}')
            name = head("requests_refused_total", "counter",
                        "API requests answered with an error before reaching the queue, by "
                        "HTTP status.")
            for code, count in sorted(self.refused.items()):
                lines.append(f'{name}{{{model},code="{code}"}} {count}')
            name = head("prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
            lines.append(f"{name}{{{model}}} {self.prompt_tokens}")
            name = head("generation_tokens_total", "counter", "Generated tokens.")
            lines.append(f"{name}{{{model}}} {self.generation_tokens}")
            name = head("time_to_first_token_seconds", "histogram",
                        "Time from arrival to the first generated token.")
            lines += self.ttft.lines(name, model)
            name = head("e2e_request_latency_seconds", "histogram",
                        "Time from arrival to the last token.")
            lines += self.latency.lines(name, model)
            name = head("output_tokens_per_second", "histogram",
                        "Generated tokens per second of each request (arrival to finish).")
            lines += self.output_tps.lines(name, model)
        name = head("requests_waiting", "gauge", "Requests waiting in the engine's queue.")
        lines.append(f"{name}{{{model}}} {engine.waiting}")
        if engine.running is not None:
            name = head("requests_running", "gauge", "Requests generating now.")
            lines.append(f"{name}{{{model}}} {engine.running}")
        if engine.kv_usage is not None:
            name = head("kv_cache_usage_perc", "gauge",
                        "Share of the KV cache's token positions in use (1 = full), as vLLM's.")
            lines.append(f"{name}{{{model}}} {_fmt(engine.kv_usage)}")
        for key, value in sorted(engine.caches().items()):
            kind, what = CACHE_METRICS.get(key, ("gauge", key))
            name = head(key + ("_total" if kind == "counter" else ""), kind, what)
            lines.append(f"{name}{{{model}}} {_fmt(value)}")
        if healthy is not None:
            name = head("engine_healthy", "gauge", "1 while the engine can serve requests.")
            lines.append(f"{name}{{{model}}} {int(healthy)}")
        if self.device is not None:
            name = head("server_info", "gauge", "Always 1; its labels name the server's version "
                                                "and the device the engine runs on.")
            lines.append(f'{name}{{{model},version="{_escape(__version__)}",'
                         f'device="{_escape(self.device)}"}} 1')
        return "\n".join(lines + self._vllm_lines(engine, model)) + "\n"

    def _vllm_lines(self, engine: EngineSnapshot, model: str) -> list[str]:
        """The same figures under vLLM's metric names and labels."""
        lines: list[str] = []

        def head(name: str, kind: str, help_: str) -> str:
            lines.append(f"# HELP {VLLM_PREFIX}{name} {help_}")
            lines.append(f"# TYPE {VLLM_PREFIX}{name} {kind}")
            return VLLM_PREFIX + name

        def gauge(name: str, help_: str, value: float | None) -> None:
            if value is not None:
                lines.append(f"{head(name, 'gauge', help_)}{{{model}}} {_fmt(value)}")

        gauge("num_requests_running", "Number of requests in model execution batches.",
              engine.running)
        gauge("num_requests_waiting", "Number of requests waiting to be processed.",
              engine.waiting)
        gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              engine.kv_usage)
        with self._lock:
            name = head("request_success_total", "counter",
                        "Count of successfully processed requests.")
            for ours, theirs in VLLM_FINISH_REASONS.items():
                lines.append(f'{name}{{{model},finished_reason="{theirs}"}} '
                             f'{self.finished.get(ours, 0)}')
            name = head("prompt_tokens_total", "counter", "Number of prefill tokens processed.")
            lines.append(f"{name}{{{model}}} {self.prompt_tokens}")
            name = head("generation_tokens_total", "counter",
                        "Number of generation tokens processed.")
            lines.append(f"{name}{{{model}}} {self.generation_tokens}")
            for metric, histogram, help_ in (
                    ("time_to_first_token_seconds", self.ttft,
                     "Histogram of time to first token in seconds."),
                    ("inter_token_latency_seconds", self.itl,
                     "Histogram of inter-token latency in seconds."),
                    ("e2e_request_latency_seconds", self.latency,
                     "Histogram of e2e request latency in seconds.")):
                lines += histogram.lines(head(metric, "histogram", help_), model)
        for ours, theirs in (("prefix_cache_queries", "prefix_cache_queries_total"),
                             ("prefix_cache_hits", "prefix_cache_hits_total")):
            value = getattr(engine, ours)
            if value is not None:
                name = head(theirs, "counter", CACHE_METRICS[ours][1])
                lines.append(f"{name}{{{model}}} {_fmt(value)}")
        return lines
