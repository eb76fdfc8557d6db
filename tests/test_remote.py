"""The remote backend: a RemoteEngine in front of a second instance of our own
API server (started here on loopback), our API in front of that RemoteEngine,
and a fake remote for the error shapes, broken streams and silent servers a
real vLLM could produce. Nothing leaves loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from support import free_port, guard_loopback  # noqa: F401 (autouse: loopback only)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from PIL import Image  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.errors import (EngineBusyError, InvalidRequestError, ModelLoadError,  # noqa: E402
                           ModelNotFoundError)
from engine.factory import create_engine  # noqa: E402
from engine.backends.local import LocalEngine  # noqa: E402
from engine.backends.remote import (RemoteEngine, RemoteError,  # noqa: E402
                                    RemoteUnavailableError, api_base)
from engine.inputs.media import MediaPolicy  # noqa: E402
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput,  # noqa: E402
                          Message, SamplingParams, TextDelta)
from server.background import BackgroundServer  # noqa: E402
from server.routes import create_api_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DATA = Path(__file__).resolve().parent / "data" / "vllm-0.32"   # raw vLLM 0.32 responses
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def local_engine(tiny_random_model_dir):
    eng = LocalEngine.from_config(EngineConfig(model=str(tiny_random_model_dir), warmup=False,
                                               max_model_len=MAX_MODEL_LEN))
    eng.model_name = "tiny"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def remote_server(local_engine):
    """The 'remote': a second instance of our own API server."""
    with BackgroundServer(create_api_app(local_engine, ServerSettings())) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(remote_server):
    eng = create_engine(EngineConfig(backend="remote", remote_url=f"{remote_server.url}/v1"))
    yield eng
    eng.close()


def request(text="Describe this image.", images=(), **sampling) -> GenerationRequest:
    sampling.setdefault("max_tokens", 12)
    sampling.setdefault("temperature", 0)
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(Conversation([Message("user", text, [ImageInput(i) for i in images])],
                                          system="You are a helpful assistant."),
                             SamplingParams(**sampling))


# --------------------------------------------------------------------------- against our server
def test_remote_engine_reads_the_remote_model(remote, remote_server):
    assert isinstance(remote, RemoteEngine)
    assert remote.model_name == "tiny"
    assert remote.max_model_len == MAX_MODEL_LEN
    assert remote.is_tiny
    assert remote.health()
    assert remote_server.url in remote.device_description
    assert api_base("http://h:8000") == api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/chat/completions") == "http://h:8000/v1"


def test_remote_streams_the_same_answer_as_local(remote, local_engine):
    image = ASSETS / "shapes.png"
    # 64 tokens: long enough to arrive in several chunks even when a busy consumer
    # gets deltas merged (the stream merges what it has not read yet)
    handle = remote.submit(request(images=[image], max_tokens=64))
    events = list(handle.events(timeout=30))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "length", finished
    assert len(deltas) >= 2, "the answer did not stream"
    assert finished.stats.output_tokens == 64
    local_text, local_fin = local_engine.generate(request(images=[image], max_tokens=64),
                                                  timeout=30)
    assert "".join(d.text for d in deltas) == local_text
    assert finished.stats.prompt_tokens == local_fin.stats.prompt_tokens > 256
    assert finished.stats.images == 1 and finished.stats.ttft_s is not None


def test_our_api_in_front_of_a_remote(remote, local_engine):
    """openai client -> our API (remote backend) -> our API (tiny model)."""
    with BackgroundServer(create_api_app(remote, ServerSettings())) as front:
        client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data][0] == "tiny"
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=9,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == 9
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        sysless = GenerationRequest(Conversation([Message("user", "Hello")]),
                                    SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
        assert text == local_engine.generate(sysless, timeout=30)[0]
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": "hello " * 5000}])
        assert httpx.get(f"{front.url}/health").status_code == 200


def test_remote_errors_are_raised_from_submit(remote, remote_server):
    with pytest.raises(InvalidRequestError, match="maximum context length is 4096"):
        remote.submit(request("hello " * 5000))
    with pytest.raises(InvalidRequestError, match="temperature"):
        remote.submit(request(temperature=-1))
    not_an_image = "data:image/png;base64," + base64.b64encode(b"nope").decode()
    with pytest.raises(InvalidRequestError, match="Failed to load image"):
        remote.submit(request(images=[not_an_image]))
    wrong = RemoteEngine(EngineConfig(backend="remote", remote_url=remote_server.url,
                                      remote_model="no-such-model"))
    try:
        with pytest.raises(ModelNotFoundError, match="`no-such-model` does not exist"):
            wrong.submit(request("Hi"))
    finally:
        wrong.close()


def test_cancel_closes_the_remote_stream(remote, local_engine):
    seen: list[Finished] = []
    done = threading.Event()

    def on_finish(req, ev):
        if req.sampling.max_tokens == 2998:
            seen.append(ev)
            done.set()

    local_engine.add_finish_listener(on_finish)
    handle = remote.submit(request("Hi", max_tokens=2998))
    events = handle.events(timeout=30)
    for _ in range(3):
        assert isinstance(next(events), TextDelta)
    handle.cancel()
    rest = list(events)
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "cancelled"
    assert done.wait(10), "the remote kept generating"
    assert seen[0].reason == "cancelled" and seen[0].stats.output_tokens < 200, seen[0].stats


# --------------------------------------------------------------------------- remote down / silent
def test_remote_down_fails_fast_with_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="Cannot connect to the remote server"):
        create_engine(EngineConfig(backend="remote", remote_url=url))
    eng = RemoteEngine(EngineConfig(backend="remote", remote_url=url, remote_model="m"))
    try:
        assert not eng.health()
        with pytest.raises(RemoteUnavailableError, match="Cannot connect") as exc:
            eng.submit(request("Hi"))
        assert exc.value.code == 503 and url in exc.value.message
        with BackgroundServer(create_api_app(eng, ServerSettings())) as front:
            resp = httpx.post(f"{front.url}/v1/chat/completions", timeout=10,
                              json={"messages": [{"role": "user", "content": "Hi"}]})
            assert resp.status_code == 503
            assert "Cannot connect" in resp.json()["error"]["message"]
            assert httpx.get(f"{front.url}/health").status_code == 503
    finally:
        eng.close()
    assert time.monotonic() - start < 10


def test_silent_remote_times_out():
    """A remote that accepts connections but never answers must not hang us."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)   # the kernel accepts; nobody ever answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        start = time.monotonic()
        eng = RemoteEngine(EngineConfig(backend="remote", remote_url=url, remote_model="m",
                                        remote_timeout=1.0))
        try:
            with pytest.raises(RemoteUnavailableError, match="sent nothing for 1 s"):
                eng.submit(request("Hi"))
        finally:
            eng.close()
        assert time.monotonic() - start < 8


# --------------------------------------------------------------------------- a fake remote
def _sse(*events) -> StreamingResponse:
    async def gen():
        for e in events:
            yield e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def _chunk(content=None, finish=None, role=None) -> dict:
    delta = {"content": content} if content is not None else {}
    if role:
        delta = {"role": role, "content": ""}
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _choice(fields: dict) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, **fields}]}


def _entry(token: str, logprob: float, top: list) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in top]}


@pytest.fixture(scope="module")
def fake_remote():
    app = FastAPI()
    app.state.calls = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "root": "fake",
                                            "max_model_len": 1000}]}

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        app.state.calls.append((dict(req.headers), body))
        content = body["messages"][-1]["content"]
        what = content if isinstance(content, str) else content[-1]["text"]
        flat = {"object": "error", "message": "flat says no", "type": "BadRequestError",
                "param": "temperature", "code": 400}
        if what == "flat":
            return JSONResponse(flat, status_code=400)
        if "mm_processor_kwargs" in body:   # as `vllm serve` started the tutorial's way
            return JSONResponse(json.loads((DATA / "err_mm_processor_kwargs.json").read_text()),
                                status_code=400)
        if what == "nested404":
            return JSONResponse({"error": {"message": "The model `fake` does not exist.",
                                           "type": "NotFoundError", "param": "model",
                                           "code": 404}}, status_code=404)
        if what == "busy":
            return JSONResponse({**flat, "message": "queue full", "code": 503}, status_code=503)
        if what == "auth":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        if what == "crash":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if what == "midstream":
            return _sse(_chunk(role="assistant"), _chunk("partial"),
                        {"error": {"message": "boom", "type": "InternalServerError",
                                   "param": None, "code": 500}}, "data: [DONE]\n\n")
        if what == "truncated":
            return _sse(_chunk(role="assistant"), _chunk("partial"))
        if what == "silent":   # a remote busy with other work: nothing after the role chunk
            async def stall():
                yield f"data: {json.dumps(_chunk(role='assistant'))}\n\n"
                await asyncio.sleep(60)
            return StreamingResponse(stall(), media_type="text/event-stream")
        if what == "garbage":
            return _sse(_chunk(role="assistant"), "data: {not json\n\n")
        if what == "logprobs":   # vLLM 0.32's shapes, as recorded from its CPU build
            return _sse(_chunk(role="assistant"),
                        _choice({"delta": {"content": "There"}, "token_ids": [425],
                                 "logprobs": {"content": [_entry("There", -0.36, [
                                     ("There", -0.36), ("The", -1.32)])]}}),
                        _choice({"delta": {"content": " are"}, "token_ids": [309],
                                 "logprobs": {"content": [_entry(" are", -0.85, [
                                     (" is", -0.55), (" are", -0.85)])]},
                                 "finish_reason": "stop", "stop_reason": 220}),
                        "data: [DONE]\n\n")
        if body.get("use_beam_search"):   # vLLM 0.32's whole answer, recorded from its CPU build
            texts = [("```", [13874, 913], "stop", 913), ("```jsonred", [13874, 2236, 1151],
                                                          "length", None)]
            return JSONResponse({
                "object": "chat.completion", "prompt_token_ids": [1, 2, 3],
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish, "stop_reason": stop,
                             "token_ids": ids} for i, (text, ids, finish, stop) in enumerate(
                                 texts[:body["n"]])],
                "usage": {"prompt_tokens": 95, "completion_tokens": 5, "total_tokens": 100}})
        if body.get("stream") is False:    # prompt_logprobs: vLLM does not stream them
            return JSONResponse({
                "object": "chat.completion", "prompt_token_ids": [912, 82, 88],
                "prompt_logprobs": [None, {"82": {"logprob": -11.5, "rank": 628,
                                                  "decoded_token": "s"},
                                           "557": {"logprob": -0.47, "rank": 1,
                                                   "decoded_token": "]\n"}},
                                    {"88": {"logprob": -0.2, "rank": 1, "decoded_token": "y"}}],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "length", "stop_reason": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
        return _sse(_chunk(role="assistant"), _chunk("o"), _chunk("k"), _chunk("", "stop"),
                    {"id": "x", "choices": [], "usage": {"prompt_tokens": 7,
                                                         "completion_tokens": 2}},
                    "data: [DONE]\n\n")

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        app.state.calls.append((dict(req.headers), body))
        if body["prompt"] == "refuse":
            return JSONResponse({"error": {"message": "Token id 5 is out of vocabulary",
                                           "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)
        first = {"index": 0, "text": " blue", "prompt_token_ids": [39, 291], "token_ids": [351],
                 "logprobs": {"text_offset": [0], "token_logprobs": [-0.89], "tokens": [" blue"],
                              "top_logprobs": [{"1": -2.7, " blue": -0.89}]},
                 "finish_reason": None, "stop_reason": None}
        last = {"index": 0, "text": " star", "token_ids": [312], "prompt_token_ids": None,
                "logprobs": {"text_offset": [5], "token_logprobs": [-1.46], "tokens": [" star"],
                             "top_logprobs": [{" star": -1.46, " triangle": -1.48}]},
                "finish_reason": "length", "stop_reason": None}
        return _sse({"object": "text_completion", "choices": [first]},
                    {"object": "text_completion", "choices": [last]},
                    {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
                    "data: [DONE]\n\n")

    with BackgroundServer(app) as srv:
        eng = RemoteEngine(EngineConfig(backend="remote", remote_url=srv.url,
                                        remote_api_key="k3y"))
        yield eng, app.state.calls
        eng.close()


@pytest.mark.parametrize("what, error, code, text", [
    ("flat", InvalidRequestError, 400, "flat says no"),
    ("nested404", ModelNotFoundError, 404, "The model `fake` does not exist."),
    ("busy", EngineBusyError, 503, "queue full"),
    ("auth", RemoteError, 502, "--remote-api-key"),
    ("crash", RemoteError, 502, "HTTP 500"),
])
def test_fake_remote_errors_before_the_stream(fake_remote, what, error, code, text):
    eng, _ = fake_remote
    with pytest.raises(error) as exc:
        eng.submit(request(what))
    assert exc.value.code == code and text in exc.value.message
    assert type(exc.value) is error


@pytest.mark.parametrize("what, error", [("midstream", RemoteError),
                                         ("truncated", RemoteUnavailableError),
                                         ("garbage", RemoteError)])
def test_fake_remote_errors_during_the_stream(fake_remote, what, error):
    eng, _ = fake_remote
    events = list(eng.submit(request(what)).events(timeout=10))
    finished = events[-1]
    assert finished.reason == "error" and type(finished.error) is error, finished
    if what != "garbage":
        assert [e.text for e in events[:-1]] == ["partial"]


def test_cancel_interrupts_a_blocked_read(fake_remote):
    """Cancelling must not wait for the remote's next byte: the socket is shut at once."""
    eng, _ = fake_remote
    handle = eng.submit(request("silent"))
    start = time.monotonic()
    threading.Timer(0.2, handle.cancel).start()
    events = list(handle.events(timeout=10))
    assert events[-1].reason == "cancelled"
    assert time.monotonic() - start < 2.0


def test_fake_remote_receives_media_as_data_uris_and_sampling(fake_remote, tmp_path):
    eng, calls = fake_remote
    assert eng.model_name == "fake" and eng.max_model_len == 1000
    picture = tmp_path / "pic.png"
    Image.new("RGB", (300, 200), "purple").save(picture)
    req = request("describe", images=[picture], max_tokens=5, temperature=0.5, top_p=0.9,
                  top_k=20, seed=3, stop=["\n\n"], min_tokens=2, repetition_penalty=1.1)
    req.min_pixels, req.max_pixels = 28 * 28, 256 * 28 * 28
    text, finished = eng.generate(req, timeout=10)
    assert text == "ok" and finished.reason == "stop"
    assert finished.stats.prompt_tokens == 7 and finished.stats.output_tokens == 2
    headers, body = calls[-1]
    assert headers["authorization"] == "Bearer k3y"
    assert body["model"] == "fake" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    expected = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "seed": 3,
                "stop": ["\n\n"], "min_tokens": 2, "ignore_eos": True,
                "repetition_penalty": 1.1}
    assert {k: body[k] for k in expected} == expected
    assert "mm_processor_kwargs" not in body   # a tutorial-started vLLM refuses them
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    image_part, text_part = body["messages"][1]["content"]
    assert text_part == {"type": "text", "text": "describe"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    # resized here to its smart_resize target for the bounds, so the remote's defaults give
    # the same 77 image tokens the local engine would
    assert sent.size == (308, 196) and sent.convert("RGB").getpixel((5, 5)) == (128, 0, 128)


def test_mm_kwargs_only_with_the_flag_and_a_refusal_names_it(fake_remote, tmp_path):
    """Replays vLLM 0.32's recorded 400 for per-request mm_processor_kwargs."""
    eng, calls = fake_remote
    picture = tmp_path / "pic.png"
    Image.new("RGB", (300, 200), "purple").save(picture)
    eng.config.remote_mm_kwargs = True
    try:
        req = request("describe", images=[picture])
        req.min_pixels, req.max_pixels = 28 * 28, 256 * 28 * 28
        with pytest.raises(InvalidRequestError, match="--trust-request-mm-kwargs") as exc:
            eng.submit(req)
        assert "--remote-mm-kwargs" in exc.value.message and exc.value.code == 400
        assert calls[-1][1]["mm_processor_kwargs"] == {"min_pixels": 28 * 28,
                                                       "max_pixels": 256 * 28 * 28}
    finally:
        eng.config.remote_mm_kwargs = False
    assert eng.generate(request("describe", images=[picture]), timeout=10)[0] == "ok"


# every SamplingParams field set away from its default, and the name vLLM gives it
NON_DEFAULT = {
    "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
    "seed": -3, "stop": ["\n\n"], "ignore_eos": True, "min_tokens": 2, "presence_penalty": 0.5,
    "frequency_penalty": -0.5, "min_p": 0.1, "logit_bias": {5: 2.0}, "bad_words": ["bad"],
    "allowed_token_ids": [5, 6], "stop_token_ids": [7], "include_stop_str_in_output": True,
    "skip_special_tokens": False, "spaces_between_special_tokens": False, "logprobs": 2,
    "prompt_logprobs": 1, "truncate_prompt_tokens": 50, "truncation_side": "right"}


def test_every_sampling_field_and_chat_control_is_forwarded(fake_remote):
    """Each field goes under vLLM's name, only when it differs from the default, so a plain
    request's body is what an older server has always seen."""
    import dataclasses

    from engine.backends.remote import NOT_FORWARDED
    from engine.types import StructuredOutput

    eng, _ = fake_remote
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(NON_DEFAULT) | NOT_FORWARDED >= fields, "a new field is neither sent nor listed"
    plain = eng.build_body(GenerationRequest(Conversation([Message("user", "Hi")])))
    assert set(plain) == {"model", "messages", "stream", "stream_options", "max_tokens"}
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    conv = Conversation([Message("user", "Hi"), Message("assistant", "", tool_calls=call),
                         Message("tool", "42", tool_call_id="c1"),
                         Message("assistant", "The answer is")],
                        add_generation_prompt=False, continue_final_message=True,
                        chat_template_kwargs={"add_vision_id": True},
                        tools=[{"type": "function", "function": {"name": "f"}}])
    sampling = SamplingParams(**NON_DEFAULT, structured=StructuredOutput(regex="[0-9]+"))
    body = eng.build_body(GenerationRequest(conv, sampling))
    expected = {**{k: v for k, v in NON_DEFAULT.items() if k != "logprobs"},
                "logit_bias": {"5": 2.0}, "logprobs": True, "top_logprobs": 2,
                "return_token_ids": True, "structured_outputs": {"regex": "[0-9]+"},
                "add_generation_prompt": False, "continue_final_message": True,
                "chat_template_kwargs": {"add_vision_id": True}, "tools": conv.tools,
                "tool_choice": "none"}   # calls are parsed (and forced) here, from the text
    assert {k: body[k] for k in expected} == expected
    assert body["stream"] is False     # vLLM does not stream prompt_logprobs
    assert body["messages"][1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert body["messages"][2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    completion = eng.build_body(GenerationRequest(Conversation(), SamplingParams(logprobs=3),
                                                  prompt=[1, 2]))
    assert completion["prompt"] == [1, 2] and completion["logprobs"] == 3
    assert "messages" not in completion and "top_logprobs" not in completion


def test_logprobs_token_ids_and_stop_reason_come_back(fake_remote):
    eng, calls = fake_remote
    events = list(eng.submit(request("logprobs", logprobs=1)).events(timeout=10))
    finished = events[-1]
    assert finished.reason == "stop" and finished.stop_reason == 220
    deltas = events[:-1]
    assert "".join(d.text for d in deltas) == "There are"
    assert [t for d in deltas for t in d.token_ids] == [425, 309]
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [(lp.token, lp.token_id, lp.logprob, lp.rank) for lp in lps] == [
        ("There", 425, -0.36, 1), (" are", 309, -0.85, 2)]
    assert [(t.token, t.token_id) for t in lps[1].top] == [(" is", -1), (" are", 309)]
    assert calls[-1][1]["logprobs"] is True and calls[-1][1]["top_logprobs"] == 1


def test_a_beam_search_is_one_remote_request_split_into_choices(fake_remote):
    eng, calls = fake_remote
    before = len(calls)
    handles = eng.submit_choices(request("Hi", n=2, use_beam_search=True, length_penalty=0.5))
    assert len(calls) == before + 1, "the beams went as more than one request"
    body = calls[-1][1]
    assert (body["use_beam_search"], body["n"], body["length_penalty"], body["stream"],
            body["return_token_ids"]) == (True, 2, 0.5, False, True)
    got = []
    for handle in handles:
        events = list(handle.events(timeout=10))
        finished = events[-1]
        got.append(("".join(e.text for e in events[:-1]),
                    [t for e in events[:-1] for t in e.token_ids], finished.reason,
                    finished.stop_reason, finished.stats.output_tokens,
                    finished.stats.prompt_tokens))
    assert got == [("```", [13874, 913], "stop", 913, 2, 95),
                   ("```jsonred", [13874, 2236, 1151], "length", None, 3, 95)]
    assert [h.request_id for h in handles] == [f"{handles[0].request_id[:-2]}-{i}"
                                               for i in range(2)]
    plain = eng.build_body(request("Hi", n=2))
    assert not {"use_beam_search", "n", "length_penalty"} & set(plain)


def test_prompt_logprobs_are_read_from_the_whole_answer(fake_remote):
    eng, _ = fake_remote
    text, finished = eng.generate(request("Hi", prompt_logprobs=1), timeout=10)
    assert text == "ok" and finished.reason == "length"
    assert finished.prompt_token_ids == [912, 82, 88]
    first, second, third = finished.prompt_logprobs
    assert first is None
    assert (second.token, second.token_id, second.logprob, second.rank) == ("s", 82, -11.5, 628)
    assert [(t.token_id, t.logprob) for t in second.top] == [(557, -0.47)]
    assert (third.token_id, third.rank, [t.token_id for t in third.top]) == (88, 1, [88])


def test_raw_prompt_goes_to_the_remotes_completions(fake_remote):
    eng, calls = fake_remote
    req = GenerationRequest(Conversation(), SamplingParams(max_tokens=2, logprobs=1),
                            prompt="Hello there")
    events = list(eng.submit(req).events(timeout=10))
    finished = events[-1]
    assert finished.reason == "length" and finished.prompt_token_ids == [39, 291]
    assert finished.stats.prompt_tokens == 2 and finished.stats.output_tokens == 2
    assert "".join(e.text for e in events[:-1]) == " blue star"
    lps = [lp for e in events[:-1] for lp in e.logprobs]
    assert [(lp.token, lp.token_id, lp.rank) for lp in lps] == [(" blue", 351, 1),
                                                                (" star", 312, 1)]
    assert [(t.token, t.token_id) for t in lps[0].top] == [(" blue", 351), ("1", -1)]
    body = calls[-1][1]
    assert body["prompt"] == "Hello there" and body["logprobs"] == 1
    with pytest.raises(InvalidRequestError, match="Token id 5 is out of vocabulary"):
        eng.submit(GenerationRequest(Conversation(), prompt="refuse"))


def test_remote_applies_the_media_policy_before_sending(fake_remote):
    eng, calls = fake_remote
    before = len(calls)
    api_policy = MediaPolicy(local_roots=())
    with pytest.raises(InvalidRequestError, match="not allowed"):
        eng.submit(request("x", images=["/etc/hostname"]), api_policy)
    with pytest.raises(InvalidRequestError, match="Refusing to fetch"):
        eng.submit(request("x", images=["http://127.0.0.1:9/cat.png"]), api_policy)
    assert len(calls) == before, "the remote was asked anyway"


def test_remote_backend_needs_no_torch():
    """The UI in front of a vLLM server must not pay for (or need) torch."""
    import subprocess
    import sys

    code = ("import sys; from engine.factory import create_engine; import engine.backends.remote, app; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- the web app in remote mode
def test_web_app_in_remote_mode_streams_through_the_remote(remote_server, local_engine):
    """`python app.py --backend remote` in front of a second instance of our server: the
    page's chat endpoint streams an answer generated by the remote's engine."""
    from gradio_client import Client, handle_file

    from support import AppServer

    finished = []
    local_engine.add_finish_listener(lambda req, fin: finished.append(fin))
    with AppServer("--backend", "remote", "--remote-url", f"{remote_server.url}/v1") as app:
        client = Client(app.url, verbose=False)
        # the shapes picture's grounding JSON (about 80 tokens) arrives in several updates
        job = client.submit({"text": "Detect the shapes.",
                             "files": [handle_file(str(ASSETS / "shapes.png"))]},
                            max_new_tokens=200, temperature=0, api_name="/chat")
        chunks = list(job)
        final = job.result()
        client.close()
        assert final and len(chunks) >= 2 and all(final.startswith(c) for c in chunks)
        assert any(f.stats.images == 1 and f.stats.output_tokens > 0 for f in finished)
        assert any("remote" in line for line in app.lines)


def test_web_app_with_the_remote_down_shows_a_clear_error():
    from gradio_client import Client

    from support import AppServer

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with AppServer("--backend", "remote", "--remote-url", dead, "--remote-model", "m") as app:
        client = Client(app.url, verbose=False)
        start = time.monotonic()
        with pytest.raises(Exception, match="Cannot connect to the remote server"):
            client.predict({"text": "Hello", "files": []}, max_new_tokens=8, api_name="/chat")
        assert time.monotonic() - start < 15
        client.close()


def test_tokenize_and_detokenize_go_to_the_remote(remote, local_engine):
    """/tokenize and /detokenize in remote mode ask the remote's own endpoints: a text and a
    chat with a picture give the ids the remote's engine renders, and back."""
    text = "How many shapes are there?"
    assert remote.tokenize(text) == local_engine.tokenize(text)
    assert remote.detokenize(local_engine.tokenize(text)) == text
    shapes = str(Path(__file__).resolve().parent.parent / "assets" / "shapes.png")
    chat = request("What colour is the star?", images=[shapes])
    ids = remote.tokenize(chat, MediaPolicy(local_roots=None))
    image_pad = local_engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids == local_engine.tokenize(chat, MediaPolicy(local_roots=None))
    assert ids.count(image_pad) > 0
    with pytest.raises(InvalidRequestError):
        remote.detokenize([10**9])             # the remote's refusal, raised as ours
