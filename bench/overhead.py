"""What our path costs over bare transformers: output tokens/s and time to first
token of (a) bare `model.generate`, (b) our engine (`engine.submit`) and (c) our
streaming HTTP API, on the same model, the same image and prompt and the same
greedy fixed-length settings, measured interleaved in one run; plus decode speed
against the device's memory-bandwidth bound.

    python bench/overhead.py --model tiny [--max-tokens 128] [--repeats 5]
    python bench/overhead.py --full-size            # random 7B shapes on the GPU/NPU

TTFT includes image loading and preprocessing on every path (a bare script also
does them per request). Bare TTFT is measured as a separate 1-token generate, so
the bare N-token run carries no timing hook at all; the engine's is its own
first-token time; the HTTP API's is the first content chunk a client receives."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_bench_args, bench_messages, bench_request, build_engine,  # noqa: E402
                          decode_weight_bytes, describe_run, device_bandwidth, median, print_table,
                          setup)

GOAL_TPS_RATIO = 0.95


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int
    text: str

    @property
    def tps(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        span = self.total_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


class BarePath:
    """What a plain transformers script does per request: qwen_vl_utils + processor +
    model.generate, greedy, exactly N new tokens (EOS ignored)."""

    name = "bare generate"

    def __init__(self, engine, max_tokens: int, image: bool) -> None:
        self.model = engine.loaded.model
        self.processor = engine.loaded.processor
        self.device = engine.device.torch_device
        self.max_tokens = max_tokens
        self.image = image
        self.prompt_tokens = 0
        self.silent_tokens = 0

    def _config(self, n: int):
        gc = copy.deepcopy(self.model.generation_config)
        gc.do_sample = False
        gc.temperature, gc.top_p, gc.top_k = 1.0, 1.0, 50   # neutral: greedy ignores them
        gc.max_new_tokens, gc.max_length = n, None
        gc.eos_token_id = []         # fixed length, like ignore_eos (None would be refilled)
        return gc

    def _inputs(self):
        from qwen_vl_utils import process_vision_info

        messages = bench_messages(self.image)
        text = self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        images, videos = process_vision_info(messages)
        inputs = self.processor(text=[text], images=images, videos=videos, padding=True,
                                return_tensors="pt")
        return inputs.to(self.device)

    def _generate(self, n: int):
        import torch

        inputs = self._inputs()
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=self._config(n))
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        return out[0, self.prompt_tokens:].tolist()    # .tolist() waits for the device

    def run(self) -> Sample:
        start = time.monotonic()
        self._generate(1)
        ttft = time.monotonic() - start
        start = time.monotonic()
        ids = self._generate(self.max_tokens)
        total = time.monotonic() - start
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
        self.silent_tokens = self._leading_silent_tokens(ids)
        return Sample(ttft, total, len(ids), text)

    def _leading_silent_tokens(self, ids: list[int]) -> int:
        """How many leading tokens show no complete character yet (a client sees its
        first text only after them)."""
        for k in range(len(ids)):
            text = self.processor.tokenizer.decode(ids[:k + 1], skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)
            if text and not text.endswith("\ufffd"):
                return k
        return len(ids)


class EnginePath:
    """Our engine as the UI uses it: submit, iterate the handle's events."""

    name = "our engine"

    def __init__(self, engine, max_tokens: int, image: bool) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.image = image
        self.prompt_tokens = 0

    def run(self) -> Sample:
        from engine.types import TextDelta

        start = time.monotonic()
        handle = self.engine.submit(bench_request(self.max_tokens, self.image))
        first = None
        parts = []
        fin = None
        for event in handle:
            if isinstance(event, TextDelta):
                if first is None:
                    first = time.monotonic() - start
                parts.append(event.text)
            else:
                fin = event
        total = time.monotonic() - start
        if fin.reason == "error":
            raise RuntimeError(f"engine error: {fin.error}")
        self.prompt_tokens = fin.stats.prompt_tokens
        # The engine's own first-token time (request creation to the first token on the
        # device thread, so it includes preprocessing): the first TextDelta can trail it
        # when the first token is half a UTF-8 character or a special token.
        ttft = fin.stats.ttft_s if fin.stats.ttft_s is not None else first
        return Sample(ttft if ttft is not None else total, total, fin.stats.output_tokens,
                      "".join(parts))


class HttpPath:
    """Our OpenAI-compatible streaming API over loopback HTTP, the client in its own
    process (as a remote client would be)."""

    name = "our HTTP API"

    def __init__(self, server, max_tokens: int, image: bool) -> None:
        from bench.api import ClientProcess, chat_body, image_data_uri

        self.server = server
        self.clients = ClientProcess()
        self.body = chat_body(server.model_id(), max_tokens, image_data_uri() if image else None)
        self.prompt_tokens = 0

    def run(self) -> Sample:
        results, errors, _ = self.clients.run(self.server.base, self.body)
        if errors:
            raise RuntimeError(f"HTTP client: {errors[0]}")
        res = results[0]
        return Sample(res.ttft_s if res.ttft_s is not None else res.total_s, res.total_s,
                      res.tokens, res.text)

    def close(self) -> None:
        self.clients.close()


def measure(paths: list, repeats: int) -> dict[str, list[Sample]]:
    """One untimed run per path, then `repeats` rounds in rotating order, so drift
    (thermal, other processes) spreads evenly over the paths."""
    for p in paths:
        p.run()
    samples: dict[str, list[Sample]] = {p.name: [] for p in paths}
    for r in range(repeats):
        k = r % len(paths)
        for p in paths[k:] + paths[:k]:
            samples[p.name].append(p.run())
    return samples


def report(samples: dict[str, list[Sample]], engine, max_tokens: int,
           bandwidth_gbs: float | None, bandwidth_note: str) -> dict[str, dict[str, float]]:
    bare = samples["bare generate"]
    base_tps = median(s.tps for s in bare)
    base_ttft = median(s.ttft_s for s in bare)
    summary: dict[str, dict[str, float]] = {}
    rows = []
    for name, runs in samples.items():
        tps = median(s.tps for s in runs)
        ttft = median(s.ttft_s for s in runs)
        dec = median(s.decode_tps for s in runs)
        # Paired: each round ran every path back to back, so the ratio within a round is
        # untouched by the machine's slow and fast phases, which last longer than a round.
        paired = median(s.tps / b.tps for s, b in zip(runs, bare) if b.tps > 0)
        summary[name] = {"tps": tps, "ttft_ms": ttft * 1000, "decode_tps": dec,
                         "tps_ratio": tps / base_tps, "paired_ratio": paired,
                         "added_ttft_ms": (ttft - base_ttft) * 1000}
        rows.append([name, f"{ttft * 1000:.1f}", f"{tps:.1f}", f"{dec:.1f}",
                     f"{tps / base_tps:.3f}", f"{paired:.3f}", "-" if name == "bare generate"
                     else f"{(ttft - base_ttft) * 1000:+.1f}",
                     str(runs[0].tokens)])
    print_table(f"Overhead: {max_tokens} output tokens, median of {len(bare)} interleaved runs",
                ["path", "TTFT ms", "output tok/s", "decode tok/s", "tok/s ours/bare",
                 "paired ours/bare", "added TTFT ms", "tokens"], rows)

    weight_bytes = decode_weight_bytes(engine.loaded.model)
    bound = bandwidth_gbs * 1e9 / weight_bytes if bandwidth_gbs else None
    rows = [[name, f"{s['decode_tps']:.1f}", "n/a" if bound is None else f"{bound:.1f}",
             "n/a" if bound is None else f"{s['decode_tps'] / bound:.1%}"]
            for name, s in summary.items()]
    print_table(f"Decode vs the memory-bandwidth bound: {weight_bytes / 1e9:.3f} GB of weights "
                f"per token, bandwidth {'n/a' if not bandwidth_gbs else f'{bandwidth_gbs:,.0f} GB/s'}"
                f" ({bandwidth_note})",
                ["path", "decode tok/s", "bound tok/s", "fraction of bound"], rows)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    # The same work on every path: bare generate has no caches, so ours are off here too
    # (each round sends the same picture and prompt, which the caches would serve).
    parser.set_defaults(prefix_cache=False, picture_cache_mb=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-image", dest="image", action="store_false",
                        help="text-only prompt (default: the 448x448 assets/shapes.png)")
    parser.add_argument("--no-http", dest="http", action="store_false",
                        help="skip the HTTP API path")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="device memory bandwidth in GB/s (default: known H100/H200/910B "
                             "figures; none on CPU)")
    args = parser.parse_args(argv)
    if args.max_tokens < 2 or args.repeats < 1:
        parser.error("--max-tokens must be at least 2 and --repeats at least 1")
    helper = setup(args)
    engine = build_engine(args)
    server = None
    paths: list = []
    try:
        print(describe_run(engine, helper))
        paths += [BarePath(engine, args.max_tokens, args.image),
                  EnginePath(engine, args.max_tokens, args.image)]
        if args.http:
            from bench.api import ApiServer, api_unavailable_reason

            reason = api_unavailable_reason()
            if reason:
                print(f"note: {reason}")
            else:
                server = ApiServer(engine).__enter__()
                paths.append(HttpPath(server, args.max_tokens, args.image))
        samples = measure(paths, args.repeats)
        print(f"prompt tokens: bare {paths[0].prompt_tokens}, engine {paths[1].prompt_tokens}")
        if paths[0].silent_tokens:
            print(f"note: the first {paths[0].silent_tokens} token(s) of this (random) answer show "
                  "no complete character, so the HTTP path's first content chunk, and hence its "
                  "TTFT, trails the first token by that many decode steps")
        texts = {name: runs[0].text for name, runs in samples.items()}
        same = len(set(texts.values())) == 1
        print("same greedy text on every path: " + ("yes" if same else "NO"))
        if not same:
            for name, text in texts.items():
                print(f"  {name}: {text[:80]!r}")
        bw, note = device_bandwidth(engine.device, args.bandwidth_gbs)
        summary = report(samples, engine, args.max_tokens, bw, note)
        ratio = summary["our engine"]["paired_ratio"]
        print(f"\nengine output tok/s / bare, median of the per-round ratios: {ratio:.3f} (goal >= "
              f"{GOAL_TPS_RATIO}: {'met' if ratio >= GOAL_TPS_RATIO else 'NOT met'}); ratio of "
              f"the medians {summary['our engine']['tps_ratio']:.3f}; added TTFT "
              f"{summary['our engine']['added_ttft_ms']:+.1f} ms")
    finally:
        for p in paths:
            if hasattr(p, "close"):
                p.close()
        if server is not None:
            server.__exit__(None, None, None)
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
