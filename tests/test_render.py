"""Our rendered prompt equals vLLM's for the same OpenAI messages.

vLLM (0.32, checked by hand against a real server on the same tiny folder) hands
the chat template each message's content parts in their order, as OpenAI sends
them: `{"type": "text"}` parts each in turn, an `image_url` part as an image. So the
expectation is the processor's own `apply_chat_template` on exactly that, and the
prompt's token count is the template's tokens plus each picture's smart_resize
tokens. Ours goes through the API's conversion and the engine's renderer: the one
path the CLI, the page and the API share."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from qwen_vl_utils.vision_process import smart_resize

from engine.inputs.media import MediaPolicy
from engine.types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from server.protocol import ChatCompletionRequest
from server.serving import to_generation_request

SIZES = {"red": (640, 480), "green": (300, 200), "blue": (90, 120)}


def img(name: str) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", SIZES[name], name).save(buf, "PNG")
    return {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def user(*parts):
    return {"role": "user", "content": list(parts)}


CASES = {
    "text only": [{"role": "user", "content": "Hello there"}],
    "image then text": [user(img("red"), text("What is this?"))],
    "text, image, text": [user(text("Look:"), img("red"), text("what colour is it?"))],
    "text before image": [user(text("Describe"), img("green"))],
    "two images between texts": [user(text("A"), img("red"), img("green"), text("B"))],
    "three images": [user(img("red"), img("green"), img("blue"), text("Compare them."))],
    "list of text parts": [user(text("first part"), text(" second"), text("\nthird"))],
    "system and two turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"}],
    "images in two turns": [
        user(img("red"), text("One")), {"role": "assistant", "content": "A red picture."},
        user(text("And"), img("blue"), text("this one?"))],
    "assistant as text parts": [
        user(text("Hi")), {"role": "assistant", "content": [text("Hel"), text("lo")]},
        user(text("Again"))],
    "unicode": [user(img("green"), text("Qu'est-ce que c'est ? 这是什么？ 🙂"))],
    "developer role": [{"role": "developer", "content": "Answer in French."},
                       user(text("Bonjour"))],
}


def vllm_view(messages: list[dict]) -> tuple[list[dict], int]:
    """The template input vLLM builds, and the image tokens its processor adds."""
    out, image_tokens = [], 0
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    parts.append({"type": "image"})
                    w, h = Image.open(io.BytesIO(base64.b64decode(
                        p["image_url"]["url"].split(",", 1)[1]))).size
                    rh, rw = smart_resize(h, w, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
                    image_tokens += rh * rw // (28 * 28)
            content = parts
        out.append({"role": role, "content": content})
    return out, image_tokens


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_equals_vllms(random_engine, name):
    messages = CASES[name]
    processor = random_engine.loaded.processor
    expected_msgs, image_tokens = vllm_view(messages)
    expected = processor.apply_chat_template(expected_msgs, tokenize=False,
                                             add_generation_prompt=True)
    n_images = sum(1 for m in expected_msgs if isinstance(m["content"], list)
                   for p in m["content"] if p["type"] == "image")
    expected_tokens = len(processor.tokenizer(expected).input_ids) + image_tokens - n_images

    req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages})
    prompt = random_engine.render(to_generation_request(req, "r"), MediaPolicy(local_roots=()))
    assert prompt.prompt_text == expected
    assert prompt.prompt_tokens == expected_tokens
    assert prompt.images == n_images


def test_part_order_reaches_the_remote_too(tiny_engine):
    """The remote engine serialises the same ordered parts (only resized pictures)."""
    import httpx

    from engine.config import EngineConfig
    from engine.backends.remote import RemoteEngine

    def card(request):   # a remote that only lists its model: nothing leaves the process
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 16384}]})

    eng = RemoteEngine(EngineConfig(backend="remote", remote_url="http://remote.test/v1"),
                       client=httpx.Client(transport=httpx.MockTransport(card)))
    req = ChatCompletionRequest.model_validate(
        {"messages": CASES["two images between texts"]})
    body = eng.build_body(to_generation_request(req, "r"), MediaPolicy(local_roots=()))
    kinds = [p["type"] if p["type"] != "text" else p["text"]
             for p in body["messages"][0]["content"]]
    assert kinds == ["A", "image_url", "image_url", "B"]


def test_video_between_texts_renders_in_place(tiny_engine, tmp_path):
    """A video_url part keeps its place among the text parts, as vLLM renders it."""
    from test_engine import write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip)
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    messages = [user(text("Watch:"), {"type": "video_url", "video_url": {"url": uri}},
                     text("what happens?"))]
    expected = tiny_engine.loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Watch:"}, {"type": "video"},
                                      {"type": "text", "text": "what happens?"}]}],
        tokenize=False, add_generation_prompt=True)
    req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages})
    prompt = tiny_engine.render(to_generation_request(req, "r"), MediaPolicy(local_roots=()))
    assert prompt.prompt_text == expected and prompt.videos == 1


def test_cached_pixels_equal_the_processors_own(tiny_engine, tiny_model_dir):
    """A follow-up turn's pictures come from the pixel cache: the inputs equal a processor
    run without it, cold and warm, for pictures of several sizes in one prompt."""
    import torch
    from PIL import Image

    from engine.types import Conversation, GenerationRequest, ImageInput, Message
    from support import tiny_engine_with

    pictures = [Image.effect_noise(size, 40 + i).convert("RGB")
                for i, size in enumerate([(640, 480), (300, 900), (1280, 960)])]
    req = GenerationRequest(Conversation([Message("user", "Compare",
                                                  images=[ImageInput(p) for p in pictures])]))
    before = tiny_engine.snapshot()
    cold = tiny_engine.render(req).inputs
    between = tiny_engine.snapshot()
    warm = tiny_engine.render(req).inputs
    after = tiny_engine.snapshot()
    assert between.pixel_cache_misses == before.pixel_cache_misses + 3
    assert after.pixel_cache_hits == between.pixel_cache_hits + 3
    uncached = tiny_engine_with(tiny_model_dir, picture_cache_mb=0)   # its own processor
    try:
        assert "pixel_cache_hits" not in uncached.snapshot().caches()
        plain = uncached.render(req).inputs
    finally:
        uncached.close()
    for inputs in (cold, warm):
        assert inputs.keys() == plain.keys()
        for key in plain:
            assert torch.equal(inputs[key], plain[key]), key
