"""QLoRA keeps the frozen base in its compute dtype (model._prepare_for_adapter, not PEFT's blanket fp32 upcast):
embedding and norms stay bf16, LoRA and token-row parameters are fp32, and loss, LoRA gradients and a few steps on
a fixed batch match the fp32-upcast path within bf16 tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from recipe_models import base_from_recipe
from tiny_models import tiny_model_dir, tiny_training
from transformers import TrainerCallback

import qwentune
from qwentune.model.loading import add_adapter, lora_config
from qwentune.model.quantspec import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096  # a small vocabulary keeps 2 × 9 CPU steps quick; the rows below stand in for <tool_call>-like ids
TC, ETC, IMS, IM_END = 4001, 4002, 4003, 4004
IDS = torch.tensor([[IMS, 771, 198, TC, 491, ETC, IM_END, 11, 42, 7], [IMS, 872, TC, 13, 42, ETC, 1, 2, IM_END, 5]])
LABELS = torch.tensor(
    [[-100, -100, -100, TC, 491, ETC, IM_END, 11, 42, 7], [-100, -100, TC, 13, 42, ETC, 1, 2, -100, 5]]
)


def qlora(model_dir: Path, upcast: bool):
    """The tiny model as QLoRA with rows for <tool_call>/</tool_call>: qwentune's preparation, or PEFT's
    `prepare_model_for_kbit_training` (everything not 4-bit upcast to fp32, as before)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    recipe = qwentune.load_recipe(
        {
            "model": {"source": str(model_dir)},
            "data": {"train": [str(ROOT / "data/tool_calls.jsonl")]},
            "peft": {"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"gradient_checkpointing": False, "precision": "fp32"},
        }
    )
    base = base_from_recipe(recipe, model_dir)
    torch.manual_seed(0)  # LoRA A's init
    if upcast:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = get_peft_model(base, lora_config(recipe.peft, base, [TC, ETC]))
    else:
        model = add_adapter(
            recipe.peft, base, [TC, ETC], quant=QuantSpec.for_peft(recipe.peft), gradient_checkpointing=False
        )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B off zero, so every LoRA gradient is non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def loss_and_grads(model):
    model.zero_grad()
    loss = model(input_ids=IDS, labels=LABELS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_weights_stay_in_compute_dtype_and_match_the_upcast_path(tmp_path):
    model_dir = tiny_model_dir(tmp_path, vocab_size=VOCAB)
    lean, upcast = qlora(model_dir, upcast=False), qlora(model_dir, upcast=True)
    embed = lean.get_input_embeddings().token_adapter.base_layer.weight
    assert embed.dtype == torch.bfloat16 and not embed.requires_grad
    assert upcast.get_input_embeddings().token_adapter.base_layer.weight.dtype == torch.float32  # what PEFT does
    norms = [p for n, p in lean.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in norms)
    trainable = {n: p for n, p in lean.named_parameters() if p.requires_grad}
    assert any("trainable_tokens" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values()), {n: p.dtype for n, p in trainable.items()}

    loss, grads = loss_and_grads(lean)
    ref_loss, ref_grads = loss_and_grads(upcast)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # bf16 tolerance: the gradient agrees in direction and size
        g, r = grads[name].flatten(), ref_grads[name].flatten()
        assert torch.cosine_similarity(g, r, dim=0) > 0.99, name
        assert abs(g.norm() / r.norm() - 1) < 0.05, name

    # the same convergence on a fixed batch
    curves = []
    for model in (lean, upcast):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        curve = []
        for _ in range(8):
            optimizer.zero_grad()
            step_loss = model(input_ids=IDS, labels=LABELS).loss
            step_loss.backward()
            optimizer.step()
            curve.append(float(step_loss))
        curves.append(curve)
    (lean_curve, upcast_curve) = curves
    assert lean_curve[-1] < lean_curve[0] - 0.5, lean_curve
    drop, ref_drop = lean_curve[0] - lean_curve[-1], upcast_curve[0] - upcast_curve[-1]
    assert abs(drop / ref_drop - 1) < 0.05, (lean_curve, upcast_curve)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_the_trainer_keeps_lora_and_its_optimizer_state_in_fp32(tmp_path, method):
    """TRL 1.16 casts a quantized model's trainable parameters to bf16 when it builds the trainer; qwentune casts
    them back (model.keep_trainables_in_fp32), so LoRA, the token rows and AdamW's state train in fp32."""
    data = "data/tool_calls.jsonl" if method == "sft" else "data/preferences.jsonl"
    run = qwentune.setup(
        {
            "model": {"source": str(tiny_model_dir(tmp_path))},
            "method": method,
            "data": {"train": [str(ROOT / data)], "limit": 4, "max_length": 1024},
            "peft": {"method": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": tiny_training(max_steps=1, precision="bf16", per_device_batch_size=1),
            "output": {"dir": str(tmp_path / "run"), "merge": False, "sample_tokens": 0},
        }
    )
    trainable = {n: p for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    frozen_bf16 = [n for n, p in run.trainer.model.named_parameters() if "norm" in n and p.dtype == torch.bfloat16]
    assert any("lora_A" in n for n in trainable) and frozen_bf16  # the base stays in its compute dtype
    assert {p.dtype for p in trainable.values()} == {torch.float32}, {n: p.dtype for n, p in trainable.items()}
    seen: list = []

    class OptimizerStates(TrainerCallback):  # read at the end of training: the run lets go of them after the save
        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
            seen.extend(t.dtype for t in states)

    run.trainer.add_callback(OptimizerStates())
    run.train()
    assert seen and set(seen) == {torch.float32}
