"""Models: where they come from (`sources`, `offline`, `gguf_source`), their structure without weights (`shapes`,
`sizes`), 4-bit settings (`quantspec`), loading with LoRA/QLoRA (`loading`), special-token rows (`tokens`) and
whether a model sees images (`vision`); memory from the shape alone, `qwentune estimate` (`memory_estimate`: one
training process; `host_memory`: host RAM per phase of a run). Imports recipe/, patches/ and data/ (image settings).
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "gguf_source": ("MARKER",),
        "host_memory": ("HostPhase", "host_phases", "render_host"),
        "memory_estimate": ("Estimate", "estimate", "estimate_for_launch"),
        "loading": (
            "Precision",
            "add_adapter",
            "check_train_vision",
            "keep_trainables_in_fp32",
            "load_adapter_for_training",
            "load_base_model",
            "load_tokenizer",
            "resolve_precision",
        ),
        "offline": ("OFFLINE_PREFIX",),
        "quantspec": ("QuantSpec",),
        "shapes": ("ENDOFTEXT", "IM_END", "IM_START", "is_vl", "quant_skip_modules"),
        "sizes": ("Shape", "model_shape", "vision_lora_params", "vision_params"),
        "sources": ("ACCEPTED_FORMS", "ResolvedModel", "classify_source", "describe_source", "resolve_model"),
        "tokens": ("check_tokens", "flagged_in_model_files", "prepare_new_token_rows"),
        "vision": ("vision_collator", "image_settings", "is_vision_model", "load_image_processor", "pixel_inputs"),
    },
)
