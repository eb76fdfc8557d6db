"""Ported from vLLM tests/entrypoints/serve/tokenize/test_tokenization.py.

vLLM serves SmolLM2 with max_model_len 8192 and --enable-tokenizer-info-endpoint. Changes:
the served folder's tokenizer (vLLM: get_tokenizer(MODEL_NAME)) and its max_model_len from
/v1/models instead of 8192.
"""

from __future__ import annotations

import requests

CONVERSATION = [{"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Nice to meet you!"},
                {"role": "user", "content": "Can I ask a question? vllm1"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]


def _post(server, path, body):
    response = requests.post(server.url_for(path), json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def test_tokenize_completions(server, model_name, tokenizer):
    """vLLM test_tokenization.py::test_tokenize_completions."""
    for add_special in [False, True]:
        prompt = "vllm1 This is a test prompt."
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        result = _post(server, "tokenize", {"add_special_tokens": add_special,
                                            "model": model_name, "prompt": prompt})
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == server.max_model_len
        assert result["token_strs"] is None


def _chat_cases(conversation, tools=None):
    for add_generation in [False, True]:
        for add_special in [False, True]:
            conv = [dict(m) for m in conversation]
            for continue_final in [False, True]:
                if add_generation and continue_final:
                    continue
                if continue_final:
                    conv.append({"role": "assistant", "content": "Sure,"})
                yield add_generation, add_special, continue_final, list(conv)


def _check_chat(server, model_name, tokenizer, conversation, tools=None):
    for add_generation, add_special, continue_final, conv in _chat_cases(conversation, tools):
        prompt = tokenizer.apply_chat_template(
            add_generation_prompt=add_generation, continue_final_message=continue_final,
            conversation=conv, tools=tools, tokenize=False)
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        body = {"add_generation_prompt": add_generation, "continue_final_message": continue_final,
                "add_special_tokens": add_special, "messages": conv, "model": model_name}
        if tools:
            body["tools"] = tools
        result = _post(server, "tokenize", body)
        assert result["tokens"] == tokens, (add_generation, add_special, continue_final)
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == server.max_model_len
        assert result["token_strs"] is None


def test_tokenize_chat(server, model_name, tokenizer):
    """vLLM test_tokenization.py::test_tokenize_chat."""
    _check_chat(server, model_name, tokenizer, CONVERSATION)


def test_tokenize_chat_with_tools(server, model_name, tokenizer):
    """vLLM test_tokenization.py::test_tokenize_chat_with_tools."""
    _check_chat(server, model_name, tokenizer,
                [{"role": "user", "content": "What's the weather like in Paris today?"}], TOOLS)


def test_tokenize_with_return_token_strs(server, model_name, tokenizer):
    """vLLM test_tokenization.py::test_tokenize_with_return_token_strs."""
    prompt = "This is a token_strs test prompt! vllm1"
    result = _post(server, "tokenize", {"prompt": prompt, "model": model_name,
                                        "return_token_strs": True})
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    assert result["tokens"] == tokens
    assert result["count"] == len(tokens)
    assert result["max_model_len"] == server.max_model_len
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(tokens)


def test_detokenize(server, model_name, tokenizer):
    """vLLM test_tokenization.py::test_detokenize."""
    prompt = "This is a test prompt. vllm1"
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    assert _post(server, "detokenize", {"model": model_name, "tokens": tokens}) == {"prompt": prompt}


def _info(server):
    response = requests.get(server.url_for("tokenizer_info"), timeout=30)
    response.raise_for_status()
    return response.json()


def test_tokenizer_info_basic(server):
    """vLLM test_tokenization.py::test_tokenizer_info_basic."""
    result = _info(server)
    assert isinstance(result["tokenizer_class"], str) and result["tokenizer_class"]


def test_tokenizer_info_schema(server):
    """vLLM test_tokenization.py::test_tokenizer_info_schema."""
    result = _info(server)
    field_types = {"add_bos_token": bool, "add_prefix_space": bool,
                   "clean_up_tokenization_spaces": bool, "split_special_tokens": bool,
                   "bos_token": str, "eos_token": str, "pad_token": str, "unk_token": str,
                   "chat_template": str, "errors": str, "model_max_length": int,
                   "additional_special_tokens": list, "added_tokens_decoder": dict}
    for field, expected_type in field_types.items():
        if field in result and result[field] is not None:
            assert isinstance(result[field], expected_type), field


def test_tokenizer_info_consistency_with_tokenize(server, model_name):
    """vLLM test_tokenization.py::test_tokenizer_info_consistency_with_tokenize."""
    info = _info(server)
    tokenize_result = _post(server, "tokenize", {"model": model_name, "prompt": "Hello world!"})
    info_max_len = info.get("model_max_length")
    tokenize_max_len = tokenize_result.get("max_model_len")
    if info_max_len and tokenize_max_len:
        assert info_max_len >= tokenize_max_len


def test_tokenizer_info_chat_template(server):
    """vLLM test_tokenization.py::test_tokenizer_info_chat_template."""
    chat_template = _info(server).get("chat_template")
    if chat_template:
        assert isinstance(chat_template, str) and chat_template.strip()
