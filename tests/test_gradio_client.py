"""The app's named Gradio endpoint, called the way a script would: start
`python app.py --model tiny`, send text plus an image with gradio_client and
read the answer as it streams. The OpenAI-compatible API answers on the same
port."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from support import AppServer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


@pytest.fixture(scope="module")
def server():
    with AppServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    cl = Client(server.url, verbose=False)
    yield cl
    cl.close()


def request_lines(srv: AppServer) -> list[str]:
    return [line for line in srv.lines if "engine.requests" in line]


def test_chat_endpoint_streams_an_answer_about_an_image(server, client):
    from gradio_client import handle_file

    assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    before = len(request_lines(server))
    # The trained tiny model answers this with its grounding JSON: long enough to stream
    # (about 80 tokens; of a picture it was not trained on, it may say one short sentence).
    job = client.submit({"text": "Detect the shapes.",
                         "files": [handle_file(str(ASSETS / "shapes.png"))]},
                        max_new_tokens=300, temperature=0, api_name="/chat")
    chunks = list(job)
    final = job.result()
    assert final and chunks[-1] == final
    assert len(chunks) >= 3, f"expected a stream, got {len(chunks)} update(s)"
    assert all(final.startswith(c) for c in chunks)          # each chunk is the answer so far
    deadline = time.monotonic() + 5
    while len(request_lines(server)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    line = request_lines(server)[before]
    assert "images=1" in line and re.search(r"output_tokens=(\d+)", line)


def test_chat_endpoint_reports_bad_input_and_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    fake = tmp_path / "photo.png"
    fake.write_text("not an image at all")
    with pytest.raises(Exception, match="Failed to load image: photo.png"):
        client.predict({"text": "What is this?", "files": [handle_file(str(fake))]},
                       api_name="/chat")
    answer = client.predict({"text": "Hello", "files": []}, max_new_tokens=8, api_name="/chat")
    assert isinstance(answer, str) and answer


def test_openai_api_shares_the_port(server):
    pytest.importorskip("server.routes", reason="the OpenAI-compatible API package is not there")
    models = httpx.get(server.url + "v1/models", timeout=10)
    assert models.status_code == 200
    assert "tiny" in [m["id"] for m in models.json()["data"]]
    page = httpx.get(server.url, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
