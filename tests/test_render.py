"""render.py: official-template rendering with exact loss masks.

Every rendering is checked against transformers' own `apply_chat_template` with the packaged official template, and
every mask against golden strings (what the model must generate: the assistant text through `<|im_end|>`, nothing
else) or, for the randomized conversations, against an independent oracle of the Qwen turn format."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from qwentune.errors import BadRow, QwentuneError
from qwentune.rows.fit import fit_row as fit_length
from qwentune.rows.render import (
    IGNORE_INDEX,
    Rendered,
    render_batch,
    render_conversation,
    render_preference,
    render_preference_batch,
)
from qwentune.rows.template import BUILTIN_TEMPLATES, ChatTemplate, load_template

IM_END = 151645
SHARED_TEMPLATES = Path("/work/shared/templates")
TOOL_TEMPLATES = ("qwen2.5-instruct", "qwen2.5-base")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}


def _call(name: str, arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# name → (messages, tools, the trained text of each trained turn, in order)
CONVERSATIONS = {
    "single": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        None,
        ["Hello!<|im_end|>"],
    ),
    "system_multi_turn": (
        [
            {"role": "system", "content": "You are a terse pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr."},
            {"role": "user", "content": "What is 2+2?\nBe brief."},
            {"role": "assistant", "content": "4, matey.\n\nThat be all."},
        ],
        None,
        ["Arr.<|im_end|>", "4, matey.\n\nThat be all.<|im_end|>"],
    ),
    "unicode": (
        [
            {"role": "user", "content": "Übersetze: 你好，世界 🌍"},
            {"role": "assistant", "content": "你好，世界 🌍 = Hallo, Welt! Café, naïve, déjà vu 👩‍👩‍👧 e\u0301"},
            {"role": "user", "content": "ありがとう 🙏"},
            {"role": "assistant", "content": "どういたしまして 😊"},
        ],
        None,
        # the Qwen tokenizer normalizes to NFC: the decomposed "e\u0301" is trained (and generated) as "\u00e9"
        ["你好，世界 🌍 = Hallo, Welt! Café, naïve, déjà vu 👩‍👩‍👧 \u00e9<|im_end|>", "どういたしまして 😊<|im_end|>"],
    ),
    "train_false": (
        [
            {"role": "user", "content": "Say A"},
            {"role": "assistant", "content": "B", "train": False},
            {"role": "user", "content": "No, say A"},
            {"role": "assistant", "content": "A"},
        ],
        None,
        ["A<|im_end|>"],
    ),
    "ends_with_user": (
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ],
        None,
        ["two<|im_end|>"],
    ),
    "parallel_tool_calls": (
        [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    _call("get_weather", {"city": "Paris"}),
                    _call("get_weather", {"city": "Tokyo", "unit": "c"}),
                ],
            },
            {"role": "tool", "name": "get_weather", "content": '{"temp": 18, "sky": "sunny"}'},
            {"role": "tool", "name": "get_weather", "content": '{"temp": 25, "sky": "rain"}'},
            {"role": "assistant", "content": "Paris: 18°C and sunny. Tokyo: 25°C with rain."},
        ],
        [WEATHER, SEARCH],
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "c"}}\n</tool_call>'
            "<|im_end|>",
            "Paris: 18°C and sunny. Tokyo: 25°C with rain.<|im_end|>",
        ],
    ),
    "content_and_call": (
        [
            {"role": "user", "content": "Search for 北京 weather"},
            {
                "role": "assistant",
                "content": "Let me look that up.",
                "tool_calls": [_call("search", {"q": "北京 天气"})],
            },
            {"role": "tool", "content": "晴, 12°C"},
            {"role": "assistant", "content": "It is sunny and 12°C in Beijing."},
        ],
        [SEARCH],
        [
            'Let me look that up.\n<tool_call>\n{"name": "search", "arguments": {"q": "北京 天气"}}\n'
            "</tool_call><|im_end|>",
            "It is sunny and 12°C in Beijing.<|im_end|>",
        ],
    ),
    "ends_with_tool_result": (
        [
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "tool_calls": [_call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "content": "18"},
        ],
        [WEATHER],
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'],
    ),
}
TOOL_CONVERSATIONS = ("parallel_tool_calls", "content_and_call", "ends_with_tool_result")


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer


@pytest.fixture(scope="module")
def templates() -> dict[str, ChatTemplate]:
    return {name: load_template(name) for name in BUILTIN_TEMPLATES}


def _official_text(tok, template: ChatTemplate, messages, tools=None, **kwargs) -> str:
    return tok.apply_chat_template(messages, tools=tools, chat_template=template.text, tokenize=False, **kwargs)


def _official_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _trained_texts(tok, rendered: Rendered) -> list[str]:
    return [tok.decode(rendered.input_ids[a:b], skip_special_tokens=False) for a, b in rendered.trained_spans]


def _check_mask_shape(rendered: Rendered) -> None:
    """Labels are the ids exactly inside the trained spans and -100 everywhere else; each span ends with <|im_end|>
    and the token after it (the newline) is not trained."""
    ids, labels = rendered.input_ids, rendered.labels
    assert len(labels) == len(ids)
    inside = set()
    for a, b in rendered.trained_spans:
        assert 0 < a < b <= len(ids)
        assert ids[b - 1] == IM_END
        assert ids[a - 3 : a] == [151644, 77091, 198]  # "<|im_start|>assistant\n", not trained
        assert labels[a - 1] == IGNORE_INDEX
        if b < len(ids):
            assert labels[b] == IGNORE_INDEX
        inside.update(range(a, b))
    for k, (i, label) in enumerate(zip(ids, labels)):
        assert label == (i if k in inside else IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------------
# Templates


def test_builtin_templates_load_and_detect_tools(templates):
    assert {n: t.supports_tools for n, t in templates.items()} == {
        "qwen2.5-instruct": True,
        "qwen2.5-base": True,
        "qwen2-instruct": False,
        "qwen2-vl-instruct": False,
    }
    for name, template in templates.items():
        assert template.name == name
        packaged = Path(__file__).resolve().parents[1] / "qwentune" / "templates" / f"{name}.jinja"
        assert template.text == packaged.read_bytes().decode("utf-8")


@pytest.mark.skipif(not SHARED_TEMPLATES.is_dir(), reason="no /work/shared/templates here")
def test_packaged_templates_are_byte_identical_to_the_shared_copies():
    for name in BUILTIN_TEMPLATES:
        packaged = Path(__file__).resolve().parents[1] / "qwentune" / "templates" / f"{name}.jinja"
        assert packaged.read_bytes() == (SHARED_TEMPLATES / f"{name}.jinja").read_bytes(), name


def test_load_template_model_path_and_errors(make_tokenizer, tmp_path, templates):
    tok = make_tokenizer("qwen2-instruct")
    model = load_template("model", tok)
    assert model.name == "model" and model.text == templates["qwen2-instruct"].text and not model.supports_tools
    tok.chat_template = None
    with pytest.raises(QwentuneError, match="no chat template"):
        load_template("model", tok)
    with pytest.raises(QwentuneError, match="needs the model's tokenizer"):
        load_template("model")
    path = tmp_path / "custom.jinja"
    path.write_bytes(templates["qwen2.5-base"].text.encode())
    custom = load_template(str(path))
    assert custom.name == str(path) and custom.text == templates["qwen2.5-base"].text and custom.supports_tools
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": templates["qwen2-instruct"].text}))
    assert load_template(str(config)).text == templates["qwen2-instruct"].text
    with pytest.raises(QwentuneError, match="did you mean 'qwen2.5-instruct'") as err:
        load_template("qwen25-instruct")
    assert err.value.where == "chat_template"
    with pytest.raises(QwentuneError, match="not found"):
        load_template(str(tmp_path / "missing.jinja"))


# ---------------------------------------------------------------------------------------------------------------------
# Golden renderings


def test_full_golden_for_one_short_conversation(tok, templates):
    messages, tools, _ = CONVERSATIONS["single"]
    r = render_conversation(messages, tools, tok, templates["qwen2.5-instruct"])
    assert r.text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    # fmt: off
    assert r.input_ids == [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13,
        151645, 198, 151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 9707, 0, 151645, 198,
    ]
    # fmt: on
    assert r.labels == [IGNORE_INDEX] * 30 + [9707, 0, 151645, IGNORE_INDEX]
    assert r.trained_spans == [(30, 33)]
    assert not r.truncated and r.num_trained == 3


@pytest.mark.parametrize("template_name", BUILTIN_TEMPLATES)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_golden_conversations(tok, templates, template_name, conversation):
    template = templates[template_name]
    messages, tools, expected = CONVERSATIONS[conversation]
    if conversation in TOOL_CONVERSATIONS and not template.supports_tools:
        with pytest.raises(BadRow) as err:
            render_conversation(messages, tools, tok, template)
        assert err.value.reason == "tools_unsupported"
        return
    r = render_conversation(messages, tools, tok, template)
    official = _official_text(tok, template, messages, tools)
    assert r.text == official
    assert r.input_ids == _official_ids(tok, official)
    assert r.input_ids == tok.apply_chat_template(messages, tools=tools, chat_template=template.text)["input_ids"]
    assert _trained_texts(tok, r) == expected
    # nothing else is trained: all trained tokens together decode to exactly the golden turns
    assert tok.decode([x for x in r.labels if x != IGNORE_INDEX], skip_special_tokens=False) == "".join(expected)
    _check_mask_shape(r)


@pytest.mark.parametrize("template_name", BUILTIN_TEMPLATES)
def test_default_and_custom_system_prompts_are_never_trained(tok, templates, template_name):
    template = templates[template_name]
    default = {
        "qwen2.5-instruct": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "qwen2.5-base": "You are a helpful assistant.",
        "qwen2-instruct": "You are a helpful assistant.",
        "qwen2-vl-instruct": "You are a helpful assistant.",
    }[template_name]
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for system, messages in (
        (default, turns),
        ("Speak only French.", [{"role": "system", "content": "Speak only French."}, *turns]),
    ):
        r = render_conversation(messages, None, tok, template)
        assert r.text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")
        assert r.text == _official_text(tok, template, messages)
        assert _trained_texts(tok, r) == ["Hello!<|im_end|>"]
        _check_mask_shape(r)


@pytest.mark.parametrize("template_name", TOOL_TEMPLATES)
def test_tools_block_and_tool_results_are_not_trained(tok, templates, template_name):
    messages, tools, expected = CONVERSATIONS["parallel_tool_calls"]
    r = render_conversation(messages, tools, tok, templates[template_name])
    assert "# Tools" in r.text and '"name": "search"' in r.text
    # consecutive tool results: one user block, closed once
    assert (
        "<|im_start|>user\n<tool_response>\n"
        '{"temp": 18, "sky": "sunny"}\n</tool_response>\n<tool_response>\n{"temp": 25, "sky": "rain"}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\nParis"
    ) in r.text
    trained = "".join(_trained_texts(tok, r))
    for untrained in ("# Tools", "You are a weather bot.", "tool_response", "Weather in Paris", "<|im_start|>"):
        assert untrained not in trained


@pytest.mark.parametrize("template_name", TOOL_TEMPLATES)
def test_string_arguments_render_like_dicts_never_double_encoded(tok, templates, template_name):
    template = templates[template_name]
    messages, tools, expected = CONVERSATIONS["parallel_tool_calls"]
    as_strings = copy.deepcopy(messages)
    for call in as_strings[2]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    with_dicts = render_conversation(messages, tools, tok, template)
    with_strings = render_conversation(as_strings, tools, tok, template)
    assert with_strings == with_dicts
    assert '"arguments": {"city": "Paris"}' in with_strings.text
    assert '\\"city\\"' not in with_strings.text and '"arguments": "' not in with_strings.text
    # transformers itself would double-encode the string (the reason we parse it)
    assert '"arguments": "{' in _official_text(tok, template, as_strings, tools)
    # tools given as JSON strings, as some datasets store them
    assert render_conversation(messages, [json.dumps(t) for t in tools], tok, template) == with_dicts


def test_train_on_last_and_train_false(tok, templates):
    template = templates["qwen2.5-instruct"]
    messages, tools, _ = CONVERSATIONS["system_multi_turn"]
    last = render_conversation(messages, tools, tok, template, train_on="last")
    assert _trained_texts(tok, last) == ["4, matey.\n\nThat be all.<|im_end|>"]
    everything = render_conversation(messages, tools, tok, template)
    assert last.input_ids == everything.input_ids and len(everything.trained_spans) == 2
    excluded = copy.deepcopy(messages)
    excluded[4]["train"] = False
    assert _trained_texts(tok, render_conversation(excluded, tools, tok, template)) == ["Arr.<|im_end|>"]
    with pytest.raises(BadRow) as err:  # "last" means the final assistant turn, which is excluded here
        render_conversation(excluded, tools, tok, template, train_on="last")
    assert err.value.reason == "no_assistant_turn"
    tool_messages, tool_list, expected = CONVERSATIONS["parallel_tool_calls"]
    assert _trained_texts(tok, render_conversation(tool_messages, tool_list, tok, template, train_on="last")) == [
        expected[-1]
    ]
    with pytest.raises(QwentuneError, match="did you mean 'last'"):
        render_conversation(messages, tools, tok, template, train_on="lats")


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows: one test per reason


def _reason(tok, template, messages, tools=None, **kwargs) -> str:
    with pytest.raises(BadRow) as err:
        render_conversation(messages, tools, tok, template, **kwargs)
    assert err.value.detail
    return err.value.reason


def test_bad_row_empty(tok, templates):
    assert _reason(tok, templates["qwen2.5-instruct"], []) == "empty"


def test_bad_row_no_assistant_turn(tok, templates):
    t = templates["qwen2.5-instruct"]
    assert _reason(tok, t, [{"role": "user", "content": "hi"}]) == "no_assistant_turn"
    all_excluded = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "train": False}]
    assert _reason(tok, t, all_excluded) == "no_assistant_turn"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "first"}, {"role": "user", "content": "hi"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
        ],
        [{"role": "user", "content": "u"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
        [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}],
        [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"content": "u"}, {"role": "assistant", "content": "a"}],
    ],
    ids=[
        "assistant_first",
        "system_then_assistant",
        "assistant_twice",
        "tool_without_call",
        "tool_after_answer",
        "unknown_role",
        "system_not_first",
        "no_role",
    ],
)
def test_bad_row_bad_role_order(tok, templates, messages):
    assert _reason(tok, templates["qwen2.5-instruct"], messages) == "bad_role_order"


@pytest.mark.parametrize(
    "arguments", ['{"city": "Paris"', "[1, 2]", None], ids=["truncated_json", "not_an_object", "missing"]
)
def test_bad_row_invalid_tool_json(tok, templates, arguments):
    messages = [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", arguments)]},
    ]
    assert _reason(tok, templates["qwen2.5-instruct"], messages, [WEATHER]) == "invalid_tool_json"
    assert (
        _reason(tok, templates["qwen2.5-instruct"], CONVERSATIONS["single"][0], ["{not json"]) == "invalid_tool_json"
    )


def test_bad_row_tools_unsupported(tok, templates):
    single, _, _ = CONVERSATIONS["single"]
    calls, tools, _ = CONVERSATIONS["ends_with_tool_result"]
    for name in ("qwen2-instruct", "qwen2-vl-instruct"):
        assert _reason(tok, templates[name], single, [WEATHER]) == "tools_unsupported"  # a tools list alone
        assert _reason(tok, templates[name], calls) == "tools_unsupported"  # calls without a tools list
    # the pipeline can refuse the whole run up front
    assert not templates["qwen2-vl-instruct"].supports_tools


def test_bad_row_mask_verification_failed_when_an_edge_falls_inside_a_token(tok, templates):
    # "\n" + "\n..." merge into one token across the end of the generation prompt: no exact mask exists
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nHello"}]
    for template in templates.values():
        assert _reason(tok, template, messages) == "mask_verification_failed"


def test_bad_row_mask_verification_failed_when_the_template_renders_a_turn_differently_in_context(tok, tmp_path):
    # A custom template that shortens every assistant turn but the last: the first turn, rendered as the last
    # message (what the model learns to generate), differs from its rendering in the conversation.
    path = tmp_path / "shortens.jinja"
    path.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content[:2] }}{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = load_template(str(path))
    messages = CONVERSATIONS["system_multi_turn"][0]
    assert _reason(tok, template, messages) == "mask_verification_failed"
    # with only the last turn trained, the shortened earlier turn is just context: exact
    r = render_conversation(messages, None, tok, template, train_on="last")
    assert _trained_texts(tok, r) == ["4, matey.\n\nThat be all.<|im_end|>"]
    assert r.text == _official_text(tok, template, messages)


def test_bad_row_empty_completion(tok, templates):
    for content in ("", None):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
        assert _reason(tok, templates["qwen2.5-instruct"], messages) == "empty_completion"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": []}]
    assert _reason(tok, templates["qwen2.5-instruct"], messages, [WEATHER]) == "empty_completion"


def test_bad_row_over_length_and_fit_length(tok, templates):
    messages, tools, _ = CONVERSATIONS["system_multi_turn"]
    r = render_conversation(messages, tools, tok, templates["qwen2.5-instruct"])
    n = len(r.input_ids)
    for overlong in ("drop", "truncate", "error"):
        assert fit_length(r, n, overlong) is r
    for overlong in ("drop", "error"):
        with pytest.raises(BadRow) as err:
            fit_length(r, n - 1, overlong)
        assert err.value.reason == "over_length"
    (first_a, first_b), (second_a, _) = r.trained_spans
    cut = fit_length(r, second_a + 2, "truncate")
    assert cut.truncated and cut.input_ids == r.input_ids[: second_a + 2] and cut.labels == r.labels[: second_a + 2]
    assert cut.trained_spans == [(first_a, first_b), (second_a, second_a + 2)]
    with pytest.raises(BadRow) as err:
        fit_length(r, first_a, "truncate")  # nothing trained left
    assert err.value.reason == "over_length"
    with pytest.raises(QwentuneError, match="did you mean 'truncate'"):
        fit_length(r, 10, "truncat")


# ---------------------------------------------------------------------------------------------------------------------
# Randomized conversations: invariants against transformers and against an oracle of the Qwen turn format

TEXTS = [
    "Hi",
    "What is the weather?",
    "Paris 🌧",
    "你好，世界",
    "Café déjà vu",
    "2+2=4",
    "line one\nline two",
    "  indented",
    "trailing space ",
    "ends with newline\n",
    "tabs\tand\tspaces",
    "<b>html</b> & {json}",
    "ok",
]
LEADING = ["\nleading newline", "\n\nblank lines first"]  # assistant content that can't be masked exactly


def _random_conversation(rng: random.Random, with_tools: bool) -> tuple[list[dict], list | None]:
    messages: list[dict] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(TEXTS)})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": rng.choice(TEXTS)})
        if with_tools and rng.random() < 0.5:
            calls = [
                _call(rng.choice(["get_weather", "search"]), {"city": rng.choice(TEXTS), "n": rng.randint(0, 9)})
                for _ in range(rng.choice([1, 1, 2, 3]))
            ]
            if rng.random() < 0.3:
                for call in calls:
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
            messages.append(
                {"role": "assistant", "content": rng.choice(["", "", "Checking.", "好的"]), "tool_calls": calls}
            )
            if rng.random() < 0.2:
                messages[-1]["train"] = False
            for _ in calls:
                messages.append({"role": "tool", "name": "get_weather", "content": rng.choice(TEXTS)})
            if rng.random() < 0.15:
                break  # the conversation ends on tool results
        content = rng.choice(LEADING) if rng.random() < 0.03 else rng.choice(TEXTS)
        messages.append({"role": "assistant", "content": content})
        if rng.random() < 0.15:
            messages[-1]["train"] = False
    if rng.random() < 0.1:
        messages.append({"role": "user", "content": rng.choice(TEXTS)})
    return messages, ([WEATHER, SEARCH] if with_tools and rng.random() < 0.9 else None)


def _oracle_completion(message: dict) -> str:
    """What the model generates for an assistant turn of a Qwen template, after `<|im_start|>assistant\\n`."""
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if not calls:
        return content + "<|im_end|>"
    blocks = []
    for call in calls:
        fn = call["function"]
        args = fn["arguments"] if isinstance(fn["arguments"], dict) else json.loads(fn["arguments"])
        blocks.append(
            f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {json.dumps(args, ensure_ascii=False)}}}'
            "\n</tool_call>"
        )
    return (content + "\n" if content else "") + "\n".join(blocks) + "<|im_end|>"


def _dict_args(messages: list[dict]) -> list[dict]:
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def _random_rows(n: int, seed: int, with_tools: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        messages, tools = _random_conversation(rng, with_tools=with_tools and k % 4 != 3)
        rows.append({"messages": messages, "tools": tools})
    return rows


@pytest.mark.parametrize("template_name", ["qwen2.5-instruct", "qwen2.5-base", "qwen2-instruct"])
def test_randomized_conversations_invariants(tok, templates, template_name):
    template = templates[template_name]
    rows = _random_rows(200, seed=1234, with_tools=template.supports_tools)
    results = render_batch(rows, tok, template)
    assert len(results) == len(rows)
    n_ok = 0
    for row, r in zip(rows, results):
        messages, tools = row["messages"], row["tools"]
        trainable = [m for m in messages if m["role"] == "assistant" and m.get("train", True)]
        if isinstance(r, BadRow):
            # the only rows refused here: assistant text starting with "\n", or nothing left to train
            assert r.reason in ("mask_verification_failed", "no_assistant_turn"), r
            if r.reason == "mask_verification_failed":
                assert any(m.get("content", "").startswith("\n") for m in trainable)
            else:
                assert not trainable
            continue
        n_ok += 1
        official = _official_text(tok, template, _dict_args(messages), tools)
        assert r.text == official
        assert r.input_ids == _official_ids(tok, official)
        _check_mask_shape(r)
        assert len(r.trained_spans) == len(trainable)
        assert _trained_texts(tok, r) == [_oracle_completion(m) for m in trainable]
        # no trained token inside any system/user/tool text: find each message's text in order in the rendering
        enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
        trained_chars = set()
        for a, b in r.trained_spans:
            trained_chars.update(range(enc.offset_mapping[a][0], enc.offset_mapping[b - 1][1]))
        cursor = 0
        for m in messages:
            piece = _oracle_completion(m) if m["role"] == "assistant" else m["content"]
            at = r.text.find(piece, cursor)
            assert at >= 0, (piece, r.text[cursor:])
            region = set(range(at, at + len(piece)))
            if m["role"] != "assistant" or not m.get("train", True):
                assert not region & trained_chars, (m, r.text)
            cursor = at + len(piece)
    assert n_ok > 100


def test_render_batch_equals_per_row_rendering(tok, templates):
    template = templates["qwen2.5-instruct"]
    rows = _random_rows(150, seed=7)  # more than one tokenizer chunk
    rows[3] = {"messages": []}  # a BadRow in between
    rows[70] = "not a row"
    batch = render_batch(rows, tok, template)
    for row, got in zip(rows, batch):
        try:
            want = render_conversation(row["messages"], row.get("tools"), tok, template)
        except (BadRow, TypeError) as bad:
            assert isinstance(got, BadRow)
            if isinstance(bad, BadRow):
                assert (got.reason, got.detail) == (bad.reason, bad.detail)
            continue
        assert got == want
    assert isinstance(batch[70], BadRow) and batch[70].reason == "bad_message"
    assert render_batch([], tok, template) == []


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs


@pytest.mark.parametrize("template_name", BUILTIN_TEMPLATES)
def test_render_preference(tok, templates, template_name):
    template = templates[template_name]
    prompt = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本"},
    ]
    pair = render_preference(
        prompt,
        [{"role": "assistant", "content": "Tokyo."}],
        {"role": "assistant", "content": "Kyoto, I think."},
        None,
        tok,
        template,
    )
    official_prompt = _official_text(tok, template, prompt, add_generation_prompt=True)
    assert pair.prompt_text == official_prompt and official_prompt.endswith("<|im_start|>assistant\n")
    assert pair.prompt_input_ids == _official_ids(tok, official_prompt)
    assert tok.decode(pair.chosen_input_ids, skip_special_tokens=False) == "Tokyo.<|im_end|>" == pair.chosen_text
    assert tok.decode(pair.rejected_input_ids, skip_special_tokens=False) == "Kyoto, I think.<|im_end|>"
    assert pair.chosen_input_ids[-1] == IM_END and pair.rejected_input_ids[-1] == IM_END  # no "\n" after it
    full = _official_text(tok, template, [*prompt, {"role": "assistant", "content": "Tokyo."}])
    assert pair.prompt_input_ids + pair.chosen_input_ids == _official_ids(tok, full)[:-1]  # all but the final "\n"


def test_render_preference_with_tools_and_string_arguments(tok, templates):
    template = templates["qwen2.5-instruct"]
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    chosen = {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", '{"city": "Paris"}')]}
    rejected = {"role": "assistant", "content": "It is sunny."}
    pair = render_preference(prompt, [chosen], [rejected], [WEATHER], tok, template)
    official_prompt = _official_text(tok, template, prompt, [WEATHER], add_generation_prompt=True)
    assert "# Tools" in official_prompt and pair.prompt_input_ids == _official_ids(tok, official_prompt)
    assert (
        pair.chosen_text
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    )
    assert tok.decode(pair.chosen_input_ids, skip_special_tokens=False) == pair.chosen_text
    as_dict = copy.deepcopy(chosen)
    as_dict["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert render_preference(prompt, [as_dict], [rejected], [WEATHER], tok, template) == pair


def test_render_preference_bad_rows(tok, templates):
    template = templates["qwen2.5-instruct"]
    prompt = [{"role": "user", "content": "hi"}]
    good = {"role": "assistant", "content": "hello"}
    pairs = [
        {"prompt": prompt, "chosen": [good], "rejected": [{"role": "assistant", "content": "\nhey"}]},
        {"prompt": prompt, "chosen": [], "rejected": [good]},
        {"prompt": prompt, "chosen": [good, good], "rejected": [good]},
        {"prompt": [], "chosen": [good], "rejected": [good]},
        {"prompt": [*prompt, good], "chosen": [good], "rejected": [good]},
        {"prompt": prompt, "chosen": [good], "rejected": [{"role": "assistant", "content": ""}]},
        {"prompt": prompt, "chosen": [good], "rejected": [{"role": "assistant", "content": "bye"}]},
    ]
    reasons = [r.reason if isinstance(r, BadRow) else "ok" for r in render_preference_batch(pairs, tok, template)]
    assert reasons == [
        "mask_verification_failed",
        "empty_completion",
        "bad_role_order",
        "empty",
        "bad_role_order",
        "empty_completion",
        "ok",
    ]
    with pytest.raises(BadRow):
        render_preference(prompt, [good], [good], [WEATHER], tok, templates["qwen2-instruct"])


def test_render_preference_batch_equals_per_pair(tok, templates):
    template = templates["qwen2.5-instruct"]
    rng = random.Random(3)
    pairs = []
    for k in range(80):  # more than one tokenizer chunk
        prompt = [{"role": "user", "content": rng.choice(TEXTS)}]
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": rng.choice(TEXTS) + str(k)}],
                "rejected": [{"role": "assistant", "content": rng.choice(LEADING if k % 10 == 0 else TEXTS)}],
                "tools": [WEATHER] if k % 2 else None,
            }
        )
    batch = render_preference_batch(pairs, tok, template)
    for pair, got in zip(pairs, batch):
        args = (pair["prompt"], pair["chosen"], pair["rejected"], pair["tools"], tok, template)
        try:
            want = render_preference(*args)
        except BadRow as bad:
            assert isinstance(got, BadRow) and got.reason == bad.reason == "mask_verification_failed"
            continue
        assert got == want
    assert sum(isinstance(r, BadRow) for r in batch) == 8


# ---------------------------------------------------------------------------------------------------------------------
# Other row shapes


def test_qwen2_vl_text_parts_render_like_the_official_template(tok, templates):
    template = templates["qwen2-vl-instruct"]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this."}]},
        {"role": "assistant", "content": "A cat."},
    ]
    r = render_conversation(messages, None, tok, template)
    assert r.text == _official_text(tok, template, messages)
    assert "<|im_start|>user\nDescribe this.<|im_end|>" in r.text
    assert _trained_texts(tok, r) == ["A cat.<|im_end|>"]


def test_bad_message_and_template_error(tok, templates):
    t = templates["qwen2.5-instruct"]
    assert _reason(tok, t, [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]) == "bad_message"
    assert _reason(tok, t, [{"role": "user"}, {"role": "assistant", "content": "a"}]) == "bad_message"
    assert _reason(tok, t, ["hi", {"role": "assistant", "content": "a"}]) == "bad_message"
    not_bool = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "train": "no"}]
    assert _reason(tok, t, not_bool) == "bad_message"
    user_calls = [
        {"role": "user", "content": "u", "tool_calls": [_call("f", {})]},
        {"role": "assistant", "content": "a"},
    ]
    assert _reason(tok, t, user_calls) == "bad_message"
    # content parts on a template that only takes strings: the template itself fails on the row
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "a"}]
    assert _reason(tok, t, parts) == "template_error"


def test_fast_renderer_matches_transformers_on_unusual_template_constructs(tok, tmp_path):
    # dict methods, missing keys, loop attributes, namespaces, tojson with arguments, item access
    header = (
        "[{{ loop.index }}{{ '*' if loop.first }}{{ loop.previtem.role if loop.previtem is defined }}"
        "|{{ m.get('name', 'anon') }}|{{ m.missing is defined }}|{{ m['role'] | upper }}|{{ ns.n }}{COUNT}]"
    )
    body = (
        "{% set ns = namespace(n=0) %}{% if tools %}{{ tools | tojson(indent=2) }}{{ tools[0] | tojson }}\n{% endif %}"
        "{% for m in messages %}{% set ns.n = ns.n + 1 %}<|im_start|>{{ m.role }}\n" + header + "{{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{{ c.function.arguments | tojson }}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages, tools, _ = CONVERSATIONS["parallel_tool_calls"]
    path = tmp_path / "odd.jinja"
    path.write_text(body.replace("{COUNT}", ""))
    template = load_template(str(path))
    assert template.supports_tools
    r = render_conversation(messages, tools, tok, template)
    assert r.text == _official_text(tok, template, messages, tools)
    assert r.input_ids == _official_ids(tok, r.text)
    assert len(r.trained_spans) == 2
    # a header that counts all messages renders each turn differently once more messages follow: refused
    path.write_text(body.replace("{COUNT}", "/{{ loop.length }}"))
    counting = load_template(str(path))
    assert _reason(tok, counting, messages, tools) == "mask_verification_failed"
    assert (
        render_batch([{"messages": messages, "tools": tools}], tok, counting)[0].reason == "mask_verification_failed"
    )
