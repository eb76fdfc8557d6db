"""The model runner: what the scheduler planned, run on the device. A prompt's embeddings
and M-RoPE positions (its cached prefix copied into its KV row first), a chunk of its
prefill into that row, and one decode step over the running rows: their tensors assembled
here, the step itself eager or replayed from captured graphs (a `DecodeStep`, see
engine.core.graphs). Positions are always passed explicitly (the model's stateful
`rope_deltas` would be wrong as soon as requests interleave); masks are 4-D, so
transformers uses them as given."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ..inputs.caches import BoundedCache
from ..inputs.prompt import MediaSpan, PreparedPrompt
from ..model.device import Device
from .kvstore import KVStore, decode_mask, prefill_mask
from .prefix import PrefixCache

MEDIA = (("image", "pixel_values", "image_grid_thw"),
         ("video", "pixel_values_videos", "video_grid_thw"))


def encoder_cache(max_bytes: int) -> BoundedCache[torch.Tensor]:
    """Vision-encoder outputs (tokens, hidden) on the device, by picture or video key."""
    return BoundedCache(max_bytes, lambda t: t.numel() * t.element_size())


@dataclass
class PromptEmbedding:
    """A prompt ready to prefill: embeddings with the pictures' encoder outputs in place,
    its positions (3, 1, T), and the M-RoPE offset that continues them while decoding."""

    embeds: torch.Tensor
    positions: torch.Tensor
    delta: int

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


def _masks(mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The same mask for every layer type (Qwen2.5-VL's text layers are full attention)."""
    return {"full_attention": mask, "sliding_attention": mask}


class DecodeStep(Protocol):
    """One decode step over rows [0, B) as the runner calls it: eager (`EagerDecode`) or
    replayed from graphs captured per (batch, KV length) bucket (engine.core.graphs)."""

    def batch_size_for(self, rows: int) -> int:
        """The batch the step runs for `rows` rows in use (a captured step's bucket)."""
        ...

    def kv_len_for(self, length: int) -> int:
        """The KV length the step attends over for rows holding up to `length` tokens."""
        ...

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
               seen: torch.Tensor, kv_len: int, unmasked: bool = False) -> torch.Tensor:
        """Logits (B, V): see ModelRunner.forward_decode."""
        ...


@runtime_checkable
class CapturedStep(DecodeStep, Protocol):
    """A decode step with graphs to capture before the first request, on the device thread
    that replays them."""

    def capture(self) -> None:
        ...


class DecodingRow(Protocol):
    """What the runner reads of a running row to decode it (the scheduler's Sequence)."""

    row: int          # its KV row
    last_token: int   # the token it feeds in
    length: int       # tokens whose KV the row holds
    delta: int        # M-RoPE offset of its text positions after the prompt


class EagerDecode:
    """The decode step run as it is: exactly the rows in use, over exactly the KV they hold
    (a captured step rounds both up to the bucket it was captured for)."""

    def __init__(self, runner: "ModelRunner") -> None:
        self.runner = runner

    def batch_size_for(self, rows: int) -> int:
        return rows

    def kv_len_for(self, length: int) -> int:
        return length

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
               seen: torch.Tensor, kv_len: int, unmasked: bool = False) -> torch.Tensor:
        return self.runner.forward_decode(ids, positions, write_pos, seen, kv_len, unmasked)


class ModelRunner:
    """Forward passes of one Qwen2.5-VL over a KVStore, on the device thread."""

    def __init__(self, model: Any, kv: KVStore, device: Device,
                 encoder: BoundedCache[torch.Tensor] | None = None,
                 prefix: PrefixCache | None = None) -> None:
        self.model = model
        self.encoder_cache = encoder if encoder is not None else encoder_cache(0)
        self.kv = kv
        self.prefix = prefix
        # eager; the local engine puts a captured one here (engine.core.graphs.decode_step_for)
        self.decode_step: DecodeStep = EagerDecode(self)
        self.device = device
        self.dtype = device.dtype
        self.dev = device.torch_device
        self.core = model.model          # Qwen2_5_VLModel: embeddings, vision, rope index
        # transformers 5.24 names the cache argument `cache` (`past_key_values` is deprecated
        # there, and the only name in the 5.17 of a bare GPU image)
        self.text = self.core.language_model   # called directly: the outer forwards' checks
        self.lm_head = model.lm_head           # and wrappers cost a few percent of a step
        params = inspect.signature(self.text.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.rope_takes_types = "mm_token_type_ids" in inspect.signature(
            self.core.get_rope_index).parameters

    def prepare(self) -> None:
        """Capture the decode step's graphs, where it has them: on the device thread, before
        the first request (the thread that replays them)."""
        if isinstance(self.decode_step, CapturedStep):
            self.decode_step.capture()

    def _to_device(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(self.dev)
        return value.to(self.dtype) if value.is_floating_point() else value

    def begin_prompt(self, row: int, prompt: PreparedPrompt, keys: Sequence[bytes],
                     cached: int) -> PromptEmbedding:
        """A prompt's first prefill: its first `cached` tokens' KV copied from the prefix cache
        into its row (`keys`, `cached`: what the scheduler found there), the rest embedded."""
        if self.prefix is not None:
            self.prefix.load(row, keys, cached)
        return self.embed(prompt.inputs, prompt.media, skip_before=cached)

    def embed(self, inputs: dict[str, Any], media: list[MediaSpan] | None = None,
              skip_before: int = 0) -> PromptEmbedding:
        """The prompt's embeddings with each picture's encoder output at its tokens, and its
        positions. Pictures whose tokens all lie before `skip_before` (their KV came from the
        prefix cache) are not encoded; the others come from the encoder cache when their
        content key is there. Without spans, every picture is encoded, as the model does."""
        x = {k: self._to_device(v) for k, v in inputs.items()}
        ids = x["input_ids"]
        embeds = self.core.get_input_embeddings()(ids)
        for kind, pixels, grid in MEDIA:
            if x.get(pixels) is None:
                continue
            spans = [m for m in (media or []) if m.kind == kind]
            if len(spans) != x[grid].shape[0]:
                embeds = self._scatter_all(kind, ids, embeds, x[pixels], x[grid])
                continue
            for span, features in zip(spans, self._features(kind, x[pixels], x[grid], spans,
                                                            skip_before)):
                if features is not None:
                    embeds[0, span.start:span.end] = features.to(embeds.dtype)
        positions, delta = self._positions(ids, x)
        return PromptEmbedding(embeds, positions, delta)

    def _encode(self, kind: str, pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        encode = self.core.get_image_features if kind == "image" else self.core.get_video_features
        out = encode(pixels, grid)
        return list(getattr(out, "pooler_output", out))     # one tensor per picture

    def _scatter_all(self, kind: str, ids: torch.Tensor, embeds: torch.Tensor,
                     pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        token = self.core.config.image_token_id if kind == "image" else \
            self.core.config.video_token_id
        features = torch.cat(self._encode(kind, pixels, grid)).to(embeds.dtype)
        return embeds.masked_scatter((ids == token).unsqueeze(-1).expand_as(embeds), features)

    def _features(self, kind: str, pixels: torch.Tensor, grid: torch.Tensor,
                  spans: list[MediaSpan], skip_before: int) -> list[torch.Tensor | None]:
        """Per picture: its encoder output, None where not needed; the misses encoded
        together, in one call."""
        patches = grid.prod(-1).tolist()
        starts = [sum(patches[:i]) for i in range(len(patches))]
        out: list[torch.Tensor | None] = [None] * len(spans)
        missing = []
        for i, span in enumerate(spans):
            if span.end <= skip_before:
                continue
            cached = self.encoder_cache.get(span.key) if span.key else None
            if cached is None:
                missing.append(i)
            out[i] = cached
        if missing:
            rows = torch.cat([pixels[starts[i]:starts[i] + patches[i]] for i in missing])
            for i, features in zip(missing, self._encode(kind, rows, grid[missing])):
                out[i] = features
                if spans[i].key:
                    self.encoder_cache.put(spans[i].key, features)
        return out

    def _positions(self, ids: torch.Tensor, x: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if x.get("image_grid_thw") is None and x.get("video_grid_thw") is None:
            n = ids.shape[1]
            return torch.arange(n, device=ids.device).view(1, 1, n).expand(3, 1, n), 0
        extra = {"mm_token_type_ids": x.get("mm_token_type_ids")} if self.rope_takes_types else {}
        positions, deltas = self.core.get_rope_index(
            ids, image_grid_thw=x.get("image_grid_thw"), video_grid_thw=x.get("video_grid_thw"),
            second_per_grid_ts=x.get("second_per_grid_ts"),
            attention_mask=x.get("attention_mask"), **extra)
        return positions, int(deltas.reshape(-1)[0])

    def prefill(self, row: int, prompt: PromptEmbedding, start: int, end: int,
                all_positions: bool = False) -> torch.Tensor:
        """Prompt positions [start, end) into the row's KV; the last position's logits (V,),
        or with `all_positions` every position's (end - start, V), for prompt logprobs."""
        out = self.text(inputs_embeds=prompt.embeds[:, start:end],
                        position_ids=prompt.positions[:, :, start:end],
                        attention_mask=_masks(prefill_mask(start, end, self.dtype, self.dev)),
                        use_cache=True, **{self.cache_arg: self.kv.prefill_view(row, start, end)})
        self.kv.lengths[row] = end
        return self.lm_head(out.last_hidden_state[0] if all_positions
                            else out.last_hidden_state[0, -1])

    def forward_decode(self, ids: torch.Tensor, positions: torch.Tensor,
                       write_pos: torch.Tensor, seen: torch.Tensor, kv_len: int,
                       unmasked: bool = False) -> torch.Tensor:
        """One token for each of rows [0, B): ids (B,), positions (B,) (the M-RoPE text
        position, equal in all three sections), write_pos (B,), seen (B,). Logits (B, V).
        Every shape depends on (B, kv_len) only, so the step can be captured. `unmasked`:
        every row sees all kv_len positions (one row, no padding), so no mask is built."""
        batch = ids.shape[0]
        mask = None if unmasked else decode_mask(seen, kv_len, self.dtype)
        out = self.text(input_ids=ids.view(batch, 1),
                        position_ids=positions.view(1, batch, 1).expand(3, batch, 1),
                        attention_mask=_masks(mask), use_cache=True,
                        **{self.cache_arg: self.kv.decode_view(batch, write_pos, kv_len)})
        return self.lm_head(out.last_hidden_state[:, -1])

    def decode(self, rows: Sequence[DecodingRow], pad_id: int) -> torch.Tensor:
        """One decode step for the running rows: logits (len(rows), V), in their order. The
        step runs rows [0, B) for B its batch size: rows not running take part as padding
        (`pad_id`, writing only into the scratch position), and are dropped from the logits."""
        step = self.decode_step
        batch = step.batch_size_for(max(r.row for r in rows) + 1)
        ids, positions = [pad_id] * batch, [0] * batch
        write_pos, seen = [self.kv.scratch] * batch, [0] * batch   # padding rows
        for r in rows:
            ids[r.row], positions[r.row] = r.last_token, r.length + r.delta
            write_pos[r.row] = seen[r.row] = r.length
        longest = max(r.length for r in rows) + 1
        kv_len = step.kv_len_for(longest)
        order = [r.row for r in rows]
        # one host-to-device copy for the four inputs and the running rows' order (padded to
        # the batch), made before the forward: an index copied after it would wait for it
        gather = order != list(range(batch))   # padding or gaps: the running rows only
        table = [ids, positions, write_pos, seen] + ([order + [0] * (batch - len(order))]
                                                     if gather else [])
        inputs = torch.tensor(table).to(self.dev).unbind(0)
        logits = step.decode(*inputs[:4], kv_len, batch == 1 and kv_len == longest)
        return logits[inputs[4][:len(order)]] if gather else logits
