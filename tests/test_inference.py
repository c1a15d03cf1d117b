"""Opening what a user trained: run dir (merged, else adapter), adapter dir (base + PEFT, not merged), model dir,
and bad input as one-line errors."""

from __future__ import annotations

import pytest
import torch
from fake_runs import make_run_dir
from tiny_models import template_text

from qwentune.errors import QwentuneError
from qwentune.serve.inference import load_for_inference, resolve_trained


def test_run_dir_opens_merged_then_adapter(tmp_path):
    run = make_run_dir(tmp_path)
    merged = resolve_trained(run)
    assert merged.kind == "run-merged" and merged.model_path == run / "merged" and merged.adapter_path is None
    assert merged.template == template_text("qwen2.5-instruct")
    import shutil

    shutil.rmtree(run / "merged")
    adapter = resolve_trained(run)
    assert adapter.kind == "run-adapter" and adapter.adapter_path == run / "adapter"
    assert adapter.base == str(tmp_path / "models" / "tiny-qwen2.5-0.5b-instruct")
    assert adapter.model_path == tmp_path / "models" / "tiny-qwen2.5-0.5b-instruct"
    assert resolve_trained(run / "adapter").kind == "adapter"


def test_adapter_loads_unmerged_on_its_base_and_changes_the_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_run_dir(tmp_path, merged=False)
    model, tokenizer = load_for_inference(run)
    assert isinstance(model, PeftModel)
    assert tokenizer.chat_template == template_text("qwen2.5-instruct")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "tiny-qwen2.5-0.5b-instruct").eval()
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    with torch.no_grad():
        tuned, plain = model(input_ids=ids).logits, base(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert torch.equal(off, plain) and (tuned - plain).abs().max() > 1e-3


def test_bad_input_is_one_error_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QwentuneError, match="not a model"):
        resolve_trained(tmp_path / "empty")
    with pytest.raises(QwentuneError, match="does not exist"):
        resolve_trained(tmp_path / "missing")
    adapter = make_run_dir(tmp_path, merged=False) / "adapter"
    (adapter / "qwentune_train.json").write_text("{}")
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(QwentuneError, match="names no base model"):
        resolve_trained(adapter)
