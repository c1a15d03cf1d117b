"""Whether a model sees images, and its image processor: loaded with the recipe's pixel limits, turned into the
`ImageSettings` that data/ renders rows with, pixel inputs for one prompt, and the training collator (checked to
agree with the settings the rows were rendered with).

Without torchvision (CPU machines: its PyPI wheels pull a CUDA torch) transformers cannot build `AutoProcessor` for
Qwen2-VL, but the image processor alone works through its Pillow fallback — that is all this module needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..rows import ImageSettings, VisionCollator, image_runs, opened_image, settings_of
from .shapes import is_vl


def _config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_vision_model(model_dir: Path) -> bool:
    return is_vl(_config(model_dir))


def load_image_processor(model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's image processor (Pillow backend where torchvision is missing), with the recipe's pixel limits."""
    from transformers import AutoImageProcessor

    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    return AutoImageProcessor.from_pretrained(model_dir, **kwargs)


def image_settings(
    model_dir: Path, tokenizer: Any, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> ImageSettings | None:
    """The settings for a Qwen2-VL model dir (model.min_pixels/max_pixels applied); None for text models."""
    if not is_vision_model(model_dir):
        return None
    processor = load_image_processor(model_dir, min_pixels, max_pixels)
    return settings_of(processor, tokenizer)


def pixel_inputs(model_dir: Path, input_ids: Any, images: Sequence[str]) -> dict:
    """pixel_values / image_grid_thw / mm_token_type_ids for `input_ids` (a [1, n] tensor) from the image processor
    saved in `model_dir`; only as many images as the ids have pad runs (a prompt cut before later images)."""
    import torch

    processor = load_image_processor(model_dir)
    pad_id = int(_config(model_dir).get("image_token_id", 151655))
    runs = image_runs(input_ids[0].tolist(), pad_id)
    out: dict[str, Any] = {"mm_token_type_ids": (input_ids == pad_id).long()}
    if runs:
        pixels = processor(images=[opened_image(ref) for ref in images[: len(runs)]], return_tensors="pt")
        out["pixel_values"] = pixels["pixel_values"]
        out["image_grid_thw"] = torch.as_tensor(pixels["image_grid_thw"])
    return out


def vision_collator(
    model_dir: Path, model: Any, tokenizer: Any, settings: ImageSettings, *, preference: bool = False
) -> VisionCollator:
    """TRL's padding collator on the pre-rendered ids, plus the pixel inputs (`model`: the ModelSection, whose pixel
    limits apply)."""
    if preference:
        from trl.trainer.dpo_trainer import DataCollatorForPreference as TextCollator
    else:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TextCollator

    processor = load_image_processor(model_dir, model.min_pixels, model.max_pixels)
    if settings_of(processor, tokenizer) != settings:
        raise ValueError("the image processor's settings differ from the ones the rows were rendered with")
    return VisionCollator(TextCollator(pad_token_id=tokenizer.pad_token_id), processor, settings)
