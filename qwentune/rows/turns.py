"""A conversation checked before it is rendered: role order, content types, tool schemas and calls (normalized by
`canonical`), and which assistant turns are trained.

BadRow reasons: empty, no_assistant_turn, bad_role_order, bad_message (a message that is not a message: content not a
string/list, a non-bool `train`, tool_calls outside an assistant turn), invalid_tool_json, tools_unsupported,
empty_completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BadRow, QwentuneError, did_you_mean
from .canonical import normalize_call, normalize_tools
from .template import ChatTemplate

TRAIN_ON = ("all", "last")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Turns:
    """A row as the template sees it."""

    messages: list[dict]  # what the template sees
    tools: list[dict] | None
    trained: list[int]  # indices of the assistant messages to train, ascending


def _is_empty(content: Any) -> bool:
    return content is None or (isinstance(content, (str, list)) and len(content) == 0)


def check_turns(
    messages: Any, tools: Any, template: ChatTemplate, train_on: str, *, ignore_train_flags: bool = False
) -> Turns:
    if not messages:
        raise BadRow("empty", "the row has no messages")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise BadRow("bad_message", f"messages must be a list, got {type(messages).__name__}")
    tools = normalize_tools(tools, as_given=True)
    if tools and not template.supports_tools:
        raise BadRow("tools_unsupported", f"the row has tools but chat template {template.name} has no tool support")
    out: list[dict] = []
    assistants: list[int] = []
    trainable: list[int] = []
    prev_role: str | None = None
    prev_called = False  # the previous message was an assistant tool call, or a tool result after one
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise BadRow("bad_message", f"message {i} is not an object")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRow("bad_role_order", f"message {i} has unknown role {role!r} (expected {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise BadRow("bad_role_order", f"message {i} is a system message; only the first message may be one")
        if role != "system" and prev_role in (None, "system") and role != "user":
            raise BadRow("bad_role_order", f"message {i} is the first non-system message and is {role}, not user")
        if role == "assistant" and prev_role == "assistant":
            raise BadRow("bad_role_order", f"messages {i - 1} and {i} are both assistant turns")
        if role == "tool" and not prev_called:
            raise BadRow("bad_role_order", f"message {i} is a tool result without a preceding assistant tool call")
        content = msg.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise BadRow("bad_message", f"message {i} ({role}) content is {type(content).__name__}, not a string")
        clean = {k: v for k, v in msg.items() if v is not None and k != "train"}
        calls = msg.get("tool_calls")
        if calls is not None and role != "assistant":
            raise BadRow("bad_message", f"message {i} ({role}) has tool_calls; only assistant messages may")
        if calls is not None and not isinstance(calls, list):
            raise BadRow("invalid_tool_json", f"message {i} tool_calls is not a list")
        if calls:
            if not template.supports_tools:
                raise BadRow(
                    "tools_unsupported",
                    f"message {i} calls tools but chat template {template.name} has no tool support",
                )
            clean["tool_calls"] = [
                normalize_call(c, where=f"message {i} tool call {k}", as_given=True) for k, c in enumerate(calls)
            ]
        if role == "tool" and not template.supports_tools:
            raise BadRow(
                "tools_unsupported",
                f"message {i} is a tool result but chat template {template.name} has no tool support",
            )
        if role in ("system", "user", "tool") and content is None:
            raise BadRow("bad_message", f"message {i} ({role}) has no content")
        if role == "assistant":
            if _is_empty(content) and not calls:
                raise BadRow("empty_completion", f"message {i} is an assistant turn with no content and no tool calls")
            train = msg.get("train", True)
            if not isinstance(train, bool):
                raise BadRow("bad_message", f"message {i} 'train' must be true or false, got {train!r}")
            assistants.append(i)
            if train or ignore_train_flags:
                trainable.append(i)
        out.append(clean)
        prev_called = (role == "assistant" and bool(calls)) or (role == "tool" and prev_called)
        prev_role = role
    if train_on == "last":
        trainable = [i for i in trainable if assistants and i == assistants[-1]]
    if not trainable:
        detail = "no assistant turn" if not assistants else "every assistant turn is excluded from training"
        raise BadRow("no_assistant_turn", detail)
    return Turns(_alias_reasoning(out), tools, trainable)


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """transformers copies a message's reasoning under each name templates read it by (`reasoning_content`,
    `thinking`); do the same so reasoning templates render as with apply_chat_template. A no-op for Qwen2/2.5."""
    if not any(k in m for m in messages for k in _REASONING_FIELDS):
        return messages
    try:
        from transformers.utils.chat_template_utils import _alias_reasoning_fields
    except ImportError:
        return messages
    return _alias_reasoning_fields(messages)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise QwentuneError(
            f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}",
            where="train_on",
            hint=did_you_mean(str(train_on), TRAIN_ON),
        )


__all__ = ["ROLES", "TRAIN_ON", "Turns", "check_train_on", "check_turns"]
