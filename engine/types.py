"""Typed requests and events that cross from a front end (CLI, UI, API) to an
engine. Nothing here imports torch, so front ends stay device-agnostic."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled", "error"]

# The tutorial's per-image resolution bounds (the processor's own default
# allows ~16k tokens per image, far too many for one NPU).
DEFAULT_MIN_PIXELS = 224 * 224
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
DEFAULT_MAX_TOKENS = 512


@dataclass
class ImageInput:
    """One image: a local path, a `file://` or `data:` URI, an http(s) URL, or a PIL image.

    `min_pixels`/`max_pixels` override the request's bounds for this image only.
    """

    source: Any
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass
class VideoInput:
    """One video: a local path or a `file://`, `data:` or http(s) URL."""

    source: Any
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None


Part = Union[str, "ImageInput", "VideoInput"]


@dataclass
class Message:
    """One turn: its content parts in order (text, images, videos), as an OpenAI message's
    content list has them; the chat template renders them in that order, as vLLM does.

    Built from `text`, `images` and `videos` alone, the parts are the images, then the
    videos, then the text (the tutorial's order). Built from `parts`, the other three
    fields are derived from them (`text` is the text parts joined, for counting and display).
    """

    role: Role
    text: str = ""
    images: list[ImageInput] = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    # OpenAI's tool fields, handed to the chat template as they are: the calls an assistant
    # turn made ([{"id", "type": "function", "function": {"name", "arguments"}}]) and, on a
    # "tool" turn, the id of the call it answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.parts:
            self.text = "".join(p for p in self.parts if isinstance(p, str))
            self.images = [p for p in self.parts if isinstance(p, ImageInput)]
            self.videos = [p for p in self.parts if isinstance(p, VideoInput)]
        else:
            self.parts = [*self.images, *self.videos, *([self.text] if self.text else [])]


@dataclass
class Conversation:
    """The model's view of a chat: an optional system prompt and the turns so far.

    The last message is the user's; earlier turns keep their images, so the
    model can refer back to them.
    """

    messages: list[Message] = field(default_factory=list)
    system: str | None = None
    # How the chat template renders it (vLLM's request fields of the same names): the
    # assistant's turn opened after the last message, or the last (assistant) message left
    # open for the model to continue; extra template variables; the tools offered.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None

    def image_count(self) -> int:
        return sum(len(m.images) for m in self.messages)

    def video_count(self) -> int:
        return sum(len(m.videos) for m in self.messages)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the answer's text (vLLM's `structured_outputs`): exactly one of a JSON
    schema, any JSON object, a regular expression, one of fixed choices, or a grammar (Lark,
    or GBNF/EBNF as llama.cpp and xgrammar write it)."""

    json: Any = None                  # a JSON schema (dict, or its JSON text)
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def kind(self) -> str:
        """Which constraint it is ("" when none is set)."""
        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        return "json_object" if self.json_object and not set_ else ",".join(set_)


@dataclass
class SamplingParams:
    """vLLM-style sampling fields, with vLLM's meanings. `None` in the first five means:
    take the model's generation_config."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None                  # any 64-bit integer
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1                               # choices, each its own row (see Engine.submit_choices)
    presence_penalty: float = 0.0            # [-2, 2], as OpenAI and vLLM define them
    frequency_penalty: float = 0.0
    min_p: float = 0.0                       # [0, 1]
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> bias, [-100, 100]
    bad_words: list[str] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None              # None: none; k >= 0: the chosen token's and top k
    prompt_logprobs: int | None = None       # the same for every prompt token after the first
    truncate_prompt_tokens: int | None = None   # keep only k of the prompt's tokens (-1: all that fit)
    truncation_side: Literal["left", "right"] = "left"   # "left": keep the last k, "right": the first k
    structured: StructuredOutput | None = None  # the answer must match it (engine.structured)
    # vLLM's beam search: `n` beams, ranked by cum_logprob / len ** length_penalty; every
    # field above but max_tokens, temperature, ignore_eos, include_stop_str_in_output,
    # skip_special_tokens and logprobs is then ignored, as vLLM ignores it (engine.core.beam)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # True: a max_tokens that does not fit beside the prompt is lowered to what fits (vLLM
    # 0.32's server does this); False: it is an error in vLLM's words (the CLI's choice).
    cap_to_context: bool = False


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@dataclass
class GenerationRequest:
    """A chat to answer, or (`prompt`, for /v1/completions) a raw text or token ids that are
    continued as they are, without the chat template (the conversation is then empty)."""

    conversation: Conversation
    sampling: SamplingParams = field(default_factory=SamplingParams)
    min_pixels: int | None = None
    max_pixels: int | None = None
    request_id: str = field(default_factory=new_request_id)
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | list[int] | None = None


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    images: int = 0
    videos: int = 0
    output_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float | None = None
    total_s: float = 0.0
    tokens_after_cancel: int | None = None   # cancelled requests: tokens made after the cancel
    cached_tokens: int = 0                   # prompt tokens whose KV came from the prefix cache

    @property
    def input_tps(self) -> float:
        """Prompt tokens per second of prefill (time to first token)."""
        return self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0

    @property
    def output_tps(self) -> float:
        """Output tokens per second over the whole generation, as vLLM's progress bar reports."""
        return self.output_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Output tokens per second after the first token: the decode speed."""
        if self.ttft_s is None or self.output_tokens < 2 or self.total_s <= self.ttft_s:
            return 0.0
        return (self.output_tokens - 1) / (self.total_s - self.ttft_s)

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "images": self.images,
                "videos": self.videos, "output_tokens": self.output_tokens,
                "cached_tokens": self.cached_tokens,
                "queue_s": self.queue_s, "ttft_s": self.ttft_s, "total_s": self.total_s,
                "input_tps": self.input_tps, "output_tps": self.output_tps,
                "decode_tps": self.decode_tps}


@dataclass
class TopLogprob:
    """One candidate token at a position: its text (as the tokenizer decodes it alone),
    id and log-probability under the model's raw distribution (vLLM's default)."""

    token: str
    token_id: int
    logprob: float


@dataclass
class TokenLogprob(TopLogprob):
    """A generated (or prompt) token's log-probability, its rank among all tokens (1: the
    most likely) and the `logprobs` most likely tokens at its position."""

    rank: int = 1
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class TextDelta:
    """New text of one request, and the tokens behind it (their ids, and their logprobs when
    the request asked for them). Never entirely empty: text, ids or both. With stop strings
    the text may trail its tokens (text that could start a stop string waits)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    """The last event of every request stream."""

    reason: FinishReason
    stats: RequestStats
    error: Exception | None = None   # an EngineError when reason == "error"
    stop_reason: str | int | None = None   # the stop string or stop token id that ended it
    prompt_token_ids: list[int] | None = None
    # per prompt token (None for the first), when the request asked for prompt_logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None


Event = Union[TextDelta, Finished]
