"""Random constraints for the structured-output tests: JSON schemas of the kinds extraction
asks for (counts, colour lists, shape lists, grounding boxes, nested objects), regular
expressions, choices and grammars, each with a check of the answer."""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable

import jsonschema

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["integer", "number", "string", "boolean", "enum", "bounded"])
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(COLOURS, rng.randint(1, 4))}
    if kind == "bounded":
        return {"type": "integer", "minimum": 0, "maximum": rng.randint(1, 1000)}
    if kind == "string" and rng.random() < 0.3:
        return {"type": "string", "minLength": rng.randint(1, 3), "maxLength": 12}
    return {"type": kind}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object, array or box-list schema, nested at most two levels."""
    pick = rng.random()
    if depth == 0 and pick < 0.2:
        return {"type": "array", "items": {
            "type": "object", "properties": {
                "bbox_2d": {"type": "array", "items": {"type": "integer"},
                            "minItems": 4, "maxItems": 4},
                "label": {"type": "string", "enum": SHAPES}},
            "required": ["bbox_2d", "label"]}}
    if depth < 2 and pick < 0.35:
        return {"type": "array", "items": random_schema(rng, depth + 1),
                **({"maxItems": rng.randint(1, 4)} if rng.random() < 0.5 else {})}
    names = rng.sample(["count", "colours", "shapes", "name", "size", "ok", "x", "y"],
                       rng.randint(1, 4))
    props = {n: (random_schema(rng, depth + 1) if depth < 2 and rng.random() < 0.3
                 else _leaf(rng)) for n in names}
    return {"type": "object", "properties": props,
            "required": [n for n in names if rng.random() < 0.7]}


REGEXES = [r"\d{1,3}", r"(red|green|blue)( (red|green|blue)){0,2}", r"[a-z]{2,8}@[a-z]{2,5}\.com",
           r"\d{4}-\d{2}-\d{2}", r"(yes|no)", r"[A-Z][a-z]{1,6} has \d+ (circles|squares)"]

GRAMMARS = [
    ('root ::= "The answer is " ("yes" | "no") "."', r"The answer is (yes|no)\."),
    ('start: colour (", " colour)*\ncolour: "red" | "green" | "blue"',
     r"(red|green|blue)(, (red|green|blue))*"),
    ('root ::= count " " shape\ncount ::= [1-9]\nshape ::= "circles" | "squares"',
     r"[1-9] (circles|squares)"),
]


def random_case(form: str, rng: random.Random) -> tuple[dict, Callable[[str], None]]:
    """(the request's structured_outputs / response_format fields as a dict of
    StructuredOutput's names, a check raising AssertionError for a wrong answer)."""
    if form == "json":
        schema = random_schema(rng)
        return {"json": schema}, lambda text: jsonschema.validate(json.loads(text), schema)
    if form == "json_object":
        def is_object(text: str) -> None:
            assert isinstance(json.loads(text), dict), text
        return {"json_object": True}, is_object
    if form == "regex":
        pattern = rng.choice(REGEXES)
        return {"regex": pattern}, lambda text: _full(pattern, text)
    if form == "choice":
        options = rng.sample(COLOURS + SHAPES + ["a b", 'with "quotes"', "ünïcode"],
                             rng.randint(1, 5))

        def chosen(text: str) -> None:
            assert text in options, (text, options)
        return {"choice": tuple(options)}, chosen
    grammar, pattern = rng.choice(GRAMMARS)
    return {"grammar": grammar}, lambda text: _full(pattern, text)


def _full(pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text), (pattern, text)


FORMS = ("json", "json_object", "regex", "choice", "grammar")


def as_request_fields(case: dict) -> Any:
    """vLLM's `structured_outputs` body for a case (choice as a list)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in case.items()}
