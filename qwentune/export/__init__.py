"""Merge a LoRA / QLoRA adapter into its base and save a plain checkpoint (`qwentune merge`, end of training)."""

from .job import MODE_LORA, MODE_QLORA_DEQUANTIZED, MODE_QLORA_ORIGINAL, MergeResult
from .merge import merge_adapter, resolve_base
from .outdir import REPORT_NAME
from .parity import FP32_TOLERANCE, HALF_TOLERANCE_ABS, HALF_TOLERANCE_REL, default_tolerance
from .quant import QuantSpec
from .sidecar import SIDECAR_NAME, read_train_sidecar, write_train_sidecar

__all__ = [
    "FP32_TOLERANCE",
    "HALF_TOLERANCE_ABS",
    "HALF_TOLERANCE_REL",
    "MODE_LORA",
    "MODE_QLORA_DEQUANTIZED",
    "MODE_QLORA_ORIGINAL",
    "REPORT_NAME",
    "SIDECAR_NAME",
    "MergeResult",
    "QuantSpec",
    "default_tolerance",
    "merge_adapter",
    "read_train_sidecar",
    "resolve_base",
    "write_train_sidecar",
]
