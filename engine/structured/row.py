"""One constrained row's state in the batched step, and the masks of a step.

Each step the rows under a constraint get a mask of the tokens their grammar allows
(filled on the host, after the step's forward pass was launched, so on an accelerator the
host fills it while the device computes), applied to their logits before sampling; rows
without one are left alone and pay nothing.

Answers that end: a constrained answer must close within its max_tokens, or it does not parse.
A closing policy played forward on a copy of the matcher says how many tokens the shortest
way to close takes from any state: end what is open (a string's quote, a bracket, a brace),
write the smallest value where one is required and the keys the grammar forces. Near the end
of its budget a row takes a sampled token only if that way still fits after it
(RowGrammar.settle)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .compiler import Grammar

# Texts a closing path prefers, best first: what ends a string, a number, an array, an object,
# then the shortest values (where a value must still be written).
# Structure before values, so that a number or an array ends rather than grows.
CLOSERS = ('"', "}", "]", '"}', "]}", "}}", "]]", '"]', ",", ":", "0", "1", "null", "true",
           "false", '""', "[]", "{}")
PLAY_LIMIT = 64           # closing steps played forward at most
WINDOW = 96               # the closing path is only looked for within this many tokens of the end


@dataclass(frozen=True)
class ClosingTokens:
    """The token ids of CLOSERS in the vocabulary (those that are single tokens), in order,
    and the EOS id the grammar ends with."""

    ids: tuple[int, ...]
    eos: int
    json: bool = True        # the closing policy: JSON's, or the one for regexes and grammars

    def for_kind(self, kind: str) -> "ClosingTokens":
        """The same tokens with the policy for a constraint of this kind."""
        return dataclasses.replace(self, json=kind in ("json", "json_object"))

    @classmethod
    def of(cls, tokenizer: Any, eos: int) -> "ClosingTokens":
        ids = []
        for text in CLOSERS:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return cls(tuple(ids), int(eos))


def mask_words(matcher: Any) -> np.ndarray:
    """The matcher's allowed tokens as int32 words (bit j of word i: token 32 i + j)."""
    return np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)


def _allowed(words: np.ndarray, token: int) -> bool:
    word = token >> 5
    return word < len(words) and bool((int(words[word]) >> (token & 31)) & 1)


def _lowest_allowed(words: np.ndarray, count: int) -> list[int]:
    """The `count` lowest token ids the mask allows."""
    out: list[int] = []
    for word in np.flatnonzero(words):
        bits = int(np.uint32(words[word].view(np.uint32)))
        while bits and len(out) < count:
            low = bits & -bits
            out.append(int(word) * 32 + low.bit_length() - 1)
            bits ^= low
        if len(out) >= count:
            break
    return out


def closing_choice(matcher: Any, closers: ClosingTokens,
                   uses: dict[int, int] | None = None) -> int | None:
    """The next token of the closing path: EOS once the grammar accepts, else a token the
    grammar forces, else an allowed closer, else the lowest allowed token (inside a property
    name, any allowed token leads to one of the finitely many names); None when the grammar
    allows nothing.

    JSON (`uses` None) takes the first allowed closer: structure before values, so what is
    open closes. A regex or grammar (`uses`: how often the path took each token) takes the
    candidate it took least, so a path through `\\d+ (a|b)` leaves the digits instead of
    writing zeros forever. The mask is computed only where it is read (a forced token needs
    none)."""
    words = None
    if matcher.is_accepting():
        words = mask_words(matcher)
        if _allowed(words, closers.eos):
            return closers.eos
    forced = matcher.compute_ff_tokens()
    if forced:
        return int(forced[0])
    if words is None:
        words = mask_words(matcher)
    if uses is None:
        closer = next((t for t in closers.ids if _allowed(words, t)), None)
        if closer is not None:
            return closer
        lowest = _lowest_allowed(words, 1)
        return lowest[0] if lowest else None
    candidates = [t for t in closers.ids if _allowed(words, t)]
    candidates += [t for t in _lowest_allowed(words, 64) if t not in candidates]
    if not candidates:
        return None
    return min(candidates, key=lambda t: (uses.get(t, 0), candidates.index(t)))


def closing_path(matcher: Any, closers: ClosingTokens, limit: int = PLAY_LIMIT,
                 uses: dict[int, int] | None = None) -> list[int] | None:
    """The closing path's tokens from this state, EOS last (None: not found within `limit`
    tokens); `uses`: the tokens the answer took so far (regexes and grammars). The policy
    is a function of the state (and of `uses`), so after its first token the rest of the
    path is the path from there.

    A token after which EOS is valid ends the path without being consumed: consuming the
    token that completes a grammar is llguidance's slowest step (~27 us on the tiny model,
    every play's last), `validate_tokens` checks both tokens in ~0.5 us and leaves the state
    as it is, and the next choice would be EOS (`is_accepting` is "the mask allows EOS")."""
    play = matcher.deep_copy()
    uses = None if closers.json else dict(uses or {})
    path: list[int] = []
    for _ in range(limit):
        token = closing_choice(play, closers, uses)
        if token is None:
            return None
        path.append(token)
        if token == closers.eos:
            return path
        if len(path) < limit and play.validate_tokens([token, closers.eos]) == 2:
            return path + [closers.eos]
        if uses is not None:
            uses[token] = uses.get(token, 0) + 1
        if not play.consume_token(token):
            return None
    return None


def opening_path(grammar: Grammar, closers: ClosingTokens,
                 limit: int = 1024) -> list[int] | None:
    """The closing path from the start, EOS last: the shortest answer the policy finds
    (None: longer than `limit`)."""
    return closing_path(grammar.template, closers, limit)


def shortest_answer(grammar: Grammar, closers: ClosingTokens, limit: int = 1024) -> int | None:
    """Tokens of the closing path from the start, EOS included: the fewest max_tokens with
    which this row is sure to close (None: longer than `limit`)."""
    path = opening_path(grammar, closers, limit)
    return None if path is None else len(path)


class RowGrammar:
    """A row's matcher, its token budget and its way to close within that budget.

    Once the budget comes within `window` tokens, each sampled token is checked before it is
    taken: if the closing path after it, EOS included, would no longer fit the tokens left,
    the row writes the closing path's next token instead. The path from the start fits (the
    engine refuses a max_tokens below `shortest_answer` less its EOS), and each closing
    token shortens it by one, so the answer always closes in time, and ends with EOS: a
    forced close finishes as "stop" (a tool call as "tool_calls"), not "length", which the
    OpenAI client's `parse()` refuses. Only a budget of exactly the shortest answer without
    its EOS (`reserve` 0) closes on its last token and ends by "length", as vLLM's would.

    A closing path is kept from step to step, and played anew only when it no longer
    closes: when the next token is the path's first (a forced key, a closer, or the closing
    path itself), or takes its place (a digit for the path's "0"), the rest of the path is
    the path from there; when the whole path still closes after the token (a string's next
    character), it is the path from there too (llguidance checks the token and the path in
    one `validate_tokens`, without changing the state). Either way it is a valid way to
    close of known length, which is all the budget check needs. `path`: the closing path
    from the start (`opening_path`: its length is the shortest answer), if known."""

    def __init__(self, grammar: Grammar, closers: ClosingTokens, max_new: int,
                 path: Sequence[int] | None = None) -> None:
        shortest = len(path) if path else None
        self.matcher = grammar.fresh()
        self.closers = closers
        self.left = int(max_new)          # tokens the row may still write
        self.window = WINDOW + (shortest or 0)
        # 1: the closing path's EOS must fit too; 0 where the budget leaves it no room
        self.reserve = 1 if shortest is None or shortest <= max_new else 0
        # the tokens written so far, for the closing policy of regexes and grammars
        self.uses: dict[int, int] | None = None if closers.json else {}
        self.path: list[int] | None = list(path) if path else None   # from the current state
        self._settled: tuple[int, list[int] | None] | None = None   # (token, path after it)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and nothing may follow: the answer is done."""
        return bool(self.matcher.is_stopped())

    def words(self) -> np.ndarray:
        """This step's allowed tokens, as bitmask words."""
        return mask_words(self.matcher)

    def logit_bias(self) -> bytes:
        """This step's allowed tokens, one byte per token: 0 where forbidden."""
        return self.matcher.compute_logit_bias()

    def settle(self, token: int) -> int:
        """The token this row writes, given the one it sampled (see the class docstring)."""
        self._settled = None
        if self.left > self.window or token == self.closers.eos:
            return token
        path = self._path_after(token)
        # after this token, `left - 1` remain: enough for the closing path (its EOS too,
        # but where the budget never left room for it)
        if path is not None and len(path) - 1 + self.reserve <= self.left - 1:
            self._settled = (token, path)
            return token
        if self.path:
            closing: int | None = self.path[0]
            self._settled = (closing, self.path[1:])
        else:
            closing = closing_choice(self.matcher, self.closers, self.uses)
        return token if closing is None else closing

    def _path_after(self, token: int) -> list[int] | None:
        """The closing path after `token` (None: none within the window)."""
        path = self.path
        if path:
            if path[0] == token:
                return path[1:]
            # the token in the place of the path's first, or before it (each kept path
            # still ends in EOS, so an empty one is no path)
            for kept in (path[1:], path):
                if len(kept) + self.reserve > self.left:     # it would not fit
                    break
                if kept and self.matcher.validate_tokens([token, *kept]) == len(kept) + 1:
                    return kept
        after = self.matcher.deep_copy()
        if not after.consume_token(token):
            return None
        uses = None if self.uses is None else {**self.uses, token: self.uses.get(token, 0) + 1}
        return closing_path(after, self.closers, self.window, uses)

    def accept(self, token: int) -> bool:
        """The row's token (after `settle`); False when the grammar refused it."""
        settled, self._settled = self._settled, None
        self.path = settled[1] if settled is not None and settled[0] == token else None
        self.left -= 1
        if self.uses is not None:
            self.uses[token] = self.uses.get(token, 0) + 1
        if token == self.closers.eos and self.matcher.is_accepting():
            return True
        return bool(self.matcher.consume_token(token))


def step_mask(rows: Sequence[RowGrammar | None], vocab_size: int, device: torch.device,
              packed: bool | None = None) -> torch.Tensor | None:
    """A (B, V) bool tensor of the tokens each row may not write (None when no row is
    constrained); a free row forbids nothing.

    On a CPU, from llguidance's one byte per token, turned into bools by `bytes.translate`
    (no tensor operation: on a CPU each step's extra calls are what a constrained row
    costs); on an accelerator (`packed`), from its bitmask words, copied to the device and
    unpacked there (32 times fewer bytes to copy than one byte per token)."""
    if all(r is None for r in rows):
        return None
    if not (device.type != "cpu" if packed is None else packed):
        forbidden = _forbidden(rows, vocab_size)
        return forbidden if device.type == "cpu" else forbidden.to(device)
    words = torch.from_numpy(_words(rows, (vocab_size + 31) // 32)).to(device)
    bits = (words.unsqueeze(-1) >> _bits(device)) & 1
    return bits.view(len(rows), -1)[:, :vocab_size] == 0


def _forbidden(rows: Sequence[RowGrammar | None], vocab_size: int) -> torch.Tensor:
    """(B, V) bool on the host, from each row's bytes (a lone row's as they are)."""
    if len(rows) == 1 and rows[0] is not None:
        return _row_forbidden(rows[0], vocab_size)[None]
    out = torch.zeros((len(rows), vocab_size), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is not None:
            out[i] = _row_forbidden(row, vocab_size)
    return out


# llguidance's byte per token (0: forbidden, 200: allowed) as a bool, True where forbidden:
# bytes.translate does in C what a tensor comparison would do in an operation
_FORBIDDEN = bytes([1] + [0] * 255)


def _row_forbidden(row: RowGrammar, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the tokens llguidance's bytes forbid, and any past its vocabulary."""
    forbidden = bytearray(row.logit_bias().translate(_FORBIDDEN))
    if len(forbidden) != vocab_size:
        forbidden = forbidden[:vocab_size].ljust(vocab_size, b"\x01")
    return torch.frombuffer(forbidden, dtype=torch.bool)


def _words(rows: Sequence[RowGrammar | None], width: int) -> np.ndarray:
    """(B, width) int32: each row's mask words (all ones for a free row), cut or padded with
    zeros to `width`."""
    words = np.full((len(rows), width), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        if row is not None:
            allowed = row.words()
            n = min(len(allowed), width)
            words[i, :n] = allowed[:n]
            words[i, n:] = 0
    return words


@functools.lru_cache(maxsize=8)
def _bits(device: torch.device) -> torch.Tensor:
    """0..31, the shifts that unpack a word (never written)."""
    return torch.arange(32, device=device, dtype=torch.int32)


def apply_mask(logits: torch.Tensor, forbidden: torch.Tensor | None) -> torch.Tensor:
    """Logits with every token a row's grammar forbids (`step_mask`) at -inf (a new tensor)."""
    if forbidden is None:
        return logits
    return logits.masked_fill(forbidden, float("-inf"))


@dataclass(frozen=True)
class Constraint:
    """A request's compiled constraint, ready to give each of its rows a RowGrammar."""

    grammar: Grammar
    closers: ClosingTokens
    path: tuple[int, ...]         # the closing path from the start: the shortest answer

    def row(self, max_new: int) -> RowGrammar:
        return RowGrammar(self.grammar, self.closers, max_new, self.path)
