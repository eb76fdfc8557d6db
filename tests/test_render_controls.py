"""How a prompt is rendered besides the plain chat: the template controls (no generation
prompt, assistant prefill, chat_template_kwargs, tools, tool turns), raw prompts for
/v1/completions and truncate_prompt_tokens, through LocalEngine.tokenize / render (the
path the API takes).

The expected ids are vLLM's own: they come from vLLM 0.32's POST /tokenize (CPU build)
serving the built-in tiny folder (`python -m engine.tiny DIR`), with the same messages."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from engine.errors import InvalidRequestError
from engine.inputs.media import MediaPolicy
from engine.types import (Conversation, GenerationRequest, ImageInput, Message,
                          SamplingParams)

SYSTEM = [912, 82, 88, 307, 575, 198, 555, 309, 256, 824, 516, 13, 913, 198]  # default system turn
USER_HELLO = [912, 84, 470, 198, 39, 291, 75, 78, 913, 198]
ASSISTANT_OPEN = [912, 64, 82, 513, 198]
WEATHER_CALL = [{"id": "call_1", "type": "function", "function": {
    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]
WEATHER_TOOL = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# name: (conversation, vLLM 0.32's /tokenize ids for the same messages and flags)
VLLM_CASES = {
    "add_generation_prompt=false": (
        Conversation([Message("user", "Hello")], add_generation_prompt=False),
        SYSTEM + USER_HELLO),
    "assistant prefill": (
        Conversation([Message("user", "Hello"), Message("assistant", "Sure, the answer is")],
                     add_generation_prompt=False, continue_final_message=True),
        SYSTEM + USER_HELLO + ASSISTANT_OPEN + [50, 366, 11, 261, 817, 273]),
    "assistant prefill as text parts": (
        Conversation([Message("user", "Hello"), Message("assistant", parts=["Sure,", " the"])],
                     add_generation_prompt=False, continue_final_message=True),
        SYSTEM + USER_HELLO + ASSISTANT_OPEN + [50, 366, 11, 261]),
    "tools, a tool call and its answer": (
        Conversation([Message("user", "Weather in Paris?"),
                      Message("assistant", "", tool_calls=WEATHER_CALL),
                      Message("tool", "sunny, 21C", tool_call_id="call_1")], tools=WEATHER_TOOL),
        SYSTEM + [912, 84, 470, 198, 54, 578, 667, 287, 220, 47, 280, 588, 30, 913, 198]
        + ASSISTANT_OPEN + [913, 198] + [912, 407, 316, 198, 82, 84, 77, 605, 11, 220, 17, 16,
                                         34, 913, 198] + ASSISTANT_OPEN),
}


def chat(conv: Conversation, **sampling) -> GenerationRequest:
    return GenerationRequest(conv, SamplingParams(**sampling))


def raw(prompt, **sampling) -> GenerationRequest:
    return GenerationRequest(Conversation(), SamplingParams(**sampling), prompt=prompt)


@pytest.mark.parametrize("name", list(VLLM_CASES))
def test_rendered_ids_equal_vllms(tiny_engine, name):
    conv, expected = VLLM_CASES[name]
    assert tiny_engine.tokenize(chat(conv)) == expected


def test_chat_template_kwargs_reach_the_template(tiny_engine):
    """add_vision_id (a variable of Qwen's template) numbers the pictures; unknown ones are
    the template's to ignore."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    picture = ImageInput("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

    def text(**kwargs) -> str:
        conv = Conversation([Message("user", "What?", images=[picture])],
                            chat_template_kwargs=kwargs)
        return tiny_engine.render(chat(conv), MediaPolicy(local_roots=())).prompt_text

    assert "Picture 1: <|vision_start|>" in text(add_vision_id=True)
    assert "Picture 1:" not in text() and text(unknown_variable=3) == text()


@pytest.mark.parametrize("kwargs, message", [
    ({"messages": []}, "unexpected chat template kwargs from request: {'messages'}"),
    ({"add_generation_prompt": False}, "{'add_generation_prompt'}"),
    ({"tools": WEATHER_TOOL}, "{'tools'}"),
    ({"chat_template": "{{ 'x' }}"}, "{'chat_template'}"),
    ({"tokenize": True}, "{'tokenize'}"),
])
def test_chat_template_kwargs_may_not_override_our_own(tiny_engine, kwargs, message):
    conv = Conversation([Message("user", "Hi")], chat_template_kwargs=kwargs)
    with pytest.raises(InvalidRequestError, match=message) as exc:
        tiny_engine.tokenize(chat(conv))
    assert exc.value.code == 400 and exc.value.param == "chat_template_kwargs"


def test_both_generation_prompt_and_prefill_refused_in_vllms_words(tiny_engine):
    conv = Conversation([Message("user", "Hi"), Message("assistant", "x")],
                        continue_final_message=True)
    with pytest.raises(InvalidRequestError, match="Cannot set both `continue_final_message` "
                                                  "and `add_generation_prompt` to True."):
        tiny_engine.tokenize(chat(conv))


def test_prefill_is_continued(tiny_engine):
    """The answer to an assistant prefill continues the open assistant message: greedy, its
    first tokens are what the model says after that prefix when the prompt is given raw."""
    conv, ids = VLLM_CASES["assistant prefill"]
    prefilled, _ = tiny_engine.generate(chat(conv, max_tokens=6, temperature=0), timeout=60)
    as_raw, _ = tiny_engine.generate(raw(ids, max_tokens=6, temperature=0), timeout=60)
    assert prefilled == as_raw


# --------------------------------------------------------------------------- raw prompts
def test_raw_text_prompt_is_tokenized_without_the_template(tiny_engine):
    text = "There are 3 shapes:"
    prompt = tiny_engine.render(raw(text))
    assert prompt.inputs["input_ids"][0].tolist() == tiny_engine.tokenizer.encode(text)
    assert prompt.prompt_text == text and prompt.images == 0 and prompt.media == []
    assert tiny_engine.tokenize(raw(text)) == tiny_engine.tokenize(text)


def test_raw_ids_are_taken_as_given_and_answer_as_the_text(tiny_engine):
    text = "There are 3 shapes:"
    ids = tiny_engine.tokenizer.encode(text)
    assert tiny_engine.tokenize(raw(ids)) == ids
    by_ids, fin = tiny_engine.generate(raw(ids, max_tokens=5, temperature=0,
                                           ignore_eos=True), timeout=60)
    by_text, _ = tiny_engine.generate(raw(text, max_tokens=5, temperature=0,
                                          ignore_eos=True), timeout=60)
    assert by_ids == by_text and fin.stats.prompt_tokens == len(ids)


@pytest.mark.parametrize("prompt, message", [
    ([1, 2, 10**6], "Token id 1000000 is out of vocabulary"),
    ([5, -1], "Token id -1 is out of vocabulary"),
    ("", "must be provided and non-empty"),
])
def test_bad_raw_prompts_refused(tiny_engine, prompt, message):
    with pytest.raises(InvalidRequestError, match=message) as exc:
        tiny_engine.render(raw(prompt))
    assert exc.value.code == 400


def test_raw_prompt_context_check_as_for_chats(tiny_engine):
    limit = tiny_engine.max_model_len
    with pytest.raises(InvalidRequestError, match=f"maximum context length is {limit}"):
        tiny_engine.render(raw([39] * limit))
    capped = tiny_engine.render(raw([39] * (limit - 3), max_tokens=50, cap_to_context=True))
    assert capped.max_new_tokens == 3


# --------------------------------------------------------------------------- truncation
def test_truncate_keeps_the_last_k_tokens(tiny_engine):
    conv = Conversation([Message("user", "How many shapes are there?")])
    full = tiny_engine.tokenize(chat(conv))
    kept = tiny_engine.render(chat(conv, truncate_prompt_tokens=7))
    assert kept.inputs["input_ids"][0].tolist() == full[-7:] and kept.prompt_tokens == 7
    assert kept.inputs["attention_mask"].shape == (1, 7)
    assert kept.prompt_text == tiny_engine.tokenizer.decode(full[-7:])
    ids = list(range(100, 130))
    assert tiny_engine.tokenize(raw(ids, truncate_prompt_tokens=4)) == ids[-4:]
    assert tiny_engine.tokenize(raw(ids, truncate_prompt_tokens=100)) == ids


def test_truncate_minus_one_keeps_what_fits(tiny_engine):
    """-1: all but one token of the context (one is left to generate), vLLM's meaning."""
    limit = tiny_engine.max_model_len
    prompt = tiny_engine.render(raw(list(range(100, 110)) * (limit // 10 + 5),
                                    truncate_prompt_tokens=-1, cap_to_context=True))
    assert prompt.prompt_tokens == limit - 1 and prompt.max_new_tokens == 1


@pytest.mark.parametrize("k, message", [
    (0, "The decoder prompt cannot be empty"),
    (10**6, "truncate_prompt_tokens=1000000 cannot be greater than max_model_len"),
])
def test_truncate_out_of_range_refused(tiny_engine, k, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny_engine.render(raw("Hello there", truncate_prompt_tokens=k))


def test_truncate_never_cuts_a_picture(tiny_engine):
    """Only text before the first picture may go: a cut inside (or past the start of) a
    picture's tokens is a 400 naming it; a cut just before it keeps it whole."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, "PNG")
    picture = ImageInput("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    conv = Conversation([Message("user", parts=["Look at this picture: ", picture, "What?"])])
    policy = MediaPolicy(local_roots=())
    whole = tiny_engine.render(chat(conv), policy)
    n, span = whole.prompt_tokens, whole.media[0]
    with pytest.raises(InvalidRequestError, match=r"would split or drop a\(n\) image item, "
                                                  rf"which spans tokens {span.start} to "
                                                  rf"{span.end} of the {n}-token prompt"):
        tiny_engine.render(chat(conv, truncate_prompt_tokens=n - span.start - 1), policy)
    kept = tiny_engine.render(chat(conv, truncate_prompt_tokens=n - span.start), policy)
    assert kept.inputs["input_ids"][0].tolist() == \
        whole.inputs["input_ids"][0].tolist()[span.start:]
    assert kept.media[0].start == 0 and kept.media[0].end == span.end - span.start
    answer, fin = tiny_engine.generate(chat(conv, truncate_prompt_tokens=n - span.start,
                                            max_tokens=3), policy=policy, timeout=60)
    assert fin.reason in ("stop", "length") and fin.stats.prompt_tokens == n - span.start
