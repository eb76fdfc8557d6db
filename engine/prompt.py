"""Rendering a typed Conversation into model inputs, on the caller's thread
and without a device: media are loaded and checked, Qwen messages are built,
the chat template and `qwen_vl_utils.process_vision_info` produce the
processor's tensors, and the context and image limits are enforced before
anything is queued for the device."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .config import CHARS_PER_TOKEN_LIMIT, DEFAULT_MAX_PIXELS_LIMIT
from .errors import InvalidRequestError
from .media import MediaPolicy, load_image, load_video
from .types import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOKENS, DEFAULT_MIN_PIXELS, Conversation,
                    GenerationRequest, VideoInput)


@dataclass(frozen=True)
class VideoSampling:
    """How videos are sampled (EngineConfig's video_fps, video_max_frames, video_max_pixels).
    The per-frame pixel bound: Qwen's own default for video frames is 768*28*28 in total."""

    fps: float = 2.0
    max_frames: int = 32
    max_pixels: int = 360 * 420


@dataclass
class PreparedPrompt:
    """Processor output for one request, CPU tensors, ready to collate into a batch."""

    inputs: dict[str, Any]
    prompt_text: str
    prompt_tokens: int
    images: int
    videos: int
    max_new_tokens: int


def check_image_limits(conv: Conversation, limit_images: int, limit_videos: int) -> None:
    """Count media before any is fetched or decoded."""
    if conv.image_count() > limit_images:
        raise InvalidRequestError(
            f"At most {limit_images} image(s) may be provided in one prompt.", param="image")
    if conv.video_count() > limit_videos:
        raise InvalidRequestError(
            f"At most {limit_videos} video(s) may be provided in one prompt.", param="video")


def check_conversation(conv: Conversation) -> None:
    if not conv.messages:
        raise InvalidRequestError("The conversation is empty: send a message.", param="messages")
    last = conv.messages[-1]
    if last.role != "user":
        raise InvalidRequestError("The last message must come from the user.", param="messages")
    for m in conv.messages:
        if m.role not in ("user", "assistant", "system"):
            raise InvalidRequestError(f"Unknown role {m.role!r}.", param="messages")
    if not last.text.strip() and not last.images and not last.videos:
        raise InvalidRequestError("The message is empty: type a question or add an image.",
                                  param="messages")


def check_request_bounds(request: GenerationRequest, max_pixels_limit: int,
                         max_chars: int) -> None:
    """Every size a request controls, checked before any media is read or any text tokenized:
    pixel bounds (an upscale to 1e10 pixels would exhaust memory) and the prompt's length."""
    bounds = [("min_pixels", request.min_pixels), ("max_pixels", request.max_pixels)]
    for m in request.conversation.messages:
        for media in [*m.images, *m.videos]:
            bounds += [("min_pixels", media.min_pixels), ("max_pixels", media.max_pixels)]
    for name, value in bounds:
        if value is not None and not 1 <= value <= max_pixels_limit:
            raise InvalidRequestError(
                f"{name} must be between 1 and {max_pixels_limit} (the server's limit, see "
                f"--max-pixels-limit), got {value}.", param=name)
    conv = request.conversation
    chars = len(conv.system or "") + sum(len(m.text) for m in conv.messages)
    if chars > max_chars:
        raise InvalidRequestError(
            f"The prompt has {chars} characters, more than the {max_chars} this server accepts "
            f"(see --max-prompt-chars); it could not fit the model's context anyway. Please "
            f"shorten the messages.", param="messages")


def resized_image(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The picture at the size the processor will see (qwen_vl_utils' smart_resize, the same
    resize call), so the decoded original is not kept; resizing again there is a copy."""
    from qwen_vl_utils.vision_process import smart_resize

    if min_pixels > max_pixels:
        raise InvalidRequestError(f"min_pixels ({min_pixels}) must be at most max_pixels "
                                  f"({max_pixels}).", param="max_pixels")
    try:
        h, w = smart_resize(img.height, img.width, factor=28, min_pixels=min_pixels,
                            max_pixels=max_pixels)
    except ValueError as exc:   # the aspect-ratio check
        raise InvalidRequestError(f"Failed to process image: {exc}", param="image") from None
    return img if (w, h) == img.size else img.resize((w, h))


def context_error(limit: int, prompt_tokens: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"This model's maximum context length is {limit} tokens. However, your prompt "
        f"contains at least {prompt_tokens} input tokens, which exceeds this limit even "
        f"without any output tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={prompt_tokens})", param="input_tokens")


def read_video_frames(path: str, fps: float, max_frames: int) -> list[Image.Image]:
    """Sample frames with PyAV (torchvision 0.29 no longer decodes video)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 25)
        step = max(1, round(rate / fps))
        frames = [f.to_image() for i, f in enumerate(container.decode(stream)) if i % step == 0]
    if not frames:
        raise InvalidRequestError("Failed to load video: it holds no frames.", param="video")
    if len(frames) > max_frames:
        idx = [round(i * (len(frames) - 1) / (max_frames - 1)) for i in range(max_frames)]
        frames = [frames[i] for i in idx]
    return frames


def _video_part(vid: VideoInput, max_pixels: int, policy: MediaPolicy | None,
                sampling: VideoSampling) -> dict:
    """A video as decoded frames (its temp copy deleted at once)."""
    video = load_video(vid.source, policy)
    fps = vid.fps or sampling.fps
    try:
        frames = read_video_frames(str(video.path), fps, sampling.max_frames)
    except InvalidRequestError:
        raise
    except Exception:
        raise InvalidRequestError("Failed to load video: its frames cannot be decoded.",
                                  param="video") from None
    finally:
        video.close()      # a temp copy of a URL or data: URI; the frames are in memory
    return {"type": "video", "video": frames, "min_pixels": vid.min_pixels or 128 * 28 * 28,
            "max_pixels": vid.max_pixels or min(max_pixels, sampling.max_pixels),
            "sample_fps": fps}


def build_qwen_messages(conv: Conversation, min_pixels: int, max_pixels: int,
                        policy: MediaPolicy | None = None,
                        max_image_tokens: int | None = None,
                        video: VideoSampling = VideoSampling()) -> list[dict]:
    """Qwen chat messages with every image loaded, checked and resized to what the model
    sees, and every video decoded to frames, all parts in their order; nothing is left open
    afterwards. Images past `max_image_tokens` (the context) stop the work at once."""
    messages: list[dict] = []
    image_tokens = 0
    if conv.system is not None and conv.system.strip():
        messages.append({"role": "system", "content": conv.system})
    for m in conv.messages:
        if m.role in ("system", "assistant") or not (m.images or m.videos):
            messages.append({"role": m.role, "content": m.text})   # text parts, in turn
            continue
        parts: list[dict] = []
        for part in m.parts:
            if isinstance(part, str):
                if part:
                    parts.append({"type": "text", "text": part})
            elif isinstance(part, VideoInput):
                parts.append(_video_part(part, max_pixels, policy, video))
            else:
                lo, hi = part.min_pixels or min_pixels, part.max_pixels or max_pixels
                picture = resized_image(load_image(part.source, policy), lo, hi)
                image_tokens += picture.width * picture.height // (28 * 28)
                if max_image_tokens is not None and image_tokens >= max_image_tokens:
                    raise context_error(max_image_tokens, image_tokens)
                parts.append({"type": "image", "image": picture, "min_pixels": lo,
                              "max_pixels": hi})
        messages.append({"role": "user", "content": parts})
    return messages


class PromptRenderer:
    """Processor access is serialised: a fast tokenizer shared between threads
    can fail with "Already borrowed" while another thread changes its padding."""

    def __init__(self, processor: Any, max_model_len: int, limit_images: int = 10,
                 limit_videos: int = 2, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_pixels_limit: int = DEFAULT_MAX_PIXELS_LIMIT,
                 max_prompt_chars: int | None = None,
                 video: VideoSampling = VideoSampling()) -> None:
        self.processor = processor
        self.video = video
        self.max_model_len = max_model_len
        self.max_pixels_limit = max_pixels_limit
        self.max_prompt_chars = max_prompt_chars or CHARS_PER_TOKEN_LIMIT * max_model_len
        self.limit_images = limit_images
        self.limit_videos = limit_videos
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()

    def prepare(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> PreparedPrompt:
        """Everything short of the device; raises InvalidRequestError with vLLM's wording."""
        from qwen_vl_utils import process_vision_info

        conv = request.conversation
        check_conversation(conv)
        check_image_limits(conv, self.limit_images, self.limit_videos)
        check_request_bounds(request, self.max_pixels_limit, self.max_prompt_chars)
        min_px = request.min_pixels or DEFAULT_MIN_PIXELS
        max_px = request.max_pixels or DEFAULT_MAX_PIXELS
        if min_px < 1 or max_px < min_px:
            raise InvalidRequestError(
                f"min_pixels ({min_px}) must be positive and at most max_pixels ({max_px}).",
                param="max_pixels")
        messages = build_qwen_messages(conv, min_px, max_px, policy, self.max_model_len,
                                       self.video)
        try:
            images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
        except ValueError as exc:  # e.g. qwen_vl_utils' aspect-ratio check
            raise InvalidRequestError(f"Failed to process image: {exc}", param="image") from None
        extra: dict[str, Any] = {}
        if videos:
            # qwen_vl_utils returns one fps per video; this processor takes one value.
            fps = video_kwargs.get("fps") or [self.video.fps]
            extra = {"fps": float(fps[0]), "do_sample_frames": False, "cap_pixels_per_frame": True}
        with self._lock:
            text = self.processor.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            inputs = self.processor(text=[text], images=images, videos=videos,
                                    return_tensors="pt", **extra)
        n_prompt = int(inputs["input_ids"].shape[1])
        max_new = self.check_context(n_prompt, request.sampling.max_tokens,
                                     request.sampling.cap_to_context)
        return PreparedPrompt(inputs=dict(inputs), prompt_text=text, prompt_tokens=n_prompt,
                              images=len(images or []), videos=len(videos or []),
                              max_new_tokens=max_new)

    def check_context(self, prompt_tokens: int, max_tokens: int | None, cap: bool = False) -> int:
        """The number of new tokens to allow, or vLLM's context-length error."""
        limit = self.max_model_len
        if prompt_tokens >= limit:
            raise context_error(limit, prompt_tokens)
        if max_tokens is None:
            return min(self.default_max_tokens, limit - prompt_tokens)
        if cap:
            return min(max_tokens, limit - prompt_tokens)
        if prompt_tokens + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                f"completion. (parameter=input_tokens, value={prompt_tokens})", param="input_tokens")
        return max_tokens
