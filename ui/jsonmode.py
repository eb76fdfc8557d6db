"""The page's JSON mode: the answer is held to JSON by the engine's constrained decoding
(engine.types.StructuredOutput), so it always parses, even from a small model.

The modes: off; any JSON object; a JSON schema typed in the page (or loaded from a file); a
few field names turned into a schema; or Qwen2.5-VL's grounding list, which the Detect
preset picks so its boxes always parse and can be drawn. What the user types is checked
here, before the message leaves the box, and refused in one line that says what is wrong;
the engine still checks the schema it is given (what this light check cannot see then
comes back as its error in the chat). No torch, no Gradio here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.types import StructuredOutput

# (label on the page, value kept in the settings)
MODES = (("Off", "off"), ("Any JSON", "object"), ("JSON schema", "schema"),
         ("Fields", "fields"), ("Detect boxes", "boxes"))
MODE_VALUES = tuple(value for _, value in MODES)
JSON_MODES = frozenset({"object", "schema", "fields", "boxes"})   # answers shown as JSON

# Qwen2.5-VL's grounding answer: [{"bbox_2d": [x1, y1, x2, y2], "label": ...}, ...] in that
# key order (the model's own). At least one entry: a model whose habit is "[\n\t{" (newline
# and tab are not allowed by the compact grammar) would otherwise close the list at once
# (the built-in model answers "[]" without it).
GROUNDING_SCHEMA = {
    "type": "array", "minItems": 1,
    "items": {"type": "object", "required": ["bbox_2d", "label"], "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
        "label": {"type": "string"}}}}

FIELD_TYPES = {"string": {"type": "string"}, "integer": {"type": "integer"},
               "number": {"type": "number"}, "boolean": {"type": "boolean"},
               "list": {"type": "array", "items": {"type": "string"}}}
MAX_FIELDS = 64
MAX_SCHEMA_CHARS = 64 * 1024   # what the page keeps, sends and reads from a schema file
MAX_WALK = 10_000              # subschemas the light check looks at
SCHEMA_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")                  # [schema, ...]
SCHEMA_ONES = ("items", "additionalProperties", "not", "contains")         # one schema


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="structured_outputs")


def fields_schema(text: str) -> dict:
    """"name, total:number, items:list" -> an object schema with those properties, all
    required, strings unless typed (integer, number, string, boolean, list of strings)."""
    properties: dict[str, dict] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, kind = item.partition(":")
        name, kind = name.strip(), (kind.strip().lower() or "string")
        if not name:
            raise _bad(f"A field has no name: \"{item.strip()}\".")
        if kind not in FIELD_TYPES:
            raise _bad(f"Field \"{name}\" has type \"{kind}\": use one of "
                       f"{', '.join(FIELD_TYPES)}.")
        if name in properties:
            raise _bad(f"Field \"{name}\" is named twice.")
        properties[name] = dict(FIELD_TYPES[kind])
    if not properties:
        raise _bad("Type one or more field names, separated by commas (e.g. name, total:number).")
    if len(properties) > MAX_FIELDS:
        raise _bad(f"At most {MAX_FIELDS} fields, not {len(properties)}.")
    return {"type": "object", "properties": properties, "required": list(properties)}


def _problem(schema: Any) -> str | None:
    """The first thing that makes `schema` no JSON Schema, as "where: what", or None: the
    keywords whose shape is fixed (type, required, enum and the subschema keywords), looked
    at iteratively and at most MAX_WALK subschemas deep and wide."""
    stack: list[tuple[str, Any]] = [("", schema)]
    for _ in range(MAX_WALK):
        if not stack:
            return None
        path, node = stack.pop()
        where = f"at {path}, the schema" if path else "the schema"
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            return f"{where} must be a JSON object (or true or false), not {json.dumps(node)[:40]}"
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        bad = [k for k in kinds if k not in SCHEMA_TYPES]
        if bad:
            return (f"{where} has type {json.dumps(bad[0])[:40]}, not one of "
                    f"{', '.join(SCHEMA_TYPES)}")
        required = node.get("required", [])
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            return f"{where}'s \"required\" must be a list of property names"
        if "enum" in node and not isinstance(node["enum"], list):
            return f"{where}'s \"enum\" must be a list"
        for key in SCHEMA_MAPS:
            sub = node.get(key, {})
            if not isinstance(sub, dict):
                return f"{where}'s \"{key}\" must be an object of schemas"
            stack += [(f"{path}.{key}.{name}".lstrip("."), s) for name, s in sub.items()]
        for key in (k for k in SCHEMA_LISTS if k in node):
            sub = node[key]
            if not isinstance(sub, list) or not sub:
                return f"{where}'s \"{key}\" must be a non-empty list of schemas"
            stack += [(f"{path}.{key}[{i}]".lstrip("."), s) for i, s in enumerate(sub)]
        stack += [(f"{path}.{key}".lstrip("."), node[key]) for key in SCHEMA_ONES
                  if key in node and not (key == "items" and isinstance(node[key], list))]
    return None


def parse_schema(text: str) -> dict:
    """The JSON schema typed in the page; InvalidRequestError in one line when it is not
    JSON, not an object, or has a keyword of the wrong shape."""
    text = (text or "").strip()
    if not text:
        raise _bad("Type a JSON schema, or load one from a .json file.")
    if len(text) > MAX_SCHEMA_CHARS:
        raise _bad(f"The JSON schema is too long: at most {MAX_SCHEMA_CHARS:,} characters.")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"The JSON schema is not valid JSON: {exc.msg} (line {exc.lineno}, "
                   f"column {exc.colno}).") from None
    except RecursionError:
        raise _bad("The JSON schema nests too deeply.") from None
    if not isinstance(schema, dict):
        raise _bad("The JSON schema must be a JSON object, such as {\"type\": \"object\", "
                   "\"properties\": {...}}.")
    problem = _problem(schema)
    if problem is not None:
        raise _bad(f"The JSON schema is not valid: {problem}.")
    return schema


@dataclass(frozen=True)
class JsonMode:
    """The JSON mode's three settings as the page sends them (the schema and the field
    names are kept while another mode is chosen, so switching loses nothing typed)."""

    mode: str = "off"
    schema: str = ""
    fields: str = ""

    @classmethod
    def from_values(cls, mode: Any, schema: Any, fields: Any) -> "JsonMode":
        return cls(mode if mode in MODE_VALUES else "off",
                   schema if isinstance(schema, str) else "",
                   fields if isinstance(fields, str) else "")

    @property
    def is_json(self) -> bool:
        """Whether the answer is JSON (shown formatted, its boxes looked for in the JSON)."""
        return self.mode in JSON_MODES

    def constraint(self) -> StructuredOutput | None:
        """The engine's constraint for this mode (None when off); InvalidRequestError
        (param "structured_outputs") in one line when the schema or fields are not one."""
        if self.mode == "object":
            return StructuredOutput(json_object=True)
        if self.mode == "schema":
            return StructuredOutput(json=parse_schema(self.schema))
        if self.mode == "fields":
            return StructuredOutput(json=fields_schema(self.fields))
        if self.mode == "boxes":
            return StructuredOutput(json=GROUNDING_SCHEMA)
        return None

    def problem(self) -> str | None:
        """Why `constraint` refuses this mode's schema or fields (one line), or None."""
        try:
            self.constraint()
        except InvalidRequestError as exc:
            return exc.message
        return None

    def values(self) -> tuple[str, str, str]:
        return self.mode, self.schema, self.fields

    def settings(self) -> dict:
        """What the browser keeps of it (see `from_settings`)."""
        return {"mode": self.mode, "schema": self.schema[:MAX_SCHEMA_CHARS],
                "fields": self.fields[:MAX_SCHEMA_CHARS]}

    @classmethod
    def from_settings(cls, raw: Any) -> "JsonMode":
        """The kept settings as the browser sent them back (anything else: off)."""
        raw = raw if isinstance(raw, dict) else {}
        mode = cls.from_values(raw.get("mode"), raw.get("schema"), raw.get("fields"))
        return cls(mode.mode, mode.schema[:MAX_SCHEMA_CHARS], mode.fields[:MAX_SCHEMA_CHARS])
