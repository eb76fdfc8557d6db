"""The local engine: a Qwen2.5-VL loaded on this machine, its input stage and prompt
renderer (caller's thread) and its engine core (device thread) over a KV store."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from ..base import Engine, EngineSnapshot, choice_request
from ..config import DEFAULT_PREFIX_CACHE_GIB, DEFAULT_PREFIX_CACHE_GIB_CPU, EngineConfig
from ..core.beam import BeamParams
from ..core.engine_core import EngineCore
from ..core.graphs import FallbackToEager, GraphedDecode, decode_step_for
from ..core.kvstore import GIB, KVLayout, KVStore, plan_rows
from ..core.prefix import PrefixCache
from ..core.runner import ModelRunner, encoder_cache
from ..core.scheduler import WorkItem
from ..core.stats import StatsLogger, bounded_cache_figures
from ..errors import EngineError, InvalidRequestError
from ..inputs.media import MediaPolicy
from ..inputs.prompt import CachingImageProcessor, PreparedPrompt, PromptRenderer
from ..inputs.stage import InputStage
from ..inputs.validation import validate_for_model
from ..model.device import select_device
from ..model.loader import LoadedModel, load_model
from ..stream import RequestHandle
from ..structured import Constraint, StructuredOutputs
from ..types import (Conversation, Finished, GenerationRequest, ImageInput, Message,
                     SamplingParams)

log = logging.getLogger("engine")


class LocalEngine(Engine):
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        super().__init__()
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.model_name = loaded.name
        self.is_tiny = loaded.is_tiny
        if loaded.is_tiny:
            from ..tiny import describe

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
        self.prefix = self._prefix_cache()
        self.runner = self._runner()
        self.core = EngineCore(self.runner, loaded.processor.tokenizer,
                               max_queue=self.config.max_queue,
                               prefill_chunk=self.config.max_num_batched_tokens,
                               on_finish=self._on_request_finished, prefix=self.prefix)
        self.scheduler = self.core.scheduler
        self._structured: StructuredOutputs | None = None
        self._structured_lock = threading.Lock()
        self.stats = StatsLogger(self.snapshot, self.config.log_stats_interval)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (its processor's): token ids to text and back."""
        return self.loaded.processor.tokenizer

    def sampling_defaults(self) -> dict[str, float]:
        from ..core.sampler import model_defaults

        return model_defaults(self.core.generation_config)

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

    def _prefix_cache(self) -> PrefixCache | None:
        if not self.config.prefix_cache:
            return None
        budget = self.config.prefix_cache_gib or (
            DEFAULT_PREFIX_CACHE_GIB_CPU if self.device.kind == "cpu" else DEFAULT_PREFIX_CACHE_GIB)
        return PrefixCache(self.kv, int(budget * GIB))

    def _runner(self) -> ModelRunner:
        """The model runner, with its decode step captured where the device allows it."""
        encoder_bytes = int(self.config.encoder_cache_mb * 1024 * 1024) \
            if self.config.prefix_cache else 0
        runner = ModelRunner(self.loaded.model, self.kv, self.device,
                             encoder_cache(encoder_bytes), prefix=self.prefix)
        runner.decode_step = decode_step_for(runner, self.config.enforce_eager,
                                             self.config.npu_graphs, self.kv.rows,
                                             self.max_model_len)
        return runner

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LocalEngine":
        device = select_device(config.device, config.dtype)
        loaded = load_model(config, device)   # it also picks the CPU's threads
        engine = cls(loaded, config)
        if config.warmup:
            engine.warmup()
        return engine

    def _on_request_finished(self, item: WorkItem, event: Finished) -> None:
        self._notify_finished(item.request, event)

    def render(self, request: GenerationRequest,
               policy: MediaPolicy | None = None) -> PreparedPrompt:
        """What `submit` hands the engine core, short of queueing it: the request checked,
        its media loaded and the prompt rendered (token ids, text, pixel values, media
        spans). Bad input raises InvalidRequestError, as from `submit`."""
        self.inputs.validate(request, self.max_model_len)
        validate_for_model(request.sampling, self.core.vocab_size, self.config.max_logprobs,
                           min(self.kv.rows, self.scheduler.max_batch))
        return self.renderer.prepare(request, policy)

    def tokenize(self, prompt: str | GenerationRequest, policy: MediaPolicy | None = None,
                 add_special_tokens: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            return self.render(prompt, policy).inputs["input_ids"][0].tolist()
        if len(prompt) > self.inputs.max_prompt_chars:
            raise InvalidRequestError(
                f"The prompt has {len(prompt)} characters, more than the "
                f"{self.inputs.max_prompt_chars} this server accepts (see --max-prompt-chars).",
                param="prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def detokenize(self, tokens: list[int]) -> str:
        vocab = len(self.tokenizer)
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"Token id {bad} is out of vocabulary (0 to {vocab - 1}).",
                                      param="tokens")
        return self.tokenizer.decode(tokens)

    def submit(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> RequestHandle:
        """One row for the request (its `n` is for `submit_choices`); for a beam search,
        the best answer's handle."""
        if request.sampling.use_beam_search:
            return self.submit_beams(request, policy)[0]
        self._check_alive()
        prompt = self.render(request, policy)
        return self.core.submit(request, prompt, self._bad_words(request),
                                self._constraint(request, prompt))

    def submit_choices(self, request: GenerationRequest,
                       policy: MediaPolicy | None = None) -> list[RequestHandle]:
        """The request's n choices (engine.base.choice_request: seed + i, own ids), its
        prompt prepared once and prefilled once: the engine core admits them together and
        the others copy the first one's KV. Each handle cancels only its own choice. With
        use_beam_search: `submit_beams`."""
        if request.sampling.use_beam_search:
            return self.submit_beams(request, policy)
        if request.sampling.n <= 1:
            return [self.submit(request, policy)]
        self._check_alive()
        prompt = self.render(request, policy)
        if request.sampling.seed == -1:       # vLLM: no seed, for every choice
            request = dataclasses.replace(
                request, sampling=dataclasses.replace(request.sampling, seed=None))
        choices = [choice_request(request, i) for i in range(request.sampling.n)]
        return self.core.submit_group(choices, prompt, self._bad_words(request),
                                      self._constraint(request, prompt))

    def submit_beams(self, request: GenerationRequest,
                     policy: MediaPolicy | None = None) -> list[RequestHandle]:
        """vLLM's beam search of width `sampling.n` (engine.core.beam): one handle per
        answer, best first, each answer whole at the end (nothing streams token by token);
        a cancel of any handle ends them all. The temperature defaults to the model's, as
        vLLM's server takes it; the answers' request ids are the choices' (base.choice_request)."""
        self._check_alive()
        prompt = self.render(request, policy)
        sp = request.sampling
        params = BeamParams.of(sp, prompt.max_new_tokens, self.tokenizer.eos_token_id,
                               self.sampling_defaults()["temperature"])
        no_prompt_logprobs = dataclasses.replace(sp, prompt_logprobs=None)   # vLLM computes none
        answers = [choice_request(dataclasses.replace(request, sampling=no_prompt_logprobs), i)
                   for i in range(sp.n)]
        return self.core.submit_beams(answers, prompt, params)

    def _check_alive(self) -> None:
        if not self.core.is_alive():
            raise EngineError("The engine core has stopped; restart the server.")

    def _constraint(self, request: GenerationRequest, prompt: PreparedPrompt) -> Constraint | None:
        """The request's structured output compiled (here, in the submitting thread, never
        on the device thread), or None."""
        spec = request.sampling.structured
        if spec is None:
            return None
        with self._structured_lock:
            if self._structured is None:   # the tokenizer's llguidance form: built once
                self._structured = StructuredOutputs(self.tokenizer, self.core.vocab_size,
                                                     self.core.eos_ids)
        return self._structured.prepare(spec, prompt.max_new_tokens)

    def _bad_words(self, request: GenerationRequest) -> tuple[tuple[int, ...], ...]:
        """The request's bad_words as the token sequences the sampler bans (vLLM tokenizes
        each word alone and after a space)."""
        if not request.sampling.bad_words:
            return ()
        from ..core.sampler import bad_words_token_ids

        try:
            words = bad_words_token_ids(self.tokenizer, request.sampling.bad_words)
        except ValueError as exc:
            raise InvalidRequestError(f"{exc} (parameter=bad_words, "
                                      f"value={request.sampling.bad_words})",
                                      param="bad_words") from None
        return tuple(tuple(ids) for ids in words)

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
        return self.core.is_alive()

    def queue_position(self, request_id: str) -> int | None:
        return self.core.queue_position(request_id)

    def queue_depth(self) -> int:
        return self.core.queue_depth()

    def snapshot(self) -> EngineSnapshot:
        done, prompt, generated = self.core.totals()
        graphed = self._graphed_decode()
        pixels = self.renderer.processor.image_processor
        return EngineSnapshot(
            waiting=self.core.queue_depth(), running=self.core.running_count(),
            largest_batch=self.scheduler.largest_batch, steps_run=self.scheduler.steps_run,
            requests_finished=done, prompt_tokens=prompt, generation_tokens=generated,
            prompt_tokens_computed=self.core.prompt_tokens_computed,
            kv_rows=self.kv.rows, kv_free_rows=self.kv.free_rows(), kv_usage=self.core.kv_usage(),
            decode_captured=graphed is not None,
            decode_replays=graphed.replays if graphed is not None else 0,
            **self.core.cache_figures(),
            **bounded_cache_figures("picture_cache", self.inputs.pictures.cache),
            **bounded_cache_figures("pixel_cache", pixels.cache if isinstance(
                pixels, CachingImageProcessor) else None))

    def _graphed_decode(self) -> GraphedDecode | None:
        """The captured decode step, once its graphs are captured; None while it runs eager
        (a device without capture, --enforce-eager, or a capture that failed)."""
        step = self.runner.decode_step
        if isinstance(step, FallbackToEager) and step.captured and step.graphed.graphs:
            return step.graphed
        return None

    def close(self) -> None:
        self.stats.close()
        self.core.close()


__all__ = ["LocalEngine"]
