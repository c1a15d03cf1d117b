"""GRPO's built-in rewards, made of eval's own scoring rules (`toolscore`): eval's scorer is also GRPO's reward.

Each reward is a pure function of the completion as generated (special tokens included: `<|im_end|>` when the model
stopped), the reference assistant turn (a canonical message, `tool_calls` included) and the row's tools (for the
schema's optional arguments), returning a `Reward` (its value and the parts it is made of), or None where it does not
apply to the row (TRL leaves such rows out of that reward's mean).

  tool_call  the reference turn makes calls. 1.0 for an exact call (toolscore's rule: same calls in any order,
             arguments equal as JSON values, optional arguments per the schema). Otherwise ToolRL's decomposed
             partial credit (Qian et al. 2025), each part in [0, 1] and the value their mean, so always below 1:
               format  0.5 for a <tool_call> tag + 0.5 when every block is a JSON object (no tag: the value is 0)
               names   the called tool names against the expected ones, |∩| / |∪| as multisets
               params  per expected call paired with a called call of its name: |∩| / |∪| of their parameter names,
                       summed over the pairs / max(calls expected, calls made)
               values  per pair: the share of the expected parameters given an equal value (`values_equal`; a call
                       without parameters: 1), summed / max(calls expected, calls made)
  no_call    the reference answers or asks (no calls): 1.0 when the reply makes no call, else 0.0.
  format     every row: 0.5 when the reply stops at `<|im_end|>` (it ends there; a reply cut at the length limit
             does not) + 0.5 when its `<tool_call>` blocks are well formed: each closed before the next opens, no
             stray `</tool_call>`, each a JSON object with a string `name` and object `arguments` (none: well formed).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import QwentuneError, did_you_mean
from .toolscore import parse_tool_calls, reference_calls, score_tool_calls, values_equal

END = "<|im_end|>"  # where a ChatML assistant turn ends (every Qwen template)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_TAG = re.compile(r"</?tool_call>")


@dataclass(frozen=True)
class Reward:
    """A reward's value for one completion and the parts it is made of (logged as rewards/<name>/<part>)."""

    value: float
    parts: dict[str, float] = field(default_factory=dict)


def tool_call(completion: str, reference: dict, tools: list | None = None) -> Reward | None:
    """1 for the exact call, else ToolRL's partial credit (module docstring); None when the reference makes no call."""
    want = reference_calls(reference)
    if not want:
        return None
    if score_tool_calls(completion, want, tools).ok:
        return Reward(1.0, {"format": 1.0, "names": 1.0, "params": 1.0, "values": 1.0})
    parts = {"format": 0.0, "names": 0.0, "params": 0.0, "values": 0.0}
    if _OPEN not in completion:
        return Reward(0.0, parts)
    got = parse_tool_calls(completion)
    parts["format"] = 0.5 + (0.5 if got else 0.0)  # None: a block is not a JSON object; []: no closed block
    if got:
        parts.update(_call_parts(got, want))
    return Reward(sum(parts.values()) / len(parts), parts)


def _call_parts(got: list[dict], want: list[dict]) -> dict[str, float]:
    """names / params / values of the called `got` against the expected `want` (each expected call paired with the
    unused called call of its name that scores best)."""
    called, expected = Counter(str(c.get("name")) for c in got), Counter(str(c["name"]) for c in want)
    names = sum((called & expected).values()) / sum((called | expected).values())
    params = values = 0.0
    used: set[int] = set()
    for call in want:
        best, best_j = (0.0, 0.0), None
        for j, other in enumerate(got):
            if j not in used and str(other.get("name")) == str(call["name"]):
                score = _pair(other.get("arguments", {}), call["arguments"])
                if best_j is None or sum(score) > sum(best):
                    best, best_j = score, j
        if best_j is not None:
            used.add(best_j)
            params, values = params + best[0], values + best[1]
    calls = max(len(got), len(want))
    return {"names": names, "params": params / calls, "values": values / calls}


def _pair(got: Any, want: dict) -> tuple[float, float]:
    """(parameter names |∩| / |∪|, share of the expected parameters with an equal value) of one called call."""
    if not isinstance(got, dict):
        return 0.0, 0.0
    union = set(got) | set(want)
    names = len(set(got) & set(want)) / len(union) if union else 1.0
    equal = sum(k in got and values_equal(got[k], v) for k, v in want.items())
    return names, equal / len(want) if want else 1.0


def no_call(completion: str, reference: dict, tools: list | None = None) -> Reward | None:
    """1 when the reply makes no call where the reference answers or asks; None where the reference calls."""
    if reference_calls(reference):
        return None
    refrained = float(_OPEN not in completion)
    return Reward(refrained, {"refrained": refrained})


def well_formed(completion: str, reference: dict | None = None, tools: list | None = None) -> Reward:
    """0.5 for stopping at <|im_end|> + 0.5 for well-formed <tool_call> blocks (module docstring)."""
    stops = float(completion.endswith(END) and completion.count(END) == 1)
    blocks = float(_blocks_well_formed(completion.removesuffix(END)))
    return Reward(0.5 * stops + 0.5 * blocks, {"stops": stops, "blocks": blocks})


def _blocks_well_formed(text: str) -> bool:
    tags = [(m.group(), m.start(), m.end()) for m in _TAG.finditer(text)]
    if len(tags) % 2 or any(tag != (_OPEN if k % 2 == 0 else _CLOSE) for k, (tag, _, _) in enumerate(tags)):
        return False  # unclosed, nested or stray tags
    for (_, _, start), (_, end, _) in zip(tags[::2], tags[1::2]):
        try:
            call = json.loads(text[start:end])
        except json.JSONDecodeError:
            return False
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and _is_object(call.get("arguments"))):
            return False
    return True


def _is_object(arguments: Any) -> bool:
    if isinstance(arguments, str):  # arguments given as a JSON string, as some templates write them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return False
    return isinstance(arguments, dict)


BUILTIN: dict[str, Callable[..., Reward | None]] = {"tool_call": tool_call, "no_call": no_call, "format": well_formed}


def reward_functions(
    names: list[str], passed: dict[str, Callable] | None = None, where: str = "recipe"
) -> dict[str, Callable]:
    """name → function for each name of grpo.rewards: the built-ins, or a callable passed from Python under that name
    (which shadows a built-in). A name that is neither: QwentuneError with a did-you-mean."""
    known = {**BUILTIN, **(passed or {})}
    out = {}
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known) or f"built in: {', '.join(BUILTIN)}; or pass rewards={{name: function}}"
            raise QwentuneError(f"'grpo.rewards' names an unknown reward {name!r}", where=where, hint=hint)
        if not callable(known[name]):
            raise QwentuneError(f"the reward {name!r} passed from Python is not callable", where="rewards")
        out[name] = known[name]
    return out


def as_reward(result: Any, name: str) -> Reward | None:
    """What a reward function returned, as a Reward: a Reward, a number (a bool counts as 0/1) or None."""
    if result is None or isinstance(result, Reward):
        return result
    if isinstance(result, (int, float)):
        return Reward(float(result))
    raise QwentuneError(
        f"the reward {name!r} returned {type(result).__name__}, not a number, a Reward or None", where="rewards"
    )


__all__ = ["BUILTIN", "END", "Reward", "as_reward", "no_call", "reward_functions", "tool_call", "well_formed"]
