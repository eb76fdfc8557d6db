"""Tool calls as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes` gives them
for Qwen2.5: vLLM's checks of `tools` and `tool_choice`, the constraint that forces a call,
and the parsers that turn the answer's text into `tool_calls`, whole or as stream deltas.

- "auto": free generation; Hermes blocks `<tool_call>{"name", "arguments"}</tool_call>` in
  the text are the calls, the text before the first one stays content (vLLM's
  Hermes2ProToolParser, ported).
- "required": the answer is held to vLLM's get_json_schema_from_tools schema, a JSON list of
  `{"name", "parameters"}` (at least one; one with parallel_tool_calls false), each item the
  schema of one tool, so its arguments always validate.
- a named function: the answer is held to that function's parameters schema and is the call's
  arguments.

vLLM 0.32 forces the last two with a structural tag in the Hermes format instead (its
arguments free unless the tool says `strict`); the calls the client receives have the same
shape. The JSON forms are used here because the engine guarantees a JSON answer closes within
max_tokens."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidRequestError

PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_PARAMETERS = re.compile(r'"parameters"\s*:\s*')
_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')


def tool_call_id() -> str:
    """vLLM's make_tool_call_id: `chatcmpl-tool-` and 16 hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().int & (2**64 - 1):016x}"


def _invalid(message: str, param: str | None = None) -> InvalidRequestError:
    """vLLM's VLLMValidationError text: the message, then the parameter."""
    return InvalidRequestError(f"{message} (parameter={param})" if param else message,
                               param=param)


# ----------------------------------------------------------------------------- checks
_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tool_usage(data: dict) -> None:
    """vLLM's check_tool_usage on the raw body, in its order and words (tool_choice
    defaults to "auto" when tools are given)."""
    tools, choice = data.get("tools"), data.get("tool_choice")
    if tools == []:
        raise _invalid("`tools` must not be an empty array. Either provide at least one tool "
                       "or omit the field entirely.", "tools")
    if "tool_choice" not in data and tools:
        choice = "auto"
    if choice is None or choice == "none":
        return
    if tools is None:
        raise _invalid("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _invalid(f"Invalid value for `tool_choice`: {choice}! Only named tools, \"none\", "
                       "\"auto\" or \"required\" are supported.", "tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"Invalid value for `function`: `{function}` in `tool_choice`! "
                           f"{_USAGE}", "tool_choice.function")
        if "name" not in function:
            raise _invalid(f"Expected field `name` in `function` in `tool_choice`! {_USAGE}",
                           "tool_choice.function.name")
        name = function["name"]
        if not isinstance(name, str) or not name:
            raise _invalid(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_USAGE}",
                           "tool_choice.function.name")
        if name not in tool_names(tools):
            raise _invalid("The tool specified in `tool_choice` does not match any of the "
                           "specified `tools`", "tool_choice")


def check_tool_flags(choice: Any, auto_enabled: bool) -> None:
    """What vLLM refuses when the server runs without a tool parser (both flags are needed
    for one): "auto" and forced calls alike, in its words."""
    if auto_enabled or choice in (None, "none"):
        return
    if choice == "auto":
        raise InvalidRequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                                  "--tool-call-parser to be set", param="tool_choice")
    desc = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) \
        else f'"{choice}"'
    raise InvalidRequestError(f"tool_choice={desc} requires --tool-call-parser to be set",
                              param="tool_choice")


def tool_names(tools: list[dict]) -> list[str]:
    return [((t or {}).get("function") or {}).get("name") for t in tools]


def named_choice(choice: Any) -> str | None:
    """The function a named tool_choice forces, else None."""
    return choice["function"]["name"] if isinstance(choice, dict) else None


# ----------------------------------------------------------------------------- constraint
def _parameters(tool: dict) -> dict:
    """A tool's parameters schema; none (or empty) still means a JSON object (vLLM's)."""
    params = (tool.get("function") or {}).get("parameters")
    return params if params else {"type": "object", "properties": {}}


def tool_schema(tools: list[dict], choice: Any, parallel: bool | None) -> dict | None:
    """vLLM's get_json_schema_from_tools: the schema a forced call's answer obeys (None for
    "none" and "auto"). $defs of every tool are gathered at the top, as vLLM does."""
    name = named_choice(choice)
    if name is not None:
        return _parameters(next(t for t in tools if tool_names([t])[0] == name))
    if choice != "required":
        return None
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        params = json.loads(json.dumps(_parameters(tool)))
        for def_name, def_schema in (params.pop("$defs", None) or {}).items():
            if def_name in defs and defs[def_name] != def_schema:
                raise _invalid(f"Tool definition '{def_name}' has multiple schemas, which is "
                               "not supported.", "tools")
            defs[def_name] = def_schema
        items.append({"properties": {"name": {"type": "string", "enum": tool_names([tool])},
                                     "parameters": params},
                      "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": items}}
    if parallel is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


# ----------------------------------------------------------------------------- whole answers
def _call(name: str, arguments: str) -> dict:
    return {"id": tool_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    """vLLM's Hermes2ProToolParser.extract_tool_calls: (content, calls). Content is the text
    before the first block (None when empty); a block that does not parse leaves the whole
    text as content and no calls, as in vLLM."""
    if START not in text:
        return text, []
    try:
        raw = [json.loads(a or b) for a, b in _HERMES_BLOCK.findall(text)]
        calls = [_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in raw]
    except (ValueError, KeyError, TypeError):
        return text, []
    content = text[:text.find(START)]
    return content or None, calls


def parse_forced(text: str, choice: Any) -> list[dict]:
    """The calls of a "required" (a JSON list of {name, parameters}) or named (the arguments)
    answer; none where the text is empty or, cut short, does not parse (vLLM's)."""
    name = named_choice(choice)
    if name is not None:
        if not text.strip():
            return []
        try:   # re-serialised like every other call's arguments (vLLM's json.dumps)
            return [_call(name, json.dumps(json.loads(text), ensure_ascii=False))]
        except ValueError:
            return [_call(name, text)]
    try:
        items = json.loads(text)
        return [_call(i["name"], json.dumps(i["parameters"], ensure_ascii=False))
                for i in items]
    except (ValueError, KeyError, TypeError):
        return []


# ----------------------------------------------------------------------------- streaming
def partial_tag_overlap(text: str, tag: str) -> int:
    """Length of the longest prefix of `tag` that ends `text` (vLLM's)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at `start` ends (exclusive), or None if it is cut off."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",}] \n":
            return i
    return None


@dataclass
class ToolStream:
    """One choice's tool-call deltas as vLLM streams them: content first, then per call a
    delta with its index, id, type and name once the name is complete, then pieces of its
    arguments as they grow. `feed` takes the next text and gives a delta dict (vLLM's
    DeltaMessage as sent) or None when nothing can be sent yet."""

    choice: Any
    single: bool = False     # parallel_tool_calls false: only the first call is sent
    text: str = ""
    sent_content: int = 0
    names: list[str] = field(default_factory=list)
    sent_args: list[str] = field(default_factory=list)
    called: bool = False

    def feed(self, delta: str) -> dict | None:
        self.text += delta
        content = None
        if named_choice(self.choice) is not None:
            calls = [(named_choice(self.choice), self.text)] if self.text else []
        elif self.choice == "required":
            calls = self._required_calls()
        else:
            content, calls = self._content(), self._hermes_calls()
        deltas = self._call_deltas(calls[:1] if self.single else calls)
        if not content and not deltas:
            return None
        self.called = self.called or bool(deltas)
        return {"content": content, "tool_calls": deltas} if deltas else {"content": content}

    def _call_deltas(self, calls: list[tuple[str | None, str | None]]) -> list[dict]:
        out: list[dict] = []
        for i, (name, args) in enumerate(calls):
            if i >= len(self.names):
                if not name:
                    break   # the next call cannot start before this one has its name
                self.names.append(name)
                self.sent_args.append("")
                out.append({"id": tool_call_id(), "type": "function", "index": i,
                            "function": {"name": name}})
            if args is not None and len(args) > len(self.sent_args[i]):
                out.append({"index": i, "function": {"arguments": args[len(self.sent_args[i]):]}})
                self.sent_args[i] = args
        return out

    def _content(self) -> str | None:
        """Unsent text before any <tool_call>, holding back what may start the tag."""
        if START in self.text:
            end = self.text.index(START)
        else:
            end = len(self.text) - partial_tag_overlap(self.text, START)
        if end <= self.sent_content:
            return None
        piece, self.sent_content = self.text[self.sent_content:end], end
        return piece

    def _hermes_calls(self) -> list[tuple[str | None, str | None]]:
        """vLLM's Hermes streaming: each block's name and arguments text so far (a complete
        block's arguments without the brace that closes the call)."""
        calls, pos = [], 0
        while (start := self.text.find(START, pos)) != -1:
            body_start = start + len(START)
            end = self.text.find(END, body_start)
            if end != -1:
                body, complete, pos = self.text[body_start:end].strip(), True, end + len(END)
            else:
                raw = self.text[body_start:]
                overlap = partial_tag_overlap(raw, END)
                body = (raw[:-overlap] if overlap else raw).strip()
                complete = bool(body) and _complete_json(body)
            calls.append(_hermes_parts(body, complete))
            if end == -1:
                break
        return calls

    def _required_calls(self) -> list[tuple[str | None, str | None]]:
        """The calls of a "required" answer (a JSON list of {name, parameters}) so far."""
        calls, pos = [], 0
        while (found := _NAME.search(self.text, pos)) is not None:
            params = _PARAMETERS.search(self.text, found.end())
            if params is None:
                calls.append((found.group(1), None))
                break
            end = _value_end(self.text, params.end())
            calls.append((found.group(1), self.text[params.end():end]))
            if end is None:
                break
            pos = end
        return calls


def _hermes_parts(body: str, complete: bool) -> tuple[str | None, str | None]:
    name = _NAME.search(body)
    args = _ARGUMENTS.search(body)
    if args is None:
        return (name.group(1) if name else None), None
    raw = body[args.end():]
    if complete:
        raw = raw.rstrip()
        raw = raw[:-1].rstrip() if raw.endswith("}") else raw
    return (name.group(1) if name else None), raw
