"""The chat callbacks: they turn the typed browser state plus the settings
into the engine's GenerationRequest, read the engine's stream, and turn every
failure into a message in the chat (the error travels as data; the user's
turn stays so it can be retried).

Generation runs on the engine's device thread; these coroutines only wait on
its stream, so a waiting user costs no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from engine.base import Engine
from engine.errors import EngineBusyError, EngineError, InvalidRequestError
from engine.inputs.documents import PDF_SUFFIX, page_sizes, render_pages
from engine.inputs.media import MediaPolicy, load_image, load_video
from engine.stream import RequestHandle
from engine.types import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOKENS, DEFAULT_MIN_PIXELS, Finished,
                          GenerationRequest, SamplingParams, TextDelta, TokenLogprob)

from . import display, grounding, history, meter, probs
from .history import State
from .jsonmode import JsonMode
from .feedback import FeedbackLog
from .sessions import ActiveRequests

log = logging.getLogger("ui.chat")

POLL_S = 0.5      # how often a waiting request's queue position is refreshed
FLUSH_S = 0.05    # at most this often the growing answer is sent to the browser
RENDER_WAIT_S = 30.0   # how long a document waits for another one's rendering to finish


@dataclass
class Sampling:
    """The settings panel's values, as the browser sends them."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.05
    seed: int | None = None
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    json_mode: JsonMode = JsonMode()
    token_probs: bool = False     # ask for each token's logprobs (the page's probability panel)

    @classmethod
    def starting(cls, model_defaults: dict[str, float]) -> "Sampling":
        """The settings panel's first values: the served model's own sampling defaults (its
        generation_config, as a request that sets none gets them) where the engine knows them,
        else the fields' defaults above."""
        names = ("temperature", "top_p", "top_k", "repetition_penalty")
        return cls(**{k: v for k, v in model_defaults.items() if k in names})

    @classmethod
    def from_values(cls, max_tokens: Any, temperature: Any, top_p: Any, top_k: Any,
                    repetition_penalty: Any, seed: Any, min_pixels: Any = None,
                    max_pixels: Any = None) -> "Sampling":
        def num(value: Any, default: Any, kind: type) -> Any:
            try:
                return kind(value) if value is not None and value != "" else default
            except (TypeError, ValueError):
                return default

        seed_value = num(seed, None, int)
        return cls(max_tokens=num(max_tokens, cls.max_tokens, int),
                   temperature=num(temperature, cls.temperature, float),
                   top_p=num(top_p, cls.top_p, float), top_k=num(top_k, cls.top_k, int),
                   repetition_penalty=num(repetition_penalty, cls.repetition_penalty, float),
                   seed=seed_value if seed_value is not None and seed_value >= 0 else None,
                   min_pixels=num(min_pixels, cls.min_pixels, int),
                   max_pixels=num(max_pixels, cls.max_pixels, int))

    def params(self) -> SamplingParams:
        """The engine's sampling fields; InvalidRequestError when the JSON mode's schema or
        fields are not one."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k,
                              repetition_penalty=self.repetition_penalty, seed=self.seed,
                              structured=self.json_mode.constraint(),
                              logprobs=probs.TOP if self.token_probs else None)


@dataclass
class StreamUpdate:
    """One step of a request as the UI sees it."""

    text: str = ""
    position: int | None = None       # >= 1 while waiting in the engine's queue
    finished: Finished | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)   # with `finished`, if asked


@dataclass
class Step:
    """One update of the page during an answer: the state when it changed for good (start
    and end), the chat shown, and the probability panel's HTML (None: left as it is)."""

    state: State | None
    shown: list[dict]
    probs: str | None = None


async def follow(handle: RequestHandle, engine: Engine, poll_s: float | None = None,
                 flush_s: float | None = None) -> AsyncIterator[StreamUpdate]:
    """The request's growing text, throttled to `flush_s`, with its queue position
    while it waits; ends with the Finished event. Never blocks a thread."""
    poll_s = POLL_S if poll_s is None else poll_s
    flush_s = FLUSH_S if flush_s is None else flush_s
    events = handle.__aiter__()
    pending: asyncio.Future | None = None
    text, dirty, last_flush, last_pos = "", False, 0.0, -1
    logprobs: list[TokenLogprob] = []
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            wait = poll_s if not dirty else max(0.0, flush_s - (time.monotonic() - last_flush))
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                if dirty:
                    dirty, last_flush = False, time.monotonic()
                    yield StreamUpdate(text)
                elif not text:
                    pos = engine.queue_position(handle.request_id)
                    if pos != last_pos:
                        last_pos = pos
                        yield StreamUpdate(text, position=pos)
                continue
            event, pending = pending.result(), None
            if isinstance(event, TextDelta):
                text += event.text
                logprobs += event.logprobs or []
                dirty = True
                if time.monotonic() - last_flush >= flush_s:
                    dirty, last_flush = False, time.monotonic()
                    yield StreamUpdate(text)
            else:
                yield StreamUpdate(text, finished=event, logprobs=logprobs)
                return
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


def error_message(exc: BaseException) -> str:
    if isinstance(exc, EngineError):
        msg = exc.message
        if exc.param == "input_tokens" and "completion" in msg:
            msg += " Lower *Max new tokens* in the settings."
        elif exc.param == "max_tokens" and "structured output" in msg:
            msg += " Raise *Max new tokens* in the settings, or turn JSON mode off."
        elif exc.param == "logprobs":
            msg += " Turn *Show token probabilities* off in the settings."
        return msg
    return f"Internal error ({type(exc).__name__}). The server keeps running; please retry."


def session_of(request: Any) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


class RefusedFiles(InvalidRequestError):
    """Attached files the engine would refuse (not readable, or of a kind it does not take):
    the message is not sent, and `box` is what stays in the message box (its text and the
    other files), so a second Enter sends it without them instead of failing again."""

    def __init__(self, message: str, box: dict, names: list[str]) -> None:
        super().__init__(message, param="file")
        self.box = box
        self.names = names      # of the refused files


@dataclass
class ChatController:
    """Everything the Blocks callbacks need: the engine, where files may come
    from, and the per-session registry used by Stop."""

    engine: Engine
    upload_roots: tuple[Path, ...]
    active: ActiveRequests = field(default_factory=ActiveRequests)
    warn: Callable[[str], None] | None = None   # a visible line on the page (callbacks.warn)
    feedback_file: Path | None = None   # likes and dislikes appended as JSON lines (opt-in)
    render_slots: int = 1        # PDF documents rendered at once, all users together
    admit: Callable[[Any], Any] | None = None   # the client's slot for one generation
    created: Callable[[str], None] | None = None   # told of each file the page writes (its
    #                                                 upload folder's clean-up then covers it)
    feedback: FeedbackLog | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.feedback_file is not None:
            self.feedback = FeedbackLog(self.feedback_file)
        self._rendering = threading.BoundedSemaphore(max(1, self.render_slots))

    @property
    def figures_dir(self) -> Path:
        """Pictures with an answer's boxes drawn on them: inside the upload folder, so the
        page may show them and a kept chat may name them."""
        return self.upload_roots[0] / "qwenvl-figures"

    @property
    def policy(self) -> MediaPolicy:
        """UI requests may only read the upload folder and assets/."""
        return MediaPolicy(local_roots=self.upload_roots)

    def load(self, raw: Any) -> State:
        dropped: list[str] = []
        state = history.clean_state(raw, self.upload_roots, dropped)
        self.note_dropped(dropped)
        return state

    def track(self, paths: list[str] | list[Path]) -> None:
        """Files this page wrote (PDF pages, drawn boxes, imported chats' files) are deleted
        with the uploads when they expire (`created`, Gradio's delete_cache)."""
        if self.created is not None:
            for p in paths:
                self.created(str(p))

    def note_dropped(self, names: list[str]) -> None:
        """Files named from outside the upload folder are never read; say so on the page."""
        if names:
            log.warning("dropped %d file(s) from outside the upload folder", len(names))
            if self.warn is not None:
                self.warn(f"{len(names)} file(s) were left out because they were not "
                          f"uploaded here: {', '.join(names[:3])}")

    # ------------------------------------------------------------ instant edits
    def add_user_turn(self, raw_state: Any, message: Any, system: str | None,
                      request: Any = None) -> tuple[State, list[dict], bool]:
        """Append the typed message; returns (state, display, accepted).
        Files outside the upload folders (a tampered request) are dropped."""
        state = self.load(raw_state)
        if system is not None:
            state["system"] = str(system)
        text, files = "", []
        if isinstance(message, dict):
            text = str(message.get("text") or "")
            files = [str(f) for f in message.get("files") or [] if f]
        elif isinstance(message, str):
            text = message
        files = files[:history.MAX_FILES_PER_CHAT + 1]    # enough to tell "too many"
        kept = [f for f in files if history.inside_roots(Path(f), self.upload_roots)]
        self.note_dropped([Path(f).name for f in files if f not in kept])
        self._check_room(state, kept)
        self._refuse_unreadable(text, kept)     # RefusedFiles: the box keeps the rest
        files = self._pages(state, kept)        # InvalidRequestError: the box keeps it all
        self._check_room(state, files)
        if not text.strip() and not files:
            return state, display.render(state), False
        self.active.forget_stop(session_of(request))
        state["turns"].append(history.user_turn(text, files, history.file_room(state)))
        return state, display.render(state), True

    def _refusal(self, path: str) -> str | None:
        """Why the engine would refuse this attached file, in one line that names it; None
        when it takes it. The engine's own loaders decide (its picture and video checks, its
        PDF reader), before the message leaves the box: a refused file then never enters the
        chat, where a Retry or an Undo would bring it back."""
        name = Path(path).name
        policy = self.policy.with_limits(max_image_pixels=self.engine.max_image_pixels)
        try:
            if path.lower().endswith(PDF_SUFFIX):
                page_sizes(Path(path), 1, self.engine.max_pixels_limit)
            elif history.media_kind(path) == "image":
                load_image(path, policy).close()
            elif history.media_kind(path) == "video":
                load_video(path, policy).close()
            else:
                raise history.unsupported(name)
        except InvalidRequestError as exc:
            return exc.message if history.names_file(exc.message, name) \
                else f"{name}: {exc.message}"
        return None

    def _refuse_unreadable(self, text: str, files: list[str]) -> None:
        refused = {f: why for f in dict.fromkeys(files) if (why := self._refusal(f))}
        if refused:
            raise RefusedFiles(" ".join(refused.values()),
                               {"text": text, "files": [f for f in files if f not in refused]},
                               [Path(f).name for f in refused])

    @staticmethod
    def _check_room(state: State, files: list[str]) -> None:
        """A message with more files than the chat can keep is refused whole (the box keeps
        them), rather than some of them being left out without a word."""
        room = history.file_room(state)
        if len(files) > room:
            raise InvalidRequestError(
                f"This message has {len(files)} files, but only {room} more fit in this chat "
                f"(at most {history.MAX_FILES_PER_TURN} per message and "
                f"{history.MAX_FILES_PER_CHAT} per chat): send fewer or start a new chat.",
                param="file")

    def _pages(self, state: State, files: list[str]) -> list[str]:
        """PDFs become their pages, saved as PNGs beside the upload, as many as still fit in
        the chat's picture limit (more is a clear error, the message kept in the box). Pages
        are sized to the engine's picture limit before they are drawn, and documents are
        drawn one at a time (`render_slots`), so no upload can take the server's memory."""
        if not any(f.lower().endswith(PDF_SUFFIX) for f in files):
            return files
        used = sum(1 for t in state["turns"] if t["role"] == "user" for f in t["files"]
                   if history.media_kind(f["path"]) == "image")
        out: list[str] = []
        for i, f in enumerate(files):
            if not f.lower().endswith(PDF_SUFFIX):
                out.append(f)
                continue
            room = self.engine.limit_images - used - sum(
                history.media_kind(p) == "image" for p in out + files[i + 1:])
            out += self._render(Path(f), max(0, room))
        return out

    def _render(self, path: Path, room: int) -> list[str]:
        if not self._rendering.acquire(timeout=RENDER_WAIT_S):
            raise EngineBusyError("Other documents are being read right now: please send "
                                  "this one again in a moment.")
        try:
            saved = []
            for n, page in enumerate(render_pages(path, room, self.engine.max_pixels_limit),
                                     start=1):
                target = path.with_name(f"{path.stem}-page{n}.png")
                page.save(target)
                saved.append(str(target))
                self.track([target])
            return saved
        finally:
            self._rendering.release()

    def edit(self, raw_state: Any, message_index: Any, text: Any,
             request: Any = None) -> tuple[State, list[dict], bool]:
        """An edited question (message `message_index` of the chat shown): its text
        replaced, its pictures kept, every later turn dropped; (state, display, rerun?)."""
        state = self.load(raw_state)
        shown, owners = display.render_indexed(state)
        index = message_index[0] if isinstance(message_index, (list, tuple)) else message_index
        turn = owners[index] if isinstance(index, int) and 0 <= index < len(owners) else -1
        if turn < 0 or owners.index(turn) != index or state["turns"][turn]["role"] != "user" \
                or not state["turns"][turn]["text"]:
            turn = -1          # only a question's own text (its first message) is edited
        if turn >= 0 and len(state["turns"][turn]["text"]) > display.MAX_SHOWN_CHARS:
            turn = -1          # shown cut: saving the edit would lose the rest of it
        new_text = text if isinstance(text, str) else ""
        if turn < 0 or not new_text.strip() or not history.edit_user_turn(state, turn, new_text):
            return state, display.render(state), False
        self.active.forget_stop(session_of(request))
        return state, display.render(state), True

    def rate(self, raw_state: Any, message_index: Any, liked: Any,
             request: Any = None) -> State:
        """Like (True), dislike (False) or undo (None) an answer; kept with the chat, and
        appended to the feedback file when the server was started with one."""
        state = self.load(raw_state)
        _, owners = display.render_indexed(state)
        index = message_index[0] if isinstance(message_index, (list, tuple)) else message_index
        turn = owners[index] if isinstance(index, int) and 0 <= index < len(owners) else -1
        if turn < 0 or state["turns"][turn]["role"] != "assistant":
            return state
        rating = {True: "like", False: "dislike"}.get(liked) if isinstance(liked, bool) else None
        state["turns"][turn]["rating"] = rating
        if self.feedback is not None:
            why = self.feedback.rate(state["turns"][turn].get("id"), rating, session_of(request))
            if why is not None:
                log.warning("feedback not written: %s", why)
                if self.warn is not None:
                    self.warn(f"Your rating is kept in this chat but not recorded: {why}.")
        return state

    def composer_meter(self, message: Any, raw_state: Any, min_pixels: Any,
                       max_pixels: Any, max_tokens: Any = None) -> str:
        """The token meter under the message box (see ui/meter.py). It runs on every
        keystroke, unqueued, so it says nothing of files it leaves out: the events that keep
        the chat (page load, Enter) say that once."""
        state = history.clean_state(raw_state, self.upload_roots)
        files = [str(f) for f in (message or {}).get("files") or []] \
            if isinstance(message, dict) else []
        files = [f for f in files if history.inside_roots(Path(f), self.upload_roots)]
        text = str((message or {}).get("text") or "") if isinstance(message, dict) else ""
        sampling = Sampling.from_values(max_tokens, None, None, None, None, None, min_pixels,
                                        max_pixels)
        measured = meter.measure(state, text, files[:history.MAX_FILES_PER_CHAT],
                                 sampling.min_pixels, sampling.max_pixels,
                                 self.engine.model_pixel_bounds(),
                                 limit_images=self.engine.limit_images,
                                 max_pixels_limit=self.engine.max_pixels_limit)
        return meter.describe(measured,
                              self.engine.max_model_len,
                              self.engine.limit_images, sampling.max_tokens)

    def prepare_retry(self, raw_state: Any, system: str | None = None,
                      request: Any = None) -> tuple[State, list[dict]]:
        state = self.load(raw_state)
        if system is not None:
            state["system"] = str(system)
        history.drop_last_answer(state)
        self.active.forget_stop(session_of(request))
        return state, display.render(state)

    def undo(self, raw_state: Any) -> tuple[State, list[dict], dict | None]:
        """Remove the last exchange; its text and files go back into the textbox, except a
        file its failed answer names (the engine refused it: it would fail again)."""
        state = self.load(raw_state)
        last = state["turns"][-1] if state["turns"] else {}
        error = (last.get("error") or "") if last.get("role") == "assistant" else ""
        turn = history.pop_last_exchange(state)
        box = None
        if turn is not None:
            box = {"text": turn["text"],
                   "files": [f["path"] for f in turn["files"] if Path(f["path"]).is_file()
                             and not history.names_file(error, f["name"])]}
        return state, display.render(state), box

    def clear(self, raw_state: Any) -> tuple[State, list[dict]]:
        state = history.new_state(self.load(raw_state)["system"])
        return state, []

    def stop(self, request: Any = None) -> int:
        """Cancel this session's requests on the engine (the stream then ends by itself)."""
        n = self.active.stop(session_of(request))
        log.info("stop: cancelled %d request(s) of session %s", n, session_of(request)[:8])
        return n

    def disconnect(self, request: Any = None) -> None:
        """The tab closed or reloaded: nobody reads these answers any more."""
        self.active.stop(session_of(request), remember=False)

    # ------------------------------------------------------------ generation
    async def _submit(self, state: State, sampling: Sampling,
                      request: Any = None) -> tuple[RequestHandle, Any]:
        """(handle, the client's slot or None). The slot is taken first (one client cannot
        fill every place: `admit` raises a one-line EngineError at its cap); preparation
        runs off the event loop, which serves every other user meanwhile."""
        slot = self.admit(request) if self.admit is not None else None
        try:
            conv = history.to_conversation(state)
            req = GenerationRequest(conv, sampling.params(), min_pixels=sampling.min_pixels,
                                    max_pixels=sampling.max_pixels)
            return await self.engine.asubmit(req, self.policy), slot
        except BaseException:
            if slot is not None:
                slot.release()
            raise

    async def respond(self, raw_state: Any, sampling: Sampling,
                      request: Any = None) -> AsyncIterator[tuple[State | None, list[dict]]]:
        """Answer the pending user turn. Yields (state or None, display): the state
        only when it changed for good (start and end), the display at every step."""
        async with contextlib.aclosing(self.steps(raw_state, sampling, request)) as steps:
            async for step in steps:
                yield step.state, step.shown

    async def steps(self, raw_state: Any, sampling: Sampling,
                    request: Any = None) -> AsyncIterator[Step]:
        """`respond`, with the probability panel: emptied when the answer starts, and the
        answer's tokens annotated (ui/probs.py) when it ends, where `sampling.token_probs`
        asked for them."""
        state = self.load(raw_state)
        if history.pending_user_turn(state) is None:
            yield Step(state, display.render(state))
            return
        session = session_of(request)
        answer_format = "json" if sampling.json_mode.is_json else None
        try:
            handle, slot = await self._submit(state, sampling, request)
        except Exception as exc:  # bad input, busy, engine down: a message, never a traceback
            if not isinstance(exc, EngineError):
                log.exception("submit failed")
            state["turns"].append(history.assistant_turn("", "error", None, error_message(exc)))
            yield Step(state, display.render(state), probs.EMPTY_NOTE)
            return
        self.active.add(session, handle)
        if self.active.take_early_stop(session):
            handle.cancel()
        try:
            yield Step(None, display.render(state, display.STARTING_NOTE), probs.EMPTY_NOTE)
            async with contextlib.aclosing(follow(handle, self.engine)) as updates:
                async for update in updates:
                    fin = update.finished
                    if fin is None:
                        if update.text:
                            shown = display.json_block(update.text) if answer_format \
                                else update.text
                        elif update.position:
                            shown = display.QUEUE_NOTE.format(pos=update.position)
                        else:
                            shown = display.STARTING_NOTE
                        yield Step(None, display.render(state, shown))
                        continue
                    error = error_message(fin.error) if fin.reason == "error" else None
                    if fin.reason == "error" and fin.error is None:
                        error = "Generation failed."
                    figures = await self._figures(state, update.text, sampling)
                    answer = history.assistant_turn(update.text, fin.reason,
                                                    fin.stats.to_dict(), error, figures,
                                                    answer_format)
                    if self.feedback is not None and fin.reason != "error":
                        answer["id"] = self._remember(state, update.text)
                    state["turns"].append(answer)
                    annotated = await asyncio.to_thread(probs.annotate, update.text,
                                                        update.logprobs) \
                        if sampling.token_probs and update.logprobs else None
                    yield Step(state, display.render(state), annotated)
        finally:
            self.active.remove(session, handle)
            if handle.finished is None:   # cancelled by Gradio or the client went away
                handle.cancel()
            if slot is not None:
                slot.release()

    def _remember(self, state: State, answer: str) -> str:
        """The feedback log's record of what was asked and what this server answered."""
        question = history.pending_user_turn(state) or {"text": "", "files": []}
        return self.feedback.remember(self.engine.model_name, question["text"],
                                      [f["name"] for f in question["files"]], answer)

    async def _figures(self, state: State, answer: str, sampling: Sampling) -> list[str]:
        """The answer's boxes and points drawn on the pictures it is about, at the resize
        the model saw (our bounds, then the remote's own). Parsing and drawing both run off
        the event loop (an answer is user-shaped), on pictures within the engine's limit."""
        pictures = history.pictures_for(state, len(state["turns"]))
        if not pictures:
            return []
        bounds = [(sampling.min_pixels, sampling.max_pixels)] + self.engine.model_pixel_bounds()
        try:
            drawn = await asyncio.to_thread(grounding.annotate, answer, pictures, bounds,
                                            self.figures_dir, self.engine.max_image_pixels)
            self.track(drawn)
            return drawn
        except Exception:     # a drawing failure must not lose the answer
            log.exception("drawing the answer's boxes failed")
            return []

    async def answer_once(self, message: Any, system: str, sampling: Sampling,
                          request: Any = None) -> AsyncIterator[str]:
        """The named API endpoint: one question (text + files), the growing answer.
        Errors raise EngineError for the caller to turn into its own error type."""
        state, _, accepted = await asyncio.to_thread(self.add_user_turn, None, message, system,
                                                     request)     # a PDF is rendered here
        if not accepted:
            raise InvalidRequestError("The message is empty: send text or a file.")
        handle, slot = await self._submit(state, sampling, request)
        session = session_of(request)
        self.active.add(session, handle)
        try:
            async with contextlib.aclosing(follow(handle, self.engine)) as updates:
                async for update in updates:
                    if update.finished is None:
                        if update.text:
                            yield update.text
                        continue
                    if update.finished.reason == "error":
                        err = update.finished.error
                        raise err if isinstance(err, EngineError) else EngineError(str(err))
                    yield update.text
        finally:
            self.active.remove(session, handle)
            if handle.finished is None:
                handle.cancel()
            if slot is not None:
                slot.release()
