"""The wire format of POST /v1/completions, as vLLM 0.32's
entrypoints/openai/completion/protocol.py defines it: the request (a text, token ids, or a
batch of either, continued without the chat template) and the `text_completion` response
and stream chunks, field for field."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator

from engine.errors import InvalidRequestError
from engine.types import SamplingParams, TokenLogprob

from .protocol import NOT_HONOURED as CHAT_NOT_HONOURED
from .protocol import (SamplingFields, UsageInfo, check_beam_fields, check_structured_body,
                       usage_without_nulls, vllm_invalid)

MAX_PROMPTS = 1024   # vLLM's VLLM_MAX_COMPLETION_PROMPTS default: prompts in one batch
DEFAULT_MAX_TOKENS = 16   # vLLM's (and OpenAI's) default for completions, unlike chat's

TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    """vLLM's CompletionRequest. The fields it has and this server cannot honour are in
    NOT_HONOURED (refused when set); the ones below are honoured, or have no effect in vLLM
    either on this model and endpoint (session_id, stream_interval, the render endpoints'
    return_token_offsets and mm_payload)."""

    prompt: Union[TokenIds, list[TokenIds], str, list[str], None] = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = None
    session_id: str | None = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None
    routed_experts_prompt_start: Annotated[int, Field(ge=0)] = 0
    return_token_offsets: bool | None = False
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_max_tokens(cls, value: Any) -> Any:
        """`"max_tokens": null` means the default, as in vLLM (not "up to the context")."""
        return DEFAULT_MAX_TOKENS if value is None else value

    @property
    def top_logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt is the answer (one token is generated, unsent)."""
        return bool(self.echo) and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The batch: one text or one list of token ids per prompt, in order."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            return [p]
        return list(p or [])

    def sampling_params(self) -> SamplingParams:
        """As SamplingFields, plus vLLM's completion rules: echo asks for the prompt's
        logprobs (its `logprobs` count) and echo-only generates one token."""
        params = super().sampling_params()
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        return dataclasses.replace(params, prompt_logprobs=prompt_logprobs,
                                   max_tokens=1 if self.echo_only else params.max_tokens)


# vLLM's CompletionRequest fields this server does not honour: those of the chat's list
# (server/protocol.py, with the value that means "not used" and why) that completions have.
NOT_HONOURED = {name: CHAT_NOT_HONOURED[name] for name in (
    "prompt_embeds", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "logprob_token_ids", "watermarking", "cache_salt", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "repetition_detection", "thinking_token_budget",
    "priority")}


def check_body(data: Any) -> None:
    """vLLM's checks on the raw body, in its order and words, before the fields are parsed."""
    if not isinstance(data, dict):
        return
    if data.get("stream_options") and not data.get("stream"):
        raise vllm_invalid("Stream options can only be defined when `stream=True`.",
                           "stream_options")
    prompt = data.get("prompt")
    if prompt is None or prompt == "":
        if data.get("prompt_embeds") is None:
            raise vllm_invalid("Either prompt or prompt_embeds must be provided and non-empty.",
                               "prompt")
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS \
            and not all(isinstance(p, int) for p in prompt):
        raise vllm_invalid(f"prompt list length {len(prompt)} exceeds the maximum allowed count "
                           f"of {MAX_PROMPTS}.", "prompt")
    for name in ("prompt_logprobs", "logprobs"):
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise vllm_invalid(f"`{name}` must be an integer.", name, value)
        if value is not None and value < 0 and value != -1:
            raise vllm_invalid(f"`{name}` must be a positive value or -1.", name, value)
    if data.get("use_beam_search") and data.get("echo") and data.get("logprobs") is not None:
        raise vllm_invalid("`echo` with `logprobs` is not supported with beam search because "
                           "beam search does not compute prompt logprobs.", "echo")
    prompt_logprobs = data.get("prompt_logprobs")
    if prompt_logprobs is not None and data.get("stream") \
            and (prompt_logprobs > 0 or prompt_logprobs == -1):
        raise vllm_invalid("`prompt_logprobs` are not available when `stream=True`.",
                           "prompt_logprobs")
    check_structured_body(data)


def unknown_fields(data: Any) -> list[str]:
    """Top-level fields neither vLLM's CompletionRequest nor ours defines (vendor extras)."""
    if not isinstance(data, dict):
        return []
    known = set(CompletionRequest.model_fields) | set(NOT_HONOURED)
    return sorted(k for k in data if k not in known)


def check_request(req: CompletionRequest) -> None:
    """What vLLM's completion renderer refuses for this model, and what this server refuses
    rather than ignores (fields beam search ignores, best_of, right-side truncation)."""
    if req.suffix is not None:
        if req.echo:
            raise InvalidRequestError("Echo is unsupported with suffix.", param="suffix")
        raise InvalidRequestError("suffix is only supported for models with FIM completion "
                                  "rendering", param="suffix")
    if req.stream and req.use_beam_search:
        raise InvalidRequestError("Streaming is not currently supported with beam search")
    check_beam_fields(req, ("response_format", "structured_outputs"))
    if req.best_of not in (None, 1):
        raise InvalidRequestError(f"best_of must be 1: this server does not generate extra "
                                  f"candidates to pick from, got {req.best_of}.", param="best_of")
    prompts = req.prompts()
    if not prompts:
        raise InvalidRequestError("You must pass at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise InvalidRequestError("The decoder prompt cannot be empty")


# ----------------------------------------------------------------------------- responses
MIN_LOGPROB = -9999.0   # vLLM's stand-in for -inf in JSON



def completion_id(request_id: str | None = None) -> str:
    return f"cmpl-{request_id or uuid.uuid4().hex[:16]}"


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None
    routed_experts: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    service_tier: None = None
    system_fingerprint: None = None
    usage: UsageInfo
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    metrics: None = None


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionChunk(BaseModel):
    """One stream event; `usage` only where vLLM sends it (continuous usage, or the last
    chunk, whose `choices` is empty)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None

    def data(self) -> dict:
        out = self.model_dump()
        if self.usage is None:
            del out["usage"]
        else:
            out["usage"] = usage_without_nulls(out["usage"])
        return out


def completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprob | None], k: int,
                        decode: dict[int, str], as_ids: bool,
                        offset: int = 0) -> CompletionLogProbs:
    """The legacy completions form: per token its text, offset, logprob and a dict of the
    chosen token then the k most likely (at most k + 1 entries, as vLLM's; -1: all given).
    A position without logprobs (the prompt's first) has nulls."""
    out = CompletionLogProbs()
    for token_id, lp in zip(token_ids, logprobs):
        name = (lambda tid, text: f"token_id:{tid}") if as_ids else (lambda tid, text: text)
        if lp is None:
            token, top = name(token_id, decode[token_id]), None
            out.token_logprobs.append(None)
        else:
            token = name(lp.token_id, lp.token)
            ranked = {lp.token_id: (lp.token, lp.logprob)}
            for t in lp.top:
                ranked.setdefault(t.token_id, (t.token, t.logprob))
            entries = list(ranked.items()) if k < 0 else list(ranked.items())[:k + 1]
            top = {}
            for tid, (text, value) in entries:
                top[name(tid, text)] = max(value, MIN_LOGPROB)
            out.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
        out.text_offset.append(offset)
        out.tokens.append(token)
        out.top_logprobs.append(top)
        offset += len(token)
    return out


def prompt_logprobs_out(logprobs: list[TokenLogprob | None] | None
                        ) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (None first) its id's entry, then the top
    ones', each with logprob, rank and decoded text."""
    if logprobs is None:
        return None
    out: list[dict[str, PromptLogprob] | None] = []
    for lp in logprobs:
        if lp is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): PromptLogprob(logprob=max(lp.logprob, MIN_LOGPROB),
                                                  rank=lp.rank, decoded_token=lp.token)}
        for rank, t in enumerate(lp.top, 1):
            entry.setdefault(str(t.token_id), PromptLogprob(
                logprob=max(t.logprob, MIN_LOGPROB), rank=rank, decoded_token=t.token))
        out.append(entry)
    return out
