"""What the chatbot shows for a state: messages-format dicts rendered as
markdown. Display only: nothing here is ever read back to build a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .history import State

STOPPED_NOTE = "*(stopped)*"
QUEUE_NOTE = "*Waiting for the device: number {pos} in the queue…*"
STARTING_NOTE = "*Reading the images and the question…*"
FILES_NOTE = "<sub>{names}</sub>"
REASONS = {"stop": "", "length": " · hit max tokens", "cancelled": " · stopped", "error": " · error"}


def format_stats(stats: dict | None, finish: str) -> str:
    """One small line under an answer: time to first token, speed, tokens."""
    if not stats:
        return ""
    parts = []
    ttft = stats.get("ttft_s")
    if ttft is not None:
        parts.append(f"first token {ttft:.2f} s")
    tps = stats.get("decode_tps") or stats.get("output_tps")
    if tps:
        parts.append(f"{tps:.1f} tokens/s")
    parts.append(f"{int(stats.get('output_tokens') or 0)} tokens")
    prompt = stats.get("prompt_tokens")
    if prompt:
        parts.append(f"prompt {int(prompt)} tokens")
    return f"<sub>{' · '.join(parts)}{REASONS.get(finish, '')}</sub>"


def format_error(message: str) -> str:
    return f"⚠ **Error:** {message}\n\n<sub>Your message is kept: press **Retry** to send it " \
           f"again, or **Undo** to edit it.</sub>"


def _file_content(f: dict) -> Any:
    if Path(f["path"]).is_file():
        return {"path": f["path"]}
    return f"*(file no longer on the server: {f['name']})*"


def render(state: State, streaming: str | None = None) -> list[dict]:
    """Chatbot messages for the state; `streaming` is the answer still being written."""
    return render_indexed(state, streaming)[0]


def render_indexed(state: State, streaming: str | None = None) -> tuple[list[dict], list[int]]:
    """The messages, and for each the index of the turn it shows (-1: the streaming
    answer), so an edit or a rating on a message reaches its turn."""
    out: list[dict] = []
    owner: list[int] = []

    def add(i: int, role: str, content: Any) -> None:
        out.append({"role": role, "content": content})
        owner.append(i)

    for i, turn in enumerate(state["turns"]):
        if turn["role"] == "user":
            # The text first, the file names last: Gradio 6.31's Chatbot offers Edit only
            # when a group ends in text, and sends the edit of a group from its first message
            # on, stopping at the first picture (it cannot edit those).
            if turn["text"]:
                add(i, "user", turn["text"])
            for f in turn["files"]:
                add(i, "user", _file_content(f))
            if turn["files"]:
                add(i, "user", FILES_NOTE.format(names=" · ".join(f["name"] for f in turn["files"])))
            continue
        text = turn["text"]
        if turn["finish"] == "cancelled":
            text = f"{text} {STOPPED_NOTE}" if text else STOPPED_NOTE
        if text:
            add(i, "assistant", text)
        for f in turn.get("figures") or []:
            add(i, "assistant", _file_content(f))
        if turn.get("error"):
            add(i, "assistant", format_error(turn["error"]))
        stats = format_stats(turn.get("stats"), turn["finish"])
        if stats:
            add(i, "assistant", stats)
    if streaming is not None:
        add(-1, "assistant", streaming)
    return out, owner
