"""The wire format of the OpenAI-compatible API, as vLLM's
entrypoints/openai/protocol.py defines it: request models that validate what
clients send, and response models whose JSON matches `vllm serve` field for
field (raw vLLM 0.32 responses in tests/data/vllm-0.32/)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, field_validator, model_serializer,
                      model_validator)

from engine.errors import InvalidRequestError, error_dict
from engine.types import SamplingParams, StructuredOutput, TokenLogprob, TopLogprob

from . import tools as toolcalls

# ----------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    """Unknown fields are ignored, as vLLM does (clients send vendor extras)."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class MediaURL(_Lenient):
    url: str | None = None
    detail: str | None = None


class _MediaPart(_Lenient):
    """An image_url or video_url part. vLLM's `uuid` names the item: a later part may send
    an empty URL ({} or null) with the same uuid to reuse what was sent under it."""

    uuid: str | None = None

    @field_validator("uuid", mode="before")
    @classmethod
    def _uuid_as_text(cls, value: Any) -> Any:
        """vLLM takes any JSON scalar as a uuid, as its text."""
        return value if value is None or isinstance(value, str) else str(value)

    def media_url(self) -> str | None:
        """The part's URL; None only where a uuid stands for it."""
        media = getattr(self, self.type)
        return media.url if media is not None else None

    @model_validator(mode="after")
    def _url_or_uuid(self) -> "_MediaPart":
        if self.uuid is None and self.media_url() is None:   # pydantic's words, as vLLM
            raise ValueError(f"{self.type}.url: Field required (or a uuid sent before)")
        return self


class ImageURLPart(_MediaPart):
    type: Literal["image_url"]
    image_url: MediaURL | None


class VideoURLPart(_MediaPart):
    type: Literal["video_url"]
    video_url: MediaURL | None


ContentPart = Annotated[Union[TextPart, ImageURLPart, VideoURLPart], Field(discriminator="type")]
PART_TYPES = ("text", "image_url", "video_url")


class ChatMessage(_Lenient):
    """One OpenAI message. A "tool" turn answers the call `tool_call_id` names; an assistant
    turn may carry the `tool_calls` it made. Both reach the chat template as they are, and so
    does any other role (vLLM's custom roles: the template decides what it means)."""

    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text_parts(self) -> list[str]:
        """The message's text, part by part (a string content is one part)."""
        if isinstance(self.content, str):
            return [self.content]
        return [p.text for p in self.content or [] if isinstance(p, TextPart)]

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
    continuous_usage_stats: bool | None = False


class MMProcessorKwargs(BaseModel):
    """The per-request image resolution bounds of Qwen2.5-VL's processor."""

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None


class JsonSchemaFormat(_Lenient):
    """response_format's `json_schema`: OpenAI's `schema` (held as json_schema, as vLLM)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Lenient):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object.
    The answer never has free whitespace and objects never take properties their schema does
    not list, so disable_any_whitespace and disable_additional_properties hold either way."""

    json_: Union[str, dict[str, Any], None] = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


def structured_output(params: StructuredOutputsParams | None,
                      response_format: ResponseFormat | None) -> StructuredOutput | None:
    """vLLM's structured_outputs_from_response_format: response_format's constraint replaces
    the same field of structured_outputs; then exactly one constraint, in vLLM's words."""
    fields: dict[str, Any] = {}
    if params is not None:
        fields = {"json": params.json_, "regex": params.regex, "choice": params.choice,
                  "grammar": params.grammar, "json_object": params.json_object}
    if response_format is not None and response_format.type != "text":
        if params is None:
            fields = dict.fromkeys(("json", "regex", "choice", "grammar", "json_object"))
        if response_format.type == "json_object":
            fields["json_object"] = True
        else:
            fields["json"] = response_format.json_schema.json_schema
    if not fields:
        return None
    count = sum(v is not None for v in fields.values())
    if count != 1:
        shown = {**fields, "disable_any_whitespace": False,
                 "disable_additional_properties": False, "whitespace_pattern": None,
                 "structural_tag": None, "_backend": None, "_backend_was_auto": False}
        raise InvalidRequestError(
            "You can only use one kind of structured outputs constraint but multiple are "
            f"specified: {shown}" if count else "You must use one kind of structured outputs "
            f"constraint but none are specified: {shown}")
    choice = fields["choice"]
    return StructuredOutput(json=fields["json"], json_object=bool(fields["json_object"]),
                            regex=fields["regex"], grammar=fields["grammar"],
                            choice=tuple(choice) if choice is not None else None)


_NO_STRUCTURAL_TAGS = "structural tags are not supported; use json, regex, choice or grammar"


def check_structured_body(data: dict) -> None:
    """vLLM's raw-body checks of response_format and structured_outputs, in its order and
    words; the options this server does not have (structural tags, a whitespace pattern) are
    refused by name rather than ignored."""
    response_format = data.get("response_format")
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_schema" \
                and response_format.get("json_schema") is None:
            raise vllm_invalid("When response_format type is 'json_schema', the 'json_schema' "
                               "field must be provided.", "response_format")
        if response_format.get("type") == "structural_tag":
            raise vllm_invalid(_NO_STRUCTURAL_TAGS, "response_format")
    params = data.get("structured_outputs")
    if not isinstance(params, dict):
        return
    for name in ("structural_tag", "whitespace_pattern"):
        if params.get(name) is not None:
            raise vllm_invalid(f"structured_outputs.{name} is not supported; the answer has no "
                               "free whitespace and no structural tags", "structured_outputs")
    count = sum(params.get(k) is not None for k in ("json", "regex", "choice"))
    if count > 1:
        raise InvalidRequestError("You can only use one kind of constraints for structured "
                                  "outputs ('json', 'regex' or 'choice').")
    if count and data.get("tool_choice", "none") not in ("none", "auto", "required"):
        raise InvalidRequestError("You can only either use constraints for structured outputs "
                                  "or tools, not both.")


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
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)   # pydantic's words, as vLLM
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
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    request_id: str | None = None
    return_token_ids: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk: vLLM asks for include_usage too."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

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

    def structured(self) -> StructuredOutput | None:
        """The answer's constraint, from response_format and structured_outputs."""
        return structured_output(self.structured_outputs, self.response_format)

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
            truncation_side=self.truncation_side or "left", structured=self.structured(),
            use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
            cap_to_context=True)   # as vLLM 0.32: max_tokens is lowered to what fits the context


# The sampling fields vLLM's beam search ignores (its BeamSearchParams carries none of them),
# each with the values that mean "not set". Beside use_beam_search any other value is refused
# with a 400 naming it, never accepted and ignored.
BEAM_IGNORES: dict[str, tuple[Any, ...]] = {
    "stop": (None, [], ""), "stop_token_ids": (None, []), "min_tokens": (0,),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "top_p": (None, 1), "top_k": (None, 0, -1),
    "min_p": (None, 0), "seed": (None,), "logit_bias": (None, {}), "bad_words": (None, []),
    "allowed_token_ids": (None,), "prompt_logprobs": (None,),
    "spaces_between_special_tokens": (True,),
}


def check_beam_fields(req: SamplingFields, constraint_fields: tuple[str, ...]) -> None:
    """With use_beam_search: a 400 naming every field set that beam search would ignore
    (`constraint_fields`: the request's fields that constrain the answer's form, since a
    structured output is ignored there too); without it, a length_penalty that could only
    be ignored."""
    if not req.use_beam_search:
        if req.length_penalty != 1:
            raise InvalidRequestError("length_penalty only applies with use_beam_search; "
                                      "refused rather than ignored.", param="length_penalty")
        return
    fields = req.model_dump(include=set(BEAM_IGNORES))
    ignored = [name for name, unset in BEAM_IGNORES.items() if fields[name] not in unset]
    if req.structured() is not None:
        ignored += [name for name in constraint_fields if name in req.model_fields_set]
    if ignored:
        raise InvalidRequestError(
            f"{', '.join(ignored)}: not supported with beam search (vLLM's beam search ignores "
            f"{'it' if len(ignored) == 1 else 'them'}); refused rather than ignored.",
            param=ignored[0])


LOGIT_BIAS_LIMIT = 100.0   # vLLM clamps every bias into [-100, 100]


def parse_logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) with integer keys and values
    clamped as vLLM clamps them; keys that are not integers are one 400 in vLLM's words."""
    out: dict[int, float] = {}
    invalid: list[str] = []
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
        except (TypeError, ValueError):
            invalid.append(key)
    if invalid:
        raise InvalidRequestError("logit_bias contains key(s) that cannot be converted to "
                                  f"integer token IDs: {invalid!r} (parameter=logit_bias, "
                                  f"value={invalid!r})", param="logit_bias")
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
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = True

    @property
    def tool_mode(self) -> str | dict[str, Any]:
        """What the answer does with the tools: "none", "auto", "required" or the named
        choice. Tools without a tool_choice mean "auto", as in vLLM."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice

    def structured(self) -> StructuredOutput | None:
        """A forced tool call's schema replaces any other constraint (vLLM's); else
        response_format and structured_outputs."""
        schema = toolcalls.tool_schema(self.tools or [], self.tool_mode,
                                       self.parallel_tool_calls)
        return StructuredOutput(json=schema) if schema is not None else super().structured()

    @property
    def effective_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over the deprecated `max_tokens`, as in vLLM."""
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def response_role(self) -> str:
        """The answer's role: the assistant's, or, without a generation prompt, the last
        message's (vLLM's get_chat_request_role)."""
        if self.add_generation_prompt or not self.messages:
            return "assistant"
        return self.messages[-1].role

    def echo_text(self) -> str:
        """What echo prepends: the last message's text when it has the answer's role
        (text parts joined by newlines, as vLLM joins them), else nothing."""
        if not self.echo or not self.messages or self.messages[-1].role != self.response_role:
            return ""
        return "\n".join(self.messages[-1].text_parts())

    def sampling_params(self) -> SamplingParams:
        """As SamplingFields; echo without prompt_logprobs asks for the prompt's logprobs
        with `top_logprobs` candidates, as vLLM does (they come back in the JSON answer; a
        stream has no place for them, so it does not ask)."""
        params = super().sampling_params()
        if self.echo and self.prompt_logprobs is None and not self.stream:
            params = dataclasses.replace(params, prompt_logprobs=self.top_logprobs or 0)
        if self.tool_mode != "none":   # <tool_call> may be a special token (vLLM's hermes)
            params = dataclasses.replace(params, skip_special_tokens=False)
        return params


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


# vLLM's ChatCompletionRequest fields this server does not honour, each with the value that
# means "not used" in vLLM (None is always taken as not used) and why it is refused. A request
# that sets one to anything else is refused with a 400 naming it, never accepted and ignored.
_GUIDED = "vLLM 0.32 no longer reads the guided_* fields; use structured_outputs"
_FUNCTIONS = "the legacy functions API is not supported; use tools and tool_choice"
NOT_HONOURED: dict[str, tuple[Any, str]] = {
    "guided_json": (None, _GUIDED), "guided_regex": (None, _GUIDED),
    "guided_choice": (None, _GUIDED), "guided_grammar": (None, _GUIDED),
    "guided_decoding_backend": (None, _GUIDED), "guided_whitespace_pattern": (None, _GUIDED),
    "functions": (None, _FUNCTIONS), "function_call": (None, _FUNCTIONS),
    "best_of": (None, "best_of is not supported (vLLM's V1 engine dropped it too)"),
    "chat_template": (None, "a chat template from the request is not trusted; the model's "
                            "own is used"),
    "documents": (None, "documents are not passed to the chat template"),
    "media_io_kwargs": ({}, "per-request media loading options are not supported"),
    "logits_processors": (None, "custom logits processors are not supported"),
    "logprob_token_ids": (None, "logprobs of chosen token ids are not supported; use "
                                "top_logprobs"),
    "return_tokens_as_token_ids": (False, "tokens as 'token_id:N' strings are not supported"),
    "vllm_xargs": (None, "extension arguments are not supported"),
    "priority": (0, "priority scheduling is not enabled"),
    "cache_salt": (None, "prefix-cache salting is not supported"),
    "kv_transfer_params": (None, "disaggregated prefill is not supported"),
    "ec_transfer_params": (None, "disaggregated encoding is not supported"),
    "prompt_embeds": (None, "prompt embeddings are not supported"),
    "thinking_token_budget": (None, "reasoning budgets are not supported"),
    "repetition_detection": (None, "repetition detection is not supported"),
    "watermarking": (False, "watermarking is not supported"),
    "return_prompt_text": (False, "returning the rendered prompt text is not supported"),
}


def not_honoured(data: Any, table: dict[str, tuple[Any, str]] | None = None
                 ) -> list[tuple[str, str]]:
    """The fields of a raw request body that ask for something this server does not do,
    each with the reason (`table`: an endpoint's own list, default the chat's)."""
    if not isinstance(data, dict):
        return []
    return [(name, why) for name, (unused, why) in (table or NOT_HONOURED).items()
            if data.get(name) is not None and data[name] != unused]


def unknown_fields(data: Any) -> list[str]:
    """Top-level fields that neither vLLM's request nor ours defines (vendor extras)."""
    if not isinstance(data, dict):
        return []
    known = set(ChatCompletionRequest.model_fields) | set(NOT_HONOURED)
    return sorted(k for k in data if k not in known)


def vllm_invalid(message: str, param: str | None = None, value: Any = None) -> InvalidRequestError:
    """vLLM's VLLMValidationError text: the message, then the parameter (and value)."""
    extras = ([f"parameter={param}"] if param else []) + \
        ([f"value={value}"] if value is not None else [])
    return InvalidRequestError(f"{message} ({', '.join(extras)})" if extras else message,
                               param=param)


def check_logprob_fields(data: dict) -> None:
    """vLLM's check_logprobs on a raw body, in its order and words."""
    for name in ("prompt_logprobs", "top_logprobs"):
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise vllm_invalid(f"`{name}` must be an integer.", name, value)
    prompt_logprobs = data.get("prompt_logprobs")
    if prompt_logprobs is not None:
        if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise vllm_invalid("`prompt_logprobs` are not available when `stream=True`.",
                               "prompt_logprobs")
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise vllm_invalid("`prompt_logprobs` must be a positive value or -1.",
                               "prompt_logprobs", prompt_logprobs)
    top_logprobs = data.get("top_logprobs")
    if top_logprobs is not None:
        if top_logprobs < 0 and top_logprobs != -1:
            raise vllm_invalid("`top_logprobs` must be a positive value or -1.", "top_logprobs",
                               top_logprobs)
        if (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
            raise vllm_invalid("when using `top_logprobs`, `logprobs` must be set to true.",
                               "top_logprobs")


def check_chat_body(data: Any) -> None:
    """vLLM's request validators that read the raw body, in its order and words: stream
    options, logprobs, tools, and the generation prompt against continue_final_message."""
    if not isinstance(data, dict):
        return
    if data.get("stream_options") and not data.get("stream"):
        raise vllm_invalid("Stream options can only be defined when `stream=True`.",
                           "stream_options")
    check_logprob_fields(data)
    check_structured_body(data)
    toolcalls.check_tool_usage(data)
    if data.get("continue_final_message"):
        if data.get("add_generation_prompt"):
            raise InvalidRequestError("Cannot set both `continue_final_message` and "
                                      "`add_generation_prompt` to True.",
                                      param="continue_final_message")
        if "add_generation_prompt" not in data:   # left at its default, True (transformers' words)
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt are not compatible. Use "
                "continue_final_message when you want the model to continue the final "
                "message, and add_generation_prompt when you want to add a header that will "
                "prompt it to start a new assistant message instead.")


# ----------------------------------------------------------------------------- responses


def completion_id(request_id: str | None = None) -> str:
    """The answer's id: vLLM's `chatcmpl-` and the client's request id, else a random one."""
    return f"chatcmpl-{request_id or uuid.uuid4().hex[:16]}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: None = None


def usage_info(prompt_tokens: int, completion_tokens: int,
               details: dict[str, Any] | None = None) -> UsageInfo:
    """Usage of a whole answer: the prompt once, the tokens of every choice (vLLM's sum)."""
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=details)


def prompt_tokens_details(cached_tokens: int | None,
                          multimodal_tokens: dict[str, int] | None = None) -> dict | None:
    """vLLM's PromptTokenUsageInfo (--enable-prompt-tokens-details): the prompt tokens whose
    KV came from the prefix cache, and the prompt's placeholder tokens per modality; None
    when neither is known (a beam search reports no cached tokens, as vLLM's). Tokens written
    to the cache are not counted here (created_cache_tokens null)."""
    if cached_tokens is None and not multimodal_tokens:
        return None
    return {"cached_tokens": cached_tokens, "created_cache_tokens": None,
            "multimodal_tokens": multimodal_tokens or None}


def usage_without_nulls(usage: dict) -> dict:
    """A stream's usage as vLLM dumps it there: null fields left out, within
    prompt_tokens_details too."""
    out = {k: v for k, v in usage.items() if v is not None}
    if isinstance(out.get("prompt_tokens_details"), dict):
        out["prompt_tokens_details"] = {k: v for k, v in out["prompt_tokens_details"].items()
                                        if v is not None}
    return out


def continuous_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage every chunk carries with continuous_usage_stats: one choice's tokens so far."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "completion_tokens_details": None}


def final_usage(usage: UsageInfo) -> dict:
    """The include_usage chunk's usage: vLLM drops its null fields there."""
    return usage_without_nulls(usage.model_dump())


# ----------------------------------------------------------------------------- logprobs
MIN_LOGPROB = -9999.0   # vLLM sends -inf (a token the request's settings forbid) as this


def clamp_logprob(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


def token_bytes(token: str) -> list[int]:
    """A token's text as UTF-8 bytes (a lone surrogate replaced), as vLLM's `bytes`."""
    return list(token.encode("utf-8", errors="replace"))


def ranked_candidates(chosen: TokenLogprob, count: int) -> list[TopLogprob]:
    """The candidates vLLM lists at a position: its logprob dict holds the chosen token
    first and then the top ones (the chosen one once), and the first `count` are listed.
    So a sampled token outside the top `count` leads the list; a greedy one is the top.
    -1: all the engine gave."""
    seen: dict[int, TopLogprob] = {chosen.token_id: chosen}
    for candidate in chosen.top:
        seen.setdefault(candidate.token_id, candidate)
    ranked = list(seen.values())
    return ranked if count == -1 else ranked[:max(count, 0)]


def chat_logprob(entry: TokenLogprob, count: int) -> dict:
    """One generated token in a chat answer's `logprobs.content`."""
    return {"token": entry.token, "logprob": clamp_logprob(entry.logprob),
            "bytes": token_bytes(entry.token),
            "top_logprobs": [{"token": c.token, "logprob": clamp_logprob(c.logprob),
                              "bytes": token_bytes(c.token)}
                             for c in ranked_candidates(entry, count)]}


def chat_logprobs(entries: list[TokenLogprob] | None, count: int) -> dict:
    """A choice's (or a chunk's) `logprobs`: {"content": [...]} for its tokens."""
    return {"content": [chat_logprob(e, count) for e in entries or []]}


def prompt_logprobs_json(entries: list[TokenLogprob | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob,
    rank, decoded_token}}, the prompt's own token first, then the top candidates."""
    if entries is None:
        return None
    out: list[dict[str, dict] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked: dict[str, dict] = {str(entry.token_id): _prompt_entry(entry, entry.rank)}
        for rank, candidate in enumerate(entry.top, 1):
            ranked.setdefault(str(candidate.token_id), _prompt_entry(candidate, rank))
        out.append(ranked)
    return out


def _prompt_entry(candidate: TopLogprob, rank: int) -> dict:
    return {"logprob": clamp_logprob(candidate.logprob), "rank": rank,
            "decoded_token": candidate.token}


# ----------------------------------------------------------------------------- chat answers
class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = ""
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reasoning: None = None

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler: Any) -> dict:
        """`tool_calls` only when there are some, as vLLM's ChatMessage."""
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    routed_experts: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    service_tier: None = None
    system_fingerprint: None = None
    usage: UsageInfo
    prompt_logprobs: list[dict[str, dict] | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: None = None
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    metrics: None = None


class ChunkWriter:
    """The chat.completion.chunk events of one answer, each with exactly the keys vLLM 0.32
    sends in that place (it dumps chunks with exclude_unset): the role chunk, echo chunks,
    token chunks (logprobs and token_ids keys always, stop_reason only when finished), the
    usage chunk. `usage` is a continuous-usage dict or None."""

    def __init__(self, cid: str, created: int, model: str) -> None:
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created,
                     "model": model}

    def _event(self, choice: dict | None, usage: dict | None = None, **extra: Any) -> str:
        data = {**self.head, "choices": [] if choice is None else [choice]}
        if usage is not None:
            data["usage"] = usage
        return sse_data({**data, **extra})

    def role(self, index: int, role: str, usage: dict | None,
             prompt_token_ids: list[int] | None) -> str:
        choice = {"index": index, "delta": {"role": role, "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._event(choice, usage, prompt_token_ids=prompt_token_ids, prompt_text=None)

    def echo(self, index: int, text: str, usage: dict | None) -> str:
        choice = {"index": index, "delta": {"content": text}, "logprobs": None,
                  "finish_reason": None}
        return self._event(choice, usage)

    def tokens(self, index: int, delta: dict, logprobs: dict | None,
               token_ids: list[int] | None, usage: dict | None, finish_reason: str | None = None,
               stop_reason: int | str | None = None) -> str:
        """A chunk of new output: `delta` is {"content": text}, or tool-call deltas."""
        choice: dict[str, Any] = {"index": index, "delta": delta,
                                  "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        choice["token_ids"] = token_ids
        return self._event(choice, usage)

    def usage(self, usage: UsageInfo) -> str:
        return self._event(None, final_usage(usage))


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
