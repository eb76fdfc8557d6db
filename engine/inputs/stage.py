"""The input stage every backend shares (vLLM's renderer, SGLang's conversion to
the internal request): built from EngineConfig, it owns the limits (images per
prompt, pixel bounds, prompt length, media size and fetch time, video sampling),
checks a request once, and loads its media once into one ordered list of parts
per message: each picture decoded, checked and resized to what the model will
see, each video checked and made a local file. The local engine renders that
with the chat template (engine/prompt.py); the remote engine only serialises it
(engine/remote.py). The CLI, the page and the API all reach it through an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from .caches import BoundedCache, content_key
from ..config import EngineConfig
from ..errors import InvalidRequestError
from .geometry import PATCH, smart_resize
from .media import (MediaPolicy, NamedMedia, VideoFile, load_image, load_video, open_image,
                    read_source_bytes)
from .validation import validate_sampling
from ..types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, GenerationRequest, VideoInput



@dataclass(frozen=True)
class VideoSampling:
    """How videos are sampled (EngineConfig's video_fps, video_max_frames, video_max_pixels)
    and what decoding one may cost: the highest fps a request may ask for, the pixels decoded
    in all (video_max_decoded_pixels) and the largest frame (the picture limit,
    max_image_pixels). The per-frame pixel bound: Qwen's own default for video frames is
    768*28*28 in total."""

    fps: float = EngineConfig.video_fps
    max_frames: int = EngineConfig.video_max_frames
    max_pixels: int = EngineConfig.video_max_pixels
    max_fps: float = EngineConfig.video_max_fps
    max_decoded_pixels: int = EngineConfig.video_max_decoded_pixels
    max_frame_pixels: int = EngineConfig.max_image_pixels


@dataclass
class LoadedImage:
    picture: Image.Image      # RGB, already at its smart_resize size; shared, never changed
    min_pixels: int
    max_pixels: int
    key: bytes = b""          # the resized picture's content: what the model's caches key on

    @property
    def tokens(self) -> int:
        return self.picture.width * self.picture.height // (PATCH * PATCH)


@dataclass
class LoadedVideo:
    file: VideoFile           # checked; the consumer closes it (deletes a temp copy)
    min_pixels: int
    max_pixels: int
    fps: float
    key: bytes = b""          # the file's content and its sampling


LoadedPart = Union[str, LoadedImage, LoadedVideo]


@dataclass
class LoadedMessage:
    role: str
    parts: list[LoadedPart] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] | None = None   # as the request gave them (OpenAI's shape)
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def has_media(self) -> bool:
        return any(not isinstance(p, str) for p in self.parts)


def close_all(messages: list[LoadedMessage]) -> None:
    for m in messages:
        for part in m.parts:
            if isinstance(part, LoadedVideo):
                part.file.close()


# Arguments of apply_chat_template and template variables the request sets through its own
# fields (or the server sets): chat_template_kwargs may not override them. vLLM refuses
# `chat_template` and `tokenize` in the same words, and silently lets the request's own
# fields win over the others; a 400 tells a script that its key had no effect.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "add_generation_prompt", "continue_final_message",
    "chat_template", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "padding", "truncation", "max_length", "tokenizer_kwargs", "processor_kwargs"})


def context_error(limit: int, prompt_tokens: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"This model's maximum context length is {limit} tokens. However, your prompt "
        f"contains at least {prompt_tokens} input tokens, which exceeds this limit even "
        f"without any output tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={prompt_tokens})", param="input_tokens")


def check_tool_calls(calls: Any) -> None:
    """An assistant turn's tool_calls as vLLM accepts them (a list of function calls)."""
    if not isinstance(calls, list):
        raise InvalidRequestError("assistant tool_calls must be a list.", param="tool_calls")
    for item in calls:
        if not isinstance(item, dict):
            raise InvalidRequestError("assistant tool_calls entries must be objects.",
                                      param="tool_calls")
        if item.get("type", "function") != "function" or not isinstance(item.get("function"),
                                                                         dict):
            raise InvalidRequestError("chat completions only support assistant tool_calls of "
                                      "type 'function'.", param="tool_calls")


def check_truncation(k: int | None, max_model_len: int) -> None:
    """truncate_prompt_tokens against the context, as vLLM has it (its type and sign are
    validate_sampling's): 0 leaves nothing, more than max_model_len cannot fit."""
    if k is None:
        return
    if k == 0:
        raise InvalidRequestError("The decoder prompt cannot be empty",
                                  param="truncate_prompt_tokens")
    if k > max_model_len:
        raise InvalidRequestError(
            f"truncate_prompt_tokens={k} cannot be greater than max_model_len = "
            f"{max_model_len}. Please request a smaller truncation size. "
            f"(parameter=truncate_prompt_tokens, value={k})", param="truncate_prompt_tokens")


def resized_image(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The picture at the size the processor will see (qwen_vl_utils' smart_resize, the same
    resize call), so the decoded original is not kept; resizing again there is a copy."""
    if min_pixels > max_pixels:
        raise InvalidRequestError(f"min_pixels ({min_pixels}) must be at most max_pixels "
                                  f"({max_pixels}).", param="max_pixels")
    try:
        h, w = smart_resize(img.height, img.width, min_pixels, max_pixels)
    except ValueError as exc:   # the aspect-ratio check
        raise InvalidRequestError(f"Failed to process image: {exc}", param="image") from None
    return img if (w, h) == img.size else img.resize((w, h))


def picture_key(picture: Image.Image) -> bytes:
    return content_key(picture.mode, f"{picture.width}x{picture.height}", picture.tobytes())


MAX_UUIDS = 4096   # media uuids remembered (least recently used forgotten first)


def cache_miss(kind: str, index: int, uuid: str) -> InvalidRequestError:
    """vLLM's words for a part that names a uuid without data the server still holds."""
    return InvalidRequestError(f"Cache miss for {kind} at index {index} but data is not "
                               f"provided. (uuid {uuid!r} was not sent with its data before, "
                               f"or it has left the cache)", param="uuid")


class PictureCache:
    """Decoded, resized pictures by their source's bytes and the pixel bounds: a picture sent
    again (the next turn of a chat, or a new chat) is neither decoded nor resized again.
    A picture sent with a uuid (NamedMedia) is remembered by it too, as its source's digest
    (at most MAX_UUIDS of them): a part with the uuid alone reuses the picture while the cache
    holds it at the request's pixel bounds, as vLLM reuses its processor cache's item."""

    def __init__(self, max_bytes: int) -> None:
        self.cache: BoundedCache[LoadedImage] = BoundedCache(
            max_bytes, lambda im: im.picture.width * im.picture.height * 3)
        self.uuids: BoundedCache[bytes] = BoundedCache(MAX_UUIDS, lambda _: 1)

    def load(self, source: object, policy: MediaPolicy, lo: int, hi: int,
             index: int = 0) -> LoadedImage:
        """The picture of `source` (its `index` among the request's pictures, for errors)."""
        uuid = None
        if isinstance(source, NamedMedia):
            uuid, source = source.uuid, source.source
            if source is None:
                return self._named(uuid, policy, lo, hi, index)
        if not isinstance(source, str) or not source.strip() or self.cache.max_bytes == 0:
            picture = resized_image(load_image(source, policy), lo, hi)
            return LoadedImage(picture, lo, hi, picture_key(picture))
        data, path, name = read_source_bytes(source.strip(), policy)   # limits checked here
        digest = content_key(data if data is not None else path.read_bytes())
        if uuid is not None:
            self.uuids.put(uuid.encode(), digest)
        key = self._key(digest, policy, lo, hi)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        picture = resized_image(open_image(data, path, name, policy), lo, hi)
        image = LoadedImage(picture, lo, hi, picture_key(picture))
        self.cache.put(key, image)
        return image

    def _named(self, uuid: str, policy: MediaPolicy, lo: int, hi: int,
               index: int) -> LoadedImage:
        digest = self.uuids.get(uuid.encode())
        hit = None if digest is None else self.cache.get(self._key(digest, policy, lo, hi))
        if hit is None:
            raise cache_miss("image", index, uuid)
        return hit

    @staticmethod
    def _key(digest: bytes, policy: MediaPolicy, lo: int, hi: int) -> bytes:
        return content_key(digest, f"{lo},{hi},{policy.max_image_pixels}")


class InputStage:
    """One per engine, from its config; thread-safe (no state per request)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.limit_images = config.limit_images
        self.limit_videos = config.limit_videos
        self.max_pixels_limit = config.max_pixels_limit
        self.max_prompt_chars = config.prompt_chars_limit
        self.video = VideoSampling(config.video_fps, config.video_max_frames,
                                   config.video_max_pixels, config.video_max_fps,
                                   config.video_max_decoded_pixels,
                                   self.policy(None).max_image_pixels)
        self.pictures = PictureCache(int(config.picture_cache_mb * 1024 * 1024))

    def policy(self, policy: MediaPolicy | None) -> MediaPolicy:
        """The caller's policy (where media may come from) with this engine's size and time
        limits; None: a trusted caller (any local file)."""
        return (policy or MediaPolicy()).with_limits(
            self.config.max_media_mb, self.config.max_image_pixels, self.config.fetch_timeout)

    # ------------------------------------------------------------ checks, before any work
    def validate(self, request: GenerationRequest, max_model_len: int) -> None:
        """Everything that needs no media: raises InvalidRequestError in vLLM's words."""
        if request.prompt is not None:
            self.check_raw_prompt(request)
        else:
            self.check_conversation(request)
            self.check_chat_controls(request)
        self.check_bounds(request)
        validate_sampling(request.sampling, max_model_len)
        check_truncation(request.sampling.truncate_prompt_tokens, max_model_len)

    def check_raw_prompt(self, request: GenerationRequest) -> None:
        """/v1/completions' prompt: a non-empty text or list of token ids, alone."""
        prompt = request.prompt
        if request.conversation.messages:
            raise InvalidRequestError("Send either a prompt or messages, not both.",
                                      param="prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("Either prompt or prompt_embeds must be provided and "
                                          "non-empty.", param="prompt")
            return
        if not isinstance(prompt, list) or not prompt \
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("The prompt must be a non-empty string or list of token "
                                      "ids.", param="prompt")
        bad = min(prompt)
        if bad < 0:
            raise InvalidRequestError(f"Token id {bad} is out of vocabulary", param="prompt")

    def check_conversation(self, request: GenerationRequest) -> None:
        conv = request.conversation
        if not conv.messages:
            raise InvalidRequestError("The conversation is empty: send a message.",
                                      param="messages")
        for m in conv.messages:
            if not isinstance(m.role, str):   # any other role is the chat template's to read
                raise InvalidRequestError(f"The role must be a string, got {m.role!r}.",
                                          param="messages")
            if m.tool_calls is not None:
                check_tool_calls(m.tool_calls)
        last = conv.messages[-1]
        if last.role == "user" and not last.text.strip() and not last.images and not last.videos:
            raise InvalidRequestError("The message is empty: type a question or add an image.",
                                      param="messages")
        if conv.image_count() > self.limit_images:
            raise InvalidRequestError(
                f"At most {self.limit_images} image(s) may be provided in one prompt.",
                param="image")
        if conv.video_count() > self.limit_videos:
            raise InvalidRequestError(
                f"At most {self.limit_videos} video(s) may be provided in one prompt.",
                param="video")

    @staticmethod
    def check_chat_controls(request: GenerationRequest) -> None:
        """How the chat template is asked to render: vLLM's refusals, in its words."""
        conv = request.conversation
        if conv.add_generation_prompt and conv.continue_final_message:
            raise InvalidRequestError("Cannot set both `continue_final_message` and "
                                      "`add_generation_prompt` to True.",
                                      param="continue_final_message")
        kwargs = conv.chat_template_kwargs or {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise InvalidRequestError("chat_template_kwargs must be an object.",
                                      param="chat_template_kwargs")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise InvalidRequestError(
                f"Found unexpected chat template kwargs from request: {set(reserved)} (the "
                f"request's own fields set these).", param="chat_template_kwargs")
        if conv.tools is not None and not (isinstance(conv.tools, list)
                                           and all(isinstance(t, dict) for t in conv.tools)):
            raise InvalidRequestError("tools must be a list of objects.", param="tools")

    def check_bounds(self, request: GenerationRequest) -> None:
        """Every size a request controls: pixel bounds (an upscale to 1e10 pixels would
        exhaust memory) and the prompt's length, refused before it is tokenized."""
        bounds = [("min_pixels", request.min_pixels), ("max_pixels", request.max_pixels)]
        for m in request.conversation.messages:
            for media in [*m.images, *m.videos]:
                bounds += [("min_pixels", media.min_pixels), ("max_pixels", media.max_pixels)]
        for name, value in bounds:
            if value is not None and not 1 <= value <= self.max_pixels_limit:
                raise InvalidRequestError(
                    f"{name} must be between 1 and {self.max_pixels_limit} (the server's limit, "
                    f"see --max-pixels-limit), got {value}.", param=name)
        self.check_video_fps(request)
        lo, hi = self.bounds(request)
        if lo > hi:
            raise InvalidRequestError(
                f"min_pixels ({lo}) must be positive and at most max_pixels ({hi}).",
                param="max_pixels")
        conv = request.conversation
        chars = len(conv.system or "") + sum(len(m.text) for m in conv.messages) \
            + (len(request.prompt) if isinstance(request.prompt, str) else 0)
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"The prompt has {chars} characters, more than the {self.max_prompt_chars} this "
                f"server accepts (see --max-prompt-chars); it could not fit the model's context "
                f"anyway. Please shorten the messages.", param="messages")

    def check_video_fps(self, request: GenerationRequest) -> None:
        """A video's sampling rate (the API's mm_processor_kwargs.fps): zero or less means
        nothing (-5 was taken as is, 0 silently as the default), and past --video-max-fps it
        only decodes the same frames again, so both are refused before any work."""
        limit = self.video.max_fps
        for m in request.conversation.messages:
            for video in m.videos:
                fps = video.fps
                if fps is None:
                    continue
                if isinstance(fps, bool) or not isinstance(fps, (int, float)) \
                        or not 0 < fps <= limit:
                    raise InvalidRequestError(
                        f"fps must be greater than 0 and at most {limit:g} (the server's limit, "
                        f"see --video-max-fps), got {fps}.", param="fps")

    @staticmethod
    def bounds(request: GenerationRequest) -> tuple[int, int]:
        """The request's pixel bounds, the tutorial's where it sets none."""
        return (request.min_pixels or DEFAULT_MIN_PIXELS, request.max_pixels or DEFAULT_MAX_PIXELS)

    # ------------------------------------------------------------ media, once
    def load(self, request: GenerationRequest, policy: MediaPolicy | None,
             max_model_len: int) -> list[LoadedMessage]:
        """The system prompt and every turn, parts in order, media loaded. Pictures whose
        tokens alone reach `max_model_len` stop the work at the first one that does."""
        policy = self.policy(policy)
        conv = request.conversation
        min_px, max_px = self.bounds(request)
        out: list[LoadedMessage] = []
        if conv.system is not None and conv.system.strip():
            out.append(LoadedMessage("system", [conv.system]))
        image_tokens = images = videos = 0
        try:
            for m in conv.messages:
                message = LoadedMessage(m.role, tool_calls=m.tool_calls,
                                        tool_call_id=m.tool_call_id)
                out.append(message)          # before its media: a failure closes what is open
                parts = message.parts
                for part in m.parts:
                    if isinstance(part, str):
                        if part:
                            parts.append(part)
                    elif isinstance(part, VideoInput):
                        parts.append(self._video(part, policy, max_px, videos))
                        videos += 1
                    else:
                        lo, hi = part.min_pixels or min_px, part.max_pixels or max_px
                        image = self.pictures.load(part.source, policy, lo, hi, images)
                        images += 1
                        image_tokens += image.tokens
                        if image_tokens >= max_model_len:
                            raise context_error(max_model_len, image_tokens)
                        parts.append(image)
        except BaseException:
            close_all(out)
            raise
        return out

    def _video(self, vid: VideoInput, policy: MediaPolicy, max_pixels: int,
               index: int) -> LoadedVideo:
        """A video, checked and made a local file. Videos are not remembered by uuid: one sent
        without its data is a cache miss."""
        source = vid.source
        if isinstance(source, NamedMedia):
            if source.source is None:
                raise cache_miss("video", index, source.uuid)
            source = source.source
        file = load_video(source, policy)
        lo = vid.min_pixels or 128 * PATCH * PATCH
        hi = vid.max_pixels or min(max_pixels, self.video.max_pixels)
        fps = vid.fps or self.video.fps
        key = content_key(file.path.read_bytes(), f"{lo},{hi},{fps},{self.video.max_frames}")
        return LoadedVideo(file, lo, hi, fps, key)
