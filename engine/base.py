"""The one interface every front end talks to. Two implementations: the local
engine (a model on this machine's NPU, GPU or CPU) and the remote engine (an
OpenAI-compatible server such as vllm-ascend). Front ends never know which."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from concurrent.futures import Executor
from dataclasses import dataclass, fields
from typing import Callable

from .config import EngineConfig
from .errors import EngineError, InvalidRequestError
from .inputs.media import MediaPolicy
from .stream import RequestHandle
from .types import Finished, GenerationRequest

FinishListener = Callable[[GenerationRequest, Finished], None]

CACHE_FIGURES = ("prefix_cache_", "encoder_cache_", "picture_cache_", "pixel_cache_")


@dataclass(frozen=True)
class EngineSnapshot:
    """What an engine can say of its state at one moment, read by /metrics, the periodic
    stats line and tests, so none of them reaches into the engine's parts. A figure the
    engine does not know (a remote server's KV cache) is None. Figures are read one by one,
    not under one lock: each is current, together they may be a step apart. Counters count
    since the engine started."""

    waiting: int = 0                       # requests queued, not yet holding a KV row
    running: int | None = None             # requests holding a KV row (prefilling or decoding)
    largest_batch: int | None = None       # most rows one decode step has run
    steps_run: int | None = None           # decode steps run
    requests_finished: int | None = None
    prompt_tokens: int | None = None       # finished requests', and the running ones' so far
    # of those, the ones the model computed (the rest came from the prefix cache, or from
    # the first of a request's n choices, which prefills for all of them)
    prompt_tokens_computed: int | None = None
    generation_tokens: int | None = None
    kv_rows: int | None = None             # requests the KV store holds at once
    kv_free_rows: int | None = None
    kv_usage: float | None = None          # share of the KV store's token positions in use, 0..1
    # The conversation (prefix) cache: prompt tokens looked up and found, memory it holds
    # in KV blocks and memory it has allocated (None: turned off).
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_bytes: int | None = None
    prefix_cache_allocated_bytes: int | None = None
    # The vision encoder's outputs by picture (and video) content.
    encoder_cache_hits: int | None = None
    encoder_cache_misses: int | None = None
    encoder_cache_bytes: int | None = None
    # Decoded, resized pictures by their source's bytes, and their processed pixel values.
    picture_cache_hits: int | None = None
    picture_cache_misses: int | None = None
    picture_cache_bytes: int | None = None
    pixel_cache_hits: int | None = None
    pixel_cache_misses: int | None = None
    pixel_cache_bytes: int | None = None
    decode_captured: bool | None = None    # the decode step replays captured graphs
    decode_replays: int | None = None      # decode steps run by replaying a graph

    def caches(self) -> dict[str, float]:
        """The cache figures the engine has, by name (the names /metrics reports them by)."""
        return {f.name: value for f in fields(self) if f.name.startswith(CACHE_FIGURES)
                and (value := getattr(self, f.name)) is not None}


async def _off_loop(submit: Callable[[], list[RequestHandle]],
                    executor: Executor | None) -> list[RequestHandle]:
    """`submit()` run in `executor`; if the awaiting caller is cancelled meanwhile, the
    handles that still arrive are cancelled too."""
    future = asyncio.get_running_loop().run_in_executor(executor, submit)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def cancel_late(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                for handle in f.result():
                    handle.cancel()
        future.add_done_callback(cancel_late)
        raise


def choice_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index` of an n-choice request as a request of its own: n = 1, seed + index
    (vLLM's child requests), its own id."""
    sampling = dataclasses.replace(request.sampling, n=1)
    if sampling.seed is not None:
        sampling.seed += index
    return dataclasses.replace(request, sampling=sampling,
                               request_id=f"{request.request_id}-{index}")


class Engine(abc.ABC):
    model_name: str          # the name the model is served under
    device_description: str  # e.g. "Ascend910B (npu:0, bfloat16)" or "remote http://..."
    is_tiny: bool = False
    tiny_trained: bool = False   # the built-in tiny model with its shapes training (not random)
    tiny_knows: str = ""         # what the built-in tiny model knows (its folder's marker)
    max_model_len: int = EngineConfig.max_model_len
    limit_images: int = EngineConfig.limit_images
    limit_videos: int = EngineConfig.limit_videos
    # The picture limits every front end bounds its own work by (PDF pages it renders, boxes
    # it draws): the largest decoded picture, and the largest per-picture pixel bound a
    # request may ask for. Engines set them from their EngineConfig.
    max_image_pixels: int = EngineConfig.max_image_pixels
    max_pixels_limit: int = EngineConfig.max_pixels_limit

    def __init__(self) -> None:
        self._listeners: list[FinishListener] = []

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> RequestHandle:
        """Validate and queue a request; bad input raises InvalidRequestError here,
        before anything reaches the device, and a full queue raises EngineBusyError."""

    def submit_choices(self, request: GenerationRequest,
                       policy: MediaPolicy | None = None) -> list[RequestHandle]:
        """One handle per choice for a request with `sampling.n` choices (vLLM's `n`). Here:
        n requests, choice i seeded with seed + i when a seed is set (as vLLM seeds its
        child requests), cancelled together if one cannot be queued. The local engine
        overrides it so that the choices share one prefill, and answers use_beam_search;
        here a beam search is refused (400)."""
        if request.sampling.use_beam_search:
            raise InvalidRequestError("use_beam_search is not supported by this engine.",
                                      param="use_beam_search")
        n = max(1, request.sampling.n)
        if n == 1:
            return [self.submit(request, policy)]
        handles: list[RequestHandle] = []
        try:
            for i in range(n):
                handles.append(self.submit(choice_request(request, i), policy))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    @abc.abstractmethod
    def health(self) -> bool:
        """True while the engine can serve requests."""

    def queue_position(self, request_id: str) -> int | None:
        """0 while running, 1.. while waiting, None when not known."""
        return None

    def queue_depth(self) -> int:
        """Requests waiting for the device (0 where the engine holds none back)."""
        return 0

    def snapshot(self) -> EngineSnapshot:
        """The engine's state now: queue, running requests, KV cache, caches and decode
        step, as far as it knows them (what it does not know is None)."""
        return EngineSnapshot(waiting=self.queue_depth())

    def sampling_defaults(self) -> dict[str, float]:
        """The model's own sampling defaults (its generation_config: temperature, top_p, top_k,
        repetition_penalty), which a request that leaves them unset gets; {} where not known
        (a remote server)."""
        return {}

    def model_pixel_bounds(self) -> list[tuple[int, int]]:
        """Resizes the model's processor applies after ours, as (min_pixels, max_pixels): []
        when the model sees our resized pictures as they are."""
        return []

    def cache_stats(self) -> dict[str, float]:
        """The snapshot's cache figures (hits, queries, bytes), where the engine has them."""
        return self.snapshot().caches()

    def close(self) -> None:
        """Stop serving; cancels what is queued."""

    def add_finish_listener(self, listener: FinishListener) -> None:
        """Called once per request with its final record (for metrics and logs)."""
        self._listeners.append(listener)

    def _notify_finished(self, request: GenerationRequest, event: Finished) -> None:
        for listener in list(self._listeners):
            try:
                listener(request, event)
            except Exception:  # a metrics bug must not break serving
                pass

    async def asubmit(self, request: GenerationRequest, policy: MediaPolicy | None = None,
                      executor: Executor | None = None) -> RequestHandle:
        """`submit` for async callers: preparation (image decoding, a remote's HTTP request)
        runs in a thread, not on the event loop. If the caller is cancelled meanwhile, a
        handle that still arrives is cancelled too, so nothing generates for nobody."""
        handles = await _off_loop(lambda: [self.submit(request, policy)], executor)
        return handles[0]

    async def asubmit_choices(self, request: GenerationRequest,
                              policy: MediaPolicy | None = None,
                              executor: Executor | None = None) -> list[RequestHandle]:
        """`submit_choices` for async callers, as `asubmit` is `submit`'s."""
        return await _off_loop(lambda: self.submit_choices(request, policy), executor)

    def tokenize(self, prompt: str | GenerationRequest, policy: MediaPolicy | None = None,
                 add_special_tokens: bool = True) -> list[int]:
        """The token ids of a text, or of a chat rendered as the model sees it (its pictures'
        placeholder tokens included, the assistant's turn opened); vLLM's /tokenize."""
        raise EngineError("This engine cannot tokenize.")

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids; vLLM's /detokenize."""
        raise EngineError("This engine cannot detokenize.")

    def generate(self, request: GenerationRequest, policy: MediaPolicy | None = None,
                 timeout: float | None = None) -> tuple[str, Finished]:
        """Submit and wait: the whole answer and its final record."""
        return self.submit(request, policy).collect(timeout)
