"""A captured decode step (a `DecodeStep`, engine.core.runner): CUDA graphs on CUDA, torch_npu's NPUGraph on an NPU (behind
--npu-graphs: unverified on hardware), eager everywhere else and whenever capture fails.

The eager step launches hundreds of small kernels per token, and on a large device the
host cannot issue them as fast as the device runs them. A graph per (batch bucket, KV
length bucket) is captured once, on the device thread before the first request, over
static input buffers; a step then copies its inputs into those buffers and replays the
graph. Shapes never change inside a bucket (the KV store's rows and the 4-D masks make
that possible), so nothing is compiled or captured while serving. Sampling stays outside
the graph (it is per row and may be random)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .runner import DecodeStep, EagerDecode, ModelRunner

log = logging.getLogger("engine")

MIN_KV_BUCKET = 512


def powers_of_two_upto(limit: int, start: int = 1) -> list[int]:
    """start, 2*start, ... below limit, then limit itself: every size up to limit has a bucket."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def bucket(size: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= size)


@dataclass
class StaticInputs:
    """One batch bucket's input buffers, shared by its graphs (one replays at a time)."""

    ids: torch.Tensor
    positions: torch.Tensor
    write_pos: torch.Tensor
    seen: torch.Tensor

    def load(self, ids: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
             seen: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.write_pos.copy_(write_pos)
        self.seen.copy_(seen)


class GraphedDecode:
    """The decode step of a ModelRunner (`forward_decode`), replayed from captured graphs."""

    def __init__(self, runner: ModelRunner, api: Any, max_batch: int, max_len: int) -> None:
        self.runner = runner
        self.api = api                    # torch.cuda or torch.npu
        self.batch_sizes = powers_of_two_upto(max_batch)
        self.kv_lens = powers_of_two_upto(max_len, start=min(MIN_KV_BUCKET, max_len))
        self.inputs: dict[int, StaticInputs] = {}
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.replays = 0

    def batch_size_for(self, rows: int) -> int:
        return bucket(rows, self.batch_sizes)

    def kv_len_for(self, length: int) -> int:
        return bucket(length, self.kv_lens)

    def _static(self, batch: int) -> StaticInputs:
        if batch not in self.inputs:
            dev = self.runner.dev
            scratch = self.runner.kv.scratch
            self.inputs[batch] = StaticInputs(
                ids=torch.zeros(batch, dtype=torch.long, device=dev),
                positions=torch.zeros(batch, dtype=torch.long, device=dev),
                write_pos=torch.full((batch,), scratch, dtype=torch.long, device=dev),
                seen=torch.zeros(batch, dtype=torch.long, device=dev))
        return self.inputs[batch]

    def capture(self) -> None:
        """Capture every bucket, largest first (later graphs reuse the first one's memory
        pool). Inputs are padding while capturing: every write goes to the scratch slot."""
        pool = self.api.graph_pool_handle()
        stream = self.api.Stream()
        with torch.inference_mode():
            for batch in sorted(self.batch_sizes, reverse=True):
                static = self._static(batch)
                for kv_len in sorted(self.kv_lens, reverse=True):
                    step = (lambda s=static, n=kv_len:
                            self.runner.forward_decode(s.ids, s.positions, s.write_pos, s.seen,
                                                       n))
                    stream.wait_stream(self.api.current_stream())
                    with self.api.stream(stream):          # allocator and kernels warm up
                        step()
                    self.api.current_stream().wait_stream(stream)
                    graph = self._new_graph()
                    with self.api.graph(graph, pool=pool):
                        out = step()
                    self.graphs[(batch, kv_len)] = (graph, out)
        self.api.synchronize()
        log.info("decode step captured: %d graphs (batch %s x KV length %s)", len(self.graphs),
                 self.batch_sizes, self.kv_lens)

    def _new_graph(self) -> Any:
        cls = getattr(self.api, "CUDAGraph", None) or getattr(self.api, "NPUGraph")
        return cls()

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
               seen: torch.Tensor, kv_len: int, unmasked: bool = False) -> torch.Tensor:
        """The captured graphs always mask: `unmasked` is an eager-only shortcut."""
        batch = ids.shape[0]
        graph, out = self.graphs[(batch, kv_len)]
        self.inputs[batch].load(ids, positions, write_pos, seen)
        graph.replay()
        self.replays += 1
        return out


def graph_api(kind: str) -> Any:
    return torch.cuda if kind == "cuda" else torch.npu


def decode_step_for(runner: ModelRunner, enforce_eager: bool, npu_graphs: bool,
                    max_batch: int, max_len: int) -> DecodeStep:
    """The step the runner runs: a GraphedDecode where the device supports capture and it
    was not turned off, else the eager step. `capture()` runs on the device thread (the
    runner's `prepare`); a failed capture falls back to eager with a warning."""
    kind = runner.device.kind
    wanted = (kind == "cuda" and not enforce_eager) or (kind == "npu" and npu_graphs
                                                        and not enforce_eager)
    if not wanted:
        if kind == "npu" and not npu_graphs:
            log.info("decode step: eager on the NPU (--npu-graphs captures it, unverified)")
        return EagerDecode(runner)
    return FallbackToEager(GraphedDecode(runner, graph_api(kind), max_batch, max_len),
                           EagerDecode(runner))


class FallbackToEager:
    """A captured step that turns into the eager one if capture fails."""

    def __init__(self, graphed: GraphedDecode, eager: DecodeStep) -> None:
        self.graphed = graphed
        self.eager = eager
        self.active: DecodeStep = graphed

    def capture(self) -> None:
        try:
            self.graphed.capture()
        except Exception as exc:
            log.warning("decode step capture failed (%s: %s); running eager",
                        type(exc).__name__, exc)
            self.active = self.eager

    @property
    def captured(self) -> bool:
        return self.active is self.graphed

    def batch_size_for(self, rows: int) -> int:
        return self.active.batch_size_for(rows)

    def kv_len_for(self, length: int) -> int:
        return self.active.kv_len_for(length)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
               seen: torch.Tensor, kv_len: int, unmasked: bool = False) -> torch.Tensor:
        return self.active.decode(ids, positions, write_pos, seen, kv_len, unmasked)
