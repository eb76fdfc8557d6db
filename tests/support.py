"""Shared test helpers: `python app.py` as a subprocess whose log the tests read,
and an httpx guard that fails any request not addressed to loopback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

REQUEST_LINE = re.compile(r"engine\.requests: request (\S+): .*output_tokens=(\d+) .*finish=(\w+)")


def tiny_engine_with(model_dir, **overrides):
    """A LocalEngine on the tiny model, on the CPU, without warm-up or the periodic engine
    line, with `overrides` of its EngineConfig (the caller closes it)."""
    from engine.config import EngineConfig
    from engine.backends.local import LocalEngine

    settings = {"model": str(model_dir), "device": "cpu", "warmup": False,
                "log_stats_interval": 0, **overrides}
    return LocalEngine.from_config(EngineConfig(**settings))


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium_page(width: int = 1360, height: int = 1000) -> Iterator:
    """A Playwright page in Debian's headless Chromium (20 s default timeout)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(20_000)
        try:
            yield page
        finally:
            browser.close()


def openai_stub(model_id: str, max_model_len: int):
    """A FastAPI app with an OpenAI-style server's /v1/models and /health: tests add their
    own /v1/chat/completions."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "root": model_id,
                                            "max_model_len": max_model_len}]}

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    return app


def free_port() -> int:
    """A loopback port nobody listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` in a subprocess; its output is collected for log checks."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--no-warmup",
             "--server-port", str(self.port), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("app.py exited:\n" + "".join(self.lines[-30:]))
            if any("Running on local URL" in line for line in self.lines):
                return
            time.sleep(0.1)
        raise AssertionError("app.py did not start:\n" + "".join(self.lines[-30:]))

    def requests(self) -> list[tuple[str, int, str]]:
        """(request id, output tokens, finish reason) of every request the engine finished."""
        return [(m[1], int(m[2]), m[3]) for m in map(REQUEST_LINE.search, list(self.lines)) if m]

    def wait_requests(self, n: int, timeout: float = 20) -> list[tuple[str, int, str]]:
        deadline = time.monotonic() + timeout
        while len(self.requests()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests()) >= n, "".join(self.lines[-20:])
        return self.requests()

    def __enter__(self) -> "AppServer":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 in any spelling inet_aton takes (127.1, 2130706433), ::1."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return host in ("::1", "::ffff:127.0.0.1")


@contextmanager
def loopback_only() -> Iterator[list[str]]:
    """Every httpx request made inside must target loopback, even if a guard under test breaks."""
    blocked: list[str] = []
    original = httpx.HTTPTransport.handle_request

    def guarded(self, request):
        if not is_loopback(request.url.host):
            blocked.append(str(request.url))
            raise AssertionError(f"test tried to reach {request.url}")
        return original(self, request)

    httpx.HTTPTransport.handle_request = guarded
    try:
        yield blocked
    finally:
        httpx.HTTPTransport.handle_request = original
    assert not blocked, blocked


@pytest.fixture(scope="module", autouse=True)
def guard_loopback() -> Iterator[list[str]]:
    """Every HTTP request made by a module that imports this must target loopback, even if a
    guard under test breaks (the URLs it tried are yielded; the fixture fails if any)."""
    with loopback_only() as blocked:
        yield blocked


class FinishLog:
    """Finished events by request id, as the engine reports them to a finish listener."""

    def __init__(self) -> None:
        self.events: dict[str, object] = {}
        self.requests: dict[str, object] = {}
        self.cond = threading.Condition()

    def __call__(self, request, event) -> None:
        with self.cond:
            self.events[request.request_id] = event
            self.requests[request.request_id] = request
            self.cond.notify_all()

    def wait_all(self, predicate, count: int, timeout: float = 15.0) -> list:
        """The first `count` (request, event) pairs matching predicate(request, event)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [(self.requests[rid], ev) for rid, ev in self.events.items()
                         if predicate(self.requests[rid], ev)]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(found)} of {count} requests finished"
                self.cond.wait(left)

    def wait(self, predicate, timeout: float = 15.0):
        """The first (request, event) matching predicate(request, event)."""
        return self.wait_all(predicate, 1, timeout)[0]


def status_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measured(fn: Callable[..., Any], *args: Any, catch: bool = False,
             **kwargs: Any) -> tuple[Any, float, float]:
    """(result, seconds, peak memory growth in MB) of one call. The peak is VmHWM after
    resetting it (/proc/self/clear_refs), so a picture made and dropped inside counts.
    `catch`: an exception is returned as the result (the caller checks it was expected)."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        peak = "VmHWM"
    except OSError:                    # no reset here: the growth that stays
        peak = "VmRSS"
    before = status_mb("VmRSS")
    start = time.monotonic()
    try:
        result: Any = fn(*args, **kwargs)
    except Exception as exc:           # noqa: BLE001
        if not catch:
            raise
        result = exc
    return result, time.monotonic() - start, status_mb(peak) - before
