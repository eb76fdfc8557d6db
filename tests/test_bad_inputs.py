"""One table of bad (and odd but valid) inputs, run through all three front
ends: the CLI (`python -m engine`, in-process), the UI's chat handler and the
HTTP API. Each case gets its clear error (CLI exit code 2 with one `error:`
line, a message in the chat, an API 400 in vLLM's shape) or, where valid, an
answer; after every case the next good request is served.

The network is stubbed: a fake resolver answers for the URL cases, so nothing
leaves the machine even if the address guard were broken."""

from __future__ import annotations

import asyncio
import base64
import io
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from engine.inputs import media
from engine.config import EngineConfig
from engine.backends.local import LocalEngine
from server.background import BackgroundServer
from server.routes import create_api_app
from server.settings import ServerSettings

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_MODEL_LEN = 2048


# --------------------------------------------------------------------------- the files
def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


PNG = (ASSETS / "shapes.png").read_bytes()
JPEG = (ASSETS / "street_sign.jpg").read_bytes()
FILES: dict[str, bytes] = {
    "truncated.png": PNG[: len(PNG) // 2],
    "corrupt.png": PNG[:16] + b"\x00garbage" * 200,
    "truncated.jpg": JPEG[: len(JPEG) // 3],
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + b"nonsense" * 300,
    "notes.png": b"These are my meeting notes, not a picture.\n" * 5,
    "empty.png": b"",
    "bomb.png": _save(Image.new("1", (20000, 20000)), "PNG"),
    "vector.png": b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
    "tiny1x1.png": _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
    "animated.gif": _gif(),
    "cmyk.jpg": _save(Image.new("CMYK", (96, 64), (0, 128, 255, 0)), "JPEG"),
    "deep16.png": _save(Image.new("I;16", (96, 64), 50000), "PNG"),
    "alpha.png": _save(Image.new("RGBA", (96, 64), (10, 200, 10, 90)), "PNG"),
    "fake.mp4": b"definitely not an mp4 container" * 10,
}
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif", ".mp4": "video/mp4"}


@dataclass
class Case:
    name: str
    text: str = "What is in this picture?"
    files: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)   # image URLs as typed (CLI, API)
    sampling: dict = field(default_factory=dict)
    error: str | None = None                          # None: a valid input, answered
    channels: tuple[str, ...] = ("cli", "ui", "api")


CASES = [
    Case("truncated PNG", files=["truncated.png"], error="truncated or corrupt"),
    Case("corrupt PNG", files=["corrupt.png"], error="readable image|truncated or corrupt"),
    Case("truncated JPEG", files=["truncated.jpg"], error="truncated or corrupt"),
    Case("corrupt JPEG", files=["corrupt.jpg"], error="readable image|truncated or corrupt"),
    Case("text file renamed .png", files=["notes.png"], error="is not a readable image"),
    Case("0-byte file", files=["empty.png"], error="is not a readable image"),
    Case("20000x20000 decompression bomb", files=["bomb.png"], error="is too large"),
    Case("SVG", files=["vector.png"], error="is not a readable image"),
    Case("a video that is not one", files=["fake.mp4"], error="is not a readable video"),
    Case("11 images", files=["tiny1x1.png"] * 11, error=r"At most 10 image\(s\)"),
    Case("over-long prompt", text="hello " * 3000,
         error=f"maximum context length is {MAX_MODEL_LEN} tokens"),
    Case("whitespace-only message", text="   \n\t ", error="The message is empty"),
    Case("temperature -1", sampling={"temperature": -1.0}, error="temperature must be non-negative"),
    Case("top_p 2", sampling={"top_p": 2.0}, error=r"top_p must be in \(0, 1\]"),
    Case("max_tokens 0", sampling={"max_tokens": 0}, error="max_tokens must be at least 1"),
    Case("max_tokens 10**9", sampling={"max_tokens": 10**9},
         error=f"cannot be greater than max_model_len={MAX_MODEL_LEN}"),
    Case("data URI with broken base64", urls=["data:image/png;base64,iVBOR%%%w0KGgo"],
         error="Invalid base64", channels=("cli", "api")),
    Case("private address URL", urls=["http://intranet.test/cam.png"],
         error="Refusing to fetch", channels=("cli", "api")),
    Case("link-local metadata URL", urls=["http://169.254.169.254/latest/meta-data/"],
         error="Refusing to fetch", channels=("cli", "api")),
    Case("file:///etc/passwd", urls=["file:///etc/passwd"],
         error="not allowed", channels=("api",)),
    # odd but valid: answered
    Case("1x1 image", files=["tiny1x1.png"]),
    Case("animated GIF", files=["animated.gif"]),
    Case("CMYK JPEG", files=["cmyk.jpg"]),
    Case("16-bit PNG", files=["deep16.png"]),
    Case("alpha PNG", files=["alpha.png"]),
    Case("unicode, emoji and right-to-left text", text="Ça va? 你好 👋🏽 مرحبا بالعالم שלום"),
]
IDS = [c.name for c in CASES]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = LocalEngine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu",
                                               warmup=False, max_model_len=MAX_MODEL_LEN))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-inputs")
    for name, raw in FILES.items():
        (folder / name).write_bytes(raw)
    return folder


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch):
    """intranet.test is a private host; nothing is ever resolved for real."""
    def resolve(host, port):
        table = {"intranet.test": ["10.20.30.40"]}
        if host in table:
            return table[host]
        import ipaddress
        return [str(ipaddress.ip_address(host))]
    monkeypatch.setattr(media, "resolve_host", resolve)


@pytest.fixture(scope="module")
def api(engine):
    with BackgroundServer(create_api_app(engine, ServerSettings())) as srv:
        yield srv.url


def sampling_args(case: Case) -> dict:
    return {"max_tokens": 6, **case.sampling}


# --------------------------------------------------------------------------- the CLI
class SharedEngine:
    """The module's engine, lent to the CLI's main() without letting it close it."""

    def __init__(self, engine: LocalEngine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


def run_cli(engine, monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    from engine.__main__ import main

    monkeypatch.setattr(LocalEngine, "from_config", classmethod(lambda cls, cfg: SharedEngine(engine)))
    code = main(argv + ["--max-model-len", str(MAX_MODEL_LEN)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli(case, engine, files, monkeypatch, capsys):
    if "cli" not in case.channels:
        pytest.skip("not a CLI input")
    argv = ["--prompt", case.text]
    for name in case.files:
        argv += ["--video" if name.endswith(".mp4") else "--image", str(files / name)]
    for url in case.urls:
        argv += ["--image", url]
    for key, value in sampling_args(case).items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    code, out, err = run_cli(engine, monkeypatch, capsys, argv)
    if case.error:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        import re
        assert re.search(case.error, lines[0]), lines[0]
    else:
        assert code == 0, err
        assert "Processed prompts: 1/1" in out
    code, out, _ = run_cli(engine, monkeypatch, capsys,
                           ["--image", str(ASSETS / "chart.png"), "--prompt", "And this?",
                            "--max-tokens", "4"])
    assert code == 0 and "Processed prompts: 1/1" in out


# --------------------------------------------------------------------------- the UI
def ui_turn(ctrl, state, text, paths, sampling):
    from ui.chat import Sampling

    class Req:
        session_hash = "bad-inputs"

    state, _, accepted = ctrl.add_user_turn(state, {"text": text, "files": paths}, None, Req())
    if not accepted:
        return state, None, accepted

    async def drain():
        return [step async for step in ctrl.respond(state, Sampling(**sampling), Req())]

    final_state, shown = asyncio.run(drain())[-1]
    return final_state, shown, accepted


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ui(case, engine, files):
    if "ui" not in case.channels:
        pytest.skip("the page takes files, not URLs")
    import re

    from ui import history
    from ui.chat import ChatController, RefusedFiles

    ctrl = ChatController(engine, (files.resolve(), ASSETS.resolve()))
    sampling = {"temperature": 0.0, **sampling_args(case)}
    state = history.new_state()
    try:
        state, shown, accepted = ui_turn(ctrl, state, case.text,
                                         [str(files / n) for n in case.files], sampling)
    except RefusedFiles as refused:   # a file the engine would refuse never leaves the box
        assert case.error and re.search(case.error, refused.message), refused.message
        assert refused.box == {"text": case.text, "files": []} and state["turns"] == []
    else:
        check_ui_answer(case, state, shown, accepted)
    state, _, accepted = ui_turn(ctrl, state, "And this one?", [str(ASSETS / "chart.png")],
                                 {"temperature": 0.0, "max_tokens": 4})
    assert accepted and state["turns"][-1]["finish"] in ("stop", "length")


def check_ui_answer(case, state, shown, accepted):
    if case.error and case.name == "whitespace-only message":
        assert not accepted       # the page warns and keeps the box; nothing is sent
    elif case.error:
        import re
        last = state["turns"][-1]
        assert last["role"] == "assistant" and last["finish"] == "error", last
        assert re.search(case.error, last["error"]), last["error"]
        shown_text = "\n".join(m["content"] for m in shown if isinstance(m["content"], str))
        assert re.search(case.error, shown_text)
        # the user's message and files stay, ready for Retry
        user = state["turns"][-2]
        assert user["text"] == case.text and len(user["files"]) == len(case.files)
    else:
        assert state["turns"][-1]["finish"] in ("stop", "length"), state["turns"][-1]


# --------------------------------------------------------------------------- the API
def data_uri(name: str, raw: bytes) -> str:
    mime = MIME.get(Path(name).suffix, mimetypes.guess_type(name)[0] or "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def api_body(case: Case, files: Path) -> dict:
    parts = []
    for name in case.files:
        kind = "video_url" if name.endswith(".mp4") else "image_url"
        parts.append({"type": kind, kind: {"url": data_uri(name, (files / name).read_bytes())}})
    for url in case.urls:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": case.text})
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}],
            "temperature": 0, **sampling_args(case)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_api(case, api, files):
    import re
    with httpx.Client(base_url=api, timeout=60) as client:
        resp = client.post("/v1/chat/completions", json=api_body(case, files))
        if case.error:
            body = resp.json()
            assert resp.status_code == 400, body
            err = body["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
            assert re.search(case.error, err["message"]), err["message"]
        else:
            assert resp.status_code == 200, resp.text
            assert resp.json()["object"] == "chat.completion"
        ok = client.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 4,
            "messages": [{"role": "user", "content": "And now a good question?"}]})
        assert ok.status_code == 200


@pytest.mark.parametrize("raw,message", [
    (b'{"model": "tiny", "messages": [', "JSON"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "audio_url", '
     b'"audio_url": {"url": "x"}}]}]}', "unsupported type 'audio_url'"),
])
def test_api_only_malformed_bodies(api, raw, message):
    with httpx.Client(base_url=api, timeout=30) as client:
        resp = client.post("/v1/chat/completions", content=raw,
                           headers={"content-type": "application/json"})
        assert resp.status_code == 400 and message in resp.json()["error"]["message"]


# --------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault,message", [
    (RuntimeError("injected kernel failure"), "Generation failed: RuntimeError: injected kernel failure"),
    (__import__("torch").OutOfMemoryError("NPU out of memory. Tried to allocate 2.00 GiB"),
     "The device ran out of memory"),
])
def test_fault_inside_a_model_step_reaches_the_ui_and_the_next_turn_works(engine, files, monkeypatch,
                                                                      fault, message):
    """An exception or a device OOM inside a model step: a clear message in the chat, the
    device cache emptied, the conversation kept, and the next turn answered."""
    from ui import history
    from ui.chat import ChatController

    emptied = []
    monkeypatch.setattr(engine.device, "empty_cache", lambda: emptied.append(1))
    ctrl = ChatController(engine, (files.resolve(), ASSETS.resolve()))
    state = history.new_state("Be brief.")
    state, _, _ = ui_turn(ctrl, state, "First question", [str(ASSETS / "chart.png")],
                          {"temperature": 0.0, "max_tokens": 4})
    assert state["turns"][-1]["finish"] in ("stop", "length")

    model = engine.loaded.model.model.language_model     # what every step runs
    real = model.forward

    def failing(*args, **kwargs):
        raise fault

    monkeypatch.setattr(model, "forward", failing)
    state, shown, _ = ui_turn(ctrl, state, "Second question", [], {"temperature": 0.0,
                                                                   "max_tokens": 4})
    assert state["turns"][-1]["finish"] == "error" and message in state["turns"][-1]["error"]
    assert any(message in m["content"] for m in shown if isinstance(m["content"], str))
    assert emptied == [1]
    assert [t["text"] for t in state["turns"] if t["role"] == "user"] == ["First question",
                                                                          "Second question"]
    monkeypatch.setattr(model, "forward", real)
    state, _, _ = ui_turn(ctrl, state, "Third question", [], {"temperature": 0.0, "max_tokens": 4})
    assert state["turns"][-1]["finish"] in ("stop", "length")
    assert len(state["turns"]) == 6
