"""The output processor: token ids in, text out. Incremental detokenizing (whole UTF-8
characters only), stop strings, per-row token limits and cancellation for one request's
row, and its text pushed to that request's RequestHandle. The engine core hands each row
its sampled token ids; nothing here touches the device."""

from __future__ import annotations

import copy
from typing import Any

from ..stream import RequestHandle
from ..types import FinishReason, TextDelta

def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes by concatenating each token's bytes (Qwen's byte-level
    BPE): then a token whose bytes are whole UTF-8 text decodes the same alone as in context."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


class TokenPieces:
    """Each token's text alone, decoded once per token id and shared by every row of an
    engine (None where the tokenizer is not byte-level, so every token takes the full path)."""

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


class RowState:
    """One request's row in the running batch.

    Without stop strings a token is only counted and queued (`pending`) at each step; its
    text is decoded and handed to the consumer by `flush`, which the scheduler calls for
    the first token, at a row's end and otherwise at most every `notify_interval_s`, the
    rate at which the consumer is woken anyway. A tiny model makes a token a millisecond;
    decoding each one as it came cost it several percent of its speed."""

    def __init__(self, item: Any, tokenizer: Any, eos_ids: set[int],
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
        """Flush held-back text and settle the finish reason when the row ends."""
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


class OutputProcessor:
    """Every running row's text: one tokenizer of its own (decoding here, on the device
    thread, while the input stage encodes with the original elsewhere) and one token-piece
    cache for all rows, and the pace at which rows' text is handed to their consumers."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self.pieces = TokenPieces(self.tokenizer)
        self.eos_ids = eos_ids
        self._flushed_at = 0.0

    def new_row(self, item: Any) -> RowState:
        """The output state of an admitted request (a WorkItem: request, prompt, handle)."""
        return RowState(item, self.tokenizer, self.eos_ids, self.pieces)

    def on_tokens(self, rows: list[RowState], tokens: list[int], now: float) -> list[bool]:
        """Each row's new token; which rows it ended. A row's first text goes out at once,
        the rest at most every `notify_interval_s`, the rate consumers are woken at anyway."""
        flush = now - self._flushed_at >= RequestHandle.notify_interval_s
        ended = []
        for out, token in zip(rows, tokens):
            first = out.first_token_at is None
            out.on_token(token, now)
            ended.append(out.done)
            if not out.done and (first or flush):
                out.flush()
        if flush:
            self._flushed_at = now
        return ended
