"""Compiling a request's constraint (engine.types.StructuredOutput) into a grammar, with
llguidance, and keeping compiled grammars for the next request that sends the same one.

Why llguidance rather than xgrammar (vLLM's default): measured on this machine with the tiny
model's tokenizer, an enum of 100,000 strings took xgrammar 217 s to compile (vLLM's request
was busy for over a minute), while llguidance refused it as "schema too large" in 0.04 s; a
200-deep nested object took xgrammar 1.0 s and llguidance refused it at once ("recursion limit
exceeded"). llguidance bounds every grammar by fuel and size limits (LLParserLimits) instead
of by wall time, and computes masks lazily, so a hostile schema costs a bounded amount of work.

JSON is compiled without free whitespace (`whitespace_flexible: false`): vLLM's grammar allows
any whitespace between tokens, and a weak model then writes newlines until max_tokens.

Compilation runs where requests are prepared (the API's submit threads, never the device
thread); llguidance releases the GIL while it builds a grammar."""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError
from ..inputs.validation import json_depth_ok
from ..types import StructuredOutput

JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SPEC_CHARS = 256 * 1024        # the schema, regex or grammar text, before any work
MAX_CHOICES = 4096
MAX_SCHEMA_DEPTH = 64                # JSON containers; llguidance refuses deep recursion itself


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="structured_outputs")


def _llguidance() -> Any:
    """llguidance, imported on first use: the engine runs without it (bench/gpu.sh on a bare
    PyTorch image) until a request asks for a constraint, which is then refused."""
    try:
        import llguidance
        import llguidance.gbnf_to_lark
        import llguidance.hf
    except ImportError:
        raise _bad("This server was installed without llguidance, which structured outputs "
                   "and forced tool calls need.") from None
    return llguidance


def _limits() -> Any:
    """llguidance's defaults, except that errors never quote the grammar back (it can be
    large, and the message goes into one line of the API's answer)."""
    return _llguidance().LLParserLimits(verbose_errors=False)


@dataclass(frozen=True)
class Grammar:
    """A compiled, checked constraint: `fresh()` gives each row its own matcher."""

    key: str
    size: int          # characters of llguidance's grammar text: what the cache counts
    template: Any      # an LLMatcher that has consumed nothing

    def fresh(self) -> Any:
        return self.template.deep_copy()


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for a constraint; InvalidRequestError for one that is not one."""
    kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(spec, k) is not None]
    if len(kinds) + spec.json_object != 1:
        raise _bad("Give exactly one constraint: json, json_object, regex, choice or grammar.")
    if spec.json_object:
        return _llguidance().LLMatcher.grammar_from_json_schema({"type": "object"},
                                                              defaults=JSON_OPTIONS)
    if spec.json is not None:
        schema = spec.json
        text = schema if isinstance(schema, str) else json.dumps(schema)
        _check_size(text, "JSON schema")
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(f"The JSON schema is not valid JSON: {exc.msg}.") from None
        if not isinstance(parsed, (dict, bool)):
            raise _bad("The JSON schema must be a JSON object.")
        if not json_depth_ok(parsed, MAX_SCHEMA_DEPTH):
            raise _bad(f"The JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels.")
        return _llguidance().LLMatcher.grammar_from_json_schema(closed_objects(parsed),
                                                              defaults=JSON_OPTIONS)
    if spec.regex is not None:
        _check_size(spec.regex, "regex")
        # \d, \w and \s as ASCII classes (JSON Schema's and xgrammar's reading), not Unicode's
        return "start: /" + _llguidance().regex_to_lark(spec.regex, "dw") + "/\n"
    if spec.choice is not None:
        choices = list(spec.choice)
        if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c
                                                                for c in choices):
            raise _bad(f"choice must be 1 to {MAX_CHOICES} non-empty strings.")
        _check_size("".join(choices), "choice list")
        return "start: " + " | ".join(json.dumps(c) for c in choices) + "\n"
    _check_size(spec.grammar or "", "grammar")
    try:
        return _llguidance().gbnf_to_lark.any_to_lark(spec.grammar or "")
    except Exception as exc:   # the GBNF converter's own parse errors
        raise _bad(f"The grammar could not be read: {exc}.") from None


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists its
    `properties` and says nothing of others (OpenAI's strict mode asks for exactly this): the
    answer then names only the properties the schema describes, in its order, so each next
    required property is forced and an answer near its token budget can always be closed.
    Iterative, on a copy."""
    root = json.loads(json.dumps(schema))
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and "patternProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return root


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise _bad(f"The {what} is {len(text)} characters long; the limit is {MAX_SPEC_CHARS}.")


def spec_key(spec: StructuredOutput) -> str:
    """The cache key: the constraint's kind and canonical text."""
    value: Any = spec.json
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    return json.dumps([spec.kind(), value, spec.regex, spec.choice, spec.grammar],
                      sort_keys=True, default=str)


class GrammarCompiler:
    """One per engine: the tokenizer as llguidance sees it (built once: about a second for a
    real vocabulary) and the compiled grammars by constraint, least recently used first out
    past `cache_chars` characters of grammar text."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int],
                 cache_chars: int = 32 * 1024 * 1024) -> None:
        self.vocab_size = int(vocab_size)
        self.tokenizer = _llguidance().hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                      eos_token=sorted(eos_ids)[0])
        self.cache_chars = cache_chars
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def cached_chars(self) -> int:
        """Characters of grammar text the cache holds."""
        with self._lock:
            return self._held

    def compile(self, spec: StructuredOutput) -> Grammar:
        """The grammar for `spec`, from the cache or compiled now; InvalidRequestError naming
        the problem for a malformed one, or one past llguidance's size and fuel limits."""
        key = spec_key(spec)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
        text = grammar_text(spec)
        template = _llguidance().LLMatcher(self.tokenizer, text, log_level=0, limits=_limits())
        if template.is_error():
            raise _bad(f"The {spec.kind().replace('_', ' ')} constraint cannot be used: "
                       f"{_first_line(template.get_error())}")
        grammar = Grammar(key, len(text), template)
        with self._lock:
            self.misses += 1
            if key not in self._cache:
                self._cache[key] = grammar
                self._held += grammar.size
                while self._held > self.cache_chars and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._held -= old.size
        return grammar


def _first_line(message: str) -> str:
    """llguidance's error as one line: its first line, and the parser's own `error: ...`
    line where it has one (between them it quotes the input with a caret)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid"
    cause = next((line[len("error:"):].strip() for line in lines[1:]
                  if line.startswith("error:")), "")
    return f"{lines[0].rstrip(':')}: {cause}"[:300] if cause else lines[0][:300]
