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


def _bad(message: str, param: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"{message} (parameter={param}, value={value})", param=param)


def validate_sampling(sp: SamplingParams, max_model_len: int) -> None:
    """Raise InvalidRequestError for any value vLLM would refuse."""
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(sp, name)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise _bad(f"{name} must be a finite number, got {value}.", name, value)
    if sp.temperature is not None and sp.temperature < 0:
        raise _bad(f"temperature must be non-negative, got {float(sp.temperature)}.", "temperature",
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
    if sp.seed is not None and (not isinstance(sp.seed, int) or not 0 <= sp.seed < 2**63):
        raise _bad(f"seed must be a non-negative integer, got {sp.seed}.", "seed", sp.seed)
    if len(sp.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in sp.stop):
        raise _bad(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings.", "stop", sp.stop)


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
