"""POST /v1/chat/completions: parse and check the body, turn it into the
engine's typed GenerationRequest, and answer the way `vllm serve` does:
one chat.completion JSON, or Server-Sent Events of chat.completion.chunk
ending in `data: [DONE]`.

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
from typing import Any, AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from engine.base import Engine
from engine.config import DEFAULT_MODEL
from engine.errors import EngineError, InvalidRequestError, ModelNotFoundError
from engine.stream import RequestHandle
from engine.types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                          SamplingParams, TextDelta, VideoInput)

from .fairshare import RETRY_AFTER_S, ClientBusyError, ClientSlots, Slot
from .metrics import MetricsRegistry
from .protocol import (SSE_DONE, AssistantMessage, ChatCompletionChoice, ChatCompletionChunk,
                       ChatCompletionRequest, ChatCompletionResponse, ChunkChoice, DeltaMessage,
                       ImageURLPart, TextPart, UsageInfo, VideoURLPart, completion_id,
                       not_honoured, sse_data, unknown_fields)
from .settings import ServerSettings

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


class HeldResponse(Response):
    """A response that gives its client's slot back once it has been sent, or once sending
    it failed (a stream's client went away): the slot lives exactly as long as the answer.
    It only wraps: status, headers and background tasks are the inner response's."""

    def __init__(self, inner: Response, slot: Slot) -> None:   # no super().__init__: nothing
        self.__dict__.update(inner=inner, slot=slot)           # of its own to render

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.slot.release()


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
    """pydantic's errors as one vLLM-shaped 400 (type "Bad Request", param = first location)."""
    errors = exc.errors(include_url=False)
    parts, first_loc = [], None
    for err in errors:
        loc = ".".join(str(x) for x in ("body", *err["loc"]))
        first_loc = first_loc or loc
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg} (input: {_summarise(err.get('input'))!r})"
                     if err["type"] != "missing" else f"{loc}: {msg}")
    count = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}"
    return APIError(f"{count}: " + "; ".join(parts), 400, "Bad Request", first_loc)


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


def json_depth_ok(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no container nests deeper than `limit` (iterative: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return True


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
    if not json_depth_ok(data):
        raise too_deep
    return data


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    data = load_json(body)
    refused = not_honoured(data)
    if refused:
        them = "it" if len(refused) == 1 else "them"
        raise APIError(f"{', '.join(refused)}: not supported by this server yet, so refused "
                       f"rather than ignored; leave {them} out or at vLLM's default.",
                       400, "Bad Request", refused[0])
    extras = unknown_fields(data)
    if extras:
        log.warning("ignoring unknown request field(s): %s", ", ".join(extras[:10]))
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def check_unsupported(req: ChatCompletionRequest) -> None:
    """Fields we cannot honour are refused, never silently ignored."""
    if req.n is not None and req.n != 1:
        raise _bad(f"n must be 1: this server generates one choice per request, got {req.n}. "
                   f"(parameter=n, value={req.n})", "n")
    if req.stream_options is not None and not req.stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    if req.logprobs:
        raise _bad("logprobs are not supported by this server.", "logprobs")
    if req.tools:
        raise _bad("Tool calling is not supported by this server.", "tools")


def to_generation_request(req: ChatCompletionRequest, request_id: str) -> GenerationRequest:
    """The engine's typed request. Content parts keep their order, and a list of text
    parts stays a list (the chat template renders each in turn, as vLLM does)."""
    mm = req.mm_processor_kwargs
    fps = mm.fps if mm else None
    messages: list[Message] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role in ("system", "developer") else m.role
        parts: list[Any] = []
        if isinstance(m.content, str):
            parts.append(m.content)
        elif m.content is not None:
            for part in m.content:
                if isinstance(part, TextPart):
                    parts.append(part.text)
                elif isinstance(part, ImageURLPart):
                    parts.append(ImageInput(part.image_url.url))
                elif isinstance(part, VideoURLPart):
                    parts.append(VideoInput(part.video_url.url, fps=fps))
        if role != "user" and any(not isinstance(p, str) for p in parts):
            raise _bad(f"messages[{i}]: only user messages may contain images or videos.",
                       "messages")
        messages.append(Message(role, parts=[p for p in parts if not isinstance(p, str) or p]))
    sampling = SamplingParams(
        max_tokens=req.effective_max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
        stop=req.stop_list, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        cap_to_context=True)   # as vLLM 0.32: max_tokens is lowered to what fits the context
    return GenerationRequest(Conversation(messages), sampling,
                             min_pixels=mm.min_pixels if mm else None,
                             max_pixels=mm.max_pixels if mm else None, request_id=request_id)


def _usage(finished: Finished) -> UsageInfo:
    s = finished.stats
    return UsageInfo(prompt_tokens=s.prompt_tokens, completion_tokens=s.output_tokens,
                     total_tokens=s.prompt_tokens + s.output_tokens)


def _as_engine_error(error: Exception | None) -> EngineError:
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
        try:
            slot = self.slots.acquire(client)
        except ClientBusyError as exc:
            return self.refuse(exc)
        try:
            response = await self._create(raw)
        except BaseException:
            slot.release()
            raise
        return HeldResponse(response, slot)

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
            model = self.check_model(req.model)
            check_unsupported(req)
            gen = to_generation_request(req, completion_id())
        except EngineError as exc:
            return self.refuse(exc)
        return await until_disconnect(raw, self._run(req, gen, model))

    def refuse(self, exc: EngineError) -> JSONResponse:
        self.metrics.on_refused(exc.code)
        return error_response(exc)

    async def _submit(self, gen: GenerationRequest) -> RequestHandle:
        return await self.engine.asubmit(gen, self.policy, self._pool)

    async def _run(self, req: ChatCompletionRequest, gen: GenerationRequest,
                   model: str) -> Response:
        try:
            handle = await self._submit(gen)
        except EngineError as exc:
            return self.refuse(exc)
        except Exception as exc:  # a bug, not bad input: log it, answer in vLLM's shape
            log.exception("submit failed for %s", gen.request_id)
            return self.refuse(EngineError(f"Internal server error: {type(exc).__name__}: {exc}"))
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(handle, gen.request_id, created, model,
                                                  req.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self._complete(handle, gen.request_id, created, model)

    async def _complete(self, handle: RequestHandle, cid: str, created: int,
                        model: str) -> JSONResponse:
        parts: list[str] = []
        finished: Finished | None = None
        try:
            async for event in handle:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                else:
                    finished = event
        finally:
            if finished is None:   # cancelled by a disconnect (or the server stopping)
                handle.cancel()
        assert finished is not None
        if finished.reason == "error":
            return error_response(_as_engine_error(finished.error))
        response = ChatCompletionResponse(
            id=cid, created=created, model=model,
            choices=[ChatCompletionChoice(message=AssistantMessage(content="".join(parts)),
                                          finish_reason=FINISH_REASONS[finished.reason])],
            usage=_usage(finished))
        return JSONResponse(response.model_dump())

    async def _stream(self, handle: RequestHandle, cid: str, created: int, model: str,
                      include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: DeltaMessage, finish_reason: str | None = None) -> str:
            return ChatCompletionChunk(id=cid, created=created, model=model, choices=[
                ChunkChoice(delta=delta, finish_reason=finish_reason)]).sse()

        finished: Finished | None = None
        try:
            yield chunk(DeltaMessage(role="assistant", content=""))
            async for event in handle:
                if isinstance(event, TextDelta):
                    yield chunk(DeltaMessage(content=event.text))
                else:
                    finished = event
            assert finished is not None
            if finished.reason == "error":
                yield sse_data(_as_engine_error(finished.error).to_dict())
            else:
                yield chunk(DeltaMessage(content=""), FINISH_REASONS[finished.reason])
                if include_usage:
                    yield ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                              usage=_usage(finished)).sse()
            yield SSE_DONE
        finally:
            if finished is None:   # the client went away mid-stream
                handle.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["APIError", "ChatServing", "HeldResponse", "error_response", "served_model_names",
           "to_generation_request"]
