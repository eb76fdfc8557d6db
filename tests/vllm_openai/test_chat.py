"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat.py.

Changes: the sync client; the served model instead of zephyr-7b-beta, and no "zephyr-lora"
cases (no LoRA here); the prompt size of zephyr's template (37) from the served folder's own
template; answers a 7B model gives ("2", {"result": 2}) replaced by their shape where noted.
Not ported: the three unit tests of ChatCompletionRequest.to_sampling_params (vLLM internals).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import openai
import pytest
import requests
from openai import BadRequestError

from .conftest import validate_json_schema

MESSAGES = [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": "what is 1+1?"}]


def test_no_logprobs_chat(client, model_name):
    """vLLM test_chat.py::test_no_logprobs_chat."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=5, temperature=0.0,
        logprobs=False)
    assert chat_completion.choices[0].logprobs is None


def test_zero_logprobs_chat(client, model_name):
    """vLLM test_chat.py::test_zero_logprobs_chat."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=5, temperature=0.0,
        logprobs=True, top_logprobs=0)
    choice = chat_completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    assert len(choice.logprobs.content[0].top_logprobs) == 0


def test_some_logprobs_chat(client, model_name):
    """vLLM test_chat.py::test_some_logprobs_chat."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=5, temperature=0.0,
        logprobs=True, top_logprobs=5)
    choice = chat_completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    assert len(choice.logprobs.content[0].top_logprobs) == 5


def test_too_many_chat_logprobs(client, model_name):
    """vLLM test_chat.py::test_too_many_chat_logprobs."""
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = client.chat.completions.create(
            model=model_name, messages=MESSAGES, max_completion_tokens=10, logprobs=True,
            top_logprobs=21, stream=True)
        for _ in stream:
            ...
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=MESSAGES, max_completion_tokens=10, logprobs=True,
            top_logprobs=30, stream=False)
    chat_completion = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=10, stream=False)
    assert chat_completion.choices[0].message.content is not None


PROMPT_LOGPROBS_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who won the world series in 2020?"},
    {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
    {"role": "user", "content": "Where was it played?"}]


@pytest.mark.parametrize("prompt_logprobs", [1, 0, -1, None])
def test_prompt_logprobs_chat(client, model_name, prompt_logprobs):
    """vLLM test_chat.py::test_prompt_logprobs_chat."""
    params: dict = {"messages": PROMPT_LOGPROBS_MESSAGES, "model": model_name,
                    "max_completion_tokens": 5}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.chat.completions.create(**params)
    else:
        completion = client.chat.completions.create(**params)
        prompt_lp = getattr(completion, "prompt_logprobs", None)
        if prompt_logprobs is not None:
            assert prompt_lp is not None
            assert len(prompt_lp) > 0
        else:
            assert prompt_lp is None


def test_more_than_one_prompt_logprobs_chat(client, model_name):
    """vLLM test_chat.py::test_more_than_one_prompt_logprobs_chat."""
    params: dict = {"messages": PROMPT_LOGPROBS_MESSAGES, "model": model_name,
                    "max_completion_tokens": 5, "extra_body": {"prompt_logprobs": 1}}
    completion_1 = client.chat.completions.create(**params)
    params["extra_body"] = {"prompt_logprobs": 2}
    completion_2 = client.chat.completions.create(**params)
    assert len(completion_1.prompt_logprobs[3]) == 1
    assert len(completion_2.prompt_logprobs[3]) == 2


def test_single_chat_session(client, model_name, tokenizer):
    """vLLM test_chat.py::test_single_chat_session (zephyr's 37 prompt tokens: the served
    template's count here; min_tokens=5 because the tiny model may stop sooner)."""
    messages = list(MESSAGES)
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=5, logprobs=True,
        top_logprobs=5, extra_body={"min_tokens": 5})
    assert chat_completion.id is not None
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason == "length"
    prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"])
    assert chat_completion.usage.model_dump(include={"completion_tokens", "prompt_tokens",
                                                     "total_tokens"}) == {
        "completion_tokens": 5, "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + 5}
    message = choice.message
    assert message.content is not None and len(message.content) >= 1  # vLLM: >= 5 chars
    assert message.role == "assistant"
    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=5)
    assert chat_completion.choices[0].message.content is not None


def test_chat_streaming(client, model_name):
    """vLLM test_chat.py::test_chat_streaming."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=10, temperature=0.0)
    output = chat_completion.choices[0].message.content
    stop_reason = chat_completion.choices[0].finish_reason
    stream = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=10, temperature=0.0,
        stream=True)
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in stream:
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == stop_reason
    assert delta.content
    assert "".join(chunks) == output


def test_chat_completion_stream_options(client, model_name):
    """vLLM test_chat.py::test_chat_completion_stream_options."""
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    common = dict(model=model_name, messages=messages, max_completion_tokens=10, temperature=0.0)
    stream = client.chat.completions.create(**common, stream=True,
                                            stream_options={"include_usage": False})
    for chunk in stream:
        assert chunk.usage is None
    stream = client.chat.completions.create(
        **common, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": False})
    for chunk in stream:
        if chunk.choices[0].finish_reason is None:
            assert chunk.usage is None
        else:
            assert chunk.usage is None
            final_chunk = next(stream)
            assert final_chunk.usage is not None
            assert final_chunk.usage.prompt_tokens > 0
            assert final_chunk.usage.completion_tokens > 0
            assert final_chunk.usage.total_tokens == (
                final_chunk.usage.prompt_tokens + final_chunk.usage.completion_tokens)
            assert final_chunk.choices == []
    with pytest.raises(BadRequestError):
        client.chat.completions.create(**common, stream=False,
                                       stream_options={"include_usage": None})
    with pytest.raises(BadRequestError):
        client.chat.completions.create(**common, stream=False,
                                       stream_options={"include_usage": True})
    stream = client.chat.completions.create(
        **common, extra_body=dict(min_tokens=10), stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    last_completion_tokens = 0
    for chunk in stream:
        assert chunk.usage.prompt_tokens >= 0
        assert (last_completion_tokens == 0
                or chunk.usage.completion_tokens > last_completion_tokens
                or (not chunk.choices
                    and chunk.usage.completion_tokens == last_completion_tokens))
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        last_completion_tokens = chunk.usage.completion_tokens
    assert last_completion_tokens == 10
    stream = client.chat.completions.create(
        **common, extra_body=dict(min_characters=10), stream=True,
        stream_options={"include_usage": False})
    completion = ""
    for chunk in stream:
        completion += chunk.choices[0].delta.content or ""
    assert len(completion) >= 10


TYPE_SAFE = [{"role": "system", "content": "you are a helpful assistant"},
             {"role": "user", "content": "The best language for type-safe systems programming is "}]


def test_structured_outputs_choice_chat(client, model_name, sample_structured_outputs_choices):
    """vLLM test_chat.py::test_structured_outputs_choice_chat."""
    messages = list(TYPE_SAFE)
    so = dict(structured_outputs={"choice": sample_structured_outputs_choices})
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=10, temperature=0.7,
        extra_body=so)
    choice1 = chat_completion.choices[0].message.content
    assert choice1 in sample_structured_outputs_choices
    messages.append({"role": "assistant", "content": choice1})
    messages.append({"role": "user", "content": "I disagree, pick another one"})
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=10, temperature=0.7,
        extra_body=so)
    choice2 = chat_completion.choices[0].message.content
    assert choice2 in sample_structured_outputs_choices
    assert choice1 != choice2


def test_structured_outputs_json_chat(client, model_name, sample_json_schema):
    """vLLM test_chat.py::test_structured_outputs_json_chat (max 1000 tokens: 200 here)."""
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "Give an example JSON for an employee profile that "
                                            f"fits this schema: {sample_json_schema}"}]
    so = dict(structured_outputs={"json": sample_json_schema})
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=200, extra_body=so)
    message = chat_completion.choices[0].message
    json1 = json.loads(message.content)
    validate_json_schema(json1, sample_json_schema)
    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "Give me another one with a different name and age"})
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=200, extra_body=so)
    json2 = json.loads(chat_completion.choices[0].message.content)
    validate_json_schema(json2, sample_json_schema)
    assert json1["name"] != json2["name"]
    assert json1["age"] != json2["age"]


def test_structured_outputs_regex_chat(client, model_name, sample_regex):
    """vLLM test_chat.py::test_structured_outputs_regex_chat."""
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": f"Give an example IP address with this regex: {sample_regex}"}]
    so = dict(structured_outputs={"regex": sample_regex})
    ip1 = client.chat.completions.create(model=model_name, messages=messages,
                                         max_completion_tokens=20,
                                         extra_body=so).choices[0].message.content
    assert ip1 is not None and re.fullmatch(sample_regex, ip1) is not None
    messages.append({"role": "assistant", "content": ip1})
    messages.append({"role": "user", "content": "Give me a different one"})
    ip2 = client.chat.completions.create(model=model_name, messages=messages,
                                         max_completion_tokens=20,
                                         extra_body=so).choices[0].message.content
    assert ip2 is not None and re.fullmatch(sample_regex, ip2) is not None
    assert ip1 != ip2


def test_structured_outputs_type_error(client, model_name):
    """vLLM test_chat.py::test_structured_outputs_type_error."""
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=TYPE_SAFE,
            extra_body=dict(structured_outputs={"regex": {1: "Python", 2: "C++"}}))


def test_structured_outputs_choice_chat_logprobs(client, model_name,
                                                 sample_structured_outputs_choices):
    """vLLM test_chat.py::test_structured_outputs_choice_chat_logprobs."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=TYPE_SAFE, max_completion_tokens=10, logprobs=True,
        top_logprobs=5,
        extra_body=dict(structured_outputs={"choice": sample_structured_outputs_choices}))
    assert chat_completion.choices[0].logprobs is not None
    assert chat_completion.choices[0].logprobs.content is not None
    for item in chat_completion.choices[0].logprobs.content[0].top_logprobs:
        assert item.logprob >= -9999.0


def test_response_format_json_object(client, model_name):
    """vLLM test_chat.py::test_response_format_json_object (a 7B model answers {"result": 2};
    here: the answer is a JSON object)."""
    for _ in range(2):
        resp = client.chat.completions.create(
            model=model_name, max_completion_tokens=100,
            messages=[{"role": "user", "content": 'what is 1+1? please respond with a JSON '
                                                  'object, the format is {"result": 2}'}],
            response_format={"type": "json_object"})
        content = resp.choices[0].message.content
        assert content is not None
        assert isinstance(json.loads(content), dict)


def test_response_format_json_schema(client, model_name):
    """vLLM test_chat.py::test_response_format_json_schema (its first half checks that the
    7B model does not answer JSON unasked, and the answer is {"result": 2}: here the answer
    fits the schema)."""
    prompt = 'what is 1+1? The format is "result": 2'
    schema = {"type": "object", "properties": {"result": {"type": "integer"}}}
    for _ in range(2):
        resp = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": prompt}],
            max_completion_tokens=100,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "foo_test", "schema": schema}})
        content = resp.choices[0].message.content
        assert content is not None
        validate_json_schema(json.loads(content), schema)


def test_response_format_text(client, model_name):
    """vLLM test_chat.py::test_response_format_text."""
    for _ in range(2):
        resp = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "what is 1+1?"}],
            max_completion_tokens=10, response_format={"type": "text"})
        assert resp.choices[0].message.content is not None


def test_extra_fields_allowed(client, model_name):
    """vLLM test_chat.py::test_extra_fields_allowed."""
    resp = client.chat.completions.create(
        model=model_name, max_completion_tokens=10, temperature=0, seed=0,
        messages=[{"role": "user", "content": "what is 1+1?", "extra_field": "0"}])
    assert resp.choices[0].message.content is not None


def test_complex_message_content(client, model_name):
    """vLLM test_chat.py::test_complex_message_content (zephyr answers "2"; here: the list of
    text parts answers what the same text as a string answers)."""
    text = "what is 1+1? please provide the result without any other text."
    resp = client.chat.completions.create(
        model=model_name, temperature=0, seed=0, max_completion_tokens=10,
        messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    plain = client.chat.completions.create(
        model=model_name, temperature=0, seed=0, max_completion_tokens=10,
        messages=[{"role": "user", "content": text}])
    assert resp.choices[0].message.content == plain.choices[0].message.content


def test_custom_role(client, model_name):
    """vLLM test_chat.py::test_custom_role."""
    resp1 = client.chat.completions.create(
        model=model_name, temperature=0, seed=0, max_completion_tokens=10,
        messages=[{"role": "my-custom-role", "content": "what is 1+1?"}])
    resp2 = client.chat.completions.create(
        model=model_name, temperature=0, seed=0, max_completion_tokens=10,
        messages=[{"role": "my-custom-role",
                   "content": [{"type": "text", "text": "what is 1+1?"}]}])
    assert resp1.choices[0].message.content == resp2.choices[0].message.content


def test_long_seed(client, model_name):
    """vLLM test_chat.py::test_long_seed."""
    for seed in [-(2 ** 63) - 1, 2 ** 63]:
        with pytest.raises(BadRequestError) as exc_info:
            client.chat.completions.create(
                model=model_name, temperature=0, seed=seed,
                messages=[{"role": "system", "content": "You are a helpful assistant."}])
        assert ("greater_than_equal" in exc_info.value.message
                or "less_than_equal" in exc_info.value.message)


def test_invocations(server, client, model_name):
    """vLLM test_chat.py::test_invocations."""
    request_args = {"model": model_name, "messages": MESSAGES, "max_completion_tokens": 5,
                    "temperature": 0.0, "logprobs": False}
    chat_completion = client.chat.completions.create(**request_args)
    invocation_response = requests.post(server.url_for("invocations"), json=request_args,
                                        timeout=60)
    invocation_response.raise_for_status()
    # exclude_unset: the installed client's model has fields (metadata, moderation) that no
    # server sends; vLLM's pinned client had none of them
    chat_output = chat_completion.model_dump(exclude_unset=True)
    invocation_output = invocation_response.json()
    assert chat_output.keys() == invocation_output.keys()
    assert chat_output["choices"] == invocation_output["choices"]


def test_chat_completion_n_parameter_non_streaming(client, model_name):
    """vLLM test_chat.py::test_chat_completion_n_parameter_non_streaming."""
    chat_completion = client.chat.completions.create(
        model=model_name, max_completion_tokens=20, temperature=0.7, n=3, stream=False,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the opposite of big?"}])
    assert len(chat_completion.choices) == 3
    for i, choice in enumerate(chat_completion.choices):
        assert choice.index == i
        assert choice.message.content is not None and len(choice.message.content) > 0
    assert len({c.message.content for c in chat_completion.choices}) > 1


def test_chat_completion_n_parameter_streaming(client, model_name):
    """vLLM test_chat.py::test_chat_completion_n_parameter_streaming."""
    stream = client.chat.completions.create(
        model=model_name, max_completion_tokens=15, temperature=0.7, n=2, stream=True,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of France?"}])
    chunks_by_index = defaultdict(list)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                chunks_by_index[choice.index].append(choice.delta.content)
    assert len(chunks_by_index[0]) > 0
    assert len(chunks_by_index[1]) > 0


def test_chat_completion_n_with_seed(client, model_name):
    """vLLM test_chat.py::test_chat_completion_n_with_seed."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Say hello."}],
        max_completion_tokens=10, temperature=0.8, n=2, seed=42, stream=False)
    assert len(chat_completion.choices) == 2
    for i, choice in enumerate(chat_completion.choices):
        assert choice.index == i
        assert choice.message.content is not None and len(choice.message.content) > 0


def test_chat_completion_n_equals_1(client, model_name):
    """vLLM test_chat.py::test_chat_completion_n_equals_1."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hello!"}],
        max_completion_tokens=10, temperature=0.7, n=1, stream=False)
    assert len(chat_completion.choices) == 1
    assert chat_completion.choices[0].index == 0
    assert chat_completion.choices[0].message.content is not None
