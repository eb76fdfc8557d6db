"""The remote engine: the same Engine interface, served by any OpenAI-compatible
server (`vllm serve Qwen/Qwen2.5-VL-7B-Instruct` on vllm-ascend, or another
instance of this demo), so the UI and our API can sit in front of a bigger
deployment without knowing it.

Media are loaded here under the request's MediaPolicy (so the remote never
fetches a URL or reads a file on our behalf) and sent as data: URIs. Each
request streams over its own HTTP response, read by a background thread that
feeds the RequestHandle; cancelling shuts the socket, which makes the remote
abort the request too. The remote's errors, in vLLM's nested shape or its
older flat one, become the same EngineError subclasses the local engine
raises. Connecting waits at most 5 s; reading at most `remote_timeout`
between bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import socket
import threading
import time
from typing import Any

import httpx
from PIL import Image

from ..base import Engine, choice_request
from ..config import REMOTE_URL_NEEDED, EngineConfig
from ..errors import (DeviceOutOfMemoryError, EngineBusyError, EngineError, InvalidRequestError,
                     ModelLoadError, ModelNotFoundError)
from ..inputs.stage import InputStage, LoadedImage, LoadedMessage, LoadedVideo, close_all
from ..inputs.media import MediaPolicy
from ..stream import RequestHandle
from ..types import (Finished, FinishReason, GenerationRequest, RequestStats,
                     SamplingParams, TextDelta, TokenLogprob, TopLogprob)

log = logging.getLogger("engine.requests")

CONNECT_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 3.0
HEALTH_TTL_S = 2.0
MAX_ERROR_BODY = 64 * 1024
PNG_MAX_PIXELS = 1024 * 1024   # larger images go as JPEG (quality 95) to keep requests small


class RemoteUnavailableError(EngineError):
    """The remote server cannot be reached, or stopped answering."""

    code = 503
    type = "ServiceUnavailableError"


class RemoteError(EngineError):
    """The remote answered, but with nothing we can use (a 5xx, a refused key, garbage)."""

    code = 502
    type = "BadGatewayError"


# --------------------------------------------------------------------------- helpers
def api_base(url: str) -> str:
    """`http://host:8000`, `.../v1` and `.../v1/chat/completions` all mean `http://host:8000/v1`."""
    url = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/models"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url if url.endswith("/v1") else url + "/v1"


def _error_fields(payload: Any) -> tuple[str | None, str | None, int | None]:
    """(message, param, code) from vLLM's nested error, its older flat one, or FastAPI's."""
    if not isinstance(payload, dict):
        return None, None, None
    err = payload.get("error")
    if isinstance(err, dict):
        payload = err
    elif isinstance(err, str):
        return err, None, None
    elif "detail" in payload and "message" not in payload:
        return str(payload["detail"]), None, None
    code = payload.get("code")
    return (payload.get("message"), payload.get("param"),
            code if isinstance(code, int) else None)


def remote_error(status: int, message: str | None, param: str | None = None) -> EngineError:
    """The EngineError a remote failure means for our callers."""
    message = (message or "").strip() or f"HTTP {status}"
    if status in (400, 413, 422):
        return InvalidRequestError(message, param=param)
    if status == 404:
        return ModelNotFoundError(message, param=param or "model")
    if status in (429, 503):
        return EngineBusyError(f"The remote server is busy: {message}")
    if status in (401, 403):
        return RemoteError(f"The remote server refused our API key (HTTP {status}: {message}); "
                           "check --remote-api-key.")
    if "out of memory" in message.lower():
        return DeviceOutOfMemoryError(f"The remote server ran out of memory: {message}")
    return RemoteError(f"The remote server failed (HTTP {status}): {message}")


def error_from_body(status: int, body: bytes) -> EngineError:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    message, param, _ = _error_fields(payload)
    if message is None:
        message = body.decode("utf-8", "replace").strip()[:300]
    return remote_error(status, message, param)


MM_KWARGS_REFUSED = ("The remote server refuses per-request mm_processor_kwargs: start it with "
                     "--trust-request-mm-kwargs, or run this app without --remote-mm-kwargs "
                     "(pictures are then resized here). The remote said: ")


def image_data_uri(picture: Image.Image) -> str:
    """A loaded picture (already at its resized size: its sides are multiples of 28, so the
    remote's own smart_resize leaves it as it is and its default bounds give the same image
    tokens) as a data: URI; the remote never fetches a URL or reads a file for us."""
    buf = io.BytesIO()
    if picture.width * picture.height <= PNG_MAX_PIXELS:
        picture.save(buf, format="PNG")
        mime = "image/png"
    else:
        picture.save(buf, format="JPEG", quality=95)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def video_data_uri(video: LoadedVideo) -> str:
    path = video.file.path
    suffix = path.suffix.lower().lstrip(".") or "mp4"
    mime = {"mov": "video/quicktime", "mkv": "video/x-matroska", "avi": "video/x-msvideo"}.get(
        suffix, f"video/{suffix}")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def serialise(message: LoadedMessage) -> dict:
    """One loaded message as OpenAI content, parts in order, with its tool fields."""
    texts = [p for p in message.parts if isinstance(p, str)]
    content: str | list[dict]
    if not message.has_media and len(texts) <= 1:
        content = message.text
    else:
        content = []
        for part in message.parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            elif isinstance(part, LoadedImage):
                content.append({"type": "image_url",
                                "image_url": {"url": image_data_uri(part.picture)}})
            else:
                content.append({"type": "video_url", "video_url": {"url": video_data_uri(part)}})
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls is not None:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_controls(conv: Any) -> dict[str, Any]:
    """How the remote's chat template renders (vLLM's field names), only what differs from
    the defaults."""
    body: dict[str, Any] = {}
    if not conv.add_generation_prompt:
        body["add_generation_prompt"] = False
    if conv.continue_final_message:
        body["continue_final_message"] = True
    if conv.chat_template_kwargs:
        body["chat_template_kwargs"] = dict(conv.chat_template_kwargs)
    if conv.tools is not None:
        # The template still renders them, but the remote must answer with the model's own
        # text: this server parses tool calls and forces them itself (server/tools.py), and
        # vLLM's default with tools ("auto") would take the calls out of the text.
        body["tools"] = conv.tools
        body["tool_choice"] = "none"
    return body


# SamplingParams fields that are not sent under their own name: max_tokens is always sent;
# n is realised as n requests (Engine.submit_choices, seeded as vLLM seeds its children),
# except for a beam search: use_beam_search, n (the width) and length_penalty go in one
# request whose n answers are split (RemoteEngine.submit_choices); logprobs is named
# differently by chat and completions; cap_to_context is our own (vLLM's server always caps);
# structured is sent as vLLM's structured_outputs.
NOT_FORWARDED = frozenset({"max_tokens", "n", "logprobs", "cap_to_context", "structured",
                           "use_beam_search", "length_penalty"})
_DEFAULTS = SamplingParams()


def sampling_body(sp: SamplingParams, chat: bool) -> dict[str, Any]:
    """Every sampling field under vLLM's name, each only where it differs from the default,
    so an older server never sees a field it does not know unless the request needs it."""
    body: dict[str, Any] = {}
    for f in dataclasses.fields(SamplingParams):
        value = getattr(sp, f.name)
        if f.name in NOT_FORWARDED or value == getattr(_DEFAULTS, f.name):
            continue
        body[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    if "logit_bias" in body or sp.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in sp.logit_bias.items()}
    structured = getattr(sp, "structured", None)
    if structured is not None:
        body["structured_outputs"] = {k: v for k, v in dataclasses.asdict(structured).items()
                                      if v not in (None, False)}
    if sp.logprobs is not None:
        body.update({"logprobs": True, "top_logprobs": sp.logprobs} if chat
                    else {"logprobs": sp.logprobs})
    if sp.use_beam_search:
        body.update(use_beam_search=True, n=sp.n, length_penalty=sp.length_penalty)
    if sp.logprobs is not None or sp.prompt_logprobs is not None or sp.use_beam_search:
        body["return_token_ids"] = True      # the ids behind the logprobs, each beam's tokens
    return body


def _rank(logprob: float, top: list[TopLogprob]) -> int:
    """1 + the candidates more likely than the token: its rank when it is among them (vLLM's
    chat logprobs do not say), else the least it can be."""
    return 1 + sum(1 for t in top if t.logprob > logprob)


def chat_logprobs(payload: Any, ids: list[int]) -> list[TokenLogprob] | None:
    """vLLM's chat logprobs ({"content": [{token, logprob, top_logprobs}]}). Token ids come
    from return_token_ids; a candidate's id is known only when it is the chosen token (-1
    otherwise: chat logprobs carry no ids)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("content"), list):
        return None
    out = []
    for i, entry in enumerate(payload["content"]):
        token_id = ids[i] if i < len(ids) else -1
        top = [TopLogprob(t["token"], token_id if t["token"] == entry["token"] else -1,
                          float(t["logprob"])) for t in entry.get("top_logprobs") or []]
        out.append(TokenLogprob(entry["token"], token_id, float(entry["logprob"]),
                                _rank(float(entry["logprob"]), top), top))
    return out


def completion_logprobs(payload: Any, ids: list[int]) -> list[TokenLogprob] | None:
    """vLLM's completions logprobs ({tokens, token_logprobs, top_logprobs: [{text: lp}]})."""
    if not isinstance(payload, dict) or not isinstance(payload.get("tokens"), list):
        return None
    out = []
    for i, token in enumerate(payload["tokens"]):
        token_id = ids[i] if i < len(ids) else -1
        logprob = float(payload["token_logprobs"][i])
        cands = (payload.get("top_logprobs") or [])[i] if i < len(
            payload.get("top_logprobs") or []) else None
        top = sorted((TopLogprob(t, token_id if t == token else -1, float(lp))
                      for t, lp in (cands or {}).items()), key=lambda t: -t.logprob)
        out.append(TokenLogprob(token, token_id, logprob, _rank(logprob, top), top))
    return out


def prompt_logprobs(payload: Any, ids: list[int] | None,
                    k: int) -> list[TokenLogprob | None] | None:
    """vLLM's prompt_logprobs ([None, {id: {logprob, rank, decoded_token}}, ...]): each prompt
    token's own entry and its position's k most likely tokens."""
    if not isinstance(payload, list) or not ids:
        return None
    out: list[TokenLogprob | None] = []
    for token_id, entry in zip(ids, payload):
        if not isinstance(entry, dict):
            out.append(None)
            continue
        cands = sorted(((int(t), e) for t, e in entry.items()), key=lambda c: c[1]["rank"])
        top = [TopLogprob(e.get("decoded_token") or "", t, float(e["logprob"]))
               for t, e in cands[:k]]
        own = entry.get(str(token_id)) or {}
        out.append(TokenLogprob(own.get("decoded_token") or "", token_id,
                                float(own.get("logprob", float("-inf"))),
                                int(own.get("rank", 0)), top))
    return out


# --------------------------------------------------------------------------- one call
class _RemoteCall:
    """One HTTP response and the handles it feeds: one, or a beam search's n answers (each
    with its choice's request; a cancel of any of them ends the call, as locally)."""

    def __init__(self, request: GenerationRequest, response: httpx.Response,
                 answers: int = 1) -> None:
        self.request = request
        self.response = response
        self.requests = [request] if answers == 1 else \
            [choice_request(request, i) for i in range(answers)]
        self.handles = [RequestHandle(r.request_id, on_cancel=self.abort) for r in self.requests]

    @property
    def handle(self) -> RequestHandle:
        return self.handles[0]

    @property
    def cancelled(self) -> bool:
        return any(h.cancelled for h in self.handles)

    def abort(self) -> None:
        """Called on cancel, from any thread: shut the socket so a blocked read returns now."""
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Answer:
    """What one remote answer has said so far: per choice its text as deltas (pushed to its
    handle as they come), finish and stop reasons; usage, and the prompt's ids and logprobs.
    Choices past the handles are not ours (n > 1 without beam search is n requests)."""

    def __init__(self, request: GenerationRequest, answers: int = 1) -> None:
        self.request = request
        self.chat = request.prompt is None
        self.first_at: float | None = None
        self.deltas = [0] * answers
        self.tokens = [0] * answers
        self.usage: dict = {}
        self.finish: list[str | None] = [None] * answers
        self.stop_reason: list[str | int | None] = [None] * answers
        self.prompt_ids: list[int] | None = None
        self.prompt_logprobs: Any = None
        self.done = False

    def chunk(self, chunk: dict, handles: list[RequestHandle]) -> None:
        """One streamed chunk (or a whole answer shaped as one)."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        self._prompt(chunk)
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < len(handles):
                continue
            self._prompt(choice)
            delta = self._delta(choice)
            if delta is not None:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                self.deltas[index] += 1
                self.tokens[index] += len(delta.token_ids)
                handles[index].push(delta)
            if choice.get("finish_reason"):
                self.finish[index] = choice["finish_reason"]
                self.stop_reason[index] = choice.get("stop_reason")

    def _prompt(self, holder: dict) -> None:
        """prompt_token_ids and prompt_logprobs: at the top of a chat answer, in a
        completion's choice."""
        if holder.get("prompt_token_ids"):
            self.prompt_ids = list(holder["prompt_token_ids"])
        if holder.get("prompt_logprobs") is not None:
            self.prompt_logprobs = holder["prompt_logprobs"]

    def _delta(self, choice: dict) -> TextDelta | None:
        ids = list(choice.get("token_ids") or [])
        if self.chat:
            text = (choice.get("delta") or choice.get("message") or {}).get("content") or ""
            logprobs = chat_logprobs(choice.get("logprobs"), ids)
        else:
            text = choice.get("text") or ""
            logprobs = completion_logprobs(choice.get("logprobs"), ids)
        if not text and not ids:
            return None
        return TextDelta(text, ids, logprobs)

    def whole(self, raw: bytes, handles: list[RequestHandle]) -> EngineError | None:
        """A whole (not streamed) answer, taken as one chunk."""
        try:
            self.chunk(json.loads(raw), handles)
        except (ValueError, AttributeError, TypeError):
            return RemoteError(f"The remote server sent malformed data: {raw[:100]!r}")
        self.done = True
        return None

    def finished(self, cancelled: bool, error: EngineError | None, index: int = 0) -> Finished:
        """Choice `index`'s final record: a beam's output tokens are its own (usage counts
        all beams together), a single answer's are the usage's."""
        reason: FinishReason
        finish = self.finish[index]
        if cancelled:
            reason, error = "cancelled", None
        elif error is not None:
            reason = "error"
        elif finish is None and not self.done:
            reason, error = "error", RemoteUnavailableError(
                "The remote server closed the stream before the answer was complete.")
        else:
            reason = {"length": "length", "abort": "cancelled"}.get(finish or "stop", "stop")
        request = self.request
        now = time.monotonic()
        output = self.tokens[index] if len(self.finish) > 1 else \
            int(self.usage.get("completion_tokens") or self.deltas[index])
        stats = RequestStats(
            prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
            images=request.conversation.image_count(), videos=request.conversation.video_count(),
            output_tokens=output,
            ttft_s=None if self.first_at is None else self.first_at - request.arrival_time,
            total_s=now - request.arrival_time)
        k = request.sampling.prompt_logprobs
        return Finished(reason, stats, error, stop_reason=self.stop_reason[index],
                        prompt_token_ids=self.prompt_ids,
                        prompt_logprobs=None if k is None else prompt_logprobs(
                            self.prompt_logprobs, self.prompt_ids, k))


# --------------------------------------------------------------------------- the engine
class RemoteEngine(Engine):
    def model_pixel_bounds(self) -> list[tuple[int, int]]:
        """The remote's own bounds, when given: it resizes our (already resized) pictures
        again only where they fall outside them."""
        lo, hi = self.config.remote_min_pixels, self.config.remote_max_pixels
        if lo is None and hi is None:
            return []
        return [(lo or 4 * 28 * 28, hi or 16384 * 28 * 28)]

    def __init__(self, config: EngineConfig, client: httpx.Client | None = None) -> None:
        super().__init__()
        if not config.remote_url:
            raise ModelLoadError(REMOTE_URL_NEEDED)
        self.config = config
        self.base_url = api_base(config.remote_url)
        self.root_url = self.base_url[: -len("/v1")]
        self.read_timeout = float(config.remote_timeout)
        headers = {"Authorization": f"Bearer {config.remote_api_key}"} if config.remote_api_key \
            else {}
        self.client = client or httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=self.read_timeout, write=60.0,
                                  pool=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))
        self.model_name = config.remote_model or ""
        self.max_model_len = config.max_model_len
        self.limit_images = config.limit_images
        self.limit_videos = config.limit_videos
        self.is_tiny = False
        self.inputs = InputStage(config)
        self.max_image_pixels = self.inputs.policy(None).max_image_pixels
        self.max_pixels_limit = self.inputs.max_pixels_limit
        self._lock = threading.Lock()
        self._active: dict[str, _RemoteCall] = {}
        self._health: tuple[float, bool] = (0.0, False)
        try:
            self._read_model_card()
        except EngineError as exc:
            if not config.remote_model:
                raise ModelLoadError(f"Cannot use the remote server at {self.base_url}: "
                                     f"{exc.message}") from None
            log.warning("remote %s: %s (using --remote-model %s)", self.base_url, exc.message,
                        config.remote_model)
        self.device_description = f"remote {self.base_url} ({self.model_name})"

    # ------------------------------------------------------------ remote info
    def _read_model_card(self) -> None:
        """Model name (unless given), max_model_len and tininess from the remote's /v1/models."""
        not_a_list = "The remote's /v1/models is not a model list."
        payload = self._json("GET", f"{self.base_url}/models", not_a_list, timeout=httpx.Timeout(
            CONNECT_TIMEOUT_S, read=min(10.0, self.read_timeout)))
        try:
            cards = [c for c in payload.get("data", []) if isinstance(c, dict) and c.get("id")]
        except AttributeError:
            raise RemoteError(not_a_list) from None
        if not cards:
            raise RemoteError("The remote server lists no models.")
        wanted = self.config.remote_model
        card = next((c for c in cards if c["id"] == wanted), None) if wanted else cards[0]
        if card is None:
            raise ModelNotFoundError(f"The remote server has no model `{wanted}`; it serves: "
                                     f"{', '.join(c['id'] for c in cards)}", param="model")
        self.model_name = card["id"]
        if isinstance(card.get("max_model_len"), int):
            self.max_model_len = card["max_model_len"]
        self.is_tiny = card.get("root") == "tiny"

    def _transport_error(self, exc: httpx.HTTPError) -> EngineError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            return RemoteUnavailableError(f"Cannot connect to the remote server at "
                                          f"{self.base_url}: {exc or type(exc).__name__}")
        if isinstance(exc, httpx.TimeoutException):
            return RemoteUnavailableError(f"The remote server at {self.base_url} sent nothing for "
                                          f"{self.read_timeout:g} s.")
        return RemoteUnavailableError(f"The connection to the remote server at {self.base_url} "
                                      f"failed: {type(exc).__name__}: {exc}")

    def health(self) -> bool:
        """GET the remote's /health, cached for a couple of seconds."""
        with self._lock:
            checked_at, ok = self._health
            if time.monotonic() - checked_at < HEALTH_TTL_S:
                return ok
        try:
            ok = self.client.get(f"{self.root_url}/health",
                                 timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            ok = False
        with self._lock:
            self._health = (time.monotonic(), ok)
        return ok

    # ------------------------------------------------------------ requests
    def build_body(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> dict:
        """The body for a request: /v1/completions' for a raw prompt, else chat.completions',
        for which the input stage loads its media (so it may raise InvalidRequestError exactly
        as the local engine would) and this serialises the parts in order: pictures at their
        resized size, videos as data: URIs. prompt_logprobs are not streamed by vLLM, and a
        beam search answers whole (and its completions refuse to stream), so such a request
        asks for the whole answer at once."""
        sp = request.sampling
        body: dict[str, Any] = {"model": self.model_name, "stream": True,
                                "stream_options": {"include_usage": True},
                                "max_tokens": sp.max_tokens or self.config.default_max_tokens}
        if sp.prompt_logprobs is not None or sp.use_beam_search:   # whole answers anyway
            body["stream"] = False
            del body["stream_options"]
        if request.prompt is not None:
            body["prompt"] = request.prompt
            return {**body, **sampling_body(sp, chat=False)}
        loaded = self.inputs.load(request, policy, self.max_model_len)
        try:
            messages = [serialise(m) for m in loaded]
        finally:
            close_all(loaded)
        fps = next((p.fps for m in loaded for p in m.parts if isinstance(p, LoadedVideo)), None)
        conv = request.conversation
        body.update(messages=messages, **sampling_body(sp, chat=True), **chat_controls(conv))
        if self.config.remote_mm_kwargs and (conv.image_count() or conv.video_count()):
            lo, hi = InputStage.bounds(request)
            mm: dict[str, Any] = {"min_pixels": lo, "max_pixels": hi}
            if fps:
                mm["fps"] = fps
            body["mm_processor_kwargs"] = mm
        return body

    def tokenize(self, prompt: str | GenerationRequest, policy: MediaPolicy | None = None,
                 add_special_tokens: bool = True) -> list[int]:
        """The remote's own /tokenize, with the chat serialised as a completion would be."""
        body: dict[str, Any] = {"model": self.model_name}
        if isinstance(prompt, GenerationRequest) and prompt.prompt is not None:
            self.inputs.validate(prompt, self.max_model_len)
            if not isinstance(prompt.prompt, str):
                return list(prompt.prompt)
            prompt = prompt.prompt
        if isinstance(prompt, str):
            body.update(prompt=prompt, add_special_tokens=add_special_tokens)
        else:
            self.inputs.validate(prompt, self.max_model_len)
            chat = self.build_body(prompt, policy)
            body.update({k: chat[k] for k in ("messages", "mm_processor_kwargs", "tools",
                                              "add_generation_prompt", "continue_final_message",
                                              "chat_template_kwargs") if k in chat})
        url = f"{self.root_url}/tokenize"
        return self._json("POST", url, f"The remote's {url} did not answer JSON.",
                          json=body)["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        url = f"{self.root_url}/detokenize"
        return self._json("POST", url, f"The remote's {url} did not answer JSON.",
                          json={"model": self.model_name, "tokens": list(tokens)})["prompt"]

    def _json(self, method: str, url: str, not_json: str, **kwargs: Any) -> Any:
        """One request to the remote and its JSON answer: a failed connection, a refusal or
        an answer that is not JSON (`not_json` says so) is raised as ours."""
        try:
            resp = self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if resp.status_code != 200:
            raise error_from_body(resp.status_code, resp.content[:MAX_ERROR_BODY])
        try:
            return resp.json()
        except ValueError:
            raise RemoteError(not_json) from None

    def submit(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> RequestHandle:
        """Check, load media, and open the remote stream; the remote's refusal
        (bad input, unknown model, busy) is raised here, before any event. For a beam
        search, the best answer's handle."""
        return self._open(request, policy)[0]

    def submit_choices(self, request: GenerationRequest,
                       policy: MediaPolicy | None = None) -> list[RequestHandle]:
        """As Engine.submit_choices, except that a beam search is one remote request whose
        `n` answers (best first) are split over n handles, each ending with its answer."""
        if request.sampling.use_beam_search:
            return self._open(request, policy)
        return super().submit_choices(request, policy)

    def _open(self, request: GenerationRequest,
              policy: MediaPolicy | None) -> list[RequestHandle]:
        """One remote request and its handles (a beam search's n, else one)."""
        self.inputs.validate(request, self.max_model_len)
        body = self.build_body(request, policy)
        route = "completions" if request.prompt is not None else "chat/completions"
        try:
            response = self.client.send(
                self.client.build_request("POST", f"{self.base_url}/{route}", json=body),
                stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code != 200:
            try:
                data = b""
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= MAX_ERROR_BODY:
                        break
            except httpx.HTTPError:
                pass
            finally:
                response.close()
            error = error_from_body(response.status_code, data)
            if "mm_processor_kwargs" in error.message and "mm_processor_kwargs" in body:
                raise InvalidRequestError(MM_KWARGS_REFUSED + error.message,
                                          param="mm_processor_kwargs")
            raise error
        sp = request.sampling
        call = _RemoteCall(request, response, max(1, sp.n) if sp.use_beam_search else 1)
        with self._lock:
            self._active[request.request_id] = call
        threading.Thread(target=self._pump, args=(call,), daemon=True,
                         name=f"remote-{request.request_id}").start()
        return list(call.handles)

    def _pump(self, call: _RemoteCall) -> None:
        """Read the remote's answer into the handle until [DONE] (or the whole JSON answer of
        a request that is not streamed), an error or a cancel."""
        request = call.request
        state = _Answer(request, len(call.handles))
        error: EngineError | None = None
        try:
            if request.sampling.prompt_logprobs is not None or request.sampling.use_beam_search:
                error = state.whole(call.response.read(), call.handles)
            else:
                error = self._read_stream(call, state)
        except httpx.HTTPError as exc:
            if not call.cancelled:
                error = self._transport_error(exc)
        except Exception as exc:  # never leave a handle without its Finished
            log.exception("remote stream %s failed", request.request_id)
            error = RemoteError(f"Reading the remote stream failed: {type(exc).__name__}: {exc}")
        finally:
            call.response.close()
            with self._lock:
                self._active.pop(request.request_id, None)
        for index, (choice, handle) in enumerate(zip(call.requests, call.handles)):
            event = state.finished(call.cancelled, error, index)
            handle.push(event)
            stats = event.stats
            log.info("request %s (remote): prompt_tokens=%d images=%d videos=%d ttft=%s "
                     "output_tokens=%d tokens/s=%.1f finish=%s%s", choice.request_id,
                     stats.prompt_tokens, stats.images, stats.videos,
                     "-" if stats.ttft_s is None else f"{stats.ttft_s:.3f}s",
                     stats.output_tokens, stats.output_tps, event.reason,
                     f" error={event.error.message!r}" if event.error else "")
            self._notify_finished(choice, event)

    @staticmethod
    def _read_stream(call: _RemoteCall, state: "_Answer") -> EngineError | None:
        """The SSE stream's chunks into `state` (and the handle); the error that ended it."""
        for line in call.response.iter_lines():
            if call.cancelled:
                return None
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                state.done = True
                return None
            try:
                chunk = json.loads(data)
            except ValueError:
                return RemoteError(f"The remote server sent malformed data: {data[:100]!r}")
            if isinstance(chunk, dict) and "error" in chunk:
                message, param, code = _error_fields(chunk)
                return remote_error(code or 500, message, param)
            state.chunk(chunk, call.handles)
        return None

    def queue_depth(self) -> int:
        return 0   # the remote queues; we hold nothing back

    def close(self) -> None:
        with self._lock:
            calls = list(self._active.values())
        for call in calls:
            for handle in call.handles:
                handle.cancel()
        self.client.close()


__all__ = ["RemoteEngine", "RemoteError", "RemoteUnavailableError", "api_base", "remote_error"]
