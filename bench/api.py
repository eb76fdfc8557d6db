"""Our OpenAI-compatible HTTP API as a benchmark target: the server in a
thread on 127.0.0.1, and streaming clients in a separate process that time
the first content chunk. Real clients are remote: parsing their streams in the
server's process would take the GIL from the server and the device thread and
overstate our cost. Optional: without server/, fastapi or uvicorn (a bare GPU
image) the benches skip this path with a note."""

from __future__ import annotations

import base64
import json
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from bench.common import BENCH_IMAGE, BENCH_PROMPT


@dataclass
class StreamResult:
    ttft_s: float | None
    total_s: float
    tokens: int
    text: str
    finish_reason: str | None


def api_unavailable_reason() -> str | None:
    """None when the API can be served here, else why not."""
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401

        from server.routes import create_api_app  # noqa: F401
    except Exception as exc:   # ImportError, or a half-built server package
        return f"HTTP API skipped ({type(exc).__name__}: {exc})"
    return None


def require_api(parser: Any) -> None:
    """Exit with one line (code 2) when the HTTP API cannot be served here."""
    reason = api_unavailable_reason()
    if reason:
        parser.exit(2, f"error: this benchmark needs the HTTP API: {reason}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """`create_api_app(engine, ServerSettings())` under uvicorn in a daemon thread."""

    def __init__(self, engine: Any) -> None:
        import uvicorn

        from server.routes import create_api_app
        from server.settings import ServerSettings

        self.port = _free_port()
        app = create_api_app(engine, ServerSettings())
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="bench-api", daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def model_id(self) -> str:
        import httpx

        return httpx.get(f"{self.base}/v1/models", timeout=30).json()["data"][0]["id"]


def image_data_uri() -> str:
    """The bench image as the API receives it (local paths are refused over HTTP)."""
    return "data:image/png;base64," + base64.b64encode(BENCH_IMAGE.read_bytes()).decode()


def chat_body(model: str, max_tokens: int, image_uri: str | None,
              text: str = BENCH_PROMPT) -> dict:
    content: list[dict] = []
    if image_uri:
        content.append({"type": "image_url", "image_url": {"url": image_uri}})
    content.append({"type": "text", "text": text})
    return {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": content}]}


def stream_chunks(client: Any, base: str, body: dict) -> Iterator[dict]:
    """The parsed `data:` chunks of one streamed chat completion, up to [DONE]; an HTTP
    error or an error chunk raises RuntimeError."""
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            yield obj


def stream_chat(client: Any, base: str, body: dict) -> StreamResult:
    """One streamed chat completion; TTFT is the first chunk carrying content."""
    start = time.monotonic()
    first = None
    parts: list[str] = []
    tokens = 0
    finish = None
    for obj in stream_chunks(client, base, body):
        if obj.get("choices"):
            choice = obj["choices"][0]
            delta = choice.get("delta", {}).get("content")
            if delta:
                if first is None:
                    first = time.monotonic() - start
                parts.append(delta)
            finish = choice.get("finish_reason") or finish
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
    return StreamResult(first, time.monotonic() - start, tokens, "".join(parts), finish)


def _client_process(conn: Any) -> None:
    """Child process: run batches of streaming clients on request, reply with results."""
    import httpx

    while True:
        job = conn.recv()
        if job is None:
            return
        base, body, clients, per_client, duration = job
        results: list[StreamResult] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = time.monotonic()
        stop_at = start + duration if duration else None

        def client() -> None:
            done = 0
            with httpx.Client(timeout=600) as http:
                while (done < per_client) if stop_at is None else (time.monotonic() < stop_at):
                    try:
                        res = stream_chat(http, base, body)
                    except Exception as exc:   # reported by the parent
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}")
                        return
                    done += 1
                    with lock:
                        results.append(res)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send((results, errors, time.monotonic() - start))


class ClientProcess:
    """Streaming HTTP clients in a spawned process (no fork of a process holding a model)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_process, args=(child,), daemon=True,
                                name="bench-http-clients")
        self.proc.start()
        child.close()

    def run(self, base: str, body: dict, clients: int = 1, per_client: int = 1,
            duration: float | None = None) -> tuple[list[StreamResult], list[str], float]:
        """(results, errors, wall seconds) of `clients` closed-loop streaming clients."""
        self.conn.send((base, body, clients, per_client, duration))
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
