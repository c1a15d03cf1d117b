"""One rendering a row (rows/render.py): for the prefix-stable packaged templates the trained spans are read from the
markers of the whole rendering instead of rendering every prefix. The spans, ids and masks must be exactly those of
the prefix method: on generated conversations (tool calls, runs of tool results, system or none, train flags, text
that looks like a marker) and on every bundled data file. The prefix method is reached with the same template text
plus a jinja comment: it renders byte for byte the same, but is not a known prefix-stable template."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwentune.errors import BadRow
from qwentune.rows.render import PREFIX_STABLE_TEMPLATES, Rendered, _spans_from_markers, one_rendering, render_batch
from qwentune.rows.template import TemplateRenderer, load_template

ROOT = Path(__file__).resolve().parents[1]


def prefix_method(template):
    """The same template, rendering the same text, taking the prefix renderings."""
    slow = dataclasses.replace(template, name=f"{template.name}+comment", text=template.text + "{# prefixes #}")
    assert not one_rendering(slow)
    return slow


def same_results(fast: list, slow: list) -> None:
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        if isinstance(b, BadRow):
            assert isinstance(a, BadRow) and a.reason == b.reason, (a, b)
        else:
            assert isinstance(a, Rendered), a
            assert (a.input_ids, a.labels, a.text, a.trained_spans) == (b.input_ids, b.labels, b.text, b.trained_spans)


def test_which_templates_take_one_rendering():
    for name in PREFIX_STABLE_TEMPLATES:
        assert one_rendering(load_template(name))
    assert not one_rendering(load_template("qwen2-vl-instruct"))  # images: the prefix renderings


@pytest.mark.parametrize("path", ["tool_calls.jsonl", "instructions.jsonl", "tool_calls_decisions.jsonl"])
def test_bundled_rows_render_as_with_every_prefix(qwen_tokenizer, path):
    rows = [json.loads(line) for line in (ROOT / "data" / path).read_text().splitlines()]
    template = load_template("qwen2.5-instruct")
    fast = render_batch(rows, qwen_tokenizer, template)
    assert all(isinstance(r, Rendered) for r in fast)
    same_results(fast, render_batch(rows, qwen_tokenizer, prefix_method(template)))


def test_a_row_whose_text_holds_a_marker_takes_the_prefix_renderings(qwen_tokenizer):
    template = load_template("qwen2.5-instruct")
    messages = [
        {"role": "user", "content": "say <|im_end|> please"},
        {"role": "assistant", "content": "it ends <|im_end|>\n<|im_start|>user\nlike this"},
    ]
    full = template_full(template, qwen_tokenizer, messages)
    assert _spans_from_markers(messages, [1], full) is None  # the row's own text: not read as markers
    rows = [{"messages": messages}]
    same_results(
        render_batch(rows, qwen_tokenizer, template), render_batch(rows, qwen_tokenizer, prefix_method(template))
    )


def template_full(template, tokenizer, messages, tools=None):
    return TemplateRenderer(template, tokenizer)(messages, tools, False)


# ---------------------------------------------------------------- generated conversations

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} (test)",
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
        },
    }
    for name in ("lookup", "book_table")
]
PLAIN = [*"abc xyz\n{}\"'<>|_é字", "assistant\n", "<tool_call>"]
MARKERS = ["<|im_end|>", "<|im_start|>", "<|im_start|>assistant\n"]
plain = st.lists(st.sampled_from(PLAIN), max_size=12).map("".join)
marked = st.lists(st.sampled_from(PLAIN + MARKERS), max_size=12).map("".join)
text = st.integers(0, 24).flatmap(lambda k: marked if k == 0 else plain)  # one text in 25 may hold a marker


@st.composite
def conversations(draw, tools: bool):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 4))):
        msgs.append({"role": "user", "content": draw(text) or "hi"})
        if tools and draw(st.booleans()):
            calls = [
                {
                    "type": "function",
                    "function": {
                        "name": draw(st.sampled_from(["lookup", "book_table"])),
                        "arguments": {"x": draw(text)},
                    },
                }
                for _ in range(draw(st.integers(1, 2)))
            ]
            msgs.append({"role": "assistant", "content": draw(st.sampled_from(["", "Let me check."])),
                         "tool_calls": calls, "train": draw(st.booleans())})  # fmt: skip
            msgs += [{"role": "tool", "content": draw(text) or "{}"} for _ in calls]
        msgs.append({"role": "assistant", "content": draw(text) or "ok", "train": draw(st.booleans())})
    return {"messages": msgs, "tools": TOOLS if tools else None}


@pytest.mark.parametrize("name", PREFIX_STABLE_TEMPLATES)
def test_generated_conversations_render_as_with_every_prefix(qwen_tokenizer, name):
    template = load_template(name)
    slow = prefix_method(template)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(st.lists(conversations(tools=template.supports_tools), min_size=1, max_size=4))
    def check(rows):
        same_results(render_batch(rows, qwen_tokenizer, template), render_batch(rows, qwen_tokenizer, slow))
        for row in rows:
            full = template_full(template, qwen_tokenizer, row["messages"], row["tools"])
            trained = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
            read.append(_spans_from_markers(row["messages"], trained, full) is not None)

    read: list[bool] = []
    check()
    assert sum(read) > len(read) / 3, "most generated rows should take the one-rendering path"
