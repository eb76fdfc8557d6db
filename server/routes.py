"""The API's routes, mountable on any FastAPI app: the standalone API server
(`python -m server`) and the web UI (app.py) serve the same endpoints.

    POST /v1/chat/completions   POST /v1/completions   POST /invocations (SageMaker's: a
    body with `messages` is a chat, else a completion)   POST /tokenize   POST /detokenize
    GET /v1/models   GET /version   GET /metrics   GET /load   GET /tokenizer_info (only
    with --enable-tokenizer-info-endpoint, as vLLM)
        (behind the login when --auth or --api-key is set: Basic USER:PASS or a Bearer key;
        a client past --max-client-requests running generations gets a 429)
    GET /health, GET or POST /ping (vLLM's and SageMaker's name)   (always open: a load
        balancer's probe; it says only 200 or 503)

Bodies are parsed by the route itself rather than by FastAPI, so malformed
JSON and validation errors come out in vLLM's 400 shape whatever exception
handlers the host app (Gradio's, for instance) installs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from engine.base import Engine
from engine.errors import EngineError

from . import __version__
from .completion import CompletionServing
from .fairshare import ClientSlots, client_id
from .hygiene import protect
from .metrics import CONTENT_TYPE, MetricsRegistry, ServerLoad
from .protocol import ModelCard, ModelList, error_body
from .serving import AfterSend, ChatServing, load_json
from .tokenization import TokenizeServing
from .settings import ServerSettings


async def counted(load: ServerLoad, work: Awaitable[Response]) -> Response:
    """`work`'s response, counted in `load` from now until it has been sent (vLLM's
    load_aware_call)."""
    leave = load.enter()
    try:
        response = await work
    except BaseException:
        leave()
        raise
    return AfterSend(response, leave)


def replay_body(request: Request, body: bytes) -> Request:
    """The same request with its body, already read, to be read again (then the client's
    own messages, a disconnect among them)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()
    return Request(request.scope, receive)


def unauthorized_body(settings: ServerSettings) -> dict:
    how = ("'Authorization: Bearer <API key>'" if not settings.users else
           "HTTP Basic USER:PASS, or 'Authorization: Bearer USER:PASS'"
           + (" or the API key" if settings.api_key else ""))
    return error_body(f"Unauthorized: log in with {how}.", "AuthenticationError", 401)


def build_router(engine: Engine, settings: ServerSettings,
                 metrics: MetricsRegistry | None = None,
                 slots: ClientSlots | None = None) -> APIRouter:
    """All API routes for one engine. The metrics registry is attached to the engine
    here, so it counts every request the engine finishes, the UI's included; `slots` is
    the per-client cap, shared with the page when the host app passes its own."""
    metrics = metrics or MetricsRegistry(engine.model_name,
                                         engine.device_description).attach(engine)
    load = ServerLoad(settings.enable_server_load_tracking)
    chat = ChatServing(engine, settings, metrics, slots)
    router = APIRouter()
    router.client_slots = chat.slots   # type: ignore[attr-defined]  (mount_api exposes it)
    started = int(time.time())

    credentials = settings.credentials

    def refused(request: Request) -> JSONResponse | None:
        if credentials.allows(request.headers.get("authorization")):
            return None
        metrics.on_refused(401)
        return JSONResponse(unauthorized_body(settings), status_code=401,
                            headers={"WWW-Authenticate": credentials.challenge()})

    def client_of(request: Request) -> str:
        """The per-client cap's key: the login or API key, else the address the server sees."""
        who = credentials.identify(request.headers.get("authorization")) \
            if credentials.required else None
        user, key = who or (None, False)
        return client_id(user, key, request.client.host if request.client else None)

    @router.post("/v1/chat/completions", tags=["OpenAI-compatible API"])
    async def create_chat_completion(request: Request) -> Response:
        """vLLM-compatible chat completions (JSON or Server-Sent Events)."""
        return refused(request) or await counted(
            load, chat.create_chat_completion(request, client_of(request)))

    completions = CompletionServing(engine, chat)

    @router.post("/v1/completions", tags=["OpenAI-compatible API"])
    async def create_completion(request: Request) -> Response:
        """vLLM-compatible text completions: a text or token ids continued (JSON or SSE)."""
        return refused(request) or await counted(
            load, completions.create_completion(request, client_of(request)))

    async def invoke(request: Request) -> Response:
        """/invocations' work once the caller is let in."""
        client = client_of(request)
        try:
            with chat.slots.acquire(client):   # the body is read inside a slot, as always
                body = await chat.json_body(request)
                data = load_json(body)
        except ClientDisconnect:
            return Response(status_code=499)
        except EngineError as exc:
            return chat.refuse(exc)
        replay = replay_body(request, body)
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            return await chat.create_chat_completion(replay, client)
        return await completions.create_completion(replay, client)

    @router.post("/invocations", tags=["OpenAI-compatible API"])
    async def invocations(request: Request) -> Response:
        """SageMaker's one route, as vLLM serves it: a chat when the body has `messages`,
        else a completion (whose errors say what a completion needs)."""
        return refused(request) or await counted(load, invoke(request))

    tokens = TokenizeServing(engine, chat)

    @router.post("/tokenize", tags=["OpenAI-compatible API"])
    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a `prompt` or chat `messages` to token ids."""
        return refused(request) or await tokens.tokenize(request)

    @router.post("/detokenize", tags=["OpenAI-compatible API"])
    async def detokenize(request: Request) -> Response:
        """vLLM's /detokenize: token ids to text."""
        return refused(request) or await tokens.detokenize(request)

    if settings.enable_tokenizer_info_endpoint:
        @router.get("/tokenizer_info", tags=["OpenAI-compatible API"])
        async def tokenizer_info(request: Request) -> Response:
            """vLLM's /tokenizer_info: the tokenizer's configuration (tokenizer_config.json
            as loaded, file paths left out) and its class name."""
            return refused(request) or tokens.tokenizer_info()

    @router.get("/v1/models", tags=["OpenAI-compatible API"])
    async def list_models(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        root = engine.model_name
        cards = []
        for name in chat.model_names:
            alias = name != root
            note = None
            if engine.is_tiny:
                note = (f"The built-in tiny Qwen2.5-VL, for trying the API: {engine.tiny_knows}. "
                        + (f"This id is an alias of `{root}`, so the tutorial's requests work "
                           "unchanged." if alias else ""))
            cards.append(ModelCard(id=name, created=started, root=root,
                                   parent=root if alias else None,
                                   max_model_len=engine.max_model_len,
                                   description=note.strip() if note else None))
        return JSONResponse(ModelList(data=cards).model_dump())

    @router.api_route("/ping", methods=["GET", "POST"], tags=["monitoring"])
    @router.get("/health", tags=["monitoring"])
    async def health() -> Response:
        """200 with an empty body while the engine can serve; 503 when it cannot."""
        ok = await asyncio.to_thread(engine.health)   # a remote engine asks over HTTP
        if ok:
            return Response(status_code=200)
        return JSONResponse(error_body("The engine is not available.", "ServiceUnavailableError",
                                       503), status_code=503)

    @router.get("/version", tags=["monitoring"])
    async def version(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        return JSONResponse({"version": __version__})   # vLLM's shape; the device is on
                                                        # /metrics' qwenvl_server_info

    @router.get("/load", tags=["monitoring"])
    async def server_load(request: Request) -> Response:
        """vLLM's /load: chat and completion requests in flight (0 unless
        --enable-server-load-tracking)."""
        return refused(request) or JSONResponse({"server_load": load.value})

    @router.get("/metrics", tags=["monitoring"])
    async def prometheus_metrics(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        snapshot = engine.snapshot()
        healthy = await asyncio.to_thread(engine.health)
        return PlainTextResponse(metrics.render(snapshot, healthy), media_type=CONTENT_TYPE)

    router.on_shutdown.append(chat.close)   # its preparation threads end with the app
    return router


def mount_api(app: FastAPI, engine: Engine, settings: ServerSettings | None = None,
              slots: ClientSlots | None = None) -> APIRouter:
    """Add the API routes to an existing app (call before mounting anything at "/"). The
    per-client cap is `app.state.client_slots` (`slots` when given, so the page can share it)."""
    router = build_router(engine, settings or ServerSettings(), slots=slots)
    app.include_router(router)
    app.state.client_slots = router.client_slots   # type: ignore[attr-defined]
    return router


def create_api_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving only the API (the standalone `python -m server`)."""
    app = FastAPI(title="Qwen2.5-VL OpenAI-compatible API", version=__version__,
                  docs_url="/docs", redoc_url=None)
    settings = settings or ServerSettings()
    mount_api(app, engine, settings)
    protect(app, settings)
    return app
