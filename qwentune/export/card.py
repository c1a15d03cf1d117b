"""The merged model's card (README.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .job import MODE_LORA, MODE_QLORA_DEQUANTIZED, MODE_QLORA_ORIGINAL
from .quant import QuantSpec

_MODE_TEXT = {
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
    """README.md in `out_dir`: what was merged and how (`mode`, `spec`, `dtype`, `untied`), the parity result
    (`diff` is nan when skipped), then the caller's `card` sections (data, recipe, metrics, anything else)."""
    card = dict(card)
    lines = [
        "---",
        f"base_model: {base_name}",
        "library_name: transformers",
        f"tags: [qwentune, {'qlora' if spec else 'lora'}, merged]",
        "---",
        "",
        f"# {title}",
        "",
        f"Merged with qwentune: base `{base_name}` + LoRA adapter, saved as plain transformers safetensors.",
        "",
        f"- **Merge**: `{mode}` — {_MODE_TEXT[mode]}",
    ]
    if spec is not None:
        q = spec
        lines.append(
            f"- **Training quantization**: {q.bits}-bit {q.quant_type}, double quant {str(q.double_quant).lower()}, "
            f"compute {q.compute_dtype}"
        )
    lines.append(f"- **dtype**: {str(dtype).removeprefix('torch.')}")
    lines.append(
        "- **Embeddings**: "
        + (
            "untied deliberately (the adapter changed embed_tokens or lm_head); `tie_word_embeddings: false`"
            if untied
            else "as in the base"
        )
    )
    if math.isnan(diff):
        lines.append("- **Parity check**: skipped")
    else:
        lines.append(f"- **Parity check**: max |logit diff| vs base+adapter = {diff:.3g} (tolerance {tol:.3g})")
    for key, title in (("data", "Data"), ("recipe", "Recipe")):
        if card.get(key) is not None:
            lines += ["", f"## {title}", "", _card_value(card.pop(key))]
    metrics = card.pop("metrics", None)
    if metrics:
        lines += ["", "## Metrics", ""]
        if isinstance(metrics, dict):
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
        else:
            lines.append(_card_value(metrics))
    card.pop("data", None)
    card.pop("recipe", None)
    if card:
        lines += ["", "## Other", ""] + [f"- **{k}**: {_card_value(v)}" for k, v in card.items()]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def _card_value(value: Any) -> str:
    if isinstance(value, dict):
        return "\n".join(f"- {k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "\n".join(f"- {v}" for v in value)
    return str(value)
