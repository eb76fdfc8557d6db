"""POST /v1/completions, as `vllm serve` answers it: a text, token ids or a batch of either
continued as they are (no chat template), n choices per prompt indexed prompt-major
(choice = prompt * n + i), as one `text_completion` JSON or Server-Sent Events of
`text_completion` chunks ending in `data: [DONE]`. The body, the client's slot, refusals,
disconnects and error shapes are the chat endpoint's (server/serving.py).

The engine reports a prompt's token ids and logprobs with its Finished event, so what must
come first is arranged here: a text prompt whose ids the first chunk needs (`echo`,
`return_token_ids`, `continuous_usage_stats`) is tokenized before it is submitted, and a
streamed echo with `logprobs` (the prompt's logprobs) comes as one chunk at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from engine.base import Engine
from engine.errors import EngineError, InvalidRequestError
from engine.stream import RequestHandle, merge_deltas
from engine.types import Conversation, Finished, GenerationRequest, TextDelta

from .completion_protocol import (NOT_HONOURED, CompletionChoice, CompletionChunk,
                                  CompletionLogProbs, CompletionRequest, CompletionResponse,
                                  CompletionStreamChoice, check_body, check_request,
                                  completion_id, completion_logprobs, prompt_logprobs_out,
                                  unknown_fields)
from .protocol import SSE_DONE, UsageInfo, prompt_tokens_details, sse_data
from .serving import (FINISH_REASONS, SSE_HEADERS, ChatServing, ChoiceEvents,
                      as_engine_error, collect_choices, error_response, first_error,
                      load_json, refuse_not_honoured, until_disconnect, validation_error)

log = logging.getLogger("server")


def parse_completion_request(body: bytes) -> CompletionRequest:
    """The body as a CompletionRequest: vLLM's checks first, then fields this server does
    not honour refused (never ignored), unknown extras logged once and ignored."""
    data = load_json(body)
    check_body(data)
    refuse_not_honoured(data, NOT_HONOURED)
    extras = unknown_fields(data)
    if extras:
        log.warning("ignoring unknown request field(s): %s", ", ".join(extras[:10]))
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# --------------------------------------------------------------------------- one prompt
@dataclasses.dataclass
class Prompt:
    """One prompt of the batch: what goes to the engine and what an echo shows."""

    source: str | list[int]
    text: str = ""                      # for echo
    ids: list[int] | None = None        # known before submitting (else from Finished)
    handles: list[RequestHandle] = dataclasses.field(default_factory=list)
    first_token: dict[int, str] = dataclasses.field(default_factory=dict)   # echo's logprobs


@dataclasses.dataclass
class Choice:
    """One choice's output so far."""

    index: int
    prompt: Prompt
    finished: Finished | None = None
    sent_tokens: int = 0
    offset: int = 0
    started: bool = False
    echoed: bool = False


class CompletionServing:
    """One per app, beside the chat endpoint whose slots, checks and metrics it shares."""

    def __init__(self, engine: Engine, chat: ChatServing) -> None:
        self.engine = engine
        self.chat = chat

    async def create_completion(self, raw: Request, client: str = "addr:?") -> Response:
        """The whole request inside one of `client`'s slots, from its body to its last byte."""
        return await self.chat.in_slot(client, lambda: self._create(raw))

    async def _create(self, raw: Request) -> Response:
        try:
            body = await self.chat.json_body(raw)
        except ClientDisconnect:
            return Response(status_code=499)
        except EngineError as exc:
            return self.chat.refuse(exc)
        try:
            req = parse_completion_request(body)
            model = self.chat.check_model(req.model)
            check_request(req)
        except EngineError as exc:
            return self.chat.refuse(exc)
        cid = completion_id(raw.headers.get("x-request-id") or req.request_id)
        return await until_disconnect(raw, self._run(req, model, cid))

    def _prepare(self, req: CompletionRequest) -> list[Prompt]:
        """The prompts, tokenized here where their ids must be known before the first chunk
        (an echo, streamed token ids or usage) or special tokens are left out, and their
        echo texts (token ids decoded)."""
        early = req.echo or not req.add_special_tokens or (
            req.stream and (req.return_token_ids or req.continuous_usage))
        k = req.truncate_prompt_tokens
        prompts = []
        for source in req.prompts():
            p = Prompt(source)
            if isinstance(source, str):
                p.text = source
                if early:
                    p.source = self.engine.tokenize(source,
                                                    add_special_tokens=req.add_special_tokens)
            elif req.echo:
                try:
                    p.text = self.engine.detokenize(source)
                except InvalidRequestError as exc:   # ids out of the vocabulary
                    raise InvalidRequestError(exc.message, param="prompt") from None
            if isinstance(p.source, list) and (k is None or k > 0):
                p.ids = list(p.source) if not k else \
                    p.source[:k] if req.truncation_side == "right" else p.source[-k:]
            if req.echo and req.logprobs is not None and p.ids:
                p.first_token = {p.ids[0]: self.engine.detokenize(p.ids[:1])}
            prompts.append(p)
        return prompts

    async def _run(self, req: CompletionRequest, model: str, cid: str) -> Response:
        created = int(time.time())
        prompts: list[Prompt] = []
        try:
            prompts = await asyncio.to_thread(self._prepare, req)
            sampling = req.sampling_params()
            for i, p in enumerate(prompts):
                gen = GenerationRequest(Conversation(), sampling, request_id=f"{cid}-{i}",
                                        prompt=p.source)
                p.handles = await self.chat.submit(gen)
        except BaseException as exc:
            for p in prompts:
                for handle in p.handles:
                    handle.cancel()
            if isinstance(exc, EngineError):
                return self.chat.refuse(exc)
            if isinstance(exc, Exception):   # a bug, not bad input: logged, vLLM's shape
                log.exception("submit failed for %s", cid)
                return self.chat.refuse(EngineError(
                    f"Internal server error: {type(exc).__name__}: {exc}"))
            raise
        choices = [Choice(len(prompts[0].handles) * pi + ci, p)
                   for pi, p in enumerate(prompts) for ci in range(len(p.handles))]
        handles = [h for p in prompts for h in p.handles]
        if req.stream:
            return StreamingResponse(self._stream(req, choices, handles, cid, created, model),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self._complete(req, choices, handles, cid, created, model)

    # ----------------------------------------------------------------------- answers
    def _choice_output(self, req: CompletionRequest, c: Choice, deltas: list[TextDelta],
                       fin: Finished | None) -> tuple[str, list[int], CompletionLogProbs | None]:
        """The text, token ids and logprobs a choice sends for `deltas` (and the prompt,
        on its first output when echoing)."""
        delta = merge_deltas(deltas) if deltas else TextDelta("")
        text, ids, lps = delta.text, list(delta.token_ids), list(delta.logprobs or [])
        if req.echo and not c.echoed:
            c.echoed = True
            prompt_ids = c.prompt.ids or (fin.prompt_token_ids if fin else None) or []
            prompt_lps = (fin.prompt_logprobs if fin else None) or [None] * len(prompt_ids)
            prompt_text = "" if req.return_token_ids else c.prompt.text
            if req.echo_only:
                text, ids, lps = prompt_text, list(prompt_ids), list(prompt_lps)
            else:
                text, ids, lps = prompt_text + text, [*prompt_ids, *ids], [*prompt_lps, *lps]
        if req.logprobs is None:
            return text, ids, None
        decode = {i: c.prompt.first_token.get(i) or self.engine.detokenize([i])
                  for i, lp in zip(ids, lps) if lp is None}
        out = completion_logprobs(ids, lps, req.logprobs, decode,
                                  bool(req.return_tokens_as_token_ids), c.offset)
        if out.tokens:
            c.offset = out.text_offset[-1] + len(out.tokens[-1])
        return text, ids, out

    async def _complete(self, req: CompletionRequest, choices: list[Choice],
                        handles: list[RequestHandle], cid: str, created: int,
                        model: str) -> JSONResponse:
        results = await collect_choices(handles)
        error = first_error([r.finished for r in results])
        if error is not None:
            return error_response(error)
        out = []
        for c, r in zip(choices, results):
            c.finished = fin = r.finished
            text, ids, logprobs = self._choice_output(
                req, c, [TextDelta(r.text, r.token_ids, r.logprobs)], fin)
            out.append(CompletionChoice(
                index=c.index, text=text, logprobs=logprobs,
                finish_reason=FINISH_REASONS[fin.reason], stop_reason=fin.stop_reason,
                token_ids=r.token_ids if req.return_token_ids else None,
                prompt_logprobs=prompt_logprobs_out(fin.prompt_logprobs),
                prompt_token_ids=fin.prompt_token_ids if req.return_token_ids else None))
        response = CompletionResponse(id=cid, created=created, model=model, choices=out,
                                      usage=self._usage(req, choices, choices[-1]))
        return JSONResponse(response.model_dump())

    def _usage(self, req: CompletionRequest, choices: list[Choice], cached: Choice) -> UsageInfo:
        """Each prompt's tokens once (not once per choice) and every choice's output (every
        beam's); with --enable-prompt-tokens-details the cached prompt tokens of `cached`'s
        prompt, as vLLM reports one prompt's (none for a beam search)."""
        prompt = sum({id(c.prompt): c.finished.stats.prompt_tokens for c in choices}.values())
        output = sum(c.finished.stats.output_tokens for c in choices)
        details = None
        if self.chat.settings.enable_prompt_tokens_details and not req.use_beam_search:
            details = prompt_tokens_details(cached.finished.stats.cached_tokens)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=output,
                         total_tokens=prompt + output, prompt_tokens_details=details)

    async def _stream(self, req: CompletionRequest, choices: list[Choice],
                      handles: list[RequestHandle], cid: str, created: int,
                      model: str) -> AsyncIterator[str]:
        """The choices' chunks as their events come. A delta the engine has already finished
        after, or that reaches max_tokens, rides with the finish (vLLM's last chunk has
        both), and a streamed echo with logprobs waits for the prompt's logprobs at the end."""
        hold = bool(req.echo and req.logprobs is not None)
        pending: list[list[TextDelta]] = [[] for _ in choices]
        made = [0] * len(choices)
        events = ChoiceEvents(handles)
        try:
            async for i, event in events:
                fin = event if isinstance(event, Finished) else None
                if fin is None:
                    pending[i].append(event)
                    made[i] += len(event.token_ids)
                    last = req.max_tokens is not None and made[i] >= req.max_tokens
                    if hold or last or handles[i].finished is not None:
                        continue
                elif fin.reason == "error":
                    yield sse_data(as_engine_error(fin.error).to_dict())
                    yield SSE_DONE
                    return
                else:
                    choices[i].finished = fin
                deltas, pending[i] = pending[i], []
                yield self._chunk(req, choices[i], deltas, fin, cid, created, model)
            if req.include_usage:
                yield sse_data(CompletionChunk(id=cid, created=created, model=model, choices=[],
                                               usage=self._usage(req, choices,
                                                                 choices[0])).data())
            yield SSE_DONE
        finally:
            events.close()
            for handle in handles:
                if handle.finished is None:   # the client went away, or another choice failed
                    handle.cancel()

    def _chunk(self, req: CompletionRequest, c: Choice, deltas: list[TextDelta],
               fin: Finished | None, cid: str, created: int, model: str) -> str:
        first, c.started = not c.started, True
        text, _, logprobs = self._choice_output(req, c, deltas, fin)
        new_ids = [i for d in deltas for i in d.token_ids]
        c.sent_tokens += len(new_ids)
        prompt_ids = c.prompt.ids or (fin.prompt_token_ids if fin else None)
        choice = CompletionStreamChoice(
            index=c.index, text=text, logprobs=logprobs,
            finish_reason=FINISH_REASONS[fin.reason] if fin else None,
            stop_reason=fin.stop_reason if fin else None,
            prompt_token_ids=prompt_ids if first and (req.echo or req.return_token_ids) else None,
            token_ids=new_ids if req.return_token_ids else None)
        usage = None
        if req.continuous_usage:
            prompt = fin.stats.prompt_tokens if fin else len(c.prompt.ids or [])
            usage = UsageInfo(prompt_tokens=prompt, completion_tokens=c.sent_tokens,
                              total_tokens=prompt + c.sent_tokens)
        return sse_data(CompletionChunk(id=cid, created=created, model=model, choices=[choice],
                                        usage=usage).data())


__all__ = ["CompletionServing", "parse_completion_request"]
