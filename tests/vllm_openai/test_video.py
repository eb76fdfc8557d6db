"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_video.py.

Changes: the sync client; the served model instead of llava-onevision; generated clips (same
names, containers and frame sizes, 2 s at 8 fps) as data: URIs instead of downloads; the
hard-coded prompt size of llava-onevision (6287 tokens) replaced by the usage invariants.
"""

from __future__ import annotations

import openai
import pytest

from .conftest import MAXIMUM_VIDEOS, TEST_VIDEO_URLS


def dummy_messages_from_video_url(video_urls, content_text: str = "What's in this video?"):
    if isinstance(video_urls, str):
        video_urls = [video_urls]
    return [{"role": "user", "content": [
        *({"type": "video_url", "video_url": {"url": u}} for u in video_urls),
        {"type": "text", "text": content_text}]}]


def _single_session(client, model_name, url):
    messages = dummy_messages_from_video_url(url)
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=10, logprobs=True,
        temperature=0.0, top_logprobs=5,
        extra_body={"min_tokens": 10})  # the tiny model stops early; vLLM's test expects 10
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason == "length"
    usage = chat_completion.usage
    assert usage.completion_tokens == 10 and usage.prompt_tokens > 0  # vLLM: exactly 6287
    assert usage.total_tokens == usage.prompt_tokens + 10
    message = choice.message
    assert message.content is not None and len(message.content) >= 1  # vLLM: >= 10 chars
    assert message.role == "assistant"
    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    chat_completion = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=10)
    assert chat_completion.choices[0].message.content is not None


@pytest.mark.parametrize("video", TEST_VIDEO_URLS)
def test_single_chat_session_video(client, model_name, video, video_assets):
    """vLLM test_video.py::test_single_chat_session_video."""
    _single_session(client, model_name, video_assets[video])


@pytest.mark.parametrize("video", TEST_VIDEO_URLS[:1])
def test_request_media_io_kwargs_override_uses_fewer_video_frames(client, model_name, video,
                                                                  video_assets):
    """vLLM test_video.py::test_request_media_io_kwargs_override_uses_fewer_video_frames."""
    messages = dummy_messages_from_video_url(video_assets[video])
    default_resp = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=1, temperature=0.0)
    override_resp = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=1, temperature=0.0,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
    assert override_resp.usage.prompt_tokens < default_resp.usage.prompt_tokens


@pytest.mark.parametrize("video", TEST_VIDEO_URLS[:1])
def test_invalid_num_frames_request_recoverable(client, model_name, video, video_assets):
    """vLLM test_video.py::test_invalid_num_frames_request_recoverable."""
    messages = dummy_messages_from_video_url(video_assets[video])
    with pytest.raises((openai.BadRequestError, openai.APIStatusError)):
        client.chat.completions.create(
            model=model_name, messages=messages, max_completion_tokens=1, temperature=0.0,
            extra_body={"media_io_kwargs": {"video": {"num_frames": "invalid"}}})
    recovery = client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=1, temperature=0.0)
    assert recovery.choices[0].message.content is not None


@pytest.mark.parametrize("video", TEST_VIDEO_URLS)
def test_error_on_invalid_video_url_type(client, model_name, video, video_assets):
    """vLLM test_video.py::test_error_on_invalid_video_url_type."""
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": video_assets[video]},
        {"type": "text", "text": "What's in this video?"}]}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=messages,
                                       max_completion_tokens=10, temperature=0.0)


@pytest.mark.parametrize("video", TEST_VIDEO_URLS)
def test_single_chat_session_video_beamsearch(client, model_name, video, video_assets):
    """vLLM test_video.py::test_single_chat_session_video_beamsearch."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=dummy_messages_from_video_url(video_assets[video]), n=2,
        max_completion_tokens=10, logprobs=True, top_logprobs=5,
        extra_body=dict(use_beam_search=True))
    assert len(chat_completion.choices) == 2
    assert chat_completion.choices[0].message.content != chat_completion.choices[1].message.content


@pytest.mark.parametrize("video", TEST_VIDEO_URLS)
def test_single_chat_session_video_base64encoded(client, model_name, video, video_assets):
    """vLLM test_video.py::test_single_chat_session_video_base64encoded (vLLM sends the frames
    as its own video/jpeg data: URI; here the clip's file; the URL variant above sends the same,
    since nothing may be downloaded)."""
    _single_session(client, model_name, video_assets[video])


@pytest.mark.parametrize("video", TEST_VIDEO_URLS)
def test_single_chat_session_video_base64encoded_beamsearch(client, model_name, video,
                                                            video_assets):
    """vLLM test_video.py::test_single_chat_session_video_base64encoded_beamsearch."""
    chat_completion = client.chat.completions.create(
        model=model_name, messages=dummy_messages_from_video_url(video_assets[video]), n=2,
        max_completion_tokens=10, extra_body=dict(use_beam_search=True))
    assert len(chat_completion.choices) == 2
    assert chat_completion.choices[0].message.content != chat_completion.choices[1].message.content


@pytest.mark.parametrize("video", TEST_VIDEO_URLS)
def test_chat_streaming_video(client, model_name, video, video_assets):
    """vLLM test_video.py::test_chat_streaming_video."""
    messages = dummy_messages_from_video_url(video_assets[video])
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
    assert delta.content
    assert "".join(chunks) == output


@pytest.mark.parametrize("videos", [TEST_VIDEO_URLS[:i] for i in range(2, len(TEST_VIDEO_URLS))])
def test_multi_video_input(client, model_name, videos, video_assets):
    """vLLM test_video.py::test_multi_video_input."""
    messages = dummy_messages_from_video_url([video_assets[v] for v in videos])
    if len(videos) > MAXIMUM_VIDEOS:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model_name, messages=messages,
                                           max_completion_tokens=10, temperature=0.0)
        completion = client.completions.create(model=model_name, prompt=[0, 0, 0, 0, 0],
                                               max_tokens=5, temperature=0.0)
        assert completion.choices[0].text is not None
    else:
        chat_completion = client.chat.completions.create(
            model=model_name, messages=messages, max_completion_tokens=10, temperature=0.0)
        assert chat_completion.choices[0].message.content is not None
