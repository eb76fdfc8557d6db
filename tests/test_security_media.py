"""Issue 30, media inputs: a document or a video the user sends is sized before it is
decoded. One table per finding of the probe, each case failing on the code before the fix:

- PDF pages rendered at 144 dpi with no bound (a 7000 pt page: a 14000x14000 picture,
  +1.5 GB), and the token meter sizing every page a document claims (a million);
- videos keeping every sampled frame at full size (1080p, 150 frames: +1.2 GB), `fps` not
  checked, frame size not checked against the picture limit, no bound on decoding.

Allowed inputs still give what they gave: an A4 page at 144 dpi, a video's frames (and the
processor's tensor) as the old code gave them. Inputs are made here: PDFs with pypdfium2 or
by hand, clips with PyAV. Memory is the peak (VmHWM, reset before each case) over VmRSS."""

from __future__ import annotations

import base64
import io
import math
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.config import DEFAULT_MAX_PIXELS_LIMIT, EngineConfig
from engine.errors import InvalidRequestError
from engine.inputs.documents import page_sizes, render_pages
from engine.inputs.prompt import read_video_frames
from engine.inputs.stage import InputStage, VideoSampling
from engine.types import Conversation, GenerationRequest, Message, SamplingParams, VideoInput
from bench.hostile import pdf_by_hand
from support import measured

MAX_GROWTH_MB = 300


def measured_or_error(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    return measured(fn, catch=True)
REFUSAL_S = 1.0


# --------------------------------------------------------------------------- measuring




def refused(result: Any, took: float, grew: float, words: str, param: str) -> str:
    """The checks every refusal passes: one line naming the limit, at once, no memory."""
    assert isinstance(result, InvalidRequestError), f"not refused: {result!r}"[:300]
    message = str(result)
    assert words in message and "\n" not in message, message
    assert result.param == param, (result.param, message)
    assert took < REFUSAL_S, f"{took:.2f} s to refuse: {message}"
    assert grew < MAX_GROWTH_MB, f"memory grew by {grew:.0f} MB to refuse"
    return message


# --------------------------------------------------------------------------- PDFs
def pdf_of_pages(path: Path, sizes: list[tuple[float, float]]) -> Path:
    """A PDF of blank pages of these sizes in points (a few hundred bytes each)."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    for w, h in sizes:
        pdf.new_page(w, h)
    buf = io.BytesIO()
    pdf.save(buf)
    pdf.close()
    path.write_bytes(buf.getvalue())
    return path




def million_page_pdf(path: Path) -> Path:
    """One page, reached through six levels of page-tree nodes that each name their child
    ten times: a 1 KB file whose every one of 1,000,000 pages PDFium can size."""
    objects = [b"<< /Type /Catalog /Pages 8 0 R >>",
               b"<< /Type /Page /MediaBox [0 0 612 792] >>"]
    for level in range(1, 7):       # objects 3..8; object level+1 is the level below
        kids = b" ".join([b"%d 0 R" % (level + 1)] * 10)
        objects.append(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, 10 ** level))
    path.write_bytes(pdf_by_hand(objects))
    return path


def lying_pdf(path: Path) -> Path:
    """A page tree that claims 1,000,000 pages and holds one."""
    path.write_bytes(pdf_by_hand([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1000000 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"]))
    return path


@pytest.mark.parametrize("points", [7000, 10000, 20000, 200000])
def test_a_huge_pdf_page_renders_within_the_picture_limit(tmp_path, points):
    """Before: 14000x14000 (+1.5 GB) for 7000 pt, a MemoryError for 200000 pt."""
    pdf = pdf_of_pages(tmp_path / "huge.pdf", [(points, points)])
    assert pdf.stat().st_size < 1000
    pages, took, grew = measured_or_error(lambda: list(render_pages(pdf, 10,
                                                           max_pixels=DEFAULT_MAX_PIXELS_LIMIT)))
    assert not isinstance(pages, Exception), pages
    (page,) = pages
    assert page.width * page.height <= DEFAULT_MAX_PIXELS_LIMIT and page.width == page.height
    assert page.width >= math.isqrt(DEFAULT_MAX_PIXELS_LIMIT) - 2     # the dpi that fits
    assert took < REFUSAL_S, f"{took:.2f} s to render"
    assert grew < MAX_GROWTH_MB, f"memory grew by {grew:.0f} MB"
    sized = page_sizes(pdf, 10, max_pixels=DEFAULT_MAX_PIXELS_LIMIT)
    assert sized.count == 1 and sized.sizes == [page.size]


PAGE_REFUSALS = [   # (name, page sizes in pt, words in the one line)
    ("aspect ratio 400", [(20000, 50)], "Page 1 of bad.pdf is 20000x50 pt: the aspect ratio"),
    ("second page too thin", [(612, 792), (100, 40000)], "Page 2 of bad.pdf"),
]


@pytest.mark.parametrize("name,sizes,words", PAGE_REFUSALS, ids=[c[0] for c in PAGE_REFUSALS])
def test_a_page_no_scale_fits_is_one_line_before_anything_renders(tmp_path, name, sizes, words):
    pdf = pdf_of_pages(tmp_path / "bad.pdf", sizes)
    rendered: list[Image.Image] = []

    def run() -> None:
        for page in render_pages(pdf, 10, max_pixels=DEFAULT_MAX_PIXELS_LIMIT):
            rendered.append(page)
    message = refused(*measured_or_error(run), words, "file")
    assert "200" in message and rendered == []       # the limit named, nothing rendered


def test_an_a4_page_renders_at_144_dpi_as_before(tmp_path):
    """A page within the budget: the same call as before (scale 2), the same pixels."""
    import pypdfium2 as pdfium

    art = Image.new("RGB", (595, 842), "white")
    draw = ImageDraw.Draw(art)
    draw.rectangle((60, 80, 400, 300), fill=(200, 30, 30))
    draw.ellipse((100, 400, 500, 800), outline=(0, 0, 200), width=9)
    path = tmp_path / "a4.pdf"
    art.save(path, "PDF", resolution=72)            # 595x842 pt
    (page,) = list(render_pages(path, 10, max_pixels=DEFAULT_MAX_PIXELS_LIMIT))
    doc = pdfium.PdfDocument(str(path))
    try:
        before = doc[0].render(scale=144 / 72).to_pil().convert("RGB")    # the old code
    finally:
        doc.close()
    assert page.size == before.size == (1190, 1684)
    assert page.tobytes() == before.tobytes()
    assert page_sizes(path, 10, max_pixels=DEFAULT_MAX_PIXELS_LIMIT).sizes == [(1190, 1684)]


METER_CASES = [   # (name, make the PDF, words in the meter's line)
    ("a million real pages", million_page_pdf, "1,000,000 pages, the first 10 counted"),
    ("a million claimed, one held", lying_pdf, "not readable"),
]


@pytest.mark.parametrize("name,make,words", METER_CASES, ids=[c[0] for c in METER_CASES])
def test_the_meter_sizes_only_the_pages_that_can_fit(tmp_path, name, make, words):
    """Before: every claimed page sized (1.7 s and +140 MB), or PdfiumError (a 500)."""
    from ui import history, meter

    pdf = make(tmp_path / "many.pdf")
    result, took, grew = measured_or_error(lambda: meter.describe(
        meter.measure(history.new_state(), "", [str(pdf)], 224 * 224, 1280 * 28 * 28,
                      limit_images=10, max_pixels_limit=DEFAULT_MAX_PIXELS_LIMIT),
        16384, 10, 512))
    assert isinstance(result, str), result
    assert words in result, result
    if "counted" in words:
        assert "Will not fit" in result and "1000000 pictures" in result
    assert took < REFUSAL_S and grew < MAX_GROWTH_MB, (took, grew)


def test_rendering_a_document_that_claims_a_million_pages_is_refused_at_once(tmp_path):
    pdf = million_page_pdf(tmp_path / "many.pdf")
    refused(*measured_or_error(lambda: list(render_pages(pdf, 10,
                                                max_pixels=DEFAULT_MAX_PIXELS_LIMIT))),
            "has 1000000 pages, but only 10 more", "file")


# --------------------------------------------------------------------------- videos
def write_clip(path: Path, width: int, height: int, frames: int, rate: int,
               moving: bool = False) -> Path:
    """An H.264 clip of a flat colour (a few KB even at 1080p), or of a colour that changes
    every frame (`moving`, so each sampled frame is told apart)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        flat = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8),
                                          format="rgb24").reformat(format="yuv420p")
        for i in range(frames):
            frame = flat
            if moving:
                pixels = np.zeros((height, width, 3), np.uint8)
                pixels[:, : width * (i + 1) // frames] = ((i * 37) % 256, (i * 11) % 256, 128)
                pixels[height // 3:, :, 2] = (i * 53) % 256
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_request(source: str, fps: float | None = None) -> GenerationRequest:
    return GenerationRequest(
        Conversation([Message("user", "What happens?", videos=[VideoInput(source, fps=fps)])]),
        SamplingParams(max_tokens=1, temperature=0))


VIDEO_CASES = [   # (name, width, height, frames, rate, fps); before: peak growth
    ("1080p, 150 frames at 2 fps", 1920, 1080, 150, 2, None),     # +1256 MB
    ("1080p, 300 frames at 2 fps", 1920, 1080, 300, 2, None),     # +2444 MB
    ("11 minutes of 360p at 2 fps", 640, 360, 11 * 60 * 2, 2, None),   # +1210 MB
    ("1080p, 150 frames at 30 fps, fps=30", 1920, 1080, 150, 30, 30.0),   # +1270 MB
]


@pytest.fixture(scope="module")
def warm_engine(tiny_engine, tmp_path_factory):
    """The engine after one small video: imports and the processor's first buffers are not
    what a case measures (the processor's own work on 32 fitted frames is, about 200 MB)."""
    clip = write_clip(tmp_path_factory.mktemp("warm") / "clip.mp4", 128, 96, 12, 6)
    tiny_engine.render(video_request(str(clip)))
    return tiny_engine


@pytest.mark.parametrize("name,width,height,frames,rate,fps", VIDEO_CASES,
                         ids=[c[0] for c in VIDEO_CASES])
def test_a_video_keeps_only_its_sampled_frames_fitted(warm_engine, tmp_path, name, width,
                                                      height, frames, rate, fps):
    clip = write_clip(tmp_path / "clip.mp4", width, height, frames, rate)
    assert clip.stat().st_size < 100_000
    prepared, took, grew = measured_or_error(lambda: warm_engine.render(
        video_request(str(clip), fps)))
    assert not isinstance(prepared, Exception), prepared
    assert prepared.videos == 1
    assert grew < MAX_GROWTH_MB, f"{name}: memory grew by {grew:.0f} MB ({took:.2f} s)"


def old_read_video_frames(path: str, fps: float, max_frames: int) -> list[Image.Image]:
    """engine/prompt.py's read_video_frames before issue 30, as it was."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 25)
        step = max(1, round(rate / fps))
        frames = [f.to_image() for i, f in enumerate(container.decode(stream)) if i % step == 0]
    if len(frames) > max_frames:
        idx = [round(i * (len(frames) - 1) / (max_frames - 1)) for i in range(max_frames)]
        frames = [frames[i] for i in idx]
    return frames


SAME_CASES = [   # (name, width, height, frames, rate, fps, min_pixels, max_pixels)
    ("within the bound, subsampled to 32", 128, 96, 100, 6, 2.0, 128 * 784, 360 * 420),
    ("within the bound, every frame", 320, 240, 9, 2, 2.0, 128 * 784, 360 * 420),
    ("1080p over the bound", 1920, 1080, 24, 12, 2.0, 128 * 784, 360 * 420),
    ("720p over the bound, larger frames", 1280, 720, 12, 4, 2.0, 4 * 784, 768 * 784),
    ("portrait over the bound", 480, 1280, 8, 2, 2.0, 128 * 784, 360 * 420),
]


@pytest.mark.parametrize("name,width,height,frames,rate,fps,lo,hi", SAME_CASES,
                         ids=[c[0] for c in SAME_CASES])
def test_the_model_sees_the_same_frames_as_before(tmp_path, name, width, height, frames,
                                                 rate, fps, lo, hi):
    """Frames within the bound are the old code's, pixel for pixel; larger ones are resized
    once, as qwen_vl_utils' fetch_image would, and its tensor is the same."""
    from qwen_vl_utils import process_vision_info

    clip = str(write_clip(tmp_path / "clip.mp4", width, height, frames, rate, moving=True))
    old = old_read_video_frames(clip, fps, 32)
    new = read_video_frames(clip, fps, VideoSampling(max_frames=32), lo, hi)
    assert len(new) == len(old)
    if width * height <= hi:
        assert [f.tobytes() for f in new] == [f.tobytes() for f in old]
    else:
        assert all(f.width * f.height <= hi for f in new)

    def tensor(frames: list[Image.Image]):
        messages = [{"role": "user", "content": [{"type": "video", "video": frames,
                                                  "min_pixels": lo, "max_pixels": hi,
                                                  "sample_fps": fps}]}]
        return process_vision_info(messages)[1][0]
    before, after = tensor(old), tensor(new)
    assert before.shape == after.shape and bool((before == after).all())


@pytest.mark.parametrize("step", [1, 2, 3, 15])
@pytest.mark.parametrize("max_frames", [2, 4, 32])
def test_the_frames_chosen_before_decoding_are_the_ones_the_old_code_kept(step, max_frames):
    """frame_plan (from the packet count) against the old choice (from all decoded frames)."""
    from engine.inputs.prompt import frame_plan

    for total in [0, 1, 2, 5, 31, 32, 33, 64, 100, 1000, 4321]:
        sampled = [i for i in range(total) if i % step == 0]
        if len(sampled) > max_frames:
            idx = [round(i * (len(sampled) - 1) / (max_frames - 1)) for i in range(max_frames)]
            sampled = [sampled[i] for i in idx]
        assert frame_plan(total, step, max_frames) == sampled, (total, step, max_frames)


@pytest.mark.parametrize("off_by", [-5, 7])
def test_a_packet_count_that_is_not_the_frame_count_still_gives_the_same_frames(
        tmp_path, monkeypatch, off_by):
    """Where packets are not one frame each, the plan is made again on the decoded count."""
    from engine.inputs import prompt

    clip = str(write_clip(tmp_path / "clip.mp4", 160, 120, 70, 6, moving=True))
    count = prompt.count_frames
    monkeypatch.setattr(prompt, "count_frames",
                        lambda *a: (count(*a)[0] + off_by, count(*a)[1]))
    new = prompt.read_video_frames(clip, 2.0, VideoSampling(max_frames=8), 128 * 784,
                                   360 * 420)
    assert [f.tobytes() for f in new] == [f.tobytes() for f in old_read_video_frames(clip, 2.0, 8)]


def test_a_video_frame_over_the_picture_limit_is_refused_before_decoding(tmp_path):
    """Before: frames were never held to the picture limit (--max-image-pixels)."""
    clip = write_clip(tmp_path / "wide.mp4", 1920, 1080, 4, 2)
    stage = InputStage(EngineConfig(max_image_pixels=1_000_000))
    refused(*measured_or_error(lambda: stage.load(video_request(str(clip)), None, 16384)),
            "has 1920x1080 frames: at most 1,000,000 pixels per frame", "video")
    thin = write_clip(tmp_path / "thin.mp4", 2048, 8, 2, 2)
    refused(*measured_or_error(lambda: InputStage(EngineConfig()).load(video_request(str(thin)), None,
                                                              16384)),
            "aspect ratio must be at most 200", "video")


def test_frames_too_narrow_to_resize_are_one_line(tiny_engine, tmp_path):
    """4096x40 frames round to no height at 151,200 pixels; before, a resize error."""
    clip = write_clip(tmp_path / "narrow.mp4", 4096, 40, 4, 2)
    refused(*measured_or_error(lambda: tiny_engine.render(video_request(str(clip)))),
            "4096x40 frames are too narrow to fit 151,200 pixels per frame", "video")


def test_decoding_a_very_long_video_stops_at_the_pixel_budget(tiny_engine, tmp_path):
    """50,000 tiny frames (each counted as 640x360): refused from the packet count, before
    anything is decoded; before, every frame was decoded."""
    clip = write_clip(tmp_path / "long.mp4", 16, 16, 50_000, 30)
    refused(*measured_or_error(lambda: tiny_engine.render(video_request(str(clip)))),
            "see --video-max-decoded-pixels", "video")


FPS_CASES = [-5, 0, 1000, float("nan")]


@pytest.fixture(scope="module")
def api(tiny_engine):
    from server.background import BackgroundServer
    from server.routes import create_api_app
    from server.settings import ServerSettings

    with BackgroundServer(create_api_app(tiny_engine, ServerSettings())) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def clip_uri(tmp_path_factory) -> str:
    clip = write_clip(tmp_path_factory.mktemp("fps") / "clip.mp4", 128, 96, 12, 6)
    return "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()


@pytest.mark.parametrize("fps", FPS_CASES, ids=str)
def test_fps_out_of_range_is_refused_before_any_work(tiny_engine, clip_uri, fps):
    """Before: -5 and 1000 were taken as they were, 0 silently as the default."""
    message = refused(*measured_or_error(lambda: tiny_engine.submit(video_request(clip_uri, fps))),
                      "fps must be greater than 0 and at most 30", "fps")
    assert "--video-max-fps" in message


@pytest.mark.parametrize("fps", [-5, 0, 1000], ids=str)
def test_the_api_refuses_fps_out_of_range_with_a_400_and_takes_it_in_range(api, clip_uri, fps):
    def body(value: float) -> dict:
        return {"model": "tiny", "max_tokens": 1, "mm_processor_kwargs": {"fps": value},
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": clip_uri}},
                    {"type": "text", "text": "What happens?"}]}]}
    start = time.monotonic()
    resp = httpx.post(f"{api}/v1/chat/completions", json=body(fps), timeout=30)
    assert resp.status_code == 400, resp.text[:300]
    assert "fps must be greater than 0" in resp.json()["error"]["message"]
    assert time.monotonic() - start < REFUSAL_S
    resp = httpx.post(f"{api}/v1/chat/completions", json=body(2.0), timeout=60)
    assert resp.status_code == 200, resp.text[:300]


def test_the_video_limits_are_flags():
    import argparse

    from engine.config import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cfg = EngineConfig.from_namespace(parser.parse_args(
        ["--video-max-fps", "12", "--video-max-decoded-pixels", "5000000000"]))
    assert cfg.video_max_fps == 12 and cfg.video_max_decoded_pixels == 5_000_000_000
    sampling = InputStage(cfg).video
    assert sampling.max_fps == 12 and sampling.max_decoded_pixels == 5_000_000_000
