"""The typed conversation the browser keeps (gr.BrowserState): plain dicts of
turns, each with its text and the server paths of its files. The engine's
Conversation is built from these turns, never from the chatbot's display, and
the JSON export/import lives here because it is the same data.

State shape (version 1):

    {"version": 1, "system": "...", "turns": [
        {"role": "user", "text": "...", "files": [{"path": "/tmp/gradio/.../a.png", "name": "a.png"}]},
        {"role": "assistant", "text": "...", "finish": "stop", "error": null, "stats": {...},
         "figures": [{"path": ".../qwenvl-figures/a-boxes.png", "name": ...}],  # boxes drawn
         "rating": "like" | "dislike" | null, "id": "...",    # id: the server's record of it
         "format": "json"},                 # only for an answer held to JSON (JSON mode)
    ]}

The browser can edit what it stores, so every state that comes back is
re-validated (`clean_state`): file paths outside the upload folder and
`assets/` are dropped, unknown keys are ignored, and files are bounded per turn and per
chat (the newest kept), each distinct path resolved once.

The export (`export_json`, format version 2) embeds each distinct file once, in a top-level
"files" map of id -> data: URI that the turns' files name by "ref", and at most
`max_bytes` of file bytes; a file beyond that is written as {"name", "omitted": true}.
`import_json` reads version 2 and the older inline {"name", "data"} entries alike.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import mimetypes
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from engine.errors import InvalidRequestError
from engine.types import Conversation, ImageInput, Message, VideoInput

STATE_VERSION = 1
EXPORT_FORMAT = "qwen-vl-chat"
EXPORT_VERSION = 2          # 2: files embedded once, in "files"; 1: inline "data" per entry
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")
DOCUMENT_SUFFIXES = (".pdf",)      # rendered to one picture per page when attached
UPLOAD_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES + DOCUMENT_SUFFIXES
MAX_TURNS = 400
MAX_TEXT_CHARS = 200_000
MAX_FILES_PER_TURN = 16     # files one question may name (kept, imported or sent)
MAX_FILES_PER_CHAT = 64     # files all questions of a chat together (and as many drawn figures)
MAX_NAME_CHARS = 255        # of a file's name as kept
MAX_PATH_CHARS = 4096       # a longer path is no file of ours
EXPORT_MAX_BYTES = 64 * 1024 * 1024   # file bytes one export embeds; the rest is left out
RATINGS = ("like", "dislike")
FORMATS = ("json",)         # an answer's "format", when it is not free text

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


def _name(value: Any) -> str:
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else ""


class _FileBudget:
    """The files a kept chat may name: at most MAX_FILES_PER_TURN looked at per turn and
    MAX_FILES_PER_CHAT per chat (questions' files and drawn figures counted apart); each
    distinct path resolved once, however often it is named."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots
        self.left = {"files": MAX_FILES_PER_CHAT, "figures": MAX_FILES_PER_CHAT}
        self.inside: dict[str, bool] = {}

    def allowed(self, path: str) -> bool:
        if path not in self.inside:
            self.inside[path] = len(path) <= MAX_PATH_CHARS and inside_roots(Path(path),
                                                                             self.roots)
        return self.inside[path]

    def take(self, raw: Any, kind: str, dropped: list[str]) -> list[dict]:
        """The {path, name} entries of one turn whose path lies inside the roots; the others'
        names go to `dropped` (never read). Entries past the caps are not looked at."""
        files = []
        for f in raw[:MAX_FILES_PER_TURN] if isinstance(raw, list) else []:
            if self.left[kind] <= 0:
                break
            if not (isinstance(f, dict) and isinstance(f.get("path"), str) and f["path"]):
                continue
            self.left[kind] -= 1
            name = _name(f.get("name"))
            if self.allowed(f["path"]):
                path = Path(f["path"])
                files.append({"path": str(path), "name": name or path.name})
            else:
                dropped.append(name or Path(f["path"][:MAX_PATH_CHARS]).name)
        return files


_ANSWER_ID = re.compile(r"[0-9a-f]{1,64}")


def _clean_turn(turn: Any, budget: _FileBudget, dropped: list[str]) -> dict | None:
    if not isinstance(turn, dict):
        return None
    if turn.get("role") == "user":
        return {"role": "user", "text": _text(turn.get("text")),
                "files": budget.take(turn.get("files"), "files", dropped)}
    if turn.get("role") != "assistant":
        return None
    finish = turn.get("finish")
    stats = turn.get("stats")
    rating = turn.get("rating")
    clean = {
        "role": "assistant", "text": _text(turn.get("text")),
        "finish": finish if finish in ("stop", "length", "cancelled", "error") else "stop",
        "error": _text(turn.get("error")) or None,
        "stats": {k: v for k, v in stats.items() if isinstance(k, str)
                  and (v is None or isinstance(v, (int, float)))}
        if isinstance(stats, dict) else None,
        "figures": budget.take(turn.get("figures"), "figures", dropped),
        "rating": rating if rating in RATINGS else None}
    if turn.get("format") in FORMATS:
        clean["format"] = turn["format"]
    answer_id = turn.get("id")
    if isinstance(answer_id, str) and _ANSWER_ID.fullmatch(answer_id):
        clean["id"] = answer_id          # names the server's own record (feedback)
    return clean


def clean_state(raw: Any, roots: Iterable[Path], dropped: list[str] | None = None) -> State:
    """A well-formed state from whatever the browser sent; files outside `roots` (after
    resolving links and `..`) are dropped, never read, and their names added to `dropped`.
    The newest turns' files are kept when the chat names more than the caps allow (so the
    question being asked keeps its files); linear in the state's size."""
    roots = [Path(r).resolve() for r in roots]
    state = new_state()
    if not isinstance(raw, dict):
        return state
    state["system"] = _text(raw.get("system"))
    turns = raw.get("turns")
    if not isinstance(turns, list):
        return state
    budget = _FileBudget(roots)
    kept: list[dict] = []
    drops: list[list[str]] = []
    for turn in reversed(turns[-MAX_TURNS:]):
        drops.append([])
        clean = _clean_turn(turn, budget, drops[-1])
        if clean is not None:
            kept.append(clean)
    state["turns"] = kept[::-1]
    if dropped is not None:
        dropped.extend(name for names in reversed(drops) for name in names)
    return state


def files_in(state: State) -> int:
    """How many files the chat's questions name."""
    return sum(len(t["files"]) for t in state["turns"] if t["role"] == "user")


def file_room(state: State) -> int:
    """How many files the next question may still carry (per turn and per chat caps)."""
    return max(0, min(MAX_FILES_PER_TURN, MAX_FILES_PER_CHAT - files_in(state)))


# ----------------------------------------------------------------------------- editing
def user_turn(text: str, paths: Iterable[str], room: int = MAX_FILES_PER_TURN) -> dict:
    """A question naming at most `room` of `paths` (never more than MAX_FILES_PER_TURN);
    pass `file_room(state)` so the chat's cap holds too, and tell the user about the rest."""
    keep = max(0, min(room, MAX_FILES_PER_TURN))
    return {"role": "user", "text": text or "",
            "files": [{"path": str(p), "name": Path(p).name}
                      for p in itertools.islice(paths, keep)]}


def assistant_turn(text: str, finish: str, stats: dict | None = None,
                   error: str | None = None, figures: Iterable[str] = (),
                   answer_format: str | None = None) -> dict:
    """An answer; `figures`: pictures drawn for it (its boxes on the question's pictures);
    `answer_format` "json" for an answer held to JSON (shown as a formatted code block)."""
    turn = {"role": "assistant", "text": text, "finish": finish, "error": error, "stats": stats,
            "figures": [{"path": str(p), "name": Path(p).name} for p in figures],
            "rating": None}
    if answer_format in FORMATS:
        turn["format"] = answer_format
    return turn


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
            raise unsupported(f["name"])
    return Message("user", turn["text"], images=images, videos=videos)


def unsupported(name: str) -> InvalidRequestError:
    """The one-line refusal of a file that is neither a picture nor a video."""
    return InvalidRequestError(
        f"Unsupported file {name!r}: send images "
        f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) or videos "
        f"({', '.join(s.lstrip('.') for s in VIDEO_SUFFIXES)}).", param="file")


def media_seen(state: State) -> int:
    """The pictures and videos of the chat that the model sees with the next question: those
    of answered exchanges still on the server (`to_conversation` leaves a failed exchange
    out, so a picture shown above a failed answer is not among them)."""
    turns = state["turns"]
    return sum(1 for i, t in enumerate(turns) if t["role"] == "user" and _answered(turns, i)
               for f in t["files"] if media_kind(f["path"]) and Path(f["path"]).is_file())


def names_file(message: str, name: str) -> bool:
    """Whether an error message names the file `name` (the engine's refusals name the file
    they refuse), as a whole name, not a part of a longer one."""
    whole = rf"(?<![\w.-]){re.escape(name)}(?![\w-])"
    return bool(name) and re.search(whole, message) is not None


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
def _read_within(path: str, room: int) -> bytes | None:
    """The file's bytes when they fit in `room`; None when they do not (never read past)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size > room:
            return None
        data = fh.read(room + 1)
    return data if len(data) <= room else None


class _Embedder:
    """Each distinct file of an export embedded once, while the byte budget lasts."""

    def __init__(self, max_bytes: int) -> None:
        self.room = max(0, int(max_bytes))
        self.files: dict[str, str] = {}           # id -> data: URI (the export's "files")
        self.entry_of: dict[str, dict] = {}       # path -> what a turn's entry says of it
        self.left_out: list[str] = []             # names of files over the budget

    def entry(self, f: dict) -> dict:
        """{"name", "ref"} for an embedded file, else "omitted" (over the budget) or
        "missing" (no longer on the server)."""
        found = self.entry_of.get(f["path"])
        if found is None:
            found = self.entry_of[f["path"]] = self._embed(f)
        return {"name": f["name"], **found}

    def _embed(self, f: dict) -> dict:
        try:
            data = _read_within(f["path"], self.room)
        except OSError:
            return {"missing": True}
        if data is None:
            self.left_out.append(f["name"])
            return {"omitted": True}
        self.room -= len(data)
        ref = f"f{len(self.files) + 1}"
        mime = mimetypes.guess_type(f["name"])[0] or "application/octet-stream"
        self.files[ref] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        return {"ref": ref}


def export_json(state: State, model: str = "", max_bytes: int = EXPORT_MAX_BYTES,
                left_out: list[str] | None = None) -> str:
    """The chat as a self-contained JSON document: each distinct file embedded once (a
    data: URI in "files", named by the turns' "ref"), at most `max_bytes` of file bytes in
    all; the names of files left out for the budget are added to `left_out`, so the page
    can say so. A chat naming one file many times costs that file once."""
    embed = _Embedder(max_bytes)
    turns = []
    for turn in state["turns"]:
        turn = dict(turn)
        turn.pop("figures", None)      # drawn here from the answer: not part of the export
        if turn["role"] == "user":
            turn["files"] = [embed.entry(f) for f in turn["files"]]
        turns.append(turn)
    doc = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": model,
           "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "system": state.get("system", ""), "turns": turns, "files": embed.files}
    if left_out is not None:
        left_out.extend(embed.left_out)
    return json.dumps(doc, ensure_ascii=False, indent=1)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class _Unpacker:
    """Writes an export's embedded files under one new folder: each distinct file once, at
    most MAX_FILES_PER_CHAT of them, none decoded past the caps."""

    def __init__(self, shared: Any, folder: Path, left_out: list[str]) -> None:
        self.shared = shared if isinstance(shared, dict) else {}
        self.folder = folder
        self.left_out = left_out
        self.room = MAX_FILES_PER_CHAT
        self.written: dict[tuple[str, str], str] = {}     # (suffix, data URI) -> path

    def files(self, raw: Any) -> list[dict]:
        """The {path, name} entries of one exported turn (old inline "data" or "ref")."""
        out = []
        for f in raw[:MAX_FILES_PER_TURN] if isinstance(raw, list) else []:
            if self.room <= 0:
                break
            if not isinstance(f, dict):
                continue
            name = _SAFE_NAME.sub("_", str(f.get("name") or "file")[:MAX_NAME_CHARS])[-80:]
            if media_kind(name) is None:
                continue
            ref = f.get("ref")
            data = self.shared.get(ref) if isinstance(ref, str) else f.get("data")
            if not isinstance(data, str):
                if f.get("omitted") or f.get("missing") or ref is not None:
                    self.left_out.append(name)
                continue
            self.room -= 1
            out.append({"path": self._write(name, data), "name": name})
        return out

    def _write(self, name: str, data: str) -> str:
        key = (Path(name).suffix.lower(), data)
        if key in self.written:
            return self.written[key]
        header, sep, payload = data.partition(",")
        if not sep or not header.startswith("data:") or not header.endswith(";base64"):
            raise InvalidRequestError(f"Not a chat export: file {name!r} is not a "
                                      "base64 data: URI.")
        try:
            content = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"Not a chat export: file {name!r} has invalid "
                                      "base64.") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.written)}-{name}"
        path.write_bytes(content)
        self.written[key] = str(path)
        return str(path)


def import_json(text: str | bytes, dest: Path, left_out: list[str] | None = None) -> State:
    """A state from an exported document (version 2's shared "files" or version 1's inline
    "data"); embedded files are written under `dest`, each distinct one once, within the
    per-turn and per-chat caps (the newest turns' files kept, as `clean_state` keeps them).
    Names of files the export did not carry are added to `left_out`.

    Raises InvalidRequestError with a one-line reason for anything malformed.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"Not a chat export: invalid JSON ({exc}).") from None
    except RecursionError:
        raise InvalidRequestError("Not a chat export: JSON nested too deeply.") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT \
            or not isinstance(doc.get("turns"), list):
        raise InvalidRequestError(
            f"Not a chat export: expected a JSON object with format {EXPORT_FORMAT!r} and turns.")
    missing: list[str] = []
    unpack = _Unpacker(doc.get("files"), dest / uuid.uuid4().hex[:12], missing)
    raw_turns = []
    for turn in reversed(doc["turns"][-MAX_TURNS:]):      # newest first: they keep their files
        if isinstance(turn, dict) and turn.get("role") == "user":
            raw_turns.append({"role": "user", "text": turn.get("text"),
                              "files": unpack.files(turn.get("files"))})
        else:
            raw_turns.append(turn)
    if left_out is not None:
        left_out.extend(reversed(missing))
    return clean_state({"system": doc.get("system"), "turns": raw_turns[::-1]}, [dest])
