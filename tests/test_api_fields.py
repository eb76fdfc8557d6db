"""The vLLM request fields /v1/chat/completions honours (issue 32), through HTTP against the
API app on the random tiny model: logprobs and top_logprobs in JSON and in the stream,
prompt_logprobs, n choices, echo, continuous usage, return_token_ids, stop_reason, tool
turns, assistant prefill, and vLLM's refusals with its status and words. The shapes are
the ones vLLM 0.32 sent for the same requests (CPU build, tiny folder, checked by hand)."""

from __future__ import annotations

import json

import pytest

from support import (FinishLog, guard_loopback,  # noqa: F401 (autouse: loopback only)
                     tiny_engine_with)

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from server.background import BackgroundServer  # noqa: E402
from server.routes import create_api_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

PROMPT = [{"role": "user", "content": "How many shapes are there?"}]

# The keys vLLM 0.32 sends in each place (captured from its CPU build).
CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
ROLE_CHOICE_KEYS = {"index", "delta", "logprobs", "finish_reason"}
TOKEN_CHOICE_KEYS = {"index", "delta", "logprobs", "finish_reason", "token_ids"}
FINISH_CHOICE_KEYS = TOKEN_CHOICE_KEYS | {"stop_reason"}
CONTINUOUS_USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens",
                         "completion_tokens_details"}
FINAL_USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens"}
CHOICE_KEYS = {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
               "routed_experts"}
RESPONSE_KEYS = {"id", "object", "created", "model", "choices", "service_tier",
                 "system_fingerprint", "usage", "prompt_logprobs", "prompt_token_ids",
                 "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics"}


@pytest.fixture(scope="module")
def engine(tiny_random_model_dir):
    eng = tiny_engine_with(tiny_random_model_dir, max_model_len=4096, max_queue=8)
    eng.is_tiny = True
    eng.model_name = "tiny"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def finish_log(engine):
    log = FinishLog()
    engine.add_finish_listener(log)
    return log


@pytest.fixture(scope="module")
def http(engine):
    with BackgroundServer(create_api_app(engine, ServerSettings())) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client


def chat(http, **fields) -> dict:
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 6, "ignore_eos": True, **fields}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream(http, **fields) -> list:
    """The parsed events of a streamed answer ("[DONE]" kept as a string)."""
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 6, "ignore_eos": True,
            "stream": True, **fields}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def check_entry(entry: dict, count: int) -> None:
    """One token's logprobs as vLLM shapes them: bytes are its text's UTF-8, the top list
    holds `count` candidates, most likely first, the chosen (greedy) one leading."""
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))
    assert isinstance(entry["logprob"], float) and -9999.0 <= entry["logprob"] <= 0
    top = entry["top_logprobs"]
    assert len(top) == count
    assert all(set(t) == {"token", "logprob", "bytes"} for t in top)
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    if count:
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])


# --------------------------------------------------------------------------- logprobs
def test_logprobs_in_json_name_the_tokens_of_the_answer(http, engine):
    body = chat(http, temperature=0, logprobs=True, top_logprobs=3, return_token_ids=True)
    assert set(body) == RESPONSE_KEYS
    choice = body["choices"][0]
    assert set(choice) == CHOICE_KEYS
    content = choice["logprobs"]["content"]
    ids = choice["token_ids"]
    assert len(content) == len(ids) == body["usage"]["completion_tokens"] == 6
    for entry, token_id in zip(content, ids):
        check_entry(entry, 3)
        assert entry["token"] == engine.tokenizer.decode([token_id])
    assert choice["message"]["content"] == engine.tokenizer.decode(ids)
    assert body["prompt_token_ids"] == engine.tokenize(
        _gen({"messages": PROMPT}))
    # logprobs true without top_logprobs: the chosen tokens only, an empty top list
    bare = chat(http, temperature=0, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in bare] == [e["token"] for e in content]
    assert all(e["top_logprobs"] == [] for e in bare)
    assert chat(http, temperature=0)["choices"][0]["logprobs"] is None


def _gen(body: dict):
    from server.protocol import ChatCompletionRequest
    from server.serving import to_generation_request

    return to_generation_request(ChatCompletionRequest.model_validate(body), "t")


def test_stream_chunks_carry_the_logprobs_of_their_tokens(http):
    whole = chat(http, temperature=0, logprobs=True, top_logprobs=2)["choices"][0]
    events = stream(http, temperature=0, logprobs=True, top_logprobs=2, return_token_ids=True)
    assert events[-1] == "[DONE]"
    role, *tokens = events[:-1]
    assert set(role["choices"][0]) == ROLE_CHOICE_KEYS and role["choices"][0]["logprobs"] is None
    entries, text = [], ""
    for chunk in tokens:
        choice = chunk["choices"][0]
        finished = choice["finish_reason"] is not None
        assert set(choice) == (FINISH_CHOICE_KEYS if finished else TOKEN_CHOICE_KEYS)
        assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])
        entries += choice["logprobs"]["content"]
        text += choice["delta"]["content"]
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    for entry in entries:
        check_entry(entry, 2)
    assert text == whole["message"]["content"]
    assert [e["token"] for e in entries] == [e["token"] for e in whole["logprobs"]["content"]]
    assert [e["logprob"] for e in entries] == pytest.approx(
        [e["logprob"] for e in whole["logprobs"]["content"]], abs=1e-4)


def test_prompt_logprobs_in_vllms_shape(http):
    body = chat(http, temperature=0, prompt_logprobs=2, return_token_ids=True, max_tokens=2)
    prompt_ids, per_token = body["prompt_token_ids"], body["prompt_logprobs"]
    assert len(per_token) == len(prompt_ids) == body["usage"]["prompt_tokens"]
    assert per_token[0] is None
    for token_id, ranked in zip(prompt_ids[1:], per_token[1:]):
        assert next(iter(ranked)) == str(token_id)        # the prompt's own token first
        assert 2 <= len(ranked) <= 3
        for value in ranked.values():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["rank"] >= 1 and value["logprob"] <= 0


# --------------------------------------------------------------------------- n choices
def test_n_choices_without_streaming(http):
    single = chat(http, temperature=1.0, seed=7)
    body = chat(http, temperature=1.0, seed=7, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == single["usage"]["prompt_tokens"]     # counted once
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_n_choices_streamed_with_their_indices(http):
    whole = chat(http, temperature=1.0, seed=11, n=2)
    events = stream(http, temperature=1.0, seed=11, n=2, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    # vLLM's order: a role chunk per choice first, then each choice's tokens as they come
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""}
               for c in chunks[:2])
    texts, finishes = ["", ""], [0, 0]
    for chunk in chunks[2:]:
        assert len(chunk["choices"]) == 1 and "usage" not in chunk
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["delta"]["content"]
        finishes[choice["index"]] += choice["finish_reason"] is not None
    assert finishes == [1, 1]
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert usage["choices"] == [] and set(usage["usage"]) == FINAL_USAGE_KEYS
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["usage"]["completion_tokens"] == 12


def test_a_client_leaving_cancels_every_choice(http, finish_log):
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 3000, "ignore_eos": True,
            "temperature": 1.0, "n": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                cid = json.loads(line[6:])["id"]
                break
    finished = [ev for _, ev in finish_log.wait_all(
        lambda req, ev: req.request_id.startswith(cid), 2)]
    assert [f.reason for f in finished] == ["cancelled", "cancelled"]


# --------------------------------------------------------------------------- chat controls
def test_echo_prepends_the_last_message_of_the_answers_role(http):
    prefill = [*PROMPT, {"role": "assistant", "content": "There are"}]
    body = chat(http, messages=prefill, add_generation_prompt=False,
                continue_final_message=True, echo=True, temperature=0, max_tokens=3)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("There are")
    # vLLM asks for the prompt's logprobs with echo (top_logprobs of them: 0)
    assert body["prompt_logprobs"][0] is None
    assert all(len(r) == 1 for r in body["prompt_logprobs"][1:])
    plain = chat(http, messages=prefill, add_generation_prompt=False,
                 continue_final_message=True, temperature=0, max_tokens=3)
    assert choice["message"]["content"] == "There are" + plain["choices"][0]["message"]["content"]
    # streamed: the echo chunk follows the role chunk
    events = stream(http, messages=prefill, add_generation_prompt=False,
                    continue_final_message=True, echo=True, temperature=0, max_tokens=3)
    assert events[1]["choices"][0]["delta"] == {"content": "There are"}
    # the last message is the user's, the answer the assistant's: nothing to echo
    other = chat(http, echo=True, temperature=0, max_tokens=3)["choices"][0]["message"]
    assert not other["content"].startswith(PROMPT[0]["content"])


def test_without_a_generation_prompt_the_answer_has_the_last_role(http):
    body = chat(http, add_generation_prompt=False, echo=True, max_tokens=2)
    message = body["choices"][0]["message"]
    assert message["role"] == "user" and message["content"].startswith(PROMPT[0]["content"])


# vLLM 0.32's prompt for TOOL_TURNS on the tiny folder (return_token_ids): the oracle for
# how tool calls and tool turns are rendered.
TOOL_TURNS = [*PROMPT,
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "c1", "type": "function",
                   "function": {"name": "count", "arguments": "{}"}}]},
              {"role": "tool", "content": "4", "tool_call_id": "c1"},
              {"role": "user", "content": "So?"}]
VLLM_TOOL_TURNS_PROMPT = [
    912, 82, 88, 307, 575, 198, 555, 309, 256, 824, 516, 13, 913, 198, 912, 84, 470, 198, 443,
    531, 323, 309, 374, 30, 913, 198, 912, 64, 82, 513, 198, 913, 198, 912, 407, 316, 198, 19,
    913, 198, 912, 84, 470, 198, 50, 78, 30, 913, 198, 912, 64, 82, 513, 198]


def test_tool_turns_render_as_vllm_renders_them(http):
    body = chat(http, messages=TOOL_TURNS, max_tokens=2, return_token_ids=True)
    assert body["prompt_token_ids"] == VLLM_TOOL_TURNS_PROMPT


def test_tools_offered_with_tool_choice_none_go_to_the_template(http):
    """The tiny model's template ignores `tools` (vLLM's prompt is the same 31 tokens with
    and without them); the conversation carries them for a template that renders them."""
    tools = [{"type": "function", "function": {"name": "count", "parameters": {}}}]
    gen = _gen({"messages": PROMPT, "tools": tools, "tool_choice": "none"})
    assert gen.conversation.tools == tools
    assert chat(http, tools=tools, tool_choice="none", max_tokens=1)["usage"]["prompt_tokens"] \
        == chat(http, max_tokens=1)["usage"]["prompt_tokens"]


def test_stop_reason_names_the_stop_token(http):
    first = chat(http, temperature=0, return_token_ids=True)["choices"][0]["token_ids"]
    body = chat(http, temperature=0, ignore_eos=False, stop_token_ids=[first[2]])
    choice = body["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", first[2])


# --------------------------------------------------------------------------- usage and ids
def test_continuous_usage_in_every_chunk(http):
    events = stream(http, temperature=0, return_token_ids=True,
                    stream_options={"include_usage": True, "continuous_usage_stats": True})
    *chunks, last, done = events
    assert done == "[DONE]"
    prompt = chunks[0]["usage"]["prompt_tokens"]
    assert prompt > 0 and chunks[0]["prompt_token_ids"] is not None
    assert len(chunks[0]["prompt_token_ids"]) == prompt
    sent = 0
    for chunk in chunks:
        assert set(chunk) >= CHUNK_KEYS | {"usage"}
        sent += len(chunk["choices"][0].get("token_ids") or [])
        assert set(chunk["usage"]) == CONTINUOUS_USAGE_KEYS
        assert chunk["usage"] == {"prompt_tokens": prompt, "completion_tokens": sent,
                                  "total_tokens": prompt + sent,
                                  "completion_tokens_details": None}
    assert sent == 6
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6}


def test_x_request_id_names_the_answer(http):
    resp = http.post("/v1/chat/completions", headers={"X-Request-Id": "abc123"},
                     json={"model": "tiny", "messages": PROMPT, "max_tokens": 1})
    assert resp.json()["id"] == "chatcmpl-abc123"
    assert chat(http, request_id="mine", max_tokens=1)["id"] == "chatcmpl-mine"


# --------------------------------------------------------------------------- vLLM's refusals
REFUSALS = {   # body fields: (param, vLLM 0.32's message, as it answered them)
    "top_logprobs without logprobs": (
        {"top_logprobs": 2}, "top_logprobs",
        "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)"),
    "top_logprobs over the limit": (
        {"logprobs": True, "top_logprobs": 21}, "logprobs",
        "Requested sample logprobs of 21, which is greater than max allowed: 20 "
        "(parameter=logprobs, value=21)"),
    "negative top_logprobs": (
        {"logprobs": True, "top_logprobs": -2}, "top_logprobs",
        "`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value=-2)"),
    "top_logprobs not a number": (
        {"logprobs": True, "top_logprobs": "x"}, "top_logprobs",
        "`top_logprobs` must be an integer. (parameter=top_logprobs, value=x)"),
    "presence_penalty 5": (
        {"presence_penalty": 5}, "presence_penalty", "presence_penalty must be in [-2, 2], got 5"),
    "logit_bias key not a token id": (
        {"logit_bias": {"abc": 1}}, "logit_bias",
        "logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc'] "
        "(parameter=logit_bias, value=['abc'])"),
    "logit_bias out of the vocabulary": (
        {"logit_bias": {"999999": 1}}, "logit_bias",
        "token_id(s) [999999] in logit_bias contain out-of-vocab token ids. Vocabulary size: "),
    "prompt_logprobs while streaming": (
        {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs",
        "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)"),
    "both generation prompt and continuing": (
        {"continue_final_message": True, "add_generation_prompt": True}, None,
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
    "continuing with the default generation prompt": (
        {"continue_final_message": True}, None,
        "continue_final_message and add_generation_prompt are not compatible."),
    "tools without tool_choice": (
        {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice",
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser'),
    "stream_options without stream": (
        {"stream_options": {"include_usage": True}}, "stream_options",
        "Stream options can only be defined when `stream=True`. (parameter=stream_options)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_as_vllm_refuses(http, case):
    fields, param, message = REFUSALS[case]
    resp = http.post("/v1/chat/completions", json={"model": "tiny", "messages": PROMPT,
                                                   "max_tokens": 2, **fields})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert message in error["message"], error
    if param is not None:
        assert error["param"] == param, error


# --------------------------------------------------------------------------- prompt_tokens_details
@pytest.fixture(scope="module")
def http_details(engine):
    """The API with vLLM's --enable-prompt-tokens-details."""
    with BackgroundServer(create_api_app(engine, ServerSettings(
            enable_prompt_tokens_details=True))) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client


def _picture_uri(size: tuple[int, int] = (224, 224), colour=(200, 30, 30)) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_message(url_part: dict | None, uuid: str | None = None, text: str = "Describe it.",
                   **image_url) -> list[dict]:
    part: dict = {"type": "image_url", "image_url": url_part, **image_url}
    if uuid is not None:
        part["uuid"] = uuid
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def test_prompt_tokens_details_count_what_the_prefix_cache_gave(http_details, engine):
    """cached_tokens: exactly the prompt tokens the prefix cache supplied (the engine's own
    count of hits): few for a new question (the chat template's opening is shared), most of
    the prompt when it comes again."""
    messages = [{"role": "user", "content": "A question never asked before: " + "why? " * 40}]
    counts = []
    for _ in range(2):
        hits = engine.snapshot().prefix_cache_hits
        usage = chat(http_details, messages=messages, max_tokens=2)["usage"]
        details = usage["prompt_tokens_details"]
        assert details.keys() == {"cached_tokens", "created_cache_tokens", "multimodal_tokens"}
        assert details["cached_tokens"] == engine.snapshot().prefix_cache_hits - hits
        assert details["multimodal_tokens"] is None
        counts.append(details["cached_tokens"])
    assert counts[0] < usage["prompt_tokens"] // 2 < counts[1] < usage["prompt_tokens"]


def test_prompt_tokens_details_count_picture_tokens(http_details):
    """multimodal_tokens: the picture's placeholder tokens (224x224: 8x8 merged patches),
    as vLLM counts them; a stream's usage chunk leaves the nulls out, as vLLM's does."""
    messages = _image_message({"url": _picture_uri()})
    usage = chat(http_details, messages=messages, max_tokens=2)["usage"]
    assert usage["prompt_tokens_details"]["multimodal_tokens"] == {"image": 64}
    events = stream(http_details, messages=messages, max_tokens=2,
                    stream_options={"include_usage": True})
    details = events[-2]["usage"]["prompt_tokens_details"]
    assert details.keys() == {"cached_tokens", "multimodal_tokens"}
    assert details["multimodal_tokens"] == {"image": 64}


def test_prompt_tokens_details_of_beams_and_completions(http_details):
    """vLLM reports no cached tokens for a beam search (null, or no details at all), and for
    completions only cached_tokens (without nulls in a stream)."""
    beams = chat(http_details, max_tokens=2, use_beam_search=True, n=2, temperature=0)
    assert beams["usage"]["prompt_tokens_details"] is None
    resp = http_details.post("/v1/completions", json={"model": "tiny", "prompt": "Hello there",
                                                      "max_tokens": 2})
    assert resp.json()["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0, "created_cache_tokens": None, "multimodal_tokens": None}
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with http_details.stream("POST", "/v1/completions", json=body) as resp:
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1])["usage"]["prompt_tokens_details"].keys() == {"cached_tokens"}
    resp = http_details.post("/v1/completions", json={"model": "tiny", "prompt": "Hi",
                                                      "max_tokens": 2, "n": 2,
                                                      "use_beam_search": True})
    assert resp.json()["usage"]["prompt_tokens_details"] is None


def test_without_the_flag_there_are_no_prompt_tokens_details(http):
    assert chat(http, max_tokens=1)["usage"]["prompt_tokens_details"] is None


# --------------------------------------------------------------------------- roles
def _rendered(http, messages: list[dict]) -> str:
    resp = http.post("/tokenize", json={"model": "tiny", "messages": messages})
    assert resp.status_code == 200, resp.text
    return http.post("/detokenize", json={"model": "tiny",
                                          "tokens": resp.json()["tokens"]}).json()["prompt"]


def test_a_custom_role_reaches_the_chat_template(http):
    """vLLM hands any role to the chat template; Qwen's renders it as a turn of its own."""
    messages = [{"role": "my_custom_role", "content": "Be brief."},
                {"role": "user", "content": "Hi"}]
    assert "<|im_start|>my_custom_role\nBe brief.<|im_end|>" in _rendered(http, messages)
    assert chat(http, messages=messages, max_tokens=1)["choices"][0]["message"]["role"] == \
        "assistant"
    answer = chat(http, messages=[*messages, {"role": "narrator", "content": "Once"}],
                  add_generation_prompt=False, continue_final_message=True, max_tokens=1)
    assert answer["choices"][0]["message"]["role"] == "narrator"


def test_developer_is_the_system_role(http):
    rendered = _rendered(http, [{"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered


# --------------------------------------------------------------------------- media uuids
def test_an_empty_image_with_a_known_uuid_reuses_its_picture(http):
    """The picture sent with a uuid, then only the uuid ({} or null as image_url): the same
    prompt, so the same greedy answer."""
    uri = _picture_uri((280, 196), (20, 160, 60))
    with_picture = chat(http, messages=_image_message({"url": uri}, uuid="pic-1"),
                        temperature=0, return_token_ids=True)
    for empty in ({}, None, {"url": None}):
        again = chat(http, messages=_image_message(empty, uuid="pic-1"), temperature=0,
                     return_token_ids=True)
        assert again["prompt_token_ids"] == with_picture["prompt_token_ids"]
        assert again["choices"][0]["message"] == with_picture["choices"][0]["message"]
    numeric = chat(http, messages=_image_message({"url": uri}, uuid=12345), max_tokens=1)
    assert numeric["choices"]


@pytest.mark.parametrize("messages, fields, param, words", [
    (_image_message({}, uuid="never-sent"), {}, "uuid", "'never-sent'"),
    (_image_message({}, uuid="pic-1"), {"mm_processor_kwargs": {"max_pixels": 200704}},
     "uuid", "Cache miss for image at index 0 but data is not provided."),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {}, "uuid": "v"},
                                   {"type": "text", "text": "x"}]}], {}, "uuid",
     "Cache miss for video at index 0 but data is not provided."),
    (_image_message({}), {}, "body.messages.0.content", "image_url.url: Field required"),
], ids=["unknown uuid", "other pixel bounds", "video uuid without data", "no url, no uuid"])
def test_media_uuid_refusals(http, messages, fields, param, words):
    chat(http, messages=_image_message({"url": _picture_uri((280, 196), (20, 160, 60))},
                                       uuid="pic-1"), max_tokens=1)
    resp = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                   "max_tokens": 1, **fields})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert words in error["message"] and error["param"].startswith(param), error


def test_the_uuid_map_forgets_the_least_recently_used_first():
    """At most MAX_UUIDS uuids are remembered: the oldest one is a cache miss after that
    many others."""
    from engine.errors import InvalidRequestError
    from engine.inputs.media import MediaPolicy, NamedMedia
    from engine.inputs.stage import MAX_UUIDS, PictureCache

    cache, policy, uri = PictureCache(8 << 20), MediaPolicy(), _picture_uri()
    load = lambda source: cache.load(source, policy, 3136, 1003520)   # noqa: E731
    first = load(NamedMedia("u0", uri))
    assert load(NamedMedia("u0")) is first
    for i in range(1, MAX_UUIDS + 1):
        cache.uuids.put(f"u{i}".encode(), b"x")    # others, as many as the map holds
    with pytest.raises(InvalidRequestError, match="'u0'"):
        load(NamedMedia("u0"))
