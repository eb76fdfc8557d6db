"""Validation of vLLM-style sampling fields and their translation to
`model.generate` keyword arguments. Messages follow vLLM's wording so API
users see what they would see from `vllm serve`."""

from __future__ import annotations

import copy
import math
from typing import Any

from ..errors import InvalidRequestError
from ..types import SamplingParams

MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 2.0              # vLLM 0.32 refuses hotter
MAX_N = 16384                      # vLLM's VLLM_MAX_N_SEQUENCES default
MAX_BAD_WORDS = 128                # vLLM's VLLM_MAX_NUM_BAD_WORDS default
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SAMPLING_EPS = 1e-5                # below this temperature vLLM samples greedily


def _bad(message: str, param: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"{message} (parameter={param}, value={value})", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_key(value: Any) -> int | None:
    """A logit_bias key as vLLM reads it (JSON keys are strings): int(key), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_sampling(sp: SamplingParams, max_model_len: int) -> None:
    """Raise InvalidRequestError for any value vLLM would refuse."""
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(sp, name)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise _bad(f"{name} must be a finite number, got {value}.", name, value)
    if sp.temperature is not None and sp.temperature < 0:
        raise _bad(f"temperature must be non-negative, got {float(sp.temperature)}.", "temperature",
                   float(sp.temperature))
    if sp.temperature is not None and sp.temperature > MAX_TEMPERATURE:
        raise _bad(f"temperature must be in [0, 2], got {float(sp.temperature)}.", "temperature",
                   float(sp.temperature))
    if sp.top_p is not None and not 0 < sp.top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {float(sp.top_p)}.", "top_p", float(sp.top_p))
    if sp.top_k is not None and (not isinstance(sp.top_k, int) or sp.top_k < -1):
        raise _bad(f"top_k must be 0 or -1 (disable), or at least 1, got {sp.top_k}.", "top_k",
                   sp.top_k)
    if sp.repetition_penalty is not None and sp.repetition_penalty <= 0:
        raise _bad(f"repetition_penalty must be greater than zero, got {sp.repetition_penalty}.",
                   "repetition_penalty", sp.repetition_penalty)
    if sp.max_tokens is not None:
        if not isinstance(sp.max_tokens, int) or sp.max_tokens < 1:
            raise _bad(f"max_tokens must be at least 1, got {sp.max_tokens}.", "max_tokens",
                       sp.max_tokens)
        if sp.max_tokens > max_model_len:
            raise _bad(f"max_tokens={sp.max_tokens} cannot be greater than "
                       f"max_model_len={max_model_len}. Please request fewer output tokens.",
                       "max_tokens", sp.max_tokens)
    if not isinstance(sp.min_tokens, int) or sp.min_tokens < 0:
        raise _bad(f"min_tokens must be greater than or equal to 0, got {sp.min_tokens}.",
                   "min_tokens", sp.min_tokens)
    if sp.max_tokens is not None and sp.min_tokens > sp.max_tokens:
        raise _bad(f"min_tokens must be less than or equal to max_tokens={sp.max_tokens}, "
                   f"got {sp.min_tokens}.", "min_tokens", sp.min_tokens)
    if sp.seed is not None and (not _is_int(sp.seed) or not INT64_MIN <= sp.seed <= INT64_MAX):
        raise _bad(f"seed must be a 64-bit integer ({INT64_MIN} to {INT64_MAX}), got {sp.seed}.",
                   "seed", sp.seed)
    if len(sp.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in sp.stop):
        raise _bad(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings.", "stop", sp.stop)
    _check_choices(sp)
    _check_beam_search(sp)
    _check_penalties(sp)
    _check_token_fields(sp)
    _check_logprobs(sp)


def generate_kwargs(sp: SamplingParams, base_config: Any, max_new_tokens: int) -> dict:
    """`generate` arguments for one batch; unset fields keep the model's generation_config."""
    gc = copy.deepcopy(base_config)
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    if sp.temperature is not None:
        if sp.temperature == 0:
            gc.do_sample = False
        else:
            gc.do_sample = True
            gc.temperature = float(sp.temperature)
    if sp.top_p is not None:
        gc.top_p = float(sp.top_p)
    if sp.top_k is not None:
        gc.top_k = 0 if sp.top_k in (0, -1) else int(sp.top_k)   # 0 disables; None would
        # fall back to the model's default (top_k=1 for Qwen2.5-VL)
    if sp.repetition_penalty is not None:
        gc.repetition_penalty = float(sp.repetition_penalty)
    if sp.min_tokens:
        gc.min_new_tokens = int(sp.min_tokens)
    if not gc.do_sample:
        # Greedy ignores these; neutral values avoid transformers' per-request warnings
        # (None would be refilled from the model's generation_config).
        gc.temperature, gc.top_p, gc.top_k = 1.0, 1.0, 50
    if sp.ignore_eos:
        # Rows stop on our own criteria (max_tokens), never on EOS. An empty list, not None:
        # None counts as "unset" and is refilled from the model's generation_config.
        gc.eos_token_id = []
    return {"generation_config": gc}


def _check_choices(sp: SamplingParams) -> None:
    """n, as vLLM's _verify_num_sequences and _verify_greedy_sampling check it."""
    if not _is_int(sp.n):
        raise _bad(f"n must be an int, but is of type {type(sp.n)}", "n", sp.n)
    if sp.n < 1:
        raise _bad(f"n must be at least 1, got {sp.n}.", "n", sp.n)
    if sp.n > MAX_N:
        raise _bad(f"n must be at most {MAX_N}, got {sp.n}.", "n", sp.n)
    if (sp.n > 1 and sp.temperature is not None and sp.temperature < SAMPLING_EPS
            and not sp.use_beam_search):
        raise _bad(f"n must be 1 when using greedy sampling, got {sp.n}.", "n", sp.n)


def _check_beam_search(sp: SamplingParams) -> None:
    """use_beam_search and length_penalty (vLLM's beam search takes n beams at any
    temperature, so the greedy check on n does not apply to it)."""
    if not isinstance(sp.use_beam_search, bool):
        raise _bad(f"use_beam_search must be a boolean, got {sp.use_beam_search}.",
                   "use_beam_search", sp.use_beam_search)
    if not _is_number(sp.length_penalty):
        raise _bad(f"length_penalty must be a finite number, got {sp.length_penalty}.",
                   "length_penalty", sp.length_penalty)


def _check_penalties(sp: SamplingParams) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sp, name)
        if not _is_number(value) or not -2.0 <= value <= 2.0:
            raise _bad(f"{name} must be in [-2, 2], got {value}.", name, value)
    if not _is_number(sp.min_p) or not 0.0 <= sp.min_p <= 1.0:
        raise _bad(f"min_p must be in [0, 1], got {sp.min_p}.", "min_p", sp.min_p)


def _check_token_fields(sp: SamplingParams) -> None:
    """The fields that name token ids or words; their ids are checked against the model's
    vocabulary by `validate_for_model`."""
    if not all(_is_int(i) for i in sp.stop_token_ids):
        raise _bad(f"stop_token_ids must contain only integers, got {sp.stop_token_ids}.",
                   "stop_token_ids", sp.stop_token_ids)
    if not all(isinstance(w, str) for w in sp.bad_words):
        raise _bad("bad_words must be a list of strings.", "bad_words", sp.bad_words)
    if any(not w for w in sp.bad_words):
        raise _bad(f"bad_words cannot contain an empty string. Got bad_words={sp.bad_words}",
                   "bad_words", sp.bad_words)
    if len(sp.bad_words) > MAX_BAD_WORDS:
        raise _bad(f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(sp.bad_words)}.",
                   "bad_words", len(sp.bad_words))
    if sp.allowed_token_ids is not None:
        if len(sp.allowed_token_ids) == 0:
            raise _bad("allowed_token_ids is not None and empty!", "allowed_token_ids",
                       sp.allowed_token_ids)
        if not all(_is_int(i) for i in sp.allowed_token_ids):
            raise _bad("allowed_token_ids must contain only integers.", "allowed_token_ids",
                       sp.allowed_token_ids)
    bad_keys = [k for k in sp.logit_bias if _token_key(k) is None]
    if bad_keys:
        raise _bad("logit_bias contains key(s) that cannot be converted to integer token IDs: "
                   f"{bad_keys!r}", "logit_bias", bad_keys)
    if not all(_is_number(v) for v in sp.logit_bias.values()):
        raise _bad("logit_bias values must be finite numbers.", "logit_bias", sp.logit_bias)
    if sp.truncation_side not in ("left", "right"):
        raise _bad(f"truncation_side must be 'left' or 'right', got {sp.truncation_side!r}.",
                   "truncation_side", sp.truncation_side)
    if sp.truncate_prompt_tokens is not None and (not _is_int(sp.truncate_prompt_tokens)
                                                  or sp.truncate_prompt_tokens < -1):
        raise _bad("truncate_prompt_tokens must be greater than or equal to -1, got "
                   f"{sp.truncate_prompt_tokens}.", "truncate_prompt_tokens",
                   sp.truncate_prompt_tokens)


def _check_logprobs(sp: SamplingParams) -> None:
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(sp, name)
        if value is not None and (not _is_int(value) or (value < 0 and value != -1)):
            raise _bad(f"{name} must be non-negative or -1, got {value}.", name, value)


def validate_for_model(sp: SamplingParams, vocab_size: int, max_logprobs: int,
                       max_rows: int) -> None:
    """The checks that need the served model and engine: token ids within the vocabulary
    (the logits' width, as vLLM's verify), logprobs within --max-logprobs (-1: the whole
    vocabulary) and n within the rows the engine decodes at once (n choices are admitted
    together, so more could never start; a beam search's n beams likewise, named by
    use_beam_search)."""
    bias_ids = [_token_key(k) for k in sp.logit_bias]
    for name, ids in (("stop_token_ids", sp.stop_token_ids), ("logit_bias", bias_ids)):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise _bad(f"token_id(s) {bad} in {name} contain out-of-vocab token ids. "
                       f"Vocabulary size: {vocab_size}", name, bad)
    bad = [i for i in sp.allowed_token_ids or () if not 0 <= i < vocab_size]
    if bad:
        raise _bad("allowed_token_ids contains out-of-vocab token id!", "allowed_token_ids", bad)
    limit = vocab_size if max_logprobs == -1 else max_logprobs
    for name, label in (("logprobs", "sample logprobs"), ("prompt_logprobs", "prompt logprobs")):
        asked = getattr(sp, name)
        asked = vocab_size if asked == -1 else asked
        if asked and asked > limit:
            raise _bad(f"Requested {label} of {asked}, which is greater than max allowed: "
                       f"{limit}", name, asked)
    if sp.use_beam_search and sp.n > max_rows:
        raise _bad(f"use_beam_search with n={sp.n} needs {sp.n} rows decoding at once; this "
                   f"server decodes at most {max_rows} (--max-batch).", "use_beam_search", True)
    if sp.n > max_rows:
        raise _bad(f"n must be at most {max_rows} (the requests this server decodes at once, "
                   f"--max-batch), got {sp.n}.", "n", sp.n)


def json_depth_ok(data: Any, limit: int) -> bool:
    """Whether no container in a parsed JSON value nests deeper than `limit` (iterative:
    no recursion for a hostile document to exhaust)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return True
