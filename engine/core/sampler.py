"""Next-token selection for the engine's own decode loop, one row per request.

Continuous batching puts requests with different sampling settings into one decode step,
so `model.generate`'s single LogitsProcessorList per call no longer fits. Here each row
keeps its own settings (`resolve`, the same values `generate_kwargs` gives `generate`)
and its own state (`RowSampler`), and `sample` picks one token per row with the same
processors, in the same order, as transformers' `generate`:

    repetition penalty, min_tokens (EOS masked)        every row
    temperature, top-k, top-p, multinomial             sampling rows
    argmax                                             greedy rows

The whole batch is processed at once on the logits' device (per-row settings live there
as small tensors), with one host sync per step: the final `.tolist()`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..types import SamplingParams

# transformers' GenerationConfig._get_default_generation_params(): what `generate` uses for
# a field that both the request and the model's generation_config leave unset (None).
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                "repetition_penalty": 1.0, "min_new_tokens": 0}


@dataclass(frozen=True)
class RowSampling:
    """One request's resolved settings: what `generate` would apply to its row.

    Greedy rows carry neutral temperature/top_k/top_p (greedy ignores them, as generate does).
    """

    greedy: bool
    temperature: float
    top_k: int                  # 0: off
    top_p: float                # 1.0: off
    repetition_penalty: float   # 1.0: off
    min_tokens: int
    eos_ids: tuple[int, ...]    # () when ignore_eos
    seed: int | None

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


def resolve(sp: SamplingParams, generation_config: Any, eos_ids: set[int]) -> RowSampling:
    """The settings `model.generate(**generate_kwargs(sp, generation_config, n))` would use.

    Unset (None) request fields keep the model's generation_config, and fields unset there
    too take transformers' global defaults (notably top_k=50 when sampling). temperature 0
    means greedy, > 0 sampling at that temperature; otherwise do_sample comes from the
    generation_config. Qwen2.5-VL's config samples with top_k=1, so its default, and a
    request that sets only a temperature, are effectively greedy (with penalty 1.05).
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
    if not do_sample:
        temperature, top_k, top_p = 1.0, 0, 1.0
    return RowSampling(greedy=not do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=penalty, min_tokens=min_tokens,
                       eos_ids=() if sp.ignore_eos else tuple(sorted(int(i) for i in eos_ids)),
                       seed=sp.seed)


@functools.lru_cache(maxsize=8)
def _no_tokens(vocab_size: int, device: torch.device) -> torch.Tensor:
    """A shared all-False mask for rows without a repetition penalty (never written)."""
    return torch.zeros(vocab_size, dtype=torch.bool, device=device)


def divides_by_reciprocal(device: torch.device) -> bool:
    """Whether `tensor / python_float` multiplies by the float32 reciprocal on `device`.

    PyTorch's CUDA kernel does (the CPU one divides), so transformers' `scores / penalty`
    and `scores / temperature` do too; doing the same keeps our scores bit-identical.
    """
    return device.type == "cuda"


class RowSampler:
    """Per-request sampling state: its settings, its own torch.Generator (seeded when seed is
    set, so a seeded request samples the same tokens alone and in a batch; unseeded rows
    draw from the device's default generator, as generate does), and the token ids seen so
    far (prompt + generated) for the repetition penalty, kept on the logits' device.

    prompt_ids: the row's input ids as generate would see them, without padding (image
    and video pad tokens included: generate penalises them too). Ids >= vocab_size are
    ignored, as RepetitionPenaltyLogitsProcessor does.
    """

    def __init__(self, settings: RowSampling, prompt_ids: torch.Tensor, vocab_size: int,
                 device: torch.device | str, reciprocal: bool | None = None) -> None:
        self.settings = settings
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.generated = 0
        self.generator: torch.Generator | None = None
        if settings.seed is not None and not settings.argmax:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(settings.seed)
        self.penalised = settings.repetition_penalty != 1.0
        self.seen = _no_tokens(self.vocab_size, self.device)
        if self.penalised:
            # One spare slot absorbs out-of-vocabulary ids without a data-dependent filter.
            seen = torch.zeros(self.vocab_size + 1, dtype=torch.bool, device=self.device)
            ids = prompt_ids.reshape(-1).to(device=self.device, dtype=torch.long)
            seen[ids.clamp(0, self.vocab_size)] = True
            self.seen = seen[:self.vocab_size]
        eos = [i for i in settings.eos_ids if 0 <= i < self.vocab_size]
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device) if eos else None
        # how this device divides by a Python float (None: as PyTorch does on it)
        self.reciprocal = divides_by_reciprocal(self.device) if reciprocal is None else reciprocal
        penalty, temperature = settings.repetition_penalty, settings.temperature
        top_p_cut = 1.0 - settings.top_p if settings.top_p < 1.0 else -math.inf
        # [penalty, penalty and temperature as divisors, top_k, 1 - top_p]: stacked over
        # the batch in `sample`, so per-row settings cost no host-to-device copy per step.
        self.params = torch.tensor(
            [penalty, self._divisor(penalty), self._divisor(temperature), float(settings.top_k),
             top_p_cut], dtype=torch.float32, device=self.device)

    def _divisor(self, value: float) -> float:
        if not self.reciprocal:
            return value
        return float(torch.tensor(1.0) / torch.tensor(value, dtype=torch.float32))

    @property
    def min_pending(self) -> bool:
        """Whether EOS is still masked (fewer than min_tokens generated)."""
        return self.eos is not None and self.generated < self.settings.min_tokens

    @property
    def plain_argmax(self) -> bool:
        """Whether the raw logits' argmax is this row's token (no processor changes it)."""
        return self.settings.argmax and not self.penalised and not self.min_pending

    def append(self, token_id: int) -> None:
        """Record a generated token: it counts toward min_tokens and the penalty."""
        self.generated += 1
        if self.penalised and 0 <= token_id < self.vocab_size:
            self.seen[token_id] = True


def _divide(x: torch.Tensor, divisor: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    return x * divisor if reciprocal else x / divisor


def _penalise(logits: torch.Tensor, rows: list[RowSampler], params: torch.Tensor) -> torch.Tensor:
    """Repetition penalty, then min_tokens: the processors generate applies to every row."""
    x = logits.to(torch.float32, copy=True)
    if any(r.penalised for r in rows):
        seen = torch.stack([r.seen for r in rows])
        shrunk = _divide(x, params[:, 1:2], rows[0].reciprocal)
        x = torch.where(seen, torch.where(x < 0, x * params[:, 0:1], shrunk), x)
    for i, r in enumerate(rows):
        if r.min_pending:
            x[i].index_fill_(0, r.eos, -math.inf)
    return x


def _warp(x: torch.Tensor, rows: list[RowSampler], active: list[RowSampler],
          params: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k and top-p (transformers' warpers, min_tokens_to_keep=1) for the
    batch; only the `active` rows' results are meant to be used, so a warper none of them
    needs is skipped."""
    if any(r.settings.temperature != 1.0 for r in active):
        x = _divide(x, params[:, 2:3], rows[0].reciprocal)
    ks = [r.settings.top_k for r in active if r.settings.top_k > 0]
    if ks:
        kmax = min(max(ks), x.shape[-1])
        top = torch.topk(x, kmax, dim=-1).values
        k = params[:, 3:4]
        kth = top.gather(1, (k.clamp(1, kmax) - 1).long())
        kth = torch.where(k > 0, kth, -math.inf)
        x = x.masked_fill(x < kth, -math.inf)
    if any(r.settings.top_p < 1.0 for r in active):
        ordered, order = torch.sort(x, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= params[:, 4:5]
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return x


def _check(logits: torch.Tensor, rows: list[RowSampler]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
    if any(r.vocab_size != logits.shape[1] for r in rows):
        raise ValueError(f"logits have {logits.shape[1]} columns, a row expects another vocab size")


def process_logits(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """The float32 scores generate's LogitsProcessorList would produce for each row (all
    warpers for sampling rows, top_k == 1 included): for tests and diagnostics."""
    _check(logits, rows)
    params = torch.stack([r.params for r in rows])
    x = _penalise(logits, rows, params)
    return _warp(x, rows, [r for r in rows if not r.settings.greedy], params)


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """One token id per row; row i of `logits` (B, V) belongs to rows[i].

    The caller appends the chosen tokens (`RowSampler.append`) before the next step.
    """
    _check(logits, rows)
    if all(r.plain_argmax for r in rows):
        return logits.argmax(dim=-1).tolist()
    params = torch.stack([r.params for r in rows])
    x = _penalise(logits, rows, params)
    best = x.argmax(dim=-1)
    drawing = [r for r in rows if not r.settings.argmax]
    if not drawing:
        return best.tolist()
    probs = _warp(x, rows, drawing, params).softmax(dim=-1)
    # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1) drawn from the
    # generator; written out, so each row draws from its own generator into one batch
    # (the same numbers multinomial would draw) and multinomial's validity check, a host
    # sync per call, is skipped.
    q = torch.ones_like(probs)
    for i, r in enumerate(rows):
        if not r.settings.argmax:
            q[i].exponential_(1.0, generator=r.generator)
    drawn = (probs / q).argmax(dim=-1)
    return torch.stack([best[i] if r.settings.argmax else drawn[i]
                        for i, r in enumerate(rows)]).tolist()
