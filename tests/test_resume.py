"""Resume after preemption: SIGTERM finishes the step, saves a checkpoint and exits non-zero saying how to resume,
with nothing else after the checkpoint (no evaluation, merge or sample); `--resume` continues to exactly the adapter
an uninterrupted run ends with, and refuses a changed recipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_model_dir, tiny_training

from qwentune.recipe.load import load_recipe
from qwentune.training.resume import latest_checkpoint, recipe_changes

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def write_recipe(tmp_path: Path, model_dir: Path) -> Path:
    """Shuffled rows and LoRA dropout on purpose: the resumed run must restore the data order and the RNG too. An
    eval split (evaluated at the end of the epoch: it would fire right after a stop), merge and sample: all of which
    a stopped run must skip."""
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {
            "train": [str(ROOT / "data/instructions.jsonl")],
            "limit": 16,
            "max_length": 256,
            "eval": [str(ROOT / "data/instructions.jsonl")],
            "eval_limit": 4,
        },
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "train_new_tokens": "off"},
        "training": tiny_training(
            lr_scheduler="cosine", warmup_ratio=0.1, max_steps=10, per_device_batch_size=1, seed=3
        ),
        "output": {"merge": True, "sample_tokens": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "qwentune", "train", str(recipe), *args]


def steps(run_dir: Path, key: str = "loss") -> list[int]:
    """The steps of metrics.jsonl's rows that hold `key` (loss: training steps; eval_loss: evaluations)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if f'"{key}"' in line]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_ends_bitwise_equal(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir)
    whole, cut = tmp_path / "whole", tmp_path / "cut"

    done = subprocess.run(train(recipe, f"output.dir={whole}"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        train(recipe, f"output.dir={cut}"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not [s for s in steps(cut) if s >= 3] and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=600)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = max(steps(cut))
    assert 3 <= stopped < 10
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"stopped after step {stopped} (no evaluation, merge or sample)" in errors[0]
    assert f"checkpoint saved in {cut / 'checkpoints' / f'checkpoint-{stopped}'}" in errors[0]
    assert "--resume" in errors[0]
    assert latest_checkpoint(cut).name == f"checkpoint-{stopped}"
    # nothing after the checkpoint: the end-of-epoch evaluation did not run, nor the merge or the sample
    assert steps(cut, "eval_loss") == [0]  # the evaluation before training only
    assert not [p for p in ("adapter", "merged", "sample.txt", "metrics.json") if (cut / p).exists()]
    print(f"SIGTERM after step {stopped} → exit {proc.returncode} in {took:.2f} s")
    assert took < 30  # torchrun's window; one tiny step, a checkpoint and the interpreter's exit take ~1-2 s

    # a changed recipe is refused, naming what changed, before anything loads or is written
    recorded = (cut / "recipe.yaml").read_text()
    refused = subprocess.run(
        train(recipe, f"output.dir={cut}", "training.learning_rate=0.002", "--resume"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "training.learning_rate: 0.001 → 0.002" in refused.stderr
    assert (cut / "recipe.yaml").read_text() == recorded

    resumed = subprocess.run(
        train(recipe, f"output.dir={cut}", "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {cut / 'checkpoints' / f'checkpoint-{stopped}'}" in resumed.stderr
    assert steps(cut) == list(range(1, 11))  # every step logged once
    assert steps(cut, "eval_loss")[-2:] == [10, 10] == steps(whole, "eval_loss")[-2:]  # end of epoch, after training
    assert (cut / "merged").is_dir() and (cut / "sample.txt").read_text() == (whole / "sample.txt").read_text()

    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), [k for k in a if not (a[k] == b[k]).all()]

    finished = subprocess.run(
        train(recipe, f"output.dir={cut}", "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert finished.returncode == 2 and "nothing to resume" in finished.stderr


def test_recipe_changes_ignore_the_resume_keys(tmp_path):
    base = {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}, "data": {"train": "x.jsonl"}}
    first = load_recipe(base)
    again = load_recipe(base, ["training.resume=true", "output.overwrite=true", "output.dir=/moved/run"])
    from qwentune.recipe.load import dump_recipe

    assert recipe_changes(dump_recipe(first), again) == []
    changed = load_recipe(base, ["training.resume=true", "peft.r=8", "data.train=[y.jsonl]"])
    assert recipe_changes(dump_recipe(first), changed) == [
        "  data.train: ['x.jsonl'] → ['y.jsonl']",
        "  peft.r: 16 → 8",
    ]
