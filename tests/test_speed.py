"""Every speed lever leaves the loss and the gradients unchanged."""

from __future__ import annotations

import contextlib

import torch
from tiny_models import tiny_model_dir
from transformers import AutoModelForCausalLM


def _loss_and_grads(model_dir, compact: bool):
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from qwentune.patches import internals as patches

    with patches.compact_head_on_cpu() if compact else contextlib.nullcontext():  # restored after the block
        assert trl_utils._use_triton(torch.device("cpu")) is compact
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        add_fused_lm_head(model)
        ids = torch.randint(0, 151000, (2, 24))
        labels = ids.clone()
        labels[:, :16] = -100  # a masked prompt, like chat data
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_scoring_only_trained_positions_keeps_loss_and_gradients(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    loss_full, grads_full = _loss_and_grads(model_dir, False)
    loss_compact, grads_compact = _loss_and_grads(model_dir, True)
    torch.testing.assert_close(loss_compact, loss_full, rtol=1e-6, atol=1e-6)
    assert grads_full.keys() == grads_compact.keys() and grads_full
    for name in grads_full:
        torch.testing.assert_close(grads_compact[name], grads_full[name], rtol=1e-5, atol=1e-6)
