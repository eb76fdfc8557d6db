"""Structured outputs through HTTP on the tiny model: every request form (response_format
json_schema and json_object, structured_outputs json, json_object, regex, choice and grammar)
in /v1/chat/completions and /v1/completions, streamed or not, with random constraints and
sampling, parses and validates; bad constraints are a 400 naming the problem within a second;
a hostile schema is refused while another client's stream goes on undisturbed."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.routes import create_api_app
from server.settings import ServerSettings
from tests.structured_cases import FORMS, as_request_fields, random_case

httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

QUESTION = "How many shapes are there? Answer in JSON."
PER_CASE = 12   # requests per form, endpoint and streaming (the engine's own test sends 100)


@pytest.fixture(scope="module")
def client(tiny_engine):
    with TestClient(create_api_app(tiny_engine, ServerSettings())) as tc:
        yield tc


def constraint_fields(fields: dict, rng: random.Random) -> dict:
    """The request fields for a case: json and json_object also as response_format."""
    if "json" in fields and rng.random() < 0.5:
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": fields["json"], "strict": rng.choice([True, None])}}}
    if "json_object" in fields and rng.random() < 0.5:
        return {"response_format": {"type": "json_object"}}
    return {"structured_outputs": as_request_fields(fields)}


def _text(client, endpoint: str, body: dict) -> tuple[int, str, str | None, dict]:
    """(status, the answer's text, its finish_reason, the error) whole or streamed."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    if not body.get("stream"):
        resp = client.post(path, json=body)
        if resp.status_code != 200:
            return resp.status_code, "", None, resp.json()["error"]
        choice = resp.json()["choices"][0]
        return 200, choice["message"]["content"] if endpoint == "chat" else choice["text"], \
            choice["finish_reason"], {}
    with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code, "", None, json.loads(resp.read())["error"]
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events if e.get("choices")]
    key = (lambda c: c["delta"].get("content") or "") if endpoint == "chat" \
        else (lambda c: c["text"])
    return 200, "".join(key(c) for c in choices), choices[-1]["finish_reason"], {}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("form", FORMS)
def test_random_constraints_parse_and_validate(client, form, endpoint, stream):
    rng = random.Random(f"api-{form}-{endpoint}-{stream}")
    cases = []
    for _ in range(PER_CASE):
        fields, check = random_case(form, rng)
        body = {"max_tokens": rng.choice([64, 128]), "temperature": rng.choice([0, 0.8, 1.3]),
                "top_p": rng.choice([None, 0.9]), "seed": rng.randrange(2**32), "stream": stream,
                **constraint_fields(fields, rng)}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": QUESTION}]
        else:
            body["prompt"] = QUESTION
        cases.append((body, check))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda c: _text(client, endpoint, c[0]), cases))
    for (body, check), (status, text, finish, error) in zip(cases, answers):
        if status == 400:   # a budget below the constraint's shortest answer
            assert error["param"] == "max_tokens" and "too few" in error["message"], error
            continue
        # a forced close ends with EOS inside the budget too
        assert status == 200 and finish == "stop", (body, status, finish, text)
        try:
            check(text)
        except Exception as exc:
            raise AssertionError(f"{body} gave {text!r}") from exc


BAD = {   # the constraint -> words the 400 must contain
    "schema not json": ({"structured_outputs": {"json": "{not json"}}, "not valid JSON"),
    "schema type": ({"structured_outputs": {"json": {"type": "nonsense"}}}, "nonsense"),
    "schema via response_format": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}},
        "nowhere"),
    "regex": ({"structured_outputs": {"regex": "(unclosed"}}, "regex"),
    "grammar": ({"structured_outputs": {"grammar": "root ::= ("}}, "grammar"),
    "empty choice": ({"structured_outputs": {"choice": []}}, "choice"),
    "two kinds": ({"structured_outputs": {"json": {}, "regex": "a"}},
                  "You can only use one kind of constraints for structured outputs"),
    "grammar and choice": ({"structured_outputs": {"grammar": "root ::= \"a\"", "choice": ["a"]}},
                           "You can only use one kind of structured outputs constraint"),
    "none": ({"structured_outputs": {}}, "You must use one kind of structured outputs constraint"),
    "json_schema without schema": ({"response_format": {"type": "json_schema"}},
                                   "the 'json_schema' field must be provided"),
    "structural tag": ({"response_format": {"type": "structural_tag", "format": {}}},
                       "structural tags are not supported"),
    "whitespace pattern": ({"structured_outputs": {"json": {}, "whitespace_pattern": " *"}},
                           "whitespace_pattern is not supported"),
    "guided_regex": ({"guided_regex": "a+"}, "guided_regex"),
    "budget": ({"max_tokens": 2, "structured_outputs": {"json": {
        "type": "object", "properties": {"colours": {"type": "string"}},
        "required": ["colours"]}}}, "too few"),
}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("case", BAD)
def test_a_bad_constraint_is_a_400_naming_it_within_a_second(client, case, endpoint):
    fields, words = BAD[case]
    body = {"max_tokens": 64, **fields}
    body.update({"messages": [{"role": "user", "content": QUESTION}]} if endpoint == "chat"
                else {"prompt": QUESTION})
    start = time.monotonic()
    status, _, _, error = _text(client, endpoint, body)
    assert time.monotonic() - start < 1.0
    assert status == 400 and words in error["message"], error


def _hostile() -> dict[str, dict]:
    deep: dict = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    return {"enum of 100,000 strings": {"type": "string",
                                        "enum": [f"value-{i}" for i in range(100_000)]},
            "200 deep": deep}


@pytest.mark.parametrize("name", list(_hostile()))
def test_a_hostile_schema_is_refused_without_stalling_another_stream(client, name):
    """Another client streams meanwhile; the longest gap between its chunks stays far below
    a second, and the hostile request is answered (refused) within seconds."""
    schema = _hostile()[name]
    gaps: list[float] = []

    def other_stream() -> None:
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            last = time.monotonic()
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

    other = threading.Thread(target=other_stream)
    other.start()
    deadline = time.monotonic() + 30
    while not gaps and time.monotonic() < deadline:   # its first chunk has come
        time.sleep(0.01)
    start = time.monotonic()
    status, _, _, error = _text(client, "chat", {
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64,
        "structured_outputs": {"json": schema}})
    took = time.monotonic() - start
    other.join(30)
    # a schema nested past the body's depth limit is refused before it is read as a schema
    assert status == 400 and error["param"] in ("structured_outputs", "body"), error
    assert took < 5.0
    assert len(gaps) > 2 and max(gaps[1:]) < 0.5, gaps


def test_the_openai_clients_parse_gets_its_object_even_from_a_forced_close(client):
    """`client.chat.completions.parse()` with a pydantic model (the SDK sends a strict JSON
    schema): the answer is parsed into it. With a `max_tokens` just above the shortest
    answer the engine forces the close, and the answer still ends with its end token,
    "stop": the SDK raises on "length"."""
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")

    class Shapes(pydantic.BaseModel):
        count: int
        colours: list[str]

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client,
                        max_retries=0)
    model = client.get("/v1/models").json()["data"][0]["id"]
    ask = dict(model=model, messages=[{"role": "user", "content": QUESTION}],
               response_format=Shapes)
    with pytest.raises(openai.BadRequestError, match="too few") as refused:
        sdk.chat.completions.parse(**ask, max_tokens=1)
    content = int(re.search(r"shortest answer takes (\d+) tokens", str(refused.value))[1])
    rng = random.Random(4)
    forced = 0
    for max_tokens in range(content + 1, content + 8):     # room for the end token too
        answer = sdk.chat.completions.parse(**ask, max_tokens=max_tokens, temperature=1.5,
                                            seed=rng.randrange(2**31))
        choice = answer.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Shapes)
        forced += answer.usage.completion_tokens == max_tokens   # the budget's last token: EOS
    assert forced >= 2
    # a budget of the answer alone leaves its end token no room: closed, but "length"
    with pytest.raises(openai.LengthFinishReasonError):
        sdk.chat.completions.parse(**ask, max_tokens=content, temperature=1.5, seed=1)
