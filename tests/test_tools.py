"""Tool calls as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes` gives them:
"required" and named calls forced by their schema on the tiny model (100 random tool sets and
samplings each, every call's arguments validate), "auto" read from Hermes <tool_call> blocks
(a scripted model output, and the parser on strings, whole and streamed), a tool result turn,
finish_reason, and vLLM's refusals. Shapes as vLLM 0.32 sent them (CPU build, by hand)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from engine.base import Engine
from engine.types import Finished, RequestStats, TextDelta
from server.routes import create_api_app
from server.settings import ServerSettings
from server.tools import ToolStream, parse_forced, parse_hermes
from tests.structured_cases import random_schema

httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

TOOLS_ON = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
ASK = [{"role": "user", "content": "How many shapes are there?"}]
ID_PREFIX = "chatcmpl-tool-"


def _object_schema(rng: random.Random) -> dict:
    while (schema := random_schema(rng))["type"] != "object":
        pass
    return schema


def random_tools(rng: random.Random) -> list[dict]:
    names = rng.sample(["count", "colours", "locate", "describe", "get_weather"],
                       rng.randint(1, 3))
    return [{"type": "function", "function": {
        "name": n, "description": f"{n} the shapes",
        **({"parameters": _object_schema(rng)} if rng.random() < 0.9 else {})}}
        for n in names]


def parameters(tools: list[dict], name: str) -> dict:
    tool = next(t for t in tools if t["function"]["name"] == name)
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


@pytest.fixture(scope="module")
def client(tiny_engine):
    with TestClient(create_api_app(tiny_engine, TOOLS_ON)) as tc:
        yield tc


def _sampling(rng: random.Random) -> dict:
    return {"max_tokens": rng.choice([96, 192]), "temperature": rng.choice([0, 0.8, 1.3]),
            "top_p": rng.choice([None, 0.9]), "seed": rng.randrange(2**32)}


def _forced(client, mode: str, seed: str) -> None:
    rng = random.Random(seed)
    cases = []
    for _ in range(100):
        tools = random_tools(rng)
        choice = "required" if mode == "required" else {
            "type": "function", "function": {"name": rng.choice(tools)["function"]["name"]}}
        cases.append({"messages": ASK, "tools": tools, "tool_choice": choice,
                      "parallel_tool_calls": rng.choice([True, False]), **_sampling(rng)})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), cases))
    for body, resp in zip(cases, answers):
        if resp.status_code == 400:   # a budget below the shortest call
            assert resp.json()["error"]["param"] == "max_tokens", resp.text
            continue
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        message = choice["message"]
        assert message["content"] == "" and message["tool_calls"], (body, message)
        # a call closed near the budget's end still ends with its EOS (vLLM's may be cut)
        assert choice["finish_reason"] == ("tool_calls" if mode == "required" else "stop"), \
            choice
        if body["parallel_tool_calls"] is False or mode == "named":
            assert len(message["tool_calls"]) == 1
        for call in message["tool_calls"]:
            assert call["id"].startswith(ID_PREFIX) and call["type"] == "function"
            name = call["function"]["name"]
            if mode == "named":
                assert name == body["tool_choice"]["function"]["name"]
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                parameters(body["tools"], name))


def test_required_calls_always_validate(client):
    _forced(client, "required", "tools-required")


def test_named_calls_always_validate(client):
    _forced(client, "named", "tools-named")


def _stream(client, body: dict) -> list:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _assemble(chunks: list) -> tuple[list[dict], str | None]:
    """The calls a client rebuilds from tool-call deltas (as the openai client does)."""
    calls: dict[int, dict] = {}
    for chunk in chunks[1:]:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], {"arguments": ""})
            if "id" in delta:
                assert set(delta) == {"id", "type", "index", "function"}, delta
                assert delta["id"].startswith(ID_PREFIX) and "name" not in call
                call["name"] = delta["function"]["name"]
            else:
                assert set(delta) == {"index", "function"}, delta
                call["arguments"] += delta["function"]["arguments"]
    return [calls[i] for i in sorted(calls)], chunks[-1]["choices"][0]["finish_reason"]


@pytest.mark.parametrize("mode", ["required", "named"])
def test_forced_calls_stream_as_vllm_deltas(client, mode):
    """First a delta with id, type and name, then argument pieces; no content; the finish
    reason in the last chunk. Streamed and whole answers agree (same seed)."""
    rng = random.Random(f"stream-{mode}")
    for _ in range(10):
        tools = random_tools(rng)
        choice = "required" if mode == "required" else {
            "type": "function", "function": {"name": tools[0]["function"]["name"]}}
        body = {"messages": ASK, "tools": tools, "tool_choice": choice, "max_tokens": 256,
                "temperature": 1.0, "seed": rng.randrange(2**32)}
        chunks = _stream(client, body)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["choices"][0]["delta"].get("content") is None for c in chunks[1:])
        assert set(chunks[-1]["choices"][0]["delta"]) <= {"content", "tool_calls"}
        calls, finish = _assemble(chunks)
        assert finish == ("tool_calls" if mode == "required" else "stop")
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert [c["name"] for c in calls] == \
            [c["function"]["name"] for c in whole["message"]["tool_calls"]]
        for call, full in zip(calls, whole["message"]["tool_calls"]):
            arguments = json.loads(call["arguments"])
            assert arguments == json.loads(full["function"]["arguments"])
            jsonschema.validate(arguments, parameters(tools, call["name"]))


def test_a_tool_result_turn_is_rendered_and_answered(client, tiny_engine):
    tools = random_tools(random.Random(1))
    first = client.post("/v1/chat/completions", json={
        "messages": ASK, "tools": tools, "tool_choice": "required", "max_tokens": 128}).json()
    call = first["choices"][0]["message"]["tool_calls"][0]
    turns = ASK + [{"role": "assistant", "content": "", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"], "content": "4"}]
    body = {"messages": turns, "tools": tools, "tool_choice": "none", "max_tokens": 8,
            "temperature": 0, "return_token_ids": True}
    answer = client.post("/v1/chat/completions", json=body).json()
    prompt = tiny_engine.tokenizer.decode(answer["prompt_token_ids"])
    # Qwen2.5-VL's own template renders a tool turn in its role, and ignores `tools` and the
    # assistant's calls (vLLM 0.32 renders the same 45 tokens)
    assert prompt.endswith("<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n")
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert "tool_calls" not in answer["choices"][0]["message"]


# --------------------------------------------------------------------------- auto
class ScriptedEngine(Engine):
    """An engine whose every request answers a fixed text in fixed pieces."""

    model_name, is_tiny, max_model_len, device_description = "scripted", False, 4096, "none"

    def __init__(self, pieces: list[str]) -> None:
        super().__init__()
        self.pieces = pieces

    def health(self) -> bool:
        return True

    def submit(self, request, policy=None):
        from engine.stream import RequestHandle

        self.last = request
        handle = RequestHandle(request.request_id)
        for piece in self.pieces:
            handle.push(TextDelta(piece, [1]))
        handle.push(Finished("stop", RequestStats(3, 0, 0, len(self.pieces))))
        return handle


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
HERMES = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
         '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n' \
         '</tool_call>'


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_auto_reads_hermes_blocks_whole_and_streamed(size):
    engine = ScriptedEngine(_pieces(HERMES, size))
    body = {"messages": ASK, "tools": WEATHER}
    with TestClient(create_api_app(engine, TOOLS_ON)) as tc:
        choice = tc.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert engine.last.sampling.skip_special_tokens is False   # as vLLM's hermes parser
        assert engine.last.conversation.tools == WEATHER
        chunks = _stream(tc, body)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] \
        == [{"city": "Paris"}, {"city": "Rome"}]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[1:])
    assert content == "Let me check."
    calls, finish = _assemble(chunks)
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]


def test_auto_without_a_call_is_plain_content():
    engine = ScriptedEngine(["There are ", "4 shapes <tool", "s> here."])
    with TestClient(create_api_app(engine, TOOLS_ON)) as tc:
        choice = tc.post("/v1/chat/completions",
                         json={"messages": ASK, "tools": WEATHER}).json()["choices"][0]
        chunks = _stream(tc, {"messages": ASK, "tools": WEATHER})
    assert choice["message"]["content"] == "There are 4 shapes <tools> here."
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[1:]) == \
        "There are 4 shapes <tools> here."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call():
    engine = ScriptedEngine([HERMES])
    body = {"messages": ASK, "tools": WEATHER, "parallel_tool_calls": False}
    with TestClient(create_api_app(engine, TOOLS_ON)) as tc:
        calls = tc.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
            "tool_calls"]
        streamed, _ = _assemble(_stream(tc, body))
    assert len(calls) == len(streamed) == 1


# --------------------------------------------------------------------------- the parsers
def test_hermes_parser_on_strings():
    assert parse_hermes("no call here") == ("no call here", [])
    content, calls = parse_hermes(HERMES)
    assert content == "Let me check." and len(calls) == 2
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # an unclosed last block is still read when its JSON is whole (vLLM's regex)
    content, calls = parse_hermes('<tool_call>{"name": "f", "arguments": {}}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    # a malformed block: the whole text is content, no calls (vLLM's)
    for bad in ['<tool_call>{"name": "f", "argu', '<tool_call>{"arguments": {}}</tool_call>',
                "<tool_call>not json</tool_call>"]:
        assert parse_hermes(bad) == (bad, [])


def test_hermes_stream_holds_a_partial_tag_and_skips_a_nameless_block():
    stream = ToolStream("auto")
    assert stream.feed("Hi <tool") == {"content": "Hi "}
    assert stream.feed("_cal") is None
    assert stream.feed('l>{"na') is None
    first = stream.feed('me": "f", "arguments": {"a"')
    assert first["content"] is None
    assert first["tool_calls"][0]["function"] == {"name": "f"}
    assert first["tool_calls"][1] == {"index": 0, "function": {"arguments": '{"a"'}}
    assert stream.feed(": 1}}</tool_call>")["tool_calls"] == \
        [{"index": 0, "function": {"arguments": ": 1}"}}]
    assert stream.feed("\n") is None   # whitespace after a call is not content


def test_forced_parsers():
    assert parse_forced("", "required") == []
    assert parse_forced('[{"name": "f", "parameters": {"x"', "required") == []   # cut short
    calls = parse_forced('[{"name":"f","parameters":{"x":1}},{"name":"g","parameters":{}}]',
                         "required")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [("f", '{"x": 1}'), ("g", "{}")]
    named = {"type": "function", "function": {"name": "f"}}
    assert parse_forced('{"x":1}', named)[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    stream = ToolStream("required")
    pieces = [stream.feed(p) for p in _pieces('[{"name":"f","parameters":{"s":"a}\\"]"}},'
                                              '{"name":"g","parameters":{}}]', 4)]
    args = {}
    for piece in filter(None, pieces):
        for d in piece["tool_calls"]:
            args[d["index"]] = args.get(d["index"], "") + d["function"].get("arguments", "")
    assert args == {0: '{"s":"a}\\"]"}', 1: "{}"}


# --------------------------------------------------------------------------- refusals
NAMED = {"type": "function", "function": {"name": "get_weather"}}
REFUSALS = {   # body fields -> (settings, vLLM 0.32's message, param)
    "auto without the flags": ({"tools": WEATHER}, ServerSettings(),
                               '"auto" tool choice requires --enable-auto-tool-choice and '
                               "--tool-call-parser to be set", "tool_choice"),
    "required without the flags": ({"tools": WEATHER, "tool_choice": "required"},
                                   ServerSettings(), 'tool_choice="required" requires '
                                   "--tool-call-parser to be set", "tool_choice"),
    "named without the flags": ({"tools": WEATHER, "tool_choice": NAMED}, ServerSettings(),
                                'tool_choice=function "get_weather" requires --tool-call-parser '
                                "to be set", "tool_choice"),
    "empty tools": ({"tools": [], "tool_choice": "required"}, TOOLS_ON,
                    "`tools` must not be an empty array.", "tools"),
    "tool_choice without tools": ({"tool_choice": "required"}, TOOLS_ON,
                                  "When using `tool_choice`, `tools` must be set.",
                                  "tool_choice"),
    "unknown tool_choice": ({"tools": WEATHER, "tool_choice": "sometimes"}, TOOLS_ON,
                            "Invalid value for `tool_choice`: sometimes!", "tool_choice"),
    "named tool not offered": ({"tools": WEATHER, "tool_choice": {
        "type": "function", "function": {"name": "other"}}}, TOOLS_ON,
        "The tool specified in `tool_choice` does not match any of the specified `tools`",
        "tool_choice"),
    "named without function": ({"tools": WEATHER, "tool_choice": {"type": "function"}},
                               TOOLS_ON, "Invalid value for `function`: `None`",
                               "tool_choice.function"),
    "constraint beside a named call": ({"tools": WEATHER, "tool_choice": NAMED,
                                        "structured_outputs": {"regex": "a"}}, TOOLS_ON,
                                       "You can only either use constraints for structured "
                                       "outputs or tools, not both.", None),
    "legacy functions": ({"functions": [{"name": "f"}]}, TOOLS_ON, "functions:", "functions"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_in_vllms_words(case):
    fields, settings, message, param = REFUSALS[case]
    engine = ScriptedEngine(["x"])
    with TestClient(create_api_app(engine, settings)) as tc:
        resp = tc.post("/v1/chat/completions", json={"messages": ASK, **fields})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and error["param"] == param, error
