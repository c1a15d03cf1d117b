"""Dataset formats → canonical rows. Detection works per file; conversion works per row and raises BadRow.

Canonical message: {"role": "system"|"user"|"assistant"|"tool", "content": str (or a list of parts when it holds
images), "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}] (optional),
"train": bool (optional), "name": str (tool, optional)}.
SFT row: {"messages": [...], "tools": list[dict] | None}.
Preference row: {"prompt": [...], "chosen": [assistant messages], "rejected": [assistant messages], "tools": ...}.

Detection (first row of a file that has one of these key sets, in this order):
  preference         `chosen` and `rejected` (with `prompt`, `conversations`, `instruction`, or neither: then the
                     prompt is the common start of the two conversations)
  messages           `messages` (OpenAI: role/content, tool_calls, tool results; + optional `tools`)
  sharegpt           `conversations` (from/value: human, gpt, system, function_call, observation, tool; + optional
                     `system` and a glaive-style `tools` JSON string)
  alpaca             `instruction` and `output` (+ `input`, `system`, `history` [[q, a], ...])
  prompt_completion  `prompt` and `completion` (strings or message lists; only the completion is trained)

Images (Qwen2-VL): content parts `{"type": "image", "image": PATH}` (or `image_url`) are kept as parts; a top-level
`images` list (LLaVA, ShareGPT, TRL) fills the `<image>` placeholders in text and the image parts without a path, in
order (`vision.attach_images`); placeholders ≠ images is the bad row `image_count_mismatch`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .errors import BadRow
from .vision import attach_images

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",  # legacy OpenAI function result
    "function_response": "tool",
    "tool_response": "tool",
    "ipython": "tool",
}
# A ShareGPT turn whose value is a JSON call (or a list of calls): becomes tool_calls of an assistant turn.
CALL_ROLES = ("function_call", "tool_call")
MEDIA_TYPES = ("image", "image_url", "video")


def detect_format(row: Any) -> str | None:
    """The format a row is written in, from its keys; None when no format fits."""
    if not isinstance(row, dict):
        return None
    keys = {k for k, v in row.items() if v is not None}
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys or "conversation" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    return None


def detect_file_format(rows: Iterable[Any]) -> str | None:
    """The format of the first row that has one (a file is read in one format)."""
    for row in rows:
        fmt = detect_format(row)
        if fmt:
            return fmt
    return None


# ---------------------------------------------------------------- small helpers


def _load_json(text: str, reason: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise BadRow(reason, f"{what} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def _maybe_json_list(value: Any, reason: str, what: str) -> Any:
    """A list given as a JSON string (CSV cells, some hub datasets) is parsed; other values are returned as is."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        return _load_json(value, reason, what)
    return value


def drop_nulls(value: Any) -> Any:
    """Remove keys whose value is None, recursively: Arrow struct columns add every key seen in any row to every row
    as null, and a null there cannot be told apart from a key that was never given."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ---------------------------------------------------------------- tools and tool calls


def normalize_tools(tools: Any, *, arrow: bool = False) -> list[dict] | None:
    """Tools as a list of {"type": "function", "function": {...}}; accepts a JSON string (glaive), a list of JSON
    strings, bare function schemas ({"name", "description", "parameters"}) or the wrapped form."""
    if _blank(tools):
        return None
    if isinstance(tools, str):
        tools = _load_json(tools, "invalid_tool_json", "tools")
        if tools is None:  # "null" (a JSON cell of a row without tools)
            return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise BadRow("invalid_tool_json", f"tools must be a list of function schemas, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, str):
            tool = _load_json(tool, "invalid_tool_json", f"tools[{i}]")
        if not isinstance(tool, dict):
            raise BadRow("invalid_tool_json", f"tools[{i}] is not an object")
        if arrow:
            tool = drop_nulls(tool)
        if isinstance(tool.get("function"), dict):
            if not tool["function"].get("name"):
                raise BadRow("invalid_tool_json", f"tools[{i}] has no function name")
            out.append(tool if "type" in tool else {"type": "function", **tool})
        elif isinstance(tool.get("name"), str) and tool["name"]:
            out.append({"type": "function", "function": tool})
        else:
            raise BadRow("invalid_tool_json", f"tools[{i}] has no name")
    return out or None


def normalize_call(call: Any, *, arrow: bool = False) -> dict:
    """One tool call as {"type": "function", "function": {"name", "arguments": dict}}; string arguments are parsed."""
    if isinstance(call, str):
        call = _load_json(call, "invalid_tool_json", "tool call")
    if not isinstance(call, dict):
        raise BadRow("invalid_tool_json", f"a tool call must be an object, got {type(call).__name__}")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRow("invalid_tool_json", "tool call without a name")
    args = fn.get("arguments")
    if args is None:
        args = fn.get("parameters")
    if args is None or (isinstance(args, str) and not args.strip()):
        args = {}
    for _ in range(2):  # double-encoded arguments ("\"{...}\"") are decoded twice
        if isinstance(args, str):
            args = _load_json(args, "invalid_tool_json", f"arguments of the call to {name}")
    if arrow:
        args = drop_nulls(args)
    if not isinstance(args, dict):
        raise BadRow("invalid_tool_json", f"arguments of the call to {name} are not a JSON object")
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _calls(value: Any, *, arrow: bool) -> list[dict]:
    value = _maybe_json_list(value, "invalid_tool_json", "tool_calls")
    if isinstance(value, str):
        raise BadRow("invalid_tool_json", "tool_calls is not valid JSON")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRow("invalid_tool_json", f"tool_calls must be a list, got {type(value).__name__}")
    return [normalize_call(c, arrow=arrow) for c in value]


# ---------------------------------------------------------------- messages


def _is_media(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in MEDIA_TYPES or any(k in part for k in MEDIA_TYPES))


def _content(value: Any, role: str, *, arrow: bool) -> str | list:
    """Text content; a list of text parts is joined; a list holding images/videos is kept (cleaned) for VL."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # Always drop null keys of parts: `datasets` gives every text part `image: None`, and the template renders
        # any part with an `image` key as an image (files exported from a Dataset carry that too).
        parts = [drop_nulls(p) for p in value]
        if any(_is_media(p) for p in parts):
            return parts
        texts = []
        for p in parts:
            if isinstance(p, str):
                texts.append(p)
            elif isinstance(p, dict) and isinstance(p.get("text"), str):
                texts.append(p["text"])
            else:
                raise BadRow("invalid_json", f"{role} content part {p!r} is neither text nor an image")
        return "".join(texts)
    if isinstance(value, (dict, int, float, bool)):  # e.g. a tool result given as an object
        return json.dumps(value, ensure_ascii=False)
    raise BadRow("invalid_json", f"{role} content of type {type(value).__name__}")


def _first(turn: dict, *keys: str) -> Any:
    for k in keys:
        if turn.get(k) is not None:
            return turn[k]
    return None


def normalize_messages(turns: Any, *, arrow: bool = False) -> list[dict]:
    """Canonical messages from role/content or from/value turns. In ShareGPT, a `function_call` turn (value: JSON
    {name, arguments} or a list of them) joins the assistant turn just before it when that turn has no calls yet
    (text beside calls), and consecutive `function_call` turns are parallel calls of one assistant turn."""
    turns = _maybe_json_list(turns, "invalid_json", "messages")
    if _blank(turns):
        raise BadRow("empty", "no messages")
    if not isinstance(turns, list):
        raise BadRow("invalid_json", f"messages must be a list, got {type(turns).__name__}")
    out: list[dict] = []
    prev_call_turn = False
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("invalid_json", f"message {i} is not an object")
        raw_role = _first(turn, "role", "from")
        if not isinstance(raw_role, str):
            raise BadRow("bad_role_order", f"message {i} has no role")
        role_key = raw_role.strip().lower()
        value = _first(turn, "content", "value")
        if role_key in CALL_ROLES:
            calls = _calls(value, arrow=arrow)
            last = out[-1] if out else None
            if last and last["role"] == "assistant" and (prev_call_turn or not last.get("tool_calls")):
                last.setdefault("tool_calls", []).extend(calls)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
            prev_call_turn = True
            continue
        prev_call_turn = False
        role = ROLE_ALIASES.get(role_key)
        if role is None:
            raise BadRow("bad_role_order", f"message {i} has unknown role {raw_role!r}")
        msg: dict[str, Any] = {"role": role, "content": _content(value, role, arrow=arrow)}
        calls = turn.get("tool_calls")
        if calls is None and isinstance(turn.get("function_call"), (dict, str)):
            calls = [turn["function_call"]]  # legacy OpenAI assistant function_call
        if value is None and (role != "assistant" or _blank(calls) or calls == []):
            # null content is an empty turn only beside tool calls (OpenAI); elsewhere the text is missing
            raise BadRow("null_content", f"message {i} ({role}) has no content")
        if not _blank(calls) and calls != []:
            if role != "assistant":
                raise BadRow("bad_role_order", f"message {i} ({role}) carries tool calls")
            msg["tool_calls"] = _calls(calls, arrow=arrow)
        train = turn.get("train")
        if train is None and turn.get("weight") in (0, 1):  # OpenAI fine-tuning files: weight 0 = not trained
            train = bool(turn["weight"])
        if isinstance(train, bool):
            msg["train"] = train
        if role == "tool" and isinstance(turn.get("name"), str) and turn["name"]:
            msg["name"] = turn["name"]
        out.append(msg)
    if not out:
        raise BadRow("empty", "no messages")
    return out


def _is_empty(msg: dict) -> bool:
    content = msg.get("content")
    return (not content or (isinstance(content, str) and not content.strip())) and not msg.get("tool_calls")


def check_conversation(messages: list[dict]) -> None:
    """Role order the official templates can render faithfully, and at least one trained assistant turn."""
    if all(_is_empty(m) for m in messages):
        raise BadRow("empty", "every message is empty")
    roles = [m["role"] for m in messages]
    first = next((i for i, r in enumerate(roles) if r != "system"), None)
    if first is None:
        raise BadRow("no_assistant_turn", "only system messages")
    if roles[first] != "user":
        raise BadRow("bad_role_order", f"the conversation starts with {roles[first]} (message {first}), not user")
    for i in range(1, len(messages)):
        role, prev = roles[i], messages[i - 1]
        if role == "assistant" and prev["role"] == "assistant":
            raise BadRow("bad_role_order", f"two assistant turns in a row (messages {i - 1} and {i})")
        if role == "tool" and not (prev["role"] == "tool" or prev.get("tool_calls")):
            raise BadRow("bad_role_order", f"tool result at message {i} does not follow a tool call")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadRow("no_assistant_turn", "no assistant message")
    if not any(m.get("train", True) for m in assistants):
        raise BadRow("no_assistant_turn", "every assistant message has train: false")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("train", True) and _is_empty(m):
            raise BadRow("empty_completion", f"assistant message {i} is empty")


def needs_tools(row: dict) -> bool:
    """Whether a canonical row (SFT or preference) uses tools, tool calls or tool results."""
    if row.get("tools"):
        return True
    for key in ("messages", "prompt", "chosen", "rejected"):
        for m in row.get(key) or ():
            if m.get("tool_calls") or m["role"] == "tool":
                return True
    return False


# ---------------------------------------------------------------- per-format conversion


def _with_system(messages: list[dict], system: Any) -> list[dict]:
    if _blank(system) or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": str(system)}, *messages]


def _history(value: Any) -> list[dict]:
    value = _maybe_json_list(value, "invalid_json", "history")
    if _blank(value):
        return []
    if not isinstance(value, list):
        raise BadRow("invalid_json", "history must be a list of [question, answer] pairs")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRow("invalid_json", f"history[{i}] is not a [question, answer] pair")
        out += [{"role": "user", "content": str(pair[0] or "")}, {"role": "assistant", "content": str(pair[1] or "")}]
    return out


def _alpaca_prompt(raw: dict) -> list[dict]:
    instruction = raw.get("instruction") or ""
    extra = raw.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise BadRow("invalid_json", "instruction and input must be strings")
    query = "\n".join(part for part in (instruction, extra) if part)
    if not query.strip():
        raise BadRow("empty", "instruction and input are empty")
    return _with_system([*_history(raw.get("history")), {"role": "user", "content": query}], raw.get("system"))


def _looks_like_messages(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in items)


def _text_or_messages(value: Any, role: str, *, arrow: bool) -> list[dict]:
    """A prompt/completion given as a string (one `role` message), a message, or a list of messages (also as a JSON
    string, e.g. from a CSV cell)."""
    if value is None:
        return []
    if isinstance(value, str):
        if value.strip()[:1] in ("[", "{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if _looks_like_messages(parsed):
                return _text_or_messages(parsed, role, arrow=arrow)
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    return normalize_messages(value, arrow=arrow)


def _sharegpt_turns(raw: dict) -> Any:
    return raw["conversations"] if raw.get("conversations") is not None else raw.get("conversation")


def to_sft_row(
    raw: Any, fmt: str, *, arrow: bool = False, tools: list | None = None, system_prompt: str | None = None
) -> dict:
    """A canonical SFT row {"messages", "tools"} from a raw row in `fmt`; raises BadRow."""
    if not isinstance(raw, dict):
        raise BadRow("invalid_json", f"a row must be a JSON object, got {type(raw).__name__}")
    if not raw or all(_blank(v) for v in raw.values()):
        raise BadRow("empty", "the row is empty")
    if fmt == "messages":
        if _blank(raw.get("messages")):
            raise BadRow("empty", "no messages")
        messages = _with_system(normalize_messages(raw["messages"], arrow=arrow), raw.get("system"))
    elif fmt == "sharegpt":
        turns = _sharegpt_turns(raw)
        if _blank(turns):
            raise BadRow("empty", "no conversations")
        messages = _with_system(normalize_messages(turns, arrow=arrow), raw.get("system"))
    elif fmt == "alpaca":
        output = raw.get("output")
        if not isinstance(output, str) and output is not None:
            raise BadRow("invalid_json", f"output must be a string, got {type(output).__name__}")
        if not output or not output.strip():
            raise BadRow("empty_completion", "output is empty")
        messages = [*_alpaca_prompt(raw), {"role": "assistant", "content": output}]
    elif fmt == "prompt_completion":
        if _blank(raw.get("prompt")):
            raise BadRow("empty", "the prompt is empty")
        prompt = _text_or_messages(raw.get("prompt"), "user", arrow=arrow)
        completion = _text_or_messages(raw.get("completion"), "assistant", arrow=arrow)
        if not completion or all(_is_empty(m) for m in completion):
            raise BadRow("empty_completion", "completion is empty")
        # Only the completion is trained: assistant turns inside the prompt are context.
        prompt = [m if m["role"] != "assistant" or "train" in m else {**m, "train": False} for m in prompt]
        messages = _with_system(prompt + completion, raw.get("system"))
    elif fmt == "preference":
        raise BadRow("bad_role_order", "a preference pair is not an SFT row")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    row_tools = normalize_tools(raw.get("tools"), arrow=arrow)
    messages = _with_system(_with_images(messages, raw), system_prompt)
    check_conversation(messages)
    return {"messages": messages, "tools": row_tools if row_tools is not None else tools}


def _with_images(messages: list[dict], raw: dict) -> list[dict]:
    """LLaVA/ShareGPT/TRL rows list their images at the top level (`images`, or one `image`)."""
    images = raw.get("images", raw.get("image"))
    return messages if images is None else attach_images(messages, images)


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def to_preference_row(
    raw: Any, *, arrow: bool = False, tools: list | None = None, system_prompt: str | None = None
) -> dict:
    """A canonical preference row {"prompt", "chosen", "rejected", "tools"}; raises BadRow."""
    if not isinstance(raw, dict):
        raise BadRow("invalid_json", f"a row must be a JSON object, got {type(raw).__name__}")
    if not raw or all(_blank(v) for v in raw.values()):
        raise BadRow("empty", "the row is empty")
    chosen = _text_or_messages(raw.get("chosen"), "assistant", arrow=arrow)
    rejected = _text_or_messages(raw.get("rejected"), "assistant", arrow=arrow)
    if _sharegpt_turns(raw) is not None:
        prompt = _with_system(normalize_messages(_sharegpt_turns(raw), arrow=arrow), raw.get("system"))
    elif raw.get("instruction") is not None:
        prompt = _alpaca_prompt(raw)
    elif not _blank(raw.get("prompt")):
        prompt = _with_system(_text_or_messages(raw["prompt"], "user", arrow=arrow), raw.get("system"))
    else:  # implicit prompt: chosen and rejected are whole conversations that share their start
        n = _common_prefix(chosen, rejected)
        while n and chosen[n - 1]["role"] == "assistant" and n == min(len(chosen), len(rejected)):
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        prompt = _with_system(prompt, raw.get("system"))
    prompt = _with_system(_with_images(prompt, raw), system_prompt)
    if not prompt or all(_is_empty(m) for m in prompt):
        raise BadRow("empty", "the prompt is empty")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise BadRow("bad_role_order", f"the prompt ends with {prompt[-1]['role']}, not user or tool")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion or all(_is_empty(m) for m in completion):
            raise BadRow("empty_completion", f"{name} is empty")
        if any(m["role"] != "assistant" for m in completion):
            raise BadRow("bad_role_order", f"{name} holds a non-assistant message")
        if len(completion) > 1:
            raise BadRow("bad_role_order", f"{name} holds {len(completion)} assistant messages in a row")
        check_conversation(prompt + completion)
    if chosen == rejected:
        raise BadRow("identical_pair", "chosen and rejected are the same")
    row_tools = normalize_tools(raw.get("tools"), arrow=arrow)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "tools": row_tools if row_tools is not None else tools,
    }


def convert(
    raw: Any, fmt: str, *, arrow: bool = False, tools: list | None = None, system_prompt: str | None = None
) -> dict:
    """The canonical row for `raw` in `fmt` (preference rows for 'preference'); raises BadRow."""
    if fmt == "preference":
        return to_preference_row(raw, arrow=arrow, tools=tools, system_prompt=system_prompt)
    return to_sft_row(raw, fmt, arrow=arrow, tools=tools, system_prompt=system_prompt)
