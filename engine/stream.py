"""A request's stream of events, written by the device thread and read by a
front end: a blocking iterator for threads (CLI, Gradio callbacks) and an
async iterator for the HTTP server, where a thread per waiting client would
exhaust the thread pool."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import AsyncIterator, Callable, Iterator

from .types import Event, Finished, RequestStats, TextDelta


def merge_deltas(parts: list[TextDelta]) -> TextDelta:
    """Consecutive deltas as one: texts, token ids and logprobs joined in order."""
    logprobs = None
    if any(p.logprobs is not None for p in parts):
        logprobs = [lp for p in parts for lp in (p.logprobs or [])]
    return TextDelta("".join(p.text for p in parts), [i for p in parts for i in p.token_ids],
                     logprobs)


class RequestHandle:
    """One request's events plus its cancel switch.

    Text is handed over as it comes, but the consumer is woken at most every
    `notify_interval_s` (and always for the end): a small model makes a token every
    millisecond or so, and waking another thread for each one cost a tenth of its speed.
    A token that arrives sooner after the last wake-up waits in the queue for the next
    one, merged with its neighbours; a 7B model's tokens are further apart than this, so
    each is still delivered at once."""

    notify_interval_s = 0.01

    def __init__(self, request_id: str, on_cancel: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self.cancel_event = threading.Event()
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._events: collections.deque[Event] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self.finished: Finished | None = None
        self._notified_at = 0.0
        self._staged: list[Event] | None = None       # text held for the end event (`stage`)
        self.tokens = 0                               # generated so far (the device thread's count)
        # the prompt's token ids where the engine knows them at submit (the local engine; a
        # remote's come with the end event, Finished.prompt_token_ids)
        self.prompt_token_ids: list[int] | None = None
        self.tokens_at_cancel: int | None = None

    # ------------------------------------------------------------- producer
    def push(self, event: Event) -> None:
        if self.finished is not None:
            return
        if isinstance(event, TextDelta) and not event.text and not event.token_ids:
            return
        if self._staged is not None and isinstance(event, TextDelta):
            self._staged.append(event)
            return
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        with self._cond:
            if isinstance(event, Finished):
                self.finished = event
                self._events.extend(self._staged or ())
                self._staged = None
            self._events.append(event)
            now = time.monotonic()
            if self.finished is None and now - self._notified_at < self.notify_interval_s:
                return
            self._notified_at = now
            self._cond.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def stage(self) -> None:
        """Hold the text pushed from now on until `publish` or the end event, so that the
        text of a request's last step reaches the consumer together with its end (vLLM sends
        the last token in the chunk that carries finish_reason)."""
        if self.finished is None:
            self._staged = []

    def publish(self) -> None:
        """Release the staged text (see `stage`)."""
        staged, self._staged = self._staged, None
        for event in staged or ():
            self._deliver(event)

    def cancel(self) -> None:
        """Ask the engine to stop this request; it ends within a few tokens."""
        if not self.cancel_event.is_set():
            self.tokens_at_cancel = self.tokens
            self.cancel_event.set()
            if self._on_cancel is not None:
                self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    # ------------------------------------------------------------- consumers
    def _pop(self) -> Event | None:
        """The next event; text deltas already waiting are merged into one, so a consumer
        that falls behind the device (a slow client, a busy CPU) catches up in one step.
        Called under `_cond`."""
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, TextDelta) and self._events and isinstance(self._events[0], TextDelta):
            parts = [event]
            while self._events and isinstance(self._events[0], TextDelta):
                parts.append(self._events.popleft())
            event = merge_deltas(parts)
        return event

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until Finished. With `timeout` (seconds between events) a
        silent engine cancels the request and yields an error instead of hanging."""
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._events:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
                event = self._pop()
            if event is None:
                from .errors import EngineError

                self.cancel()
                yield Finished("error", RequestStats(),
                               EngineError(f"No response from the engine for {timeout:g} s."))
                return
            yield event
            if isinstance(event, Finished):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        with self._cond:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
        wakeup = self._wakeup
        while True:
            with self._cond:
                event = self._pop()
                if event is None:
                    wakeup.clear()
            if event is None:
                await wakeup.wait()
                continue
            yield event
            if isinstance(event, Finished):
                return

    def collect(self, timeout: float | None = None) -> tuple[str, Finished]:
        """Block until done: the whole text and the final record."""
        parts = []
        for event in self.events(timeout):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise AssertionError("unreachable")
