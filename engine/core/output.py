"""The output processor: token ids in, text out. Incremental detokenizing (whole UTF-8
characters only), stop token ids and stop strings (vLLM's rules: which text a stop keeps,
the stop reason it reports), per-row token limits and cancellation for one request's row,
the token ids and logprobs each piece of text covers, and all of it pushed to that
request's RequestHandle. The engine core hands each row its sampled token ids (and their
raw logprobs where asked); nothing here touches the device."""

from __future__ import annotations

import copy
from typing import Any, Sequence

from ..stream import RequestHandle
from ..types import FinishReason, TextDelta, TokenLogprob, TopLogprob
from .sampler import RawLogprobs

REPLACEMENT = "\ufffd"


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes by concatenating each token's bytes (Qwen's byte-level
    BPE): then a token whose bytes are whole UTF-8 text decodes the same alone as in context."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


class TokenPieces:
    """Each token's text alone, decoded once per token id and shared by every row of an
    engine: for streaming (with or without special tokens; None where the tokenizer is not
    byte-level, so every token takes the full path) and for logprobs (`shown`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.enabled = is_byte_level(tokenizer)
        self._cache: dict[int, str] = {}
        self._with_special: dict[int, str] = {}
        self._shown: dict[int, str] = {}
        self._whole: dict[int, str] = {}   # `shown` texts that need no context (no U+FFFD end)

    def get(self, token_id: int, skip_special_tokens: bool = True) -> str | None:
        if not self.enabled:
            return None
        cache = self._cache if skip_special_tokens else self._with_special
        piece = cache.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens,
                                          clean_up_tokenization_spaces=False)
            cache[token_id] = piece
        return piece

    def shown(self, token_id: int) -> str:
        """A logprob's token text: the id decoded alone with the tokenizer's defaults
        (special tokens shown), as vLLM's logprobs processor decodes it."""
        text = self._shown.get(token_id)
        if text is None:
            text = self._shown[token_id] = self.tokenizer.decode([token_id]) or ""
        return text

    def shown_in_context(self, token_id: int, context: Sequence[int]) -> str:
        """`shown`, with vLLM's repair of a piece that ends in an unfinished UTF-8 character:
        the text the token completes after up to 4 preceding tokens (`context`), else ""."""
        text = self._whole.get(token_id)
        if text is not None:
            return text
        text = self.shown(token_id)
        if not text.endswith(REPLACEMENT):
            self._whole[token_id] = text
            return text
        return _complete(self.tokenizer, token_id, list(context)[-4:])


def _complete(tokenizer: Any, token_id: int, context: list[int]) -> str:
    """vLLM's LogprobsProcessor._correct_decoded_token."""
    for n in range(1, len(context) + 1):
        ctx = context[-n:]
        full = tokenizer.decode(ctx + [token_id])
        if full.endswith(REPLACEMENT):
            continue
        clean_end = len(ctx)
        for j in range(len(ctx) - 1, -1, -1):
            if not tokenizer.decode([ctx[j]]).endswith(REPLACEMENT):
                break
            clean_end = j
        prefix = tokenizer.decode(ctx[:clean_end]) if clean_end > 0 else ""
        if full.startswith(prefix):
            return full[len(prefix):]
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        return full[common:]
    return ""


def token_logprob(pieces: TokenPieces, raw: RawLogprobs, context: Sequence[int]) -> TokenLogprob:
    """The public form of one position's figures, its tokens' texts decoded as vLLM does."""
    shown = pieces.shown_in_context
    return TokenLogprob(shown(raw.token_id, context), raw.token_id, raw.logprob, rank=raw.rank,
                        top=[TopLogprob(shown(i, context), i, lp) for i, lp in raw.top])


class IncrementalDetokenizer:
    """vLLM-style incremental decoding: emits text only once it is complete
    UTF-8, so multi-byte characters split across tokens never come out broken.

    Fast path: with nothing held back, a token whose own text is whole UTF-8 is emitted
    from the per-token cache, without decoding (two decodes a token cost a tenth of a
    small model's decode step). `skip_special_tokens=False` shows special tokens' text.
    vLLM's `spaces_between_special_tokens` changes nothing here: a byte-level tokenizer
    puts no space between special tokens either way (nor does vLLM's fast detokenizer)."""

    def __init__(self, tokenizer: Any, pieces: TokenPieces | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.pieces = pieces
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.pieces is not None and self.read_offset == len(self.ids) - 1:
            piece = self.pieces.get(token_id, self.skip_special_tokens)
            if piece is not None and REPLACEMENT not in piece:
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return piece
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end, unless it is an unfinished UTF-8
        character: vLLM emits nothing for that, and neither do we (no trailing U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        return full[len(prefix):]


def stop_token_reasons(eos_ids: set[int], primary_eos: int | None, ignore_eos: bool,
                       stop_token_ids: Sequence[int]) -> dict[int, int | None]:
    """The ids that end a row, each with the stop reason it reports, as vLLM sets them: the
    tokenizer's EOS reports None; the generation config's other EOS ids and the request's
    stop_token_ids report the id; ignore_eos drops both kinds of EOS, not stop_token_ids."""
    reasons: dict[int, int | None] = {}
    if not ignore_eos:
        reasons = {i: (None if i == primary_eos else i) for i in eos_ids}
    for i in stop_token_ids:
        reasons.setdefault(int(i), int(i))
    return reasons


class RowState:
    """One request's row in the running batch.

    Without stop strings a token is only counted and queued (`pending`) at each step; its
    text is decoded and handed to the consumer by `flush`, which the scheduler calls for
    the first token, at a row's end and otherwise at most every `notify_interval_s`, the
    rate at which the consumer is woken anyway. A tiny model makes a token a millisecond;
    decoding each one as it came cost it several percent of its speed. With stop strings
    each token's text is checked at once, and text that may start one is held back."""

    def __init__(self, item: Any, tokenizer: Any, eos_ids: set[int],
                 pieces: TokenPieces | None = None, primary_eos: int | None = None) -> None:
        self.item = item
        self.handle = item.handle
        self.max_new = item.prompt.max_new_tokens
        sp = item.request.sampling
        self.stops = list(sp.stop)
        self.include_stop = sp.include_stop_str_in_output
        self.hold = 0 if self.include_stop else max((len(s) for s in self.stops), default=1) - 1
        self.min_tokens = sp.min_tokens
        self.stop_ids = stop_token_reasons(eos_ids, primary_eos, sp.ignore_eos, sp.stop_token_ids)
        self.pieces = pieces
        self.detok = IncrementalDetokenizer(tokenizer, pieces, sp.skip_special_tokens)
        self.text = ""
        self.sent = 0
        self.checked = 0              # text already searched for stop strings
        self.pending: list[int] = []  # tokens whose text is not decoded yet (no stop strings)
        self.unsent: list[int] = []   # tokens not yet handed over
        self.logprobs: list[TokenLogprob] | None = None if sp.logprobs is None else []
        self.recent: list[int] = []   # the last sampled tokens: logprob texts' context
        self.first_token_at: float | None = None
        self.reason: FinishReason | None = None
        self.stop_reason: str | int | None = None

    @property
    def tokens(self) -> int:
        """Tokens generated so far: counted on the handle, where a cancel reads it."""
        return self.handle.tokens

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _push(self, text: str) -> None:
        """Text with the tokens (and logprobs) not handed over yet."""
        if not text and not self.unsent:
            return
        ids, self.unsent = self.unsent, []
        lps = None
        if self.logprobs is not None:
            lps, self.logprobs = self.logprobs, []
        self.handle.push(TextDelta(text, ids, lps))

    def _emit_ready(self, final: bool = False) -> None:
        end = len(self.text) if final else len(self.text) - self.hold
        text = ""
        if end > self.sent:
            text, self.sent = self.text[self.sent:end], end
        self._push(text)

    def on_token(self, token_id: int, now: float, raw: RawLogprobs | None = None) -> None:
        if self.done:
            return
        if self.first_token_at is None:
            self.first_token_at = now
        self.handle.tokens += 1
        self.unsent.append(token_id)
        if self.logprobs is not None and raw is not None:
            self.logprobs.append(token_logprob(self.pieces, raw, self.recent))
            self.recent = (self.recent + [token_id])[-4:]
        if token_id in self.stop_ids:
            self.reason, self.stop_reason = "stop", self.stop_ids[token_id]
            if self.include_stop:     # vLLM decodes a stop token only then (and checks
                self._add_text(token_id)   # the stop strings in its text)
            return
        self._add_text(token_id)
        if self.reason is None and self.tokens >= self.max_new:
            self.reason = "length"
        if self.reason is None and self.handle.cancelled:
            self.reason = "cancelled"

    def _add_text(self, token_id: int) -> None:
        if not self.stops:            # no text to keep: decoded and streamed by flush()
            self.pending.append(token_id)
            return
        self.text += self.detok.add(token_id)
        if not self._apply_stops():
            self._emit_ready()

    def flush(self) -> None:
        """Decode the pending tokens and stream their text (with its tokens)."""
        text = ""
        if self.pending:
            ids, self.pending = self.pending, []
            text = "".join([self.detok.add(i) for i in ids])
            self.sent += len(text)
        self._push(text)

    def _apply_stops(self) -> bool:
        """vLLM's check_stop_strings, one token at a time: the stop string that completes
        first in the new text (none while min_tokens are not generated yet) ends the row;
        the text is cut before it, or after it with include_stop_str_in_output."""
        start, self.checked = self.checked, len(self.text)
        if self.tokens <= self.min_tokens:
            return False
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = self.text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0 and (best is None or at + len(stop) < best[0] + len(best[1])):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self.text = self.text[:at + len(stop) if self.include_stop else at]
        self.reason, self.stop_reason = "stop", stop
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
        self.primary_eos = getattr(tokenizer, "eos_token_id", None)
        self._flushed_at = 0.0

    def new_row(self, item: Any) -> RowState:
        """The output state of an admitted request (a WorkItem: request, prompt, handle)."""
        return RowState(item, self.tokenizer, self.eos_ids, self.pieces, self.primary_eos)

    def on_tokens(self, rows: list[RowState], tokens: list[int], now: float,
                  logprobs: Sequence[RawLogprobs | None] | None = None) -> list[bool]:
        """Each row's new token (and its raw logprobs, for rows that asked); which rows it
        ended. A row's first text goes out at once, the rest at most every
        `notify_interval_s`, the rate consumers are woken at anyway."""
        flush = now - self._flushed_at >= RequestHandle.notify_interval_s
        ended = []
        for i, (out, token) in enumerate(zip(rows, tokens)):
            first = out.first_token_at is None
            out.on_token(token, now, None if logprobs is None else logprobs[i])
            ended.append(out.done)
            if not out.done and (first or flush):
                out.flush()
        if flush:
            self._flushed_at = now
        return ended

    def prompt_logprobs(self, raws: Sequence[RawLogprobs],
                        prompt_ids: Sequence[int]) -> list[TokenLogprob | None]:
        """A prompt's logprobs in public form: None for its first token (nothing predicts
        it), then one per token, texts repaired with the prompt tokens before it (from the
        second on, as vLLM)."""
        return [None] + [token_logprob(self.pieces, raw, prompt_ids[max(1, p - 4):p])
                         for p, raw in enumerate(raws, start=1)]
