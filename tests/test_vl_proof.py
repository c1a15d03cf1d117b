"""Proof that the images reach the model in training (not in the default run; ~2-4 minutes on 2 CPU cores):

    python -m pytest -m proof -s tests/test_vl_proof.py

A tiny Qwen2-VL (real structure, random weights, frozen random vision tower) is LoRA-trained through `qwentune.train`
to name the colour of a picture. Its MERGED model, loaded with plain Qwen2VLForConditionalGeneration, must then
answer held-out pictures right with their own images and fall to chance with the images swapped: the answers come
from the pixels, through the collator's pixel inputs and the expanded pads, not from the text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import tiny_model_dir, tiny_training

import qwentune
from qwentune.model.vision import pixel_inputs

pytestmark = [pytest.mark.proof, pytest.mark.slow]

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_rows(folder: Path, split: str, n: int, rng: random.Random) -> Path:
    rows = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        rgb = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[name])
        path = f"pics/{split}{i}.png"
        Image.new("RGB", (56, 56), rgb).save(folder / path)
        question = [{"type": "image", "image": path}, {"type": "text", "text": "Colour?"}]
        answer = name.capitalize() + "."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    out = folder / f"{split}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_the_trained_model_reads_the_colour_from_the_image(tmp_path):
    (tmp_path / "pics").mkdir()
    rng = random.Random(0)
    train, held_out = colour_rows(tmp_path, "train", 64, rng), colour_rows(tmp_path, "eval", 32, rng)
    recipe = {
        "model": {"source": str(tiny_model_dir(tmp_path, "qwen2-vl-2b-instruct"))},
        "data": {"train": [str(train)], "eval": [str(held_out)], "max_length": 128},
        "method": "sft",
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": tiny_training(learning_rate=5e-3, max_steps=100, per_device_batch_size=8),
        "output": {"dir": str(tmp_path / "run"), "sample_tokens": 0},
    }
    result = qwentune.train(recipe)

    from transformers import Qwen2VLForConditionalGeneration

    merged = Qwen2VLForConditionalGeneration.from_pretrained(result.merged_dir).eval()
    rows = list(qwentune.prepare(recipe).eval)

    def accuracy(image_of: list[int]) -> float:
        right = 0
        for k, row in enumerate(rows):
            first = next(i for i, label in enumerate(row["labels"]) if label != -100)
            prompt = torch.tensor([row["input_ids"][:first]])
            pixels = pixel_inputs(result.merged_dir, prompt, rows[image_of[k]]["image_files"])
            with torch.no_grad():
                guess = merged(input_ids=prompt, **pixels).logits[0, -1].argmax().item()
            right += guess == row["input_ids"][first]
        return right / len(rows)

    own = accuracy(list(range(len(rows))))
    swapped = accuracy([(k + 1) % len(rows) for k in range(len(rows))])  # neighbours' pictures
    print(f"\n[proof] qwen2-vl colour: held-out accuracy {own:.2f} with own images, {swapped:.2f} swapped; eval loss "
          f"{result.metrics['eval_loss_before']:.3f} → {result.metrics['eval_loss_after']:.3f}")  # fmt: skip
    assert own >= 0.9
    assert swapped <= 0.5
