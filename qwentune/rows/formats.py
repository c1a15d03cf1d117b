"""Dataset formats → canonical rows (see `canonical`). Detection works per file; conversion works per row and raises
BadRow.

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
order (`canonical.attach_images`); placeholders ≠ images is the bad row `image_count_mismatch`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..errors import BadRow, QwentuneError
from .canonical import (
    attach_images,
    check_conversation,
    is_blank,
    is_empty_message,
    maybe_json_list,
    normalize_messages,
    normalize_tools,
)

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference")


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


DETECT_ROWS = 100  # rows read to detect a file's format


def detect_source_format(texts: Iterable[str], forced: str, *, label: str, where: str) -> str:
    """The format of one data source from its rows as JSON text (`forced` unless it is "auto"): the first of its
    first DETECT_ROWS parsed rows that has one. "unknown" when no row is JSON (the rows are then counted as
    invalid_json); an error naming the first row's keys when none fits."""
    if forced != "auto":
        return forced
    parsed = 0
    first_keys: list[str] | None = None
    for text in texts:
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        parsed += 1
        fmt = detect_format(row)
        if fmt:
            return fmt
        if first_keys is None:
            first_keys = sorted(row) if isinstance(row, dict) else [type(row).__name__]
        if parsed >= DETECT_ROWS:
            break
    if not parsed:
        return "unknown"
    raise QwentuneError(
        f"cannot tell the format of {label}: its first row has keys {first_keys}",
        where=where,
        hint="rows need `messages`, `conversations`, `instruction`+`output`, `prompt`+`completion` or "
        "`chosen`+`rejected`; or force one with data.format (" + ", ".join(FORMATS) + ")",
    )


# ---------------------------------------------------------------- per-format conversion


def _with_system(messages: list[dict], system: Any) -> list[dict]:
    if is_blank(system) or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": str(system)}, *messages]


def _history(value: Any) -> list[dict]:
    value = maybe_json_list(value, "invalid_json", "history")
    if is_blank(value):
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
    if not raw or all(is_blank(v) for v in raw.values()):
        raise BadRow("empty", "the row is empty")
    if fmt == "messages":
        if is_blank(raw.get("messages")):
            raise BadRow("empty", "no messages")
        messages = _with_system(normalize_messages(raw["messages"], arrow=arrow), raw.get("system"))
    elif fmt == "sharegpt":
        turns = _sharegpt_turns(raw)
        if is_blank(turns):
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
        if is_blank(raw.get("prompt")):
            raise BadRow("empty", "the prompt is empty")
        prompt = _text_or_messages(raw.get("prompt"), "user", arrow=arrow)
        completion = _text_or_messages(raw.get("completion"), "assistant", arrow=arrow)
        if not completion or all(is_empty_message(m) for m in completion):
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
    if not raw or all(is_blank(v) for v in raw.values()):
        raise BadRow("empty", "the row is empty")
    chosen = _text_or_messages(raw.get("chosen"), "assistant", arrow=arrow)
    rejected = _text_or_messages(raw.get("rejected"), "assistant", arrow=arrow)
    if _sharegpt_turns(raw) is not None:
        prompt = _with_system(normalize_messages(_sharegpt_turns(raw), arrow=arrow), raw.get("system"))
    elif raw.get("instruction") is not None:
        prompt = _alpaca_prompt(raw)
    elif not is_blank(raw.get("prompt")):
        prompt = _with_system(_text_or_messages(raw["prompt"], "user", arrow=arrow), raw.get("system"))
    else:  # implicit prompt: chosen and rejected are whole conversations that share their start
        n = _common_prefix(chosen, rejected)
        while n and chosen[n - 1]["role"] == "assistant" and n == min(len(chosen), len(rejected)):
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        prompt = _with_system(prompt, raw.get("system"))
    prompt = _with_system(_with_images(prompt, raw), system_prompt)
    if not prompt or all(is_empty_message(m) for m in prompt):
        raise BadRow("empty", "the prompt is empty")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise BadRow("bad_role_order", f"the prompt ends with {prompt[-1]['role']}, not user or tool")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion or all(is_empty_message(m) for m in completion):
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
