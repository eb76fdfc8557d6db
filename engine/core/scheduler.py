"""The scheduler: continuous batching's plan for each step of the device loop. It runs
nothing; the engine core carries the plan out (engine.core.engine_core).

At every step it admits waiting requests into free KV rows, in arrival order, gives the
prefilling rows a token budget (so a long prompt is chunked and never stalls the running
streams for long; a prompt's first chunk starts after what the prefix cache holds of it)
and names every row that decodes one token. A second user's question therefore starts
after at most one decode step and its own prefill, whatever the first user is generating,
and requests with different settings share every step. The n choices of one request are
admitted together: the first prefills the prompt, the others wait for it and then copy its
KV (the engine core does the copy), so the prompt is computed once. A beam search's rows are
admitted the same way, and only all together (engine.core.beam).

Not thread-safe: the engine core calls it under its lock wherever another thread may look."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable

from ..inputs.prompt import PreparedPrompt
from ..stream import RequestHandle
from ..structured import Constraint, RowGrammar
from ..types import GenerationRequest
from .beam import BeamSearch
from .kvstore import KVStore
from .output import RowState
from .prefix import PrefixCache
from .runner import PromptEmbedding
from .sampler import RowSampler

DEFAULT_PREFILL_CHUNK = 2048


@dataclass(eq=False)
class WorkItem:
    request: GenerationRequest
    prompt: PreparedPrompt
    handle: RequestHandle
    bad_words_ids: tuple[tuple[int, ...], ...] = ()   # the request's bad_words, tokenized
    group: object | None = None   # shared by the n choices of one request (admitted together)
    constraint: Constraint | None = None   # the request's structured output, compiled
    beam: BeamSearch | None = None   # the beam search this answer belongs to (one per row)


@dataclass(eq=False)
class Sequence:
    """A request holding a KV row: prefilling until `prefilled` reaches the prompt's
    length, then decoding one token per step."""

    item: WorkItem
    row: int
    out: RowState
    sampler: RowSampler
    admitted_at: float
    prompt_ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)   # the prompt's full blocks (prefix cache)
    generated: list[int] = field(default_factory=list)
    cached: int = 0            # prompt tokens whose KV came from the prefix cache
    embedding: PromptEmbedding | None = None   # while prefilling: the prompt, embedded
    prefilled: int = 0
    length: int = 0            # tokens whose KV is in the row
    delta: int = 0             # M-RoPE offset of text positions after the prompt
    last_token: int = 0
    # n choices: a row that waits for another's prefill (`leader`), and the rows waiting
    # for this one's (`followers`); the engine core copies the prompt's KV to them
    leader: "Sequence | None" = None
    followers: list["Sequence"] = field(default_factory=list)
    # when asked: the raw prompt logprobs while prefilling, then their public form
    prompt_logprobs: list = field(default_factory=list)
    grammar: RowGrammar | None = None   # its constraint's state, when it has one

    @property
    def scores_prompt(self) -> bool:
        """Whether the request asked for prompt logprobs: every prompt position is then
        computed (no prefix cache), its logits kept."""
        return self.item.request.sampling.prompt_logprobs is not None

    @property
    def handle(self) -> RequestHandle:
        return self.item.handle

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def decoding(self) -> bool:
        return not self.prefilling and not self.out.done

    def append(self, token: int) -> None:
        """A token sampled for this row: the next step's input, and the sampler's state."""
        self.last_token = token
        self.generated.append(token)
        self.sampler.append(token)


@dataclass
class PrefillChunk:
    """Prompt positions [start, end) of one row, in this step."""

    seq: Sequence
    start: int
    end: int


@dataclass
class StepPlan:
    """One step: the prefill chunks, in order, then one decode step for `decode` (the rows
    decoding already and those whose prompt this step's prefill completes, in admission
    order; a row that ends at its first token or fails meanwhile drops out)."""

    prefill: list[PrefillChunk]
    decode: list[Sequence]


class Scheduler:
    """The waiting requests and the running rows, and the plan of each step."""

    def __init__(self, kv: KVStore, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix: PrefixCache | None = None) -> None:
        self.kv = kv
        self.prefix = prefix
        self.max_batch = kv.rows              # rows decoding at once (a bench may lower it)
        self.prefill_chunk = max(1, prefill_chunk)
        self.waiting: collections.deque[WorkItem] = collections.deque()
        self.running: list[Sequence] = []     # admitted, in admission order
        self.steps_run = 0                    # decode steps, and the rows they decoded in all
        self.rows_decoded = 0
        self.largest_batch = 0

    # ------------------------------------------------------------ requests
    def add(self, item: WorkItem) -> None:
        self.waiting.append(item)

    def remove_waiting(self, item: WorkItem) -> bool:
        """Take a request out of the queue; False when it was admitted already."""
        try:
            self.waiting.remove(item)
        except ValueError:
            return False
        return True

    def release(self, seq: Sequence) -> None:
        """A row that ended: out of the running rows, its KV row freed. A choice that ends
        while others wait for its prefill hands the prompt to the first of them."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.release(seq.row)
        if seq.leader is not None and seq in seq.leader.followers:
            seq.leader.followers.remove(seq)
        if seq.followers:
            heir, *rest = seq.followers
            heir.leader, heir.followers = None, rest
            for other in rest:
                other.leader = heir
        seq.leader, seq.followers = None, []

    def running_count(self) -> int:
        return len(self.running)

    def waiting_count(self) -> int:
        return len(self.waiting)

    def position(self, request_id: str) -> int | None:
        """0 while running, 1.. while waiting, None when unknown or finished."""
        if any(s.item.request.request_id == request_id for s in self.running):
            return 0
        for pos, item in enumerate(self.waiting, start=1):
            if item.request.request_id == request_id:
                return pos
        return None

    # ------------------------------------------------------------ the plan
    def admit(self, start: Callable[[WorkItem, int], Sequence]) -> None:
        """Waiting requests into free KV rows, in arrival order; `start` makes a request's
        running state for the row it got. A request's choices wait until rows for all of
        them are free (unless they could never all fit: then as many as fit, when nothing
        else runs; never for a beam search, whose width the engine bounds by the rows), and
        the first of those admitted together prefills for the others."""
        while self.waiting:
            room = min(self.kv.free_rows(), self.max_batch - len(self.running))
            head = self.waiting[0]
            members = [head] if head.group is None else \
                [w for w in self.waiting if w.group is head.group]
            if room <= 0 or (len(members) > room and (self.running or head.beam is not None)):
                return
            seqs = []
            for item in members[:room]:
                self.waiting.remove(item)
                seqs.append(start(item, self.kv.allocate()))
            self.running.extend(seqs)
            seqs[0].followers = seqs[1:]
            for follower in seqs[1:]:
                follower.leader = seqs[0]

    def cancelled(self) -> list[Sequence]:
        return [s for s in self.running if s.handle.cancelled]

    def schedule(self) -> StepPlan:
        """This step's prefill chunks (at most `prefill_chunk` prompt tokens in all) and
        decode rows."""
        budget = self.prefill_chunk
        chunks = []
        for seq in [s for s in self.running if s.prefilling and s.leader is None]:
            if budget <= 0:
                break
            chunk = self._chunk(seq, budget)
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        completed = {id(c.seq) for c in chunks if c.end == len(c.seq.prompt_ids)}
        decode = [s for s in self.running if s.decoding or id(s) in completed
                  or (s.leader is not None and id(s.leader) in completed)]
        return StepPlan(chunks, decode)

    def _chunk(self, seq: Sequence, budget: int) -> PrefillChunk:
        """The row's next prompt tokens; a prompt not started yet starts after what the
        prefix cache holds of it."""
        if seq.embedding is None and self.prefix is not None and not seq.scores_prompt:
            seq.keys, seq.cached = self.prefix.lookup(seq.prompt_ids, seq.item.prompt.media)
        start = seq.cached if seq.embedding is None else seq.prefilled
        return PrefillChunk(seq, start, min(len(seq.prompt_ids), start + budget))

    # ------------------------------------------------------------ what ran
    def prefilled(self, chunk: PrefillChunk) -> None:
        chunk.seq.prefilled = chunk.seq.length = chunk.end

    def decoded(self, rows: list[Sequence]) -> None:
        """After a decode step: each row holds one more token's KV."""
        self.steps_run += 1
        self.rows_decoded += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        for s in rows:
            s.length += 1
            self.kv.lengths[s.row] = s.length
