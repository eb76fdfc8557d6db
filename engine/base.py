"""The one interface every front end talks to. Two implementations: the local
engine (a model on this machine's NPU, GPU or CPU) and the remote engine (an
OpenAI-compatible server such as vllm-ascend). Front ends never know which."""

from __future__ import annotations

import abc
import asyncio
from concurrent.futures import Executor
from typing import Callable

from .config import DEFAULT_MAX_PIXELS_LIMIT
from .media import MediaPolicy
from .stream import RequestHandle
from .types import Finished, GenerationRequest

FinishListener = Callable[[GenerationRequest, Finished], None]


class Engine(abc.ABC):
    model_name: str          # the name the model is served under
    device_description: str  # e.g. "Ascend910B (npu:0, bfloat16)" or "remote http://..."
    is_tiny: bool = False
    tiny_trained: bool = False   # the built-in tiny model with its shapes training (not random)
    tiny_knows: str = ""         # what the built-in tiny model knows (its folder's marker)
    max_model_len: int = 16384
    limit_images: int = 10
    limit_videos: int = 2
    # The picture limits every front end bounds its own work by (PDF pages it renders, boxes
    # it draws): the largest decoded picture, and the largest per-picture pixel bound a
    # request may ask for. Engines set them from their EngineConfig.
    max_image_pixels: int = MediaPolicy.max_image_pixels
    max_pixels_limit: int = DEFAULT_MAX_PIXELS_LIMIT

    def __init__(self) -> None:
        self._listeners: list[FinishListener] = []

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> RequestHandle:
        """Validate and queue a request; bad input raises InvalidRequestError here,
        before anything reaches the device, and a full queue raises EngineBusyError."""

    @abc.abstractmethod
    def health(self) -> bool:
        """True while the engine can serve requests."""

    def queue_position(self, request_id: str) -> int | None:
        """0 while running, 1.. while waiting, None when not known."""
        return None

    def queue_depth(self) -> int:
        return 0

    def running_count(self) -> int | None:
        """Requests generating now, where the engine knows (None for a remote server)."""
        return None

    def kv_cache_usage(self) -> float | None:
        """Share of the KV cache in use (0..1), where the engine has one."""
        return None

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
        """Prefix and encoder cache counters (hits, queries, bytes), where the engine has them."""
        return {}

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
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(executor, self.submit, request, policy)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            def cancel_late(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    f.result().cancel()
            future.add_done_callback(cancel_late)
            raise

    def generate(self, request: GenerationRequest, policy: MediaPolicy | None = None,
                 timeout: float | None = None) -> tuple[str, Finished]:
        """Submit and wait: the whole answer and its final record."""
        return self.submit(request, policy).collect(timeout)
