"""The chat callbacks without a browser: the typed state becomes the engine's
Conversation, every error path ends as a message in the chat with the user's
turn kept, the next request is answered, Stop ends generation on the engine,
and the JSON export loads back. Also the app's flag parsing."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError
from engine.types import Finished, GenerationRequest
from ui import display, grounding, history
from ui.chat import ChatController, RefusedFiles, Sampling

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_MODEL_LEN = 2048


class Req:
    """What Gradio passes as gr.Request: only the session hash is used."""

    def __init__(self, session: str = "s1") -> None:
        self.session_hash = session


@pytest.fixture(scope="module")
def engine(tiny_random_model_dir):
    from engine.backends.local import LocalEngine
    from engine.config import EngineConfig

    # The random weights: these tests stop, cancel and queue long answers.
    eng = LocalEngine.from_config(EngineConfig(model=str(tiny_random_model_dir), warmup=False,
                                               max_model_len=MAX_MODEL_LEN))
    finished: list[tuple[GenerationRequest, Finished]] = []
    eng.add_finish_listener(lambda req, fin: finished.append((req, fin)))
    eng.finished_log = finished  # type: ignore[attr-defined]
    yield eng
    eng.close()


@pytest.fixture()
def uploads(tmp_path):
    """A stand-in for Gradio's upload folder, holding a copy of one example image."""
    shutil.copy(ASSETS / "shapes.png", tmp_path / "shapes.png")
    return tmp_path


@pytest.fixture()
def ctrl(engine, uploads):
    return ChatController(engine, (uploads.resolve(), ASSETS.resolve()))


FAST = Sampling(max_tokens=16, temperature=0.0)


def run(agen_factory):
    """Drive an async generator to its end; returns every (state, display) it yielded."""
    async def drain():
        return [item async for item in agen_factory()]
    return asyncio.run(drain())


def ask(ctrl, state, text, files=(), sampling=FAST, session="s1"):
    """Submit like the page does (add the turn, then generate); returns the final state."""
    state, _, accepted = ctrl.add_user_turn(state, {"text": text, "files": list(files)}, None,
                                            Req(session))
    assert accepted
    steps = run(lambda: ctrl.respond(state, sampling, Req(session)))
    final_state, shown = steps[-1]
    assert final_state is not None
    return final_state, shown


def shown_text(shown) -> str:
    return "\n".join(m["content"] for m in shown if isinstance(m["content"], str))


# --------------------------------------------------------------------------- state -> engine
def test_conversation_comes_from_typed_turns_not_from_the_display(uploads):
    img = str(uploads / "shapes.png")
    state = history.new_state("Be brief.")
    state["turns"] = [
        history.user_turn("first **question**", [img]),
        history.assistant_turn("An answer with $$x^2$$ and <b>tags</b>", "stop",
                               {"ttft_s": 0.1, "output_tokens": 5, "output_tps": 50.0}),
        history.user_turn("failed one", [img] * 11),
        history.assistant_turn("", "error", None, "At most 10 image(s) may be provided."),
        history.user_turn("stopped early", []),
        history.assistant_turn("", "cancelled", {"output_tokens": 0}),
        history.user_turn("and now?", [str(uploads / "clip.mp4")]),
    ]
    conv = history.to_conversation(state)
    assert conv.system == "Be brief."
    assert [(m.role, m.text) for m in conv.messages] == [
        ("user", "first **question**"),
        ("assistant", "An answer with $$x^2$$ and <b>tags</b>"),
        ("user", "and now?")]
    assert [i.source for i in conv.messages[0].images] == [img]
    assert [v.source for v in conv.messages[2].videos] == [str(uploads / "clip.mp4")]
    # The display shows stats and the error, but none of it reaches the engine.
    shown = shown_text(display.render(state))
    assert "5 tokens" in shown and "At most 10 image(s)" in shown
    assert all("tokens" not in m.text for m in conv.messages)


def test_conversation_needs_a_pending_user_turn_and_known_file_kinds(uploads):
    state = history.new_state()
    with pytest.raises(InvalidRequestError):
        history.to_conversation(state)
    state["turns"].append(history.user_turn("read this", [str(uploads / "notes.txt")]))
    with pytest.raises(InvalidRequestError, match="Unsupported file 'notes.txt'"):
        history.to_conversation(state)


def test_state_from_the_browser_is_revalidated(uploads):
    raw = {"system": 42, "turns": [
        {"role": "user", "text": "hi", "files": [{"path": "/etc/passwd"},
                                                  {"path": str(uploads / "shapes.png")},
                                                  {"path": str(uploads / ".." / "escape.png")},
                                                  "junk"]},
        {"role": "assistant", "text": "yo", "finish": "bogus", "stats": {"ttft_s": "x"}},
        {"role": "system", "text": "ignored"}, "junk"]}
    state = history.clean_state(raw, [uploads])
    assert state["system"] == ""
    assert [t["role"] for t in state["turns"]] == ["user", "assistant"]
    assert [f["name"] for f in state["turns"][0]["files"]] == ["shapes.png"]
    assert state["turns"][1]["finish"] == "stop" and state["turns"][1]["stats"] == {}
    assert history.clean_state("not a dict", [uploads]) == history.new_state()


def test_json_export_loads_back_with_its_files(uploads, tmp_path_factory):
    img = uploads / "shapes.png"
    state = history.new_state("sys")
    state["turns"] = [history.user_turn("what is it?", [str(img)]),
                      history.assistant_turn("shapes", "stop", {"output_tokens": 1})]
    doc = history.export_json(state, "tiny")
    assert json.loads(doc)["model"] == "tiny"
    dest = tmp_path_factory.mktemp("imports")
    loaded = history.import_json(doc, dest)
    assert loaded["system"] == "sys"
    assert [t["text"] for t in loaded["turns"]] == ["what is it?", "shapes"]
    new_path = Path(loaded["turns"][0]["files"][0]["path"])
    assert new_path.is_relative_to(dest) and new_path.read_bytes() == img.read_bytes()
    for bad, why in [("{", "invalid JSON"), ('{"turns": []}', "format"),
                     (json.dumps({"format": "qwen-vl-chat", "turns": [
                         {"role": "user", "files": [{"name": "a.png", "data": "nope"}]}]}),
                      "data: URI")]:
        with pytest.raises(InvalidRequestError, match=why):
            history.import_json(bad, dest)


# --------------------------------------------------------------------------- error paths
def test_errors_show_in_the_chat_keep_the_turn_and_the_next_request_is_answered(ctrl, uploads):
    img = str(uploads / "shapes.png")
    cases = [
        ([img] * 11, "hello", "At most 10 image(s) may be provided in one prompt."),
        ([], "word " * 3000, f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ]
    state = history.new_state()
    for files, text, expected in cases:
        state, shown = ask(ctrl, state, text, files)
        failed = state["turns"][-1]
        assert failed["finish"] == "error" and expected in failed["error"]
        assert state["turns"][-2] == history.user_turn(text, files)     # kept for Retry
        assert expected in shown_text(shown) and "Retry" in shown_text(shown)
        # The next request is answered, and the failed exchange stays on screen.
        state, shown = ask(ctrl, state, "Describe the picture.", [img])
        answer = state["turns"][-1]
        assert answer["finish"] in ("stop", "length") and answer["error"] is None
        assert answer["text"] and answer["stats"]["output_tokens"] >= 1
        assert expected in shown_text(shown)
    assert len(state["turns"]) == 4 * len(cases)


def test_a_refused_file_leaves_the_box_and_the_text_stays(ctrl, uploads):
    """A file the engine would refuse is refused before the message leaves the box: nothing
    enters the chat (where Undo or Retry would bring it back), the error names the file, and
    the box keeps the text and the other files, which a second Enter sends and gets answered."""
    img = str(uploads / "shapes.png")
    (uploads / "notes.png").write_text("this is a text file, not an image\n")
    (uploads / "notes.txt").write_text("plain text\n")
    cases = [(uploads / "notes.png", "Failed to load image: notes.png is not a readable image"),
             (uploads / "notes.txt", "Unsupported file 'notes.txt'")]
    state = history.new_state()
    for bad, why in cases:
        message = {"text": "What is in this picture?", "files": [img, str(bad)]}
        with pytest.raises(RefusedFiles) as refused:
            ctrl.add_user_turn(state, message, None, Req())
        assert why in refused.value.message and refused.value.names == [bad.name]
        assert refused.value.box == {"text": "What is in this picture?", "files": [img]}
        state, _ = ask(ctrl, state, refused.value.box["text"], refused.value.box["files"])
        assert state["turns"][-1]["finish"] in ("stop", "length")
    assert [t["files"] for t in state["turns"] if t["role"] == "user"] == \
        [[{"path": img, "name": "shapes.png"}]] * 2


def test_undo_after_a_refused_file_leaves_it_out_of_the_box(ctrl, uploads):
    """A file the engine refused once a message was sent (its answer is the error that names
    it) does not go back into the box with the text, or the next Enter would fail again."""
    img = str(uploads / "shapes.png")
    (uploads / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    state = history.new_state()
    state["turns"] = [history.user_turn("What is this?", [img, str(uploads / "broken.png")]),
                      history.assistant_turn("", "error", None, "Failed to load image: broken.png "
                                                                "is truncated or corrupt.")]
    state, shown, box = ctrl.undo(state)
    assert state["turns"] == [] and box == {"text": "What is this?", "files": [img]}


def test_a_question_about_a_picture_with_none_in_the_chat_says_so(ctrl, uploads):
    """The meter under the box says when a question about a picture would reach the model
    with no picture: none in the chat, or only one whose message failed (left out)."""
    from ui.layout import PRESETS

    img = str(uploads / "shapes.png")

    def meter(text, state=None):
        return ctrl.composer_meter({"text": text, "files": []}, state, 224 * 224, 1 << 20)

    for text in ["What is in this picture?", "What colour is this?", PRESETS[0][1],
                 "Detect the shapes."]:
        assert "No picture in this chat" in meter(text), text
    assert meter("Tell me a joke.") == ""
    assert "No picture" not in ctrl.composer_meter({"text": "What is this?", "files": [img]},
                                                   None, 224 * 224, 1 << 20)
    answered, _ = ask(ctrl, history.new_state(), "Describe the picture.", [img])
    assert meter("And what colour is this?", answered) == ""
    failed = history.new_state()
    failed["turns"] = [history.user_turn("What is this?", [img] * 11),
                       history.assistant_turn("", "error", None, "At most 10 image(s).")]
    assert "a message that failed" in meter("And this?", failed)


def test_the_stop_mark_stays_outside_an_unfinished_code_block():
    """A stopped answer in the middle of a JSON block: the block is closed before the mark,
    so the mark is not shown as code; elsewhere it follows the text on its line."""
    def stopped(text):
        state = history.new_state()
        state["turns"] = [history.user_turn("Detect", []),
                          history.assistant_turn(text, "cancelled", {"output_tokens": 9})]
        return display.render(state)[1]["content"]

    unfinished = '```json\n[\n\t{"label": "red circle", "bbox_2d": [12, 3'
    assert stopped(unfinished) == f"{unfinished}\n```\n\n{display.STOPPED_NOTE}"
    assert stopped("~~~~\ncode") == f"~~~~\ncode\n~~~~\n\n{display.STOPPED_NOTE}"
    closed = "```json\n[]\n```"
    assert stopped(closed) == f"{closed} {display.STOPPED_NOTE}"
    assert stopped("Once upon a time") == f"Once upon a time {display.STOPPED_NOTE}"
    assert stopped("") == display.STOPPED_NOTE


def test_request_too_long_for_the_completion_names_the_setting(ctrl):
    state, shown = ask(ctrl, history.new_state(), "hi", [],
                       Sampling(max_tokens=MAX_MODEL_LEN, temperature=0.0))
    assert "Max new tokens" in state["turns"][-1]["error"]


def test_busy_engine_is_a_message_too(ctrl, monkeypatch):
    from engine.errors import EngineBusyError

    def busy(*_a, **_k):
        raise EngineBusyError("The server is busy: 32 requests are already waiting.")

    monkeypatch.setattr(ctrl.engine, "submit", busy)
    state, shown = ask(ctrl, history.new_state(), "hi")
    assert "server is busy" in shown_text(shown)
    assert state["turns"][0]["text"] == "hi"


# --------------------------------------------------------------------------- stop / retry / undo
def finish_record(engine, text, timeout=5.0):
    """The engine's final record of the request whose last message is `text` (the
    listener runs just after the stream ends, so wait for it briefly)."""
    for _ in range(int(timeout / 0.02)):
        for req, fin in engine.finished_log:
            if req.conversation.messages[-1].text == text:
                return fin
        threading.Event().wait(0.02)
    raise AssertionError(f"the engine never finished {text!r}")


def test_stop_ends_generation_on_the_engine(ctrl, engine):
    long = Sampling(max_tokens=1500, temperature=0.0)
    state, _, _ = ctrl.add_user_turn(None, {"text": "Tell a long story.", "files": []}, None,
                                     Req("stopper"))

    async def go():
        steps = []
        async for st, shown in ctrl.respond(state, long, Req("stopper")):
            steps.append((st, shown))
            if st is None and len(steps) >= 3 and ctrl.active.count():
                ctrl.stop(Req("stopper"))
        return steps

    steps = asyncio.run(go())
    final = steps[-1][0]["turns"][-1]
    assert final["finish"] == "cancelled"
    assert 1 <= final["stats"]["output_tokens"] < 1500
    assert display.STOPPED_NOTE in shown_text(steps[-1][1])
    fin = finish_record(engine, "Tell a long story.")
    assert fin.reason == "cancelled" and fin.stats.output_tokens < 1500
    assert ctrl.active.count() == 0


def test_stop_before_the_request_reaches_the_engine(ctrl, engine):
    state, _, _ = ctrl.add_user_turn(None, {"text": "hi", "files": []}, None, Req("early"))
    assert ctrl.stop(Req("early")) == 0          # still waiting in Gradio's queue
    state, shown = run(lambda: ctrl.respond(state, FAST, Req("early")))[-1]
    assert state["turns"][-1]["finish"] == "cancelled"
    # A Stop pressed while idle must not cancel the next message.
    ctrl.stop(Req("early"))
    state, _ = ask(ctrl, state, "again", session="early")
    assert state["turns"][-1]["finish"] in ("stop", "length")


def test_closing_the_stream_cancels_the_engine_request(ctrl, engine):
    """What Gradio does on cancel or disconnect: it closes the generator."""
    state, _, _ = ctrl.add_user_turn(None, {"text": "A long tale.", "files": []}, None,
                                     Req("gone"))

    async def go():
        agen = ctrl.respond(state, Sampling(max_tokens=1500, temperature=0.0), Req("gone"))
        async for st, _ in agen:
            if st is None and ctrl.active.count():
                break
        await agen.aclose()

    asyncio.run(go())
    assert finish_record(engine, "A long tale.").reason == "cancelled"


def test_waiting_users_see_their_place_in_the_queue(engine, uploads, monkeypatch):
    import ui.chat
    from engine.backends.local import LocalEngine
    from engine.config import EngineConfig

    monkeypatch.setattr(ui.chat, "POLL_S", 0.05)
    # One KV row, so one request decoding at a time: the second one must wait for the first's.
    one_row = LocalEngine(engine.loaded, EngineConfig(max_model_len=MAX_MODEL_LEN, max_batch=1,
                                                      log_stats_interval=0))
    ctrl = ChatController(one_row, (uploads.resolve(), ASSETS.resolve()))
    long = Sampling(max_tokens=1500, temperature=0.0, seed=1)
    first, _, _ = ctrl.add_user_turn(None, {"text": "one", "files": []}, None, Req("a"))
    second, _, _ = ctrl.add_user_turn(None, {"text": "two", "files": []}, None, Req("b"))

    async def go():
        agen_a = ctrl.respond(first, long, Req("a"))
        async for st, shown in agen_a:
            if st is None and "Reading" not in shown_text(shown):
                break            # the first request is generating
        notes = []
        agen_b = ctrl.respond(second, Sampling(max_tokens=4, temperature=0.0, seed=2), Req("b"))
        async for st, shown in agen_b:
            notes.append(shown_text(shown))
            if "in the queue" in notes[-1]:
                ctrl.stop(Req("a"))
        async for _ in agen_a:
            pass
        return notes

    try:
        notes = asyncio.run(go())
    finally:
        one_row.close()
    assert any("number 1 in the queue" in n for n in notes)


def test_retry_and_undo(ctrl):
    state, _ = ask(ctrl, history.new_state(), "question one")
    first_answer = state["turns"][-1]
    state, shown = ctrl.prepare_retry(state, None, Req())
    assert history.pending_user_turn(state)["text"] == "question one"
    state, _ = run(lambda: ctrl.respond(state, FAST, Req()))[-1]
    assert len(state["turns"]) == 2 and state["turns"][-1] is not first_answer
    state, shown, box = ctrl.undo(state)
    assert state["turns"] == [] and shown == []
    assert box == {"text": "question one", "files": []}
    state, shown = ctrl.clear({"system": "keep me", "turns": [history.user_turn("x", [])]})
    assert state == history.new_state("keep me") and shown == []


def test_empty_message_is_not_sent(ctrl):
    state, shown, accepted = ctrl.add_user_turn(None, {"text": "  ", "files": []}, None, Req())
    assert not accepted and state["turns"] == []
    steps = run(lambda: ctrl.respond(state, FAST, Req()))
    assert steps == [(state, [])]


# --------------------------------------------------------------------------- app flags
def test_app_flags_read_the_environment(monkeypatch, tmp_path):
    import app

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("QWENVL_AUTH", "alice:pw:with:colons")
    monkeypatch.setenv("QWENVL_MAX_UPLOAD_MB", "5")
    args = app.build_parser().parse_args(["--model", "tiny"])
    assert (args.server_name, args.server_port, args.max_upload_mb) == ("0.0.0.0", 7999, 5.0)
    assert app.parse_auth(args.auth) == [("alice", "pw:with:colons")]
    users = tmp_path / "users.txt"
    users.write_text("# team\nbob:one\n\ncarol:two\n")
    assert app.parse_auth([str(users)]) == [("bob", "one"), ("carol", "two")]
    with pytest.raises(ValueError, match="USER:PASS"):
        app.parse_auth(["nocolon"])
    assert app.parse_auth([]) is None


def test_app_refuses_a_bad_port_before_loading_the_model(capsys):
    import socket

    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            app.main(["--model", "tiny", "--server-port", str(port)])
    assert exc.value.code == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_app_serves_ui_behind_login_and_api_on_one_app(engine, monkeypatch):
    """create_app in-process: Gradio's login guards the page, the upload limit is
    set, and the OpenAI routes sit beside it behind the same users."""
    from fastapi.testclient import TestClient

    import app

    monkeypatch.delenv("QWENVL_AUTH", raising=False)
    args = app.build_parser().parse_args(["--auth", "alice:pw", "--max-upload-mb", "2"])
    fastapi_app, demo = app.create_app(engine, args)
    assert demo.max_file_size == 2 * 1024 * 1024
    with TestClient(fastapi_app) as http:
        assert http.get("/config").status_code == 401
        assert http.post("/login", data={"username": "alice", "password": "no"}).status_code == 400
        assert http.post("/login", data={"username": "alice", "password": "pw"}).status_code == 200
        config = http.get("/config").json()
        assert any(d.get("api_name") == "chat" for d in config["dependencies"])
        assert http.get("/v1/models").status_code == 401     # the page's cookie is not enough
        assert http.get("/v1/models", auth=("alice", "pw")).status_code == 200


def test_share_link_failure_keeps_serving_locally(monkeypatch, caplog):
    from gradio import networking

    import app

    def no_network(*_a, **_k):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr(networking, "setup_tunnel", no_network)

    class Demo:
        share_token = "t"

    assert app.open_share_link(Demo(), "0.0.0.0", 7860) is None
    assert "could not create a share link" in caplog.text


def test_publishing_without_login_warns_loudly():
    import app

    parse = app.build_parser().parse_args
    assert "NO LOGIN" in app.open_access_warning(parse(["--share"]))
    assert "0.0.0.0:7860" in app.open_access_warning(parse(["--server-name", "0.0.0.0"]))
    assert app.open_access_warning(parse(["--share", "--auth", "a:b"])) is None
    assert app.open_access_warning(parse([])) is None


def test_preparation_runs_off_the_event_loop(uploads):
    """A slow submit (big images, a remote's prefill) must not freeze the page for others."""
    import time

    from engine.base import Engine
    from engine.stream import RequestHandle
    from engine.types import RequestStats, TextDelta

    class SlowEngine(Engine):
        model_name, device_description = "slow", "none"

        def submit(self, request, policy=None):
            time.sleep(0.4)
            handle = RequestHandle(request.request_id)
            handle.push(TextDelta("ok"))
            handle.push(Finished("stop", RequestStats(output_tokens=1)))
            return handle

        def health(self):
            return True

    ctrl = ChatController(SlowEngine(), (uploads.resolve(), ASSETS.resolve()))
    state, _, _ = ctrl.add_user_turn(history.new_state(), {"text": "hi", "files": []}, None, Req())

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        steps = [step async for step in ctrl.respond(state, FAST, Req())]
        tick_task.cancel()
        return ticks, steps

    ticks, steps = asyncio.run(main())
    assert ticks >= 10, f"the event loop was blocked ({ticks} ticks in 0.4 s)"
    assert steps[-1][0]["turns"][-1]["text"] == "ok"


def test_retry_undo_and_clear_answer_the_same_with_the_cache_on(engine, uploads):
    """A chat about a picture, its follow-up, a Retry, an Undo and resend, a Clear and the
    first question again: with the conversation cache on (hits on every step after the
    first), each answer equals the same step's answer on an engine with the cache off."""
    from engine.backends.local import LocalEngine
    from engine.config import EngineConfig

    picture = str(uploads / "shapes.png")
    cold = LocalEngine(engine.loaded, EngineConfig(max_model_len=MAX_MODEL_LEN,
                                                   prefix_cache=False, log_stats_interval=0))

    def session(eng) -> list[str]:
        c = ChatController(eng, (uploads.resolve(), ASSETS.resolve()))
        answers = []
        state, _ = ask(c, history.new_state(), "What is this?", [picture])
        answers.append(state["turns"][-1]["text"])
        state, _ = ask(c, state, "And its colours?")
        answers.append(state["turns"][-1]["text"])
        state, _ = c.prepare_retry(state, None, Req())
        state, _ = run(lambda: c.respond(state, FAST, Req()))[-1]
        answers.append(state["turns"][-1]["text"])
        state, _, box = c.undo(state)
        state, _ = ask(c, state, box["text"])
        answers.append(state["turns"][-1]["text"])
        state, _ = c.clear(state)
        state, _ = ask(c, state, "What is this?", [picture])
        answers.append(state["turns"][-1]["text"])
        return answers

    try:
        hits_before = engine.cache_stats()["prefix_cache_hits"]
        warm = session(engine)
        assert engine.cache_stats()["prefix_cache_hits"] > hits_before
        assert warm == session(cold)
        assert warm[1] == warm[2] == warm[3] and warm[0] == warm[4]    # greedy: same prompt
    finally:
        cold.close()


# --------------------------------------------------------------------------- composer extras
def two_page_pdf(folder: Path) -> Path:
    from PIL import Image

    pages = [Image.new("RGB", (420, 594), c) for c in ((250, 250, 250), (200, 220, 250))]
    path = folder / "doc.pdf"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def test_a_pdf_becomes_its_pages_and_too_many_pages_is_one_clear_line(ctrl, engine, uploads):
    pdf = two_page_pdf(uploads)
    state, shown, ok = ctrl.add_user_turn(None, {"text": "Summarise", "files": [str(pdf)]},
                                          None, Req())
    assert ok
    files = [f["name"] for f in state["turns"][-1]["files"]]
    assert files == ["doc-page1.png", "doc-page2.png"]
    assert sum(1 for m in shown if isinstance(m["content"], dict)) == 2
    full = history.new_state()
    full["turns"] = [history.user_turn("many", [str(uploads / "shapes.png")] *
                                       (engine.limit_images - 1)),
                     history.assistant_turn("ok", "stop")]
    with pytest.raises(InvalidRequestError, match="doc.pdf has 2 pages, but only 1 more"):
        ctrl.add_user_turn(full, {"text": "and this", "files": [str(pdf)]}, None, Req())


def test_meter_counts_a_picture_before_sending_and_warns(ctrl, engine, uploads):
    from engine.inputs.geometry import image_tokens

    shapes = str(uploads / "shapes.png")
    from PIL import Image
    w, h = Image.open(shapes).size
    line = ctrl.composer_meter({"text": "", "files": [shapes]}, None, 224 * 224, 1280 * 28 * 28)
    assert f"**shapes.png**: {image_tokens(w, h, 224 * 224, 1280 * 28 * 28):,} tokens" in line
    assert f"of {engine.max_model_len:,} tokens" in line and "Will not fit" not in line
    huge = ctrl.composer_meter({"text": "", "files": [shapes]}, None, 16384 * 28 * 28,
                               16384 * 28 * 28, 512)
    assert "Will not fit" in huge
    pdf = two_page_pdf(uploads)
    assert "2 pages" in ctrl.composer_meter({"text": "", "files": [str(pdf)]}, None,
                                            224 * 224, 1280 * 28 * 28)
    assert ctrl.composer_meter({"text": "hi", "files": []}, None, 224 * 224, 1 << 20) == ""


def test_meter_and_boxes_follow_the_models_own_processor_bounds(tiny_random_model_dir, tmp_path, uploads):
    """A model folder whose processor resizes pictures further (processor_config.json):
    the engine reports those bounds, so the meter counts what the model will really see."""
    from engine.backends.local import LocalEngine
    from engine.config import EngineConfig
    from engine.inputs.geometry import image_tokens

    folder = tmp_path / "capped"
    shutil.copytree(tiny_random_model_dir, folder)
    conf = json.loads((folder / "processor_config.json").read_text())
    conf["image_processor"]["size"] = {"shortest_edge": 56 * 56, "longest_edge": 100 * 28 * 28}
    (folder / "processor_config.json").write_text(json.dumps(conf))
    eng = LocalEngine.from_config(EngineConfig(model=str(folder), warmup=False, max_model_len=MAX_MODEL_LEN))
    try:
        assert eng.model_pixel_bounds() == [(56 * 56, 100 * 28 * 28)]
        line = ChatController(eng, (uploads.resolve(),)).composer_meter(
            {"text": "", "files": [str(uploads / "shapes.png")]}, None, 224 * 224, 1280 * 28 * 28)
        assert "**shapes.png**: 100 tokens" in line, line
        assert image_tokens(448, 448, 224 * 224, 1280 * 28 * 28) == 256     # ours alone
    finally:
        eng.close()


def test_an_edited_question_reruns_from_there_with_its_pictures(ctrl, uploads):
    shapes = str(uploads / "shapes.png")
    state, _ = ask(ctrl, history.new_state(), "first", [shapes])
    state, _ = ask(ctrl, state, "second")
    from ui import display
    shown, owners = display.render_indexed(state)
    first_text = next(i for i, m in enumerate(shown) if m["content"] == "first")
    state, shown, rerun = ctrl.edit(state, first_text, "first, edited", Req())
    assert rerun and len(state["turns"]) == 1
    assert state["turns"][0]["text"] == "first, edited"
    assert [f["path"] for f in state["turns"][0]["files"]] == [shapes]
    state, _ = run(lambda: ctrl.respond(state, FAST, Req()))[-1]
    assert state["turns"][-1]["role"] == "assistant" and len(state["turns"]) == 2
    picture_msg = next(i for i, m in enumerate(display.render(state))
                       if isinstance(m["content"], dict))
    assert ctrl.edit(state, picture_msg, "x", Req())[2] is False      # a picture: not text


def test_like_and_dislike_are_kept_and_written_when_asked(engine, uploads, tmp_path):
    feedback = tmp_path / "feedback.jsonl"
    c = ChatController(engine, (uploads.resolve(), ASSETS.resolve()), feedback_file=feedback)
    state, shown = ask(c, history.new_state(), "rate me")
    from ui import display
    answer_msg = next(i for i, m in enumerate(display.render(state)) if m["role"] == "assistant")
    state = c.rate(state, answer_msg, True, Req())
    assert state["turns"][-1]["rating"] == "like"
    state = c.rate(state, answer_msg, False, Req())
    assert state["turns"][-1]["rating"] == "dislike"
    lines = [json.loads(x) for x in feedback.read_text().splitlines()]
    assert [x["rating"] for x in lines] == ["like", "dislike"]
    assert lines[0]["question"] == "rate me" and lines[0]["answer"] == state["turns"][-1]["text"]
    user_msg = 0
    assert c.rate(state, user_msg, True, Req())["turns"][0].get("rating") is None


def test_presets_fill_the_box_and_keep_its_files():
    from ui.callbacks import Callbacks
    from ui.layout import PRESETS

    box = Callbacks.preset({"text": "old", "files": ["a.png"]}, PRESETS[0][1])
    assert box == {"text": PRESETS[0][1], "files": ["a.png"]}
    assert "bbox" in PRESETS[0][1] and PRESETS[2][1] == "QwenVL HTML"


def test_the_settings_start_at_the_models_own_defaults(engine):
    """The sampling sliders start at the served model's generation_config (as a request that
    sets nothing gets it, vLLM's default), not at fixed numbers: the built-in random model's
    is Qwen's own (top_k 1, repetition penalty 1.05); a remote server's is unknown, so the
    page keeps its fields' defaults."""
    from ui.layout import build_demo

    with build_demo(engine) as demo:
        pass
    value = {b.elem_id: b.value for b in demo.blocks.values()
             if getattr(b, "elem_id", None) and hasattr(b, "value")}
    want = engine.sampling_defaults()
    assert want == {"temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}
    assert (value["qvl-temperature"], value["qvl-top-p"], value["qvl-top-k"],
            value["qvl-repetition-penalty"]) == (0.1, 0.001, 1, 1.05)
    assert Sampling.starting({}) == Sampling()


# --------------------------------------------------------------------------- the built-in model
SHAPES_PNG = {"red": "circle", "blue": "square", "green": "triangle", "yellow": "star"}


def right_about_shapes_png(question: str, answer: str) -> bool:
    """Whether `answer` is right about assets/shapes.png, for the question forms the built-in
    model was trained on (tinylab/shapes.py); any other form is not an example for it."""
    from tinylab import shapes as S

    if question.startswith("How many shapes"):
        return S.parse_count(answer) == 4 and S.parse_colours(answer) == set(SHAPES_PNG)
    colour = next(c for c in SHAPES_PNG if f" {c}" in question)
    return answer == f"The {colour} one is a {SHAPES_PNG[colour]}."


def test_the_built_in_models_examples_come_first_and_are_answered_right(tiny_engine, engine):
    """With the built-in model serving, the page's first examples are what it answers right,
    asked through the page's controller at the page's starting settings; the others follow.
    Another model gets the examples as they are."""
    from ui.layout import EXAMPLES, TINY_EXAMPLES, examples_for

    shown, label = examples_for(tiny_engine)
    assert shown[:len(TINY_EXAMPLES)] == TINY_EXAMPLES and len(TINY_EXAMPLES) >= 3
    assert sorted(shown[len(TINY_EXAMPLES):]) == sorted(e for e in EXAMPLES
                                                         if e not in TINY_EXAMPLES)
    assert f"answers the first {len(TINY_EXAMPLES)}" in label
    assert examples_for(engine)[0] == EXAMPLES          # the random weights answer nothing
    c = ChatController(tiny_engine, (ASSETS.resolve(),))
    start = Sampling.starting(tiny_engine.sampling_defaults())
    for name, question in TINY_EXAMPLES:
        state, _ = ask(c, history.new_state(), question, [str(ASSETS / name)], start)
        answer = state["turns"][-1]["text"]
        assert right_about_shapes_png(question, answer), (question, answer)


# --------------------------------------------------------------------------- JSON mode
def test_field_names_become_a_schema_with_every_field_required():
    import jsonschema
    from ui.jsonmode import fields_schema

    schema = fields_schema(" name, total:number , items: list, paid:Boolean, count:integer,")
    assert schema == {"type": "object", "required": ["name", "total", "items", "paid", "count"],
                      "properties": {"name": {"type": "string"}, "total": {"type": "number"},
                                     "items": {"type": "array", "items": {"type": "string"}},
                                     "paid": {"type": "boolean"}, "count": {"type": "integer"}}}
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate({"name": "a", "total": 1.5, "items": ["x"], "paid": True, "count": 2},
                        schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "a"}, schema)                 # all required


@pytest.mark.parametrize("fields, words", [
    ("", "Type one or more field names"),
    ("age:int", 'Field "age" has type "int": use one of string, integer, number, boolean, list'),
    ("a, b, a", 'Field "a" is named twice'),
    (":integer", "A field has no name"),
])
def test_field_names_that_make_no_schema_are_one_clear_line(fields, words):
    from ui.jsonmode import JsonMode

    with pytest.raises(InvalidRequestError) as refused:
        JsonMode("fields", fields=fields).constraint()
    assert words in refused.value.message and "\n" not in refused.value.message
    assert refused.value.param == "structured_outputs"


@pytest.mark.parametrize("text, words", [
    ("", "Type a JSON schema"),
    ('{"type": "object",', "The JSON schema is not valid JSON: Expecting property name "
                           "enclosed in double quotes (line 1, column 19)."),
    ("[1, 2]", "The JSON schema must be a JSON object"),
    ('{"type": "int"}', 'the schema has type "int", not one of array, boolean, integer'),
    ('{"properties": {"a": {"type": "strin"}}}', 'at properties.a, the schema has type "strin"'),
    ('{"required": "a"}', "\"required\" must be a list of property names"),
    ('{"items": {"anyOf": [{"enum": 3}]}}', 'at items.anyOf[0], the schema\'s "enum" must be'),
    ('{"properties": {"a": 3}}', "at properties.a, the schema must be a JSON object"),
])
def test_a_schema_that_is_no_schema_is_one_clear_line(text, words):
    from ui.jsonmode import JsonMode

    with pytest.raises(InvalidRequestError) as refused:
        JsonMode("schema", schema=text).constraint()
    assert words in refused.value.message and "\n" not in refused.value.message


def test_a_bad_schema_is_refused_before_sending_and_the_message_stays_in_the_box(engine, uploads):
    """On Enter with a broken schema: one line under the JSON mode, nothing enters the chat,
    and the message box is left as it is (the callback skips it), files and all."""
    import gradio as gr
    from ui.callbacks import Callbacks

    cb = Callbacks(ChatController(engine, (uploads.resolve(),)), "m", uploads, "")
    message = {"text": "Read the receipt", "files": [str(uploads / "shapes.png")]}
    *out, note = cb.on_submit(None, message, "", "schema", '{"type": "object"', "", Req())
    assert note == "⚠ The JSON schema is not valid JSON: Expecting ',' delimiter (line 1, " \
                   "column 18)."
    assert all(isinstance(o, type(gr.skip())) for o in out)        # state, chat and box kept
    *out, note = cb.on_submit(None, message, "", "fields", "", "<b>*x*:int", Req())  # as text
    assert note == '⚠ Field "&lt;b&gt;\\*x\\*" has type "int": use one of string, integer, ' \
                   'number, boolean, list.'
    *out, note = cb.on_submit(None, message, "", "fields", "", "total:number", Req())
    assert note == "" and out[0]["turns"][0]["text"] == "Read the receipt"
    settings, note = Callbacks.on_json_text("fields", "", "a, a")       # as it is typed
    assert note == '⚠ Field "a" is named twice.' and settings["fields"] == "a, a"
    assert Callbacks.on_json_text("fields", "", " ")[1] == ""          # nothing typed yet


def test_json_mode_answers_parse_validate_and_show_formatted(tiny_engine, uploads):
    """Each JSON mode on the built-in model: the answer parses and obeys its schema, the turn
    is marked JSON, and the chat shows it as a formatted ```json block."""
    import jsonschema
    from ui.jsonmode import JsonMode, fields_schema

    c = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()))
    schema = {"type": "object", "properties": {"count": {"type": "integer"}, "colours": {
        "type": "array", "items": {"enum": ["red", "blue", "green", "yellow"]}}},
        "required": ["count", "colours"]}
    modes = [(JsonMode("schema", schema=json.dumps(schema)), schema),
             (JsonMode("fields", fields="count:integer, colours:list"),
              fields_schema("count:integer, colours:list")),
             (JsonMode("object"), {"type": "object"})]
    for mode, want in modes:
        sampling = Sampling(max_tokens=64, temperature=1.0, seed=7, json_mode=mode)
        state, shown = ask(c, history.new_state(), "How many shapes are there, and what "
                           "colours are they?", [str(uploads / "shapes.png")], sampling)
        turn = state["turns"][-1]
        assert turn["error"] is None and turn["format"] == "json", turn
        value = json.loads(turn["text"])
        jsonschema.validate(value, want)
        assert display.json_block(turn["text"]) in shown_text(shown)
    off, _ = ask(c, history.new_state(), "How many shapes are there?",
                 [str(uploads / "shapes.png")], Sampling(max_tokens=32, temperature=0))
    assert "format" not in off["turns"][-1]


def test_the_detect_preset_holds_the_answer_to_qwens_grounding_list(tiny_engine, uploads):
    """Detect picks the grounding schema; on the built-in model (whose boxes are wrong) the
    answer always parses into boxes, which are drawn on the picture."""
    import jsonschema
    from ui.jsonmode import GROUNDING_SCHEMA, JsonMode
    from ui.layout import PRESETS

    label, prompt, mode = PRESETS[0]
    assert label == "Detect" and mode == "boxes" and {m for *_, m in PRESETS[1:]} == {"off"}
    assert JsonMode(mode).constraint().json == GROUNDING_SCHEMA
    box = GROUNDING_SCHEMA["items"]
    assert box["required"] == ["bbox_2d", "label"] and list(box["properties"]) == ["bbox_2d",
                                                                                   "label"]
    jsonschema.Draft202012Validator.check_schema(GROUNDING_SCHEMA)
    c = ChatController(tiny_engine, (uploads.resolve(),))
    start = Sampling.starting(tiny_engine.sampling_defaults())
    for seed in (None, 1, 2):
        sampling = Sampling(max_tokens=120, temperature=start.temperature if seed is None else 1.0,
                            seed=seed, json_mode=JsonMode(mode))
        state, _ = ask(c, history.new_state(), prompt, [str(uploads / "shapes.png")], sampling)
        turn = state["turns"][-1]
        boxes = json.loads(turn["text"])
        jsonschema.validate(boxes, GROUNDING_SCHEMA)
        assert all(list(b) == ["bbox_2d", "label"] for b in boxes)   # by itself: label first
        assert len(grounding.parse(turn["text"])) == len(boxes) >= 1
        assert len(turn["figures"]) == 1 and Path(turn["figures"][0]["path"]).is_file()


def test_too_few_tokens_for_the_schema_says_which_setting_to_raise(tiny_engine, uploads):
    from ui.jsonmode import JsonMode

    c = ChatController(tiny_engine, (uploads.resolve(),))
    sampling = Sampling(max_tokens=2, json_mode=JsonMode("fields", fields="name, total:number"))
    state, shown = ask(c, history.new_state(), "Read it", [str(uploads / "shapes.png")], sampling)
    assert "max_tokens=2 is too few for this structured output" in state["turns"][-1]["error"]
    assert "Raise *Max new tokens*" in shown_text(shown)


def test_json_answers_are_shown_formatted_in_a_fence_nothing_can_close():
    boxes = '[{"bbox_2d":[1,2,3,4],"label":"cat"},{"bbox_2d":[5,6,7,8],"label":"dog"}]'
    assert display.json_block(boxes) == ('```json\n[\n  {"bbox_2d": [1, 2, 3, 4], "label": "cat"},'
                                         '\n  {"bbox_2d": [5, 6, 7, 8], "label": "dog"}\n]\n```')
    long = {"a": "x" * 80, "b": [1, 2], "c": {"d": ["y" * 70, "z"]}}
    block = display.json_block(json.dumps(long))
    assert json.loads(block.removeprefix("```json\n").removesuffix("\n```")) == long
    assert '\n  "b": [1, 2],\n' in block and '\n    "d": [\n      "yyy' in block
    tricky = display.json_block('{"a": "``` and ````"}')
    assert tricky.startswith("`````json\n") and tricky.endswith("\n`````")
    assert display.json_block('{"a": 1') == '```json\n{"a": 1\n```'     # stopped: as it came
    assert display.json_block('```json\n[1, 2]\n```') == '```json\n[1, 2]\n```'   # fenced already
    deep = "[" * 5000 + "]" * 5000
    assert deep in display.json_block(deep)                  # too deep to format: as it came
    state = history.new_state()
    state["turns"] = [history.user_turn("q", []),
                      history.assistant_turn(boxes, "stop", answer_format="json")]
    kept = history.clean_state(json.loads(json.dumps(state)), [])
    assert kept["turns"][1]["format"] == "json"
    assert display.render(kept)[1]["content"] == display.json_block(boxes)
    kept["turns"][1]["format"] = "<b>"
    assert "format" not in history.clean_state(kept, [])["turns"][1]


def test_boxes_anywhere_in_a_json_answer_are_found_in_order():
    answer = json.dumps({"colours": ["red"], "found": {"boxes": [
        {"bbox_2d": [1, 2, 3, 4], "label": "a", "parts": [{"bbox_2d": [0, 0, 1, 1]}]},
        {"point_2d": [5, 6], "label": "b"}]}, "last": [{"bbox_2d": [9, 9, 8, 8], "label": "c"}]})
    marks = grounding.parse(answer)
    assert [(m.label, m.box, m.point) for m in marks] == [
        ("a", (1, 2, 3, 4), None), ("b", None, (5, 6)), ("c", (8, 8, 9, 9), None)]
    assert grounding.parse('{"bbox_2d": [1, 2, 3, 4], "label": "one"}')[0].label == "one"


def test_the_json_mode_is_kept_in_the_browser_and_read_back_checked():
    from ui.callbacks import Callbacks
    from ui.jsonmode import MAX_SCHEMA_CHARS, JsonMode

    kept = Callbacks.on_json_mode("fields", '{"type": "object"}', "a, b:integer")[3]
    assert JsonMode.from_settings(kept) == JsonMode("fields", '{"type": "object"}', "a, b:integer")
    mode, schema, upload, fields, token_probs, panel = Callbacks.on_load_settings(kept)
    assert mode == "fields" and fields["value"] == "a, b:integer" and fields["visible"]
    assert token_probs is False and panel["visible"] is False
    assert schema["value"] == '{"type": "object"}' and not schema["visible"]
    for junk in (None, [], {"mode": "rm -rf", "schema": 3}, {"mode": "schema", "fields": {}}):
        back = JsonMode.from_settings(junk)
        assert back.mode in ("off", "schema") and back.fields == "" and back.schema == ""
    big = JsonMode.from_settings({"mode": "schema", "schema": "x" * (MAX_SCHEMA_CHARS + 9)})
    assert len(big.schema) == MAX_SCHEMA_CHARS


def test_a_schema_file_fills_the_schema_box(engine, uploads):
    import gradio as gr
    from ui.callbacks import Callbacks
    from ui.jsonmode import MAX_SCHEMA_CHARS

    cb = Callbacks(ChatController(engine, (uploads.resolve(),)), "m", uploads, "")
    (uploads / "schema.json").write_text('{"type": "object", "properties": {}}')
    assert cb.on_schema_file(str(uploads / "schema.json")) == \
        ['{"type": "object", "properties": {}}', "schema", ""]
    (uploads / "broken.json").write_text('{"type": ')
    text, mode, note = cb.on_schema_file(str(uploads / "broken.json"))
    assert (text, mode) == ('{"type": ', "schema")                   # shown, to be fixed
    assert note.startswith("⚠ broken.json: The JSON schema is not valid JSON")
    (uploads / "huge.json").write_text('{"description": "' + "x" * MAX_SCHEMA_CHARS + '"}')
    assert cb.on_schema_file(str(uploads / "huge.json"))[2].endswith("too long for a schema: "
                                                                     "at most 65,536 characters.")
    outside = ASSETS.parent / "README.md"
    assert all(isinstance(o, type(gr.skip())) for o in cb.on_schema_file(str(outside)))


# --------------------------------------------------------------------------- lines on the page
# Gradio shows a warning only from a queued event: the chat's events, which may say
# something (a refused file, an empty message, Save/Load JSON, files left out of a kept chat),
# are queued in a group of their own, never behind the model; the rest stay unqueued and
# never warn (tests/test_browser_warnings.py sees the lines in a browser).
MAY_WARN = {"on_submit", "on_retry", "on_edit", "on_like", "on_undo", "clear", "on_export",
            "on_import", "on_load"}
NEVER_WARN = {"load_example", "on_idle", "on_json_mode", "on_json_text", "on_schema_file",
              "on_load_settings", "on_token_probs", "empty_probs", "composer_meter", "<lambda>",
              "on_stop", None}


def test_every_event_that_may_warn_is_queued_apart_from_the_model(engine):
    from ui.layout import GENERATE, SAID, build_demo

    fns = list(build_demo(engine).fns.values())
    for fn in fns:
        if fn.name in MAY_WARN:
            assert (fn.queue, fn.concurrency_id, fn.concurrency_limit) == (True, SAID, None), \
                fn.name
        elif fn.name in ("generate", "api_chat"):
            assert fn.queue and fn.concurrency_id == GENERATE
        elif not fn.queue:
            assert fn.name in NEVER_WARN, f"{fn.name}: unqueued, so a warning would be lost"
    assert MAY_WARN <= {fn.name for fn in fns}


def test_warnings_are_plain_text_and_the_meter_says_nothing(engine, uploads, monkeypatch):
    import gradio as gr
    from ui import callbacks

    shown: list[str] = []
    monkeypatch.setattr(gr, "Warning", shown.append)
    callbacks.warn("Unsupported file 'a<b>&amp;.txt'")
    assert shown == ["Unsupported file 'a&lt;b&gt;&amp;amp;.txt'"]   # the toast renders HTML

    notes: list[str] = []
    (uploads / "up").mkdir()
    ctrl = ChatController(engine, ((uploads / "up").resolve(),), warn=notes.append)
    outside = uploads / "shapes.png"       # not in the upload folder ("up")
    kept = {"system": "", "turns": [history.user_turn("hi", [str(outside)]),
                                    history.assistant_turn("yes", "stop")]}
    for _ in range(3):                     # on every keystroke: not a word
        ctrl.composer_meter({"text": "and this?", "files": []}, kept, 224 * 224, 1280 * 28 * 28)
    assert notes == []
    ctrl.load(kept)                        # the page load and Enter say it, once each
    assert notes == ["1 file(s) were left out because they were not uploaded here: shapes.png"]


# --------------------------------------------------------------------------- token probabilities
def tok(token, logprob, token_id=0, rank=1, top=()):
    from engine.types import TokenLogprob, TopLogprob

    return TokenLogprob(token, token_id, logprob, rank=rank,
                        top=[TopLogprob(t, i, lp) for t, i, lp in top])


class Spans:
    """The panel's HTML as a browser reads it (the standard library's parser): its whole
    text, and each token span's (text, title, style)."""

    def __init__(self, markup: str) -> None:
        from html.parser import HTMLParser

        self.text, self.spans = "", []
        outer = self

        class Reader(HTMLParser):
            open_span = None

            def handle_starttag(self, tag, attrs):
                if tag == "span":
                    self.open_span = dict(attrs)
                    outer.spans.append(["", self.open_span.get("title"),
                                        self.open_span.get("style")])

            def handle_endtag(self, tag):
                self.open_span = None

            def handle_data(self, data):
                outer.text += data
                if self.open_span is not None:
                    outer.spans[-1][0] += data

        Reader(convert_charrefs=True).feed(markup)


def test_every_token_becomes_a_span_with_its_probability_and_alternatives():
    import math

    from ui import probs

    tokens = [tok("The", math.log(0.83), 1, top=[("The", 1, math.log(0.83)),
                                                 (" blue", 2, math.log(0.10)),
                                                 (" red", 3, math.log(0.04))]),
              tok(" sky", math.log(0.002), 4, rank=7, top=[(" sea", 5, math.log(0.5))])]
    page = Spans(probs.annotate("The sky", tokens))
    assert page.text == "The sky"
    assert page.spans[0][:2] == ["The", "p=0.83 · alternatives: ' blue' 0.10, ' red' 0.04"]
    assert page.spans[1][:2] == [" sky", "p=2.0e-03 (rank 7) · alternatives: ' sea' 0.50"]
    shades = [float(style.split(",")[-1].rstrip(")")) for *_, style in page.spans]
    assert shades == [round(0.5 * 0.17, 2), round(0.5 * 0.998, 2)]    # the unlikely stands out


@pytest.mark.parametrize("answer, tokens", [
    # markup, entities and quotes in the text and in the alternatives
    ('<b>&amp; "x"', [tok("<b>", -0.1, top=[("<i>", 9, -3.0)]), tok("&amp;", -0.2),
                      tok(' "x"', -0.3, top=[(" 'y'", 8, -2.0)])]),
    # line breaks, a tab and a carriage return, kept as they are
    ("a\n\nb\tc\r\nd", [tok("a", -0.1), tok("\n\n", -0.2), tok("b", -0.3), tok("\tc", -0.4),
                       tok("\r\n", -0.5), tok("d", -0.6)]),
    # a character split over two tokens: the first shows nothing (vLLM's repair), or U+FFFD
    ("café", [tok("caf", -0.1), tok("", -0.2), tok("é", -0.3)]),
    ("café ok", [tok("caf", -0.1), tok("\ufffd", -0.2), tok("\ufffd", -0.3), tok(" ok", -0.4)]),
    # the end-of-turn token the answer leaves out; a special token in the middle
    ("Yes.", [tok("Yes", -0.1), tok(".", -0.2), tok("<|im_end|>", -0.01)]),
    ("ab", [tok("a", -0.1), tok("<|box_start|>", -1.0), tok("b", -0.2)]),
    # tokens that match nothing (another tokenizer's pieces), and no tokens at all
    ("hello world", [tok("▁hello", -0.1), tok("▁world", -0.2)]),
    ("plain", []),
    ("", [tok("<|im_end|>", -0.1)]),
])
def test_the_panel_shows_the_answer_exactly_whatever_the_tokens_say(answer, tokens):
    from ui import probs

    markup = probs.annotate(answer, tokens)
    page = Spans(markup)
    assert page.text == answer                          # what is read is the answer
    assert "".join(p.text for p in probs.align(answer, tokens)) == answer
    assert "<b>" not in markup and "<i>" not in markup  # no token's text is markup
    named = [t for p in probs.align(answer, tokens) for t in p.tokens]
    assert named == list(tokens) if answer else named == []   # every token in one tooltip
    for text, title, _ in page.spans:
        assert title and "p=" in title and "\r" not in title and "\t" not in title


def test_a_token_split_character_and_a_left_out_token_are_named_in_the_tooltip():
    from ui import probs

    split = probs.align("café ok", [tok("caf", -0.1), tok("\ufffd", -0.2), tok("\ufffd", -0.3),
                                    tok(" ok", -0.4)])
    assert [p.text for p in split] == ["caf", "é", " ok"]
    assert probs.title(split[1]) == "'\ufffd' p=0.82\n'\ufffd' p=0.74"
    end = probs.align("Yes.", [tok("Yes", -0.1), tok(".", -0.2), tok("<|im_end|>", -0.01)])
    assert [p.text for p in end] == ["Yes", "."]
    assert probs.title(end[1]) == "'.' p=0.82\n'<|im_end|>' p=0.99"
    assert probs.quoted("a\n\t'\\\x01") == "'a\\n\\t\\'\\\\\\x01'"


def test_the_page_asks_for_logprobs_only_when_the_setting_is_on():
    from ui import probs

    assert Sampling().params().logprobs is None
    assert Sampling(token_probs=True).params().logprobs == probs.TOP == 5
    refused = InvalidRequestError("Requested sample logprobs of 5, which is greater than max "
                                  "allowed: 0", param="logprobs")
    from ui.chat import error_message
    assert error_message(refused).endswith("Turn *Show token probabilities* off in the settings.")


def test_the_finished_answer_is_annotated_with_the_engines_own_logprobs(tiny_engine, uploads):
    """Through the page's controller on the built-in model: the panel is emptied when the
    answer starts and filled when it ends, with the answer's text and, in each token's
    tooltip, the probability the engine gives for that token (asked directly, greedily)."""
    import math

    from engine.types import GenerationRequest, SamplingParams, TextDelta
    from ui import probs

    c = ChatController(tiny_engine, (uploads.resolve(), ASSETS.resolve()))
    question = {"text": "How many shapes are there, and what colours are they?",
                "files": [str(ASSETS / "shapes.png")]}
    state, _, _ = c.add_user_turn(history.new_state(), question, None, Req())
    sampling = Sampling(max_tokens=48, temperature=0.0, token_probs=True)
    steps = run(lambda: c.steps(state, sampling, Req()))
    assert steps[0].probs == probs.EMPTY_NOTE and all(s.probs is None for s in steps[1:-1])
    answer = steps[-1].state["turns"][-1]["text"]
    page = Spans(steps[-1].probs)
    assert page.text == answer and answer.startswith("There are 4 shapes")

    direct = GenerationRequest(history.to_conversation(state),
                               SamplingParams(max_tokens=48, temperature=0.0, logprobs=5))
    logprobs = [lp for event in tiny_engine.submit(direct, c.policy).events(timeout=60)
                if isinstance(event, TextDelta) for lp in event.logprobs or []]
    assert [t.token for t in logprobs[:-1]] == [text for text, *_ in page.spans]
    for (text, title, _), lp in zip(page.spans[:-1], logprobs):
        assert title == probs.describe(lp) and title.startswith(
            f"p={math.exp(lp.logprob):.2f} · alternatives: "), (text, title)
        others = [t for t in lp.top if t.token_id != lp.token_id]
        assert len(lp.top) == probs.TOP and len(others) == probs.TOP - 1   # it is the likeliest
        assert all(f"{probs.quoted(t.token)} {probs.probability(t.logprob)}" in title
                   for t in others)
    end = page.spans[-1][1].split("\n")              # the end-of-turn token named after it
    assert end == [f"{probs.quoted(lp.token)} {probs.describe(lp)}" for lp in logprobs[-2:]]
    assert logprobs[-1].token == "<|im_end|>"

    off = run(lambda: c.steps(state, Sampling(max_tokens=8, temperature=0.0), Req()))
    assert off[-1].probs is None                      # off: the panel is left as it is


def test_the_token_probabilities_switch_is_kept_with_the_json_mode():
    from ui.callbacks import Callbacks

    kept, panel = Callbacks.on_token_probs("object", "", "", True)
    assert kept == {"mode": "object", "schema": "", "fields": "", "token_probs": True}
    assert panel["visible"] is True
    assert Callbacks.on_json_mode("fields", "", "a", True)[3]["token_probs"] is True
    mode, *_, token_probs, panel = Callbacks.on_load_settings(kept)
    assert (mode, token_probs, panel["visible"]) == ("object", True, True)
    for junk in (None, {"token_probs": "yes"}, {"token_probs": 1}, []):
        assert Callbacks.on_load_settings(junk)[4] is False
