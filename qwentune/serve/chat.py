"""`qwentune chat MODEL`: talk to what you trained, in the terminal, with the template it was trained with.

Tokens stream as they are generated. The history is rendered with the model's own saved template every turn (tools
passed to it), so the model sees exactly what training showed it. `<tool_call>` blocks in a reply become
structured calls (name + arguments); `/tool RESULT` answers the next open call as a `tool` message, and the model
continues. `/save FILE.jsonl` appends the conversation as one OpenAI-format row (`messages` with tool_calls and tool
results, plus `tools`) that `qwentune train` reads. Non-interactive (`--prompt`, or a pipe on stdin): one reply,
its calls as `tool_call: {json}` lines, exit.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QwentuneError

# Written here rather than reusing evaluate.parse_tool_calls: chat also needs the text around the calls and the
# blocks that do not parse (shown, not dropped), and evaluate sits on the same floor.
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
HELP = "commands: /tool RESULT (answer the open tool call; JSON or text), /reset, /save FILE.jsonl, /exit, /help"


@dataclass
class Reply:
    text: str  # the whole reply as generated (special tokens removed)
    content: str  # the text outside <tool_call> blocks
    calls: list[dict] = field(default_factory=list)  # {"name": str, "arguments": dict}
    bad_calls: list[str] = field(default_factory=list)  # blocks that are not a JSON {"name", "arguments"} object

    @property
    def tool_calls(self) -> list[dict]:
        """The parsed calls ({"name", "arguments"}), as the notebook API names them."""
        return self.calls


def parse_reply(text: str) -> Reply:
    """Split a generated reply into its text and its `<tool_call>` blocks (an unclosed last block counts: the
    reply may have hit max_new_tokens). Arguments given as a JSON string are decoded."""
    calls, bad = [], []
    for block in _CALL.findall(text):
        call = _as_call(block)
        (calls.append(call) if call is not None else bad.append(block))
    content = _CALL.sub("", text).strip()
    return Reply(text=text, content=content, calls=calls, bad_calls=bad)


def _as_call(block: str) -> dict | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": arguments}


def format_call(call: dict) -> str:
    """One line a script can parse: `tool_call: {"name": ..., "arguments": {...}}`."""
    return "tool_call: " + json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def read_tools(path: str | Path) -> list[dict]:
    """Tool definitions from a JSON file: a list of OpenAI tools (`{"type": "function", "function": {...}}` or the
    bare function objects), or an object with such a `tools` list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        hint = "a JSON list of tool definitions"
        raise QwentuneError(f"cannot read tools: {exc}", where=str(path), hint=hint) from exc
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list) or not data:
        raise QwentuneError("expected a non-empty JSON list of tools", where=str(path))
    tools = []
    for i, tool in enumerate(data):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise QwentuneError("a tool needs a function name", where=f"{path}: tools[{i}]")
        tools.append({"type": "function", "function": function})
    return tools


class Conversation:
    """The history as canonical OpenAI-style messages, exactly what training data looks like."""

    def __init__(self, system: str | None = None, tools: list[dict] | None = None, images: list[str] | None = None):
        self.system = system
        self.tools = tools
        self.images = list(images or [])
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.pending: list[dict] = []  # calls of the last reply that have no result yet
        self._images_placed = False

    def add_user(self, text: str) -> None:
        if self.images and not self._images_placed:  # the images go with the first user turn
            parts = [{"type": "image", "image": str(p)} for p in self.images] + [{"type": "text", "text": text}]
            self.messages.append({"role": "user", "content": parts})
            self._images_placed = True
        else:
            self.messages.append({"role": "user", "content": text})
        self.pending = []

    def add_reply(self, reply: Reply) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content if reply.calls else reply.text}
        if reply.calls:
            message["tool_calls"] = [{"type": "function", "function": dict(call)} for call in reply.calls]
        self.messages.append(message)
        self.pending = list(reply.calls)

    def add_tool_result(self, result: str) -> bool:
        """Answer the next open call; True when every call of the last reply has its result."""
        if not self.pending:
            raise QwentuneError("no open tool call to answer", where="/tool", hint="the model has not called a tool")
        call = self.pending.pop(0)
        try:
            content = json.dumps(json.loads(result), ensure_ascii=False)
        except json.JSONDecodeError:
            content = result
        self.messages.append({"role": "tool", "name": call["name"], "content": content})
        return not self.pending

    def row(self) -> dict:
        return {"messages": self.messages, "tools": self.tools} if self.tools else {"messages": self.messages}

    def save(self, path: str | Path) -> Path:
        """Append the conversation as one jsonl row (a line is written whole or not at all)."""
        if not any(m["role"] == "assistant" for m in self.messages):
            raise QwentuneError("nothing to save yet", where="/save", hint="chat first")
        path = Path(path).expanduser()
        line = json.dumps(self.row(), ensure_ascii=False) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            raise QwentuneError(f"cannot write: {exc}", where=str(path)) from exc
        return path


class Generator:
    """Renders the history with the tokenizer's (trained) template and generates, streaming text to `on_text`."""

    def __init__(self, model: Any, tokenizer: Any, *, model_dir: Path, max_new_tokens: int = 512,
                 temperature: float = 0.0):  # fmt: skip
        self.model, self.tokenizer, self.model_dir = model, tokenizer, model_dir
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            conversation.messages, tools=conversation.tools, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if conversation.images:  # Qwen2-VL: one pad per image in the template → one per vision token, as training
            from ..model import load_image_processor
            from ..rows import expand_prompt, settings_of

            settings = settings_of(load_image_processor(self.model_dir), self.tokenizer)
            ids = expand_prompt(ids, conversation.images, settings)
        return ids

    def __call__(self, conversation: Conversation, on_text: Callable[[str], None]) -> str:
        import torch

        ids = torch.tensor([self.prompt_ids(conversation)], device=self.model.device)
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if conversation.images:
            from ..model import pixel_inputs

            extra = pixel_inputs(self.model_dir, ids.cpu(), conversation.images)
            inputs |= {k: v.to(self.model.device) for k, v in extra.items()}
        streamer = _Stream(self.tokenizer, on_text)
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **sampling,
            )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _stream_class():
    from transformers import TextStreamer

    class Stream(TextStreamer):
        """transformers' TextStreamer (word-boundary decoding), writing to a callback instead of print."""

        def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.on_text = on_text

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.on_text(text)

    return Stream


def _Stream(tokenizer: Any, on_text: Callable[[str], None]):  # noqa: N802 (a class made lazily: transformers)
    return _stream_class()(tokenizer, on_text)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def respond(conversation: Conversation, generate: Callable, *, out: Callable[[str], None] = _write) -> Reply:
    """One assistant turn: stream it, record it in the history, show its calls as structured lines."""
    reply = parse_reply(generate(conversation, out))
    out("\n")
    conversation.add_reply(reply)
    for call in reply.calls:
        out(format_call(call) + "\n")
    for block in reply.bad_calls:
        out(f"tool_call (not valid JSON, not recorded as a call): {block}\n")
    return reply


def handle_line(line: str, conversation: Conversation, generate: Callable, *,
                out: Callable[[str], None] = _write) -> bool:  # fmt: skip
    """One line typed by the user: a command or a message. False when the chat should end."""
    line = line.strip()
    if not line:
        return True
    command, _, rest = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/help":
        out(HELP + "\n")
    elif command == "/reset":
        conversation.reset()
        out("(history cleared)\n")
    elif command == "/save":
        if not rest.strip():
            raise QwentuneError("which file?", where="/save", hint="/save chats.jsonl")
        out(f"(appended the conversation to {conversation.save(rest.strip())})\n")
    elif command == "/tool":
        if conversation.add_tool_result(rest.strip()):
            respond(conversation, generate, out=out)
        else:
            out(f"({len(conversation.pending)} more tool call(s) to answer)\n")
    elif command.startswith("/") and " " not in command and command[1:].isalpha():
        out(f"unknown command {command}; {HELP}\n")
    else:
        if conversation.pending:
            out("(the open tool call(s) are left unanswered)\n")
        conversation.add_user(line)
        respond(conversation, generate, out=out)
    return True


def interactive(conversation: Conversation, generate: Callable) -> None:
    print(f"qwentune chat — {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        try:
            if not handle_line(line, conversation, generate):
                return
        except QwentuneError as e:  # a bad command ends nothing
            print(f"error: {e.render()}", file=sys.stderr)


def run_chat(model: str, *, tools: str | None = None, system: str | None = None, image: list[str] | None = None,
             max_new_tokens: int = 512, temperature: float = 0.0, prompt: str | None = None) -> int:  # fmt: skip
    """The `qwentune chat` command: load, then one reply (--prompt / piped stdin) or the interactive loop."""
    from .inference import load_for_inference, resolve_trained

    if temperature < 0 or max_new_tokens < 1:
        raise QwentuneError("--temperature must be >= 0 and --max-new-tokens >= 1", where="command line")
    tool_list = read_tools(tools) if tools else None
    images = [str(Path(p).expanduser()) for p in image or []]
    for path in images:
        if not Path(path).is_file():
            raise QwentuneError("image file not found", where=path)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise QwentuneError("nothing on stdin", where="stdin", hint="pipe a prompt in, or use --prompt TEXT")
    trained = resolve_trained(model)
    if images and not trained.is_vision:
        raise QwentuneError("--image needs a vision model (Qwen2-VL)", where=model)
    if trained.template is None:
        raise QwentuneError("the model has no chat template", where=model, hint="chat with an instruct model")
    net, tokenizer = load_for_inference(trained)
    generate = Generator(net, tokenizer, model_dir=trained.model_path, max_new_tokens=max_new_tokens,
                         temperature=temperature)  # fmt: skip
    conversation = Conversation(system=system, tools=tool_list, images=images)
    if prompt is not None:
        conversation.add_user(prompt.strip())
        respond(conversation, generate)
        return 0
    interactive(conversation, generate)
    return 0
