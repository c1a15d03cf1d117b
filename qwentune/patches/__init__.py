"""Every reach into a library's internals (TRL, PEFT, transformers' GGUF loader) in one place (`internals`, and its
GRPO part `grpo`), each a scoped context manager that checks the release it was written for and puts back what was
there (`sharding`: FSDP on CPU ranks); the machinery (`machinery`) and the math the patches run (`lean_fold`,
`token_rows`). Imports only
errors/logs.
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "internals": (
            "BACKWARD_TILE",
            "CHUNKED_FORWARD",
            "FORWARD_TILE",
            "LAYER_FIELDS",
            "PEFT",
            "PRECOMPUTE_REF_LOGPS",
            "PREPARE_DATASET",
            "TRANSFORMERS_GGUF",
            "TRL",
            "TRL_DPO_LOSSES",
            "USE_TRITON",
            "compact_head_on_cpu",
            "lean_cpu_fold",
            "lean_token_rows",
            "lora_input_cast_off",
            "one_gguf_read",
            "peft_output_bias",
            "pretokenized_dpo_trainer",
            "settle_reference_adapter",
            "trl_dpo_loss_types",
            "trl_for_dpo",
            "trl_for_sft",
        ),
        "grpo": ("grpo_trainer", "trl_for_grpo"),
        "lean_fold": ("CPU_VOCAB_CHUNK",),
        "release": ("heap_trimmer", "release_host_memory", "release_trainer"),
        "sharding": ("fsdp_on_cpu", "fsdp_requested"),
    },
)
