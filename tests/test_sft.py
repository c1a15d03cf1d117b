"""SFT end to end on tiny models: real training steps, real merges, real effects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model_dir, tiny_training
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwentune
from qwentune.rows.render import render_conversation
from qwentune.rows.template import load_template

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def sft_recipe(model_dir: Path, out: Path, **sections) -> dict:
    """A small, deterministic SFT recipe on the bundled instruction data (short rows: the 151,936-row head is the
    cost on a tiny model)."""
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 8, "max_length": 256},
        "method": "sft",
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": tiny_training(grad_accum=2),
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_lora_sft_trains_adapter_merges_exactly_and_leaves_base_untouched(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    before = base_state(model_dir)
    result = qwentune.train(sft_recipe(model_dir, tmp_path / "run"))

    # base weights untouched on disk
    after = base_state(model_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # LoRA weights changed: B starts at zero, so any non-zero B was learned
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())
    targets = {k.split(".lora_B")[0].rsplit(".", 1)[-1] for k in lora_b}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear

    # run dir holds everything the issue lists
    run = result.run_dir
    for name in ("recipe.yaml", "versions.json", "data_report.json", "metrics.jsonl", "metrics.json", "loss.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "versions.json").read_text())["libraries"]["trl"]

    # merged == base + adapter, independently of the merge's own parity check
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), result.adapter_dir
    )
    ids = [151644, 872, 198, 9707, 1879, 151645, 198, 151644, 77091, 198]
    diff = (logits(merged, ids) - logits(reference, ids)).abs().max().item()
    assert diff < 1e-4
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert (logits(merged, ids) - logits(base, ids)).abs().max().item() > 1e-4  # the adapter did something
    assert result.metrics["merge"]["max_abs_diff"] < 1e-3

    # safetensors only, eos ids for generation, and the training template re-renders the data identically
    assert not list(result.merged_dir.glob("*.bin"))
    gen = json.loads((result.merged_dir / "generation_config.json").read_text())
    assert {151645, 151643} <= set(gen["eos_token_id"])
    tok = AutoTokenizer.from_pretrained(result.merged_dir)
    row = json.loads((ROOT / "data/instructions.jsonl").read_text().splitlines()[0])
    template = load_template("qwen2.5-instruct")
    rendered = render_conversation(row["messages"], None, tok, template)
    assert tok.apply_chat_template(row["messages"], tokenize=False) == rendered.text


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = sft_recipe(
        model_dir,
        tmp_path / "run",
        data={"limit": 4},
        training={"max_steps": 8, "per_device_batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3},
        output={"merge": False},
    )
    result = qwentune.train(recipe)
    losses = [
        r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.25, losses  # a random 151,936-way head starts at ln(V) ≈ 11.93
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert result.merged_dir is None


def test_batch_1_x_accumulation_4_equals_batch_4(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    adapters = []
    for batch, accum in ((4, 1), (1, 4)):
        recipe = sft_recipe(
            model_dir,
            tmp_path / f"run-{batch}x{accum}",
            data={"limit": 4},
            training={"max_steps": 1, "per_device_batch_size": batch, "grad_accum": accum, "optim": "sgd"},
            output={"merge": False},
        )
        result = qwentune.train(recipe)
        adapters.append(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    a, b = adapters
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_qlora_trains_on_cpu_and_merges_dequantized(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = sft_recipe(
        model_dir,
        tmp_path / "run",
        peft={"method": "qlora", "quant": {"compute_dtype": "float32"}},
        training={"max_steps": 2},
    )
    result = qwentune.train(recipe)
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    sidecar = json.loads((result.adapter_dir / "qwentune_train.json").read_text())
    assert sidecar["quantization"]["quant_type"] == "nf4"
    assert result.metrics["merge"]["mode"] == "qlora-dequantized"
    assert result.metrics["merge"]["max_abs_diff"] <= result.metrics["merge"]["tolerance"]
    AutoModelForCausalLM.from_pretrained(result.merged_dir)  # plain transformers loads it


def test_notebook_api_preview_then_train_in_process(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = qwentune.load_recipe(sft_recipe(model_dir, tmp_path / "run"), ["training.max_steps=1"])
    shown = qwentune.preview(recipe, rows=1, color=False)
    assert "[[" in shown and "<|im_end|>" in shown
    data = qwentune.prepare(recipe)
    assert len(data.train) == 8 and set(data.train.column_names) >= {"input_ids", "labels"}
    result = qwentune.train(recipe)
    assert result.adapter_dir.is_dir() and result.merged_dir.is_dir()
    assert result.metrics["global_step"] == 1


def test_finished_run_dir_is_not_overwritten(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = sft_recipe(model_dir, tmp_path / "run", training={"max_steps": 1}, output={"merge": False})
    qwentune.train(recipe)
    with pytest.raises(qwentune.QwentuneError, match="already holds a finished run"):
        qwentune.train(recipe)
