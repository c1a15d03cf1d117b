"""The notebook API end to end on tiny models: `qwentune.setup` hands out the configured TRL trainer (a callback
added there fires during training), holds the run dir and TRL's patches until `run.train()` / `run.close()`, takes
in-memory data, and the TrainResult loads and generates exactly as plain transformers does. SFT and DPO alike."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from test_patches import assert_same, trl_attributes
from tiny_models import tiny_model_dir, tiny_training
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import qwentune
from qwentune.training.rundir import RunDirLock

ROOT = Path(__file__).resolve().parents[1]
TOOLS = json.loads((ROOT / "data/tools.json").read_text(encoding="utf-8"))
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]

pytestmark = pytest.mark.slow


def rows(name: str, n: int) -> list[dict]:
    lines = (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def recipe(model_dir: Path, out: Path, method: str = "sft", **output) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "method": method,
        "data": {"max_length": 256 if method == "sft" else 128},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": tiny_training(max_steps=2 if method == "sft" else 1, per_device_batch_size=2),
        "output": {"dir": str(out), "sample_tokens": 0, **output},
    }


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def greedy(model, tokenizer, messages, tools=None, max_new_tokens: int = 6) -> str:
    """Plain transformers: the tokenizer's template, greedy generate, decoded without special tokens."""
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def lock_is_free(run_dir: Path) -> bool:
    try:
        RunDirLock(run_dir).acquire()._lock.release()
    except qwentune.QwentuneError:
        return False
    return True


def test_sft_setup_trainer_callback_in_memory_dataset_then_load_and_generate(tmp_path):
    from trl import SFTTrainer

    model_dir = tiny_model_dir(tmp_path)
    dataset = datasets.Dataset.from_list(rows("instructions.jsonl", 4))
    before = trl_attributes()
    run = qwentune.setup(recipe(model_dir, tmp_path / "run"), train_data=dataset)
    assert isinstance(run.trainer, SFTTrainer) and len(run.data.train) == 4 and run.run_dir == tmp_path / "run"
    assert run.tokenizer.chat_template == run.data.template.text
    with pytest.raises(qwentune.QwentuneError, match="in use"):  # the run dir is held from setup on
        qwentune.setup(recipe(model_dir, tmp_path / "run"), train_data=dataset)
    counter = CountSteps()
    run.trainer.add_callback(counter)
    result = run.train()

    assert counter.steps == result.metrics["global_step"] == 2
    assert_same(before, trl_attributes())  # the patches ended with train()
    assert run.closed and lock_is_free(run.run_dir)
    with pytest.raises(qwentune.QwentuneError, match="already trained"):
        run.train()
    assert f"<in-memory: Dataset 4 rows, fingerprint {dataset._fingerprint[:16]}>" in (
        run.run_dir / "recipe.yaml"
    ).read_text(encoding="utf-8")
    (report,) = json.loads((run.run_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["fingerprint"] == dataset._fingerprint and report["kept"] == 4

    model, tokenizer = result.load()
    assert result.load()[0] is model  # loaded once
    plain = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    for tools in (None, TOOLS):
        reply = result.generate(QUESTION, tools=tools, max_new_tokens=6)
        assert reply.text == greedy(plain, plain_tokenizer, QUESTION, tools)
        assert isinstance(reply.tool_calls, list)

    # qwentune.evaluate takes the result itself: the same rows and replies as its run dir
    eval_file = ROOT / "data/tool_calls_eval.jsonl"
    by_result = qwentune.evaluate(result, eval_file, limit=2, max_new_tokens=4, progress=False)
    by_dir = qwentune.evaluate(str(result.run_dir), eval_file, limit=2, max_new_tokens=4, progress=False)
    assert by_result.models == [str(result.run_dir)]
    assert by_result.rows[str(result.run_dir)] == by_dir.rows[str(result.run_dir)]
    assert len(by_dir.rows[str(result.run_dir)]) == 2


def test_dpo_setup_close_then_train_in_memory_pairs_and_generate_from_the_adapter(tmp_path):
    from peft import PeftModel
    from trl import DPOTrainer

    model_dir = tiny_model_dir(tmp_path)
    pairs = rows("preferences.jsonl", 3)
    r = recipe(model_dir, tmp_path / "run", "dpo", merge=False)
    before = trl_attributes()
    with qwentune.setup(r, train_data=pairs) as run:
        assert isinstance(run.trainer, DPOTrainer) and not lock_is_free(run.run_dir)
    assert run.closed and lock_is_free(run.run_dir)
    assert_same(before, trl_attributes())  # closed without training: patches undone too

    run = qwentune.setup(r, train_data=pairs)
    counter = CountSteps()
    run.trainer.add_callback(counter)
    result = run.train()
    assert counter.steps == result.metrics["global_step"] == 1
    assert_same(before, trl_attributes())
    assert result.merged_dir is None and result.adapter_dir.is_dir()

    model, _ = result.load()  # no merged model: the base with the adapter
    assert isinstance(model, PeftModel)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    assert result.generate(QUESTION, max_new_tokens=6).text == greedy(plain, plain_tokenizer, QUESTION)
