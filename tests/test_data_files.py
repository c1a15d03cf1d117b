"""The bundled datasets in data/: reproducible from data/make_data.py and well-formed."""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest

from qwentune.eval.evaluation import collect
from qwentune.eval.toolscore import score_tool_calls

DATA = Path(__file__).resolve().parent.parent / "data"
ROLES = {"system", "user", "assistant", "tool"}


def _load_make_data():
    spec = importlib.util.spec_from_file_location("qwentune_make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


make_data = _load_make_data()
from gen import tools as tool_rows  # noqa: E402 (data/gen, on the path once make_data is loaded)
from gen.tool_values import RATES  # noqa: E402


def read_rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def parse_tools(tools) -> dict[str, dict]:
    if isinstance(tools, str):
        tools = json.loads(tools)
    assert isinstance(tools, list) and tools
    out = {}
    for tool in tools:
        assert tool["type"] == "function"
        fn = tool["function"]
        assert fn["description"] and fn["parameters"]["type"] == "object"
        assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
        assert fn["name"] not in out
        out[fn["name"]] = fn
    return out


def check_call(call: dict, tools: dict[str, dict]) -> tuple[str, dict]:
    """A tool call names an offered tool and its arguments satisfy the tool's schema; returns (name, args)."""
    assert call["type"] == "function"
    fn = call["function"]
    assert fn["name"] in tools, f"{fn['name']} not offered ({sorted(tools)})"
    args = fn["arguments"]
    if isinstance(args, str):
        args = json.loads(args)
    assert isinstance(args, dict)
    params = tools[fn["name"]]["parameters"]
    props = params["properties"]
    assert set(params["required"]) <= set(args), (fn["name"], args)
    assert set(args) <= set(props), (fn["name"], args)
    order = [k for k in props if k in args]
    assert list(args) == order, f"argument order {list(args)} != schema order {order}"
    for key, value in args.items():
        spec = props[key]
        check_value(value, spec, key)
    return fn["name"], args


def check_value(value, spec: dict, key: str) -> None:
    """A value fits its JSON-schema type (string, number, integer, boolean, array, object) and enum."""
    kind = spec["type"]
    if kind == "string":
        assert isinstance(value, str) and value, key
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), key
    elif kind == "boolean":
        assert isinstance(value, bool), key
    elif kind == "array":
        assert isinstance(value, list) and value, key
        for item in value:
            check_value(item, spec["items"], key)
    elif kind == "object":
        assert isinstance(value, dict) and set(spec["required"]) <= set(value) <= set(spec["properties"]), key
        for k, v in value.items():
            check_value(v, spec["properties"][k], k)
    else:
        raise AssertionError(f"unknown type {kind}")
    if "enum" in spec:
        assert value in spec["enum"], (key, value)


def check_messages(msgs: list[dict], tools: dict[str, dict] | None, *, complete: bool = True) -> list[list[str]]:
    """Role order, tool results after every call turn (one per call, same order); returns the call names per turn."""
    assert isinstance(msgs, list) and msgs
    calls_per_turn = []
    i = 0
    if msgs[0]["role"] == "system":
        assert isinstance(msgs[0]["content"], str) and msgs[0]["content"]
        i = 1
    expect = "user"
    while i < len(msgs):
        m = msgs[i]
        assert m["role"] in ROLES and m["role"] != "system", f"unexpected role at {i}: {m['role']}"
        assert m["role"] == expect, f"expected {expect} at {i}, got {m['role']}"
        if m["role"] == "user":
            assert isinstance(m["content"], str) and m["content"].strip()
            expect = "assistant"
            i += 1
            continue
        if m.get("tool_calls"):
            assert tools is not None, "tool call in a row without tools"
            assert m["content"] == ""
            names = [check_call(c, tools)[0] for c in m["tool_calls"]]
            results = msgs[i + 1 : i + 1 + len(names)]
            assert [r["role"] for r in results] == ["tool"] * len(names), "one tool result per call"
            assert [r["name"] for r in results] == names, "tool results in call order"
            for r in results:
                assert isinstance(json.loads(r["content"]), dict)
            calls_per_turn.append(names)
            i += 1 + len(names)
            expect = "assistant"  # the final answer after the tool results
            continue
        assert isinstance(m["content"], str) and m["content"].strip()
        expect = "user"
        i += 1
    if complete:
        assert msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls"), "ends with an assistant answer"
    return calls_per_turn


def user_texts(msgs) -> list[str]:
    if isinstance(msgs, str):
        return [msgs]
    return [m["content"] for m in msgs if m["role"] == "user"]


# ---------------------------------------------------------------------------------------------------------------------


def test_regenerates_byte_for_byte(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        assert make_data.main(["--out", str(tmp_path)]) == 0
    for name in make_data.FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name} differs: rerun make_data.py"


def test_generator_modules_stay_small():
    """make_data.py is the entry point; each dataset kind has its own module under data/gen/."""
    for path in [DATA / "make_data.py", *sorted((DATA / "gen").glob("*.py"))]:
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 500, path.name


def test_row_counts_and_one_object_per_line():
    expected = {
        "instructions.jsonl": make_data.N_INSTRUCTIONS,
        "tool_calls.jsonl": make_data.N_TOOL_TRAIN,
        "tool_calls_eval.jsonl": make_data.N_TOOL_EVAL,
        "preferences.jsonl": make_data.N_PREF_TRAIN,
        "preferences_eval.jsonl": make_data.N_PREF_EVAL,
    }
    for name, n in expected.items():
        text = (DATA / name).read_text(encoding="utf-8")
        lines = text.split("\n")
        assert lines[-1] == "" and all(lines[:-1]), f"{name}: one JSON object per line, newline-terminated"
        rows = [json.loads(line) for line in lines[:-1]]
        assert len(rows) == n and all(isinstance(r, dict) for r in rows)


def test_instructions():
    rows = read_rows("instructions.jsonl")
    n_system = n_multi = n_unicode = 0
    for row in rows:
        assert set(row) == {"messages"}
        msgs = row["messages"]
        assert check_messages(msgs, None) == []
        n_system += msgs[0]["role"] == "system"
        n_multi += len(user_texts(msgs)) > 1
        n_unicode += any(ord(ch) > 127 for m in msgs for ch in m["content"])
    assert n_system >= 30 and n_multi >= 20 and n_unicode >= 20
    assert len({tuple(user_texts(r["messages"])) for r in rows}) == len(rows), "no duplicate conversations"


def test_instruction_python_snippets_print_what_the_answer_says():
    pattern = re.compile(r"```python\n(.*?)\n```", re.S)
    checked = 0
    for row in read_rows("instructions.jsonl"):
        msgs = row["messages"]
        for i, m in enumerate(msgs):
            found = pattern.search(m["content"]) if m["role"] == "user" else None
            if found:
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    exec(found.group(1), {})  # our own generated snippets
                assert msgs[i + 1]["content"] == f"It prints:\n```\n{buf.getvalue().rstrip()}\n```"
                checked += 1
    assert checked >= 10


def _check_tool_results(msgs: list[dict]) -> None:
    """The tool results are the computed answers to the calls' arguments."""
    for i, m in enumerate(msgs):
        for j, call in enumerate(m.get("tool_calls") or []):
            name, args = call["function"]["name"], call["function"]["arguments"]
            args = json.loads(args) if isinstance(args, str) else args
            result = json.loads(msgs[i + 1 + j]["content"])
            if name == "calculator":
                assert math.isclose(result["result"], make_data.safe_eval(args["expression"]), rel_tol=1e-6)
            elif name == "convert_units":
                expected = make_data.convert(args["value"], args["from_unit"], args["to_unit"])
                assert math.isclose(result["result"], expected, rel_tol=1e-4, abs_tol=0.005 + 1e-9)  # 2 places
            elif name == "currency_convert":
                rate = RATES[args["to_currency"]] / RATES[args["from_currency"]]
                assert abs(result["converted"] - args["amount"] * rate) <= 0.01 and result["note"]
            elif name == "get_weather":
                assert result["city"] == args["city"] and result.get("unit") == args.get("unit")
            elif name == "get_time_in_timezone":
                assert result["timezone"] == args["timezone"] and result.get("utc_time") == args.get("utc_time")
            elif name == "compute_statistics":
                assert result.get("min", min(args["numbers"])) == min(args["numbers"])
                assert result.get("max", max(args["numbers"])) == max(args["numbers"])


@pytest.mark.parametrize("name", ["tool_calls.jsonl", "tool_calls_eval.jsonl"])
def test_tool_call_rows(name):
    rows = read_rows(name)
    kinds = {"parallel": 0, "multi_turn": 0, "string_args": 0, "string_tools": 0, "system": 0}
    for row in rows:
        assert set(row) == {"tools", "messages"}
        kinds["string_tools"] += isinstance(row["tools"], str)
        tools = parse_tools(row["tools"])
        turns = check_messages(row["messages"], tools)
        _check_tool_results(row["messages"])
        kinds["parallel"] += any(len(t) > 1 for t in turns)
        kinds["multi_turn"] += len(user_texts(row["messages"])) > 1
        kinds["system"] += row["messages"][0]["role"] == "system"
        kinds["string_args"] += any(
            isinstance(c["function"]["arguments"], str) for m in row["messages"] for c in m.get("tool_calls") or []
        )
        assert all(len(t) <= 3 for t in turns), "at most 3 parallel calls"
    assert 0.2 * len(rows) <= kinds["system"] <= 0.5 * len(rows), "some rows have a system prompt, most not"
    if name == "tool_calls.jsonl":
        assert kinds["parallel"] >= 100 and kinds["multi_turn"] >= 100
        assert 0.06 * len(rows) <= kinds["string_args"] <= 0.25 * len(rows)
        assert kinds["string_tools"] >= 10
    else:
        assert kinds["parallel"] >= 8 and kinds["string_args"] == kinds["string_tools"] == 0


def _decisions(rows: list[dict]) -> collections.Counter:
    return collections.Counter(d for row in rows for d in tool_rows.decisions(row))


def test_tool_call_decisions():
    """What the assistant does after each user message (call, ask for a missing argument, answer without a call), in
    the train file and in every prefix of it (recipes take the first data.limit rows); a train row is a session of
    2-4 requests against one offered tool list (a follow-up turn can add one), a held-out row one request."""
    train = read_rows("tool_calls.jsonl")
    assert _decisions(train) == {"call": 1380, "answer": 917, "ask": 229}
    assert _decisions(train[:96]) == {"call": 166, "answer": 100, "ask": 28}, "the Quickstart's 96 rows"
    requests = collections.Counter(len(tool_rows.decisions(row)) for row in train)
    assert sum(n for k, n in requests.items() if k >= 2) >= 0.7 * len(train) and max(requests) <= 7
    held_out = read_rows("tool_calls_eval.jsonl")
    assert _decisions(held_out) == {"call": 24, "answer": 12, "ask": 4}
    assert all(len(tool_rows.decisions(row)) == 1 for row in held_out)
    assert collections.Counter(map(tool_rows.category, held_out)) == {"single": 16, "parallel": 8, "no_call": 12,
                                                                       "clarify": 4}  # fmt: skip


def _schemas(rows: list[dict]) -> dict[str, set[str]]:
    out = collections.defaultdict(set)
    for row in rows:
        if "tools" in row:
            for fn in parse_tools(row["tools"]).values():
                out[fn["name"]].add(json.dumps(fn["parameters"], sort_keys=True))
    return out


def test_tool_eval_uses_only_unseen_tools():
    """No held-out tool name or parameter schema occurs in any training file or in tools.json."""
    train = _schemas(
        read_rows("tool_calls.jsonl") + read_rows("preferences.jsonl") + read_rows("preferences_eval.jsonl")
    )
    train_names = set(train) | {t["function"]["name"] for t in json.loads((DATA / "tools.json").read_text())}
    train_params = set().union(*train.values())
    held_out = _schemas(read_rows("tool_calls_eval.jsonl"))
    assert len(train) >= 30 and len(held_out) >= 8
    assert not set(held_out) & train_names
    assert not set().union(*held_out.values()) & train_params
    called = {c["function"]["name"] for r in read_rows("tool_calls_eval.jsonl") for m in r["messages"]
              for c in m.get("tool_calls") or []}  # fmt: skip
    assert called == set(held_out), "every held-out tool is called at least once"


def test_training_tools_cover_argument_types():
    kinds = collections.Counter()
    for versions in _schemas(read_rows("tool_calls.jsonl")).values():
        for params in map(json.loads, versions):
            kinds.update(spec["type"] for spec in params["properties"].values())
            kinds["enum"] += sum("enum" in spec for spec in params["properties"].values())
            kinds["optional"] += len(params["properties"]) > len(params["required"])
    assert all(
        kinds[k] >= 2 for k in ("string", "number", "integer", "boolean", "array", "object", "enum", "optional")
    )


def test_optional_arguments_are_present_and_absent():
    """Optional arguments appear in some calls and not in others, only when the prompt asks for them."""
    seen: dict[str, set[bool]] = collections.defaultdict(set)
    for row in read_rows("tool_calls.jsonl"):
        tools = parse_tools(row["tools"])
        for m in row["messages"]:
            for c in m.get("tool_calls") or []:
                name, args = check_call(c, tools)
                params = tools[name]["parameters"]
                for key in set(params["properties"]) - set(params["required"]):
                    seen[f"{name}.{key}"].add(key in args)
    assert sum(v == {True, False} for v in seen.values()) >= 25


def test_tools_json_for_chat():
    tools = json.loads((DATA / "tools.json").read_text(encoding="utf-8"))
    assert "get_weather" in parse_tools(tools)


@pytest.mark.parametrize("name", ["preferences.jsonl", "preferences_eval.jsonl"])
def test_preference_rows(name):
    rows = read_rows(name)
    n_tools = n_plain = 0
    for row in rows:
        assert set(row) - {"tools"} == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        if isinstance(row["prompt"], str):
            n_plain += 1
            assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
            assert row["prompt"] and row["chosen"] and row["rejected"]
            continue
        tools = parse_tools(row["tools"]) if "tools" in row else None
        n_tools += tools is not None
        prompt = row["prompt"]
        assert prompt[-1]["role"] == "user"
        check_messages(prompt, tools, complete=False)
        for side in ("chosen", "rejected"):
            answer = row[side]
            assert len(answer) == 1 and answer[0]["role"] == "assistant"
            if answer[0].get("tool_calls"):
                assert tools is not None
                for call in answer[0]["tool_calls"]:
                    check_call(call, tools)
            else:
                assert answer[0]["content"].strip()
    assert n_tools >= 0.1 * len(rows)
    assert n_plain < 0.1 * len(rows)


def test_eval_rows_are_not_in_train():
    """No eval conversation appears in any train file, and no single-turn eval prompt is any train user turn."""
    train_users, train_convs = set(), set()
    for name in ("instructions.jsonl", "tool_calls.jsonl", "preferences.jsonl"):
        for row in read_rows(name):
            texts = user_texts(row.get("messages") or row["prompt"])
            train_users.update(texts)
            train_convs.add(tuple(texts))
    for name in ("tool_calls_eval.jsonl", "preferences_eval.jsonl"):
        for row in read_rows(name):
            texts = user_texts(row.get("messages") or row["prompt"])
            assert tuple(texts) not in train_convs, texts
            if len(texts) == 1:
                assert texts[0] not in train_users, texts


def test_tool_eval_uses_held_out_cities():
    def cities(name):
        out = set()
        for row in read_rows(name):
            for m in row["messages"]:
                for c in m.get("tool_calls") or []:
                    args = c["function"]["arguments"]
                    args = json.loads(args) if isinstance(args, str) else args
                    out.update(v for k, v in args.items() if k in ("city", "timezone"))
        return out

    assert not cities("tool_calls.jsonl") & cities("tool_calls_eval.jsonl")


def _score(items, replies: list[str]) -> dict[str, list[int]]:
    """[right, total] per kind, scored as `qwentune eval` scores the held-out split (toolscore per item)."""
    out = {"exact": [0, 0], "no_call": [0, 0]}
    for item, reply in zip(items, replies, strict=True):
        key = "exact" if item.kind == "tool_call" else "no_call"
        out[key][0] += score_tool_calls(reply, item.expected, item.tools).ok
        out[key][1] += 1
    return out


def test_held_out_split_scores_calls_and_refusals():
    """A reply that repeats each reference turn scores every row; plain text scores no call; calling always fails
    every no-call row. (`qwentune eval` reads and scores the split this way.)"""
    items, skipped = collect([DATA / "tool_calls_eval.jsonl"])
    assert not skipped and len(items) == 40
    perfect = []
    for row in read_rows("tool_calls_eval.jsonl"):
        first = next(m for m in row["messages"] if m["role"] == "assistant")
        calls = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in first.get("tool_calls") or []
        ]
        blocks = "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in reversed(calls))  # any order
        perfect.append(blocks or first["content"])
    assert _score(items, perfect) == {"exact": [24, 24], "no_call": [16, 16]}
    assert _score(items, ["Sure."] * len(items))["exact"] == [0, 24]
    always = '<tool_call>\n{"name": "get_tide_times", "arguments": {"harbor": "Kinsale"}}\n</tool_call>'
    assert _score(items, [always] * len(items))["no_call"] == [0, 16]
    as_floats = [re.sub(r'(": \d+)([,}])', r"\1.0\2", r) if "<tool_call>" in r else r for r in perfect]
    assert as_floats != perfect and _score(items, as_floats)["exact"] == [24, 24], "3 == 3.0"
    one_short = [r.split("</tool_call>")[0] + "</tool_call>" if r.count("<tool_call>") > 1 else r for r in perfect]
    assert _score(items, one_short)["exact"] == [16, 24], "a parallel row needs every call"
