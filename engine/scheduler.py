"""The device thread's scheduler: continuous batching over one model.

At every iteration it admits waiting requests into free KV rows, prefills them (a token
budget per iteration, so a long prompt is chunked and never stalls the running streams
for long), runs one batched decode step for every running row, samples each row with its
own settings, streams each row's text, and retires finished or cancelled rows at once. A
second user's question therefore starts after at most one decode step and its own
prefill, whatever the first user is generating, and requests with different settings
share every step.

`submit` is thread-safe and never blocks on the device."""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .device import Device
from .errors import DeviceOutOfMemoryError, EngineBusyError, EngineError
from .kvstore import KVStore
from .output import RowState, TokenPieces
from .prefix import PrefixCache, block_keys
from .prompt import PreparedPrompt
from .sampler import RowSampler, resolve, sample
from .step import ModelRunner, PromptEmbedding
from .stream import RequestHandle
from .types import Finished, FinishReason, GenerationRequest, RequestStats

log = logging.getLogger("engine.requests")

DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class WorkItem:
    request: GenerationRequest
    prompt: PreparedPrompt
    handle: RequestHandle


@dataclass
class Sequence:
    """A request holding a KV row: prefilling until `prefilled` reaches the prompt's
    length, then decoding one token per step."""

    item: WorkItem
    row: int
    out: RowState
    sampler: RowSampler
    admitted_at: float
    prompt_ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)   # the prompt's full blocks (prefix cache)
    generated: list[int] = field(default_factory=list)
    cached: int = 0            # prompt tokens whose KV came from the prefix cache
    embedding: PromptEmbedding | None = None
    prefilled: int = 0
    length: int = 0            # tokens whose KV is in the row
    delta: int = 0             # M-RoPE offset of text positions after the prompt
    last_token: int = 0

    @property
    def handle(self) -> RequestHandle:
        return self.item.handle


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()   # torch_npu raises RuntimeError("NPU out of memory...")


def _step_error(exc: Exception) -> EngineError:
    if is_out_of_memory(exc):
        return DeviceOutOfMemoryError(
            "The device ran out of memory for this request. Try fewer or smaller images, "
            "a shorter conversation or fewer max tokens.")
    log.exception("model step failed")
    return EngineError(f"Generation failed: {type(exc).__name__}: {exc}")


class Scheduler:
    """Owns the device: a step loop over a KVStore, fed by a bounded queue."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, *, decode: Any = None,
                 max_queue: int = 32, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 on_finish: Callable[[WorkItem, Finished], None] | None = None,
                 generation_config: Any = None, prefix: PrefixCache | None = None) -> None:
        model = runner.model
        self.prefix = prefix
        self.tokenizer = copy.deepcopy(tokenizer)   # its own copy: decoding here, encoding elsewhere
        self.pieces = TokenPieces(self.tokenizer)
        self.runner = runner
        self.device: Device = runner.device
        self.kv: KVStore = runner.kv
        self.decode_step = decode or runner     # a captured step (engine.graphs) or eager
        self.max_batch = self.kv.rows           # rows decoding at once (a bench may lower it)
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.on_finish = on_finish
        self.generation_config = generation_config or model.generation_config
        eos = self.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        pad = self.generation_config.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids or {0}))
        self.vocab_size = model.config.get_text_config().vocab_size
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Sequence] = []     # admitted, in admission order (device thread)
        self._stopping = False
        self._done_totals = (0, 0, 0)   # finished requests: (count, prompt tokens, generated)
        self.steps_run = 0               # decode steps, and the rows they decoded in all
        self.rows_decoded = 0
        self.largest_batch = 0
        self._flushed_at = 0.0
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, request: GenerationRequest, prompt: PreparedPrompt) -> RequestHandle:
        """Queue a prepared request; EngineBusyError past the queue bound."""
        with self._cond:
            if self._stopping:
                raise EngineError("The engine is shutting down.")
            if len(self._queue) >= self.max_queue:
                raise EngineBusyError(
                    f"The server is busy: {len(self._queue)} requests are already waiting. "
                    "Please try again shortly.")
            # The cancel callback reaches the item through a weak reference: a closure over
            # the item itself made a cycle (handle -> callback -> item -> handle) that kept
            # every finished request's tensors, images and data: URIs alive until Python's
            # rare full garbage collection (hundreds of MB under concurrent image requests).
            item_ref: weakref.ref[WorkItem] | None = None

            def cancel_queued() -> None:
                queued = item_ref() if item_ref is not None else None
                if queued is not None:
                    self._cancel_queued(queued)
                else:
                    self._wake()

            handle = RequestHandle(request.request_id, on_cancel=cancel_queued)
            item = WorkItem(request, prompt, handle)
            item_ref = weakref.ref(item)
            self._queue.append(item)
            self._cond.notify_all()
        return handle

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def running_count(self) -> int:
        with self._cond:
            return len(self._active)

    def kv_usage(self) -> float:
        return self.kv.usage()

    def totals(self) -> tuple[int, int, int]:
        """(requests finished, prompt tokens, generated tokens) so far, the running rows
        counted as far as they got: the periodic stats line takes differences of these."""
        with self._cond:
            done, prompt, generated = self._done_totals
            for seq in self._active:
                if seq.handle.finished is None:
                    prompt += seq.prefilled
                    generated += seq.handle.tokens
            return done, prompt, generated

    def queue_position(self, request_id: str) -> int | None:
        """0 while running, 1.. while waiting, None when unknown or finished."""
        with self._cond:
            if any(s.item.request.request_id == request_id for s in self._active):
                return 0
            for pos, item in enumerate(self._queue, start=1):
                if item.request.request_id == request_id:
                    return pos
        return None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            active = list(self._active)
            self._cond.notify_all()
        for item in pending:
            self._finish(item, "cancelled", RequestStats())
        for seq in active:
            seq.handle.cancel()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the loop
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _cancel_queued(self, item: WorkItem) -> None:
        with self._cond:
            try:
                self._queue.remove(item)
            except ValueError:        # admitted already: the loop sees the cancel
                self._cond.notify_all()
                return
        self._finish(item, "cancelled", self._stats(item, None, 0, time.monotonic()))

    def _loop(self) -> None:
        self.device.bind_thread()
        self.decode_step.prepare()        # graph capture, on the thread that replays them
        while self._wait_for_work():
            try:
                self._iterate()
            except BaseException as exc:  # never let the device thread die
                log.exception("scheduler: unexpected failure")
                self._fail(list(self._active), EngineError(str(exc)))
        self._fail(list(self._active), None)

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self._queue and not self._active:
                self._cond.wait()
            return not self._stopping

    def _iterate(self) -> None:
        self._admit()
        self._retire([s for s in self._active if s.handle.cancelled], "cancelled")
        self._prefill()
        self._decode()

    def _admit(self) -> None:
        """Waiting requests into free KV rows, in arrival order."""
        while True:
            with self._cond:
                if (not self._queue or self.kv.free_rows() == 0
                        or len(self._active) >= self.max_batch):
                    return
                item = self._queue.popleft()
                row = self.kv.allocate()
                seq = self._new_sequence(item, row)
                self._active.append(seq)

    def _new_sequence(self, item: WorkItem, row: int) -> Sequence:
        ids = item.prompt.inputs["input_ids"][0]
        settings = resolve(item.request.sampling, self.generation_config, self.eos_ids)
        sampler = RowSampler(settings, ids, self.vocab_size, self.device.torch_device)
        out = RowState(item, self.tokenizer, self.eos_ids, self.pieces)
        return Sequence(item, row, out, sampler, time.monotonic(), prompt_ids=ids.tolist())

    # ------------------------------------------------------------ prefill
    def _prefill(self) -> None:
        """Prompt tokens of admitted requests, at most `prefill_chunk` in this iteration."""
        budget = self.prefill_chunk
        for seq in [s for s in self._active if s.embedding is not None or s.prefilled == 0]:
            if budget <= 0:
                break
            try:
                budget -= self._prefill_one(seq, budget)
            except Exception as exc:
                self._fail([seq], _step_error(exc))
                self.device.empty_cache()

    def _prefill_one(self, seq: Sequence, budget: int) -> int:
        with torch.inference_mode():
            if seq.embedding is None:
                self._start_prefill(seq)
            start = seq.prefilled
            end = min(seq.embedding.length, start + budget)
            logits = self.runner.prefill(seq.row, seq.embedding, start, end)
        seq.prefilled = seq.length = end
        if end < seq.embedding.length:
            return end - start
        seq.embedding = None                      # prompt done: its tensors go
        token = sample(logits[None], [seq.sampler])[0]
        self._accept([seq], [token], time.monotonic())
        return end - start

    def _start_prefill(self, seq: Sequence) -> None:
        """The cached part of the prompt into the row, the rest embedded (its pictures from
        the encoder cache where they are there)."""
        prompt = seq.item.prompt
        if self.prefix is not None:
            seq.keys = block_keys(seq.prompt_ids, prompt.media, self.prefix.block_size)
            seq.cached = self.prefix.match(seq.keys, len(seq.prompt_ids))
            self.prefix.load(seq.row, seq.keys, seq.cached)
        seq.embedding = self.runner.embed(prompt.inputs, prompt.media, skip_before=seq.cached)
        seq.delta = seq.embedding.delta
        seq.prefilled = seq.length = seq.cached

    def _keep(self, seq: Sequence) -> None:
        """The row's KV into the prefix cache, for the next turn of its chat (or anyone
        whose prompt starts the same): every full block of prompt and answer it holds."""
        if self.prefix is None or seq.length < self.prefix.block_size:
            return
        size = self.prefix.block_size
        tokens = (seq.prompt_ids + seq.generated)[:seq.length]
        keys = block_keys(tokens, seq.item.prompt.media, size,
                          known=seq.keys[:seq.length // size])
        self.prefix.store(seq.row, keys)

    def cache_figures(self) -> dict[str, float]:
        """Prefix and encoder cache figures for /metrics and the periodic line."""
        encoder = self.runner.encoder_cache
        out = {"encoder_cache_hits": encoder.hits, "encoder_cache_misses": encoder.misses,
               "encoder_cache_bytes": encoder.bytes}
        if self.prefix is not None:
            out.update(prefix_cache_queries=self.prefix.stats.queries,
                       prefix_cache_hits=self.prefix.stats.hits,
                       prefix_cache_bytes=self.prefix.cached_bytes)
        return out

    # ------------------------------------------------------------- decode
    def _decode(self) -> None:
        rows = [s for s in self._active if s.embedding is None and s.prefilled > 0
                and not s.out.done]
        if not rows:
            return
        span = max(s.row for s in rows) + 1
        batch = self.decode_step.batch_size_for(span)
        ids, positions = [self.pad_id] * batch, [0] * batch
        write_pos, seen = [self.kv.scratch] * batch, [0] * batch   # padding rows
        for s in rows:
            ids[s.row], positions[s.row] = s.last_token, s.length + s.delta
            write_pos[s.row] = seen[s.row] = s.length
        longest = max(s.length for s in rows) + 1
        kv_len = self.decode_step.kv_len_for(longest)
        dev = self.device.torch_device
        order = [s.row for s in rows]
        try:
            with torch.inference_mode():       # one host-to-device copy for all four inputs
                inputs = torch.tensor([ids, positions, write_pos, seen]).to(dev).unbind(0)
                logits = self.decode_step.decode(*inputs, kv_len,
                                                 batch == 1 and kv_len == longest)
                if order != list(range(batch)):   # padding or gaps: the running rows only
                    logits = logits[torch.tensor(order, device=dev)]
                tokens = sample(logits, [s.sampler for s in rows])
        except Exception as exc:
            self._fail(rows, _step_error(exc))
            self.device.empty_cache()
            return
        self.steps_run += 1
        self.rows_decoded += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        for s in rows:
            s.length += 1
            self.kv.lengths[s.row] = s.length
        self._accept(rows, tokens, time.monotonic())

    def _accept(self, rows: list[Sequence], tokens: list[int], now: float) -> None:
        """Each row's new token: sampler state, text out, and the end of finished rows."""
        flush = now - self._flushed_at >= RequestHandle.notify_interval_s
        ended = []
        for seq, token in zip(rows, tokens):
            first = seq.out.first_token_at is None
            seq.last_token = token
            seq.generated.append(token)
            seq.sampler.append(token)
            seq.out.on_token(token, now)
            if seq.out.done:
                ended.append(seq)
            elif first or flush:
                seq.out.flush()
        if flush:
            self._flushed_at = now
        self._retire(ended, None)

    # ------------------------------------------------------------- endings
    def _retire(self, rows: list[Sequence], reason: FinishReason | None) -> None:
        """End rows at once and free their KV rows. `reason` overrides the row's own."""
        for seq in rows:
            if reason is not None and seq.out.reason is None:
                seq.out.reason = reason
            final = seq.out.finish("length" if seq.handle.tokens >= seq.out.max_new else "stop")
            try:
                self._keep(seq)
            except Exception:             # a cache failure must not fail the answer
                log.exception("prefix cache: keeping a finished row failed")
            self._release(seq)
            self._finish(seq.item, final, self._stats(seq.item, seq.out.first_token_at,
                                                      seq.handle.tokens, seq.admitted_at,
                                                      seq.cached))

    def _fail(self, rows: list[Sequence], error: EngineError | None) -> None:
        for seq in rows:
            self._release(seq)
            reason: FinishReason = "error" if error is not None else "cancelled"
            self._finish(seq.item, reason, self._stats(seq.item, seq.out.first_token_at,
                                                       seq.handle.tokens, seq.admitted_at,
                                                       seq.cached), error)

    def _release(self, seq: Sequence) -> None:
        with self._cond:
            if seq in self._active:
                self._active.remove(seq)
                self.kv.release(seq.row)
        seq.embedding = None

    def _stats(self, item: WorkItem, first_token_at: float | None, tokens: int,
               start: float, cached: int = 0) -> RequestStats:
        now = time.monotonic()
        arrival = item.request.arrival_time
        at_cancel = item.handle.tokens_at_cancel
        return RequestStats(prompt_tokens=item.prompt.prompt_tokens, images=item.prompt.images,
                            videos=item.prompt.videos, output_tokens=tokens,
                            queue_s=max(0.0, start - arrival),
                            ttft_s=None if first_token_at is None else first_token_at - arrival,
                            total_s=now - arrival,
                            tokens_after_cancel=None if at_cancel is None
                            else max(0, tokens - at_cancel), cached_tokens=cached)

    def _finish(self, item: WorkItem, reason: FinishReason, stats: RequestStats,
                error: EngineError | None = None) -> None:
        if item.handle.finished is not None:
            return
        event = Finished(reason, stats, error)
        with self._cond:
            done, prompt, generated = self._done_totals
            self._done_totals = (done + 1, prompt + stats.prompt_tokens,
                                 generated + stats.output_tokens)
        log.info("request %s: prompt_tokens=%d cached_tokens=%d images=%d videos=%d queue=%.3fs "
                 "ttft=%s output_tokens=%d tokens/s=%.1f finish=%s%s%s", item.request.request_id,
                 stats.prompt_tokens, stats.cached_tokens, stats.images, stats.videos,
                 stats.queue_s,
                 "-" if stats.ttft_s is None else f"{stats.ttft_s:.3f}s", stats.output_tokens,
                 stats.decode_tps, reason,
                 "" if stats.tokens_after_cancel is None or reason != "cancelled"
                 else f" tokens_after_cancel={stats.tokens_after_cancel}",
                 f" error={error.message!r}" if error else "")
        if self.on_finish is not None:   # before the consumer sees the end: metrics are current
            try:
                self.on_finish(item, event)
            except Exception:
                log.exception("on_finish listener failed")
        item.handle.push(event)
