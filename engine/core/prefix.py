"""The prefix cache: finished requests' KV kept in blocks of BLOCK_SIZE tokens, keyed by
a hash chain over their token ids (as vLLM's automatic prefix caching), so a follow-up
turn, or another user with the same system prompt and picture, prefills only what is new.

A block's key covers its parent's key, its token ids, and the content key of every picture
or video whose tokens it holds: two pictures of the same size have the same placeholder ids
but never the same key. Blocks live in chunks of device memory grown on demand up to the
budget, and the least recently used go first. A hit is copied into the request's KV row at
admission (one gather per layer), and a finished row's new blocks are copied out (one
scatter per layer): the running rows stay plain tensors that a captured step can use.

Device thread only."""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .kvstore import KVStore
from ..inputs.prompt import MediaSpan

BLOCK_SIZE = 16
CHUNK_BLOCKS = 256                  # blocks allocated at a time, up to the budget


def block_keys(ids: Sequence[int], spans: Sequence[MediaSpan], block_size: int = BLOCK_SIZE,
               known: Sequence[bytes] = ()) -> list[bytes]:
    """One key per full block of `ids`; `spans` are the pictures' and videos' token spans
    with their content keys. `known`: the keys of the first blocks, already computed."""
    keys = list(known)
    parent = keys[-1] if keys else b""
    span_i = 0
    for start in range(len(keys) * block_size, len(ids) - block_size + 1, block_size):
        end = start + block_size
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"%d," * block_size % tuple(ids[start:end]))
        while span_i < len(spans) and spans[span_i].end <= start:
            span_i += 1
        j = span_i
        while j < len(spans) and spans[j].start < end:
            h.update(spans[j].key)
            j += 1
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixStats:
    queries: int = 0          # prompt tokens looked up
    hits: int = 0             # of those, found in the cache


class PrefixCache:
    """Blocks of KV within `budget_bytes`, LRU, copied to and from KVStore rows."""

    def __init__(self, kv: KVStore, budget_bytes: int, block_size: int = BLOCK_SIZE) -> None:
        self.kv = kv
        self.block_size = block_size
        layout = kv.layout
        self.block_bytes = block_size * layout.bytes_per_token
        self.max_blocks = int(budget_bytes // self.block_bytes)
        self.chunks: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._free: list[int] = []
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.stats = PrefixStats()

    # ------------------------------------------------------------- figures
    @property
    def cached_blocks(self) -> int:
        return len(self._blocks)

    @property
    def cached_bytes(self) -> int:
        return self.cached_blocks * self.block_bytes

    @property
    def allocated_bytes(self) -> int:
        return sum(k[0].shape[0] for k, _ in self.chunks) * self.block_bytes

    # ------------------------------------------------------------- lookup
    def lookup(self, ids: Sequence[int], media: Sequence[MediaSpan]) -> tuple[list[bytes], int]:
        """A prompt's block keys, and how many of its tokens the cache holds (`match`)."""
        keys = block_keys(ids, media, self.block_size)
        return keys, self.match(keys, len(ids))

    def match(self, keys: Sequence[bytes], prompt_tokens: int) -> int:
        """Tokens of the prompt found in the cache (whole blocks, leaving at least one
        token to prefill: its logits give the first new token). Counts toward the hit rate."""
        usable = min(len(keys), (prompt_tokens - 1) // self.block_size)
        n = 0
        while n < usable and keys[n] in self._blocks:
            self._blocks.move_to_end(keys[n])
            n += 1
        self.stats.queries += prompt_tokens
        self.stats.hits += n * self.block_size
        return n * self.block_size

    def load(self, row: int, keys: Sequence[bytes], tokens: int) -> None:
        """Copy the first `tokens` (whole blocks, as `match` found them) into a KV row."""
        n = tokens // self.block_size
        if n:
            self._copy([self._blocks[k] for k in keys[:n]], row, to_row=True)
            self.kv.lengths[row] = tokens

    def keep(self, row: int, tokens: Sequence[int], media: Sequence[MediaSpan],
             known: Sequence[bytes] = ()) -> None:
        """A finished row's KV, for the next turn of its chat (or anyone whose prompt starts
        the same): every full block of `tokens` (its prompt and answer, as far as the row
        holds their KV). `known`: its prompt's keys, from `lookup`."""
        if len(tokens) < self.block_size:
            return
        keys = block_keys(tokens, media, self.block_size,
                          known=known[:len(tokens) // self.block_size])
        self.store(row, keys)

    def store(self, row: int, keys: Sequence[bytes]) -> None:
        """Keep the row's blocks that are not cached yet (keys: its full blocks, in order)."""
        new = [(i, k) for i, k in enumerate(keys) if k not in self._blocks]
        if not new:
            return
        protect = set(keys)
        slots = []
        for _ in new:
            slot = self._take_slot(protect)
            if slot is None:
                break
            slots.append(slot)
        new = new[:len(slots)]
        if not new:
            return
        self._copy(slots, row, to_row=False, positions=[i for i, _ in new])
        for (_, key), slot in zip(new, slots):
            self._blocks[key] = slot

    # ------------------------------------------------------------ internals
    def _take_slot(self, protect: set[bytes]) -> int | None:
        if not self._free and len(self.chunks) * CHUNK_BLOCKS < self.max_blocks:
            self._grow()
        if self._free:
            return self._free.pop()
        for key in self._blocks:                 # least recently used first
            if key not in protect:
                return self._blocks.pop(key)
        return None

    def _grow(self) -> None:
        layout, dev = self.kv.layout, self.kv.keys[0].device
        count = min(CHUNK_BLOCKS, self.max_blocks - len(self.chunks) * CHUNK_BLOCKS)
        shape = (count, layout.kv_heads, self.block_size, layout.head_dim)
        keys = [torch.zeros(shape, dtype=layout.dtype, device=dev) for _ in range(layout.layers)]
        values = [torch.zeros(shape, dtype=layout.dtype, device=dev)
                  for _ in range(layout.layers)]
        base = len(self.chunks) * CHUNK_BLOCKS
        self.chunks.append((keys, values))
        self._free.extend(range(base + count - 1, base - 1, -1))

    def _copy(self, slots: list[int], row: int, to_row: bool,
              positions: list[int] | None = None) -> None:
        """Blocks `slots` <-> the row's blocks at `positions` (default 0, 1, ...), one
        gather or scatter per chunk and layer."""
        positions = positions if positions is not None else list(range(len(slots)))
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for slot, pos in zip(slots, positions):
            offsets, where = by_chunk.setdefault(slot // CHUNK_BLOCKS, ([], []))
            offsets.append(slot % CHUNK_BLOCKS)
            where.append(pos)
        b = self.block_size
        for chunk, (offsets, where) in by_chunk.items():
            chunk_k, chunk_v = self.chunks[chunk]
            dev = chunk_k[0].device
            off = torch.tensor(offsets, device=dev)
            tok = (torch.tensor(where, device=dev)[:, None] * b
                   + torch.arange(b, device=dev)[None, :]).reshape(-1)
            for layer in range(self.kv.layout.layers):
                for store, rows in ((chunk_k[layer], self.kv.keys[layer]),
                                    (chunk_v[layer], self.kv.values[layer])):
                    target = rows[row]                          # (heads, row_len, dim)
                    if to_row:
                        blocks = store.index_select(0, off)     # (n, heads, b, dim)
                        target[:, tok] = blocks.permute(1, 0, 2, 3).reshape(
                            target.shape[0], -1, target.shape[2])
                    else:
                        picked = target[:, tok].reshape(target.shape[0], len(offsets), b,
                                                        target.shape[2])
                        store[off] = picked.permute(1, 0, 2, 3)
