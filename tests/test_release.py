"""A run lets go of training's memory once the adapter is saved (issue 26.6): the merge, the sample and the eval
that follow must not run on top of the trained model, its optimizer states and gradients. Fails when a Trainer,
TRL or accelerate release adds a reference that `patches.release_trainer` does not drop."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model_dir, tiny_training
from transformers import TrainerCallback

import qwentune

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_the_model_and_its_optimizer_are_gone_when_the_merge_starts(tmp_path, method, monkeypatch):
    data = "data/tool_calls.jsonl" if method == "sft" else "data/preferences.jsonl"
    run = qwentune.setup(
        {
            "model": {"source": str(tiny_model_dir(tmp_path))},
            "method": method,
            "data": {"train": [str(ROOT / data)], "limit": 2, "max_length": 1024},
            "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": tiny_training(max_steps=1, per_device_batch_size=1),
            "output": {"dir": str(tmp_path / "run"), "merge": True, "sample_tokens": 0},
        }
    )
    held: dict[str, weakref.ref] = {"model": weakref.ref(run.trainer.model)}

    class Watch(TrainerCallback):  # the optimizer's state tensors and a LoRA gradient exist only once it trained
        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            held["optimizer"] = weakref.ref(optimizer)
            states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
            held["state"] = weakref.ref(states[0])

    run.trainer.add_callback(Watch())
    alive_at_merge: dict[str, bool] = {}
    from qwentune.training import steps

    real_merge = steps.merge_adapter

    def merge_adapter(*args, **kwargs):  # the real merge, after looking at what is still reachable
        gc.collect()
        alive_at_merge.update({name: ref() is not None for name, ref in held.items()})
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(steps, "merge_adapter", merge_adapter)
    result = run.train()
    assert result.merged_dir is not None and (result.merged_dir / "config.json").is_file()
    assert alive_at_merge == {"model": False, "optimizer": False, "state": False}
    assert run.model is None and run.trainer.model is None
