"""The OpenAI-compatible API on the tiny model, through real sockets: the
official `openai` client, raw SSE, every error with its status and vLLM's
shape, media refusals (no request ever leaves loopback), a full queue, API
keys and client disconnects."""

from __future__ import annotations

import base64
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import io
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import FinishLog, guard_loopback  # noqa: F401 (autouse: loopback only)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from engine.inputs import media  # noqa: E402
from engine.base import Engine  # noqa: E402
from engine.config import DEFAULT_MODEL, EngineConfig  # noqa: E402
from engine.backends.local import LocalEngine  # noqa: E402
from server.background import BackgroundServer  # noqa: E402
from server.routes import create_api_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "vllm-0.32"   # raw vLLM 0.32 responses
MAX_MODEL_LEN = 4096
MAX_QUEUE = 2
MAX_BODY_MB = 4


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine(tiny_random_model_dir):
    # The random build: its processor keeps the real bounds these tests count tokens with.
    eng = LocalEngine.from_config(EngineConfig(model=str(tiny_random_model_dir), warmup=False,
                                               max_model_len=MAX_MODEL_LEN, max_queue=MAX_QUEUE))
    eng.is_tiny = True
    eng.model_name = "tiny"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def finish_log(engine):
    log = FinishLog()
    engine.add_finish_listener(log)
    return log


@pytest.fixture(scope="module")
def server(engine):
    app = create_api_app(engine, ServerSettings(max_body_mb=MAX_BODY_MB))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png_data_uri(size=(448, 448), color=(200, 40, 40)) -> str:
    img = Image.new("RGB", size, "white")
    img.paste(color, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> dict:
    content = []
    for p in parts:
        if isinstance(p, str) and p.startswith(("data:", "http", "file:")):
            content.append({"type": "image_url", "image_url": {"url": p}})
        else:
            content.append({"type": "text", "text": p})
    return {"role": "user", "content": content}


def sse_events(lines) -> list:
    """Parsed `data:` payloads of an SSE response ("[DONE]" kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def assert_error_shape(resp: httpx.Response, status: int, param: str | None = None,
                       contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains in err["message"], err["message"]
    return err


# --------------------------------------------------------------------------- endpoints
def test_models_health_version(http, engine):
    resp = http.get("/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["tiny", DEFAULT_MODEL]
    ref = json.loads((REFERENCE / "models.json").read_text())["data"][0]
    for card in body["data"]:
        assert {"id", "object", "created", "owned_by", "root", "parent",
                "max_model_len"} <= set(card)
        assert set(ref) - set(card) <= {"permission"}
        assert card["max_model_len"] == MAX_MODEL_LEN and card["object"] == "model"
    assert "alias" in body["data"][1]["description"]
    health = http.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert "version" in http.get("/version").json()


def test_health_503_when_engine_down(engine):
    class DeadEngine:
        model_name, is_tiny, max_model_len, device_description = "x", False, 10, "none"

        def add_finish_listener(self, cb):
            pass

        def health(self):
            return False

    from fastapi.testclient import TestClient

    with TestClient(create_api_app(DeadEngine(), ServerSettings())) as tc:
        assert_error_shape(tc.get("/health"), 503)


# --------------------------------------------------------------------------- completions
def test_nonstream_with_openai_client(client):
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Say hello."}])
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == DEFAULT_MODEL
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    ref = json.loads((REFERENCE / "chat_nonstream.json").read_text())
    raw = resp.model_dump()
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(raw) & set(ref)


def test_stream_with_include_usage_matches_vllm_order(http, client):
    body = {"model": "tiny", "messages": [user("Say hello.")], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    ref = sse_events(l for l in (REFERENCE / "chat_stream.sse").read_text().splitlines())
    assert events[-1] == "[DONE]" and ref[-1] == "[DONE]"
    first, *middle, finish, usage, _ = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert set(first["choices"][0]) >= {"index", "delta", "logprobs", "finish_reason"}
    assert first["choices"][0]["finish_reason"] is None
    for chunk in events[:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == first["id"] and chunk["id"].startswith("chatcmpl-")
        assert {"id", "object", "created", "model", "choices"} <= set(chunk)
    assert middle, "no content chunks"
    for chunk in middle:
        assert set(chunk["choices"][0]["delta"]) == {"content"}
        assert chunk["choices"][0]["finish_reason"] is None
        assert "usage" not in chunk
    assert finish["choices"][0]["finish_reason"] == "length"
    assert ref[-3]["choices"][0]["finish_reason"] == "length"   # same position in vLLM's stream
    assert usage["choices"] == [] and ref[-2]["choices"] == []
    assert set(usage["usage"]) == set(ref[-2]["usage"])
    assert usage["usage"]["completion_tokens"] == 12
    # as in vLLM, the finish chunk may carry the last tokens' text
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in [*middle, finish])

    # the openai client sees the same text, and a non-streaming request gives it too
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[user("Say hello.")], max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True}, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == streamed
    whole = client.chat.completions.create(model="tiny", messages=[user("Say hello.")],
                                           max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == streamed


def test_image_as_data_uri(client):
    plain = client.chat.completions.create(model="tiny", max_tokens=4,
                                          messages=[user("Describe this image.")])
    with_image = client.chat.completions.create(
        model="tiny", max_tokens=4, messages=[user(png_data_uri(), "Describe this image.")])
    # 448x448 -> 256 image tokens (plus the vision start/end markers)
    assert with_image.usage.prompt_tokens - plain.usage.prompt_tokens >= 256
    assert with_image.choices[0].finish_reason in ("stop", "length")


def test_multi_turn_with_images_and_pixel_bounds(client):
    messages = [user(png_data_uri(), "What is this?"),
                {"role": "assistant", "content": "A red square."},
                user(png_data_uri(color=(20, 20, 200)), "And this one?")]
    resp = client.chat.completions.create(model="tiny", max_tokens=4, messages=messages)
    assert resp.usage.prompt_tokens >= 2 * 256
    small = client.chat.completions.create(
        model="tiny", max_tokens=4, messages=messages,
        extra_body={"mm_processor_kwargs": {"min_pixels": 28 * 28, "max_pixels": 224 * 224}})
    assert small.usage.prompt_tokens < resp.usage.prompt_tokens - 300   # 64 tokens per image


@pytest.mark.parametrize("n", [1, 17])
def test_ignore_eos_gives_exactly_max_tokens(client, n):
    resp = client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=n,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == n
    assert resp.choices[0].finish_reason == "length"


def test_max_tokens_capped_at_context_left(client):
    """As vLLM 0.32: prompt + max_tokens over max_model_len is lowered, not refused."""
    resp = client.chat.completions.create(model="tiny", messages=[user("Hi")],
                                          max_tokens=MAX_MODEL_LEN,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.total_tokens == MAX_MODEL_LEN
    assert resp.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins(client):
    resp = client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=50,
                                          max_completion_tokens=7,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 7


def test_tutorial_curl(server):
    """The tutorial's request, with a data: URI instead of the internet image."""
    body = json.dumps({
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri()}},
                {"type": "text", "text": "What is the text in the illustrate?"}]}]})
    url = f"http://localhost:{server.port}/v1/chat/completions"
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "--max-time", "60", url, "-H",
                              "Content-Type: application/json", "-d", "@-"],
                             input=body.encode(), capture_output=True, check=True).stdout
    else:
        out = httpx.post(url, content=body, headers={"Content-Type": "application/json"},
                         timeout=60).content
    answer = json.loads(out)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["prompt_tokens"] > 256


class ScriptedEngine(Engine):
    """An engine whose requests play a fixed script of events (for mid-stream errors)."""

    model_name, is_tiny, max_model_len, device_description = "scripted", False, 100, "none"

    def __init__(self, script) -> None:
        super().__init__()
        self.script = script

    def health(self):
        return True

    def submit(self, request, policy=None):
        from engine.stream import RequestHandle

        handle = RequestHandle(request.request_id)
        for event in self.script:
            handle.push(event)
        return handle


@pytest.mark.parametrize("reason, sent", [("cancelled", "abort"), ("stop", "stop")])
def test_finish_reason_mapping(reason, sent):
    from fastapi.testclient import TestClient

    from engine.types import Finished, RequestStats, TextDelta

    engine = ScriptedEngine([TextDelta("hi"), Finished(reason, RequestStats(3, 0, 0, 1))])
    with TestClient(create_api_app(engine, ServerSettings())) as tc:
        resp = tc.post("/v1/chat/completions", json={"messages": [user("x")]})
        assert resp.json()["choices"][0]["finish_reason"] == sent
        assert resp.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 1,
                                        "total_tokens": 4, "prompt_tokens_details": None,
                                        "completion_tokens_details": None}


def test_error_after_the_stream_began():
    from fastapi.testclient import TestClient

    from engine.errors import DeviceOutOfMemoryError
    from engine.types import Finished, RequestStats, TextDelta

    oom = DeviceOutOfMemoryError("The device ran out of memory for this request.")
    engine = ScriptedEngine([TextDelta("par"), TextDelta("tial"),
                             Finished("error", RequestStats(), oom)])
    with TestClient(create_api_app(engine, ServerSettings())) as tc:
        with tc.stream("POST", "/v1/chat/completions",
                       json={"messages": [user("x")], "stream": True,
                             "stream_options": {"include_usage": True}}) as resp:
            assert resp.status_code == 200
            events = sse_events(resp.iter_lines())
        # deltas already waiting when the server reads them are sent as one chunk
        chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:]) == "partial"
        assert events[len(chunks):] == [oom.to_dict(), "[DONE]"]
        assert events[len(chunks)]["error"]["code"] == 500
        # without streaming, the same failure is a plain JSON error with its status
        assert_error_shape(tc.post("/v1/chat/completions", json={"messages": [user("x")]}),
                           500, contains="out of memory")


# --------------------------------------------------------------------------- errors
TEXT_FILE = "data:text/plain;base64," + base64.b64encode(b"just some notes\n").decode()
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG but not really").decode()
SMALL = png_data_uri((32, 32))


def _body(**kw):
    return {"model": "tiny", "messages": [user("Hi")], "max_tokens": 4, **kw}


ERROR_CASES = {
    "11 images": (_body(messages=[user(*[SMALL] * 11, "Compare")]), 400, "image",
                  "At most 10 image(s)"),
    "11 images, stream": (_body(messages=[user(*[SMALL] * 11, "x")], stream=True), 400, "image",
                          "At most 10 image(s)"),
    "prompt too long": (_body(messages=[user("hello " * 5000)]), 400, "input_tokens",
                        f"maximum context length is {MAX_MODEL_LEN} tokens"),
    "bad image data": (_body(messages=[user(NOT_AN_IMAGE, "x")]), 400, "image",
                       "Failed to load image"),
    "text file as image": (_body(messages=[user(TEXT_FILE, "x")]), 400, "image",
                           "Failed to load image"),
    "broken base64": (_body(messages=[user("data:image/png;base64,%%%not-base64", "x")]), 400,
                      "url", "base64"),
    "file url": (_body(messages=[user("file:///etc/passwd", "x")]), 400, "url", "not allowed"),
    "local path": (_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]), 400, "url", "not allowed"),
    "temperature -1": (_body(temperature=-1), 400, "temperature",
                       "temperature must be non-negative, got -1.0."),
    "top_p 2": (_body(top_p=2), 400, "top_p", "top_p must be in (0, 1]"),
    "max_tokens 0": (_body(max_tokens=0), 400, "max_tokens", "max_tokens must be at least 1"),
    "max_tokens 1e9": (_body(max_tokens=10**9), 400, "max_tokens",
                       f"cannot be greater than max_model_len={MAX_MODEL_LEN}"),
    "unknown model": (_body(model="no-such-model"), 404, "model",
                      "The model `no-such-model` does not exist."),
    "missing messages": ({"model": "tiny"}, 400, "body.messages", "Field required"),
    "n=2 greedy": (_body(n=2, temperature=0), 400, "n",
                   "n must be 1 when using greedy sampling, got 2."),
    "include_usage without stream": (_body(stream_options={"include_usage": True}), 400,
                                     "stream_options", "only be defined when `stream=True`"),
    "unknown part type": (_body(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "x"}}]}]), 400,
        "body.messages.0.content", "unsupported type 'input_audio'"),
    "role not a string": (_body(messages=[{"role": 5, "content": "x"}]), 400,
                          "body.messages.0.role", "valid string"),
    "wrong type": (_body(temperature="hot"), 400, "body.temperature", "valid number"),
    "image in assistant turn": (_body(messages=[
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": SMALL}}]},
        user("x")]), 400, "messages", "only user messages"),
    "empty conversation": (_body(messages=[]), 400, "messages", "empty"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_status_and_shape(http, case):
    body, status, param, contains = ERROR_CASES[case]
    assert_error_shape(http.post("/v1/chat/completions", json=body), status, param, contains)


def test_malformed_json_and_oversized_body(http):
    resp = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [}',
                     headers={"Content-Type": "application/json"})
    err = assert_error_shape(resp, 400, contains="Invalid JSON")
    assert err["param"].startswith("body.")
    big = json.dumps(_body(messages=[user("x" * (MAX_BODY_MB * 2**20 + 10))]))
    assert_error_shape(http.post("/v1/chat/completions", content=big,
                                 headers={"Content-Type": "application/json"}),
                       413, "body", "--max-body-mb")


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[user("Hi")], temperature=-1)
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[user("Hi")])


# --------------------------------------------------------------------------- no SSRF
class CountingImageServer:
    """A loopback HTTP server with a valid PNG that counts every request it gets."""

    def __init__(self) -> None:
        png = base64.b64decode(png_data_uri((64, 64)).split(",", 1)[1])
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    srv = CountingImageServer()
    yield srv
    srv.close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1", "2130706433",
                                  "[::ffff:127.0.0.1]"])
def test_loopback_image_urls_refused_without_fetching(http, image_server, host):
    url = f"http://{host}:{image_server.port}/cat.png"
    resp = http.post("/v1/chat/completions", json=_body(messages=[user(url, "Describe")]))
    assert_error_shape(resp, 400, "url", "Refusing to fetch")
    assert image_server.hits == []


def test_loopback_listener_does_serve_when_allowed(image_server):
    """Control for the test above: the listener answers, so a broken guard would be seen."""
    img = media.load_image(f"http://127.0.0.1:{image_server.port}/cat.png",
                           media.MediaPolicy(allow_private_hosts=True))
    assert img.size == (64, 64) and image_server.hits == ["/cat.png"]


@pytest.mark.parametrize("url", ["http://intranet.invalid/cat.png",
                                 "http://metadata.invalid/latest/meta-data",
                                 "http://10.1.2.3/cat.png", "http://169.254.169.254/latest",
                                 "http://[fd00::1]/cat.png"])
def test_private_addresses_refused(http, monkeypatch, guard_loopback, url):
    resolved = {"intranet.invalid": ["10.20.30.40"], "metadata.invalid": ["169.254.169.254"]}
    asked = []

    def fake_resolve(host, port):
        asked.append(host)
        return resolved.get(host, [host.strip("[]")])

    monkeypatch.setattr(media, "resolve_host", fake_resolve)
    resp = http.post("/v1/chat/completions", json=_body(messages=[user(url, "x")]))
    assert_error_shape(resp, 400, "url", "Refusing to fetch")
    assert asked and not guard_loopback


# --------------------------------------------------------------------------- load and keys
def _wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def one_row_server(engine):
    """A server on an engine of the same model with one KV row: a second request must queue."""
    one_row = LocalEngine(engine.loaded, EngineConfig(max_model_len=MAX_MODEL_LEN,
                                                      max_queue=MAX_QUEUE, max_batch=1,
                                                      log_stats_interval=0))
    one_row.model_name, one_row.is_tiny = engine.model_name, engine.is_tiny
    try:
        # no per-client cap (by default the engine's batch, one here): the queue is tested
        with BackgroundServer(create_api_app(one_row, ServerSettings(max_client_requests=0))) \
                as srv:
            yield srv, one_row
    finally:
        one_row.close()


def test_queue_full_is_503(one_row_server):
    server, engine = one_row_server
    assert engine.snapshot().kv_rows == 1
    long = _body(max_tokens=3000, ignore_eos=True, stream=True)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        streams = []
        try:
            running = c.stream("POST", "/v1/chat/completions", json=long)
            streams.append(running)
            lines = running.__enter__().iter_lines()   # kept open: closing it would cancel
            while True:
                line = next(lines)
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get(
                        "content"):
                    break   # the first request is generating: it has left the queue
            for _ in range(MAX_QUEUE):
                waiting = c.stream("POST", "/v1/chat/completions", json=long)
                streams.append(waiting)
                assert waiting.__enter__().status_code == 200
            assert engine.queue_depth() == MAX_QUEUE
            assert_error_shape(c.post("/v1/chat/completions", json=_body()), 503,
                               contains="busy")
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    _wait_until(lambda: engine.snapshot().running == engine.queue_depth() == 0,
                what="the cancelled requests to leave the engine")


def test_api_key_and_allowed_media_folder(engine, tmp_path):
    picture = tmp_path / "pic.png"
    Image.new("RGB", (64, 64), "green").save(picture)
    settings = ServerSettings(api_key="s3cret", allowed_local_media_path=[str(tmp_path)],
                              served_model_name=["my-vl"])
    with BackgroundServer(create_api_app(engine, settings)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        body = _body(model="my-vl", messages=[user(picture.as_uri(), "What color?")])
        assert_error_shape(c.post("/v1/chat/completions", json=body), 401)
        assert_error_shape(c.get("/v1/models"), 401)
        assert_error_shape(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/health").status_code == 200          # open, as in vLLM
        auth = {"Authorization": "Bearer s3cret"}
        assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == \
            ["my-vl", DEFAULT_MODEL]
        assert c.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
        outside = _body(model="my-vl", messages=[user("file:///etc/hostname", "x")])
        assert_error_shape(c.post("/v1/chat/completions", json=outside, headers=auth), 400,
                           "url", "not allowed")
        wrong = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="my-vl", messages=[user("Hi")])


# --------------------------------------------------------------------------- disconnects
def test_stream_disconnect_cancels_generation(server, finish_log):
    received = 0
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=_body(max_tokens=3000, ignore_eos=True, stream=True)) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    cid = chunk["id"]
                    received += bool(chunk["choices"][0]["delta"].get("content"))
                    if received >= 5:
                        break
        closed_at = time.monotonic()
    # leaving the blocks closed the connection mid-stream
    req, finished = finish_log.wait(lambda req, ev: req.request_id == cid)
    assert finished.reason == "cancelled"
    assert finished.stats.tokens_after_cancel is not None
    assert finished.stats.tokens_after_cancel <= 3, finished.stats
    took = req.arrival_time + finished.stats.total_s - closed_at
    assert took < 1.0, f"generation went on for {took:.2f}s after the client left"


def test_nonstream_disconnect_cancels_generation(server, engine, finish_log):
    body = json.dumps(_body(max_tokens=2999, ignore_eos=True)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    _wait_until(lambda: engine.snapshot().running == 1, what="generation to start")
    closed_at = time.monotonic()
    sock.close()
    req, finished = finish_log.wait(lambda req, ev: req.sampling.max_tokens == 2999)
    assert finished.reason == "cancelled"
    assert finished.stats.output_tokens < 2999
    took = req.arrival_time + finished.stats.total_s - closed_at
    assert took < 1.0, f"generation went on for {took:.2f}s after the client left"


def _metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_show_the_engine_snapshot():
    """/metrics' engine gauges and cache figures are the snapshot's, by vLLM's names."""
    from engine.base import EngineSnapshot
    from server.metrics import MetricsRegistry

    snap = EngineSnapshot(waiting=3, running=2, kv_usage=0.25, prefix_cache_queries=100,
                          prefix_cache_hits=48, prefix_cache_bytes=4096,
                          encoder_cache_hits=1, encoder_cache_misses=2, pixel_cache_hits=5)
    values = _metric_values(MetricsRegistry("m").render(snap, healthy=True))
    model = 'model_name="m"'
    assert values[f"qwenvl_requests_waiting{{{model}}}"] == 3
    assert values[f"qwenvl_requests_running{{{model}}}"] == 2
    assert values[f"qwenvl_kv_cache_usage_perc{{{model}}}"] == 0.25
    assert values[f"qwenvl_prefix_cache_queries_total{{{model}}}"] == 100
    assert values[f"qwenvl_prefix_cache_hits_total{{{model}}}"] == 48
    assert values[f"qwenvl_prefix_cache_bytes{{{model}}}"] == 4096
    assert values[f"qwenvl_encoder_cache_misses_total{{{model}}}"] == 2
    assert values[f"qwenvl_pixel_cache_hits_total{{{model}}}"] == 5
    assert not any("picture_cache" in name for name in values)   # unknown: not reported
    remote = _metric_values(MetricsRegistry("m").render(EngineSnapshot(), healthy=True))
    assert f"qwenvl_requests_waiting{{{model}}}" in remote
    assert not any("running" in n or "kv_cache" in n or "_cache_" in n for n in remote)


def test_metrics(http, client, engine):
    client.chat.completions.create(model="tiny", messages=[user(png_data_uri(), "Hi")],
                                   max_tokens=3, extra_body={"ignore_eos": True})
    http.post("/v1/chat/completions", json=_body(temperature=-1))
    resp = http.get("/metrics")
    snap = engine.snapshot()       # idle: the same figures as the response's
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = _metric_values(resp.text)
    model = 'model_name="tiny"'
    assert values[f'qwenvl_requests_total{{{model},finish_reason="length"}}'] >= 1
    assert f'qwenvl_requests_total{{{model},finish_reason="cancelled"}}' in values
    assert values[f'qwenvl_requests_refused_total{{{model},code="400"}}'] >= 1
    assert values[f'qwenvl_generation_tokens_total{{{model}}}'] >= 3
    assert values[f'qwenvl_prompt_tokens_total{{{model}}}'] > 0
    assert values[f'qwenvl_requests_waiting{{{model}}}'] == 0
    assert 0 <= values[f'qwenvl_kv_cache_usage_perc{{{model}}}'] <= 1
    queries = values[f'qwenvl_prefix_cache_queries_total{{{model}}}']
    assert queries > 0 and 0 <= values[f'qwenvl_prefix_cache_hits_total{{{model}}}'] <= queries
    assert f'qwenvl_encoder_cache_misses_total{{{model}}}' in values
    assert values[f'qwenvl_engine_healthy{{{model}}}'] == 1
    assert values[f'qwenvl_requests_running{{{model}}}'] == snap.running == 0
    assert values[f'qwenvl_kv_cache_usage_perc{{{model}}}'] == snap.kv_usage
    for key, value in snap.caches().items():
        suffix = "_total" if key.endswith(("_hits", "_misses", "_queries")) else ""
        assert values[f"qwenvl_{key}{suffix}{{{model}}}"] == value, key
    assert snap.picture_cache_misses is not None and snap.pixel_cache_misses > 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "output_tokens_per_second"):
        count = values[f"qwenvl_{hist}_count{{{model}}}"]
        assert count >= 1
        assert values[f'qwenvl_{hist}_bucket{{{model},le="+Inf"}}'] == count
        assert f"# TYPE qwenvl_{hist} histogram" in resp.text


VLLM_DASHBOARD = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                  "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                  "vllm:generation_tokens_total", "vllm:request_success_total",
                  "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                  "vllm:e2e_request_latency_seconds", "vllm:prefix_cache_queries_total",
                  "vllm:prefix_cache_hits_total")


def test_metrics_also_speak_vllms_names(http, client, engine):
    """vLLM's metric names and label sets, so its Grafana dashboard works unchanged: the
    same figures as ours, by vLLM's finish reasons."""
    client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=4,
                                   extra_body={"ignore_eos": True})
    text = http.get("/metrics").text
    values = _metric_values(text)
    model = 'model_name="tiny"'
    for name in VLLM_DASHBOARD:
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name} " in text, name
    snap = engine.snapshot()
    assert values[f"vllm:num_requests_running{{{model}}}"] == snap.running == 0
    assert values[f"vllm:num_requests_waiting{{{model}}}"] == snap.waiting
    assert values[f"vllm:kv_cache_usage_perc{{{model}}}"] == snap.kv_usage
    for ours in ("prompt_tokens_total", "generation_tokens_total"):
        assert values[f"vllm:{ours}{{{model}}}"] == values[f"qwenvl_{ours}{{{model}}}"]
    assert values[f'vllm:request_success_total{{{model},finished_reason="length"}}'] == \
        values[f'qwenvl_requests_total{{{model},finish_reason="length"}}'] >= 1
    assert values[f'vllm:request_success_total{{{model},finished_reason="abort"}}'] == \
        values[f'qwenvl_requests_total{{{model},finish_reason="cancelled"}}']
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert values[f"vllm:{hist}_count{{{model}}}"] == values[f"qwenvl_{hist}_count{{{model}}}"]
    gaps = values[f"vllm:inter_token_latency_seconds_count{{{model}}}"]
    assert gaps >= 3 and values[f'vllm:inter_token_latency_seconds_bucket{{{model},le="+Inf"}}'] == gaps
    assert values[f"vllm:prefix_cache_hits_total{{{model}}}"] == snap.prefix_cache_hits


# --------------------------------------------------------------------------- never accept and ignore
ASKED_BUT_NOT_DONE = [   # vLLM request fields this server refuses (they were accepted and ignored)
    ("guided_json", {"type": "object"}), ("best_of", 2),
    ("media_io_kwargs", {"video": {"num_frames": 4}}), ("tool_choice", "auto"),
    ("logits_processors", ["x"]), ("prompt_embeds", "abc"), ("kv_transfer_params", {"a": 1}),
    ("priority", 1), ("chat_template", "{{ messages }}"), ("documents", [{"text": "x"}]),
    ("logprob_token_ids", [1]), ("return_tokens_as_token_ids", True), ("cache_salt", "s"),
]


@pytest.mark.parametrize("field,value", ASKED_BUT_NOT_DONE, ids=[f for f, _ in ASKED_BUT_NOT_DONE])
def test_a_field_this_server_does_not_honour_is_refused_by_name(http, field, value):
    resp = http.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 2, field: value,
        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and field in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize("field,value", [("skip_special_tokens", True), ("echo", False),
                                         ("add_generation_prompt", True), ("presence_penalty", 0),
                                         ("logit_bias", None), ("tool_choice", "none")])
def test_a_field_at_vllms_default_is_accepted(http, field, value):
    resp = http.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 2, field: value,
        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text


def test_unknown_extras_are_logged_and_ignored(http, caplog):
    with caplog.at_level("WARNING", logger="server"):
        resp = http.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 2, "my_vendor_extra": 1,
            "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    assert any("my_vendor_extra" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method", ["get", "post"])
def test_ping_answers_like_health(http, method):
    """vLLM serves /ping (GET and POST) beside /health; it was a 404 here."""
    resp = getattr(http, method)("/ping")
    assert resp.status_code == 200 and resp.content == b""


# --------------------------------------------------------------------------- tokenize
def test_tokenize_a_prompt_and_detokenize_it_back(http, engine):
    """vLLM's /tokenize and /detokenize (they were 404s): a text's ids are the tokenizer's."""
    text = "How many shapes are there, and what colours are they?"
    resp = http.post("/tokenize", json={"model": "tiny", "prompt": text})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tokens"] == engine.tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len and body["token_strs"] is None
    back = http.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_a_chat_gives_the_prompt_the_model_sees(http, engine):
    """The chat form renders the messages as a completion would, pictures included: the same
    ids the engine prefills for that chat."""
    uri = png_data_uri((448, 448))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is it?"}]}]
    resp = http.post("/tokenize", json={"model": "tiny", "messages": messages})
    assert resp.status_code == 200, resp.text
    from server.protocol import ChatCompletionRequest
    from server.serving import to_generation_request

    gen = to_generation_request(ChatCompletionRequest(messages=messages), "t")
    expected = engine.render(gen).inputs["input_ids"][0].tolist()
    assert resp.json()["tokens"] == expected
    image_pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert expected.count(image_pad) == 256          # 448x448 at the tutorial's bounds


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}],
                   "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": [1] * (MAX_MODEL_LEN + 1)}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "body.tokens"),
])
def test_tokenize_refusals_are_one_line(http, path, body, param):
    resp = http.post(path, json=body)
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["param"] == param and "\n" not in error["message"], error
