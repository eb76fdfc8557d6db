"""Structured outputs: an answer held to a JSON schema, a regex, a choice or a grammar by
masking each step's tokens (llguidance; see compiler.py for why)."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from ..types import StructuredOutput
from .compiler import GrammarCompiler
from .row import ClosingTokens, Constraint, RowGrammar, apply_mask, opening_path, step_mask

__all__ = ["Constraint", "RowGrammar", "StructuredOutputs", "apply_mask", "step_mask"]


class StructuredOutputs:
    """One per engine: compiles a request's constraint (cached) and checks that its answer
    can close within the request's max_tokens."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_ids else min(eos_ids)
        self.compiler = GrammarCompiler(tokenizer, vocab_size, [eos])
        self.closers = ClosingTokens.of(tokenizer, eos)

    def prepare(self, spec: StructuredOutput, max_new: int) -> Constraint:
        """The constraint for a request that may write `max_new` tokens; InvalidRequestError
        when it is malformed or its shortest answer does not fit."""
        grammar = self.compiler.compile(spec)
        closers = self.closers.for_kind(spec.kind())
        path = opening_path(grammar, closers)
        if path is None or len(path) - 1 > max_new:   # its EOS left out, as a last resort
            need = "more than 1024" if path is None else str(len(path) - 1)
            raise InvalidRequestError(
                f"max_tokens={max_new} is too few for this structured output: its shortest "
                f"answer takes {need} tokens.", param="max_tokens")
        return Constraint(grammar, closers, tuple(path))
