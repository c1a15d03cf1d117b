"""The adapter sidecar ``qwentune_train.json``: its one writer (training and `merge_adapter` both use it) and reader.

Beside ``adapter_config.json``; every key optional, unknown top-level keys ignored by the reader::

    {"format": "qwentune-train", "version": 1,
     "quantization": {...} | null,          # QuantSpec.to_dict(); null: plain LoRA on a full-precision base
     "chat_template": "...",                # the template the training data was rendered with
     "model_card": {"data": ..., "recipe": ..., "metrics": {...}},
     "image_processor": {"min_pixels": ..., "max_pixels": ...},   # Qwen2-VL: written into the merged config
     ...}                                   # facts about the run (base, method, precision, template name)

`merge_adapter`'s arguments override the sidecar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from ..files import atomic_write_json
from ..model import QuantSpec

SIDECAR_NAME = "qwentune_train.json"
SIDECAR_FORMAT = "qwentune-train"


def read_train_sidecar(adapter_dir: str | Path) -> dict:
    """The validated ``qwentune_train.json`` beside an adapter, or ``{}`` when there is none."""
    path = Path(adapter_dir) / SIDECAR_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QwentuneError(f"not valid JSON: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise QwentuneError("expected a JSON object", where=str(path))
    out: dict[str, Any] = {}
    if data.get("quantization") is not None:
        out["quantization"] = QuantSpec.from_dict(data["quantization"], where=f"{path}: quantization")
    if data.get("chat_template") is not None:
        if not isinstance(data["chat_template"], str):
            raise QwentuneError("chat_template must be a string", where=str(path))
        out["chat_template"] = data["chat_template"]
    if data.get("image_processor") is not None:
        out["image_processor"] = image_processor_settings(data["image_processor"])
    if data.get("model_card") is not None:
        if not isinstance(data["model_card"], dict):
            raise QwentuneError("model_card must be an object", where=str(path))
        out["model_card"] = data["model_card"]
    return out


def write_train_sidecar(
    adapter_dir: str | Path,
    *,
    quantization: QuantSpec | dict | None = None,
    chat_template: str | None = None,
    model_card: dict | None = None,
    image_processor: dict | None = None,
    run_facts: dict | None = None,
) -> Path:
    """Write ``qwentune_train.json`` beside an adapter, atomically (see the module docstring for the format).
    `run_facts`: informational top-level keys (the trainer's base, method, precision, template name)."""
    data: dict[str, Any] = {"format": SIDECAR_FORMAT, "version": 1, **(run_facts or {})}
    data["quantization"] = QuantSpec.from_dict(quantization).to_dict() if quantization is not None else None
    data["chat_template"] = chat_template
    data["model_card"] = model_card
    data["image_processor"] = image_processor_settings(image_processor)
    path = Path(adapter_dir) / SIDECAR_NAME
    atomic_write_json(path, data)
    return path


def image_processor_settings(settings: dict | None) -> dict | None:
    """Checked image-processor settings, None values dropped (a recipe's unset min/max pixels)."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise QwentuneError(f"expected a dict, got {type(settings).__name__}", where="image_processor")
    out = {k: v for k, v in settings.items() if v is not None}
    for key in ("min_pixels", "max_pixels"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] <= 0):
            raise QwentuneError(f"{key} must be a positive integer, got {out[key]!r}", where="image_processor")
    if out.get("min_pixels", 0) > out.get("max_pixels", math.inf):
        raise QwentuneError(
            f"min_pixels {out['min_pixels']} > max_pixels {out['max_pixels']}", where="image_processor"
        )
    return out or None
