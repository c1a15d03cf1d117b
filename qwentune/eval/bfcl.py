"""Berkeley Function Calling Leaderboard (BFCL) files: read a question file and its possible-answer file, turn the
function specs into JSON-schema tools the way BFCL's function-calling (FC) handlers do, and score generated calls
with BFCL's AST-checker rules for the Python categories simple, multiple, parallel, parallel_multiple, irrelevance.

The rules are written here because the `bfcl-eval` package pins numpy, networkx and a dozen API clients. They follow
BFCL's documented checker: the function name must match (dots become underscores, as the FC handlers name tools);
every required parameter present; no parameter that is not in the spec or not in the possible answer; types checked
(an int is accepted for a float); strings compared lowercased with spaces and `,./-_*^` removed; lists compared
element by element (in order), dicts key by key; a possible answer listing "" makes the parameter optional;
parallel categories match calls in any order; irrelevance passes when the model makes no call.

BFCL is an evaluation set: never put its prompts or tools into training data.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QwentuneError

CATEGORIES = ("parallel_multiple", "parallel", "multiple", "simple", "irrelevance")
# BFCL's FC handlers' type mapping (Python spec types → JSON schema types).
JSON_TYPES = {
    "integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
    "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object", "tuple": "array",
    "any": "string",
}  # fmt: skip
# The checker's Python types per spec type ("any" is not type-checked).
PYTHON_TYPES = {"string": str, "integer": int, "float": float, "number": float, "boolean": bool, "array": list,
                "list": list, "tuple": list, "dict": dict, "object": dict}  # fmt: skip
_STRIP = re.compile(r"[ ,./\\\-_*^]")


@dataclass
class BfclCase:
    id: str
    category: str
    messages: list[dict]  # the first turn's messages
    functions: list[dict]  # BFCL specs as published
    tools: list[dict]  # the same as OpenAI-style JSON-schema tools
    ground_truth: list[dict] | None  # [{"func.name": {"param": [acceptable values]}}]; None for irrelevance


def category_of(case_id: str) -> str:
    """The category from a BFCL id such as `parallel_multiple_12` or `live_simple_3-1-0`."""
    name = case_id.removeprefix("live_")
    for cat in CATEGORIES:
        if name.startswith(cat):
            return cat
    return "simple"


def fc_name(name: str) -> str:
    """A BFCL function name as the OpenAI FC handler passes it to the model (dots → underscores)."""
    return name.replace(".", "_")


def _cast(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("type"), str):
        out["type"] = JSON_TYPES.get(out["type"], out["type"])
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _cast(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _cast(out["items"])
    return out


def to_tool(function: dict) -> dict:
    """A BFCL spec → an OpenAI-style tool: dotted name → underscores, types mapped (dict→object, float→number,
    tuple→array, any→string), nested properties and items too."""
    fn = copy.deepcopy(function)
    fn["name"] = fc_name(fn["name"])
    params = _cast(fn.get("parameters") or {"type": "dict", "properties": {}})
    params["type"] = "object"
    fn["parameters"] = params
    return {"type": "function", "function": fn}


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise QwentuneError(f"cannot read: {exc}", where=str(path)) from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QwentuneError(f"not valid JSON: {exc.msg}", where=f"{path} row {n}") from None
        if not isinstance(row, dict) or "id" not in row:
            raise QwentuneError("expected a JSON object with an 'id'", where=f"{path} row {n}")
        rows.append((n, row))
    return rows


def is_bfcl_row(row: Any) -> bool:
    return isinstance(row, dict) and "id" in row and "question" in row and "function" in row


def read_bfcl(questions: str | Path, answers: str | Path | None, *, limit: int | None = None) -> list[BfclCase]:
    """The cases of a BFCL question file (its first `limit` questions). Each of them needs its id in `answers` (the
    possible-answer file; irrelevance questions need none); the answer file may hold more ids (one file for a
    subset, or for `limit`). Raises QwentuneError naming the file and row of the first question without one."""
    questions = Path(questions)
    qrows = _read_jsonl(questions)[:limit]
    arows = _read_jsonl(Path(answers)) if answers is not None else []
    by_id = {row["id"]: (n, row) for n, row in arows}
    cases = []
    for n, row in qrows:
        where = f"{questions} row {n}"
        category = category_of(str(row["id"]))
        question = row.get("question")
        if not isinstance(question, list) or not question:
            raise QwentuneError("'question' must be a non-empty list of turns", where=where)
        turn = question[0] if isinstance(question[0], list) else question
        functions = row.get("function") or []
        if isinstance(functions, dict):
            functions = [functions]
        truth = None
        if category != "irrelevance":
            if row["id"] not in by_id:
                ans = f"{answers} has no id {row['id']!r}" if answers else "no --bfcl-answers file given"
                raise QwentuneError(f"id {row['id']!r} has no possible answer: {ans}", where=where)
            truth = by_id[row["id"]][1].get("ground_truth")
            if not isinstance(truth, list):
                raise QwentuneError("'ground_truth' must be a list", where=f"{answers} row {by_id[row['id']][0]}")
        cases.append(BfclCase(str(row["id"]), category, list(turn), functions, [to_tool(f) for f in functions], truth))
    return cases


# ------------------------------------------------------------------------------------------------- AST checker


def standardize(text: str) -> str:
    """BFCL's string normalization: lowercase, without spaces and `,./-_*^`, single quotes as double quotes."""
    return _STRIP.sub("", text).lower().replace("'", '"')


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return standardize(value)
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _value_ok(value: Any, acceptable: list) -> str:
    """'' when `value` is one of the acceptable values (BFCL comparison), else the error type."""
    if isinstance(value, dict):
        for answer in acceptable:
            if isinstance(answer, dict) and _dict_ok(value, answer):
                return ""
        return "value_error:dict"
    if isinstance(value, str):
        return (
            "" if standardize(value) in [_norm(a) for a in acceptable if isinstance(a, str)] else "value_error:string"
        )
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            for answer in acceptable:
                if isinstance(answer, list) and len(answer) == len(value):
                    if all(isinstance(a, dict) and _dict_ok(v, a) for v, a in zip(value, answer)):
                        return ""
            return "value_error:list_dict"
        return "" if _norm(value) in [_norm(a) for a in acceptable] else "value_error:list/tuple"
    return "" if any(type(value) is type(a) and value == a for a in acceptable) else "value_error:others"


def _dict_ok(value: dict, answer: dict) -> bool:
    """A dict value against one possible-answer dict ({key: [acceptable values]})."""
    for key, val in value.items():
        if key not in answer:
            return False
        options = answer[key] if isinstance(answer[key], list) else [answer[key]]
        if isinstance(val, float) and any(type(o) is int for o in options):
            options = [float(o) if type(o) is int else o for o in options]
        if _value_ok(val, options):
            return False
    return all(key in value or "" in (opts if isinstance(opts, list) else [opts]) for key, opts in answer.items())


def _type_ok(value: Any, spec_type: str, items_type: str | None) -> bool:
    expected = PYTHON_TYPES.get(spec_type)
    if expected is None:  # "any" and unknown types are not checked
        return True
    if expected is float and type(value) is int:
        return True  # Python auto-converts int to float
    if type(value) is not expected:
        return False
    if expected is list and items_type in PYTHON_TYPES:
        return all(_type_ok(v, items_type, None) for v in value)
    return True


def check_call(spec: dict, call: dict, answer: dict) -> str:
    """BFCL's simple-function check of one generated call `{"name", "arguments"}` against one possible answer
    `{"func.name": {param: [acceptable]}}` for the spec `spec`; '' when right, else the error type."""
    ((name, params),) = answer.items()
    if call.get("name") not in (name, fc_name(name)):
        return f"wrong_func_name: {call.get('name')} (expected {fc_name(name)})"
    args = call.get("arguments")
    if not isinstance(args, dict):
        return "wrong_arguments: not an object"
    properties = (spec.get("parameters") or {}).get("properties") or {}
    for key in (spec.get("parameters") or {}).get("required") or []:
        if key not in args:
            return f"missing_required: {key}"
    for key, value in args.items():
        if key not in properties or key not in params:
            return f"unexpected_param: {key}"
        prop = properties[key] if isinstance(properties[key], dict) else {}
        spec_type = prop.get("type", "any")
        items_type = (prop.get("items") or {}).get("type") if isinstance(prop.get("items"), dict) else None
        if not _type_ok(value, spec_type, items_type):
            return f"type_error: {key} is {type(value).__name__}, expected {spec_type}"
        acceptable = params[key] if isinstance(params[key], list) else [params[key]]
        if spec_type in ("float", "number") and type(value) is int:
            value = float(value)
        if spec_type in ("float", "number"):
            acceptable = [float(a) if type(a) is int else a for a in acceptable]
        if spec_type == "tuple" and isinstance(value, list):
            acceptable = [list(a) if isinstance(a, tuple) else a for a in acceptable]
        error = _value_ok(value, acceptable)
        if error:
            return f"{error}: {key}={json.dumps(value)}, acceptable {json.dumps(acceptable)}"
    for key, options in params.items():
        if key not in args and "" not in (options if isinstance(options, list) else [options]):
            return f"missing_optional: {key}"
    return ""


def _spec_for(functions: list[dict], name: str) -> dict | None:
    return next((f for f in functions if f.get("name") == name), None)


def check_case(case: BfclCase, calls: list[dict] | None) -> str:
    """'' when the generated calls (None: unparsable output) pass BFCL's AST check for the case, else why not."""
    if case.category == "irrelevance":
        return "" if not calls else f"irrelevance: called {', '.join(str(c.get('name')) for c in calls)}"
    if calls is None:
        return "invalid_format: a <tool_call> block is not a JSON object"
    truth = case.ground_truth or []
    if len(calls) != len(truth):
        return f"wrong_count: {len(calls)} calls, expected {len(truth)}"
    if case.category in ("simple", "multiple"):
        spec = _spec_for(case.functions, next(iter(truth[0])))
        return check_call(spec or {}, calls[0], truth[0])
    first_error = ""

    def assign(i: int, used: frozenset[int]) -> bool:
        nonlocal first_error
        if i == len(truth):
            return True
        spec = _spec_for(case.functions, next(iter(truth[i]))) or {}
        for j, call in enumerate(calls):
            if j in used:
                continue
            error = check_call(spec, call, truth[i])
            if error:
                first_error = first_error or error
                continue
            if assign(i + 1, used | {j}):
                return True
        return False

    return "" if assign(0, frozenset()) else f"parallel: {first_error or 'no matching call'}"


__all__ = ["BfclCase", "category_of", "check_call", "check_case", "fc_name", "is_bfcl_row", "read_bfcl",
           "standardize", "to_tool"]  # fmt: skip
