"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_vision.py.

Changes: the sync client; the served model instead of Phi-3.5-vision; generated pictures as
data: URIs instead of the asset server's URLs; expected prompt tokens from the tiny folder's own
processor (as vLLM takes them from Phi's); beam-search term checks (what a 4B model sees in
real photos) dropped, the shape of the answer kept.
"""

from __future__ import annotations

import openai
import pytest

from .conftest import MAXIMUM_IMAGES, TEST_IMAGE_ASSETS, image_bytes


def assert_non_empty_content(chat_completion, *, context: str = "") -> str:
    choice = chat_completion.choices[0]
    content = choice.message.content
    assert isinstance(content, str) and len(content) > 0, (
        f"[{context}] empty content, finish_reason={choice.finish_reason!r}")
    return content


def dummy_messages_from_image_url(image_urls, content_text: str = "What's in this image?"):
    if isinstance(image_urls, str):
        image_urls = [image_urls]
    return [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": u}} for u in image_urls),
        {"type": "text", "text": content_text}]}]


def describe_image_messages(image_url: str, *, extra_image_fields: dict | None = None):
    image_block: dict = {"type": "image_url", "image_url": {"url": image_url}}
    if extra_image_fields:
        image_block.update(extra_image_fields)
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         image_block]}]


def complete_and_check(client, model_name, messages, *, context, max_completion_tokens=50,
                       temperature=0.0) -> str:
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=max_completion_tokens,
        temperature=temperature)
    return assert_non_empty_content(chat_completion, context=context)


def get_hf_prompt_tokens(processor, content: str, asset: str) -> int:
    """vLLM: Phi-3.5's processor on the fetched image; here the tiny folder's processor."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes(asset))).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": content}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=[image], return_tensors="pt").input_ids.shape[1]


@pytest.mark.parametrize("image_url", TEST_IMAGE_ASSETS, indirect=True)
def test_single_chat_session_image(client, model_name, image_url, processor, request):
    """vLLM test_vision.py::test_single_chat_session_image."""
    asset = request.node.callspec.params["image_url"]
    content_text = "What's in this image?"
    messages = dummy_messages_from_image_url(image_url, content_text)
    max_completion_tokens = 10
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=max_completion_tokens,
        logprobs=True, temperature=0.0, top_logprobs=5,
        # the tiny model ends its answers early; vLLM's test relies on a 10-token cap
        extra_body={"min_tokens": max_completion_tokens})
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason == "length"
    hf_prompt_tokens = get_hf_prompt_tokens(processor, content_text, asset)
    assert chat_completion.usage.model_dump(include={"completion_tokens", "prompt_tokens",
                                                     "total_tokens"}) == {
        "completion_tokens": max_completion_tokens, "prompt_tokens": hf_prompt_tokens,
        "total_tokens": hf_prompt_tokens + max_completion_tokens}
    message = choice.message
    # vLLM: >= 10 characters from 10 tokens of a real model; the tiny one's tokens are shorter
    assert message.content is not None and len(message.content) >= 1
    assert message.role == "assistant"
    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    complete_and_check(client, model_name, messages, context="multi-turn follow-up",
                       max_completion_tokens=10)


@pytest.mark.parametrize("image_url", TEST_IMAGE_ASSETS, indirect=True)
def test_error_on_invalid_image_url_type(client, model_name, image_url):
    """vLLM test_vision.py::test_error_on_invalid_image_url_type."""
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": image_url},
        {"type": "text", "text": "What's in this image?"}]}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=messages,
                                       max_completion_tokens=10, temperature=0.0)


@pytest.mark.parametrize("image_url", TEST_IMAGE_ASSETS, indirect=True)
def test_single_chat_session_image_beamsearch(client, model_name, image_url):
    """vLLM test_vision.py::test_single_chat_session_image_beamsearch."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=dummy_messages_from_image_url(image_url), n=2,
        max_completion_tokens=10, logprobs=True, top_logprobs=5,
        extra_body=dict(use_beam_search=True))
    assert len(chat_completion.choices) == 2
    assert chat_completion.choices[0].message.content != chat_completion.choices[1].message.content


@pytest.mark.parametrize("raw_image_url", TEST_IMAGE_ASSETS)
def test_single_chat_session_image_base64encoded(client, model_name, raw_image_url,
                                                 url_encoded_image, processor):
    """vLLM test_vision.py::test_single_chat_session_image_base64encoded (vLLM also crosses it
    with every `image_url`, which the test does not use: one case per picture here)."""
    content_text = "What's in this image?"
    messages = dummy_messages_from_image_url(url_encoded_image[raw_image_url], content_text)
    max_completion_tokens = 10
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=max_completion_tokens,
        logprobs=True, temperature=0.0, top_logprobs=5,
        extra_body={"min_tokens": max_completion_tokens})
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason == "length"
    hf_prompt_tokens = get_hf_prompt_tokens(processor, content_text, raw_image_url)
    assert chat_completion.usage.prompt_tokens == hf_prompt_tokens
    assert chat_completion.usage.completion_tokens == max_completion_tokens
    assert chat_completion.usage.total_tokens == hf_prompt_tokens + max_completion_tokens
    message = choice.message
    assert message.content is not None and len(message.content) >= 1  # vLLM: >= 10 chars
    assert message.role == "assistant"
    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    complete_and_check(client, model_name, messages, context="multi-turn base64 follow-up",
                       max_completion_tokens=10, temperature=0.0)


@pytest.mark.parametrize("image_idx", list(range(len(TEST_IMAGE_ASSETS))))
def test_single_chat_session_image_base64encoded_beamsearch(client, model_name, image_idx,
                                                            url_encoded_image):
    """vLLM test_vision.py::test_single_chat_session_image_base64encoded_beamsearch (its
    required terms name what is in the real photos: dropped)."""
    raw_image_url = TEST_IMAGE_ASSETS[image_idx]
    chat_completion = client.chat.completions.create(
        model=model_name, messages=dummy_messages_from_image_url(url_encoded_image[raw_image_url]),
        n=2, max_completion_tokens=10, temperature=0.0, extra_body=dict(use_beam_search=True))
    assert len(chat_completion.choices) == 2
    content_0 = chat_completion.choices[0].message.content
    content_1 = chat_completion.choices[1].message.content
    assert content_0 and content_1
    assert content_0 != content_1


@pytest.mark.parametrize("image_url", TEST_IMAGE_ASSETS, indirect=True)
def test_chat_streaming_image(client, model_name, image_url):
    """vLLM test_vision.py::test_chat_streaming_image."""
    messages = dummy_messages_from_image_url(image_url)
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=10, temperature=0.0)
    output = chat_completion.choices[0].message.content
    stop_reason = chat_completion.choices[0].finish_reason
    stream = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=10, temperature=0.0,
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
    assert "".join(chunks) == output


MULTI = [TEST_IMAGE_ASSETS[:i] for i in range(2, len(TEST_IMAGE_ASSETS))]


@pytest.mark.parametrize("image_urls", MULTI, indirect=True)
def test_multi_image_input(client, model_name, image_urls):
    """vLLM test_vision.py::test_multi_image_input."""
    messages = dummy_messages_from_image_url(image_urls)
    if len(image_urls) > MAXIMUM_IMAGES:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model_name, messages=messages,
                                           max_completion_tokens=10, temperature=0.0)
        completion = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                               max_tokens=5, temperature=0.0)
        assert completion.choices[0].text is not None
    else:
        complete_and_check(client, model_name, messages, context="multi-image input",
                           max_completion_tokens=10)


@pytest.mark.parametrize("image_urls", MULTI, indirect=True)
def test_completions_with_image(client, model_name, image_urls):
    """vLLM test_vision.py::test_completions_with_image."""
    for image_url in image_urls:
        complete_and_check(client, model_name, describe_image_messages(image_url),
                           context="completions_with_image", max_completion_tokens=10)


@pytest.mark.parametrize("image_urls", MULTI, indirect=True)
def test_completions_with_image_with_uuid(client, model_name, image_urls):
    """vLLM test_vision.py::test_completions_with_image_with_uuid (uuid: a short digest instead
    of the whole URL)."""
    import hashlib

    for image_url in image_urls:
        uuid = hashlib.sha256(image_url.encode()).hexdigest()[:16]
        complete_and_check(client, model_name,
                           describe_image_messages(image_url, extra_image_fields={"uuid": uuid}),
                           context="uuid first request", max_completion_tokens=10)
        cached_messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {}, "uuid": uuid}]}]
        complete_and_check(client, model_name, cached_messages, context="uuid cached",
                           max_completion_tokens=10)


def test_completions_with_empty_image_with_uuid_without_cache_hit(client, model_name):
    """vLLM test_vision.py::test_completions_with_empty_image_with_uuid_without_cache_hit."""
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, max_completion_tokens=10, messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe this image."},
                {"type": "image_url", "image_url": {}, "uuid": "uuid_not_previously_seen"}]}])


@pytest.mark.parametrize("image_urls", MULTI, indirect=True)
def test_completions_with_image_with_incorrect_uuid_format(client, model_name, image_urls):
    """vLLM test_vision.py::test_completions_with_image_with_incorrect_uuid_format."""
    for image_url in image_urls:
        messages = describe_image_messages(
            image_url, extra_image_fields={"also_incorrect_uuid_key": "x"})
        messages[1]["content"][1]["image_url"]["incorrect_uuid_key"] = "x"
        complete_and_check(client, model_name, messages, context="incorrect uuid format",
                           max_completion_tokens=10)
