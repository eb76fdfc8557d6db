"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat_logit_bias_validation.py.

Changes: the sync client; the served model instead of Qwen2.5-1.5B; the vocabulary size from
the served folder's config (vLLM: ModelConfig.get_vocab_size()).
"""

from __future__ import annotations

import json

import openai
import pytest


def get_vocab_size(server) -> int:
    config = json.loads((server.model_dir / "config.json").read_text())
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


def test_chat_logit_bias_valid(client, model_name, server):
    """vLLM test_chat_logit_bias_validation.py::test_chat_logit_bias_valid."""
    valid_token_id = get_vocab_size(server) - 1
    completion = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Testing valid logit bias"}],
        max_tokens=5, logit_bias={str(valid_token_id): 1.0})
    assert completion.choices[0].message.content is not None


def test_chat_logit_bias_invalid(client, model_name, server):
    """vLLM test_chat_logit_bias_validation.py::test_chat_logit_bias_invalid."""
    vocab_size = get_vocab_size(server)
    invalid_token_id = vocab_size + 1
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Testing invalid logit bias"}],
            max_tokens=5, logit_bias={str(invalid_token_id): 1.0})
    error_message = str(excinfo.value)
    assert excinfo.value.status_code == 400
    assert str(invalid_token_id) in error_message
    assert str(vocab_size) in error_message


def test_chat_logit_bias_non_integer_key(client, model_name):
    """vLLM test_chat_logit_bias_validation.py::test_chat_logit_bias_non_integer_key."""
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "Testing invalid logit bias key"}],
            max_tokens=5, logit_bias={"not_a_token_id": 50})
    assert excinfo.value.status_code == 400
    assert "not_a_token_id" in str(excinfo.value)
    assert "logit_bias" in str(excinfo.value)


def test_chat_logit_bias_non_numeric_value(client, model_name):
    """vLLM test_chat_logit_bias_validation.py::test_chat_logit_bias_non_numeric_value."""
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "Testing invalid logit bias value"}],
            max_tokens=5, logit_bias={"1": "not_a_number"})
    assert excinfo.value.status_code == 400
    assert "logit_bias" in str(excinfo.value)


def test_chat_logit_bias_multiple_non_integer_keys(client, model_name):
    """vLLM test_chat_logit_bias_validation.py::test_chat_logit_bias_multiple_non_integer_keys."""
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Testing multiple bad keys"}],
            max_tokens=5, logit_bias={"bad1": 50.0, "bad2": 20.0})
    assert excinfo.value.status_code == 400
    assert "bad1" in str(excinfo.value)
    assert "bad2" in str(excinfo.value)
