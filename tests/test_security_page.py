"""Issue 30, the page's own work: the feedback file writes what the server sent (never what
the browser's kept chat claims), bounded per line and per hour; a PDF is rendered off the
event loop, one document at a time; an answer's boxes are parsed and drawn off it."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from engine.errors import EngineBusyError
from ui import display
from ui.chat import ChatController, Sampling
from ui.feedback import LINES_PER_HOUR, MAX_ANSWER_CHARS, FeedbackLog

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FAST = Sampling(max_tokens=8, temperature=0.0)


class Req:
    def __init__(self, session: str = "s1") -> None:
        self.session_hash = session


@pytest.fixture()
def uploads(tmp_path):
    shutil.copy(ASSETS / "shapes.png", tmp_path / "shapes.png")
    return tmp_path


def drain(agen_factory):
    async def go():
        return [item async for item in agen_factory()]
    return asyncio.run(go())


def answered(ctrl: ChatController, text: str) -> dict:
    """A chat the server answered once, as the browser keeps it."""
    state, _, ok = ctrl.add_user_turn(None, {"text": text, "files": []}, None, Req())
    assert ok
    final, _ = drain(lambda: ctrl.respond(state, FAST, Req()))[-1]
    return final


def answer_index(state: dict) -> int:
    return next(i for i, m in enumerate(display.render(state)) if m["role"] == "assistant")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- feedback
FORGERIES = {   # what a browser may send back instead of the chat the server answered
    "answer text replaced": lambda st: st["turns"][-1].update(text="FORGED answer " * 10),
    "question replaced": lambda st: st["turns"][0].update(text="FORGED question"),
    "unknown answer id": lambda st: st["turns"][-1].update(id="0" * 32),
    "answer id removed": lambda st: st["turns"][-1].pop("id", None),
    "whole exchange invented": lambda st: st.update(turns=[
        {"role": "user", "text": "FORGED question", "files": []},
        {"role": "assistant", "text": "FORGED answer", "finish": "stop"}]),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_the_feedback_file_writes_what_the_server_sent(tiny_engine, uploads, tmp_path, forgery):
    feedback = tmp_path / "feedback.jsonl"
    notes: list[str] = []
    ctrl = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()),
                          feedback_file=feedback, warn=notes.append)
    state = answered(ctrl, "How many shapes?")
    sent = state["turns"][-1]["text"]
    FORGERIES[forgery](state)
    ctrl.rate(state, answer_index(state), True, Req())
    written = lines(feedback)
    assert "FORGED" not in feedback.read_text() if feedback.exists() else True
    if forgery in ("answer text replaced", "question replaced"):   # the id is still the server's
        assert len(written) == 1
        assert written[0]["answer"] == sent and written[0]["question"] == "How many shapes?"
    else:
        assert written == [] and notes and "not recorded" in notes[-1]


def test_a_real_rating_is_written_once_per_click(tiny_engine, uploads, tmp_path):
    feedback = tmp_path / "feedback.jsonl"
    ctrl = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()),
                          feedback_file=feedback)
    state = answered(ctrl, "What colours?")
    state = ctrl.rate(state, answer_index(state), True, Req())
    state = ctrl.rate(state, answer_index(state), False, Req())
    assert [x["rating"] for x in lines(feedback)] == ["like", "dislike"]
    assert lines(feedback)[0]["answer"] == state["turns"][-1]["text"]
    assert lines(feedback)[0]["answer_id"] == state["turns"][-1]["id"]


@pytest.mark.parametrize("answer_mb,likes", [(10, 3), (2, 20)])
def test_feedback_lines_are_bounded(tmp_path, answer_mb, likes):
    """The probe: 3 likes of a 10 MB chat wrote +31 MB. Now a line holds at most
    MAX_ANSWER_CHARS of the answer the server itself sent."""
    log = FeedbackLog(tmp_path / "f.jsonl")
    answer_id = log.remember("tiny", "q" * 10**6, ["a.png"] * 1000, "x" * (answer_mb * 2**20))
    for _ in range(likes):
        assert log.rate(answer_id, "like", "s") is None
    size = (tmp_path / "f.jsonl").stat().st_size
    assert size < likes * (MAX_ANSWER_CHARS + 10_000)
    assert size < 2**20


def test_feedback_lines_per_hour_are_bounded(tmp_path):
    now = [1000.0]
    log = FeedbackLog(tmp_path / "f.jsonl", clock=lambda: now[0])
    answer_id = log.remember("tiny", "q", [], "a")
    for _ in range(LINES_PER_HOUR):
        assert log.rate(answer_id, "like", "s") is None
    assert "last hour" in log.rate(answer_id, "like", "s")
    now[0] += 3601
    assert log.rate(answer_id, "like", "s") is None
    assert len(lines(tmp_path / "f.jsonl")) == LINES_PER_HOUR + 1


# --------------------------------------------------------------------------- PDF pages
def pdf_with_page(points: int) -> bytes:
    from bench.hostile import pdf_with_page as make
    return make(points)


def slowed(monkeypatch, seconds: float, counter: list[int] | None = None) -> None:
    """render_pages made slow (and counted), as a large document would be."""
    import ui.chat as chat

    real, lock = chat.render_pages, threading.Lock()
    inside = [0]

    def slow(*args, **kwargs):
        with lock:
            inside[0] += 1
            if counter is not None:
                counter[0] = max(counter[0], inside[0])
        try:
            time.sleep(seconds)
            yield from real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(chat, "render_pages", slow)


def send_pdf(ctrl: ChatController, path: Path, session: str = "s1"):
    return ctrl.add_user_turn(None, {"text": "read", "files": [str(path)]}, None, Req(session))


def test_pdfs_are_rendered_one_document_at_a_time(tiny_engine, uploads, monkeypatch):
    """Three users sending documents at once: they are drawn one after another (the render
    budget), and one that waits too long is one clear line, not a stall."""
    import ui.chat as chat

    ctrl = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()))
    (uploads / "a.pdf").write_bytes(pdf_with_page(600))
    most = [0]
    slowed(monkeypatch, 0.3, most)
    threads = [threading.Thread(target=send_pdf, args=(ctrl, uploads / "a.pdf", str(i)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1
    monkeypatch.setattr(chat, "RENDER_WAIT_S", 0.1)
    slowed(monkeypatch, 1.5)
    first = threading.Thread(target=send_pdf, args=(ctrl, uploads / "a.pdf", "first"))
    first.start()
    time.sleep(0.2)
    start = time.monotonic()
    with pytest.raises(EngineBusyError, match="being read"):
        send_pdf(ctrl, uploads / "a.pdf", "second")
    assert time.monotonic() - start < 1.0
    first.join(30)


def test_the_named_chat_endpoint_renders_a_pdf_off_the_event_loop(tiny_engine, uploads,
                                                                  monkeypatch):
    """/chat (answer_once) ran the PDF's rendering on the event loop: everyone waited. A
    ticker on the loop must keep ticking while a slow document is rendered."""
    ctrl = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()))
    (uploads / "b.pdf").write_bytes(pdf_with_page(600))
    slowed(monkeypatch, 1.0)

    async def scenario() -> float:
        ticks: list[float] = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        task = asyncio.create_task(ticker())
        async for _ in ctrl.answer_once({"text": "read", "files": [str(uploads / "b.pdf")]},
                                        "", FAST, Req()):
            pass
        task.cancel()
        return max(b - a for a, b in zip(ticks, ticks[1:]))

    worst_gap = asyncio.run(scenario())
    assert worst_gap < 0.5, f"the event loop stalled {worst_gap:.2f} s"


def test_an_answers_boxes_are_parsed_off_the_event_loop(tiny_engine, uploads, monkeypatch):
    """The boxes parser ran on the event loop (a 390 KB answer stalled everyone 23.7 s)
    before the drawing thread started: now nothing of it runs there."""
    import ui.grounding as grounding

    ctrl = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()))
    loop_thread: list[int] = []
    parsed_on: list[int] = []
    real = grounding.parse

    def spy(text, *args, **kwargs):
        parsed_on.append(threading.get_ident())
        return real(text, *args, **kwargs)

    monkeypatch.setattr(grounding, "parse", spy)
    state, _, ok = ctrl.add_user_turn(None, {"text": "Detect the shapes.",
                                             "files": [str(uploads / "shapes.png")]}, None, Req())

    async def scenario():
        loop_thread.append(threading.get_ident())
        return [item async for item in ctrl.respond(state, FAST, Req())]

    asyncio.run(scenario())
    assert parsed_on and loop_thread[0] not in parsed_on


# --------------------------------------------------------------------------- fair share
def test_one_client_cannot_take_every_generation_slot_of_the_page(tiny_engine, uploads):
    """The page's generations share the API's per-client cap (server.fairshare): a client
    at its cap gets one line in the chat; another client is answered meanwhile."""
    from server.fairshare import ClientSlots, client_id

    class Who(Req):
        def __init__(self, user: str) -> None:
            super().__init__(user)
            self.username = user

    slots = ClientSlots(1)
    ctrl = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()),
                          admit=lambda r: slots.acquire(client_id(user=r.username)))
    held = slots.acquire(client_id(user="mallory"))     # mallory's one generation runs
    try:
        for user, refused in (("mallory", True), ("alice", False)):
            state, _, _ = ctrl.add_user_turn(None, {"text": "hi", "files": []}, None, Who(user))
            final, _ = drain(lambda: ctrl.respond(state, FAST, Who(user)))[-1]
            answer = final["turns"][-1]
            assert (answer["finish"] == "error") is refused, answer
            if refused:
                assert "at once" in answer["error"] or "already" in answer["error"], answer
        assert slots.running(client_id(user="alice")) == 0          # released at the end
    finally:
        held.release()
