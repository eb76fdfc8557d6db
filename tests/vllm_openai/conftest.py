"""Fixtures for vLLM's own OpenAI-API tests, ported to run against any OpenAI-compatible URL.

By default the suite starts our API (`python -m server --model tiny`) once per session on a free
loopback port. `VLLM_COMPAT_URL=http://127.0.0.1:PORT` points it at a server that is already
running instead (a real `vllm serve` of the same tiny folder, to measure what vLLM itself passes);
`VLLM_COMPAT_MODEL` names the model (default: the first id of `/v1/models`),
`VLLM_COMPAT_URL_FULL_LOGPROBS` a second server started with `--max-logprobs -1` for
test_chat_echo.py (vLLM's fixture starts that file's server so; default: `VLLM_COMPAT_URL`).

Two tables at the end say how each case fared on vLLM 0.32 (CPU build, same tiny folder):
`VLLM_FAILS` are skipped everywhere (vLLM fails them too); `OURS_XFAIL` are strict xfails against
our server only (they pass on vLLM; remove an entry once the feature lands).
`VLLM_COMPAT_NO_MARKS=1` applies neither, to re-measure. README.md lists every case.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
COMPAT_URL = os.environ.get("VLLM_COMPAT_URL", "").rstrip("/")
START_TIMEOUT_S = 180
# vLLM's fixtures: test_vision.py serves with --limit-mm-per-prompt {"image": 2},
# test_video.py with {"video": 3}; one server here carries both limits.
MAXIMUM_IMAGES = 2
MAXIMUM_VIDEOS = 3
OUR_FLAGS = ["--limit-images", str(MAXIMUM_IMAGES), "--limit-videos", str(MAXIMUM_VIDEOS),
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             "--enable-tokenizer-info-endpoint", "--enable-server-load-tracking",
             "--enable-prompt-tokens-details"]   # as vLLM's fixture


@dataclass
class Server:
    """A running OpenAI-compatible server: vLLM's RemoteOpenAIServer, reduced to what tests use."""

    url: str
    model: str
    max_model_len: int | None
    model_dir: Path

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def get_client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=os.environ.get(
            "VLLM_COMPAT_API_KEY", "EMPTY"), max_retries=0, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(url: str) -> Server:
    """Reads the model id and max_model_len from /v1/models, as vLLM's clients do."""
    data = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    root = Path(str(data.get("root") or ""))
    model_dir = Path(os.environ["VLLM_COMPAT_MODEL_DIR"]) if "VLLM_COMPAT_MODEL_DIR" in os.environ \
        else root if root.is_dir() else _tiny_dir()
    return Server(url, os.environ.get("VLLM_COMPAT_MODEL", data["id"]),
                  data.get("max_model_len"), model_dir)


def _tiny_dir() -> Path:
    from engine.tiny import ensure_tiny

    return ensure_tiny()


def _start_ours(extra: list[str]):
    """Starts `python -m server --model tiny` on a free loopback port; yields its Server."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="vllm-compat-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "server", "--model", str(_tiny_dir()), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), *OUR_FLAGS, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {Path(log.name).read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        yield _describe(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server():
    """The server under test, started once per session (vLLM: one RemoteOpenAIServer a module)."""
    if COMPAT_URL:
        yield _describe(COMPAT_URL)
    else:
        yield from _start_ours([])


@pytest.fixture(scope="session")
def server_full_logprobs():
    """A server with `--max-logprobs -1`, as test_chat_echo.py's fixture starts vLLM."""
    url = os.environ.get("VLLM_COMPAT_URL_FULL_LOGPROBS", "").rstrip("/") or COMPAT_URL
    if url:
        yield _describe(url)
    else:
        yield from _start_ours(["--max-logprobs", "-1"])


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.get_client()


@pytest.fixture(scope="session")
def model_name(server: Server) -> str:
    return server.model


@pytest.fixture(scope="session")
def tokenizer(server: Server):
    """The served folder's tokenizer (vLLM's tests use get_tokenizer(MODEL_NAME))."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model_dir)


@pytest.fixture(scope="session")
def processor(server: Server):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(server.model_dir)


# --- media: vLLM fetches these from its asset bucket; here they are generated, same names,
# formats and modes, sizes as far as known, and sent as data: URIs (no network). ---

def _picture(size: tuple[int, int], mode: str):
    """A picture of a few flat shapes (what the tiny model knows), in the given PIL mode."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.1, h * 0.1, w * 0.4, h * 0.45), fill=(220, 30, 30))
    d.rectangle((w * 0.55, h * 0.15, w * 0.9, h * 0.5), fill=(30, 60, 220))
    d.polygon([(w * 0.3, h * 0.9), (w * 0.5, h * 0.55), (w * 0.7, h * 0.9)], fill=(30, 170, 60))
    if mode == "P":
        return img.convert("L").convert("P")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(size))
    return img


IMAGE_ASSETS = {  # name -> (size, PIL mode, format)
    "2560px-Gfp-wisconsin-madison-the-nature-boardwalk.jpg": ((2560, 1707), "RGB", "JPEG"),
    "Grayscale_8bits_palette_sample_image.png": ((600, 600), "P", "PNG"),
    "1280px-Venn_diagram_rgb.svg.png": ((1280, 1184), "RGB", "PNG"),
    "RGBA_comp.png": ((1000, 1000), "RGBA", "PNG"),
}
TEST_IMAGE_ASSETS = list(IMAGE_ASSETS)


def _data_uri(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_bytes(name: str) -> bytes:
    size, mode, fmt = IMAGE_ASSETS[name]
    buf = io.BytesIO()
    _picture(size, mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_assets() -> dict[str, str]:
    """name -> data: URI in the asset's own format (vLLM: the local asset server's URL)."""
    return {n: _data_uri(image_bytes(n), f"image/{IMAGE_ASSETS[n][2].lower()}")
            for n in TEST_IMAGE_ASSETS}


@pytest.fixture(scope="session")
def url_encoded_image() -> dict[str, str]:
    """vLLM's `encode_image_url(image)`: the decoded picture re-encoded as a PNG data: URI."""
    from PIL import Image

    out = {}
    for n in TEST_IMAGE_ASSETS:
        buf = io.BytesIO()
        Image.open(io.BytesIO(image_bytes(n))).save(buf, format="PNG")
        out[n] = _data_uri(buf.getvalue(), "image/png")
    return out


@pytest.fixture
def image_url(request, image_assets) -> str:
    return image_assets[request.param]


@pytest.fixture
def image_urls(request, image_assets) -> list[str]:
    return [image_assets[n] for n in request.param]


VIDEO_ASSETS = {  # vLLM's three test videos: name -> (size, container, mime)
    "slow_traffic_small.mp4": ((640, 360), "mp4", "video/mp4"),
    "vtest.avi": ((768, 576), "avi", "video/x-msvideo"),
    "Megamind.avi": ((720, 528), "avi", "video/x-msvideo"),
}
TEST_VIDEO_URLS = list(VIDEO_ASSETS)


def video_bytes(name: str, seconds: float = 2.0, fps: int = 8) -> bytes:
    """A short clip of a shape moving across the frame (the originals are real footage)."""
    import av
    import numpy as np

    (w, h), container, _ = VIDEO_ASSETS[name]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((h, w, 3), 235, np.uint8)
            x = int(i * (w - w // 4) / (seconds * fps))
            frame[h // 3: h // 3 + h // 4, x: x + w // 4] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="session")
def video_assets() -> dict[str, str]:
    return {n: _data_uri(video_bytes(n), VIDEO_ASSETS[n][2]) for n in TEST_VIDEO_URLS}


# --- tests/entrypoints/conftest.py's samples ---

@pytest.fixture
def sample_regex() -> str:
    return r"((25[0-5]|(2[0-4]|1\d|[1-9]|)\d)\.){3}(25[0-5]|(2[0-4]|1\d|[1-9]|)\d)"


@pytest.fixture
def sample_json_schema() -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 10},
                       "minItems": 3},
            "work_history": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"company": {"type": "string"}, "duration": {"type": "number"},
                                   "position": {"type": "string"}},
                    "required": ["company", "position"],
                },
            },
        },
        "required": ["name", "age", "skills", "work_history"],
    }


@pytest.fixture
def sample_structured_outputs_choices() -> list[str]:
    return ["Python", "Java", "JavaScript", "C++", "C#", "PHP", "TypeScript", "Ruby", "Swift",
            "Kotlin"]


_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
          "boolean": bool}


def validate_json_schema(instance, schema: dict) -> None:
    """The subset of jsonschema.validate the samples need (jsonschema is not installed here)."""
    kind = schema.get("type")
    if kind:
        assert isinstance(instance, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(instance, bool)), (instance, kind)
    if "enum" in schema:
        assert instance in schema["enum"], instance
    if kind == "object":
        for key in schema.get("required", []):
            assert key in instance, f"missing {key!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in instance and "$ref" not in sub:
                validate_json_schema(instance[key], sub)
    if kind == "array":
        assert len(instance) >= schema.get("minItems", 0)
        for item in instance:
            validate_json_schema(item, schema.get("items", {}))
    if kind == "string" and "maxLength" in schema:
        assert len(instance) <= schema["maxLength"]


# --- how each case fares; keys are node ids relative to this folder ---

VLLM_FAILS: dict[str, str] = {
    'test_chat.py::test_chat_completion_n_parameter_non_streaming':
        'the tiny model gives the same answer 3 times at temperature 0.7',
    'test_chat.py::test_more_than_one_prompt_logprobs_chat':
        "the prompt token at position 3 is not the tiny model's top-1, so vLLM returns it besides the top 1 (2 entries)",
    'test_chat.py::test_response_format_json_object':
        "the tiny model's JSON never closes within max_tokens",
    'test_chat.py::test_response_format_json_schema':
        "the tiny model's JSON never closes within max_tokens",
    'test_chat.py::test_structured_outputs_choice_chat':
        'the tiny model picks the same language twice',
    'test_chat.py::test_structured_outputs_json_chat':
        'xgrammar lets the tiny model write whitespace until max_tokens; the JSON never closes',
    'test_completion.py::test_parallel_no_streaming':
        'all 3 samples run to the same length',
    'test_completion.py::test_parallel_streaming':
        'all 3 samples run to the same length',
    'test_completion_with_function_calling.py::test_function_tool_use[False-auto-False]':
        'the tiny model answers in text, calls no tool',
    'test_completion_with_function_calling.py::test_function_tool_use[False-auto-True]':
        'the tiny model answers in text, calls no tool',
    'test_completion_with_function_calling.py::test_function_tool_use[True-auto-False]':
        'no reasoning parser for Qwen2.5-VL, so no `reasoning`',
    'test_completion_with_function_calling.py::test_function_tool_use[True-auto-True]':
        'no reasoning parser for Qwen2.5-VL, so no `reasoning`',
    'test_completion_with_function_calling.py::test_function_tool_use[True-required-False]':
        'no reasoning parser for Qwen2.5-VL, so no `reasoning`',
    'test_completion_with_function_calling.py::test_function_tool_use[True-required-True]':
        'no reasoning parser for Qwen2.5-VL, so no `reasoning`',
    'test_completion_with_function_calling.py::test_function_tool_use[True-tool_choice2-False]':
        'no reasoning parser for Qwen2.5-VL, so no `reasoning`',
    'test_completion_with_function_calling.py::test_function_tool_use[True-tool_choice2-True]':
        'no reasoning parser for Qwen2.5-VL, so no `reasoning`',
    'test_completion_with_function_calling.py::test_named_tool_use':
        "vLLM's forced call holds a JSON string, not the schema's object",
    'test_video.py::test_request_media_io_kwargs_override_uses_fewer_video_frames[slow_traffic_small.mp4]':
        'per-request media_io_kwargs need --trust-request-mm-kwargs (400)',
}
OURS_XFAIL: dict[str, str] = {
    'test_completion_with_function_calling.py::test_max_tokens_with_tool_choice_required[required]':
        'max_tokens below a forced call\'s shortest answer is a 400, not a cut call',
    'test_completion_with_function_calling.py::test_max_tokens_with_tool_choice_required[tool_choice1]':
        'max_tokens below a forced call\'s shortest answer is a 400, not a cut call',
}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VLLM_COMPAT_NO_MARKS"):
        return
    here = Path(__file__).parent
    for item in items:
        if here not in Path(item.path).parents:   # this hook sees the whole session's tests
            continue
        key = str(Path(item.path).relative_to(here)) + "::" + item.name
        if key in VLLM_FAILS:
            item.add_marker(pytest.mark.skip(reason=f"fails on vLLM 0.32 too: {VLLM_FAILS[key]}"))
        elif key in OURS_XFAIL and not COMPAT_URL:
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"issue 32: {OURS_XFAIL[key]}"))
