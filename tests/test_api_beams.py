"""Beam search through the API (vLLM's `use_beam_search`, `length_penalty`), over HTTP against
the API app on the trained tiny model, whose answers end with EOS, so ended beams compete
with live ones. The oracle for the answers is the engine's own beam search
(LocalEngine.submit_choices, itself held against vLLM's loop in tests/test_beam.py); the
shapes are vLLM 0.32's for the same requests (its CPU build, checked by hand): whole answers,
a streamed chat sends a role chunk per choice and then one chunk per choice with its whole
text and finish reason; completions refuse to stream and refuse echo with logprobs; usage
counts every beam's tokens. The sampling fields vLLM's beam search ignores are refused here
by name. Then the remote backend: one remote request carries the beams, split into choices."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from support import (guard_loopback,  # noqa: F401 (autouse: loopback only)
                     tiny_engine_with)

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from engine.backends.remote import RemoteEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput,  # noqa: E402
                          Message, SamplingParams, TextDelta)
from server.background import BackgroundServer  # noqa: E402
from server.routes import create_api_app  # noqa: E402
from server.serving import parse_chat_request  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

PICTURE = Path(__file__).resolve().parent.parent / "assets" / "shapes.png"
QUESTION = "How many shapes are there, and what colours are they?"
DATA_URI = "data:image/png;base64," + base64.b64encode(PICTURE.read_bytes()).decode()
MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URI}},
                                         {"type": "text", "text": QUESTION}]}]
PROMPT = "There are"
BEAM = {"use_beam_search": True, "temperature": 0, "max_tokens": 10}
LONG = 32   # past the tiny model's whole answer (23 tokens), so some beams end with EOS


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = tiny_engine_with(tiny_model_dir, max_batch=4)
    eng.model_name = "tiny"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_api_app(engine, ServerSettings())) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def post(http, path: str, status: int = 200, **body) -> dict:
    resp = http.post(path, json={"model": "tiny", **body})
    assert resp.status_code == status, resp.text
    return resp.json()


def engine_beams(engine, gen: GenerationRequest) -> list[tuple[str, list[int], Finished]]:
    """The engine's own beam search: each answer's text, token ids and end, best first."""
    out = []
    for handle in engine.submit_choices(gen):
        events = list(handle.events(timeout=120))
        deltas = [e for e in events if isinstance(e, TextDelta)]
        out.append(("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                    events[-1]))
    return out


def chat_request(n: int, max_tokens: int = 10, **sampling) -> GenerationRequest:
    conv = Conversation([Message("user", parts=[ImageInput(str(PICTURE)), QUESTION])])
    return GenerationRequest(conv, SamplingParams(n=n, use_beam_search=True, temperature=0,
                                                  max_tokens=max_tokens, **sampling))


# --------------------------------------------------------------------------- chat
@pytest.mark.parametrize("n", [2, 3])
def test_chat_beams_are_the_engines_beams(http, engine, n):
    answer = post(http, "/v1/chat/completions", messages=MESSAGES, n=n, return_token_ids=True,
                  **{**BEAM, "max_tokens": LONG})
    expected = engine_beams(engine, chat_request(n, LONG))
    assert [c["index"] for c in answer["choices"]] == list(range(n))
    got = [(c["message"]["content"], c["token_ids"], c["finish_reason"], c["stop_reason"])
           for c in answer["choices"]]
    assert got == [(text, ids, fin.reason, fin.stop_reason) for text, ids, fin in expected]
    assert any(c["finish_reason"] == "stop" for c in answer["choices"]), \
        "no beam ended with EOS: the test no longer mixes ended and live beams"
    usage = answer["usage"]
    assert usage["completion_tokens"] == sum(len(ids) for _, ids, _ in expected)
    assert usage["prompt_tokens"] == expected[0][2].stats.prompt_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_length_penalty_reaches_the_search(http, engine):
    """The tiny model's beams here all end at the same length, where no penalty reorders
    them; that the value reaches the engine is read from the parsed request."""
    answer = post(http, "/v1/chat/completions", messages=MESSAGES, n=3, length_penalty=0.2,
                  **BEAM)
    expected = engine_beams(engine, chat_request(3, length_penalty=0.2))
    assert [c["message"]["content"] for c in answer["choices"]] == [t for t, _, _ in expected]
    body = json.dumps({"messages": MESSAGES, "n": 3, "length_penalty": 0.2, **BEAM}).encode()
    sampling = parse_chat_request(body).sampling_params()
    assert (sampling.use_beam_search, sampling.n, sampling.length_penalty) == (True, 3, 0.2)


def test_chat_beam_stream_sends_each_answer_whole(http):
    whole = post(http, "/v1/chat/completions", messages=MESSAGES, n=2, **BEAM)["choices"]
    body = {"model": "tiny", "messages": MESSAGES, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, **BEAM}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    roles, answers, usage = events[:2], events[2:4], events[4]
    assert len(events) == 5
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in roles] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    got = sorted((e["choices"][0]["index"], e["choices"][0]["delta"]["content"],
                  e["choices"][0]["finish_reason"], e["choices"][0]["stop_reason"])
                 for e in answers)
    assert got == [(c["index"], c["message"]["content"], c["finish_reason"], c["stop_reason"])
                   for c in whole]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def test_chat_echo_and_logprobs_with_beams(http):
    answer = post(http, "/v1/chat/completions", messages=MESSAGES, n=2, logprobs=True,
                  top_logprobs=2, **BEAM)
    for choice in answer["choices"]:
        entries = choice["logprobs"]["content"]
        assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert answer["prompt_logprobs"] is None


# --------------------------------------------------------------------------- completions
def test_completion_beams_are_the_engines_beams(http, engine):
    answer = post(http, "/v1/completions", prompt=PROMPT, n=2, return_token_ids=True, **BEAM)
    gen = GenerationRequest(Conversation(), SamplingParams(n=2, use_beam_search=True,
                                                           temperature=0, max_tokens=10),
                            prompt=PROMPT)
    expected = engine_beams(engine, gen)
    assert [(c["index"], c["text"], c["token_ids"], c["finish_reason"])
            for c in answer["choices"]] == [(i, text, ids, fin.reason)
                                            for i, (text, ids, fin) in enumerate(expected)]
    assert answer["usage"]["completion_tokens"] == sum(len(ids) for _, ids, _ in expected)


def test_completion_batch_of_prompts_each_with_its_beams(http):
    answer = post(http, "/v1/completions", prompt=[PROMPT, "The star"], n=2, **BEAM)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    one = post(http, "/v1/completions", prompt="The star", n=2, **BEAM)["choices"]
    assert [c["text"] for c in answer["choices"][2:]] == [c["text"] for c in one]


def test_completion_echo_without_logprobs_prepends_the_prompt(http):
    answer = post(http, "/v1/completions", prompt=PROMPT, n=2, echo=True, **BEAM)
    plain = post(http, "/v1/completions", prompt=PROMPT, n=2, **BEAM)
    assert [c["text"] for c in answer["choices"]] == [PROMPT + c["text"]
                                                      for c in plain["choices"]]


@pytest.mark.parametrize("extra, param, words", [
    ({"stream": True}, None, "Streaming is not currently supported with beam search"),
    ({"echo": True, "logprobs": 1}, "echo", "`echo` with `logprobs` is not supported with "
                                            "beam search because beam search does not "
                                            "compute prompt logprobs."),
])
def test_completion_refusals_in_vllms_words(http, extra, param, words):
    error = post(http, "/v1/completions", 400, prompt=PROMPT, **BEAM, **extra)["error"]
    assert words in error["message"] and error["param"] == param and error["code"] == 400


# --------------------------------------------------------------------------- never ignored
IGNORED_BY_BEAMS = [
    ("stop", ["."]), ("stop_token_ids", [13]), ("min_tokens", 2), ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5), ("repetition_penalty", 1.2), ("top_p", 0.9), ("top_k", 5),
    ("min_p", 0.1), ("seed", 7), ("logit_bias", {"13": 5}), ("bad_words", ["red"]),
    ("allowed_token_ids", [13, 14]), ("prompt_logprobs", 1),
    ("spaces_between_special_tokens", False), ("response_format", {"type": "json_object"}),
    ("structured_outputs", {"regex": "[0-9]"}),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("field,value", IGNORED_BY_BEAMS, ids=[f for f, _ in IGNORED_BY_BEAMS])
def test_a_field_beam_search_ignores_is_refused_by_name(http, path, field, value):
    body = {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": PROMPT}
    error = post(http, path, 400, **body, **BEAM, **{field: value})["error"]
    assert error["param"] == field and field in error["message"]
    assert "beam search" in error["message"] and "\n" not in error["message"]


def test_a_forced_tool_call_is_refused_with_beams(http):
    tools = [{"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}}}}]
    error = post(http, "/v1/chat/completions", 400, messages=MESSAGES, tools=tools,
                 tool_choice="required", **BEAM)["error"]
    assert error["param"] == "tool_choice"


@pytest.mark.parametrize("field,value", [("top_p", 1.0), ("seed", None), ("top_k", -1),
                                         ("presence_penalty", 0), ("stop", []),
                                         ("response_format", {"type": "text"})])
def test_those_fields_at_their_defaults_are_accepted(http, field, value):
    post(http, "/v1/chat/completions", messages=MESSAGES, **BEAM, **{field: value})


def test_length_penalty_without_beam_search_is_refused(http):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}),
                       ("/v1/completions", {"prompt": PROMPT})):
        error = post(http, path, 400, max_tokens=2, length_penalty=0.5, **body)["error"]
        assert error["param"] == "length_penalty"


# --------------------------------------------------------------------------- remote backend
def test_remote_backend_forwards_the_beams_as_one_request(server, engine):
    """Our API in front (RemoteEngine) of our API on the tiny model: the beams come back
    split into choices, equal to the engine's own."""
    remote = RemoteEngine(EngineConfig(backend="remote", remote_url=f"{server.url}/v1"))
    try:
        for n in (2, 3):
            got = engine_beams(remote, chat_request(n))
            expected = engine_beams(engine, chat_request(n))
            assert [(t, ids, f.reason, f.stop_reason) for t, ids, f in got] == \
                [(t, ids, f.reason, f.stop_reason) for t, ids, f in expected]
            assert [f.stats.output_tokens for _, _, f in got] == [len(ids) for _, ids, _ in got]
    finally:
        remote.close()
