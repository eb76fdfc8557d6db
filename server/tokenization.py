"""POST /tokenize and /detokenize, as vLLM serves them: a prompt text or chat messages to
token ids (a chat rendered as the model sees it, pictures' placeholder tokens included),
and token ids back to text. Validation, the body's bounds and the error path are the chat
endpoint's (ChatServing); the work runs off the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from engine.base import Engine
from engine.errors import EngineError, InvalidRequestError

from .protocol import (ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse,
                       TokenizeRequest, TokenizeResponse, completion_id)
from .serving import ChatServing, load_json, to_generation_request, validation_error


def _refused_options(req: TokenizeRequest) -> str | None:
    """The options of vLLM's /tokenize this server does not do (refused, never ignored)."""
    if req.return_token_strs:
        return "return_token_strs"
    if req.messages is not None and not req.add_generation_prompt:
        return "add_generation_prompt"
    if req.continue_final_message:
        return "continue_final_message"
    return None


class TokenizeServing:
    """The two routes' logic for one engine, sharing the chat endpoint's checks."""

    def __init__(self, engine: Engine, chat: ChatServing) -> None:
        self.engine = engine
        self.chat = chat

    async def _read(self, raw: Request, model: type[BaseModel]) -> Any:
        data = load_json(await self.chat.json_body(raw))
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        self.chat.check_model(req.model)
        return req

    async def _answer(self, raw: Request, model: type[BaseModel], work: Any) -> Response:
        try:
            req = await self._read(raw, model)
            return JSONResponse(await asyncio.to_thread(work, req))
        except ClientDisconnect:
            return Response(status_code=499)
        except EngineError as exc:
            return self.chat.refuse(exc)

    async def tokenize(self, raw: Request) -> Response:
        return await self._answer(raw, TokenizeRequest, self._tokenize)

    async def detokenize(self, raw: Request) -> Response:
        return await self._answer(raw, DetokenizeRequest, self._detokenize)

    def _tokenize(self, req: TokenizeRequest) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("Send either `prompt` (a text) or `messages` (a chat).",
                                      param="prompt")
        option = _refused_options(req)
        if option is not None:
            raise InvalidRequestError(f"{option}: not supported by this server's /tokenize yet, "
                                      "so refused rather than ignored.", param=option)
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self.engine.tokenize(req.prompt, add_special_tokens=special)
        else:
            chat = ChatCompletionRequest(messages=req.messages,
                                         mm_processor_kwargs=req.mm_processor_kwargs)
            ids = self.engine.tokenize(to_generation_request(chat, completion_id()),
                                       self.chat.policy)
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len,
                                tokens=ids).model_dump()

    def _detokenize(self, req: DetokenizeRequest) -> dict:
        limit = self.engine.max_model_len
        if len(req.tokens) > limit:
            raise InvalidRequestError(f"At most {limit} tokens (the context length) may be "
                                      f"detokenized at once, got {len(req.tokens)}.",
                                      param="tokens")
        return DetokenizeResponse(prompt=self.engine.detokenize(req.tokens)).model_dump()
