"""Packing (`sft.packing`: TRL's BFD bins, batched padding-free with per-row position_ids) trains on exactly the
losses of the unpacked rows: no attention across rows, no row's first token predicted from the previous row."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model_dir
from transformers import AutoModelForCausalLM

import qwentune
from qwentune.patches import internals as patches

ROOT = Path(__file__).resolve().parents[1]


def _rows(model_dir: Path, limit: int = 6) -> list[dict]:
    """Rendered and masked rows of the bundled data (tool calls and plain chat), as training sees them."""
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(ROOT / "data/tool_calls.jsonl"), str(ROOT / "data/instructions.jsonl")],
                 "limit": limit // 2, "max_length": 1024},
    }  # fmt: skip
    data = qwentune.prepare(recipe)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train]


@contextlib.contextmanager
def _head_as_training_runs_it_on_cpu():
    """TRL's fused head with the patches training enters (`patches.trl_for_sft` less its PEFT token-row patch, as
    these models have no adapter): only trained positions projected, qwentune's lean fold."""
    with patches.compact_head_on_cpu(), patches.lean_cpu_fold():
        yield


def _summed_nll(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Σ −log p over trained tokens through TRL's fused head as training runs it, and their count."""
    with _head_as_training_runs_it_on_cpu():
        out = model(**batch, fused_lm_head=True)
    return -out.log_probs.sum(), int(out.label_mask.sum())


@pytest.mark.slow
def test_packed_padding_free_batch_has_the_per_row_losses(tmp_path):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    model_dir = tiny_model_dir(tmp_path)
    rows = _rows(model_dir)
    assert len({len(r["input_ids"]) for r in rows}) > 1
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    add_fused_lm_head(model)

    with torch.no_grad():
        per_row = [_summed_nll(model, {k: torch.tensor([v]) for k, v in row.items()}) for row in rows]
        row_sum = sum(s for s, _ in per_row)
        row_tokens = sum(n for _, n in per_row)

        padded = DataCollatorForLanguageModeling(pad_token_id=151643)(rows)
        assert (padded["attention_mask"] == 0).any()  # there is padding to remove
        padded_sum, padded_tokens = _summed_nll(model, padded)

        from datasets import Dataset

        total = sum(len(r["input_ids"]) for r in rows)
        bins = pack_dataset(Dataset.from_list(rows), total, "bfd")  # every row in one bin: one attention window
        assert len(bins) == 1 and sorted(bins[0]["seq_lengths"]) == sorted(len(r["input_ids"]) for r in rows)
        packed = DataCollatorForLanguageModeling(pad_token_id=151643, padding_free=True)(list(bins))
        assert packed["input_ids"].shape == (1, total) and "attention_mask" not in packed
        packed_sum, packed_tokens = _summed_nll(model, packed)

        # the same flat row with positions running on across rows (what packing without position_ids would be)
        leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
        leaky_sum, _ = _summed_nll(model, leaky)

    assert packed_tokens == padded_tokens == row_tokens
    torch.testing.assert_close(padded_sum, row_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed_sum, row_sum, rtol=1e-5, atol=1e-4)
    assert abs(leaky_sum - row_sum) > 1e-2  # attention across rows would show


@pytest.mark.slow
def test_packed_padding_free_gradients_equal_unpacked(tmp_path):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    model_dir = tiny_model_dir(tmp_path)
    rows = _rows(model_dir, limit=4)
    from datasets import Dataset

    grads = []
    for packed in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        add_fused_lm_head(model)
        if packed:
            bins = pack_dataset(Dataset.from_list(rows), sum(len(r["input_ids"]) for r in rows), "bfd")
            batch = DataCollatorForLanguageModeling(pad_token_id=151643, padding_free=True)(list(bins))
        else:
            batch = DataCollatorForLanguageModeling(pad_token_id=151643)(rows)
        with _head_as_training_runs_it_on_cpu():
            model(**batch, fused_lm_head=True).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    unpacked, packed = grads
    assert unpacked.keys() == packed.keys() and unpacked
    for name in unpacked:
        torch.testing.assert_close(packed[name], unpacked[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sft_packing_trains_and_its_first_loss_is_the_unpacked_one(tmp_path):
    """`sft.packing: true` end to end (it needs TRL's max_length as the bin size): 4 rows in one bin vs the same 4
    rows as one padded batch — the first step's loss, taken before any update, is the same."""
    model_dir = tiny_model_dir(tmp_path)
    first = {}
    for packing in (False, True):
        recipe = {
            "model": {"source": str(model_dir)},
            "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 4, "max_length": 1024},
            "method": "sft",
            "sft": {"packing": packing},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"max_steps": 1, "per_device_batch_size": 4, "grad_accum": 1, "precision": "fp32",
                         "gradient_checkpointing": False, "shuffle": False, "logging_steps": 1, "seed": 0},
            "output": {"dir": str(tmp_path / f"run-{packing}"), "merge": False, "sample_tokens": 0},
        }  # fmt: skip
        result = qwentune.train(recipe)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        first[packing] = next(r["loss"] for r in rows if "loss" in r)
    assert first[True] == pytest.approx(first[False], rel=1e-5)
