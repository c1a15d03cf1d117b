"""Tool-call scoring rules (pure functions, no model)."""

from __future__ import annotations

import json

from qwentune.eval.toolscore import parse_tool_calls, score_no_call, score_tool_calls, values_equal
from qwentune.eval.toolscore import parse_tool_calls as parse_from_evaluate

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
            "required": ["amount", "to"],
        },
    },
}
TOOLS = [WEATHER, CONVERT]


def reply(*calls: dict) -> str:
    return "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def test_parse_is_importable_from_evaluate_and_reads_blocks():
    assert parse_from_evaluate is parse_tool_calls
    text = reply(call("get_weather", city="Oslo")) + "\nsome text"
    assert parse_tool_calls(text) == [call("get_weather", city="Oslo")]
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") is None
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>') == [call("f", a=1)]
    assert parse_tool_calls("no calls here") == []


def test_perfect_reply_scores_one_with_full_breakdown():
    v = score_tool_calls(reply(call("get_weather", city="Oslo")), [call("get_weather", city="Oslo")], TOOLS)
    assert (v.ok, v.tagged, v.valid_json, v.right_function, v.right_arguments, v.why) == (True,) * 5 + ("",)


def test_numbers_compare_as_numbers_but_bools_are_not_numbers():
    assert values_equal(1, 1.0) and values_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not values_equal(True, 1) and not values_equal("1", 1) and not values_equal([1, 2], [2, 1])
    v = score_tool_calls(reply(call("convert", amount=10, to="EUR")), [call("convert", amount=10.0, to="EUR")], TOOLS)
    assert v.ok


def test_optional_arguments_allowed_either_way_but_required_and_unknown_are_not():
    want = [call("get_weather", city="Oslo", unit="celsius")]
    assert score_tool_calls(reply(call("get_weather", city="Oslo")), want, TOOLS).ok  # optional left out
    extra = reply(call("get_weather", city="Oslo", unit="celsius", days=3))
    assert score_tool_calls(extra, want, TOOLS).ok  # optional added
    v = score_tool_calls(reply(call("get_weather", unit="celsius")), want, TOOLS)
    assert not v.ok and v.right_function and not v.right_arguments and "missing argument city" in v.why
    v = score_tool_calls(reply(call("get_weather", city="Oslo", unit="celsius", mood="happy")), want, TOOLS)
    assert not v.ok and "unexpected argument mood" in v.why
    v = score_tool_calls(reply(call("get_weather", city="Bergen")), want, TOOLS)
    assert not v.ok and 'argument city: got "Bergen", expected "Oslo"' in v.why
    # without a schema for the tool nothing is optional
    assert not score_tool_calls(reply(call("get_weather", city="Oslo")), want, None).ok


def test_parallel_calls_in_any_order_and_counts_must_match():
    want = [call("get_weather", city="Oslo"), call("get_weather", city="Rome"), call("convert", amount=5, to="USD")]
    shuffled = reply(
        call("convert", amount=5, to="USD"), call("get_weather", city="Rome"), call("get_weather", city="Oslo")
    )
    assert score_tool_calls(shuffled, want, TOOLS).ok
    v = score_tool_calls(reply(call("get_weather", city="Oslo"), call("convert", amount=5, to="USD")), want, TOOLS)
    assert not v.ok and not v.right_function and "expected" in v.why
    twice = reply(
        call("get_weather", city="Oslo"), call("get_weather", city="Oslo"), call("convert", amount=5, to="USD")
    )
    assert not score_tool_calls(twice, want, TOOLS).ok  # each expected call needs its own generated call


def test_breakdown_untagged_and_invalid_json():
    v = score_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [call("get_weather", city="Oslo")])
    assert (v.ok, v.tagged, v.why) == (False, False, "no <tool_call> block")
    v = score_tool_calls("<tool_call>{'name': 'get_weather'}</tool_call>", [call("get_weather", city="Oslo")])
    assert (v.ok, v.tagged, v.valid_json) == (False, True, False)
    v = score_tool_calls(reply(call("convert", amount=1, to="EUR")), [call("get_weather", city="Oslo")], TOOLS)
    assert (v.valid_json, v.right_function, v.why) == (True, False, "called convert; expected get_weather")


def test_no_call_rows_score_refraining():
    assert score_no_call("The capital of France is Paris.").ok
    assert score_tool_calls("Paris.", [], TOOLS).kind == "no_call"
    v = score_no_call(reply(call("get_weather", city="Paris")))
    assert not v.ok and v.why == "called get_weather; expected no call"
