"""Ported from vLLM tests/entrypoints/openai/basic/test_basic.py.

Changes: the sync client and threads instead of asyncio; vLLM runs the first three against two
servers (with and without --disable-frontend-multiprocessing): one server here; its version
string is vLLM's own (here: a string); the cancellation load is 8 requests of 2000 forced
tokens with a 0.5 s timeout (vLLM: 200 of 10000 tokens): this machine is small, and our server
answers a ninth concurrent request of one client with 429 (--max-client-requests, default 8);
test_server_load needs vLLM's --enable-server-load-tracking.
Not ported: test_health_check_engine_dead_error (calls vLLM's health() with a mocked engine).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import openai
import pytest
import requests


def test_show_version(server):
    """vLLM test_basic.py::test_show_version (vLLM: == {"version": VLLM_VERSION})."""
    response = requests.get(server.url_for("version"), timeout=10)
    response.raise_for_status()
    body = response.json()
    assert list(body) == ["version"] and isinstance(body["version"], str) and body["version"]


def test_check_health(server):
    """vLLM test_basic.py::test_check_health."""
    assert requests.get(server.url_for("health"), timeout=10).status_code == HTTPStatus.OK


def test_request_cancellation(server, model_name):
    """vLLM test_basic.py::test_request_cancellation."""
    chat_input = [{"role": "user", "content": "Write a long story"}]
    client = server.get_client(timeout=0.5)

    def call():
        return client.chat.completions.create(messages=chat_input, model=model_name,
                                              max_tokens=2000, extra_body={"min_tokens": 2000})
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call) for _ in range(8)]
    for f in futures:
        with pytest.raises(openai.APITimeoutError):
            f.result()
    client = server.get_client(timeout=5)
    response = client.chat.completions.create(messages=chat_input, model=model_name,
                                              max_tokens=10)
    assert len(response.choices) == 1


def test_request_wrong_content_type(server, model_name):
    """vLLM test_basic.py::test_request_wrong_content_type."""
    with pytest.raises(openai.APIStatusError):
        server.get_client().chat.completions.create(
            messages=[{"role": "user", "content": "Write a long story"}], model=model_name,
            max_tokens=10000, extra_headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_server_load(server):
    """vLLM test_basic.py::test_server_load (max_tokens 1000 with min_tokens, so the request is
    still running when /load is read)."""
    response = requests.get(server.url_for("load"), timeout=10)
    assert response.status_code == HTTPStatus.OK
    assert response.json().get("server_load") == 0
    result = {}

    def long_request():
        result["r"] = requests.post(server.url_for("v1/completions"), timeout=120, json={
            "model": server.model, "prompt": "Give me a long story", "max_tokens": 1000,
            "min_tokens": 1000, "temperature": 0})
    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.5)
    response = requests.get(server.url_for("load"), timeout=10)
    assert response.status_code == HTTPStatus.OK
    assert response.json().get("server_load") == 1
    t.join()
    time.sleep(0.1)
    response = requests.get(server.url_for("load"), timeout=10)
    assert response.status_code == HTTPStatus.OK
    assert response.json().get("server_load") == 0
