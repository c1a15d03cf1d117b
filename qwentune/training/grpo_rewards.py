"""GRPO's rewards as TRL calls them, and what a run measured of them.

Each reward named in grpo.rewards (eval's built-ins, `eval/rewards.py`, or a callable passed from Python under that
name) becomes one TRL reward function, weighted by its grpo.rewards weight. A reward sees each completion as
generated, special tokens included: TRL decodes its `completions` without them, so every completion is decoded here
from `completion_ids` (the sampled ids, through the stop token when the model stopped). With it the reward gets the
prompt's reference turn and tools (parsed from the prompt row's JSON columns).

A reward function from Python takes `(completion: str, reference: dict, tools: list | None)` and returns a number,
None (not this reward's row) or an `eval.Reward` (a value and its parts). Parts are logged as rewards/<name>/<part>:
their mean over the completions the reward applies to, at each step, beside TRL's rewards/<name>/mean, reward and
frac_reward_zero_std (the share of groups whose completions all got the same reward: no learning signal).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..eval import as_reward, reward_functions

# What metrics.json["grpo"]["measured"] keeps of the logged rows besides each reward: TRL's log key → its name.
SUMMARY = {"reward": "reward", "frac_reward_zero_std": "zero-variance groups"}


class TrlReward:
    """One named reward in TRL's reward-function protocol (TRL names its metrics by `__name__`)."""

    def __init__(self, name: str, function: Callable, tokenizer: Any):
        self.__name__ = name
        self.function, self.tokenizer = function, tokenizer

    def __call__(self, prompts, completions, completion_ids, reference, tools, log_metric=None, **_) -> list:
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=False)
        parsed: dict[str, Any] = {}  # each prompt comes num_generations times: parse its JSON once

        def load(text: str) -> Any:
            if text not in parsed:
                parsed[text] = json.loads(text) if text else None
            return parsed[text]

        results = [
            as_reward(self.function(t, load(r), load(s)), self.__name__) for t, r, s in zip(texts, reference, tools)
        ]
        parts: dict[str, list[float]] = {}
        for result in results:
            for part, value in (result.parts if result is not None else {}).items():
                parts.setdefault(part, []).append(float(value))
        if log_metric is not None:
            for part, values in parts.items():
                log_metric(f"rewards/{self.__name__}/{part}", sum(values) / len(values))
        return [r.value if r is not None else None for r in results]


def trl_rewards(weights: dict[str, float], passed: dict[str, Callable] | None, tokenizer: Any):
    """(TRL reward functions, their weights) for grpo.rewards (`weights`: name → weight); `passed`: callables from
    Python by name. An unknown name: QwentuneError with a did-you-mean."""
    functions = reward_functions(list(weights), passed)
    return [TrlReward(name, f, tokenizer) for name, f in functions.items()], [float(weights[n]) for n in functions]


def measured(rows: list[dict], names: list[str]) -> dict[str, list[float] | float]:
    """[first, last] logged step of the total reward, each reward and each of its parts, and the mean share of groups
    with zero reward variance over the run (from metrics.jsonl rows)."""
    steps = [r for r in rows if "reward" in r and "step" in r]
    if not steps:
        return {}
    keys = dict(SUMMARY)
    logged = list(dict.fromkeys(k for r in steps for k in r))
    for name in names:  # rewards/<name>/mean, then its parts
        keys |= {
            k: k.removeprefix("rewards/").removesuffix("/mean") for k in logged if k.startswith(f"rewards/{name}/")
        }
    out: dict[str, list[float] | float] = {}
    for key, shown in keys.items():
        values = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
        if not values or key.endswith("/std"):
            continue
        if key == "frac_reward_zero_std":
            out[f"{shown} (mean share)"] = sum(values) / len(values)
        else:
            out[shown] = [values[0], values[-1]]
    return out


__all__ = ["TrlReward", "measured", "trl_rewards"]
