"""Merge a LoRA / QLoRA adapter into its base and save a plain checkpoint (`qwentune merge`, end of training), and
the one model-card builder (`card`). Imports model/ and the bottom floor only.
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "card": ("CardInputs", "base_name", "build_card", "card_for_run", "public_path"),
        "job": ("MODE_LORA", "MODE_QLORA_DEQUANTIZED", "MODE_QLORA_ORIGINAL", "MergeResult"),
        "merge": ("merge_adapter", "resolve_base"),
        "outdir": ("REPORT_NAME",),
        "parity": ("FP32_TOLERANCE", "HALF_TOLERANCE_ABS", "HALF_TOLERANCE_REL", "default_tolerance"),
        "sidecar": ("SIDECAR_NAME", "read_train_sidecar", "write_train_sidecar"),
    },
)
