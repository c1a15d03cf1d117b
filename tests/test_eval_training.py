"""`eval:` at the end of training: a tiny SFT run scores base and tuned on held-out tool-call rows, and the numbers
reach metrics.json, run_dir/eval.md and the merged model card; off, none of that exists; bad eval input stops the run
before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model_dir, tiny_training

import qwentune
from qwentune.errors import QwentuneError

ROOT = Path(__file__).resolve().parents[1]
TOOLS_EVAL = ROOT / "data" / "tool_calls_eval.jsonl"

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, *, eval_section: dict | None) -> Path:
    """A recipe file in tmp_path/recipe/ whose eval.data is relative to that dir (resolved like data.eval)."""
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir(exist_ok=True)
    (recipe_dir / "held_out.jsonl").write_text("".join(TOOLS_EVAL.read_text().splitlines(keepends=True)[:3]))
    model = tmp_path / "tiny-qwen2.5-0.5b-instruct"
    recipe = {
        "model": {"source": str(model if model.is_dir() else tiny_model_dir(tmp_path))},
        "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 4, "max_length": 256},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": tiny_training(max_steps=1),
        "output": {"dir": str(tmp_path / "run"), "sample_tokens": 0},
    }
    if eval_section is not None:
        recipe["eval"] = eval_section
    path = recipe_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sft_with_eval_on_writes_metrics_table_and_card(tmp_path):
    section = {"enabled": True, "data": ["held_out.jsonl"], "limit": 2, "max_new_tokens": 4, "batch_size": 2}
    result = qwentune.train(_recipe(tmp_path, eval_section=section))
    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())["eval"]
    assert metrics["data"] == [str(tmp_path / "recipe" / "held_out.jsonl")] and metrics["limit"] == 2
    assert set(metrics["metrics"]) == {"base", "tuned"}
    for model in ("base", "tuned"):  # held_out rows 1-2: one call, one no-call prompt; a random model calls nothing
        assert metrics["metrics"][model]["tool calls: exact"] == {"correct": 0, "total": 1}
        assert metrics["metrics"][model]["no call: refrained"]["total"] == 1
    assert metrics["summary"].startswith("tool calls on 1 held-out prompt: base 0/1 → tuned 0/1; no call on 1 held-")
    table = (run / "eval.md").read_text()
    assert table.startswith("## Evaluation") and "`held_out.jsonl`" in table and str(tmp_path) not in table
    assert "| tool calls: exact | 0/1 (0.0%) | 0/1 (0.0%) | +0.0 pt |" in table
    card = (result.merged_dir / "README.md").read_text()
    assert table.strip() in card
    rows = json.loads((run / "eval" / "eval.json").read_text())
    assert rows["models"] == ["base", "tuned"] and len(rows["rows"]["tuned"]) == 2


def test_sft_with_eval_off_writes_none_of_it(tmp_path):
    result = qwentune.train(_recipe(tmp_path, eval_section=None))
    run = result.run_dir
    assert "eval" not in json.loads((run / "metrics.json").read_text())
    assert not (run / "eval.md").exists() and not (run / "eval").exists()
    assert "## Evaluation" not in (result.merged_dir / "README.md").read_text()


def test_bad_eval_input_stops_before_training(tmp_path):
    with pytest.raises(QwentuneError, match="eval.enabled") as info:  # nothing to score: refused at load
        qwentune.load_recipe(_recipe(tmp_path, eval_section={"enabled": True}))
    assert "eval.data and data.eval are empty" in str(info.value)
    with pytest.raises(QwentuneError, match="eval.limit"):
        qwentune.load_recipe(_recipe(tmp_path, eval_section={"enabled": True, "data": ["held_out.jsonl"], "limit": 0}))
    missing = _recipe(tmp_path, eval_section={"enabled": True, "data": ["missing.jsonl"]})
    with pytest.raises(QwentuneError, match="cannot read the eval file"):
        qwentune.train(missing)
    assert not (tmp_path / "run" / "adapter").exists()
