"""The merged model's card (README.md), from what the merge knows, through the one card builder (`qwentune.card`).
A training run later rewrites it from the whole run dir (`card.card_for_run`), through the same builder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..card import CardInputs, build_card
from .job import MODE_LORA, MODE_QLORA_DEQUANTIZED, MODE_QLORA_ORIGINAL
from .quant import QuantSpec

MODE_TEXT = {
    MODE_LORA: "LoRA delta added in fp32 to the base weights",
    MODE_QLORA_DEQUANTIZED: "QLoRA: base quantized as in training (bitsandbytes 4-bit) and dequantized, LoRA delta "
    "added in fp32 — the merged model computes what was trained",
    MODE_QLORA_ORIGINAL: "QLoRA adapter merged onto the ORIGINAL full-precision base — differs from the trained "
    "(4-bit) model by the base's quantization error",
}


def write_card(
    out_dir: Path,
    *,
    title: str,
    base_name: str,
    mode: str,
    spec: QuantSpec | None,
    card: dict,
    dtype: torch.dtype,
    untied: bool,
    diff: float,
    tol: float,
) -> None:
    """README.md in `out_dir`. `card` holds what the caller knows (the sidecar's and `model_card=`): `base` as the
    user wrote it (else `base_name`), `method`, `peft`, `metrics`; `diff` is nan when the parity check was skipped."""
    card = dict(card)
    metrics = card.pop("metrics", None)
    base = str(card.pop("base", None) or base_name)
    method = str(card.pop("method", "sft"))
    peft = str(card.pop("peft", "qlora" if spec is not None else "lora"))
    settings: dict[str, Any] = {"merge": f"{mode}: {MODE_TEXT[mode]}", "dtype": str(dtype).removeprefix("torch.")}
    if spec is not None:
        settings["training quantization"] = (
            f"{spec.bits}-bit {spec.quant_type}, double quant {str(spec.double_quant).lower()}, "
            f"compute {spec.compute_dtype}"
        )
    for key, value in card.items():  # anything else the caller said (data, recipe, ...), in words
        if value is not None:
            settings[key] = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else value
    inputs = CardInputs(
        title=title,
        base=base,
        method=method,
        peft=peft,
        hyperparameters=settings,
        metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
        trainable_tokens=(metrics or {}).get("trainable_tokens") if isinstance(metrics, dict) else None,
        merge={"mode": mode, "max_abs_diff": None if math.isnan(diff) else diff, "tolerance": tol, "untied": untied},
    )
    (out_dir / "README.md").write_text(build_card(inputs), encoding="utf-8")
