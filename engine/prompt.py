"""Rendering a typed Conversation into model inputs, on the caller's thread
and without a device: media are loaded and checked, Qwen messages are built,
the chat template and `qwen_vl_utils.process_vision_info` produce the
processor's tensors, and the context and image limits are enforced before
anything is queued for the device."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .errors import InvalidRequestError
from .media import MediaPolicy, load_image, load_video
from .types import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Conversation, GenerationRequest

VIDEO_FPS = float(os.environ.get("QWENVL_VIDEO_FPS", 2.0))
VIDEO_MAX_FRAMES = int(os.environ.get("QWENVL_VIDEO_MAX_FRAMES", 32))
# Per-frame bound for videos (Qwen's own default for video frames is 768*28*28 total/frames).
VIDEO_MAX_PIXELS = int(os.environ.get("QWENVL_VIDEO_MAX_PIXELS", 360 * 420))


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


def build_qwen_messages(conv: Conversation, min_pixels: int, max_pixels: int,
                        policy: MediaPolicy | None = None) -> list[dict]:
    """Qwen chat messages with every image loaded and checked and every video decoded to
    frames (images before text); nothing is left open afterwards."""
    messages: list[dict] = []
    if conv.system is not None and conv.system.strip():
        messages.append({"role": "system", "content": conv.system})
    for m in conv.messages:
        if m.role in ("system", "assistant"):
            messages.append({"role": m.role, "content": m.text})
            continue
        parts: list[dict] = []
        for img in m.images:
            parts.append({"type": "image", "image": load_image(img.source, policy),
                          "min_pixels": img.min_pixels or min_pixels,
                          "max_pixels": img.max_pixels or max_pixels})
        for vid in m.videos:
            video = load_video(vid.source, policy)
            try:
                frames = read_video_frames(str(video.path), vid.fps or VIDEO_FPS, VIDEO_MAX_FRAMES)
            except InvalidRequestError:
                raise
            except Exception:
                raise InvalidRequestError("Failed to load video: its frames cannot be decoded.",
                                          param="video") from None
            finally:
                video.close()      # a temp copy of a URL or data: URI; the frames are in memory
            parts.append({"type": "video", "video": frames,
                          "min_pixels": vid.min_pixels or 128 * 28 * 28,
                          "max_pixels": vid.max_pixels or min(max_pixels, VIDEO_MAX_PIXELS),
                          "sample_fps": vid.fps or VIDEO_FPS})
        if m.text:
            parts.append({"type": "text", "text": m.text})
        messages.append({"role": "user", "content": parts})
    return messages


class PromptRenderer:
    """Processor access is serialised: a fast tokenizer shared between threads
    can fail with "Already borrowed" while another thread changes its padding."""

    def __init__(self, processor: Any, max_model_len: int, limit_images: int = 10,
                 limit_videos: int = 2, default_max_tokens: int = 512) -> None:
        self.processor = processor
        self.max_model_len = max_model_len
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
        min_px = request.min_pixels or DEFAULT_MIN_PIXELS
        max_px = request.max_pixels or DEFAULT_MAX_PIXELS
        if min_px < 1 or max_px < min_px:
            raise InvalidRequestError(
                f"min_pixels ({min_px}) must be positive and at most max_pixels ({max_px}).",
                param="max_pixels")
        messages = build_qwen_messages(conv, min_px, max_px, policy)
        try:
            images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
        except ValueError as exc:  # e.g. qwen_vl_utils' aspect-ratio check
            raise InvalidRequestError(f"Failed to process image: {exc}", param="image") from None
        extra: dict[str, Any] = {}
        if videos:
            # qwen_vl_utils returns one fps per video; this processor takes one value.
            fps = video_kwargs.get("fps") or [VIDEO_FPS]
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
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains at least {prompt_tokens} input tokens, which exceeds this limit even "
                f"without any output tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={prompt_tokens})", param="input_tokens")
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
