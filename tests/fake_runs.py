"""A run dir as `qwentune train` leaves it, built in a second from a tiny model (no training): adapter/ (a PEFT
LoRA adapter with non-zero B, so it changes the logits, plus the training sidecar and the tokenizer), merged/ (a model
dir with a merge report naming machine paths, as export writes it), recipe.yaml, data_report.json, metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from tiny_models import template_text, tiny_model_dir

TOKEN_REPORT = {
    "measure": "flag a row if ...",
    "trained_special_tokens": [151657, 151645],
    "flagged": [151657],
    "made_trainable": [151657],
    "initialised_from_text": {"151657": [27, 14172, 13429, 29]},
    "rows": [
        {"token_id": 151657, "token": "<tool_call>", "matrix": "tied", "norm_ratio": 0.6, "near_rows": 3200,
         "flagged": True},
        {"token_id": 151645, "token": "<|im_end|>", "matrix": "tied", "norm_ratio": 1.0, "near_rows": 0,
         "flagged": False},
    ],
}  # fmt: skip


def make_adapter(base_dir: Path, out: Path, *, base_model: str) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))  # fmt: skip
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    sidecar = {"base_model": base_model, "base_path": str(base_dir), "method": "sft", "peft": "lora",
               "chat_template": template_text("qwen2.5-instruct"), "template": "qwen2.5-instruct"}  # fmt: skip
    (out / "qwentune_train.json").write_text(json.dumps(sidecar))
    return out


def make_run_dir(tmp_path: Path, *, merged: bool = True, source: str | None = None) -> Path:
    """`tmp_path/runs/tiny-sft-lora`. `source`: what the recipe says the base was (default: the tiny model's path)."""
    base = tiny_model_dir(tmp_path / "models")
    source = source or str(base)
    run = tmp_path / "runs" / "tiny-sft-lora"
    run.mkdir(parents=True)
    make_adapter(base, run / "adapter", base_model=source)
    if merged:
        shutil.copytree(base, run / "merged")
        report = {"mode": "lora", "max_abs_diff": 3e-7, "tolerance": 1e-3, "untied": False, "dtype": "float32",
                  "base": str(base), "adapter": str(run / "adapter")}  # fmt: skip
        (run / "merged" / "merge_report.json").write_text(json.dumps(report))
    data_file = tmp_path / "data" / "tools.jsonl"
    recipe = {
        "model": {"source": source},
        "data": {"train": [str(data_file)], "eval": ["data/tool_calls_eval.jsonl"], "template": "qwen2.5-instruct",
                 "max_length": 512},
        "method": "sft",
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"learning_rate": 1e-3, "max_steps": 2, "epochs": 1.0, "lr_scheduler": "constant"},
        "output": {"dir": str(run), "push_to_hub": "me/tiny"},
    }  # fmt: skip
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    reports = [{"source": str(data_file), "detected_format": "messages", "total": 10, "kept": 8,
                "skipped": {"over_length": 1, "invalid_tool_json": 1}, "truncated": 0, "split": "train"}]  # fmt: skip
    (run / "data_report.json").write_text(json.dumps(reports))
    metrics = {"effective_batch": 2, "train_loss": 2.5, "eval_loss_before": 3.1, "eval_loss_after": 2.2,
               "global_step": 2, "trainable_tokens": TOKEN_REPORT}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run
