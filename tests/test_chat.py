"""`qwentune chat`: reply parsing, the tool-call round trip as training renders it, /save → preprocess, and the
command as a user runs it on a tiny model (--prompt, a pipe on stdin, bad input)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import shared_tokenizer, tiny_model_dir

from qwentune.errors import QwentuneError
from qwentune.rows.formats import convert
from qwentune.rows.render import render_conversation
from qwentune.rows.template import load_template
from qwentune.serve.chat import Conversation, Generator, handle_line, parse_reply, read_tools
from qwentune.serve.inference import load_for_inference, resolve_trained

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL_TEXT = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def qwentune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwentune", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin if stdin is not None else "",
    )


def test_parse_reply_structured_calls_text_and_bad_blocks():
    reply = parse_reply(CALL_TEXT)
    assert reply.calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert reply.content == "Let me look." and not reply.bad_calls
    two = parse_reply(
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "b", "arguments": {}}'
    )
    assert two.calls == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]  # string args, unclosed
    bad = parse_reply("<tool_call>{name: a}</tool_call>")
    assert bad.calls == [] and bad.bad_calls == ["{name: a}"]
    assert parse_reply("just text").calls == [] and parse_reply("just text").content == "just text"


def test_read_tools_accepts_lists_and_refuses_bad_files(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([TOOLS[0]["function"]]))
    assert read_tools(path) == TOOLS
    path.write_text(json.dumps({"tools": TOOLS}))
    assert read_tools(path) == TOOLS
    path.write_text("[{}]")
    with pytest.raises(QwentuneError, match=r"tools\[0\]"):
        read_tools(path)


class Scripted:
    """Stands in for the model only: returns the next scripted reply, streamed in two pieces."""

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.seen: list[list[dict]] = []

    def __call__(self, conversation: Conversation, on_text) -> str:
        self.seen.append(json.loads(json.dumps(conversation.messages)))
        text = self.replies.pop(0)
        on_text(text[:5])
        on_text(text[5:])
        return text


def test_tool_round_trip_shows_the_call_saves_a_row_and_preprocess_trains_on_it(tmp_path):
    out: list[str] = []
    conversation = Conversation(system="You are helpful.", tools=TOOLS)
    model = Scripted(CALL_TEXT, "It is 21 degrees in Oslo.")
    assert handle_line("What's the weather in Oslo?", conversation, model, out=out.append)
    shown = "".join(out)
    assert 'tool_call: {"name": "get_weather", "arguments": {"city": "Oslo"}}' in shown
    assert conversation.pending == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    handle_line('/tool {"temp": 21}', conversation, model, out=out.append)
    assert model.seen[1][-1] == {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'}
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "tool", "assistant"]
    saved = tmp_path / "chats.jsonl"
    handle_line(f"/save {saved}", conversation, model, out=out.append)
    handle_line(f"/save {saved}", conversation, model, out=out.append)
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["tools"] == TOOLS
    call = rows[0]["messages"][2]["tool_calls"][0]["function"]
    assert call == {"name": "get_weather", "arguments": {"city": "Oslo"}}

    # the prompt chat renders for the last turn is exactly the prefix training renders before that turn's tokens
    tok = shared_tokenizer("qwen2.5-instruct")
    canon = convert(rows[0], "messages")
    rendered = render_conversation(canon["messages"], canon["tools"], tok, load_template("qwen2.5-instruct"))
    labels = rendered.labels
    last_start = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    replay = Conversation(system="You are helpful.", tools=TOOLS)
    replay.messages = rows[0]["messages"][:-1]
    assert Generator(None, tok, model_dir=tmp_path).prompt_ids(replay) == rendered.input_ids[:last_start]

    # and `qwentune preprocess` (what `train` runs first) keeps the saved rows
    model_dir = tiny_model_dir(tmp_path)
    run = qwentune(
        "preprocess", str(RECIPE), f"model.source={model_dir}", f"data.train={saved}", "data.eval=[]",
        "-o", str(tmp_path / "rows.jsonl"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "2 of 2 rows kept" in run.stderr


def test_commands_reset_and_refusals():
    out: list[str] = []
    conversation = Conversation(tools=TOOLS)
    model = Scripted("Hello!")
    with pytest.raises(QwentuneError, match="no open tool call"):
        handle_line('/tool {"x": 1}', conversation, model, out=out.append)
    with pytest.raises(QwentuneError, match="nothing to save"):
        handle_line("/save x.jsonl", conversation, model, out=out.append)
    handle_line("hi", conversation, model, out=out.append)
    assert conversation.messages[-1] == {"role": "assistant", "content": "Hello!"}
    handle_line("/reset", conversation, model, out=out.append)
    assert conversation.messages == []
    assert handle_line("/exit", conversation, model, out=out.append) is False


def _greedy_reference(model_dir: Path, prompt: str, tools: list[dict], n: int) -> str:
    import torch

    net, tok = load_for_inference(resolve_trained(str(model_dir)))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tools=tools, add_generation_prompt=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        out = net.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_chat_command_prompt_and_pipe_print_the_greedy_reply(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    args = ["chat", str(model_dir), "--tools", str(tools), "--max-new-tokens", "12"]
    by_flag = qwentune(*args, "--prompt", "What's the weather in Oslo?")
    assert by_flag.returncode == 0, by_flag.stderr
    by_pipe = qwentune(*args, stdin="What's the weather in Oslo?\n")
    assert by_pipe.returncode == 0, by_pipe.stderr
    expected = _greedy_reference(model_dir, "What's the weather in Oslo?", TOOLS, 12)
    assert by_flag.stdout == by_pipe.stdout == expected + "\n"


def test_chat_command_bad_input_exits_2_with_one_line(tmp_path):
    for args, where in (
        (["chat", str(tmp_path / "missing"), "--prompt", "hi"], "does not exist"),
        (["chat", str(tmp_path), "--prompt", "hi"], "not a model"),
        (["chat", str(tmp_path), "--tools", str(tmp_path / "none.json"), "--prompt", "hi"], "cannot read tools"),
    ):
        run = qwentune(*args)
        assert run.returncode == 2 and where in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_image_prompt_has_one_pad_per_vision_token_and_the_command_runs(tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer

    from qwentune.model.vision import load_image_processor

    model_dir = tiny_model_dir(tmp_path, "qwen2-vl-2b-instruct")
    image = tmp_path / "red.png"
    Image.new("RGB", (56, 84), (200, 10, 10)).save(image)
    conversation = Conversation(images=[str(image)])
    conversation.add_user("What is this?")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = Generator(None, tok, model_dir=model_dir).prompt_ids(conversation)
    grid = load_image_processor(model_dir)(images=[Image.open(image)], return_tensors="pt")["image_grid_thw"]
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == int(grid.prod()) // 4  # merge_size 2 × 2
    done = qwentune(
        "chat", str(model_dir), "--image", str(image), "--prompt", "What is this?", "--max-new-tokens", "4"
    )
    assert done.returncode == 0, done.stderr
    text_model = tiny_model_dir(tmp_path / "text")
    refused = qwentune("chat", str(text_model), "--image", str(image), "--prompt", "hi")
    assert refused.returncode == 2 and "needs a vision model" in refused.stderr
