"""Beam search as vLLM 0.32 answers `use_beam_search` (its online beam search, in
vllm/entrypoints/generate/beam_search/online.py), run inside the engine core on KV rows rather
than as vLLM's one sub-request per beam per token. vLLM's rules, kept as they are:

- Each step every live beam offers its 2 * width most likely next tokens under the model's raw
  distribution (log_softmax of its logits: the temperature does not scale them), and, at a
  temperature above vLLM's greedy threshold, first the token a draw at that temperature picks
  (vLLM's sub-request returns the sampled token's logprob besides the top ones).
- A candidate that is the tokenizer's EOS (unless ignore_eos) ends a beam: it is set aside with
  finish reason "stop" and the EOS id as stop reason, the EOS among its tokens only with
  include_stop_str_in_output. Every other candidate competes by cumulative logprob; the best
  `width` are the live beams of the next step.
- The search runs exactly max_tokens steps (it never stops early), then the set-aside beams
  and the live ones are ranked by cum_logprob / len ** length_penalty, len counting the
  prompt's tokens too and not a final EOS (vLLM's get_beam_search_score); the best `width` are
  the answers, best first, each with the text of its tokens (never the EOS's) and finish
  reason "length" for a beam still live.

The engine core holds each live beam in a KV row: the group's rows are admitted together, the
first prefills the prompt and the others copy it; after each step a beam takes a row that
holds its parent where one is free, and otherwise copies its parent's row into a row whose
beam did not survive (`plan_rows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..types import FinishReason, SamplingParams, TokenLogprob, TopLogprob

Candidate = tuple[int, float, int]   # token id, raw logprob, rank (1: the most likely)
GREEDY_BELOW = 1e-5                  # vLLM's _SAMPLING_EPS: a lower temperature samples greedily


@dataclass(frozen=True)
class BeamParams:
    """vLLM's BeamSearchParams as its server builds them from a request: width is `n`,
    temperature the request's or the model's default; `logprobs` is how many of each step's
    candidates an answer's logprobs show (None: no logprobs)."""

    width: int
    max_tokens: int
    eos_id: int | None
    ignore_eos: bool = False
    include_stop: bool = False
    length_penalty: float = 1.0
    temperature: float = 0.0
    skip_special_tokens: bool = True
    logprobs: int | None = None

    @classmethod
    def of(cls, sp: SamplingParams, max_tokens: int, eos_id: int | None,
           default_temperature: float) -> "BeamParams":
        """The parameters of a request with use_beam_search; every other sampling field is
        ignored, as vLLM ignores it."""
        return cls(width=sp.n, max_tokens=max_tokens, eos_id=eos_id, ignore_eos=sp.ignore_eos,
                   include_stop=sp.include_stop_str_in_output,
                   length_penalty=float(sp.length_penalty),
                   temperature=float(default_temperature if sp.temperature is None
                                     else sp.temperature),
                   skip_special_tokens=sp.skip_special_tokens, logprobs=sp.logprobs)


@dataclass
class Beam:
    """One hypothesis: its generated tokens, their summed logprob, and for each token the
    candidates it was chosen among (its logprobs, vLLM's per-step dict)."""

    tokens: list[int] = field(default_factory=list)
    cum_logprob: float = 0.0
    steps: list[list[Candidate]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None


def next_candidates(logits: torch.Tensor, width: int,
                    temperature: float) -> list[list[Candidate]]:
    """Each row's candidates (logits (B, V), one row per live beam): the token a draw at
    `temperature` picks (only above vLLM's greedy threshold, where it can differ from the
    most likely), then the 2 * width most likely; logprobs of the raw distribution, in one
    host transfer."""
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    top = torch.topk(logprobs, min(2 * width, logprobs.shape[-1]), dim=-1)
    ids, values = top.indices, top.values
    ranks = torch.arange(1, ids.shape[-1] + 1, device=logits.device).expand_as(ids)
    if temperature >= GREEDY_BELOW:
        probs = (logits.float() / temperature).softmax(dim=-1)
        drawn = (probs / torch.empty_like(probs).exponential_(1.0)).argmax(dim=-1, keepdim=True)
        chosen = logprobs.gather(1, drawn)
        ids = torch.cat([drawn, ids], dim=1)
        values = torch.cat([chosen, values], dim=1)
        ranks = torch.cat([(logprobs >= chosen).sum(dim=-1, keepdim=True), ranks], dim=1)
    packed = torch.stack([ids.double(), values.double(), ranks.double()], dim=1)
    return [_as_dict(list(zip(*row))) for row in packed.tolist()]


def _as_dict(entries: list[tuple[float, float, float]]) -> list[Candidate]:
    """vLLM's dict of one step: a token listed twice (the drawn one among the top) keeps its
    first place and its last values."""
    seen: dict[int, tuple[float, int]] = {}
    for token, logprob, rank in entries:
        seen[int(token)] = (logprob, int(rank))
    return [(token, lp, rank) for token, (lp, rank) in seen.items()]


def plan_rows(holds: list[int], parents: list[int]) -> list[tuple[int, int | None]]:
    """Where each new beam lives. holds[r]: the beam row r holds the KV of; parents[j]: the
    beam new beam j continues. Returns (row, source) per new beam: source None where the row
    holds its parent already (nothing copied), else a row holding the parent whose KV is
    copied in. A source keeps its own KV (it is never a copy's destination), so the copies
    may run in any order."""
    taken: dict[int, int] = {}                  # row -> new beam
    plan: list[tuple[int, int | None] | None] = [None] * len(parents)
    for j, parent in enumerate(parents):
        row = next((r for r, h in enumerate(holds) if h == parent and r not in taken), None)
        if row is not None:
            taken[row] = j
            plan[j] = (row, None)
    free = [r for r in range(len(holds)) if r not in taken]
    for j, parent in enumerate(parents):
        if plan[j] is None:
            source = next(r for r, k in taken.items() if parents[k] == parent)
            plan[j] = (free.pop(0), source)
    return plan   # type: ignore[return-value]


class BeamSearch:
    """One request's beam search: the live beams, the ended ones, and (for the engine core)
    the request's answers (`items`, one handle each), the rows admitted for it (`seqs`) and
    the rows holding the live beams, in their order (`rows`, `holds`)."""

    def __init__(self, params: BeamParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.prompt_last = prompt_ids[-1] if prompt_ids else None
        self.live: list[Beam] = [Beam()]
        self.completed: list[Beam] = []
        self.steps = 0
        self.items: list[Any] = []        # WorkItems: answer i goes to items[i]'s handle
        self.seqs: list[Any] = []         # the Sequences admitted for it
        self.rows: list[Any] = []         # the Sequences holding beams' KV
        self.holds: list[int] = []        # holds[r]: the live beam rows[r] holds
        self.first_token_at: float | None = None
        self._cancelling = False

    @property
    def finished(self) -> bool:
        return self.steps >= self.params.max_tokens or not self.live

    def cancel(self) -> None:
        """Cancel every answer's handle: a cancel of any one ends the whole search."""
        if self._cancelling:
            return
        self._cancelling = True
        for item in list(self.items):
            item.handle.cancel()

    def advance(self, candidates: list[list[Candidate]]) -> list[int]:
        """One step: candidates[i] are live beam i's. Beams that end go aside; the best
        `width` others become the live beams. Returns each new live beam's parent index."""
        p = self.params
        pool: list[tuple[float, int, int, list[Candidate]]] = []
        for i, (beam, step) in enumerate(zip(self.live, candidates)):
            for token, logprob, _ in step:
                cum = beam.cum_logprob + logprob
                if token == p.eos_id and not p.ignore_eos:
                    tokens = beam.tokens + [token] if p.include_stop else list(beam.tokens)
                    self.completed.append(Beam(tokens, cum, beam.steps + [step], "stop", token))
                else:
                    pool.append((cum, token, i, step))
        best = sorted(range(len(pool)), key=lambda j: -pool[j][0])[:p.width]
        self.live = [Beam(self.live[i].tokens + [token], cum, self.live[i].steps + [step])
                     for cum, token, i, step in (pool[j] for j in best)]
        self.steps += 1
        return [pool[j][2] for j in best]

    def score(self, beam: Beam) -> float:
        """vLLM's get_beam_search_score: over the prompt's and the beam's tokens, a final EOS
        not counted."""
        length = self.prompt_len + len(beam.tokens)
        last = beam.tokens[-1] if beam.tokens else self.prompt_last
        if last == self.params.eos_id:
            length -= 1
        return beam.cum_logprob / (length ** self.params.length_penalty)

    def best(self) -> list[Beam]:
        """The answers, best first: at most `width` of the ended and live beams."""
        return sorted(self.completed + self.live, key=self.score, reverse=True)[:self.params.width]

    def answer(self, beam: Beam, tokenizer: Any,
               shown: Callable[[int], str]) -> tuple[list[int], str, list[TokenLogprob] | None]:
        """A beam's token ids, text (without a final EOS, as vLLM) and logprobs (each token's
        text `shown(id)`, and the first `logprobs` of its step's candidates)."""
        p = self.params
        text_ids = beam.tokens
        if beam.tokens and beam.tokens[-1] == p.eos_id and not p.ignore_eos:
            text_ids = beam.tokens[:-1]
        text = tokenizer.decode(text_ids, skip_special_tokens=p.skip_special_tokens)
        if p.logprobs is None:
            return list(beam.tokens), text, None
        k = None if p.logprobs == -1 else p.logprobs
        logprobs = []
        for token, step in zip(beam.tokens, beam.steps):
            logprob, rank = next((lp, r) for t, lp, r in step if t == token)
            top = [TopLogprob(shown(t), t, lp) for t, lp, _ in step[:k]]
            logprobs.append(TokenLogprob(shown(token), token, logprob, rank=rank, top=top))
        return list(beam.tokens), text, logprobs
