"""What the chatbot shows for a state: messages-format dicts rendered as
markdown. Display only: nothing here is ever read back to build a prompt.

Two guards for the reader's browser: a message is shown up to MAX_SHOWN_CHARS (a
longer one is cut at a line, an open code fence closed, and a note says the whole is in
Save JSON) and the chat up to MAX_SHOWN_CHAT_CHARS (the newest messages first; older
ones become a one-line note), and nothing in a message loads from elsewhere by itself: Markdown images and
HTML media tags whose source is not a data: URI or a path of this server become plain
links ("[image: alt](url)") that open only when clicked. Both passes are linear in the
text, since they run for every streamed update."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from .history import State

STOPPED_NOTE = "*(stopped)*"
QUEUE_NOTE = "*Waiting for the device: number {pos} in the queue…*"
STARTING_NOTE = "*Reading the images and the question…*"
FILES_NOTE = "<sub>{names}</sub>"
REASONS = {"stop": "", "length": " · hit max tokens", "cancelled": " · stopped", "error": " · error"}
MAX_SHOWN_CHARS = 60_000     # of one message in the chat (a 2 MB answer froze the tab)
MAX_SHOWN_CHAT_CHARS = 300_000   # of all messages' texts together, the newest first
CUT_NOTE = ("<sub>… cut here: this message has {total:,} characters, too many to show. The "
            "whole of it is kept: **Save JSON**.</sub>")
EARLIER_NOTE = ("<sub>(not shown: the chat is too long to show whole; **Save JSON** keeps "
                "every message)</sub>")


# ----------------------------------------------------------------------------- long answers
FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})([^\n]*)$", re.M)


def _open_fence(text: str) -> str:
    """The fence that closes a code block still open at the end of `text` ("" if none):
    CommonMark's rule, a closing fence of the same character at least as long."""
    opened = ""
    for m in FENCE_LINE.finditer(text):
        fence, rest = m.group(1), m.group(2)
        if not opened:
            if not (fence[0] == "`" and "`" in rest):     # a ``` info string has no backtick
                opened = fence
        elif fence[0] == opened[0] and len(fence) >= len(opened) and not rest.strip():
            opened = ""
    return opened


def _head(text: str, limit: int) -> str:
    """The first `limit` characters, ending at a line break when one is near the end."""
    head = text[:limit]
    line = head.rfind("\n", max(0, limit - 2000))
    return head[:line] if line > 0 else head


# ----------------------------------------------------------------------------- remote loads
MEDIA_TAGS = frozenset({"img", "image", "picture", "source", "video", "audio", "track", "input",
                        "embed", "object", "iframe", "frame", "feimage", "use", "mglyph"})
NEVER_TAGS = frozenset({"style", "link", "meta", "base"})   # load or redirect from their content
LOADING_ATTRS = frozenset({"src", "srcset", "poster", "data", "background", "lowsrc", "dynsrc",
                           "xlink:href", "href", "action", "formaction"})
OPAQUE_ATTRS = frozenset({"style", "srcdoc"})  # may load from within (url(), a document)
LINK_TAGS = frozenset({"a", "area"})           # their href waits for a click
_WS = "\t\n\f\r "                              # HTML's whitespace (not Unicode's)
_NAME = rf"[^{_WS}/>][^{_WS}/>=]*+"
_VALUE = rf""""[^"]*+"|'[^']*+'|[^{_WS}>]*+"""
# An HTML start tag as a browser's tokenizer reads it (possessive: linear, no backtracking).
TAG = re.compile(rf"<([A-Za-z][^{_WS}/>]*+)((?:[{_WS}/]++|{_NAME}"
                 rf"(?:[{_WS}]*+=[{_WS}]*+(?:{_VALUE}))?+)*+)>")
ATTR = re.compile(rf"(?P<name>{_NAME})(?:[{_WS}]*+=[{_WS}]*+(?P<value>{_VALUE}))?+")
TAG_START = re.compile(r"<[A-Za-z]")
RISKY_START = re.compile(rf"<(?i:{'|'.join(sorted(MEDIA_TAGS | NEVER_TAGS))})(?=[{_WS}/>]|$)")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
URL_JUNK = re.compile(r"[\t\n\r]")          # a browser removes these from any URL
URL_EDGES = "".join(map(chr, range(0x21)))     # ... and strips these from its ends
# A Markdown image kept as it is: plain alt text and a plain destination (nothing a Markdown
# or HTML parser could decode into something else); any other "![" becomes a link.
PLAIN_IMAGE = re.compile(r"!\[[^\[\]\\\n]{0,500}\]\((?P<src>[^\s()<>\[\]\\\"'`&\x00-\x1f\x7f]"
                         r"{1,4096})\)")


def is_local(url: str) -> bool:
    """True for a data: URI or a path of this server (no scheme, no host); what a browser
    would strip or rewrite (control characters, backslashes) counts as remote."""
    url = URL_JUNK.sub("", url).strip(URL_EDGES)
    if url[:5].lower() == "data:":
        return True
    if "\\" in url or any(ord(c) < 0x20 or ord(c) == 0x7f for c in url):
        return False
    return not url.startswith("//") and SCHEME.match(url) is None


def _escaped(text: str, at: int) -> bool:
    """Whether the character at `at` follows an odd run of backslashes (Markdown escape)."""
    run = 0
    while at - run > 0 and text[at - run - 1] == "\\":
        run += 1
    return run % 2 == 1


def _remote_urls(name: str, attrs: str) -> list[str]:
    """The URLs a tag would load by itself that are not local ("" for what loads from
    within an attribute, such as a style's url(), whose address is not spelled out)."""
    urls = []
    for m in ATTR.finditer(attrs):
        attr = m.group("name").lower()
        value = html.unescape((m.group("value") or "").strip("\"'"))
        if attr in OPAQUE_ATTRS:
            if attr == "srcdoc" or any(c in value for c in "(\\@"):   # url(), @import, escapes
                urls.append("")
        elif attr in LOADING_ATTRS and not (attr == "href" and name in LINK_TAGS):
            candidates = [c.split()[0] for c in value.split(",") if c.split()] \
                if attr == "srcset" else [value]
            urls += [c for c in candidates if not is_local(c)]
    return urls


def _link(text: str, url: str) -> str:
    """A Markdown link the reader may click; nothing in it loads by itself."""
    label = re.sub(r"[\[\]\\<>\n!`*_]", "", text)[:100].strip()
    target = re.sub(r"[<>\s]", "", url)
    return f"[image: {label}](<{target}>)" if label else f"[image](<{target}>)"


def _inner_as_text(tag: str) -> str:
    """A tag's text past its "<" with every media or NEVER tag start inside it (in quoted
    values) shown as text: where Markdown splits the text at a blank line such a start
    would become a tag of its own; inside a value "&lt;" reads the same."""
    return RISKY_START.sub(lambda r: "&lt;" + r.group()[1:], tag[1:])


def _tag(m: re.Match) -> str:
    """A start tag as shown: unchanged when it loads nothing remote; a media tag that does
    becomes a link; any other such tag is shown as text."""
    name = m.group(1).lower()
    urls = [] if name in NEVER_TAGS else _remote_urls(name, m.group(2))
    if not urls and name not in NEVER_TAGS:
        return "<" + _inner_as_text(m.group())
    url = next((u for u in urls if u), "")
    if name not in MEDIA_TAGS or not url:
        return "&lt;" + _inner_as_text(m.group())
    alt = next((html.unescape((a.group("value") or "").strip("\"'"))
                for a in ATTR.finditer(m.group(2)) if a.group("name").lower() == "alt"), "")
    return _link(alt, url)


def _no_remote_tags(text: str, cut_here: bool = False) -> str:
    """HTML start tags that would load something remote, rewritten (see `_tag`). A tag that
    never ends (the rest of the text inside it) may still be split by Markdown, so every
    media or NEVER tag after it is shown as text; so is the unended tag itself when the
    text is `cut_here` (what the chat appends after it must not fall inside it)."""
    out, pos = [], 0
    while (start := TAG_START.search(text, pos)) is not None:
        at = start.start()
        m = TAG.match(text, at)
        if m is None:
            rest = RISKY_START.sub(lambda r: "&lt;" + r.group()[1:], text[at:])
            out += [text[pos:at], "&lt;" + rest[1:] if cut_here and rest[0] == "<" else rest]
            return "".join(out)
        out += [text[pos:at], _tag(m)]
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _no_remote_images(text: str) -> str:
    """Markdown images ("![alt](src)", reference ones too) as links unless plainly local."""
    out, pos = [], 0
    at = text.find("![")
    while at >= 0:
        if _escaped(text, at):
            at = text.find("![", at + 2)
            continue
        m = PLAIN_IMAGE.match(text, at)
        if m is not None and is_local(m.group("src")):
            at = text.find("![", m.end())
            continue
        before = text[pos:at]
        if before.endswith("!") and not _escaped(text, at - 1):
            before = before[:-1] + "\\!"         # "!" + "[image..." would be an image again
        out += [before, "[image]" if text.startswith("![]", at) else "[image: "]
        pos = at + (3 if text.startswith("![]", at) else 2)
        at = text.find("![", pos)
    out.append(text[pos:])
    return "".join(out)


def _safe(text: str, cut_here: bool = False) -> str:
    """The text with nothing that loads from another site by itself."""
    if "<" in text:
        text = _no_remote_tags(text, cut_here)
    if "![" in text:
        text = _no_remote_images(text)
    return text


def shown(text: str, limit: int | None = None) -> str:
    """A message's text as the chat shows it: with nothing that loads from another site by
    itself and, when `limit` is given, at most about `limit` characters: a longer text is
    cut at a line, an open code fence closed, and a note says the whole is kept."""
    if limit is None or len(text) <= limit:
        whole = _safe(text)
        if limit is None or len(whole) <= limit:
            return whole
    head = _safe(_head(text, limit), cut_here=True)
    if len(head) > limit:                  # links are longer than the images they replace
        head = _no_remote_tags(_head(head, limit), cut_here=True)
    fence = _open_fence(head)
    closing = f"\n{fence}" if fence else ""
    return f"{head}{closing}\n\n{CUT_NOTE.format(total=len(text))}"


BACKTICKS = re.compile(r"`+")
JSON_LINE = 72          # a JSON value this short (and not nested deeper) stays on one line
JSON_NESTED = 16        # deeper than this, a value is written compact on one line


def _pretty(value: Any, depth: int = 0) -> str:
    """JSON indented by two spaces, except that a short container stays on one line (a box
    reads {"bbox_2d": [10, 20, 30, 40], "label": "cat"}, as Qwen2.5-VL writes it)."""
    flat = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if not value or not isinstance(value, (dict, list)) or len(flat) <= JSON_LINE - 2 * depth \
            or depth >= JSON_NESTED:
        return flat
    pad = "  " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{json.dumps(k, ensure_ascii=False)}: {_pretty(v, depth + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(pad + i for i in items) + "\n" + "  " * depth + "}"
    items = [_pretty(v, depth + 1) for v in value]
    return "[\n" + ",\n".join(pad + i for i in items) + "\n" + "  " * depth + "]"


def json_block(text: str) -> str:
    """A JSON answer as a ```json code block (its copy button copies the JSON): indented when
    it parses (a constrained answer does, unless it was stopped), else as it came. The fence
    is longer than any run of backticks in it, so nothing in the answer can close it early.
    An answer already fenced (a server that ignored the constraint) is read inside its fence."""
    inner = text.strip()
    if len(inner) > 6 and inner.startswith("```") and inner.endswith("```"):
        inner = inner[3:-3].removeprefix("json")
    try:
        body = _pretty(json.loads(inner))
    except (ValueError, RecursionError):
        body = text
    fence = "`" * max(3, 1 + max((len(m) for m in BACKTICKS.findall(body)), default=0))
    return f"{fence}json\n{body}\n{fence}"


def with_stop_mark(text: str) -> str:
    """A stopped answer with its mark after it, outside any code block the answer left open
    (an unfinished JSON block would otherwise show the mark as code)."""
    if not text:
        return STOPPED_NOTE
    fence = _open_fence(text)
    return f"{text}\n{fence}\n\n{STOPPED_NOTE}" if fence else f"{text} {STOPPED_NOTE}"


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


def _shown_turns(state: State, room: int) -> list[bool]:
    """Which turns' texts are shown: the newest first, while the chat's display budget
    lasts (each text costs what it shows, at most MAX_SHOWN_CHARS); older ones are noted."""
    show = [False] * len(state["turns"])
    for i in range(len(state["turns"]) - 1, -1, -1):
        turn = state["turns"][i]
        cost = min(len(turn["text"]), MAX_SHOWN_CHARS) + len(turn.get("error") or "")
        if cost > room:
            break
        room -= cost
        show[i] = True
    return show


def render_indexed(state: State, streaming: str | None = None) -> tuple[list[dict], list[int]]:
    """The messages, and for each the index of the turn it shows (-1: the streaming
    answer), so an edit or a rating on a message reaches its turn. Each text is `shown`
    (bounded, nothing loading from elsewhere), and the chat as a whole shows at most
    MAX_SHOWN_CHAT_CHARS of them: older texts past that are a one-line note."""
    out: list[dict] = []
    owner: list[int] = []

    def add(i: int, role: str, content: Any) -> None:
        out.append({"role": role, "content": content})
        owner.append(i)

    live = shown(streaming, MAX_SHOWN_CHARS) if streaming is not None else None
    visible = _shown_turns(state, MAX_SHOWN_CHAT_CHARS - len(live or ""))
    for i, turn in enumerate(state["turns"]):
        if turn["role"] == "user":
            # The text first, the file names last: Gradio 6.31's Chatbot offers Edit only
            # when a group ends in text, and sends the edit of a group from its first message
            # on, stopping at the first picture (it cannot edit those).
            if turn["text"]:
                add(i, "user", shown(turn["text"], MAX_SHOWN_CHARS) if visible[i] else EARLIER_NOTE)
            for f in turn["files"]:
                add(i, "user", _file_content(f))
            if turn["files"]:
                add(i, "user", shown(FILES_NOTE.format(
                    names=" · ".join(f["name"] for f in turn["files"]))))
            continue
        body = json_block(turn["text"]) if turn.get("format") == "json" and turn["text"] \
            else turn["text"]
        text = body and (shown(body, MAX_SHOWN_CHARS) if visible[i] else EARLIER_NOTE)
        if turn["finish"] == "cancelled":
            text = with_stop_mark(text)
        if text:
            add(i, "assistant", text)
        for f in turn.get("figures") or []:
            add(i, "assistant", _file_content(f))
        if turn.get("error"):
            add(i, "assistant", shown(format_error(turn["error"]), MAX_SHOWN_CHARS)
                if visible[i] else EARLIER_NOTE)
        stats = format_stats(turn.get("stats"), turn["finish"])
        if stats:
            add(i, "assistant", stats)
    if live is not None:
        add(-1, "assistant", live)
    return out, owner
