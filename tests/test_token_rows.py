"""Trainable token rows as a small delta (qwentune/patches/token_rows.py, patches.lean_token_rows) against PEFT's own
`trainable_token_indices` path: the same loss, per-token log-probs, rows' and LoRA gradients and merged weights, on
tied and untied tiny models, through TRL's fused head and the plain logits forward; and no vocabulary-sized copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model_dir
from transformers import AutoModelForCausalLM

import qwentune
from qwentune.model.loading import lora_config
from qwentune.patches import internals as patches

ROOT = Path(__file__).resolve().parents[1]
TC, ETC, IMS, IM_END = 151657, 151658, 151644, 151645
IDS = torch.tensor([[IMS, 77091, 198, TC, 4913, ETC, IM_END, 11, TC], [IMS, 872, TC, 13, 42, ETC, 1, 2, IM_END]])
LABELS = torch.tensor([[-100, -100, -100, TC, 4913, ETC, IM_END, 11, TC], [-100, -100, TC, 13, -100, ETC, 1, 2, -100]])


def token_row_model(tmp_path: Path, name: str):
    """A tiny PEFT LoRA model with trainable rows for <tool_call>, </tool_call>, TRL's fused head added as the
    trainers add it, the rows and LoRA B moved off their start so every term is exercised."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path, name), dtype=torch.float32)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    recipe = qwentune.load_recipe(
        {"model": {"source": "x"}, "data": {"train": [str(ROOT / "data/tool_calls.jsonl")]}, "peft": {"dropout": 0.0}}
    )
    torch.manual_seed(0)  # LoRA A's init
    model = get_peft_model(base, lora_config(recipe.peft, base, [TC, ETC]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.requires_grad:
                size = 0.5 if "trainable_tokens" in pname else 0.05
                param.add_(torch.randn(param.shape, generator=generator) * size)
    return model


def run(model, fused: bool, lean: bool):
    """Loss, per-token log-probs and every trainable gradient of one forward/backward."""
    model.zero_grad()
    with patches.peft_output_bias(model) if not lean else patches.lean_token_rows(model):
        if fused:
            out = model(input_ids=IDS, labels=LABELS, fused_lm_head=True)
            per_token = out.log_probs
        else:
            out = model(input_ids=IDS, labels=LABELS)
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
            per_token = logp.gather(-1, LABELS[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * (LABELS[:, 1:] != -100)
        # a DPO-like objective too: per-token log-probs weighted, so each position's gradient is checked
        weights = torch.linspace(-1, 1, per_token.numel()).view_as(per_token)
        (out.loss + (per_token * weights).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), per_token.detach(), grads


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct", "qwen2.5-7b-instruct"])  # tied, untied
@pytest.mark.parametrize("fused", [True, False])
def test_lean_rows_equal_peft_trainable_tokens(tmp_path, name, fused):
    model = token_row_model(tmp_path, name)
    tied = model.get_output_embeddings().token_adapter.tied_adapter is not None
    assert tied == (name == "qwen2.5-0.5b-instruct")
    twin = token_row_model(tmp_path / "twin", name)  # built again: a deepcopy would share TRL's bound forward
    loss, per_token, grads = run(model, fused, lean=True)
    peft_loss, peft_per_token, peft_grads = run(twin, fused, lean=False)
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_token, peft_per_token, rtol=1e-5, atol=1e-5)
    assert grads.keys() == peft_grads.keys()
    rows = [n for n in grads if "trainable_tokens" in n]
    assert len(rows) == (1 if tied else 2)
    for n in grads:  # fp32 tolerance, relative to each gradient's largest entry (summation order differs)
        scale = float(peft_grads[n].abs().max())
        close = torch.testing.assert_close
        close(grads[n], peft_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")
    assert all(grads[n].abs().sum(1).gt(0).all() for n in rows)  # both rows of each matrix learn
    # one identical step, then PEFT's merge: the same merged embedding and head
    with torch.no_grad():
        for m, g in ((model, grads), (twin, peft_grads)):
            for n, p in m.named_parameters():
                if n in g:
                    p.sub_(0.1 * g[n])
    merged, peft_merged = model.merge_and_unload(), twin.merge_and_unload()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(merged.state_dict()[key], peft_merged.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_lean_rows_keep_no_vocabulary_sized_copy(tmp_path):
    """PEFT's path saves a (vocab × hidden) copy of the matrix for backward and computes a (vocab × hidden)
    gradient in TRL's fused head; the lean path saves nothing of that size but the frozen base weight itself."""
    model = token_row_model(tmp_path, "qwen2.5-7b-instruct")
    weights = {model.get_input_embeddings().token_adapter.base_layer.weight.data_ptr(),
               model.get_output_embeddings().token_adapter.base_layer.weight.data_ptr()}  # fmt: skip
    vocab_sized = model.get_output_embeddings().token_adapter.base_layer.weight.numel()

    def copies(lean: bool) -> int:
        found = []

        def pack(t):
            if t.numel() >= vocab_sized and t.data_ptr() not in weights:
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with patches.peft_output_bias(model) if not lean else patches.lean_token_rows(model):
                model(input_ids=IDS, labels=LABELS, fused_lm_head=True).loss.backward()
        return len(found)

    assert copies(lean=False) > 0  # the measure sees PEFT's copies
    assert copies(lean=True) == 0


def test_lean_rows_restore_peft_and_trl_on_exit(tmp_path):
    import trl.trainer.utils as trl_utils

    model = token_row_model(tmp_path, "qwen2.5-7b-instruct")
    head = model.get_output_embeddings()
    shipped = trl_utils._ChunkedLogProbFunction
    with pytest.raises(RuntimeError, match="boom"):
        with patches.lean_token_rows(model):
            assert head.weight is head.token_adapter.base_layer.weight and head.bias is None
            raise RuntimeError("boom")
    assert trl_utils._ChunkedLogProbFunction is shipped
    assert not hasattr(head, "bias") and "weight" not in head.__dict__
    assert all("forward_adapters" not in m.__dict__ for m in model.modules())


def test_lean_rows_follow_disabled_adapter(tmp_path):
    """The DPO reference is the model with its adapter disabled: base rows, as PEFT gives them."""
    model = token_row_model(tmp_path, "qwen2.5-0.5b-instruct")
    with torch.no_grad(), model.disable_adapter():
        peft_base = model(input_ids=IDS, labels=LABELS).loss
        with patches.lean_token_rows(model):
            fused = model(input_ids=IDS, labels=LABELS, fused_lm_head=True).loss
            plain = model(input_ids=IDS, labels=LABELS).loss
    torch.testing.assert_close(fused, peft_base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, peft_base, rtol=1e-5, atol=1e-5)
