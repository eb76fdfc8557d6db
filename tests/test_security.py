"""The holes a probe of a shared link found, one table per door, each a test that
failed before the fix: file reads through the page's events, sizes a request
controls, the API behind `--auth`, DNS rebinding, cross-site POSTs, nested JSON,
the Gradio routes Gradio leaves open, and repeated failed logins.

Nothing leaves the machine: the app runs in-process (TestClient) or on a loopback
port, the resolver is stubbed, and the rebinding case records requests at the
transport instead of connecting."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from gradio.utils import get_upload_folder
from PIL import Image

from engine.inputs import media
from engine.inputs.media import MediaPolicy, load_image
from server.background import BackgroundServer
from server.routes import create_api_app
from server.settings import ServerSettings
from ui.gate import FREE_FAILURES, LoginBackoff
from support import status_mb

SENTINEL = f"SENTINEL-{uuid.uuid4().hex}-not-for-your-eyes".encode()   # new every run


def png_uri(size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def page(app_factory):
    """The web app with --auth, logged in as alice."""
    with TestClient(app_factory("--auth", "alice:pw")) as client:
        assert client.post("/login", data={"username": "alice", "password": "pw"}).status_code == 200
        yield client


# --------------------------------------------------------------------------- file reads
@pytest.fixture
def sentinel(tmp_path) -> Path:
    path = tmp_path / "secret.png"      # outside Gradio's upload folder and assets/
    path.write_bytes(SENTINEL)
    return path


def copies_in_cache() -> list[Path]:
    """Files in Gradio's upload folder holding the sentinel (a copy would be served)."""
    found = []
    for root, _, names in os.walk(get_upload_folder()):
        for name in names:
            p = Path(root) / name
            try:
                if p.stat().st_size == len(SENTINEL) and p.read_bytes() == SENTINEL:
                    found.append(p)
            except OSError:
                pass
    return found


def chat_state(path: Path, tagged: bool) -> dict:
    entry = {"path": str(path), "name": "secret.png"}
    if tagged:   # the shape Gradio itself copies into its cache
        entry.update(meta={"_type": "gradio.FileData"}, orig_name="secret.png")
    return {"version": 1, "system": "", "turns": [
        {"role": "user", "text": "what is this?", "files": [entry]},
        {"role": "assistant", "text": "a file", "finish": "stop"}]}


SAMPLING = [16, 0, 1, 0, 1.0, 1, 224 * 224, 1280 * 28 * 28]
JSON_MODE = ["off", "", ""]   # the JSON mode, its schema and its fields
EVENTS = {   # every event that takes the browser-kept chat, with its other inputs
    "on_export": lambda st: [st],
    "on_load": lambda st: [st],
    "on_undo": lambda st: [st],
    "on_retry": lambda st: [st, "system"],
    "on_submit": lambda st: [st, {"text": "and now?", "files": []}, "system", *JSON_MODE],
    "generate": lambda st: [st, *SAMPLING, *JSON_MODE],
    "composer_meter": lambda st: [{"text": "", "files": []}, st, 224 * 224, 1280 * 28 * 28, 16],
}


@pytest.mark.parametrize("tagged", [True, False], ids=["gradio-filedata", "plain-path"])
@pytest.mark.parametrize("event", list(EVENTS))
def test_no_event_reads_a_file_outside_the_upload_folder(page, sentinel, event, tagged):
    resp = page.post(f"/gradio_api/run/{event}",
                     json={"data": EVENTS[event](chat_state(sentinel, tagged))})
    text = resp.text
    assert SENTINEL.decode() not in text
    assert base64.b64encode(SENTINEL).decode()[:24] not in text
    assert copies_in_cache() == []


def test_a_file_in_the_message_box_from_outside_is_dropped(page, sentinel):
    box = {"text": "look", "files": [{"path": str(sentinel), "meta": {"_type": "gradio.FileData"},
                                      "orig_name": "secret.png"}]}
    resp = page.post("/gradio_api/run/on_submit", json={"data": [None, box, "s", *JSON_MODE]})
    assert SENTINEL.decode() not in resp.text and copies_in_cache() == []


def test_the_meter_never_reads_a_file_from_outside(page, sentinel):
    box = {"text": "look", "files": [str(sentinel)]}
    resp = page.post("/gradio_api/run/composer_meter",
                     json={"data": [box, None, 224 * 224, 1280 * 28 * 28, 16]})
    assert SENTINEL.decode() not in resp.text and "tokens" not in resp.text   # never measured


def test_dropped_files_get_a_visible_note(tiny_engine, sentinel):
    from ui.chat import ChatController
    from ui.layout import upload_roots

    notes: list[str] = []
    ctrl = ChatController(tiny_engine, upload_roots(), warn=notes.append)
    state = ctrl.load(chat_state(sentinel, tagged=False))
    assert state["turns"][0]["files"] == []
    assert notes and "secret.png" in notes[0] and "not uploaded here" in notes[0]


def test_a_link_out_of_the_upload_folder_is_dropped(tiny_engine, sentinel):
    from ui.chat import ChatController
    from ui.layout import upload_roots

    link = Path(get_upload_folder()) / f"link-{os.getpid()}.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(sentinel)
    try:
        ctrl = ChatController(tiny_engine, upload_roots())
        assert ctrl.load(chat_state(link, tagged=False))["turns"][0]["files"] == []
    finally:
        link.unlink()


# --------------------------------------------------------------------------- sizes
@pytest.fixture(scope="module")
def api(tiny_engine):
    with BackgroundServer(create_api_app(tiny_engine, ServerSettings())) as srv:
        yield srv.url


def image_body(**mm) -> dict:
    return {"model": "tiny", "max_tokens": 4, "mm_processor_kwargs": mm, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri()}},
                                     {"type": "text", "text": "hi"}]}]}


def text_body(chars: int) -> dict:
    return {"model": "tiny", "max_tokens": 4,
            "messages": [{"role": "user", "content": "a" * chars}]}


SIZE_CASES = [   # (name, body, words in the error)
    ("min_pixels 1e10", image_body(min_pixels=10**10), "min_pixels must be between"),
    ("max_pixels 1e10", image_body(max_pixels=10**10), "max_pixels must be between"),
    ("min_pixels 1e9", image_body(min_pixels=10**9, max_pixels=10**9), "between 1 and"),
    ("min_pixels 5e7", image_body(min_pixels=5 * 10**7, max_pixels=5 * 10**7), "between 1 and"),
    ("upscale to the limit", image_body(min_pixels=16384 * 784, max_pixels=16384 * 784),
     "maximum context length"),
    ("6 MB of text", text_body(6 * 2**20), "characters"),
    ("18 MB of text", text_body(18 * 2**20), "characters"),
]


@pytest.mark.parametrize("name,body,words", SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_sizes_a_request_controls_are_refused_at_once(api, name, body, words):
    data = json.dumps(body).encode()
    before = status_mb()
    start = time.monotonic()
    resp = httpx.post(f"{api}/v1/chat/completions", content=data, timeout=30,
                      headers={"content-type": "application/json"})
    took = time.monotonic() - start
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert words in error["message"] and error["code"] == 400
    assert took < 1.0, f"{name}: {took:.2f}s to refuse"
    assert status_mb() - before < 150, f"{name}: memory grew by {status_mb() - before:.0f} MB"


def test_pixel_limit_is_a_flag():
    from engine.config import EngineConfig, add_engine_args
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["--max-pixels-limit", "1000000", "--max-prompt-chars", "500"])
    cfg = EngineConfig.from_namespace(ns)
    assert cfg.max_pixels_limit == 1_000_000 and cfg.prompt_chars_limit == 500


def test_bounds_within_the_limit_still_answer(api):
    resp = httpx.post(f"{api}/v1/chat/completions", json=image_body(min_pixels=28 * 28 * 4,
                                                                   max_pixels=28 * 28 * 64),
                      timeout=60)
    assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------- one door
@pytest.mark.parametrize("flags,headers,status", [
    (["--auth", "alice:pw"], {}, 401),
    (["--auth", "alice:pw"], {"authorization": "Bearer wrong"}, 401),
    (["--auth", "alice:pw"], {"authorization": "Basic " + base64.b64encode(b"alice:no").decode()}, 401),
    (["--auth", "alice:pw"], {"authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}, 200),
    (["--auth", "alice:pw"], {"authorization": "Bearer alice:pw"}, 200),
    (["--auth", "alice:pw", "--api-key", "sk-1"], {"authorization": "Bearer sk-1"}, 200),
    (["--auth", "alice:pw", "--api-key", "sk-1"], {"authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}, 200),
    (["--api-key", "sk-1"], {}, 401),
    (["--api-key", "sk-1"], {"authorization": "Bearer sk-1"}, 200),
    ([], {}, 200),
])
def test_the_api_takes_the_same_login(app_factory, flags, headers, status):
    with TestClient(app_factory(*flags)) as client:
        for path in ("/v1/models", "/metrics", "/version"):
            resp = client.get(path, headers=headers)
            assert resp.status_code == status, (path, resp.text)
        if status == 401:
            assert "WWW-Authenticate" in resp.headers
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=body,
                               headers=headers).status_code == 401
        assert client.get("/health").status_code == 200    # probes stay open


def test_the_openai_client_logs_in_with_user_and_password(tiny_engine):
    import app
    from openai import OpenAI

    fastapi_app, _ = app.create_app(tiny_engine, app.build_parser().parse_args(
        ["--auth", "alice:pw"]))
    with BackgroundServer(fastapi_app) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="alice:pw", max_retries=0)
        out = client.chat.completions.create(model="tiny", max_tokens=3,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].finish_reason in ("stop", "length")


def test_the_startup_warning_names_each_open_door():
    import app

    parse = app.build_parser().parse_args
    both = app.open_access_warning(parse(["--server-name", "0.0.0.0"]))
    assert "web page" in both and "/v1" in both
    page_only = app.open_access_warning(parse(["--server-name", "0.0.0.0", "--api-key", "k"]))
    assert "web page" in page_only and "/v1" not in page_only
    assert app.open_access_warning(parse(["--server-name", "0.0.0.0", "--auth", "a:b"])) is None


# --------------------------------------------------------------------------- the page's routes
@pytest.mark.parametrize("method,path", [
    ("get", "/gradio_api/heartbeat/abcdef123"), ("post", "/gradio_api/cancel"),
    ("post", "/gradio_api/reset"), ("get", "/gradio_api/startup-events"),
    ("get", "/gradio_api/runs"), ("post", "/gradio_api/run/on_export"),
    ("get", "/gradio_api/info"),
])
def test_gradio_routes_need_the_login(app_factory, method, path):
    with TestClient(app_factory("--auth", "alice:pw")) as client:
        kwargs = {"json": {"session_hash": "abcdef123", "fn_index": 0, "event_id": "e"}} \
            if method == "post" else {}
        assert getattr(client, method)(path, **kwargs).status_code == 401
        assert client.get("/").status_code == 200          # the login page itself
        if "heartbeat" in path or "startup-events" in path:
            return   # streams that never end: logged in, they would simply run
        client.post("/login", data={"username": "alice", "password": "pw"})
        assert getattr(client, method)(path, **kwargs).status_code != 401


def test_failed_logins_back_off(app_factory):
    with TestClient(app_factory("--auth", "alice:pw")) as client:
        for _ in range(FREE_FAILURES):
            assert client.post("/login", data={"username": "alice",
                                               "password": "guess"}).status_code == 400
        resp = client.post("/login", data={"username": "alice", "password": "pw"})
        assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1


def test_backoff_grows_and_resets():
    now = [0.0]
    backoff = LoginBackoff(clock=lambda: now[0])
    for _ in range(FREE_FAILURES):
        assert backoff.wait_s("a") == 0
        backoff.failed("a")
    assert backoff.wait_s("a") == pytest.approx(2.0)
    backoff.failed("a")
    assert backoff.wait_s("a") == pytest.approx(4.0)
    assert backoff.wait_s("b") == 0                         # per address
    now[0] += 5
    assert backoff.wait_s("a") == 0
    backoff.succeeded("a")
    backoff.failed("a")
    assert backoff.wait_s("a") == 0


# --------------------------------------------------------------------------- rebinding
def test_the_fetch_connects_to_the_address_that_was_checked(monkeypatch):
    """A resolver that answers a public address first and loopback after (DNS rebinding):
    the fetch must connect to the public address it checked, with the original Host."""
    asked, sent = [], []
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buf, "PNG")

    def resolve(host, port):
        asked.append(host)   # public on the 1st, 3rd, ... ask; loopback on the others
        return ["93.184.216.34"] if len(asked) % 2 else ["127.0.0.1"]

    def record(self, request):   # replaces the connection: nothing leaves the machine
        sent.append((request.url.host, request.headers["host"],
                     request.extensions.get("sni_hostname")))
        return httpx.Response(200, content=buf.getvalue())

    monkeypatch.setattr(media, "resolve_host", resolve)
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", record)
    import socket
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))])
    assert load_image("http://rebind.test/a.png", MediaPolicy(local_roots=())).size == (30, 20)
    asked.append("-")         # the next fetch's check sees the public answer again
    assert load_image("https://rebind.test:8443/a.png", MediaPolicy(local_roots=())).size == (30, 20)
    assert sent[0] == ("93.184.216.34", "rebind.test", None)
    assert sent[1] == ("93.184.216.34", "rebind.test:8443", "rebind.test")   # TLS: the name
    assert asked == ["rebind.test", "-", "rebind.test"]    # one resolution per fetch


# --------------------------------------------------------------------------- cross-site
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_non_json_posts_start_no_work(api, tiny_engine, content_type):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    finished = []
    tiny_engine.add_finish_listener(lambda req, ev: finished.append(req.request_id))
    headers = {"content-type": content_type} if content_type else {}
    resp = httpx.post(f"{api}/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == 415
    time.sleep(0.2)
    assert finished == []


def test_no_cors_headers_for_other_sites(api):
    resp = httpx.options(f"{api}/v1/chat/completions", timeout=10, headers={
        "origin": "https://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert "access-control-allow-origin" not in resp.headers


# --------------------------------------------------------------------------- nested JSON
@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deeply_nested_json_is_a_400(api, depth):
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "hi", "x": ' + \
        "[" * depth + "]" * depth + "}]}"
    resp = httpx.post(f"{api}/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "nests deeper" in resp.json()["error"]["message"]
