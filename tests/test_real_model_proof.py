"""Proofs on the real offline Qwen2.5-Coder-0.5B-Instruct (CPU, ~15-25 minutes each): not in the default run.

    python -m pytest -m proof -s          # prints the numbers quoted in the issues' closing notes

Each trains a shipped recipe end to end through the CLI path (`qwentune.train`), then measures the MERGED model
loaded with plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qwentune
from qwentune.eval.evaluation import preference_margin, tool_call_accuracy

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes/qwen2.5-coder-0.5b-instruct-offline/sft_qlora_tools.yaml"
DPO_RECIPE = ROOT / "recipes/qwen2.5-coder-0.5b-instruct-offline/dpo_qlora.yaml"
HELD_OUT = 12

pytestmark = [pytest.mark.real_model, pytest.mark.proof, pytest.mark.slow]


def _report(name: str, data: dict) -> None:
    print(f"\n[proof] {name}: {json.dumps(data, indent=1, default=str)}")


@pytest.fixture(scope="module")
def base_accuracy(offline_model_dir):
    score = tool_call_accuracy(offline_model_dir, ROOT / "data/tool_calls_eval.jsonl", limit=HELD_OUT)
    _report("base model tool-call accuracy", score.to_dict())
    return score


def _train_tools(tmp_path: Path, fix: str) -> qwentune.TrainResult:
    overrides = [
        f"output.dir={tmp_path / ('run-' + fix)}",
        f"peft.train_new_tokens={fix}",
        "data.eval_limit=8",
        "eval.enabled=false",  # scored below with tool_call_accuracy instead
    ]
    return qwentune.train(SFT_RECIPE, overrides)


def test_sft_teaches_real_tool_calls(tmp_path, base_accuracy):
    result = _train_tools(tmp_path, "auto")
    m = result.metrics
    assert m["trainable_tokens"]["made_trainable"] == [151657, 151658]  # <tool_call>, </tool_call>
    after = tool_call_accuracy(result.merged_dir, ROOT / "data/tool_calls_eval.jsonl", limit=HELD_OUT)
    _report("sft (train_new_tokens=auto)", {
        "eval_loss_before": m.get("eval_loss_before"), "eval_loss_after": m.get("eval_loss_after"),
        "accuracy_before": base_accuracy.to_dict(), "accuracy_after": after.to_dict(), "merge": m["merge"],
    })  # fmt: skip
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert after.tagged > base_accuracy.tagged
    assert after.correct > base_accuracy.correct


def test_without_the_token_fix_the_model_does_not_emit_tool_call_tags(tmp_path, base_accuracy):
    result = _train_tools(tmp_path, "off")
    after = tool_call_accuracy(result.merged_dir, ROOT / "data/tool_calls_eval.jsonl", limit=HELD_OUT)
    _report("sft (train_new_tokens=off)", {"eval_loss_after": result.metrics.get("eval_loss_after"),
                                           "accuracy_after": after.to_dict()})  # fmt: skip
    assert after.correct <= base_accuracy.correct + 1


def test_dpo_raises_preference_for_chosen(tmp_path, offline_model_dir):
    before = preference_margin(offline_model_dir, ROOT / "data/preferences_eval.jsonl")
    result = qwentune.train(DPO_RECIPE, [f"output.dir={tmp_path / 'dpo'}"])
    after = preference_margin(result.merged_dir, ROOT / "data/preferences_eval.jsonl")
    m = result.metrics
    _report("dpo", {"eval_before": m.get("eval_before"), "eval_after": m.get("eval_after"),
                    "logp_margin_before": before, "logp_margin_after": after, "merge": m["merge"]})  # fmt: skip
    assert after["mean_margin"] > before["mean_margin"]
