"""POST /v1/chat/completions: parse and check the body, turn it into the
engine's typed GenerationRequest, and answer the way `vllm serve` does:
one chat.completion JSON, or Server-Sent Events of chat.completion.chunk
ending in `data: [DONE]`.

A request with `n` choices is n engine requests (Engine.submit_choices) answered as one:
choices indexed 0..n-1, usage counting the prompt once.

Errors found before the engine accepts the request are plain JSON in vLLM's
nested shape with the HTTP status equal to its code. Errors after a stream
began are sent as `data: {"error": {...}}` followed by `[DONE]`.

A client that goes away cancels its request on the engine: streaming through
Starlette's disconnect listener (which cancels the body iterator), non-
streaming through a watcher on the ASGI receive channel (as vLLM's
`with_cancellation` does).

Each request runs inside one of its client's slots (server/fairshare.py), from its body
to the last byte of its answer; a client already running --max-client-requests of them
gets a 429 with Retry-After before anything is read.

The engine's "cancelled" finish reason is sent as "abort", the value vLLM
sends for aborted requests; a client only sees it when the server shuts
down mid-request, since a disconnected client is no longer listening.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from engine.base import Engine
from engine.config import DEFAULT_MODEL
from engine.errors import EngineError, InvalidRequestError, ModelNotFoundError
from engine.inputs.media import NamedMedia
from engine.inputs.validation import json_depth_ok
from engine.stream import RequestHandle, merge_deltas
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                          RequestStats, TextDelta, TokenLogprob, VideoInput)

from .fairshare import RETRY_AFTER_S, ClientBusyError, ClientSlots, Slot
from .metrics import MetricsRegistry
from .protocol import (SSE_DONE, AssistantMessage, ChatCompletionChoice, ChatCompletionRequest,
                       ChatCompletionResponse, ChunkWriter, ImageURLPart, TextPart, UsageInfo,
                       VideoURLPart, chat_logprobs, check_beam_fields, check_chat_body,
                       completion_id, continuous_usage, not_honoured, prompt_logprobs_json,
                       prompt_tokens_details, sse_data, unknown_fields, usage_info)
from .settings import ServerSettings
from .tools import ToolStream, check_tool_flags, named_choice, parse_forced, parse_hermes

log = logging.getLogger("server")

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class APIError(EngineError):
    """An error the API itself raises (not the engine), with any HTTP status."""

    def __init__(self, message: str, code: int, type_: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.code = code
        self.type = type_


def error_response(exc: EngineError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, ClientBusyError) else None
    return JSONResponse(exc.to_dict(), status_code=exc.code, headers=headers)


class AfterSend(Response):
    """A response that calls `then` once it has been sent, or once sending it failed (a
    stream's client went away): a client's slot, or the server's load count, lives exactly as
    long as the answer. It only wraps: status, headers and background tasks are the inner
    response's."""

    def __init__(self, inner: Response, then: Callable[[], None]) -> None:   # nothing of its
        self.__dict__.update(inner=inner, then=then)                        # own to render

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.then()


def served_model_names(engine: Engine, settings: ServerSettings) -> list[str]:
    """The names a request's `model` may use. The tiny model also answers to the
    hub id, so the tutorial's requests work unchanged against the demo."""
    names = list(settings.served_model_name) or [engine.model_name]
    if engine.is_tiny and DEFAULT_MODEL not in names:
        names.append(DEFAULT_MODEL)
    return names


# --------------------------------------------------------------------------- request parsing
def _summarise(value: Any) -> Any:
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def validation_error(exc: ValidationError) -> APIError:
    """pydantic's errors as one vLLM-shaped 400: vLLM's text (each error's type, location,
    message and input) on one line, the input summarised; param = the first location."""
    errors = exc.errors(include_url=False)
    parts, first_loc = [], None
    for err in errors:
        loc = ".".join(str(x) for x in ("body", *err["loc"]))
        first_loc = first_loc or loc
        shown = {"type": err["type"], "loc": loc, "msg": err["msg"].removeprefix("Value error, ")}
        if err["type"] != "missing":
            shown["input"] = _summarise(err.get("input"))
        parts.append(repr(shown))
    count = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}"
    return APIError(f"{count}: " + " ".join(parts), 400, "Bad Request", first_loc)


async def read_body(raw: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes before reading them all."""
    too_big = APIError(f"The request body is larger than the limit of {limit / 2**20:g} MB "
                       "(see --max-body-mb).", 413, "RequestEntityTooLarge", "body")
    declared = raw.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in raw.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


MAX_JSON_DEPTH = 32   # a chat request nests 6 deep (messages[].content[].image_url.url)


def check_content_type(raw: Request) -> None:
    """Only JSON bodies: a form or text/plain POST is what a page on another site can send
    without a CORS preflight, and it must not start any work (415)."""
    media_type = raw.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(f"Unsupported Content-Type {media_type or '(none)'!r}: send the body as "
                       "application/json.", 415, "UnsupportedMediaType", "content-type")


def load_json(body: bytes) -> Any:
    """A request body as JSON, every failure one vLLM-shaped 400 (deep nesting included)."""
    too_deep = APIError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", 400,
                        "Bad Request", "body")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise APIError(f"Invalid JSON in the request body at line {exc.lineno} column {exc.colno}: "
                       f"{exc.msg}", 400, "Bad Request", f"body.{exc.pos}") from None
    except UnicodeDecodeError:
        raise APIError("The request body is not UTF-8 JSON.", 400, "Bad Request", "body") from None
    except RecursionError:
        raise too_deep from None
    if not json_depth_ok(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


def refuse_not_honoured(data: Any, table: dict[str, tuple[Any, str]] | None = None) -> None:
    """A 400 naming every field set that this server does not do, with why (never ignored);
    `table`: the endpoint's list (default the chat's, protocol.NOT_HONOURED)."""
    refused = not_honoured(data, table)
    if refused:
        them = "it" if len(refused) == 1 else "them"
        reasons = "; ".join(f"{name}: {why}" for name, why in refused)
        raise APIError(f"{reasons}. Refused rather than ignored: leave {them} out or at vLLM's "
                       "default.", 400, "BadRequestError", refused[0][0])


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """The body as a ChatCompletionRequest, after vLLM's checks on the raw fields."""
    data = load_json(body)
    refuse_not_honoured(data)
    check_chat_body(data)
    extras = unknown_fields(data)
    if extras:
        log.warning("ignoring unknown request field(s): %s", ", ".join(extras[:10]))
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_beam_fields(req, ("response_format", "structured_outputs", "tool_choice"))
    return req


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _engine_message(i: int, m: Any, fps: float | None) -> Message:
    """One OpenAI message as the engine's: parts in order, tool fields as they are."""
    role = "system" if m.role in ("system", "developer") else m.role
    parts: list[Any] = []
    if isinstance(m.content, str):
        parts.append(m.content)
    elif m.content is not None:
        for part in m.content:
            if isinstance(part, TextPart):
                parts.append(part.text)
            elif isinstance(part, ImageURLPart):
                parts.append(ImageInput(_media_source(part)))
            elif isinstance(part, VideoURLPart):
                parts.append(VideoInput(_media_source(part), fps=fps))
    if role != "user" and any(not isinstance(p, str) for p in parts):
        raise _bad(f"messages[{i}]: only user messages may contain images or videos.",
                   "messages")
    return Message(role, parts=[p for p in parts if not isinstance(p, str) or p],
                   tool_calls=m.tool_calls, tool_call_id=m.tool_call_id)


def _media_source(part: ImageURLPart | VideoURLPart) -> Any:
    """A part's URL, or with vLLM's uuid the NamedMedia the input stage remembers it by."""
    url = part.media_url()
    return url if part.uuid is None else NamedMedia(part.uuid, url)


def to_generation_request(req: ChatCompletionRequest, request_id: str) -> GenerationRequest:
    """The engine's typed request. Content parts keep their order, and a list of text
    parts stays a list (the chat template renders each in turn, as vLLM does); the chat
    template controls and the tools offered go with the conversation."""
    mm = req.mm_processor_kwargs
    fps = mm.fps if mm else None
    messages = [_engine_message(i, m, fps) for i, m in enumerate(req.messages)]
    conversation = Conversation(
        messages, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=dict(req.chat_template_kwargs or {}),
        tools=req.tools)
    return GenerationRequest(conversation, req.sampling_params(),
                             min_pixels=mm.min_pixels if mm else None,
                             max_pixels=mm.max_pixels if mm else None, request_id=request_id)


def as_engine_error(error: Exception | None) -> EngineError:
    if isinstance(error, EngineError):
        return error
    return EngineError(f"Generation failed: {error}" if error else "Generation failed.")


# --------------------------------------------------------------------------- cancellation
async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(raw: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it if the client disconnects first (vLLM's with_cancellation).
    Call only after the body has been read, since this consumes the receive channel."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)  # nobody reads it: the client has gone
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()


# --------------------------------------------------------------------------- the endpoint
class ChatServing:
    """One per app: the engine, its settings and the metrics it feeds."""

    def __init__(self, engine: Engine, settings: ServerSettings, metrics: MetricsRegistry,
                 slots: ClientSlots | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.slots = slots or ClientSlots(settings.client_limit(engine))
        self.policy = settings.media_policy()
        # Prompt rendering fetches and decodes images: off the event loop, in its own pool.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="api-submit")
        self.details = PromptDetails(engine) if settings.enable_prompt_tokens_details else None
        if self.details is not None:   # the placeholder ids, found before the first answer
            self._pool.submit(self.details.placeholder_ids)

    @property
    def model_names(self) -> list[str]:
        return served_model_names(self.engine, self.settings)

    def check_model(self, name: str | None) -> str:
        names = self.model_names
        if name is None or name == "":
            return names[0]
        if name not in names:
            raise ModelNotFoundError(f"The model `{name}` does not exist. Valid aliases: "
                                     f"{', '.join(names)}", param="model")
        return name

    async def create_chat_completion(self, raw: Request, client: str = "addr:?") -> Response:
        """The whole request inside one of `client`'s slots, from its body to its last byte."""
        return await self.in_slot(client, lambda: self._create(raw))

    async def in_slot(self, client: str, work: Callable[[], Awaitable[Response]]) -> Response:
        """`work`'s response inside one of `client`'s slots (a 429 when it has none left),
        the slot held until the response's last byte is sent: every generating endpoint's
        way in."""
        try:
            slot = self.slots.acquire(client)
        except ClientBusyError as exc:
            return self.refuse(exc)
        try:
            response = await work()
        except BaseException:
            slot.release()
            raise
        return AfterSend(response, slot.release)

    async def json_body(self, raw: Request) -> bytes:
        """The request's JSON body within --max-body-mb (ClientDisconnect if it went away)."""
        check_content_type(raw)
        return await read_body(raw, self.settings.max_body_bytes)

    async def _create(self, raw: Request) -> Response:
        try:
            body = await self.json_body(raw)
        except ClientDisconnect:
            return Response(status_code=499)   # gone while sending the body: nothing to answer
        except EngineError as exc:
            return self.refuse(exc)
        try:
            req = parse_chat_request(body)
            check_tool_flags(None if req.tool_mode == "none" else req.tool_mode,
                             self.settings.tools_enabled)
            model = self.check_model(req.model)
            # The engine's id is always our own (unique); the answer's may be the client's.
            gen = to_generation_request(req, completion_id())
        except EngineError as exc:
            return self.refuse(exc)
        client_id = raw.headers.get("X-Request-Id") or req.request_id
        cid = completion_id(client_id) if client_id else gen.request_id
        answer = Answer(cid, model, details=self.details)
        return await until_disconnect(raw, self._run(req, gen, answer))

    def refuse(self, exc: EngineError) -> JSONResponse:
        self.metrics.on_refused(exc.code)
        return error_response(exc)

    async def submit(self, gen: GenerationRequest) -> list[RequestHandle]:
        """engine.submit_choices off the event loop (rendering fetches and decodes media);
        handles that arrive after the caller was cancelled are cancelled too."""
        return await self.engine.asubmit_choices(gen, self.policy, self._pool)

    async def _prompt_ids(self, req: ChatCompletionRequest, gen: GenerationRequest,
                          handle: RequestHandle) -> list[int] | None:
        """The prompt's token ids where a stream must show them before the first token
        (continuous usage, return_token_ids): the handle's, where the engine knew them at
        submit; else (a remote engine) the prompt rendered by its /tokenize."""
        if not req.stream or not (req.continuous_usage or req.return_token_ids):
            return None
        if handle.prompt_token_ids is not None:
            return handle.prompt_token_ids
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.engine.tokenize, gen, self.policy)

    async def _run(self, req: ChatCompletionRequest, gen: GenerationRequest,
                   answer: Answer) -> Response:
        handles: list[RequestHandle] = []
        try:
            handles = await self.submit(gen)
            prompt_ids = await self._prompt_ids(req, gen, handles[0])
        except BaseException as exc:
            for handle in handles:     # submitted, but nobody will read them
                handle.cancel()
            if isinstance(exc, EngineError):
                return self.refuse(exc)
            if not isinstance(exc, Exception):
                raise
            log.exception("submit failed for %s", gen.request_id)   # a bug, not bad input
            return self.refuse(EngineError(f"Internal server error: {type(exc).__name__}: {exc}"))
        if req.stream:
            return StreamingResponse(stream_chat(handles, req, answer, prompt_ids),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await complete_chat(handles, req, answer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)



# --------------------------------------------------------------------------- answers
MEDIA_PLACEHOLDERS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}   # Qwen2.5-VL's


class PromptDetails:
    """usage.prompt_tokens_details as vLLM's --enable-prompt-tokens-details reports them: the
    prompt tokens the prefix cache supplied (none reported for a beam search, as in vLLM) and
    the placeholder tokens per modality, counted in the prompt's ids."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids: dict[str, int] | None = None

    def placeholder_ids(self) -> dict[str, int]:
        """Each modality's placeholder token id, from the engine's tokenizer (once)."""
        if self._ids is None:
            ids = {}
            for modality, token in MEDIA_PLACEHOLDERS.items():
                try:
                    found = self.engine.tokenize(token, add_special_tokens=False)
                except EngineError:   # a remote without /tokenize: no per-modality counts
                    found = []
                if len(found) == 1:
                    ids[modality] = found[0]
            self._ids = ids
        return self._ids

    def __call__(self, first: Finished, beam: bool) -> dict | None:
        """The details of an answer whose first choice ended with `first`."""
        ids = first.prompt_token_ids or []
        media = {m: n for m, token in self.placeholder_ids().items()
                 if (n := ids.count(token))} if ids else {}
        return prompt_tokens_details(None if beam else first.stats.cached_tokens, media)


@dataclass
class Answer:
    """What every chunk of one answer repeats: its id, creation time and model name; and
    the usage details it reports, where the server reports them."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    details: PromptDetails | None = None

    def usage(self, req: ChatCompletionRequest, prompt_tokens: int, completion_tokens: int,
              finishes: list[Finished]) -> UsageInfo:
        details = self.details(finishes[0], req.use_beam_search) \
            if self.details is not None and finishes else None
        return usage_info(prompt_tokens, completion_tokens, details)


@dataclass
class ChoiceResult:
    """One choice's whole answer: its text, token ids, logprobs and final record."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: Finished


async def collect_choice(handle: RequestHandle) -> ChoiceResult:
    """Every event of one handle; a caller cancelled meanwhile cancels the request."""
    deltas: list[TextDelta] = []
    finished: Finished | None = None
    try:
        async for event in handle:
            if isinstance(event, TextDelta):
                deltas.append(event)
            else:
                finished = event
    finally:
        if finished is None:   # cancelled by a disconnect (or the server stopping)
            handle.cancel()
    whole = merge_deltas(deltas) if deltas else TextDelta("")
    return ChoiceResult(whole.text, whole.token_ids, whole.logprobs, finished)


async def collect_choices(handles: list[RequestHandle]) -> list[ChoiceResult]:
    """All choices' answers; cancelling the caller cancels every request."""
    tasks = [asyncio.ensure_future(collect_choice(h)) for h in handles]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def first_error(finishes: list[Finished]) -> EngineError | None:
    failed = next((f for f in finishes if f.reason == "error"), None)
    return None if failed is None else as_engine_error(failed.error)


def total_usage(req: ChatCompletionRequest, answer: Answer,
                finishes: list[Finished]) -> UsageInfo:
    """The prompt counted once and the tokens of all choices (every beam's, with beam
    search), as vLLM's usage counts them."""
    prompt = finishes[0].stats.prompt_tokens if finishes else 0
    return answer.usage(req, prompt, sum(f.stats.output_tokens for f in finishes), finishes)


def answer_message(req: ChatCompletionRequest, text: str,
                   reason: str) -> tuple[AssistantMessage, str]:
    """A whole answer as vLLM's message and finish_reason: with tools, its calls parsed out
    (content "" beside forced calls); "tool_calls" when "auto" found calls or a "required"
    answer ended by itself, "stop" for a named call, as vLLM 0.32 reports them."""
    mode, finish = req.tool_mode, FINISH_REASONS[reason]
    role = req.response_role
    if mode == "none":
        return AssistantMessage(role=role, content=text), finish
    if mode == "auto":
        content, calls = parse_hermes(text)
    else:
        content, calls = "", parse_forced(text, mode)
    if req.parallel_tool_calls is False:
        calls = calls[:1]
    if (mode == "auto" and calls) or (mode == "required" and finish == "stop"):
        finish = "tool_calls"
    return AssistantMessage(role=role, content=content, tool_calls=calls), finish


async def complete_chat(handles: list[RequestHandle], req: ChatCompletionRequest,
                        answer: Answer) -> JSONResponse:
    """One chat.completion with a choice per handle (index = its position), as vLLM's."""
    results = await collect_choices(handles)
    finishes = [r.finished for r in results]
    error = first_error(finishes)
    if error is not None:
        return error_response(error)
    echo, count = req.echo_text(), req.top_logprobs or 0
    choices = []
    for i, r in enumerate(results):
        message, finish_reason = answer_message(req, echo + r.text, r.finished.reason)
        choices.append(ChatCompletionChoice(
            index=i, message=message,
            logprobs=chat_logprobs(r.logprobs, count) if req.logprobs else None,
            finish_reason=finish_reason, stop_reason=r.finished.stop_reason,
            token_ids=r.token_ids if req.return_token_ids else None))
    first = finishes[0]
    response = ChatCompletionResponse(
        id=answer.id, created=answer.created, model=answer.model, choices=choices,
        usage=total_usage(req, answer, finishes),
        prompt_logprobs=prompt_logprobs_json(first.prompt_logprobs),
        prompt_token_ids=first.prompt_token_ids if req.return_token_ids else None)
    return JSONResponse(response.model_dump())


class ChoiceEvents:
    """The events of n handles as (choice index, event), in the order they come. One
    handle is read directly; several through a queue fed by one task each. A failure while
    reading a handle (a bug) comes as that choice's error Finished, so a stream ends with an
    error instead of hanging. `close` stops the tasks (the handles themselves are the
    caller's to cancel)."""

    def __init__(self, handles: list[RequestHandle]) -> None:
        self.handles = handles
        self._tasks: list[asyncio.Task] = []

    @staticmethod
    async def _read(index: int, handle: RequestHandle
                    ) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
        try:
            async for event in handle:
                yield index, event
        except Exception as exc:
            log.exception("reading choice %d failed", index)
            yield index, Finished("error", RequestStats(), exc)

    async def __aiter__(self) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
        if len(self.handles) == 1:
            async for item in self._read(0, self.handles[0]):
                yield item
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            async for item in self._read(index, handle):
                queue.put_nowait(item)

        self._tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        running = len(self.handles)
        while running:
            index, event = await queue.get()
            yield index, event
            running -= isinstance(event, Finished)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class ChatStream:
    """The Server-Sent Events of one streamed chat answer, as vLLM 0.32 sends them: a role
    chunk per choice, echo chunks, token chunks (with their logprobs and token ids), each
    choice's last tokens in its finish chunk, the usage chunk, [DONE].

    The last tokens ride in the finish chunk, as in vLLM, without delaying any visible
    text: a delta is held back only when its choice's end is certain or its text is empty
    (an end-of-sequence token, a partial character): the handle has finished (its events
    are all queued), or the choice reached max_tokens. A held delta goes out with the next
    event. Only a stop string's end is learnt after its text was sent: an empty finish chunk."""

    def __init__(self, handles: list[RequestHandle], req: ChatCompletionRequest,
                 answer: Answer, prompt_ids: list[int] | None) -> None:
        self.handles, self.req, self.answer = handles, req, answer
        self.write = ChunkWriter(answer.id, answer.created, answer.model)
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids) if prompt_ids is not None else 0
        self.tokens = [0] * len(handles)              # completion tokens sent, per choice
        self.pending: list[TextDelta | None] = [None] * len(handles)
        self.max_tokens = req.effective_max_tokens
        self.finishes: list[Finished | None] = [None] * len(handles)
        mode = req.tool_mode
        single = req.parallel_tool_calls is False
        self.tool_streams = [ToolStream(mode, single) if mode != "none" else None
                             for _ in handles]

    def _usage(self, index: int) -> dict | None:
        if not self.req.continuous_usage:
            return None
        return continuous_usage(self.prompt_tokens, self.tokens[index])

    def opening(self) -> list[str]:
        """The role chunk of each choice, then each one's echo (vLLM's order)."""
        role = self.req.response_role
        ids = self.prompt_ids if self.req.return_token_ids else None
        events = [self.write.role(i, role, self._usage(i), ids) for i in range(len(self.handles))]
        echo = self.req.echo_text()
        if echo:
            events += [self.write.echo(i, echo, self._usage(i)) for i in range(len(self.handles))]
        return events

    def _tokens(self, index: int, delta: TextDelta,
                finished: Finished | None = None) -> list[str]:
        """The chunk of `delta` (none where tool parsing has nothing to send yet and the
        chunk carries nothing else, as in vLLM)."""
        self.tokens[index] += len(delta.token_ids)
        req = self.req
        logprobs = chat_logprobs(delta.logprobs, req.top_logprobs or 0) if req.logprobs else None
        ids = delta.token_ids if req.return_token_ids else None
        tools = self.tool_streams[index]
        message = {"content": delta.text} if tools is None else tools.feed(delta.text)
        if finished is None:
            if message is None and logprobs is None and ids is None:
                return []
            return [self.write.tokens(index, message or {}, logprobs, ids, self._usage(index))]
        return [self.write.tokens(index, message or {}, logprobs, ids, self._usage(index),
                                  self._finish_reason(index, finished), finished.stop_reason)]

    def _finish_reason(self, index: int, finished: Finished) -> str:
        """vLLM's streamed finish_reason: "tool_calls" once calls were streamed and the
        answer stopped by itself, except for a named call."""
        reason = FINISH_REASONS[finished.reason]
        tools = self.tool_streams[index]
        if tools is not None and tools.called and reason == "stop" \
                and named_choice(self.req.tool_mode) is None:
            return "tool_calls"
        return reason

    def on_event(self, index: int, event: TextDelta | Finished) -> list[str]:
        """The chunks one event makes (none while a finished choice's text is held)."""
        if isinstance(event, TextDelta):
            held = self.pending[index]
            delta = event if held is None else merge_deltas([held, event])
            if self._ending(index, delta):
                self.pending[index] = delta
                return []
            self.pending[index] = None
            return self._tokens(index, delta)
        self.finishes[index] = event
        held, self.pending[index] = self.pending[index], None
        if event.reason == "error":
            return self._tokens(index, held) if held is not None else []
        return self._tokens(index, held or TextDelta(""), event)

    def _ending(self, index: int, delta: TextDelta) -> bool:
        """Whether to hold `delta` for the next event (see the class's note)."""
        made = self.tokens[index] + len(delta.token_ids)
        return (not delta.text or self.handles[index].finished is not None
                or (self.max_tokens is not None and made >= self.max_tokens))

    def closing(self) -> list[str]:
        """The usage chunk (prompt once, every choice's tokens), when asked for."""
        if not self.req.include_usage:
            return []
        finishes = [f for f in self.finishes if f is not None]
        if not self.prompt_ids and finishes:
            self.prompt_tokens = finishes[0].stats.prompt_tokens
        sent = sum(self.tokens)
        done = sum(f.stats.output_tokens for f in finishes)
        return [self.write.usage(self.answer.usage(self.req, self.prompt_tokens,
                                                   max(sent, done), finishes))]


async def stream_chat(handles: list[RequestHandle], req: ChatCompletionRequest, answer: Answer,
                      prompt_ids: list[int] | None) -> AsyncIterator[str]:
    """A streamed answer's events; a client gone mid-stream cancels every choice."""
    stream = ChatStream(handles, req, answer, prompt_ids)
    events = ChoiceEvents(handles)
    try:
        for chunk in stream.opening():
            yield chunk
        async for index, event in events:
            for chunk in stream.on_event(index, event):
                yield chunk
            if isinstance(event, Finished) and event.reason == "error":
                yield sse_data(as_engine_error(event.error).to_dict())
                yield SSE_DONE
                return
        for chunk in stream.closing():
            yield chunk
        yield SSE_DONE
    finally:
        events.close()
        for handle, finished in zip(handles, stream.finishes):
            if finished is None:   # the client went away, or another choice failed
                handle.cancel()


__all__ = ["APIError", "Answer", "ChatServing", "ChoiceEvents", "AfterSend", "collect_choices",
           "error_response", "served_model_names", "to_generation_request"]
