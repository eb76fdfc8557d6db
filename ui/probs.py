"""The answer's tokens with their probabilities, for the page's opt-in "Show token
probabilities" panel: each token of the finished answer a span whose tooltip (its title)
gives the token's probability and the likeliest alternatives, shaded by how unlikely it was.

The panel, not the chat, shows it: Gradio's Chatbot lets such spans through, but its Copy
buttons copy a message's source (the spans' HTML, not the answer) and a span per token
breaks the answer's Markdown (lists, code blocks, tables). So the chat keeps the plain
answer, and the panel shows the same text as the tokenizer wrote it, unrendered.

The text shown is the answer exactly: the engine's token texts are decoded one token alone
(vLLM's way), which is not always the answer's text (a special token the answer leaves out,
a character split over two tokens, a tokenizer that is not byte-level), so `align` splits
the answer by them where they match and gives the tokens that do not match to the text
around them. No Gradio and no torch here."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from engine.types import TokenLogprob

TOP = 5                  # alternatives asked of the engine per token (vLLM's logprobs=k)
RESYNC = 16              # characters looked ahead for a token after ones that did not match
EMPTY_NOTE = ("<div class='qvl-probs-note'>The next answer's tokens appear here when it is "
              "complete: hover one for its probability and the likeliest alternatives.</div>")
CONTROL = re.compile(r"[\x00-\x1f\x7f\\']")
ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}


@dataclass
class Piece:
    """A stretch of the answer and the tokens behind it (none: text no token accounts for)."""

    text: str
    tokens: list[TokenLogprob] = field(default_factory=list)


def align(text: str, tokens: Sequence[TokenLogprob]) -> list[Piece]:
    """The answer cut into pieces, one per token whose text comes next in it; a token whose
    text does not (empty, a special token, part of a character) joins the next piece that
    matches, or the last piece at the end. After such tokens the next one is looked for a
    few characters ahead (RESYNC): the text skipped is theirs. The pieces' texts, joined,
    are `text` whatever the tokens say."""
    pieces: list[Piece] = []
    pending: list[TokenLogprob] = []
    pos = 0
    for tok in tokens:
        piece = tok.token
        at = -1
        if piece and text.startswith(piece, pos):
            at = pos
        elif piece and pending:
            at = text.find(piece, pos, pos + RESYNC + len(piece))
        if at < 0:
            pending.append(tok)
            continue
        if at > pos:
            pieces.append(Piece(text[pos:at], pending))
            pending = []
        pieces.append(Piece(piece, pending + [tok]))
        pending, pos = [], at + len(piece)
    if pos < len(text):
        pieces.append(Piece(text[pos:], pending))
    elif pending and pieces:
        pieces[-1].tokens.extend(pending)
    return pieces


def quoted(token: str) -> str:
    """A token's text in single quotes, with its spaces kept and its line breaks, tabs and
    other control characters written as escapes (a tooltip would show them as nothing)."""
    return "'" + CONTROL.sub(lambda m: ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"),
                             token) + "'"


def probability(logprob: float) -> str:
    """A probability in two decimals; a smaller one than 0.01 in scientific notation."""
    p = math.exp(logprob) if logprob > -745 else 0.0
    return f"{p:.2f}" if p >= 0.005 else f"{p:.1e}"


def describe(tok: TokenLogprob) -> str:
    """One token's line: "p=0.83 · alternatives: ' blue' 0.10, ' red' 0.04" (its rank too
    when it was not among the likeliest, as a sampled token may not be)."""
    line = f"p={probability(tok.logprob)}"
    if tok.rank > 1 and all(t.token_id != tok.token_id for t in tok.top):
        line += f" (rank {tok.rank})"
    others = [f"{quoted(t.token)} {probability(t.logprob)}" for t in tok.top
              if t.token_id != tok.token_id]
    return line + (f" · alternatives: {', '.join(others)}" if others else "")


def title(piece: Piece) -> str:
    """A piece's tooltip: its token's line, or one line per token, each named, when several
    tokens make it (a character split over tokens, a special token the answer leaves out)."""
    if len(piece.tokens) == 1 and piece.tokens[0].token == piece.text:
        return describe(piece.tokens[0])
    return "\n".join(f"{quoted(t.token)} {describe(t)}" for t in piece.tokens)


def shade(piece: Piece) -> str:
    """A background as faint as the piece's least likely token is likely: none at p = 1,
    a clear red at p = 0, so the surprising tokens stand out."""
    p = min(math.exp(t.logprob) for t in piece.tokens)
    return f"background-color: rgba(239, 68, 68, {0.5 * (1 - p):.2f})"


def annotate(text: str, tokens: Sequence[TokenLogprob]) -> str:
    """The panel's HTML for an answer: every piece escaped, in a span with its tooltip and
    shade where tokens make it; the container keeps the answer's spaces and line breaks, so
    its text is the answer's."""
    out = []
    for piece in align(text, tokens):
        shown = html.escape(piece.text, quote=False).replace("\r", "&#13;")  # kept, not LF
        if piece.tokens:
            shown = (f"<span class='qvl-tok' title=\"{html.escape(title(piece))}\" "
                     f"style=\"{shade(piece)}\">{shown}</span>")
        out.append(shown)
    return f"<div class='qvl-probs-text'>{''.join(out)}</div>"
