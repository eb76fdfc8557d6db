"""Engine settings shared by the CLI, the web app and the benchmarks: each
flag also reads an environment variable, so a hosted Space can be configured
without editing code."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from .types import DEFAULT_MAX_TOKENS

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
# The largest per-image pixel bound a request may ask for: the processor's own default
# max_pixels (16384 image tokens), so no request can make the server upscale without end.
DEFAULT_MAX_PIXELS_LIMIT = 16384 * 28 * 28
# A prompt longer than this many characters per context token cannot fit (a Qwen token is
# rarely more than a few characters), so it is refused before it is tokenized.
CHARS_PER_TOKEN_LIMIT = 32
# KV memory for the running requests. The 7B holds 56 KiB per token (28 layers, 4 KV heads
# of 128, bf16), so 8 GiB keeps 8 full 16384-token contexts beside its 15.6 GB of weights
# on a 64 GB 910B; the tiny model's 8 rows take 64 MiB of it.
DEFAULT_KV_CACHE_GIB = 8.0
# Finished requests' KV kept for follow-up turns and shared prefixes, grown on demand up to
# this: 4 GiB of device memory holds about 75,000 tokens of the 7B (about six full chats of
# ten pictures); on a CPU it is host memory, shared with everything else, so 1 GiB.
DEFAULT_PREFIX_CACHE_GIB = 4.0
DEFAULT_PREFIX_CACHE_GIB_CPU = 1.0
# The highest video sampling rate a request may ask for (mm_processor_kwargs.fps): a
# common camera rate; a rate above the video's own only repeats work on the same frames.
DEFAULT_VIDEO_MAX_FPS = 30.0
# Decoding a video costs about its frames times their pixels, and each frame has a cost of
# its own too, so each counts as at least VIDEO_FRAME_MIN_COST pixels. The budget keeps a
# long clip of tiny packets from holding a worker for minutes: 1e10 takes about 4 s on a
# flat clip (2.4 Gpx/s on one core), and is more than typical videos within --max-media-mb
# need (it is 2.7 min of 1080p, 6 min of 720p or 24 min of 360p at 30 fps).
VIDEO_FRAME_MIN_COST = 640 * 360
DEFAULT_VIDEO_MAX_DECODED_PIXELS = 10_000_000_000


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_bool(name: str, default: bool = False) -> bool:
    value = env(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class EngineConfig:
    model: str = "auto"
    device: str = "auto"
    dtype: str | None = None
    attn_implementation: str = "sdpa"
    modelscope: bool = False
    revision: str | None = None
    max_model_len: int = 16384
    limit_images: int = 10
    limit_videos: int = 2
    max_queue: int = 32
    max_batch: int = 8
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    warmup: bool = True
    cpu_threads: int | None = None     # None: 1 for the tiny model, torch's default otherwise
    max_media_mb: float | None = None
    max_image_pixels: int | None = None
    fetch_timeout: float | None = None
    max_pixels_limit: int = DEFAULT_MAX_PIXELS_LIMIT
    video_fps: float = 2.0
    video_max_frames: int = 32
    video_max_pixels: int = 360 * 420   # per frame
    video_max_fps: float = DEFAULT_VIDEO_MAX_FPS   # the highest fps a request may ask for
    video_max_decoded_pixels: int = DEFAULT_VIDEO_MAX_DECODED_PIXELS   # per video
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_LIMIT * max_model_len
    log_stats_interval: float = 10.0   # seconds between engine lines; 0: none
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB
    max_num_batched_tokens: int = 2048   # prompt tokens prefilled per scheduler iteration
    prefix_cache: bool = True          # keep finished requests' KV for later prompts
    prefix_cache_gib: float | None = None   # None: 4 on an NPU/GPU, 1 on a CPU
    encoder_cache_mb: float = 1024.0   # vision-encoder outputs kept on the device
    picture_cache_mb: float = 256.0    # decoded, resized pictures kept in host memory
    enforce_eager: bool = False        # no captured decode step (CUDA graphs) even on CUDA
    npu_graphs: bool = False           # capture the decode step with torch_npu's NPUGraph
    backend: str = "local"             # local | remote (an OpenAI-compatible server)
    remote_url: str | None = None      # e.g. http://npu-host:8000/v1
    remote_api_key: str | None = None
    remote_model: str | None = None    # default: the first model the remote lists
    remote_timeout: float = 300.0      # seconds without a byte from the remote before giving up
    remote_mm_kwargs: bool = False     # the remote runs with --trust-request-mm-kwargs
    remote_min_pixels: int | None = None   # the remote processor's own bounds, where they
    remote_max_pixels: int | None = None   # narrow ours (grounding coordinates follow them)

    @property
    def prompt_chars_limit(self) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * self.max_model_len

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model and device flags; every default can come from an environment variable."""
    g = parser.add_argument_group("model and device")
    g.add_argument("--model", "--checkpoint-path", "-c", dest="model",
                   default=env("QWENVL_MODEL", "auto"),
                   help="auto (the 7B on an NPU/GPU, else the built-in tiny model), tiny, a local "
                        f"folder, or a hub id such as {DEFAULT_MODEL} [env QWENVL_MODEL]")
    g.add_argument("--device", default=env("QWENVL_DEVICE", "auto"),
                   choices=["auto", "npu", "cuda", "cpu"], help="[env QWENVL_DEVICE]")
    g.add_argument("--dtype", default=env("QWENVL_DTYPE"),
                   choices=["auto", "bfloat16", "float16", "float32"],
                   help="default: bfloat16 on NPU/CUDA, float32 on CPU; float16 for Atlas 300I "
                        "[env QWENVL_DTYPE]")
    g.add_argument("--attn-implementation", default=env("QWENVL_ATTN", "sdpa"),
                   choices=["sdpa", "eager", "flash_attention_2"], help="[env QWENVL_ATTN]")
    g.add_argument("--modelscope", action="store_true",
                   default=env_bool("VLLM_USE_MODELSCOPE") or env_bool("QWENVL_MODELSCOPE"),
                   help="download from ModelScope instead of the Hugging Face hub "
                        "[env VLLM_USE_MODELSCOPE=True]")
    g.add_argument("--revision", default=env("QWENVL_REVISION"), help="hub revision")
    g.add_argument("--max-model-len", type=int, default=int(env("QWENVL_MAX_MODEL_LEN", "16384")),
                   help="prompt plus output tokens [env QWENVL_MAX_MODEL_LEN]")
    g.add_argument("--limit-images", type=int, default=int(env("QWENVL_LIMIT_IMAGES", "10")),
                   help="images per prompt [env QWENVL_LIMIT_IMAGES]")
    g.add_argument("--limit-videos", type=int, default=int(env("QWENVL_LIMIT_VIDEOS", "2")),
                   help="videos per prompt [env QWENVL_LIMIT_VIDEOS]")
    g.add_argument("--max-queue", type=int, default=int(env("QWENVL_MAX_QUEUE", "32")),
                   help="requests waiting for the device before new ones get 'busy' "
                        "[env QWENVL_MAX_QUEUE]")
    g.add_argument("--max-batch", type=int, default=int(env("QWENVL_MAX_BATCH", "8")),
                   help="requests decoding at once; each step runs them together [env QWENVL_MAX_BATCH]")
    g.add_argument("--default-max-tokens", type=int,
                   default=int(env("QWENVL_DEFAULT_MAX_TOKENS", str(DEFAULT_MAX_TOKENS))),
                   help="max new tokens when a request sets none [env QWENVL_DEFAULT_MAX_TOKENS]")
    g.add_argument("--cpu-threads", type=int,
                   default=int(env("QWENVL_CPU_THREADS", "0")) or None,
                   help="torch threads on the CPU (default: 1 for the tiny model, where more "
                        "threads only add synchronisation; torch's choice otherwise) "
                        "[env QWENVL_CPU_THREADS]")
    g.add_argument("--max-media-mb", type=float, default=float(env("QWENVL_MAX_MEDIA_MB", "50")),
                   help="largest image or video file, data: URI or download "
                        "[env QWENVL_MAX_MEDIA_MB]")
    g.add_argument("--max-image-pixels", type=int,
                   default=int(env("QWENVL_MAX_IMAGE_PIXELS", "64000000")),
                   help="largest decoded image (decompression-bomb guard) "
                        "[env QWENVL_MAX_IMAGE_PIXELS]")
    g.add_argument("--fetch-timeout", type=float, default=float(env("QWENVL_FETCH_TIMEOUT", "10")),
                   help="seconds for fetching an http(s) image or video [env QWENVL_FETCH_TIMEOUT]")
    g.add_argument("--max-pixels-limit", type=int,
                   default=int(env("QWENVL_MAX_PIXELS_LIMIT", str(DEFAULT_MAX_PIXELS_LIMIT))),
                   help="largest min_pixels/max_pixels a request may set per image (default: the "
                        "processor's own 16384*28*28) [env QWENVL_MAX_PIXELS_LIMIT]")
    g.add_argument("--max-prompt-chars", type=int,
                   default=int(env("QWENVL_MAX_PROMPT_CHARS", "0")) or None,
                   help=f"longest prompt text, refused before tokenizing (default: "
                        f"{CHARS_PER_TOKEN_LIMIT} x --max-model-len) [env QWENVL_MAX_PROMPT_CHARS]")
    g.add_argument("--video-fps", type=float, default=float(env("QWENVL_VIDEO_FPS", "2")),
                   help="frames sampled per second of video [env QWENVL_VIDEO_FPS]")
    g.add_argument("--video-max-frames", type=int,
                   default=int(env("QWENVL_VIDEO_MAX_FRAMES", "32")),
                   help="most frames sampled from one video [env QWENVL_VIDEO_MAX_FRAMES]")
    g.add_argument("--video-max-pixels", type=int,
                   default=int(env("QWENVL_VIDEO_MAX_PIXELS", str(360 * 420))),
                   help="pixels per video frame [env QWENVL_VIDEO_MAX_PIXELS]")
    g.add_argument("--video-max-fps", type=float,
                   default=float(env("QWENVL_VIDEO_MAX_FPS", str(DEFAULT_VIDEO_MAX_FPS))),
                   help="highest frames per second a request may ask a video to be sampled at "
                        "(mm_processor_kwargs.fps); 0 or less is refused too "
                        "[env QWENVL_VIDEO_MAX_FPS]")
    g.add_argument("--video-max-decoded-pixels", type=int,
                   default=int(env("QWENVL_VIDEO_MAX_DECODED_PIXELS",
                                   str(DEFAULT_VIDEO_MAX_DECODED_PIXELS))),
                   help=f"most pixels decoded from one video, frames x width x height (each "
                        f"frame counted as at least {VIDEO_FRAME_MIN_COST:,}); a longer video is "
                        f"refused before it is decoded [env QWENVL_VIDEO_MAX_DECODED_PIXELS]")
    g.add_argument("--no-warmup", dest="warmup", action="store_false",
                   default=not env_bool("QWENVL_NO_WARMUP"),
                   help="skip the short warm-up generation at start")
    g.add_argument("--log-stats-interval", type=float,
                   default=float(env("QWENVL_LOG_STATS_INTERVAL", "10")),
                   help="seconds between the engine's periodic line (running, waiting, KV cache "
                        "use, tokens/s) while it has work; 0 turns it off "
                        "[env QWENVL_LOG_STATS_INTERVAL]")
    s = parser.add_argument_group("scheduler")
    s.add_argument("--kv-cache-gib", type=float,
                   default=float(env("QWENVL_KV_CACHE_GIB", str(DEFAULT_KV_CACHE_GIB))),
                   help="device memory for the running requests' KV cache, allocated at start; "
                        "it holds min(--max-batch, what fits) full contexts of --max-model-len "
                        "(the 7B: 0.88 GiB each at 16384) [env QWENVL_KV_CACHE_GIB]")
    s.add_argument("--max-num-batched-tokens", type=int,
                   default=int(env("QWENVL_MAX_NUM_BATCHED_TOKENS", "2048")),
                   help="prompt tokens prefilled between two decode steps: a longer prompt is "
                        "prefilled in chunks, so running answers keep streaming "
                        "[env QWENVL_MAX_NUM_BATCHED_TOKENS]")
    s.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   default=not env_bool("QWENVL_NO_PREFIX_CACHE"),
                   help="do not keep finished requests' KV for later prompts (a follow-up turn "
                        "then prefills the whole chat again) [env QWENVL_NO_PREFIX_CACHE=1]")
    s.add_argument("--prefix-cache-gib", type=float,
                   default=float(env("QWENVL_PREFIX_CACHE_GIB", "0")) or None,
                   help=f"memory for kept KV blocks, allocated as needed up to this; least "
                        f"recently used blocks go first (default: {DEFAULT_PREFIX_CACHE_GIB:g} on "
                        f"an NPU or GPU, {DEFAULT_PREFIX_CACHE_GIB_CPU:g} on a CPU) "
                        "[env QWENVL_PREFIX_CACHE_GIB]")
    s.add_argument("--encoder-cache-mb", type=float,
                   default=float(env("QWENVL_ENCODER_CACHE_MB", "1024")),
                   help="device memory for vision-encoder outputs of recent pictures; 0 off "
                        "[env QWENVL_ENCODER_CACHE_MB]")
    s.add_argument("--picture-cache-mb", type=float,
                   default=float(env("QWENVL_PICTURE_CACHE_MB", "256")),
                   help="host memory for decoded, resized pictures, and as much again for their "
                        "processed pixel values; 0 off [env QWENVL_PICTURE_CACHE_MB]")
    s.add_argument("--enforce-eager", action="store_true", default=env_bool("QWENVL_ENFORCE_EAGER"),
                   help="never capture the decode step (on CUDA it is captured as CUDA graphs "
                        "at start) [env QWENVL_ENFORCE_EAGER]")
    s.add_argument("--npu-graphs", action="store_true", default=env_bool("QWENVL_NPU_GRAPHS"),
                   help="on an Ascend NPU, capture the decode step with torch_npu's NPUGraph "
                        "(unverified on hardware) [env QWENVL_NPU_GRAPHS]")
    r = parser.add_argument_group("remote backend")
    r.add_argument("--backend", default=env("QWENVL_BACKEND", "local"), choices=["local", "remote"],
                   help="local: load the model here; remote: forward to an OpenAI-compatible "
                        "server such as vllm-ascend [env QWENVL_BACKEND]")
    r.add_argument("--remote-url", default=env("QWENVL_REMOTE_URL"),
                   help="the remote server's API base, e.g. http://NPU-HOST:8000/v1 "
                        "[env QWENVL_REMOTE_URL]")
    r.add_argument("--remote-api-key", default=env("QWENVL_REMOTE_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' [env QWENVL_REMOTE_API_KEY]")
    r.add_argument("--remote-model", default=env("QWENVL_REMOTE_MODEL"),
                   help="model name on the remote (default: the first one its /v1/models "
                        "lists) [env QWENVL_REMOTE_MODEL]")
    r.add_argument("--remote-timeout", type=float,
                   default=float(env("QWENVL_REMOTE_TIMEOUT", "300")),
                   help="seconds to wait for the remote's next byte (connecting: at most 5 s) "
                        "[env QWENVL_REMOTE_TIMEOUT]")
    r.add_argument("--remote-min-pixels", type=int,
                   default=int(env("QWENVL_REMOTE_MIN_PIXELS", "0")) or None,
                   help="the remote's own min_pixels, if it was started with one (its "
                        "--mm-processor-kwargs): boxes in its answers are drawn at that resize "
                        "[env QWENVL_REMOTE_MIN_PIXELS]")
    r.add_argument("--remote-max-pixels", type=int,
                   default=int(env("QWENVL_REMOTE_MAX_PIXELS", "0")) or None,
                   help="the remote's own max_pixels (see --remote-min-pixels) "
                        "[env QWENVL_REMOTE_MAX_PIXELS]")
    r.add_argument("--remote-mm-kwargs", action="store_true",
                   default=env_bool("QWENVL_REMOTE_MM_KWARGS"),
                   help="also send mm_processor_kwargs (pixel bounds, video fps); only for a "
                        "vLLM started with --trust-request-mm-kwargs. Without it, pictures are "
                        "resized here to the requested bounds [env QWENVL_REMOTE_MM_KWARGS]")
