"""The device thread: one thread owns the model, takes requests from a bounded
queue, runs `generate` for one request or for a batch of compatible ones, and
streams each row's text to its own RequestHandle.

A StoppingCriteria does the per-step work: it reads the newest token of
every row, detokenizes it incrementally, applies stop strings and per-row
token limits, and ends a row as soon as its handle is cancelled, so Stop and
client disconnects take effect within a token.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .device import Device
from .errors import DeviceOutOfMemoryError, EngineBusyError, EngineError
from .prompt import PreparedPrompt
from .sampling import batch_key, generate_kwargs
from .stream import RequestHandle
from .types import Finished, FinishReason, GenerationRequest, RequestStats, TextDelta

log = logging.getLogger("engine.requests")


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes by concatenating each token's bytes (Qwen's byte-level
    BPE): then a token whose bytes are whole UTF-8 text decodes the same alone as in context."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


class TokenPieces:
    """Each token's text alone, decoded once per token id and shared by every row of a
    worker (None where the tokenizer is not byte-level, so every token takes the full path)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.enabled = is_byte_level(tokenizer)
        self._cache: dict[int, str] = {}

    def get(self, token_id: int) -> str | None:
        if not self.enabled:
            return None
        piece = self._cache.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)
            self._cache[token_id] = piece
        return piece


class IncrementalDetokenizer:
    """vLLM-style incremental decoding: emits text only once it is complete
    UTF-8, so multi-byte characters split across tokens never come out broken.

    Fast path: with nothing held back, a token whose own text is whole UTF-8 is emitted
    from the per-token cache, without decoding (two decodes a token cost a tenth of a
    small model's decode step)."""

    def __init__(self, tokenizer: Any, pieces: TokenPieces | None = None) -> None:
        self.tokenizer = tokenizer
        self.pieces = pieces
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.pieces is not None and self.read_offset == len(self.ids) - 1:
            piece = self.pieces.get(token_id)
            if piece is not None and "\ufffd" not in piece:
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return piece
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end, unless it is an unfinished UTF-8
        character: vLLM emits nothing for that, and neither do we (no trailing U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        return full[len(prefix):]


@dataclass
class WorkItem:
    request: GenerationRequest
    prompt: PreparedPrompt
    handle: RequestHandle
    key: tuple


@dataclass
class Arrival:
    """A request being prepared on a caller's thread (see GenerationWorker.arriving)."""

    done: bool = False


class RowState:
    """One request inside a running generate call.

    Without stop strings a token is only counted and queued (`pending`) at each step; its
    text is decoded and handed to the consumer by `flush`, which BatchCriteria calls for
    the first token, at a row's end and otherwise at most every `notify_interval_s`, the
    rate at which the consumer is woken anyway. A tiny model makes a token a millisecond;
    decoding each one as it came cost it several percent of its speed."""

    def __init__(self, item: WorkItem, tokenizer: Any, eos_ids: set[int],
                 pieces: TokenPieces | None = None) -> None:
        self.item = item
        self.handle = item.handle
        self.max_new = item.prompt.max_new_tokens
        sp = item.request.sampling
        self.stops = list(sp.stop)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.eos_ids = set() if sp.ignore_eos else eos_ids
        self.detok = IncrementalDetokenizer(tokenizer, pieces)
        self.text = ""
        self.sent = 0
        self.pending: list[int] = []
        self.first_token_at: float | None = None
        self.reason: FinishReason | None = None

    @property
    def tokens(self) -> int:
        """Tokens generated so far: counted on the handle, where a cancel reads it."""
        return self.handle.tokens

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _emit_ready(self, final: bool = False) -> None:
        end = len(self.text) if final or not self.stops else len(self.text) - self.hold
        if end > self.sent:
            self.handle.push(TextDelta(self.text[self.sent:end]))
            self.sent = end

    def on_token(self, token_id: int, now: float) -> None:
        if self.done:
            return
        if self.first_token_at is None:
            self.first_token_at = now
        self.handle.tokens += 1
        if token_id in self.eos_ids:
            self.reason = "stop"
        elif not self.stops:           # no text to keep: decoded and streamed by flush()
            self.pending.append(token_id)
        else:
            self.text += self.detok.add(token_id)
            if self._apply_stops():
                return
            self._emit_ready()
        if self.reason is None and self.tokens >= self.max_new:
            self.reason = "length"
        if self.reason is None and self.handle.cancelled:
            self.reason = "cancelled"

    def flush(self) -> None:
        """Decode the pending tokens and stream their text."""
        if self.pending:
            ids, self.pending = self.pending, []
            text = "".join([self.detok.add(i) for i in ids])
            if text:
                self.handle.push(TextDelta(text))
                self.sent += len(text)

    def _apply_stops(self) -> bool:
        start = max(0, self.sent - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.reason = "stop"
        self._emit_ready(final=True)
        return True

    def finish(self, default: FinishReason) -> FinishReason:
        """Flush held-back text and settle the finish reason after generate returns."""
        if self.reason is None:
            self.reason = "cancelled" if self.handle.cancelled else default
        if not self.stops:
            self.flush()
            if self.reason != "cancelled":
                self.handle.push(TextDelta(self.detok.flush()))
            return self.reason
        if self.reason != "cancelled" and not (self.reason == "stop"
                                               and len(self.text) == self.sent):
            self.text += self.detok.flush()
            if self.reason != "stop" and self._apply_stops():
                return self.reason
        self._emit_ready(final=True)
        return self.reason


class BatchCriteria(StoppingCriteria):
    """Per-step hook: streams every row's newest token and says which rows are done.

    A row that is done is handed to `on_done` at once, so its user gets the end of the
    answer while longer rows of the same batch are still generating."""

    def __init__(self, rows: list[RowState],
                 on_done: Callable[[RowState], None] | None = None) -> None:
        self.rows = rows
        self.on_done = on_done
        self._flags: list[bool] = []
        self._done: torch.Tensor | None = None
        self._flushed_at = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        newest = input_ids[:, -1].tolist()
        flush = now - self._flushed_at >= RequestHandle.notify_interval_s
        for row, token in zip(self.rows, newest):
            if row.done:
                continue
            first = row.first_token_at is None
            row.on_token(token, now)
            if row.done:
                if self.on_done is not None:
                    self.on_done(row)
            elif first or flush:
                row.flush()
        if flush:
            self._flushed_at = now
        flags = [row.done for row in self.rows]
        if flags != self._flags or self._done is None:
            # a new tensor only when a row's state changes: generate only reads it
            self._flags = flags
            self._done = torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
        return self._done


def collate(prompts: list[PreparedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad input_ids and concatenate vision tensors in request order,
    as the processor does for a batch of texts."""
    if len(prompts) == 1:
        return dict(prompts[0].inputs)
    width = max(p.inputs["input_ids"].shape[1] for p in prompts)
    ids, masks = [], []
    for p in prompts:
        n = p.inputs["input_ids"].shape[1]
        pad = width - n
        ids.append(torch.cat([torch.full((1, pad), pad_id, dtype=torch.long),
                              p.inputs["input_ids"]], dim=1))
        mask = p.inputs.get("attention_mask", torch.ones(1, n, dtype=torch.long))
        masks.append(torch.cat([torch.zeros((1, pad), dtype=mask.dtype), mask], dim=1))
    out: dict[str, Any] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
    if all("mm_token_type_ids" in p.inputs for p in prompts):
        out["mm_token_type_ids"] = torch.cat([
            torch.cat([torch.zeros((1, width - p.inputs["input_ids"].shape[1]),
                                   dtype=p.inputs["mm_token_type_ids"].dtype),
                       p.inputs["mm_token_type_ids"]], dim=1) for p in prompts])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts"):
        parts = [p.inputs[key] for p in prompts if p.inputs.get(key) is not None]
        if parts:
            out[key] = (torch.cat(parts) if isinstance(parts[0], torch.Tensor)
                        else [x for part in parts for x in part])
    return out


def cuda_speedups(device: Device, static_cache: bool, torch_compile: bool) -> tuple[bool, bool]:
    """(static_cache, torch_compile) as they apply here: CUDA only. On an NPU these paths
    are unverified (torch.compile there needs Ascend's own backend), and on a CPU they
    only add compile time."""
    if not (static_cache or torch_compile):
        return False, False
    if device.kind != "cuda":
        log.warning("--static-cache/--torch-compile apply to CUDA only; ignored on %s", device.kind)
        return False, False
    return True, torch_compile


def apply_cuda_speedups(gc: Any, static_cache: bool, torch_compile: bool) -> None:
    """A static KV cache; transformers compiles the decoding step when the cache is static
    (unless disable_compile). The cache keeps the largest length seen, so a compiled graph
    is reused by later, shorter requests of the same batch size."""
    if static_cache:
        gc.cache_implementation = "static"
        gc.disable_compile = not torch_compile


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()   # torch_npu raises RuntimeError("NPU out of memory...")


class GenerationWorker:
    """Owns the device. `submit` is thread-safe and never blocks on the device."""

    def __init__(self, model: Any, tokenizer: Any, device: Device, *, max_queue: int = 32,
                 max_batch: int = 1, on_finish: Callable[[WorkItem, Finished], None] | None = None,
                 generation_config: Any = None, batch_wait_s: float = 0.05,
                 static_cache: bool = False, torch_compile: bool = False) -> None:
        self.model = model
        self.tokenizer = copy.deepcopy(tokenizer)   # its own copy: decoding here, encoding elsewhere
        self.pieces = TokenPieces(self.tokenizer)
        self.device = device
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.static_cache, self.torch_compile = cuda_speedups(device, static_cache, torch_compile)
        self.on_finish = on_finish
        self.generation_config = generation_config or model.generation_config
        eos = self.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        pad = self.generation_config.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids or {0}))
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[WorkItem] = []
        self._arriving = 0           # requests being prepared by callers (see `arriving`)
        self._submitted = 0          # requests queued so far
        self._last_batch = (0, 0.0, 0)   # (rows, end time, _submitted then) of the last batch
        self._stopping = False
        self._done_totals = (0, 0, 0)   # finished requests: (count, prompt tokens, generated)
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, request: GenerationRequest, prompt: PreparedPrompt,
               arrival: "Arrival | None" = None) -> RequestHandle:
        """Queue a prepared request. `arrival` (from `arriving()`) ends under the same lock,
        so a forming batch sees the request queued and its preparation over in one step."""
        with self._cond:
            if arrival is not None and not arrival.done:
                arrival.done = True
                self._arriving -= 1
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
                if queued is not None:      # gone: it ran and finished, nothing to cancel
                    self._cancel_queued(queued)

            handle = RequestHandle(request.request_id, on_cancel=cancel_queued)
            item = WorkItem(request, prompt, handle, batch_key(request.sampling))
            item_ref = weakref.ref(item)
            self._queue.append(item)
            self._submitted += 1
            self._cond.notify_all()
        return handle

    @contextlib.contextmanager
    def arriving(self) -> Iterator["Arrival"]:
        """Wrap the caller's preparation of a request it is about to submit (pass the
        yielded Arrival to `submit`). While any request is being prepared, a new batch
        waits for it (at most `batch_wait_s`) instead of starting without it: concurrent
        users then share one batch rather than alternating between half-empty ones."""
        arrival = Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            if not arrival.done:       # preparation failed: nothing will be submitted
                with self._cond:
                    arrival.done = True
                    self._arriving -= 1
                    self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def running_count(self) -> int:
        with self._cond:
            return len(self._running)

    def totals(self) -> tuple[int, int, int]:
        """(requests finished, prompt tokens, generated tokens) so far, the running rows
        counted as far as they got: the periodic stats line takes differences of these."""
        with self._cond:
            done, prompt, generated = self._done_totals
            for item in self._running:
                if item.handle.finished is None:
                    prompt += item.prompt.prompt_tokens
                    generated += item.handle.tokens
            return done, prompt, generated

    def queue_position(self, request_id: str) -> int | None:
        """0 while running, 1.. while waiting, None when unknown or finished."""
        with self._cond:
            if any(i.request.request_id == request_id for i in self._running):
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
            running = list(self._running)
            self._cond.notify_all()
        for item in pending:
            self._finish(item, "cancelled", RequestStats())
        for item in running:
            item.handle.cancel()
        self._thread.join(timeout)

    # ------------------------------------------------------------ internals
    def _cancel_queued(self, item: WorkItem) -> None:
        with self._cond:
            try:
                self._queue.remove(item)
            except ValueError:
                return   # already running: the criteria will see the event
        self._finish(item, "cancelled", self._stats(item, None, 0, time.monotonic()))

    def _take_batch(self) -> list[WorkItem] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch = [first]
            self._running = batch
            deadline = time.monotonic() + self.batch_wait_s
            while self.max_batch > 1:
                for item in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if item.key == first.key:
                        self._queue.remove(item)
                        batch.append(item)
                        # each arrival restarts the wait: preparation is serial
                        deadline = time.monotonic() + self.batch_wait_s
                wait = self._gather_wait(deadline)
                if len(batch) >= self.max_batch or self._stopping or wait <= 0:
                    break
                self._cond.wait(wait)
            return batch

    def _gather_wait(self, deadline: float) -> float:
        """How long a forming batch should still wait for more requests (0: start now).

        It waits while a request is being prepared (`arriving`), and, just after a batch
        ended, for as many new requests as that batch had rows: users whose answer just
        finished often send the next request at once (agents, scripts, benchmarks), and
        without this wait they would form a second, alternating batch (every request queued
        after that batch's answers were released counts as one of them). Both waits end
        `batch_wait_s` after the last arrival or batch end. Called under `_cond`."""
        now = time.monotonic()
        if self._arriving:
            return deadline - now
        rows, ended, submitted_then = self._last_batch
        returning = rows - (self._submitted - submitted_then)
        return min(deadline, ended + self.batch_wait_s) - now if returning > 0 else 0.0

    def _loop(self) -> None:
        self.device.bind_thread()
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as exc:  # never let the device thread die
                log.exception("worker: unexpected failure")
                for item in batch:
                    if item.handle.finished is None:
                        self._finish(item, "error", RequestStats(), EngineError(str(exc)))
            finally:
                with self._cond:
                    self._running = []

    def _run(self, batch: list[WorkItem]) -> None:
        start = time.monotonic()
        live = [i for i in batch if not i.handle.cancelled]
        for item in batch:
            if item.handle.cancelled:
                self._finish(item, "cancelled", self._stats(item, None, 0, start))
        if not live:
            return
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(live))
        rows = [RowState(item, self.tokenizer, self.eos_ids, self.pieces) for item in live]
        sp = live[0].request.sampling
        max_new = max(i.prompt.max_new_tokens for i in live)
        inputs = collate([i.prompt for i in live], self.pad_id)
        dev = self.device.torch_device
        model_inputs = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev)
                if v.is_floating_point():
                    v = v.to(self.device.dtype)
            model_inputs[k] = v
        kwargs = generate_kwargs(sp, self.generation_config, max_new)
        apply_cuda_speedups(kwargs["generation_config"], self.static_cache, self.torch_compile)
        released_at: list[int] = []   # requests submitted when the first answer was released

        def release(row: RowState) -> None:
            if not released_at:
                with self._cond:
                    released_at.append(self._submitted)
            self._finish(row.item, row.finish("stop"),
                         self._stats(row.item, row.first_token_at, row.tokens, start))

        criteria = BatchCriteria(rows, on_done=release)
        error: EngineError | None = None
        try:
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
            with torch.inference_mode():
                self.model.generate(**model_inputs, **kwargs,
                                    stopping_criteria=StoppingCriteriaList([criteria]))
        except Exception as exc:
            if is_out_of_memory(exc):
                error = DeviceOutOfMemoryError(
                    "The device ran out of memory for this request. Try fewer or smaller images, "
                    "a shorter conversation or fewer max tokens.")
            else:
                log.exception("generate failed")
                error = EngineError(f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            del model_inputs
            if error is not None:
                self.device.empty_cache()
        with self._cond:   # before the remaining answers are released: see _gather_wait
            self._last_batch = (len(rows), time.monotonic(),
                                released_at[0] if released_at else self._submitted)
        for row in rows:
            if row.item.handle.finished is not None:   # released by the criteria
                continue
            if error is not None and not row.done:
                row.reason = "error"
                self._finish(row.item, "error", self._stats(row.item, row.first_token_at,
                                                             row.tokens, start), error)
                continue
            reason = row.finish("length" if row.tokens >= row.max_new else "stop")
            self._finish(row.item, reason, self._stats(row.item, row.first_token_at, row.tokens,
                                                       start))

    def _stats(self, item: WorkItem, first_token_at: float | None, tokens: int,
               start: float) -> RequestStats:
        now = time.monotonic()
        arrival = item.request.arrival_time
        at_cancel = item.handle.tokens_at_cancel
        return RequestStats(prompt_tokens=item.prompt.prompt_tokens, images=item.prompt.images,
                            videos=item.prompt.videos, output_tokens=tokens,
                            queue_s=max(0.0, start - arrival),
                            ttft_s=None if first_token_at is None else first_token_at - arrival,
                            total_s=now - arrival,
                            tokens_after_cancel=None if at_cancel is None
                            else max(0, tokens - at_cancel))

    def _finish(self, item: WorkItem, reason: FinishReason, stats: RequestStats,
                error: EngineError | None = None) -> None:
        if item.handle.finished is not None:
            return
        event = Finished(reason, stats, error)
        with self._cond:
            done, prompt, generated = self._done_totals
            self._done_totals = (done + 1, prompt + stats.prompt_tokens,
                                 generated + stats.output_tokens)
        log.info("request %s: prompt_tokens=%d images=%d videos=%d queue=%.3fs ttft=%s "
                 "output_tokens=%d tokens/s=%.1f finish=%s%s%s", item.request.request_id,
                 stats.prompt_tokens, stats.images, stats.videos, stats.queue_s,
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
