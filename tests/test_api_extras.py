"""vLLM 0.32's tokenizer and server endpoints on the tiny model, through real sockets: the
chat form of /tokenize under every template control (the oracle: the model folder's own chat
template and tokenizer, which vLLM's /tokenize equals), return_token_strs, tools as vLLM hands
them to the template, vLLM's refusals in its words; GET /tokenizer_info and GET /load behind
their vLLM flags; /version in vLLM's shape."""

from __future__ import annotations

import base64
import io
import shutil
import time

import pytest

from support import guard_loopback  # noqa: F401 (autouse: loopback only)

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from engine.base import Engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.backends.local import LocalEngine  # noqa: E402
from server import __version__  # noqa: E402
from server.background import BackgroundServer  # noqa: E402
from server.routes import create_api_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

API_KEY = "extras-key"
CHAT = [{"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Nice to meet you!"},
        {"role": "user", "content": "Can I ask a question?"}]
# The tiny folder's template with tools rendered, as templates of tool-calling models do.
TOOLS_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny folder, its chat template also rendering the tools offered."""
    folder = tmp_path_factory.mktemp("tiny-tools") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    template = folder / "chat_template.jinja"
    template.write_text(TOOLS_TEMPLATE + template.read_text())
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = LocalEngine.from_config(EngineConfig(model=str(model_dir), device="cpu", warmup=False,
                                               log_stats_interval=0))
    eng.model_name = "tiny"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def plain(engine):
    """The API with vLLM's defaults: no /tokenizer_info, /load stays 0."""
    with BackgroundServer(create_api_app(engine, ServerSettings())) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def flagged(engine):
    """The API with --enable-tokenizer-info-endpoint, --enable-server-load-tracking and an
    API key (the client sends it)."""
    settings = ServerSettings(api_key=API_KEY, enable_tokenizer_info_endpoint=True,
                              enable_server_load_tracking=True)
    with BackgroundServer(create_api_app(engine, settings)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        yield http


def expected_ids(processor, messages, add_special_tokens=False, **template) -> list[int]:
    """vLLM's /tokenize of a chat: the chat template's text, then the tokenizer."""
    text = processor.apply_chat_template(messages, tokenize=False, **template)
    return processor.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def tokenize(http, body) -> dict:
    resp = http.post("/tokenize", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def error_of(resp, status=400) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


# --------------------------------------------------------------------------- /tokenize
@pytest.mark.parametrize("add_generation_prompt,continue_final_message,add_special_tokens", [
    (True, False, False), (False, False, False), (False, True, False), (True, False, True),
    (False, True, True)])
def test_a_chat_is_tokenized_under_its_template_controls(
        plain, processor, add_generation_prompt, continue_final_message, add_special_tokens):
    messages = CHAT + [{"role": "assistant", "content": "Sure,"}] if continue_final_message \
        else CHAT
    body = tokenize(plain, {"messages": messages, "add_generation_prompt": add_generation_prompt,
                            "continue_final_message": continue_final_message,
                            "add_special_tokens": add_special_tokens, "return_token_strs": True})
    ids = expected_ids(processor, messages, add_special_tokens,
                       add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final_message)
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["token_strs"] == processor.tokenizer.convert_ids_to_tokens(ids)
    text = processor.tokenizer.decode(ids)
    assert text.endswith("Sure,") if continue_final_message else \
        text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_token_strs_of_a_prompt_are_the_tokenizers(plain, processor):
    prompt = "This is a token_strs test prompt! <|im_start|> vllm1"
    body = tokenize(plain, {"prompt": prompt, "return_token_strs": True})
    ids = processor.tokenizer.encode(prompt)
    assert body["tokens"] == ids
    assert body["token_strs"] == processor.tokenizer.convert_ids_to_tokens(ids)
    assert "<|im_start|>" in body["token_strs"]
    assert tokenize(plain, {"prompt": prompt})["token_strs"] is None


def _picture() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_template_kwargs_reach_the_template(plain, processor):
    """add_vision_id, a variable of Qwen2.5-VL's template, numbers the pictures."""
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _picture()}},
        {"type": "text", "text": "What is it?"}]}]
    numbered = tokenize(plain, {"messages": messages,
                                "chat_template_kwargs": {"add_vision_id": True}})["tokens"]
    bare = tokenize(plain, {"messages": messages})["tokens"]
    tok = processor.tokenizer
    assert "Picture 1: <|vision_start|>" in tok.decode(numbered)
    assert "Picture 1" not in tok.decode(bare)
    assert len(numbered) - len(bare) == len(tok.encode("Picture 1: "))


def test_tools_reach_the_template_as_vllm_hands_them_over(plain, processor):
    """vLLM validates each tool and passes type, name, description and parameters (None when
    absent; strict only when set), leaving other keys out."""
    tools = [{"type": "function", "extra": 1, "function": {
        "name": "get_weather", "x-vendor": True,
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "now", "description": "The time.",
                                          "strict": True}}]
    as_vllm = [{"type": "function", "function": {
        "name": "get_weather", "description": None,
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "now", "description": "The time.",
                                          "parameters": None, "strict": True}}]
    messages = CHAT[:1]
    body = tokenize(plain, {"messages": messages, "tools": tools})
    assert body["tokens"] == expected_ids(processor, messages, tools=as_vllm,
                                          add_generation_prompt=True)
    assert '"description": null' in processor.tokenizer.decode(body["tokens"])
    assert tokenize(plain, {"messages": messages, "tools": []})["tokens"] == \
        tokenize(plain, {"messages": messages})["tokens"]


@pytest.mark.parametrize("body,param,words", [
    ({"chat_template": "{{ messages }}"}, "chat_template",
     "Chat template is passed with request, but --trust-request-chat-template is not set."),
    ({"chat_template_kwargs": {"chat_template": "x"}}, "chat_template",
     "Refused request with untrusted chat template."),
    ({"media_io_kwargs": {"video": {"num_frames": 2}}}, "media_io_kwargs", "media_io_kwargs"),
    ({"continue_final_message": True}, None,
     "continue_final_message and add_generation_prompt are not compatible."),
    ({"continue_final_message": True, "add_generation_prompt": True}, None,
     "Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
    ({"tools": [{"type": "function"}]}, "body.tools.0.function", "Field required"),
])
def test_what_vllm_refuses_on_a_chat_is_refused_in_its_words(plain, body, param, words):
    error = error_of(plain.post("/tokenize", json={"messages": CHAT, **body}))
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


class TokenizerlessEngine(Engine):
    """An engine with no tokenizer of its own (as the remote backend): ids only."""

    model_name, is_tiny, max_model_len, device_description = "remote", False, 100, "none"

    def submit(self, request, policy=None):
        raise AssertionError("not used")

    def health(self):
        return True

    def tokenize(self, prompt, policy=None, add_special_tokens=True):
        return [1, 2, 3]


def test_without_a_tokenizer_token_strs_and_tokenizer_info_are_refused():
    from fastapi.testclient import TestClient

    settings = ServerSettings(enable_tokenizer_info_endpoint=True)
    with TestClient(create_api_app(TokenizerlessEngine(), settings)) as tc:
        assert tc.post("/tokenize", json={"prompt": "a"}).json()["tokens"] == [1, 2, 3]
        error = error_of(tc.post("/tokenize", json={"prompt": "a", "return_token_strs": True}))
        assert error["param"] == "return_token_strs"
        assert error_of(tc.get("/tokenizer_info"), 501)["type"] == "NotImplementedError"


# --------------------------------------------------------------------------- /tokenizer_info
def test_tokenizer_info_is_served_only_with_its_flag(plain, flagged, processor):
    assert plain.get("/tokenizer_info").status_code == 404
    resp = flagged.get("/tokenizer_info")
    assert resp.status_code == 200, resp.text
    info = resp.json()
    tok = processor.tokenizer
    assert info["tokenizer_class"] == type(tok).__name__
    assert not {"vocab_file", "merges_file"} & set(info)
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == tok.model_max_length
    assert info["chat_template"] == tok.init_kwargs["chat_template"]
    assert info["added_tokens_decoder"][str(tok.eos_token_id)] == tok.eos_token
    tokenize_len = flagged.post("/tokenize", json={"prompt": "Hello"}).json()["max_model_len"]
    assert info["model_max_length"] >= tokenize_len


def test_tokenizer_info_and_load_need_the_login(flagged):
    for path in ("/tokenizer_info", "/load"):
        resp = flagged.get(path, headers={"Authorization": "Bearer wrong"})
        assert resp.status_code == 401, path


# --------------------------------------------------------------------------- /version, /load
def test_version_is_vllms_shape_and_the_device_is_on_metrics(plain, engine):
    assert plain.get("/version").json() == {"version": __version__}
    line = next(line for line in plain.get("/metrics").text.splitlines()
                if line.startswith("qwenvl_server_info{"))
    assert f'version="{__version__}"' in line and line.endswith(" 1")
    assert f'device="{engine.device_description}"' in line


def _load(http) -> int:
    resp = http.get("/load")
    assert resp.status_code == 200, resp.text
    return resp.json()["server_load"]


def first_event(resp):
    """The stream's first line and the line iterator, kept: dropping it closes the stream."""
    lines = resp.iter_lines()
    return next(lines), lines


def _settles(http, value: int, timeout: float = 5.0) -> bool:
    """Whether /load reaches `value` (a response is uncounted just after its last byte)."""
    deadline = time.monotonic() + timeout
    while _load(http) != value:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


LONG = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 8000, "min_tokens": 8000, "stream": True}   # far longer than the test


def test_load_counts_requests_until_their_last_byte(flagged):
    assert _load(flagged) == 0
    with flagged.stream("POST", "/v1/chat/completions", json=LONG) as resp:
        first, lines = first_event(resp)
        assert first.startswith("data: ") and _load(flagged) == 1
        with flagged.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": "Once", "max_tokens": 8000, "min_tokens": 8000,
                "stream": True}) as second:
            first, more = first_event(second)
            assert first.startswith("data: ") and _load(flagged) == 2
        assert _settles(flagged, 1)    # the client left the second stream
    assert _settles(flagged, 0)
    answer = flagged.post("/v1/chat/completions", json={**LONG, "stream": False,
                                                        "max_tokens": 5, "min_tokens": 5})
    assert answer.status_code == 200 and _settles(flagged, 0)
    refused = flagged.post("/v1/chat/completions", json={**LONG, "temperature": -1})
    assert refused.status_code == 400 and _settles(flagged, 0)


def test_load_stays_0_without_tracking(plain):
    with plain.stream("POST", "/invocations", json=LONG) as resp:
        first, lines = first_event(resp)
        assert first.startswith("data: ") and _load(plain) == 0


def test_invocations_count_once_and_tokenize_not_at_all(flagged):
    with flagged.stream("POST", "/invocations", json=LONG) as resp:
        first, lines = first_event(resp)
        assert first.startswith("data: ") and _load(flagged) == 1
    assert _settles(flagged, 0)
    assert flagged.post("/tokenize", json={"prompt": "a"}).status_code == 200
    assert _load(flagged) == 0    # nor in vLLM
