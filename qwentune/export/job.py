"""One merge job: its settings, its result and the merge modes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import QwentuneError
from ..model import QuantSpec

MODE_LORA = "lora"
MODE_QLORA_DEQUANTIZED = "qlora-dequantized"
MODE_QLORA_ORIGINAL = "qlora-original-base"


@dataclass
class MergeResult:
    output_dir: Path
    mode: str  # "lora" | "qlora-dequantized" | "qlora-original-base"
    max_abs_diff: float  # parity: merged logits vs base+adapter (nan when check_parity=False)
    tolerance: float
    untied: bool  # whether tied embeddings were untied deliberately


@dataclass
class MergeJob:
    adapter_dir: Path | None
    base_dir: Path | None
    base_name: str
    mode: str
    spec: QuantSpec | None
    parity_rows: list[list[int]] | None
    chat_template: str | None
    tokenizer_source: Path | None
    eos_ids: list[int] | None
    card: dict
    tolerance: float | None
    parity: bool
    streaming: bool
    report: dict = field(default_factory=dict)
    parity_dtype: torch.dtype = torch.float32
    adapter_label: str | None = None
    image_processor: dict | None = None  # settings written into the merged image-processor config
    parity_image: dict | None = None  # Qwen2-VL: one synthetic image row for the parity check


def check_qlora_merge(qlora_merge: str) -> None:
    if qlora_merge not in ("dequantized", "original"):
        raise QwentuneError(
            f"qlora_merge={qlora_merge!r}",
            where="qlora_merge",
            hint="'dequantized' (the model as trained) or 'original' (onto the full-precision base)",
        )


def mode_for(spec: QuantSpec | None, qlora_merge: str) -> str:
    if spec is None:
        return MODE_LORA
    return MODE_QLORA_DEQUANTIZED if qlora_merge == "dequantized" else MODE_QLORA_ORIGINAL
