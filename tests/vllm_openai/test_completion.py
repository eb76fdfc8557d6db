"""Ported from vLLM tests/entrypoints/openai/completion/test_completion.py.

vLLM serves opt-125m with --enable-prompt-tokens-details. Changes: the sync client; the served
model; opt's prompt size (6 tokens, with its BOS) from the served folder's tokenizer;
min_tokens added where a real model would not stop before the cap.
"""

from __future__ import annotations

import re

import openai
import pytest
from openai import BadRequestError


def test_single_completion(client, model_name, tokenizer):
    """vLLM test_completion.py::test_single_completion (min_tokens=5: the tiny model may end
    sooner; opt's 6 prompt tokens: the served tokenizer's count)."""
    completion = client.completions.create(
        model=model_name, prompt="Hello, my name is", max_tokens=5, temperature=0.0,
        extra_body={"min_tokens": 5})
    assert completion.id is not None
    assert completion.choices is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 1  # vLLM: >= 5 characters from opt's 5 tokens
    assert choice.finish_reason == "length"
    n_prompt = len(tokenizer.encode("Hello, my name is"))
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == n_prompt
    assert completion.usage.total_tokens == n_prompt + 5
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    completion = client.completions.create(
        model=model_name, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
        extra_body={"min_tokens": 1})
    assert len(completion.choices[0].text) >= 1
    assert getattr(completion.choices[0], "prompt_logprobs", None) is None


def test_completion_truncation_side_controls_prompt_truncation(client, model_name):
    """vLLM test_completion.py::test_completion_truncation_side_controls_prompt_truncation."""
    prompt_token_ids = list(range(8))
    right = client.completions.create(
        model=model_name, prompt=prompt_token_ids, max_tokens=1, temperature=0.0,
        extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                    "truncation_side": "right"})
    assert right.choices[0].prompt_token_ids == prompt_token_ids[:4]
    left = client.completions.create(
        model=model_name, prompt=prompt_token_ids, max_tokens=1, temperature=0.0,
        extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                    "truncation_side": "left"})
    assert left.choices[0].prompt_token_ids == prompt_token_ids[-4:]


def test_no_logprobs(client, model_name):
    """vLLM test_completion.py::test_no_logprobs."""
    completion = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                           max_tokens=5, temperature=0.0, logprobs=None)
    assert completion.choices[0].logprobs is None


def test_zero_logprobs(client, model_name):
    """vLLM test_completion.py::test_zero_logprobs."""
    completion = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                           max_tokens=5, temperature=0.0, logprobs=0)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert len(choice.logprobs.top_logprobs[0]) == 1


def test_some_logprobs(client, model_name):
    """vLLM test_completion.py::test_some_logprobs."""
    completion = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                           max_tokens=5, temperature=0.0, logprobs=5)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert 5 <= len(choice.logprobs.top_logprobs[0]) <= 6


def test_too_many_completion_logprobs(client, model_name):
    """vLLM test_completion.py::test_too_many_completion_logprobs."""
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0], max_tokens=5,
                                  temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                           max_tokens=5, temperature=0.0, logprobs=30,
                                           stream=True)
        for _ in stream:
            ...
    completion = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                           max_tokens=5, temperature=0.0)
    assert len(completion.choices[0].text) >= 0


@pytest.mark.parametrize("prompt_logprobs", [-1, 0, 1, None])
def test_prompt_logprobs_completion(client, model_name, prompt_logprobs):
    """vLLM test_completion.py::test_prompt_logprobs_completion (max_tokens 5 added)."""
    params: dict = {"prompt": ["A robot may not injure another robot", "My name is"],
                    "model": model_name, "max_tokens": 5}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.completions.create(**params)
    else:
        completion = client.completions.create(**params)
        if prompt_logprobs is not None:
            assert completion.choices[0].prompt_logprobs is not None
            assert len(completion.choices[0].prompt_logprobs) > 0
            assert completion.choices[1].prompt_logprobs is not None
            assert len(completion.choices[1].prompt_logprobs) > 0
        else:
            assert getattr(completion.choices[0], "prompt_logprobs", None) is None


def test_completion_streaming(client, model_name):
    """vLLM test_completion.py::test_completion_streaming (min_tokens=5 so that, as with opt,
    the 5-token cap is what ends it)."""
    prompt = "What is an LLM?"
    kw = dict(model=model_name, prompt=prompt, max_tokens=5, temperature=0.0,
              extra_body={"min_tokens": 5})
    single_output = client.completions.create(**kw).choices[0].text
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in client.completions.create(**kw, stream=True):
        chunks.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == "length"
    assert chunk.choices[0].text
    assert "".join(chunks) == single_output


def test_parallel_no_streaming(client, model_name):
    """vLLM test_completion.py::test_parallel_no_streaming."""
    n, max_tokens = 3, 50
    completion = client.completions.create(
        model=model_name, prompt="What is an LLM?", max_tokens=max_tokens, n=n, temperature=1.0,
        stream=False, logprobs=0, seed=42)
    assert len(completion.choices) == n
    texts: dict[str, int] = {}
    lengths = set()
    for idx, choice in enumerate(completion.choices):
        assert choice.index == idx
        assert choice.finish_reason is not None
        texts[choice.text] = texts.get(choice.text, 0) + 1
        lengths.add(len(choice.logprobs.tokens))
    assert len(lengths) > 1
    assert len(texts) == n, texts


def test_parallel_streaming(client, model_name):
    """vLLM test_completion.py::test_parallel_streaming."""
    n, max_tokens = 3, 50
    chunks: list[list[str]] = [[] for _ in range(n)]
    finish_reason_count = 0
    for chunk in client.completions.create(
            model=model_name, prompt="What is an LLM?", max_tokens=max_tokens, n=n,
            temperature=1.0, stream=True, seed=42):
        chunks[chunk.choices[0].index].append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == n
    assert all(len(c) <= max_tokens for c in chunks)
    assert len({len(c) for c in chunks}) > 1
    assert len({"".join(c) for c in chunks}) == n


def test_completion_stream_options(client, model_name):
    """vLLM test_completion.py::test_completion_stream_options."""
    kw = dict(model=model_name, prompt="What is the capital of France?", max_tokens=5,
              temperature=0.0)

    def final_usage_checks(stream, continuous: bool):
        for chunk in stream:
            if continuous:
                assert chunk.usage is not None
                assert chunk.usage.prompt_tokens > 0
                assert chunk.usage.completion_tokens > 0
                assert chunk.usage.total_tokens == (chunk.usage.prompt_tokens
                                                    + chunk.usage.completion_tokens)
            if chunk.choices[0].finish_reason is None:
                if not continuous:
                    assert chunk.usage is None
            else:
                if not continuous:
                    assert chunk.usage is None
                final_chunk = next(stream)
                assert final_chunk.usage is not None
                assert final_chunk.usage.prompt_tokens > 0
                assert final_chunk.usage.completion_tokens > 0
                assert final_chunk.usage.total_tokens == (
                    final_chunk.usage.prompt_tokens + final_chunk.usage.completion_tokens)
                assert final_chunk.choices == []

    for opts in ({"include_usage": False, "continuous_usage_stats": False},
                 {"include_usage": False, "continuous_usage_stats": True}, {}):
        for chunk in client.completions.create(**kw, stream=True, stream_options=opts):
            assert chunk.usage is None
    final_usage_checks(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True,
                                           "continuous_usage_stats": False}), False)
    final_usage_checks(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True,
                                           "continuous_usage_stats": True}), True)
    for opts in ({"include_usage": None}, {"include_usage": True},
                 {"continuous_usage_stats": None}, {"continuous_usage_stats": True}):
        with pytest.raises(BadRequestError):
            client.completions.create(**kw, stream=False, stream_options=opts)


def test_batch_completions(client, model_name):
    """vLLM test_completion.py::test_batch_completions."""
    for prompts in (["Hello, my name is"] * 2, [[0, 0, 0, 0, 0]] * 2):
        batch = client.completions.create(model=model_name, prompt=prompts, max_tokens=5,
                                          temperature=0.0)
        assert len(batch.choices) == 2
        assert batch.choices[0].text == batch.choices[1].text
        batch = client.completions.create(model=model_name, prompt=prompts, n=2, max_tokens=5,
                                          temperature=0.0, extra_body=dict(use_beam_search=True))
        assert len(batch.choices) == 4
        assert batch.choices[0].text != batch.choices[1].text
        assert batch.choices[0].text == batch.choices[2].text
        assert batch.choices[1].text == batch.choices[3].text
        texts = [""] * 2
        for chunk in client.completions.create(model=model_name, prompt=prompts, max_tokens=5,
                                               temperature=0.0, stream=True):
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts[0] == texts[1]


@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(client, model_name, tokenizer, logprobs_arg):
    """vLLM test_completion.py::test_echo_logprob_completion (min_tokens=5 added)."""
    for prompt in ("Hello, my name is", [0, 0, 0, 0, 0]):
        completion = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
            logprobs=logprobs_arg, extra_body={"min_tokens": 5})
        prompt_text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        assert re.search(r"^" + re.escape(prompt_text), completion.choices[0].text)
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        assert len(logprobs.text_offset) > 5
        assert len(logprobs.token_logprobs) > 5 and logprobs.token_logprobs[0] is None
        assert len(logprobs.top_logprobs) > 5 and logprobs.top_logprobs[0] is None
        for top_logprobs in logprobs.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top_logprobs) <= logprobs_arg + 1
        assert len(logprobs.tokens) > 5


def test_invalid_json_schema(client, model_name):
    """vLLM test_completion.py::test_invalid_json_schema."""
    invalid_json_schema = {
        "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType",
                              "type": "string"}},
        "properties": {"brand": {"title": "Brand", "type": "string"},
                       "model": {"title": "Model", "type": "string"},
                       "car_type": {"$ref": "#/$defs/CarType"}, "foo": "bar"},
        "required": ["brand", "model", "car_type"], "title": "CarDescription", "type": "object"}
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=model_name, max_tokens=5,
            prompt="Generate a JSON with the brand, model and car_type of the most iconic car "
                   "from the 90's",
            extra_body={"structured_outputs": {"json": invalid_json_schema}})


def test_invalid_regex(client, model_name):
    """vLLM test_completion.py::test_invalid_regex."""
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=model_name, max_tokens=5,
            prompt="Generate an email address for Alan Turing, who works in Enigma.End in .com "
                   "and new line. Example result:alan.turing@enigma.com\n",
            extra_body={"structured_outputs": {"regex": r"[.*"}, "stop": ["\n"]})


def test_invalid_grammar(client, model_name):
    """vLLM test_completion.py::test_invalid_grammar."""
    grammar = """
        root ::= select_statementinvalidsyntax

        select_statement ::= "SELECT " column " from " table " where " condition

        column ::= "col_1 " | "col_2 "

        table ::= "table_1 " | "table_2 "

        condition ::= column "= " number

        number ::= "1 " | "2 "
    """
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=model_name, max_tokens=5,
            prompt="Generate an SQL query to show the 'username' and 'email'from the 'users' "
                   "table.",
            extra_body={"structured_outputs": {"grammar": grammar}})
