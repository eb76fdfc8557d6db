"""The KV store: every running request's keys and values in tensors allocated once,
within a memory budget, so admission is a free row rather than an out-of-memory error.

Layout, per layer: keys and values of shape (rows, kv_heads, row_len, head_dim). A request
owns one row from its prefill to its end; a decode step over the first B rows is then a
view of fixed shape (B rows, L positions), so it can be captured as a graph, and nothing is
copied between steps. `row_len` is max_model_len plus one scratch position that rows taking
part in a step only as padding write into. The next issue's conversation cache keeps
finished rows' KV in a second region of the same budget and copies a reused prefix into a
row at admission (a copy costs a fraction of the prefill it saves).

The model sees a `StepView` as its cache: transformers' attention calls
`cache.update(key_states, value_states, layer_idx)` and attends over what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EngineError

GIB = 1024 ** 3


@dataclass(frozen=True)
class KVLayout:
    """Bytes one token's keys and values take: the unit of the memory budget."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * element

    @classmethod
    def of_model(cls, model: Any, dtype: torch.dtype) -> "KVLayout":
        cfg = getattr(model.config, "text_config", model.config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype)


def plan_rows(layout: KVLayout, budget_bytes: int, max_model_len: int, max_batch: int) -> int:
    """How many rows fit: at most max_batch, each holding a whole context."""
    per_row = (max_model_len + 1) * layout.bytes_per_token
    rows = min(max_batch, budget_bytes // per_row)
    if rows < 1:
        raise EngineError(
            f"The KV cache budget ({budget_bytes / GIB:.2f} GiB) holds no request of "
            f"max_model_len={max_model_len} ({per_row / GIB:.2f} GiB each): raise "
            "--kv-cache-gib or lower --max-model-len.")
    return int(rows)


class KVStore:
    """Rows of preallocated KV tensors and who holds them. Device thread only."""

    def __init__(self, layout: KVLayout, rows: int, max_model_len: int,
                 device: torch.device | str) -> None:
        self.layout = layout
        self.rows = rows
        self.row_len = max_model_len + 1
        self.scratch = max_model_len          # written by padding rows, never read
        shape = (rows, layout.kv_heads, self.row_len, layout.head_dim)
        # zeros, not empty: a masked position still multiplies its value by a zero weight,
        # and uninitialised memory may hold NaN (NaN * 0 is NaN)
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device)
                     for _ in range(layout.layers)]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=device)
                       for _ in range(layout.layers)]
        self._free = list(range(rows))
        self.lengths = [0] * rows            # tokens held per row (for the usage figure)

    @property
    def capacity_bytes(self) -> int:
        return self.rows * self.row_len * self.layout.bytes_per_token

    def allocate(self) -> int | None:
        """The lowest free row (decode steps then span as few rows as possible)."""
        if not self._free:
            return None
        self._free.sort()
        return self._free.pop(0)

    def release(self, row: int) -> None:
        self.lengths[row] = 0
        self._free.append(row)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """The first `length` positions of row `src` into row `dst`: the n choices of one
        request share the prompt's KV this way instead of each computing it."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
        self.lengths[dst] = length

    def free_rows(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Share of the store's token positions in use (0..1), as vLLM's KV cache usage."""
        return sum(self.lengths) / (self.rows * (self.row_len - 1))

    def prefill_view(self, row: int, start: int, end: int) -> "StepView":
        """A cache for one row's prompt positions [start, end)."""
        return StepView(self, row=row, start=start, end=end)

    def decode_view(self, batch: int, write_pos: torch.Tensor, kv_len: int) -> "StepView":
        """A cache for one token of each of rows [0, batch): row b writes at write_pos[b] and
        attends over positions [0, kv_len) (the mask hides what it must not see)."""
        return StepView(self, batch=batch, write_pos=write_pos, end=kv_len)


class StepView:
    """What one forward pass sees as its cache (duck-typed to transformers' Cache.update)."""

    def __init__(self, store: KVStore, *, row: int | None = None, start: int = 0,
                 end: int = 0, batch: int = 0, write_pos: torch.Tensor | None = None) -> None:
        self.store = store
        self.row, self.start, self.end = row, start, end
        self.batch, self.write_pos = batch, write_pos
        if write_pos is not None:
            self.rows_index = torch.arange(batch, device=write_pos.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: Any = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        if self.row is not None:
            keys[self.row, :, self.start:self.end] = key_states[0]
            values[self.row, :, self.start:self.end] = value_states[0]
            return (keys[self.row:self.row + 1, :, :self.end],
                    values[self.row:self.row + 1, :, :self.end])
        keys[self.rows_index, :, self.write_pos] = key_states[:, :, 0]
        values[self.rows_index, :, self.write_pos] = value_states[:, :, 0]
        return keys[:self.batch, :, :self.end], values[:self.batch, :, :self.end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start if self.row is not None else self.end - 1


def prefill_mask(start: int, end: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """(1, 1, end - start, end) additive causal mask for prompt positions [start, end)."""
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(end, device=device)[None, :]
    return _additive(k <= q, dtype)[None, None]


def decode_mask(seen: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, kv_len) additive mask: row b sees positions [0, seen[b]] (its new token
    included). Padding rows pass seen 0: they see position 0 only, never a fully masked row
    (whose softmax would be NaN)."""
    k = torch.arange(kv_len, device=seen.device)[None, :]
    return _additive(k <= seen[:, None], dtype)[:, None, None, :]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low)
