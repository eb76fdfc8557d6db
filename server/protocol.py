"""The wire format of the OpenAI-compatible API, as vLLM's
entrypoints/openai/protocol.py defines it: request models that validate what
clients send, and response models whose JSON matches `vllm serve` field for
field (raw vLLM 0.32 responses in tests/data/vllm-0.32/)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.errors import InvalidRequestError, error_dict
from engine.types import SamplingParams

# ----------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    """Unknown fields are ignored, as vLLM does (clients send vendor extras)."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class MediaURL(_Lenient):
    url: str
    detail: str | None = None


class ImageURLPart(_Lenient):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(_Lenient):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[Union[TextPart, ImageURLPart, VideoURLPart], Field(discriminator="type")]
PART_TYPES = ("text", "image_url", "video_url")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, value: Any) -> Any:
        """One clear error for an unsupported part (audio, input_image, ...) instead of
        pydantic's three union-branch errors."""
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in PART_TYPES:
                    raise ValueError(f"content part {i} has unsupported type {kind!r}; "
                                     f"supported: {', '.join(PART_TYPES)}")
        return value


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class MMProcessorKwargs(BaseModel):
    """The per-request image resolution bounds of Qwen2.5-VL's processor."""

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None


class SamplingFields(_Lenient):
    """The sampling and output fields /v1/chat/completions and /v1/completions share, with
    vLLM's names and defaults. Ranges are checked by the engine (engine.inputs.validation),
    for every front end alike."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int | None = 1
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def top_logprob_count(self) -> int | None:
        """The engine's `logprobs`: None for none, else how many top candidates per token."""
        return None

    def sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams for these fields (validated by the engine)."""
        return SamplingParams(
            max_tokens=self.effective_max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=parse_logit_bias(self.logit_bias), seed=self.seed, stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids or []), bad_words=list(self.bad_words or []),
            allowed_token_ids=self.allowed_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, n=self.n or 1,
            logprobs=self.top_logprob_count, prompt_logprobs=self.prompt_logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            cap_to_context=True)   # as vLLM 0.32: max_tokens is lowered to what fits the context


def parse_logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) with integer keys; a key that is
    not an integer is a 400 naming it."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"logit_bias keys must be token ids (integers), got {key!r}.",
                                      param="logit_bias") from None
    return out


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @property
    def effective_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over the deprecated `max_tokens`, as in vLLM."""
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: a `prompt` text (special tokens added by default) or chat `messages`
    (rendered as the model sees them, the assistant's turn opened)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    mm_processor_kwargs: MMProcessorKwargs | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# vLLM's ChatCompletionRequest fields this server does not honour yet, each with the value
# that means "not used" in vLLM (None is always taken as not used). A request that sets one
# to anything else is refused with a 400 naming it, never accepted and ignored.
NOT_HONOURED: dict[str, Any] = {
    "response_format": None, "structured_outputs": None, "guided_json": None,
    "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "tool_choice": "none", "parallel_tool_calls": None, "functions": None,
    "function_call": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
    "min_p": 0, "stop_token_ids": [], "bad_words": [], "allowed_token_ids": [],
    "include_stop_str_in_output": False, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "prompt_logprobs": None, "top_logprobs": 0, "use_beam_search": False,
    "length_penalty": 1, "best_of": None, "echo": False, "add_generation_prompt": True,
    "continue_final_message": False, "chat_template": None, "chat_template_kwargs": {},
    "media_io_kwargs": {}, "documents": None, "logits_processors": None,
    "return_tokens_as_token_ids": False, "return_token_ids": False, "vllm_xargs": None,
    "priority": 0, "cache_salt": None, "kv_transfer_params": None, "prompt_embeds": None,
    "request_id": None,
}
NOT_HONOURED_STREAM_OPTIONS = {"continuous_usage_stats": False}


def not_honoured(data: Any) -> list[str]:
    """The fields of a raw request body that ask for something this server does not do."""
    if not isinstance(data, dict):
        return []
    asked = [name for name, unused in NOT_HONOURED.items()
             if name in data and data[name] is not None and data[name] != unused]
    options = data.get("stream_options")
    if isinstance(options, dict):
        asked += [f"stream_options.{name}" for name, unused in NOT_HONOURED_STREAM_OPTIONS.items()
                  if options.get(name) not in (None, unused)]
    return asked


def unknown_fields(data: Any) -> list[str]:
    """Top-level fields that neither vLLM's request nor ours defines (vendor extras)."""
    if not isinstance(data, dict):
        return []
    known = set(ChatCompletionRequest.model_fields) | set(NOT_HONOURED)
    return sorted(k for k in data if k not in known)


# ----------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:16]}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None
    reasoning: None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    service_tier: None = None
    system_fingerprint: None = None
    usage: UsageInfo
    prompt_logprobs: None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None

    def sse(self) -> str:
        """One Server-Sent Event: `usage` only on the include_usage chunk and the
        role only in the first delta, as vLLM sends them."""
        data = self.model_dump()
        if self.usage is None:
            del data["usage"]
        else:
            data["usage"].pop("prompt_tokens_details", None)
        for choice in data["choices"]:
            if choice["delta"]["role"] is None:
                del choice["delta"]["role"]
        return sse_data(data)


def sse_data(data: Any) -> str:
    """`data: <json>` plus the blank line that ends an event (UTF-8, like vLLM)."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwen-vl-npu-demo"
    root: str
    parent: str | None = None
    max_model_len: int
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


error_body = error_dict   # vLLM's nested error shape; the HTTP status is always `code`
