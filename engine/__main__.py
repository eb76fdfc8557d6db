"""The tutorial's offline script as a command:

    python -m engine --image assets/chart.png --prompt "Describe this image."

streams the answer to stdout, then prints a closing line like vLLM's
progress bar. Bad input: one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import add_engine_args
from .errors import EngineError
from .types import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Conversation, GenerationRequest,
                    ImageInput, Message, SamplingParams, TextDelta, VideoInput)

TUTORIAL_PROMPT = "Please provide a detailed description of this image"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image path, http(s) URL or data: URI (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH_OR_URL",
                   help="a video path or URL (repeatable)")
    p.add_argument("--prompt", default=TUTORIAL_PROMPT)
    p.add_argument("--system", default="You are a helpful assistant.")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--verbose", "-v", action="store_true", help="show loading and request logs")
    add_engine_args(p)
    p.set_defaults(warmup=False)
    return p


def closing_line(stats) -> str:
    """In the spirit of vLLM's `Processed prompts: 100%|...| est. speed input: ... output: ...`."""
    ttft = f"{stats.ttft_s * 1000:.0f} ms" if stats.ttft_s is not None else "-"
    return (f"Processed prompts: 1/1 [{stats.total_s:.2f}s, prompt {stats.prompt_tokens} tokens "
            f"({stats.images} image(s)), output {stats.output_tokens} tokens, first token {ttft}, "
            f"est. speed input: {stats.input_tps:.2f} toks/s, output: {stats.output_tps:.2f} toks/s]")


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request = GenerationRequest(
        Conversation([Message("user", args.prompt, [ImageInput(i) for i in args.image],
                              [VideoInput(v) for v in args.video])], system=args.system),
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                       seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                       min_tokens=args.min_tokens),
        min_pixels=args.min_pixels, max_pixels=args.max_pixels, request_id="cli")
    # Cheap checks before paying for the model load.
    from .config import EngineConfig
    from .inputs.stage import InputStage
    from .inputs.media import load_image
    stage = InputStage(EngineConfig.from_namespace(args))
    policy = stage.policy(None)
    try:
        stage.validate(request, args.max_model_len)
        for img in request.conversation.messages[0].images:
            if "://" not in img.source and not img.source.startswith("data:"):
                load_image(img.source, policy)   # local files: fail fast, before the model loads
    except EngineError as exc:
        return fail(exc.message)

    from .factory import create_engine

    try:
        engine = create_engine(EngineConfig.from_namespace(args))
    except (EngineError, RuntimeError, ValueError) as exc:
        return fail(getattr(exc, "message", str(exc)), 1)
    try:
        handle = engine.submit(request)
    except EngineError as exc:
        return fail(exc.message)
    try:
        for event in handle:
            if isinstance(event, TextDelta):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            else:
                sys.stdout.write("\n")
                if event.reason == "error":
                    return fail(event.error.message if isinstance(event.error, EngineError)
                                else str(event.error), 1)
                print(closing_line(event.stats), file=sys.stderr if args.verbose else sys.stdout)
    except KeyboardInterrupt:
        handle.cancel()
        print("\ncancelled", file=sys.stderr)
        return 130
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
