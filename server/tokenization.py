"""POST /tokenize, /detokenize and GET /tokenizer_info, as vLLM 0.32 serves them: a prompt
text or chat messages to token ids (a chat rendered as the model sees it, pictures'
placeholder tokens included, under the request's template controls and tools), token ids back
to text, and the tokenizer's configuration. Validation, the body's bounds and the error path
are the chat endpoint's (ChatServing); the work runs off the event loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from engine.base import Engine
from engine.errors import EngineError, InvalidRequestError

from .protocol import (_Lenient, ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse,
                       TokenizeRequest, TokenizeResponse, check_chat_body, completion_id)
from .serving import APIError, ChatServing, load_json, to_generation_request, validation_error

# vLLM's words for a template sent with the request (it needs --trust-request-chat-template,
# which this server does not have: the model's own template is always used).
UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template "
                      "is not set. Refused request with untrusted chat template.")


class FunctionDefinition(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(_Lenient):
    """A tool offered to the chat template, reaching it as vLLM hands it over: `type`, and
    a function's `name`, `description` and `parameters` (None when absent), `strict` if set."""

    type: Literal["function"] = "function"
    function: FunctionDefinition

    def template_dict(self) -> dict[str, Any]:
        function = self.function.model_dump()
        if self.function.strict is None:
            del function["strict"]
        return {"type": self.type, "function": function}


class TokenizeFields(TokenizeRequest):
    """vLLM's chat-form fields that protocol.TokenizeRequest lacks."""

    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolParam] | None = None


def check_tokenize_body(data: Any) -> None:
    """vLLM's refusals on a raw chat-form body, in its words: a chat template sent with the
    request, per-request media loading options, and the generation prompt against
    continue_final_message (the chat endpoint's check, the only one of its that applies)."""
    if not isinstance(data, dict) or data.get("messages") is None:
        return
    kwargs = data.get("chat_template_kwargs")
    if data.get("chat_template") is not None or (
            isinstance(kwargs, dict) and kwargs.get("chat_template") is not None):
        raise InvalidRequestError(UNTRUSTED_TEMPLATE, param="chat_template")
    if data.get("media_io_kwargs") is not None:
        raise APIError("media_io_kwargs: per-request media loading options are not supported. "
                       "Refused rather than ignored: leave it out.", 400, "BadRequestError",
                       "media_io_kwargs")
    check_chat_body({k: data[k] for k in ("add_generation_prompt", "continue_final_message")
                     if k in data})


def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """vLLM's TokenizerInfo: the tokenizer's init kwargs (tokenizer_config.json as loaded, the
    chat template among them) without file paths, as JSON, and its class name."""
    config = dict(getattr(tokenizer, "init_kwargs", None) or {})
    config.pop("vocab_file", None)
    config.pop("merges_file", None)

    def plain(value: Any) -> Any:   # AddedToken -> its text (vLLM's _make_json_serializable)
        return value.content if hasattr(value, "content") else str(value)

    config = json.loads(json.dumps(config, default=plain))
    return {"tokenizer_class": type(tokenizer).__name__, **config}


class TokenizeServing:
    """The routes' logic for one engine, sharing the chat endpoint's checks."""

    def __init__(self, engine: Engine, chat: ChatServing) -> None:
        self.engine = engine
        self.chat = chat

    async def _read(self, raw: Request, model: type[BaseModel]) -> Any:
        data = load_json(await self.chat.json_body(raw))
        if model is TokenizeFields:
            check_tokenize_body(data)
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
        return await self._answer(raw, TokenizeFields, self._tokenize)

    async def detokenize(self, raw: Request) -> Response:
        return await self._answer(raw, DetokenizeRequest, self._detokenize)

    def tokenizer_info(self) -> Response:
        """vLLM's /tokenizer_info; a remote engine's tokenizer is the remote server's (501)."""
        try:
            tokenizer = self._tokenizer("/tokenizer_info", 501, "NotImplementedError")
        except EngineError as exc:
            return self.chat.refuse(exc)
        return JSONResponse(tokenizer_config(tokenizer))

    def _tokenizer(self, what: str, code: int = 400, type_: str = "BadRequestError") -> Any:
        """The engine's own tokenizer; an engine without one (the remote backend) cannot
        serve `what`."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            raise APIError(f"{what} is not available: this engine has no tokenizer of its own "
                           "(the remote backend's is the remote server's).", code, type_,
                           what.lstrip("/"))
        return tokenizer

    def _tokenize(self, req: TokenizeFields) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("Send either `prompt` (a text) or `messages` (a chat).",
                                      param="prompt")
        tokenizer = self._tokenizer("return_token_strs") if req.return_token_strs else None
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self.engine.tokenize(req.prompt, add_special_tokens=special)
        else:
            ids = self._chat_ids(req)
        strs = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len,
                                tokens=ids, token_strs=strs).model_dump()

    def _chat_ids(self, req: TokenizeFields) -> list[int]:
        """The chat's ids as the engine renders it. `add_special_tokens` (vLLM's default for a
        chat: false) asks for the tokenizer's own special tokens on top of the template's;
        Qwen's tokenizer adds none, so it changes nothing, and a tokenizer that would add
        some is refused rather than ignored."""
        if req.add_special_tokens and self.engine.tokenize("", add_special_tokens=True):
            raise InvalidRequestError("add_special_tokens: this tokenizer's special tokens "
                                      "cannot be added to a rendered chat; leave it false.",
                                      param="add_special_tokens")
        chat = ChatCompletionRequest(messages=req.messages,
                                     mm_processor_kwargs=req.mm_processor_kwargs,
                                     add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     chat_template_kwargs=req.chat_template_kwargs)
        gen = to_generation_request(chat, completion_id())
        # Tools reach the template whatever tool_choice a chat would say (vLLM's /tokenize).
        gen.conversation.tools = None if req.tools is None else \
            [tool.template_dict() for tool in req.tools]
        return self.engine.tokenize(gen, self.chat.policy)

    def _detokenize(self, req: DetokenizeRequest) -> dict:
        limit = self.engine.max_model_len
        if len(req.tokens) > limit:
            raise InvalidRequestError(f"At most {limit} tokens (the context length) may be "
                                      f"detokenized at once, got {len(req.tokens)}.",
                                      param="tokens")
        return DetokenizeResponse(prompt=self.engine.detokenize(req.tokens)).model_dump()
