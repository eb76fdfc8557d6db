"""The engine core: the one thread that owns the device, and the bounded queue that feeds it.

Each step of its loop admits waiting requests, ends the cancelled rows, asks the scheduler
for the step's plan, and carries it out: the runner prefills each planned chunk and runs
one decode step for the decoding rows, the sampler picks each row's token with its own
settings, the output processor streams each row's text, and rows that end are retired at
once (their KV kept in the prefix cache, their record logged and handed to the listener).
Rows that asked for logprobs get them from the raw logits of the step (one call for the
batch); a request's n choices share one prefill (the scheduler admits them together, the
first prefills, the others copy its KV and draw their first token from the same logits).
A beam search (engine.core.beam) runs on such a group of rows: decoded in the same batched
steps as every other row, its candidates picked after each step, its rows' KV rearranged by
row copies, its answers handed over whole when it ends.

`submit` is thread-safe and never blocks on the device."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable

import torch

from ..errors import DeviceOutOfMemoryError, EngineBusyError, EngineError
from ..inputs.prompt import PreparedPrompt
from ..model.device import Device
from ..stream import RequestHandle
from ..structured import Constraint, apply_mask, step_mask
from ..types import Finished, FinishReason, GenerationRequest, RequestStats, TextDelta
from .beam import BeamParams, BeamSearch, next_candidates, plan_rows
from .kvstore import KVStore
from .output import OutputProcessor
from .prefix import PrefixCache
from .runner import ModelRunner
from .sampler import RawLogprobs, RowSampler, prompt_logprobs, resolve, sample_with_logprobs
from .scheduler import DEFAULT_PREFILL_CHUNK, PrefillChunk, Scheduler, Sequence, WorkItem
from .stats import cache_figures, log_request, request_stats

log = logging.getLogger("engine.requests")


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


class EngineCore:
    """Owns the device: a step loop over a KVStore, fed by a bounded queue."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, *, max_queue: int = 32,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 on_finish: Callable[[WorkItem, Finished], None] | None = None,
                 generation_config: Any = None, prefix: PrefixCache | None = None) -> None:
        model = runner.model
        self.runner = runner
        self.device: Device = runner.device
        self.kv: KVStore = runner.kv
        self.prefix = prefix
        self.scheduler = Scheduler(self.kv, prefill_chunk=prefill_chunk, prefix=prefix)
        self.max_queue = max_queue
        self.on_finish = on_finish
        self.generation_config = generation_config or model.generation_config
        eos = self.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        pad = self.generation_config.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids or {0}))
        self.vocab_size = model.config.get_text_config().vocab_size
        self.output = OutputProcessor(tokenizer, self.eos_ids)
        self._cond = threading.Condition()
        self._stopping = False
        self._done_totals = (0, 0, 0)   # finished requests: (count, prompt tokens, generated)
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (not copied)
        self._thread = threading.Thread(target=self._loop, name="engine-core", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, request: GenerationRequest, prompt: PreparedPrompt,
               bad_words_ids: tuple[tuple[int, ...], ...] = (),
               constraint: Constraint | None = None) -> RequestHandle:
        """Queue a prepared request; EngineBusyError past the queue bound."""
        return self.submit_group([request], prompt, bad_words_ids, constraint)[0]

    def submit_beams(self, requests: list[GenerationRequest], prompt: PreparedPrompt,
                     params: BeamParams) -> list[RequestHandle]:
        """Queue a beam search of `params.width` beams: one request (and handle) per answer,
        best first, each answer handed over whole when the search ends (as vLLM's beam
        search answers). A cancel of any handle ends them all."""
        beam = BeamSearch(params, prompt.inputs["input_ids"][0].tolist())
        return self.submit_group(requests, prompt, beam=beam)

    def submit_group(self, requests: list[GenerationRequest], prompt: PreparedPrompt,
                     bad_words_ids: tuple[tuple[int, ...], ...] = (),
                     constraint: Constraint | None = None,
                     beam: BeamSearch | None = None) -> list[RequestHandle]:
        """Queue requests on one prepared prompt, one handle each; several are the choices
        of one request (engine.base.choice_request), or the answers of one beam search:
        admitted together, prefilled once. EngineBusyError past the queue bound."""
        with self._cond:
            if self._stopping:
                raise EngineError("The engine is shutting down.")
            waiting = self.scheduler.waiting_count()
            if waiting >= self.max_queue:
                raise EngineBusyError(
                    f"The server is busy: {waiting} requests are already waiting. "
                    "Please try again shortly.")
            group = object() if len(requests) > 1 else None
            handles = [self._queue(r, prompt, bad_words_ids, group, constraint, beam)
                       for r in requests]
            self._cond.notify_all()
        return handles

    def _queue(self, request: GenerationRequest, prompt: PreparedPrompt,
               bad_words_ids: tuple[tuple[int, ...], ...], group: object | None,
               constraint: Constraint | None, beam: BeamSearch | None = None) -> RequestHandle:
        """One request into the waiting queue (under the lock)."""
        # The cancel callback reaches the item through a weak reference: a closure over
        # the item itself made a cycle (handle -> callback -> item -> handle) that kept
        # every finished request's tensors, images and data: URIs alive until Python's
        # rare full garbage collection (hundreds of MB under concurrent image requests).
        item_ref: weakref.ref[WorkItem] | None = None

        def cancel_queued() -> None:
            if beam is not None:
                beam.cancel()
            queued = item_ref() if item_ref is not None else None
            if queued is not None:
                self._cancel_queued(queued)
            else:
                self._wake()

        handle = RequestHandle(request.request_id, on_cancel=cancel_queued)
        handle.prompt_token_ids = prompt.inputs["input_ids"][0].tolist()
        item = WorkItem(request, prompt, handle, bad_words_ids, group, constraint, beam)
        item_ref = weakref.ref(item)
        if beam is not None:
            beam.items.append(item)
        self.scheduler.add(item)
        return handle

    def queue_depth(self) -> int:
        with self._cond:
            return self.scheduler.waiting_count()

    def running_count(self) -> int:
        with self._cond:
            return self.scheduler.running_count()

    def kv_usage(self) -> float:
        return self.kv.usage()

    def cache_figures(self) -> dict[str, float]:
        """Prefix and encoder cache figures for /metrics and the periodic line."""
        return cache_figures(self.runner.encoder_cache, self.prefix)

    def totals(self) -> tuple[int, int, int]:
        """(requests finished, prompt tokens, generated tokens) so far, the running rows
        counted as far as they got: the periodic stats line takes differences of these."""
        with self._cond:
            done, prompt, generated = self._done_totals
            for seq in self.scheduler.running:
                if seq.handle.finished is None:
                    prompt += seq.prefilled
                    generated += seq.handle.tokens
            return done, prompt, generated

    def queue_position(self, request_id: str) -> int | None:
        """0 while running, 1.. while waiting, None when unknown or finished."""
        with self._cond:
            return self.scheduler.position(request_id)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
            active = list(self.scheduler.running)
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
            if not self.scheduler.remove_waiting(item):   # admitted: the loop sees the cancel
                self._cond.notify_all()
                return
        self._finish(item, "cancelled", request_stats(item, None, 0, time.monotonic()))

    def _loop(self) -> None:
        self.device.bind_thread()
        self.runner.prepare()             # graph capture, on the thread that replays them
        while self._wait_for_work():
            try:
                self._step()
            except BaseException as exc:  # never let the device thread die
                log.exception("engine core: unexpected failure")
                self._fail(list(self.scheduler.running), EngineError(str(exc)))
        self._fail(list(self.scheduler.running), None)

    def _wait_for_work(self) -> bool:
        with self._cond:
            while (not self._stopping and not self.scheduler.waiting
                   and not self.scheduler.running):
                self._cond.wait()
            return not self._stopping

    def _step(self) -> None:
        with self._cond:
            self.scheduler.admit(self._new_sequence)
        cancelled = self.scheduler.cancelled()
        self._retire([s for s in cancelled if s.item.beam is None], "cancelled")
        for beam in _beams_of(cancelled):
            self._end_beams(beam, "cancelled")
        plan = self.scheduler.schedule()
        for chunk in plan.prefill:
            self._prefill(chunk)
        self._decode([s for s in plan.decode if s.decoding and s in self.scheduler.running])

    def _new_sequence(self, item: WorkItem, row: int) -> Sequence:
        ids = item.prompt.inputs["input_ids"][0]
        settings = resolve(item.request.sampling, self.generation_config, self.eos_ids,
                           item.bad_words_ids)
        sampler = RowSampler(settings, ids, self.vocab_size, self.device.torch_device)
        grammar = item.constraint.row(item.prompt.max_new_tokens) if item.constraint else None
        seq = Sequence(item, row, self.output.new_row(item), sampler, time.monotonic(),
                       prompt_ids=ids.tolist(), grammar=grammar)
        if item.beam is not None:
            item.beam.seqs.append(seq)
        return seq

    # ------------------------------------------------------------ running the plan
    def _prefill(self, chunk: PrefillChunk) -> None:
        """One row's planned prompt tokens; when they end its prompt, the row's first token
        and that of the choices waiting for this prefill."""
        seq = chunk.seq
        rows = [seq]
        try:
            with torch.inference_mode():
                if seq.embedding is None:
                    seq.embedding = self.runner.begin_prompt(seq.row, seq.item.prompt,
                                                             seq.keys, seq.cached)
                    seq.delta = seq.embedding.delta
                logits = self.runner.prefill(seq.row, seq.embedding, chunk.start, chunk.end,
                                             all_positions=seq.scores_prompt)
                self.prompt_tokens_computed += chunk.end - chunk.start
                if seq.scores_prompt:
                    logits = self._score_prompt(seq, chunk, logits)
            self.scheduler.prefilled(chunk)
            if seq.prefilling:
                return
            seq.embedding = None                  # prompt done: its tensors go
            if seq.item.beam is not None:
                rows += self._share_prompt(seq)
                self._start_beams(seq.item.beam, rows, logits[None])
                return
            if seq.scores_prompt:
                seq.prompt_logprobs = self.output.prompt_logprobs(seq.prompt_logprobs,
                                                                  seq.prompt_ids)
            rows += self._share_prompt(seq)
            with torch.inference_mode():
                tokens, logprobs = self._pick(logits[None].expand(len(rows), -1), rows)
            self._accept(rows, tokens, time.monotonic(), logprobs)
        except Exception as exc:
            self._fail(rows, _step_error(exc))
            self.device.empty_cache()

    def _score_prompt(self, seq: Sequence, chunk: PrefillChunk,
                      logits: torch.Tensor) -> torch.Tensor:
        """The chunk's prompt logprobs (each position scores the prompt token after it) onto
        the row's list; the last position's logits, which pick the first token."""
        targets = seq.prompt_ids[chunk.start + 1:chunk.end + 1]
        if targets:
            k = self._top_k(seq.item.request.sampling.prompt_logprobs)
            seq.prompt_logprobs.extend(prompt_logprobs(
                logits[:len(targets)], torch.tensor(targets, device=logits.device), k))
        return logits[-1]

    def _share_prompt(self, leader: Sequence) -> list[Sequence]:
        """The choices waiting for `leader`'s prefill, given its prompt's KV: ready to draw
        their first token from the same logits."""
        followers, leader.followers = leader.followers, []
        for f in followers:
            self.kv.copy_row(leader.row, f.row, leader.length)
            f.leader = None
            f.prefilled = f.length = f.cached = leader.length
            f.delta, f.keys, f.prompt_logprobs = leader.delta, leader.keys, leader.prompt_logprobs
        return followers

    def _top_k(self, asked: int | None) -> int | None:
        """A logprobs count as the sampler takes it: -1 (vLLM's whole vocabulary) resolved."""
        return self.vocab_size if asked == -1 else asked

    def _decode(self, rows: list[Sequence]) -> None:
        """One decode step for every decoding row; the beam searches' rows pick their next
        beams after it, the others their tokens."""
        if not rows:
            return
        plain = [s for s in rows if s.item.beam is None]
        tokens: list[int] = []
        logprobs = None
        try:
            with torch.inference_mode():
                logits = self.runner.decode(rows, self.pad_id)
                beams = [(b, _take(logits, rows, b.rows)) for b in _beams_of(rows)]
                if plain:
                    if beams:
                        logits = _take(logits, rows, plain)
                    tokens, logprobs = self._pick(logits, plain)
        except Exception as exc:
            self._fail(rows, _step_error(exc))
            self.device.empty_cache()
            return
        self.scheduler.decoded(rows)
        if plain:
            self._accept(plain, tokens, time.monotonic(), logprobs)
        for beam, beam_logits in beams:
            self._beam_step(beam, beam_logits)

    def _pick(self, logits: torch.Tensor, rows: list[Sequence]
              ) -> tuple[list[int], list[RawLogprobs | None] | None]:
        """Each row's token and, for the rows that asked, its raw logprobs (None when no row
        did), from one host transfer: the logits (B, V) with each constrained row's
        disallowed tokens at -inf (its mask filled on the host while an accelerator computes
        the step's forward, launched before), sampled with each row's settings, and near a
        constrained row's token budget the token its closing path needs (engine.structured).
        Free rows pay nothing."""
        grammars = [s.grammar for s in rows]
        mask = step_mask(grammars, logits.shape[-1], logits.device)
        logits = apply_mask(logits, mask)
        want = [self._top_k(s.item.request.sampling.logprobs) for s in rows]
        tokens, tops = sample_with_logprobs(logits, [s.sampler for s in rows], want)
        if mask is not None:
            tokens = [g.settle(t) if g is not None else t for g, t in zip(grammars, tokens)]
        return tokens, None if tops is None else tops.for_tokens(tokens)

    def _accept(self, rows: list[Sequence], tokens: list[int], now: float,
                logprobs: list[RawLogprobs | None] | None = None) -> None:
        """Each row's new token: sampler state, text out, and the end of finished rows."""
        for seq, token in zip(rows, tokens):
            seq.append(token)
            if seq.grammar is not None and not seq.grammar.accept(token):
                log.error("%s: the constraint refused token %d", seq.item.request.request_id,
                          token)
        for seq in rows:            # a row's last text goes out with its end event
            seq.handle.stage()
        ended = self.output.on_tokens([s.out for s in rows], tokens, now, logprobs)
        self._retire([s for s, done in zip(rows, ended) if done], None)
        for seq in rows:
            seq.handle.publish()

    # ------------------------------------------------------------- beam search
    def _start_beams(self, beam: BeamSearch, rows: list[Sequence], logits: torch.Tensor) -> None:
        """A beam search whose prompt is prefilled and copied to all its rows: its first
        step, from the prompt's last logits (1, V)."""
        beam.rows, beam.holds = rows, [0] * len(rows)
        self._beam_step(beam, logits)

    def _beam_step(self, beam: BeamSearch, logits: torch.Tensor) -> None:
        """One step of a beam search, from its live beams' logits (B, V): the next live
        beams, each in a row that holds its parent (one of them takes the parent's own row,
        the others copy it into rows whose beam did not go on); rows left without a beam are
        freed; at the last step the answers go out."""
        try:
            with torch.inference_mode():
                candidates = next_candidates(logits, beam.params.width, beam.params.temperature)
                plan = plan_rows(beam.holds, beam.advance(candidates))
                for row, source in plan:
                    if source is not None:
                        held = beam.rows[source]
                        self.kv.copy_row(held.row, beam.rows[row].row, held.length)
        except Exception as exc:
            self._fail(beam.rows, _step_error(exc))
            self.device.empty_cache()
            return
        taken = [beam.rows[row] for row, _ in plan]
        for seq, live in zip(taken, beam.live):
            seq.generated, seq.last_token = list(live.tokens), live.tokens[-1]
        for seq in beam.rows:
            if not any(seq is t for t in taken):
                self._release(seq)
        beam.rows, beam.holds = taken, list(range(len(taken)))
        if beam.first_token_at is None:
            beam.first_token_at = time.monotonic()
        for item in beam.items:
            item.handle.tokens = beam.steps
        if beam.finished:
            self._end_beams(beam, None)

    def _end_beams(self, beam: BeamSearch, reason: FinishReason | None) -> None:
        """The end of a beam search: its rows freed (the live beams' KV kept in the prefix
        cache), then each answer, best first, handed whole to its handle with its finish
        reason (`reason` overrides it: a cancel)."""
        answers = beam.best()
        first = beam.seqs[0] if beam.seqs else None
        for seq in beam.rows:
            try:
                self._keep(seq)
            except Exception:             # a cache failure must not fail the answer
                log.exception("prefix cache: keeping a beam's row failed")
        for seq in beam.seqs:
            self._release(seq)
        for i, item in enumerate(beam.items):
            found = answers[i] if i < len(answers) else None
            ids, text, logprobs = [], "", None
            if found is not None:
                ids, text, logprobs = beam.answer(found, self.output.tokenizer,
                                                  self.output.pieces.shown)
            item.handle.tokens = len(ids)
            item.handle.push(TextDelta(text, ids, logprobs))
            final = reason or (found.finish_reason if found else None) or "length"
            stats = request_stats(item, beam.first_token_at, len(ids),
                                  first.admitted_at if first else time.monotonic(),
                                  first.cached if first else 0)
            self._finish(item, final, stats, stop_reason=None if reason or found is None
                         else found.stop_reason)

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
            self._finish(seq.item, final, request_stats(seq.item, seq.out.first_token_at,
                                                        seq.handle.tokens, seq.admitted_at,
                                                        seq.cached),
                         stop_reason=seq.out.stop_reason,
                         prompt_logprobs=seq.prompt_logprobs
                         if seq.scores_prompt and not seq.prefilling else None)

    def _keep(self, seq: Sequence) -> None:
        """The row's KV into the prefix cache: every full block of prompt and answer it holds."""
        if self.prefix is not None:
            self.prefix.keep(seq.row, (seq.prompt_ids + seq.generated)[:seq.length],
                             seq.item.prompt.media, seq.keys)

    def _fail(self, rows: list[Sequence], error: EngineError | None) -> None:
        """End rows with an error (None: cancelled); a beam search's rows all together."""
        beams = _beams_of(rows)
        rows = rows + [s for b in beams for s in b.seqs if not any(s is r for r in rows)]
        reason: FinishReason = "error" if error is not None else "cancelled"
        for seq in rows:
            self._release(seq)
            self._finish(seq.item, reason, request_stats(seq.item, seq.out.first_token_at,
                                                         seq.handle.tokens, seq.admitted_at,
                                                         seq.cached), error)
        for item in [i for b in beams for i in b.items]:   # answers not admitted
            self._finish(item, reason, request_stats(item, None, 0, time.monotonic()), error)

    def _release(self, seq: Sequence) -> None:
        with self._cond:
            self.scheduler.release(seq)
        seq.embedding = None

    def _finish(self, item: WorkItem, reason: FinishReason, stats: RequestStats,
                error: EngineError | None = None, stop_reason: str | int | None = None,
                prompt_logprobs: list | None = None) -> None:
        if item.handle.finished is not None:
            return
        event = Finished(reason, stats, error, stop_reason,
                         prompt_token_ids=item.prompt.inputs["input_ids"][0].tolist(),
                         prompt_logprobs=prompt_logprobs)
        with self._cond:
            done, prompt, generated = self._done_totals
            self._done_totals = (done + 1, prompt + stats.prompt_tokens,
                                 generated + stats.output_tokens)
        log_request(item.request.request_id, reason, stats, error)
        if self.on_finish is not None:   # before the consumer sees the end: metrics are current
            try:
                self.on_finish(item, event)
            except Exception:
                log.exception("on_finish listener failed")
        item.handle.push(event)


def _beams_of(rows: list[Sequence]) -> list[BeamSearch]:
    """The beam searches some of `rows` belong to, each once."""
    found: dict[int, BeamSearch] = {}
    for seq in rows:
        if seq.item.beam is not None:
            found.setdefault(id(seq.item.beam), seq.item.beam)
    return list(found.values())


def _take(logits: torch.Tensor, rows: list[Sequence], subset: list[Sequence]) -> torch.Tensor:
    """The logits (len(rows), V) of `subset`'s rows, in its order."""
    where = {id(s): i for i, s in enumerate(rows)}
    return logits[torch.tensor([where[id(s)] for s in subset], device=logits.device)]
