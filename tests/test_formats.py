"""formats.py: every input format is detected and converted to canonical rows whose rendering equals the official
template's rendering (transformers' apply_chat_template) of the equivalent OpenAI messages."""

from __future__ import annotations

import json

import pytest

from qwentune.errors import BadRow
from qwentune.rows.canonical import drop_nulls, needs_tools, normalize_call, normalize_tools
from qwentune.rows.formats import convert, detect_file_format, detect_format
from qwentune.rows.render import IGNORE_INDEX, render_batch, render_preference
from qwentune.rows.template import load_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def template():
    return load_template("qwen2.5-instruct")


def official_ids(tok, messages, tools=None, *, generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def rendered(tok, template, row):
    (result,) = render_batch([row], tok, template)
    assert not isinstance(result, BadRow), result
    return result


def assert_renders_as(tok, template, raw, fmt, messages, tools=None):
    """`raw` is detected as `fmt`, and renders exactly as the official template renders `messages`/`tools`."""
    assert detect_format(raw) == fmt
    row = convert(raw, fmt)
    result = rendered(tok, template, row)
    assert result.input_ids == official_ids(tok, messages, tools)
    return row, result


# ---------------------------------------------------------------- one test per format


def test_messages_openai_with_tools(qwen_tokenizer, template):
    raw = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            # string arguments, no `function` wrapper, content None: all normalised
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": json.dumps([WEATHER]),  # tools as a JSON string
    }
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    row, result = assert_renders_as(qwen_tokenizer, template, raw, "messages", expected, [WEATHER])
    assert row == {"messages": expected, "tools": [WEATHER]}
    assert '"arguments": {"city": "Paris"}' in result.text  # parsed, not double-encoded


def test_sharegpt_parallel_calls_grouped_results_and_glaive_tools(qwen_tokenizer, template):
    bare = [WEATHER["function"], TIME["function"]]  # glaive: bare schemas in a JSON string
    raw = {
        "conversations": [
            {"from": "system", "value": "You help with travel."},
            {"from": "human", "value": "Weather and time in Tokyo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Tokyo"}})},
            {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": '{"tz": "Asia/Tokyo"}'})},
            {"from": "observation", "value": '{"weather": "rain"}'},
            {"from": "observation", "value": '{"time": "09:00"}'},
            {"from": "gpt", "value": "Rainy, 09:00."},
        ],
        "tools": json.dumps(bare),
    }
    expected = [
        {"role": "system", "content": "You help with travel."},
        {"role": "user", "content": "Weather and time in Tokyo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("get_weather", city="Tokyo"), call("get_time", tz="Asia/Tokyo")],
        },
        {"role": "tool", "content": '{"weather": "rain"}'},
        {"role": "tool", "content": '{"time": "09:00"}'},
        {"role": "assistant", "content": "Rainy, 09:00."},
    ]
    row, result = assert_renders_as(qwen_tokenizer, template, raw, "sharegpt", expected, [WEATHER, TIME])
    assert row["messages"] == expected
    assert row["tools"] == [WEATHER, TIME]  # bare schemas wrapped as the OpenAI API sends them
    # the two results share one user turn, and both calls one assistant turn
    assert result.text.count("<|im_start|>user\n<tool_response>") == 1
    assert result.text.count('<tool_call>\n{"name": "get_') == 2
    assert result.text.count("<|im_start|>assistant") == 2


def test_sharegpt_text_beside_call_and_row_level_system(qwen_tokenizer, template):
    raw = {
        "system": "Sys.",
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "gpt", "value": "Let me check."},
            {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])},
            {"from": "observation", "value": "snow"},
            {"from": "gpt", "value": "Snow."},
        ],
        "tools": [WEATHER],
    }
    expected = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", city="Oslo")]},
        {"role": "tool", "content": "snow"},
        {"role": "assistant", "content": "Snow."},
    ]
    row, result = assert_renders_as(qwen_tokenizer, template, raw, "sharegpt", expected, [WEATHER])
    assert row["messages"] == expected
    assert "Let me check.\n<tool_call>" in result.text  # text beside the call is kept


def test_alpaca_with_history_system_and_input(qwen_tokenizer, template):
    raw = {
        "system": "You are terse.",
        "history": [["What is 1+1?", "2."], ["And 2+2?", "4."]],
        "instruction": "Translate to French:",
        "input": "good morning",
        "output": "bonjour",
    }
    expected = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Translate to French:\ngood morning"},
        {"role": "assistant", "content": "bonjour"},
    ]
    row, _ = assert_renders_as(qwen_tokenizer, template, raw, "alpaca", expected)
    assert row["messages"] == expected and row["tools"] is None


def test_alpaca_without_input(qwen_tokenizer, template):
    raw = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    expected = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    row, _ = assert_renders_as(qwen_tokenizer, template, raw, "alpaca", expected)
    assert row["messages"] == expected


def test_prompt_completion_strings(qwen_tokenizer, template):
    raw = {"prompt": "Capital of France?", "completion": "Paris."}
    expected = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    row, _ = assert_renders_as(qwen_tokenizer, template, raw, "prompt_completion", expected)
    assert row["messages"] == expected


def test_prompt_completion_message_lists_train_only_the_completion(qwen_tokenizer, template):
    raw = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of Peru?"},
        ],
        "completion": [{"role": "assistant", "content": "Lima."}],
    }
    expected = [*raw["prompt"], *raw["completion"]]
    row, result = assert_renders_as(qwen_tokenizer, template, raw, "prompt_completion", expected)
    assert row["messages"][1]["train"] is False and "train" not in row["messages"][3]
    trained = [t for t, lab in zip(result.input_ids, result.labels) if lab != IGNORE_INDEX]
    assert qwen_tokenizer.decode(trained) == "Lima.<|im_end|>"


def _check_pair(tok, template, row, prompt, chosen, rejected, tools=None):
    pair = render_preference(row["prompt"], row["chosen"], row["rejected"], row["tools"], tok, template)
    assert pair.prompt_input_ids == official_ids(tok, prompt, tools, generation_prompt=True)
    for ids, completion in ((pair.chosen_input_ids, chosen), (pair.rejected_input_ids, rejected)):
        whole = official_ids(tok, prompt + completion, tools)
        # the completion runs through <|im_end|>; the template's trailing "\n" is not part of it
        assert pair.prompt_input_ids + ids == whole[:-1]
        assert tok.decode(whole[-1:]) == "\n"


@pytest.mark.parametrize(
    "raw",
    [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {  # LLaMA-Factory's ShareGPT preference rows
            "conversations": [{"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"},
        },
        {  # implicit prompt: two whole conversations sharing their start
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
        {"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"},
    ],
    ids=["strings", "messages", "sharegpt", "implicit_prompt", "alpaca"],
)
def test_preference_formats(qwen_tokenizer, template, raw):
    assert detect_format(raw) == "preference"
    row = convert(raw, "preference")
    prompt = [{"role": "user", "content": "2+2?"}]
    chosen, rejected = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    assert row == {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": None}
    _check_pair(qwen_tokenizer, template, row, prompt, chosen, rejected)


def test_preference_with_tools_and_tool_call_completion(qwen_tokenizer, template):
    raw = {
        "prompt": [{"role": "user", "content": "Weather in Rome?"}],
        "chosen": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Rome"}'}],
            }
        ],
        "rejected": [{"role": "assistant", "content": "It is sunny."}],
        "tools": [WEATHER],
    }
    row = convert(raw, "preference")
    chosen = [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Rome")]}]
    _check_pair(qwen_tokenizer, template, row, raw["prompt"], chosen, raw["rejected"], [WEATHER])


# ---------------------------------------------------------------- conversion rules


def test_role_aliases_content_parts_and_legacy_function_call():
    row = convert(
        {
            "messages": [
                {"role": "human", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
                {"role": "gpt", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "function", "name": "f", "content": {"ok": True}},
                {"role": "bot", "content": "done", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "model", "content": "done again", "train": True},
            ]
        },
        "messages",
    )
    assert row["messages"] == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "", "tool_calls": [call("f")]},
        {"role": "tool", "content": '{"ok": true}', "name": "f"},
        {"role": "assistant", "content": "done", "train": False},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "done again", "train": True},
    ]


def test_image_parts_pass_through_untouched():
    parts = [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]
    row = convert(
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "A cat."}]}, "messages"
    )
    assert row["messages"][0]["content"] == parts
    # Arrow adds `image: None` to text parts (which the VL template would render as images): removed for Arrow rows
    arrow_parts = [
        {"type": "image", "image": "cat.png", "text": None},
        {"type": "text", "text": "What?", "image": None},
    ]
    row = convert(
        {"messages": [{"role": "user", "content": arrow_parts}, {"role": "assistant", "content": "A cat."}]},
        "messages",
        arrow=True,
    )
    assert row["messages"][0]["content"] == [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What?"}]


def test_tool_call_forms_are_normalised():
    wrapped = call("f", a=1)
    assert normalize_call({"name": "f", "arguments": {"a": 1}}) == wrapped
    assert normalize_call({"name": "f", "arguments": '{"a": 1}'}) == wrapped
    assert normalize_call({"function": {"name": "f", "arguments": '{"a": 1}'}}) == wrapped
    assert normalize_call('{"name": "f", "arguments": {"a": 1}}') == wrapped
    assert normalize_call({"name": "f", "arguments": json.dumps('{"a": 1}')}) == wrapped  # double-encoded
    assert normalize_call({"name": "f"}) == call("f")


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "f", "arguments": "{not json"},
        {"name": "f", "arguments": "[1, 2]"},
        {"arguments": {"a": 1}},
        "nope",
    ],
)
def test_invalid_tool_calls(bad):
    with pytest.raises(BadRow) as e:
        normalize_call(bad)
    assert e.value.reason == "invalid_tool_json"


def test_tools_forms():
    assert normalize_tools(json.dumps([WEATHER])) == [WEATHER]
    assert normalize_tools([WEATHER["function"]]) == [WEATHER]
    assert normalize_tools([json.dumps(WEATHER)]) == [WEATHER]  # a list of JSON strings (datasets Json lists)
    assert normalize_tools(WEATHER) == [WEATHER]
    assert normalize_tools("") is None and normalize_tools([]) is None and normalize_tools(None) is None
    for bad in ("[{oops", "42", [{"description": "no name"}]):
        with pytest.raises(BadRow) as e:
            normalize_tools(bad)
        assert e.value.reason == "invalid_tool_json"


def test_arrow_nulls_are_dropped_only_for_arrow_sources():
    args = {"city": "Paris", "unit": None}
    raw = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "w", "arguments": args}]},
        ]
    }
    arrow_row = convert(raw, "messages", arrow=True)
    json_row = convert(raw, "messages")
    assert arrow_row["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert json_row["messages"][1]["tool_calls"][0]["function"]["arguments"] == args  # a null the user wrote
    assert drop_nulls({"a": [{"b": None, "c": 1}], "d": None}) == {"a": [{"c": 1}]}


def test_recipe_system_prompt_and_default_tools():
    raw = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    row = convert(raw, "messages", tools=[WEATHER], system_prompt="House style.")
    assert row["messages"][0] == {"role": "system", "content": "House style."}
    assert row["tools"] == [WEATHER]
    own = {"messages": [{"role": "system", "content": "Mine."}, *raw["messages"]], "tools": [TIME]}
    row = convert(own, "messages", tools=[WEATHER], system_prompt="House style.")
    assert row["messages"][0]["content"] == "Mine." and row["tools"] == [TIME]  # the row's own win


def test_csv_style_json_string_cells():
    row = convert(
        {
            "conversations": json.dumps([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]),
            "system": "",
            "tools": "",
        },
        "sharegpt",
    )
    assert row == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "tools": None,
    }
    row = convert({"prompt": "[1, 2] sorted?", "completion": "[1, 2]"}, "prompt_completion")
    assert row["messages"][0]["content"] == "[1, 2] sorted?"  # JSON-looking text that is not messages stays text


@pytest.mark.parametrize(
    ("raw", "fmt", "reason"),
    [
        ({}, "messages", "empty"),
        ({"messages": []}, "messages", "empty"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no_assistant_turn"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "bad_role_order"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "tool", "content": "r"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "bad_role_order",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages",
            "bad_role_order",
        ),
        ({"messages": [{"role": "narrator", "content": "q"}]}, "messages", "bad_role_order"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "messages",
            "empty_completion",
        ),
        ({"instruction": "q", "output": ""}, "alpaca", "empty_completion"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{bad"}]},
            "sharegpt",
            "invalid_tool_json",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[{"},
            "messages",
            "invalid_tool_json",
        ),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "preference", "identical_pair"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "preference", "empty_completion"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "preference", "empty"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "x",
                "rejected": "y",
            },
            "preference",
            "bad_role_order",
        ),
    ],
)
def test_bad_rows(raw, fmt, reason):
    with pytest.raises(BadRow) as e:
        convert(raw, fmt)
    assert e.value.reason == reason


def test_detection():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": [], "tools": "[]"}) == "sharegpt"
    assert detect_format({"instruction": "", "input": "", "output": ""}) == "alpaca"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}) == "preference"
    assert detect_format({"conversations": [], "chosen": {}, "rejected": {}}) == "preference"
    assert detect_format({"text": "raw"}) is None and detect_format([1]) is None
    assert detect_format({"messages": None, "prompt": "p", "completion": "c"}) == "prompt_completion"  # Arrow nulls
    assert detect_file_format([{"id": 1}, {"messages": []}]) == "messages"


def test_needs_tools():
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": None}
    assert not needs_tools(plain)
    assert needs_tools({**plain, "tools": [WEATHER]})
    calls = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call("f")]}]
    assert needs_tools({"messages": calls, "tools": None})
