"""The tool-spec machinery shared by the train and held-out tool catalogs: JSON-schema helpers and the `Tool` record.

A `Tool` carries its OpenAI schema and how to make synthetic requests for it: prompt templates whose `{placeholders}`
name the arguments they pass (an argument is in the call exactly when its placeholder is in the prompt), a value
sampler, a fake-result function and a one-sentence answer. Every result is synthetic (derived from a SHA-256 hash of
the arguments) and says so where it could be mistaken for real data.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field


def S(desc: str = "", enum: list | None = None) -> dict:  # noqa: N802 (reads like a type)
    out: dict = {"type": "string"}
    if desc:
        out["description"] = desc
    if enum:
        out["enum"] = list(enum)
    return out


def I(desc: str = "") -> dict:  # noqa: N802,E743
    return {"type": "integer", "description": desc} if desc else {"type": "integer"}


def N(desc: str = "") -> dict:  # noqa: N802
    return {"type": "number", "description": desc} if desc else {"type": "number"}


def B(desc: str = "") -> dict:  # noqa: N802
    return {"type": "boolean", "description": desc} if desc else {"type": "boolean"}


def A(items: dict, desc: str = "") -> dict:  # noqa: N802
    out: dict = {"type": "array", "items": items}
    if desc:
        out["description"] = desc
    return out


def O(props: dict, required: list[str], desc: str = "") -> dict:  # noqa: N802,E741,E743
    out: dict = {"type": "object", "properties": props, "required": required}
    if desc:
        out["description"] = desc
    return out


def fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


def digest(name: str, args: dict) -> bytes:
    """Deterministic bytes for the fake result of one call (the same call always gives the same result)."""
    return hashlib.sha256((name + "|" + json.dumps(args, sort_keys=True, ensure_ascii=False)).encode()).digest()


def placeholders(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def shown(value) -> str:
    """How a value is written in a prompt when the sampler gives no text of its own."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    if isinstance(value, list):
        items = [shown(v) for v in value]
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return str(value)


@dataclass(eq=False)
class Tool:
    name: str
    description: str
    params: dict
    required: list[str]
    prompts: list[str]  # each names the arguments it passes by its placeholders
    values: Callable[[random.Random], dict]  # argument -> value, or (value, text shown in the prompt)
    result: Callable[[dict, bytes], dict]  # (args, digest) -> fake result
    answer: Callable[[dict, dict], str]  # (args, result) -> one sentence
    vague: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt missing an argument, question, reply)
    near: list[tuple[str, str]] = field(default_factory=list)  # related requests this tool cannot do: (prompt, answer)
    ability: str = ""  # "look up ..." for "what can you do?"

    @property
    def schema(self) -> dict:
        return fn(self.name, self.description, self.params, self.required)


@dataclass
class Call:
    name: str
    args: dict
    result: dict
    summary: str


def make_call(tool: Tool, template: str, rng: random.Random, reply: str = "") -> tuple[str, str, Call]:
    """Fill a prompt template (and `reply`, the user's answer to a clarifying question) with sampled values.

    A template may end with `|name,...`: arguments its wording implies without a placeholder ("in stock only").
    """
    template, _, implied = template.partition("|")
    raw = tool.values(rng)
    vals, text = {}, {}
    for k, v in raw.items():
        vals[k], text[k] = v if isinstance(v, tuple) else (v, shown(v))
    used = set(placeholders(template)) | set(placeholders(reply)) | set(filter(None, implied.split(",")))
    args = {k: vals[k] for k in tool.params if k in used}
    result = tool.result(args, digest(tool.name, args))
    call = Call(tool.name, args, result, tool.answer(args, result))
    return template.format(**text), reply.format(**text), call
