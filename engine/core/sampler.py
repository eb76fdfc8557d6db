"""Next-token selection for the engine's own decode loop, one row per request.

Continuous batching puts requests with different sampling settings into one decode step,
so `model.generate`'s single LogitsProcessorList per call no longer fits. Here each row
keeps its own settings (`resolve`: the values `generate_kwargs` gives `generate`, plus
vLLM's fields that transformers lacks) and its own state (`RowSampler`), and `sample`
picks one token per row. The pieces run in vLLM v1's sampler order (vllm/v1/sample/
sampler.py), each only when some row of the batch uses it:

    allowed_token_ids mask, bad words (-inf)              every row
    min_tokens (EOS and stop_token_ids masked)            every row
    logit_bias                                            every row
    repetition, frequency, presence penalties             every row
    argmax                                                greedy rows
    temperature, min_p, top-k, top-p, multinomial         sampling rows

A request that uses only what `generate` knows (repetition penalty, min_tokens,
temperature, top-k, top-p) gets scores bit-identical to generate's own order (penalty,
then min_tokens, then the warpers): the only swap is the -inf of min_tokens before the
penalty, and a positive penalty maps -inf to -inf, so both orders give the same floats.
Rows that do not use a piece are left bit-for-bit untouched by it (they see a zero
penalty, a zero min_p, an all-False mask).

The whole batch is processed at once on the logits' device (per-row settings live there
as small tensors), with one host sync per step: the final `.tolist()`. The rows' settings
and penalty state are stacked once when a batch forms (`_Batch`) and reused while the same
rows come back, so a step costs a fixed number of tensor operations, not some per row.
Logprobs
(`token_logprobs`, `prompt_logprobs`) come from the raw logits, as vLLM's default
logprobs mode "raw_logprobs" does, one host transfer per call; `sample_with_logprobs`
carries a step's tokens and its logprobs in one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..types import SamplingParams

# transformers' GenerationConfig._get_default_generation_params(): what `generate` uses for
# a field that both the request and the model's generation_config leave unset (None).
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                "repetition_penalty": 1.0, "min_new_tokens": 0}

LOGIT_BIAS_LIMIT = 100.0    # vLLM clamps each bias into [-100, 100]
MAX_BAD_WORDS = 128         # vLLM's VLLM_MAX_NUM_BAD_WORDS default
_SEED_SPACE = 2 ** 64       # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]


@dataclass(frozen=True)
class RowSampling:
    """One request's resolved settings: what `generate` (and vLLM, for the fields generate
    lacks) would apply to its row.

    Greedy rows carry neutral temperature/top_k/top_p/min_p (greedy ignores them, as
    generate and vLLM do).
    """

    greedy: bool
    temperature: float
    top_k: int                  # 0: off
    top_p: float                # 1.0: off
    repetition_penalty: float   # 1.0: off
    min_tokens: int
    eos_ids: tuple[int, ...]    # () when ignore_eos
    seed: int | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0                                  # 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()      # (token id, bias), clamped
    allowed_token_ids: tuple[int, ...] | None = None    # None: every token allowed
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    stop_token_ids: tuple[int, ...] = ()                # masked with eos_ids until min_tokens

    @property
    def argmax(self) -> bool:
        """Whether the row's token is the argmax of its processed logits: greedy, or sampling
        with top_k == 1 (top-k keeps only the best token, so the draw cannot pick another;
        exact ties aside)."""
        return self.greedy or self.top_k == 1


def _config_value(generation_config: Any, name: str) -> Any:
    value = getattr(generation_config, name, None)
    return _HF_DEFAULTS[name] if value is None else value


def model_defaults(generation_config: Any) -> dict[str, float]:
    """What a request that sets none of temperature, top_p, top_k and repetition_penalty gets
    from the model's generation_config (as vLLM applies it): temperature 0 when it does not
    sample."""
    sampling = bool(_config_value(generation_config, "do_sample"))
    return {"temperature": float(_config_value(generation_config, "temperature")) if sampling else 0.0,
            "top_p": float(_config_value(generation_config, "top_p")),
            "top_k": int(_config_value(generation_config, "top_k")),
            "repetition_penalty": float(_config_value(generation_config, "repetition_penalty"))}


def resolve(sp: SamplingParams, generation_config: Any, eos_ids: set[int],
            bad_words_ids: Iterable[Sequence[int]] = ()) -> RowSampling:
    """The settings `model.generate(**generate_kwargs(sp, generation_config, n))` would use,
    plus vLLM's fields generate lacks.

    Unset (None) request fields keep the model's generation_config, and fields unset there
    too take transformers' global defaults (notably top_k=50 when sampling). temperature 0
    means greedy, > 0 sampling at that temperature; otherwise do_sample comes from the
    generation_config. Qwen2.5-VL's config samples with top_k=1, so its default, and a
    request that sets only a temperature, are effectively greedy (with penalty 1.05).

    bad_words_ids: `bad_words_token_ids(tokenizer, sp.bad_words)`. Ranges are the front
    end's to check; here logit_bias is clamped as vLLM clamps it and seed -1 means no seed,
    as in vLLM's SamplingParams.
    """
    do_sample = bool(_config_value(generation_config, "do_sample"))
    temperature = float(_config_value(generation_config, "temperature"))
    if sp.temperature is not None:
        do_sample = sp.temperature != 0
        if do_sample:
            temperature = float(sp.temperature)
    top_p = float(sp.top_p if sp.top_p is not None else _config_value(generation_config, "top_p"))
    if sp.top_k is not None:
        top_k = 0 if sp.top_k in (0, -1) else int(sp.top_k)
    else:
        top_k = int(_config_value(generation_config, "top_k"))
    top_k = max(top_k, 0)
    penalty = float(sp.repetition_penalty if sp.repetition_penalty is not None
                    else _config_value(generation_config, "repetition_penalty"))
    min_tokens = int(sp.min_tokens or _config_value(generation_config, "min_new_tokens"))
    if do_sample and temperature <= 0:
        do_sample = False   # generate refuses this; sampling at temperature 0 is the argmax
    min_p = float(sp.min_p or 0.0)
    if not do_sample:
        temperature, top_k, top_p, min_p = 1.0, 0, 1.0, 0.0
    bias = tuple(sorted((int(t), min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(b))))
                        for t, b in (sp.logit_bias or {}).items()))
    allowed = (tuple(sorted({int(t) for t in sp.allowed_token_ids})) if sp.allowed_token_ids
               else None)
    return RowSampling(greedy=not do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=penalty, min_tokens=min_tokens,
                       eos_ids=() if sp.ignore_eos else tuple(sorted(int(i) for i in eos_ids)),
                       seed=None if sp.seed == -1 else sp.seed,
                       presence_penalty=float(sp.presence_penalty or 0.0),
                       frequency_penalty=float(sp.frequency_penalty or 0.0), min_p=min_p,
                       logit_bias=bias, allowed_token_ids=allowed,
                       bad_words_ids=tuple(tuple(int(t) for t in w) for w in bad_words_ids if w),
                       stop_token_ids=tuple(sorted({int(t) for t in sp.stop_token_ids or ()})))


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """vLLM's token sequences for `bad_words` (SamplingParams.update_from_tokenizer): each
    word without and with a leading space, so it is banned at the start of the text and in
    its middle; the spaced form only when it is a different word of as many tokens."""
    sequences: list[list[int]] = []
    for word in dict.fromkeys(words):
        for add_prefix_space in (False, True):
            ids = list(tokenizer.encode((" " if add_prefix_space else "") + word.lstrip(),
                                        add_special_tokens=False))
            if not ids:
                if not add_prefix_space:
                    raise ValueError("bad_words entries must tokenize to at least one token.")
                continue
            plain = sequences[-1] if add_prefix_space else None
            if plain is None or (ids[0] != plain[0] and len(ids) == len(plain)):
                sequences.append(ids)
                if len(sequences) > MAX_BAD_WORDS:
                    raise ValueError(f"Too many bad words after tokenization: {len(sequences)}. "
                                     f"The max number is {MAX_BAD_WORDS}.")
    return sequences


@functools.lru_cache(maxsize=8)
def _neutral(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(4, V) float32: the penalties' factors (`RowSampler._state`) of a row without
    penalties: 1.0 to multiply and divide by, 0.0 to subtract (never written)."""
    return torch.tensor([1.0, 1.0, 0.0, 0.0], device=device)[:, None].repeat(1, vocab_size)


def _float32(value: float) -> float:
    """The float32 nearest to `value`, as a Python float (what a float32 tensor holds)."""
    return float(torch.tensor(value, dtype=torch.float32))


def divides_by_reciprocal(device: torch.device) -> bool:
    """Whether `tensor / python_float` multiplies by the float32 reciprocal on `device`.

    PyTorch's CUDA kernel does (the CPU one divides), so transformers' `scores / penalty`
    and `scores / temperature` do too; doing the same keeps our scores bit-identical.
    """
    return device.type == "cuda"


def _vocab_tensor(ids: Iterable[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i in ids if 0 <= i < vocab_size], dtype=torch.long, device=device)


class RowSampler:
    """Per-request sampling state: its settings, its own torch.Generator (seeded when seed is
    set, so a seeded request samples the same tokens alone and in a batch; unseeded rows
    draw from the device's default generator, as generate does), the token ids seen so
    far (prompt + generated) for the repetition penalty, the generated tokens' counts for
    the frequency and presence penalties, and the tail of the generated tokens that
    multi-token bad words are matched against; tensors on the logits' device.

    prompt_ids: the row's input ids as generate would see them, without padding (image
    and video pad tokens included: generate penalises them too). Ids >= vocab_size are
    ignored here, as RepetitionPenaltyLogitsProcessor does (logit_bias, allowed_token_ids
    and bad words too: the front end refuses them first).
    """

    def __init__(self, settings: RowSampling, prompt_ids: torch.Tensor, vocab_size: int,
                 device: torch.device | str, reciprocal: bool | None = None) -> None:
        self.settings = settings
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.generated = 0
        self.generator: torch.Generator | None = None
        if settings.seed is not None and not settings.argmax:
            # Python's modulo maps a negative seed as manual_seed itself does (two's
            # complement), and makes any integer a valid one.
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(settings.seed % _SEED_SPACE)
        self.penalised = settings.repetition_penalty != 1.0
        self.counted = settings.frequency_penalty != 0.0 or settings.presence_penalty != 0.0
        # how this device divides by a Python float (None: as PyTorch does on it)
        self.reciprocal = divides_by_reciprocal(self.device) if reciprocal is None else reciprocal
        penalty = _float32(settings.repetition_penalty)
        divisor = _float32(self._divisor(settings.repetition_penalty))
        frequency = _float32(settings.frequency_penalty)
        presence = _float32(settings.presence_penalty)
        # The penalties' state as the factors a step applies (`_state`, (4, V)): penalty and
        # divisor on the seen tokens (1.0 elsewhere), frequency * count and presence * (count > 0)
        # (the products vLLM computes each step, in float32: f32 * n is exact in a double,
        # so rounding it once to float32 gives the same float); the seen tokens and counts
        # themselves are kept on the host, to know what a new token changes.
        self._updates = (penalty, divisor, frequency, presence)
        self._seen_ids: set[int] = set()
        self._count: dict[int, int] = {}
        self._state = _neutral(self.vocab_size, self.device)
        if self.penalised or self.counted:
            self._state = _neutral(self.vocab_size, self.device).clone()
        if self.counted:    # f * 0 and p * 0: -0.0 for a negative penalty, as vLLM's product
            self._state[2].fill_(frequency * 0.0)
            self._state[3].fill_(presence * 0.0)
        if self.penalised:
            ids = prompt_ids.reshape(-1).tolist()
            self._seen_ids = {int(t) for t in ids if 0 <= t < self.vocab_size}
            where = torch.tensor(sorted(self._seen_ids), dtype=torch.long, device=self.device)
            self._state[0].index_fill_(0, where, penalty)
            self._state[1].index_fill_(0, where, divisor)
        # Generated tokens not yet in _state: recorded by the next step's batch in one
        # operation for all rows, since a per-token tensor write costs microseconds of
        # Python per row and step.
        self._pending: list[int] = []
        self._batch: _Batch | None = None   # the stacked batch this row's state lives in
        self._slot = -1
        stops = _vocab_tensor((*settings.eos_ids, *settings.stop_token_ids), self.vocab_size,
                              self.device)
        self.eos = stops if stops.numel() else None   # masked until min_tokens
        self.banned = self._static_ban()
        self.bad_sequences = [w for w in settings.bad_words_ids if len(w) > 1]
        self.tail_length = max((len(w) - 1 for w in self.bad_sequences), default=0)
        self.tail: list[int] = []
        self.bias_ids = self.bias_values = None
        if settings.logit_bias:
            pairs = [(t, b) for t, b in settings.logit_bias if 0 <= t < self.vocab_size]
            self.bias_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long,
                                         device=self.device)
            self.bias_values = torch.tensor([b for _, b in pairs], dtype=torch.float32,
                                            device=self.device)
        top_p_cut = 1.0 - settings.top_p if settings.top_p < 1.0 else -math.inf
        # the warpers' settings [temperature as a divisor, top_k, 1 - top_p, min_p]: stacked
        # over the batch in `sample`, so per-row settings cost no host-to-device copy per step
        # (the penalties keep their own state, see _Batch)
        self.params = torch.tensor(
            [self._divisor(settings.temperature), float(settings.top_k), top_p_cut,
             settings.min_p], dtype=torch.float32, device=self.device)
        self.reshapes = (self.penalised or self.counted or self.banned is not None
                         or bool(self.bad_sequences) or self.bias_ids is not None)

    def _take_pending(self) -> dict[tuple[int, int], float]:
        """The appended tokens' changes to `_state`: {(factor, token): new value}."""
        pending, self._pending = self._pending, []
        penalty, divisor, frequency, presence = self._updates
        out: dict[tuple[int, int], float] = {}
        for t in pending:
            if self.penalised and t not in self._seen_ids:
                self._seen_ids.add(t)
                out[0, t], out[1, t] = penalty, divisor
            if self.counted:
                n = self._count[t] = self._count.get(t, 0) + 1
                out[2, t] = frequency * n
                if n == 1:
                    out[3, t] = presence
        return out

    def _static_ban(self) -> torch.Tensor | None:
        """The tokens that are -inf at every step: those outside allowed_token_ids, and the
        one-token bad words (both masks, so their order does not matter)."""
        s = self.settings
        single = [w[0] for w in s.bad_words_ids if len(w) == 1]
        if s.allowed_token_ids is None and not single:
            return None
        banned = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        if s.allowed_token_ids is not None:
            banned.fill_(True)
            banned[_vocab_tensor(s.allowed_token_ids, self.vocab_size, self.device)] = False
        if single:
            banned[_vocab_tensor(single, self.vocab_size, self.device)] = True
        return banned

    def _divisor(self, value: float) -> float:
        if not self.reciprocal:
            return value
        return float(torch.tensor(1.0) / torch.tensor(value, dtype=torch.float32))

    @property
    def min_pending(self) -> bool:
        """Whether EOS (and stop_token_ids) are still masked (fewer than min_tokens generated)."""
        return self.eos is not None and self.generated < self.settings.min_tokens

    @property
    def plain_argmax(self) -> bool:
        """Whether the raw logits' argmax is this row's token (no processor changes it)."""
        return self.settings.argmax and not self.reshapes and not self.min_pending

    def bad_now(self) -> list[int]:
        """The last tokens of the multi-token bad words whose prefix ends the generated text
        (vLLM's rule: generated tokens only, not the prompt)."""
        tail = self.tail
        return [w[-1] for w in self.bad_sequences
                if len(w) - 1 <= len(tail) and tail[len(tail) - len(w) + 1:] == list(w[:-1])
                and 0 <= w[-1] < self.vocab_size]

    def append(self, token_id: int) -> None:
        """Record a generated token: it counts toward min_tokens, the penalties and bad words."""
        self.generated += 1
        if self.tail_length:
            self.tail = [*self.tail, token_id][-self.tail_length:]
        if (self.penalised or self.counted) and 0 <= token_id < self.vocab_size:
            self._pending.append(token_id)


class _Batch:
    """The stacked settings (`params`) and penalty state (`state`) of a batch of rows,
    built when the batch forms. Each row's own state then becomes a view of its slot here, so
    the state stays the row's, and the batch is reused for as long as the same rows come back
    in the same order (the usual next decode step): the tokens they appended since are recorded
    for all rows at once."""

    def __init__(self, rows: list[RowSampler]) -> None:
        self.size = len(rows)
        self.device = rows[0].device
        self._argmax: list[bool] | torch.Tensor = [r.settings.argmax for r in rows]
        self.params = torch.stack([r.params for r in rows])
        self.penalised = any(r.penalised for r in rows)
        self.counted = any(r.counted for r in rows)
        self.biased = any(r.bias_ids is not None for r in rows)
        self.bans = any(r.banned is not None or r.bad_sequences for r in rows)
        self.reciprocal = rows[0].reciprocal
        # min(x * penalty, x / penalty) is the repetition penalty's branch when every penalty
        # is finite and >= 1 (rounding keeps x * penalty <= x <= x / penalty for x < 0 and the
        # reverse for x > 0; both are x where the factors are 1.0): one operation for two.
        self.shrinks = all(math.isfinite(r.settings.repetition_penalty)
                           and r.settings.repetition_penalty >= 1.0 for r in rows if r.penalised)
        # (4, B, V): the rows' `_state`, which become views of it
        self.state = (torch.stack([r._state for r in rows], dim=1)
                      if self.penalised or self.counted else None)
        self.factors = self.state.unbind(0) if self.state is not None else ()
        # on a CPU, `state` as a flat numpy view: a step's few writes cost no tensor
        # operations (two tensors and an index_put_ were a fifth of a mixed step's sampling)
        self._host = (self.state.view(-1).numpy()
                      if self.state is not None and self.device.type == "cpu" else None)
        self.stoppable = [r for r in rows if r.eos is not None]   # min_tokens may mask
        self.drawing = [r for r in rows if not r.settings.argmax]
        for i, r in enumerate(rows):
            r._batch, r._slot = self, i
            if self.state is not None:
                r._state = self.state[:, i]

    def argmax_rows(self) -> torch.Tensor:
        """(B,) bool: the rows whose token is their argmax (`RowSampling.argmax`)."""
        if isinstance(self._argmax, list):   # made on first use: only sampling rows need it
            self._argmax = torch.tensor(self._argmax, dtype=torch.bool, device=self.device)
        return self._argmax

    @classmethod
    def of(cls, rows: list[RowSampler]) -> "_Batch":
        """The rows' batch, reused or built, with every appended token recorded."""
        batch = rows[0]._batch
        if batch is None or batch.size != len(rows) or any(
                r._batch is not batch or r._slot != i for i, r in enumerate(rows)):
            batch = cls(rows)
        if batch.penalised or batch.counted:
            batch._record(rows)
        return batch

    def _record(self, rows: list[RowSampler]) -> None:
        """The rows' appended tokens, written into `state` in one indexed write."""
        where: list[int] = []        # flat (factor * B * V + slot * V + token) positions
        values: list[float] = []
        vocab = rows[0].vocab_size
        for i, r in enumerate(rows):
            if r._pending:
                for (k, t), v in r._take_pending().items():
                    where.append((k * self.size + i) * vocab + t)
                    values.append(v)
        if not where:
            return
        if self._host is not None:        # host memory: numpy writes it in place
            self._host[where] = values
            return
        device = rows[0].device
        self.state.view(-1).index_put_(
            (torch.tensor(where, dtype=torch.long, device=device),),
            torch.tensor(values, dtype=torch.float32, device=device))


def _divide(x: torch.Tensor, divisor: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    return x * divisor if reciprocal else x / divisor


def _mask(x: torch.Tensor, rows: list[RowSampler]) -> None:
    """allowed_token_ids, bad words and min_tokens: -inf in place, for the rows using them."""
    for i, r in enumerate(rows):
        if r.banned is not None:
            x[i].masked_fill_(r.banned, -math.inf)
    bad = [(i, t) for i, r in enumerate(rows) if r.bad_sequences for t in r.bad_now()]
    if bad:
        where = torch.tensor(bad, dtype=torch.long, device=x.device)
        x[where[:, 0], where[:, 1]] = -math.inf
    for i, r in enumerate(rows):
        if r.min_pending:
            x[i].index_fill_(0, r.eos, -math.inf)


def _penalise(logits: torch.Tensor, rows: list[RowSampler], batch: _Batch) -> torch.Tensor:
    """Everything before the argmax (the module docstring's first four lines), in float32
    (a new tensor when anything is written in place)."""
    masks = batch.bans or any(r.min_pending for r in batch.stoppable)
    if masks or batch.biased:
        x = logits.to(torch.float32, copy=True)
        if masks:
            _mask(x, rows)
        for i, r in enumerate(rows):
            if r.bias_ids is not None:
                x[i].index_add_(0, r.bias_ids, r.bias_values)
    else:
        x = logits.to(torch.float32)
    if batch.state is None:
        return x
    scale, divisor, frequency, presence = batch.factors
    if batch.penalised:
        # signbit(x) picks the same branch as x < 0: -0.0 * penalty and -0.0 / divisor are
        # both -0.0 (the penalty is positive), and it costs one boolean pass less
        shrunk = _divide(x, divisor, batch.reciprocal)
        x = (torch.minimum(x * scale, shrunk, out=shrunk) if batch.shrinks
             else torch.where(torch.signbit(x), x * scale, shrunk))
    if batch.counted:
        # vLLM's two subtractions (model_executor/layers/utils.apply_penalties), in its order,
        # of its products frequency * counts and presence * (counts > 0), kept in `state`
        # (in place where x is already this step's own tensor)
        x = x.sub_(frequency) if batch.penalised else x - frequency
        x.sub_(presence)
    return x


def _warp(x: torch.Tensor, rows: list[RowSampler], active: list[RowSampler],
          params: torch.Tensor) -> torch.Tensor:
    """Temperature, min_p, top-k and top-p (transformers' warpers, min_tokens_to_keep=1) for
    the batch; only the `active` rows' results are meant to be used, so a warper none of
    them needs is skipped."""
    if any(r.settings.temperature != 1.0 for r in active):
        x = _divide(x, params[:, 0:1], rows[0].reciprocal)
    if any(r.settings.min_p > 0.0 for r in active):
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * params[:, 3:4], -math.inf)
    ks = [r.settings.top_k for r in active if r.settings.top_k > 0]
    if ks:
        kmax = min(max(ks), x.shape[-1])
        top = torch.topk(x, kmax, dim=-1).values
        k = params[:, 1:2]
        kth = top.gather(1, (k.clamp(1, kmax) - 1).long())
        kth = torch.where(k > 0, kth, -math.inf)
        x = x.masked_fill(x < kth, -math.inf)
    if any(r.settings.top_p < 1.0 for r in active):
        ordered, order = torch.sort(x, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= params[:, 2:3]
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return x


def _check(logits: torch.Tensor, rows: list[RowSampler]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
    if any(r.vocab_size != logits.shape[1] for r in rows):
        raise ValueError(f"logits have {logits.shape[1]} columns, a row expects another vocab size")


def process_logits(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """The float32 scores each row's processors would produce (all warpers for sampling
    rows, top_k == 1 included): for tests and diagnostics."""
    _check(logits, rows)
    batch = _Batch.of(rows)
    x = _penalise(logits, rows, batch)
    return _warp(x, rows, [r for r in rows if not r.settings.greedy], batch.params)


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """One token id per row; row i of `logits` (B, V) belongs to rows[i].

    The caller appends the chosen tokens (`RowSampler.append`) before the next step.
    """
    return sample_ids(logits, rows).tolist()


def sample_ids(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """`sample`'s tokens as a (B,) long tensor on the logits' device, not yet on the host
    (so that one transfer can carry them with the step's logprobs: `sample_with_logprobs`)."""
    _check(logits, rows)
    if all(r.plain_argmax for r in rows):
        return logits.argmax(dim=-1)
    batch = _Batch.of(rows)
    x = _penalise(logits, rows, batch)
    best = x.argmax(dim=-1)
    drawing = batch.drawing
    if not drawing:
        return best
    probs = _warp(x, rows, drawing, batch.params).softmax(dim=-1)
    # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1) drawn from the
    # generator; written out, so each row draws from its own generator into one batch
    # (the same numbers multinomial would draw) and multinomial's validity check, a host
    # sync per call, is skipped.
    q = torch.ones_like(probs)
    for i, r in enumerate(rows):
        if not r.settings.argmax:
            q[i].exponential_(1.0, generator=r.generator)
    drawn = (probs / q).argmax(dim=-1)
    if len(drawing) == len(rows):
        return drawn
    return torch.where(batch.argmax_rows(), best, drawn)


def sample_with_logprobs(logits: torch.Tensor, rows: list[RowSampler],
                         want: list[int | None]) -> tuple[list[int], TopLogprobs | None]:
    """`sample`'s tokens, and the top logprobs of the rows that asked (`want`, as
    `token_logprobs` takes it; None when no row did), both from one host transfer (on an
    accelerator, one sync a step). The chosen tokens' own figures come from
    `TopLogprobs.for_tokens`, once the caller knows which tokens the rows write."""
    if all(k is None for k in want):
        return sample(logits, rows), None
    ids = sample_ids(logits, rows)
    tops = TopLogprobs.of(logits, want)
    if logits.device.type == "cpu":      # nothing to transfer: joining them would be the cost
        tops.rows = [values + top_ids for values, top_ids
                     in zip(tops.values.tolist(), tops.ids.tolist())]
        return ids.tolist(), tops
    # one tensor, promoted to the values' type (exact for the ids, as in `of`)
    flat = torch.cat([ids, tops.values.reshape(-1), tops.ids.reshape(-1)]).tolist()
    size, width, asked = len(rows), tops.width, len(tops.asked)
    ids_at = size + asked * width
    tops.rows = [flat[size + n * width:size + (n + 1) * width]
                 + flat[ids_at + n * width:ids_at + (n + 1) * width] for n in range(asked)]
    return [int(t) for t in flat[:size]], tops


@dataclass
class RawLogprobs:
    """One position's logprobs under the model's raw distribution: the chosen (or prompt)
    token's, its rank (1: the most likely; vLLM counts the tokens at least as likely, so
    ties share the worse rank) and the `k` most likely (id, logprob), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def _gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """(n, 2 + 2k): the token's logprob, its rank, the top k logprobs, their ids (vLLM's
    Sampler.gather_logprobs), in float32: exact for float32 values, and for ids and ranks
    below 2**24 (float64 for a larger vocabulary)."""
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    chosen = logprobs.gather(1, tokens[:, None])
    rank = (logprobs >= chosen).sum(dim=-1, keepdim=True)
    top = torch.topk(logprobs, k, dim=-1)
    if logits.shape[-1] > 1 << 24:
        chosen = chosen.double()
    return torch.cat([chosen, rank, top.values, top.indices], dim=1)   # promoted to chosen's


def _unpack(token_id: int, row: list[float], k: int, width: int) -> RawLogprobs:
    return RawLogprobs(token_id=token_id, logprob=row[0], rank=int(row[1]),
                       top=[(int(i), v) for i, v in zip(row[2 + width:2 + width + k],
                                                        row[2:2 + k])])


@dataclass
class TopLogprobs:
    """A step's raw logprobs for the rows that asked (`asked`: their positions) and their
    top `width` (id, logprob) pairs, on the device and, once transferred, on the host
    (`rows`)."""

    want: list[int | None]
    asked: list[int]
    width: int
    logprobs: torch.Tensor     # (len(asked), V) float32
    values: torch.Tensor       # (len(asked), width): the top logprobs, most likely first
    ids: torch.Tensor          # (len(asked), width): their token ids
    rows: list[list[float]] | None = None    # per asking row: its values, then its ids

    @classmethod
    def of(cls, logits: torch.Tensor, want: list[int | None]) -> TopLogprobs | None:
        """The asking rows' logprobs and top figures, on the device (None: no row asked)."""
        asked = [i for i, k in enumerate(want) if k is not None]
        if not asked:
            return None
        vocab = logits.shape[-1]
        width = min(max(1, *(want[i] for i in asked)), vocab)
        if len(asked) < len(want):
            logits = _rows_of(logits, asked)
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        top = torch.topk(logprobs, width, dim=-1)
        values = top.values if vocab <= 1 << 24 else top.values.double()
        return cls(want, asked, width, logprobs, values, top.indices)

    def for_tokens(self, tokens: list[int]) -> list[RawLogprobs | None]:
        """Each asking row's figures for its token `tokens[i]` (None for the others).

        A chosen token among the top logprobs, above the last of them, takes its logprob
        and rank from them (every token at least as likely is among them too), which
        spares a pass over the vocabulary; the others are computed in full from the same
        logprobs."""
        if self.rows is None:    # one transfer; the ids exact in the values' type
            self.rows = torch.cat([self.values, self.ids], dim=1).tolist()
        out: list[RawLogprobs | None] = [None] * len(self.want)
        vocab = self.logprobs.shape[-1]
        rest: list[int] = []     # positions in `asked` whose token is not safely in its top
        for n, (i, row) in enumerate(zip(self.asked, self.rows, strict=True)):
            out[i] = _from_top(tokens[i], row, self.want[i], self.width, vocab)
            if out[i] is None:
                rest.append(n)
        if rest:
            chosen = [tokens[self.asked[n]] for n in rest]
            for n, (logprob, rank) in zip(rest, _chosen_and_rank(self.logprobs, rest, chosen),
                                          strict=True):
                i = self.asked[n]
                out[i] = RawLogprobs(tokens[i], logprob, rank,
                                     _top(self.rows[n], self.want[i], self.width))
        return out


def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The rows' logits: a view where they are evenly spaced (one row, a range, every other
    row), else a copy."""
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and rows == list(range(rows[0], rows[-1] + 1, step)):
        return logits[rows[0]:rows[-1] + 1:step]
    return logits.index_select(0, _positions(tuple(rows), logits.device))


@functools.lru_cache(maxsize=64)
def _positions(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The rows' positions as an index tensor (never written): a batch keeps the same asking
    rows step after step."""
    return torch.tensor(rows, dtype=torch.long, device=device)


def token_logprobs(logits: torch.Tensor, want: list[int | None],
                   tokens: list[int]) -> list[RawLogprobs | None]:
    """The chosen tokens' logprobs for the rows that asked: want[i] = k >= 0 (the top k
    besides the chosen token), None for rows that did not ask. `logits` (B, V) are the
    step's raw logits (before any penalty or temperature), as vLLM returns by default."""
    tops = TopLogprobs.of(logits, want)
    return [None] * len(want) if tops is None else tops.for_tokens(tokens)


def _top(row: list[float], k: int, width: int) -> list[tuple[int, float]]:
    """The k most likely (id, logprob) of a packed row: `width` values, then their ids."""
    return [(int(t), v) for t, v in zip(row[width:width + k], row[:k])]


def _from_top(token: int, row: list[float], k: int, width: int,
              vocab: int) -> RawLogprobs | None:
    """The token's logprobs from its row's top `width` alone, or None when they do not
    settle its rank (it is not among them, or it ties with the last of them)."""
    ids = row[width:]
    if token not in ids:
        return None
    value = row[ids.index(token)]
    if not (value > row[width - 1] or width == vocab):
        return None
    rank = sum(1 for v in row[:width] if v >= value)
    return RawLogprobs(token, value, rank, _top(row, k, width))


def _chosen_and_rank(logprobs: torch.Tensor, rows: list[int],
                     tokens: list[int]) -> list[tuple[float, int]]:
    """Each token's logprob in its row of `logprobs`, and its rank over the vocabulary."""
    device = logprobs.device
    some = logprobs.index_select(0, torch.tensor(rows, dtype=torch.long, device=device))
    chosen = some.gather(1, torch.tensor(tokens, dtype=torch.long, device=device)[:, None])
    rank = (some >= chosen).sum(dim=-1, keepdim=True)
    return [(v, int(r)) for v, r in torch.cat([chosen.double(), rank], dim=1).tolist()]


_PROMPT_CHUNK = 1 << 24     # logits elements per log_softmax in prompt_logprobs (64 MiB)


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor | list[int],
                    k: int) -> list[RawLogprobs]:
    """Each prompt token's logprobs: logits[t] (T, V) are the raw logits that predicted
    targets[t]. Computed in chunks of rows so a long prompt's (T, V) float32 logprobs never
    exist at once; one host transfer."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {targets.numel()} prompt tokens")
    if not targets.numel():
        return []
    width = min(k, logits.shape[-1])
    step = max(1, _PROMPT_CHUNK // logits.shape[-1])
    packed = torch.cat([torch.cat([targets[s:s + step, None].to(torch.float64),
                                   _gather_logprobs(logits[s:s + step], targets[s:s + step],
                                                    width).double()], dim=1)
                        for s in range(0, logits.shape[0], step)]).tolist()
    return [_unpack(int(row[0]), row[1:], k, width) for row in packed]
