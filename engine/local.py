"""The local engine: a Qwen2.5-VL loaded on this machine, its prompt renderer
(caller's thread) and its scheduler (device thread) over a KV store."""

from __future__ import annotations

import logging
import time

from .base import Engine
from .config import DEFAULT_PREFIX_CACHE_GIB, DEFAULT_PREFIX_CACHE_GIB_CPU, EngineConfig
from .device import select_device
from .errors import EngineError
from .loader import LoadedModel, load_model
from .media import MediaPolicy
from .inputs import InputStage
from .prompt import PromptRenderer
from .stats import StatsLogger
from .stream import RequestHandle
from .types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                    SamplingParams)
from .graphs import decode_step_for
from .kvstore import GIB, KVLayout, KVStore, plan_rows
from .scheduler import Scheduler, WorkItem
from .prefix import PrefixCache
from .step import ModelRunner, encoder_cache

log = logging.getLogger("engine")


class LocalEngine(Engine):
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        super().__init__()
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.model_name = loaded.name
        self.is_tiny = loaded.is_tiny
        if loaded.is_tiny:
            from .tiny import describe

            marker = describe(loaded.path)
            self.tiny_trained, self.tiny_knows = marker["trained"], marker["knows"]
        self.device = loaded.device
        self.device_description = loaded.device.describe()
        self.max_model_len = self.config.max_model_len
        self.limit_images = self.config.limit_images
        self.limit_videos = self.config.limit_videos
        self.inputs = InputStage(self.config)
        self.max_image_pixels = self.inputs.policy(None).max_image_pixels
        self.max_pixels_limit = self.inputs.max_pixels_limit
        self.renderer = PromptRenderer(loaded.processor, self.inputs, self.max_model_len,
                                       self.config.default_max_tokens,
                                       int(self.config.picture_cache_mb * 1024 * 1024))
        size = getattr(loaded.processor.image_processor, "size", None) or {}
        self._processor_bounds = [(int(size["shortest_edge"]), int(size["longest_edge"]))] \
            if "shortest_edge" in size and "longest_edge" in size else []
        self.kv = self._kv_store()
        caching = self.config.prefix_cache
        runner = ModelRunner(loaded.model, self.kv, loaded.device, encoder_cache(
            int(self.config.encoder_cache_mb * 1024 * 1024) if caching else 0))
        budget = self.config.prefix_cache_gib or (
            DEFAULT_PREFIX_CACHE_GIB_CPU if self.device.kind == "cpu" else DEFAULT_PREFIX_CACHE_GIB)
        self.prefix = PrefixCache(self.kv, int(budget * GIB)) if caching else None
        decode = decode_step_for(runner, self.config.enforce_eager, self.config.npu_graphs,
                                 self.kv.rows, self.max_model_len)
        self.scheduler = Scheduler(runner, loaded.processor.tokenizer, decode=decode,
                                max_queue=self.config.max_queue,
                                prefill_chunk=self.config.max_num_batched_tokens,
                                on_finish=self._on_worker_finish, prefix=self.prefix)
        self.stats = StatsLogger(self.scheduler, self.config.log_stats_interval)

    def sampling_defaults(self) -> dict[str, float]:
        from .sampler import model_defaults

        return model_defaults(self.scheduler.generation_config)

    def model_pixel_bounds(self) -> list[tuple[int, int]]:
        """The model's processor's own bounds (preprocessor_config.json): the real model's
        leave our resized pictures as they are; the built-in tiny model's cap them at the
        size it was trained at."""
        return list(self._processor_bounds)

    def _kv_store(self) -> KVStore:
        layout = KVLayout.of_model(self.loaded.model, self.device.dtype)
        rows = plan_rows(layout, int(self.config.kv_cache_gib * GIB), self.max_model_len,
                         self.config.max_batch)
        store = KVStore(layout, rows, self.max_model_len, self.device.torch_device)
        log.info("KV cache: %d rows of %d tokens, %.2f GiB (%d bytes per token)", rows,
                 self.max_model_len, store.capacity_bytes / GIB, layout.bytes_per_token)
        return store

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LocalEngine":
        device = select_device(config.device, config.dtype)
        loaded = load_model(config, device)
        # A model this small runs faster on one thread: more only add OpenMP hand-offs,
        # which also slow the device thread whenever another thread runs torch operators.
        device.set_cpu_threads(config.cpu_threads or (1 if loaded.is_tiny else None))
        engine = cls(loaded, config)
        if config.warmup:
            engine.warmup()
        return engine

    def _on_worker_finish(self, item: WorkItem, event: Finished) -> None:
        self._notify_finished(item.request, event)

    def submit(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> RequestHandle:
        if not self.scheduler.is_alive():
            raise EngineError("The generation worker has stopped; restart the server.")
        self.inputs.validate(request, self.max_model_len)
        prompt = self.renderer.prepare(request, policy)
        return self.scheduler.submit(request, prompt)

    def warmup(self, with_image: bool = True) -> float:
        """One short generation with a small image, so the first user pays neither for lazy
        initialisation nor for the vision tower's first run. Measured on an H200 (random
        7B, bench/warmup.py): the first image question took 1.09 s to its first token
        without a warm-up, 0.56 s after a text-only one and 0.26 s after one with an image."""
        from PIL import Image

        start = time.monotonic()
        images = [ImageInput(Image.new("RGB", (224, 224), (128, 128, 128)))] if with_image else []
        req = GenerationRequest(Conversation([Message("user", "Hello", images=images)]),
                                SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                request_id="warmup")
        _, fin = self.generate(req, timeout=600)
        took = time.monotonic() - start
        if fin.reason == "error":
            log.warning("warm-up failed: %s", fin.error)
        else:
            log.info("warm-up took %.2fs", took)
        return took

    def health(self) -> bool:
        return self.scheduler.is_alive()

    def queue_position(self, request_id: str) -> int | None:
        return self.scheduler.queue_position(request_id)

    def queue_depth(self) -> int:
        return self.scheduler.queue_depth()

    def running_count(self) -> int:
        return self.scheduler.running_count()

    def kv_cache_usage(self) -> float:
        return self.kv.usage()

    def cache_stats(self) -> dict[str, float]:
        return self.scheduler.cache_figures()

    def close(self) -> None:
        self.stats.close()
        self.scheduler.close()


__all__ = ["LocalEngine"]
