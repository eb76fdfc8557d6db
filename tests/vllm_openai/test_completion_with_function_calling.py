"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_completion_with_function_calling.py.

vLLM serves Qwen3-0.6B with `--enable-auto-tool-choice --tool-call-parser hermes
--reasoning-parser qwen3`; the tiny Qwen2.5-VL has no reasoning parser, so vLLM runs these
with the first two flags. Changes: the sync client; the served model; max tokens capped at 100
(vLLM: unbounded or 1000) to keep the run short.
"""

from __future__ import annotations

import datetime
import json

import openai
import pytest

from .conftest import validate_json_schema

MAX = 100
tools = [
    {"type": "function", "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object", "strict": True,
            "properties": {
                "city": {"type": "string", "description": "The city to find the weather for, "
                         "e.g. 'Vienna'", "default": "Vienna"},
                "country": {"type": "string",
                            "description": "The country that the city is in, e.g. 'Austria'"},
                "unit": {"type": "string", "description": "The unit to fetch the temperature in",
                         "enum": ["celsius", "fahrenheit"]},
                "options": {"$ref": "#/$defs/WeatherOptions",
                            "description": "Optional parameters for weather query"},
            },
            "required": ["country", "unit"],
            "$defs": {"WeatherOptions": {
                "title": "WeatherOptions", "type": "object", "additionalProperties": False,
                "properties": {
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                             "default": "celsius", "description": "Temperature unit",
                             "title": "Temperature Unit"},
                    "include_forecast": {"type": "boolean", "default": False,
                                         "description": "Whether to include a 24-hour forecast",
                                         "title": "Include Forecast"},
                    "language": {"type": "string", "default": "zh-CN",
                                 "description": "Language of the response", "title": "Language",
                                 "enum": ["zh-CN", "en-US", "ja-JP"]},
                }}},
        }}},
    {"type": "function", "function": {
        "name": "get_forecast",
        "description": "Get the weather forecast for a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city to get the forecast for, "
                         "e.g. 'Vienna'", "default": "Vienna"},
                "country": {"type": "string",
                            "description": "The country that the city is in, e.g. 'Austria'"},
                "days": {"type": "integer",
                         "description": "Number of days to get the forecast for (1-7)"},
                "unit": {"type": "string", "description": "The unit to fetch the temperature in",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["country", "days", "unit"],
        }}},
]

messages = [
    {"role": "user", "content": "Hi! How are you doing today?"},
    {"role": "assistant", "content": "I'm doing well! How can I help you?"},
    {"role": "user", "content": "Can you tell me what the current weather is in Berlin and the "
                                "forecast for the next 5 days, in fahrenheit?"},
]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("tool_choice", [
    "auto", "required", {"type": "function", "function": {"name": "get_current_weather"}}])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_function_tool_use(client, model_name, stream, tool_choice, enable_thinking):
    """vLLM test_completion_with_function_calling.py::test_function_tool_use."""
    kwargs = dict(messages=messages, model=model_name, tools=tools, tool_choice=tool_choice,
                  max_completion_tokens=MAX,
                  extra_body={"chat_template_kwargs": {"enable_thinking": enable_thinking}})
    if not stream:
        chat_completion = client.chat.completions.create(**kwargs)
        if enable_thinking:
            reasoning = getattr(chat_completion.choices[0].message, "reasoning", None)
            assert reasoning is not None and reasoning != ""
        assert chat_completion.choices[0].message.tool_calls is not None
        assert len(chat_completion.choices[0].message.tool_calls) > 0
    else:
        output, reasoning = [], []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            if chunk.choices:
                if enable_thinking and getattr(chunk.choices[0].delta, "reasoning", None):
                    reasoning.append(chunk.choices[0].delta.reasoning)
                if chunk.choices[0].delta.tool_calls:
                    output.extend(chunk.choices[0].delta.tool_calls)
        assert len(output) > 0
        if enable_thinking:
            assert len(reasoning) > 0


@pytest.mark.parametrize("arguments", ["{}", ""])
def test_no_args_tool_call(client, model_name, arguments):
    """vLLM test_completion_with_function_calling.py::test_no_args_tool_call."""
    no_arg_tools = [{"type": "function", "function": {
        "name": "get_current_time",
        "description": "Get the current date and time. Call this when the user asks what time "
                       "or date it is. No parameters needed.",
        "parameters": {"type": "object", "properties": {}, "required": []}}}]
    msgs: list = [
        {"role": "system", "content": "You are a helpful assistant. Always use the available "
                                      "tools when relevant, and reply with a short sentence "
                                      "after receiving a tool result."},
        {"role": "user", "content": "What time is it now?"}]
    shared = dict(model=model_name, temperature=0.0, seed=42, max_completion_tokens=MAX,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    response = client.chat.completions.create(**shared, messages=msgs, tools=no_arg_tools,
                                              tool_choice="auto")
    message = response.choices[0].message
    if message.tool_calls:
        tool_call = message.tool_calls[0]
        if tool_call.function.name == "get_current_time":
            tool_call.function.arguments = arguments
            msgs.append(message.model_dump(exclude_none=True))
            msgs.append({"role": "tool", "tool_call_id": tool_call.id,
                         "content": datetime.datetime.now().isoformat()})
            final = client.chat.completions.create(**shared, messages=msgs)
            assert final.choices[0].message.content is not None
            assert final.choices[0].message.content.strip() != ""
    else:
        assert message.content is not None


def test_named_tool_use(client, model_name, sample_json_schema):
    """vLLM test_completion_with_function_calling.py::test_named_tool_use."""
    msgs: list = [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "Give an example JSON for an employee profile using the "
                                    "specified tool."}]
    named_tools = [{"type": "function", "function": {
        "name": "dummy_function_name", "description": "This is a dummy function",
        "parameters": sample_json_schema}}]
    tool_choice = {"type": "function", "function": {"name": "dummy_function_name"}}
    chat_completion = client.chat.completions.create(
        model=model_name, messages=msgs, max_completion_tokens=MAX, tools=named_tools,
        temperature=0.0, tool_choice=tool_choice)
    message = chat_completion.choices[0].message
    assert len(message.content or "") == 0
    json_string = message.tool_calls[0].function.arguments
    json1 = json.loads(json_string)
    validate_json_schema(json1, sample_json_schema)
    msgs.append({"role": "assistant", "content": json_string})
    msgs.append({"role": "user", "content": "Give me another one with a different name and age"})
    output, finish_reason_count = [], 0
    for chunk in client.chat.completions.create(
            model=model_name, messages=msgs, max_completion_tokens=MAX, tools=named_tools,
            tool_choice=tool_choice, temperature=0.0, stream=True):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        assert delta.content is None or len(delta.content) == 0
        if delta.tool_calls and delta.tool_calls[0].function.arguments:
            output.append(delta.tool_calls[0].function.arguments)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    json2 = json.loads("".join(output))
    validate_json_schema(json2, sample_json_schema)
    assert json1["name"] != json2["name"]
    assert json1["age"] != json2["age"]


def test_inconsistent_tool_choice_and_tools(client, model_name, sample_json_schema):
    """vLLM test_completion_with_function_calling.py::test_inconsistent_tool_choice_and_tools."""
    msgs = [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": "Give an example JSON for an employee profile that "
                                        f"fits this schema: {sample_json_schema}"}]
    dummy = [{"type": "function", "function": {
        "name": "dummy_function_name", "description": "This is a dummy function",
        "parameters": sample_json_schema}}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=msgs, max_completion_tokens=MAX,
            tool_choice={"type": "function", "function": {"name": "dummy_function_name"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=msgs, max_completion_tokens=MAX, tools=dummy,
            tool_choice={"type": "function", "function": {"name": "nondefined_function_name"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=msgs, max_completion_tokens=MAX, tools=dummy,
            tool_choice={})


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_current_weather"}}])
def test_max_tokens_with_tool_choice_required(client, tool_choice):
    """vLLM test_completion_with_function_calling.py::test_max_tokens_with_tool_choice_required."""
    model = client.models.list().data[0].id
    chat_completion = client.chat.completions.create(
        messages=messages, temperature=0, max_completion_tokens=1, model=model, tools=tools,
        tool_choice=tool_choice)
    choice = chat_completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None
