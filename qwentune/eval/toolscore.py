"""Scoring rules for tool calls, as pure functions (no model): parse the `<tool_call>` blocks of a generation and
compare them with the reference assistant turn.

Exact match = the same multiset of function names, and for each expected call a distinct generated call (any order)
whose arguments match: JSON values compared as values (numbers as numbers, 1 == 1.0; a bool is not a number), every
argument the schema requires present and equal, an argument in both equal, and an argument in only one of them allowed
when the tool's schema lists it as optional (an argument the schema does not know is wrong). A reference turn without
calls scores whether the model refrained (irrelevance / no-call accuracy).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_OPEN = "<tool_call>"


@dataclass(frozen=True)
class Verdict:
    """One row's score. `kind` is 'tool_call' or 'no_call'; the flags form the breakdown (for no-call rows only
    `ok` and `tagged` mean anything); `why` says in words what was wrong ('' when ok)."""

    kind: str
    ok: bool
    tagged: bool = False
    valid_json: bool = False
    right_function: bool = False
    right_arguments: bool = False
    why: str = ""

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "ok": self.ok,
            "tagged": self.tagged,
            "valid_json": self.valid_json,
            "right_function": self.right_function,
            "right_arguments": self.right_arguments,
            "why": self.why,
        }


def parse_tool_calls(text: str) -> list[dict] | None:
    """The `{"name", "arguments"}` objects in a generation's <tool_call> blocks; None if a block isn't valid JSON
    (or isn't an object). `arguments` given as a JSON string are decoded."""
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict):
            return None
        args = call.get("arguments")
        if isinstance(args, str):
            try:
                call = {**call, "arguments": json.loads(args)}
            except json.JSONDecodeError:
                return None
        calls.append(call)
    return calls


def reference_calls(message: dict) -> list[dict]:
    """The calls of a canonical assistant message as `{"name", "arguments"}` (arguments decoded when a string)."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            args = json.loads(args)
        out.append({"name": fn.get("name"), "arguments": args if args is not None else {}})
    return out


def values_equal(got: Any, want: Any) -> bool:
    """JSON values compared as values: numbers as numbers (1 == 1.0), bools only equal bools, lists in order,
    objects key by key."""
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(want, bool) and isinstance(got, bool) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return float(got) == float(want)
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(values_equal(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(values_equal, got, want))
    return type(got) is type(want) and got == want


def _schema(tools: list[dict] | None, name: str) -> dict | None:
    """The `parameters` schema of tool `name` (OpenAI `{"type": "function", "function": {...}}` or bare)."""
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            return params if isinstance(params, dict) else {}
    return None


def arguments_mismatch(got: Any, want: dict, schema: dict | None) -> str:
    """'' when `got` matches the reference arguments `want` under `schema` (see the module docstring), else why not."""
    if not isinstance(got, dict):
        return f"arguments are {type(got).__name__}, not an object"
    properties = (schema or {}).get("properties") or {}
    required = set((schema or {}).get("required") or [])
    for key in sorted(set(got) | set(want), key=str):
        if key in got and key in want:
            if not values_equal(got[key], want[key]):
                return f"argument {key}: got {json.dumps(got[key])}, expected {json.dumps(want[key])}"
        elif schema is None or key in required or key not in properties:
            return f"missing argument {key}" if key in want else f"unexpected argument {key}"
    return ""


def _match(got: list[dict], want: list[dict], tools: list[dict] | None) -> str:
    """'' when each expected call has its own matching generated call (any order), else the first reason."""
    reasons: list[str] = []

    def assign(i: int, used: frozenset[int]) -> bool:
        if i == len(want):
            return True
        for j, call in enumerate(got):
            if j in used or call.get("name") != want[i]["name"]:
                continue
            why = arguments_mismatch(call.get("arguments", {}), want[i]["arguments"], _schema(tools, want[i]["name"]))
            if why:
                reasons.append(f"{want[i]['name']}: {why}")
                continue
            if assign(i + 1, used | {j}):
                return True
        return False

    return "" if assign(0, frozenset()) else (reasons[0] if reasons else "no call matches")


def score_tool_calls(text: str, want: list[dict], tools: list[dict] | None = None) -> Verdict:
    """Score a generation against the reference calls `want` (`{"name", "arguments"}`, see `reference_calls`)."""
    if not want:
        return score_no_call(text)
    tagged = _OPEN in text
    if not tagged:
        return Verdict("tool_call", False, why="no <tool_call> block")
    got = parse_tool_calls(text)
    if got is None or not got:
        why = "a <tool_call> block is not a JSON object" if got is None else "an unterminated <tool_call> block"
        return Verdict("tool_call", False, tagged=True, why=why)
    names = sorted(str(c.get("name")) for c in got)
    wanted = sorted(str(c["name"]) for c in want)
    if names != wanted:
        return Verdict("tool_call", False, True, True, why=f"called {', '.join(names)}; expected {', '.join(wanted)}")
    why = _match(got, want, tools)
    return Verdict("tool_call", not why, True, True, True, not why, why)


def score_no_call(text: str) -> Verdict:
    """A row whose reference turn makes no call: right when the generation makes none."""
    if _OPEN not in text:
        return Verdict("no_call", True)
    got = parse_tool_calls(text) or []
    names = ", ".join(str(c.get("name")) for c in got) or "a tool"
    return Verdict("no_call", False, tagged=True, why=f"called {names}; expected no call")


__all__ = [
    "Verdict",
    "arguments_mismatch",
    "parse_tool_calls",
    "reference_calls",
    "score_no_call",
    "score_tool_calls",
    "values_equal",
]
