"""The canonical row every format converts to, and the rules for its parts: tool schemas, tool calls (the one
normalizer, used by conversion and by rendering), messages, images, and the conversation checks.

Canonical message: {"role": "system"|"user"|"assistant"|"tool", "content": str (or a list of parts when it holds
images), "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}] (optional),
"train": bool (optional), "name": str (tool, optional)}.
SFT row: {"messages": [...], "tools": list[dict] | None}.
Preference row: {"prompt": [...], "chosen": [assistant messages], "rejected": [assistant messages], "tools": ...}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BadRow

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
LLAVA_PLACEHOLDER = "<image>"


# ---------------------------------------------------------------- small helpers


def _load_json(text: str, reason: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise BadRow(reason, f"{what} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def maybe_json_list(value: Any, reason: str, what: str) -> Any:
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


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ---------------------------------------------------------------- tools and tool calls


def normalize_tools(tools: Any, *, arrow: bool = False, as_given: bool = False) -> list[dict] | None:
    """Tools as a list of {"type": "function", "function": {...}}; accepts a JSON string (glaive), a list of JSON
    strings, bare function schemas ({"name", "description", "parameters"}) or the wrapped form.
    `as_given` (rendering a caller's own rows, which must render as `apply_chat_template` renders them): a list whose
    items are parsed and checked to be objects, each kept as written."""
    if is_blank(tools):
        return None
    if isinstance(tools, str):
        tools = _load_json(tools, "invalid_tool_json", "tools")
        if tools is None:  # "null" (a JSON cell of a row without tools)
            return None
    if isinstance(tools, dict) and not as_given:
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
        if as_given:
            out.append(tool)
        elif isinstance(tool.get("function"), dict):
            if not tool["function"].get("name"):
                raise BadRow("invalid_tool_json", f"tools[{i}] has no function name")
            out.append(tool if "type" in tool else {"type": "function", **tool})
        elif isinstance(tool.get("name"), str) and tool["name"]:
            out.append({"type": "function", "function": tool})
        else:
            raise BadRow("invalid_tool_json", f"tools[{i}] has no name")
    return out or None


def normalize_call(call: Any, *, arrow: bool = False, where: str = "tool call", as_given: bool = False) -> dict:
    """One tool call as {"type": "function", "function": {"name", "arguments": dict}}; string arguments are parsed
    (double-encoded ones twice), missing ones are {}. `as_given` (rendering a caller's own rows): the call keeps its
    shape and keys, only its arguments become an object, and it must have them (rendering never invents any)."""
    if isinstance(call, str):
        call = _load_json(call, "invalid_tool_json", where)
    if not isinstance(call, dict):
        raise BadRow("invalid_tool_json", f"{where} must be an object, got {type(call).__name__}")
    nested = isinstance(call.get("function"), dict)
    fn = call["function"] if nested else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRow("invalid_tool_json", f"{where} has no function name")
    args = fn.get("arguments")
    if as_given:
        if args is None:
            raise BadRow("invalid_tool_json", f"{where} ({name}) has no arguments (use {{}} for a call without any)")
    elif args is None:
        args = fn.get("parameters")
    if args is None or (isinstance(args, str) and not args.strip() and not as_given):
        args = {}
    for _ in range(1 if as_given else 2):  # double-encoded arguments ("\"{...}\"") are decoded twice
        if isinstance(args, str):
            args = _load_json(args, "invalid_tool_json", f"{where} ({name}) arguments")
    if arrow:
        args = drop_nulls(args)
    if not isinstance(args, dict):
        raise BadRow("invalid_tool_json", f"{where} ({name}) arguments are not a JSON object")
    if as_given:
        fn = {**fn, "arguments": args}
        return {**call, "function": fn} if nested else fn
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _calls(value: Any, *, arrow: bool) -> list[dict]:
    value = maybe_json_list(value, "invalid_tool_json", "tool_calls")
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
    turns = maybe_json_list(turns, "invalid_json", "messages")
    if is_blank(turns):
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
        if value is None and (role != "assistant" or is_blank(calls) or calls == []):
            # null content is an empty turn only beside tool calls (OpenAI); elsewhere the text is missing
            raise BadRow("null_content", f"message {i} ({role}) has no content")
        if not is_blank(calls) and calls != []:
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


def is_empty_message(msg: dict) -> bool:
    content = msg.get("content")
    return (not content or (isinstance(content, str) and not content.strip())) and not msg.get("tool_calls")


def check_conversation(messages: list[dict]) -> None:
    """Role order the official templates can render faithfully, and at least one trained assistant turn."""
    if all(is_empty_message(m) for m in messages):
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
        if m["role"] == "assistant" and m.get("train", True) and is_empty_message(m):
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


# ---------------------------------------------------------------- images (Qwen2-VL)


def is_image_part(part: Any) -> bool:
    """What the official template renders as an image (any part with an `image`/`image_url` key, or type image)."""
    return isinstance(part, Mapping) and (part.get("type") == "image" or "image" in part or "image_url" in part)


def image_reference(part: Mapping) -> Any:
    """Where an image part says its image is (`image`, `image_url`, `path`), or None."""
    value = part.get("image")
    if value is None and "image_url" in part:
        url = part["image_url"]
        value = url.get("url") if isinstance(url, Mapping) else url
    if value is None:
        value = part.get("path")
    return value


def attach_images(messages: list[dict], images: Any) -> list[dict]:
    """LLaVA / ShareGPT / TRL rows: a top-level `images` list (or one `image`) fills, in order, the `<image>`
    placeholders in text contents and the image parts that carry no image of their own. The counts must match."""
    if isinstance(images, (str, Mapping)):
        images = [images]
    if not isinstance(images, Sequence) or isinstance(images, (bytes, bytearray)):
        raise BadRow("image_count_mismatch", f"'images' must be a list of paths, got {type(images).__name__}")
    pending = list(images)
    placeholders = 0
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str) and LLAVA_PLACEHOLDER in content:
            parts: list[dict] = []
            pieces = content.split(LLAVA_PLACEHOLDER)
            for k, text in enumerate(pieces):
                if k:
                    placeholders += 1
                    parts.append({"type": "image", "image": pending.pop(0) if pending else None})
                if text:
                    parts.append({"type": "text", "text": text})
            msg = {**msg, "content": parts}
        elif isinstance(content, list):
            parts = []
            for part in content:
                if is_image_part(part) and image_reference(part) is None:
                    placeholders += 1
                    part = {**part, "type": "image", "image": pending.pop(0) if pending else None}
                parts.append(part)
            msg = {**msg, "content": parts}
        out.append(msg)
    if placeholders != len(images):
        raise BadRow(
            "image_count_mismatch",
            f"{placeholders} image placeholder(s) ({LLAVA_PLACEHOLDER} or image parts without a path) "
            f"but {len(images)} image(s) in 'images'",
        )
    return out
