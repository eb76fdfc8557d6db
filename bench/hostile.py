"""Replays the heaviest cases of the security probe (issue 30) against a real `app.py`
process on a loopback port and prints, for each one, what the server answered, how long
it took, the server's peak RSS growth and the longest `/health` answer while it ran.

    python bench/hostile.py                      # this checkout
    python bench/hostile.py --repo /tmp/before   # another checkout (e.g. the commit before)

Cases: PDF pages of 7000 and 20000 pt sent to the page's /chat endpoint; a 1080p video
of 150 frames sent to /v1/chat/completions; Save JSON of a kept chat naming one picture
12000 times; an answer of 300000 boxes drawn by the page (the app in remote mode in
front of a stand-in server that answers it); 1100 connections that send half their
headers, under a 1024 descriptor limit. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table  # noqa: E402
from bench.soak import ServerProcess  # noqa: E402

HEALTH_EVERY_S = 0.1
FD_LIMIT = 1024


# --------------------------------------------------------------------------- inputs
def pdf_by_hand(objects: list[bytes]) -> bytes:
    """A PDF file around these objects (1 0 obj is the catalog), with a correct xref."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def pdf_with_page(points: int) -> bytes:
    """A one-page PDF of `points` x `points` pt (a few hundred bytes)."""
    return pdf_by_hand([b"<< /Type /Catalog /Pages 2 0 R >>",
                        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] >>"
                        % (points, points)])


def video_1080p(frames: int) -> bytes:
    """A flat-colour 1920x1080 H.264 clip (a few KB, full size when decoded)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        picture = np.full((1080, 1920, 3), 90, dtype=np.uint8)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def boxes_answer(n: int) -> str:
    rows = ",".join(f'{{"bbox_2d": [{i % 400}, {i % 300}, {i % 400 + 9}, {i % 300 + 9}], '
                    f'"label": "box"}}' for i in range(n))
    return "```json\n[" + rows + "]\n```"


# --------------------------------------------------------------------------- processes
class App(ServerProcess):
    """`app.py` of a checkout on a free loopback port, its descriptors capped at FD_LIMIT."""

    def __init__(self, repo: Path, extra: list[str]) -> None:
        super().__init__("tiny", False, [], {}, start_timeout=240)
        self.args = [sys.executable, "app.py", "--server-port", str(self.port), "--no-warmup",
                     "--log-level", "warning", *extra]
        self.repo = self.cwd = repo
        self.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                     (FD_LIMIT, FD_LIMIT))

    def rss(self) -> int:
        return self.status().get("VmRSS", 0)


@contextmanager
def stand_in_remote(answer: str) -> Iterator[str]:
    """An OpenAI-style server on loopback whose every answer is `answer`, streamed."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from server.background import BackgroundServer

    api = FastAPI()

    @api.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": "stand-in", "object": "model", "max_model_len": 16384, "root": "stand-in"}]})

    @api.post("/v1/chat/completions")
    async def chat() -> Response:
        def events() -> Iterator[str]:
            for i in range(0, len(answer), 65536):
                delta = {"choices": [{"index": 0, "delta": {"content": answer[i:i + 65536]}}]}
                yield f"data: {json.dumps(delta)}\n\n"
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    with BackgroundServer(api) as srv:
        yield srv.url + "/v1"


# --------------------------------------------------------------------------- measuring
@dataclass
class Watch:
    """Samples the app's RSS and times /health while a case runs."""

    app: App
    peak_mb: int = 0
    worst_health_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _rss(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mb = max(self.peak_mb, self.app.rss())
            except OSError:
                return
            time.sleep(0.02)

    def _health(self) -> None:
        import httpx

        while not self._stop.is_set():
            start = time.monotonic()
            try:
                httpx.get(f"{self.app.base}/health", timeout=30)
            except httpx.HTTPError:
                pass
            self.worst_health_s = max(self.worst_health_s, time.monotonic() - start)
            self._stop.wait(HEALTH_EVERY_S)

    def run(self, case: Callable[[App], str]) -> tuple[str, float]:
        threads = [threading.Thread(target=t, daemon=True) for t in (self._rss, self._health)]
        for t in threads:
            t.start()
        start = time.monotonic()
        try:
            outcome = case(self.app)
        except Exception as exc:       # what the server did is the measurement
            outcome = f"{type(exc).__name__}: {str(exc)[:80]}"
        took = time.monotonic() - start
        time.sleep(0.3)
        self._stop.set()
        for t in threads:
            t.join(35)
        return outcome, took


def upload(app: App, name: str, data: bytes) -> str:
    import httpx

    resp = httpx.post(f"{app.base}/gradio_api/upload", files={"files": (name, data)}, timeout=60)
    resp.raise_for_status()
    return resp.json()[0]


def page_chat(app: App, text: str, path: str) -> str:
    """The page's named /chat endpoint (what gradio_client calls), read to its end."""
    import httpx

    message = {"text": text, "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]}
    resp = httpx.post(f"{app.base}/gradio_api/call/chat", timeout=120,
                      json={"data": [message, "", 8, 0, 1, 0, 1.0, 1]})
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}"
    event = resp.json()["event_id"]
    with httpx.stream("GET", f"{app.base}/gradio_api/call/chat/{event}", timeout=120) as sse:
        last = ""
        for line in sse.iter_lines():
            if line.startswith("event:"):
                last = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and last == "error":
                return "error: " + line[5:].strip()[:70]
    return last or "?"


def case_pdf(points: int) -> Callable[[App], str]:
    def run(app: App) -> str:
        return page_chat(app, "Read this.", upload(app, "big.pdf", pdf_with_page(points)))
    return run


def case_video(fps: float) -> Callable[[App], str]:
    def run(app: App) -> str:
        import httpx

        uri = "data:video/mp4;base64," + base64.b64encode(video_1080p(150)).decode()
        resp = httpx.post(f"{app.base}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "max_tokens": 4, "mm_processor_kwargs": {"fps": fps},
            "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": uri}},
                {"type": "text", "text": "What happens?"}]}]})
        return f"HTTP {resp.status_code}"
    return run


def case_export(app: App) -> str:
    import httpx

    picture = str(app.repo.resolve() / "assets" / "shapes.png")
    turn = {"role": "user", "text": "look", "files": [{"path": picture, "name": "shapes.png"}] * 12000}
    state = {"version": 1, "system": "", "turns": [turn, {"role": "assistant", "text": "ok"}]}
    resp = httpx.post(f"{app.base}/gradio_api/run/on_export", json={"data": [state]}, timeout=300)
    return f"HTTP {resp.status_code}, {len(resp.content) / 2**10:,.0f} KB"


def case_boxes(app: App) -> str:
    """The page's generate event through the queue (as the browser runs it), read to its end."""
    import httpx

    picture = str(app.repo.resolve() / "assets" / "shapes.png")
    state = {"version": 1, "system": "", "turns": [
        {"role": "user", "text": "Detect.", "files": [{"path": picture, "name": "shapes.png"}]}]}
    resp = httpx.post(f"{app.base}/gradio_api/call/generate", timeout=300, json={
        "data": [state, 16, 0, 1, 0, 1.0, 1, 224 * 224, 1280 * 28 * 28]})
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}"
    event = resp.json()["event_id"]
    last, data = "", ""
    with httpx.stream("GET", f"{app.base}/gradio_api/call/generate/{event}", timeout=300) as sse:
        for line in sse.iter_lines():
            if line.startswith("event:"):
                last = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = line[5:]
    if last != "complete":
        return f"{last}: {data[:60]}"
    state = json.loads(data)[0]
    answer = state["turns"][-1]
    return f"{len(answer['text']) / 2**20:.1f} MB answer, " \
           f"{len(answer.get('figures') or [])} picture(s) drawn"


def case_half_open(app: App) -> str:
    """1100 connections that send half their headers and wait; then one whole request."""
    import httpx

    socks = []
    try:
        for _ in range(1100):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", app.port))
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError:
                s.close()
                break
            socks.append(s)
        time.sleep(1.0)
        start = time.monotonic()
        try:
            code = httpx.get(f"{app.base}/health", timeout=30).status_code
        except httpx.HTTPError as exc:
            code = type(exc).__name__
        return f"{len(socks)} open; /health {code} in {time.monotonic() - start:.2f} s"
    finally:
        for s in socks:
            s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose app.py runs")
    p.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = p.parse_args(argv)
    cases: list[tuple[str, list[str], Callable[[App], str]]] = [
        ("PDF page 7000 pt (/chat)", [], case_pdf(7000)),
        ("PDF page 20000 pt (/chat)", [], case_pdf(20000)),
        ("video 1080p, 150 frames, fps 2 (API)", [], case_video(2)),
        ("video 1080p, 150 frames, fps 30 (API)", [], case_video(30)),
        ("Save JSON, one picture x12000", [], case_export),
        ("answer of 300000 boxes (page)", ["remote"], case_boxes),
        ("1100 half-open connections", [], case_half_open),
    ]
    rows = []
    for name, needs, case in cases:
        if args.only and not any(o in name for o in args.only):
            continue
        with contextmanager(lambda: (yield None))() if "remote" not in needs else \
                stand_in_remote(boxes_answer(300_000)) as remote:
            extra = ["--model", "tiny"] if remote is None else \
                ["--backend", "remote", "--remote-url", remote]
            with App(args.repo, extra) as app:
                time.sleep(1.0)
                base = app.rss()
                watch = Watch(app)
                outcome, took = watch.run(case)
                rows.append([name, outcome, f"{took:.1f}", f"{max(0, watch.peak_mb - base)}",
                             f"{watch.worst_health_s:.2f}"])
                print(f"{name}: {outcome} ({took:.1f} s)", flush=True)
    print_table(f"Hostile cases against {args.repo}", ["case", "outcome", "s",
                                                       "peak RSS growth MB", "worst /health s"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
