"""The typed conversation the browser keeps (gr.BrowserState): plain dicts of
turns, each with its text and the server paths of its files. The engine's
Conversation is built from these turns, never from the chatbot's display, and
the JSON export/import lives here because it is the same data.

State shape (version 1):

    {"version": 1, "system": "...", "turns": [
        {"role": "user", "text": "...", "files": [{"path": "/tmp/gradio/.../a.png", "name": "a.png"}]},
        {"role": "assistant", "text": "...", "finish": "stop", "error": null, "stats": {...},
         "figures": [{"path": ".../qwenvl-figures/a-boxes.png", "name": ...}],  # boxes drawn
         "rating": "like" | "dislike" | null},
    ]}

The browser can edit what it stores, so every state that comes back is
re-validated (`clean_state`): file paths outside the upload folder and
`assets/` are dropped, unknown keys are ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from engine.errors import InvalidRequestError
from engine.types import Conversation, ImageInput, Message, VideoInput

STATE_VERSION = 1
EXPORT_FORMAT = "qwen-vl-chat"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")
DOCUMENT_SUFFIXES = (".pdf",)      # rendered to one picture per page when attached
UPLOAD_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES + DOCUMENT_SUFFIXES
MAX_TURNS = 400
MAX_TEXT_CHARS = 200_000
RATINGS = ("like", "dislike")

State = dict[str, Any]


def new_state(system: str = "") -> State:
    return {"version": STATE_VERSION, "system": system, "turns": []}


def media_kind(path: str) -> str | None:
    """"image", "video" or None from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def inside_roots(path: Path, roots: Iterable[Path]) -> bool:
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return False
    return any(real.is_relative_to(root) for root in roots)


def _text(value: Any) -> str:
    return value[:MAX_TEXT_CHARS] if isinstance(value, str) else ""


def clean_state(raw: Any, roots: Iterable[Path], dropped: list[str] | None = None) -> State:
    """A well-formed state from whatever the browser sent; files outside `roots` (after
    resolving links and `..`) are dropped, never read, and their names added to `dropped`."""
    roots = [Path(r).resolve() for r in roots]
    state = new_state()
    if not isinstance(raw, dict):
        return state
    state["system"] = _text(raw.get("system"))
    turns = raw.get("turns")
    if not isinstance(turns, list):
        return state
    for turn in turns[-MAX_TURNS:]:
        if not isinstance(turn, dict):
            continue
        if turn.get("role") == "user":
            state["turns"].append({"role": "user", "text": _text(turn.get("text")),
                                   "files": _files(turn.get("files"), roots, dropped)})
        elif turn.get("role") == "assistant":
            finish = turn.get("finish")
            stats = turn.get("stats")
            rating = turn.get("rating")
            state["turns"].append({
                "role": "assistant", "text": _text(turn.get("text")),
                "finish": finish if finish in ("stop", "length", "cancelled", "error") else "stop",
                "error": _text(turn.get("error")) or None,
                "stats": {k: v for k, v in stats.items() if isinstance(k, str)
                          and (v is None or isinstance(v, (int, float)))}
                if isinstance(stats, dict) else None,
                "figures": _files(turn.get("figures"), roots, dropped),
                "rating": rating if rating in RATINGS else None})
    return state


def _files(raw: Any, roots: list[Path], dropped: list[str] | None) -> list[dict]:
    """The {path, name} entries whose path lies inside `roots`; the others' names go to
    `dropped` (never read)."""
    files = []
    for f in raw if isinstance(raw, list) else []:
        if isinstance(f, dict) and isinstance(f.get("path"), str) and f["path"]:
            path = Path(f["path"])
            if inside_roots(path, roots):
                files.append({"path": str(path), "name": _text(f.get("name")) or path.name})
            elif dropped is not None:
                dropped.append(_text(f.get("name")) or path.name)
    return files


# ----------------------------------------------------------------------------- editing
def user_turn(text: str, paths: Iterable[str]) -> dict:
    return {"role": "user", "text": text or "",
            "files": [{"path": str(p), "name": Path(p).name} for p in paths]}


def assistant_turn(text: str, finish: str, stats: dict | None = None,
                   error: str | None = None, figures: Iterable[str] = ()) -> dict:
    """An answer; `figures`: pictures drawn for it (its boxes on the question's pictures)."""
    return {"role": "assistant", "text": text, "finish": finish, "error": error, "stats": stats,
            "figures": [{"path": str(p), "name": Path(p).name} for p in figures],
            "rating": None}


def pictures_for(state: State, index: int) -> list[str]:
    """The pictures an answer at turn `index` is about: its question's, else the latest
    pictures earlier in the chat (a follow-up such as "now find the cars")."""
    for turn in reversed(state["turns"][:index]):
        if turn["role"] == "user":
            found = [f["path"] for f in turn["files"] if media_kind(f["path"]) == "image"]
            if found:
                return found
    return []


def edit_user_turn(state: State, index: int, text: str) -> bool:
    """Replace user turn `index`'s text (its files stay) and drop every later turn, so the
    chat reruns from there. False when `index` is not a user turn."""
    turns = state["turns"]
    if not 0 <= index < len(turns) or turns[index]["role"] != "user":
        return False
    turns[index]["text"] = text
    del turns[index + 1:]
    return True


def pending_user_turn(state: State) -> dict | None:
    """The last turn when it is a user turn still waiting for its answer."""
    turns = state["turns"]
    return turns[-1] if turns and turns[-1]["role"] == "user" else None


def drop_last_answer(state: State) -> bool:
    """Remove the answer(s) after the last user turn, so it can be asked again."""
    turns = state["turns"]
    if not any(t["role"] == "user" for t in turns):
        return False
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return True


def pop_last_exchange(state: State) -> dict | None:
    """Remove the last user turn and its answer; returns that user turn."""
    turns = state["turns"]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns.pop() if turns else None


# ----------------------------------------------------------------------------- engine
def _answered(turns: list[dict], i: int) -> bool:
    """True when user turn i is followed by a usable answer (no error, some text)."""
    nxt = turns[i + 1] if i + 1 < len(turns) else None
    return bool(nxt and nxt["role"] == "assistant" and not nxt.get("error")
                and nxt.get("text", "").strip())


def user_message(turn: dict, skip_missing: bool = False) -> Message:
    """A user turn as the engine's Message; a file of an unknown kind is a clear error.

    `skip_missing` drops files no longer on disk (an old turn after the upload
    folder was cleaned): the chat goes on without them instead of failing.
    """
    images, videos = [], []
    for f in turn["files"]:
        if skip_missing and not Path(f["path"]).is_file():
            continue
        kind = media_kind(f["path"])
        if kind == "image":
            images.append(ImageInput(f["path"]))
        elif kind == "video":
            videos.append(VideoInput(f["path"]))
        else:
            raise InvalidRequestError(
                f"Unsupported file {f['name']!r}: send images "
                f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) or videos "
                f"({', '.join(s.lstrip('.') for s in VIDEO_SUFFIXES)}).", param="file")
    return Message("user", turn["text"], images=images, videos=videos)


def to_conversation(state: State, system: str | None = None) -> Conversation:
    """The engine's view of the chat: answered exchanges plus the pending user turn.

    Exchanges whose answer failed (or is empty) are left out, so one bad
    file or an over-long prompt does not poison every later request.
    """
    turns = state["turns"]
    if pending_user_turn(state) is None:
        raise InvalidRequestError("Nothing to answer: send a message first.", param="messages")
    messages: list[Message] = []
    last = len(turns) - 1
    for i, turn in enumerate(turns):
        if turn["role"] != "user":
            continue
        if i == last:
            messages.append(user_message(turn))
        elif _answered(turns, i):
            messages.append(user_message(turn, skip_missing=True))
            messages.append(Message("assistant", turns[i + 1]["text"]))
    system = state.get("system", "") if system is None else system
    return Conversation(messages=messages, system=system.strip() or None)


# ----------------------------------------------------------------------------- JSON
def export_json(state: State, model: str = "") -> str:
    """The chat as a self-contained JSON document (files embedded as data: URIs)."""
    turns = []
    for turn in state["turns"]:
        turn = dict(turn)
        turn.pop("figures", None)      # drawn here from the answer: not part of the export
        if turn["role"] == "user":
            files = []
            for f in turn["files"]:
                entry: dict[str, Any] = {"name": f["name"]}
                try:
                    data = Path(f["path"]).read_bytes()
                    mime = mimetypes.guess_type(f["name"])[0] or "application/octet-stream"
                    entry["data"] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
                except OSError:
                    entry["missing"] = True
                files.append(entry)
            turn["files"] = files
        turns.append(turn)
    doc = {"format": EXPORT_FORMAT, "version": STATE_VERSION, "model": model,
           "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "system": state.get("system", ""), "turns": turns}
    return json.dumps(doc, ensure_ascii=False, indent=1)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def import_json(text: str | bytes, dest: Path) -> State:
    """A state from an exported document; embedded files are written under `dest`.

    Raises InvalidRequestError with a one-line reason for anything malformed.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"Not a chat export: invalid JSON ({exc}).") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT \
            or not isinstance(doc.get("turns"), list):
        raise InvalidRequestError(
            f"Not a chat export: expected a JSON object with format {EXPORT_FORMAT!r} and turns.")
    folder = dest / uuid.uuid4().hex[:12]
    raw_turns = []
    for turn in doc["turns"][-MAX_TURNS:]:
        if not isinstance(turn, dict):
            continue
        if turn.get("role") == "user":
            paths = []
            for n, f in enumerate(turn.get("files") or []):
                if not isinstance(f, dict) or not isinstance(f.get("data"), str):
                    continue
                name = _SAFE_NAME.sub("_", str(f.get("name") or "file"))[-80:] or "file"
                if media_kind(name) is None:
                    continue
                header, sep, payload = f["data"].partition(",")
                if not sep or not header.startswith("data:") or not header.endswith(";base64"):
                    raise InvalidRequestError(f"Not a chat export: file {name!r} is not a "
                                              "base64 data: URI.")
                try:
                    data = base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidRequestError(f"Not a chat export: file {name!r} has invalid "
                                              "base64.") from None
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{len(raw_turns)}-{n}-{name}"
                path.write_bytes(data)
                paths.append({"path": str(path), "name": name})
            raw_turns.append({"role": "user", "text": turn.get("text"), "files": paths})
        else:
            raw_turns.append(turn)
    return clean_state({"system": doc.get("system"), "turns": raw_turns}, [dest])
