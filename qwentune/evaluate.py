"""Measure what a tuned model does: tool-call accuracy of greedy generations (plain transformers, merged dir), and
DPO preference (log-prob of chosen vs rejected) on held-out pairs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .formats import convert, detect_format

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class ToolCallScore:
    total: int = 0
    correct: int = 0  # every expected call, right tool and arguments, in valid JSON inside <tool_call> tags
    tagged: int = 0  # generations containing at least one <tool_call> block
    valid_json: int = 0  # ... whose blocks all parse as JSON
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "correct": self.correct, "tagged": self.tagged, "valid_json": self.valid_json,
                "accuracy": round(self.accuracy, 4), "samples": self.samples}  # fmt: skip


def parse_tool_calls(text: str) -> list[dict] | None:
    """The `{"name", "arguments"}` objects in a generation's <tool_call> blocks; None if a block isn't valid JSON."""
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict):
            return None
        calls.append(call)
    return calls


def _expected(messages: list[dict]) -> tuple[list[dict], list[dict]] | None:
    """(prompt messages, expected calls) cut at the first assistant turn that calls tools."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]
            ]
            return messages[:i], calls
    return None


def _same_calls(got: list[dict], want: list[dict]) -> bool:
    def key(call: dict) -> str:
        return json.dumps({"name": call.get("name"), "arguments": call.get("arguments")}, sort_keys=True)

    return sorted(map(key, got)) == sorted(map(key, want))


def tool_call_accuracy(model_dir: str | Path, data_file: str | Path, *, limit: int = 12, max_new_tokens: int = 160,
                       dtype: torch.dtype = torch.bfloat16) -> ToolCallScore:  # fmt: skip
    """Greedy generations of a model dir (loaded with plain transformers) on the held-out tool prompts of
    `data_file`: the share whose <tool_call> blocks hold valid JSON naming the right tools and arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    score = ToolCallScore()
    for line in Path(data_file).read_text(encoding="utf-8").splitlines():
        if score.total >= limit:
            break
        raw = json.loads(line)
        row = convert(raw, detect_format(raw) or "messages")
        cut = _expected(row["messages"])
        if cut is None:
            continue
        prompt, want = cut
        ids = tokenizer.apply_chat_template(
            prompt, tools=row["tools"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=False)
        got = parse_tool_calls(text)
        score.total += 1
        score.tagged += "<tool_call>" in text
        score.valid_json += got is not None and bool(got)
        ok = got is not None and _same_calls(got, want)
        score.correct += ok
        if len(score.samples) < 4 or not ok and len(score.samples) < 8:
            score.samples.append({"prompt": prompt[-1]["content"], "expected": want, "generated": text, "ok": ok})
    return score


@torch.no_grad()
def preference_margin(model_dir: str | Path, data_file: str | Path, *, limit: int = 20,
                      dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """Mean log p(chosen) − log p(rejected) (summed over completion tokens) and the share of pairs where chosen wins,
    for a model dir loaded with plain transformers, on pairs rendered exactly as DPO trains them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .render import render_preference
    from .template import load_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    template = load_template("model", tokenizer)
    margins = []
    for line in Path(data_file).read_text(encoding="utf-8").splitlines()[:limit]:
        row = convert(json.loads(line), "preference")
        pair = render_preference(row["prompt"], row["chosen"], row["rejected"], row["tools"], tokenizer, template)
        scores = []
        for completion in (pair.chosen_input_ids, pair.rejected_input_ids):
            ids = torch.tensor([pair.prompt_input_ids + completion])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            start = len(pair.prompt_input_ids) - 1
            scores.append(logp[start:].gather(1, targets[start:, None]).sum().item())
        margins.append(scores[0] - scores[1])
    return {
        "pairs": len(margins),
        "mean_margin": sum(margins) / max(len(margins), 1),
        "chosen_preferred": sum(m > 0 for m in margins) / max(len(margins), 1),
    }
