"""`qwentune eval`: models side by side on the same rows (`evaluation`), tool-call and BFCL scoring (`toolscore`,
`bfcl`), Qwen2-VL rows (`vision`), batched generation (`generate`), the result table (`table`) and preference
pairs mined from a model's misses (`pairs`).
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
            "preference_margin",
            "summarize",
            "tool_call_accuracy",
        ),
        "pairs": ("MinedPairs",),
    },
)
