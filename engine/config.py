"""Engine settings shared by the CLI, the web app and the benchmarks.

Each setting is stated once, as a field of `EngineConfig` that carries its default, its
flag, its environment variable and its help (`setting`). The command lines are generated
from the fields (`add_flags`; the API's and the web app's own flags use the same
machinery), and so is docs/configuration.md (`flag_docs`), so a default cannot differ
between the dataclass, the parser and the manual. Every flag also reads an environment
variable, so a hosted Space can be configured without editing code."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

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
REMOTE_URL_NEEDED = "--backend remote needs --remote-url http://HOST:8000/v1"


def env(name: str, default: str | None = None) -> str | None:
    """An environment variable; unset and empty both give `default`."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_bool(name: str, default: bool = False) -> bool:
    """A switch from the environment: 1, true, yes or on (any case) turn it on."""
    value = env(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- flags from fields
@dataclass(frozen=True)
class Flag:
    """How one settings field appears on a command line and in the environment. Kept in the
    field's metadata, so the field's default is the flag's default."""

    help: str
    env: tuple[str, ...] = ()           # variables that give the default (a switch: any of them)
    names: tuple[str, ...] = ()         # default: --field-name
    group: str | None = None            # the --help section; None: the parser's own options
    action: str | None = None           # store_true, store_false, append; None: one value
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None   # the command line's parser; default: the type
    dest: str | None = None             # the argparse attribute; default: the field's name
    env_list: bool = False              # the variable is a comma-separated list
    env_zero_unset: bool = False        # the variable's 0 means unset (the field's None)

    @property
    def switch(self) -> bool:
        return self.action in ("store_true", "store_false")

    def env_names(self) -> list[str]:
        """The variables as a user sets them, e.g. `QWENVL_NO_WARMUP=1` for a switch."""
        return [f"{n}=1" if self.switch else n for n in self.env]

    def env_note(self) -> str:
        """How --help names the variables, e.g. `[env QWENVL_NO_WARMUP=1]`."""
        if not self.env:
            return ""
        return f"[env {' or '.join(self.env_names())}{', comma-separated' * self.env_list}]"


def setting(default: Any = None, *names: str, help: str, env: str | tuple[str, ...] = (),
            factory: Callable[[], Any] | None = None, **flag: Any) -> Any:
    """A dataclass field that is also a flag: its default (or `factory`), its flag names
    (default: --field-name), environment variable(s), help and any other `Flag` option."""
    meta = {"flag": Flag(help=help, env=(env,) if isinstance(env, str) else tuple(env),
                         names=names, **flag)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flagged(cls: type) -> Iterator[tuple[dataclasses.Field, Flag, type]]:
    """(field, its Flag, its value type without None) for each field of `cls` with a flag."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "flag" in f.metadata:
            kind = hints[f.name]
            if isinstance(kind, types.UnionType):    # `int | None`: the value's type is int
                kind = next(k for k in typing.get_args(kind) if k is not type(None))
            yield f, f.metadata["flag"], kind


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _names(f: dataclasses.Field, flag: Flag) -> tuple[str, ...]:
    return flag.names or ("--" + f.name.replace("_", "-"),)


def _environment_default(f: dataclasses.Field, flag: Flag, kind: type) -> Any:
    """The field's default, unless one of its environment variables says otherwise."""
    default = _field_default(f)
    if flag.action == "store_true":
        return default or any(env_bool(n) for n in flag.env)
    if flag.action == "store_false":
        return default and not any(env_bool(n) for n in flag.env)
    name, raw = next(((n, env(n)) for n in flag.env if env(n) is not None), ("", None))
    if raw is None:
        return list(default) if flag.action == "append" or flag.nargs else default
    if flag.env_list:
        return [v for v in raw.split(",") if v]
    if flag.action == "append":
        return [raw]
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    return None if flag.env_zero_unset and not value else value


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse option per flagged field of the dataclass `cls`, in field order, each in
    its group; defaults come from the environment, else from the field."""
    groups: dict[str | None, Any] = {None: parser}
    for f, flag, kind in _flagged(cls):
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        options: dict[str, Any] = dict(dest=flag.dest or f.name,
                                       default=_environment_default(f, flag, kind),
                                       help=" ".join(filter(None, (flag.help, flag.env_note())))
                                       .replace("%", "%%"))
        if flag.action:
            options["action"] = flag.action
        elif not flag.nargs and (flag.parse or kind is not str):   # one value: parse it
            options["type"] = flag.parse or kind
        for key in ("nargs", "metavar"):
            if getattr(flag, key) is not None:
                options[key] = getattr(flag, key)
        if flag.choices is not None:
            options["choices"] = list(flag.choices)
        groups[flag.group].add_argument(*_names(f, flag), **options)


def namespace_values(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Each flagged field of `cls` that `ns` holds, by field name (a flag may store under
    another name, as --auth does for ServerSettings.users)."""
    values = {}
    for f, flag, _ in _flagged(cls):
        dest = flag.dest or f.name
        if hasattr(ns, dest):
            values[f.name] = getattr(ns, dest)
    return values


@dataclass(frozen=True)
class FlagDoc:
    """One flag as docs/configuration.md lists it."""

    group: str                 # "" for the parser's own options
    names: tuple[str, ...]
    metavar: str
    env: tuple[str, ...]       # as a user sets them, e.g. QWENVL_NO_WARMUP=1
    env_list: bool             # the variable is a comma-separated list
    default: str               # the field's default (before any environment): off, unset, 8, ...
    choices: tuple[str, ...]   # () when any value goes
    help: str


def flag_docs(cls: type) -> list[FlagDoc]:
    """The flags of the dataclass `cls`, in field order, for the configuration manual."""
    def shown(value: Any, flag: Flag) -> str:
        if flag.switch:
            return "off"
        if value is None or value == [] or value == ():
            return "unset"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return [FlagDoc(flag.group or "", _names(f, flag), flag.metavar or "",
                    tuple(flag.env_names()), flag.env_list, shown(_field_default(f), flag),
                    flag.choices or (), flag.help)
            for f, flag, _ in _flagged(cls)]


# --------------------------------------------------------------------------- the engine's settings
MODEL = "model and device"
SCHEDULER = "scheduler"
REMOTE = "remote backend"


@dataclass
class EngineConfig:
    """Everything the engine is built from. Each field is also a flag (add_engine_args) and
    an environment variable, listed in docs/configuration.md; a field's default is the only
    place that default is written."""

    model: str = setting(
        "auto", "--model", "--checkpoint-path", "-c", env="QWENVL_MODEL", group=MODEL,
        help="auto (the 7B on an NPU/GPU, else the built-in tiny model), tiny, a local "
             f"folder, or a hub id such as {DEFAULT_MODEL}")
    device: str = setting("auto", env="QWENVL_DEVICE", group=MODEL,
                          choices=("auto", "npu", "cuda", "cpu"),
                          help="where the model runs (auto: an NPU, else a GPU, else the CPU)")
    dtype: str | None = setting(
        None, env="QWENVL_DTYPE", group=MODEL, choices=("auto", "bfloat16", "float16", "float32"),
        help="default: bfloat16 on NPU/CUDA, float32 on CPU; float16 for Atlas 300I")
    attn_implementation: str = setting("sdpa", env="QWENVL_ATTN", group=MODEL,
                                       choices=("sdpa", "eager", "flash_attention_2"),
                                       help="the attention kernel transformers uses")
    modelscope: bool = setting(False, env=("VLLM_USE_MODELSCOPE", "QWENVL_MODELSCOPE"),
                               group=MODEL, action="store_true",
                               help="download from ModelScope instead of the Hugging Face hub")
    revision: str | None = setting(None, env="QWENVL_REVISION", group=MODEL, help="hub revision")
    max_model_len: int = setting(16384, env="QWENVL_MAX_MODEL_LEN", group=MODEL,
                                 help="prompt plus output tokens")
    limit_images: int = setting(10, env="QWENVL_LIMIT_IMAGES", group=MODEL,
                                help="images per prompt")
    limit_videos: int = setting(2, env="QWENVL_LIMIT_VIDEOS", group=MODEL,
                                help="videos per prompt")
    max_queue: int = setting(32, env="QWENVL_MAX_QUEUE", group=MODEL,
                             help="requests waiting for the device before new ones get 'busy'")
    max_batch: int = setting(8, env="QWENVL_MAX_BATCH", group=MODEL,
                             help="requests decoding at once; each step runs them together")
    default_max_tokens: int = setting(DEFAULT_MAX_TOKENS, env="QWENVL_DEFAULT_MAX_TOKENS",
                                      group=MODEL, help="max new tokens when a request sets none")
    cpu_threads: int | None = setting(
        None, env="QWENVL_CPU_THREADS", group=MODEL, env_zero_unset=True,
        help="torch threads on the CPU (default: 1 for the tiny model, where more threads only "
             "add synchronisation; torch's choice otherwise)")
    max_logprobs: int = setting(20, env="QWENVL_MAX_LOGPROBS", group=MODEL,
                                help="most top logprobs a request may ask for per token "
                                     "(vLLM's --max-logprobs; -1: the whole vocabulary)")
    max_media_mb: float = setting(50.0, env="QWENVL_MAX_MEDIA_MB", group=MODEL,
                                  help="largest image or video file, data: URI or download")
    max_image_pixels: int = setting(64_000_000, env="QWENVL_MAX_IMAGE_PIXELS", group=MODEL,
                                    help="largest decoded image (decompression-bomb guard)")
    fetch_timeout: float = setting(10.0, env="QWENVL_FETCH_TIMEOUT", group=MODEL,
                                   help="seconds for fetching an http(s) image or video")
    max_pixels_limit: int = setting(
        DEFAULT_MAX_PIXELS_LIMIT, env="QWENVL_MAX_PIXELS_LIMIT", group=MODEL,
        help="largest min_pixels/max_pixels a request may set per image (default: the "
             "processor's own 16384*28*28)")
    max_prompt_chars: int | None = setting(
        None, env="QWENVL_MAX_PROMPT_CHARS", group=MODEL, env_zero_unset=True,
        help=f"longest prompt text, refused before tokenizing (default: {CHARS_PER_TOKEN_LIMIT} "
             "x --max-model-len)")
    video_fps: float = setting(2.0, env="QWENVL_VIDEO_FPS", group=MODEL,
                               help="frames sampled per second of video")
    video_max_frames: int = setting(32, env="QWENVL_VIDEO_MAX_FRAMES", group=MODEL,
                                    help="most frames sampled from one video")
    video_max_pixels: int = setting(360 * 420, env="QWENVL_VIDEO_MAX_PIXELS", group=MODEL,
                                    help="pixels per video frame")
    video_max_fps: float = setting(
        DEFAULT_VIDEO_MAX_FPS, env="QWENVL_VIDEO_MAX_FPS", group=MODEL,
        help="highest frames per second a request may ask a video to be sampled at "
             "(mm_processor_kwargs.fps); 0 or less is refused too")
    video_max_decoded_pixels: int = setting(
        DEFAULT_VIDEO_MAX_DECODED_PIXELS, env="QWENVL_VIDEO_MAX_DECODED_PIXELS", group=MODEL,
        help=f"most pixels decoded from one video, frames x width x height (each frame counted "
             f"as at least {VIDEO_FRAME_MIN_COST:,}); a longer video is refused before it is "
             "decoded")
    warmup: bool = setting(True, "--no-warmup", env="QWENVL_NO_WARMUP", group=MODEL,
                           action="store_false",
                           help="skip the short warm-up generation at start")
    log_stats_interval: float = setting(
        10.0, env="QWENVL_LOG_STATS_INTERVAL", group=MODEL,
        help="seconds between the engine's periodic line (running, waiting, KV cache use, "
             "tokens/s) while it has work; 0 turns it off")

    kv_cache_gib: float = setting(
        DEFAULT_KV_CACHE_GIB, env="QWENVL_KV_CACHE_GIB", group=SCHEDULER,
        help="device memory for the running requests' KV cache, allocated at start; it holds "
             "min(--max-batch, what fits) full contexts of --max-model-len (the 7B: 0.88 GiB "
             "each at 16384)")
    max_num_batched_tokens: int = setting(
        2048, env="QWENVL_MAX_NUM_BATCHED_TOKENS", group=SCHEDULER,
        help="prompt tokens prefilled between two decode steps: a longer prompt is prefilled "
             "in chunks, so running answers keep streaming")
    prefix_cache: bool = setting(
        True, "--no-prefix-cache", env="QWENVL_NO_PREFIX_CACHE", group=SCHEDULER,
        action="store_false",
        help="do not keep finished requests' KV for later prompts (a follow-up turn then "
             "prefills the whole chat again)")
    prefix_cache_gib: float | None = setting(
        None, env="QWENVL_PREFIX_CACHE_GIB", group=SCHEDULER, env_zero_unset=True,
        help=f"memory for kept KV blocks, allocated as needed up to this; least recently used "
             f"blocks go first (default: {DEFAULT_PREFIX_CACHE_GIB:g} on an NPU or GPU, "
             f"{DEFAULT_PREFIX_CACHE_GIB_CPU:g} on a CPU)")
    encoder_cache_mb: float = setting(
        1024.0, env="QWENVL_ENCODER_CACHE_MB", group=SCHEDULER,
        help="device memory for vision-encoder outputs of recent pictures; 0 off")
    picture_cache_mb: float = setting(
        256.0, env="QWENVL_PICTURE_CACHE_MB", group=SCHEDULER,
        help="host memory for decoded, resized pictures, and as much again for their "
             "processed pixel values; 0 off")
    enforce_eager: bool = setting(
        False, env="QWENVL_ENFORCE_EAGER", group=SCHEDULER, action="store_true",
        help="never capture the decode step (on CUDA it is captured as CUDA graphs at start)")
    npu_graphs: bool = setting(
        False, env="QWENVL_NPU_GRAPHS", group=SCHEDULER, action="store_true",
        help="on an Ascend NPU, capture the decode step with torch_npu's NPUGraph "
             "(unverified on hardware)")

    backend: str = setting(
        "local", env="QWENVL_BACKEND", group=REMOTE, choices=("local", "remote"),
        help="local: load the model here; remote: forward to an OpenAI-compatible server such "
             "as vllm-ascend")
    remote_url: str | None = setting(
        None, env="QWENVL_REMOTE_URL", group=REMOTE,
        help="the remote server's API base, e.g. http://NPU-HOST:8000/v1")
    remote_api_key: str | None = setting(None, env="QWENVL_REMOTE_API_KEY", group=REMOTE,
                                         help="sent as 'Authorization: Bearer KEY'")
    remote_model: str | None = setting(
        None, env="QWENVL_REMOTE_MODEL", group=REMOTE,
        help="model name on the remote (default: the first one its /v1/models lists)")
    remote_timeout: float = setting(
        300.0, env="QWENVL_REMOTE_TIMEOUT", group=REMOTE,
        help="seconds to wait for the remote's next byte (connecting: at most 5 s)")
    remote_min_pixels: int | None = setting(
        None, env="QWENVL_REMOTE_MIN_PIXELS", group=REMOTE, env_zero_unset=True,
        help="the remote's own min_pixels, if it was started with one (its "
             "--mm-processor-kwargs): boxes in its answers are drawn at that resize")
    remote_max_pixels: int | None = setting(
        None, env="QWENVL_REMOTE_MAX_PIXELS", group=REMOTE, env_zero_unset=True,
        help="the remote's own max_pixels (see --remote-min-pixels)")
    remote_mm_kwargs: bool = setting(
        False, env="QWENVL_REMOTE_MM_KWARGS", group=REMOTE, action="store_true",
        help="also send mm_processor_kwargs (pixel bounds, video fps); only for a vLLM started "
             "with --trust-request-mm-kwargs. Without it, pictures are resized here to the "
             "requested bounds")

    @property
    def prompt_chars_limit(self) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * self.max_model_len

    def check(self) -> None:
        """Raise ValueError for settings that cannot work together, so a launcher can refuse
        them before the model load and an engine can refuse them when built directly."""
        if self.backend == "remote" and not self.remote_url:
            raise ValueError(REMOTE_URL_NEEDED)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "EngineConfig":
        """The settings a parser built by add_engine_args produced (other flags ignored)."""
        return cls(**namespace_values(ns, cls))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model, scheduler and remote-backend flags; every default can come from an
    environment variable."""
    add_flags(parser, EngineConfig)
