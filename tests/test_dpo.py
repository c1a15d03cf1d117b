"""DPO end to end on tiny models: the loss at step 0, learning on a fixed batch, which model the reference really
is (base, continued adapter, explicit model), QLoRA with merge, recipe checks and preprocess."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_models import shared_tokenizer, tiny_model_dir, tiny_training
from transformers import AutoModelForCausalLM

import qwentune
import qwentune.patches.internals
from qwentune import cli
from qwentune.rows.formats import convert
from qwentune.rows.render import render_preference
from qwentune.rows.template import load_template
from qwentune.training.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data/preferences.jsonl"
IM_END = 151645
LN2 = math.log(2)

pytestmark = pytest.mark.slow


def dpo_recipe(model_dir: Path, out: Path, **sections) -> dict:
    """The first 4 bundled pairs at max_length 128: 3 short pairs kept, 1 (a tools prompt) counted as too long."""
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(PAIRS)], "limit": 4, "max_length": 128},
        "method": "dpo",
        "dpo": {"beta": 0.1},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        # the 3 pairs are one fixed batch; eval_steps 1000: no evaluation during training (eval_before/after only)
        "training": tiny_training(max_steps=1, per_device_batch_size=3, eval_steps=1000),
        "output": {"dir": str(out), "merge": False, "sample_tokens": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def untrained_im_end_model(tmp_path: Path, **kwargs) -> Path:
    """A tiny model whose <|im_end|> row is 10× too short: the token check flags it, so its row becomes trainable
    (PEFT trainable tokens) — the case where TRL's reference copy goes wrong."""
    model_dir = tiny_model_dir(tmp_path, **kwargs)
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    for key in state:
        if "embed_tokens" in key or "lm_head" in key:
            state[key][IM_END] *= 0.1
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


@pytest.fixture
def reference_probe(monkeypatch):
    """Wraps qwentune's DPO trainer so that, on the fixed batch of the first train pairs, the reference log-probs
    (TRL's own `compute_ref_log_probs`: adapter disabled, "ref" adapter or ref_model) are taken just before and
    just after training."""
    seen: dict = {}
    make = qwentune.patches.internals.pretokenized_dpo_trainer

    def probing():
        class Probing(make()):
            def train(self, *args, **kwargs):
                batch = self.data_collator([self.train_dataset[i] for i in range(len(self.train_dataset))])
                seen["batch"] = batch
                seen["adapters"] = list(self.model.peft_config)
                reference = self.ref_model or self.model  # as TRL picks it when precomputing
                seen["before"] = torch.cat(self.compute_ref_log_probs(reference, batch))
                out = super().train(*args, **kwargs)
                seen["after"] = torch.cat(self.compute_ref_log_probs(reference, batch))
                return out

        return Probing

    monkeypatch.setattr(qwentune.patches.internals, "pretokenized_dpo_trainer", probing)
    return seen


@torch.no_grad()
def completion_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs of the collated [chosen..., rejected...] rows, with plain full logits."""
    ids, mask = batch["input_ids"], batch["completion_mask"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(1)


def load(model_dir: Path, adapter: Path | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_step0_is_ln2_margins_grow_and_the_reference_is_the_frozen_base(tmp_path, reference_probe):
    model_dir = untrained_im_end_model(tmp_path)
    recipe = dpo_recipe(
        model_dir,
        tmp_path / "run",
        data={"eval": [str(PAIRS)]},  # the same 3 pairs: eval before / after on the trained batch
        training={"max_steps": 5, "learning_rate": 1e-2},
    )
    result = qwentune.train(recipe)
    m = result.metrics
    assert m["trainable_tokens"]["made_trainable"] == [IM_END]  # trainable tokens are on in this run
    assert reference_probe["adapters"] == ["default"]  # TRL's "ref" copy of the fresh adapter was dropped

    # 1. zero-initialised adapter: policy == reference, so the sigmoid loss is ln 2 and every reward is 0 (a tie
    #    counts as accuracy 0 in TRL)
    assert m["eval_before"]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert m["eval_before"]["rewards/margins"] == 0 and m["eval_before"]["rewards/accuracies"] == 0
    steps = [r for r in log_rows(result.run_dir) if "rewards/margins" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in steps), key
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-6) and steps[0]["rewards/margins"] == 0

    # 2. a few steps on the fixed batch: margins grow, loss falls, chosen wins on every pair
    margins = [r["rewards/margins"] for r in steps]
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert steps[-1]["loss"] < LN2 - 0.01 and steps[-1]["rewards/accuracies"] == 1.0
    after = m["eval_after"]
    assert set(after) >= {"loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"}
    assert after["rewards/accuracies"] == 1.0 and after["rewards/margins"] > margins[-1] and after["loss"] < LN2
    evals = [r for r in log_rows(result.run_dir) if "eval_rewards/margins" in r]
    assert [r["step"] for r in evals] == [0, 5]
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["eval_before"] == m["eval_before"] and saved["eval_after"] == after

    # 3. the reference is the adapter-disabled model: unmoved by training and equal to the base model
    base = completion_logps(load(model_dir), reference_probe["batch"])
    torch.testing.assert_close(reference_probe["before"], reference_probe["after"], rtol=0, atol=0)
    torch.testing.assert_close(reference_probe["before"], base, rtol=1e-5, atol=1e-4)
    # ... and so is the reference TRL logged at every step: logps − rewards / beta (means over the batch)
    n = len(base) // 2
    for r in steps:
        assert r["logps/chosen"] - r["rewards/chosen"] / 0.1 == pytest.approx(base[:n].mean().item(), abs=1e-3)
        assert r["logps/rejected"] - r["rewards/rejected"] / 0.1 == pytest.approx(base[n:].mean().item(), abs=1e-3)
    # the policy did move away from it
    trained = completion_logps(load(model_dir, result.adapter_dir), reference_probe["batch"])
    assert (trained - base).abs().max() > 1e-2

    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report[0]["kept"] == 3 and report[0]["skipped"] == {"prompt_over_length": 1}


def test_qlora_dpo_on_cpu_with_precomputed_reference_and_rpo_loss_merges(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = dpo_recipe(
        model_dir,
        tmp_path / "run",
        dpo={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "precompute_ref_log_probs": True},
        peft={"method": "qlora", "quant": {"compute_dtype": "float32"}},
        training={"max_steps": 2, "learning_rate": 1e-2},
        output={"merge": True},
    )
    result = qwentune.train(recipe)
    steps = [r for r in log_rows(result.run_dir) if "rewards/margins" in r]
    # precomputed reference log-probs == the policy at step 0: rewards 0; the loss is ln 2 + 0.5 × the SFT NLL
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["rewards/margins"] == 0
    assert steps[0]["loss"] > LN2 + 1  # a random 151,936-way head: the chosen NLL is ~12 per token
    assert steps[1]["rewards/margins"] != 0
    sidecar = json.loads((result.adapter_dir / "qwentune_train.json").read_text())
    assert sidecar["method"] == "dpo" and sidecar["quantization"]["quant_type"] == "nf4"
    merge = result.metrics["merge"]
    assert merge["mode"] == "qlora-dequantized" and merge["max_abs_diff"] <= merge["tolerance"]
    AutoModelForCausalLM.from_pretrained(result.merged_dir)  # plain transformers loads it
    assert result.metrics["dpo"]["precompute_ref_log_probs"] is True


def test_4bit_layers_stay_differentiable_after_an_evaluation(tmp_path):
    """bitsandbytes repacks a 4-bit weight for a CPU bf16 kernel without autograd at its first eval-mode forward
    without grad (on AVX512-BF16 CPUs), then trains through it; qwentune keeps the differentiable path."""
    import bitsandbytes as bnb
    from recipe_models import base_from_recipe

    from qwentune.recipe.load import load_recipe

    model_dir = tiny_model_dir(tmp_path)
    recipe = load_recipe(dpo_recipe(model_dir, tmp_path / "run", peft={"method": "qlora"}))
    model = base_from_recipe(recipe, model_dir).eval()
    with torch.no_grad():
        model(torch.tensor([[151644, 872, 198, 9707, 151645]]))  # what an eval before training does
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    layer = layers[0].train()
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(x.grad.float(), weight.sum(0).expand(2, -1), rtol=2e-2, atol=2e-2)


def test_dpo_continues_an_sft_adapter_against_a_frozen_copy_of_it(tmp_path, reference_probe):
    model_dir = untrained_im_end_model(tmp_path)
    sft = qwentune.train(
        dpo_recipe(
            model_dir,
            tmp_path / "sft",
            method="sft",
            data={"train": [str(ROOT / "data/instructions.jsonl")], "limit": 2},
            training={"per_device_batch_size": 2, "learning_rate": 1e-2},
        )
    )
    assert sft.metrics["trainable_tokens"]["made_trainable"] == [IM_END] and sft.merged_dir is None

    recipe = dpo_recipe(
        model_dir,
        tmp_path / "dpo",
        model={"adapter": str(sft.adapter_dir)},
        training={"learning_rate": 1e-2},
        output={"merge": True},
    )
    result = qwentune.train(recipe)
    assert reference_probe["adapters"] == ["default", "ref"]
    # TRL's frozen "ref" copy is the SFT adapter, trainable token rows included: policy == reference at step 0
    steps = [r for r in log_rows(result.run_dir) if "rewards/margins" in r]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-6) and steps[0]["rewards/margins"] == 0
    sft_logps = completion_logps(load(model_dir, sft.adapter_dir), reference_probe["batch"])
    base_logps = completion_logps(load(model_dir), reference_probe["batch"])
    torch.testing.assert_close(reference_probe["before"], reference_probe["after"], rtol=0, atol=0)
    torch.testing.assert_close(reference_probe["before"], sft_logps, rtol=1e-5, atol=1e-4)
    assert (sft_logps - base_logps).abs().max() > 1e-2  # SFT did move the model: the check can tell them apart

    # only the trained adapter is saved (no "ref" copy), and the merged DPO model loads and differs from SFT
    assert not (result.adapter_dir / "ref").exists()
    assert result.metrics["merge"]["max_abs_diff"] <= result.metrics["merge"]["tolerance"]
    merged = completion_logps(load(result.merged_dir), reference_probe["batch"])
    assert (merged - sft_logps).abs().max() > 1e-3


def test_explicit_reference_model(tmp_path, reference_probe):
    model_dir = tiny_model_dir(tmp_path / "policy")
    other = tiny_model_dir(tmp_path / "reference", seed=1)
    result = qwentune.train(dpo_recipe(model_dir, tmp_path / "run", dpo={"reference": str(other)}))
    assert reference_probe["adapters"] == ["default"]
    torch.testing.assert_close(
        reference_probe["before"], completion_logps(load(other), reference_probe["batch"]), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(reference_probe["before"], reference_probe["after"], rtol=0, atol=0)
    assert result.metrics["dpo"]["reference"] == f"the model {other}"


def test_bad_dpo_keys_fail_up_front_and_validate_lists_the_loss(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path)
    with pytest.raises(qwentune.QwentuneError, match=r"'dpo.loss_type' has 'sigmod'.*did you mean 'sigmoid'"):
        qwentune.train(dpo_recipe(model_dir, tmp_path / "a", dpo={"loss_type": ["sigmod"]}))
    with pytest.raises(qwentune.QwentuneError, match=r"'dpo.rpo_alpha'.*removed.*loss_type: \[sigmoid, sft\]"):
        qwentune.train(dpo_recipe(model_dir, tmp_path / "b", dpo={"rpo_alpha": 1.0}))
    with pytest.raises(qwentune.QwentuneError, match=r"'model.adapter' is not a PEFT adapter dir"):
        qwentune.train(dpo_recipe(model_dir, tmp_path / "c", model={"adapter": str(tmp_path)}))
    assert not (tmp_path / "a").exists()  # refused before the run dir was made

    lines = validate_recipe(ROOT / "recipes/qwen2.5-0.5b-instruct/dpo_lora.yaml")
    assert lines[0].endswith("ok") and any("dpo: loss sigmoid, beta 0.1" in line for line in lines), lines
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dpo_recipe(model_dir, tmp_path / "d", dpo={"loss_type": ["sigmod"]})))
    assert cli.main(["validate", str(bad)]) == 2  # what `qwentune validate` runs, in process
    err = capsys.readouterr().err
    assert "dpo.loss_type" in err and "did you mean 'sigmoid'" in err


def test_preprocess_writes_the_exact_pair_ids(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump(dpo_recipe(model_dir, tmp_path / "run", data={"limit": None})))
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["preprocess", str(recipe), "-o", str(out), "--limit", "4"]) == 0  # `qwentune preprocess`
    err = capsys.readouterr().err
    assert "3 of 4 rows kept" in err and "prompt_over_length" in err and "wrote 3 rows" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}
    raw = convert(json.loads(PAIRS.read_text().splitlines()[0]), "preference")
    expected = render_preference(
        raw["prompt"],
        raw["chosen"],
        raw["rejected"],
        raw["tools"],
        shared_tokenizer(),
        load_template("qwen2.5-instruct"),
    )
    assert rows[0] == {
        "prompt_input_ids": expected.prompt_input_ids,
        "chosen_input_ids": expected.chosen_input_ids,
        "rejected_input_ids": expected.rejected_input_ids,
    }
    assert rows[0]["chosen_input_ids"][-1] == IM_END  # each completion ends at <|im_end|>, nothing after it
