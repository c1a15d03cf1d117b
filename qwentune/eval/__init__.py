"""`qwentune eval`: models side by side on the same rows (`evaluation`), tool-call and BFCL scoring (`toolscore`,
`bfcl`), Qwen2-VL rows (`vision`), batched generation (`generate`), the result table (`table`), preference
pairs mined from a model's misses (`pairs`), GRPO's rewards made of the same scoring rules (`rewards`) and the
per-decision lines of rows tagged `"decision"` (`decisions`) and an exported GGUF scored in llama.cpp's server
(`gguf_check`).
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "evaluation": (
            "Item",
            "SFT_SAMPLES",
            "Skipped",
            "ToolCallScore",
            "collect",
            "evaluate",
            "evaluate_after_training",
            "expected_turns",
            "preference_margin",
            "prompt_text",
            "summarize",
            "tool_call_accuracy",
        ),
        "generate": ("stop_token_ids",),
        "gguf_check": ("add_to_report", "score_gguf"),
        "pairs": ("MinedPairs",),
        "rewards": ("BUILTIN", "Reward", "as_reward", "reward_functions"),
    },
)
