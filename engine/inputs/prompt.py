"""Rendering the input stage's loaded messages into model inputs, on the caller's
thread and without a device: Qwen messages (parts in order, videos decoded to
frames), the chat template and `qwen_vl_utils.process_vision_info` produce the
processor's tensors, and the context limit is enforced before anything is queued
for the device. Checks and media loading are the input stage's (engine/inputs.py)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from PIL import Image
from transformers import BatchFeature

from ..config import VIDEO_FRAME_MIN_COST
from ..errors import InvalidRequestError
from .caches import BoundedCache
from .geometry import PATCH, smart_resize
from .stage import (InputStage, LoadedImage, LoadedMessage, LoadedVideo, VideoSampling,
                     close_all, context_error, picture_key)
from .media import MediaPolicy, check_video_frame
from ..types import DEFAULT_MAX_TOKENS, Conversation, GenerationRequest


class MediaSpan(NamedTuple):
    """Prompt tokens [start, end) of one picture or video, and its content key."""

    start: int
    end: int
    kind: str           # "image" | "video"
    key: bytes


@dataclass
class PreparedPrompt:
    """Processor output for one request (CPU tensors) and what the caches key on: each
    picture's and video's token span with its content key, in prompt order."""

    inputs: dict[str, Any]
    prompt_text: str
    prompt_tokens: int
    images: int
    videos: int
    max_new_tokens: int
    media: list[MediaSpan] = field(default_factory=list)


def media_spans(ids: list[int], image_token: int, video_token: int,
                image_keys: list[bytes], video_keys: list[bytes]) -> list[MediaSpan]:
    """Each run of image (video) placeholder tokens, matched in order with its content key."""
    spans: list[MediaSpan] = []
    keys = {image_token: iter(image_keys), video_token: iter(video_keys)}
    i = 0
    while i < len(ids):
        token = ids[i]
        if token in keys:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            spans.append(MediaSpan(i, j, "image" if token == image_token else "video",
                                   next(keys[token], b"")))
            i = j
        else:
            i += 1
    return spans


# qwen_vl_utils 0.0.14 sizes the frames of a video given as pictures with fetch_image, to
# which fetch_video passes its image factor (28) as the patch size: multiples of 56.
LIST_FRAME_FACTOR = 2 * PATCH


def frame_plan(total: int, step: int, max_frames: int) -> list[int]:
    """The frames sampled from `total`: every `step`-th, then `max_frames` of those spread
    evenly (the first and the last kept); chosen before any frame is decoded."""
    sampled = range(0, total, step)
    if len(sampled) <= max_frames:
        return list(sampled)
    if max_frames <= 1:
        return [0]
    return [sampled[round(i * (len(sampled) - 1) / (max_frames - 1))] for i in range(max_frames)]


def fit_frame(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """A decoded frame at most `max_pixels` large: over it, resized now to the size (and
    with the resize) qwen_vl_utils' fetch_image gives it later, which then leaves it as it
    is, so the model sees the same frame; within it, as it is (qwen_vl_utils sizes it)."""
    if img.width * img.height <= max_pixels:
        return img
    h, w = smart_resize(img.height, img.width, min_pixels, max_pixels, LIST_FRAME_FACTOR)
    if not h or not w:          # a side rounds down to nothing: qwen_vl_utils fails on it too
        raise InvalidRequestError(
            f"The video's {img.width}x{img.height} frames are too narrow to fit "
            f"{max_pixels:,} pixels per frame: send a less elongated clip.", param="video")
    return img.resize((w, h))


def _too_long(frames: int, size: tuple[int, int], budget: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"The video has at least {frames:,} frames of {size[0]}x{size[1]}: more than the "
        f"{budget:,} pixels this server decodes from one video (see "
        f"--video-max-decoded-pixels). Send a shorter or smaller clip.", param="video")


def _frame_cost(width: int, height: int) -> int:
    return max(width * height, VIDEO_FRAME_MIN_COST)


def count_frames(path: str, fps: float, budget: int) -> tuple[int, int]:
    """(frames the decoder will give, sampling step), from the packets alone (nothing
    decoded), refused as soon as decoding them would pass `budget` pixels."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        step = max(1, round(float(stream.average_rate or 25) / fps))
        size = (stream.codec_context.width, stream.codec_context.height)
        most = budget // _frame_cost(*size)
        count = 0
        for packet in container.demux(stream):
            if packet.size:
                count += 1
                if count > most:
                    raise _too_long(count, size, budget)
    return count, step


def _decode(path: str, keep: set[int], min_pixels: int, max_pixels: int,
            sampling: VideoSampling) -> tuple[dict[int, Image.Image], int]:
    """The frames numbered in `keep`, each fitted as it is decoded (never all frames at full
    size), and how many frames the decoder gave; every frame is checked against the picture
    limit and the decoding budget (a stream may change size midway)."""
    import av

    kept: dict[int, Image.Image] = {}
    spent, n = 0, 0
    with av.open(path) as container:
        for n, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            size = (frame.width, frame.height)
            check_video_frame("The video", size, sampling.max_frame_pixels)
            spent += _frame_cost(*size)
            if spent > sampling.max_decoded_pixels:
                raise _too_long(n, size, sampling.max_decoded_pixels)
            if n - 1 in keep:
                kept[n - 1] = fit_frame(frame.to_image(), min_pixels, max_pixels)
    return kept, n


def read_video_frames(path: str, fps: float, sampling: VideoSampling, min_pixels: int,
                      max_pixels: int) -> list[Image.Image]:
    """Sample frames with PyAV (torchvision 0.29 no longer decodes video): the same frames
    as ever (every round(rate/fps)-th, then at most max_frames spread evenly), chosen from
    the packet count before decoding and fitted to `max_pixels` as they are decoded, so
    memory holds max_frames fitted frames, and decoding stops at the pixel budget."""
    total, step = count_frames(path, fps, sampling.max_decoded_pixels)
    plan = frame_plan(total, step, sampling.max_frames)
    kept, decoded = _decode(path, set(plan), min_pixels, max_pixels, sampling)
    if decoded != total:        # packets that are not one frame each: plan on the real count
        plan = frame_plan(decoded, step, sampling.max_frames)
        if not set(plan) <= kept.keys():
            kept, _ = _decode(path, set(plan), min_pixels, max_pixels, sampling)
    if not plan:
        raise InvalidRequestError("Failed to load video: it holds no frames.", param="video")
    return [kept[i] for i in plan]


def _video_part(video: LoadedVideo, sampling: VideoSampling) -> dict:
    """A checked video as decoded frames, each within the video's max_pixels."""
    try:
        frames = read_video_frames(str(video.file.path), video.fps, sampling, video.min_pixels,
                                   video.max_pixels)
    except InvalidRequestError:
        raise
    except Exception:
        raise InvalidRequestError("Failed to load video: its frames cannot be decoded.",
                                  param="video") from None
    return {"type": "video", "video": frames, "min_pixels": video.min_pixels,
            "max_pixels": video.max_pixels, "sample_fps": video.fps}


def template_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant turn's tool calls as vLLM hands them to chat templates: each function's
    `arguments` JSON text parsed to an object ({} where it is empty, not JSON or not an
    object, as vLLM coerces it so that a conversation with one bad call can go on)."""
    out = []
    for call in calls:
        function = dict(call.get("function") or {})
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args else {}
            except ValueError:
                args = {}
        function["arguments"] = args if isinstance(args, dict) else {}
        out.append({**call, "function": function})
    return out


def _text_content(m: LoadedMessage) -> str | list[dict]:
    """A message without media as vLLM hands it to this template: one text as a string,
    several text parts in turn (a tool's several parts joined by newlines, as vLLM joins them)."""
    texts = [p for p in m.parts if isinstance(p, str)]
    if m.role == "tool":
        return "\n".join(texts)
    if len(texts) <= 1:
        return m.text
    return [{"type": "text", "text": t} for t in texts]


def qwen_messages(loaded: list[LoadedMessage], sampling: VideoSampling) -> list[dict]:
    """Qwen chat messages, parts in order: text parts render in turn (as vLLM renders an
    OpenAI content list through this template), pictures as loaded, videos as frames; tool
    calls and the id a tool turn answers go to the template too."""
    messages: list[dict] = []
    for m in loaded:
        message: dict[str, Any] = {"role": m.role}
        if not m.has_media:
            message["content"] = _text_content(m)
        else:
            parts: list[dict] = []
            for part in m.parts:
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif isinstance(part, LoadedImage):
                    parts.append({"type": "image", "image": part.picture,
                                  "min_pixels": part.min_pixels, "max_pixels": part.max_pixels})
                else:
                    parts.append(_video_part(part, sampling))
            message["content"] = parts
        if m.tool_calls:
            message["tool_calls"] = template_tool_calls(m.tool_calls)
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    return messages


def template_args(conv: Conversation) -> dict[str, Any]:
    """What the chat template gets besides the messages (the stage refused the
    chat_template_kwargs that would override these)."""
    return {**conv.chat_template_kwargs, "add_generation_prompt": conv.add_generation_prompt,
            "continue_final_message": conv.continue_final_message, "tools": conv.tools}


def truncation_window(n: int, k: int | None, max_model_len: int,
                      side: str = "left") -> tuple[int, int]:
    """The prompt tokens [start, end) that truncate_prompt_tokens keeps: the last k ("left",
    vLLM's default, cuts the start) or the first k ("right"); -1 keeps max_model_len - 1,
    which leaves one token to generate (vLLM's meaning)."""
    if k is None:
        return 0, n
    keep = min(n, max_model_len - 1 if k == -1 else k)
    return (n - keep, n) if side == "left" else (0, keep)


def check_media_kept(spans: list[MediaSpan], window: tuple[int, int], k: int, n: int) -> None:
    """A cut may only drop text: a picture or video is never split or dropped (vLLM's rule)."""
    for span in spans:
        if span.start < window[0] or span.end > window[1]:
            raise InvalidRequestError(
                f"truncate_prompt_tokens={k} would split or drop a(n) {span.kind} item, which "
                f"spans tokens {span.start} to {span.end} of the {n}-token prompt; the limit "
                f"must leave every image and video intact. Please raise truncate_prompt_tokens "
                f"or shorten the multimodal input.", param="truncate_prompt_tokens")


class CachingImageProcessor:
    """The processor's image processor, remembering each picture's pixel values and grid by
    its content: a follow-up turn re-sends every picture of the chat, and normalising and
    patching them again costs tens of milliseconds each. Misses are processed together in
    one call; the output is the same as the image processor's own."""

    def __init__(self, inner: Any, max_bytes: int) -> None:
        self.inner = inner
        self.cache: BoundedCache[tuple[Any, Any]] = BoundedCache(
            max_bytes, lambda item: item[0].numel() * item[0].element_size())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        import torch

        if kwargs.get("return_tensors") != "pt" or self.cache.max_bytes == 0:
            return self.inner(images, **kwargs)
        flat = list(images) if isinstance(images, (list, tuple)) else [images]
        if not all(isinstance(im, Image.Image) for im in flat):
            return self.inner(images, **kwargs)
        keys = [picture_key(im) for im in flat]
        found = {i: hit for i, k in enumerate(keys) if (hit := self.cache.get(k)) is not None}
        missing = [i for i in range(len(flat)) if i not in found]
        if missing:
            out = self.inner([flat[i] for i in missing], **kwargs)
            grids = out["image_grid_thw"]
            pixels = torch.split(out["pixel_values"], grids.prod(-1).tolist())
            for j, i in enumerate(missing):
                found[i] = (pixels[j], grids[j:j + 1])
                self.cache.put(keys[i], found[i])
        if len(found) != len(flat):
            return self.inner(images, **kwargs)
        result = BatchFeature({"pixel_values": torch.cat([found[i][0] for i in range(len(flat))]),
                               "image_grid_thw": torch.cat([found[i][1]
                                                            for i in range(len(flat))])})
        return result


def _per_token(value: Any, n: int) -> bool:
    """One of the processor's outputs that runs along the prompt's tokens (input_ids,
    attention_mask, mm_token_type_ids), which a truncation cuts with them."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 2 and shape[0] == 1 and shape[1] == n


class PromptRenderer:
    """Processor access is serialised: a fast tokenizer shared between threads
    can fail with "Already borrowed" while another thread changes its padding."""

    def __init__(self, processor: Any, stage: InputStage, max_model_len: int,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 pixel_cache_bytes: int = 0) -> None:
        if pixel_cache_bytes and not isinstance(processor.image_processor,
                                                CachingImageProcessor):
            processor.image_processor = CachingImageProcessor(processor.image_processor,
                                                              pixel_cache_bytes)
        self.processor = processor
        self.stage = stage
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()
        tokenizer = processor.tokenizer
        self.image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_token = tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def prepare(self, request: GenerationRequest, policy: MediaPolicy | None = None) -> PreparedPrompt:
        """Everything short of the device; raises InvalidRequestError with vLLM's wording."""
        if request.prompt is not None:
            return self.prepare_raw(request)
        from qwen_vl_utils import process_vision_info

        loaded = self.stage.load(request, policy, self.max_model_len)   # after stage.validate
        try:
            messages = qwen_messages(loaded, self.stage.video)
        finally:
            close_all(loaded)     # temp copies of videos; their frames are in memory
        try:
            images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
        except ValueError as exc:  # e.g. qwen_vl_utils' aspect-ratio check
            raise InvalidRequestError(f"Failed to process image: {exc}", param="image") from None
        extra: dict[str, Any] = {}
        if videos:
            # qwen_vl_utils returns one fps per video; this processor takes one value.
            fps = video_kwargs.get("fps") or [self.stage.video.fps]
            extra = {"fps": float(fps[0]), "do_sample_frames": False, "cap_pixels_per_frame": True}
        with self._lock:
            text = self.render_template(messages, request.conversation)
            inputs = dict(self.processor(text=[text], images=images, videos=videos,
                                         return_tensors="pt", **extra))
        parts = [p for m in loaded for p in m.parts]
        spans = media_spans(inputs["input_ids"][0].tolist(), self.image_token, self.video_token,
                            [p.key for p in parts if isinstance(p, LoadedImage)],
                            [p.key for p in parts if isinstance(p, LoadedVideo)])
        return self.finish(request, inputs, text, spans, len(images or []), len(videos or []))

    def render_template(self, messages: list[dict], conv: Conversation) -> str:
        """The chat template's text; a template's own refusal (continue_final_message with no
        text to continue, a variable it rejects) is the request's error, as in vLLM."""
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(messages, tokenize=False,
                                                      **template_args(conv))
        except (TemplateError, ValueError, TypeError) as exc:
            raise InvalidRequestError(str(exc), param="messages") from None

    def prepare_raw(self, request: GenerationRequest) -> PreparedPrompt:
        """/v1/completions' prompt, continued as it is: a text tokenized as vLLM's completions
        do (add_special_tokens: Qwen adds none), or token ids taken as given."""
        import torch

        tokenizer = self.processor.tokenizer
        with self._lock:
            if isinstance(request.prompt, str):
                text = request.prompt
                ids = tokenizer.encode(text, add_special_tokens=True)
            else:
                ids = list(request.prompt or [])
                vocab = len(tokenizer)
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise InvalidRequestError(f"Token id {bad} is out of vocabulary",
                                              param="prompt")
                text = tokenizer.decode(ids)
        if not ids:
            raise InvalidRequestError("The decoder prompt cannot be empty", param="prompt")
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        return self.finish(request, inputs, text, [], 0, 0)

    def finish(self, request: GenerationRequest, inputs: dict[str, Any], text: str,
               spans: list[MediaSpan], images: int, videos: int) -> PreparedPrompt:
        """The prompt truncated as the request asks (only text is ever cut) and checked
        against the context."""
        n = int(inputs["input_ids"].shape[1])
        k = request.sampling.truncate_prompt_tokens
        start, end = truncation_window(n, k, self.max_model_len, request.sampling.truncation_side)
        if (start, end) != (0, n):
            check_media_kept(spans, (start, end), k, n)
            inputs = {key: value[:, start:end] if _per_token(value, n) else value
                      for key, value in inputs.items()}
            spans = [span._replace(start=span.start - start, end=span.end - start)
                     for span in spans]
            with self._lock:
                text = self.processor.tokenizer.decode(inputs["input_ids"][0].tolist())
            n = end - start
        max_new = self.check_context(n, request.sampling.max_tokens,
                                     request.sampling.cap_to_context)
        return PreparedPrompt(inputs=inputs, prompt_text=text, prompt_tokens=n, images=images,
                              videos=videos, max_new_tokens=max_new, media=spans)

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
