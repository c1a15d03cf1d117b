"""GRPO's built-in rewards on scripted replies: the perfect reply scores 1, each failure its own documented value
(docs/grpo.md); the TRL adapter decodes completions with their special tokens and logs each reward's parts."""

from __future__ import annotations

import json

import pytest
from tiny_models import shared_tokenizer

from qwentune.errors import QwentuneError
from qwentune.eval.rewards import Reward, as_reward, no_call, reward_functions, tool_call, well_formed
from qwentune.training.grpo_rewards import TrlReward, measured, trl_rewards

END = "<|im_end|>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "unit"],
}}}]  # fmt: skip
CALLS = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
]}  # fmt: skip
ANSWER = {"role": "assistant", "content": "Which city?"}


def call(name: str, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


RIGHT = call("get_weather", {"unit": "celsius", "city": "Paris"})  # any key order
# reply → (tool_call value, its parts format / names / params / values)
TOOL_CALL_CASES = {
    "exact": (RIGHT + END, 1.0, (1, 1, 1, 1)),
    "exact, arguments as a JSON string": (call("get_weather", json.dumps({"city": "Paris", "unit": "celsius"})),
                                          1.0, (1, 1, 1, 1)),
    "exact, an optional argument more": (call("get_weather", {"city": "Paris", "unit": "celsius", "days": 1}), 1.0,
                                         (1, 1, 1, 1)),
    "no <tool_call> tag": ("It is sunny in Paris." + END, 0.0, (0, 0, 0, 0)),
    "a tag, not JSON": ("<tool_call>\n{get_weather: Paris}\n</tool_call>" + END, 0.125, (0.5, 0, 0, 0)),
    "a tag never closed": ('<tool_call>\n{"name": "get_weather", "arguments": {}}' + END, 0.125, (0.5, 0, 0, 0)),
    "another tool": (call("get_time", {"city": "Paris", "unit": "celsius"}) + END, 0.25, (1, 0, 0, 0)),
    "wrong parameter names": (call("get_weather", {"town": "Paris", "units": "celsius"}) + END, 0.5, (1, 1, 0, 0)),
    "a parameter missing": (call("get_weather", {"city": "Paris"}) + END, 0.75, (1, 1, 0.5, 0.5)),
    "a call more": (RIGHT + "\n" + call("get_time", {}) + END, 0.625, (1, 0.5, 0.5, 0.5)),
    "one value wrong": (call("get_weather", {"city": "Paris", "unit": "kelvin"}) + END, 0.875, (1, 1, 1, 0.5)),
}  # fmt: skip


@pytest.mark.parametrize("case", TOOL_CALL_CASES)
def test_tool_call_reward_exact_and_each_partial_credit(case):
    reply, value, parts = TOOL_CALL_CASES[case]
    got = tool_call(reply, CALLS, TOOLS)
    assert got.value == pytest.approx(value)
    assert tuple(got.parts.values()) == pytest.approx(parts)
    assert list(got.parts) == ["format", "names", "params", "values"]
    assert got.value == sum(got.parts.values()) / 4 or got.value == 1.0


def test_partial_credit_stays_below_an_exact_call():
    """An argument the schema does not know is wrong, for toolscore and for the partial credit alike."""
    unknown = tool_call(call("get_weather", {"city": "Paris", "unit": "celsius", "color": "red"}), CALLS, TOOLS)
    assert unknown.value == pytest.approx((1 + 1 + 2 / 3 + 1) / 4) and unknown.value < 1
    assert tool_call(RIGHT, CALLS, None).value == 1.0  # no schema: the same arguments are still exact
    assert tool_call(RIGHT, ANSWER, TOOLS) is None  # the reference makes no call: not this reward's row


def test_no_call_reward():
    assert no_call("Which city do you mean?" + END, ANSWER) == Reward(1.0, {"refrained": 1.0})
    assert no_call(RIGHT + END, ANSWER) == Reward(0.0, {"refrained": 0.0})
    assert no_call("<tool_call>" + END, ANSWER).value == 0.0  # a bare tag is a call attempt
    assert no_call("Sure." + END, CALLS) is None  # the reference calls: tool_call scores it


@pytest.mark.parametrize(
    "reply, value, stops, blocks",
    [
        ("Which city?" + END, 1.0, 1, 1),  # a plain answer that stops: well formed
        (RIGHT + END, 1.0, 1, 1),
        (RIGHT + "\n" + RIGHT + END, 1.0, 1, 1),
        ("Which city?", 0.5, 0, 1),  # cut at the length limit: no <|im_end|>
        ("Which city?" + END + "more", 0.5, 0, 1),  # text after the end of the turn
        ('<tool_call>\n{"name": "get_weather", "arguments": {}}' + END, 0.5, 1, 0),  # never closed
        ("</tool_call>" + END, 0.5, 1, 0),  # a stray closing tag
        ("<tool_call><tool_call>{}</tool_call></tool_call>" + END, 0.5, 1, 0),  # nested
        ("<tool_call>\n{get_weather}\n</tool_call>" + END, 0.5, 1, 0),  # not JSON
        ('<tool_call>\n{"name": "get_weather"}\n</tool_call>' + END, 0.5, 1, 0),  # no arguments object
        ('<tool_call>\n["get_weather", {}]\n</tool_call>' + END, 0.5, 1, 0),  # not an object
        ("<tool_call>\n{", 0.0, 0, 0),  # cut inside a block: both parts fail
    ],
)
def test_format_reward(reply, value, stops, blocks):
    assert well_formed(reply) == Reward(value, {"stops": float(stops), "blocks": float(blocks)})


def test_reward_names_and_returned_values():
    assert list(reward_functions(["format", "tool_call"])) == ["format", "tool_call"]
    mine = lambda completion, reference, tools: 0.5  # noqa: E731
    assert reward_functions(["mine", "tool_call"], {"mine": mine})["mine"] is mine
    with pytest.raises(QwentuneError, match=r"'grpo.rewards' names an unknown reward 'tool_cal'") as error:
        reward_functions(["tool_cal"])
    assert error.value.hint == "did you mean 'tool_call'?"
    with pytest.raises(QwentuneError, match="not callable"):
        reward_functions(["mine"], {"mine": 3})
    assert as_reward(True, "x") == Reward(1.0) and as_reward(None, "x") is None and as_reward(2, "x") == Reward(2.0)
    with pytest.raises(QwentuneError, match="returned str"):
        as_reward("1", "x")


def test_trl_adapter_decodes_special_tokens_and_logs_the_parts():
    """TRL's `completions` are decoded without special tokens; the rewards see <|im_end|> (from completion_ids)."""
    tok = shared_tokenizer()
    replies = [RIGHT + END, "Which city?" + END, "Which city?"]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
    assert tok.batch_decode(ids, skip_special_tokens=True)[1] == "Which city?"  # what TRL hands rewards as text
    logged: dict = {}
    functions, weights = trl_rewards({"format": 0.5, "tool_call": 1.0}, None, tok)
    assert [f.__name__ for f in functions] == ["format", "tool_call"] and weights == [0.5, 1.0]
    refs = [json.dumps(CALLS), json.dumps(ANSWER), json.dumps(ANSWER)]
    tools = [json.dumps(TOOLS), "", ""]
    fmt, calls = functions
    assert fmt(None, None, ids, refs, tools, log_metric=logged.__setitem__) == [1.0, 1.0, 0.5]
    assert logged == {"rewards/format/stops": pytest.approx(2 / 3), "rewards/format/blocks": 1.0}
    assert calls(None, None, ids, refs, tools, log_metric=logged.__setitem__) == [1.0, None, None]
    assert logged["rewards/tool_call/values"] == 1.0  # parts averaged over the rows the reward applies to

    seen = []
    custom = TrlReward("mine", lambda c, r, t: seen.append((c, r, t)) or Reward(0.25, {"x": 1.0}), tok)
    assert custom(None, None, ids[:1], refs[:1], tools[:1]) == [0.25]
    assert seen == [(RIGHT + END, CALLS, TOOLS)]


def test_measured_summarises_first_and_last_step():
    rows = [
        {"step": 1, "reward": 0.5, "frac_reward_zero_std": 1.0, "rewards/format/mean": 0.5, "rewards/format/std": 0.1,
         "rewards/format/stops": 0.0},
        {"step": 2, "reward": 0.9, "frac_reward_zero_std": 0.5, "rewards/format/mean": 0.9, "rewards/format/std": 0.1,
         "rewards/format/stops": 0.8},
        {"step": 2, "train_runtime": 3.0},
    ]  # fmt: skip
    assert measured(rows, ["format"]) == {
        "reward": [0.5, 0.9],
        "zero-variance groups (mean share)": 0.75,
        "format": [0.5, 0.9],
        "format/stops": [0.0, 0.8],
    }
