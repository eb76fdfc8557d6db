"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat_echo.py.

Its fixture serves with `--max-logprobs 151936` (the vocabulary) for prompt_logprobs and
top_logprobs of -1: the `server_full_logprobs` fixture. Changes: the sync client; the served
model instead of Qwen2-1.5B; the vocabulary size from the served folder's config.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest


@pytest.fixture
def client(server_full_logprobs):
    return server_full_logprobs.get_client()


@pytest.fixture
def model_name(server_full_logprobs) -> str:
    return server_full_logprobs.model


def get_vocab_size(server) -> int:
    config = json.loads((server.model_dir / "config.json").read_text())
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


class Case(NamedTuple):
    echo: bool


@pytest.mark.parametrize("test_case", [Case(echo=True), Case(echo=False)])
def test_chat_session_with_echo_and_continue_final_message(client, model_name, test_case):
    """vLLM test_chat_echo.py::test_chat_session_with_echo_and_continue_final_message
    (max_tokens 10 added)."""
    saying = "Here is a common saying about apple. An apple a day, keeps"
    chat_completion = client.chat.completions.create(
        model=model_name, max_completion_tokens=10,
        messages=[{"role": "user", "content": "tell me a common saying"},
                  {"role": "assistant", "content": saying}],
        extra_body={"echo": test_case.echo, "continue_final_message": True,
                    "add_generation_prompt": False})
    assert chat_completion.id is not None
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    # vLLM: "stop" (Qwen2-1.5B finishes the saying); the tiny model may run to the cap
    assert choice.finish_reason in ("stop", "length")
    message = choice.message
    if test_case.echo:
        assert message.content is not None and saying in message.content
    else:
        assert message.content is not None and saying not in message.content
    assert message.role == "assistant"


def test_prompt_logprobs(client, model_name):
    """vLLM test_chat_echo.py::test_prompt_logprobs."""
    completion = client.chat.completions.create(
        model=model_name, max_completion_tokens=5,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Beijing is the capital of which country?"}],
        extra_body={"prompt_logprobs": -1})
    assert completion.prompt_logprobs is not None
    assert len(completion.prompt_logprobs) > 0


def test_top_logprobs(client, model_name, server_full_logprobs):
    """vLLM test_chat_echo.py::test_top_logprobs."""
    completion = client.chat.completions.create(
        model=model_name, max_tokens=1,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Beijing is the capital of which country?"}],
        extra_body={"top_logprobs": -1, "logprobs": "true"})
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.content is not None
    assert len(completion.choices[0].logprobs.content) > 0
    assert len(completion.choices[0].logprobs.content[0].top_logprobs) == get_vocab_size(
        server_full_logprobs)
