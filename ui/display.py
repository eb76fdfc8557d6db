"""What the chatbot shows for a state: messages-format dicts rendered as
markdown. Display only: nothing here is ever read back to build a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .history import State

STOPPED_NOTE = "*(stopped)*"
QUEUE_NOTE = "*Waiting for the device: number {pos} in the queue…*"
STARTING_NOTE = "*Reading the images and the question…*"
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
    out: list[dict] = []
    for turn in state["turns"]:
        if turn["role"] == "user":
            for f in turn["files"]:
                out.append({"role": "user", "content": _file_content(f)})
            if turn["text"]:
                out.append({"role": "user", "content": turn["text"]})
            continue
        text = turn["text"]
        if turn["finish"] == "cancelled":
            text = f"{text} {STOPPED_NOTE}" if text else STOPPED_NOTE
        if text:
            out.append({"role": "assistant", "content": text})
        if turn.get("error"):
            out.append({"role": "assistant", "content": format_error(turn["error"])})
        stats = format_stats(turn.get("stats"), turn["finish"])
        if stats:
            out.append({"role": "assistant", "content": stats})
    if streaming is not None:
        out.append({"role": "assistant", "content": streaming})
    return out
